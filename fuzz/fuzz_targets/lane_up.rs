//! Fuzz target: requests on a lane.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| aqe_quic::testing::fuzz::lane_up(data));
