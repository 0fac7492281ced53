//! Fuzz target: session frames as any QUIC stream carries them: length, version and body
//! checks, and the session protocol's decoding of every frame (membership, acknowledgements,
//! messages, requests...).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| aqe_quic::testing::fuzz::frame(data));
