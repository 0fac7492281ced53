//! Helpers shared by the QUIC integration tests: endpoints on loopback, certificates,
//! agents attached with an inbox, and waiting for events.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aqe_core::plumbing::{Inbox, inbox};
use aqe_core::{AgentId, Channel, Event, Inbound, Registration, Token, Transport};
use aqe_quic::QuicTransport;
use aqe_quic::{QuicConfig, SecurityConfig};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

pub const WAIT: Duration = Duration::from_secs(10);

pub fn config() -> QuicConfig {
    QuicConfig {
        host: "127.0.0.1".into(),
        port: 0,
        ..QuicConfig::default()
    }
}

pub async fn endpoint(config: QuicConfig) -> QuicTransport {
    QuicTransport::bind(config).await.expect("bind")
}

pub async fn attach(t: &QuicTransport, id: &str) -> Inbox {
    attach_with(
        t,
        id,
        vec![
            Channel::coordination(),
            Channel::results(),
            Channel::metrics(),
        ],
    )
    .await
}

pub async fn attach_with(t: &QuicTransport, id: &str, channels: Vec<Channel>) -> Inbox {
    let (tx, rx) = inbox(AgentId::from(id), 4096);
    let mut reg = Registration::new(id, "test");
    reg.channels = channels;
    t.attach(reg, tx).await.expect("attach");
    rx
}

/// Waits until `t` lists `id` among its peers.
pub async fn await_peer(t: &QuicTransport, id: &str) {
    let mut events = t.subscribe();
    tokio::time::timeout(WAIT, async {
        while !t.peers().iter().any(|p| p.id.as_str() == id) {
            let _ = events.recv().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{id} not discovered in time"));
}

/// Waits for the first event `pick` accepts.
pub async fn await_event<T>(
    events: &mut tokio::sync::broadcast::Receiver<Event>,
    mut pick: impl FnMut(&Event) -> Option<T>,
) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await {
                Ok(e) => {
                    if let Some(v) = pick(&e) {
                        return v;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("event stream ended: {e}"),
            }
        }
    })
    .await
    .expect("event in time")
}

pub async fn next_message(inbox: &mut Inbox) -> aqe_core::Envelope {
    match tokio::time::timeout(WAIT, inbox.recv())
        .await
        .expect("message in time")
    {
        Some(Inbound::Message { envelope, .. }) => envelope,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// A certificate authority that issues endpoint certificates as PEM files in a directory.
pub struct Pki {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
    name: String,
}

impl Pki {
    pub fn new(dir: &Path, name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        let issuer =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
        std::fs::write(dir.join(format!("{name}-ca.pem")), issuer.as_ref().pem())
            .expect("write CA");
        Self {
            issuer,
            dir: dir.to_path_buf(),
            name: name.to_owned(),
        }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    /// Issues a certificate for `localhost` and returns a security config using it, trusting
    /// `trust` (a CA file).
    pub fn security(&self, holder: &str, trust: &Path, verify_peer: bool) -> SecurityConfig {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .signed_by(&key, &self.issuer)
            .expect("sign");
        let cert_path = self.dir.join(format!("{}-{holder}.pem", self.name));
        let key_path = self.dir.join(format!("{}-{holder}.key", self.name));
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        SecurityConfig {
            cert_path: Some(cert_path),
            key_path: Some(key_path),
            ca_path: Some(trust.to_path_buf()),
            verify_peer,
            ..SecurityConfig::default()
        }
    }
}

pub fn with_token(mut config: QuicConfig, token: Option<&str>) -> QuicConfig {
    config.security.enable_token_auth = token.is_some();
    config.security.token = token.map(Token::new);
    config
}

pub fn arc(t: &QuicTransport) -> Arc<dyn Transport> {
    Arc::new(t.clone())
}
