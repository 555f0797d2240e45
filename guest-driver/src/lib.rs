//! # crashmon guest driver: the no_std core
//!
//! The part of the crashmon driver that talks to the crash-monitor card, shared by the Windows
//! build and the test guest. It is written for the bug-check path, whose rules (Microsoft's
//! "Writing a Bug Check Callback Routine") shape every line:
//!
//! * no allocation: the crate has no allocator and every buffer is the caller's;
//! * no pageable memory: nothing here is pageable; the Windows build places it in a non-paged
//!   section;
//! * no synchronization: callbacks run at HIGH_LEVEL on one processor with interrupts off, so
//!   the card is driven with `&mut` access and no lock;
//! * only register access, with `READ_REGISTER_ULONG` / `WRITE_REGISTER_ULONG` semantics, through
//!   [`CardIo`]. The only waiting is a bounded poll of the card's `COMPLETED` register, which is
//!   how a driver talks to its own hardware at HIGH_LEVEL; it never blocks on the OS.
//!
//! Modules: [`card`] drives the card; [`wdm`] has Windows' bug-check callback types with their
//! exact layouts; [`driver`] is the driver itself, its four callbacks written against those
//! types and registered through a [`BugCheckRegistry`] the platform provides.
#![no_std]
#![deny(missing_docs)]

pub mod card;
pub mod driver;
pub mod wdm;

pub use card::{Card, CardError, CardIo};
pub use crashmon_card_abi as abi;
pub use driver::{BugCheckRegistry, CrashmonDriver};
