//! Access for tests and fuzz targets (feature `testing`; not a stable API): the wire types,
//! a decoder entry point per kind of input a peer can send, and TLS material that endpoints
//! of this process trust, to drive a connection by hand.

use bytes::BytesMut;
use serde::de::DeserializeOwned;

use crate::SecurityConfig;
use aqe_session::{Frame, Hello};

pub use crate::wire::{
    ALPN, Chunk, FrameCodec, FrameReader, LARGE, MAX_DATAGRAM, MAX_FRAME_LEN, Preamble,
    WIRE_VERSION, close, datagram, decode_datagram, frame_transmit, reset,
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

    /// Session frames as any stream carries them (length, version and body checks).
    pub fn frame(data: &[u8]) {
        let _ = frames_of::<Frame>(FrameCodec::new(1024 * 1024), data);
    }
    /// Envelopes (payloads of every message).
    pub fn envelope(data: &[u8]) {
        let _ = aqe_core::decode::<aqe_core::Envelope>(data);
    }
    /// Hellos, before the peer is authenticated.
    pub fn hello(data: &[u8]) {
        let _ = frames_of::<Hello>(FrameCodec::new(16 * 1024), data);
    }
    /// Stream preambles.
    pub fn preamble(data: &[u8]) {
        let _ = frames_of::<Preamble>(FrameCodec::new(256 * 1024), data);
    }
    /// Agent stream chunks.
    pub fn chunk(data: &[u8]) {
        let _ = frames_of::<Chunk>(FrameCodec::new(1024 * 1024), data);
    }
    /// Datagrams (one frame, exactly).
    pub fn datagram(data: &[u8]) {
        let _ = decode_datagram(data);
    }
    /// Certificates (the endpoint key derived from a peer's certificate).
    pub fn certificate(data: &[u8]) {
        let _ = crate::identity::of_certificate(data);
    }
}

/// TLS providers for a hand-driven peer: trusted by this process's endpoints that use the
/// development CA (no certificate configured), with the aqe ALPN; and the key of their
/// certificate.
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

/// Tasks the endpoint runs now (its host's and its wire's).
pub fn task_count(t: &QuicTransport) -> usize {
    t.host().tasks().len()
}

/// The endpoint's id (its certificate's key and its incarnation).
pub fn endpoint_id(t: &QuicTransport) -> aqe_session::EndpointId {
    t.endpoint()
}
