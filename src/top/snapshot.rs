//! What `epoxi top` reads from `GET /api/dashboard/v1`, and the rates between two reads.
//! No I/O.
//!
//! Every field has a default, so a server with fewer fields (an older one, or one whose
//! alerts are off) still shows what it has; unknown fields are ignored for the same reason.

use std::collections::BTreeMap;

use serde::Deserialize;

/// One answer of the dashboard endpoint.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Snapshot {
    pub ts_ms: u64,
    pub ready: bool,
    pub shards: u64,
    pub hostname: String,
    pub uptime_s: u64,
    pub totals: Totals,
    pub bounce_categories: BTreeMap<String, u64>,
    pub queue: Queue,
    pub per_shard: Vec<ShardRow>,
    pub connections: Connections,
    pub spool: Spool,
    pub sites: Vec<SiteRow>,
    pub alerts: Vec<Alert>,
    pub latency_ms: Latency,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Totals {
    pub received: u64,
    pub delivered: u64,
    pub transient_failures: u64,
    pub bounced: u64,
    pub expired: u64,
    pub rejected: u64,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Queue {
    pub depth: u64,
    pub ready: u64,
    pub scheduled: u64,
    pub in_flight: u64,
    pub oldest_age_s: u64,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ShardRow {
    pub shard: u64,
    pub received: u64,
    pub delivered: u64,
    pub queue_depth: u64,
    pub connections_in: u64,
    pub connections_out: u64,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Connections {
    #[serde(rename = "in")]
    pub inbound: u64,
    #[serde(rename = "out")]
    pub outbound: u64,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Spool {
    pub bytes: u64,
    pub segments: u64,
    pub disk_used_pct: f64,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct SiteRow {
    pub site: String,
    pub ready: u64,
    pub scheduled: u64,
    pub in_flight: u64,
    pub state: String,
    pub delivered: u64,
    pub bounced: u64,
    pub deferred: u64,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Alert {
    pub rule: String,
    pub kind: String,
    pub subject: String,
    pub value: f64,
    pub threshold: f64,
    pub since_ms: u64,
    pub message: String,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Latency {
    pub reception_p50: f64,
    pub reception_p99: f64,
    pub queue_p50: f64,
    pub queue_p99: f64,
    pub delivery_p50: f64,
    pub delivery_p99: f64,
}

/// Messages per second between two snapshots.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rates {
    pub received: f64,
    pub delivered: f64,
    pub bounced: f64,
}

impl Rates {
    /// The rates from `prev` to `cur`; `None` when no time passed between them (the same
    /// answer twice, or a clock step back). A counter that went down (the server restarted)
    /// counts as zero, not as a negative rate.
    pub fn between(prev: &Snapshot, cur: &Snapshot) -> Option<Rates> {
        let dt_ms = cur.ts_ms.checked_sub(prev.ts_ms).filter(|&d| d > 0)?;
        let per_s = |a: u64, b: u64| b.saturating_sub(a) as f64 * 1000.0 / dt_ms as f64;
        Some(Rates {
            received: per_s(prev.totals.received, cur.totals.received),
            delivered: per_s(prev.totals.delivered, cur.totals.delivered),
            bounced: per_s(prev.totals.bounced, cur.totals.bounced),
        })
    }
}

impl Snapshot {
    /// Delivered out of every message that reached an end (delivered, bounced or expired),
    /// in percent; `None` before the first one.
    pub fn success_pct(&self) -> Option<f64> {
        let t = &self.totals;
        let done = t.delivered + t.bounced + t.expired;
        (done > 0).then(|| 100.0 * t.delivered as f64 / done as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ts_ms: u64, received: u64, delivered: u64) -> Snapshot {
        Snapshot {
            ts_ms,
            totals: Totals {
                received,
                delivered,
                ..Totals::default()
            },
            ..Snapshot::default()
        }
    }

    #[test]
    fn rates_divide_by_the_time_between_polls() {
        let r = Rates::between(&at(1_000, 10, 0), &at(3_000, 30, 10)).expect("rates");
        assert_eq!(r.received, 10.0);
        assert_eq!(r.delivered, 5.0);
        assert_eq!(Rates::between(&at(1_000, 10, 0), &at(1_000, 30, 0)), None);
        assert_eq!(Rates::between(&at(2_000, 10, 0), &at(1_000, 30, 0)), None);
        // A restart resets the counters: no negative rate.
        let r = Rates::between(&at(1_000, 50, 50), &at(2_000, 3, 1)).expect("rates");
        assert_eq!((r.received, r.delivered), (0.0, 0.0));
    }

    #[test]
    fn parses_the_documented_shape_and_tolerates_missing_fields() {
        let json = r#"{"ts_ms": 5, "ready": true, "shards": 2, "hostname": "h", "uptime_s": 1,
            "totals": {"received": 3, "delivered": 2, "bounced": 1},
            "bounce_categories": {"InvalidRecipient": 1},
            "queue": {"depth": 4, "ready": 1, "scheduled": 2, "in_flight": 1, "oldest_age_s": 9},
            "per_shard": [{"shard": 0, "received": 3}],
            "connections": {"in": 1, "out": 2},
            "sites": [{"site": "a.test", "state": "suspended", "ready": 1}],
            "alerts": [{"rule": "r", "value": 12.5, "threshold": 5.0, "extra": 1}],
            "something_new": {"x": 1}}"#;
        let s: Snapshot = serde_json::from_str(json).expect("parse");
        assert_eq!(s.totals.bounced, 1);
        assert_eq!(s.connections.outbound, 2);
        assert_eq!(s.sites[0].state, "suspended");
        assert_eq!(s.alerts[0].value, 12.5);
        assert_eq!(s.spool, Spool::default());
        let pct = s.success_pct().expect("pct");
        assert!((pct - 200.0 / 3.0).abs() < 1e-9, "{pct}");
        assert_eq!(Snapshot::default().success_pct(), None);
    }
}
