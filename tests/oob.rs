//! Out-of-band reports end to end: the real binary relays a message to aiosmtpd, and a DSN or
//! an ARF report built with Python's email package comes back over SMTP (from a client that
//! may not relay) to the report domain; the event lines say what it was about.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{wait_until, Aiosmtpd, Epoxi, Opts, Smtp, DEADLINE};
use serde_json::Value;

const OOB_DOMAIN: &str = "bounces.test";

/// Runs tests/data/oob_report.py; returns its JSON lines (one per transaction).
fn report(port: u16, kind: &str, rcpt: &str, original: Option<&Path>, opts: &[&str]) -> Vec<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/oob_report.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script).arg(port.to_string()).arg(kind).arg(rcpt);
    if let Some(path) = original {
        cmd.arg(path);
    }
    let out = cmd.args(opts).output().expect("run python3 oob_report.py");
    assert!(
        out.status.success(),
        "oob_report.py {kind} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// Epoxi relaying *.test to aiosmtpd, with the report domain; only 127.0.0.1 may relay, so a
/// report from 127.0.0.2 shows that any client may send one.
fn start(dir: &Path, verp: bool, suppression: bool) -> (Epoxi, Aiosmtpd, PathBuf) {
    let port = common::dead_port();
    let store = dir.join("store");
    let downstream = Aiosmtpd::start(port, &store);
    let opts = Opts::new(dir)
        .shards(2)
        .route(port)
        .set("server", "relay_networks", "[\"127.0.0.1/32\"]")
        .set("oob", "domain", &format!("\"{OOB_DOMAIN}\""))
        .set("oob", "verp", if verp { "true" } else { "false" })
        .set(
            "suppression",
            "enabled",
            if suppression { "true" } else { "false" },
        );
    (Epoxi::start(&opts), downstream, store)
}

/// Sends one message to `rcpt`; returns its reception id (from the 250 reply).
fn send(port: u16, rcpt: &str) -> String {
    let mut smtp = Smtp::connect(port);
    smtp.reply();
    smtp.expect("EHLO client.test", 250);
    let body = common::message_body("oob-1", &[]);
    let body = body.replacen(
        "\r\n\r\n",
        "\r\nMessage-ID: <orig-1@client.test>\r\n\r\n",
        1,
    );
    let reply = smtp.send_message("sender@client.test", &[rcpt.to_owned()], &body);
    assert_eq!(reply.code, 250, "{}", reply.text);
    reply
        .text
        .rsplit(' ')
        .next()
        .expect("an id in the 250")
        .to_owned()
}

/// The n-th message aiosmtpd stored: (envelope sender, path of the message).
fn stored(store: &Path, n: usize) -> (String, PathBuf) {
    let env = store.join(format!("{n}.env"));
    let eml = store.join(format!("{n}.eml"));
    wait_until("aiosmtpd to store the message", DEADLINE, || eml.exists());
    let text = std::fs::read_to_string(env).expect("read envelope");
    (text.lines().next().unwrap_or_default().to_owned(), eml)
}

fn one(events: Vec<Value>, key: &str, value: &str) -> Value {
    let found: Vec<Value> = events.into_iter().filter(|e| e[key] == value).collect();
    assert_eq!(found.len(), 1, "one event with {key} = {value}: {found:?}");
    found.into_iter().next().expect("one")
}

#[test]
fn a_dsn_to_the_verp_return_path_is_matched_and_classified() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut epoxi, _downstream, store) = start(dir.path(), true, true);
    let id = send(epoxi.port, "bob@remote.test");
    let (mail_from, eml) = stored(&store, 1);
    assert_eq!(
        mail_from,
        format!("b+{id}@{OOB_DOMAIN}"),
        "delivered with the VERP return path"
    );
    let replies = report(
        epoxi.port,
        "dsn",
        &mail_from,
        Some(&eml),
        &[
            "final=bob@remote.test",
            "original=bob@remote.test",
            "status=5.1.1",
            "diag=550 5.1.1 <bob@remote.test>: Recipient address rejected: User unknown",
            "source=127.0.0.2",
        ],
    );
    assert_eq!(replies[0]["code"], 250, "{replies:?}");
    let oob = epoxi.wait_events("OOB", 1);
    // A hard bounce out of band: the recipient is suppressed (durably, before the 250).
    let added = epoxi.wait_events("Suppression", 1);
    assert_eq!(added[0]["recipient"], "bob@remote.test", "{}", added[0]);
    assert_eq!(added[0]["reason"], "bounce", "{}", added[0]);
    let mut smtp = Smtp::connect(epoxi.port);
    smtp.reply();
    smtp.expect("EHLO client.test", 250);
    smtp.expect("MAIL FROM:<sender@client.test>", 250);
    let refused = smtp.cmd("RCPT TO:<bob@remote.test>");
    assert_eq!(refused.code, 550, "{}", refused.text);
    smtp.expect("QUIT", 221);
    epoxi.stop();
    let e = &oob[0];
    assert_eq!(e["message_id"], id.as_str(), "{e}");
    assert_eq!(e["matched_by"], "verp", "{e}");
    assert_eq!(e["original_recipient"], "bob@remote.test", "{e}");
    assert_eq!(e["action"], "failed", "{e}");
    assert_eq!(e["status"], "5.1.1", "{e}");
    assert_eq!(e["bounce_category"], "InvalidRecipient", "{e}");
    assert_eq!(e["suppressed"], true, "{e}");
    assert_eq!(e["original_message_id"], "orig-1@client.test", "{e}");
    assert_eq!(e["sender"], "", "from the null sender: {e}");
    assert_eq!(e["recipient"], mail_from.as_str(), "{e}");
    assert!(
        e["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.2:")),
        "{e}"
    );
    // The report was read, not relayed: aiosmtpd got nothing more.
    assert!(!store.join("2.eml").exists(), "a report was relayed");
}

#[test]
fn without_verp_reports_are_matched_by_our_received_header_and_garbage_is_logged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut epoxi, _downstream, store) = start(dir.path(), false, false);
    let id = send(epoxi.port, "carol@remote.test");
    let (mail_from, eml) = stored(&store, 1);
    assert_eq!(
        mail_from, "sender@client.test",
        "no VERP: the sender as given"
    );

    // A DSN to any address of the domain, matched by the Received header it returns.
    let replies = report(
        epoxi.port,
        "dsn",
        &format!("postmaster@{OOB_DOMAIN}"),
        Some(&eml),
        &[
            "final=carol@remote.test",
            "status=5.2.2",
            "diag=552 5.2.2 Mailbox full",
            "source=127.0.0.2",
        ],
    );
    assert_eq!(replies[0]["code"], 250, "{replies:?}");
    // An ARF complaint about the same message.
    let replies = report(
        epoxi.port,
        "arf",
        &format!("abuse@{OOB_DOMAIN}"),
        Some(&eml),
        &[
            "rcpt_to=carol@remote.test",
            "agent=TestFBL/2.0",
            "source=127.0.0.2",
        ],
    );
    assert_eq!(replies[0]["code"], 250, "{replies:?}");
    // Garbage: accepted (never bounced back) and logged, one line each.
    let replies = report(
        epoxi.port,
        "garbage",
        &format!("bounces@{OOB_DOMAIN}"),
        None,
        &["source=127.0.0.2"],
    );
    assert_eq!(replies.len(), 4);
    for r in &replies {
        assert_eq!(r["code"], 250, "{replies:?}");
    }
    let unparsed = epoxi.wait_events("OobUnparsed", 4);
    let oob = one(epoxi.wait_events("OOB", 1), "matched_by", "received");
    let feedback = epoxi.wait_events("Feedback", 1);

    // A mix of a report address and a relayed one is refused for the second kind, and the
    // server is still there after all of the above.
    let mut smtp = Smtp::connect(epoxi.port);
    smtp.reply();
    smtp.expect("EHLO client.test", 250);
    smtp.expect("MAIL FROM:<sender@client.test>", 250);
    smtp.expect("RCPT TO:<dave@remote.test>", 250);
    let mixed = smtp.cmd(&format!("RCPT TO:<abuse@{OOB_DOMAIN}>"));
    assert_eq!(mixed.code, 452, "{}", mixed.text);
    assert!(mixed.text.contains("4.5.3"), "{}", mixed.text);
    smtp.expect("QUIT", 221);
    epoxi.stop();

    assert_eq!(oob["message_id"], id.as_str(), "{oob}");
    assert_eq!(oob["bounce_category"], "QuotaIssues", "{oob}");
    assert_eq!(oob["original_recipient"], "carol@remote.test", "{oob}");
    let f = &feedback[0];
    assert_eq!(f["feedback_type"], "abuse", "{f}");
    assert_eq!(f["original_rcpt"], "carol@remote.test", "{f}");
    assert_eq!(f["original_mail_from"], "sender@client.test", "{f}");
    assert_eq!(f["user_agent"], "TestFBL/2.0", "{f}");
    assert_eq!(f["message_id"], id.as_str(), "{f}");
    assert_eq!(f["matched_by"], "received", "{f}");
    for u in &unparsed {
        assert!(u["reason"].as_str().is_some_and(|r| !r.is_empty()), "{u}");
        assert_eq!(u["recipient"], format!("bounces@{OOB_DOMAIN}"), "{u}");
    }
    assert!(!store.join("2.eml").exists(), "a report was relayed");
}
