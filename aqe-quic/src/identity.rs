//! Endpoint identity from cryptography: an endpoint's id is derived from the public key of its
//! certificate (the first 8 bytes of the SHA-256 of its SubjectPublicKeyInfo), so a peer whose
//! certificate this endpoint verified cannot claim another endpoint's id.
//!
//! The dialer of a connection always verifies the listener's certificate (TLS server
//! authentication), so it knows the listener's id. The listener knows the dialer's id only
//! with mutual TLS; otherwise the id a dialer announces is its own word (documented as
//! self-asserted in PROTOCOL.md).

use sha2::{Digest, Sha256};

/// The id of the endpoint holding the certificate `der` (a DER X.509 certificate).
pub(crate) fn of_certificate(der: &[u8]) -> Option<u64> {
    let spki = subject_public_key_info(der)?;
    let hash = Sha256::digest(spki);
    let mut id = [0u8; 8];
    id.copy_from_slice(&hash[..8]);
    Some(u64::from_be_bytes(id))
}

/// The id of the endpoint holding the first certificate of a PEM text.
pub(crate) fn of_pem(pem_text: &str) -> Option<u64> {
    pem::parse_many(pem_text)
        .ok()?
        .iter()
        .find(|p| p.tag() == "CERTIFICATE")
        .and_then(|p| of_certificate(p.contents()))
}

/// One DER element: its tag, the whole encoding, its content, and what follows it.
type Element<'a> = (u8, &'a [u8], &'a [u8], &'a [u8]);

/// Reads one DER element off the front of `input`.
fn tlv(input: &[u8]) -> Option<Element<'_>> {
    let tag = *input.first()?;
    // Multi-byte tags do not occur in the part of a certificate walked here.
    if tag & 0x1f == 0x1f {
        return None;
    }
    let first = *input.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let bytes = input.get(2..2 + n)?;
        let len = bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    let whole = input.get(..end)?;
    Some((tag, whole, &whole[header..], &input[end..]))
}

/// The SubjectPublicKeyInfo of a DER X.509 certificate, whole (header included):
/// `Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber,
/// signature, issuer, validity, subject, subjectPublicKeyInfo, ... }, ... }`.
fn subject_public_key_info(cert: &[u8]) -> Option<&[u8]> {
    let (0x30, _, certificate, _) = tlv(cert)? else {
        return None;
    };
    let (0x30, _, tbs, _) = tlv(certificate)? else {
        return None;
    };
    let mut rest = tbs;
    if rest.first() == Some(&0xa0) {
        rest = tlv(rest)?.3;
    }
    for _ in 0..5 {
        rest = tlv(rest)?.3;
    }
    match tlv(rest)? {
        (0x30, whole, _, _) => Some(whole),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    #[test]
    fn the_id_is_the_hash_of_the_certificate_key_whatever_the_certificate() {
        let key = KeyPair::generate().expect("key");
        let first = CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let renewed = CertificateParams::new(vec!["other".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        assert_eq!(
            subject_public_key_info(first.der()),
            Some(&rcgen::PublicKeyData::subject_public_key_info(&key)[..])
        );
        let id = of_certificate(first.der()).expect("id");
        assert_eq!(of_certificate(renewed.der()), Some(id), "same key, same id");
        assert_eq!(of_pem(&first.pem()), Some(id));
        let other = KeyPair::generate().expect("key");
        let theirs = CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .self_signed(&other)
            .expect("cert");
        assert_ne!(of_certificate(theirs.der()), Some(id));
    }

    #[test]
    fn garbage_is_no_identity() {
        for bytes in [
            &[][..],
            &[0x30],
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
            &[0x30, 0x02, 0x30, 0x00],
        ] {
            assert_eq!(of_certificate(bytes), None);
        }
        assert_eq!(of_pem("not a certificate"), None);
    }
}
