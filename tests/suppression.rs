//! The suppression list end to end: a real hard bounce (the loadgen sink's `--smart` 550 5.1.1
//! for permfail@) and a real ARF complaint put recipients on the list, a new message to them
//! is refused at RCPT while the others are delivered, the list survives a restart, and a
//! recipient on its tenant's list only is bounced at acceptance, never delivered.

mod common;

use std::path::Path;
use std::process::Command;

use common::{run_epoxi, Epoxi, Opts, Sink, Smtp};
use serde_json::Value;

const OOB_DOMAIN: &str = "bounces.test";

fn opts(dir: &Path, sink_port: u16) -> Opts {
    Opts::new(dir)
        .shards(2)
        .route(sink_port)
        .set("suppression", "enabled", "true")
        .set("oob", "domain", &format!("\"{OOB_DOMAIN}\""))
}

/// A session after EHLO.
fn session(port: u16) -> Smtp {
    let mut smtp = Smtp::connect(port);
    smtp.reply();
    smtp.expect("EHLO client.test", 250);
    smtp
}

/// One message with optional extra header lines; Ok(id) or the refusal's code and text.
fn message(port: u16, rcpts: &[&str], headers: &str) -> (Vec<u16>, common::Reply) {
    let mut smtp = session(port);
    smtp.expect("MAIL FROM:<sender@client.test>", 250);
    let codes: Vec<u16> = rcpts
        .iter()
        .map(|r| smtp.cmd(&format!("RCPT TO:<{r}>")).code)
        .collect();
    if !codes.contains(&250) {
        return (codes, smtp.cmd("RSET"));
    }
    smtp.expect("DATA", 354);
    let body =
        common::message_body("s", &[]).replacen("\r\n\r\n", &format!("\r\n{headers}\r\n"), 1);
    smtp.send(body.as_bytes());
    smtp.send(b".\r\n");
    (codes, smtp.reply())
}

fn rcpt_code(port: u16, rcpt: &str) -> common::Reply {
    let mut smtp = session(port);
    smtp.expect("MAIL FROM:<sender@client.test>", 250);
    smtp.cmd(&format!("RCPT TO:<{rcpt}>"))
}

fn with(events: &[Value], key: &str, value: &str) -> Vec<Value> {
    events.iter().filter(|e| e[key] == value).cloned().collect()
}

/// Waits for an event of `kind` whose `recipient` is `rcpt` (notices to the sender are
/// delivered too, so a count of all deliveries says little).
fn wait_for(epoxi: &Epoxi, kind: &str, rcpt: &str) -> Value {
    let mut found = None;
    common::wait_until(&format!("{kind} for {rcpt}"), common::DEADLINE, || {
        found = with(&epoxi.events_of(kind), "recipient", rcpt)
            .into_iter()
            .next();
        found.is_some()
    });
    found.expect("found")
}

#[test]
fn hard_bounces_and_complaints_are_suppressed_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &["--smart"]);
    let opts = opts(dir.path(), sink.port);
    let mut epoxi = Epoxi::start(&opts);

    // A real hard bounce: the sink refuses permfail@ with 550 5.1.1 at RCPT.
    let (codes, reply) = message(epoxi.port, &["permfail@remote.test"], "");
    assert_eq!((codes[0], reply.code), (250, 250), "{}", reply.text);
    let added = epoxi.wait_events("Suppression", 1);
    assert_eq!(
        added[0]["recipient"], "permfail@remote.test",
        "{}",
        added[0]
    );
    assert_eq!(added[0]["reason"], "bounce", "{}", added[0]);
    assert_eq!(added[0]["action"], "add", "{}", added[0]);

    // A complaint (ARF) about a message to complainer@other.test.
    let original = dir.path().join("original.eml");
    std::fs::write(
        &original,
        "From: sender@client.test\r\nTo: complainer@other.test\r\nSubject: hi\r\n\r\nhello\r\n",
    )
    .expect("write original");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/oob_report.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(epoxi.port.to_string())
        .args(["arf", &format!("fbl@{OOB_DOMAIN}")])
        .arg(&original)
        .arg("rcpt_to=complainer@other.test")
        .output()
        .expect("run oob_report.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"code\": 250"));
    let added = epoxi.wait_events("Suppression", 2);
    assert!(
        added
            .iter()
            .any(|e| e["recipient"] == "complainer@other.test" && e["reason"] == "complaint"),
        "{added:?}"
    );

    // Both are refused at RCPT now (whichever shard the connection lands on), and a message
    // to them and to a good recipient is delivered to the good one only.
    for _ in 0..4 {
        for rcpt in ["permfail@remote.test", "Complainer@Other.test"] {
            let r = rcpt_code(epoxi.port, rcpt);
            assert_eq!(r.code, 550, "{rcpt}: {}", r.text);
            assert!(r.text.contains("5.7.1 Recipient suppressed"), "{}", r.text);
        }
    }
    let (codes, reply) = message(
        epoxi.port,
        &[
            "permfail@remote.test",
            "ok@remote.test",
            "complainer@other.test",
        ],
        "",
    );
    assert_eq!(codes, vec![550, 250, 550]);
    assert_eq!(reply.code, 250, "{}", reply.text);
    wait_for(&epoxi, "Delivery", "ok@remote.test");
    let suppressed = epoxi.wait_events("Suppressed", 10);
    assert!(
        suppressed.iter().all(|e| e["stage"] == "rcpt"),
        "{suppressed:?}"
    );
    assert_eq!(suppressed[0]["response"]["code"], 550);
    epoxi.stop();

    // The list survives the restart.
    let mut epoxi = Epoxi::start(&opts);
    for rcpt in ["permfail@remote.test", "complainer@other.test"] {
        for _ in 0..3 {
            let r = rcpt_code(epoxi.port, rcpt);
            assert_eq!(r.code, 550, "after the restart, {rcpt}: {}", r.text);
        }
    }
    assert_eq!(rcpt_code(epoxi.port, "fresh@remote.test").code, 250);
    epoxi.stop();
    // The sink saw permfail@ once (the first, real bounce), never again.
    let report = sink.stop();
    let permfail = report
        .rcpt_lines
        .iter()
        .filter(|l| l.contains("permfail@"))
        .count();
    assert_eq!(permfail, 0, "never accepted: {:?}", report.rcpt_lines);
    assert_eq!(
        report.json["refused_by_kind"]["permfail"], 1,
        "{}",
        report.json
    );
}

#[test]
fn a_recipient_on_its_tenants_list_is_bounced_at_acceptance_and_never_delivered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &["--smart"]);
    let opts = opts(dir.path(), sink.port);
    let mut epoxi = Epoxi::start(&opts);

    // A hard bounce of acme's message puts permfail@ on acme's list only.
    let (_, reply) = message(epoxi.port, &["permfail@remote.test"], "X-Tenant: acme");
    assert_eq!(reply.code, 250, "{}", reply.text);
    let added = epoxi.wait_events("Suppression", 1);
    assert_eq!(added[0]["tenant"], "acme", "{}", added[0]);
    // The default list does not have it: RCPT is accepted.
    assert_eq!(rcpt_code(epoxi.port, "permfail@remote.test").code, 250);

    // acme's next message to it and to a good recipient: accepted, the good one delivered,
    // permfail@ recorded as bounced with the suppression reply and logged.
    let (codes, reply) = message(
        epoxi.port,
        &["permfail@remote.test", "good@remote.test"],
        "X-Tenant: acme",
    );
    assert_eq!(codes, vec![250, 250]);
    assert_eq!(reply.code, 250, "{}", reply.text);
    let id = reply.text.rsplit(' ').next().unwrap_or_default().to_owned();
    wait_for(&epoxi, "Delivery", "good@remote.test");
    let suppressed = epoxi.wait_events("Suppressed", 1);
    let s = &suppressed[0];
    assert_eq!(s["stage"], "data", "{s}");
    assert_eq!(s["tenant"], "acme", "{s}");
    assert_eq!(s["message_id"], id.as_str(), "{s}");
    let mut at_acceptance = Vec::new();
    common::wait_until("the bounce at acceptance", common::DEADLINE, || {
        at_acceptance = with(&epoxi.events_of("Bounce"), "message_id", &id);
        !at_acceptance.is_empty()
    });
    assert_eq!(at_acceptance.len(), 1, "{at_acceptance:?}");
    assert_eq!(at_acceptance[0]["recipient"], "permfail@remote.test");
    assert_eq!(at_acceptance[0]["response"]["enhanced"], "5.7.1");
    assert_eq!(at_acceptance[0]["peer"], "-", "no delivery attempt");

    // A message of acme's to permfail@ alone is refused after DATA; another tenant's is not
    // concerned by acme's list.
    let (_, reply) = message(epoxi.port, &["permfail@remote.test"], "X-Tenant: acme");
    assert_eq!(reply.code, 550, "{}", reply.text);
    assert!(reply.text.contains("5.7.1"), "{}", reply.text);
    let (_, reply) = message(epoxi.port, &["other@remote.test"], "X-Tenant: other");
    assert_eq!(reply.code, 250, "{}", reply.text);
    wait_for(&epoxi, "Delivery", "other@remote.test");
    epoxi.stop();
    let report = sink.stop();
    assert_eq!(
        report.json["refused_by_kind"]["permfail"], 1,
        "permfail@ was tried once only: {}",
        report.json
    );
}

/// `epoxi suppression add|list|remove` over the admin socket.
fn cli(epoxi: &Epoxi, args: &[&str]) -> Value {
    let spool = epoxi.spool.clone();
    let mut all: Vec<&std::ffi::OsStr> = vec!["suppression".as_ref()];
    all.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
    all.extend(["--json".as_ref(), "--spool".as_ref(), spool.as_os_str()]);
    let ran = run_epoxi(&all);
    serde_json::from_str(&ran.stdout).unwrap_or_else(|e| panic!("{args:?} ({e}): {ran:?}"))
}

#[test]
fn operators_add_list_and_remove_entries_over_the_admin_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]);
    let mut epoxi = Epoxi::start(&opts(dir.path(), sink.port));
    let added = cli(
        &epoxi,
        &["add", "--reason", "asked to", "Manual@Remote.test"],
    );
    assert_eq!(added["added"], 1, "{added}");
    let again = cli(&epoxi, &["add", "manual@remote.test"]);
    assert_eq!(again["added"], 0, "already there: {again}");
    let tenant = cli(&epoxi, &["add", "--tenant", "acme", "t@other.test"]);
    assert_eq!(tenant["added"], 1, "{tenant}");
    let r = rcpt_code(epoxi.port, "manual@remote.test");
    assert_eq!(r.code, 550, "{}", r.text);
    let listed = cli(&epoxi, &["list"]);
    let entries = listed["entries"].as_array().cloned().unwrap_or_default();
    assert_eq!(entries.len(), 1, "the default list: {listed}");
    assert_eq!(entries[0]["rcpt"], "manual@remote.test");
    assert_eq!(entries[0]["reason"], "admin");
    assert_eq!(entries[0]["note"], "asked to");
    let everything = cli(&epoxi, &["list", "--tenant", "*"]);
    assert_eq!(
        everything["entries"].as_array().map(Vec::len),
        Some(2),
        "{everything}"
    );
    let removed = cli(&epoxi, &["remove", "manual@remote.test"]);
    assert_eq!(removed["removed"], 1, "{removed}");
    assert_eq!(rcpt_code(epoxi.port, "manual@remote.test").code, 250);
    let bad = cli(&epoxi, &["add", "not-an-address"]);
    assert!(bad["error"].is_string(), "{bad}");
    let changes = epoxi.events_of("Suppression");
    assert_eq!(changes.len(), 3, "two adds and a remove: {changes:?}");
    epoxi.stop();
}
