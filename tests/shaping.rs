//! Traffic shaping against a real sink: message rates and connection rates held, counted
//! where the mail arrives.

mod common;

use std::time::{Duration, Instant};

use common::{Epoxi, Inject, Opts, Sink};

/// The most messages the sink accepted from 127.0.0.1 in one second of its clock.
fn max_per_s(report: &common::SinkReport) -> u64 {
    report.json["per_ip"]["127.0.0.1"]["max_per_s"]
        .as_u64()
        .unwrap_or_else(|| panic!("no per-IP stats: {}", report.json))
}

#[test]
fn a_message_rate_is_held_at_the_sink_across_shards() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &["--stats-per-ip"]);
    // 10/s with a burst of 1 (the default for 10/s): every message a tenth of a second apart,
    // whichever of the two shards holds it.
    let mut epoxi = Epoxi::start(&Opts::new(dir.path()).shards(2).route(sink.port).set(
        "shaping",
        "message_rate",
        "\"10/s\"",
    ));
    let injected = Inject::new(60).connections(4).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 60, "{}", injected.json);
    let started = Instant::now();
    let delivered = epoxi.wait_events_within("Delivery", 60, Duration::from_secs(40));
    let took = started.elapsed();
    assert_eq!(delivered.len(), 60);
    epoxi.stop();
    let report = sink.stop();
    assert_eq!(report.count("unique"), 60, "{}", report.json);
    assert_eq!(report.count("duplicates"), 0, "{}", report.json);
    // 10 per second, and one more where a delivery crosses the sink's second boundary.
    let most = max_per_s(&report);
    eprintln!("60 messages at 10/s: {took:?}, at most {most} in one second at the sink");
    assert!(most <= 11, "{most} in one second: {}", report.json);
    // 60 messages at 10/s take at least 5.9 s (the first goes at once).
    assert!(took >= Duration::from_millis(5_000), "{took:?}");
}

#[test]
fn without_rates_the_same_mail_goes_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &["--stats-per-ip"]);
    let mut epoxi = Epoxi::start(&Opts::new(dir.path()).shards(2).route(sink.port));
    let injected = Inject::new(60).connections(4).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 60, "{}", injected.json);
    epoxi.wait_events_within("Delivery", 60, Duration::from_secs(20));
    epoxi.stop();
    let report = sink.stop();
    // The control for the test above: the sink can count more than 11 in a second.
    assert!(max_per_s(&report) > 11, "{}", report.json);
}

#[test]
fn a_connection_rate_spaces_new_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]);
    // One message per connection, two connections per second at most.
    let mut epoxi = Epoxi::start(
        &Opts::new(dir.path())
            .shards(2)
            .route(sink.port)
            .set("delivery", "messages_per_connection_max", "1")
            .set("shaping", "connection_rate", "\"2/s\""),
    );
    let injected = Inject::new(10).connections(2).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 10, "{}", injected.json);
    let started = Instant::now();
    let delivered = epoxi.wait_events_within("Delivery", 10, Duration::from_secs(30));
    let took = started.elapsed();
    assert_eq!(delivered.len(), 10);
    epoxi.stop();
    let report = sink.stop();
    assert_eq!(report.count("unique"), 10, "{}", report.json);
    // Ten connections at 2/s (a burst of 1): at least 4.5 s from the first to the last.
    eprintln!("10 connections at 2/s: {took:?}");
    assert!(took >= Duration::from_millis(4_000), "{took:?}");
}

fn cli(epoxi: &Epoxi, args: &[&str]) -> serde_json::Value {
    let mut all: Vec<std::ffi::OsString> = args.iter().map(|a| a.into()).collect();
    all.push("--spool".into());
    all.push(epoxi.spool.clone().into());
    let ran = common::run_epoxi(&all);
    serde_json::from_str(&ran.stdout).unwrap_or_else(|e| panic!("{args:?} ({e}): {ran:?}"))
}

/// The sink throttles like Gmail (451 4.7.1 past 5 messages a second); a rule suspends the
/// (site, source) after 3 such replies in 10 s for 3 s. The action is logged, shows in the
/// summary, holds the mail (no attempts while it lasts), is lifted on time, and every message
/// is delivered once in the end.
#[test]
fn an_adaptive_rule_suspends_a_throttling_site_and_lifts_after_its_duration() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &["--limit-msgs-per-sec", "5"]);
    let mut opts = Opts::new(dir.path())
        .shards(2)
        .route(sink.port)
        .set("queue", "retry_first_ms", "300")
        .set("queue", "retry_base_ms", "300")
        .set("queue", "retry_factor", "1.0");
    opts.conf.raw.push_str(
        "[[adaptive]]\nname = \"rate-limited\"\nregex = \"^451 4\\\\.7\\\\.1 \"\n\
         threshold = \"3/10s\"\naction = \"suspend\"\nduration = \"3s\"\n",
    );
    let mut epoxi = Epoxi::start(&opts);
    let injected = Inject::new(40).connections(4).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 40, "{}", injected.json);
    let actions = epoxi.wait_events_within("ShapingAction", 1, Duration::from_secs(20));
    let action = &actions[0];
    assert_eq!(action["rule"], "rate-limited", "{action}");
    assert_eq!(action["action"], "suspend", "{action}");
    let started = action["ts_ms"].as_u64().expect("ts");
    let until = action["until_ms"].as_u64().expect("until");
    assert!((2_900..=3_100).contains(&(until - started)), "{action}");
    // Visible while it lasts.
    let summary = cli(&epoxi, &["queue", "summary", "--json"]);
    let rows = summary["suspensions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        rows.iter().any(|r| r["kind"] == "adaptive suspend"),
        "{summary}"
    );
    let lifted = epoxi.wait_events_within("ShapingLifted", 1, Duration::from_secs(10));
    let lifted_at = lifted[0]["ts_ms"].as_u64().expect("ts");
    assert!(
        lifted_at >= until && lifted_at < until + 1_500,
        "{}",
        lifted[0]
    );
    let delivered = epoxi.wait_events_within("Delivery", 40, Duration::from_secs(60));
    assert_eq!(delivered.len(), 40);
    let events = epoxi.events();
    epoxi.stop();
    let report = sink.stop();
    assert_eq!(report.count("unique"), 40, "{}", report.json);
    assert_eq!(report.count("duplicates"), 0, "{}", report.json);
    assert!(report.count("throttled_messages") >= 3, "{}", report.json);
    // While suspended, nothing was attempted beyond what connections already carried (a
    // message in flight and one pipelined behind it, per connection).
    let during = events
        .iter()
        .filter(|e| e["type"] == "Delivery" || e["type"] == "TransientFailure")
        .filter(|e| {
            e["ts_ms"]
                .as_u64()
                .is_some_and(|t| t > started + 500 && t < until)
        })
        .count();
    assert!(during <= 8, "{during} attempts while suspended");
}

/// A warming source (an "hour" of 1 s under a 24 s warmup day): at most 3 messages an hour
/// and 10 a day, counted at the sink by the source's address; progress shows in the summary.
#[test]
fn warmup_caps_hold_per_source_and_hour_and_day() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &["--stats-per-ip"]);
    let start_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let mut opts = Opts::new(dir.path()).shards(2).route(sink.port).http();
    opts.conf.raw.push_str(&format!(
        "[[warmup]]\nname = \"fast\"\nday_s = 24\n\
         [[warmup.stage]]\ndays = 10\ndaily = 10\nhourly = 3\n\
         [[source]]\nname = \"new\"\naddress = \"127.0.0.2\"\nwarmup = \"fast\"\nwarmup_start_ms = {start_ms}\n"
    ));
    let mut epoxi = Epoxi::start(&opts);
    let injected = Inject::new(30).connections(2).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 30, "{}", injected.json);
    // Ten in the first day: 3, 3, 3 and 1 over four 1-s hours; then nothing until day two.
    epoxi.wait_events_within("Delivery", 10, Duration::from_secs(15));
    std::thread::sleep(Duration::from_secs(3));
    let summary = cli(&epoxi, &["queue", "summary", "--json"]);
    let warmup = summary["warmup"].as_array().cloned().unwrap_or_default();
    assert!(
        warmup
            .iter()
            .any(|w| w["source"] == "new" && w["today"] == "10/10"),
        "{summary}"
    );
    // The dashboard shows the site as warming while its mail waits for the next day.
    let site = format!("[127.0.0.1:{}]", sink.port);
    let dash = common::http_get(&format!("{}/api/dashboard/v1", epoxi.http_url()), None).json();
    let row = dash["sites"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["site"] == site.as_str()).cloned())
        .unwrap_or_else(|| panic!("no row for {site}: {dash}"));
    assert_eq!(row["state"], "warming", "{row}");
    let delivered = epoxi.events_of("Delivery");
    epoxi.stop();
    let report = sink.stop();
    let new = &report.json["per_ip"]["127.0.0.2"];
    assert_eq!(delivered.len(), 10, "{}", report.json);
    assert_eq!(new["accepted"].as_u64(), Some(10), "{}", report.json);
    // Per warmup hour (1 s from the start): 3 credits, so 3 deliveries, give or take one
    // whose credit was taken at the end of an hour and whose reply came in the next.
    let mut per_hour: std::collections::BTreeMap<u64, u32> = Default::default();
    for e in &delivered {
        let ts = e["ts_ms"].as_u64().expect("ts");
        *per_hour
            .entry(ts.saturating_sub(start_ms) / 1000)
            .or_default() += 1;
    }
    assert!(per_hour.values().all(|&n| n <= 4), "{per_hour:?}");
    assert!(
        per_hour.len() >= 3,
        "10 messages at 3 an hour need four hours: {per_hour:?}"
    );
    // The sink's seconds straddle two warmup hours at most.
    assert!(
        new["max_per_s"].as_u64().unwrap_or(99) <= 6,
        "{}",
        report.json
    );
}

/// Traffic beyond a new source's cap goes through the pool's warmed source.
#[test]
fn traffic_beyond_a_warmup_cap_goes_to_the_warmed_sources() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &["--stats-per-ip"]);
    let start_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let mut opts = Opts::new(dir.path()).shards(2).route(sink.port);
    opts.conf.raw.push_str(&format!(
        "[[warmup]]\nname = \"slow\"\nday_s = 86400\n\
         [[warmup.stage]]\ndays = 30\ndaily = 5\n\
         [[source]]\nname = \"new\"\naddress = \"127.0.0.2\"\nwarmup = \"slow\"\nwarmup_start_ms = {start_ms}\n\
         [[source]]\nname = \"old\"\naddress = \"127.0.0.3\"\n"
    ));
    let mut epoxi = Epoxi::start(&opts);
    let injected = Inject::new(60).connections(2).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 60, "{}", injected.json);
    let delivered = epoxi.wait_events_within("Delivery", 60, Duration::from_secs(30));
    assert_eq!(delivered.len(), 60);
    epoxi.stop();
    let report = sink.stop();
    assert_eq!(report.count("unique"), 60, "{}", report.json);
    let new = report.json["per_ip"]["127.0.0.2"]["accepted"]
        .as_u64()
        .unwrap_or(0);
    let old = report.json["per_ip"]["127.0.0.3"]["accepted"]
        .as_u64()
        .unwrap_or(0);
    assert!(new <= 5, "the warming source sent {new}: {}", report.json);
    assert_eq!(new + old, 60, "{}", report.json);
}

/// A tenant's rate holds its own mail only: `slow` (5/s) trickles while `fast`, queued to the
/// same site behind it, goes at once.
#[test]
fn a_tenant_rate_holds_that_tenant_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]);
    let mut opts = Opts::new(dir.path()).shards(2).route(sink.port);
    opts.conf
        .raw
        .push_str("[[tenant]]\nname = \"slow\"\nmessage_rate = \"5/s burst 1\"\n");
    let mut epoxi = Epoxi::start(&opts);
    let slow = Inject::new(30)
        .header("X-Tenant: slow")
        .run(dir.path(), epoxi.port);
    assert_eq!(slow.count("accepted"), 30, "{}", slow.json);
    let fast = Inject::new(30)
        .header("X-Tenant: fast")
        .run(dir.path(), epoxi.port);
    assert_eq!(fast.count("accepted"), 30, "{}", fast.json);
    let delivered = epoxi.wait_events_within("Delivery", 60, Duration::from_secs(30));
    epoxi.stop();
    let report = sink.stop();
    assert_eq!(report.count("unique"), 60, "{}", report.json);
    let times = |tenant: &str| -> Vec<u64> {
        let mut t: Vec<u64> = delivered
            .iter()
            .filter(|e| e["tenant"] == tenant)
            .filter_map(|e| e["ts_ms"].as_u64())
            .collect();
        t.sort_unstable();
        t
    };
    let (slow, fast) = (times("slow"), times("fast"));
    assert_eq!((slow.len(), fast.len()), (30, 30));
    // 30 at 5/s: about 6 s from the first to the last; never more than 6 in a second.
    let span = slow[29] - slow[0];
    assert!(span >= 5_000, "slow tenant's 30 took {span} ms");
    let most = slow
        .iter()
        .map(|&t| slow.iter().filter(|&&u| u >= t && u < t + 1000).count())
        .max()
        .unwrap_or(0);
    assert!(most <= 6, "{most} of the slow tenant in one second");
    // The fast tenant, injected after, is done long before the slow one.
    assert!(
        fast[29] + 2_000 < slow[29],
        "fast done at {}, slow at {}",
        fast[29],
        slow[29]
    );
}

/// The other adaptive actions, each triggered by the throttling sink (451 4.7.1 past 3
/// messages a second): a throttle slows the (site, source) to its rate while it lasts; a
/// tenant suspension holds that tenant's mail (and shows in the summary); a bounce fails the
/// site's queued mail for its duration.
fn adaptive_run(
    action: &str,
    extra: &str,
    tenant: Option<&str>,
) -> (Vec<serde_json::Value>, serde_json::Value) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &["--limit-msgs-per-sec", "3"]);
    let mut opts = Opts::new(dir.path())
        .shards(2)
        .route(sink.port)
        .set("queue", "retry_first_ms", "300")
        .set("queue", "retry_base_ms", "300")
        .set("queue", "retry_factor", "1.0");
    opts.conf.raw.push_str(&format!(
        "[[adaptive]]\nname = \"r\"\nregex = \"^451 4\\\\.7\\\\.1 \"\n\
         threshold = \"2/10s\"\naction = \"{action}\"\nduration = \"4s\"\n{extra}"
    ));
    let mut epoxi = Epoxi::start(&opts);
    let mut inject = Inject::new(30).connections(2);
    if let Some(t) = tenant {
        inject = inject.header(&format!("X-Tenant: {t}"));
    }
    let injected = inject.run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 30, "{}", injected.json);
    epoxi.wait_events_within("ShapingAction", 1, Duration::from_secs(20));
    let summary = cli(&epoxi, &["queue", "summary", "--json"]);
    epoxi.wait_events_within("ShapingLifted", 1, Duration::from_secs(15));
    let events = epoxi.events();
    epoxi.stop();
    sink.stop();
    (events, summary)
}

/// Delivery attempts (deliveries and deferrals) logged in `[from, until)`.
fn attempts_between(events: &[serde_json::Value], from: u64, until: u64) -> usize {
    events
        .iter()
        .filter(|e| e["type"] == "Delivery" || e["type"] == "TransientFailure")
        .filter(|e| e["ts_ms"].as_u64().is_some_and(|t| t >= from && t < until))
        .count()
}

#[test]
fn an_adaptive_throttle_slows_the_site_while_it_lasts() {
    let (events, _) = adaptive_run("throttle", "message_rate = \"1/s burst 1\"\n", None);
    let action = events
        .iter()
        .find(|e| e["type"] == "ShapingAction")
        .expect("action");
    assert_eq!(action["action"], "throttle", "{action}");
    assert!(
        action["detail"].as_str().unwrap_or("").contains("1/s"),
        "{action}"
    );
    let (from, until) = (
        action["ts_ms"].as_u64().expect("ts") + 1_000,
        action["until_ms"].as_u64().expect("until"),
    );
    // At 1/s for the 3 s after the first second (and the attempts already in flight).
    let attempts = attempts_between(&events, from, until);
    assert!(
        attempts <= 6,
        "{attempts} attempts in 3 s of a 1/s throttle"
    );
}

#[test]
fn an_adaptive_tenant_suspension_holds_that_tenant() {
    let (events, summary) = adaptive_run("suspend_tenant", "", Some("acme"));
    let action = events
        .iter()
        .find(|e| e["type"] == "ShapingAction")
        .expect("action");
    assert_eq!(action["target"], "acme", "{action}");
    let rows = summary["suspensions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        rows.iter()
            .any(|r| r["kind"] == "suspend" && r["selector"] == "tenant acme"),
        "{summary}"
    );
    let (from, until) = (
        action["ts_ms"].as_u64().expect("ts") + 500,
        action["until_ms"].as_u64().expect("until"),
    );
    let attempts = attempts_between(&events, from, until);
    assert!(
        attempts <= 4,
        "{attempts} attempts while the tenant was suspended"
    );
}

#[test]
fn an_adaptive_bounce_fails_the_sites_mail_for_its_duration() {
    let (events, _) = adaptive_run("bounce", "", None);
    let action = events
        .iter()
        .find(|e| e["type"] == "ShapingAction")
        .expect("action");
    assert_eq!(action["action"], "bounce", "{action}");
    let bounced = events
        .iter()
        .filter(|e| e["type"] == "Bounce")
        .filter(|e| {
            e["response"]["text"]
                .as_str()
                .is_some_and(|t| t.contains("adaptive rule r"))
        })
        .count();
    assert!(bounced > 0, "no bounce by the rule");
}

/// `epoxi check-config --site` prints the effective limits and the layer of each; a broken
/// shaping configuration gets every error, each with its table and key.
#[test]
fn check_config_prints_a_sites_effective_limits_and_every_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("epoxi.toml");
    std::fs::write(
        &config,
        "[[source]]\nname = \"ip1\"\n[[source]]\nname = \"ip2\"\n\
         [[site]]\nprovider = \"google\"\nsource = \"ip2\"\nmessage_rate = \"10/min\"\nconnections_max = 2\n\
         [[domain]]\nname = \"gmail.com\"\nsite_message_rate = \"1000/h\"\n",
    )
    .expect("write");
    let ran = common::run_epoxi(&[
        "check-config",
        "--config",
        config.to_str().expect("path"),
        "--site",
        "aspmx.l.google.com,alt1.aspmx.l.google.com",
        "--domain",
        "gmail.com",
        "--source",
        "ip2",
    ]);
    let out = &ran.stdout;
    assert!(out.contains("(provider google)"), "{ran:?}");
    let line = |key: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(key))
            .unwrap_or_else(|| panic!("no {key}: {out}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        line("connections_max"),
        "connections_max 2 site[0] provider google source ip2"
    );
    assert_eq!(
        line("message_rate"),
        "message_rate 10/min site[0] provider google source ip2"
    );
    assert_eq!(
        line("site_message_rate"),
        "site_message_rate 1000/h domain[0] gmail.com"
    );
    assert_eq!(
        line("messages_per_connection_max"),
        "messages_per_connection_max 100 built-in provider google"
    );
    std::fs::write(
        &config,
        "[[site]]\nmx = \"x\"\nmessage_rate = \"3/fortnight\"\n[shaping]\nmessage_rate = \"x\"\n",
    )
    .expect("write");
    let ran = common::run_epoxi(&["check-config", "--config", config.to_str().expect("path")]);
    assert!(ran.stderr.contains("`shaping[0].message_rate`"), "{ran:?}");
    assert!(ran.stderr.contains("`site[0].message_rate`"), "{ran:?}");
}
