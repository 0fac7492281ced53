//! Fuzz target: reliable messages on channel streams.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| aqe_quic::testing::fuzz::sequenced(data));
