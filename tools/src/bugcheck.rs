//! Names of the well-known Windows bug-check codes, from Microsoft's "Bug check code reference"
//! (a hand-written selection: the codes an operator meets; others are shown as unknown).

/// `(code, name)`, sorted by code.
const NAMES: &[(u32, &str)] = &[
    (0x0000_0001, "APC_INDEX_MISMATCH"),
    (0x0000_0009, "IRQL_NOT_GREATER_OR_EQUAL"),
    (0x0000_000A, "IRQL_NOT_LESS_OR_EQUAL"),
    (0x0000_0012, "TRAP_CAUSE_UNKNOWN"),
    (0x0000_0019, "BAD_POOL_HEADER"),
    (0x0000_001A, "MEMORY_MANAGEMENT"),
    (0x0000_001E, "KMODE_EXCEPTION_NOT_HANDLED"),
    (0x0000_0020, "KERNEL_APC_PENDING_DURING_EXIT"),
    (0x0000_0022, "FILE_SYSTEM"),
    (0x0000_0024, "NTFS_FILE_SYSTEM"),
    (0x0000_002E, "DATA_BUS_ERROR"),
    (0x0000_0034, "CACHE_MANAGER"),
    (0x0000_0035, "NO_MORE_IRP_STACK_LOCATIONS"),
    (0x0000_003B, "SYSTEM_SERVICE_EXCEPTION"),
    (0x0000_003D, "INTERRUPT_EXCEPTION_NOT_HANDLED"),
    (0x0000_003F, "NO_MORE_SYSTEM_PTES"),
    (0x0000_0044, "MULTIPLE_IRP_COMPLETE_REQUESTS"),
    (0x0000_004A, "IRQL_GT_ZERO_AT_SYSTEM_SERVICE"),
    (0x0000_004E, "PFN_LIST_CORRUPT"),
    (0x0000_0050, "PAGE_FAULT_IN_NONPAGED_AREA"),
    (0x0000_0051, "REGISTRY_ERROR"),
    (0x0000_005C, "HAL_INITIALIZATION_FAILED"),
    (0x0000_0067, "CONFIG_INITIALIZATION_FAILED"),
    (0x0000_0074, "BAD_SYSTEM_CONFIG_INFO"),
    (0x0000_0076, "PROCESS_HAS_LOCKED_PAGES"),
    (0x0000_0077, "KERNEL_STACK_INPAGE_ERROR"),
    (0x0000_007A, "KERNEL_DATA_INPAGE_ERROR"),
    (0x0000_007B, "INACCESSIBLE_BOOT_DEVICE"),
    (0x0000_007C, "BUGCODE_NDIS_DRIVER"),
    (0x0000_007E, "SYSTEM_THREAD_EXCEPTION_NOT_HANDLED"),
    (0x0000_007F, "UNEXPECTED_KERNEL_MODE_TRAP"),
    (0x0000_0080, "NMI_HARDWARE_FAILURE"),
    (0x0000_008E, "KERNEL_MODE_EXCEPTION_NOT_HANDLED"),
    (0x0000_009C, "MACHINE_CHECK_EXCEPTION"),
    (0x0000_009E, "USER_MODE_HEALTH_MONITOR"),
    (0x0000_009F, "DRIVER_POWER_STATE_FAILURE"),
    (0x0000_00A0, "INTERNAL_POWER_ERROR"),
    (0x0000_00A5, "ACPI_BIOS_ERROR"),
    (0x0000_00BE, "ATTEMPTED_WRITE_TO_READONLY_MEMORY"),
    (0x0000_00C1, "SPECIAL_POOL_DETECTED_MEMORY_CORRUPTION"),
    (0x0000_00C2, "BAD_POOL_CALLER"),
    (0x0000_00C4, "DRIVER_VERIFIER_DETECTED_VIOLATION"),
    (0x0000_00C5, "DRIVER_CORRUPTED_EXPOOL"),
    (0x0000_00C7, "TIMER_OR_DPC_INVALID"),
    (0x0000_00CA, "PNP_DETECTED_FATAL_ERROR"),
    (0x0000_00CE, "DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS"),
    (0x0000_00D1, "DRIVER_IRQL_NOT_LESS_OR_EQUAL"),
    (0x0000_00D5, "DRIVER_PAGE_FAULT_IN_FREED_SPECIAL_POOL"),
    (0x0000_00D6, "DRIVER_PAGE_FAULT_BEYOND_END_OF_ALLOCATION"),
    (0x0000_00E2, "MANUALLY_INITIATED_CRASH"),
    (0x0000_00EA, "THREAD_STUCK_IN_DEVICE_DRIVER"),
    (0x0000_00ED, "UNMOUNTABLE_BOOT_VOLUME"),
    (0x0000_00EF, "CRITICAL_PROCESS_DIED"),
    (0x0000_00F4, "CRITICAL_OBJECT_TERMINATION"),
    (0x0000_00F7, "DRIVER_OVERRAN_STACK_BUFFER"),
    (0x0000_00FC, "ATTEMPTED_EXECUTE_OF_NOEXECUTE_MEMORY"),
    (0x0000_00FE, "BUGCODE_USB_DRIVER"),
    (0x0000_0101, "CLOCK_WATCHDOG_TIMEOUT"),
    (0x0000_0109, "CRITICAL_STRUCTURE_CORRUPTION"),
    (0x0000_0116, "VIDEO_TDR_FAILURE"),
    (0x0000_0117, "VIDEO_TDR_TIMEOUT_DETECTED"),
    (0x0000_0119, "VIDEO_SCHEDULER_INTERNAL_ERROR"),
    (0x0000_0124, "WHEA_UNCORRECTABLE_ERROR"),
    (0x0000_0133, "DPC_WATCHDOG_VIOLATION"),
    (0x0000_0139, "KERNEL_SECURITY_CHECK_FAILURE"),
    (0x0000_013A, "KERNEL_MODE_HEAP_CORRUPTION"),
    (0x0000_0144, "BUGCODE_USB3_DRIVER"),
    (0x0000_0154, "UNEXPECTED_STORE_EXCEPTION"),
    (0x0000_01C8, "MANUALLY_INITIATED_POWER_BUTTON_HOLD"),
    (0x1000_007E, "SYSTEM_THREAD_EXCEPTION_NOT_HANDLED_M"),
    (0x1000_008E, "KERNEL_MODE_EXCEPTION_NOT_HANDLED_M"),
    (0x1000_00EA, "THREAD_STUCK_IN_DEVICE_DRIVER_M"),
    (0xC000_021A, "STATUS_SYSTEM_PROCESS_TERMINATED"),
    (0xC000_0221, "STATUS_IMAGE_CHECKSUM_MISMATCH"),
    (0xDEAD_DEAD, "MANUALLY_INITIATED_CRASH1"),
];

/// The well-known name of a bug-check code, if it is in the table.
pub fn name(code: u32) -> Option<&'static str> {
    NAMES.binary_search_by_key(&code, |&(c, _)| c).ok().map(|i| NAMES[i].1)
}

/// The code as WinDbg's bug-check screen shows it: `0x000000D1`.
pub fn code_text(code: u32) -> String {
    format!("0x{code:08X}")
}

/// The code and its name: `0x000000D1 DRIVER_IRQL_NOT_LESS_OR_EQUAL`, or
/// `0xDEAD0001 (unknown bug check)`.
pub fn describe(code: u32) -> String {
    match name(code) {
        Some(n) => format!("{} {n}", code_text(code)),
        None => format!("{} (unknown bug check)", code_text(code)),
    }
}

/// Parses a code as the sidecar writes it (`0x000000d1`) or as a user types it (`D1`, `0xd1`).
pub fn parse_code(text: &str) -> Option<u32> {
    let t = text.trim();
    let hex = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")).unwrap_or(t);
    u32::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_unique() {
        assert!(NAMES.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn well_known_codes() {
        assert_eq!(describe(0xD1), "0x000000D1 DRIVER_IRQL_NOT_LESS_OR_EQUAL");
        assert_eq!(name(0x80), Some("NMI_HARDWARE_FAILURE"));
        assert_eq!(name(0xDEAD_DEAD), Some("MANUALLY_INITIATED_CRASH1"));
        assert_eq!(name(0xE2), Some("MANUALLY_INITIATED_CRASH"));
        assert_eq!(describe(0xDEAD_0001), "0xDEAD0001 (unknown bug check)");
        assert_eq!(parse_code("0x000000d1"), Some(0xD1));
        assert_eq!(parse_code("zz"), None);
    }
}
