//! Connection leases: how many delivery connections each (site, egress source) may have open,
//! counted by one owner shard instead of under a process-wide lock.
//!
//! A site (an MX host set, or a static route) can span shards, since recipient domains are
//! spread by hash; its messages stay with the shard that spooled them (bodies never move
//! between shards). What is shared is the connection budget of each [`LeaseKey`]: it lives in
//! the key's owner shard ([`owner_of`], a stable hash), which grants permits to shards that ask
//! over the mesh and takes them back when their connections close. A shard opens a connection
//! only with a permit in hand and gives it back only once the connection is closed, so the
//! configured limit holds exactly, however many shards share the site.
//!
//! Fairness, as before the leases: permits go to waiting shards first come, first served; and
//! while a shard waits, a shard holding more than its share (limit / shards wanting the key,
//! rounded down) is asked to [`LeaseMsg::Yield`] one permit: its connection finishes after a
//! fair run of messages (or at once when idle) and the permit goes to the waiter. With a limit
//! of one, two shards take turns; no shard starves because another keeps its connection busy.
//!
//! A destination that is down is treated as one thing, not a connection attempt per message:
//! the owner also keeps each key's health. Requesters report every connection that failed to
//! open ([`LeaseMsg::Failed`]: refused, timed out, 421 at the greeting) and every one that
//! opened. After `failures_max` failures in a row the key goes down for a backoff of its own
//! (`backoff_ms`, doubling to `cap_ms`): requests are answered [`LeaseMsg::Down`] with the
//! time it ends, and requesters hold the key's messages until then without trying. When the
//! backoff ends one permit is granted (the probe) and others wait; the probe opening brings
//! the key [`LeaseMsg::Up`] (every shard told it was down is told), its failing starts a
//! longer backoff. The owner reports each change once ([`Budgets::take_changes`]).
//!
//! Both sides are I/O-free: [`Budgets`] (the owner's tables) and [`Permits`] (a requester's
//! view) take messages and return the messages to send. The shard's core carries them over the
//! mesh, or straight back to itself when it owns the key.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// What a budget counts: connections to one site from one egress source.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LeaseKey {
    /// `Hop::site_key()`: the site's host set, or `[addr:port]` for a route.
    pub site: Arc<str>,
    pub source: u16,
}

/// The shard that owns `key`'s budget, among `shards`. Stable: FNV-1a of the site and the
/// source, then jump hash, like the domain map.
pub fn owner_of(key: &LeaseKey, shards: usize) -> usize {
    let h = shards::hash::domain_hash(&key.site)
        ^ u64::from(key.source).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    shards::hash::jump_hash(h, shards.max(1))
}

/// The lease protocol. Requester → owner: `Acquire`, `Release`, `Cancel`, `Failed`, `Opened`,
/// `Want`, `Matched`. Owner → requester: `Granted`, `Queued`, `Yield`, `Down`, `Up`, `Credit`,
/// `Shaped`. (Send credits and adaptive rules ride the same messages: see `shaping`.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseMsg {
    /// One more permit for `key`, whose limit (from the requester's configuration, the same on
    /// every shard) is `limit`, and new connections at most at `rate`.
    Acquire {
        key: LeaseKey,
        limit: u32,
        rate: Option<crate::shaping::Rate>,
    },
    /// A permit's connection closed.
    Release { key: LeaseKey },
    /// Forget one queued `Acquire` (the requester no longer needs it).
    Cancel { key: LeaseKey },
    /// A permit, now (answer to `Acquire`) or later (the request waited).
    Granted { key: LeaseKey },
    /// The request waits for a permit; `Granted` follows when one frees up.
    Queued { key: LeaseKey },
    /// Another shard waits and this one holds more than its share: finish one connection.
    Yield { key: LeaseKey },
    /// A connection with a permit of `key` did not open (every host refused, timed out or
    /// failed the greeting); the permit's `Release` follows.
    Failed { key: LeaseKey, why: String },
    /// A connection with a permit of `key` opened.
    Opened { key: LeaseKey },
    /// The key is in backoff until `until_ms`: the request (answered or queued) is dropped;
    /// hold its messages until then.
    Down { key: LeaseKey, until_ms: u64 },
    /// The key is up again (its probe opened, or an operator flushed it).
    Up { key: LeaseKey },
    /// Send credits wanted (`shaping::credits`): up to `want` under `limit`.
    Want {
        key: crate::shaping::credits::MeterKey,
        limit: crate::shaping::credits::Limit,
        want: u32,
    },
    /// A failed reply of a connection with `key` matched adaptive rule `rule`; the tenant
    /// and campaign of its message, for rules that suspend those.
    Matched {
        key: LeaseKey,
        rule: u16,
        tenant: Option<Arc<str>>,
        campaign: Option<Arc<str>>,
    },
    /// Adaptive rule `rule` triggered for `key` until `until_ms` (owner → every shard):
    /// apply its action; `target` is the tenant or campaign a suspension names.
    Shaped {
        key: LeaseKey,
        rule: u16,
        until_ms: u64,
        target: Option<Arc<str>>,
    },
    /// The answer to `Want`: `granted` credits, and when to ask again if fewer than wanted.
    Credit {
        key: crate::shaping::credits::MeterKey,
        granted: u32,
        retry_at_ms: Option<u64>,
    },
}

/// When a key goes down and for how long (`[delivery]` `site_failures_max`,
/// `site_backoff_ms`, `site_backoff_cap_ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SiteBackoff {
    /// Failed connections in a row that take a key down; 0: never.
    pub failures_max: u32,
    pub backoff_ms: u64,
    pub cap_ms: u64,
}

impl Default for SiteBackoff {
    fn default() -> Self {
        SiteBackoff {
            failures_max: 5,
            backoff_ms: 30_000,
            cap_ms: 600_000,
        }
    }
}

/// A key's health changed (reported once, by its owner).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthChange {
    pub key: LeaseKey,
    /// Down until then; None: up again.
    pub down_until_ms: Option<u64>,
    /// Failed connections in a row so far.
    pub failures: u32,
    /// The last failure's reason (empty when up).
    pub why: String,
}

/// A key's health at its owner.
#[derive(Debug, Default)]
struct Health {
    failures: u32,
    down_until_ms: Option<u64>,
    /// The current (or last) backoff.
    backoff_ms: u64,
    /// The backoff ended and one permit is out to test the key.
    probing: bool,
    /// Shards told the key is down (told again when it is up).
    told: Vec<bool>,
    why: String,
}

impl Health {
    fn is_clear(&self) -> bool {
        self.failures == 0 && self.down_until_ms.is_none()
    }
}

/// A message to send: (destination shard, message).
pub type Outgoing = (usize, LeaseMsg);

/// One key's budget at its owner.
#[derive(Debug)]
struct Budget {
    limit: u32,
    open: u32,
    /// Permits held, per shard (indexed by shard id, grown as shards show up).
    held: Vec<u32>,
    /// Yields asked of each shard and not answered by a release yet.
    yields: Vec<u32>,
    /// Waiting requests, oldest first: one entry per permit wanted.
    waiting: VecDeque<usize>,
    health: Health,
    /// New connections at most at this rate (`connection_rate`), held by `gcra`.
    rate: Option<crate::shaping::Rate>,
    gcra: crate::shaping::Gcra,
    /// An adaptive rule's connection cap, until when.
    cap: Option<(u32, u64)>,
    /// The last time the budget was asked anything (for when its rate state may go).
    seen_ms: u64,
}

impl Budget {
    fn new(limit: u32) -> Budget {
        Budget {
            limit,
            open: 0,
            held: Vec::new(),
            yields: Vec::new(),
            waiting: VecDeque::new(),
            health: Health::default(),
            rate: None,
            gcra: crate::shaping::Gcra::default(),
            cap: None,
            seen_ms: 0,
        }
    }

    /// Permits that may be out now: one while probing, an adaptive cap while it lasts.
    fn limit_now(&self) -> u32 {
        let limit = match self.cap {
            Some((cap, until)) if self.seen_ms < until => self.limit.min(cap),
            _ => self.limit,
        };
        match self.health.probing {
            true => limit.min(1),
            false => limit,
        }
    }

    /// Whether one more connection may open now: under the limit and the connection rate
    /// (a cell of which it takes). Err: the rate's next opening.
    fn may_open(&mut self, now_ms: u64) -> Result<(), Option<u64>> {
        if self.open >= self.limit_now() {
            return Err(None);
        }
        if let Some(rate) = &self.rate {
            let a = self.gcra.take(rate, 1, now_ms);
            if a.granted == 0 {
                return Err(a.retry_at_ms);
            }
        }
        Ok(())
    }

    fn idle(&self) -> bool {
        let paced = self
            .rate
            .as_ref()
            .is_some_and(|r| self.gcra.next_ms(r, self.seen_ms) > self.seen_ms);
        self.open == 0
            && self.waiting.is_empty()
            && self.health.is_clear()
            && !paced
            && self.cap.is_none_or(|(_, until)| until <= self.seen_ms)
    }

    fn held(&self, shard: usize) -> u32 {
        self.held.get(shard).copied().unwrap_or(0)
    }

    fn bump(v: &mut Vec<u32>, shard: usize, delta: i64) {
        if v.len() <= shard {
            v.resize(shard + 1, 0);
        }
        v[shard] = (i64::from(v[shard]) + delta).max(0) as u32;
    }

    /// The share of the limit each shard wanting the key may hold (rounded down: with a limit
    /// of one and two shards it is zero, so the holder yields and they take turns).
    fn share(&self) -> u32 {
        let mut wanting: Vec<usize> = self.waiting.iter().copied().collect();
        wanting.extend(
            self.held
                .iter()
                .enumerate()
                .filter(|(_, &h)| h > 0)
                .map(|(s, _)| s),
        );
        wanting.sort_unstable();
        wanting.dedup();
        self.limit / (wanting.len().max(1) as u32)
    }

    fn mark(told: &mut Vec<bool>, shard: usize) {
        if told.len() <= shard {
            told.resize(shard + 1, false);
        }
        told[shard] = true;
    }

    /// The key is down until `until_ms`: waiting requests are answered `Down` (their shards
    /// hold the messages) and their shards are told when it is up.
    fn drop_waiting(&mut self, key: &LeaseKey, until_ms: u64, out: &mut Vec<Outgoing>) {
        while let Some(shard) = self.waiting.pop_front() {
            Budget::mark(&mut self.health.told, shard);
            out.push((
                shard,
                LeaseMsg::Down {
                    key: key.clone(),
                    until_ms,
                },
            ));
        }
    }

    fn grant(&mut self, shard: usize) {
        self.open += 1;
        Budget::bump(&mut self.held, shard, 1);
    }

    /// Ask holders above their share to yield, one permit per waiting request at most.
    fn ask_yields(&mut self, key: &LeaseKey, out: &mut Vec<Outgoing>) {
        if self.waiting.is_empty() {
            return;
        }
        let share = self.share();
        let mut asked: u32 = self.yields.iter().sum();
        let wanted = self.waiting.len() as u32;
        for shard in 0..self.held.len() {
            if asked >= wanted {
                break;
            }
            let held = self.held(shard);
            let yields = self.yields.get(shard).copied().unwrap_or(0);
            // Only shards that do not wait themselves give up permits to others.
            let waits = self.waiting.contains(&shard);
            if !waits && held > share + yields {
                Budget::bump(&mut self.yields, shard, 1);
                asked += 1;
                out.push((shard, LeaseMsg::Yield { key: key.clone() }));
            }
        }
    }
}

/// The budgets a shard owns.
#[derive(Debug, Default)]
pub struct Budgets {
    keys: HashMap<LeaseKey, Budget>,
    backoff: SiteBackoff,
    changes: Vec<HealthChange>,
    /// Keys whose waiting requests wait for their connection rate, and from when they may
    /// be granted: [`Budgets::tick`] grants them then.
    paced: HashMap<LeaseKey, u64>,
}

impl Budgets {
    pub fn new(backoff: SiteBackoff) -> Budgets {
        Budgets {
            backoff,
            ..Budgets::default()
        }
    }

    /// Handle a requester's message at `now_ms`; returns what to send. No I/O.
    pub fn handle(&mut self, from: usize, msg: LeaseMsg, now_ms: u64) -> Vec<Outgoing> {
        let mut out = Vec::new();
        match msg {
            LeaseMsg::Acquire { key, limit, rate } => {
                self.acquire(from, key, limit, rate, now_ms, &mut out)
            }
            LeaseMsg::Release { key } => self.release(from, key, now_ms, &mut out),
            LeaseMsg::Cancel { key } => self.cancel(from, key),
            LeaseMsg::Failed { key, why } => self.failed(key, why, now_ms, &mut out),
            LeaseMsg::Opened { key } => self.opened(key, now_ms, &mut out),
            // Credits are the core's meters' business; owner-to-requester messages are not
            // for us.
            LeaseMsg::Want { .. }
            | LeaseMsg::Credit { .. }
            | LeaseMsg::Matched { .. }
            | LeaseMsg::Shaped { .. } => {}
            LeaseMsg::Granted { .. }
            | LeaseMsg::Queued { .. }
            | LeaseMsg::Yield { .. }
            | LeaseMsg::Down { .. }
            | LeaseMsg::Up { .. } => {}
        }
        out
    }

    /// A reload's new backoff settings (keys already down keep their current backoff).
    pub fn set_backoff(&mut self, backoff: SiteBackoff) {
        self.backoff = backoff;
    }

    /// Health changes since the last call, for the event log.
    pub fn take_changes(&mut self) -> Vec<HealthChange> {
        std::mem::take(&mut self.changes)
    }

    /// Keys in backoff now: (key, until, failures, why), for `queue summary`.
    pub fn down(&self) -> impl Iterator<Item = (&LeaseKey, u64, u32, &str)> {
        self.keys.iter().filter_map(|(k, b)| {
            b.health
                .down_until_ms
                .map(|until| (k, until, b.health.failures, b.health.why.as_str()))
        })
    }

    /// When a request waiting for its connection rate may be granted.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.paced.values().copied().min()
    }

    /// Grant what waited for its connection rate and may go at `now_ms`.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Outgoing> {
        let mut out = Vec::new();
        if self.paced.values().all(|&at| at > now_ms) {
            return out;
        }
        let mut due: Vec<LeaseKey> = self
            .paced
            .iter()
            .filter(|(_, &at)| at <= now_ms)
            .map(|(k, _)| k.clone())
            .collect();
        // In key order, not the map's (randomly seeded) order: a run replays exactly.
        due.sort_by(|a, b| (&*a.site, a.source).cmp(&(&*b.site, b.source)));
        for key in due {
            self.paced.remove(&key);
            self.grant_waiting(&key, now_ms, &mut out);
        }
        out
    }

    /// An adaptive rule caps `key`'s connections at `cap` until `until_ms`.
    pub fn cap(&mut self, key: &LeaseKey, cap: u32, until_ms: u64, now_ms: u64) {
        let b = self
            .keys
            .entry(key.clone())
            .or_insert_with(|| Budget::new(cap));
        b.seen_ms = now_ms;
        b.cap = Some((cap.max(1), until_ms));
    }

    /// An adaptive rule suspends `key` until `until_ms`: requests are answered `Down` (and
    /// their messages held) as in a backoff; when it ends, one probe goes first.
    pub fn suspend(&mut self, key: &LeaseKey, until_ms: u64, why: &str, out: &mut Vec<Outgoing>) {
        let b = self
            .keys
            .entry(key.clone())
            .or_insert_with(|| Budget::new(1));
        let h = &mut b.health;
        h.why = why.to_owned();
        h.probing = false;
        h.backoff_ms = h.backoff_ms.max(self.backoff.backoff_ms);
        h.down_until_ms = Some(h.down_until_ms.map_or(until_ms, |u| u.max(until_ms)));
        let until_ms = h.down_until_ms.unwrap_or(until_ms);
        b.drop_waiting(key, until_ms, out);
    }

    /// Grant waiting requests of `key` while its limit and connection rate allow.
    fn grant_waiting(&mut self, key: &LeaseKey, now_ms: u64, out: &mut Vec<Outgoing>) {
        let Some(b) = self.keys.get_mut(key) else {
            return;
        };
        b.seen_ms = now_ms;
        while !b.waiting.is_empty() {
            match b.may_open(now_ms) {
                Ok(()) => {
                    let Some(next) = b.waiting.pop_front() else {
                        break;
                    };
                    b.grant(next);
                    out.push((next, LeaseMsg::Granted { key: key.clone() }));
                }
                Err(Some(at)) => {
                    self.paced.insert(key.clone(), at);
                    break;
                }
                Err(None) => break,
            }
        }
        b.ask_yields(key, out);
        if b.idle() {
            self.keys.remove(key);
        }
    }

    /// An operator's flush: keys whose site `site` selects (all with None) are up again now.
    pub fn lift(&mut self, site: Option<&str>, now_ms: u64, out: &mut Vec<Outgoing>) {
        let keys: Vec<LeaseKey> = self
            .keys
            .iter()
            .filter(|(k, b)| b.health.down_until_ms.is_some() && site.is_none_or(|s| *k.site == *s))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.up(&key, now_ms, out);
        }
    }

    fn failed(&mut self, key: LeaseKey, why: String, now_ms: u64, out: &mut Vec<Outgoing>) {
        let cfg = self.backoff;
        if cfg.failures_max == 0 {
            return;
        }
        let b = self
            .keys
            .entry(key.clone())
            .or_insert_with(|| Budget::new(1));
        let h = &mut b.health;
        h.failures = h.failures.saturating_add(1);
        h.why = why;
        let backoff_ms = if h.probing {
            // The probe failed: a longer backoff.
            h.backoff_ms.saturating_mul(2).min(cfg.cap_ms)
        } else if h.down_until_ms.is_none() && h.failures >= cfg.failures_max {
            cfg.backoff_ms
        } else {
            return;
        };
        // One event per outage: a failed probe extends the backoff silently.
        let first = h.down_until_ms.is_none();
        h.probing = false;
        h.backoff_ms = backoff_ms.max(1);
        let until_ms = now_ms.saturating_add(h.backoff_ms);
        h.down_until_ms = Some(until_ms);
        // Waiting requests are dropped: their shards hold their messages instead.
        b.drop_waiting(&key, until_ms, out);
        if !first {
            return;
        }
        self.changes.push(HealthChange {
            key,
            down_until_ms: Some(until_ms),
            failures: b.health.failures,
            why: b.health.why.clone(),
        });
    }

    fn opened(&mut self, key: LeaseKey, now_ms: u64, out: &mut Vec<Outgoing>) {
        let Some(b) = self.keys.get_mut(&key) else {
            return;
        };
        b.health.failures = 0;
        if b.health.down_until_ms.is_some() {
            self.up(&key, now_ms, out);
        } else if b.idle() {
            self.keys.remove(&key);
        }
    }

    fn up(&mut self, key: &LeaseKey, now_ms: u64, out: &mut Vec<Outgoing>) {
        let Some(b) = self.keys.get_mut(key) else {
            return;
        };
        let told = std::mem::take(&mut b.health.told);
        b.health = Health::default();
        for (shard, _) in told.iter().enumerate().filter(|(_, &t)| t) {
            out.push((shard, LeaseMsg::Up { key: key.clone() }));
        }
        self.changes.push(HealthChange {
            key: key.clone(),
            down_until_ms: None,
            failures: 0,
            why: String::new(),
        });
        // The probe's limit of one is lifted: waiting requests get what is free.
        self.grant_waiting(key, now_ms, out);
    }

    fn acquire(
        &mut self,
        from: usize,
        key: LeaseKey,
        limit: u32,
        rate: Option<crate::shaping::Rate>,
        now_ms: u64,
        out: &mut Vec<Outgoing>,
    ) {
        let b = self
            .keys
            .entry(key.clone())
            .or_insert_with(|| Budget::new(limit));
        b.limit = limit;
        b.rate = rate;
        b.seen_ms = now_ms;
        if let Some(until_ms) = b.health.down_until_ms {
            if now_ms < until_ms {
                Budget::mark(&mut b.health.told, from);
                out.push((from, LeaseMsg::Down { key, until_ms }));
                return;
            }
            // The backoff is over: the next permit is the probe.
            b.health.probing = true;
        }
        // Free, and either nobody waits or this shard is under its share: take it now.
        let fair = b.waiting.is_empty() || b.held(from) < b.share();
        if fair && b.open < b.limit_now() {
            match b.may_open(now_ms) {
                Ok(()) => {
                    b.grant(from);
                    out.push((from, LeaseMsg::Granted { key }));
                    return;
                }
                Err(Some(at)) => {
                    self.paced.entry(key.clone()).or_insert(at);
                }
                Err(None) => {}
            }
        }
        b.waiting.push_back(from);
        out.push((from, LeaseMsg::Queued { key: key.clone() }));
        b.ask_yields(&key, out);
    }

    fn release(&mut self, from: usize, key: LeaseKey, now_ms: u64, out: &mut Vec<Outgoing>) {
        let Some(b) = self.keys.get_mut(&key) else {
            return;
        };
        debug_assert!(
            b.held(from) > 0,
            "shard {from} released a permit it does not hold"
        );
        if b.held(from) == 0 {
            return;
        }
        b.open -= 1;
        Budget::bump(&mut b.held, from, -1);
        if b.yields.get(from).copied().unwrap_or(0) > 0 {
            Budget::bump(&mut b.yields, from, -1);
        }
        // The longest-waiting request gets the permit (when the connection rate allows).
        self.grant_waiting(&key, now_ms, out);
    }

    fn cancel(&mut self, from: usize, key: LeaseKey) {
        let Some(b) = self.keys.get_mut(&key) else {
            return;
        };
        if let Some(at) = b.waiting.iter().position(|&s| s == from) {
            b.waiting.remove(at);
        }
        if b.idle() {
            self.keys.remove(&key);
        }
    }

    /// Permits out for `key` (for tests and the simulation's invariant checks).
    pub fn open(&self, key: &LeaseKey) -> u32 {
        self.keys.get(key).map_or(0, |b| b.open)
    }

    /// Keys with permits out or requests waiting.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// A requester's view of one key.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Holding {
    /// Permits held (connections open or opening).
    pub held: u32,
    /// Requests sent and not answered with `Granted` yet.
    pub requested: u32,
    /// Yields the owner asked for and no release has answered yet. The owner counts any
    /// release of this key from this shard as the answer to a yield; so does this side.
    pub yields: u32,
    /// Of those, yields a connection has taken on (it is finishing to answer it).
    pub claimed: u32,
}

/// The permits a shard holds and wants, per key.
#[derive(Debug, Default)]
pub struct Permits {
    keys: HashMap<LeaseKey, Holding>,
}

impl Permits {
    pub fn holding(&self, key: &LeaseKey) -> Holding {
        self.keys.get(key).copied().unwrap_or_default()
    }

    /// Ask for one more permit: the message for the owner.
    pub fn want(
        &mut self,
        key: &LeaseKey,
        limit: u32,
        rate: Option<crate::shaping::Rate>,
    ) -> LeaseMsg {
        self.keys.entry(key.clone()).or_default().requested += 1;
        LeaseMsg::Acquire {
            key: key.clone(),
            limit,
            rate,
        }
    }

    /// The owner granted a permit: it is held now.
    pub fn granted(&mut self, key: &LeaseKey) {
        let h = self.keys.entry(key.clone()).or_default();
        h.requested = h.requested.saturating_sub(1);
        h.held += 1;
    }

    /// A request waits at the owner (still counted as requested).
    pub fn queued(&mut self, _key: &LeaseKey) {}

    /// The owner dropped a request: the key is down.
    pub fn dropped(&mut self, key: &LeaseKey) {
        if let Some(h) = self.keys.get_mut(key) {
            h.requested = h.requested.saturating_sub(1);
        }
        self.tidy(key);
    }

    /// Withdraw one waiting request: the message for the owner.
    pub fn cancel(&mut self, key: &LeaseKey) -> Option<LeaseMsg> {
        let h = self.keys.get_mut(key)?;
        if h.requested == 0 {
            return None;
        }
        h.requested -= 1;
        self.tidy(key);
        Some(LeaseMsg::Cancel { key: key.clone() })
    }

    /// A permit's connection closed, for whatever reason: the message for the owner. A
    /// pending yield counts as answered (as the owner counts it).
    pub fn release(&mut self, key: &LeaseKey) -> LeaseMsg {
        if let Some(h) = self.keys.get_mut(key) {
            h.held = h.held.saturating_sub(1);
            h.yields = h.yields.saturating_sub(1);
            h.claimed = h.claimed.saturating_sub(1).min(h.yields);
            h.yields = h.yields.min(h.held);
        }
        self.tidy(key);
        LeaseMsg::Release { key: key.clone() }
    }

    /// The owner asks for a permit back.
    pub fn yield_asked(&mut self, key: &LeaseKey) {
        if let Some(h) = self.keys.get_mut(key) {
            h.yields = (h.yields + 1).min(h.held);
        }
    }

    /// Whether a connection of `key` should finish to answer a yield; if so, the yield is
    /// taken on (one connection answers one yield; its release will answer it).
    pub fn take_yield(&mut self, key: &LeaseKey) -> bool {
        match self.keys.get_mut(key) {
            Some(h) if h.yields > h.claimed => {
                h.claimed += 1;
                true
            }
            _ => false,
        }
    }

    /// Whether a yield waits for a connection to take it on.
    pub fn yields_pending(&self, key: &LeaseKey) -> bool {
        self.keys.get(key).is_some_and(|h| h.yields > h.claimed)
    }

    fn tidy(&mut self, key: &LeaseKey) {
        if self.keys.get(key).is_some_and(|h| *h == Holding::default()) {
            self.keys.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(site: &str) -> LeaseKey {
        LeaseKey {
            site: site.into(),
            source: 0,
        }
    }

    fn acquire(b: &mut Budgets, from: usize, k: &LeaseKey, limit: u32) -> Vec<Outgoing> {
        acquire_at(b, from, k, limit, 0)
    }

    fn acquire_at(
        b: &mut Budgets,
        from: usize,
        k: &LeaseKey,
        limit: u32,
        now: u64,
    ) -> Vec<Outgoing> {
        b.handle(
            from,
            LeaseMsg::Acquire {
                key: k.clone(),
                limit,
                rate: None,
            },
            now,
        )
    }

    fn granted(out: &[Outgoing], to: usize) -> bool {
        out.iter()
            .any(|(s, m)| *s == to && matches!(m, LeaseMsg::Granted { .. }))
    }

    /// A connection rate: permits go no faster than the rate, the waiting ones when the
    /// timer says so; and the rate's state outlives the permits (closing and reopening does
    /// not reset it). An adaptive cap lowers the limit until it ends.
    #[test]
    fn a_connection_rate_spaces_permits_and_a_cap_lowers_the_limit() {
        let rate = crate::shaping::Rate::parse("2/s").expect("rate");
        let mut b = Budgets::default();
        let k = key("mx.example");
        let ask = |b: &mut Budgets, now: u64| {
            b.handle(
                0,
                LeaseMsg::Acquire {
                    key: k.clone(),
                    limit: 10,
                    rate: Some(rate),
                },
                now,
            )
        };
        assert!(granted(&ask(&mut b, 1_000), 0));
        let out = ask(&mut b, 1_000);
        assert!(!granted(&out, 0), "{out:?}");
        assert_eq!(b.next_due_ms(), Some(1_500));
        assert!(b.tick(1_400).is_empty());
        assert!(granted(&b.tick(1_500), 0));
        assert_eq!(b.next_due_ms(), None);
        // Both close; a new request still waits for the rate.
        b.handle(0, LeaseMsg::Release { key: k.clone() }, 1_600);
        b.handle(0, LeaseMsg::Release { key: k.clone() }, 1_600);
        assert!(!granted(&ask(&mut b, 1_700), 0));
        assert!(granted(&b.tick(2_000), 0));
        // A cap of one until 10 s: a second permit waits although the limit is 10.
        b.cap(&k, 1, 10_000, 2_000);
        assert!(!granted(&ask(&mut b, 5_000), 0));
        b.handle(0, LeaseMsg::Release { key: k.clone() }, 11_000);
        assert_eq!(b.open(&k), 1, "the waiting request got the freed permit");
    }

    #[test]
    fn the_limit_holds_and_permits_come_back() {
        let mut b = Budgets::default();
        let k = key("mx1.example,mx2.example");
        assert!(granted(&acquire(&mut b, 0, &k, 2), 0));
        assert!(granted(&acquire(&mut b, 0, &k, 2), 0));
        let out = acquire(&mut b, 0, &k, 2);
        assert!(!granted(&out, 0));
        assert_eq!(out, vec![(0, LeaseMsg::Queued { key: k.clone() })]);
        assert_eq!(b.open(&k), 2);
        // Another source is another budget.
        let other = LeaseKey {
            site: k.site.clone(),
            source: 1,
        };
        assert!(granted(&acquire(&mut b, 0, &other, 2), 0));
        // A release hands the permit to the waiting request.
        let out = b.handle(0, LeaseMsg::Release { key: k.clone() }, 0);
        assert!(granted(&out, 0));
        assert_eq!(b.open(&k), 2);
        b.handle(0, LeaseMsg::Release { key: k.clone() }, 0);
        b.handle(0, LeaseMsg::Release { key: k.clone() }, 0);
        assert_eq!(b.open(&k), 0);
    }

    #[test]
    fn shards_take_turns_at_a_limit_of_one() {
        let mut b = Budgets::default();
        let k = key("mx.example");
        assert!(granted(&acquire(&mut b, 0, &k, 1), 0));
        // Shard 1 waits: shard 0, over its share, is asked to yield.
        let out = acquire(&mut b, 1, &k, 1);
        assert!(out.contains(&(1, LeaseMsg::Queued { key: k.clone() })));
        assert!(out.contains(&(0, LeaseMsg::Yield { key: k.clone() })));
        // Shard 0 wants it back at once, but shard 1 waited longer.
        let out = acquire(&mut b, 0, &k, 1);
        assert!(!granted(&out, 0));
        let out = b.handle(0, LeaseMsg::Release { key: k.clone() }, 0);
        assert!(granted(&out, 1), "{out:?}");
        // Now shard 0 waits and shard 1 is asked to yield: turns.
        assert!(
            out.contains(&(1, LeaseMsg::Yield { key: k.clone() })),
            "{out:?}"
        );
        let out = b.handle(1, LeaseMsg::Release { key: k.clone() }, 0);
        assert!(granted(&out, 0));
        assert_eq!(b.open(&k), 1);
    }

    #[test]
    fn a_shard_keeps_its_share_of_a_larger_limit() {
        let mut b = Budgets::default();
        let k = key("mx.example");
        for _ in 0..4 {
            assert!(granted(&acquire(&mut b, 0, &k, 4), 0));
        }
        // Shard 1 asks twice: shard 0 (share 2 of 4) is asked to yield twice, not more.
        let mut yields = 0;
        for _ in 0..2 {
            let out = acquire(&mut b, 1, &k, 4);
            yields += out
                .iter()
                .filter(|(s, m)| *s == 0 && matches!(m, LeaseMsg::Yield { .. }))
                .count();
        }
        assert_eq!(yields, 2);
        let out = acquire(&mut b, 1, &k, 4);
        assert!(
            !out.iter().any(|(_, m)| matches!(m, LeaseMsg::Yield { .. })),
            "shard 0 is down to its share once it yields two: {out:?}"
        );
        for _ in 0..2 {
            let out = b.handle(0, LeaseMsg::Release { key: k.clone() }, 0);
            assert!(granted(&out, 1));
        }
        assert_eq!(b.open(&k), 4, "the limit holds");
    }

    #[test]
    fn cancelled_requests_are_not_granted_and_empty_budgets_go() {
        let mut b = Budgets::default();
        let k = key("mx.example");
        acquire(&mut b, 0, &k, 1);
        acquire(&mut b, 1, &k, 1);
        b.handle(1, LeaseMsg::Cancel { key: k.clone() }, 0);
        let out = b.handle(0, LeaseMsg::Release { key: k.clone() }, 0);
        assert!(!granted(&out, 1), "{out:?}");
        assert!(b.is_empty());
    }

    #[test]
    fn permits_track_held_requested_and_yields() {
        let mut p = Permits::default();
        let k = key("mx.example");
        assert_eq!(
            p.want(&k, 3, None),
            LeaseMsg::Acquire {
                key: k.clone(),
                limit: 3,
                rate: None,
            }
        );
        p.granted(&k);
        assert_eq!(
            p.holding(&k),
            Holding {
                held: 1,
                requested: 0,
                yields: 0,
                claimed: 0,
            }
        );
        p.yield_asked(&k);
        p.yield_asked(&k);
        assert_eq!(p.holding(&k).yields, 1, "no more yields than permits held");
        assert!(p.take_yield(&k));
        assert!(!p.take_yield(&k), "one connection answers one yield");
        assert_eq!(p.release(&k), LeaseMsg::Release { key: k.clone() });
        assert_eq!(p.holding(&k), Holding::default());
        // A release for another reason answers a pending yield too, as the owner counts it.
        p.want(&k, 3, None);
        p.granted(&k);
        p.want(&k, 3, None);
        p.granted(&k);
        p.yield_asked(&k);
        p.release(&k);
        assert!(!p.yields_pending(&k), "answered by the release");
        assert!(!p.take_yield(&k));
        assert_eq!(p.cancel(&k), None);
    }

    #[test]
    fn a_failing_key_goes_down_once_probes_and_comes_back_up() {
        let cfg = SiteBackoff {
            failures_max: 3,
            backoff_ms: 1_000,
            cap_ms: 4_000,
        };
        let mut b = Budgets::new(cfg);
        let k = key("mx.down.test");
        let fail = |b: &mut Budgets, now| {
            b.handle(
                0,
                LeaseMsg::Failed {
                    key: k.clone(),
                    why: "refused".into(),
                },
                now,
            )
        };
        // Two failures: still up; a waiting request of shard 1 stays queued.
        for _ in 0..2 {
            assert!(granted(&acquire(&mut b, 0, &k, 1), 0));
            fail(&mut b, 10);
            b.handle(0, LeaseMsg::Release { key: k.clone() }, 10);
        }
        assert!(b.take_changes().is_empty());
        assert!(granted(&acquire(&mut b, 0, &k, 1), 0));
        let out = acquire(&mut b, 1, &k, 1);
        assert!(matches!(out[0], (1, LeaseMsg::Queued { .. })));
        // The third takes it down: one change, the waiter is told.
        let out = fail(&mut b, 100);
        assert_eq!(
            out,
            vec![(
                1,
                LeaseMsg::Down {
                    key: k.clone(),
                    until_ms: 1_100
                }
            )]
        );
        b.handle(0, LeaseMsg::Release { key: k.clone() }, 100);
        let changes = b.take_changes();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].down_until_ms, Some(1_100));
        // While down, requests are answered Down at once, and more failures change nothing.
        let out = acquire_at(&mut b, 0, &k, 4, 150);
        assert!(matches!(
            out[0],
            (
                0,
                LeaseMsg::Down {
                    until_ms: 1_100,
                    ..
                }
            )
        ));
        fail(&mut b, 200);
        assert!(b.take_changes().is_empty());
        // The backoff ends: one probe, the rest wait.
        assert!(granted(&acquire_at(&mut b, 0, &k, 4, 1_150), 0));
        assert!(matches!(
            acquire_at(&mut b, 1, &k, 4, 1_150)[0],
            (1, LeaseMsg::Queued { .. })
        ));
        // The probe fails: down again, twice as long, the waiter dropped.
        let out = fail(&mut b, 1_200);
        assert!(out.contains(&(
            1,
            LeaseMsg::Down {
                key: k.clone(),
                until_ms: 3_200
            }
        )));
        b.handle(0, LeaseMsg::Release { key: k.clone() }, 1_200);
        assert!(b.take_changes().is_empty(), "one event per outage");
        assert_eq!(b.down().next().map(|(_, until, _, _)| until), Some(3_200));
        // The next probe opens: up, both shards told, the waiter granted.
        assert!(granted(&acquire_at(&mut b, 0, &k, 4, 3_250), 0));
        assert!(matches!(
            acquire_at(&mut b, 1, &k, 4, 3_250)[0],
            (1, LeaseMsg::Queued { .. })
        ));
        let out = b.handle(0, LeaseMsg::Opened { key: k.clone() }, 3_300);
        assert!(out.contains(&(0, LeaseMsg::Up { key: k.clone() })));
        assert!(out.contains(&(1, LeaseMsg::Up { key: k.clone() })));
        assert!(granted(&out, 1));
        let changes = b.take_changes();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].down_until_ms, None);
        // Successes reset the count: sporadic failures never add up.
        for _ in 0..5 {
            fail(&mut b, 4_000);
            b.handle(0, LeaseMsg::Opened { key: k.clone() }, 4_000);
        }
        assert!(b.take_changes().is_empty());
    }

    #[test]
    fn owners_spread_over_shards_and_are_stable() {
        let mut seen = [0usize; 4];
        for i in 0..400 {
            let k = LeaseKey {
                site: format!("mx{i}.example").into(),
                source: (i % 3) as u16,
            };
            let o = owner_of(&k, 4);
            assert_eq!(o, owner_of(&k, 4));
            seen[o] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }
}
