//! Access for tests and fuzz targets (feature `testing`; not a stable API): the wire types,
//! a decoder entry point per kind of input a peer can send, and TLS material that endpoints
//! of this process trust, to drive a connection by hand.

use bytes::BytesMut;
use serde::de::DeserializeOwned;

use crate::SecurityConfig;
use aqe_core::Envelope;
use aqe_core::plumbing::FrameCodec;

pub use crate::lane::{Down, LANE_MAX_PAYLOAD, Up};
pub use crate::wire::{
    ALPN, Chunk, Control, FrameReader, Hello, PROTOCOL_VERSION, Preamble, Relayed, Sequenced,
    Unprocessed, close, frames, reset,
};

use crate::QuicTransport;

/// Decodes every frame of type `T` in `data` with `codec`, as a receive path does; never
/// panics, whatever the bytes.
fn frames_of<T: DeserializeOwned>(codec: FrameCodec, data: &[u8]) -> usize {
    let mut buf = BytesMut::from(data);
    let mut n = 0;
    while let Ok(Some(_)) = codec.decode::<T>(&mut buf) {
        n += 1;
    }
    n
}

/// Fuzz entry points: one per decoder that reads what a peer sends.
pub mod fuzz {
    use super::*;

    /// Frames as any stream carries them (the length, version and body checks).
    pub fn frame(data: &[u8]) {
        let _ = frames_of::<Envelope>(FrameCodec::new(64 * 1024), data);
    }
    /// Envelopes (payloads of every message).
    pub fn envelope(data: &[u8]) {
        let _ = aqe_core::decode::<Envelope>(data);
    }
    /// Hellos, before the peer is authenticated.
    pub fn hello(data: &[u8]) {
        let _ = frames_of::<Hello>(FrameCodec::new(256 * 1024), data);
    }
    /// Control frames (membership, peer exchange, acknowledgements, heartbeats).
    pub fn control(data: &[u8]) {
        let _ = frames_of::<Control>(FrameCodec::new(256 * 1024), data);
    }
    /// Stream preambles.
    pub fn preamble(data: &[u8]) {
        let _ = frames_of::<Preamble>(FrameCodec::new(256 * 1024), data);
    }
    /// Reliable messages on channel streams.
    pub fn sequenced(data: &[u8]) {
        let _ = frames_of::<Sequenced>(FrameCodec::new(1024 * 1024), data);
    }
    /// Agent stream chunks.
    pub fn chunk(data: &[u8]) {
        let _ = frames_of::<Chunk>(FrameCodec::new(1024 * 1024), data);
    }
    /// Requests on a lane.
    pub fn lane_up(data: &[u8]) {
        let _ = frames_of::<Up>(FrameCodec::new(LANE_MAX_PAYLOAD + 64 * 1024), data);
    }
    /// Answers on a lane.
    pub fn lane_down(data: &[u8]) {
        let _ = frames_of::<Down>(FrameCodec::new(1024 * 1024), data);
    }
    /// Datagrams (one frame, exactly).
    pub fn datagram(data: &[u8]) {
        let _ = FrameCodec::default().decode_exact::<Envelope>(data);
    }
    /// Certificates (the endpoint id derived from a peer's certificate).
    pub fn certificate(data: &[u8]) {
        let _ = crate::identity::of_certificate(data);
    }
}

/// TLS providers for a hand-driven peer: trusted by this process's endpoints that use the
/// development CA (no certificate configured), with the aqe ALPN.
///
/// # Panics
/// If the development certificates cannot be made (a test set-up failure).
#[allow(clippy::expect_used)]
pub async fn dev_tls() -> (
    s2n_quic::provider::tls::default::Server,
    s2n_quic::provider::tls::default::Client,
    u64,
) {
    let material = crate::tls::Material::new(&SecurityConfig::default())
        .await
        .expect("development certificates");
    (
        material.server().expect("server tls"),
        material.client().expect("client tls"),
        material.identity,
    )
}

/// Tasks the endpoint runs now (connections, streams, writers...).
pub fn task_count(t: &QuicTransport) -> usize {
    t.shared().tasks.len()
}

/// The endpoint's id (derived from its certificate).
pub fn endpoint_id(t: &QuicTransport) -> u64 {
    t.shared().id
}
