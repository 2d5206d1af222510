//! DANE for SMTP (RFC 7672): which TLSA records are usable, whether a certificate matches one,
//! and the rustls verifier that holds a session to them. No I/O.
//!
//! - DANE-EE(3): the server's own certificate (selector 0) or public key (selector 1) must
//!   match. Names and validity dates are not checked (RFC 7672 §3.1.1): the DNSSEC-signed
//!   record is the authority.
//! - DANE-TA(2): a certificate of the presented chain must match; it becomes the only trust
//!   anchor, and the server certificate must chain to it and be valid for the MX host name,
//!   with dates checked (RFC 7672 §3.1.2, §3.2.2). The TA must be in the chain the server
//!   sends, as RFC 7672 §3.1.2 requires for SMTP servers.
//! - PKIX-TA(0) and PKIX-EE(1) are unusable for SMTP (§3.1.3); so are unknown selectors and
//!   matching types, and digests of the wrong length.
//!
//! Matching types 0 (exact), 1 (SHA-256) and 2 (SHA-512).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::verify::{record, Slot, Verdict};
use super::ResultType;
use crate::dns::message::Tlsa;

pub const USAGE_DANE_TA: u8 = 2;
pub const USAGE_DANE_EE: u8 = 3;
const SELECTOR_CERT: u8 = 0;
const SELECTOR_SPKI: u8 = 1;
const MATCH_EXACT: u8 = 0;
const MATCH_SHA256: u8 = 1;
const MATCH_SHA512: u8 = 2;

/// Whether RFC 7672 lets an SMTP client use `r`.
pub fn usable(r: &Tlsa) -> bool {
    let usage = matches!(r.usage, USAGE_DANE_TA | USAGE_DANE_EE);
    let selector = matches!(r.selector, SELECTOR_CERT | SELECTOR_SPKI);
    let data = match r.matching {
        MATCH_EXACT => !r.data.is_empty(),
        MATCH_SHA256 => r.data.len() == 32,
        MATCH_SHA512 => r.data.len() == 64,
        _ => false,
    };
    usage && selector && data
}

/// A record in presentation form, `3 1 1 ab12…`, for logs and reports.
pub fn presentation(r: &Tlsa) -> String {
    let hex: String = r.data.iter().map(|b| format!("{b:02x}")).collect();
    format!("{} {} {} {hex}", r.usage, r.selector, r.matching)
}

/// The DER SubjectPublicKeyInfo of `cert`, or None if it does not parse.
pub fn spki(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    // webpki keeps the SPKI's contents without the outer SEQUENCE header; put it back.
    let anchor = webpki::anchor_from_trusted_cert(cert).ok()?;
    let body: &[u8] = anchor.subject_public_key_info.as_ref();
    let mut der = vec![0x30];
    match body.len() {
        n if n < 0x80 => der.push(n as u8),
        n if n <= 0xff => der.extend_from_slice(&[0x81, n as u8]),
        n if n <= 0xffff => der.extend_from_slice(&[0x82, (n >> 8) as u8, n as u8]),
        _ => return None,
    }
    der.extend_from_slice(body);
    Some(der)
}

/// Whether `cert` matches `r`'s selector, matching type and data.
pub fn matches(r: &Tlsa, cert: &CertificateDer<'_>) -> bool {
    let selected: Vec<u8> = match r.selector {
        SELECTOR_CERT => cert.as_ref().to_vec(),
        SELECTOR_SPKI => match spki(cert) {
            Some(s) => s,
            None => return false,
        },
        _ => return false,
    };
    match r.matching {
        MATCH_EXACT => selected == r.data,
        MATCH_SHA256 => ring::digest::digest(&ring::digest::SHA256, &selected).as_ref() == r.data,
        MATCH_SHA512 => ring::digest::digest(&ring::digest::SHA512, &selected).as_ref() == r.data,
        _ => false,
    }
}

/// Holds a TLS session to an MX host's usable TLSA records.
#[derive(Debug)]
pub struct DaneVerifier {
    records: Vec<Tlsa>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    slot: Slot,
}

impl DaneVerifier {
    /// `records` should be the usable ones; others never match.
    pub fn new(records: Vec<Tlsa>, slot: Slot) -> DaneVerifier {
        DaneVerifier {
            records: records.into_iter().filter(usable).collect(),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            slot,
        }
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<(), (ResultType, String)> {
        let ee = self
            .records
            .iter()
            .filter(|r| r.usage == USAGE_DANE_EE)
            .any(|r| matches(r, end_entity));
        if ee {
            return Ok(());
        }
        let mut last = None;
        for r in self.records.iter().filter(|r| r.usage == USAGE_DANE_TA) {
            for ta in intermediates.iter().filter(|c| matches(r, c)) {
                let Ok(anchor) = webpki::anchor_from_trusted_cert(ta) else {
                    continue;
                };
                let roots = Arc::new(RootCertStore {
                    roots: vec![anchor.to_owned()],
                });
                let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    roots,
                    self.provider.clone(),
                )
                .build()
                .map_err(|e| (ResultType::ValidationFailure, e.to_string()))?;
                match verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
                {
                    Ok(_) => return Ok(()),
                    Err(e) => last = Some((ResultType::of_cert_error(&e), e.to_string())),
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            (
                ResultType::TlsaInvalid,
                "the certificate matches none of the TLSA records".into(),
            )
        }))
    }
}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.check(end_entity, intermediates, server_name, ocsp, now) {
            Ok(()) => {
                record(
                    &self.slot,
                    Verdict {
                        result: ResultType::Success,
                        why: None,
                    },
                );
                Ok(ServerCertVerified::assertion())
            }
            Err((result, why)) => {
                record(
                    &self.slot,
                    Verdict {
                        result,
                        why: Some(why.clone()),
                    },
                );
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::ApplicationVerificationFailure,
                ))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tlspolicy::verify::{new_slot, take};

    fn tlsa(usage: u8, selector: u8, matching: u8, data: Vec<u8>) -> Tlsa {
        Tlsa {
            usage,
            selector,
            matching,
            data,
        }
    }

    fn sha256(b: &[u8]) -> Vec<u8> {
        ring::digest::digest(&ring::digest::SHA256, b)
            .as_ref()
            .to_vec()
    }

    fn sha512(b: &[u8]) -> Vec<u8> {
        ring::digest::digest(&ring::digest::SHA512, b)
            .as_ref()
            .to_vec()
    }

    /// A CA and a leaf it signed for `name`.
    fn chain(name: &str) -> (CertificateDer<'static>, CertificateDer<'static>, Vec<u8>) {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("ca");
        let leaf_key = rcgen::KeyPair::generate().expect("key");
        let leaf = rcgen::CertificateParams::new(vec![name.to_owned()])
            .expect("params")
            .signed_by(&leaf_key, &ca, &ca_key)
            .expect("leaf");
        (
            ca.der().clone(),
            leaf.der().clone(),
            leaf_key.public_key_der(),
        )
    }

    fn verify(
        records: Vec<Tlsa>,
        ee: &CertificateDer<'_>,
        chain: &[CertificateDer<'_>],
        host: &str,
    ) -> Option<Verdict> {
        let slot = new_slot();
        let v = DaneVerifier::new(records, slot.clone());
        let name = ServerName::try_from(host.to_owned()).expect("name");
        let _ = v.verify_server_cert(ee, chain, &name, &[], UnixTime::now());
        take(&slot)
    }

    #[test]
    fn spki_is_the_der_public_key() {
        let (_, leaf, spki_der) = chain("mx.a.test");
        assert_eq!(spki(&leaf), Some(spki_der));
    }

    #[test]
    fn usable_records() {
        assert!(usable(&tlsa(3, 1, 1, vec![0; 32])));
        assert!(usable(&tlsa(2, 0, 2, vec![0; 64])));
        assert!(usable(&tlsa(3, 0, 0, vec![1, 2, 3])));
        assert!(!usable(&tlsa(1, 1, 1, vec![0; 32])), "PKIX-EE");
        assert!(!usable(&tlsa(0, 1, 1, vec![0; 32])), "PKIX-TA");
        assert!(!usable(&tlsa(3, 2, 1, vec![0; 32])), "selector");
        assert!(!usable(&tlsa(3, 1, 3, vec![0; 32])), "matching type");
        assert!(!usable(&tlsa(3, 1, 1, vec![0; 31])), "digest length");
        assert!(!usable(&tlsa(3, 1, 2, vec![0; 32])));
        assert_eq!(presentation(&tlsa(3, 1, 1, vec![0xab, 0x01])), "3 1 1 ab01");
    }

    #[test]
    fn dane_ee_matches_every_selector_and_type_and_ignores_the_name() {
        let (ca, leaf, spki_der) = chain("mx.a.test");
        for r in [
            tlsa(3, 1, 1, sha256(&spki_der)),
            tlsa(3, 1, 2, sha512(&spki_der)),
            tlsa(3, 1, 0, spki_der.clone()),
            tlsa(3, 0, 1, sha256(leaf.as_ref())),
            tlsa(3, 0, 2, sha512(leaf.as_ref())),
            tlsa(3, 0, 0, leaf.as_ref().to_vec()),
        ] {
            assert!(matches(&r, &leaf), "{}", presentation(&r));
            let v = verify(vec![r], &leaf, &[], "other.name.test").expect("verdict");
            assert_eq!(v.result, ResultType::Success);
        }
        let wrong = tlsa(3, 1, 1, sha256(ca.as_ref()));
        assert!(!matches(&wrong, &leaf));
        let v = verify(vec![wrong], &leaf, &[], "mx.a.test").expect("verdict");
        assert_eq!(v.result, ResultType::TlsaInvalid);
        // Unusable records never match, even when the digest is right.
        let pkix = tlsa(1, 1, 1, sha256(&spki_der));
        let v = verify(vec![pkix], &leaf, &[], "mx.a.test").expect("verdict");
        assert_eq!(v.result, ResultType::TlsaInvalid);
    }

    #[test]
    fn dane_ta_needs_the_chain_and_the_name() {
        let (ca, leaf, _) = chain("mx.a.test");
        let ta = tlsa(2, 0, 1, sha256(ca.as_ref()));
        let chain_sent = [ca.clone()];
        let ok = verify(vec![ta.clone()], &leaf, &chain_sent, "mx.a.test").expect("verdict");
        assert_eq!(ok.result, ResultType::Success);
        let wrong_name = verify(vec![ta.clone()], &leaf, &chain_sent, "mx.b.test").expect("v");
        assert_eq!(wrong_name.result, ResultType::CertificateHostMismatch);
        let no_ta_sent = verify(vec![ta], &leaf, &[], "mx.a.test").expect("verdict");
        assert_eq!(no_ta_sent.result, ResultType::TlsaInvalid);
        // A TA record for another CA.
        let (other_ca, _, _) = chain("x.test");
        let other = tlsa(2, 0, 1, sha256(other_ca.as_ref()));
        let v = verify(vec![other], &leaf, &chain_sent, "mx.a.test").expect("verdict");
        assert_eq!(v.result, ResultType::TlsaInvalid);
    }
}
