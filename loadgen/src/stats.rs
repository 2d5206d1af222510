//! Counters, the latency histogram and the one-line JSON reports both commands end with.
//!
//! Scripts parse these reports, so field names and their order are part of the interface:
//! change them only together with those scripts.

use std::collections::BTreeMap;
use std::io::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency the histogram resolves, in microseconds: ten minutes, longer than any
/// `--timeout-s` worth using. Slower replies are recorded as this value.
pub const LATENCY_US_MAX: u64 = 600_000_000;

/// Three significant figures keep p999 honest to 0.1% at a few hundred KiB per histogram.
const LATENCY_SIGNIFICANT_FIGURES: u8 = 3;

/// An empty latency histogram in microseconds.
pub fn latency_histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(
        1,
        LATENCY_US_MAX,
        LATENCY_SIGNIFICANT_FIGURES,
    )?)
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencyMs {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl LatencyMs {
    pub fn from_histogram_us(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| round3(us as f64 / 1000.0);
        if h.is_empty() {
            return Self {
                p50: 0.0,
                p99: 0.0,
                p999: 0.0,
                max: 0.0,
            };
        }
        Self {
            p50: ms(h.value_at_quantile(0.5)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// The injector's report. `accepted + tempfailed + rejected + errors` is the number of
/// messages asked for.
#[derive(Debug, Clone, Serialize)]
pub struct InjectReport {
    pub sent: u64,
    pub accepted: u64,
    pub tempfailed: u64,
    pub rejected: u64,
    pub errors: u64,
    pub elapsed_s: f64,
    pub msgs_per_s: f64,
    pub latency_ms: LatencyMs,
    /// Bytes per message as built, which is --size unless that is below the header block.
    pub size: usize,
    pub connections: u32,
}

/// The sink's report.
#[derive(Debug, Clone, Serialize)]
pub struct SinkReport {
    pub received: u64,
    pub unique: u64,
    pub duplicates: u64,
    pub elapsed_s: f64,
    pub msgs_per_s: f64,
    pub connections: u64,
    pub rcpts: u64,
    pub tempfailed: u64,
    pub rejected: u64,
    /// The most connections being served at the same time.
    pub connections_max_concurrent: u64,
    /// Connections by client IP address (IPv4-mapped IPv6 shown as IPv4), at most
    /// `sink::PEERS_MAX` addresses by name and the rest under "other".
    pub peers: BTreeMap<String, u64>,
    /// Accepted messages by the EHLO/HELO name their client gave, at most `sink::PEERS_MAX`
    /// names by name and the rest under "other".
    pub helos: BTreeMap<String, u64>,
    /// With `--smart`, the refusals given by kind (at RCPT, or after DATA for spam); absent
    /// without it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused_by_kind: Option<BTreeMap<&'static str, u64>>,
    /// Connections greeted with 421 (`--greet-421-secs`); absent when none were.
    #[serde(skip_serializing_if = "is_zero")]
    pub greeting_refused: u64,
    /// Connections greeted with 421 at `--limit-conns-per-ip`; present, zero included,
    /// whenever a `--limit-*` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttled_connections: Option<u64>,
    /// MAIL FROM commands refused at `--limit-msgs-per-sec` or `--limit-msgs-per-min`;
    /// present, zero included, whenever a `--limit-*` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttled_messages: Option<u64>,
    /// With `--stats-per-ip`, by client IP (as in `peers`, at most `throttle::CLIENTS_MAX`
    /// by name, the rest under "other"): `accepted`, `max_per_s`, `max_per_min` (the most
    /// accepted in one fixed second or minute since the sink started), `throttled_connections`
    /// and `throttled_messages`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_ip: Option<BTreeMap<String, crate::throttle::ClientReport>>,
}

/// The DNS server's report. `queries` counts every message that decoded as a query, and is
/// `udp + tcp` and `answered + nodata + nxdomain + errors`.
#[derive(Debug, Clone, Serialize)]
pub struct DnsReport {
    pub queries: u64,
    pub udp: u64,
    pub tcp: u64,
    /// NOERROR with records.
    pub answered: u64,
    /// NOERROR without records: the name exists, not with that type.
    pub nodata: u64,
    pub nxdomain: u64,
    /// FORMERR, NOTIMP or REFUSED.
    pub errors: u64,
    /// UDP answers cut to header and question with TC set (a subset of the above).
    pub truncated: u64,
    /// Datagrams or frames that were not a DNS query: dropped unanswered, not in `queries`.
    pub malformed: u64,
    /// Queries by name (lowercase A-labels, no trailing dot), then type, e.g.
    /// `{"d0.test": {"MX": 1}}`; at most `dns::NAMES_MAX` pairs, the rest in `names_other`.
    pub names: BTreeMap<String, BTreeMap<String, u64>>,
    pub names_other: u64,
}

/// Prints `report` as one JSON line on stdout and flushes it, since the sink exits right after.
pub fn print_json_line<T: Serialize>(report: &T) -> anyhow::Result<()> {
    let line = serde_json::to_string(report)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    Ok(())
}

/// `count / elapsed_s`, or 0 when no time has passed.
pub fn rate(count: u64, elapsed_s: f64) -> f64 {
    if elapsed_s > 0.0 {
        round3(count as f64 / elapsed_s)
    } else {
        0.0
    }
}

/// Three decimals are below any precision these figures have, and keep the line readable.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_percentiles_in_ms() {
        let mut h = latency_histogram().unwrap();
        assert_eq!(LatencyMs::from_histogram_us(&h).max, 0.0);
        for us in 1..=1000 {
            h.record(us * 10).unwrap();
        }
        h.saturating_record(u64::MAX);
        let l = LatencyMs::from_histogram_us(&h);
        assert!((l.p50 - 5.0).abs() < 0.025, "{l:?}");
        assert!((l.p99 - 9.9).abs() < 0.05, "{l:?}");
        assert!(l.max >= LATENCY_US_MAX as f64 / 1000.0 * 0.999, "{l:?}");
    }

    #[test]
    fn report_field_names_are_stable() {
        let r = InjectReport {
            sent: 1,
            accepted: 1,
            tempfailed: 0,
            rejected: 0,
            errors: 0,
            elapsed_s: 0.5,
            msgs_per_s: 2.0,
            latency_ms: LatencyMs {
                p50: 1.0,
                p99: 2.0,
                p999: 3.0,
                max: 4.0,
            },
            size: 1024,
            connections: 4,
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"sent":1,"accepted":1,"tempfailed":0,"rejected":0,"errors":0,"elapsed_s":0.5,"msgs_per_s":2.0,"latency_ms":{"p50":1.0,"p99":2.0,"p999":3.0,"max":4.0},"size":1024,"connections":4}"#
        );
        assert_eq!(rate(10, 0.0), 0.0);
        assert_eq!(rate(10, 4.0), 2.5);
    }
}
