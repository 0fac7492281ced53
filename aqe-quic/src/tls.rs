//! TLS 1.3 material: certificates from PEM files, or generated for development.
//!
//! Verification is never off. Dialers always verify the listener's certificate against the
//! trust anchor; with `verifyPeer` listeners verify dialers too (mutual TLS). Without a
//! configured certificate, an endpoint gets one signed by a development CA generated once per
//! process, and trusts that CA: endpoints of one process then verify each other, and an
//! endpoint of another process is rejected as untrusted until real certificates are configured.

use std::path::Path;
use std::sync::OnceLock;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use s2n_quic::provider::tls::default as s2n_tls;

use aqe_core::{BoxError, Error, Result, SecurityConfig, SecurityFailure};

use crate::wire::ALPN;

/// PEM material for one endpoint.
pub(crate) struct Material {
    cert: String,
    key: String,
    trust: String,
    verify_peer: bool,
}

fn load_failure(source: impl Into<BoxError>) -> Error {
    Error::Security {
        kind: SecurityFailure::CertificateLoad,
        source: Some(source.into()),
    }
}

async fn read(path: &Path) -> Result<String> {
    tokio::fs::read_to_string(path)
        .await
        .map_err(|e| load_failure(format!("{}: {e}", path.display())))
}

struct DevCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

fn dev_ca() -> Result<&'static DevCa> {
    static CA: OnceLock<DevCa> = OnceLock::new();
    if let Some(ca) = CA.get() {
        return Ok(ca);
    }
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(load_failure)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "aqe development CA");
    let key = KeyPair::generate().map_err(load_failure)?;
    let issuer = CertifiedIssuer::self_signed(params, key).map_err(load_failure)?;
    Ok(CA.get_or_init(|| DevCa { issuer }))
}

impl Material {
    /// Loads or generates what `security` asks for.
    ///
    /// # Errors
    /// [`Error::Security`] with [`SecurityFailure::CertificateLoad`] when a file cannot be
    /// read or a certificate cannot be generated.
    pub(crate) async fn new(security: &SecurityConfig) -> Result<Self> {
        if let (Some(cert), Some(key)) = (&security.cert_path, &security.key_path) {
            let trust = match &security.ca_path {
                Some(ca) => read(ca).await?,
                None => {
                    return Err(load_failure(
                        "a configured certificate needs caPath to verify peers",
                    ));
                }
            };
            return Ok(Self {
                cert: read(cert).await?,
                key: read(key).await?,
                trust,
                verify_peer: security.verify_peer,
            });
        }
        let ca = dev_ca()?;
        let mut names = vec![security.server_name.clone()];
        for n in ["localhost", "127.0.0.1", "::1"] {
            if !names.iter().any(|m| m == n) {
                names.push(n.to_owned());
            }
        }
        let params = CertificateParams::new(names).map_err(load_failure)?;
        let key = KeyPair::generate().map_err(load_failure)?;
        let cert = params.signed_by(&key, &ca.issuer).map_err(load_failure)?;
        tracing::warn!(
            "no certificate configured: using a generated development certificate; only endpoints of \
             this process trust it (set security.certPath, keyPath and caPath to talk across processes)"
        );
        let trust = match &security.ca_path {
            Some(ca_path) => format!("{}\n{}", read(ca_path).await?, ca.issuer.as_ref().pem()),
            None => ca.issuer.as_ref().pem(),
        };
        Ok(Self {
            cert: cert.pem(),
            key: key.serialize_pem(),
            trust,
            verify_peer: security.verify_peer,
        })
    }

    /// The listener's TLS provider: presents the certificate; with `verifyPeer`, requires and
    /// checks the dialer's.
    pub(crate) fn server(&self) -> Result<s2n_tls::Server> {
        let mut b = s2n_tls::Server::builder()
            .with_application_protocols([ALPN])
            .map_err(load_failure)?
            .with_certificate(self.cert.as_str(), self.key.as_str())
            .map_err(load_failure)?;
        if self.verify_peer {
            b = b
                .with_trusted_certificate(self.trust.as_str())
                .map_err(load_failure)?
                .with_client_authentication()
                .map_err(load_failure)?;
        }
        b.build().map_err(load_failure)
    }

    /// The dialer's TLS provider: verifies the listener; with `verifyPeer`, presents its own
    /// certificate.
    pub(crate) fn client(&self) -> Result<s2n_tls::Client> {
        let mut b = s2n_tls::Client::builder()
            .with_application_protocols([ALPN])
            .map_err(load_failure)?
            .with_certificate(self.trust.as_str())
            .map_err(load_failure)?;
        if self.verify_peer {
            b = b
                .with_client_identity(self.cert.as_str(), self.key.as_str())
                .map_err(load_failure)?;
        }
        b.build().map_err(load_failure)
    }
}

/// The security failure a TLS alert stands for. `from_peer`: the peer sent the alert.
pub(crate) fn alert_failure(alert: u8, from_peer: bool) -> SecurityFailure {
    match alert {
        // bad_certificate, unsupported_certificate, certificate_revoked, certificate_expired,
        // certificate_unknown, unknown_ca, certificate_required
        42..=46 | 48 | 116 => SecurityFailure::UntrustedCertificate,
        // handshake_failure: the generic alert s2n-tls sends whatever went wrong.
        40 if from_peer => SecurityFailure::HandshakeRejected,
        _ => SecurityFailure::Handshake,
    }
}
