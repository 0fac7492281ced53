//! TLS 1.3 with mutual authentication, and token authentication, over real QUIC.

mod support;

use aqe_core::{Error, Event, SecurityFailure, Transport};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_certificates_of_the_configured_ca_is_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "fleet");
    let a = endpoint(aqe_quic::QuicConfig {
        security: pki.security("a", &pki.ca_path(), true),
        ..config()
    })
    .await;
    let b = endpoint(aqe_quic::QuicConfig {
        security: pki.security("b", &pki.ca_path(), true),
        ..config()
    })
    .await;
    let _ia = attach(&a, "a").await;
    let mut ib = attach(&b, "b").await;
    a.connect(b.local_addr())
        .await
        .expect("both certificates check out");
    await_peer(&a, "b").await;
    let msg = aqe_core::Envelope::new(
        "a".into(),
        aqe_core::Recipient::Agent("b".into()),
        "coordination".into(),
        aqe_core::MessageKind::Direct,
        bytes::Bytes::from_static(b"over mTLS"),
    );
    a.send(msg).await.expect("send");
    assert_eq!(&next_message(&mut ib).await.payload[..], b"over mTLS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_another_ca_is_rejected_on_both_sides() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = Pki::new(dir.path(), "fleet");
    let rogue = Pki::new(dir.path(), "rogue");
    let server = endpoint(aqe_quic::QuicConfig {
        security: fleet.security("server", &fleet.ca_path(), true),
        ..config()
    })
    .await;
    let mut server_events = server.subscribe();
    // The intruder trusts the fleet's CA (so it accepts the server) but its own certificate
    // comes from another CA.
    let intruder = endpoint(aqe_quic::QuicConfig {
        security: rogue.security("intruder", &fleet.ca_path(), true),
        ..config()
    })
    .await;
    let err = intruder
        .connect(server.local_addr())
        .await
        .expect_err("rejected");
    // The listener verified the certificate and knows why; the TLS alert it sends is generic.
    assert!(
        matches!(
            err,
            Error::Security {
                kind: SecurityFailure::HandshakeRejected,
                ..
            }
        ),
        "dialer: {err:?}"
    );
    let kind = await_event(&mut server_events, |e| match e {
        Event::SecurityRejected { kind, .. } => Some(*kind),
        _ => None,
    })
    .await;
    assert_eq!(kind, SecurityFailure::UntrustedCertificate, "listener side");
    assert_eq!(server.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_an_untrusted_ca_is_rejected_on_both_sides() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = Pki::new(dir.path(), "fleet");
    let other = Pki::new(dir.path(), "other");
    let impostor = endpoint(aqe_quic::QuicConfig {
        security: other.security("impostor", &other.ca_path(), false),
        ..config()
    })
    .await;
    let mut impostor_events = impostor.subscribe();
    let client = endpoint(aqe_quic::QuicConfig {
        security: fleet.security("client", &fleet.ca_path(), false),
        ..config()
    })
    .await;
    let err = client
        .connect(impostor.local_addr())
        .await
        .expect_err("untrusted server");
    assert!(
        matches!(
            err,
            Error::Security {
                kind: SecurityFailure::UntrustedCertificate,
                ..
            }
        ),
        "dialer: {err:?}"
    );
    let kind = await_event(&mut impostor_events, |e| match e {
        Event::SecurityRejected { kind, .. } => Some(*kind),
        _ => None,
    })
    .await;
    assert_eq!(kind, SecurityFailure::HandshakeRejected, "listener side");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_right_token_is_accepted() {
    let a = endpoint(with_token(config(), Some("s3cret"))).await;
    let b = endpoint(with_token(config(), Some("s3cret"))).await;
    let _ib = attach(&b, "b").await;
    a.connect(b.local_addr()).await.expect("token matches");
    await_peer(&a, "b").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_token_closes_the_connection_with_a_typed_error() {
    let guarded = endpoint(with_token(config(), Some("s3cret"))).await;
    let _ig = attach(&guarded, "guarded").await;
    let mut events = guarded.subscribe();
    let wrong = endpoint(with_token(config(), Some("guess"))).await;
    let err = wrong
        .connect(guarded.local_addr())
        .await
        .expect_err("wrong token");
    assert!(
        matches!(
            err,
            Error::Security {
                kind: SecurityFailure::TokenRejected,
                ..
            }
        ),
        "{err:?}"
    );
    let kind = await_event(&mut events, |e| match e {
        Event::SecurityRejected { kind, .. } => Some(*kind),
        _ => None,
    })
    .await;
    assert_eq!(kind, SecurityFailure::TokenRejected);
    let none = endpoint(with_token(config(), None)).await;
    let err = none
        .connect(guarded.local_addr())
        .await
        .expect_err("no token");
    assert!(
        matches!(
            err,
            Error::Security {
                kind: SecurityFailure::TokenMissing,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        wrong.peers().is_empty() && none.peers().is_empty(),
        "nothing was learned without the token"
    );
    assert_eq!(guarded.connections(), 0);
}

/// With `checkAddress`, a dialer accepts only a certificate that names the IP address it
/// dials (`aqe certs issue --ip`): the same CA's certificate without it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_address_wants_the_dialed_ip_in_the_certificate() {
    use aqe_quic::certs::FleetCa;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = FleetCa::generate("fleet").expect("CA");
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.cert_pem()).expect("write CA");
    let loopback: std::net::IpAddr = [127, 0, 0, 1].into();
    let security = |name: &str, ips: &[std::net::IpAddr]| {
        let node = ca.issue(name, "localhost", ips, &[]).expect("issue");
        let (cert, key) = (
            dir.path().join(format!("{name}.pem")),
            dir.path().join(format!("{name}.key")),
        );
        std::fs::write(&cert, &node.cert_pem).expect("write");
        std::fs::write(&key, &node.key_pem).expect("write");
        aqe_quic::SecurityConfig {
            cert_path: Some(cert),
            key_path: Some(key),
            ca_path: Some(ca_path.clone()),
            verify_peer: true,
            check_address: true,
            ..aqe_quic::SecurityConfig::default()
        }
    };
    let named = endpoint(aqe_quic::QuicConfig {
        security: security("named", &[loopback]),
        ..config()
    })
    .await;
    let unnamed = endpoint(aqe_quic::QuicConfig {
        security: security("unnamed", &[]),
        ..config()
    })
    .await;
    // The dialer's own certificate names no address: listeners do not check dialers' names.
    let dialer = endpoint(aqe_quic::QuicConfig {
        security: security("dialer", &[]),
        ..config()
    })
    .await;
    dialer
        .connect(named.local_addr())
        .await
        .expect("the certificate names 127.0.0.1");
    let err = dialer
        .connect(unnamed.local_addr())
        .await
        .expect_err("the certificate names no address");
    assert!(
        matches!(
            err,
            Error::Security {
                kind: SecurityFailure::UntrustedCertificate,
                ..
            }
        ),
        "{err}"
    );
}
