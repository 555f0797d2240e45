//! `cargo fuzz run recovery`: see [`crashmon_fuzz::recovery`] for what the input means and what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| crashmon_fuzz::recovery::run(data));
