//! Adaptive shaping: rules that watch failed replies and, when a site keeps saying the same
//! thing, suspend or throttle the (site, source) that hears it (KumoMTA's traffic shaping
//! automation, built in).
//!
//! A rule matches a reply by a regex on its line (`421 4.7.0 text`) and/or by its bounce
//! category, optionally only at sites whose MX hosts match a glob. [`AdaptiveRules::matching`]
//! runs on the shard that saw the reply and names the rules that match; the owner of the
//! (site, source) key counts them in its [`Tracker`], which says when a rule's threshold is
//! reached and for how long its action lasts. All regexes are one `RegexSet`: a reply is
//! scanned once whatever the number of rules.
//!
//! No I/O; time comes in as a parameter (`now_ms`, Unix ms).

use crate::config::AdaptiveEntry;
use std::fmt;

use regex::{RegexBuilder, RegexSet, RegexSetBuilder};
use smallvec::SmallVec;

use super::rate::Rate;
use crate::bounce::Category;
use crate::config::ConfigError;
use crate::route::DomainGlob;

mod tracker;

pub use tracker::{Tracker, Trigger, TRACKED_KEYS_MAX};

/// Rules in `[[adaptive]]`. Every failed reply is checked against all of them, and a rule's
/// index must fit the `u16` the mesh carries; a few dozen is typical.
pub const RULES_MAX: usize = 256;
/// The largest threshold count: the tracker keeps that many timestamps per (rule, key), and a
/// rule that waits for more than a thousand failures is not reacting to anything.
pub const THRESHOLD_COUNT_MAX: u32 = 1000;
/// Threshold periods: a second (finer is noise) to a day (what `Rate` allows).
pub const THRESHOLD_PERIOD_MS_MIN: u64 = 1_000;
pub const THRESHOLD_PERIOD_MS_MAX: u64 = super::rate::PERIOD_MS_MAX;
/// Action durations: a second to a week. Longer than a week is a decision for an operator,
/// not an automatic one.
pub const DURATION_MS_MIN: u64 = 1_000;
pub const DURATION_MS_MAX: u64 = 7 * 86_400_000;
/// Reply lines up to this length are matched from a stack buffer; RFC 5321 caps a reply line
/// at 512 octets, so only joined multi-line replies take the allocating path.
const REPLY_LINE_LEN_MAX: usize = 1024;
/// Regex set compiled size bound (the bounce classifier's reasoning: case-insensitive
/// patterns are big, and the default is per regex).
const REGEX_SIZE_MAX: usize = 16 << 20;

const _: () = assert!(RULES_MAX <= u16::MAX as usize);
const _: () = assert!(Category::ALL.len() <= 32, "categories are a u32 bitmask");

/// N matches within a period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Threshold {
    pub count: u32,
    pub period_ms: u64,
}

impl Threshold {
    /// `5/60s`, `5/min`, `5 in 60s`, `5 in 10 minutes`.
    pub fn parse(text: &str) -> Result<Threshold, String> {
        let bad = || format!("`{text}` is not a threshold like `5/60s` or `5 in 10m`");
        let (n, per) = text
            .split_once('/')
            .or_else(|| text.split_once(" in "))
            .ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        let period_ms = parse_span_ms(per).ok_or_else(bad)?;
        if count == 0 || count > THRESHOLD_COUNT_MAX {
            return Err(format!(
                "`{text}`: the count must be 1 to {THRESHOLD_COUNT_MAX}"
            ));
        }
        if !(THRESHOLD_PERIOD_MS_MIN..=THRESHOLD_PERIOD_MS_MAX).contains(&period_ms) {
            return Err(format!("`{text}`: the period must be 1 s to a day"));
        }
        Ok(Threshold { count, period_ms })
    }
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} in {}s", self.count, self.period_ms as f64 / 1000.0)
    }
}

/// `30s`, `10m`, `2h`, `1d` (also `10 min`, `2 hours`; a bare unit is one of it) in ms.
pub fn parse_span_ms(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let n: u64 = match digits {
        0 => 1,
        _ => text[..digits].parse().ok()?,
    };
    let unit_ms = match text[digits..].trim() {
        "s" | "sec" | "secs" | "second" | "seconds" => 1_000,
        "m" | "min" | "mins" | "minute" | "minutes" => 60_000,
        "h" | "hr" | "hrs" | "hour" | "hours" => 3_600_000,
        "d" | "day" | "days" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(unit_ms)
}

/// What a triggered rule does to its (site, source), for its duration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Action {
    /// No deliveries from the source to the site.
    Suspend,
    /// Slower: a rate of its own, the configured rate scaled, and/or fewer connections.
    Throttle {
        message_rate: Option<Rate>,
        rate_factor: Option<f64>,
        connections_max: Option<u32>,
    },
    /// No deliveries to the site for the tenant of the message that triggered it.
    SuspendTenant,
    /// No deliveries to the site for the campaign of the message that triggered it.
    SuspendCampaign,
    /// Fail the site's queued messages for the source permanently.
    Bounce,
}

impl Action {
    /// The name as configured (event lines, summaries).
    pub fn name(&self) -> &'static str {
        match self {
            Action::Suspend => "suspend",
            Action::Throttle { .. } => "throttle",
            Action::SuspendTenant => "suspend_tenant",
            Action::SuspendCampaign => "suspend_campaign",
            Action::Bounce => "bounce",
        }
    }
}

/// One rule, compiled.
#[derive(Clone, Debug)]
pub struct AdaptiveRule {
    pub name: String,
    pub action: Action,
    pub duration_ms: u64,
    pub threshold: Threshold,
    pub site: Option<DomainGlob>,
    /// Index of the rule's regex in the set.
    pattern: Option<u16>,
    /// Bit `c as u32` for each category that matches.
    categories: u32,
}

/// Every `[[adaptive]]` rule, with their regexes in one set. Clone it per shard: a clone has
/// regex caches of its own, so shards do not contend for them.
#[derive(Clone, Debug, Default)]
pub struct AdaptiveRules {
    rules: Vec<AdaptiveRule>,
    set: Option<RegexSet>,
}

impl AdaptiveRules {
    pub fn from_entries(entries: &[AdaptiveEntry]) -> Result<AdaptiveRules, ConfigError> {
        if entries.len() > RULES_MAX {
            return Err(crate::config::invalid(
                "adaptive",
                format!("{} rules, at most {RULES_MAX}", entries.len()),
            ));
        }
        let mut rules = Vec::with_capacity(entries.len());
        let mut patterns = Vec::new();
        for (index, e) in entries.iter().enumerate() {
            let err = |key: &'static str, reason: String| ConfigError::InTable {
                table: "adaptive",
                index,
                key,
                reason,
            };
            if e.name.trim().is_empty() {
                return Err(err("name", "must not be empty".into()));
            }
            if entries[..index].iter().any(|o| o.name == e.name) {
                return Err(err("name", format!("`{}` names two rules", e.name)));
            }
            let pattern = match e.regex.as_deref() {
                Some(re) => {
                    // Compiled alone first so that a bad one is named by its own table.
                    RegexBuilder::new(re)
                        .case_insensitive(true)
                        .build()
                        .map_err(|x| err("regex", x.to_string()))?;
                    patterns.push(re);
                    Some((patterns.len() - 1) as u16)
                }
                None => None,
            };
            let mut categories = 0u32;
            for name in &e.category {
                let c = Category::parse(name).ok_or_else(|| {
                    err(
                        "category",
                        format!("unknown category `{name}` (see README: bounce categories)"),
                    )
                })?;
                categories |= 1 << c as u32;
            }
            if pattern.is_none() && categories == 0 {
                return Err(err("regex", "a rule needs a regex or a category".into()));
            }
            let site = e
                .site
                .as_deref()
                .map(|g| DomainGlob::new(g).map_err(|x| err("site", x.to_string())))
                .transpose()?;
            let threshold = Threshold::parse(&e.threshold).map_err(|r| err("threshold", r))?;
            let duration_ms = parse_span_ms(&e.duration)
                .filter(|ms| (DURATION_MS_MIN..=DURATION_MS_MAX).contains(ms))
                .ok_or_else(|| {
                    let d = &e.duration;
                    err(
                        "duration",
                        format!("`{d}` is not 1 s to 7 days (30s, 10m, 2h, 1d)"),
                    )
                })?;
            let action = action(e, &err)?;
            rules.push(AdaptiveRule {
                name: e.name.clone(),
                action,
                duration_ms,
                threshold,
                site,
                pattern,
                categories,
            });
        }
        let set = match patterns.is_empty() {
            true => None,
            false => Some(
                RegexSetBuilder::new(&patterns)
                    .case_insensitive(true)
                    .size_limit(REGEX_SIZE_MAX)
                    .build()
                    .map_err(|x| crate::config::invalid("adaptive", x.to_string()))?,
            ),
        };
        Ok(AdaptiveRules { rules, set })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Rule `i` (an index [`AdaptiveRules::matching`] returned). Panics when out of range.
    pub fn rule(&self, i: u16) -> &AdaptiveRule {
        &self.rules[usize::from(i)]
    }

    pub fn rules(&self) -> &[AdaptiveRule] {
        &self.rules
    }

    /// The rules that match a failed reply, by index: `code`, `enhanced` and `text` make the
    /// line the regexes see (`421 4.7.0 text`; join a multi-line reply's text first),
    /// `site_hosts` is the site key (its MX hosts, comma-separated; a static route's host).
    /// Hot path: one regex pass over the line; no allocation unless more than four rules
    /// match or the line is over 1 KiB. Nothing at all when there are no rules.
    pub fn matching(
        &self,
        code: u16,
        enhanced: Option<(u8, u16, u16)>,
        text: &str,
        category: Option<Category>,
        site_hosts: &str,
    ) -> SmallVec<[u16; 4]> {
        let mut out = SmallVec::new();
        if self.rules.is_empty() {
            return out;
        }
        let mut hits = [false; RULES_MAX];
        if let Some(set) = &self.set {
            let hits = &mut hits[..set.len()];
            let mut line = LineBuf::new();
            write_line(&mut line, code, enhanced, text);
            match line.as_str() {
                Some(line) => set.matches_read_at(hits, line, 0),
                None => {
                    let mut long = String::with_capacity(text.len() + 16);
                    write_line(&mut long, code, enhanced, text);
                    set.matches_read_at(hits, &long, 0)
                }
            };
        }
        let category_bit = category.map_or(0, |c| 1u32 << c as u32);
        for (i, rule) in self.rules.iter().enumerate() {
            let by_regex = rule.pattern.is_some_and(|p| hits[usize::from(p)]);
            if !(by_regex || rule.categories & category_bit != 0) {
                continue;
            }
            if let Some(glob) = &rule.site {
                if !site_hosts.split(',').any(|h| glob.matches(h.trim())) {
                    continue;
                }
            }
            out.push(i as u16);
        }
        out
    }
}

fn action(
    e: &AdaptiveEntry,
    err: &dyn Fn(&'static str, String) -> ConfigError,
) -> Result<Action, ConfigError> {
    let throttles = [
        ("message_rate", e.message_rate.is_some()),
        ("rate_factor", e.rate_factor.is_some()),
        ("connections_max", e.connections_max.is_some()),
    ];
    let plain = match e.action.as_str() {
        "suspend" => Action::Suspend,
        "suspend_tenant" => Action::SuspendTenant,
        "suspend_campaign" => Action::SuspendCampaign,
        "bounce" => Action::Bounce,
        "throttle" => {
            let message_rate = e
                .message_rate
                .as_deref()
                .map(|r| Rate::parse(r).map_err(|x| err("message_rate", x)))
                .transpose()?;
            if let Some(f) = e.rate_factor {
                if !(f > 0.0 && f < 1.0) {
                    return Err(err("rate_factor", format!("{f} is not between 0 and 1")));
                }
                if message_rate.is_some() {
                    let reason = "give message_rate or rate_factor, not both";
                    return Err(err("rate_factor", reason.into()));
                }
            }
            if e.connections_max == Some(0) {
                let reason = "must be at least 1 (to stop sending, use action = \"suspend\")";
                return Err(err("connections_max", reason.into()));
            }
            if !throttles.iter().any(|&(_, given)| given) {
                let reason = "throttle needs message_rate, rate_factor or connections_max";
                return Err(err("message_rate", reason.into()));
            }
            return Ok(Action::Throttle {
                message_rate,
                rate_factor: e.rate_factor,
                connections_max: e.connections_max,
            });
        }
        other => {
            let reason = format!(
                "unknown action `{other}` (suspend, throttle, suspend_tenant, \
                 suspend_campaign or bounce)"
            );
            return Err(err("action", reason));
        }
    };
    if let Some(&(key, _)) = throttles.iter().find(|&&(_, given)| given) {
        let reason = format!("only for action = \"throttle\", not \"{}\"", e.action);
        return Err(err(key, reason));
    }
    Ok(plain)
}

fn write_line(out: &mut impl fmt::Write, code: u16, enhanced: Option<(u8, u16, u16)>, text: &str) {
    // Writing to a LineBuf or a String cannot fail (a full LineBuf notes it and goes on).
    let _ = match enhanced {
        Some((c, s, d)) => write!(out, "{code} {c}.{s}.{d} {text}"),
        None => write!(out, "{code} {text}"),
    };
}

/// A reply line on the stack; `None` from `as_str` when it did not fit.
struct LineBuf {
    buf: [u8; REPLY_LINE_LEN_MAX],
    len: usize,
    overflow: bool,
}

impl LineBuf {
    fn new() -> LineBuf {
        LineBuf {
            buf: [0; REPLY_LINE_LEN_MAX],
            len: 0,
            overflow: false,
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self.overflow {
            true => None,
            false => std::str::from_utf8(&self.buf[..self.len]).ok(),
        }
    }
}

impl fmt::Write for LineBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        match self.buf.get_mut(self.len..self.len + s.len()) {
            Some(dst) if !self.overflow => {
                dst.copy_from_slice(s.as_bytes());
                self.len += s.len();
            }
            _ => self.overflow = true,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A good entry but for its name, as TOML (an inline table's contents).
    const GOOD: &str =
        r#"category = ["RateLimited"], threshold = "5/60s", action = "suspend", duration = "10m""#;

    /// A good entry with `edit` (inline table contents) replacing its keys.
    fn edited(name: &str, edit: &str) -> AdaptiveEntry {
        let table = |t: &str| -> toml::Table {
            let text = format!("t = {{ {t} }}");
            let mut outer: toml::Table = toml::from_str(&text).expect(t);
            outer
                .remove("t")
                .and_then(|t| t.as_table().cloned())
                .expect(t)
        };
        let mut entry = table(&format!("name = \"{name}\", {GOOD}"));
        entry.extend(table(edit));
        toml::Value::Table(entry).try_into().expect(edit)
    }

    fn entry(name: &str) -> AdaptiveEntry {
        edited(name, "")
    }

    fn rules(entries: &[AdaptiveEntry]) -> AdaptiveRules {
        AdaptiveRules::from_entries(entries).expect("rules")
    }

    #[test]
    fn thresholds_and_spans_parse() {
        let t = Threshold::parse("5/60s").expect("threshold");
        assert_eq!((t.count, t.period_ms), (5, 60_000));
        assert_eq!(Threshold::parse("5 in 60s"), Ok(t));
        assert_eq!(
            Threshold::parse(" 5 in 1 minute ").map(|t| t.period_ms),
            Ok(60_000)
        );
        assert_eq!(Threshold::parse("3/h").map(|t| t.period_ms), Ok(3_600_000));
        for bad in [
            "", "5", "x/60s", "0/60s", "5/0s", "5/2d", "1001/h", "5/60", "5 on 1m",
        ] {
            assert!(Threshold::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_span_ms("30s"), Some(30_000));
        assert_eq!(parse_span_ms("10m"), Some(600_000));
        assert_eq!(parse_span_ms("2 hours"), Some(7_200_000));
        assert_eq!(parse_span_ms("1d"), Some(86_400_000));
        assert_eq!(parse_span_ms("1w"), None);
    }

    #[test]
    fn replies_match_by_regex_or_category_and_site() {
        let gmail = r#"regex = "4\\.7\\.0 .*unusual rate", category = [], site = "*.google.com""#;
        let block =
            r#"regex = "^5.. 5.7.1 .*blocked", category = ["SpamBlock", "AuthenticationFailed"]"#;
        let rules = rules(&[
            edited("gmail", gmail),
            edited("block", block),
            edited("421", r#"regex = "^421 ", category = []"#),
            entry("rate"),
        ]);
        let mx = "alt1.gmail-smtp-in.l.google.com,gmail-smtp-in.l.google.com";
        let m = |code, enh, text: &str, cat, site: &str| -> Vec<u16> {
            rules.matching(code, enh, text, cat, site).to_vec()
        };
        let unusual = "Our system has detected an Unusual Rate of mail";
        assert_eq!(m(421, Some((4, 7, 0)), unusual, None, mx), [0, 2]);
        assert_eq!(
            m(421, Some((4, 7, 0)), unusual, None, "mx.example.net"),
            [2]
        );
        let rl = Some(Category::RateLimited);
        assert_eq!(m(451, None, "slow down", rl, "mx.example.net"), [3]);
        assert_eq!(m(550, Some((5, 7, 1)), "IP blocked", None, "mx.a"), [1]);
        let auth = Some(Category::AuthenticationFailed);
        assert_eq!(m(550, Some((5, 7, 26)), "DMARC", auth, "mx.a"), [1]);
        assert!(m(550, Some((5, 1, 1)), "no such user", None, mx).is_empty());
        let long = "x".repeat(5000) + " unusual rate";
        assert_eq!(
            m(421, Some((4, 7, 0)), &long, None, mx),
            [0, 2],
            "over the stack buffer"
        );
        assert!(AdaptiveRules::default()
            .matching(421, None, "", rl, mx)
            .is_empty());
        assert_eq!(
            (rules.rule(1).name.as_str(), rules.rule(1).action),
            ("block", Action::Suspend)
        );
        assert_eq!(rules.rule(0).duration_ms, 600_000);
    }

    #[test]
    fn actions_parse_with_their_settings() {
        let throttle = r#"action = "throttle", message_rate = "10/min", connections_max = 1"#;
        let r = rules(&[edited("t", throttle)]);
        let Action::Throttle {
            message_rate: Some(rate),
            rate_factor: None,
            connections_max: Some(1),
        } = r.rule(0).action
        else {
            panic!("{:?}", r.rule(0).action);
        };
        assert_eq!((rate.count, rate.per_ms), (10, 60_000));
        let factor = rules(&[edited("f", r#"action = "throttle", rate_factor = 0.5"#)]);
        assert!(matches!(
            factor.rule(0).action,
            Action::Throttle {
                rate_factor: Some(0.5),
                ..
            }
        ));
        for name in ["suspend", "suspend_tenant", "suspend_campaign", "bounce"] {
            let r = rules(&[edited("a", &format!("action = \"{name}\""))]);
            assert_eq!(r.rule(0).action.name(), name);
        }
        assert_eq!(r.rule(0).threshold.to_string(), "5 in 60s");
    }

    #[test]
    fn config_errors_name_their_key() {
        // Each case: the key the error must name, and what replaces the good entry's keys.
        let cases = [
            ("name", r#"name = "first""#),
            ("name", r#"name = " ""#),
            ("regex", r#"regex = "(""#),
            ("regex", "category = []"),
            ("category", r#"category = ["Slow"]"#),
            ("site", r#"site = "[""#),
            ("threshold", r#"threshold = "5""#),
            ("action", r#"action = "pause""#),
            ("duration", r#"duration = "8d""#),
            ("duration", r#"duration = "0s""#),
            ("duration", r#"duration = "soon""#),
            ("message_rate", r#"message_rate = "10/min""#),
            ("connections_max", "connections_max = 2"),
            ("message_rate", r#"action = "throttle""#),
            (
                "message_rate",
                r#"action = "throttle", message_rate = "fast""#,
            ),
            ("rate_factor", r#"action = "throttle", rate_factor = 1.0"#),
            (
                "rate_factor",
                r#"action = "throttle", rate_factor = 0.5, message_rate = "1/s""#,
            ),
            (
                "connections_max",
                r#"action = "throttle", connections_max = 0"#,
            ),
        ];
        for (key, edit) in cases {
            let err = AdaptiveRules::from_entries(&[entry("first"), edited("second", edit)])
                .expect_err(edit)
                .to_string();
            let want = format!("invalid value for `adaptive[1].{key}`");
            assert!(err.starts_with(&want), "{edit}: {err}");
        }
        let many: Vec<_> = (0..=RULES_MAX).map(|i| entry(&i.to_string())).collect();
        assert!(AdaptiveRules::from_entries(&many).is_err());
    }
}
