//! # Violations: forbidden services used during a bug check, and the guest's report of them
//!
//! Using the pool, a spin lock or a wait at HIGH_LEVEL ([`crate::services`]) is refused there
//! and reported here: printed as `CRASHMON VIOLATION <alloc|lock|wait> in
//! <component>/<callback>` and recorded, with the callback that was running (which the bug check
//! names through [`enter_callback`] and [`leave_callback`] around every call). The records
//! become the guest's report ([`write_report`]), which the bug check puts into the dump as a
//! secondary-data blob.
//!
//! This module knows nothing of the bug check or the dump: it only keeps the records, so that
//! the services below the bug check can report without importing it.

use core::ffi::CStr;
use core::fmt::Write as _;
use core::ptr;

use crashmon_guest_driver::wdm::{
    KbCallbackAddPages, KbCallbackDumpIo, KbCallbackSecondaryDumpData, PUCHAR,
};

use crate::global::Global;
use crate::println;

/// A forbidden service used at HIGH_LEVEL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Pool allocation.
    Alloc,
    /// Spin-lock acquisition.
    Lock,
    /// Waiting on a dispatcher object.
    Wait,
}

impl Violation {
    /// The name in `CRASHMON VIOLATION` lines.
    pub fn name(self) -> &'static str {
        match self {
            Self::Alloc => "alloc",
            Self::Lock => "lock",
            Self::Wait => "wait",
        }
    }
}

/// The `reason` of a legacy `BugCheckCallback` (reason callbacks have their
/// `KBUGCHECK_CALLBACK_REASON`).
pub const LEGACY_CALLBACK: i32 = -1;

const MAX_VIOLATIONS: usize = 16;

#[derive(Clone, Copy)]
struct Record {
    what: Violation,
    component: PUCHAR,
    reason: i32,
}

struct Violations {
    /// The callback being called: its component and reason.
    current: Option<(PUCHAR, i32)>,
    records: [Option<Record>; MAX_VIOLATIONS],
    count: usize,
}

/// Written during the bug check, hence `.crashmon_volatile` (pages the harness is told may
/// differ from the dump).
#[link_section = ".crashmon_volatile"]
static STATE: Global<Violations> =
    Global::new(Violations { current: None, records: [None; MAX_VIOLATIONS], count: 0 });

/// The bug check is about to call a callback of `component` for `reason`
/// ([`LEGACY_CALLBACK`] for a legacy one): violations until [`leave_callback`] are its.
pub fn enter_callback(component: PUCHAR, reason: i32) {
    // SAFETY: bug-check path, single processor; no reference to STATE is live across calls.
    unsafe { (*STATE.get()).current = Some((component, reason)) };
}

/// The callback named by [`enter_callback`] returned.
pub fn leave_callback() {
    // SAFETY: as in enter_callback.
    unsafe { (*STATE.get()).current = None };
}

/// A registered component's name (registration requires a NUL-terminated string that lives as
/// long as the record), `?` if there is none.
pub fn component_name(component: PUCHAR) -> &'static str {
    if component.is_null() {
        return "?";
    }
    // SAFETY: registered components are NUL-terminated 'static strings (registration contract).
    unsafe { CStr::from_ptr(component as *const core::ffi::c_char) }.to_str().unwrap_or("?")
}

/// A callback reason's name, as in Windows' `KbCallback...` and the legacy `BugCheckCallback`.
pub fn reason_name(reason: i32) -> &'static str {
    if reason == LEGACY_CALLBACK {
        "BugCheckCallback"
    } else if reason == KbCallbackAddPages {
        "AddPages"
    } else if reason == KbCallbackSecondaryDumpData {
        "SecondaryDumpData"
    } else if reason == KbCallbackDumpIo {
        "DumpIo"
    } else {
        "Reason?"
    }
}

/// Reports `what`, used at HIGH_LEVEL: prints it and records it for the report.
pub fn report(what: Violation) {
    // SAFETY: bug-check path (HIGH_LEVEL implies it), single processor; no other reference to
    // STATE is live while a callback runs.
    let state = unsafe { STATE.as_mut() };
    let (component, reason) = state.current.unwrap_or((ptr::null_mut(), 0));
    if component.is_null() {
        println!("CRASHMON VIOLATION {} in kernel", what.name());
    } else {
        println!(
            "CRASHMON VIOLATION {} in {}/{}",
            what.name(),
            component_name(component),
            reason_name(reason)
        );
    }
    if state.count < MAX_VIOLATIONS {
        state.records[state.count] = Some(Record { what, component, reason });
        state.count += 1;
    }
}

/// A `fmt::Write` into a byte slice that drops what does not fit.
struct SliceWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl core::fmt::Write for SliceWriter<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Writes the report into `buf` (truncated if it does not fit) and returns its length:
/// `crashmon-guest violations=N`, then one line per violation, `<alloc|lock|wait> in
/// <component>/<callback>`.
pub fn write_report(buf: &mut [u8]) -> usize {
    // SAFETY: bug-check path, single processor; read only.
    let state = unsafe { &*STATE.get() };
    let mut w = SliceWriter { buf, len: 0 };
    let _ = writeln!(w, "crashmon-guest violations={}", state.count);
    for v in state.records.iter().flatten() {
        let _ = writeln!(
            w,
            "{} in {}/{}",
            v.what.name(),
            component_name(v.component),
            reason_name(v.reason)
        );
    }
    w.len
}
