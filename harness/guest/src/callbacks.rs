//! # Callbacks: the bug-check callback registry
//!
//! Windows' `KeRegisterBugCheckReasonCallback`, `KeDeregisterBugCheckReasonCallback`,
//! `KeRegisterBugCheckCallback` and `KeDeregisterBugCheckCallback`: the records drivers hand in
//! are kept in two `LIST_ENTRY` lists (head insertion) under a spin lock, with a checksum, as
//! Windows keeps them. Records must be `BufferEmpty` to register; deregistering a record that is
//! not registered returns FALSE. [`GuestRegistry`] is the driver's [`BugCheckRegistry`] over
//! these routines.
//!
//! For the bug check, [`for_each_reason`] and [`for_each_legacy`] walk the lists without the lock,
//! as Windows must (the lock may be held by the code that crashed), skip records whose checksum
//! does not match (marking them `BufferIncomplete`) and set `State` to `BufferStarted` and
//! `BufferFinished` around each call. What a callback is called with, and when, is the bug
//! check's business ([`crate::bugcheck`]): this module knows nothing of dumps.

use core::ptr;

use crashmon_guest_driver::driver::BugCheckRegistry;
use crashmon_guest_driver::wdm::*;

use crate::global::Global;
use crate::services::KSpinLock;

static REASON_LIST: Global<LIST_ENTRY> = Global::new(LIST_ENTRY::zeroed());
static LEGACY_LIST: Global<LIST_ENTRY> = Global::new(LIST_ENTRY::zeroed());
/// `KeBugCheckCallbackLock`: serialises registration (never taken on the bug-check path).
static LIST_LOCK: KSpinLock = KSpinLock::new();

/// Empties both callback lists. Call once at boot before any registration.
pub fn init() {
    // SAFETY: boot, single processor, nothing registered yet.
    unsafe {
        let r = REASON_LIST.get();
        (*r).Flink = r;
        (*r).Blink = r;
        let l = LEGACY_LIST.get();
        (*l).Flink = l;
        (*l).Blink = l;
    }
}

/// `InsertHeadList`.
///
/// # Safety
/// `head` a valid list head, `entry` a valid entry in no list.
unsafe fn insert_head(head: *mut LIST_ENTRY, entry: *mut LIST_ENTRY) {
    // SAFETY: caller's promise.
    unsafe {
        let first = (*head).Flink;
        (*entry).Flink = first;
        (*entry).Blink = head;
        (*first).Blink = entry;
        (*head).Flink = entry;
    }
}

/// `RemoveEntryList`.
///
/// # Safety
/// `entry` must be in a list.
unsafe fn remove_entry(entry: *mut LIST_ENTRY) {
    // SAFETY: caller's promise.
    unsafe {
        let (next, prev) = ((*entry).Flink, (*entry).Blink);
        (*prev).Flink = next;
        (*next).Blink = prev;
        (*entry).Flink = ptr::null_mut();
        (*entry).Blink = ptr::null_mut();
    }
}

/// Runs `f` under `KeBugCheckCallbackLock` and returns its answer as a `BOOLEAN`; FALSE if the
/// lock is refused (above DISPATCH_LEVEL, or already held).
fn under_lock(f: impl FnOnce() -> bool) -> BOOLEAN {
    let Some(old) = LIST_LOCK.acquire() else { return FALSE };
    let done = f();
    LIST_LOCK.release(old);
    done as BOOLEAN
}

/// Takes a registered record out of its list: false if its `State` says it is not registered.
///
/// # Safety
/// `entry` and `state` belong to one valid record; the caller holds the lock.
unsafe fn remove_record(entry: *mut LIST_ENTRY, state: &mut UCHAR) -> bool {
    if *state as i32 != BufferInserted {
        return false;
    }
    // SAFETY: an inserted record is in a list (caller's promise for the rest).
    unsafe { remove_entry(entry) };
    *state = BufferEmpty as UCHAR;
    true
}

fn reason_checksum(routine: usize, reason: KBUGCHECK_CALLBACK_REASON, component: PUCHAR) -> usize {
    routine.wrapping_add(reason as usize).wrapping_add(component as usize)
}

fn legacy_checksum(routine: usize, buffer: PVOID, length: ULONG, component: PUCHAR) -> usize {
    routine
        .wrapping_add(buffer as usize)
        .wrapping_add(length as usize)
        .wrapping_add(component as usize)
}

/// `KeRegisterBugCheckReasonCallback`.
///
/// # Safety
/// `record` must be valid and resident until deregistered; `component` a NUL-terminated string
/// that lives as long.
#[allow(non_snake_case)]
pub unsafe fn KeRegisterBugCheckReasonCallback(
    CallbackRecord: *mut KBUGCHECK_REASON_CALLBACK_RECORD,
    CallbackRoutine: KBUGCHECK_REASON_CALLBACK_ROUTINE,
    Reason: KBUGCHECK_CALLBACK_REASON,
    Component: PUCHAR,
) -> BOOLEAN {
    // SAFETY: caller's promise.
    let record = unsafe { &mut *CallbackRecord };
    under_lock(|| {
        if record.State as i32 != BufferEmpty {
            return false;
        }
        record.CallbackRoutine = Some(CallbackRoutine);
        record.Component = Component;
        record.Reason = Reason;
        record.Checksum = reason_checksum(CallbackRoutine as usize, Reason, Component);
        record.State = BufferInserted as UCHAR;
        // SAFETY: a valid head, and the record is in no list (its State was BufferEmpty).
        unsafe { insert_head(REASON_LIST.get(), &mut record.Entry) };
        true
    })
}

/// `KeDeregisterBugCheckReasonCallback`.
///
/// # Safety
/// `record` must be valid.
#[allow(non_snake_case)]
pub unsafe fn KeDeregisterBugCheckReasonCallback(
    CallbackRecord: *mut KBUGCHECK_REASON_CALLBACK_RECORD,
) -> BOOLEAN {
    // SAFETY: caller's promise.
    let record = unsafe { &mut *CallbackRecord };
    // SAFETY: the record is valid; the lock serialises list changes.
    under_lock(|| unsafe { remove_record(&mut record.Entry, &mut record.State) })
}

/// `KeRegisterBugCheckCallback`.
///
/// # Safety
/// As [`KeRegisterBugCheckReasonCallback`]; `Buffer` valid for `Length` bytes while registered.
#[allow(non_snake_case)]
pub unsafe fn KeRegisterBugCheckCallback(
    CallbackRecord: *mut KBUGCHECK_CALLBACK_RECORD,
    CallbackRoutine: KBUGCHECK_CALLBACK_ROUTINE,
    Buffer: PVOID,
    Length: ULONG,
    Component: PUCHAR,
) -> BOOLEAN {
    // SAFETY: caller's promise.
    let record = unsafe { &mut *CallbackRecord };
    under_lock(|| {
        if record.State as i32 != BufferEmpty {
            return false;
        }
        record.CallbackRoutine = Some(CallbackRoutine);
        record.Buffer = Buffer;
        record.Length = Length;
        record.Component = Component;
        record.Checksum = legacy_checksum(CallbackRoutine as usize, Buffer, Length, Component);
        record.State = BufferInserted as UCHAR;
        // SAFETY: a valid head, and the record is in no list (its State was BufferEmpty).
        unsafe { insert_head(LEGACY_LIST.get(), &mut record.Entry) };
        true
    })
}

/// `KeDeregisterBugCheckCallback`.
///
/// # Safety
/// `record` must be valid.
#[allow(non_snake_case)]
pub unsafe fn KeDeregisterBugCheckCallback(
    CallbackRecord: *mut KBUGCHECK_CALLBACK_RECORD,
) -> BOOLEAN {
    // SAFETY: caller's promise.
    let record = unsafe { &mut *CallbackRecord };
    // SAFETY: the record is valid; the lock serialises list changes.
    under_lock(|| unsafe { remove_record(&mut record.Entry, &mut record.State) })
}

/// How many reason and legacy callbacks are registered (under the lock; not on the bug-check
/// path).
pub fn registered() -> (usize, usize) {
    let count = |head: *mut LIST_ENTRY| {
        let mut n = 0;
        // SAFETY: the list is intact and the lock (held by the caller below) keeps it so.
        unsafe {
            let mut entry = (*head).Flink;
            while !entry.is_null() && entry != head {
                n += 1;
                entry = (*entry).Flink;
            }
        }
        n
    };
    let Some(old) = LIST_LOCK.acquire() else { return (0, 0) };
    let counts = (count(REASON_LIST.get()), count(LEGACY_LIST.get()));
    LIST_LOCK.release(old);
    counts
}

/// The guest's implementation of the driver's [`BugCheckRegistry`]: the `Ke*` routines above.
pub struct GuestRegistry;

impl BugCheckRegistry for GuestRegistry {
    unsafe fn register_reason_callback(
        &self,
        record: *mut KBUGCHECK_REASON_CALLBACK_RECORD,
        routine: KBUGCHECK_REASON_CALLBACK_ROUTINE,
        reason: KBUGCHECK_CALLBACK_REASON,
        component: PUCHAR,
    ) -> bool {
        // SAFETY: forwarded contract.
        unsafe { KeRegisterBugCheckReasonCallback(record, routine, reason, component) == TRUE }
    }
    unsafe fn deregister_reason_callback(
        &self,
        record: *mut KBUGCHECK_REASON_CALLBACK_RECORD,
    ) -> bool {
        // SAFETY: forwarded contract.
        unsafe { KeDeregisterBugCheckReasonCallback(record) == TRUE }
    }
    unsafe fn register_callback(
        &self,
        record: *mut KBUGCHECK_CALLBACK_RECORD,
        routine: KBUGCHECK_CALLBACK_ROUTINE,
        buffer: PVOID,
        length: ULONG,
        component: PUCHAR,
    ) -> bool {
        // SAFETY: forwarded contract.
        unsafe { KeRegisterBugCheckCallback(record, routine, buffer, length, component) == TRUE }
    }
    unsafe fn deregister_callback(&self, record: *mut KBUGCHECK_CALLBACK_RECORD) -> bool {
        // SAFETY: forwarded contract.
        unsafe { KeDeregisterBugCheckCallback(record) == TRUE }
    }
}

/// Walks the reason callbacks registered for `reason`, without the lock, calling `f` with each
/// valid record and its routine (between `BufferStarted` and `BufferFinished`).
///
/// # Safety
/// Bug-check path: the list does not change under us and every record is resident.
pub unsafe fn for_each_reason(
    reason: i32,
    mut f: impl FnMut(*mut KBUGCHECK_REASON_CALLBACK_RECORD, KBUGCHECK_REASON_CALLBACK_ROUTINE),
) {
    let head = REASON_LIST.get();
    // SAFETY: per the function contract the list is intact; records are resident.
    unsafe {
        let mut entry = (*head).Flink;
        while !entry.is_null() && entry != head {
            let next = (*entry).Flink;
            let record = entry as *mut KBUGCHECK_REASON_CALLBACK_RECORD; // Entry is at offset 0
            let r = &*record;
            if let Some(routine) = r.CallbackRoutine {
                let valid = r.Checksum == reason_checksum(routine as usize, r.Reason, r.Component);
                if r.Reason == reason && valid {
                    (*record).State = BufferStarted as UCHAR;
                    f(record, routine);
                    (*record).State = BufferFinished as UCHAR;
                } else if !valid {
                    (*record).State = BufferIncomplete as UCHAR;
                }
            }
            entry = next;
        }
    }
}

/// Walks the legacy callbacks, without the lock, calling `f` with each valid record and its
/// routine (between `BufferStarted` and `BufferFinished`).
///
/// # Safety
/// Bug-check path: the list does not change under us and every record is resident.
pub unsafe fn for_each_legacy(
    mut f: impl FnMut(&KBUGCHECK_CALLBACK_RECORD, KBUGCHECK_CALLBACK_ROUTINE),
) {
    let head = LEGACY_LIST.get();
    // SAFETY: per the function contract the list is intact; records are resident.
    unsafe {
        let mut entry = (*head).Flink;
        while !entry.is_null() && entry != head {
            let next = (*entry).Flink;
            let record = &mut *(entry as *mut KBUGCHECK_CALLBACK_RECORD);
            if let Some(routine) = record.CallbackRoutine {
                if record.Checksum
                    == legacy_checksum(
                        routine as usize,
                        record.Buffer,
                        record.Length,
                        record.Component,
                    )
                {
                    record.State = BufferStarted as UCHAR;
                    f(record, routine);
                    record.State = BufferFinished as UCHAR;
                } else {
                    record.State = BufferIncomplete as UCHAR;
                }
            }
            entry = next;
        }
    }
}
