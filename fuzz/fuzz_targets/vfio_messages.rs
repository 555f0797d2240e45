//! `cargo fuzz run vfio_messages`: see [`crashmon_fuzz::vfio`] for what the input means and what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| crashmon_fuzz::vfio::run(data));
