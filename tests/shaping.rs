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
