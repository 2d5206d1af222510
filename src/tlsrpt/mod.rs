//! SMTP TLS reporting (RFC 8460): what each outbound TLS session came to, counted per policy
//! domain and day, and the daily aggregate report sent to the domain's `rua`.
//!
//! Counting is on the delivery path, so it is a per-shard [`Tally`] (no lock, no mesh message
//! per session); once a day the reporting shard gathers every shard's tally of the day that
//! ended, merges them ([`Tally::merge`]) and builds one [`report::Report`] per policy domain
//! that publishes a `_smtp._tls` record ([`rua::parse`]). Everything here is pure: the adapter
//! in `shard/` does the gathering, the DNS lookups and the sending.

pub mod post;
pub mod report;
pub mod rua;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The reporting period: one UTC day (RFC 8460 §4.4: reports cover whole UTC days). Periods
/// are counted from the Unix epoch; a shorter one (`tls_report.period_s`) is for tests.
pub const DAY_MS: u64 = 86_400_000;

/// Policy domains counted per shard and day. Bounded so a run of mail to millions of distinct
/// domains cannot grow the tally without limit; sessions past it are counted in
/// [`Tally::dropped`] (and logged by the adapter), not reported.
pub const POLICY_DOMAINS_MAX: usize = 100_000;

/// Distinct failure details kept per policy (RFC 8460 lets a report list each failing
/// MX/IP/result combination; past this many, further failures only add to the summary count).
pub const FAILURE_DETAILS_MAX: usize = 100;

// The policy and result types are the delivery's own (`tlspolicy`): one type per concept.
pub use crate::tlspolicy::{PolicyType, ResultType};

/// The policy a session was held to: what a report groups by (RFC 8460 §4.4 `policy`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Policy {
    pub kind: PolicyType,
    /// The recipient domain the policy is for (never an MX host's or a site's).
    pub domain: String,
    /// The policy as published: the MTA-STS policy's lines, or each TLSA record in
    /// presentation form; empty for `no-policy-found`.
    pub strings: Vec<String>,
    /// The MX host patterns of an MTA-STS policy; empty otherwise.
    pub mx_hosts: Vec<String>,
}

/// One failing session's detail (RFC 8460 §4.4 `failure-details`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Failure {
    pub result: ResultType,
    pub sending_mta_ip: Option<IpAddr>,
    pub receiving_ip: Option<IpAddr>,
    pub receiving_mx_hostname: String,
    /// Free text for the domain's operator: the TLS alert, the verifier's error.
    pub additional: String,
}

/// What one outbound TLS session (or attempt at one) came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub policy: Policy,
    pub outcome: Result<(), Failure>,
}

impl Session {
    /// The session a delivery's TLS outcome describes, when a domain's policy applied to it.
    pub fn of(tls: &crate::tlspolicy::TlsOutcome, receiving_ip: Option<IpAddr>) -> Option<Session> {
        let domain = tls.policy_domain.clone()?;
        // An MTA-STS policy's `mx` lines are its host patterns (RFC 8460 §4.4 `mx-host`).
        let mx_hosts = match tls.policy_type {
            PolicyType::Sts => tls
                .policy_strings
                .iter()
                .filter_map(|l| l.strip_prefix("mx:").map(|m| m.trim().to_string()))
                .collect(),
            _ => Vec::new(),
        };
        let outcome = match tls.result {
            ResultType::Success => Ok(()),
            result => Err(Failure {
                result,
                sending_mta_ip: None,
                receiving_ip,
                receiving_mx_hostname: tls.mx_host.clone(),
                additional: tls.failure.clone().unwrap_or_default(),
            }),
        };
        Some(Session {
            policy: Policy {
                kind: tls.policy_type,
                domain,
                strings: tls.policy_strings.clone(),
                mx_hosts,
            },
            outcome,
        })
    }
}

/// The counts of one policy on one day.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyTally {
    pub successful: u64,
    pub failed: u64,
    /// Failed sessions by detail, at most [`FAILURE_DETAILS_MAX`] distinct ones.
    pub failures: BTreeMap<Failure, u64>,
}

impl PolicyTally {
    fn add_failure(&mut self, f: Failure, n: u64) {
        self.failed += n;
        if let Some(c) = self.failures.get_mut(&f) {
            *c += n;
        } else if self.failures.len() < FAILURE_DETAILS_MAX {
            self.failures.insert(f, n);
        }
    }

    fn merge(&mut self, other: PolicyTally) {
        self.successful += other.successful;
        // The summary counts every failure, the details as many as fit.
        let detailed: u64 = other.failures.values().sum();
        self.failed += other.failed - detailed;
        for (f, n) in other.failures {
            self.add_failure(f, n);
        }
    }
}

/// One shard's counts: per day, per policy domain, per policy. The days kept are the current
/// one and those not yet reported (a report is taken once the day has ended).
#[derive(Clone, Debug)]
pub struct Tally {
    period_ms: u64,
    days: BTreeMap<u64, HashMap<String, BTreeMap<Policy, PolicyTally>>>,
    /// Sessions not counted because a day already had [`POLICY_DOMAINS_MAX`] domains.
    pub dropped: u64,
}

impl Default for Tally {
    fn default() -> Tally {
        Tally::new(DAY_MS)
    }
}

impl Tally {
    /// A tally over periods of `period_ms` (a day, but for tests).
    pub fn new(period_ms: u64) -> Tally {
        Tally {
            period_ms: period_ms.max(1),
            days: BTreeMap::new(),
            dropped: 0,
        }
    }

    pub fn period_ms(&self) -> u64 {
        self.period_ms
    }

    /// The period `now_ms` falls in.
    pub fn period_of(&self, now_ms: u64) -> u64 {
        now_ms / self.period_ms
    }

    /// Count a session that happened at `now_ms`.
    pub fn record(&mut self, now_ms: u64, s: Session) {
        let day = self.days.entry(now_ms / self.period_ms).or_default();
        if !day.contains_key(&s.policy.domain) && day.len() >= POLICY_DOMAINS_MAX {
            self.dropped += 1;
            return;
        }
        let tally = day
            .entry(s.policy.domain.clone())
            .or_default()
            .entry(s.policy)
            .or_default();
        match s.outcome {
            Ok(()) => tally.successful += 1,
            Err(f) => tally.add_failure(f, 1),
        }
    }

    /// Take out every period before `day` (those that have ended), oldest first.
    pub fn take_before(&mut self, day: u64) -> Vec<DayTally> {
        let keep = self.days.split_off(&day);
        let done = std::mem::replace(&mut self.days, keep);
        done.into_iter()
            .map(|(day, domains)| DayTally { day, domains })
            .collect()
    }

    /// The counts as JSON, to keep them across a restart (`Tally::load`).
    pub fn save(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut entries = Vec::new();
        for (&period, domains) in &self.days {
            for policies in domains.values() {
                for (policy, t) in policies {
                    entries.push(SavedEntry {
                        period,
                        policy: policy.clone(),
                        successful: t.successful,
                        failed: t.failed,
                        failures: t.failures.iter().map(|(f, n)| (f.clone(), *n)).collect(),
                    });
                }
            }
        }
        serde_json::to_vec(&Saved {
            period_ms: self.period_ms,
            dropped: self.dropped,
            entries,
        })
    }

    /// Counts saved by [`Tally::save`], onto a tally over periods of `period_ms` (a saved
    /// count whose period length differs is placed in the period its start falls in).
    pub fn load(bytes: &[u8], period_ms: u64) -> Result<Tally, serde_json::Error> {
        let saved: Saved = serde_json::from_slice(bytes)?;
        let mut t = Tally::new(period_ms);
        t.dropped = saved.dropped;
        for e in saved.entries {
            let period = e.period.saturating_mul(saved.period_ms.max(1)) / t.period_ms;
            let day = t.days.entry(period).or_default();
            let tally = day
                .entry(e.policy.domain.clone())
                .or_default()
                .entry(e.policy)
                .or_default();
            tally.merge(PolicyTally {
                successful: e.successful,
                failed: e.failed,
                failures: e.failures.into_iter().collect(),
            });
        }
        Ok(t)
    }

    /// Nothing counted.
    pub fn is_empty(&self) -> bool {
        self.days.is_empty()
    }

    /// Policy domains counted today (for metrics and tests).
    pub fn domains_on(&self, day: u64) -> usize {
        self.days.get(&day).map_or(0, HashMap::len)
    }
}

#[derive(Serialize, Deserialize)]
struct Saved {
    period_ms: u64,
    dropped: u64,
    entries: Vec<SavedEntry>,
}

#[derive(Serialize, Deserialize)]
struct SavedEntry {
    period: u64,
    policy: Policy,
    successful: u64,
    failed: u64,
    failures: Vec<(Failure, u64)>,
}

/// One ended day of counts, from one shard or merged from all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DayTally {
    pub day: u64,
    pub domains: HashMap<String, BTreeMap<Policy, PolicyTally>>,
}

impl DayTally {
    /// Add another shard's counts of the same day.
    pub fn merge(&mut self, other: DayTally) {
        debug_assert_eq!(self.day, other.day);
        for (domain, policies) in other.domains {
            let mine = self.domains.entry(domain).or_default();
            for (p, t) in policies {
                mine.entry(p).or_default().merge(t);
            }
        }
    }
}

/// Merge every shard's ended days into one tally per day, oldest first.
pub fn merge_days(parts: impl IntoIterator<Item = Vec<DayTally>>) -> Vec<DayTally> {
    let mut by_day: BTreeMap<u64, DayTally> = BTreeMap::new();
    for part in parts {
        for d in part {
            match by_day.get_mut(&d.day) {
                Some(m) => m.merge(d),
                None => {
                    by_day.insert(d.day, d);
                }
            }
        }
    }
    by_day.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sts(domain: &str) -> Policy {
        Policy {
            kind: PolicyType::Sts,
            domain: domain.to_string(),
            strings: vec!["version: STSv1".into(), "mode: enforce".into()],
            mx_hosts: vec!["mx.example.com".into()],
        }
    }

    fn fail(result: ResultType, mx: &str) -> Failure {
        Failure {
            result,
            sending_mta_ip: None,
            receiving_ip: "192.0.2.1".parse().ok(),
            receiving_mx_hostname: mx.into(),
            additional: String::new(),
        }
    }

    #[test]
    fn counts_by_day_domain_and_policy() {
        let mut t = Tally::default();
        let day0 = 20_000 * DAY_MS;
        for _ in 0..3 {
            t.record(
                day0 + 5,
                Session {
                    policy: sts("a.test"),
                    outcome: Ok(()),
                },
            );
        }
        t.record(
            day0 + 6,
            Session {
                policy: sts("a.test"),
                outcome: Err(fail(ResultType::CertificateHostMismatch, "mx.a.test")),
            },
        );
        t.record(
            day0 + DAY_MS,
            Session {
                policy: sts("a.test"),
                outcome: Ok(()),
            },
        );
        let ended = t.take_before(20_001);
        assert_eq!(ended.len(), 1);
        let p = &ended[0].domains["a.test"][&sts("a.test")];
        assert_eq!((p.successful, p.failed), (3, 1));
        assert_eq!(p.failures.len(), 1);
        // The next day stays until it ends.
        assert_eq!(t.domains_on(20_001), 1);
        assert!(t.take_before(20_001).is_empty());
    }

    #[test]
    fn merging_shards_adds_counts_and_keeps_details_bounded() {
        let mut a = Tally::default();
        let mut b = Tally::default();
        for i in 0..FAILURE_DETAILS_MAX {
            a.record(
                0,
                Session {
                    policy: sts("x.test"),
                    outcome: Err(fail(ResultType::ValidationFailure, &format!("mx{i}"))),
                },
            );
        }
        b.record(
            1,
            Session {
                policy: sts("x.test"),
                outcome: Err(fail(ResultType::ValidationFailure, "other")),
            },
        );
        b.record(
            2,
            Session {
                policy: sts("x.test"),
                outcome: Err(fail(ResultType::ValidationFailure, "mx0")),
            },
        );
        b.record(
            3,
            Session {
                policy: sts("x.test"),
                outcome: Ok(()),
            },
        );
        let merged = merge_days([a.take_before(1), b.take_before(1)]);
        assert_eq!(merged.len(), 1);
        let p = &merged[0].domains["x.test"][&sts("x.test")];
        assert_eq!(p.successful, 1);
        assert_eq!(p.failed, FAILURE_DETAILS_MAX as u64 + 2);
        assert_eq!(p.failures.len(), FAILURE_DETAILS_MAX);
        assert_eq!(p.failures[&fail(ResultType::ValidationFailure, "mx0")], 2);
    }

    #[test]
    fn the_domain_bound_drops_and_counts() {
        let mut t = Tally::default();
        for i in 0..POLICY_DOMAINS_MAX + 5 {
            t.record(
                0,
                Session {
                    policy: sts(&format!("d{i}.test")),
                    outcome: Ok(()),
                },
            );
        }
        assert_eq!(t.domains_on(0), POLICY_DOMAINS_MAX);
        assert_eq!(t.dropped, 5);
    }

    #[test]
    fn a_saved_tally_loads_the_same() {
        let mut t = Tally::new(1000);
        t.record(
            1500,
            Session {
                policy: sts("a.test"),
                outcome: Err(fail(ResultType::StsPolicyFetchError, "")),
            },
        );
        t.record(
            2500,
            Session {
                policy: sts("b.test"),
                outcome: Ok(()),
            },
        );
        let bytes = t.save().expect("save");
        let mut back = Tally::load(&bytes, 1000).expect("load");
        assert_eq!(back.take_before(10), t.clone().take_before(10));
        assert!(Tally::load(b"{not json", 1000).is_err());
        // A different period length: counts land where their period started.
        let mut day = Tally::load(&bytes, DAY_MS).expect("load");
        let ended = day.take_before(1);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].domains.len(), 2);
    }
}
