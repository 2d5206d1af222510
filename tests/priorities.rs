//! Priority classes, tenant fairness, campaigns and header stripping on a running server: a
//! transactional message overtakes a bulk backlog queued to a throttled site, one tenant's
//! backlog does not hold up another tenant's mail, `--campaign` selects a campaign's mail, and
//! `egress.strip_headers` takes the tag headers out on the way while the spool keeps them.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{dead_port, run_epoxi, wait_until, Aiosmtpd, Epoxi, Inject, Opts, Sink, Smtp};
use serde_json::Value;

/// The throttled site's sink answers each message this long after its final dot: with one
/// connection, 50 messages a second.
const TRICKLE_DELAY_MS: &str = "20";
/// Bulk messages queued behind the transactional one: more than the debug build takes in
/// about 15 s, and 400 s of delivery at the trickle, so FIFO order could never pass.
const BULK_BACKLOG: u64 = 20_000;
/// How long the transactional message may take at most: generous, a bound and not a speed
/// (it needs a fraction of a second), against the minutes the backlog takes.
const OVERTAKE_WITHIN: Duration = Duration::from_secs(10);

/// `epoxi ARGS --spool SPOOL`, its answer as JSON.
fn cli(epoxi: &Epoxi, args: &[&str]) -> Value {
    let mut all: Vec<std::ffi::OsString> = args.iter().map(|a| a.into()).collect();
    all.push("--spool".into());
    all.push(epoxi.spool.clone().into());
    let ran = run_epoxi(&all);
    serde_json::from_str(&ran.stdout).unwrap_or_else(|e| panic!("{args:?} ({e}): {ran:?}"))
}

/// Event log lines holding every one of `needles`: a plain scan, as the logs grow to tens of
/// thousands of lines here, too many to parse on every poll.
fn log_lines(epoxi: &Epoxi, needles: &[&str]) -> usize {
    let Ok(entries) = std::fs::read_dir(&epoxi.log_dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "jsonl"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .map(|text| {
            text.lines()
                .filter(|l| needles.iter().all(|n| l.contains(n)))
                .count()
        })
        .sum()
}

fn deliveries(epoxi: &Epoxi, to: &str) -> usize {
    log_lines(epoxi, &["\"type\":\"Delivery\"", to])
}

/// A site throttled to a trickle: one connection, to a sink that answers slowly.
fn throttled(dir: &Path) -> (Sink, Epoxi) {
    let sink = Sink::start(dir, &["--delay-ms", TRICKLE_DELAY_MS]);
    let epoxi = Epoxi::start(
        &Opts::new(dir)
            .route(sink.port)
            .set("delivery", "connections_per_destination_max", "1")
            .set("delivery", "idle_timeout_ms", "5000"),
    );
    (sink, epoxi)
}

/// One message with header fields `fields`, over a connection of its own.
fn send(port: u16, rcpt: &str, fields: &[&str]) {
    let mut c = Smtp::connect(port);
    assert_eq!(c.reply().code, 220);
    c.expect("EHLO client.test", 250);
    let body = format!(
        "{}Subject: {rcpt}\r\n\r\nhello\r\n",
        fields
            .iter()
            .map(|f| format!("{f}\r\n"))
            .collect::<String>()
    );
    let reply = c.send_message("s@client.test", &[rcpt.to_owned()], &body);
    assert_eq!(reply.code, 250, "{}", reply.text);
    c.expect("QUIT", 221);
}

#[test]
fn a_transactional_message_overtakes_a_bulk_backlog_on_a_throttled_site() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sink, mut epoxi) = throttled(dir.path());
    let started = Instant::now();
    let injected = Inject::new(BULK_BACKLOG)
        .connections(8)
        .size(400)
        .domains(1)
        .header("X-Priority-Class: bulk")
        .run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), BULK_BACKLOG);
    let took = started.elapsed();
    let bulk_before = log_lines(&epoxi, &["\"type\":\"Delivery\""]);
    assert!(
        (bulk_before as u64) < BULK_BACKLOG / 2,
        "a backlog is queued: {bulk_before} of {BULK_BACKLOG} delivered already"
    );
    let sent = Instant::now();
    send(
        epoxi.port,
        "urgent@d0.test",
        &["X-Priority-Class: Transactional"],
    );
    wait_until(
        "the transactional message delivered",
        OVERTAKE_WITHIN,
        || {
            std::thread::sleep(Duration::from_millis(200));
            deliveries(&epoxi, "\"recipient\":\"urgent@d0.test\"") == 1
        },
    );
    let overtook = sent.elapsed();
    // Bulk keeps going meanwhile and after: slowed, never stopped.
    let bulk_at = log_lines(&epoxi, &["\"type\":\"Delivery\""]);
    wait_until("bulk delivered after it", Duration::from_secs(10), || {
        std::thread::sleep(Duration::from_millis(200));
        log_lines(&epoxi, &["\"type\":\"Delivery\""]) > bulk_at + 20
    });
    let summary = cli(&epoxi, &["queue", "summary", "--json"]);
    let waiting = summary["sites"][0]["ready"].as_u64().unwrap_or(0);
    eprintln!(
        "{BULK_BACKLOG} bulk queued in {:.1} s; transactional delivered {:.2} s after \
         acceptance, {waiting} bulk still waiting",
        took.as_secs_f64(),
        overtook.as_secs_f64()
    );
    assert!(
        waiting > BULK_BACKLOG / 2,
        "the backlog was still there: {summary}"
    );
    epoxi.stop();
    let report = sink.stop();
    assert_eq!(report.count("duplicates"), 0);
    assert_eq!(
        report.count("connections_max_concurrent"),
        1,
        "{}",
        report.json
    );
}

#[test]
fn one_tenants_backlog_does_not_hold_up_another_tenants_mail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sink, mut epoxi) = throttled(dir.path());
    let backlog = 3_000u64;
    let a = Inject::new(backlog)
        .connections(4)
        .size(400)
        .domains(1)
        .header("X-Tenant: alpha")
        .run(dir.path(), epoxi.port);
    assert_eq!(a.count("accepted"), backlog);
    let mut c = Smtp::connect(epoxi.port);
    assert_eq!(c.reply().code, 220);
    c.expect("EHLO client.test", 250);
    for i in 0..20 {
        let body = format!("X-Tenant: beta\r\nSubject: b{i}\r\n\r\nhello\r\n");
        let reply = c.send_message("s@client.test", &[format!("beta{i}@d0.test")], &body);
        assert_eq!(reply.code, 250, "{}", reply.text);
    }
    c.expect("QUIT", 221);
    let sent = Instant::now();
    wait_until("beta's 20 delivered", Duration::from_secs(20), || {
        std::thread::sleep(Duration::from_millis(200));
        deliveries(&epoxi, "\"recipient\":\"beta") == 20
    });
    let alpha_done = deliveries(&epoxi, "\"recipient\":\"user");
    eprintln!(
        "beta's 20 delivered in {:.2} s, with {alpha_done} of alpha's {backlog} delivered",
        sent.elapsed().as_secs_f64()
    );
    assert!(
        (alpha_done as u64) < backlog / 2,
        "beta's mail did not wait for alpha's backlog: {alpha_done} of alpha's delivered"
    );
    epoxi.stop();
    assert_eq!(sink.stop().count("duplicates"), 0);
}

#[test]
fn a_campaign_suspension_holds_that_campaign_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]);
    let mut epoxi = Epoxi::start(&Opts::new(dir.path()).shards(2).route(sink.port));
    let held = cli(
        &epoxi,
        &["suspend", "--campaign", "spring-sale", "--duration", "1h"],
    );
    assert!(held.get("error").is_none(), "{held}");
    for i in 0..3 {
        send(
            epoxi.port,
            &format!("s{i}@d{i}.test"),
            &["X-Campaign: spring-sale"],
        );
        send(
            epoxi.port,
            &format!("f{i}@d{i}.test"),
            &["X-Campaign: fall"],
        );
    }
    send(epoxi.port, "none@d0.test", &[]);
    wait_until("the others delivered", common::DEADLINE, || {
        deliveries(&epoxi, "\"type\":\"Delivery\"") == 4
    });
    let inspect = cli(&epoxi, &["queue", "inspect", "--campaign", "spring-sale"]);
    let listed = inspect["messages"].as_array().cloned().unwrap_or_default();
    assert_eq!(listed.len(), 3, "{inspect}");
    assert!(
        listed.iter().all(|m| m["campaign"] == "spring-sale"),
        "{inspect}"
    );
    let summary = cli(&epoxi, &["queue", "summary", "--json"]);
    let row = summary["campaigns"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["campaign"] == "spring-sale"))
        .cloned()
        .unwrap_or_else(|| panic!("a spring-sale row: {summary}"));
    assert_eq!(row["scheduled"], 3, "{summary}");
    assert_eq!(
        deliveries(&epoxi, "\"recipient\":\"s"),
        0,
        "nothing of the campaign was tried"
    );
    let resumed = cli(&epoxi, &["resume", "--campaign", "spring-sale"]);
    assert_eq!(resumed["released"], 3, "{resumed}");
    wait_until("the campaign delivered", common::DEADLINE, || {
        deliveries(&epoxi, "\"type\":\"Delivery\"") == 7
    });
    epoxi.stop();
    let report = sink.stop();
    assert_eq!(
        (report.count("received"), report.count("duplicates")),
        (7, 0)
    );
    assert_eq!(report.rcpt_lines.len(), 7, "{:?}", report.rcpt_lines);
}

#[test]
fn stripped_headers_leave_with_the_message_and_stay_in_the_spool() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let port = dead_port();
    let _downstream = Aiosmtpd::start(port, &store);
    let mut epoxi = Epoxi::start(&Opts::new(dir.path()).route(port).set(
        "egress",
        "strip_headers",
        "true",
    ));
    cli(&epoxi, &["suspend", "--tenant", "acme", "--duration", "1h"]);
    let fields = [
        "X-Tenant: acme",
        "X-Campaign: spring\r\n  sale",
        "x-priority-class: bulk",
    ];
    send(epoxi.port, "a@d0.test", &fields);
    // Held: the spool has the message as it came, tag headers and all.
    wait_until("the message spooled", common::DEADLINE, || {
        let spooled: Vec<u8> = epoxi
            .segments()
            .iter()
            .flat_map(|s| std::fs::read(s).unwrap_or_default())
            .collect();
        fields
            .iter()
            .all(|f| common::find(&spooled, f.as_bytes()).is_some())
    });
    let inspect = cli(&epoxi, &["queue", "inspect", "--tenant", "acme"]);
    // Unfolded as RFC 5322 says: the line break goes, the spaces stay.
    assert_eq!(
        inspect["messages"][0]["campaign"], "spring  sale",
        "{inspect}"
    );
    assert_eq!(inspect["messages"][0]["priority"], "bulk", "{inspect}");
    cli(&epoxi, &["resume", "--tenant", "acme"]);
    let eml = store.join("1.eml");
    wait_until("the message delivered", common::DEADLINE, || eml.exists());
    let got = std::fs::read(&eml).expect("delivered message");
    let text = String::from_utf8_lossy(&got);
    let (head, body) = text.split_once("\r\n\r\n").expect("a header block");
    for name in ["x-tenant:", "x-campaign:", "x-priority-class:", "  sale"] {
        assert!(
            !head.to_ascii_lowercase().contains(name),
            "{name} left in:\n{head}"
        );
    }
    assert!(
        head.contains("\r\nSubject: a@d0.test"),
        "the rest stays:\n{head}"
    );
    assert!(head.starts_with("Received: "), "{head}");
    assert_eq!(body, "hello\r\n");
    // SIZE declared what was sent.
    let opts = std::fs::read_to_string(store.join("1.opts")).expect("MAIL parameters");
    assert!(
        opts.split_whitespace()
            .any(|o| o == format!("SIZE={}", got.len())),
        "MAIL said {opts:?} for {} bytes",
        got.len()
    );
    epoxi.stop();
}
