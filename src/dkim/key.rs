//! Signing keys: PKCS#8 PEM in, ring key pairs out; the algorithm follows the key.
//!
//! ring loads RSA private keys of 2048 to 4096 bits only (`RsaKeyPair::from_pkcs8` refuses
//! smaller moduli). A key of 1024 to 2047 bits, which RFC 6376 and RFC 8301 still allow (8301
//! recommends 2048), is loaded with the `rsa` crate instead and signs through it (PKCS#1 v1.5
//! over ring's SHA-256, blinded); it is logged as weak at start. Below 1024 is refused.
//! Ed25519 keys load with `from_pkcs8_maybe_unchecked`, which takes both PKCS#8 v1 (what
//! OpenSSL writes) and v2 (what ring writes, with the public key inside).

use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _, RsaKeyPair};

/// A signing algorithm (the `a=` tag).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    RsaSha256,
    Ed25519Sha256,
}

impl Algorithm {
    pub fn tag(self) -> &'static str {
        match self {
            Algorithm::RsaSha256 => "rsa-sha256",
            Algorithm::Ed25519Sha256 => "ed25519-sha256",
        }
    }

    /// The `k=` value of the DNS key record.
    pub fn key_type(self) -> &'static str {
        match self {
            Algorithm::RsaSha256 => "rsa",
            Algorithm::Ed25519Sha256 => "ed25519",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("not a PKCS#8 private key (want a PEM block `BEGIN PRIVATE KEY`{hint})")]
    NotPkcs8 { hint: &'static str },
    #[error("the PEM block is not valid base64")]
    Base64,
    #[error("neither an RSA nor an Ed25519 key")]
    UnknownAlgorithm,
    #[error("RSA key refused: {0} (RSA keys of 1024 to 4096 bits are signed with)")]
    Rsa(String),
    #[error("Ed25519 key refused: {0}")]
    Ed25519(String),
    #[error("signing failed")]
    Sign,
}

/// DER of the rsaEncryption OID (1.2.840.113549.1.1.1), as in a PKCS#8 AlgorithmIdentifier.
const OID_RSA: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];
/// DER of the Ed25519 OID (1.3.101.112).
const OID_ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
/// The AlgorithmIdentifier sits in the first bytes of a PKCS#8 structure: version, then it.
const ALGORITHM_ID_WITHIN: usize = 32;

/// A loaded private key.
#[derive(Debug)]
pub enum SigningKey {
    Rsa(RsaKeyPair),
    /// 1024 to 2047 bits: weak, allowed by RFC 8301, refused by ring.
    RsaShort(Box<rsa::RsaPrivateKey>),
    Ed25519(Ed25519KeyPair),
}

/// Smallest RSA modulus signed with (RFC 8301 §3.2: signers MUST use at least 1024 bits).
pub const RSA_BITS_MIN: usize = 1024;

/// The DER DigestInfo prefix of a SHA-256 digest (RFC 8017 §9.2 note 1).
const SHA256_DIGEST_INFO: &[u8] = &[
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

/// The DER bytes inside the first `PRIVATE KEY` PEM block of `text`.
pub fn pem_pkcs8(text: &str) -> Result<Vec<u8>, KeyError> {
    const BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
    const END: &str = "-----END PRIVATE KEY-----";
    let Some(start) = text.find(BEGIN) else {
        let hint = if text.contains("BEGIN RSA PRIVATE KEY") {
            "; this is PKCS#1: convert it with `openssl pkcs8 -topk8 -nocrypt`"
        } else if text.contains("BEGIN ENCRYPTED PRIVATE KEY") {
            "; this one is encrypted: Epoxi reads unencrypted keys (mode 0600)"
        } else {
            ""
        };
        return Err(KeyError::NotPkcs8 { hint });
    };
    let rest = &text[start + BEGIN.len()..];
    let end = rest.find(END).ok_or(KeyError::NotPkcs8 { hint: "" })?;
    let b64: String = rest[..end]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| KeyError::Base64)
}

/// PEM text of a PKCS#8 DER key, lines of 64 characters.
pub fn pkcs8_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END PRIVATE KEY-----\n");
    out
}

fn has(der: &[u8], oid: &[u8]) -> bool {
    let head = &der[..der.len().min(ALGORITHM_ID_WITHIN)];
    head.windows(oid.len()).any(|w| w == oid)
}

impl SigningKey {
    /// Loads a PKCS#8 PEM private key.
    pub fn from_pem(text: &str) -> Result<SigningKey, KeyError> {
        SigningKey::from_pkcs8(&pem_pkcs8(text)?)
    }

    /// Loads a PKCS#8 DER private key.
    pub fn from_pkcs8(der: &[u8]) -> Result<SigningKey, KeyError> {
        if has(der, OID_ED25519) {
            return Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
                .map(SigningKey::Ed25519)
                .map_err(|e| KeyError::Ed25519(e.to_string()));
        }
        if has(der, OID_RSA) {
            return match RsaKeyPair::from_pkcs8(der) {
                Ok(k) => Ok(SigningKey::Rsa(k)),
                Err(ring_err) => short_rsa(der).map_err(|why| match why {
                    Some(why) => KeyError::Rsa(why),
                    None => KeyError::Rsa(ring_err.to_string()),
                }),
            };
        }
        Err(KeyError::UnknownAlgorithm)
    }

    pub fn algorithm(&self) -> Algorithm {
        match self {
            SigningKey::Rsa(_) | SigningKey::RsaShort(_) => Algorithm::RsaSha256,
            SigningKey::Ed25519(_) => Algorithm::Ed25519Sha256,
        }
    }

    /// Bits of the RSA modulus; 256 for Ed25519.
    pub fn bits(&self) -> usize {
        match self {
            SigningKey::Rsa(k) => k.public().modulus_len() * 8,
            SigningKey::RsaShort(k) => rsa::traits::PublicKeyParts::size(k.as_ref()) * 8,
            SigningKey::Ed25519(_) => 256,
        }
    }

    /// True when signing is slow enough to stall a shard (an RSA private-key operation takes
    /// about a millisecond at 2048 bits and eight at 4096; Ed25519 takes tens of microseconds).
    pub fn is_slow(&self) -> bool {
        matches!(self, SigningKey::Rsa(_) | SigningKey::RsaShort(_))
    }

    /// Signs the canonicalised header data (RFC 6376 3.7). RSA: PKCS#1 v1.5 over its SHA-256
    /// (ring hashes). Ed25519: PureEdDSA over the SHA-256 of the data (RFC 8463 3).
    ///
    /// CPU-bound: an RSA signature belongs off the shard's executor (see `reception`).
    pub fn sign(&self, data: &[u8]) -> Result<Vec<u8>, KeyError> {
        match self {
            SigningKey::Rsa(k) => {
                let rng = ring::rand::SystemRandom::new();
                let mut sig = vec![0u8; k.public().modulus_len()];
                k.sign(&ring::signature::RSA_PKCS1_SHA256, &rng, data, &mut sig)
                    .map_err(|_| KeyError::Sign)?;
                Ok(sig)
            }
            SigningKey::RsaShort(k) => {
                let digest = ring::digest::digest(&ring::digest::SHA256, data);
                let padding = rsa::Pkcs1v15Sign {
                    hash_len: Some(digest.as_ref().len()),
                    prefix: SHA256_DIGEST_INFO.into(),
                };
                k.sign_with_rng(&mut rsa::rand_core::OsRng, padding, digest.as_ref())
                    .map_err(|_| KeyError::Sign)
            }
            SigningKey::Ed25519(k) => {
                let digest = ring::digest::digest(&ring::digest::SHA256, data);
                Ok(k.sign(digest.as_ref()).as_ref().to_vec())
            }
        }
    }

    /// The public key as the `p=` tag of the DNS record wants it: an RSA key as DER
    /// SubjectPublicKeyInfo (what every verifier reads; RFC 6376 3.6.1), an Ed25519 key as
    /// its 32 raw bytes (RFC 8463 4).
    pub fn public_key_der(&self) -> Vec<u8> {
        match self {
            SigningKey::Rsa(k) => rsa_spki(k.public().as_ref()),
            SigningKey::RsaShort(k) => {
                use rsa::pkcs1::EncodeRsaPublicKey as _;
                k.to_public_key()
                    .to_pkcs1_der()
                    .map(|d| rsa_spki(d.as_bytes()))
                    .unwrap_or_default()
            }
            SigningKey::Ed25519(k) => k.public_key().as_ref().to_vec(),
        }
    }

    /// `p=` in base64.
    pub fn public_key_b64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.public_key_der())
    }
}

/// A key ring refused: one of 1024 to 2047 bits through the `rsa` crate. `Err(None)`: not
/// that either (ring's reason stands); `Err(Some(why))`: a reason of our own.
fn short_rsa(der: &[u8]) -> Result<SigningKey, Option<String>> {
    use rsa::pkcs8::DecodePrivateKey as _;
    use rsa::traits::PublicKeyParts as _;
    let key = rsa::RsaPrivateKey::from_pkcs8_der(der).map_err(|_| None)?;
    let bits = key.size() * 8;
    if bits < RSA_BITS_MIN {
        return Err(Some(format!(
            "{bits} bits is below RFC 8301's minimum of {RSA_BITS_MIN}"
        )));
    }
    if bits >= 2048 {
        // ring refused it for another reason: keep ring's.
        return Err(None);
    }
    key.validate().map_err(|e| Some(e.to_string()))?;
    Ok(SigningKey::RsaShort(Box::new(key)))
}

/// DER length octets.
fn der_len(len: usize, out: &mut Vec<u8>) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

/// Wraps a PKCS#1 RSAPublicKey in a SubjectPublicKeyInfo with the rsaEncryption algorithm.
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    let mut alg = vec![0x30, 0x0d];
    alg.extend_from_slice(OID_RSA);
    alg.extend_from_slice(&[0x05, 0x00]);
    let mut bits = vec![0x03];
    der_len(pkcs1.len() + 1, &mut bits);
    bits.push(0x00);
    bits.extend_from_slice(pkcs1);
    let mut out = vec![0x30];
    der_len(alg.len() + bits.len(), &mut out);
    out.extend_from_slice(&alg);
    out.extend_from_slice(&bits);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_pkcs8() {
        let e =
            SigningKey::from_pem("-----BEGIN RSA PRIVATE KEY-----\nAAAA\n").expect_err("refused");
        assert!(e.to_string().contains("PKCS#1"), "{e}");
        assert_eq!(
            SigningKey::from_pem("hello").expect_err("refused"),
            KeyError::NotPkcs8 { hint: "" }
        );
        let junk = pkcs8_pem(b"\x30\x03\x02\x01\x00");
        assert_eq!(
            SigningKey::from_pem(&junk).expect_err("refused"),
            KeyError::UnknownAlgorithm
        );
    }

    #[test]
    fn ed25519_round_trip() {
        let rng = ring::rand::SystemRandom::new();
        let der = Ed25519KeyPair::generate_pkcs8(&rng).expect("test value");
        let key = SigningKey::from_pem(&pkcs8_pem(der.as_ref())).expect("test value");
        assert_eq!(key.algorithm(), Algorithm::Ed25519Sha256);
        assert_eq!(key.public_key_der().len(), 32);
        let sig = key.sign(b"data").expect("test value");
        let digest = ring::digest::digest(&ring::digest::SHA256, b"data");
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key.public_key_der())
            .verify(digest.as_ref(), &sig)
            .expect("test value");
    }

    #[test]
    fn der_lengths() {
        let mut v = Vec::new();
        der_len(0x7f, &mut v);
        der_len(0x80, &mut v);
        der_len(0x10e, &mut v);
        assert_eq!(v, [0x7f, 0x81, 0x80, 0x82, 0x01, 0x0e]);
    }
}
