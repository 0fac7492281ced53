//! A raw QUIC client speaking the aqe protocol by hand, to check what the endpoint does with
//! input no aqe peer would send: it refuses, closes with the right code, and keeps serving.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use s2n_quic::client::Connect;

use crate::{QuicConfig, SecurityConfig};
use aqe_core::plumbing::FrameCodec;

use crate::endpoint::Shared;
use crate::tls::Material;
use crate::wire::{FrameReader, Hello, PROTOCOL_VERSION, close};

const WAIT: Duration = Duration::from_secs(10);

async fn target() -> Arc<Shared> {
    Shared::bind(QuicConfig {
        host: "127.0.0.1".into(),
        ..QuicConfig::default()
    })
    .await
    .expect("bind")
}

/// Connects with the aqe ALPN and sends `hello` on the control stream.
async fn raw_hello(
    to: &Shared,
    hello: &Hello,
) -> (s2n_quic::Client, s2n_quic::Connection, FrameReader) {
    let material = Material::new(&SecurityConfig::default())
        .await
        .expect("certificates");
    let client = s2n_quic::Client::builder()
        .with_tls(material.client().expect("tls"))
        .expect("tls")
        .with_io("0.0.0.0:0")
        .expect("io")
        .start()
        .expect("client");
    let mut connection = client
        .connect(Connect::new(to.listen).with_server_name("localhost"))
        .await
        .expect("handshake");
    let (recv, mut send) = connection
        .open_bidirectional_stream()
        .await
        .expect("control stream")
        .split();
    send.send(
        FrameCodec::default()
            .encode_to_bytes(hello)
            .expect("encode"),
    )
    .await
    .expect("send hello");
    std::mem::forget(send); // keep the control stream open for the test's life
    (
        client,
        connection,
        FrameReader::new(recv, FrameCodec::default()),
    )
}

fn hello(version: u8) -> Hello {
    Hello {
        version,
        endpoint: 42,
        nonce: 7,
        window: 16,
        listen: "127.0.0.1:9".parse().expect("addr"),
        token: None,
    }
}

/// The application code the connection was closed with, once it is.
async fn close_code(connection: &mut s2n_quic::Connection) -> Option<u64> {
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match connection.accept().await {
                Err(s2n_quic::connection::Error::Application { error, .. }) => {
                    return Some(u64::from(error));
                }
                Err(_) => return None,
                Ok(_) => {}
            }
        }
    });
    closed.await.expect("closed in time")
}

#[tokio::test]
async fn another_protocol_version_is_refused_with_its_close_code() {
    let ep = target().await;
    let (_client, mut connection, _reader) = raw_hello(&ep, &hello(PROTOCOL_VERSION + 1)).await;
    assert_eq!(
        close_code(&mut connection).await,
        Some(u64::from(close::VERSION_MISMATCH))
    );
    assert_eq!(ep.connection_count(), 0);
    ep.shutdown().await;
}

#[tokio::test]
async fn garbage_after_the_hello_closes_the_connection_and_the_endpoint_keeps_serving() {
    let ep = target().await;
    let garbage: [Bytes; 3] = [
        // A frame announcing 1 GiB.
        Bytes::from_static(&[0x40, 0, 0, 0, 1]),
        // A frame of another wire version.
        {
            let mut b = BytesMut::new();
            b.put_u32(3);
            b.put_slice(&[9, 0, 0]);
            b.freeze()
        },
        // A well-framed body that is no preamble.
        {
            let mut b = BytesMut::new();
            b.put_u32(4);
            b.put_slice(&[1, 0xff, 0xff, 0xff]);
            b.freeze()
        },
    ];
    for bytes in garbage {
        let (_client, mut connection, mut reader) = raw_hello(&ep, &hello(PROTOCOL_VERSION)).await;
        let answer: Hello = reader
            .next()
            .await
            .expect("hello back")
            .expect("hello back");
        assert_eq!(answer.version, PROTOCOL_VERSION);
        let mut s = connection.open_send_stream().await.expect("stream");
        s.send(bytes).await.expect("send garbage");
        let _ = s.finish();
        assert_eq!(
            close_code(&mut connection).await,
            Some(u64::from(close::PROTOCOL_VIOLATION))
        );
    }
    // Still serving: a well-behaved peer connects afterwards.
    let (_client, _connection, mut reader) = raw_hello(
        &ep,
        &Hello {
            endpoint: 43,
            ..hello(PROTOCOL_VERSION)
        },
    )
    .await;
    let answer: Hello = tokio::time::timeout(WAIT, reader.next())
        .await
        .expect("in time")
        .expect("ok")
        .expect("hello");
    assert_eq!(answer.endpoint, ep.id);
    ep.shutdown().await;
}
