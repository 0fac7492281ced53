//! Fuzz target: control frames: membership, peer exchange, acknowledgements, heartbeats.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| aqe_quic::testing::fuzz::control(data));
