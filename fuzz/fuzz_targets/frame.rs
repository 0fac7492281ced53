//! Fuzz target: frames as any stream carries them: length, version and body checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| aqe_quic::testing::fuzz::frame(data));
