//! Alert rules, decided without I/O: fed a [`Sample`] of the merged metrics and `now`, the
//! [`Engine`] returns the rules that started or stopped firing.
//!
//! Alerting is sampled: shard 0 gathers the metrics every `alerts.interval_s` and feeds
//! them here, so an alert fires up to one interval after its condition holds, and a condition
//! that comes and goes between two samples is not seen (the rates are windowed over many
//! samples, so for them nothing is lost but the timing).
//!
//! Rates (bounce_rate, deferral_rate) are over a window of [`WINDOW_BUCKETS`] time buckets per
//! (rule, site): each sample adds the attempts since the previous one (the difference of the
//! cumulative per-site counts) to the bucket of `now`; buckets older than the window drop
//! out. A rate fires above its threshold with at least `min_attempts` in the window, and
//! resolves when either no longer holds (a window that emptied says nothing is wrong any
//! more). Invariant: an alert is active at most once per (rule, subject), and every resolve
//! follows a fire of the same (rule, subject).

use std::collections::{BTreeMap, VecDeque};

use crate::config::{AlertEntry, AlertKind};
use crate::route::DomainGlob;

use super::{Outcomes, OTHER};

/// Buckets per window: the window slides in steps of a thirtieth of its length.
pub const WINDOW_BUCKETS: u64 = 30;
/// Subjects (sites) a rate rule keeps windows for: the sites metrics track are capped
/// already (`SITES_TRACKED_MAX` per shard); this caps their union over shards.
pub const SUBJECTS_MAX: usize = 4096;

/// An alert firing (or, in a resolve, the last of it).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Active {
    pub rule: String,
    pub kind: AlertKind,
    /// The site, source, `queue` or `spool` it is about.
    pub subject: String,
    pub value: f64,
    pub threshold: f64,
    pub since_ms: u64,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Transition {
    Fire(Active),
    Resolve(Active),
}

/// What the rules look at, at one instant.
pub struct Sample<'a> {
    pub now_ms: u64,
    /// Cumulative attempts per site (all shards).
    pub sites: &'a BTreeMap<String, Outcomes>,
    pub oldest_ms: Option<u64>,
    /// None: not known (statvfs failed).
    pub disk_used_pct: Option<f64>,
    pub sources_down: &'a [String],
}

/// One rule's finding on one subject at a sample: (rule index, subject, Some((value,
/// message)) when over its threshold).
type Verdict = (usize, String, Option<(f64, String)>);

struct Rule {
    entry: AlertEntry,
    glob: Option<DomainGlob>,
    window_ms: u64,
    min_attempts: u64,
    /// Rates: per site, buckets of (start ms, attempts, hits), oldest first.
    windows: BTreeMap<String, VecDeque<(u64, u64, u64)>>,
}

impl Rule {
    fn bucket_ms(&self) -> u64 {
        (self.window_ms / WINDOW_BUCKETS).max(1)
    }

    /// Add a sample's delta for `site` and return the window's (attempts, hits).
    fn slide(&mut self, site: &str, now_ms: u64, attempts: u64, hits: u64) -> (u64, u64) {
        let bucket_ms = self.bucket_ms();
        let start = now_ms - now_ms % bucket_ms;
        let horizon = now_ms.saturating_sub(self.window_ms);
        if !self.windows.contains_key(site) && self.windows.len() >= SUBJECTS_MAX {
            return (0, 0);
        }
        let w = self.windows.entry(site.to_owned()).or_default();
        match w.back_mut() {
            Some(b) if b.0 == start => {
                b.1 += attempts;
                b.2 += hits;
            }
            _ if attempts > 0 => w.push_back((start, attempts, hits)),
            _ => {}
        }
        // A bucket counts while any of it is inside the window.
        while w.front().is_some_and(|b| b.0 + bucket_ms <= horizon) {
            w.pop_front();
        }
        w.iter().fold((0, 0), |(a, h), b| (a + b.1, h + b.2))
    }
}

pub struct Engine {
    rules: Vec<Rule>,
    /// The cumulative per-site counts of the previous sample.
    last: BTreeMap<String, Outcomes>,
    active: BTreeMap<(usize, String), Active>,
}

impl Engine {
    /// Rules as configured (validated: globs compile, kinds have their keys).
    pub fn new(entries: &[AlertEntry]) -> Engine {
        let rules = entries
            .iter()
            .map(|e| Rule {
                glob: match e.kind {
                    AlertKind::SourceOutOfRotation => e.source.as_deref(),
                    _ => e.site.as_deref(),
                }
                .and_then(|g| DomainGlob::new(g).ok()),
                window_ms: e.window_ms(),
                min_attempts: e
                    .min_attempts
                    .unwrap_or(crate::config::alerts::MIN_ATTEMPTS_DEFAULT),
                entry: e.clone(),
                windows: BTreeMap::new(),
            })
            .collect();
        Engine {
            rules,
            last: BTreeMap::new(),
            active: BTreeMap::new(),
        }
    }

    /// Whether these are the rules the engine runs (a reload may change them).
    pub fn runs(&self, entries: &[AlertEntry]) -> bool {
        self.rules.len() == entries.len()
            && self.rules.iter().zip(entries).all(|(r, e)| r.entry == *e)
    }

    /// Alerts firing now, by rule then subject.
    pub fn active(&self) -> Vec<Active> {
        self.active.values().cloned().collect()
    }

    /// Evaluate every rule on `s`: what started firing and what stopped.
    pub fn evaluate(&mut self, s: &Sample<'_>) -> Vec<Transition> {
        // Per-site attempts since the last sample (counters only grow; one that went back
        // is taken as new).
        let deltas: Vec<(&String, Outcomes)> = s
            .sites
            .iter()
            .filter(|(site, _)| site.as_str() != OTHER)
            .map(|(site, now)| {
                let before = self.last.get(site).copied().unwrap_or_default();
                let d = match now.attempts() >= before.attempts() {
                    true => Outcomes {
                        delivered: now.delivered.saturating_sub(before.delivered),
                        deferred: now.deferred.saturating_sub(before.deferred),
                        bounced: now.bounced.saturating_sub(before.bounced),
                        expired: now.expired.saturating_sub(before.expired),
                    },
                    false => *now,
                };
                (site, d)
            })
            .collect();
        let mut verdicts: Vec<Verdict> = Vec::new();
        for (i, rule) in self.rules.iter_mut().enumerate() {
            let e = &rule.entry;
            let threshold = e.threshold();
            match e.kind {
                AlertKind::BounceRate | AlertKind::DeferralRate => {
                    let bounce = e.kind == AlertKind::BounceRate;
                    let window_s = rule.window_ms / 1000;
                    let mut seen: Vec<String> = Vec::new();
                    for (site, d) in &deltas {
                        if !rule.glob.as_ref().is_none_or(|g| g.matches(site)) {
                            continue;
                        }
                        let hits = match bounce {
                            true => d.bounced + d.expired,
                            false => d.deferred,
                        };
                        let (attempts, hits) = rule.slide(site, s.now_ms, d.attempts(), hits);
                        seen.push((*site).clone());
                        let pct = pct(hits, attempts);
                        let over = attempts >= rule.min_attempts && attempts > 0 && pct > threshold;
                        let what = if bounce { "bounce" } else { "deferral" };
                        verdicts.push((
                            i,
                            (*site).clone(),
                            over.then(|| {
                                (
                                    pct,
                                    format!("{what} rate of {site} {pct:.1}% over {window_s} s ({hits} of {attempts} attempts), above {threshold}%"),
                                )
                            }),
                        ));
                    }
                    // Sites no longer in the sample (none are dropped today): their windows
                    // and alerts end.
                    rule.windows.retain(|k, _| seen.contains(k));
                }
                AlertKind::OldestMessage => {
                    let age_s = s.oldest_ms.map_or(0, |o| s.now_ms.saturating_sub(o) / 1000);
                    let over = age_s as f64 > threshold;
                    verdicts.push((
                        i,
                        "queue".into(),
                        over.then(|| {
                            (
                                age_s as f64,
                                format!("oldest message is {age_s} s old, above {threshold} s"),
                            )
                        }),
                    ));
                }
                AlertKind::SpoolDisk => {
                    let over = s.disk_used_pct.filter(|&p| p > threshold);
                    verdicts.push((
                        i,
                        "spool".into(),
                        over.map(|p| {
                            (
                                p,
                                format!("spool filesystem {p:.1}% used, above {threshold}%"),
                            )
                        }),
                    ));
                }
                AlertKind::SourceOutOfRotation => {
                    for src in s.sources_down {
                        if rule.glob.as_ref().is_none_or(|g| g.matches(src)) {
                            verdicts.push((
                                i,
                                src.clone(),
                                Some((1.0, format!("egress source {src} is out of rotation"))),
                            ));
                        }
                    }
                }
            }
        }
        self.last = s.sites.clone();
        self.apply(verdicts, s.now_ms)
    }

    /// Turn this sample's verdicts into transitions; active alerts without a verdict (their
    /// subject is gone: a source back in rotation) resolve.
    fn apply(&mut self, verdicts: Vec<Verdict>, now_ms: u64) -> Vec<Transition> {
        let mut out = Vec::new();
        let mut firing: std::collections::BTreeSet<(usize, String)> = Default::default();
        for (i, subject, verdict) in verdicts {
            let Some((value, message)) = verdict else {
                continue;
            };
            let key = (i, subject);
            firing.insert(key.clone());
            match self.active.get_mut(&key) {
                Some(a) => {
                    a.value = value;
                    a.message = message;
                }
                None => {
                    let e = &self.rules[i].entry;
                    let a = Active {
                        rule: e.name.clone(),
                        kind: e.kind,
                        subject: key.1.clone(),
                        value,
                        threshold: e.threshold(),
                        since_ms: now_ms,
                        message,
                    };
                    out.push(Transition::Fire(a.clone()));
                    self.active.insert(key, a);
                }
            }
        }
        let ended: Vec<(usize, String)> = self
            .active
            .keys()
            .filter(|k| !firing.contains(*k))
            .cloned()
            .collect();
        for key in ended {
            if let Some(mut a) = self.active.remove(&key) {
                a.message = format!("resolved: {}", a.message);
                out.push(Transition::Resolve(a));
            }
        }
        out
    }
}

fn pct(hits: u64, attempts: u64) -> f64 {
    match attempts {
        0 => 0.0,
        n => hits as f64 * 100.0 / n as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(toml_text: &str) -> AlertEntry {
        toml::from_str(toml_text).expect("alert entry")
    }

    fn sites(rows: &[(&str, u64, u64, u64)]) -> BTreeMap<String, Outcomes> {
        rows.iter()
            .map(|&(s, delivered, deferred, bounced)| {
                (
                    s.to_string(),
                    Outcomes {
                        delivered,
                        deferred,
                        bounced,
                        expired: 0,
                    },
                )
            })
            .collect()
    }

    fn sample<'a>(now_ms: u64, sites: &'a BTreeMap<String, Outcomes>) -> Sample<'a> {
        Sample {
            now_ms,
            sites,
            oldest_ms: None,
            disk_used_pct: None,
            sources_down: &[],
        }
    }

    const BOUNCES: &str = r#"
        name = "bounces"
        kind = "bounce_rate"
        site = "*.example"
        above_pct = 10.0
        window_s = 60
        min_attempts = 10
    "#;

    #[test]
    fn a_bounce_rate_fires_once_and_resolves_when_the_window_passes() {
        let mut e = Engine::new(&[rule(BOUNCES)]);
        let t0 = 1_000_000;
        // 9 attempts, all bounced: under min_attempts, nothing.
        assert!(e
            .evaluate(&sample(t0, &sites(&[("mx.example", 0, 0, 9)])))
            .is_empty());
        // 20 attempts, 11 bounced: 55% > 10%.
        let s = sites(&[("mx.example", 9, 0, 11), ("mx.other", 0, 0, 50)]);
        let t = e.evaluate(&sample(t0 + 10_000, &s));
        assert_eq!(t.len(), 1, "{t:?}");
        let Transition::Fire(a) = &t[0] else {
            panic!("{t:?}")
        };
        assert_eq!(
            (a.rule.as_str(), a.subject.as_str()),
            ("bounces", "mx.example")
        );
        assert!((a.value - 55.0).abs() < 1e-9);
        assert_eq!(a.since_ms, t0 + 10_000);
        // Still over: no new transition, one active alert.
        let s = sites(&[("mx.example", 9, 0, 15)]);
        assert!(e.evaluate(&sample(t0 + 20_000, &s)).is_empty());
        assert_eq!(e.active().len(), 1);
        // No more attempts: once the window slid past them, it resolves.
        assert!(
            e.evaluate(&sample(t0 + 50_000, &s)).is_empty(),
            "still in the window"
        );
        let t = e.evaluate(&sample(t0 + 90_000, &s));
        assert!(
            matches!(&t[..], [Transition::Resolve(a)] if a.subject == "mx.example"),
            "{t:?}"
        );
        assert!(e.active().is_empty());
    }

    #[test]
    fn a_rate_under_its_threshold_does_not_fire_and_deliveries_resolve_it() {
        let mut e = Engine::new(&[rule(BOUNCES)]);
        let t0 = 5_000_000;
        // 100 attempts, 5 bounced: 5%.
        assert!(e
            .evaluate(&sample(t0, &sites(&[("a.example", 95, 0, 5)])))
            .is_empty());
        // Then 20 bounces: 25 of 120, 20.8%: fires.
        let t = e.evaluate(&sample(t0 + 1_000, &sites(&[("a.example", 95, 0, 25)])));
        assert!(matches!(&t[..], [Transition::Fire(_)]), "{t:?}");
        // 200 deliveries: 25 of 320, 7.8%: resolves within the same window.
        let t = e.evaluate(&sample(t0 + 2_000, &sites(&[("a.example", 295, 0, 25)])));
        assert!(matches!(&t[..], [Transition::Resolve(_)]), "{t:?}");
    }

    #[test]
    fn deferral_oldest_disk_and_sources() {
        let mut e = Engine::new(&[
            rule("name = \"d\"\nkind = \"deferral_rate\"\nabove_pct = 50.0\nwindow_min = 5\nmin_attempts = 1"),
            rule("name = \"o\"\nkind = \"oldest_message\"\nabove_s = 600"),
            rule("name = \"s\"\nkind = \"spool_disk\"\nabove_pct = 90.0"),
            rule("name = \"r\"\nkind = \"source_out_of_rotation\"\nsource = \"ip-*\""),
        ]);
        let s = sites(&[("x", 1, 3, 0)]);
        let down = vec!["ip-1".to_string(), "other".to_string()];
        let t = e.evaluate(&Sample {
            now_ms: 1_000_000,
            sites: &s,
            oldest_ms: Some(1_000_000 - 601_000),
            disk_used_pct: Some(95.5),
            sources_down: &down,
        });
        let fired: Vec<(String, String)> = t
            .iter()
            .map(|t| match t {
                Transition::Fire(a) => (a.rule.clone(), a.subject.clone()),
                Transition::Resolve(a) => panic!("resolve {a:?}"),
            })
            .collect();
        assert_eq!(
            fired,
            [("d", "x"), ("o", "queue"), ("s", "spool"), ("r", "ip-1")]
                .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        // Everything fine again: all four resolve.
        let t = e.evaluate(&Sample {
            now_ms: 1_001_000,
            sites: &sites(&[("x", 100, 3, 0)]),
            oldest_ms: None,
            disk_used_pct: Some(10.0),
            sources_down: &[],
        });
        assert_eq!(
            t.iter()
                .filter(|t| matches!(t, Transition::Resolve(_)))
                .count(),
            4,
            "{t:?}"
        );
    }

    #[test]
    fn validation_names_the_key() {
        let bad = |text: &str| {
            let r = rule(text);
            crate::config::alerts::validate(&Default::default(), &[r])
                .expect_err("refused")
                .to_string()
        };
        assert!(bad("name = \"a\"\nkind = \"bounce_rate\"\nabove_pct = 5.0")
            .contains("alert.window_min"));
        assert!(
            bad("name = \"a\"\nkind = \"bounce_rate\"\nabove_pct = 500.0\nwindow_min = 1")
                .contains("alert.above_pct")
        );
        assert!(
            bad("name = \"a\"\nkind = \"bounce_rate\"\nabove_pct = 5.0\nwindow_s = 2")
                .contains("alert.window_s")
        );
        assert!(bad("name = \"a\"\nkind = \"oldest_message\"").contains("alert.above_s"));
        assert!(
            bad("name = \"a\"\nkind = \"spool_disk\"\nabove_pct = 5.0\nsite = \"x\"")
                .contains("alert.site")
        );
    }
}
