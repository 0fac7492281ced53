//! Fuzz target: agent stream chunks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| aqe_quic::testing::fuzz::chunk(data));
