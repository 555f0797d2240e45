//! # Bugcheck: Windows' side of the bug-check callback contract
//!
//! The routines a driver calls (`KeRegisterBugCheckReasonCallback`,
//! `KeDeregisterBugCheckReasonCallback`, `KeRegisterBugCheckCallback`,
//! `KeDeregisterBugCheckCallback`), with their records kept in `LIST_ENTRY` lists under a spin
//! lock as Windows does, and `KeBugCheckEx`, which never returns:
//!
//! 1. interrupts off, IRQL to HIGH_LEVEL, the crashing processor's registers captured (at the
//!    `KeBugCheckEx` call, or from the trap frame of the fault that led here), and a switch to a
//!    dedicated bug-check stack;
//! 2. `KbCallbackAddPages` callbacks are polled (called again while they set
//!    `KB_ADD_PAGES_FLAG_ADDITIONAL_RANGES_EXIST`); their pages are added to a bitmap dump;
//! 3. `KbCallbackSecondaryDumpData` callbacks are polled: a size query (`OutBuffer` NULL), then,
//!    if they want to write, the data request (`OutBuffer == InBuffer`);
//! 4. the dump is written ([`crate::dump`]) and every piece goes to every `KbCallbackDumpIo`
//!    callback as a `KBUGCHECK_DUMP_IO`, ending with `KbDumpIoComplete`;
//! 5. the legacy `BugCheckCallback`s run, after the dump (as since Windows XP SP1);
//! 6. `CRASHMON DUMP DONE`, then halt forever (or reset, with `reboot=`).
//!
//! The lists are walked without the lock, as Windows must: the lock may be held by the code
//! that crashed. Records whose checksum does not match are skipped, as Windows skips corrupt
//! records.
//!
//! Violations: using the pool, a spin lock or a wait at HIGH_LEVEL ([`crate::services`]) is
//! refused, printed as `CRASHMON VIOLATION <alloc|lock|wait> in <component>/<callback>` and
//! recorded. The record goes into the dump as a secondary-data blob tagged
//! [`GUEST_REPORT_GUID`] (text, one line per violation), made after the AddPages and
//! SecondaryDumpData callbacks ran, so violations in those callbacks are in the dump; violations
//! in DumpIo or legacy callbacks happen while or after the dump is written and are on serial only.

use core::arch::{asm, naked_asm};
use core::ffi::CStr;
use core::fmt::Write as _;
use core::mem::size_of;
use core::ptr;

use crashmon_guest_driver::driver::BugCheckRegistry;
use crashmon_guest_driver::wdm::*;

use crate::boot::{self, Stack, PAGE_SIZE};
use crate::global::Global;
use crate::interrupts::TrapFrame;
use crate::services::{KSpinLock, KeRaiseIrql};
use crate::{dump, println, triggers};

/// Bug-check codes the guest raises (Windows' values).
pub mod codes {
    /// KMODE_EXCEPTION_NOT_HANDLED.
    pub const KMODE_EXCEPTION_NOT_HANDLED: u32 = 0x1E;
    /// PAGE_FAULT_IN_NONPAGED_AREA.
    pub const PAGE_FAULT_IN_NONPAGED_AREA: u32 = 0x50;
    /// UNEXPECTED_KERNEL_MODE_TRAP.
    pub const UNEXPECTED_KERNEL_MODE_TRAP: u32 = 0x7F;
    /// NMI_HARDWARE_FAILURE.
    pub const NMI_HARDWARE_FAILURE: u32 = 0x80;
    /// KERNEL_MODE_EXCEPTION_NOT_HANDLED.
    pub const KERNEL_MODE_EXCEPTION_NOT_HANDLED: u32 = 0x8E;
    /// MANUALLY_INITIATED_CRASH.
    pub const MANUALLY_INITIATED_CRASH: u32 = 0xE2;
}

/// Parameter 1 of NMI_HARDWARE_FAILURE for an NMI from outside the machine, as Windows' HAL
/// reports an injected NMI (`0x4F4454`).
pub const NMI_SOURCE_TAG: u64 = 0x004F_4454;

/// Tag of the guest's own secondary blob: the violation report.
/// {C4A50D02-6775-4573-8000-7265706F7274} ("report").
pub const GUEST_REPORT_GUID: GUID = GUID {
    Data1: 0xC4A5_0D02,
    Data2: 0x6775,
    Data3: 0x4573,
    Data4: [0x80, 0x00, b'r', b'e', b'p', b'o', b'r', b't'],
};

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

// ---------------------------------------------------------------------------------------------
// Registration

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
    let Some(old) = LIST_LOCK.acquire() else { return FALSE };
    // SAFETY: caller's promise; the lock serialises list changes.
    let registered = unsafe {
        let record = &mut *CallbackRecord;
        if record.State as i32 != BufferEmpty {
            false
        } else {
            record.CallbackRoutine = Some(CallbackRoutine);
            record.Component = Component;
            record.Reason = Reason;
            record.Checksum = reason_checksum(CallbackRoutine as usize, Reason, Component);
            record.State = BufferInserted as UCHAR;
            insert_head(REASON_LIST.get(), &mut record.Entry);
            true
        }
    };
    LIST_LOCK.release(old);
    registered as BOOLEAN
}

/// `KeDeregisterBugCheckReasonCallback`.
///
/// # Safety
/// `record` must be valid.
#[allow(non_snake_case)]
pub unsafe fn KeDeregisterBugCheckReasonCallback(
    CallbackRecord: *mut KBUGCHECK_REASON_CALLBACK_RECORD,
) -> BOOLEAN {
    let Some(old) = LIST_LOCK.acquire() else { return FALSE };
    // SAFETY: caller's promise; the lock serialises list changes.
    let removed = unsafe {
        let record = &mut *CallbackRecord;
        if record.State as i32 != BufferInserted {
            false
        } else {
            remove_entry(&mut record.Entry);
            record.State = BufferEmpty as UCHAR;
            true
        }
    };
    LIST_LOCK.release(old);
    removed as BOOLEAN
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
    let Some(old) = LIST_LOCK.acquire() else { return FALSE };
    // SAFETY: caller's promise; the lock serialises list changes.
    let registered = unsafe {
        let record = &mut *CallbackRecord;
        if record.State as i32 != BufferEmpty {
            false
        } else {
            record.CallbackRoutine = Some(CallbackRoutine);
            record.Buffer = Buffer;
            record.Length = Length;
            record.Component = Component;
            record.Checksum = legacy_checksum(CallbackRoutine as usize, Buffer, Length, Component);
            record.State = BufferInserted as UCHAR;
            insert_head(LEGACY_LIST.get(), &mut record.Entry);
            true
        }
    };
    LIST_LOCK.release(old);
    registered as BOOLEAN
}

/// `KeDeregisterBugCheckCallback`.
///
/// # Safety
/// `record` must be valid.
#[allow(non_snake_case)]
pub unsafe fn KeDeregisterBugCheckCallback(
    CallbackRecord: *mut KBUGCHECK_CALLBACK_RECORD,
) -> BOOLEAN {
    let Some(old) = LIST_LOCK.acquire() else { return FALSE };
    // SAFETY: caller's promise; the lock serialises list changes.
    let removed = unsafe {
        let record = &mut *CallbackRecord;
        if record.State as i32 != BufferInserted {
            false
        } else {
            remove_entry(&mut record.Entry);
            record.State = BufferEmpty as UCHAR;
            true
        }
    };
    LIST_LOCK.release(old);
    removed as BOOLEAN
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

// ---------------------------------------------------------------------------------------------
// Bug-check state: everything here is written during the bug check, so it lives in
// .crashmon_volatile (pages the harness is told may differ from the dump).

const MAX_VIOLATIONS: usize = 16;
const MAX_ADDED: usize = 64;
const MAX_BLOBS: usize = 16;
/// Budget for all secondary data (Windows caps it too).
pub const SECONDARY_BUDGET: usize = 64 * 1024;
const BUGCHECK_STACK_SIZE: usize = 64 * 1024;

/// A blob a SecondaryDumpData callback supplied (or the guest's report).
#[derive(Clone, Copy)]
pub struct Blob {
    /// Tag, in memory order.
    pub guid: [u8; 16],
    /// Where the data is: in the arena or the driver's resident buffer.
    pub data: *const u8,
    /// Bytes.
    pub len: usize,
}

#[derive(Clone, Copy)]
struct ViolationRecord {
    what: Violation,
    component: PUCHAR,
    reason: i32,
}

/// What one bug check has gathered.
pub struct BugCheckData {
    /// A bug check is under way.
    pub active: bool,
    /// `KeBugCheckEx`'s arguments.
    pub code: u32,
    /// Parameters 1..4.
    pub parameters: [u64; 4],
    /// Registers of the crashing processor.
    pub frame: TrapFrame,
    /// The callback being called: its component and reason (-1 for a legacy callback).
    current: Option<(PUCHAR, i32)>,
    violations: [Option<ViolationRecord>; MAX_VIOLATIONS],
    violation_count: usize,
    /// Page ranges from AddPages callbacks: (first PFN, count).
    pub added: [(u64, u64); MAX_ADDED],
    /// Used entries of `added`.
    pub added_count: usize,
    /// Secondary blobs.
    pub blobs: [Option<Blob>; MAX_BLOBS],
    /// Used entries of `blobs`.
    pub blob_count: usize,
    /// Where in the arena the guest's report starts.
    report_at: usize,
}

#[link_section = ".crashmon_volatile"]
static DATA: Global<BugCheckData> = Global::new(BugCheckData {
    active: false,
    code: 0,
    parameters: [0; 4],
    frame: TrapFrame {
        rax: 0,
        rbx: 0,
        rcx: 0,
        rdx: 0,
        rsi: 0,
        rdi: 0,
        rbp: 0,
        r8: 0,
        r9: 0,
        r10: 0,
        r11: 0,
        r12: 0,
        r13: 0,
        r14: 0,
        r15: 0,
        vector: 0,
        error_code: 0,
        rip: 0,
        cs: 0,
        rflags: 0,
        rsp: 0,
        ss: 0,
    },
    current: None,
    violations: [None; MAX_VIOLATIONS],
    violation_count: 0,
    added: [(0, 0); MAX_ADDED],
    added_count: 0,
    blobs: [None; MAX_BLOBS],
    blob_count: 0,
    report_at: 0,
});

#[repr(C, align(4096))]
struct Arena([u8; SECONDARY_BUDGET]);

/// Secondary data the callbacks wrote into their `InBuffer`s, and the guest's report.
#[link_section = ".bss.crashmon_volatile"]
static ARENA: Global<Arena> = Global::new(Arena([0; SECONDARY_BUDGET]));

#[link_section = ".bss.crashmon_volatile"]
static BUGCHECK_STACK: Global<Stack<BUGCHECK_STACK_SIZE>> =
    Global::new(Stack([0; BUGCHECK_STACK_SIZE]));

/// Whether a bug check is under way.
pub fn active() -> bool {
    // SAFETY: a bool read; single processor.
    unsafe { (*DATA.get()).active }
}

/// The bug check's data, for the dump.
///
/// # Safety
/// Only on the bug-check path, and not while a `&mut` from elsewhere in this module is live.
pub unsafe fn data() -> &'static BugCheckData {
    // SAFETY: caller's promise.
    unsafe { &*DATA.get() }
}

fn component_name(component: PUCHAR) -> &'static str {
    if component.is_null() {
        return "?";
    }
    // SAFETY: registered components are NUL-terminated 'static strings (registration contract).
    unsafe { CStr::from_ptr(component as *const core::ffi::c_char) }.to_str().unwrap_or("?")
}

fn reason_name(reason: i32) -> &'static str {
    if reason == -1 {
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

/// Called by [`crate::services`] when a forbidden service is used at HIGH_LEVEL.
pub fn report_violation(what: Violation) {
    // SAFETY: bug-check path (HIGH_LEVEL implies it), single processor; no other reference to
    // DATA is live while a callback runs.
    let data = unsafe { DATA.as_mut() };
    let (component, reason) = data.current.unwrap_or((ptr::null_mut(), 0));
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
    if data.violation_count < MAX_VIOLATIONS {
        data.violations[data.violation_count] = Some(ViolationRecord { what, component, reason });
        data.violation_count += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// KeBugCheckEx

/// `KeBugCheckEx`: crashes the system. Captures the caller's registers (RIP is the return
/// address, RSP the caller's stack pointer after the call), then runs the bug check.
#[unsafe(naked)]
#[allow(non_snake_case)]
pub extern "C" fn KeBugCheckEx(code: u32, p1: u64, p2: u64, p3: u64, p4: u64) -> ! {
    naked_asm!(
        // A TrapFrame (176 bytes) plus 8 so that RSP is 16-byte aligned at the call.
        "sub rsp, 184",
        "mov [rsp + 0], rax",
        "mov [rsp + 8], rbx",
        "mov [rsp + 16], rcx",
        "mov [rsp + 24], rdx",
        "mov [rsp + 32], rsi",
        "mov [rsp + 40], rdi",
        "mov [rsp + 48], rbp",
        "mov [rsp + 56], r8",
        "mov [rsp + 64], r9",
        "mov [rsp + 72], r10",
        "mov [rsp + 80], r11",
        "mov [rsp + 88], r12",
        "mov [rsp + 96], r13",
        "mov [rsp + 104], r14",
        "mov [rsp + 112], r15",
        "mov qword ptr [rsp + 120], 0x100", // not an exception vector
        "mov qword ptr [rsp + 128], 0",
        "mov rax, [rsp + 184]",             // return address
        "mov [rsp + 136], rax",
        "mov rax, cs",
        "mov [rsp + 144], rax",
        "pushfq",
        "pop rax",
        "mov [rsp + 152], rax",
        "lea rax, [rsp + 192]",             // the caller's RSP once the call returned
        "mov [rsp + 160], rax",
        "mov rax, ss",
        "mov [rsp + 168], rax",
        "mov rax, [rsp + 0]",
        "mov r9, rsp",
        "call {entry}",
        "ud2",
        entry = sym bugcheck_from_call,
    )
}

extern "C" fn bugcheck_from_call(
    code: u32,
    p1: u64,
    p2: u64,
    p3: u64,
    p4: u64,
    frame: &TrapFrame,
) -> ! {
    enter(code, [p1, p2, p3, p4], frame)
}

/// The bug check for an exception, from [`crate::interrupts`].
pub fn bugcheck_from_trap(code: u32, parameters: [u64; 4], frame: &TrapFrame) -> ! {
    enter(code, parameters, frame)
}

fn halt_forever() -> ! {
    loop {
        // SAFETY: stops the processor; only an NMI wakes it, and that bug checks again (nested).
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

fn enter(code: u32, parameters: [u64; 4], frame: &TrapFrame) -> ! {
    // SAFETY: disabling interrupts has no memory effects.
    unsafe { asm!("cli", options(nomem, nostack)) };
    // SAFETY: single processor and interrupts off; a nested bug check only reads `active`.
    let data = unsafe { DATA.as_mut() };
    if data.active {
        println!(
            "CRASHMON NESTED BUGCHECK code={:#x} p1={:#x} p2={:#x} p3={:#x} p4={:#x} during code={:#x}",
            code, parameters[0], parameters[1], parameters[2], parameters[3], data.code
        );
        halt_forever();
    }
    data.active = true;
    KeRaiseIrql(HIGH_LEVEL);
    data.code = code;
    data.parameters = parameters;
    data.frame = *frame;
    let top = BUGCHECK_STACK.get() as u64 + BUGCHECK_STACK_SIZE as u64;
    // SAFETY: the bug-check stack is ours and unused; bugcheck_main never returns, so nothing
    // comes back to the old stack.
    unsafe {
        asm!(
            "mov rsp, {top}",
            "call {main}",
            "ud2",
            top = in(reg) top,
            main = sym bugcheck_main,
            options(noreturn),
        )
    }
}

/// The rest of the bug check, on the bug-check stack.
extern "C" fn bugcheck_main() -> ! {
    // SAFETY: bug-check path; copies of scalars only.
    let (code, p) = unsafe { ((*DATA.get()).code, (*DATA.get()).parameters) };
    println!(
        "CRASHMON BUGCHECK code={:#x} p1={:#x} p2={:#x} p3={:#x} p4={:#x}",
        code, p[0], p[1], p[2], p[3]
    );
    for pfn in modified_pages() {
        println!("CRASHMON MODIFIED pfn={:#x}", pfn);
    }
    // SAFETY: bug-check path, callbacks called one at a time.
    unsafe {
        poll_add_pages(code);
        poll_secondary_data();
        add_report_blob();
    }
    let config = triggers::config();
    let mut sink = CallbackSink;
    match dump::write_dump(config, &mut sink) {
        Ok(bytes) => {
            // SAFETY: bug-check path.
            unsafe { call_legacy_callbacks() };
            println!("CRASHMON DUMP DONE bytes={}", bytes);
        }
        Err(e) => {
            // SAFETY: bug-check path.
            unsafe { call_legacy_callbacks() };
            println!("CRASHMON DUMP FAILED error={}", e);
        }
    }
    crate::driver_summary();
    triggers::after_dump()
}

/// Pages the bug-check path writes after they may have been dumped: `.crashmon_volatile` (the
/// data above, callback records, driver state, the bug-check stack, the dump writer's scratch
/// and the secondary-data arena).
pub fn modified_pages() -> impl Iterator<Item = u64> {
    let (a, b) = boot::volatile_section();
    let (c, d) = boot::volatile_bss();
    (a / PAGE_SIZE..b / PAGE_SIZE).chain(c / PAGE_SIZE..d / PAGE_SIZE)
}

/// Walks the reason callbacks registered for `reason`, without the lock.
///
/// # Safety
/// Bug-check path: the list does not change under us and every record is resident.
unsafe fn for_each_reason(
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
                    (*DATA.get()).current = Some((r.Component, reason));
                    (*record).State = BufferStarted as UCHAR;
                    f(record, routine);
                    (*record).State = BufferFinished as UCHAR;
                    (*DATA.get()).current = None;
                } else if !valid {
                    (*record).State = BufferIncomplete as UCHAR;
                }
            }
            entry = next;
        }
    }
}

/// Step 2: AddPages callbacks.
///
/// # Safety
/// Bug-check path.
unsafe fn poll_add_pages(code: u32) {
    // SAFETY: bug-check path; the callback gets a valid KBUGCHECK_ADD_PAGES.
    unsafe {
        for_each_reason(KbCallbackAddPages, |record, routine| {
            let mut request = KBUGCHECK_ADD_PAGES {
                Context: ptr::null_mut(),
                Flags: 0,
                BugCheckCode: code,
                Address: 0,
                Count: 0,
            };
            for _ in 0..MAX_ADDED {
                request.Flags = 0;
                request.Address = 0;
                request.Count = 0;
                routine(
                    KbCallbackAddPages,
                    record,
                    &mut request as *mut _ as PVOID,
                    size_of::<KBUGCHECK_ADD_PAGES>() as ULONG,
                );
                if request.Count > 0 {
                    let physical = if request.Flags & KB_ADD_PAGES_FLAG_PHYSICAL_ADDRESS != 0 {
                        Some(request.Address as u64)
                    } else {
                        boot::translate(request.Address as u64)
                    };
                    let data = &mut *DATA.get();
                    match physical {
                        Some(pa) if data.added_count < MAX_ADDED => {
                            data.added[data.added_count] = (pa / PAGE_SIZE, request.Count as u64);
                            data.added_count += 1;
                            println!(
                                "CRASHMON ADDPAGES {} pfn={:#x} count={}",
                                component_name((*record).Component),
                                pa / PAGE_SIZE,
                                request.Count
                            );
                        }
                        _ => println!(
                            "CRASHMON ERROR AddPages address {:#x} not mapped or too many ranges",
                            request.Address
                        ),
                    }
                }
                if request.Flags & KB_ADD_PAGES_FLAG_ADDITIONAL_RANGES_EXIST == 0 {
                    break;
                }
            }
        })
    }
}

/// Step 3: SecondaryDumpData callbacks.
///
/// # Safety
/// Bug-check path.
unsafe fn poll_secondary_data() {
    let arena = ARENA.get() as *mut u8;
    let mut used = 0usize;
    // SAFETY: bug-check path; each callback gets a valid request whose InBuffer is a part of the
    // arena nobody else uses.
    unsafe {
        for_each_reason(KbCallbackSecondaryDumpData, |record, routine| {
            let remaining = SECONDARY_BUDGET - used;
            let in_buffer = arena.add(used);
            let mut request = KBUGCHECK_SECONDARY_DUMP_DATA {
                InBuffer: in_buffer as PVOID,
                InBufferLength: remaining.min(PAGE_SIZE as usize) as ULONG,
                MaximumAllowed: remaining as ULONG,
                Guid: GUID::NULL,
                OutBuffer: ptr::null_mut(),
                OutBufferLength: 0,
            };
            let size = size_of::<KBUGCHECK_SECONDARY_DUMP_DATA>() as ULONG;
            // Size query.
            routine(KbCallbackSecondaryDumpData, record, &mut request as *mut _ as PVOID, size);
            let wanted = request.OutBufferLength as usize;
            if wanted == 0 || wanted > remaining {
                return;
            }
            // Data request.
            request.OutBuffer = request.InBuffer;
            request.OutBufferLength = 0;
            routine(KbCallbackSecondaryDumpData, record, &mut request as *mut _ as PVOID, size);
            let len = request.OutBufferLength as usize;
            if len == 0 || len > remaining || request.OutBuffer.is_null() {
                return;
            }
            if request.OutBuffer == request.InBuffer {
                if len > request.InBufferLength as usize {
                    return;
                }
                used += (len + 7) & !7;
            }
            add_blob(Blob {
                guid: request.Guid.to_bytes(),
                data: request.OutBuffer as *const u8,
                len,
            });
        });
        // The guest's own report goes after the callbacks' data, in the rest of the arena.
        (*DATA.get()).report_at = used;
    }
}

fn add_blob(blob: Blob) {
    // SAFETY: bug-check path, single processor.
    let data = unsafe { DATA.as_mut() };
    if data.blob_count < MAX_BLOBS {
        println!(
            "CRASHMON SECONDARY guid={:08x}-... bytes={}",
            u32::from_le_bytes([blob.guid[0], blob.guid[1], blob.guid[2], blob.guid[3]]),
            blob.len
        );
        data.blobs[data.blob_count] = Some(blob);
        data.blob_count += 1;
    }
}

/// A `fmt::Write` into a byte slice.
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

/// The guest's report blob: `crashmon-guest violations=N`, then one line per violation,
/// `<alloc|lock|wait> in <component>/<callback>`.
///
/// # Safety
/// Bug-check path, after the secondary-data poll.
unsafe fn add_report_blob() {
    // SAFETY: bug-check path; the arena past report_at is unused.
    unsafe {
        let at = (*DATA.get()).report_at;
        let buf = core::slice::from_raw_parts_mut(
            (ARENA.get() as *mut u8).add(at),
            SECONDARY_BUDGET - at,
        );
        let data = &*DATA.get();
        let mut w = SliceWriter { buf, len: 0 };
        let _ = writeln!(w, "crashmon-guest violations={}", data.violation_count);
        for v in data.violations.iter().flatten() {
            let _ = writeln!(
                w,
                "{} in {}/{}",
                v.what.name(),
                component_name(v.component),
                reason_name(v.reason)
            );
        }
        let len = w.len;
        add_blob(Blob {
            guid: GUEST_REPORT_GUID.to_bytes(),
            data: (ARENA.get() as *const u8).add(at),
            len,
        });
    }
}

/// Step 4's sink: every piece of the dump to every DumpIo callback.
pub struct CallbackSink;

impl crashmon_dump_writer::DumpSink for CallbackSink {
    fn dump_io(&mut self, offset: u64, buffer: &[u8], kind: crashmon_dump_writer::DumpIoType) {
        let mut io = KBUGCHECK_DUMP_IO {
            Offset: offset,
            Buffer: if buffer.is_empty() { ptr::null_mut() } else { buffer.as_ptr() as PVOID },
            BufferLength: buffer.len() as ULONG,
            Type: kind as i32,
        };
        // SAFETY: bug-check path; the callback gets a valid KBUGCHECK_DUMP_IO whose Buffer holds
        // BufferLength bytes for the call (callbacks only read it: the field is IN).
        unsafe {
            for_each_reason(KbCallbackDumpIo, |record, routine| {
                routine(
                    KbCallbackDumpIo,
                    record,
                    &mut io as *mut _ as PVOID,
                    size_of::<KBUGCHECK_DUMP_IO>() as ULONG,
                )
            })
        }
    }
}

/// Step 5: legacy callbacks.
///
/// # Safety
/// Bug-check path.
unsafe fn call_legacy_callbacks() {
    let head = LEGACY_LIST.get();
    // SAFETY: bug-check path; the list is intact and records resident.
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
                    (*DATA.get()).current = Some((record.Component, -1));
                    record.State = BufferStarted as UCHAR;
                    routine(record.Buffer, record.Length);
                    record.State = BufferFinished as UCHAR;
                    (*DATA.get()).current = None;
                } else {
                    record.State = BufferIncomplete as UCHAR;
                }
            }
            entry = next;
        }
    }
}
