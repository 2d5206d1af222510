//! `GET /api/dashboard/v1`: the merged metrics as the dashboard page and `epoxi top` poll
//! them. Counts are cumulative; clients compute rates from two polls (divide the difference
//! by that of `ts_ms`). Field names are a contract with those clients: add, never rename.
//!
//! `queue.depth` and `per_shard[].queue_depth` are recipients pending (ready + scheduled +
//! in flight); `queue.messages` counts messages. No I/O.

use serde_json::{json, Value};

use super::{Merged, Process, SiteGauge};

/// Sites listed: the dashboard's table shows this many.
pub const SITES_MAX: usize = 20;

/// The dashboard document of `m`.
pub fn document(m: &Merged, p: &Process) -> Value {
    let t = &m.total;
    let q = &t.queue_gauges;
    let a = &t.counts.attempts;
    let latency = |l: &super::Latency, q: f64| (l.quantile_s(q) * 1000.0 * 1000.0).round() / 1000.0;
    json!({
        "ts_ms": p.ts_ms,
        "ready": p.ready,
        "shards": m.shards.len(),
        "hostname": p.hostname,
        "uptime_s": p.uptime_s,
        "totals": {
            "received": t.counts.received,
            "delivered": a.delivered,
            "transient_failures": a.deferred,
            "bounced": a.bounced,
            "expired": a.expired,
            "rejected": t.counts.rejected,
            "notices": t.counts.notices,
            "suppressed": t.counts.suppressed,
        },
        "bounce_categories": t.bounce_categories,
        "queue": {
            "depth": q.ready + q.scheduled + q.in_flight,
            "messages": q.messages,
            "ready": q.ready,
            "scheduled": q.scheduled,
            "in_flight": q.in_flight,
            "oldest_age_s": super::prometheus::oldest_age_s(q.oldest_ms, p.ts_ms).floor() as u64,
        },
        "per_shard": m.shards.iter().map(|s| {
            let g = &s.queue_gauges;
            json!({
                "shard": s.shard,
                "received": s.counts.received,
                "delivered": s.counts.attempts.delivered,
                "queue_depth": g.ready + g.scheduled + g.in_flight,
                "connections_in": s.stage_gauges.connections_in,
                "connections_out": g.connections_out,
            })
        }).collect::<Vec<_>>(),
        "connections": {"in": t.stage_gauges.connections_in, "out": q.connections_out},
        "spool": {
            "bytes": t.stage_gauges.spool_bytes,
            "segments": t.stage_gauges.spool_segments,
            "disk_used_pct": p.disk_used_pct.map(|v| (v * 10.0).round() / 10.0),
        },
        "sources_out_of_rotation": q.sources_down,
        "sources_warming": q.sources_warming,
        "suspensions": q.suspensions,
        "sites": top_sites(m),
        "alerts": p.alerts,
        "latency_ms": {
            "reception_p50": latency(&t.reception, 0.5),
            "reception_p99": latency(&t.reception, 0.99),
            "queue_p50": latency(&t.queue, 0.5),
            "queue_p99": latency(&t.queue, 0.99),
            "delivery_p50": latency(&t.delivery, 0.5),
            "delivery_p99": latency(&t.delivery, 0.99),
        },
    })
}

/// The busiest sites: by recipients pending plus attempts counted (a site that is being
/// delivered to quickly has no depth but is busy), at most [`SITES_MAX`]; a site with
/// pending mail comes before one with none. Sites that only have counts (nothing queued
/// now) are listed as active.
fn top_sites(m: &Merged) -> Vec<Value> {
    let t = &m.total;
    let mut rows: Vec<(SiteGauge, super::Outcomes)> = t
        .queue_gauges
        .sites
        .iter()
        .map(|g| (g.clone(), t.sites.get(&g.site).copied().unwrap_or_default()))
        .collect();
    for (site, o) in &t.sites {
        if site != super::OTHER && !rows.iter().any(|(g, _)| &g.site == site) {
            let g = SiteGauge {
                site: site.clone(),
                ..SiteGauge::default()
            };
            rows.push((g, *o));
        }
    }
    rows.sort_by_key(|(g, o)| {
        std::cmp::Reverse((g.depth() > 0, g.depth().saturating_add(o.attempts())))
    });
    rows.truncate(SITES_MAX);
    rows.into_iter()
        .map(|(g, o)| {
            json!({
                "site": g.site,
                "ready": g.ready,
                "scheduled": g.scheduled,
                "in_flight": g.in_flight,
                "state": g.state.as_str(),
                "delivered": o.delivered,
                "bounced": o.bounced + o.expired,
                "deferred": o.deferred,
            })
        })
        .collect()
}
