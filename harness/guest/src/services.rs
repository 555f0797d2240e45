//! # Services: the pool, the spin lock and the wait, and the IRQL that forbids them
//!
//! The kernel services a bug-check callback must not use ("Writing a Bug Check Callback
//! Routine": no allocation, no synchronization, nothing that needs IRQL <= DISPATCH_LEVEL),
//! implemented for real so that a callback that uses them can be caught:
//!
//! * [`ExAllocatePoolWithTag`]: a bump allocator over a 256 KiB non-paged pool;
//! * [`KSpinLock`]: `KeAcquireSpinLock`/`KeReleaseSpinLock`, raising to DISPATCH_LEVEL;
//! * [`KEvent`]: `KeSetEvent`/`KeWaitForSingleObject` with a timeout.
//!
//! Each checks the current IRQL first. At HIGH_LEVEL (during a bug check) the call is a
//! violation: instead of deadlocking or corrupting the pool as it would on Windows, it is
//! refused (NULL, not acquired, not waited), printed as `CRASHMON VIOLATION <what> in
//! <callback>` and recorded by [`crate::violations`] for the dump's report blob.
//!
//! The bug check sits above this module: it raises the IRQL with [`raise_to_high_level_for_good`]
//! rather than this module asking whether a bug check is running.

use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crashmon_guest_driver::wdm::{DISPATCH_LEVEL, HIGH_LEVEL, KIRQL, PASSIVE_LEVEL};

use crate::global::Global;
use crate::violations::{self, Violation};

/// The current IRQL. HIGH_LEVEL from the moment a bug check starts; written then, so it lives
/// with the other data the bug-check path writes.
#[link_section = ".crashmon_volatile"]
static IRQL: Global<KIRQL> = Global::new(PASSIVE_LEVEL);

/// `KeGetCurrentIrql`.
#[allow(non_snake_case)]
pub fn KeGetCurrentIrql() -> KIRQL {
    // SAFETY: a byte read; single processor (see global.rs).
    unsafe { *IRQL.get() }
}

/// `KeRaiseIrql`: returns the old IRQL. Raising to a lower level is a caller bug and is
/// ignored.
#[allow(non_snake_case)]
pub fn KeRaiseIrql(new: KIRQL) -> KIRQL {
    let old = KeGetCurrentIrql();
    if new > old {
        // SAFETY: a byte write; single processor.
        unsafe { *IRQL.get() = new };
    }
    old
}

/// Set once a bug check has raised the IRQL for good; written then, so it lives with the IRQL.
#[link_section = ".crashmon_volatile"]
static PINNED: Global<bool> = Global::new(false);

/// Raises the IRQL to HIGH_LEVEL for the rest of the system's life: what `KeBugCheckEx` does
/// (a bug check never returns, so nothing may lower it again). Returns the old IRQL.
pub fn raise_to_high_level_for_good() -> KIRQL {
    // SAFETY: a bool write; single processor.
    unsafe { *PINNED.get() = true };
    KeRaiseIrql(HIGH_LEVEL)
}

/// `KeLowerIrql`. Never lowers below HIGH_LEVEL once a bug check is running.
#[allow(non_snake_case)]
pub fn KeLowerIrql(new: KIRQL) {
    // SAFETY: a bool read; single processor.
    if KeGetCurrentIrql() == HIGH_LEVEL && unsafe { *PINNED.get() } {
        return;
    }
    // SAFETY: a byte write; single processor.
    unsafe { *IRQL.get() = new };
}

const POOL_SIZE: usize = 256 * 1024;

#[repr(C, align(4096))]
struct Pool([u8; POOL_SIZE]);

static POOL: Global<Pool> = Global::new(Pool([0; POOL_SIZE]));
static POOL_USED: AtomicUsize = AtomicUsize::new(0);

/// `ExAllocatePoolWithTag(NonPagedPool, size, tag)`: 16-byte aligned memory from the pool, or
/// NULL when it is exhausted, or when called above DISPATCH_LEVEL (a violation at HIGH_LEVEL).
/// The pool never frees: the guest's allocations are made once at boot.
#[allow(non_snake_case)]
pub fn ExAllocatePoolWithTag(size: usize, _tag: u32) -> *mut u8 {
    if KeGetCurrentIrql() > DISPATCH_LEVEL {
        violations::report(Violation::Alloc);
        return core::ptr::null_mut();
    }
    let size = (size + 15) & !15;
    let start = POOL_USED.load(Ordering::Relaxed);
    if start + size > POOL_SIZE {
        return core::ptr::null_mut();
    }
    POOL_USED.store(start + size, Ordering::Relaxed);
    // SAFETY: start + size is within the pool; the range is handed out once.
    unsafe { (POOL.get() as *mut u8).add(start) }
}

/// `KSPIN_LOCK`.
pub struct KSpinLock(AtomicBool);

impl KSpinLock {
    /// `KeInitializeSpinLock`.
    pub const fn new() -> Self {
        Self(AtomicBool::new(false))
    }

    /// `KeAcquireSpinLock`: raises to DISPATCH_LEVEL and takes the lock; returns the old IRQL
    /// for [`KSpinLock::release`]. `None` when refused: above DISPATCH_LEVEL (a violation at
    /// HIGH_LEVEL), or when the lock is already held, which on one processor is a deadlock
    /// Windows would hang in.
    pub fn acquire(&self) -> Option<KIRQL> {
        if KeGetCurrentIrql() > DISPATCH_LEVEL {
            violations::report(Violation::Lock);
            return None;
        }
        if self.0.swap(true, Ordering::Acquire) {
            crate::println!("CRASHMON ERROR spin lock already held: deadlock on one processor");
            return None;
        }
        Some(KeRaiseIrql(DISPATCH_LEVEL))
    }

    /// `KeReleaseSpinLock`.
    pub fn release(&self, old: KIRQL) {
        self.0.store(false, Ordering::Release);
        KeLowerIrql(old);
    }
}

impl Default for KSpinLock {
    fn default() -> Self {
        Self::new()
    }
}

/// A notification `KEVENT`.
pub struct KEvent(AtomicBool);

impl KEvent {
    /// `KeInitializeEvent(NotificationEvent, FALSE)`.
    pub const fn new() -> Self {
        Self(AtomicBool::new(false))
    }

    /// `KeSetEvent`.
    pub fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// `KeWaitForSingleObject` with a timeout counted in polls (there is no scheduler: the
    /// event can only be set by an exception handler or by code that ran before). True if the
    /// event is signalled. Refused (false at once) at or above DISPATCH_LEVEL, where Windows
    /// allows only a zero timeout; a violation at HIGH_LEVEL.
    pub fn wait(&self, polls: u64) -> bool {
        if KeGetCurrentIrql() >= DISPATCH_LEVEL {
            violations::report(Violation::Wait);
            return false;
        }
        for _ in 0..=polls {
            if self.0.load(Ordering::Acquire) {
                return true;
            }
            core::hint::spin_loop();
        }
        false
    }
}

impl Default for KEvent {
    fn default() -> Self {
        Self::new()
    }
}

/// Uses each service once at PASSIVE_LEVEL, where they are allowed, so the boot log shows they
/// work before a bug check shows them refused.
pub fn self_test() -> bool {
    static LOCK: KSpinLock = KSpinLock::new();
    static EVENT: KEvent = KEvent::new();
    let block = ExAllocatePoolWithTag(64, u32::from_le_bytes(*b"CMtt"));
    let locked = LOCK.acquire();
    let at_dispatch = KeGetCurrentIrql() == DISPATCH_LEVEL;
    if let Some(old) = locked {
        LOCK.release(old);
    }
    EVENT.set();
    let waited = EVENT.wait(0);
    !block.is_null()
        && locked.is_some()
        && at_dispatch
        && KeGetCurrentIrql() == PASSIVE_LEVEL
        && waited
}
