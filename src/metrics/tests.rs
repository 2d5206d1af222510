use super::*;
use crate::envelope::ReceptionId;
use crate::events::{Attempt, Response};

/// One sample of the exposition: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// A strict reader of the text format (0.0.4) as this module writes it: every family has
/// HELP then TYPE before its samples, sample names belong to the family declared last
/// (summaries add `_sum` and `_count`), labels are `k="v"` with escapes, values parse as f64,
/// and no series appears twice.
fn parse(text: &str) -> Vec<Sample> {
    let mut out: Vec<Sample> = Vec::new();
    let mut family: Option<(String, String)> = None;
    let mut help: Option<String> = None;
    let mut seen = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, _) = rest.split_once(' ').expect("HELP has text");
            help = Some(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE has a kind");
            assert_eq!(help.as_deref(), Some(name), "HELP before TYPE for {name}");
            assert!(["counter", "gauge", "summary"].contains(&kind), "{kind}");
            assert!(name.starts_with("epoxi_"), "{name}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "counter {name} ends in _total");
            }
            family = Some((name.to_string(), kind.to_string()));
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.is_empty(),
            "stray line {line:?}"
        );
        let (fam, kind) = family.clone().expect("a sample after its TYPE");
        let name_end = line.find(['{', ' ']).expect("name");
        let name = &line[..name_end];
        let ok = name == fam
            || (kind == "summary"
                && (name == format!("{fam}_sum") || name == format!("{fam}_count")));
        assert!(ok, "sample {name} in family {fam}");
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(r) = rest.strip_prefix('{') {
            let (l, used) = parse_labels_tail(r);
            assert!(l
                .keys()
                .all(|k| k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')));
            labels = l;
            rest = &r[used..];
        }
        let value: f64 = rest.trim().parse().expect("value");
        assert!(
            seen.insert((name.to_string(), format!("{labels:?}"))),
            "duplicate {line}"
        );
        out.push((name.to_string(), labels, value));
    }
    out
}

/// Labels up to and including the closing brace: (labels, bytes read).
fn parse_labels_tail(r: &str) -> (BTreeMap<String, String>, usize) {
    let mut labels = BTreeMap::new();
    let mut i = 0;
    loop {
        let eq = r[i..].find("=\"").expect("k=\"") + i;
        let key = r[i..eq].to_string();
        let mut value = String::new();
        let mut j = eq + 2;
        let b = r.as_bytes();
        loop {
            match b[j] {
                b'\\' => {
                    value.push(if b[j + 1] == b'n' {
                        '\n'
                    } else {
                        b[j + 1] as char
                    });
                    j += 2;
                }
                b'"' => break,
                _ => {
                    let c = r[j..].chars().next().expect("char");
                    value.push(c);
                    j += c.len_utf8();
                }
            }
        }
        labels.insert(key, value);
        j += 1;
        match b[j] {
            b',' => i = j + 1,
            b'}' => return (labels, j + 1),
            other => panic!("after a label: {}", other as char),
        }
    }
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
    found[0].2
}

fn attempt(
    rec: &Recorder,
    outcome: AttemptOutcome,
    site: &str,
    category: Option<crate::bounce::Category>,
) {
    let response = Response {
        code: 250,
        enhanced: String::new(),
        text: String::new(),
    };
    rec.observe(&Event::Attempt(Attempt {
        ts_ms: 10_000,
        shard: 0,
        id: 1,
        reception: ReceptionId {
            ms: 1,
            shard: 0,
            n: 0,
        },
        sender: "a@b",
        rcpt: "c@d",
        attempts: 1,
        outcome,
        response: &response,
        peer: "-",
        source: Some("ip-1"),
        site: Some(site),
        received_ms: 7_500,
        size: 10,
        tls: None,
        bounce_category: category,
        tenant: None,
    }));
}

fn shard(n: usize, delivered: usize, bounced: usize) -> ShardMetrics {
    let rec = Recorder::default();
    for _ in 0..delivered {
        attempt(&rec, AttemptOutcome::Delivered, "mx.example", None);
    }
    for _ in 0..bounced {
        attempt(
            &rec,
            AttemptOutcome::Bounced,
            "mx.example",
            Some(crate::bounce::Category::InvalidRecipient),
        );
    }
    attempt(
        &rec,
        AttemptOutcome::Deferred { next_attempt_ms: 1 },
        "other.example",
        Some(crate::bounce::Category::RateLimited),
    );
    rec.replies_sent(b"250 ok\r\n550 5.1.1 No such user\r\n");
    rec.reception_done(1_500);
    rec.transaction_done(20_000);
    let queue = QueueGauges {
        messages: 1,
        ready: 2,
        scheduled: 3,
        in_flight: 0,
        oldest_ms: Some(5_000 + n as u64),
        sites: vec![SiteGauge {
            site: "mx.example".into(),
            ready: 2,
            scheduled: 3,
            in_flight: 0,
            oldest_ms: Some(5_000),
            state: if n == 1 {
                SiteState::Suspended
            } else {
                SiteState::Active
            },
        }],
        suspensions: n as u64,
        sources_down: vec!["ip-2".into()],
        sources_warming: vec![],
        connections_out: 1,
    };
    rec.snapshot(
        n,
        queue,
        StageGauges {
            connections_in: 2,
            spool_bytes: 1000,
            spool_segments: 1,
        },
    )
}

#[test]
fn merged_exposition_parses_and_adds_up() {
    let m = merge(vec![shard(1, 2, 1), shard(0, 3, 0)]);
    assert_eq!(
        m.shards.iter().map(|s| s.shard).collect::<Vec<_>>(),
        vec![0, 1]
    );
    let p = Process {
        ts_ms: 10_000,
        ready: true,
        hostname: "h".into(),
        uptime_s: 3,
        disk_used_pct: Some(12.5),
        alerts: vec![alerts::Active {
            rule: "r\"1".into(),
            kind: crate::config::AlertKind::BounceRate,
            subject: "mx.example".into(),
            value: 50.0,
            threshold: 10.0,
            since_ms: 1,
            message: "m".into(),
        }],
    };
    let text = prometheus::render(&m, &p);
    let s = parse(&text);
    assert_eq!(value(&s, "epoxi_delivered_total", &[("shard", "all")]), 5.0);
    assert_eq!(value(&s, "epoxi_delivered_total", &[("shard", "0")]), 3.0);
    assert_eq!(value(&s, "epoxi_bounced_total", &[("shard", "1")]), 1.0);
    assert_eq!(
        value(&s, "epoxi_transient_failures_total", &[("shard", "all")]),
        2.0
    );
    assert_eq!(
        value(
            &s,
            "epoxi_rejections_total",
            &[("code", "550"), ("enhanced", "5.1.1")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &s,
            "epoxi_bounces_by_category_total",
            &[("category", "InvalidRecipient")]
        ),
        1.0
    );
    // Deferrals are not bounces: their category is not counted there.
    assert!(!text.contains("RateLimited"));
    assert_eq!(
        value(
            &s,
            "epoxi_site_attempts_total",
            &[("site", "mx.example"), ("outcome", "delivered")]
        ),
        5.0
    );
    assert_eq!(
        value(
            &s,
            "epoxi_queue_recipients",
            &[("shard", "all"), ("state", "scheduled")]
        ),
        6.0
    );
    assert_eq!(
        value(&s, "epoxi_queue_oldest_age_seconds", &[("shard", "all")]),
        5.0
    );
    assert_eq!(
        value(
            &s,
            "epoxi_connections",
            &[("shard", "all"), ("direction", "in")]
        ),
        4.0
    );
    assert_eq!(
        value(
            &s,
            "epoxi_site_state",
            &[("site", "mx.example"), ("state", "suspended")]
        ),
        1.0
    );
    assert_eq!(
        value(&s, "epoxi_sources_out_of_rotation", &[]),
        1.0,
        "joined, not summed"
    );
    assert_eq!(
        value(&s, "epoxi_alert_active", &[("rule", "r\"1")]),
        1.0,
        "escaped and read back"
    );
    assert_eq!(value(&s, "epoxi_spool_disk_used_ratio", &[]), 0.125);
    // Summaries: counts add up, quantiles in seconds.
    assert_eq!(
        value(
            &s,
            "epoxi_reception_latency_seconds_count",
            &[("shard", "all")]
        ),
        2.0
    );
    let p50 = value(
        &s,
        "epoxi_reception_latency_seconds",
        &[("shard", "all"), ("quantile", "0.5")],
    );
    assert!((p50 - 0.0015).abs() < 0.0001, "{p50}");
    assert_eq!(
        value(&s, "epoxi_queue_time_seconds_count", &[("shard", "all")]),
        5.0
    );
    assert_eq!(
        value(&s, "epoxi_queue_time_seconds_sum", &[("shard", "all")]),
        12.5
    );
    assert_eq!(
        value(
            &s,
            "epoxi_delivery_transaction_seconds_count",
            &[("shard", "0")]
        ),
        1.0
    );

    let d = dashboard::document(&m, &p);
    assert_eq!(d["totals"]["delivered"], 5);
    assert_eq!(d["totals"]["rejected"], 2);
    assert_eq!(d["queue"]["depth"], 10);
    assert_eq!(d["per_shard"][1]["delivered"], 2);
    assert_eq!(d["sites"][0]["site"], "mx.example");
    assert_eq!(d["sites"][0]["state"], "suspended");
    assert_eq!(
        d["sites"][1]["site"], "other.example",
        "counted but not queued"
    );
    assert_eq!(d["alerts"][0]["kind"], "bounce_rate");
    // Two significant figures: within 1%.
    let p50 = d["latency_ms"]["delivery_p50"].as_f64().expect("number");
    assert!((p50 - 20.0).abs() < 0.2, "{p50}");
}

#[test]
fn per_site_rows_are_capped() {
    let rec = Recorder::default();
    for i in 0..SITES_TRACKED_MAX + 5 {
        attempt(&rec, AttemptOutcome::Delivered, &format!("s{i}"), None);
    }
    attempt(&rec, AttemptOutcome::Delivered, "s0", None);
    let snap = rec.snapshot(0, QueueGauges::default(), StageGauges::default());
    assert_eq!(snap.sites.len(), SITES_TRACKED_MAX + 1);
    assert_eq!(snap.sites[OTHER].delivered, 5);
    assert_eq!(snap.sites["s0"].delivered, 2);
}

#[test]
fn histogram_bounds_are_valid() {
    // Latency's constructors fall back silently; the bounds must be ones hdrhistogram takes.
    assert!(Histogram::<u64>::new_with_bounds(1, LATENCY_US_MAX, SIGFIG).is_ok());
    assert!(Histogram::<u64>::new_with_bounds(1, QUEUE_MS_MAX, SIGFIG).is_ok());
    let mut l = Latency::micros();
    l.record(LATENCY_US_MAX * 10);
    assert_eq!(l.count(), 1, "saturates, not dropped");
}
