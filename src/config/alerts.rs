//! The alert tables of the configuration: `[alerts]` (how often rules are evaluated) and
//! `[[alert]]` (one rule each). Checked here, compiled by `metrics::alerts::Rules::new`.

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

/// `alerts.interval_s` unless set: alerting is sampled, and ten seconds is well under the
/// minutes-long windows operators set while the gather it costs stays negligible.
pub const ALERT_INTERVAL_S_DEFAULT: u64 = 10;
/// `min_attempts` unless set: below twenty attempts a rate is mostly noise.
pub const MIN_ATTEMPTS_DEFAULT: u64 = 20;
/// Rules at most: each is evaluated against every site at every interval.
pub const ALERT_RULES_MAX: usize = 64;

/// `[alerts]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsSection {
    /// Seconds between evaluations (on shard 0).
    pub interval_s: u64,
}

impl Default for AlertsSection {
    fn default() -> Self {
        AlertsSection {
            interval_s: ALERT_INTERVAL_S_DEFAULT,
        }
    }
}

/// What a rule watches.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// Bounced / attempts of a site over a window, above `above_pct`.
    BounceRate,
    /// Transient failures / attempts of a site over a window, above `above_pct`.
    DeferralRate,
    /// The oldest queued message older than `above_s`.
    OldestMessage,
    /// The spool's filesystem more than `above_pct` used.
    SpoolDisk,
    /// An egress source (matching `source`) out of rotation.
    SourceOutOfRotation,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::BounceRate => "bounce_rate",
            AlertKind::DeferralRate => "deferral_rate",
            AlertKind::OldestMessage => "oldest_message",
            AlertKind::SpoolDisk => "spool_disk",
            AlertKind::SourceOutOfRotation => "source_out_of_rotation",
        }
    }

    fn is_rate(self) -> bool {
        matches!(self, AlertKind::BounceRate | AlertKind::DeferralRate)
    }
}

/// `[[alert]]`: one rule.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AlertEntry {
    pub name: String,
    pub kind: AlertKind,
    /// Rates: the sites watched, a glob on the site key (see `route::DomainGlob`); `*` unless
    /// set. Each matching site is a subject of its own.
    pub site: Option<String>,
    /// source_out_of_rotation: the sources watched (a glob on the name); `*` unless set.
    pub source: Option<String>,
    /// Rates and spool_disk: the threshold, in percent.
    pub above_pct: Option<f64>,
    /// oldest_message: the threshold, in seconds.
    pub above_s: Option<u64>,
    /// Rates: the window, in minutes (or `window_s` for short ones, as tests use).
    pub window_min: Option<u64>,
    pub window_s: Option<u64>,
    /// Rates: attempts in the window below which the rule says nothing.
    pub min_attempts: Option<u64>,
}

impl AlertEntry {
    /// The window of a rate rule in ms (`window_s` wins over `window_min`).
    pub fn window_ms(&self) -> u64 {
        match (self.window_s, self.window_min) {
            (Some(s), _) => s.saturating_mul(1000),
            (None, Some(m)) => m.saturating_mul(60_000),
            (None, None) => 0,
        }
    }

    /// The threshold the rule compares with.
    pub fn threshold(&self) -> f64 {
        match self.kind {
            AlertKind::OldestMessage => self.above_s.unwrap_or(0) as f64,
            AlertKind::SourceOutOfRotation => 0.0,
            _ => self.above_pct.unwrap_or(0.0),
        }
    }
}

/// Check the rules: the keys each kind needs, and nothing another kind would ignore.
pub fn validate(section: &AlertsSection, rules: &[AlertEntry]) -> Result<(), ConfigError> {
    if section.interval_s == 0 {
        return Err(invalid("alerts.interval_s", "must be at least 1"));
    }
    if rules.len() > ALERT_RULES_MAX {
        return Err(invalid(
            "alert",
            format!("at most {ALERT_RULES_MAX} rules (got {})", rules.len()),
        ));
    }
    let mut names = std::collections::BTreeSet::new();
    for r in rules {
        if r.name.trim().is_empty() {
            return Err(invalid("alert.name", "must not be empty"));
        }
        if !names.insert(r.name.as_str()) {
            return Err(invalid("alert.name", format!("`{}` is used twice", r.name)));
        }
        let needs = |ok: bool, key: &'static str, what: &str| match ok {
            true => Ok(()),
            false => Err(invalid(
                key,
                format!("alert `{}` ({}): {what}", r.name, r.kind.as_str()),
            )),
        };
        let pct_ok = r.above_pct.is_some_and(|p| (0.0..=100.0).contains(&p));
        match r.kind {
            k if k.is_rate() => {
                needs(
                    pct_ok,
                    "alert.above_pct",
                    "needs a percentage from 0 to 100",
                )?;
                needs(
                    r.window_ms() > 0,
                    "alert.window_min",
                    "needs `window_min` or `window_s`",
                )?;
                needs(
                    r.window_ms() >= section.interval_s * 1000,
                    "alert.window_s",
                    &format!(
                        "the window must be at least alerts.interval_s ({} s)",
                        section.interval_s
                    ),
                )?;
                needs(
                    r.above_s.is_none() && r.source.is_none(),
                    "alert.above_s",
                    "takes no `above_s` or `source`",
                )?;
            }
            AlertKind::SpoolDisk => {
                needs(
                    pct_ok,
                    "alert.above_pct",
                    "needs a percentage from 0 to 100",
                )?;
                needs(
                    r.site.is_none() && r.source.is_none() && r.above_s.is_none(),
                    "alert.site",
                    "takes only `above_pct`",
                )?;
            }
            AlertKind::OldestMessage => {
                needs(r.above_s.is_some(), "alert.above_s", "needs `above_s`")?;
                needs(
                    r.site.is_none() && r.source.is_none() && r.above_pct.is_none(),
                    "alert.site",
                    "takes only `above_s`",
                )?;
            }
            _ => {
                needs(
                    r.site.is_none() && r.above_pct.is_none() && r.above_s.is_none(),
                    "alert.site",
                    "takes only `source`",
                )?;
            }
        }
        for glob in [&r.site, &r.source].into_iter().flatten() {
            crate::route::DomainGlob::new(glob)
                .map_err(|e| invalid("alert.site", format!("alert `{}`: {e}", r.name)))?;
        }
    }
    Ok(())
}
