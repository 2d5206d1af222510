//! Source health and rotation, per shard: which sources of a pool to try, in what order.
//!
//! A source whose bind fails, or whose last `source_failures_max` connection attempts all failed
//! without the remote end answering (a refusal proves the source's path works), is out of
//! rotation for `source_quarantine_s`; the pool uses its other sources meanwhile. A source down
//! for connect failures is still used when every source of the pool is down (better than no
//! mail at all); one whose address cannot be bound is not. Within a pool, sources take turns by
//! smooth weighted round robin. No I/O.

use super::Egress;

/// Why a source is out of rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Down {
    /// Its address cannot be bound: never used until the quarantine ends.
    Bind,
    /// Its recent connections failed: used only when the whole pool is down.
    Connect,
}

#[derive(Clone, Debug, Default)]
struct Health {
    failures: u32,
    down: Option<(Down, u64)>,
}

/// A change in a source's health, for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthChange {
    Down { why: Down, until_ms: u64 },
    Up,
}

/// One shard's view of its sources: health and round-robin state.
pub struct EgressState {
    health: Vec<Health>,
    /// Smooth weighted round robin: each pool member's current weight.
    current: Vec<Vec<i64>>,
}

impl EgressState {
    pub fn new(egress: &Egress) -> EgressState {
        EgressState {
            health: vec![Health::default(); egress.sources.len()],
            current: egress
                .pools
                .iter()
                .map(|p| vec![0; p.members.len()])
                .collect(),
        }
    }

    fn down(&self, source: usize, now_ms: u64) -> Option<Down> {
        match self.health[source].down {
            Some((why, until)) if now_ms < until => Some(why),
            _ => None,
        }
    }

    /// Sources of `pool` in the order to try now: healthy ones by weighted round robin, then
    /// (when none is healthy) those down for connect failures. Sources that cannot bind are
    /// left out. Advances the round robin by one pick.
    pub fn candidates(&mut self, egress: &Egress, pool: usize, now_ms: u64) -> Vec<usize> {
        let members = &egress.pools[pool].members;
        let healthy: Vec<usize> = (0..members.len())
            .filter(|&m| self.down(members[m].0, now_ms).is_none())
            .collect();
        if healthy.is_empty() {
            return members
                .iter()
                .map(|&(s, _)| s)
                .filter(|&s| self.down(s, now_ms) == Some(Down::Connect))
                .collect();
        }
        // Smooth weighted round robin (as nginx): raise every eligible member by its weight,
        // pick the highest, lower it by the total. The rest follow by current weight.
        let current = &mut self.current[pool];
        let total: i64 = healthy.iter().map(|&m| i64::from(members[m].1)).sum();
        for &m in &healthy {
            current[m] += i64::from(members[m].1);
        }
        let mut order = healthy;
        order.sort_by_key(|&m| std::cmp::Reverse(current[m]));
        current[order[0]] -= total;
        order.into_iter().map(|m| members[m].0).collect()
    }

    /// Sources out of rotation at `now_ms` (for metrics).
    pub fn down_sources(&self, now_ms: u64) -> impl Iterator<Item = usize> + '_ {
        (0..self.health.len()).filter(move |&s| self.down(s, now_ms).is_some())
    }

    /// A connection from `source` got through.
    pub fn success(&mut self, source: usize) -> Option<HealthChange> {
        let h = &mut self.health[source];
        h.failures = 0;
        h.down.take().map(|_| HealthChange::Up)
    }

    /// A connection from `source` failed: its address could not be bound, or the remote end
    /// could not be reached.
    pub fn failure(
        &mut self,
        egress: &Egress,
        source: usize,
        why: Down,
        now_ms: u64,
    ) -> Option<HealthChange> {
        let h = &mut self.health[source];
        h.failures += 1;
        let trips = why == Down::Bind || h.failures >= egress.failures_max;
        let already = matches!(h.down, Some((w, until)) if w == why && now_ms < until);
        if !trips || already {
            return None;
        }
        let until_ms = now_ms.saturating_add(egress.quarantine_ms);
        h.down = Some((why, until_ms));
        Some(HealthChange::Down { why, until_ms })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egress::tests::{egress, THREE};

    #[test]
    fn weighted_round_robin_follows_weights() {
        let e = egress(THREE).expect("egress");
        let mut st = EgressState::new(&e);
        let picks: Vec<usize> = (0..8).map(|_| st.candidates(&e, 0, 0)[0]).collect();
        // a:3, b:1, smooth: a a b a, a a b a.
        assert_eq!(picks, vec![0, 0, 1, 0, 0, 0, 1, 0]);
        // Every candidate list holds all healthy members.
        assert_eq!(st.candidates(&e, 0, 0).len(), 2);
    }

    #[test]
    fn failed_sources_leave_rotation_and_come_back() {
        let e = egress(THREE).expect("egress");
        let mut st = EgressState::new(&e);
        // A bind failure takes a source out at once.
        let change = st.failure(&e, 0, Down::Bind, 1000);
        assert_eq!(
            change,
            Some(HealthChange::Down {
                why: Down::Bind,
                until_ms: 61_000
            })
        );
        for _ in 0..4 {
            assert_eq!(st.candidates(&e, 0, 2000), vec![1]);
        }
        // Connect failures: out after three in a row; with the whole pool down, still tried.
        assert_eq!(st.failure(&e, 1, Down::Connect, 2000), None);
        assert_eq!(st.failure(&e, 1, Down::Connect, 2000), None);
        assert!(st.failure(&e, 1, Down::Connect, 2000).is_some());
        assert_eq!(st.failure(&e, 1, Down::Connect, 2000), None, "logged once");
        assert_eq!(st.candidates(&e, 0, 3000), vec![1]);
        // Quarantine over: both back.
        assert_eq!(st.candidates(&e, 0, 62_000).len(), 2);
        assert_eq!(st.success(1), Some(HealthChange::Up));
        assert_eq!(st.success(1), None);
    }
}
