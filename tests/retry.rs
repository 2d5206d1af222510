//! Delivery outcomes: temporary failures are retried until they succeed or the message is too
//! old, permanent failures bounce, and finished messages do not come back after a restart.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{field_set, Epoxi, Inject, Opts, Sink, DEADLINE};
use serde_json::Value;

/// Events grouped by message id, in log order.
fn by_message(events: &[Value]) -> BTreeMap<String, Vec<&Value>> {
    let mut map: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for e in events {
        let id = e["message_id"].as_str().expect("message_id").to_owned();
        map.entry(id).or_default().push(e);
    }
    map
}

#[test]
fn retry_4xx_then_2xx() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &["--tempfail-first", "5"]);
    let epoxi = Epoxi::start(&Opts::new(dir.path()).shards(2).route(sink.port));

    let injected = Inject::new(20).domains(4).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 20, "inject: {}", injected.json);

    let deliveries = epoxi.wait_events("Delivery", 20);
    let report = sink.stop();
    assert_eq!(report.count("unique"), 20, "sink: {}", report.json);
    assert_eq!(report.count("duplicates"), 0, "sink: {}", report.json);
    assert_eq!(report.count("tempfailed"), 5, "sink: {}", report.json);
    assert_eq!(
        injected.ids.iter().collect::<BTreeSet<_>>(),
        report.ids.iter().collect::<BTreeSet<_>>()
    );

    let events = epoxi.events();
    let failures: Vec<Value> = events
        .iter()
        .filter(|e| e["type"] == "TransientFailure")
        .cloned()
        .collect();
    assert_eq!(
        failures.len(),
        5,
        "one per tempfailed delivery: {failures:?}"
    );
    assert_eq!(deliveries.len(), 20);
    assert_eq!(field_set(&deliveries, "message_id").len(), 20);
    let delivered = by_message(&deliveries);
    for (id, fails) in by_message(&failures) {
        for f in &fails {
            assert_eq!(f["response"]["code"], 451, "{f}");
            let next = f["next_attempt_ms"].as_u64().expect("next_attempt_ms");
            assert!(next > f["ts_ms"].as_u64().expect("ts_ms"), "{f}");
        }
        let d = delivered
            .get(&id)
            .unwrap_or_else(|| panic!("{id} retried, never delivered"));
        assert_eq!(d.len(), 1);
        let d = d[0];
        assert!(d["attempts"].as_u64().expect("attempts") >= 2, "{d}");
        let last_failure = fails.iter().filter_map(|f| f["ts_ms"].as_u64()).max();
        assert!(
            d["ts_ms"].as_u64() >= last_failure,
            "delivered before it failed: {d}"
        );
    }
}

#[test]
fn bounce_5xx() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &["--reply", "550:100"]);
    let opts = Opts::new(dir.path()).shards(2).route(sink.port);
    let mut epoxi = Epoxi::start(&opts);

    let injected = Inject::new(10).domains(4).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 10, "inject: {}", injected.json);

    // Each bounce also sends a notice (DSN) to the sender, which this sink refuses too: the
    // notice comes from the null sender, so it bounces without a notice about the notice.
    let all = epoxi.wait_events("Bounce", 20);
    // Each real sender's bounce is decided with its notice: a Notice line, with the notice's
    // id, written once the notice is spooled.
    epoxi.wait_events("Notice", 10);
    epoxi.stop();
    // What proves that no notice about a notice was decided, without waiting to see: such a
    // decision comes with a notice's bounce, and its Notice line is written before that
    // bounce's record (a failure is recorded only once its notice is spooled). After a clean
    // stop the event log holds every line written, so either the line is here, or the record
    // was never written and the restart below finds the notice still pending; it finds none.
    let all_now = epoxi.events_of("Bounce");
    assert_eq!(all_now.len(), 20, "no notice about a notice: {all:?}");
    let (bounces, notices): (Vec<_>, Vec<_>) = all_now.into_iter().partition(|b| b["sender"] != "");
    assert_eq!(notices.len(), 10);
    assert!(
        notices
            .iter()
            .all(|n| n["recipient"] == "loadgen@loadgen.test"),
        "{notices:?}"
    );
    assert_eq!(bounces.len(), 10);
    assert_eq!(field_set(&bounces, "message_id").len(), 10);
    for b in &bounces {
        assert_eq!(b["response"]["code"], 550, "{b}");
        assert_eq!(b["response"]["enhanced"], "5.1.1", "{b}");
        assert_eq!(b["attempts"], 1, "a 5xx is not retried: {b}");
    }
    let decisions = epoxi.events_of("Notice");
    assert!(
        decisions.iter().all(|d| d["sender"] != ""),
        "a notice about a notice: {decisions:?}"
    );
    assert_eq!(
        field_set(&decisions, "message_id"),
        field_set(&bounces, "message_id"),
        "one notice decision per bounced message: {decisions:?}"
    );
    assert_eq!(decisions.len(), 10, "{decisions:?}");
    // And the notices decided are the ones that bounced, each with its own line's id.
    assert_eq!(
        field_set(&decisions, "notice_id"),
        field_set(&notices, "message_id"),
        "{decisions:?}"
    );
    assert!(epoxi.events_of("Delivery").is_empty());
    assert!(epoxi.events_of("TransientFailure").is_empty());
    let report = sink.stop();
    assert_eq!(
        report.count("rejected"),
        20,
        "each message and each notice refused once: {}",
        report.json
    );
    assert_eq!(report.count("unique"), 0);

    // Bounced is final: nothing comes back from the spool, and the segments that held the
    // messages are deleted (the one being written is kept until a restart rotates it).
    let first_segments = epoxi.segments();
    assert!(!first_segments.is_empty());
    let mut again = Epoxi::start(&opts.log_dir(dir.path().join("log2")));
    let recovery = again.recovery();
    assert_eq!(recovery.len(), 2, "{}", again.stderr());
    assert_eq!(again.pending_at_start(), 0, "{}", again.stderr());
    common::wait_until(
        "the bounced messages' segments to be deleted",
        DEADLINE,
        || first_segments.iter().all(|p| !p.exists()),
    );
    assert!(again.events().is_empty(), "nothing to do after the restart");
    again.stop();
}

#[test]
fn expire_after_max_age() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &["--reply", "451:100"]);
    let opts = Opts::new(dir.path())
        .route(sink.port)
        .set("queue", "max_age_s", "2");
    let epoxi = Epoxi::start(&opts);

    let injected = Inject::new(5).domains(2).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 5, "inject: {}", injected.json);

    let expirations = epoxi.wait_events("Expiration", 5);
    assert_eq!(
        field_set(&expirations, "message_id").len(),
        5,
        "{expirations:?}"
    );
    for e in &expirations {
        assert!(
            e["attempts"].as_u64().expect("attempts") >= 2,
            "expired untried: {e}"
        );
        assert_eq!(e["response"]["code"], 451, "{e}");
        let age = e["ts_ms"].as_u64().expect("ts") - e["received_ms"].as_u64().expect("rcvd");
        assert!(age >= 2000, "expired after {age} ms, max age is 2 s: {e}");
    }
    assert!(epoxi.events_of("Delivery").is_empty());
    assert!(!epoxi.events_of("TransientFailure").is_empty());
    let report = sink.stop();
    assert_eq!(report.count("unique"), 0);
}

#[test]
fn unresolvable_domain_defers_then_expires() {
    let dir = tempfile::tempdir().expect("tempdir");
    // No route, and the resolver (the harness's default, a dead loopback port) never answers:
    // mail waits, then expires.
    let opts = Opts::new(dir.path())
        .set("queue", "max_age_s", "1")
        .set("dns", "timeout_ms", "200");
    let epoxi = Epoxi::start(&opts);
    let injected = Inject::new(3).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 3, "inject: {}", injected.json);
    let expirations = epoxi.wait_events("Expiration", 3);
    assert_eq!(field_set(&expirations, "message_id").len(), 3);
    for e in epoxi
        .events_of("TransientFailure")
        .iter()
        .chain(&expirations)
    {
        assert_eq!(e["response"]["code"], 451, "{e}");
        let text = e["response"]["text"].as_str().expect("text");
        assert_eq!(e["response"]["enhanced"], "4.4.3", "{e}");
        assert!(
            text.contains("MX lookup for ") && text.contains("failed"),
            "{e}"
        );
    }
    assert!(epoxi.events_of("Delivery").is_empty());
}

/// RFC 5321 §4.5.3.2 timeouts per phase: a server that sits on the final dot longer than
/// `final_dot_timeout_ms` is a transient failure; the message stays queued for a retry.
#[test]
fn final_dot_timeout_is_a_transient_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &["--delay-ms", "1500"]);
    let mut epoxi = Epoxi::start(&Opts::new(dir.path()).route(sink.port).set(
        "delivery",
        "final_dot_timeout_ms",
        "500",
    ));
    let injected = Inject::new(1).domains(1).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 1);
    let failures = epoxi.wait_events("TransientFailure", 1);
    let text = failures[0]["response"]["text"].as_str().unwrap_or_default();
    assert!(text.contains("timed out"), "{}", failures[0]);
    epoxi.stop();
    // The sink did accept it (slowly): SMTP's known duplicate window; what matters here is
    // that the wait was bounded by the final-dot timeout and the message stayed queued.
    let report = sink.stop();
    assert!(report.count("received") >= 1, "{}", report.json);
}

/// `[[retry]]` rules by category under a shortened clock: a rate-limited recipient is retried
/// on its rule's first delay (jitter within its band), a full mailbox bounces at once where a
/// rule says so, and anything else keeps `[queue]`'s minute.
#[test]
fn retry_rules_by_category_set_the_delay_or_bounce_early() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &["--smart"]);
    let mut opts = Opts::new(dir.path())
        .route(sink.port)
        .set("queue", "retry_base_ms", "60000")
        .set("queue", "retry_cap_ms", "60000")
        .set("queue", "retry_jitter", "0.1");
    opts.conf.raw.push_str(
        "[[retry]]\ncategory = [\"RateLimited\"]\nfirst_ms = 400\n\
         [[retry]]\ncategory = [\"QuotaIssues\"]\nbounce = true\n",
    );
    let epoxi = Epoxi::start(&opts);
    let mut c = common::Smtp::connect(epoxi.port);
    c.reply();
    c.expect("EHLO client.test", 250);
    for rcpt in ["ratelimit@r.test", "quota@q.test", "tempfail@t.test"] {
        let reply = c.send_message(
            "s@client.test",
            &[rcpt.to_owned()],
            &common::message_body(rcpt, &[]),
        );
        assert_eq!(reply.code, 250, "{}", reply.text);
    }
    c.expect("QUIT", 221);
    // Two TransientFailures for the rate-limited one (its retry comes in 400 ms), one for
    // tempfail@, and a Bounce for quota@ on its first (4xx) attempt.
    epoxi.wait_events("TransientFailure", 3);
    let bounce = epoxi.wait_events("Bounce", 1);
    assert_eq!(bounce[0]["recipient"], "quota@q.test");
    assert_eq!(bounce[0]["response"]["code"], 452);
    assert_eq!(bounce[0]["attempts"], 1);
    assert_eq!(bounce[0]["bounce_category"], "QuotaIssues");
    let failures = epoxi.events_of("TransientFailure");
    let delay =
        |e: &Value| e["next_attempt_ms"].as_u64().expect("next") - e["ts_ms"].as_u64().expect("ts");
    let limited: Vec<&Value> = failures
        .iter()
        .filter(|e| e["recipient"] == "ratelimit@r.test")
        .collect();
    assert!(
        limited.len() >= 2,
        "retried on its rule's delay: {failures:?}"
    );
    assert!((360..=440).contains(&delay(limited[0])), "{}", limited[0]);
    assert_eq!(limited[0]["bounce_category"], "RateLimited");
    let other = failures
        .iter()
        .find(|e| e["recipient"] == "tempfail@t.test")
        .expect("tempfail@ deferred");
    assert!((54_000..=66_000).contains(&delay(other)), "{other}");
    drop(epoxi);
    sink.stop();
}
