//! Fuzz target: envelopes, the payload of every message.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| aqe_quic::testing::fuzz::envelope(data));
