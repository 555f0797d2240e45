//! Builds crashmon.sys from source with `windows-driver/build.sh` (once for this test binary)
//! and checks the image. Each check prints what it saw, so `cargo test -- --nocapture` shows
//! the evidence (also: `crashmon-pe-check --list`).

use crashmon_windows_driver_check::checks::{self, Outcome};
use crashmon_windows_driver_check::irql::BUG_CHECK_PATH_IMPORT;
use crashmon_windows_driver_check::package::{self, Driver};
use crashmon_windows_driver_check::reach::reach;
use std::sync::OnceLock;

fn driver() -> &'static Driver {
    static DRIVER: OnceLock<Driver> = OnceLock::new();
    DRIVER.get_or_init(|| {
        let sys = package::build().unwrap_or_else(|e| panic!("building crashmon.sys: {e}"));
        Driver::load(&sys).unwrap_or_else(|e| panic!("loading {}: {e}", sys.display()))
    })
}

fn expect(name: &str, outcome: Outcome) {
    match outcome {
        Ok(seen) => println!("{name}: {seen}"),
        Err(why) => panic!("{name} failed for {}:\n{why}", driver().sys.display()),
    }
}

#[test]
fn sys_is_an_amd64_native_wdm_driver_image() {
    expect("headers", checks::headers(driver()));
}

#[test]
fn entry_point_is_driver_entry_in_discardable_init() {
    expect("entry point", checks::entry_point(driver()));
}

#[test]
fn imports_only_from_ntoskrnl_and_hal_each_classified() {
    expect("imports", checks::imports(driver()));
}

#[test]
fn no_writable_code_and_code_only_in_text_page_init() {
    expect("sections", checks::sections(driver()));
}

#[test]
fn bug_check_callbacks_reach_only_resident_code_and_high_level_safe_imports() {
    expect("bug-check path", checks::bug_check_path(driver()));
    println!("{}", checks::bug_check_listing(driver()).unwrap_or_default());
}

/// The one exception is really taken: the DumpIo callback calls `MmGetPhysicalAddress` (DMA
/// mode), so the bug-check check above does not pass only because the DMA path was optimised
/// away; the other three callbacks call no kernel routine at all.
#[test]
fn only_the_dump_io_callback_reaches_an_import_and_it_is_mm_get_physical_address() {
    let d = driver();
    let roots = checks::callbacks(d).unwrap_or_else(|e| panic!("{e}"));
    for ((role, f), rva) in checks::CALLBACKS.iter().zip(roots) {
        let r = reach(&d.image, &d.map, &[rva]);
        let imports: Vec<&str> = r.imports.keys().map(String::as_str).collect();
        let expected: &[&str] =
            if *role == "BugCheckDumpIoCallback" { &[BUG_CHECK_PATH_IMPORT] } else { &[] };
        assert_eq!(imports, expected, "{role} ({f}) reaches these imports");
        println!("{role}: imports {imports:?}");
    }
}

#[test]
fn the_analysis_sees_forbidden_imports_and_paged_code_on_the_pnp_path() {
    expect("the analysis sees the PnP path", checks::pnp_path_is_seen(driver()));
}

#[test]
fn the_bug_check_rules_refuse_every_import_but_mm_get_physical_address() {
    expect("every other import is refused", checks::other_imports_refused(driver()));
}

#[test]
fn dispatch_level_routines_stay_out_of_paged_code() {
    expect("DISPATCH_LEVEL routines", checks::dispatch_level_routines(driver()));
}

#[test]
fn packaged_inf_matches_the_card() {
    expect("INF", checks::inf(driver()));
}
