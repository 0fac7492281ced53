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

use crate::SecurityConfig;
use aqe_core::{BoxError, Error, Result, SecurityFailure};

use crate::wire::ALPN;

/// PEM material for one endpoint.
pub(crate) struct Material {
    cert: String,
    key: String,
    trust: String,
    verify_peer: bool,
    /// The endpoint id its certificate's key gives it.
    pub(crate) identity: u64,
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

/// Reads a PEM file that must hold a block whose tag contains `what` (`CERTIFICATE`,
/// `PRIVATE KEY`), naming the file in the error when it does not.
async fn read_pem(path: &Path, what: &str) -> Result<String> {
    let text = read(path).await?;
    let blocks = pem::parse_many(&text)
        .map_err(|e| load_failure(format!("{}: not PEM: {e}", path.display())))?;
    if !blocks.iter().any(|b| b.tag().contains(what)) {
        return Err(load_failure(format!(
            "{}: no {what} in it ({})",
            path.display(),
            if blocks.is_empty() {
                "no PEM block at all".to_owned()
            } else {
                format!(
                    "found {}",
                    blocks
                        .iter()
                        .map(|b| b.tag())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        )));
    }
    Ok(text)
}

/// The endpoint id a certificate gives.
fn identity_of(cert: &str) -> Result<u64> {
    crate::identity::of_pem(cert)
        .ok_or_else(|| load_failure("the certificate's public key cannot be read"))
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
                Some(ca) => read_pem(ca, "CERTIFICATE").await?,
                None => {
                    return Err(load_failure(
                        "a configured certificate needs caPath to verify peers",
                    ));
                }
            };
            let cert = read_pem(cert, "CERTIFICATE").await?;
            return Ok(Self {
                identity: identity_of(&cert)?,
                cert,
                key: read_pem(key, "PRIVATE KEY").await?,
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
            Some(ca_path) => format!(
                "{}\n{}",
                read_pem(ca_path, "CERTIFICATE").await?,
                ca.issuer.as_ref().pem()
            ),
            None => ca.issuer.as_ref().pem(),
        };
        Ok(Self {
            identity: identity_of(&cert.pem())?,
            cert: cert.pem(),
            key: key.serialize_pem(),
            trust,
            verify_peer: security.verify_peer,
        })
    }

    /// The listener's TLS provider: presents the certificate; with `verifyPeer`, requires and
    /// checks the dialer's.
    pub(crate) fn server(&self) -> Result<s2n_tls::Server> {
        // aqe trusts only its own CA: the system's trust store is never loaded.
        let mut b = s2n_tls::Server::builder()
            .with_empty_trust_store()
            .map_err(load_failure)?
            .with_application_protocols([ALPN])
            .map_err(load_failure)?
            .with_certificate(self.cert.as_str(), self.key.as_str())
            .map_err(load_failure)?;
        if self.verify_peer {
            b = b
                .with_trusted_certificate(self.trust.as_str())
                .map_err(load_failure)?
                .with_client_authentication()
                .map_err(load_failure)?
                // A dialer is who its key says (its certificate chains to the CA); the name it
                // dialed with (its SNI, which s2n-tls would check its certificate against)
                // says nothing about it.
                .with_verify_host_name_callback(AnyDialerName)
                .map_err(load_failure)?;
        }
        b.build().map_err(load_failure)
    }

    /// The dialer's TLS provider: verifies the listener; with `verifyPeer`, presents its own
    /// certificate.
    pub(crate) fn client(&self) -> Result<s2n_tls::Client> {
        let mut b = s2n_tls::Client::builder()
            .with_empty_trust_store()
            .map_err(load_failure)?
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

/// Accepts a dialer's certificate whatever name the dialer used (see `Tls::server`).
struct AnyDialerName;

impl s2n_quic::provider::tls::default::callbacks::VerifyHostNameCallback for AnyDialerName {
    fn verify_host_name(&self, _name: &str) -> bool {
        true
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
