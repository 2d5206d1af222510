//! DKIM signing end to end: mail goes through the real `epoxi` to aiosmtpd (PyPI), and every
//! signature on what arrives is checked by dkimpy (PyPI), an independent verifier, its DNS
//! answered from the keys `epoxi dkim keygen` printed. Mail from a domain without a key must
//! arrive byte for byte as sent, below the Received header. Both Python packages are
//! installed by .ci/run.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// `epoxi dkim keygen`: writes the key to `out`, returns the TXT value it printed (the
/// record's strings joined) and the record's name.
fn keygen(domain: &str, selector: &str, algorithm: &str, out: &Path) -> (String, String) {
    let out_text = out.to_str().expect("utf-8 path");
    let ran = run_epoxi(&[
        "dkim",
        "keygen",
        "--domain",
        domain,
        "--selector",
        selector,
        "--algorithm",
        algorithm,
        "--out",
        out_text,
    ]);
    assert!(ran.status.success(), "{ran:?}");
    let line = ran.stdout.trim();
    let name = line.split(' ').next().expect("record name").to_owned();
    assert_eq!(name, format!("{selector}._domainkey.{domain}."));
    assert!(line.contains(" IN TXT \""), "{line}");
    let value: String = line.split('"').skip(1).step_by(2).collect();
    assert!(value.starts_with("v=DKIM1; k="), "{value}");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(out)
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the key file is private");
    (name, value)
}

fn dkim_table(domain: &str, selector: &str, key: &Path, extra: &str) -> String {
    format!(
        "[[dkim]]\ndomain = \"{domain}\"\nselector = \"{selector}\"\nkey_file = \"{}\"\n{extra}\n",
        key.display()
    )
}

/// Dot-stuff for DATA (RFC 5321 4.5.2).
fn stuffed(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 64);
    let mut line_start = true;
    for &b in message {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    out
}

fn send(c: &mut Smtp, from: &str, message: &[u8]) {
    c.expect(&format!("MAIL FROM:<{from}> BODY=8BITMIME"), 250);
    c.expect("RCPT TO:<rcpt@dest.test>", 250);
    c.expect("DATA", 354);
    c.send(&stuffed(message));
    c.send(b".\r\n");
    let reply = c.reply();
    assert_eq!(reply.code, 250, "{}", reply.text);
}

/// Stored messages (path, bytes), once `n` are there.
fn stored(dir: &Path, n: usize) -> Vec<(PathBuf, Vec<u8>)> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut got: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "eml"))
                    .map(|p| {
                        let bytes = std::fs::read(&p).expect("read stored");
                        (p, bytes)
                    })
                    .collect()
            })
            .unwrap_or_default();
        if got.len() >= n || Instant::now() > deadline {
            got.sort();
            return got;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Takes the fields named `name` off the top of `message` (each with its continuation lines).
fn strip_top<'a>(mut message: &'a [u8], name: &str, taken: &mut Vec<String>) -> &'a [u8] {
    while message.len() > name.len() && message[..name.len()].eq_ignore_ascii_case(name.as_bytes())
    {
        let mut end = 0;
        loop {
            end += find(&message[end..], b"\r\n").expect("header line") + 2;
            if !matches!(message.get(end), Some(b' ' | b'\t')) {
                break;
            }
        }
        taken.push(String::from_utf8_lossy(&message[..end]).into_owned());
        message = &message[end..];
    }
    message
}

/// dkimpy's verdict on each stored message: (signatures, every one verified, their d=).
fn verify(keys: &[(String, String)], files: &[PathBuf], dir: &Path) -> Vec<Value> {
    let keys_file = dir.join("keys.txt");
    let text: String = keys.iter().map(|(n, v)| format!("{n} {v}\n")).collect();
    std::fs::write(&keys_file, text).expect("write keys");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dkim_verify.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&keys_file)
        .args(files)
        .output()
        .expect("run dkimpy (pip install dkimpy pynacl)");
    assert!(
        out.status.success(),
        "dkim_verify.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stderr.is_empty() {
        eprintln!("dkimpy: {stderr}");
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("verifier JSON"))
        .collect()
}

fn message(from_domain: &str, id: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut m = format!(
        "From: Sender <sender@{from_domain}>\r\nTo: rcpt@dest.test\r\nSubject: dkim {id}\r\n\
         Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <{id}.{from_domain}@client.test>\r\n\
         X-Dkim-Id: {id}.{from_domain}\r\n{headers}\r\n"
    )
    .into_bytes();
    m.extend_from_slice(body);
    m
}

fn id_of(message: &[u8]) -> String {
    let at = find(message, b"X-Dkim-Id: ").expect("X-Dkim-Id") + 11;
    let end = find(&message[at..], b"\r\n").expect("end of id") + at;
    String::from_utf8_lossy(&message[at..end]).into_owned()
}

#[test]
fn signatures_verify_with_dkimpy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rsa_key = dir.path().join("rsa.key");
    let ed_key = dir.path().join("ed.key");
    let (_, rsa_txt) = keygen("rsa.test", "r1", "rsa", &rsa_key);
    let (_, ed_txt) = keygen("ed.test", "e1", "ed25519", &ed_key);
    // Several domains share the two keys; each publishes them under its own name.
    let mut keys = Vec::new();
    for d in ["rsa.test", "simple.test", "mixed.test"] {
        keys.push((format!("r1._domainkey.{d}"), rsa_txt.clone()));
    }
    // A 1024-bit RSA key (RFC 8301's floor; signed through the rsa crate, not ring).
    let short_key = dir.path().join("short.key");
    let ran = run_epoxi(&[
        "dkim".as_ref(),
        "keygen".as_ref(),
        "--domain".as_ref(),
        "short.test".as_ref(),
        "--selector".as_ref(),
        "k1".as_ref(),
        "--bits".as_ref(),
        "1024".as_ref(),
        "--out".as_ref(),
        short_key.as_os_str(),
    ]);
    assert!(ran.status.success(), "{ran:?}");
    let short_txt: String = ran.stdout.trim().split('"').skip(1).step_by(2).collect();
    keys.push(("k1._domainkey.short.test".to_string(), short_txt));
    for d in ["ed.test", "mixed.test", "tenant.test"] {
        keys.push((format!("e1._domainkey.{d}"), ed_txt.clone()));
    }
    let store = dir.path().join("store");
    let port = dead_port();
    let _downstream = Aiosmtpd::start(port, &store);
    let mut opts = Opts::new(dir.path()).route(port);
    opts.conf.raw = [
        dkim_table("rsa.test", "r1", &rsa_key, ""),
        dkim_table("ed.test", "e1", &ed_key, ""),
        dkim_table("short.test", "k1", &short_key, ""),
        dkim_table(
            "simple.test",
            "r1",
            &rsa_key,
            "canonicalization = \"simple/simple\"",
        ),
        dkim_table(
            "mixed.test",
            "e1",
            &ed_key,
            "canonicalization = \"simple/relaxed\"",
        ),
        dkim_table(
            "mixed.test",
            "r1",
            &rsa_key,
            "canonicalization = \"relaxed/simple\"",
        ),
        dkim_table("tenant.test", "e1", &ed_key, "tenant = \"blue\""),
    ]
    .concat();
    let mut epoxi = Epoxi::start(&opts);

    let mut big = Vec::with_capacity(1 << 20);
    let mut i = 0u32;
    while big.len() < 1 << 20 {
        big.extend_from_slice(format!("{i:07} the quick brown fox  \t\r\n").as_bytes());
        i += 1;
    }
    let folded = "Cc: One <one@dest.test>,\r\n\tTwo <two@dest.test>\r\nReply-To:\r\n   \
                  <reply@client.test>   \r\nX-Folded: a\r\n  b\r\n";
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("plain", "", b"Hello.\r\n".to_vec()),
        ("folded", folded, b"Folded headers above.\r\n".to_vec()),
        (
            "trailing",
            "",
            b"trailing spaces   \r\n\t\r\nx \t \r\n\r\n  \r\n\r\n\r\n".to_vec(),
        ),
        ("empty", "", Vec::new()),
        (
            "8bit",
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n",
            "Grüße aus Köln, ça va? 日本語  \r\nraw \u{e9}\r\n"
                .as_bytes()
                .to_vec(),
        ),
        (
            "dots",
            "",
            b".leading dot\r\n..two\r\n.\r\nend\r\n".to_vec(),
        ),
    ];
    // (domain, signatures it gets)
    let domains = [
        ("rsa.test", 1),
        ("ed.test", 1),
        ("simple.test", 1),
        ("mixed.test", 2),
        ("short.test", 1),
    ];
    let mut sent: Vec<(String, Vec<u8>, usize)> = Vec::new();
    let mut c = Smtp::connect(epoxi.port);
    assert_eq!(c.reply().code, 220);
    c.expect("EHLO client.test", 250);
    for (domain, sigs) in domains {
        for (id, headers, body) in &cases {
            let m = message(domain, id, headers, body);
            send(&mut c, &format!("sender@{domain}"), &m);
            sent.push((id_of(&m), m, sigs));
        }
        if sigs == 2 || domain == "rsa.test" {
            let m = message(domain, "1mb", "", &big);
            send(&mut c, &format!("sender@{domain}"), &m);
            sent.push((id_of(&m), m, sigs));
        }
    }
    // A domain without a key, with awkward headers; and the tenant rule.
    let nokey = message("nokey.test", "nokey", folded, b"unsigned  \r\n\r\n");
    send(&mut c, "sender@nokey.test", &nokey);
    sent.push((id_of(&nokey), nokey, 0));
    let blue = message("tenant.test", "blue", "X-Tenant: blue\r\n", b"for blue\r\n");
    send(&mut c, "sender@tenant.test", &blue);
    sent.push((id_of(&blue), blue, 1));
    let red = message("tenant.test", "red", "X-Tenant: red\r\n", b"for red\r\n");
    send(&mut c, "sender@tenant.test", &red);
    sent.push((id_of(&red), red, 0));
    c.expect("QUIT", 221);

    let got = stored(&store, sent.len());
    epoxi.stop();
    assert_eq!(got.len(), sent.len(), "every message delivered");
    let files: Vec<PathBuf> = got.iter().map(|(p, _)| p.clone()).collect();
    let verdicts = verify(&keys, &files, dir.path());
    assert_eq!(verdicts.len(), got.len());
    for ((path, bytes), verdict) in got.iter().zip(&verdicts) {
        let id = id_of(bytes);
        let (_, original, sigs) = sent
            .iter()
            .find(|(i, _, _)| *i == id)
            .unwrap_or_else(|| panic!("{id}: not sent"));
        assert_eq!(
            verdict["signatures"].as_u64(),
            Some(*sigs as u64),
            "{id} ({}): {verdict}",
            path.display()
        );
        let results = verdict["results"].as_array().expect("results");
        assert!(
            results.iter().all(|r| r.as_bool() == Some(true)),
            "{id}: dkimpy says {verdict}"
        );
        // Below the signatures and the Received header, the message is as sent.
        let mut taken = Vec::new();
        let rest = strip_top(bytes, "DKIM-Signature:", &mut taken);
        assert_eq!(taken.len(), *sigs, "{id}: signatures on top");
        for sig in &taken {
            assert!(!sig.contains(" l="), "{id}: no l= tag: {sig}");
            assert!(sig.contains(" t="), "{id}: a t= tag: {sig}");
            assert!(
                sig.split("\r\n").all(|l| l.len() <= 76),
                "{id}: folded at 76: {sig}"
            );
        }
        let rest = strip_top(rest, "Received:", &mut taken);
        assert!(rest == &original[..], "{id}: content changed");
    }
}

#[test]
fn dns_records_name_every_signing_domain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ed_key = dir.path().join("ed.key");
    let (_, ed_txt) = keygen("example.com", "e1", "ed25519", &ed_key);
    let mut conf = Conf::default();
    conf.raw = dkim_table("Example.com", "e1", &ed_key, "");
    conf.raw
        .push_str("[[source]]\nname = \"a\"\naddress = \"192.0.2.7\"\n");
    let path = conf.write(&dir.path().join("epoxi.toml"));
    let ran = run_epoxi(&[
        "dns-records".as_ref(),
        "--config".as_ref(),
        path.as_os_str(),
    ]);
    assert!(ran.status.success(), "{ran:?}");
    let out = ran.stdout;
    for want in [
        "example.com. IN TXT \"v=spf1 ip4:192.0.2.7 ~all\"",
        &format!("e1._domainkey.example.com. IN TXT \"{ed_txt}\""),
        "_dmarc.example.com. IN TXT \"v=DMARC1; p=none;",
        "_mta-sts.example.com. IN TXT \"v=STSv1; id=",
        "https://mta-sts.example.com/.well-known/mta-sts.txt",
        "_smtp._tls.example.com. IN TXT \"v=TLSRPTv1; rua=mailto:tlsrpt@example.com\"",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
}

#[test]
fn rsa_keygen_refuses_sizes_outside_1024_to_4096() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("k");
    let ran = run_epoxi(&[
        "dkim".as_ref(),
        "keygen".as_ref(),
        "--domain".as_ref(),
        "a.test".as_ref(),
        "--selector".as_ref(),
        "s".as_ref(),
        "--bits".as_ref(),
        "512".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert!(!ran.status.success(), "{ran:?}");
    assert!(ran.stderr.contains("1024 to 4096"), "{ran:?}");
    assert!(!out.exists());
}

/// The downstream is down, so the message waits in the spool; epoxi restarts without any
/// `[[dkim]]` table and delivers. The signature that arrives verifies and is the one spooled
/// before the restart: signing happened once, at reception.
#[test]
fn signature_survives_a_retry_after_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ed_key = dir.path().join("ed.key");
    let (name, txt) = keygen("ed.test", "e1", "ed25519", &ed_key);
    let store = dir.path().join("store");
    let port = dead_port();
    let mut opts = Opts::new(dir.path()).route(port);
    opts.conf.raw = dkim_table("ed.test", "e1", &ed_key, "");
    let mut epoxi = Epoxi::start(&opts);
    let m = message("ed.test", "restart", "", b"Retry me.\r\n");
    let mut c = Smtp::connect(epoxi.port);
    assert_eq!(c.reply().code, 220);
    c.expect("EHLO client.test", 250);
    send(&mut c, "sender@ed.test", &m);
    c.expect("QUIT", 221);
    epoxi.wait_events("TransientFailure", 1);
    epoxi.stop();
    // The signature as spooled.
    let mut spooled = None;
    for seg in epoxi.segments() {
        let bytes = std::fs::read(&seg).expect("read segment");
        if let Some(at) = find(&bytes, b"DKIM-Signature: ") {
            let end = find(&bytes[at..], b"\r\nReceived: ").expect("Received below") + at + 2;
            spooled = Some(String::from_utf8_lossy(&bytes[at..end]).into_owned());
        }
    }
    let spooled = spooled.expect("the signature is in the spool");

    let _downstream = Aiosmtpd::start(port, &store);
    let mut opts2 = Opts::new(dir.path()).route(port);
    opts2.conf.raw.clear();
    let mut epoxi2 = Epoxi::start(&opts2);
    let got = stored(&store, 1);
    epoxi2.stop();
    assert_eq!(got.len(), 1);
    let mut taken = Vec::new();
    strip_top(&got[0].1, "DKIM-Signature:", &mut taken);
    assert_eq!(taken, [spooled], "the spooled signature, not a new one");
    let files = [got[0].0.clone()];
    let verdict = &verify(
        &[(name.trim_end_matches('.').to_owned(), txt)],
        &files,
        dir.path(),
    )[0];
    assert_eq!(verdict["results"], serde_json::json!([true]), "{verdict}");
}
