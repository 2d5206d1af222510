//! New DKIM keys (`epoxi dkim keygen`) and the DNS records that publish keys and policies
//! (`epoxi dns-records`). Text only; the command writes the files.
//!
//! ring generates Ed25519 keys but not RSA ones, so RSA keys come from the RustCrypto `rsa`
//! crate; the key is then loaded back with ring, the signer, so a key this writes is one
//! Epoxi can sign with.

use super::key::{pkcs8_pem, SigningKey};

/// Bits of a new RSA key unless asked otherwise (RFC 8301 recommends at least 2048).
pub const RSA_BITS_DEFAULT: usize = 2048;
/// The RSA sizes signed with: 1024 (RFC 8301's floor; weak, for old DNS setups) to 4096.
pub const RSA_BITS_MIN: usize = super::key::RSA_BITS_MIN;
pub const RSA_BITS_MAX: usize = 4096;
/// Longest character-string in a TXT record (RFC 1035 3.3).
pub const TXT_STRING_LEN_MAX: usize = 255;

#[derive(Debug, thiserror::Error)]
pub enum KeygenError {
    #[error("RSA keys of {0} bits are not supported: Epoxi signs with {RSA_BITS_MIN} to {RSA_BITS_MAX} bits")]
    Bits(usize),
    #[error("key generation failed: {0}")]
    Generate(String),
    #[error(transparent)]
    Key(#[from] super::KeyError),
}

/// Which kind of key to make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Rsa { bits: usize },
    Ed25519,
}

/// A new key: its PKCS#8 PEM text and the key loaded.
pub fn generate(kind: KeyKind) -> Result<(String, SigningKey), KeygenError> {
    let der = match kind {
        KeyKind::Ed25519 => {
            let rng = ring::rand::SystemRandom::new();
            ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|e| KeygenError::Generate(e.to_string()))?
                .as_ref()
                .to_vec()
        }
        KeyKind::Rsa { bits } => {
            if !(RSA_BITS_MIN..=RSA_BITS_MAX).contains(&bits) || bits % 8 != 0 {
                return Err(KeygenError::Bits(bits));
            }
            use rsa::pkcs8::EncodePrivateKey as _;
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits)
                .map_err(|e| KeygenError::Generate(e.to_string()))?;
            key.to_pkcs8_der()
                .map_err(|e| KeygenError::Generate(e.to_string()))?
                .as_bytes()
                .to_vec()
        }
    };
    let key = SigningKey::from_pkcs8(&der)?;
    Ok((pkcs8_pem(&der), key))
}

/// A TXT record line: `name IN TXT "…" "…"`, the text cut into 255-byte strings. `text` is
/// ASCII without quotes or backslashes (record values here are built from tags and base64).
pub fn txt_record(name: &str, text: &str) -> String {
    let strings: Vec<String> = text
        .as_bytes()
        .chunks(TXT_STRING_LEN_MAX)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    format!("{name}. IN TXT {}", strings.join(" "))
}

/// The DKIM key record of `key` at `selector._domainkey.domain` (RFC 6376 3.6.1).
pub fn dkim_record(domain: &str, selector: &str, key: &SigningKey) -> String {
    txt_record(
        &format!("{selector}._domainkey.{domain}"),
        &format!(
            "v=DKIM1; k={}; p={}",
            key.algorithm().key_type(),
            key.public_key_b64()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ed25519_keys_load_back() {
        let (pem, key) = generate(KeyKind::Ed25519).expect("test value");
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let again = SigningKey::from_pem(&pem).expect("test value");
        assert_eq!(again.public_key_der(), key.public_key_der());
        let rec = dkim_record("example.com", "s1", &key);
        assert!(rec.starts_with("s1._domainkey.example.com. IN TXT \"v=DKIM1; k=ed25519; p="));
    }

    #[test]
    fn rsa_2048_signs_and_verifies() {
        let (pem, key) = generate(KeyKind::Rsa { bits: 2048 }).expect("test value");
        let key2 = SigningKey::from_pem(&pem).expect("test value");
        assert_eq!(key2.bits(), 2048);
        let sig = key.sign(b"data").expect("test value");
        // p= is a SubjectPublicKeyInfo; ring verifies with the PKCS#1 key inside it, which
        // is its last bytes after the BIT STRING's leading zero.
        let spki = key.public_key_der();
        let SigningKey::Rsa(pair) = &key else {
            panic!("not RSA")
        };
        let pkcs1 = ring::signature::KeyPair::public_key(pair).as_ref();
        assert!(spki.ends_with(pkcs1));
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            pkcs1,
        )
        .verify(b"data", &sig)
        .expect("test value");
    }

    #[test]
    fn rsa_1024_signs_through_the_rsa_crate_and_verifies() {
        let (pem, _) = generate(KeyKind::Rsa { bits: 1024 }).expect("test value");
        let key = SigningKey::from_pem(&pem).expect("test value");
        assert!(matches!(key, SigningKey::RsaShort(_)));
        assert_eq!(key.bits(), 1024);
        let sig = key.sign(b"data to sign").expect("test value");
        let public = key.public_key_der();
        // ring verifies 1024-bit signatures with the legacy parameters.
        let spki = ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY,
            rsa_public_of_spki(&public),
        );
        spki.verify(b"data to sign", &sig).expect("verifies");
    }

    /// The PKCS#1 RSAPublicKey inside a SubjectPublicKeyInfo (ring verifies with that).
    fn rsa_public_of_spki(spki: &[u8]) -> Vec<u8> {
        use rsa::pkcs1::EncodeRsaPublicKey as _;
        use rsa::pkcs8::DecodePublicKey as _;
        rsa::RsaPublicKey::from_public_key_der(spki)
            .expect("test value")
            .to_pkcs1_der()
            .expect("test value")
            .as_bytes()
            .to_vec()
    }

    #[test]
    fn rsa_sizes_outside_the_range_are_refused() {
        assert!(matches!(
            generate(KeyKind::Rsa { bits: 512 }),
            Err(KeygenError::Bits(512))
        ));
        assert!(matches!(
            generate(KeyKind::Rsa { bits: 8192 }),
            Err(KeygenError::Bits(8192))
        ));
    }

    #[test]
    fn long_txt_is_split_at_255() {
        let text = "x".repeat(600);
        let rec = txt_record("n", &text);
        let parts: Vec<&str> = rec.split('"').filter(|p| p.starts_with('x')).collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [255, 255, 90]
        );
    }
}
