//! `/metrics` and `/api/dashboard/v1` against the real binary: after a run with deliveries,
//! bounces (550), deferrals (451) and RCPT rejections, the counters equal the event log's
//! lines and the histograms' counts match; queue gauges go up while a domain is suspended
//! and back to zero once it is resumed and delivered; the dashboard agrees with /metrics;
//! and an alert rule fires on bounces, shows in both, is logged, and resolves.
//!
//! The exposition is read by Python's `prometheus_client` parser (installed by .ci/run), an
//! implementation independent of ours.

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{http_get, http_json, wait_until, Epoxi, Inject, Opts, Sink, Smtp};
use serde_json::{json, Value};

/// One sample: its labels (sorted) and value.
type Samples = Vec<(String, BTreeMap<String, String>, f64)>;

/// Scrape `/metrics` and parse it with prometheus_client (which refuses malformed text).
fn scrape(epoxi: &Epoxi) -> Samples {
    let reply = http_get(&format!("{}/metrics", epoxi.http_url()), None);
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let ctype = reply
        .headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let script = "import sys, json\n\
from prometheus_client.parser import text_string_to_metric_families as parse\n\
out = [[s.name, s.labels, s.value] for f in parse(sys.stdin.read()) for s in f.samples]\n\
print(json.dumps(out))\n";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (pip install prometheus_client)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&reply.body)
        .expect("write exposition");
    let out = child.wait_with_output().expect("parser");
    assert!(
        out.status.success(),
        "prometheus_client refused the exposition: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&reply.body)
    );
    let rows: Vec<(String, BTreeMap<String, String>, f64)> =
        serde_json::from_slice(&out.stdout).expect("parser output");
    rows
}

/// The value of the one sample `name` with `labels` (0 when the series is absent, as for a
/// counter that never moved).
fn get(s: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let hits: Vec<f64> = s
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|r| r.2)
        .collect();
    assert!(hits.len() <= 1, "{name} {labels:?} is ambiguous: {hits:?}");
    hits.first().copied().unwrap_or(0.0)
}

fn all(s: &Samples, name: &str) -> u64 {
    get(s, name, &[("shard", "all")]) as u64
}

fn dashboard(epoxi: &Epoxi) -> Value {
    let reply = http_get(&format!("{}/api/dashboard/v1", epoxi.http_url()), None);
    assert_eq!(reply.status, 200);
    reply.json()
}

#[test]
fn counters_match_the_event_log_and_gauges_follow_the_queue() {
    let dir = tempfile::tempdir().expect("tmp");
    // Per message arrival: 70% delivered, 15% deferred (then tried again: a new pick), 15%
    // bounced.
    let sink = Sink::start(dir.path(), &["--reply", "250:70,451:15,550:15"]);
    let opts = Opts::new(dir.path())
        .shards(2)
        .route(sink.port)
        .http()
        .set("bounce", "enabled", "true");
    let epoxi = Epoxi::start(&opts);

    // RCPT rejections: three addresses the server refuses at RCPT.
    let mut smtp = Smtp::connect(epoxi.port);
    smtp.reply();
    smtp.expect("EHLO client.test", 250);
    smtp.expect("MAIL FROM:<a@client.test>", 250);
    let mut refused = Vec::new();
    for _ in 0..3 {
        let r = smtp.cmd("RCPT TO:<no-at-sign>");
        assert!(r.code >= 500, "{}", r.text);
        refused.push(r);
    }
    smtp.expect("QUIT", 221);
    let code = refused[0].code.to_string();
    let enhanced = refused[0].text[4..]
        .split(' ')
        .next()
        .filter(|e| e.chars().next().is_some_and(|c| c.is_ascii_digit()) && e.contains('.'))
        .unwrap_or("")
        .to_owned();

    let n = 60;
    let report = Inject::new(n)
        .connections(2)
        .domains(5)
        .run(dir.path(), epoxi.port);
    assert_eq!(report.count("accepted"), n);
    // Every recipient final, notices of bounces included (they go to the sink too): the queue
    // holds a bounced message until its notice is queued, so an empty queue means done.
    wait_until("the queue empty", Duration::from_secs(60), || {
        let s = scrape(&epoxi);
        all(&s, "epoxi_received_total") >= n && all(&s, "epoxi_queue_messages") == 0
    });
    // Lines are flushed within 100 ms of being written; give the last ones that.
    std::thread::sleep(Duration::from_millis(300));
    let s = scrape(&epoxi);
    let lines = |kind: &str| epoxi.events_of(kind).len() as u64;
    let delivered = lines("Delivery");
    let bounced = lines("Bounce");
    let deferred = lines("TransientFailure");
    assert!(
        delivered > 0 && bounced > 0 && deferred > 0,
        "a mixed run: {delivered} {bounced} {deferred}"
    );
    assert_eq!(all(&s, "epoxi_received_total"), lines("Reception"));
    assert_eq!(all(&s, "epoxi_delivered_total"), delivered);
    assert_eq!(all(&s, "epoxi_bounced_total"), bounced);
    assert_eq!(all(&s, "epoxi_transient_failures_total"), deferred);
    assert_eq!(all(&s, "epoxi_expired_total"), lines("Expiration"));
    // The shards add up to the total.
    let per_shard: u64 = (0..2)
        .map(|i| get(&s, "epoxi_delivered_total", &[("shard", &i.to_string())]) as u64)
        .sum();
    assert_eq!(per_shard, delivered);
    // Bounce categories, by the log's own.
    let mut categories: BTreeMap<String, u64> = BTreeMap::new();
    for e in epoxi.events_of("Bounce") {
        let c = e["bounce_category"]
            .as_str()
            .expect("classified")
            .to_owned();
        *categories.entry(c).or_default() += 1;
    }
    for (c, count) in &categories {
        let v = get(
            &s,
            "epoxi_bounces_by_category_total",
            &[("shard", "all"), ("category", c)],
        );
        assert_eq!(v as u64, *count, "category {c}");
    }
    // Per site: every attempt went to the sink's route.
    let site = format!("[127.0.0.1:{}]", sink.port);
    let site_outcome = |o: &str| {
        get(
            &s,
            "epoxi_site_attempts_total",
            &[("site", &site), ("outcome", o)],
        ) as u64
    };
    let sites_seen: Vec<String> = s
        .iter()
        .filter(|r| r.0 == "epoxi_site_attempts_total")
        .map(|r| format!("{:?} {}", r.1, r.2))
        .collect();
    assert_eq!(
        site_outcome("delivered"),
        delivered,
        "sites: {sites_seen:?}"
    );
    assert_eq!(site_outcome("bounced"), bounced);
    assert_eq!(site_outcome("deferred"), deferred);
    let logged_sites = common::field_set(&epoxi.events_of("Delivery"), "site");
    assert_eq!(
        logged_sites.into_iter().collect::<Vec<_>>(),
        vec![site.clone()]
    );
    // Rejections by reply: the three RCPTs (and nothing else was refused).
    let rejected = get(
        &s,
        "epoxi_rejections_total",
        &[("shard", "all"), ("code", &code), ("enhanced", &enhanced)],
    );
    assert_eq!(rejected, 3.0, "{code} {enhanced}");
    assert_eq!(all(&s, "epoxi_rejected_total"), 3);
    // Histograms: one reception per message, one queue time per delivery, one transaction
    // per attempt (each message has one recipient, each attempt its own transaction).
    // Notices are spooled by the core, not received over SMTP: only the n messages.
    assert_eq!(all(&s, "epoxi_reception_latency_seconds_count"), n);
    assert_eq!(all(&s, "epoxi_queue_time_seconds_count"), delivered);
    assert_eq!(
        all(&s, "epoxi_delivery_transaction_seconds_count"),
        delivered + bounced + deferred
    );
    let p99 = get(
        &s,
        "epoxi_reception_latency_seconds",
        &[("shard", "all"), ("quantile", "0.99")],
    );
    assert!(p99 > 0.0 && p99 < 60.0, "reception p99 {p99}");
    // Gauges: nothing queued, nothing open out once idle connections closed.
    for state in ["ready", "scheduled", "in_flight"] {
        assert_eq!(
            get(
                &s,
                "epoxi_queue_recipients",
                &[("shard", "all"), ("state", state)]
            ),
            0.0,
            "{state}"
        );
    }
    assert!(all(&s, "epoxi_spool_segments") >= 2, "a segment per shard");
    assert!(all(&s, "epoxi_spool_bytes") > 0);
    assert_eq!(get(&s, "epoxi_ready", &[]), 1.0);

    // The dashboard agrees with /metrics (nothing moves now).
    let d = dashboard(&epoxi);
    assert_eq!(d["shards"], 2);
    assert_eq!(d["ready"], true);
    assert_eq!(d["totals"]["delivered"], delivered);
    assert_eq!(d["totals"]["bounced"], bounced);
    assert_eq!(d["totals"]["transient_failures"], deferred);
    assert_eq!(d["totals"]["received"], lines("Reception"));
    assert_eq!(d["totals"]["rejected"], 3);
    assert_eq!(d["queue"]["depth"], 0);
    let shard_sum: u64 = d["per_shard"]
        .as_array()
        .expect("per_shard")
        .iter()
        .map(|p| p["delivered"].as_u64().expect("n"))
        .sum();
    assert_eq!(shard_sum, delivered);
    assert_eq!(d["sites"][0]["site"], site.as_str());
    assert_eq!(d["sites"][0]["delivered"], delivered);
    for key in ["bytes", "segments", "disk_used_pct"] {
        assert!(d["spool"][key].is_number(), "spool.{key}: {}", d["spool"]);
    }
    for key in [
        "reception_p50",
        "reception_p99",
        "queue_p50",
        "queue_p99",
        "delivery_p50",
        "delivery_p99",
    ] {
        assert!(d["latency_ms"][key].is_number(), "{key}");
    }
    assert!(d["alerts"].as_array().expect("alerts").is_empty());

    // A suspended domain: its mail waits, and the gauges say so.
    let url = epoxi.http_url();
    let r = http_json(
        "POST",
        &format!("{url}/api/admin/suspend/v1"),
        None,
        &json!({"domain": "held.test", "reason": "metrics test", "duration": "10m"}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let mut smtp = Smtp::connect(epoxi.port);
    smtp.reply();
    smtp.expect("EHLO client.test", 250);
    for i in 0..2 {
        let rcpts = vec![format!("r{i}@held.test")];
        let reply = smtp.send_message("a@client.test", &rcpts, &common::message_body("held", &[]));
        assert_eq!(reply.code, 250, "{}", reply.text);
    }
    smtp.expect("QUIT", 221);
    wait_until(
        "the held mail in the gauges",
        Duration::from_secs(10),
        || {
            let s = scrape(&epoxi);
            all(&s, "epoxi_queue_messages") == 2
                && get(
                    &s,
                    "epoxi_site_state",
                    &[("site", &site), ("state", "suspended")],
                ) == 1.0
        },
    );
    let d = dashboard(&epoxi);
    assert_eq!(d["queue"]["depth"], 2, "{}", d["queue"]);
    assert_eq!(d["sites"][0]["state"], "suspended", "{}", d["sites"]);
    assert!(d["suspensions"].as_u64().expect("n") >= 1);
    let r = http_json(
        "POST",
        &format!("{url}/api/admin/resume/v1"),
        None,
        &json!({"domain": "held.test"}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    wait_until("the held mail gone", Duration::from_secs(30), || {
        let s = scrape(&epoxi);
        all(&s, "epoxi_queue_messages") == 0
            && all(&s, "epoxi_received_total") == lines("Reception")
    });
    drop(sink);
}

#[test]
fn a_bounce_rate_alert_fires_shows_and_resolves() {
    let dir = tempfile::tempdir().expect("tmp");
    let sink = Sink::start(dir.path(), &["--reply", "550:100"]);
    // A webhook receiver taking only Alert events: alerts reach webhooks like any event.
    let (hook_port, alert_posts) = alert_receiver();
    let mut opts = Opts::new(dir.path()).route(sink.port).http();
    opts.conf.set("alerts", "interval_s", "1");
    opts.conf.raw.push_str(
        "[[alert]]\nname = \"bounces\"\nkind = \"bounce_rate\"\nsite = \"*\"\n\
         above_pct = 10.0\nwindow_s = 4\nmin_attempts = 3\n",
    );
    opts.conf.raw.push_str(&format!(
        "[[webhook]]\nname = \"alerts\"\nurl = \"http://127.0.0.1:{hook_port}/alerts\"\n\
         events = [\"Alert\"]\nretry_base_ms = 50\nretry_max_ms = 400\n"
    ));
    let epoxi = Epoxi::start(&opts);
    // Nothing sent yet: no alert.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(dashboard(&epoxi)["alerts"]
        .as_array()
        .expect("alerts")
        .is_empty());

    let report = Inject::new(10)
        .connections(1)
        .domains(1)
        .run(dir.path(), epoxi.port);
    assert_eq!(report.count("accepted"), 10);
    let fired = epoxi.wait_events_within("Alert", 1, Duration::from_secs(15));
    let site = format!("[127.0.0.1:{}]", sink.port);
    assert_eq!(fired[0]["state"], "firing", "{}", fired[0]);
    assert_eq!(fired[0]["rule"], "bounces");
    assert_eq!(fired[0]["alert_kind"], "bounce_rate");
    assert_eq!(fired[0]["subject"], site.as_str());
    assert_eq!(fired[0]["value"], 100.0);
    assert_eq!(fired[0]["threshold"], 10.0);
    // While it fires: in the dashboard and as a gauge.
    let d = dashboard(&epoxi);
    let alerts = d["alerts"].as_array().expect("alerts").clone();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["rule"], "bounces");
    assert_eq!(alerts[0]["kind"], "bounce_rate");
    assert_eq!(alerts[0]["subject"], site.as_str());
    assert_eq!(alerts[0]["since_ms"], fired[0]["since_ms"]);
    let s = scrape(&epoxi);
    assert_eq!(
        get(
            &s,
            "epoxi_alert_active",
            &[("rule", "bounces"), ("subject", &site)]
        ),
        1.0
    );
    // The window passes without attempts: resolved, logged, gone from both.
    let lines = epoxi.wait_events_within("Alert", 2, Duration::from_secs(15));
    assert_eq!(lines[1]["state"], "resolved", "{}", lines[1]);
    assert_eq!(lines[1]["since_ms"], lines[0]["since_ms"]);
    wait_until("the alert gone", Duration::from_secs(5), || {
        dashboard(&epoxi)["alerts"]
            .as_array()
            .is_some_and(|a| a.is_empty())
    });
    let s = scrape(&epoxi);
    assert_eq!(
        get(
            &s,
            "epoxi_alert_active",
            &[("rule", "bounces"), ("subject", &site)]
        ),
        0.0
    );
    // The ten messages and their notices (bounced by the sink too).
    assert_eq!(
        all(&s, "epoxi_bounced_total"),
        epoxi.events_of("Bounce").len() as u64
    );
    assert!(all(&s, "epoxi_bounced_total") >= 10);
    // Both transitions reached the webhook, and nothing but them.
    wait_until(
        "both alert events at the webhook",
        Duration::from_secs(10),
        || alert_posts.lock().expect("posts").len() >= 2,
    );
    let got = alert_posts.lock().expect("posts").clone();
    assert!(got.iter().all(|e| e["type"] == "Alert"), "{got:?}");
    let states: Vec<&str> = got.iter().filter_map(|e| e["state"].as_str()).collect();
    assert_eq!(states, ["firing", "resolved"], "{got:?}");
    drop(sink);
}

/// A minimal HTTP receiver on loopback: every JSON event POSTed to it (arrays flattened),
/// answered 200. Its thread ends with the test process.
fn alert_receiver() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    use std::io::Read as _;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind receiver");
    let port = listener.local_addr().expect("addr").port();
    let posts = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = posts.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            let Some(head_end) = (loop {
                if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break Some(at);
                }
                match conn.read(&mut chunk) {
                    Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                    _ => break None,
                }
            }) else {
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let mut body = buf[head_end + 4..].to_vec();
            while body.len() < len {
                match conn.read(&mut chunk) {
                    Ok(n) if n > 0 => body.extend_from_slice(&chunk[..n]),
                    _ => break,
                }
            }
            if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                let mut posts = kept.lock().expect("posts");
                match v {
                    Value::Array(items) => posts.extend(items),
                    one => posts.push(one),
                }
            }
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (port, posts)
}
