//! Fuzz target: hellos, read before the peer is authenticated.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| aqe_quic::testing::fuzz::hello(data));
