//! Fuzz target: datagrams (exactly one frame).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| aqe_quic::testing::fuzz::datagram(data));
