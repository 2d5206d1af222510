//! Tests of the message signer as a whole, and the RFC 8463 appendix A example.

use base64::Engine as _;

use super::*;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// RFC 8463 A.2: the Ed25519 private key (the RFC 8032 test 1 seed) and its public key.
const RFC8463_SEED: &str = "nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=";
const RFC8463_PUBLIC: &str = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";

/// RFC 8463 A.3: the signed message (its Ed25519 signature; the RSA one is left out).
const RFC8463_SIG: &str = "DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n \
d=football.example.com; i=@football.example.com;\r\n \
q=dns/txt; s=brisbane; t=1528637909; h=from : to :\r\n \
subject : date : message-id : from : subject : date;\r\n \
bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n \
b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus\r\n \
Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==\r\n";
const RFC8463_MESSAGE: &str = "From: Joe SixPack <joe@football.example.com>\r\n\
To: Suzie Q <suzie@shopping.example.net>\r\n\
Subject: Is dinner ready?\r\n\
Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n\
Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n\
\r\n\
Hi.\r\n\
\r\n\
We lost the game.  Are you hungry yet?\r\n\
\r\n\
Joe.\r\n";

/// A PKCS#8 v1 Ed25519 key around a raw seed (RFC 8410 7).
fn ed25519_pkcs8(seed: &[u8]) -> Vec<u8> {
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(seed);
    der
}

fn rfc8463_key() -> SigningKey {
    let seed = B64.decode(RFC8463_SEED).expect("test value");
    SigningKey::from_pkcs8(&ed25519_pkcs8(&seed)).expect("test value")
}

#[test]
fn rfc8463_public_key() {
    let key = rfc8463_key();
    assert_eq!(key.algorithm(), Algorithm::Ed25519Sha256);
    assert_eq!(key.public_key_b64(), RFC8463_PUBLIC);
}

#[test]
fn rfc8463_body_hash_streams() {
    let body_at = RFC8463_MESSAGE.find("\r\n\r\n").expect("test value") + 4;
    let body = &RFC8463_MESSAGE.as_bytes()[body_at..];
    for chunk in [1, 3, 7, body.len()] {
        let mut c = canon::BodyCanon::new(Canon::Relaxed);
        let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
        for piece in body.chunks(chunk) {
            c.feed(piece, &mut |s| sha.update(s));
        }
        c.finish(&mut |s| sha.update(s));
        assert_eq!(
            B64.encode(sha.finish()),
            "2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=",
            "chunks of {chunk}"
        );
    }
}

/// The RFC's signature header with its own h= list, signed again with the RFC's key: Ed25519
/// is deterministic, so the signature must be the published one, byte for byte.
#[test]
fn rfc8463_signature_byte_for_byte() {
    let key = rfc8463_key();
    let h: Vec<String> = "from:to:subject:date:message-id:from:subject:date"
        .split(':')
        .map(str::to_owned)
        .collect();
    let fields = canon::fields(RFC8463_MESSAGE.as_bytes());
    let b_at = RFC8463_SIG.find(" b=").expect("test value") + 3;
    let unsigned = &RFC8463_SIG[..b_at];
    let data = sign::header_data(Canon::Relaxed, &h, &fields, unsigned);
    let sig = key.sign(&data).expect("test value");
    let published: String = RFC8463_SIG[b_at..]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    assert_eq!(B64.encode(&sig), published);
    let public = B64.decode(RFC8463_PUBLIC).expect("test value");
    let digest = ring::digest::digest(&ring::digest::SHA256, &data);
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public)
        .verify(digest.as_ref(), &sig)
        .expect("test value");
}

fn signer(domain: &str, canon: &str) -> Signer {
    Signer {
        domain: domain.into(),
        selector: "brisbane".into(),
        key: Arc::new(rfc8463_key()),
        headers: sign::HEADERS_DEFAULT
            .iter()
            .map(|s| s.to_string())
            .collect(),
        canonicalization: Canonicalization::parse(canon).expect("test value"),
        tenant: None,
        always: false,
    }
}

fn no_tenant(_: &[u8]) -> Option<String> {
    None
}

/// Feeds `message` to a signer in chunks of `chunk`, as the DATA reader grows the body.
fn sign_streaming(signers: &Signers, head: &str, message: &[u8], chunk: usize) -> Vec<String> {
    let mut s = MessageSigner::new();
    let mut end = 0;
    while end < message.len() {
        end = (end + chunk).min(message.len());
        s.advance(signers, &message[..end], &no_tenant);
    }
    s.finish(signers, head.as_bytes(), message, 1_528_637_909, &no_tenant)
        .into_iter()
        .map(|p| p.assemble(&p.key.sign(&p.data).expect("test value")))
        .collect()
}

#[test]
fn streaming_does_not_change_the_signature() {
    let signers = Signers {
        list: vec![
            signer("football.example.com", "relaxed/relaxed"),
            signer("football.example.com", "simple/simple"),
        ],
    };
    let head = "Received: from x by y; Thu, 1 Jan 2026 00:00:00 +0000\r\n";
    let whole = sign_streaming(&signers, head, RFC8463_MESSAGE.as_bytes(), usize::MAX / 2);
    assert_eq!(whole.len(), 2);
    for chunk in [1, 2, 5, 64] {
        assert_eq!(
            sign_streaming(&signers, head, RFC8463_MESSAGE.as_bytes(), chunk),
            whole,
            "chunks of {chunk}"
        );
    }
    assert!(whole[0].contains("c=relaxed/relaxed;"));
    assert!(whole[1].contains("c=simple/simple;"));
    // The relaxed body hash is the RFC's.
    assert!(whole[0].contains("bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;"));
    let unfolded = whole[0].replace("\r\n ", "");
    assert!(
        unfolded.contains("h=From:From:To:Subject:Date:Message-ID;"),
        "{unfolded}"
    );
}

#[test]
fn a_domain_without_a_key_is_not_signed() {
    let signers = Signers {
        list: vec![signer("example.org", "relaxed/relaxed")],
    };
    let mut s = MessageSigner::new();
    s.advance(&signers, RFC8463_MESSAGE.as_bytes(), &no_tenant);
    assert!(s.is_unsigned());
    let out = s.finish(&signers, b"", RFC8463_MESSAGE.as_bytes(), 0, &no_tenant);
    assert!(out.is_empty());
}

#[test]
fn headers_only_and_empty_bodies() {
    let signers = Signers {
        list: vec![signer("a.example", "relaxed/simple")],
    };
    for message in [
        &b"From: x@a.example\r\nSubject: no body"[..],
        b"From: x@a.example\r\n",
        b"From: x@a.example\r\n\r\n",
    ] {
        let sigs = sign_streaming(&signers, "", message, 4);
        assert_eq!(sigs.len(), 1, "{message:?}");
        // The simple canonical form of an empty body is one CRLF.
        let crlf = B64.encode(ring::digest::digest(&ring::digest::SHA256, b"\r\n"));
        assert!(sigs[0].contains(&format!("bh={crlf};")), "{}", sigs[0]);
    }
}

#[test]
fn tenant_and_always_select() {
    let mut esp = signer("esp.example", "relaxed/relaxed");
    esp.always = true;
    let mut t = signer("a.example", "relaxed/relaxed");
    t.tenant = Some("blue".into());
    let signers = Signers {
        list: vec![signer("a.example", "relaxed/relaxed"), t, esp],
    };
    assert_eq!(signers.select(Some("a.example"), None), [0, 2]);
    assert_eq!(signers.select(Some("A.Example"), Some("BLUE")), [0, 1, 2]);
    assert_eq!(signers.select(Some("sub.a.example"), None), [2]);
    assert_eq!(signers.select(None, None), [2]);
}

#[test]
fn from_domains() {
    let d = |s: &str| from_domain(s.as_bytes());
    assert_eq!(d("From: a@Example.COM\r\n").as_deref(), Some("example.com"));
    assert_eq!(
        d("From: Joe <joe@x.example>\r\n").as_deref(),
        Some("x.example")
    );
    assert_eq!(
        d("From: \"a@evil.example <b>\" (c@d) <joe@x.example>\r\n").as_deref(),
        Some("x.example")
    );
    assert_eq!(
        d("From:\r\n  joe@x.example (Joe),\r\n bob@y.example\r\n").as_deref(),
        Some("x.example")
    );
    assert_eq!(d("From: undisclosed\r\n"), None);
    assert_eq!(d("From: <>\r\n"), None);
}
