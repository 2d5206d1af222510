//! Retry policy: when a transiently failed recipient is tried again, and when it gives up.
//!
//! A [`Backoff`] is exponential with a cap and jitter, bounded by the message's maximum age:
//! the first retry waits `first_ms`, the n-th `base_ms * factor^(n-1)` (capped at `cap_ms`),
//! each spread by up to `±jitter` of itself so that a burst of failures does not come back as
//! a burst. The jitter is a hash of the message, recipient and attempt, not a random number:
//! a simulation run replays exactly.
//!
//! [`RetryPolicy`] picks the backoff per failure: `[[retry]]` rules, first match wins, by the
//! failure's bounce category, the recipient domain and the site's hosts; `[queue]`'s values
//! otherwise. A rule may also say that a category bounces at once even on a 4xx (some
//! providers answer unknown users with a 4xx). No I/O, no allocation on these paths.

use crate::bounce::Category;
use crate::route::{DomainGlob, Hop};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub first_ms: u64,
    pub base_ms: u64,
    pub factor: f64,
    pub cap_ms: u64,
    /// Each delay is spread by up to this share of itself, either way (0 to 0.5).
    pub jitter: f64,
    pub max_age_ms: u64,
}

/// What to do after a transient failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// Try again at this Unix time (ms).
    At(u64),
    /// The message is older than the maximum age: give up.
    Expire,
}

/// Which attempt of which recipient: the jitter's seed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttemptKey {
    pub id: u64,
    pub rcpt: u16,
}

impl Backoff {
    /// Delay before attempt `attempts + 1`, after `attempts` failures (attempts >= 1), before
    /// jitter: `first_ms`, then `min(base * factor^(attempts-1), cap)`.
    pub fn delay_ms(&self, attempts: u32) -> u64 {
        if attempts <= 1 {
            return self.first_ms.min(self.cap_ms);
        }
        let exp = attempts.saturating_sub(1).min(64) as i32;
        let delay = self.base_ms as f64 * self.factor.powi(exp);
        if !delay.is_finite() || delay >= self.cap_ms as f64 {
            self.cap_ms
        } else {
            delay as u64
        }
    }

    /// [`Backoff::delay_ms`] spread by the jitter, seeded by `key` and `attempts`.
    pub fn jittered_ms(&self, attempts: u32, key: AttemptKey) -> u64 {
        let delay = self.delay_ms(attempts);
        if self.jitter <= 0.0 || delay == 0 {
            return delay;
        }
        // splitmix64 of the seed: a uniform value in [-1, 1).
        let mut z = key
            .id
            .wrapping_add(u64::from(key.rcpt) << 48)
            .wrapping_add(u64::from(attempts).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let unit = (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
        let spread = delay as f64 * self.jitter * unit;
        (delay as f64 + spread).max(1.0) as u64
    }

    /// When a message received at `received_ms` expires.
    pub fn deadline_ms(&self, received_ms: u64) -> u64 {
        received_ms.saturating_add(self.max_age_ms)
    }

    /// After the `attempts`-th failure at `now_ms` of a message received at `received_ms`.
    /// The last retry is moved up to the expiry time, so a message gets one attempt at its
    /// deadline instead of expiring early or lingering past it.
    pub fn after_failure(
        &self,
        attempts: u32,
        key: AttemptKey,
        received_ms: u64,
        now_ms: u64,
    ) -> Retry {
        let deadline = self.deadline_ms(received_ms);
        if now_ms >= deadline {
            return Retry::Expire;
        }
        Retry::At(
            now_ms
                .saturating_add(self.jittered_ms(attempts, key))
                .min(deadline),
        )
    }
}

/// One `[[retry]]` rule, compiled.
#[derive(Clone, Debug)]
pub struct Rule {
    /// Empty: any category (including none, when classification is off).
    pub categories: Vec<Category>,
    pub domain: Option<DomainGlob>,
    pub site: Option<DomainGlob>,
    pub backoff: Backoff,
    /// A transient failure this rule matches bounces at once.
    pub bounce: bool,
}

impl Rule {
    fn matches(&self, domain: &str, hop: Option<&Hop>, category: Option<Category>) -> bool {
        if !self.categories.is_empty() && !category.is_some_and(|c| self.categories.contains(&c)) {
            return false;
        }
        if let Some(glob) = &self.domain {
            if !glob.matches(domain) {
                return false;
            }
        }
        if let Some(glob) = &self.site {
            let hit = match hop {
                Some(Hop::Route(dest)) => glob.matches(&dest.host),
                Some(Hop::Mx(site)) => site.hosts.iter().any(|(_, h)| glob.matches(h)),
                None => false,
            };
            if !hit {
                return false;
            }
        }
        true
    }
}

/// What a transient failure leads to under the policy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Choice<'a> {
    pub backoff: &'a Backoff,
    pub bounce: bool,
}

/// The retry rules and the default backoff.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub default: Backoff,
    pub rules: Vec<Rule>,
}

impl RetryPolicy {
    pub fn new(default: Backoff) -> RetryPolicy {
        RetryPolicy {
            default,
            rules: Vec::new(),
        }
    }

    /// The backoff for a failure of a recipient at `domain`, over `hop`, in `category`.
    pub fn choose(
        &self,
        domain: &str,
        hop: Option<&Hop>,
        category: Option<Category>,
    ) -> Choice<'_> {
        match self.rules.iter().find(|r| r.matches(domain, hop, category)) {
            Some(r) => Choice {
                backoff: &r.backoff,
                bounce: r.bounce,
            },
            None => Choice {
                backoff: &self.default,
                bounce: false,
            },
        }
    }

    /// The shortest maximum age any rule gives: a lower bound for every message's deadline,
    /// cheap enough for the hot path (the exact one is looked up only past it).
    pub fn max_age_floor_ms(&self) -> u64 {
        self.rules
            .iter()
            .map(|r| r.backoff.max_age_ms)
            .fold(self.default.max_age_ms, u64::min)
    }

    /// The maximum age of a message to `domain` over `hop`, whatever its failures: what a
    /// held message (suspended, its site down) expires by.
    pub fn max_age_ms(&self, domain: &str, hop: Option<&Hop>) -> u64 {
        self.rules
            .iter()
            .find(|r| r.categories.is_empty() && r.matches(domain, hop, None))
            .map_or(self.default.max_age_ms, |r| r.backoff.max_age_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff {
        first_ms: 1_000,
        base_ms: 1_000,
        factor: 2.0,
        cap_ms: 10_000,
        jitter: 0.0,
        max_age_ms: 60_000,
    };
    const K: AttemptKey = AttemptKey { id: 7, rcpt: 0 };

    #[test]
    fn grows_exponentially_then_caps() {
        let delays: Vec<u64> = (1..=6).map(|a| B.delay_ms(a)).collect();
        assert_eq!(delays, vec![1_000, 2_000, 4_000, 8_000, 10_000, 10_000]);
        assert_eq!(B.delay_ms(0), 1_000);
        assert_eq!(B.delay_ms(u32::MAX), 10_000);
    }

    #[test]
    fn first_retry_is_its_own() {
        let b = Backoff { first_ms: 300, ..B };
        assert_eq!(b.delay_ms(1), 300);
        assert_eq!(b.delay_ms(2), 2_000);
    }

    #[test]
    fn factor_one_is_constant() {
        let b = Backoff { factor: 1.0, ..B };
        assert_eq!(b.delay_ms(1), b.delay_ms(20));
    }

    #[test]
    fn jitter_spreads_within_bounds_and_replays() {
        let b = Backoff { jitter: 0.2, ..B };
        let mut seen = std::collections::BTreeSet::new();
        for id in 0..1000 {
            let k = AttemptKey { id, rcpt: 1 };
            let d = b.jittered_ms(3, k);
            assert!((3_200..=4_800).contains(&d), "{d}");
            assert_eq!(d, b.jittered_ms(3, k), "same seed, same delay");
            seen.insert(d / 100);
        }
        // Spread over the whole band, not clumped.
        assert!(seen.len() >= 15, "{seen:?}");
    }

    #[test]
    fn expiry_bounds_the_schedule() {
        assert_eq!(B.after_failure(1, K, 0, 100), Retry::At(1_100));
        assert_eq!(B.after_failure(5, K, 0, 55_000), Retry::At(60_000));
        assert_eq!(B.after_failure(6, K, 0, 60_000), Retry::Expire);
        assert_eq!(
            B.after_failure(1, K, u64::MAX - 5, u64::MAX - 1),
            Retry::At(u64::MAX)
        );
    }

    #[test]
    fn rules_pick_by_category_and_domain_first_match_wins() {
        let fast = Backoff { first_ms: 10, ..B };
        let mut p = RetryPolicy::new(B);
        p.rules.push(Rule {
            categories: vec![Category::InvalidRecipient],
            domain: None,
            site: None,
            backoff: B,
            bounce: true,
        });
        p.rules.push(Rule {
            categories: vec![],
            domain: Some(DomainGlob::new("*.example").expect("glob")),
            site: None,
            backoff: Backoff {
                max_age_ms: 5_000,
                ..fast
            },
            bounce: false,
        });
        assert!(
            p.choose("a.example", None, Some(Category::InvalidRecipient))
                .bounce
        );
        let c = p.choose("a.example", None, Some(Category::RateLimited));
        assert!(!c.bounce);
        assert_eq!(c.backoff.first_ms, 10);
        assert_eq!(p.choose("other.test", None, None).backoff, &B);
        assert_eq!(p.max_age_ms("a.example", None), 5_000);
        assert_eq!(p.max_age_ms("other.test", None), 60_000);
    }
}
