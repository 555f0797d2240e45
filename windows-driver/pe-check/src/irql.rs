//! What each routine the driver imports may be called at: the Requirements sections of
//! Microsoft's reference pages, plus whether the bug-check path may call it.
//!
//! "Writing a Bug Check Callback Routine": a callback runs at HIGH_LEVEL and cannot allocate
//! memory, access pageable memory, use any synchronization mechanism, or call any routine that
//! must execute at DISPATCH_LEVEL or below. So a routine is allowed on the bug-check path only if
//! it is documented for any IRQL *and* is not known to take a lock. Two of the driver's imports
//! qualify:
//!
//! * `MmGetPhysicalAddress` ("Callers of MmGetPhysicalAddress can be running at any IRQL,
//!   provided that the BaseAddress value is valid"; Requirements, IRQL: "Any level"): the one
//!   routine the callbacks may reach. In DMA mode the DumpIo callback translates the system's
//!   dump buffer (resident by the callback's contract) page by page with it, so that the card
//!   can read the pages itself.
//! * `KeBugCheckEx`: documented for any IRQL, but it is only the panic handler's, and the
//!   callbacks are written not to panic, so reaching it would mean a panic path crept onto the
//!   bug-check path: the checks refuse it there all the same ([`BugCheckPath::PanicOnly`]).
//!
//! `Ke(De)RegisterBugCheck(Reason)Callback` are documented for any IRQL but take the kernel's
//! bug-check callback list lock, so they are refused there as synchronization.
//!
//! Every import of the image must be listed here (the test fails on an unlisted one), so a new
//! import has to be classified before the checks pass, and an unlisted one is refused on the
//! bug-check path.

/// The documented IRQL bound of one routine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaxIrql {
    /// PASSIVE_LEVEL only.
    Passive,
    /// <= APC_LEVEL.
    Apc,
    /// <= DISPATCH_LEVEL.
    Dispatch,
    /// <= DIRQL (device interrupt levels; below HIGH_LEVEL).
    Dirql,
    /// Any IRQL.
    Any,
}

/// Whether the bug-check callbacks may reach a routine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BugCheckPath {
    /// No: it must run at DISPATCH_LEVEL or below, or it locks, waits or allocates.
    Refused,
    /// No, although the bug-check rules would allow it (any IRQL, no lock): it is the panic
    /// handler's, so reaching it from a callback means a panic path crept in.
    PanicOnly,
    /// Yes: documented for any IRQL, with no lock, wait or allocation documented, and the
    /// callbacks need it.
    Allowed,
}

/// One classified import.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    /// The routine.
    pub name: &'static str,
    /// Its documented IRQL bound.
    pub max_irql: MaxIrql,
    /// Whether a bug-check callback may call it.
    pub bug_check_path: BugCheckPath,
    /// Why.
    pub note: &'static str,
}

const fn rule(name: &'static str, max_irql: MaxIrql, note: &'static str) -> Rule {
    Rule { name, max_irql, bug_check_path: BugCheckPath::Refused, note }
}

/// The one import the bug-check callbacks may reach (the DumpIo callback, in DMA mode).
pub const BUG_CHECK_PATH_IMPORT: &str = "MmGetPhysicalAddress";

/// Every routine the driver may import.
pub const RULES: &[Rule] = &[
    rule("IoCreateDevice", MaxIrql::Passive, "allocates the device object"),
    rule("IoDeleteDevice", MaxIrql::Passive, "frees the device object"),
    rule("IoDetachDevice", MaxIrql::Passive, ""),
    rule("IoAttachDeviceToDeviceStack", MaxIrql::Dispatch, "takes the device-stack lock"),
    rule("IoForwardIrpSynchronously", MaxIrql::Apc, "waits for the lower driver"),
    rule("IofCallDriver", MaxIrql::Dispatch, ""),
    rule("IofCompleteRequest", MaxIrql::Dispatch, ""),
    rule("PoCallDriver", MaxIrql::Dispatch, ""),
    rule("IoInitializeRemoveLockEx", MaxIrql::Passive, ""),
    rule("IoAcquireRemoveLockEx", MaxIrql::Dispatch, "a lock"),
    rule("IoReleaseRemoveLockEx", MaxIrql::Dispatch, "a lock"),
    rule("IoReleaseRemoveLockAndWaitEx", MaxIrql::Passive, "waits"),
    rule("MmMapIoSpaceEx", MaxIrql::Dispatch, "allocates system PTEs"),
    rule("MmUnmapIoSpace", MaxIrql::Dispatch, ""),
    Rule {
        name: "MmGetPhysicalAddress",
        max_irql: MaxIrql::Any,
        bug_check_path: BugCheckPath::Allowed,
        note: "any IRQL for a valid address; DMA mode translates the resident dump buffer",
    },
    rule(
        "KeRegisterBugCheckReasonCallback",
        MaxIrql::Any,
        "takes the bug-check callback list lock",
    ),
    rule(
        "KeDeregisterBugCheckReasonCallback",
        MaxIrql::Any,
        "takes the bug-check callback list lock",
    ),
    rule("KeRegisterBugCheckCallback", MaxIrql::Any, "takes the bug-check callback list lock"),
    rule("KeDeregisterBugCheckCallback", MaxIrql::Any, "takes the bug-check callback list lock"),
    rule("DbgPrintEx", MaxIrql::Dirql, "below HIGH_LEVEL"),
    Rule {
        name: "KeBugCheckEx",
        max_irql: MaxIrql::Any,
        bug_check_path: BugCheckPath::PanicOnly,
        note: "the panic handler's; documented for any IRQL, no allocation or lock",
    },
];

/// The rule for `name`, if it is classified.
pub fn rule_for(name: &str) -> Option<&'static Rule> {
    RULES.iter().find(|r| r.name == name)
}

/// Whether `name` may be called from a bug-check callback: classified
/// [`BugCheckPath::Allowed`] *and* documented for any IRQL *and* in none of the
/// [`FORBIDDEN_PREFIXES`] families, so that a slip in the table cannot open the path alone.
/// Unlisted routines may not.
pub fn allowed_on_bug_check_path(name: &str) -> bool {
    rule_for(name)
        .is_some_and(|r| r.bug_check_path == BugCheckPath::Allowed && r.max_irql == MaxIrql::Any)
        && !in_forbidden_family(name)
}

/// Families of routines that must never be reachable from a bug-check callback, whatever the
/// table says: allocation, waits, locks, mapping, paging. A second net under [`RULES`].
pub const FORBIDDEN_PREFIXES: &[&str] = &[
    "ExAllocatePool",
    "ExFreePool",
    "ExAcquire",
    "ExRelease",
    "KeWaitFor",
    "KeAcquire",
    "KeRelease",
    "KeDelayExecution",
    "KeSetEvent",
    "MmMapIoSpace",
    "MmUnmapIoSpace",
    "MmAllocate",
    "MmProbeAndLock",
    "IoAllocate",
    "IoAcquire",
    "IoRelease",
    "IoForwardIrp",
    "IofCallDriver",
    "Zw",
    "Nt",
];

/// Whether `name` is in one of the [`FORBIDDEN_PREFIXES`] families.
pub fn in_forbidden_family(name: &str) -> bool {
    FORBIDDEN_PREFIXES.iter().any(|p| name.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mm_get_physical_address_is_the_one_routine_allowed_on_the_bug_check_path() {
        let allowed: Vec<&str> =
            RULES.iter().map(|r| r.name).filter(|n| allowed_on_bug_check_path(n)).collect();
        assert_eq!(allowed, [BUG_CHECK_PATH_IMPORT]);
        let rule = rule_for(BUG_CHECK_PATH_IMPORT).unwrap();
        assert_eq!((rule.max_irql, rule.bug_check_path), (MaxIrql::Any, BugCheckPath::Allowed));
        // Documented for any IRQL is not enough: the panic handler's routine and the ones that
        // lock the callback lists stay refused.
        for name in ["KeBugCheckEx", "KeRegisterBugCheckReasonCallback", "DbgPrintEx"] {
            assert!(!allowed_on_bug_check_path(name), "{name}");
        }
        assert_eq!(rule_for("KeBugCheckEx").unwrap().bug_check_path, BugCheckPath::PanicOnly);
        // Unlisted routines and the forbidden families are refused.
        for name in
            ["MmGetPhysicalAddressEx", "ExAllocatePool2", "KeWaitForSingleObject", "ZwClose"]
        {
            assert!(!allowed_on_bug_check_path(name), "{name}");
        }
        assert!(!in_forbidden_family(BUG_CHECK_PATH_IMPORT));
    }

    #[test]
    fn each_routine_is_classified_once() {
        for (i, r) in RULES.iter().enumerate() {
            assert!(RULES[..i].iter().all(|o| o.name != r.name), "{} twice", r.name);
            assert!(
                r.bug_check_path == BugCheckPath::Refused || r.max_irql == MaxIrql::Any,
                "{} is not documented for any IRQL",
                r.name
            );
        }
    }
}
