//! The checks of a built `crashmon.sys`. Each returns a summary of what it saw, or what failed.

use crate::image::Section;
use crate::irql::{self, BugCheckPath, MaxIrql, BUG_CHECK_PATH_IMPORT};
use crate::package::Driver;
use crate::reach::{reach, Reach};
use object::pe;
use std::collections::BTreeSet;
use std::fmt::Write as _;

/// What a check saw (Ok) or what failed (Err), as text for people.
pub type Outcome = Result<String, String>;

/// The four bug-check callbacks the core registers: (Windows' name for the role, the core's
/// function in `CrashmonDriver`).
pub const CALLBACKS: [(&str, &str); 4] = [
    ("BugCheckAddPagesCallback", "add_pages_routine"),
    ("BugCheckSecondaryDumpDataCallback", "secondary_dump_data_routine"),
    ("BugCheckDumpIoCallback", "dump_io_routine"),
    ("BugCheckCallback", "bugcheck_routine"),
];

/// The DLLs a driver may import from.
pub const ALLOWED_DLLS: [&str; 2] = ["ntoskrnl.exe", "hal.dll"];

/// The callbacks' RVAs, in [`CALLBACKS`] order.
pub fn callbacks(d: &Driver) -> Result<Vec<u32>, String> {
    CALLBACKS.iter().map(|(_, f)| d.function(&["CrashmonDriver", f])).collect()
}

fn section_name(d: &Driver, rva: u32) -> String {
    d.image.section_of(rva).map_or_else(|| "<none>".to_owned(), |s| s.name.clone())
}

fn list<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    items.into_iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

/// Machine, format, subsystem, driver flags, relocations, checksum.
pub fn headers(d: &Driver) -> Outcome {
    let i = &d.image;
    let mut bad = Vec::new();
    if i.machine != pe::IMAGE_FILE_MACHINE_AMD64.0 {
        bad.push(format!("machine {:#06x}, not AMD64 (0x8664)", i.machine));
    }
    if i.magic != pe::IMAGE_NT_OPTIONAL_HDR64_MAGIC {
        bad.push(format!("optional header magic {:#x}, not PE32+", i.magic));
    }
    if i.subsystem != pe::IMAGE_SUBSYSTEM_NATIVE.0 {
        bad.push(format!("subsystem {}, not NATIVE (1)", i.subsystem));
    }
    for (flag, name) in [
        (pe::IMAGE_DLLCHARACTERISTICS_WDM_DRIVER, "WDM_DRIVER"),
        (pe::IMAGE_DLLCHARACTERISTICS_DYNAMIC_BASE, "DYNAMIC_BASE"),
        (pe::IMAGE_DLLCHARACTERISTICS_NX_COMPAT, "NX_COMPAT"),
    ] {
        if i.dll_characteristics & flag.0 == 0 {
            bad.push(format!("DllCharacteristics {:#06x} lacks {name}", i.dll_characteristics));
        }
    }
    if i.file_characteristics & pe::IMAGE_FILE_EXECUTABLE_IMAGE.0 == 0 {
        bad.push("not an executable image".to_owned());
    }
    if i.file_characteristics & pe::IMAGE_FILE_DLL.0 != 0 {
        bad.push(
            "IMAGE_FILE_DLL is set: the driver is linked as an executable, as the WDK does"
                .to_owned(),
        );
    }
    if !i.exports.is_empty() {
        bad.push(format!(
            "exports {}: crashmon.sys is not an export driver",
            list(i.exports.iter().map(|e| &e.0))
        ));
    }
    // The kernel loads drivers at any address: relocation information must not be stripped.
    // Zero fixups is fine when nothing in the image holds an absolute address (all code and data
    // references RIP-relative): a loader then has nothing to patch, as with an empty relocation
    // directory in Windows' and ReactOS's image relocation. The count is reported.
    if i.file_characteristics & pe::IMAGE_FILE_RELOCS_STRIPPED.0 != 0 {
        bad.push("IMAGE_FILE_RELOCS_STRIPPED: the kernel loads drivers at any address".to_owned());
    }
    if i.other_relocations != 0 {
        bad.push(format!("{} base relocations of a type other than DIR64", i.other_relocations));
    }
    if i.checksum == 0 || i.checksum != i.computed_checksum {
        bad.push(format!(
            "CheckSum {:#x}, computed {:#x}: the loader checks drivers' checksums",
            i.checksum, i.computed_checksum
        ));
    }
    if i.tls_size != 0 {
        bad.push("a TLS directory: drivers cannot have thread-local storage".to_owned());
    }
    if i.section_alignment != 0x1000 {
        bad.push(format!("section alignment {:#x}, not the page size", i.section_alignment));
    }
    if !bad.is_empty() {
        return Err(bad.join("\n"));
    }
    Ok(format!(
        "PE32+, AMD64, executable (not a DLL, no exports), subsystem NATIVE, DllCharacteristics {:#06x} \
         (WDM_DRIVER, DYNAMIC_BASE, NX_COMPAT), {} DIR64 relocations, CheckSum {:#x} (matches), {} bytes",
        i.dll_characteristics,
        i.dir64_relocations.len(),
        i.checksum,
        i.bytes.len()
    ))
}

/// The entry point is `DriverEntry`, in the discardable `INIT` section, and it installs the
/// dispatch routines, AddDevice and Unload.
pub fn entry_point(d: &Driver) -> Outcome {
    let entry = d.image.entry_rva;
    let symbol = d.map.exact("DriverEntry").ok_or("no DriverEntry in the map")?.rva;
    if entry != symbol {
        return Err(format!(
            "the entry point is {}, not DriverEntry ({symbol:#x})",
            d.map.describe(entry)
        ));
    }
    let section = d.image.section_of(entry).ok_or("the entry point is in no section")?;
    if !section.is_init() || !section.is_discardable() || !section.is_executable() {
        return Err(format!(
            "DriverEntry is in {} ({:#x}), not a discardable executable INIT section",
            section.name, section.characteristics
        ));
    }
    let r = reach(&d.image, &d.map, &[entry]);
    let mut installed = Vec::new();
    for f in
        ["add_device", "dispatch_pnp", "dispatch_power", "dispatch_pass_through", "driver_unload"]
    {
        let rva = d.function(&["pnp", f])?;
        if !r.address_taken.contains_key(&rva) {
            return Err(format!("DriverEntry does not install pnp::{f} ({rva:#x})"));
        }
        installed.push(format!("{f} ({})", section_name(d, rva)));
    }
    Ok(format!(
        "entry point {entry:#x} = DriverEntry, in {} (discardable); it installs {}",
        section.name,
        list(installed)
    ))
}

/// Imports come only from ntoskrnl.exe and HAL.dll, none delay-loaded, each classified in
/// [`irql::RULES`].
pub fn imports(d: &Driver) -> Outcome {
    let mut bad = Vec::new();
    for import in &d.image.imports {
        if !ALLOWED_DLLS.iter().any(|dll| dll.eq_ignore_ascii_case(&import.dll)) {
            bad.push(format!("{} is imported from {}", import.name, import.dll));
        }
        if irql::rule_for(&import.name).is_none() {
            bad.push(format!("{} has no IRQL classification in pe-check/src/irql.rs", import.name));
        }
    }
    if !d.image.delay_load_dlls.is_empty() {
        bad.push(format!("delay-loaded DLLs: {}", list(&d.image.delay_load_dlls)));
    }
    if d.image.imports.is_empty() {
        bad.push("no imports at all".to_owned());
    }
    if !d.image.imports.iter().any(|i| i.name == "KeRegisterBugCheckReasonCallback") {
        bad.push("KeRegisterBugCheckReasonCallback is not imported".to_owned());
    }
    if !bad.is_empty() {
        return Err(bad.join("\n"));
    }
    let dlls: BTreeSet<&str> = d.image.imports.iter().map(|i| i.dll.as_str()).collect();
    Ok(format!(
        "{} routines from {}: {}",
        d.image.imports.len(),
        list(dlls),
        list(d.image.imports.iter().map(|i| &i.name))
    ))
}

fn describe_section(s: &Section) -> String {
    let mut flags = Vec::new();
    if s.is_executable() {
        flags.push("X");
    }
    if s.is_writable() {
        flags.push("W");
    }
    if s.is_discardable() {
        flags.push("discardable");
    }
    flags.push(if s.is_resident() {
        "resident"
    } else if s.is_pageable() {
        "pageable"
    } else {
        "freed after init"
    });
    format!("{} [{}]", s.name, flags.join(" "))
}

/// No section is both writable and executable (HVCI refuses such drivers); code is in `.text`
/// (resident), `PAGE` (pageable) and `INIT` (discardable) only.
pub fn sections(d: &Driver) -> Outcome {
    let mut bad = Vec::new();
    for s in &d.image.sections {
        if s.is_executable() && s.is_writable() {
            bad.push(format!("{} is writable and executable", s.name));
        }
        if s.is_executable() && !matches!(s.name.as_str(), ".text" | "PAGE" | "INIT") {
            bad.push(format!("unexpected code section {}", s.name));
        }
        if s.is_init() && !s.is_discardable() {
            bad.push(format!("{} is not marked discardable", s.name));
        }
    }
    if !bad.is_empty() {
        return Err(bad.join("\n"));
    }
    Ok(list(d.image.sections.iter().map(describe_section)))
}

/// Why a bug-check callback may not call the import `name`, or `None` for the one it may
/// ([`irql::BUG_CHECK_PATH_IMPORT`], `MmGetPhysicalAddress`).
pub fn refusal(name: &str) -> Option<String> {
    if irql::allowed_on_bug_check_path(name) {
        return None;
    }
    let Some(rule) = irql::rule_for(name) else {
        return Some("unclassified".to_owned());
    };
    Some(if irql::in_forbidden_family(name) {
        format!("{:?}, in a family forbidden on the bug-check path: {}", rule.max_irql, rule.note)
    } else if rule.bug_check_path == BugCheckPath::PanicOnly {
        "callable at HIGH_LEVEL, but only the panic handler calls it: a panic path?".to_owned()
    } else {
        format!("{:?}: {}", rule.max_irql, rule.note)
    })
}

/// Everything about one [`Reach`] that breaks the bug-check rules, if anything.
fn bug_check_violations(d: &Driver, r: &Reach) -> Vec<String> {
    let mut bad = Vec::new();
    bad.extend(r.problems.iter().cloned());
    for (rva, text) in &r.unresolved {
        bad.push(format!("unresolved indirect transfer at {}: {text}", d.map.describe(*rva)));
    }
    let mut seen = BTreeSet::new();
    for &rva in r.instructions.keys() {
        let Some(s) = d.image.section_of(rva) else { continue };
        if !s.is_resident() {
            let f = d.map.symbol_at(rva).map_or(rva, |s| s.rva);
            if seen.insert(f) {
                bad.push(format!(
                    "reaches code in {} section {}: {}",
                    if s.is_pageable() { "pageable" } else { "discardable" },
                    s.name,
                    d.map.describe(rva)
                ));
            }
        }
    }
    for (&target, sites) in &r.data {
        match d.image.section_of(target) {
            Some(s) if s.is_resident() => {}
            Some(s) => bad.push(format!(
                "addresses {} in non-resident section {} (from {})",
                d.map.describe(target),
                s.name,
                d.map.describe(*sites.first().unwrap_or(&0))
            )),
            None => bad.push(format!(
                "addresses {target:#x}, outside the image (from {})",
                d.map.describe(*sites.first().unwrap_or(&0))
            )),
        }
    }
    // The callbacks are panic-free and talk to the card with the HAL register semantics, so they
    // must reach no kernel routine but MmGetPhysicalAddress (documented for any IRQL; DMA mode):
    // even another one documented for any IRQL (KeBugCheckEx, the panic handler's) would mean a
    // panic path crept onto the bug-check path.
    for (name, sites) in &r.imports {
        if let Some(why) = refusal(name) {
            bad.push(format!(
                "calls {name} ({why}) at {}",
                list(sites.iter().map(|s| d.map.describe(*s)))
            ));
        }
    }
    bad
}

/// Whether `violations` (from [`bug_check_violations`]) refuse a call to `name`.
fn refuses_call(violations: &[String], name: &str) -> bool {
    let prefix = format!("calls {name} (");
    violations.iter().any(|v| v.starts_with(&prefix))
}

/// The bug-check callbacks: in a resident section, and everything they can reach (code and
/// statically addressed data) resident too, with no import but `MmGetPhysicalAddress` and no
/// indirect call the analysis cannot follow. `MmGetPhysicalAddress` is reached from the DumpIo
/// callback (DMA mode) and from no other callback: the check fails if it is not, so that it
/// cannot pass because the DMA path was optimised away. The card is written with the HAL
/// register routines' semantics: every `rep movsb` into the data window is followed by a
/// `FastFence`.
pub fn bug_check_path(d: &Driver) -> Outcome {
    let roots = callbacks(d)?;
    let mut out = String::new();
    let mut bad = Vec::new();
    for ((role, f), &rva) in CALLBACKS.iter().zip(&roots) {
        let s = d.image.section_of(rva).ok_or_else(|| format!("{f} is in no section"))?;
        if !s.is_resident() || !s.is_executable() {
            bad.push(format!("{role} ({f}) is in {}", describe_section(s)));
        }
        let r = reach(&d.image, &d.map, &[rva]);
        // DumpIo translates the dump buffer in DMA mode; the other three call no kernel routine.
        let dump_io = *role == "BugCheckDumpIoCallback";
        if dump_io && !r.imports.contains_key(BUG_CHECK_PATH_IMPORT) {
            bad.push(format!(
                "{role} ({f}) does not reach {BUG_CHECK_PATH_IMPORT}: DMA mode is not in the image"
            ));
        }
        if !dump_io && r.imports.contains_key(BUG_CHECK_PATH_IMPORT) {
            bad.push(format!("{role} ({f}) reaches {BUG_CHECK_PATH_IMPORT}: only DumpIo may"));
        }
        let _ = writeln!(
            out,
            "{role}: {f} at {rva:#x} in {}; reaches {} functions, {} instructions, imports {{{}}}",
            s.name,
            r.functions.len(),
            r.instructions.len(),
            list(r.imports.keys())
        );
    }
    let r = reach(&d.image, &d.map, &roots);
    bad.extend(bug_check_violations(d, &r));

    // WRITE_REGISTER_BUFFER_UCHAR: the data window is written by `rep movsb` + FastFence.
    let dump_io = reach(&d.image, &d.map, &[roots[2]]);
    if dump_io.rep_movsb.is_empty() {
        bad.push(
            "the DumpIo callback never reaches a `rep movsb` (WRITE_REGISTER_BUFFER_UCHAR)"
                .to_owned(),
        );
    }
    for &m in &dump_io.rep_movsb {
        let next = m + u32::from(dump_io.instructions[&m]);
        if !dump_io.fast_fences.contains(&next) {
            bad.push(format!(
                "the `rep movsb` at {} is not followed by a FastFence",
                d.map.describe(m)
            ));
        }
    }
    if dump_io.fast_fences.len() < 2 {
        bad.push(
            "the DumpIo callback's register writes have no FastFence (WRITE_REGISTER_ULONG)"
                .to_owned(),
        );
    }
    if !bad.is_empty() {
        return Err(bad.join("\n"));
    }
    let data_sections: BTreeSet<String> = r.data.keys().map(|&t| section_name(d, t)).collect();
    let _ = writeln!(
        out,
        "all four: {} functions, {} instructions, all in {}; data addressed in {}; imports {{{}}} \
         (only {BUG_CHECK_PATH_IMPORT} may be, from DumpIo: documented for any IRQL; the callbacks \
         cannot panic and call no other kernel routine); {} indirect calls unresolved; \
         {} jump-table functions swept whole; {} code addresses taken but never called \
         (e.g. formatting routines referenced by panic messages the panic handler never formats)",
        r.functions.len(),
        r.instructions.len(),
        list(r.sections(&d.image).keys()),
        list(data_sections),
        list(r.imports.keys()),
        r.unresolved.len(),
        r.swept.len(),
        r.address_taken.len(),
    );
    let _ = write!(
        out,
        "DumpIo: {} `rep movsb` each followed by `lock or [rsp], 0`; {} FastFences in all",
        dump_io.rep_movsb.len(),
        dump_io.fast_fences.len()
    );
    Ok(out)
}

/// The analysis is not blind: from the PnP dispatch routine it finds the routines the bug-check
/// path must not call (mapping, waiting, registering) and the pageable code, the bug-check rules
/// refuse every import it reaches but `MmGetPhysicalAddress` (which start's DMA probe calls),
/// and it sees the four callbacks' addresses handed to the registration there.
pub fn pnp_path_is_seen(d: &Driver) -> Outcome {
    let pnp = d.function(&["pnp", "dispatch_pnp"])?;
    let r = reach(&d.image, &d.map, &[pnp]);
    let mut bad = Vec::new();
    for import in [
        "IoForwardIrpSynchronously",
        "MmMapIoSpaceEx",
        "MmUnmapIoSpace",
        "KeRegisterBugCheckReasonCallback",
        "KeRegisterBugCheckCallback",
        "KeDeregisterBugCheckReasonCallback",
        "KeDeregisterBugCheckCallback",
        "IoReleaseRemoveLockAndWaitEx",
        "IoDetachDevice",
        "IoDeleteDevice",
    ] {
        if !r.imports.contains_key(import) {
            bad.push(format!("the analysis does not see dispatch_pnp reach {import}"));
        }
    }
    let violations = bug_check_violations(d, &r);
    if !violations.iter().any(|v| v.contains("pageable")) {
        bad.push("the analysis does not see dispatch_pnp's pageable code".to_owned());
    }
    if !violations.iter().any(|v| v.contains("MmMapIoSpaceEx")) {
        bad.push("the bug-check rules would not refuse dispatch_pnp's MmMapIoSpaceEx".to_owned());
    }
    // Start proves DMA mode with MmGetPhysicalAddress: the one import not refused.
    if !r.imports.contains_key(BUG_CHECK_PATH_IMPORT) {
        bad.push(format!(
            "the analysis does not see start's DMA probe reach {BUG_CHECK_PATH_IMPORT}"
        ));
    }
    for name in r.imports.keys() {
        let refused = refuses_call(&violations, name);
        if name == BUG_CHECK_PATH_IMPORT && refused {
            bad.push(format!("the bug-check rules refuse {name}, which DumpIo may call"));
        } else if name != BUG_CHECK_PATH_IMPORT && !refused {
            bad.push(format!("the bug-check rules would not refuse dispatch_pnp's {name}"));
        }
    }
    let roots = callbacks(d)?;
    for ((_, f), rva) in CALLBACKS.iter().zip(&roots) {
        if !r.address_taken.contains_key(rva) {
            bad.push(format!("{f} ({rva:#x}) is not among the addresses dispatch_pnp hands out"));
        }
    }
    if !bad.is_empty() {
        return Err(bad.join("\n"));
    }
    Ok(format!(
        "dispatch_pnp reaches {} instructions in {} and imports {{{}}}; the bug-check rules would refuse it \
         ({} findings); the four callbacks are among the {} code addresses it takes (registration)",
        r.instructions.len(),
        list(r.sections(&d.image).keys()),
        list(r.imports.keys()),
        violations.len(),
        r.address_taken.len()
    ))
}

/// Names that are not the driver's imports, each refused on the bug-check path for its own
/// reason: the forbidden families (allocation, waits, locks, system services) and one unlisted
/// routine.
const NOT_IMPORTED: [&str; 5] = [
    "ExAllocatePool2",
    "KeWaitForSingleObject",
    "KeAcquireSpinLockRaiseToDpc",
    "ZwWriteFile",
    "MmGetPhysicalAddressEx",
];

/// The exception is exactly one import wide: from all the driver's entry points (DriverEntry,
/// AddDevice, the dispatch routines, Unload and the four callbacks) the analysis reaches every
/// import of the image, and the bug-check rules refuse each one but `MmGetPhysicalAddress`. And
/// any other routine, added to what the callbacks really reach, fails the bug-check check: every
/// classified import, `KeBugCheckEx` included, the forbidden families and an unlisted name.
pub fn other_imports_refused(d: &Driver) -> Outcome {
    let callbacks = callbacks(d)?;
    let mut roots = vec![d.map.exact("DriverEntry").ok_or("no DriverEntry in the map")?.rva];
    for f in
        ["add_device", "dispatch_pnp", "dispatch_power", "dispatch_pass_through", "driver_unload"]
    {
        roots.push(d.function(&["pnp", f])?);
    }
    roots.extend(&callbacks);
    let everything = reach(&d.image, &d.map, &roots);
    let violations = bug_check_violations(d, &everything);
    let mut bad = Vec::new();
    let mut refused = Vec::new();
    for import in &d.image.imports {
        let name = import.name.as_str();
        if !everything.imports.contains_key(name) {
            bad.push(format!("no entry point of the driver reaches the import {name}"));
        } else if name == BUG_CHECK_PATH_IMPORT {
            if refuses_call(&violations, name) {
                bad.push(format!("the bug-check rules refuse {name}"));
            }
        } else if refuses_call(&violations, name) {
            refused.push(name);
        } else {
            bad.push(format!("the bug-check rules would let a callback call {name}"));
        }
    }
    // What the callbacks really reach, plus one more routine: only MmGetPhysicalAddress passes.
    let base = reach(&d.image, &d.map, &callbacks);
    let names: BTreeSet<&str> = irql::RULES
        .iter()
        .map(|r| r.name)
        .chain(d.image.imports.iter().map(|i| i.name.as_str()))
        .chain(NOT_IMPORTED)
        .collect();
    for &name in &names {
        let mut r = base.clone();
        // A call site in the DumpIo callback (CALLBACKS order).
        r.imports.entry(name.to_owned()).or_default().insert(callbacks[2]);
        let refused = refuses_call(&bug_check_violations(d, &r), name);
        if name == BUG_CHECK_PATH_IMPORT && refused {
            bad.push(format!("a callback calling {name} fails the bug-check check"));
        } else if name != BUG_CHECK_PATH_IMPORT && !refused {
            bad.push(format!("a callback calling {name} would pass the bug-check check"));
        }
    }
    if !bad.is_empty() {
        return Err(bad.join("\n"));
    }
    Ok(format!(
        "the {} entry points reach all {} imports; the bug-check rules refuse {} of them ({}), \
         all but {BUG_CHECK_PATH_IMPORT}; added to the callbacks' reach, each of {} routines \
         (the classified ones, KeBugCheckEx among them, the forbidden families, an unlisted one) \
         fails the bug-check check, {BUG_CHECK_PATH_IMPORT} alone passes",
        roots.len(),
        d.image.imports.len(),
        refused.len(),
        list(&refused),
        names.len() - 1
    ))
}

/// Power and pass-through dispatch may run at DISPATCH_LEVEL: they must reach no pageable code
/// and only routines documented for DISPATCH_LEVEL.
pub fn dispatch_level_routines(d: &Driver) -> Outcome {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for f in ["dispatch_power", "dispatch_pass_through"] {
        let rva = d.function(&["pnp", f])?;
        let r = reach(&d.image, &d.map, &[rva]);
        bad.extend(r.problems.iter().cloned());
        bad.extend(r.unresolved.iter().map(|(at, t)| format!("{f}: unresolved {t} at {at:#x}")));
        for &at in r.instructions.keys() {
            if d.image.section_of(at).is_some_and(|s| !s.is_resident()) {
                bad.push(format!("{f} reaches non-resident code at {}", d.map.describe(at)));
                break;
            }
        }
        for name in r.imports.keys() {
            match irql::rule_for(name) {
                Some(rule)
                    if matches!(
                        rule.max_irql,
                        MaxIrql::Dispatch | MaxIrql::Dirql | MaxIrql::Any
                    ) => {}
                _ => bad
                    .push(format!("{f} calls {name}, which is not documented for DISPATCH_LEVEL")),
            }
        }
        out.push(format!("{f} ({}): imports {{{}}}", section_name(d, rva), list(r.imports.keys())));
    }
    if !bad.is_empty() {
        return Err(bad.join("\n"));
    }
    Ok(out.join("; "))
}

/// A listing of the bug-check path for people: every function reached, the imports with their
/// call sites, the data addressed, and the code whose address is taken.
pub fn bug_check_listing(d: &Driver) -> Result<String, String> {
    let roots = callbacks(d)?;
    let r = reach(&d.image, &d.map, &roots);
    let mut out = String::new();
    let _ = writeln!(out, "functions reached from the four bug-check callbacks:");
    for &f in &r.functions {
        let _ = writeln!(out, "  {:<8} {}", section_name(d, f), d.map.describe(f));
    }
    for (name, sites) in &r.imports {
        let _ = writeln!(
            out,
            "import {name}, called at {}",
            list(sites.iter().map(|s| d.map.describe(*s)))
        );
    }
    for (target, sites) in &r.data {
        let _ = writeln!(
            out,
            "data {} ({}), from {} site(s)",
            d.map.describe(*target),
            section_name(d, *target),
            sites.len()
        );
    }
    for (target, sites) in &r.address_taken {
        let _ = writeln!(
            out,
            "address taken, not called: {}, at {}",
            d.map.describe(*target),
            list(sites.iter().map(|s| d.map.describe(*s)))
        );
    }
    for f in &r.swept {
        let _ = writeln!(out, "swept whole (jump table): {}", d.map.describe(*f));
    }
    Ok(out)
}

/// The packaged `crashmon.inf` matches the card (see [`crate::inf::check`]).
pub fn inf(d: &Driver) -> Outcome {
    let path = d.dir.join("crashmon.inf");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    crate::inf::check(&text)
}

/// Every check, in order, with its name.
pub fn all(d: &Driver) -> Vec<(&'static str, Outcome)> {
    vec![
        ("headers", headers(d)),
        ("entry point", entry_point(d)),
        ("imports", imports(d)),
        ("sections", sections(d)),
        ("bug-check path", bug_check_path(d)),
        ("the analysis sees the PnP path", pnp_path_is_seen(d)),
        ("every other import is refused", other_imports_refused(d)),
        ("DISPATCH_LEVEL routines", dispatch_level_routines(d)),
        ("INF", inf(d)),
    ]
}
