//! TLS on the inbound side, against a real client: Python's smtplib over implicit TLS.

mod common;

use std::process::Command;

use common::*;

/// Send one message with Python's smtplib over implicit TLS (certificate not verified, as a
/// sender on the internet would not for a self-signed one). Returns smtplib's exit status and
/// output.
fn smtplib_ssl(port: u16, id: &str) -> (bool, String) {
    let script = format!(
        r#"
import smtplib, ssl
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
with smtplib.SMTP_SSL("127.0.0.1", {port}, context=ctx, timeout=10) as s:
    code, _ = s.ehlo("client.test")
    assert code == 250, code
    s.sendmail("a@x.test", ["b@d1.test", "c@d1.test"], "X-Loadgen-Id: {id}\r\nSubject: tls\r\n\r\nover TLS\r\n")
    print("cipher", s.sock.cipher()[0], s.sock.version())
"#
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("run python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn implicit_tls_listener_accepts_mail_and_logs_the_cipher() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]);
    let tls_port = dead_port();
    let epoxi = Epoxi::start(&Opts::new(dir.path()).shards(2).route(sink.port).set(
        "server",
        "implicit_tls_listen",
        &format!("\"127.0.0.1:{tls_port}\""),
    ));

    let (ok, out) = smtplib_ssl(tls_port, "tls-1");
    assert!(ok, "smtplib over TLS failed:\n{out}");
    assert!(out.contains("TLSv1."), "{out}");

    // A client that speaks plaintext to the TLS port gets nowhere, and the server goes on.
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", tls_port)).expect("connect");
    use std::io::{Read, Write};
    plain
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("timeout");
    plain.write_all(b"EHLO plaintext.test\r\n").expect("write");
    let mut buf = [0u8; 256];
    let n = plain.read(&mut buf).unwrap_or(0);
    assert!(
        !buf[..n].starts_with(b"250"),
        "no SMTP without TLS on the TLS port"
    );
    drop(plain);

    let (ok, out) = smtplib_ssl(tls_port, "tls-2");
    assert!(ok, "second TLS client:\n{out}");
    // The plaintext listener is unaffected.
    let mut smtp = Smtp::connect(epoxi.port);
    assert_eq!(smtp.reply().code, 220);
    smtp.expect("QUIT", 221);

    let receptions = epoxi.wait_events("Reception", 2);
    for r in &receptions {
        let tls = r["tls"].as_str().unwrap_or_default();
        assert!(
            tls.starts_with("TLSv1_"),
            "Reception records TLS details: {r}"
        );
    }
    epoxi.wait_events("Delivery", 4);
    let mut epoxi = epoxi;
    epoxi.stop();
    let report = sink.stop();
    let ids: std::collections::BTreeSet<&str> = report.ids.iter().map(String::as_str).collect();
    assert!(
        ids.contains("tls-1") && ids.contains("tls-2"),
        "{:?}",
        report.ids
    );
    // Both recipients share a domain: one transaction per message, so no id arrives twice.
    assert_eq!(report.count("duplicates"), 0);
}

#[test]
fn tls_key_without_certificate_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Opts::new(dir.path()).set("server", "tls_key", "\"/nonexistent/key.pem\"");
    let ran = Epoxi::try_start(&opts).err().expect("refused");
    assert!(ran.stderr.contains("server.tls_cert"), "{}", ran.stderr);
}

#[test]
fn starttls_with_smtplib() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]);
    let epoxi = Epoxi::start(&Opts::new(dir.path()).route(sink.port));
    let script = format!(
        r#"
import smtplib, ssl
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
with smtplib.SMTP("127.0.0.1", {port}, timeout=10) as s:
    s.ehlo("client.test")
    assert s.has_extn("starttls"), s.esmtp_features
    s.starttls(context=ctx)
    s.ehlo("client.test")
    assert not s.has_extn("starttls"), "offered again after TLS"
    s.sendmail("a@x.test", ["b@d3.test"], "X-Loadgen-Id: starttls-1\r\n\r\nhi\r\n")
    print(s.sock.version())
"#,
        port = epoxi.port
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "smtplib starttls:\n{text}");
    let receptions = epoxi.wait_events("Reception", 1);
    assert!(
        receptions[0]["tls"]
            .as_str()
            .unwrap_or_default()
            .starts_with("TLSv1_"),
        "{}",
        receptions[0]
    );
    epoxi.wait_events("Delivery", 1);
    let mut epoxi = epoxi;
    epoxi.stop();
    assert_eq!(sink.stop().ids, vec!["starttls-1".to_owned()]);
}

#[test]
fn relay_to_a_starttls_server_encrypts_and_required_tls_never_falls_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]);
    // B: the next hop, offering STARTTLS, relaying to the sink.
    let b = Epoxi::start(
        &Opts::new(&dir.path().join("b"))
            .route(sink.port)
            .log_dir(dir.path().join("b-log")),
    );
    // A: relays *.test to B with the default (opportunistic) STARTTLS, and one domain to the
    // sink (no STARTTLS there) with TLS required.
    let mut conf = Opts::new(&dir.path().join("a")).log_dir(dir.path().join("a-log"));
    conf.conf.raw = format!(
        "[[route]]\ndomain = \"d0.test\"\ntarget = \"127.0.0.1:{}\"\ntls = \"required\"\n\
         [[route]]\ndomain = \"*.test\"\ntarget = \"127.0.0.1:{}\"\n",
        sink.port, b.port
    );
    let tmp_ca = dir.path().join("ca.pem");
    std::fs::write(&tmp_ca, SELF_SIGNED_CA).expect("write CA file");
    conf = conf.set(
        "delivery",
        "tls_ca_file",
        &format!("\"{}\"", tmp_ca.display()),
    );
    let a = Epoxi::start(&conf);

    // 20 messages over d0..d4: 4 of them to d0.test (required TLS), 16 through B.
    let injected = Inject::new(20).domains(5).run(dir.path(), a.port);
    assert_eq!(injected.count("accepted"), 20, "{}", injected.json);
    let through_b = b.wait_events("Reception", 16);
    for r in &through_b {
        assert!(
            r["tls"].as_str().unwrap_or_default().starts_with("TLSv1_"),
            "A→B not encrypted: {r}"
        );
    }
    b.wait_events("Delivery", 16);
    // d0.test: the sink offers no STARTTLS, so A defers instead of sending in plaintext.
    let deferred = a.wait_events("TransientFailure", 4);
    assert!(
        deferred.iter().all(|d| d["domain"] == "d0.test"),
        "{deferred:?}"
    );
    for d in &deferred {
        let text = d["response"]["text"].as_str().unwrap_or_default();
        assert!(text.contains("STARTTLS"), "{d}");
    }
    assert!(
        a.events_of("Delivery")
            .iter()
            .all(|d| d["domain"] != "d0.test"),
        "required TLS must never fall back to plaintext"
    );
    let (mut a, mut b) = (a, b);
    a.stop();
    b.stop();
    let report = sink.stop();
    assert_eq!(report.count("unique"), 16, "{}", report.json);
}

/// Regression: a message bigger than rustls's 64 KiB send buffer used to fail outbound over
/// STARTTLS ("failed to write whole buffer") and be retried forever. Here through DATA (the next
/// hop has CHUNKING off); `fidelity::bdat_to_an_epoxi_next_hop_is_byte_exact` covers BDAT.
#[test]
fn a_message_bigger_than_the_tls_send_buffer_relays_over_starttls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]);
    let mut b = Epoxi::start(
        &Opts::new(&dir.path().join("b"))
            .route(sink.port)
            .log_dir(dir.path().join("b-log"))
            .set("server", "chunking", "false")
            .set("server", "binarymime", "false"),
    );
    let mut a = Epoxi::start(
        &Opts::new(&dir.path().join("a"))
            .route(b.port)
            .log_dir(dir.path().join("a-log")),
    );
    let injected = Inject::new(1)
        .size(300 << 10)
        .domains(1)
        .run(dir.path(), a.port);
    assert_eq!(injected.count("accepted"), 1, "{}", injected.json);
    let received = b.wait_events("Reception", 1);
    assert!(
        received[0]["tls"]
            .as_str()
            .unwrap_or_default()
            .starts_with("TLSv1_"),
        "A→B not encrypted: {}",
        received[0]
    );
    assert!(received[0]["size"].as_u64().unwrap_or(0) > 300 << 10);
    a.wait_events("Delivery", 1);
    b.wait_events("Delivery", 1);
    a.stop();
    b.stop();
    assert_eq!(sink.stop().count("unique"), 1);
}

/// A CA bundle for the required-TLS route: any valid PEM certificate will do, since the sink
/// never gets as far as presenting one (it offers no STARTTLS).
const SELF_SIGNED_CA: &str = include_str!("data/ca.pem");
