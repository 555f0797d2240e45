//! # Windows types for crashmon.sys
//!
//! The part of the Windows driver that is plain data and plain code over it, in a crate of its
//! own so that both sides can use it without copying or `#[path]`-including each other's source:
//!
//! * [`ntddk`]: the wdm.h types the driver's PnP side touches, with their x64 layouts checked at
//!   compile time (the bug-check types are in `crashmon_guest_driver::wdm`);
//! * [`resources`]: finding the card's BARs in the `CM_RESOURCE_LIST` of `IRP_MN_START_DEVICE`.
//!
//! `crashmon.sys` (`windows-driver/driver`, built for `x86_64-pc-windows-msvc`) uses it, and so
//! do the host-side tests in `windows-driver/pe-check`, which check the layouts and the
//! resource-list walk on the build machine. It uses only `core`.
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod ntddk;
pub mod resources;
