//! Limits as an operator reads them: per client address across every shard (failed AUTH
//! attempts, connections), the queue's size, and the operational log in JSON.
//!
//! The kernel spreads a client's connections over the shards (SO_REUSEPORT) by a hash of the
//! connection's addresses, and a test cannot see which shard served one. So each per-client
//! test opens many connections from 127.0.0.1: with two shards, a limit kept per shard shows
//! (the other shard lets the client past it) unless every connection lands on one shard, one
//! chance in 2^(n-1) for n connections.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{dead_port, message_body, wait_until, Epoxi, Opts, Sink, Smtp, DEADLINE};
use serde_json::Value;

/// Connections from the same client, one after the other, in each per-client test.
const CONNECTIONS: usize = 6;

/// Writes a users file holding `user` with `password`, with the real `epoxi passwd`.
fn users_file(dir: &Path, user: &str, password: &str) -> std::path::PathBuf {
    let file = dir.join("users");
    let mut child = Command::new(env!("CARGO_BIN_EXE_epoxi"))
        .args(["passwd", "--iterations", "1000", "--file"])
        .arg(&file)
        .arg(user)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn epoxi passwd");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("write the password");
    let out = child.wait_with_output().expect("epoxi passwd");
    assert!(
        out.status.success(),
        "epoxi passwd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    file
}

/// Standard base64 (RFC 4648 §4), for AUTH PLAIN's initial response.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A new session from 127.0.0.1 that tries AUTH PLAIN once; the reply to AUTH.
fn auth_once(port: u16, user: &str, password: &str) -> common::Reply {
    let mut c = Smtp::connect(port);
    assert_eq!(c.reply().code, 220);
    let ehlo = c.expect("EHLO client.test", 250);
    assert!(ehlo.text.contains("AUTH"), "AUTH offered: {}", ehlo.text);
    let reply = c.cmd(&format!(
        "AUTH PLAIN {}",
        base64(format!("\0{user}\0{password}").as_bytes())
    ));
    c.expect("QUIT", 221);
    reply
}

#[test]
fn base64_encodes_like_rfc_4648() {
    // The test vectors of RFC 4648 §10.
    for (plain, encoded) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64(plain.as_bytes()), encoded, "{plain:?}");
    }
}

/// `server.auth_failures_max = 3` means three failed AUTH attempts from an address, whichever
/// shards they reach: then every AUTH from it is refused with `454 4.7.0` for the window, the
/// right password too, on every shard. A limit kept per shard would let the client try three
/// times on each, and then log in on the shard it had not tried yet.
#[test]
fn auth_failures_are_limited_per_client_across_shards() {
    let dir = tempfile::tempdir().expect("tempdir");
    let users = users_file(dir.path(), "alice", "right pw");
    let mut epoxi = Epoxi::start(
        &Opts::new(dir.path())
            .shards(2)
            .route(dead_port())
            .set("server", "auth_users", &format!("\"{}\"", users.display()))
            .set("server", "auth_plaintext_loopback", "true")
            .set("server", "auth_failures_max", "3")
            // Far longer than the test: no failure is forgotten while it runs.
            .set("server", "auth_failure_window_s", "3600"),
    );

    let mut codes = Vec::new();
    for _ in 0..CONNECTIONS {
        let reply = auth_once(epoxi.port, "alice", "wrong");
        if reply.code == 454 {
            assert!(reply.text.starts_with("454 4.7.0"), "{}", reply.text);
        }
        codes.push(reply.code);
    }
    assert_eq!(
        codes,
        [535, 535, 535, 454, 454, 454],
        "three failures from 127.0.0.1, then refused on every connection"
    );
    for i in 0..CONNECTIONS {
        let reply = auth_once(epoxi.port, "alice", "right pw");
        assert!(
            reply.text.starts_with("454 4.7.0"),
            "connection {i} with the right password, over the limit: {}",
            reply.text
        );
    }
    epoxi.stop();
}

/// `server.connections_per_ip_max = 2` on two shards: two sessions from one address in all,
/// whichever shards they are on. A third is told `421 4.7.0` on any shard, and once one of the
/// two ends, a new one is greeted.
#[test]
fn connections_per_ip_are_limited_across_shards() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut epoxi = Epoxi::start(&Opts::new(dir.path()).shards(2).route(dead_port()).set(
        "server",
        "connections_per_ip_max",
        "2",
    ));
    let refused_now = |why: &str| {
        for i in 0..CONNECTIONS {
            let mut c = Smtp::connect(epoxi.port);
            let reply = c.reply();
            assert!(
                reply.text.starts_with("421 4.7.0"),
                "{why}, connection {i}: {}",
                reply.text
            );
            assert!(c.try_reply().is_none(), "closed after the 421");
        }
    };
    let mut a = Smtp::connect(epoxi.port);
    assert_eq!(a.reply().code, 220);
    let mut b = Smtp::connect(epoxi.port);
    assert_eq!(b.reply().code, 220);
    refused_now("two sessions open");

    b.expect("QUIT", 221);
    drop(b);
    // The owner shard hears of the close a moment after it; until then new sessions are
    // refused. The first one greeted is kept: it takes the freed slot.
    let mut c = None;
    wait_until("a new session to be greeted", DEADLINE, || {
        let mut probe = Smtp::connect(epoxi.port);
        if probe.try_reply().is_some_and(|r| r.code == 220) {
            c = Some(probe);
        }
        c.is_some()
    });
    let mut c = c.expect("greeted");
    refused_now("two sessions open again");
    for s in [&mut a, &mut c] {
        s.expect("EHLO client.test", 250);
        s.expect("QUIT", 221);
    }
    epoxi.stop();
}

/// `queue.messages_max = 5` on one shard: the sixth message is told `452 4.3.1` (try later)
/// while five wait for a next hop that is down. Nothing acknowledged is lost: once the next hop
/// is up, the five are delivered, and the queue takes mail again.
#[test]
fn a_full_queue_says_452_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = dead_port();
    let mut epoxi = Epoxi::start(&Opts::new(dir.path()).shards(1).route(port).set(
        "queue",
        "messages_max",
        "5",
    ));
    let mut c = Smtp::connect(epoxi.port);
    assert_eq!(c.reply().code, 220);
    c.expect("EHLO client.test", 250);
    let rcpt = |i: usize| vec![format!("r{i}@d{i}.test")];
    let mut accepted = Vec::new();
    for i in 0..5 {
        let id = format!("queued-{i}");
        let reply = c.send_message("s@x.test", &rcpt(i), &message_body(&id, &[]));
        assert_eq!(reply.code, 250, "{id}: {}", reply.text);
        accepted.push(id);
    }
    let full = c.send_message("s@x.test", &rcpt(5), &message_body("refused", &[]));
    assert!(full.text.starts_with("452 4.3.1"), "{}", full.text);
    c.expect("QUIT", 221);
    assert!(
        epoxi.events_of("Delivery").is_empty(),
        "the next hop is down"
    );

    let sink = Sink::start_on(dir.path(), &format!("127.0.0.1:{port}"), &[]);
    let deliveries = epoxi.wait_events("Delivery", 5);
    assert_eq!(common::field_set(&deliveries, "message_id").len(), 5);

    // Room again: a new message is taken and delivered.
    let mut c = Smtp::connect(epoxi.port);
    assert_eq!(c.reply().code, 220);
    c.expect("EHLO client.test", 250);
    let reply = c.send_message("s@x.test", &rcpt(6), &message_body("after", &[]));
    assert_eq!(reply.code, 250, "{}", reply.text);
    accepted.push("after".to_owned());
    c.expect("QUIT", 221);
    epoxi.wait_events("Delivery", 6);
    epoxi.stop();

    let report = sink.stop();
    assert_eq!(report.count("duplicates"), 0, "{}", report.json);
    let delivered: BTreeSet<String> = report.ids.into_iter().collect();
    assert_eq!(delivered, accepted.into_iter().collect::<BTreeSet<_>>());
}

/// `--log-format json`: every line epoxi writes on stderr is a JSON object with a level and a
/// message, from the start to the clean stop, and the listening line says where and how many
/// shards, as the human format does.
#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut epoxi = Epoxi::start(
        &Opts::new(dir.path())
            .shards(2)
            .route(dead_port())
            .log_format("json"),
    );
    // Some traffic, so the log holds more than the start: a message for a next hop that is
    // down.
    let mut c = Smtp::connect(epoxi.port);
    assert_eq!(c.reply().code, 220);
    c.expect("EHLO client.test", 250);
    let reply = c.send_message(
        "s@x.test",
        &["r@d1.test".to_owned()],
        &message_body("json", &[]),
    );
    assert_eq!(reply.code, 250, "{}", reply.text);
    c.expect("QUIT", 221);
    epoxi.wait_events("TransientFailure", 1);
    epoxi.stop();

    let stderr = epoxi.stderr();
    let lines: Vec<Value> = stderr
        .lines()
        .map(|line| {
            let value: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            assert!(value.is_object(), "not an object: {line}");
            assert!(value["level"].is_string(), "no level: {line}");
            assert!(value["fields"]["message"].is_string(), "no message: {line}");
            value
        })
        .collect();
    let messages: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["fields"]["message"].as_str())
        .collect();
    let listening = format!("listening on 127.0.0.1:{} with 2 shards", epoxi.port);
    assert!(
        messages.contains(&listening.as_str()),
        "no `{listening}`:\n{stderr}"
    );
    let stopped = lines
        .iter()
        .find(|l| l["fields"]["message"] == "stopped cleanly")
        .unwrap_or_else(|| panic!("no clean stop:\n{stderr}"));
    assert_eq!(stopped["level"], "INFO", "{stopped}");
}
