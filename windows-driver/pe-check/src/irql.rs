//! What each routine the driver imports may be called at: the Requirements sections of
//! Microsoft's reference pages, plus whether the bug-check path may call it.
//!
//! "Writing a Bug Check Callback Routine": a callback runs at HIGH_LEVEL and cannot allocate
//! memory, access pageable memory, use any synchronization mechanism, or call any routine that
//! must execute at DISPATCH_LEVEL or below. So a routine is allowed on the bug-check path only if
//! it is documented for any IRQL *and* takes no lock: `KeBugCheckEx` (what the driver's panic
//! handler calls). `Ke(De)RegisterBugCheck(Reason)Callback` are documented for any IRQL but
//! take the kernel's bug-check callback list lock, so they are refused there as synchronization.
//!
//! Every import of the image must be listed here (the test fails on an unlisted one), so a new
//! import has to be classified before the checks pass.

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

/// One classified import.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    /// The routine.
    pub name: &'static str,
    /// Its documented IRQL bound.
    pub max_irql: MaxIrql,
    /// Whether a bug-check callback may call it.
    pub bug_check_path: bool,
    /// Why.
    pub note: &'static str,
}

const fn rule(name: &'static str, max_irql: MaxIrql, note: &'static str) -> Rule {
    Rule { name, max_irql, bug_check_path: false, note }
}

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
        bug_check_path: true,
        note: "the panic handler's; documented for any IRQL, no allocation or lock",
    },
];

/// The rule for `name`, if it is classified.
pub fn rule_for(name: &str) -> Option<&'static Rule> {
    RULES.iter().find(|r| r.name == name)
}

/// Whether `name` may be called from a bug-check callback (unlisted routines may not).
pub fn allowed_on_bug_check_path(name: &str) -> bool {
    rule_for(name).is_some_and(|r| r.bug_check_path)
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
