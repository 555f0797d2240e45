//! # Workload: RAM whose every byte the harness can predict
//!
//! Fills every RAM page above the kernel image so that a dump can be checked word for word
//! without a RAM snapshot: the 8-byte little-endian word at physical address `pa` is
//! [`word`]`(pa, seed)` = `splitmix64(pa ^ seed)`.
//!
//! With `zero=N` on the command line, N percent of the workload's pages are left all zero
//! instead ([`is_zero_page`]: chosen by a hash of the page number and the seed), as Windows keeps
//! free memory zeroed; the device model leaves such pages out of the file as holes.
//!
//! Every fourth page of the workload (`pfn % 4 == 3`) counts as free ([`is_free`]): it is filled
//! like the others, but a bitmap dump leaves it out, as Windows leaves out free pages.
//!
//! One free page is instead the known variable's page: all zero except the 8-byte
//! [`var_value`]`(seed)` at offset [`VAR_OFFSET`], mapped (besides the identity map) at the high
//! virtual address [`VAR_VA`] through a 4 KiB page table entry, so the harness finds it by
//! walking the dump's own page tables from its DirectoryTableBase. Because the page is free, a
//! bitmap dump holds it only because the guest's own AddPages callback (component
//! `crashmon-guest`) adds it: the variable being readable in a bitmap dump shows AddPages was
//! honoured.

use core::ptr;

use crashmon_guest_driver::driver::BugCheckRegistry;
use crashmon_guest_driver::wdm::*;

use crate::boot::{self, BootInfo, PAGE_SIZE};
use crate::callbacks::GuestRegistry;
use crate::global::Global;
use crate::println;

/// Where the known variable's page is mapped (KUSER_SHARED_DATA's address on x64 Windows).
pub const VAR_VA: u64 = 0xFFFF_F780_0000_0000;
/// The variable's offset in its page.
pub const VAR_OFFSET: u64 = 0x100;
/// Default seed.
pub const DEFAULT_SEED: u64 = 0xC4A5_0D01_5EED_0001;

struct Layout {
    first_pfn: u64,
    end_pfn: u64,
    var_pfn: u64,
}

static LAYOUT: Global<Layout> = Global::new(Layout { first_pfn: 0, end_pfn: 0, var_pfn: 0 });

#[link_section = ".crashmon_volatile"]
static ADD_PAGES_RECORD: Global<KBUGCHECK_REASON_CALLBACK_RECORD> =
    Global::new(KBUGCHECK_REASON_CALLBACK_RECORD::new());

/// splitmix64's output function.
pub const fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The word at physical address `pa` (8-aligned) of a workload page.
pub const fn word(pa: u64, seed: u64) -> u64 {
    splitmix64(pa ^ seed)
}

/// The known variable's value.
pub const fn var_value(seed: u64) -> u64 {
    splitmix64(seed ^ u64::from_le_bytes(*b"VARIABLE"))
}

fn layout() -> &'static Layout {
    // SAFETY: written once by `init` at boot, read-only afterwards.
    unsafe { &*LAYOUT.get() }
}

/// Whether `pfn` is a free workload page (left out of bitmap dumps).
pub fn is_free(pfn: u64) -> bool {
    let l = layout();
    pfn >= l.first_pfn && pfn < l.end_pfn && pfn % 4 == 3
}

/// Whether the workload leaves page `pfn` all zero, `zero_percent` percent of pages being so.
pub const fn is_zero_page(pfn: u64, seed: u64, zero_percent: u64) -> bool {
    splitmix64(pfn ^ seed ^ ZERO_SALT) % 100 < zero_percent
}

/// Keeps the choice of zero pages apart from the words' values.
const ZERO_SALT: u64 = 0x7A65_726F_7061_6765; // "zeropage"

/// Fills the workload, places the known variable and registers the AddPages callback for its
/// page. Boot time.
pub fn init(info: &BootInfo, seed: u64, zero_percent: u64) -> Result<(), &'static str> {
    let (_, image_end) = boot::image();
    let first_pfn = image_end.div_ceil(PAGE_SIZE);
    let end_pfn = info.ram_top() / PAGE_SIZE;
    let var_pfn = (first_pfn..end_pfn).find(|p| p % 4 == 3).ok_or("no RAM for the workload")?;
    // SAFETY: boot time, single writer, nobody reads the layout yet.
    unsafe { *LAYOUT.get() = Layout { first_pfn, end_pfn, var_pfn } };

    let mut filled = 0u64;
    let mut zeroed = 0u64;
    for (start, end) in info.ram() {
        let start = start.max(first_pfn * PAGE_SIZE);
        let mut pa = start;
        while pa < end {
            if pa / PAGE_SIZE != var_pfn && is_zero_page(pa / PAGE_SIZE, seed, zero_percent) {
                // SAFETY: as below.
                unsafe { ptr::write_bytes(pa as *mut u8, 0, PAGE_SIZE as usize) };
                zeroed += 1;
            } else if pa / PAGE_SIZE != var_pfn {
                let page = pa as *mut u64;
                for i in 0..(PAGE_SIZE / 8) {
                    // SAFETY: a RAM page above the kernel image, identity mapped, used by
                    // nothing else.
                    unsafe { ptr::write(page.add(i as usize), word(pa + i * 8, seed)) };
                }
                filled += 1;
            }
            pa += PAGE_SIZE;
        }
    }
    let var_pa = var_pfn * PAGE_SIZE;
    // SAFETY: the variable's page is RAM in the workload that the loop above skipped.
    unsafe {
        ptr::write_bytes(var_pa as *mut u8, 0, PAGE_SIZE as usize);
        ptr::write_volatile((var_pa + VAR_OFFSET) as *mut u64, var_value(seed));
    }
    boot::map_4k(VAR_VA, var_pa)?;
    // SAFETY: reads back through the new mapping, which points at the page just written.
    let through_va = unsafe { ptr::read_volatile((VAR_VA + VAR_OFFSET) as *const u64) };
    if through_va != var_value(seed) {
        return Err("the variable's high mapping does not read back");
    }
    // SAFETY: the record is a resident static, registered once; the component is 'static.
    let registered = unsafe {
        GuestRegistry.register_reason_callback(
            ADD_PAGES_RECORD.get(),
            add_var_page,
            KbCallbackAddPages,
            c"crashmon-guest".as_ptr() as PUCHAR,
        )
    };
    if !registered {
        return Err("registering the guest's AddPages callback");
    }
    println!(
        "CRASHMON WORKLOAD start={:#x} end={:#x} seed={:#x} pages={} zero={} zero_pages={} free=pfn%4==3",
        first_pfn * PAGE_SIZE,
        end_pfn * PAGE_SIZE,
        seed,
        filled,
        zero_percent,
        zeroed
    );
    println!(
        "CRASHMON VAR va={:#x} pa={:#x} value={:#x}",
        VAR_VA + VAR_OFFSET,
        var_pa + VAR_OFFSET,
        var_value(seed)
    );
    Ok(())
}

/// The guest's `BugCheckAddPagesCallback`: adds the known variable's page by physical address.
///
/// # Safety
/// Called by the bug check with a valid `KBUGCHECK_ADD_PAGES`.
unsafe extern "system" fn add_var_page(
    reason: KBUGCHECK_CALLBACK_REASON,
    _record: *mut KBUGCHECK_REASON_CALLBACK_RECORD,
    data: PVOID,
    length: ULONG,
) {
    if reason != KbCallbackAddPages
        || data.is_null()
        || (length as usize) < core::mem::size_of::<KBUGCHECK_ADD_PAGES>()
    {
        return;
    }
    // SAFETY: the bug check passes a valid KBUGCHECK_ADD_PAGES, ours to fill.
    let request = unsafe { &mut *(data as *mut KBUGCHECK_ADD_PAGES) };
    request.Address = (layout().var_pfn * PAGE_SIZE) as usize;
    request.Count = 1;
    request.Flags = KB_ADD_PAGES_FLAG_PHYSICAL_ADDRESS;
}
