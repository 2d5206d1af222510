//! The Prometheus text exposition (format 0.0.4) of merged metrics.
//!
//! Label convention: every series has a `shard` label, `shard="0"`…`shard="N-1"` for each
//! shard and `shard="all"` for the total. Queries over the total select `shard="all"`; a
//! `sum()` over shards must exclude it (`sum(epoxi_delivered_total{shard!="all"})`). Per-site,
//! per-source, per-category, per-rejection and alert series exist for `shard="all"` only (a
//! copy per shard would multiply the series count for no operator question).
//!
//! Names start with `epoxi_`, end with their unit (`_seconds`, `_bytes`, `_total` for
//! counters). Latencies are summaries with quantiles 0.5, 0.9, 0.99 and 0.999 in seconds, plus
//! `_sum` and `_count`. No I/O; the text is built in one `String`.

use std::fmt::Write as _;

use super::{Latency, Merged, Outcomes, ShardMetrics};
use crate::metrics::Process;

/// The quantiles each latency summary reports.
pub const QUANTILES: [f64; 4] = [0.5, 0.9, 0.99, 0.999];
/// Site rows the queue gauges list (busiest first): a dashboard or alert needs the top ones;
/// all of them would be as many series as sites mailed.
pub const SITE_ROWS_MAX: usize = 100;

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

struct Out {
    text: String,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                self.text.push_str(k);
                self.text.push_str("=\"");
                escape_into(&mut self.text, v);
                self.text.push('"');
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", number(value));
    }
}

/// A label value escaped as the format asks: backslash, double quote and line feed.
fn escape_into(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn number(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else if v.is_nan() {
        "NaN".into()
    } else {
        format!("{v}")
    }
}

/// Each shard by its number, then the total as `all`.
fn per_shard(m: &Merged) -> impl Iterator<Item = (String, &ShardMetrics)> {
    m.shards
        .iter()
        .map(|s| (s.shard.to_string(), s))
        .chain(std::iter::once(("all".to_string(), &m.total)))
}

fn counter(out: &mut Out, m: &Merged, name: &str, help: &str, f: impl Fn(&ShardMetrics) -> u64) {
    out.family(name, "counter", help);
    for (shard, s) in per_shard(m) {
        out.sample(name, &[("shard", &shard)], f(s) as f64);
    }
}

fn gauge(out: &mut Out, m: &Merged, name: &str, help: &str, f: impl Fn(&ShardMetrics) -> f64) {
    out.family(name, "gauge", help);
    for (shard, s) in per_shard(m) {
        out.sample(name, &[("shard", &shard)], f(s));
    }
}

fn summary(
    out: &mut Out,
    m: &Merged,
    name: &str,
    help: &str,
    f: impl Fn(&ShardMetrics) -> &Latency,
) {
    out.family(name, "summary", help);
    for (shard, s) in per_shard(m) {
        let l = f(s);
        for q in QUANTILES {
            let q_text = q.to_string();
            out.sample(
                name,
                &[("shard", &shard), ("quantile", &q_text)],
                l.quantile_s(q),
            );
        }
        out.sample(&format!("{name}_sum"), &[("shard", &shard)], l.sum_s());
        out.sample(
            &format!("{name}_count"),
            &[("shard", &shard)],
            l.count() as f64,
        );
    }
}

fn outcomes(out: &mut Out, name: &str, label: &str, help: &str, rows: &[(&String, &Outcomes)]) {
    out.family(name, "counter", help);
    for (key, o) in rows {
        for (outcome, n) in [
            ("delivered", o.delivered),
            ("deferred", o.deferred),
            ("bounced", o.bounced),
            ("expired", o.expired),
        ] {
            out.sample(
                name,
                &[("shard", "all"), (label, key), ("outcome", outcome)],
                n as f64,
            );
        }
    }
}

/// The exposition of `m`, with the process's own facts.
pub fn render(m: &Merged, p: &Process) -> String {
    let mut out = Out {
        text: String::with_capacity(16 << 10),
    };
    let o = &mut out;
    o.family(
        "epoxi_ready",
        "gauge",
        "1 once every shard has recovered its spool and listens.",
    );
    o.sample("epoxi_ready", &[], f64::from(u8::from(p.ready)));
    o.family(
        "epoxi_uptime_seconds",
        "gauge",
        "Seconds since the process started.",
    );
    o.sample("epoxi_uptime_seconds", &[], p.uptime_s as f64);
    o.family(
        "epoxi_shards",
        "gauge",
        "Shards (executors, one per core) running.",
    );
    o.sample("epoxi_shards", &[], m.shards.len() as f64);

    counter(o, m, "epoxi_received_total", "Messages received and queued (once per shard holding recipients of it; the event log's Reception lines).", |s| s.counts.received);
    counter(
        o,
        m,
        "epoxi_delivered_total",
        "Recipients delivered (Delivery lines).",
        |s| s.counts.attempts.delivered,
    );
    counter(
        o,
        m,
        "epoxi_transient_failures_total",
        "Recipient attempts that failed transiently and will be retried (TransientFailure lines).",
        |s| s.counts.attempts.deferred,
    );
    counter(
        o,
        m,
        "epoxi_bounced_total",
        "Recipients bounced (Bounce lines).",
        |s| s.counts.attempts.bounced,
    );
    counter(
        o,
        m,
        "epoxi_expired_total",
        "Recipients expired in the queue (Expiration lines).",
        |s| s.counts.attempts.expired,
    );
    counter(
        o,
        m,
        "epoxi_notices_total",
        "Notices about recipients' outcomes spooled or found not needed (Notice lines).",
        |s| s.counts.notices,
    );
    counter(
        o,
        m,
        "epoxi_suppressed_total",
        "Recipients refused for the suppression list (Suppressed lines).",
        |s| s.counts.suppressed,
    );
    counter(
        o,
        m,
        "epoxi_rejected_total",
        "4xx and 5xx replies sent to SMTP clients.",
        |s| s.counts.rejected,
    );

    o.family("epoxi_rejections_total", "counter", "4xx and 5xx replies sent to SMTP clients, by code and enhanced code (empty when the reply had none).");
    for (r, n) in &m.total.rejections {
        let (code, enhanced) = (r.code.to_string(), r.enhanced_text());
        o.sample(
            "epoxi_rejections_total",
            &[("shard", "all"), ("code", &code), ("enhanced", &enhanced)],
            *n as f64,
        );
    }
    o.family(
        "epoxi_bounces_by_category_total",
        "counter",
        "Recipients bounced or expired, by bounce category.",
    );
    for (c, n) in &m.total.bounce_categories {
        o.sample(
            "epoxi_bounces_by_category_total",
            &[("shard", "all"), ("category", c)],
            *n as f64,
        );
    }
    let sites: Vec<(&String, &Outcomes)> = m.total.sites.iter().collect();
    outcomes(o, "epoxi_site_attempts_total", "site", "Recipient attempts by destination site and outcome (the first sites seen per shard; the rest as `other`).", &sites);
    let sources: Vec<(&String, &Outcomes)> = m.total.sources.iter().collect();
    outcomes(
        o,
        "epoxi_source_attempts_total",
        "source",
        "Recipient attempts by egress source and outcome.",
        &sources,
    );

    gauge(
        o,
        m,
        "epoxi_queue_messages",
        "Messages in the queue.",
        |s| s.queue_gauges.messages as f64,
    );
    o.family("epoxi_queue_recipients", "gauge", "Recipients pending, by state: ready (waiting for a connection), scheduled (waiting for a retry or a suspension), in_flight (on a connection).");
    for (shard, s) in per_shard(m) {
        let q = &s.queue_gauges;
        for (state, n) in [
            ("ready", q.ready),
            ("scheduled", q.scheduled),
            ("in_flight", q.in_flight),
        ] {
            o.sample(
                "epoxi_queue_recipients",
                &[("shard", &shard), ("state", state)],
                n as f64,
            );
        }
    }
    gauge(
        o,
        m,
        "epoxi_queue_oldest_age_seconds",
        "Age of the oldest queued message (0: none).",
        |s| oldest_age_s(s.queue_gauges.oldest_ms, p.ts_ms),
    );
    o.family(
        "epoxi_connections",
        "gauge",
        "SMTP connections open: in (client sessions) and out (deliveries, opening or open).",
    );
    for (shard, s) in per_shard(m) {
        o.sample(
            "epoxi_connections",
            &[("shard", &shard), ("direction", "in")],
            s.stage_gauges.connections_in as f64,
        );
        o.sample(
            "epoxi_connections",
            &[("shard", &shard), ("direction", "out")],
            s.queue_gauges.connections_out as f64,
        );
    }
    gauge(
        o,
        m,
        "epoxi_spool_bytes",
        "Bytes of the spool's segment files.",
        |s| s.stage_gauges.spool_bytes as f64,
    );
    gauge(
        o,
        m,
        "epoxi_spool_segments",
        "Segment files in the spool.",
        |s| s.stage_gauges.spool_segments as f64,
    );
    gauge(o, m, "epoxi_suspensions", "Suspensions in force: operators' suspensions and bounces, site backoffs, adaptive shaping actions.", |s| s.queue_gauges.suspensions as f64);
    o.family(
        "epoxi_sources_out_of_rotation",
        "gauge",
        "Egress sources out of rotation (on any shard).",
    );
    o.sample(
        "epoxi_sources_out_of_rotation",
        &[("shard", "all")],
        m.total.queue_gauges.sources_down.len() as f64,
    );
    o.family(
        "epoxi_sources_warming",
        "gauge",
        "Egress sources under an IP warmup schedule.",
    );
    o.sample(
        "epoxi_sources_warming",
        &[("shard", "all")],
        m.total.queue_gauges.sources_warming.len() as f64,
    );
    if let Some(pct) = p.disk_used_pct {
        o.family(
            "epoxi_spool_disk_used_ratio",
            "gauge",
            "Used fraction of the spool's filesystem (statvfs).",
        );
        o.sample(
            "epoxi_spool_disk_used_ratio",
            &[("shard", "all")],
            pct / 100.0,
        );
    }
    o.family(
        "epoxi_site_queue_recipients",
        "gauge",
        "Recipients pending for the busiest sites, by state.",
    );
    let top = m.total.queue_gauges.sites.iter().take(SITE_ROWS_MAX);
    for g in top.clone() {
        for (state, n) in [
            ("ready", g.ready),
            ("scheduled", g.scheduled),
            ("in_flight", g.in_flight),
        ] {
            o.sample(
                "epoxi_site_queue_recipients",
                &[("shard", "all"), ("site", &g.site), ("state", state)],
                n as f64,
            );
        }
    }
    o.family(
        "epoxi_site_state",
        "gauge",
        "1 for each busy site's state: active, warming, throttled, backoff or suspended.",
    );
    for g in top {
        o.sample(
            "epoxi_site_state",
            &[
                ("shard", "all"),
                ("site", &g.site),
                ("state", g.state.as_str()),
            ],
            1.0,
        );
    }
    o.family(
        "epoxi_alert_active",
        "gauge",
        "1 for each alert firing, by rule and subject.",
    );
    for a in &p.alerts {
        o.sample(
            "epoxi_alert_active",
            &[
                ("shard", "all"),
                ("rule", &a.rule),
                ("kind", a.kind.as_str()),
                ("subject", &a.subject),
            ],
            1.0,
        );
    }

    summary(
        o,
        m,
        "epoxi_reception_latency_seconds",
        "From the end of a message's data to its 250 (spooled durably on every shard it goes to).",
        |s| &s.reception,
    );
    summary(
        o,
        m,
        "epoxi_queue_time_seconds",
        "From reception to delivery, per delivered recipient.",
        |s| &s.queue,
    );
    summary(
        o,
        m,
        "epoxi_delivery_transaction_seconds",
        "One delivery transaction, from MAIL FROM sent to the reply to its data.",
        |s| &s.delivery,
    );
    out.text
}

pub fn oldest_age_s(oldest_ms: Option<u64>, now_ms: u64) -> f64 {
    oldest_ms.map_or(0.0, |o| now_ms.saturating_sub(o) as f64 / 1000.0)
}
