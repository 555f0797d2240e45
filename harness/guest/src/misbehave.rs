//! # Misbehave: a driver that breaks the bug-check rules
//!
//! With `misbehave=alloc,lock,wait` (any subset) the guest registers a second driver's
//! SecondaryDumpData callback (component `crashmon-misbehave`) that, when the bug check polls
//! it, allocates pool, acquires a spin lock and/or waits on an event: exactly what "Writing a
//! Bug Check Callback Routine" forbids. The guest's services refuse each one at HIGH_LEVEL and
//! report it (`CRASHMON VIOLATION ... in crashmon-misbehave/SecondaryDumpData`, and the report
//! blob in the dump). The callback then supplies no data.

use crashmon_guest_driver::driver::BugCheckRegistry;
use crashmon_guest_driver::wdm::*;

use crate::callbacks::GuestRegistry;
use crate::global::Global;
use crate::services::{ExAllocatePoolWithTag, KEvent, KSpinLock};

/// What the misbehaving callback does (`misbehave=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Misbehaviour {
    /// Allocate pool.
    pub alloc: bool,
    /// Acquire a spin lock.
    pub lock: bool,
    /// Wait on an event.
    pub wait: bool,
}

impl Misbehaviour {
    /// Nothing: no callback is registered.
    pub const NONE: Misbehaviour = Misbehaviour { alloc: false, lock: false, wait: false };
}

/// What the callback does: written once by [`register`] at boot, read by the callback.
static WHAT: Global<Misbehaviour> = Global::new(Misbehaviour::NONE);

#[link_section = ".crashmon_volatile"]
static RECORD: Global<KBUGCHECK_REASON_CALLBACK_RECORD> =
    Global::new(KBUGCHECK_REASON_CALLBACK_RECORD::new());
static LOCK: KSpinLock = KSpinLock::new();
static EVENT: KEvent = KEvent::new();

/// Registers the misbehaving callback if `what` asks for anything.
pub fn register(what: Misbehaviour) -> Result<(), &'static str> {
    if what == Misbehaviour::NONE {
        return Ok(());
    }
    // SAFETY: boot time, before the callback is registered: nothing reads WHAT yet.
    unsafe { *WHAT.get() = what };
    // SAFETY: a resident static record, registered once; 'static component name.
    let ok = unsafe {
        GuestRegistry.register_reason_callback(
            RECORD.get(),
            misbehaving_callback,
            KbCallbackSecondaryDumpData,
            c"crashmon-misbehave".as_ptr() as PUCHAR,
        )
    };
    if ok {
        Ok(())
    } else {
        Err("registering the misbehaving callback")
    }
}

/// # Safety
/// Called by the bug check with a valid `KBUGCHECK_SECONDARY_DUMP_DATA`.
unsafe extern "system" fn misbehaving_callback(
    reason: KBUGCHECK_CALLBACK_REASON,
    _record: *mut KBUGCHECK_REASON_CALLBACK_RECORD,
    data: PVOID,
    length: ULONG,
) {
    if reason != KbCallbackSecondaryDumpData
        || data.is_null()
        || (length as usize) < core::mem::size_of::<KBUGCHECK_SECONDARY_DUMP_DATA>()
    {
        return;
    }
    // SAFETY: written once at boot, read-only since.
    let c = unsafe { *WHAT.get() };
    if c.alloc {
        let _ = ExAllocatePoolWithTag(4096, u32::from_le_bytes(*b"Bad!"));
    }
    if c.lock {
        if let Some(old) = LOCK.acquire() {
            LOCK.release(old);
        }
    }
    if c.wait {
        let _ = EVENT.wait(1_000_000);
    }
    // SAFETY: the bug check passes a valid request, ours to fill.
    let request = unsafe { &mut *(data as *mut KBUGCHECK_SECONDARY_DUMP_DATA) };
    request.OutBufferLength = 0;
}
