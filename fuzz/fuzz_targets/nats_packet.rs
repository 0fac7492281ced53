//! Fuzz target: NATS packets as an endpoint reads them off its subjects: the version byte,
//! the packet, and the session frames after a `Frames` packet.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = aqe_nats::testing::forge::decode(data);
});
