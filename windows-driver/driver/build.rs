//! The driver's link options: a kernel-mode WDM driver image for lld-link (or MSVC's link.exe,
//! which takes the same options), passed for the `crashmon` binary.
fn main() {
    for arg in [
        // A kernel-mode driver: NATIVE subsystem, relocatable, IMAGE_DLLCHARACTERISTICS_WDM_DRIVER
        // (and not "terminal server aware", which lld sets on executables by default).
        "/DRIVER:WDM",
        "/SUBSYSTEM:NATIVE",
        "/ENTRY:DriverEntry",
        "/TSAWARE:NO",
        // No C runtime: every import is named by the `#[link(kind = "raw-dylib")]` blocks.
        "/NODEFAULTLIB",
        // The loader checks a driver's PE checksum: have the linker write it.
        "/RELEASE",
        // crashmon.map beside the image: symbol addresses for the PE test (and for people).
        "/MAP",
        // DriverEntry lives in INIT, which the kernel discards once DriverEntry has returned.
        "/SECTION:INIT,ERD",
        "/OPT:REF",
        "/OPT:ICF",
        // The PE timestamp is a hash of the build (lld derives it, with the PDB's GUID, from the
        // PDB's contents), not the clock.
        "/Brepro",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
