//! Send credits: message rates shared by shards, held by the owner of each rate's key.
//!
//! A rate per (site, source), per site, per source or per tenant counts messages from every
//! shard, so one shard owns it ([`owner_of`], a stable hash; a (site, source) rate has the
//! same owner as that key's connection budget). A shard with work for a rated key asks the
//! owner for a batch of credits ([`Credits::check`] says when); the owner's [`Meters`] take
//! them from the key's GCRA and answer how many it got and, if fewer than asked, when to ask
//! again. Each message a connection takes spends one credit of each of its keys. So a rate
//! costs one mesh round trip per batch, not per message, and holds across shards: every
//! credit came from the one GCRA.
//!
//! Credits not spent within [`CREDIT_TTL_MS`] lapse (a shard cannot hoard a burst for later).
//! Both sides are I/O-free; time comes in as a parameter.

use std::collections::HashMap;
use std::sync::Arc;

use super::rate::{Allowance, Gcra, Rate};

/// Credits asked for at once, at most: a batch is also capped by the rate's burst, so a
/// shard never holds more than a burst's worth.
pub const CREDIT_BATCH_MAX: u32 = 64;
/// Smallest batch refilled before it runs out: a small batch is a slow rate, where a round
/// trip per batch costs nothing and holding more than one batch would loosen the rate.
pub const PREFETCH_BATCH_MIN: u32 = 8;
/// Unspent credits lapse after this long.
pub const CREDIT_TTL_MS: u64 = 1_000;
/// Rated keys an owner keeps state for; idle ones are dropped beyond it (their next batch
/// starts from a fresh GCRA, which allows at most one burst early).
pub const METERS_MAX: usize = 100_000;

/// What a key's credits are held to: a rate, or a warmup schedule's caps for now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Rate(Rate),
    Caps(super::warmup::Caps),
}

impl Limit {
    /// The most credits to ask for at once: a rate's burst; a handful under warmup caps
    /// (credits that lapse unspent still count against the cap, so keep batches small).
    pub fn batch_max(&self) -> u32 {
        match self {
            Limit::Rate(r) => r.burst.max(1),
            Limit::Caps(_) => WARMUP_BATCH_MAX,
        }
    }
}

/// Credits asked for at once under warmup caps: below [`PREFETCH_BATCH_MIN`], so a warming
/// source asks only when it runs out. Credits that lapse unspent still count against the cap
/// (the owner counted them when it granted them); refilling ahead left batches unspent when
/// the connections closed at the cap, and the warmup test's day then delivered 8 of its 10.
pub const WARMUP_BATCH_MAX: u32 = 4;

/// What a rate counts.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MeterKey {
    /// Messages to one site from one source (`message_rate`).
    SiteSource { site: Arc<str>, source: u16 },
    /// Messages to one site from every source (`site_message_rate`).
    Site(Arc<str>),
    /// Messages from one source to every site (`[[source]] message_rate`).
    Source(u16),
    /// Messages of one tenant (lower case) to every site (`[[tenant]] message_rate`).
    Tenant(Arc<str>),
    /// Messages from one warming source to one provider (its index; `u16::MAX`: sites of no
    /// provider).
    Warmup { source: u16, provider: u16 },
}

/// The shard that owns `key`'s rate. A (site, source) rate lives with the key's connection
/// budget (`egress::lease::owner_of`), so adaptive rules act on both in one place.
pub fn owner_of(key: &MeterKey, shards: usize) -> usize {
    let shards = shards.max(1);
    let h = match key {
        MeterKey::SiteSource { site, source } => {
            shards::hash::domain_hash(site) ^ u64::from(*source).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        }
        MeterKey::Site(site) => shards::hash::domain_hash(site).rotate_left(17),
        MeterKey::Source(s) => u64::from(*s).wrapping_mul(0xff51_afd7_ed55_8ccd),
        MeterKey::Tenant(t) => shards::hash::domain_hash(t).rotate_left(33),
        MeterKey::Warmup { source, provider } => {
            (u64::from(*source) << 16 | u64::from(*provider)).wrapping_mul(0xc4ce_b9fe_1a85_ec53)
        }
    };
    shards::hash::jump_hash(h, shards)
}

/// One key at its owner.
#[derive(Debug, Default)]
struct Meter {
    gcra: Gcra,
    warmup: super::warmup::WarmupCounter,
    /// The caps last asked under (for progress reports).
    caps: Option<super::warmup::Caps>,
    seen_ms: u64,
}

/// The rates a shard owns.
#[derive(Debug, Default)]
pub struct Meters {
    keys: HashMap<MeterKey, Meter>,
}

impl Meters {
    /// A shard asks for `want` credits of `key` under `limit` (its configuration's, the
    /// same on every shard). No allocation once the key is known.
    pub fn ask(&mut self, key: &MeterKey, limit: Limit, want: u32, now_ms: u64) -> Allowance {
        if self.keys.len() >= METERS_MAX && !self.keys.contains_key(key) {
            // Warmup counters are kept: dropping one would forget what a day already sent.
            self.keys.retain(|k, m| {
                m.seen_ms + CREDIT_TTL_MS > now_ms || matches!(k, MeterKey::Warmup { .. })
            });
        }
        let m = self.keys.entry(key.clone()).or_default();
        m.seen_ms = now_ms;
        match limit {
            Limit::Rate(rate) => m.gcra.take(&rate, want, now_ms),
            Limit::Caps(caps) => {
                m.caps = Some(caps);
                m.warmup.take(&caps, want, now_ms)
            }
        }
    }

    /// Warmup progress of the keys this shard owns: (source, provider, caps, sent today,
    /// sent this hour).
    pub fn warmups(
        &self,
        now_ms: u64,
    ) -> impl Iterator<Item = (u16, u16, super::warmup::Caps, u64, u64)> + '_ {
        self.keys
            .iter()
            .filter_map(move |(k, m)| match (k, m.caps) {
                (MeterKey::Warmup { source, provider }, Some(caps)) => Some((
                    *source,
                    *provider,
                    caps,
                    m.warmup.sent_today(now_ms),
                    m.warmup.sent_this_hour(now_ms),
                )),
                _ => None,
            })
    }
}

/// A requester's credits for one key.
#[derive(Debug, Default, Clone, Copy)]
struct Held {
    have: u32,
    /// When the credits in hand lapse.
    lapse_ms: u64,
    /// A request is out.
    asking: bool,
    /// The owner said to ask again no earlier than this.
    wait_until_ms: u64,
}

/// What a requester may do about a key now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// A credit is in hand.
    Ready,
    /// None in hand: ask the owner for this many.
    Ask(u32),
    /// None in hand and a request is out (a grant will wake the connections).
    Asking,
    /// None in hand until then.
    Wait(u64),
}

/// The credits a shard holds, per key.
#[derive(Debug, Default)]
pub struct Credits {
    keys: HashMap<MeterKey, Held>,
}

impl Credits {
    /// Whether a message of `key` may go now; `backlog` is how many wait (the batch to ask
    /// for, capped by the burst and [`CREDIT_BATCH_MAX`]). An `Ask` marks the request out.
    pub fn check(&mut self, key: &MeterKey, batch_max: u32, backlog: usize, now_ms: u64) -> Check {
        // No clone of the key once it is known (the common case: a key with credits).
        if !self.keys.contains_key(key) {
            self.keys.insert(key.clone(), Held::default());
        }
        let Some(h) = self.keys.get_mut(key) else {
            return Check::Asking;
        };
        if h.have > 0 && now_ms >= h.lapse_ms {
            h.have = 0;
        }
        if h.have > 0 {
            return Check::Ready;
        }
        if h.asking {
            return Check::Asking;
        }
        if now_ms < h.wait_until_ms {
            return Check::Wait(h.wait_until_ms);
        }
        h.asking = true;
        let want = (backlog.max(1).min(CREDIT_BATCH_MAX as usize) as u32).min(batch_max.max(1));
        Check::Ask(want)
    }

    /// Spend one credit of `key` (after [`Credits::check`] said `Ready`). For batches of at
    /// least [`PREFETCH_BATCH_MIN`], when what is left is under a quarter of a batch and more
    /// waits (`backlog`), the next batch is asked for now (`Some(want)`, marked out), so
    /// connections do not stall on the round trip. A shard so holds at most a quarter of a
    /// batch beyond one batch.
    pub fn spend(
        &mut self,
        key: &MeterKey,
        batch_max: u32,
        backlog: usize,
        now_ms: u64,
    ) -> Option<u32> {
        let h = self.keys.get_mut(key)?;
        h.have = h.have.saturating_sub(1);
        let batch = batch_max.clamp(1, CREDIT_BATCH_MAX);
        let more = backlog > h.have as usize;
        if batch < PREFETCH_BATCH_MIN
            || h.asking
            || !more
            || h.have.saturating_mul(4) >= batch
            || now_ms < h.wait_until_ms
        {
            return None;
        }
        h.asking = true;
        Some((backlog.min(CREDIT_BATCH_MAX as usize) as u32).clamp(1, batch))
    }

    /// The owner's answer.
    pub fn granted(&mut self, key: &MeterKey, granted: u32, retry_at_ms: Option<u64>, now_ms: u64) {
        let h = self.keys.entry(key.clone()).or_default();
        h.asking = false;
        if now_ms >= h.lapse_ms {
            h.have = 0;
        }
        h.have = h.have.saturating_add(granted);
        h.lapse_ms = now_ms + CREDIT_TTL_MS;
        h.wait_until_ms = match granted {
            0 => retry_at_ms.unwrap_or(now_ms + 1),
            _ => 0,
        };
    }

    /// The earliest time a key waits for (for the timer: connections are woken then).
    pub fn next_wait_ms(&self, now_ms: u64) -> Option<u64> {
        self.keys
            .values()
            .filter(|h| h.have == 0 && !h.asking && h.wait_until_ms > now_ms)
            .map(|h| h.wait_until_ms)
            .min()
    }

    /// Forget keys with nothing in hand, out or awaited (bounded memory on a long run).
    pub fn tidy(&mut self, now_ms: u64) {
        self.keys.retain(|_, h| {
            h.asking || (h.have > 0 && now_ms < h.lapse_ms) || h.wait_until_ms > now_ms
        });
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> MeterKey {
        MeterKey::SiteSource {
            site: "mx.example".into(),
            source: 0,
        }
    }

    /// Two shards asking one owner for the same key never get more together than the rate.
    #[test]
    fn credits_from_one_owner_hold_the_rate_across_shards() {
        let rate = Rate::parse("20/s").expect("rate");
        let mut owner = Meters::default();
        let mut shards = [Credits::default(), Credits::default()];
        let mut sent: Vec<u64> = Vec::new();
        let mut now = 10_000;
        while now < 20_000 {
            for c in shards.iter_mut() {
                match c.check(&key(), rate.burst, 1000, now) {
                    Check::Ready => {
                        sent.push(now);
                        if let Some(n) = c.spend(&key(), rate.burst, 1000, now) {
                            let a = owner.ask(&key(), Limit::Rate(rate), n, now);
                            c.granted(&key(), a.granted, a.retry_at_ms, now);
                        }
                    }
                    Check::Ask(n) => {
                        let a = owner.ask(&key(), Limit::Rate(rate), n, now);
                        c.granted(&key(), a.granted, a.retry_at_ms, now);
                    }
                    Check::Asking | Check::Wait(_) => {}
                }
            }
            now += 5;
        }
        let most = sent
            .iter()
            .map(|&t| sent.iter().filter(|&&u| u >= t && u < t + 1000).count())
            .max()
            .unwrap_or(0);
        assert!(most <= 21, "{most} in one second");
        assert!((195..=205).contains(&sent.len()), "{} in 10 s", sent.len());
    }

    #[test]
    fn credits_lapse_and_waits_are_reported() {
        let rate = Rate::parse("2/s").expect("rate");
        let mut c = Credits::default();
        assert_eq!(c.check(&key(), rate.burst, 5, 0), Check::Ask(1));
        assert_eq!(c.check(&key(), rate.burst, 5, 0), Check::Asking);
        c.granted(&key(), 1, None, 0);
        assert_eq!(c.check(&key(), rate.burst, 5, 999), Check::Ready);
        assert_eq!(c.check(&key(), rate.burst, 5, 1000), Check::Ask(1));
        c.granted(&key(), 0, Some(1500), 1000);
        assert_eq!(c.check(&key(), rate.burst, 5, 1200), Check::Wait(1500));
        assert_eq!(c.next_wait_ms(1200), Some(1500));
        c.tidy(1600);
        assert!(c.is_empty());
    }
}
