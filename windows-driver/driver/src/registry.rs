//! The core's [`BugCheckRegistry`] on Windows: the four `Ke*BugCheck*Callback` routines.

use crate::ntoskrnl::*;
use crashmon_guest_driver::wdm::*;
use crashmon_guest_driver::BugCheckRegistry;

/// Registers with the kernel's own bug-check callback lists.
pub struct NtBugCheckRegistry;

impl BugCheckRegistry for NtBugCheckRegistry {
    unsafe fn register_reason_callback(
        &self,
        record: *mut KBUGCHECK_REASON_CALLBACK_RECORD,
        routine: KBUGCHECK_REASON_CALLBACK_ROUTINE,
        reason: KBUGCHECK_CALLBACK_REASON,
        component: PUCHAR,
    ) -> bool {
        // SAFETY: the caller guarantees a resident record that stays put while registered and a
        // component string that lives as long (the trait's contract is the routine's).
        unsafe {
            KeRegisterBugCheckReasonCallback(record, Some(routine), reason, component) != FALSE
        }
    }

    unsafe fn deregister_reason_callback(
        &self,
        record: *mut KBUGCHECK_REASON_CALLBACK_RECORD,
    ) -> bool {
        // SAFETY: a valid record; the kernel returns FALSE for one that is not registered.
        unsafe { KeDeregisterBugCheckReasonCallback(record) != FALSE }
    }

    unsafe fn register_callback(
        &self,
        record: *mut KBUGCHECK_CALLBACK_RECORD,
        routine: KBUGCHECK_CALLBACK_ROUTINE,
        buffer: PVOID,
        length: ULONG,
        component: PUCHAR,
    ) -> bool {
        // SAFETY: as for the reason callback; the buffer is valid for `length` bytes while
        // registered (the trait's contract).
        unsafe {
            KeRegisterBugCheckCallback(record, Some(routine), buffer, length, component) != FALSE
        }
    }

    unsafe fn deregister_callback(&self, record: *mut KBUGCHECK_CALLBACK_RECORD) -> bool {
        // SAFETY: a valid record; the kernel returns FALSE for one that is not registered.
        unsafe { KeDeregisterBugCheckCallback(record) != FALSE }
    }
}
