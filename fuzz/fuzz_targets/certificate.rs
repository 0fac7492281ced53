//! Fuzz target: a peer's certificate, from which its endpoint id is derived.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| aqe_quic::testing::fuzz::certificate(data));
