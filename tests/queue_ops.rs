//! Queue operations on a running server through the `epoxi` CLI and its admin socket:
//! suspend, resume, bounce, flush and rebind by domain, site and tenant; max age honoured
//! while suspended; a mass bounce of a large queue with its memory sampled.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{run_epoxi, wait_until, Epoxi, Inject, Opts, Sink, DEADLINE};
use serde_json::Value;

/// `epoxi ARGS --spool SPOOL`, its answer as JSON.
fn cli(epoxi: &Epoxi, args: &[&str]) -> Value {
    let mut all: Vec<std::ffi::OsString> = args.iter().map(|a| a.into()).collect();
    all.push("--spool".into());
    all.push(epoxi.spool.clone().into());
    let ran = run_epoxi(&all);
    serde_json::from_str(&ran.stdout).unwrap_or_else(|e| panic!("{args:?} ({e}): {ran:?}"))
}

/// Recipients the sink accepted, from its rcpts file.
fn delivered_domains(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .flat_map(|l| l.split_whitespace().skip(1))
        .filter_map(|r| r.rsplit_once('@').map(|(_, d)| d.to_owned()))
        .collect()
}

fn vm_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn opts(dir: &Path, port: u16) -> Opts {
    Opts::new(dir)
        .shards(2)
        .route(port)
        .set("queue", "retry_base_ms", "60000")
        .set("queue", "retry_cap_ms", "60000")
}

#[test]
fn suspend_holds_a_domain_resume_releases_it_and_summary_shows_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]);
    let mut epoxi = Epoxi::start(&opts(dir.path(), sink.port));
    let held = cli(
        &epoxi,
        &["suspend", "--domain", "d0.test", "--reason", "maintenance"],
    );
    assert!(held.get("error").is_none(), "{held}");
    let injected = Inject::new(40).domains(4).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 40);
    epoxi.wait_events_within("Delivery", 30, Duration::from_secs(30));
    let summary = cli(&epoxi, &["queue", "summary", "--json"]);
    let text = summary.to_string();
    assert!(
        text.contains("domain d0.test"),
        "the suspension is listed: {summary}"
    );
    assert!(text.contains("maintenance"), "{summary}");
    let inspect = cli(&epoxi, &["queue", "inspect", "--domain", "d0.test"]);
    assert_eq!(
        inspect["messages"].as_array().map(Vec::len),
        Some(10),
        "the ten held messages: {inspect}"
    );
    // Nothing was tried for d0 meanwhile.
    let tried_d0 = epoxi
        .events()
        .iter()
        .filter(|e| e["domain"] == "d0.test" && e["type"] != "Reception")
        .count();
    assert_eq!(tried_d0, 0);
    let resumed = cli(&epoxi, &["resume", "--domain", "d0.test"]);
    assert!(resumed.get("error").is_none(), "{resumed}");
    epoxi.wait_events_within("Delivery", 40, Duration::from_secs(30));
    let events = epoxi.events_of("Admin");
    assert!(events.iter().any(|e| e["op"] == "suspend"));
    assert!(events.iter().any(|e| e["op"] == "resume"));
    epoxi.stop();
    let report = sink.stop();
    assert_eq!(report.count("unique"), 40);
    assert_eq!(
        delivered_domains(&report.rcpt_lines)
            .iter()
            .filter(|d| *d == "d0.test")
            .count(),
        10
    );
}

#[test]
fn a_suspended_message_still_expires_at_its_max_age() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]);
    let mut epoxi = Epoxi::start(&opts(dir.path(), sink.port).set("queue", "max_age_s", "4"));
    cli(
        &epoxi,
        &["suspend", "--domain", "d0.test", "--duration", "1h"],
    );
    let injected = Inject::new(10).domains(1).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 10);
    let expired = epoxi.wait_events_within("Expiration", 10, Duration::from_secs(20));
    for e in &expired {
        let age = e["ts_ms"].as_u64().expect("ts") - e["received_ms"].as_u64().expect("rx");
        assert!((4_000..6_000).contains(&age), "expired after {age} ms: {e}");
        assert_eq!(e["bounce_category"], "MessageExpired", "{e}");
    }
    epoxi.stop();
    assert_eq!(sink.stop().count("unique"), 0);
}

#[test]
fn bounce_by_domain_and_flush_retries_now() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Every message is deferred once (retried in a minute unless flushed).
    let sink = Sink::start(dir.path(), &["--tempfail-first", "30"]);
    let mut epoxi = Epoxi::start(&opts(dir.path(), sink.port));
    let injected = Inject::new(30).domains(3).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 30);
    epoxi.wait_events_within("TransientFailure", 30, Duration::from_secs(30));
    let bounced = cli(
        &epoxi,
        &["bounce", "--domain", "d1.test", "--reason", "list cleanup"],
    );
    assert_eq!(bounced["bounced"], 10, "{bounced}");
    let flushed = cli(&epoxi, &["flush"]);
    assert_eq!(flushed["flushed"], 20, "{flushed}");
    epoxi.wait_events_within("Delivery", 20, Duration::from_secs(30));
    // A new message for d1 meets the directive; one for d2 goes.
    let again = Inject::new(2).domains(3).run(dir.path(), epoxi.port);
    assert_eq!(again.count("accepted"), 2);
    wait_until("bounced on arrival", DEADLINE, || {
        epoxi
            .events_of("Bounce")
            .iter()
            .filter(|e| e["domain"] == "d1.test")
            .count()
            >= 11
    });
    let events = epoxi.events();
    epoxi.stop();
    let bounces: Vec<&Value> = events.iter().filter(|e| e["type"] == "Bounce").collect();
    // Ten queued, and the new one on arrival.
    assert_eq!(bounces.len(), 11, "{bounces:?}");
    for b in &bounces {
        assert_eq!(b["response"]["code"], 550);
        assert!(b["response"]["text"]
            .as_str()
            .unwrap_or("")
            .contains("list cleanup"));
    }
    // An operator's bounce sends no notice unless asked (--notify).
    assert!(!events
        .iter()
        .any(|e| e["type"] == "Notice" && e["notice_id"].is_string()));
    let report = sink.stop();
    assert_eq!(report.count("duplicates"), 0);
    assert!(!delivered_domains(&report.rcpt_lines)
        .iter()
        .any(|d| d == "d1.test"));
}

#[test]
fn a_mass_bounce_streams_through_a_large_queue_with_flat_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]);
    let mut epoxi = Epoxi::start(&opts(dir.path(), sink.port));
    cli(&epoxi, &["suspend", "--domain", "d0.test"]);
    let n = 20_000u64;
    let injected = Inject::new(n)
        .domains(1)
        .connections(32)
        .run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), n);
    let pid = epoxi.pid();
    let before = vm_rss_kb(pid);
    let started = Instant::now();
    let mut peak = before;
    let bounce = {
        let spool = epoxi.spool.clone();
        std::thread::spawn(move || {
            run_epoxi(&[
                "bounce".as_ref(),
                "--domain".as_ref(),
                "d0.test".as_ref(),
                "--spool".as_ref(),
                spool.as_os_str(),
            ])
        })
    };
    while !bounce.is_finished() {
        peak = peak.max(vm_rss_kb(pid));
        std::thread::sleep(Duration::from_millis(20));
    }
    let ran = bounce.join().expect("bounce thread");
    let took = started.elapsed();
    let answer: Value = serde_json::from_str(&ran.stdout).expect("bounce answer");
    assert_eq!(answer["bounced"], n, "{answer}");
    eprintln!(
        "mass bounce of {n}: {:.2} s, RSS {} MB before, {} MB peak (+{} MB)",
        took.as_secs_f64(),
        before / 1024,
        peak / 1024,
        peak.saturating_sub(before) / 1024
    );
    assert!(
        peak.saturating_sub(before) < 64 * 1024,
        "RSS grew by {} kB",
        peak - before
    );
    let summary = cli(&epoxi, &["queue", "summary", "--json"]);
    assert_eq!(summary["messages"], 0, "{summary}");
    epoxi.stop();
    assert_eq!(sink.stop().count("unique"), 0);
}

#[test]
fn rebind_sends_a_domain_through_another_pool_and_site_selectors_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]);
    let mut o = opts(dir.path(), sink.port);
    o.conf.raw.push_str(
        "[egress]\ndefault_pool = \"main\"\n\
         [[source]]\nname = \"a\"\naddress = \"127.0.0.1\"\nehlo = \"a.epoxi.test\"\n\
         [[source]]\nname = \"b\"\naddress = \"127.0.0.9\"\nehlo = \"b.epoxi.test\"\n\
         [[pool]]\nname = \"main\"\nsources = [\"a\"]\n\
         [[pool]]\nname = \"other\"\nsources = [\"b\"]\n",
    );
    let mut epoxi = Epoxi::start(&o);
    let missing = cli(&epoxi, &["rebind", "--domain", "d0.test", "--pool", "nope"]);
    assert!(missing.to_string().contains("no egress pool"), "{missing}");
    let rebound = cli(
        &epoxi,
        &["rebind", "--domain", "d0.test", "--pool", "other"],
    );
    assert!(rebound.get("error").is_none(), "{rebound}");
    // The site of the static route, by its key: suspend, then flush by site.
    let site = format!("[127.0.0.1:{}]", sink.port);
    cli(&epoxi, &["suspend", "--site", &site, "--duration", "1h"]);
    let injected = Inject::new(10).domains(2).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 10);
    wait_until("held by the site suspension", DEADLINE, || {
        let s = cli(&epoxi, &["queue", "inspect", "--site", &site]);
        s["messages"].as_array().map_or(0, Vec::len) == 10
    });
    assert!(epoxi.events_of("Delivery").is_empty());
    cli(&epoxi, &["resume", "--site", &site]);
    epoxi.wait_events_within("Delivery", 10, Duration::from_secs(30));
    epoxi.stop();
    let report = sink.stop();
    assert_eq!(report.count("unique"), 10);
    // d0's five went out through pool `other` (EHLO b), d1's through `main` (EHLO a).
    assert_eq!(report.json["helos"]["b.epoxi.test"], 5, "{}", report.json);
    assert_eq!(report.json["helos"]["a.epoxi.test"], 5, "{}", report.json);
}

#[test]
fn suspend_and_bounce_by_tenant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]);
    let mut epoxi = Epoxi::start(&opts(dir.path(), sink.port));
    cli(&epoxi, &["suspend", "--tenant", "acme", "--duration", "1h"]);
    let send = |tenant: &str, n: usize| {
        let mut c = common::Smtp::connect(epoxi.port);
        c.reply();
        c.expect("EHLO client.test", 250);
        for i in 0..n {
            let id = format!("{tenant}-{i}");
            let body = format!("X-Tenant: {tenant}\r\n{}", common::message_body(&id, &[]));
            let reply = c.send_message("s@client.test", &[format!("u{i}@d0.test")], &body);
            assert_eq!(reply.code, 250, "{}", reply.text);
        }
        c.expect("QUIT", 221);
    };
    send("acme", 3);
    send("other", 3);
    epoxi.wait_events_within("Delivery", 3, Duration::from_secs(30));
    let summary = cli(&epoxi, &["queue", "summary", "--json"]);
    let acme = summary["tenants"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["tenant"] == "acme"))
        .cloned()
        .unwrap_or_else(|| panic!("acme row: {summary}"));
    assert_eq!(acme["scheduled"], 3, "{summary}");
    let bounced = cli(&epoxi, &["bounce", "--tenant", "acme"]);
    assert_eq!(bounced["bounced"], 3, "{bounced}");
    epoxi.stop();
    let report = sink.stop();
    assert_eq!(report.count("unique"), 3);
    assert!(
        report.ids.iter().all(|id| id.starts_with("other-")),
        "{:?}",
        report.ids
    );
}
