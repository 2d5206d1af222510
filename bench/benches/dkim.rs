//! DKIM signing cost per message, per core: the body hash (canonicalisation and SHA-256, done
//! as DATA streams in), the header signature (RSA-2048 or Ed25519), and both, for 10 KiB and
//! 100 KiB messages. In memory, as `reception` runs it.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use epoxi::dkim::keygen::{generate, KeyKind};
use epoxi::dkim::sign::HEADERS_DEFAULT;
use epoxi::dkim::{Canonicalization, MessageSigner, Signer, Signers, SigningKey};

fn message_of(len: usize) -> Vec<u8> {
    let mut m = b"From: Sender <a@example.com>\r\nTo: b@example.net\r\nSubject: bench\r\n\
Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <bench@example.com>\r\n\
MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        .to_vec();
    let mut i = 0;
    while m.len() < len {
        m.extend_from_slice(
            format!("line {i:06} of the message body,  plain text like most mail is \r\n")
                .as_bytes(),
        );
        i += 1;
    }
    m
}

fn signers(key: SigningKey) -> Signers {
    Signers {
        list: vec![Signer {
            domain: "example.com".into(),
            selector: "s1".into(),
            key: Arc::new(key),
            headers: HEADERS_DEFAULT.iter().map(|s| s.to_string()).collect(),
            canonicalization: Canonicalization::RELAXED,
            tenant: None,
            always: false,
        }],
    }
}

const HEAD: &[u8] =
    b"Received: from client.test by mx.example.com; Thu, 1 Jan 2026 00:00:00 +0000\r\n";

fn no_tenant(_: &[u8]) -> Option<String> {
    None
}

/// Feeds the message in 64 KiB reads, as the reception adapter does, and builds the data.
fn prepare(s: &Signers, m: &[u8]) -> Vec<epoxi::dkim::Pending> {
    let mut signer = MessageSigner::new();
    let mut end = 0;
    while end < m.len() {
        end = (end + (64 << 10)).min(m.len());
        signer.advance(s, &m[..end], &no_tenant);
    }
    signer.finish(s, HEAD, m, 1_767_225_600, &no_tenant)
}

fn dkim(c: &mut Criterion) {
    let keys = [
        ("rsa2048", generate(KeyKind::Rsa { bits: 2048 })),
        ("ed25519", generate(KeyKind::Ed25519)),
    ];
    let mut g = c.benchmark_group("dkim");
    for (name, key) in keys {
        let Ok((_, key)) = key else {
            panic!("keygen {name}");
        };
        let s = signers(key);
        for kib in [10usize, 100] {
            let m = message_of(kib << 10);
            g.throughput(Throughput::Bytes(m.len() as u64));
            g.bench_function(format!("body_hash_and_data/{name}/{kib}KiB"), |b| {
                b.iter(|| prepare(&s, black_box(&m)))
            });
            let pending = prepare(&s, &m);
            g.bench_function(format!("header_sign/{name}/{kib}KiB"), |b| {
                b.iter(|| {
                    pending
                        .iter()
                        .map(|p| p.assemble(&p.key.sign(black_box(&p.data)).unwrap_or_default()))
                        .collect::<Vec<String>>()
                })
            });
            g.bench_function(format!("total/{name}/{kib}KiB"), |b| {
                b.iter(|| {
                    prepare(&s, black_box(&m))
                        .iter()
                        .map(|p| p.assemble(&p.key.sign(&p.data).unwrap_or_default()))
                        .collect::<Vec<String>>()
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, dkim);
criterion_main!(benches);
