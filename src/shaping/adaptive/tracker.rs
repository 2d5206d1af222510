//! The tracker: counts each rule's matches per (site, source) in a sliding window of the
//! rule's period, and says when an action starts and when it ends.
//!
//! Kept by the owner shard of the keys. Memory is bounded: at most `threshold.count`
//! timestamps per (rule, key), at most [`TRACKED_KEYS_MAX`] keys. No I/O; time comes in as a
//! parameter.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

use smallvec::SmallVec;

use super::{AdaptiveRules, Threshold};

/// (site, source) keys one tracker follows. A key is there while it has failures within a
/// rule's period or an action in force; the oldest idle ones make room for new ones.
pub const TRACKED_KEYS_MAX: usize = 4096;
/// A full tracker drops this fraction of its keys at once, so that a stream of new keys costs
/// one scan per 1/16 of the table rather than one per key.
const EVICT_FRACTION: usize = 16;
const _: () = assert!(TRACKED_KEYS_MAX >= EVICT_FRACTION);

/// A rule's threshold was reached: its action holds for the key until `until_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trigger {
    pub rule: u16,
    pub until_ms: u64,
}

/// Counts rule matches per key (a (site, source)) and says when actions start and end.
#[derive(Debug)]
pub struct Tracker<K> {
    /// Per rule: its threshold and its action's duration.
    rules: Vec<(Threshold, u64)>,
    /// The longest threshold period: a key idle for that long has nothing left to count.
    period_ms_max: u64,
    keys: HashMap<K, KeyState>,
    keys_max: usize,
    /// Actions found ended by `record` before `expire` saw them, for `expire` to report.
    lifted: Vec<(K, u16)>,
    next_expiry_ms: Option<u64>,
}

#[derive(Debug, Default)]
struct KeyState {
    last_ms: u64,
    rules: SmallVec<[RuleState; 2]>,
}

impl KeyState {
    fn idle(&self) -> bool {
        self.rules.iter().all(|r| r.until_ms.is_none())
    }
}

#[derive(Debug)]
struct RuleState {
    rule: u16,
    /// Times of the matches within the period, oldest first; at most the threshold count.
    seen_ms: VecDeque<u64>,
    until_ms: Option<u64>,
}

impl<K: Hash + Eq + Clone> Tracker<K> {
    pub fn new(rules: &AdaptiveRules) -> Tracker<K> {
        Tracker::with_keys_max(rules, TRACKED_KEYS_MAX)
    }

    pub fn with_keys_max(rules: &AdaptiveRules, keys_max: usize) -> Tracker<K> {
        let rules: Vec<_> = rules
            .rules
            .iter()
            .map(|r| (r.threshold, r.duration_ms))
            .collect();
        Tracker {
            period_ms_max: rules.iter().map(|(t, _)| t.period_ms).max().unwrap_or(0),
            rules,
            keys: HashMap::new(),
            keys_max: keys_max.max(1),
            lifted: Vec::new(),
            next_expiry_ms: None,
        }
    }

    /// Count a match of `rule` for `key`; a trigger when it makes the threshold. Matches while
    /// the rule's action holds for the key are not counted: they are the replies to attempts
    /// made before it started. A trigger starts a fresh window for after the action.
    pub fn record(&mut self, rule: u16, key: &K, now_ms: u64) -> Option<Trigger> {
        let &(threshold, duration_ms) = self.rules.get(usize::from(rule))?;
        if !self.keys.contains_key(key) {
            if self.keys.len() >= self.keys_max && !self.evict_idle() {
                // Every key has an action in force: keep those rather than a new count.
                return None;
            }
            self.keys.insert(key.clone(), KeyState::default());
        }
        let state = self.keys.get_mut(key)?;
        state.last_ms = state.last_ms.max(now_ms);
        let slot = match state.rules.iter().position(|r| r.rule == rule) {
            Some(slot) => slot,
            None => {
                state.rules.push(RuleState {
                    rule,
                    seen_ms: VecDeque::with_capacity(threshold.count as usize),
                    until_ms: None,
                });
                state.rules.len() - 1
            }
        };
        let r = &mut state.rules[slot];
        if let Some(until) = r.until_ms {
            if now_ms < until {
                return None;
            }
            r.until_ms = None;
            self.lifted.push((key.clone(), rule));
        }
        if let Some(cutoff) = now_ms.checked_sub(threshold.period_ms) {
            while r.seen_ms.front().is_some_and(|&t| t <= cutoff) {
                r.seen_ms.pop_front();
            }
        }
        if r.seen_ms.len() >= threshold.count as usize {
            r.seen_ms.pop_front();
        }
        r.seen_ms.push_back(now_ms);
        if r.seen_ms.len() < threshold.count as usize {
            return None;
        }
        r.seen_ms.clear();
        let until_ms = now_ms.saturating_add(duration_ms);
        r.until_ms = Some(until_ms);
        self.next_expiry_ms = Some(self.next_expiry_ms.map_or(until_ms, |n| n.min(until_ms)));
        Some(Trigger { rule, until_ms })
    }

    /// The actions in force for `key` at `now_ms`: (rule, until_ms).
    pub fn active<'a>(&'a self, key: &K, now_ms: u64) -> impl Iterator<Item = (u16, u64)> + 'a {
        self.keys
            .get(key)
            .into_iter()
            .flat_map(|s| s.rules.iter())
            .filter_map(move |r| r.until_ms.filter(|&u| u > now_ms).map(|u| (r.rule, u)))
    }

    /// End the actions due by `now_ms` and return them (for "lifted" events), and forget keys
    /// with nothing left to count. Run it at [`Tracker::next_expiry_ms`].
    pub fn expire(&mut self, now_ms: u64) -> Vec<(K, u16)> {
        let mut lifted = std::mem::take(&mut self.lifted);
        let mut next: Option<u64> = None;
        let horizon = self.period_ms_max;
        self.keys.retain(|key, state| {
            for r in &mut state.rules {
                match r.until_ms {
                    Some(until) if until <= now_ms => {
                        r.until_ms = None;
                        lifted.push((key.clone(), r.rule));
                    }
                    Some(until) => next = Some(next.map_or(until, |n| n.min(until))),
                    None => {}
                }
            }
            !(state.idle() && state.last_ms.saturating_add(horizon) <= now_ms)
        });
        self.next_expiry_ms = next;
        lifted
    }

    /// When the next action ends (when to run [`Tracker::expire`]).
    pub fn next_expiry_ms(&self) -> Option<u64> {
        match self.lifted.is_empty() {
            true => self.next_expiry_ms,
            // An action found ended by `record` is waiting to be reported.
            false => Some(0),
        }
    }

    /// Keys followed (for summaries).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Drop the oldest idle keys, 1/16 of the table; false when none is idle.
    fn evict_idle(&mut self) -> bool {
        let mut idle: Vec<u64> = self
            .keys
            .values()
            .filter(|s| s.idle())
            .map(|s| s.last_ms)
            .collect();
        if idle.is_empty() {
            return false;
        }
        let mut left = (self.keys_max / EVICT_FRACTION).clamp(1, idle.len());
        let (_, &mut cutoff, _) = idle.select_nth_unstable(left - 1);
        self.keys.retain(|_, s| {
            let drop = left > 0 && s.idle() && s.last_ms <= cutoff;
            left -= usize::from(drop);
            !drop
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shaping::adaptive::AdaptiveEntry;

    fn rules(threshold: &str, duration: &str) -> AdaptiveRules {
        let text = format!(
            "name = \"r\"\ncategory = [\"RateLimited\"]\naction = \"suspend\"\n\
             threshold = \"{threshold}\"\nduration = \"{duration}\""
        );
        let entry: AdaptiveEntry = toml::from_str(&text).expect("toml");
        AdaptiveRules::from_entries(&[entry]).expect("rules")
    }

    #[test]
    fn the_fifth_match_within_the_period_triggers_once() {
        let rules = rules("5/60s", "10m");
        let mut t = Tracker::new(&rules);
        for s in [0, 10, 20, 30] {
            assert_eq!(t.record(0, &"k", 1_000_000 + s * 1000), None);
        }
        let hit = t.record(0, &"k", 1_059_999);
        assert_eq!(
            hit,
            Some(Trigger {
                rule: 0,
                until_ms: 1_659_999
            })
        );
        assert_eq!(t.next_expiry_ms(), Some(1_659_999));
        // While active: no retrigger, and nothing is counted.
        for s in 0..20 {
            assert_eq!(t.record(0, &"k", 1_060_000 + s), None);
        }
        assert_eq!(
            t.active(&"k", 1_100_000).collect::<Vec<_>>(),
            [(0, 1_659_999)]
        );
        assert_eq!(t.active(&"other", 1_100_000).count(), 0);
        assert!(t.expire(1_659_998).is_empty());
        assert_eq!(t.expire(1_659_999), [("k", 0)]);
        assert_eq!(t.next_expiry_ms(), None);
        assert_eq!(t.active(&"k", 1_659_999).count(), 0);
        // After it ends the window starts afresh: four more do nothing, the fifth triggers.
        for s in 0..4 {
            assert_eq!(t.record(0, &"k", 1_700_000 + s), None);
        }
        assert!(t.record(0, &"k", 1_700_004).is_some());
    }

    #[test]
    fn matches_spread_over_more_than_the_period_do_not_trigger() {
        let rules = rules("5/60s", "10m");
        let mut t = Tracker::new(&rules);
        // Five matches 15 s apart span exactly 60 s: the first has left the window.
        for s in [0, 15, 30, 45, 60, 75, 90] {
            assert_eq!(t.record(0, &1u32, 5_000_000 + s * 1000), None, "at {s}s");
        }
        assert_eq!(t.record(0, &2u32, 5_000_000), None, "keys count apart");
        assert!(t.record(0, &1u32, 5_091_000).is_some());
        assert_eq!(t.record(9, &1u32, 5_091_000), None, "no such rule");
    }

    #[test]
    fn an_action_ended_before_expire_is_still_reported_once() {
        let rules = rules("1/s", "1s");
        let mut t = Tracker::new(&rules);
        assert!(t.record(0, &"k", 10_000).is_some());
        assert!(
            t.record(0, &"k", 11_000).is_some(),
            "ended at 11 s: triggers again"
        );
        assert_eq!(t.next_expiry_ms(), Some(0));
        assert_eq!(t.expire(11_500), [("k", 0)]);
        assert_eq!(t.next_expiry_ms(), Some(12_000));
        assert_eq!(t.expire(12_000), [("k", 0)]);
        assert!(t.is_empty(), "idle keys past the period are forgotten");
    }

    #[test]
    fn keys_are_bounded_and_active_ones_kept() {
        let rules = rules("2/60s", "10m");
        let mut t = Tracker::with_keys_max(&rules, 2);
        t.record(0, &"active", 0);
        assert!(t.record(0, &"active", 1).is_some());
        t.record(0, &"idle", 2);
        t.record(0, &"new", 3);
        assert_eq!(t.len(), 2);
        assert_eq!(t.active(&"active", 3).count(), 1);
        // Both remaining keys now active: a new key is not tracked.
        assert!(t.record(0, &"new", 4).is_some());
        assert_eq!(t.record(0, &"newer", 5), None);
        assert_eq!(t.len(), 2);
    }
}
