//! Certificates for a fleet: a CA, and the node certificates it issues, in the form an aqe
//! endpoint needs them.
//!
//! An endpoint needs a certificate that
//! - names the `serverName` its peers dial with (default `localhost`; [`FleetCa::issue`] puts
//!   it first among the subject alternative names, with any IPs and DNS names given);
//! - is valid for both TLS server and client use (an endpoint listens and dials);
//! - has a key of its own (PKCS#8 PEM): the endpoint's id is derived from that key, so two
//!   endpoints sharing a key cannot tell each other apart and refuse to connect;
//! - chains to the CA every endpoint of the fleet trusts (`caPath`).

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use aqe_core::{Error, Result, SecurityFailure};

fn failed(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Security {
        kind: SecurityFailure::CertificateLoad,
        source: Some(format!("{what}: {e}").into()),
    }
}

/// A fleet's certificate authority.
pub struct FleetCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for FleetCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetCa").finish_non_exhaustive()
    }
}

/// A node certificate and its key, and the endpoint id it gives.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NodeCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The endpoint id an endpoint using it has (derived from the key).
    pub endpoint_id: u64,
}

impl FleetCa {
    /// A new CA named `common_name`, with a fresh key.
    ///
    /// # Errors
    /// [`Error::Security`] when the key or certificate cannot be made.
    pub fn generate(common_name: &str) -> Result<Self> {
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| failed("CA", e))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().map_err(|e| failed("CA key", e))?;
        let key_pem = key.serialize_pem();
        let ca = CertifiedIssuer::self_signed(params, key).map_err(|e| failed("CA", e))?;
        let cert_pem = ca.as_ref().pem();
        Self::from_pem(&cert_pem, &key_pem)
    }

    /// A CA from its certificate and key (PEM).
    ///
    /// # Errors
    /// [`Error::Security`] with [`SecurityFailure::CertificateLoad`] when either does not
    /// parse, saying which.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| failed("CA key", e))?;
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| failed("CA certificate", e))?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
        })
    }

    /// The CA certificate (what every endpoint's `caPath` points at).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key (keep it off the nodes).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues a node certificate with a fresh key, for `server_name` and the given IPs and
    /// DNS names, valid for server and client use.
    ///
    /// # Errors
    /// [`Error::Security`] when a name is invalid or the certificate cannot be made.
    pub fn issue(
        &self,
        common_name: &str,
        server_name: &str,
        ips: &[IpAddr],
        dns: &[String],
    ) -> Result<NodeCert> {
        let mut names = vec![server_name.to_owned()];
        names.extend(dns.iter().filter(|d| *d != server_name).cloned());
        let mut params = CertificateParams::new(names).map_err(|e| failed("names", e))?;
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().map_err(|e| failed("node key", e))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| failed("node certificate", e))?;
        Ok(NodeCert {
            endpoint_id: crate::identity::of_certificate(cert.der()).unwrap_or_default(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_issues_distinct_node_certificates_and_survives_a_round_trip_through_pem() {
        let ca = FleetCa::generate("test fleet").expect("ca");
        let again = FleetCa::from_pem(ca.cert_pem(), ca.key_pem()).expect("reload");
        let a = again
            .issue("a", "localhost", &["10.0.0.1".parse().expect("ip")], &[])
            .expect("a");
        let b = again
            .issue("b", "localhost", &[], &["b.fleet".into()])
            .expect("b");
        assert_ne!(a.endpoint_id, b.endpoint_id, "each node its own key and id");
        assert_eq!(crate::identity::of_pem(&a.cert_pem), Some(a.endpoint_id));
        assert!(a.key_pem.contains("BEGIN PRIVATE KEY"), "PKCS#8");
        let err = FleetCa::from_pem("not pem", ca.key_pem()).expect_err("bad");
        assert!(
            err.to_string().contains("certificate")
                || format!("{err:?}").contains("CA certificate")
        );
    }
}
