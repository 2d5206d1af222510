//! A destination that is down is treated as one thing: after a few failed connections its
//! (site, source) goes into a backoff of its own, its messages wait without a connection
//! attempt each, one `SiteDown` and one `SiteUp` event mark the outage, a probe connection tests
//! it when the backoff ends, and nothing outlives its max age meanwhile.

mod common;

use std::time::Duration;

use common::{Epoxi, Inject, Opts, Sink};

/// The new-user settings (a retry every 2 s, no growth) with a short site backoff.
fn opts(dir: &std::path::Path, port: u16, site_failures_max: &str) -> Opts {
    Opts::new(dir)
        .shards(2)
        .route(port)
        .set("queue", "retry_base_ms", "2000")
        .set("queue", "retry_factor", "1.0")
        .set("queue", "retry_cap_ms", "2000")
        .set("delivery", "site_failures_max", site_failures_max)
        .set("delivery", "site_backoff_ms", "2000")
        .set("delivery", "site_backoff_cap_ms", "4000")
}

#[test]
fn a_site_greeting_421_goes_into_backoff_then_gets_everything_when_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 421 at the greeting for the first 10 s, then a working sink.
    let sink = Sink::start(dir.path(), &["--greet-421-secs", "10"]);
    let mut epoxi = Epoxi::start(&opts(dir.path(), sink.port, "3"));
    let injected = Inject::new(2_000)
        .connections(4)
        .run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 2_000, "{}", injected.json);

    let delivered = epoxi.wait_events_within("Delivery", 2_000, Duration::from_secs(60));
    assert_eq!(delivered.len(), 2_000);
    let events = epoxi.events();
    epoxi.stop();
    let report = sink.stop();
    assert_eq!(report.count("unique"), 2_000, "{}", report.json);
    assert_eq!(report.count("duplicates"), 0, "{}", report.json);

    // One site, one source: the outage is one SiteDown and one SiteUp.
    let down: Vec<_> = events.iter().filter(|e| e["type"] == "SiteDown").collect();
    let up: Vec<_> = events.iter().filter(|e| e["type"] == "SiteUp").collect();
    assert_eq!(down.len(), 1, "{down:?}");
    assert_eq!(up.len(), 1, "{up:?}");
    assert!(
        down[0]["why"].as_str().unwrap_or("").contains("421"),
        "{}",
        down[0]
    );
    assert!(down[0]["down_until_ms"].as_u64().is_some());
    // The connections the sink refused: the first burst (at most the destination's 16
    // connection permits, plus those already asked for), then one probe per backoff: 2 s,
    // then 4 s, so about three in the 10 s. A connection per retried message would be
    // hundreds (2,000 messages retried every 2 s).
    let refused = report.count("greeting_refused");
    assert!(refused >= 3, "{}", report.json);
    assert!(refused <= 30, "connections while down: {}", report.json);
    // And attempts: a message is tried when a connection fails with it ready, not at every
    // retry while the site is down (that would be 5 or more each over 10 s).
    let transient = events
        .iter()
        .filter(|e| e["type"] == "TransientFailure")
        .count();
    eprintln!("while down: {refused} connections refused, {transient} TransientFailure events");
    assert!(
        transient <= 2_000 * 4,
        "{transient} TransientFailure events for 2,000 messages"
    );
}

#[test]
fn messages_for_a_down_site_expire_on_time_without_attempts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &["--greet-421-secs", "120"]);
    let mut epoxi = Epoxi::start(&opts(dir.path(), sink.port, "2").set("queue", "max_age_s", "6"));
    let injected = Inject::new(200).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 200, "{}", injected.json);
    let expired = epoxi.wait_events_within("Expiration", 200, Duration::from_secs(40));
    let events = epoxi.events();
    epoxi.stop();
    let report = sink.stop();
    assert_eq!(report.count("unique"), 0);
    for e in &expired {
        let age = e["ts_ms"].as_u64().expect("ts") - e["received_ms"].as_u64().expect("rx");
        // On time: at the deadline, not at the end of a backoff or a retry after it.
        assert!((6_000..8_500).contains(&age), "expired at {age} ms: {e}");
    }
    assert_eq!(
        events.iter().filter(|e| e["type"] == "SiteDown").count(),
        1,
        "one outage"
    );
    assert!(
        report.count("greeting_refused") <= 30,
        "connections while down: {}",
        report.json
    );
}
