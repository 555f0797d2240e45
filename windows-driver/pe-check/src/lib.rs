//! # Checks of crashmon.sys, the Windows driver, as built
//!
//! `windows-driver/build.sh` builds the driver on Linux; this crate reads the image it produced
//! (with the `object` crate) and its linker map, decodes its machine code (with `iced-x86`), and
//! checks what a Windows kernel requires of it and what the bug-check rules require of its
//! callbacks. [`checks`] has the checks, `tests/driver.rs` runs them after building the driver,
//! and `crashmon-pe-check PATH/crashmon.sys` runs them on any build.
//!
//! ## What the checks prove, and what they cannot
//! They prove properties of the bytes: the headers (AMD64, PE32+, NATIVE, WDM driver,
//! relocatable, valid checksum), the entry point (`DriverEntry`, in the discardable `INIT`
//! section), the imports (ntoskrnl.exe and HAL.dll only, each classified by its documented
//! IRQL), and the machine code reachable from the four bug-check callbacks: every instruction
//! and every statically addressed datum is in a resident section (not `PAGE*`, not `INIT`, not
//! discardable), and it can call one import only: `MmGetPhysicalAddress`, which Microsoft
//! documents for any IRQL given a valid address, and which the DumpIo callback calls in DMA mode
//! to translate the dump buffer's pages (it must reach it, so the check cannot pass because the
//! DMA path was optimised away; the other three callbacks reach no import). Nothing else, not
//! even `KeBugCheckEx` (documented for any IRQL, and the panic handler's), because the callbacks
//! are written not to panic. The reachability is conservative (see [`reach`]): jump tables are
//! swept whole, and an indirect call the analysis cannot resolve fails the check rather than
//! being ignored. A control check runs the same analysis from the PnP dispatch routine and must
//! find its pageable code and refuse every import it reaches but `MmGetPhysicalAddress`, so a
//! blind analysis cannot pass; another runs it from every entry point of the driver and must
//! reach every import and refuse all but that one, and adds each other routine (every classified
//! import, the forbidden families, an unlisted name) to what the callbacks reach to see it fail.
//!
//! They cannot prove what is decided at run time: that the pointers the system passes are the
//! resident buffers the contract promises, that memory reached through those pointers or through
//! the driver's own mapped BARs is resident (it is, by the contract and by `MmMapIoSpaceEx`), that
//! the polling loop ends (it gives up after `NO_PROGRESS_TIMEOUT_MS` of the card's host clock with
//! no progress, or `FROZEN_CLOCK_POLLS` reads of a clock that does not move), or that the
//! driver works on a real Windows: loading it, and a crash streamed through the card from a
//! Windows VM, is a manual step (see windows-driver/README.md). Nor that the addresses the
//! DumpIo callback gives `MmGetPhysicalAddress` are valid, as its documentation requires: they
//! are the system's resident dump buffer by the callback's contract. The IRQL table is
//! transcribed from Microsoft's documentation, not derived from ntoskrnl.
#![deny(missing_docs)]

pub mod checks;
pub mod image;
pub mod inf;
pub mod irql;
pub mod map;
pub mod package;
pub mod reach;
