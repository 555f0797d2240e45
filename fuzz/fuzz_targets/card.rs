//! `cargo fuzz run card`: see [`crashmon_fuzz::card`] for what the input means and what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| crashmon_fuzz::card::run(data));
