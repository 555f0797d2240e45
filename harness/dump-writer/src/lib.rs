#![no_std]
//! Placeholder: the dump writer is being written.
