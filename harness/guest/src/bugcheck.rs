//! # Bugcheck: `KeBugCheckEx`, Windows' side of the bug check
//!
//! `KeBugCheckEx` never returns:
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
//! 6. `CRASHMON DUMP DONE`, the kernel's report hook (the driver's session), then halt forever
//!    (or reset, with `reboot=`).
//!
//! The callbacks come from the registry ([`crate::callbacks`]), walked without its lock. Each
//! call is announced to [`crate::violations`], so a callback that uses the pool, a spin lock or a
//! wait ([`crate::services`] refuses them at HIGH_LEVEL) is named in the violation. The
//! violations go into the dump as a secondary-data blob tagged [`GUEST_REPORT_GUID`], made after
//! the AddPages and SecondaryDumpData callbacks ran, so violations in those callbacks are in the
//! dump; violations in DumpIo or legacy callbacks happen while or after the dump is written and
//! are on serial only.
//!
//! What the bug check needs from the layers above it (the dump options from the command line,
//! whether to reset afterwards, the driver's report) is handed down once at boot ([`init`]);
//! this module calls nothing above it.

use core::arch::{asm, naked_asm};
use core::mem::size_of;
use core::ptr;

use crashmon_dump_writer::{DumpSink, SecondaryBlob};
use crashmon_guest_driver::wdm::*;

use crate::boot::{self, Stack, PAGE_SIZE};
use crate::global::Global;
use crate::services::raise_to_high_level_for_good;
use crate::trap::TrapFrame;
use crate::{callbacks, cpu, dump, println, violations};

pub use crashmon_dump_writer::GUEST_REPORT_GUID;

// ---------------------------------------------------------------------------------------------
// Setup: what the layers above hand down at boot

/// What the bug check needs from the rest of the kernel. Read-only once the bug check starts.
#[derive(Clone, Copy)]
pub struct Setup {
    /// How to write the dump.
    pub dump: dump::Settings,
    /// Reset the machine after the dump (`reboot=` asks for more boots) instead of halting.
    pub reset_after_dump: bool,
    /// Prints what the driver saw, after the dump (before the reset or halt).
    pub report: fn(),
}

impl Setup {
    /// Before [`init`]: a full sequential dump, no report, halt.
    const BOOT: Setup =
        Setup { dump: dump::Settings::DEFAULT, reset_after_dump: false, report: || {} };
}

static SETUP: Global<Setup> = Global::new(Setup::BOOT);

/// Hands the bug check what it needs from the layers above. Boot time, once.
pub fn init(setup: Setup) {
    // SAFETY: boot, single processor; the bug check only reads SETUP.
    unsafe { *SETUP.get() = setup };
}

// ---------------------------------------------------------------------------------------------
// Bug-check state: everything here is written during the bug check, so it lives in
// .crashmon_volatile (pages the harness is told may differ from the dump).

const MAX_ADDED: usize = 64;
const MAX_BLOBS: usize = 16;
/// Budget for all secondary data (Windows caps it too).
pub const SECONDARY_BUDGET: usize = 64 * 1024;
const BUGCHECK_STACK_SIZE: usize = 64 * 1024;

/// A blob a SecondaryDumpData callback supplied (or the guest's report).
#[derive(Clone, Copy)]
struct Blob {
    /// Tag, in memory order.
    guid: [u8; 16],
    /// Where the data is: in the arena or the driver's resident buffer.
    data: *const u8,
    /// Bytes.
    len: usize,
}

/// What one bug check has gathered.
struct BugCheckData {
    /// A bug check is under way.
    active: bool,
    /// `KeBugCheckEx`'s arguments.
    code: u32,
    /// Parameters 1..4.
    parameters: [u64; 4],
    /// Registers of the crashing processor.
    frame: TrapFrame,
    /// Page ranges from AddPages callbacks: (first PFN, count).
    added: [(u64, u64); MAX_ADDED],
    /// Used entries of `added`.
    added_count: usize,
    /// Secondary blobs.
    blobs: [Option<Blob>; MAX_BLOBS],
    /// Used entries of `blobs`.
    blob_count: usize,
    /// Where in the arena the guest's report starts.
    report_at: usize,
}

#[link_section = ".crashmon_volatile"]
static DATA: Global<BugCheckData> = Global::new(BugCheckData {
    active: false,
    code: 0,
    parameters: [0; 4],
    frame: TrapFrame::ZERO,
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

fn enter(code: u32, parameters: [u64; 4], frame: &TrapFrame) -> ! {
    cpu::disable_interrupts();
    // SAFETY: single processor and interrupts off; a nested bug check only reads `active`.
    let data = unsafe { DATA.as_mut() };
    if data.active {
        println!(
            "CRASHMON NESTED BUGCHECK code={:#x} p1={:#x} p2={:#x} p3={:#x} p4={:#x} during code={:#x}",
            code, parameters[0], parameters[1], parameters[2], parameters[3], data.code
        );
        cpu::halt_forever();
    }
    data.active = true;
    raise_to_high_level_for_good();
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
    // SAFETY: written at boot only; a copy.
    let setup = unsafe { *SETUP.get() };
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
    match write_dump(&setup.dump) {
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
    (setup.report)();
    if setup.reset_after_dump {
        println!("CRASHMON REBOOT");
        cpu::reset();
    }
    // The final state: interrupts off, halted, so the harness can take `pmemsave` of RAM and
    // compare it with the dump.
    println!("CRASHMON HALT");
    cpu::halt_forever()
}

/// Step 4: the dump of what the bug check gathered, through every DumpIo callback.
fn write_dump(settings: &dump::Settings) -> Result<u64, crashmon_dump_writer::DumpError> {
    // SAFETY: bug-check path; nothing writes DATA while the dump is written, and each blob
    // points into the arena or a driver's resident buffer, `len` bytes, unchanged until the
    // dump is written.
    let data = unsafe { &*DATA.get() };
    let mut blobs = [SecondaryBlob { guid: [0; 16], data: &[] }; MAX_BLOBS];
    let mut nblobs = 0;
    for b in data.blobs[..data.blob_count].iter().flatten() {
        // SAFETY: as above: `b.data` points to `b.len` resident bytes that stay unchanged until
        // the dump is written.
        let bytes = unsafe { core::slice::from_raw_parts(b.data, b.len) };
        blobs[nblobs] = SecondaryBlob { guid: b.guid, data: bytes };
        nblobs += 1;
    }
    let crash = dump::Crash {
        code: data.code,
        parameters: data.parameters,
        frame: &data.frame,
        added: &data.added[..data.added_count],
        secondary: &blobs[..nblobs],
    };
    dump::write_dump(&crash, settings, boot::info(), &mut CallbackSink)
}

/// Pages the bug-check path writes after they may have been dumped: `.crashmon_volatile` (the
/// data above, callback records, driver state, the bug-check stack, the dump writer's scratch
/// and the secondary-data arena).
pub fn modified_pages() -> impl Iterator<Item = u64> {
    let (a, b) = boot::volatile_section();
    let (c, d) = boot::volatile_bss();
    (a / PAGE_SIZE..b / PAGE_SIZE).chain(c / PAGE_SIZE..d / PAGE_SIZE)
}

/// Calls the reason callbacks registered for `reason`, each announced to [`violations`].
///
/// # Safety
/// Bug-check path: the list does not change under us and every record is resident.
unsafe fn call_reason_callbacks(
    reason: i32,
    mut f: impl FnMut(*mut KBUGCHECK_REASON_CALLBACK_RECORD, KBUGCHECK_REASON_CALLBACK_ROUTINE),
) {
    // SAFETY: the caller's promise.
    unsafe {
        callbacks::for_each_reason(reason, |record, routine| {
            violations::enter_callback((*record).Component, reason);
            f(record, routine);
            violations::leave_callback();
        })
    }
}

/// Step 2: AddPages callbacks.
///
/// # Safety
/// Bug-check path.
unsafe fn poll_add_pages(code: u32) {
    // SAFETY: bug-check path; the callback gets a valid KBUGCHECK_ADD_PAGES.
    unsafe {
        call_reason_callbacks(KbCallbackAddPages, |record, routine| {
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
                                violations::component_name((*record).Component),
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
        call_reason_callbacks(KbCallbackSecondaryDumpData, |record, routine| {
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

/// The guest's report blob ([`violations::write_report`]), in the rest of the arena.
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
        let len = violations::write_report(buf);
        add_blob(Blob { guid: GUEST_REPORT_GUID, data: (ARENA.get() as *const u8).add(at), len });
    }
}

/// Step 4's sink: every piece of the dump to every DumpIo callback.
struct CallbackSink;

impl DumpSink for CallbackSink {
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
            call_reason_callbacks(KbCallbackDumpIo, |record, routine| {
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
    // SAFETY: bug-check path; the list is intact and records resident.
    unsafe {
        callbacks::for_each_legacy(|record, routine| {
            violations::enter_callback(record.Component, violations::LEGACY_CALLBACK);
            routine(record.Buffer, record.Length);
            violations::leave_callback();
        })
    }
}
