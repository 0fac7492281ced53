//! Fuzz target: stream preambles.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| aqe_quic::testing::fuzz::preamble(data));
