//! Egress: where outbound connections come from, and how many go to one place.
//!
//! - A **source** is a local address to bind (IPv4 or IPv6, or the kernel's choice) and the
//!   EHLO name used from it.
//! - A **pool** is a weighted set of sources. Each message is routed to a pool by the first
//!   `[[pool_rule]]` matching its sender domain, recipient domain and tenant header, else the
//!   default pool. Within a pool, sources take turns by smooth weighted round robin.
//! - **Health**, per shard: a source whose bind fails, or whose last `source_failures_max`
//!   connection attempts all failed without the remote end answering (a refusal proves the
//!   source's path works), is out of rotation for `source_quarantine_s`; the pool uses its
//!   other sources meanwhile. A source down for connect failures is still used when every
//!   source of the pool is down (better than no mail at all); one whose address cannot be
//!   bound is not.
//! - **Slots**: connections per (site, source) are counted process-wide, so a site's limit
//!   holds however its domains are spread over shards (see [`Slots`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::{invalid, Config, ConfigError};
use crate::route::DomainGlob;

/// Largest weight of a source in a pool.
const WEIGHT_MAX: u32 = 1000;

/// Which addresses of an MX host to try, and in what order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressOrder {
    Ipv4First,
    Ipv6First,
    Ipv4Only,
    Ipv6Only,
}

impl AddressOrder {
    pub fn parse(text: &str) -> Option<AddressOrder> {
        match text.trim().to_ascii_lowercase().as_str() {
            "ipv4-first" => Some(AddressOrder::Ipv4First),
            "ipv6-first" => Some(AddressOrder::Ipv6First),
            "ipv4-only" => Some(AddressOrder::Ipv4Only),
            "ipv6-only" => Some(AddressOrder::Ipv6Only),
            _ => None,
        }
    }

    /// `addrs` filtered and ordered (stable within a family).
    pub fn arrange(self, addrs: &mut Vec<IpAddr>) {
        match self {
            AddressOrder::Ipv4Only => addrs.retain(IpAddr::is_ipv4),
            AddressOrder::Ipv6Only => addrs.retain(IpAddr::is_ipv6),
            AddressOrder::Ipv4First => addrs.sort_by_key(IpAddr::is_ipv6),
            AddressOrder::Ipv6First => addrs.sort_by_key(IpAddr::is_ipv4),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub name: String,
    pub address: Option<IpAddr>,
    pub ehlo: String,
}

impl Source {
    /// Whether this source can reach `addr` (a bound IPv4 source cannot reach IPv6).
    pub fn reaches(&self, addr: &SocketAddr) -> bool {
        self.address.is_none_or(|ip| ip.is_ipv4() == addr.is_ipv4())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    /// (source index, weight).
    pub members: Vec<(usize, u32)>,
}

#[derive(Clone, Debug)]
struct Rule {
    sender_domain: Option<DomainGlob>,
    recipient_domain: Option<DomainGlob>,
    /// Compared case-insensitively (ASCII).
    tenant: Option<String>,
    pool: usize,
}

/// Sources, pools and the rules that pick a pool; the same on every shard.
#[derive(Clone, Debug)]
pub struct Egress {
    pub sources: Vec<Source>,
    pub pools: Vec<Pool>,
    rules: Vec<Rule>,
    default_pool: usize,
    /// Lower-case header name, with the colon: `x-tenant:`.
    tenant_header: Option<String>,
    pub failures_max: u32,
    pub quarantine_ms: u64,
}

impl Egress {
    pub fn from_config(cfg: &Config, helo_name: &str) -> Result<Egress, ConfigError> {
        let mut sources = Vec::new();
        for s in &cfg.source {
            if s.name.trim().is_empty() || sources.iter().any(|o: &Source| o.name == s.name) {
                return Err(invalid(
                    "source.name",
                    format!("`{}` is empty or used twice", s.name),
                ));
            }
            let ehlo = s.ehlo.clone().unwrap_or_else(|| helo_name.to_owned());
            if ehlo.is_empty() || ehlo.contains(char::is_whitespace) {
                return Err(invalid(
                    "source.ehlo",
                    format!("`{ehlo}` is not a host name"),
                ));
            }
            sources.push(Source {
                name: s.name.clone(),
                address: s.address,
                ehlo,
            });
        }
        if sources.is_empty() {
            sources.push(Source {
                name: "default".into(),
                address: None,
                ehlo: helo_name.to_owned(),
            });
        }
        let mut pools = Vec::new();
        for p in &cfg.pool {
            if p.name.trim().is_empty() || pools.iter().any(|o: &Pool| o.name == p.name) {
                return Err(invalid(
                    "pool.name",
                    format!("`{}` is empty or used twice", p.name),
                ));
            }
            if p.sources.is_empty() {
                return Err(invalid(
                    "pool.sources",
                    format!("pool `{}` has no sources", p.name),
                ));
            }
            let members = p
                .sources
                .iter()
                .map(|text| member(&sources, text))
                .collect::<Result<Vec<_>, _>>()?;
            pools.push(Pool {
                name: p.name.clone(),
                members,
            });
        }
        if cfg.egress.default_pool.trim().is_empty() && !pools.iter().any(|p| p.name == "default") {
            pools.push(Pool {
                name: "default".into(),
                members: (0..sources.len()).map(|i| (i, 1)).collect(),
            });
        }
        let pool_index = |key: &'static str, name: &str| {
            pools
                .iter()
                .position(|p| p.name == name)
                .ok_or_else(|| invalid(key, format!("no pool named `{name}`")))
        };
        let default_pool = match cfg.egress.default_pool.trim() {
            "" => pool_index("egress.default_pool", "default")?,
            name => pool_index("egress.default_pool", name)?,
        };
        let rules = cfg
            .pool_rule
            .iter()
            .map(|r| {
                if r.sender_domain.is_none() && r.recipient_domain.is_none() && r.tenant.is_none() {
                    return Err(invalid(
                        "pool_rule",
                        "a rule needs sender_domain, recipient_domain or tenant",
                    ));
                }
                let glob = |key: &'static str, text: &Option<String>| {
                    text.as_deref()
                        .map(DomainGlob::new)
                        .transpose()
                        .map_err(|e| invalid(key, e.to_string()))
                };
                Ok(Rule {
                    sender_domain: glob("pool_rule.sender_domain", &r.sender_domain)?,
                    recipient_domain: glob("pool_rule.recipient_domain", &r.recipient_domain)?,
                    tenant: r.tenant.clone(),
                    pool: pool_index("pool_rule.pool", &r.pool)?,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let header = cfg.egress.tenant_header.trim();
        if header.contains(|c: char| c == ':' || !c.is_ascii_graphic()) {
            return Err(invalid(
                "egress.tenant_header",
                format!("`{header}` is not a header name"),
            ));
        }
        Ok(Egress {
            sources,
            pools,
            rules,
            default_pool,
            tenant_header: (!header.is_empty())
                .then(|| format!("{}:", header.to_ascii_lowercase())),
            failures_max: cfg.egress.source_failures_max,
            quarantine_ms: cfg.egress.source_quarantine_s.saturating_mul(1000),
        })
    }

    /// The pool for mail from `sender` (an address) to `rcpt_domain` with `tenant`.
    ///
    /// Per message: the globs were compiled with the config and fold case themselves, so this
    /// allocates nothing.
    pub fn pool_for(&self, sender: &str, rcpt_domain: &str, tenant: Option<&str>) -> usize {
        let sender_domain = sender.rsplit_once('@').map_or("", |(_, d)| d);
        self.rules
            .iter()
            .find(|r| {
                r.sender_domain
                    .as_ref()
                    .is_none_or(|g| g.matches(sender_domain))
                    && r.recipient_domain
                        .as_ref()
                        .is_none_or(|g| g.matches(rcpt_domain))
                    && r.tenant
                        .as_ref()
                        .is_none_or(|t| tenant.is_some_and(|v| v.eq_ignore_ascii_case(t)))
            })
            .map_or(self.default_pool, |r| r.pool)
    }

    /// The tenant named by the message's tenant header, if it has one.
    pub fn tenant_of(&self, body: &[u8]) -> Option<String> {
        header_value(body, self.tenant_header.as_deref()?)
    }
}

/// `NAME` or `NAME:WEIGHT` of a pool member.
fn member(sources: &[Source], text: &str) -> Result<(usize, u32), ConfigError> {
    let (name, weight) = match text.rsplit_once(':') {
        Some((name, w)) => {
            let weight = w
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|w| (1..=WEIGHT_MAX).contains(w));
            let weight = weight.ok_or_else(|| {
                invalid(
                    "pool.sources",
                    format!("`{text}`: weight must be 1 to {WEIGHT_MAX}"),
                )
            })?;
            (name.trim(), weight)
        }
        None => (text.trim(), 1),
    };
    let index = sources
        .iter()
        .position(|s| s.name == name)
        .ok_or_else(|| invalid("pool.sources", format!("no source named `{name}`")))?;
    Ok((index, weight))
}

/// The first value of header `name` (lower-case, with its colon) in the message's header
/// block, unfolded and trimmed.
pub fn header_value(body: &[u8], name: &str) -> Option<String> {
    let mut lines = crate::smtp::split_lf(body).peekable();
    while let Some(line) = lines.next() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return None;
        }
        if line.len() < name.len() || !line[..name.len()].eq_ignore_ascii_case(name.as_bytes()) {
            continue;
        }
        let mut value = String::from_utf8_lossy(&line[name.len()..]).into_owned();
        while let Some(next) = lines.peek() {
            if !next.starts_with(b" ") && !next.starts_with(b"\t") {
                break;
            }
            let next = lines.next().unwrap_or_default();
            value.push_str(&String::from_utf8_lossy(
                next.strip_suffix(b"\r").unwrap_or(next),
            ));
        }
        let value = value.trim();
        return (!value.is_empty()).then(|| value.to_owned());
    }
    None
}

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

/// A shard that found no slot counts as waiting for this long after its last try; shards
/// retry every scheduler tick (50 ms), so this covers a few missed ticks.
const WAIT_FRESH_MS: u64 = 250;

/// Connections open per (site, source), counted across shards.
///
/// A site (one MX host set) can span shards, since domains are spread by hash. Its messages
/// stay with the shard that spooled them (no body is handed between shards); what is shared is
/// only this count, taken under a lock when a connection opens or closes, and looked at by
/// open connections every few messages only while some shard is waiting (an atomic says so
/// without the lock), never per message. A shard that finds the site full
/// leaves its jobs queued and tries again when one of its connections ends or at the next
/// scheduler tick. So the configured limit holds exactly.
///
/// Fairness: while another shard waits, a shard holding more than its share of the limit
/// (limit / shards wanting the site, rounded down) lets its connections finish after a few
/// dozen messages ([`Slot::should_yield`]), and a free slot goes first to the shard that has
/// waited longest. With a limit of one, two shards take turns; no shard starves because
/// another keeps its connection busy.
#[derive(Debug, Default)]
pub struct Slots {
    open: Mutex<HashMap<(Arc<str>, usize), Entry>>,
    /// Until when (Unix ms) some shard may be waiting for some slot: while it is past, no
    /// connection needs the lock to learn that nobody waits.
    contended_until_ms: AtomicU64,
}

#[derive(Debug, Default)]
struct Entry {
    open: usize,
    /// Indexed by shard id, grown as shards show up.
    shards: Vec<ShardUse>,
}

#[derive(Debug, Default, Clone)]
struct ShardUse {
    held: usize,
    /// Since when this shard has been finding no slot (None: not waiting), and when it last
    /// tried: it counts as waiting only while that is recent.
    waiting_since_ms: Option<u64>,
    waiting_seen_ms: u64,
}

impl Entry {
    fn shard(&mut self, shard: usize) -> &mut ShardUse {
        if self.shards.len() <= shard {
            self.shards.resize(shard + 1, ShardUse::default());
        }
        &mut self.shards[shard]
    }

    fn waiting(u: &ShardUse, now_ms: u64) -> bool {
        u.waiting_since_ms.is_some() && now_ms.saturating_sub(u.waiting_seen_ms) <= WAIT_FRESH_MS
    }

    /// Whether shards other than `shard` wait, and the share of `limit` each shard wanting
    /// the site may hold (rounded down).
    fn contention(&self, shard: usize, limit: usize, now_ms: u64) -> (bool, usize) {
        let others = self
            .shards
            .iter()
            .enumerate()
            .any(|(i, u)| i != shard && Entry::waiting(u, now_ms));
        let wanting = self
            .shards
            .iter()
            .enumerate()
            .filter(|(i, u)| *i == shard || u.held > 0 || Entry::waiting(u, now_ms))
            .count();
        (others, limit / wanting.max(1))
    }

    /// Whether `shard` has waited at least as long as every other waiting shard.
    fn longest_waiting(&self, shard: usize, now_ms: u64) -> bool {
        let Some(mine) = self.shards.get(shard).and_then(|u| u.waiting_since_ms) else {
            return false;
        };
        self.shards.iter().enumerate().all(|(i, u)| {
            i == shard || !Entry::waiting(u, now_ms) || u.waiting_since_ms.is_none_or(|t| mine <= t)
        })
    }
}

impl Slots {
    /// Take a slot for `site` from `source` on `shard` if fewer than `limit` are taken and no
    /// other shard has a better claim to it (see the type's notes on fairness).
    pub fn acquire(
        self: &Arc<Self>,
        site: &Arc<str>,
        source: usize,
        limit: usize,
        shard: usize,
        now_ms: u64,
    ) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let entry = open.entry((site.clone(), source)).or_default();
        let (others_wait, share) = entry.contention(shard, limit, now_ms);
        let held = entry.shard(shard).held;
        let fair = !others_wait || held < share || entry.longest_waiting(shard, now_ms);
        if entry.open < limit && fair {
            entry.open += 1;
            let me = entry.shard(shard);
            me.held += 1;
            me.waiting_since_ms = None;
            return Some(Slot {
                slots: self.clone(),
                key: (site.clone(), source),
                shard,
                limit,
            });
        }
        let me = entry.shard(shard);
        me.waiting_since_ms.get_or_insert(now_ms);
        me.waiting_seen_ms = now_ms;
        self.contended_until_ms
            .fetch_max(now_ms + WAIT_FRESH_MS, Ordering::Relaxed);
        None
    }

    /// Connections open now for `site` from `source`.
    pub fn open(&self, site: &str, source: usize) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(&(Arc::from(site), source)).map_or(0, |e| e.open)
    }
}

/// A connection's place in [`Slots`], given back on drop.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    key: (Arc<str>, usize),
    shard: usize,
    limit: usize,
}

impl Slot {
    /// Whether this connection should end after its current transaction so that a waiting
    /// shard gets a turn: another shard waits and this one holds more than its share.
    pub fn should_yield(&self, now_ms: u64) -> bool {
        if now_ms > self.slots.contended_until_ms.load(Ordering::Relaxed) {
            return false;
        }
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = open.get_mut(&self.key) else {
            return false;
        };
        let (others_wait, share) = entry.contention(self.shard, self.limit, now_ms);
        others_wait && entry.shard(self.shard).held > share
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = open.get_mut(&self.key) {
            entry.open = entry.open.saturating_sub(1);
            let me = entry.shard(self.shard);
            me.held = me.held.saturating_sub(1);
            // Keep the entry while shards may still be waiting on it: their claim counts.
            if entry.open == 0 && entry.shards.iter().all(|u| u.waiting_since_ms.is_none()) {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn egress(toml: &str) -> Result<Egress, ConfigError> {
        let cfg = Config::parse(toml).expect("toml");
        Egress::from_config(&cfg, "mta.example")
    }

    const THREE: &str = r#"
        [egress]
        default_pool = "main"
        [[source]]
        name = "a"
        address = "127.0.0.2"
        ehlo = "a.example"
        [[source]]
        name = "b"
        address = "127.0.0.3"
        [[source]]
        name = "v6"
        address = "::1"
        [[pool]]
        name = "main"
        sources = ["a:3", "b:1"]
        [[pool]]
        name = "bulk"
        sources = ["b", "v6"]
        [[pool_rule]]
        sender_domain = "*.bulk.example"
        pool = "bulk"
        [[pool_rule]]
        tenant = "Acme"
        recipient_domain = "gmail.com"
        pool = "bulk"
    "#;

    #[test]
    fn default_egress_is_one_unbound_source() {
        let e = egress("").expect("egress");
        assert_eq!(e.sources.len(), 1);
        assert_eq!(e.sources[0].address, None);
        assert_eq!(e.sources[0].ehlo, "mta.example");
        assert_eq!(e.pool_for("a@b.example", "c.example", None), 0);
        assert_eq!(e.pools[0].members, vec![(0, 1)]);
    }

    #[test]
    fn rules_pick_pools_first_match_wins() {
        let e = egress(THREE).expect("egress");
        let (main, bulk) = (0, 1);
        assert_eq!(e.sources[1].ehlo, "mta.example");
        assert_eq!(e.pool_for("x@news.bulk.example", "y.test", None), bulk);
        assert_eq!(
            e.pool_for("x@shop.example", "gmail.com", Some("acme")),
            bulk
        );
        assert_eq!(
            e.pool_for("x@shop.example", "gmail.com", Some("other")),
            main
        );
        assert_eq!(
            e.pool_for("x@shop.example", "yahoo.com", Some("acme")),
            main
        );
        assert_eq!(e.pool_for("", "gmail.com", None), main);
        // Domains and tenants fold case; the globs were compiled with the config.
        assert_eq!(e.pool_for("x@News.BULK.example", "y.test", None), bulk);
        assert_eq!(
            e.pool_for("x@shop.example", "GMail.COM", Some("ACME")),
            bulk
        );
    }

    #[test]
    fn bad_egress_config_names_the_key() {
        let cases = [
            (
                "[[pool]]\nname = \"p\"\nsources = [\"nope\"]",
                "pool.sources",
            ),
            (
                "[[source]]\nname = \"a\"\n[[pool]]\nname = \"p\"\nsources = [\"a:0\"]",
                "pool.sources",
            ),
            (
                "[[source]]\nname = \"a\"\n[[source]]\nname = \"a\"",
                "source.name",
            ),
            ("[egress]\ndefault_pool = \"x\"", "egress.default_pool"),
            ("[[pool_rule]]\npool = \"default\"", "pool_rule"),
            (
                "[[pool_rule]]\ntenant = \"t\"\npool = \"x\"",
                "pool_rule.pool",
            ),
            (
                "[egress]\ntenant_header = \"X-T: y\"",
                "egress.tenant_header",
            ),
            (
                "[[pool_rule]]\nsender_domain = \"[a.example\"\npool = \"default\"",
                "pool_rule.sender_domain",
            ),
            (
                "[[pool_rule]]\nrecipient_domain = \"{a,b\"\npool = \"default\"",
                "pool_rule.recipient_domain",
            ),
        ];
        for (toml, key) in cases {
            let err = egress(toml).expect_err(toml).to_string();
            assert!(err.contains(&format!("`{key}`")), "{toml}: {err}");
        }
    }

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

    #[test]
    fn sources_reach_their_own_family() {
        let e = egress(THREE).expect("egress");
        let v4: SocketAddr = "192.0.2.1:25".parse().expect("addr");
        let v6: SocketAddr = "[2001:db8::1]:25".parse().expect("addr");
        assert!(e.sources[0].reaches(&v4) && !e.sources[0].reaches(&v6));
        assert!(e.sources[2].reaches(&v6) && !e.sources[2].reaches(&v4));
        let mut addrs: Vec<IpAddr> = vec![v6.ip(), v4.ip()];
        AddressOrder::Ipv4First.arrange(&mut addrs);
        assert_eq!(addrs, vec![v4.ip(), v6.ip()]);
        AddressOrder::Ipv6Only.arrange(&mut addrs);
        assert_eq!(addrs, vec![v6.ip()]);
    }

    #[test]
    fn slots_cap_connections_per_site_and_source() {
        let slots = Arc::new(Slots::default());
        let site: Arc<str> = "mx1.example,mx2.example".into();
        let a = slots.acquire(&site, 0, 2, 0, 0).expect("first");
        let _b = slots.acquire(&site, 0, 2, 0, 0).expect("second");
        assert!(slots.acquire(&site, 0, 2, 0, 0).is_none());
        assert!(
            slots.acquire(&site, 1, 2, 0, 0).is_some(),
            "other source, own count"
        );
        drop(a);
        assert_eq!(slots.open(&site, 0), 1);
        assert!(slots.acquire(&site, 0, 2, 0, 0).is_some());
    }

    #[test]
    fn shards_take_turns_at_a_full_site() {
        let slots = Arc::new(Slots::default());
        let site: Arc<str> = "mx.example".into();
        // Limit one: shard 0 holds it; shard 1 waits, so shard 0 should yield.
        let held = slots.acquire(&site, 0, 1, 0, 1000).expect("shard 0");
        assert!(!held.should_yield(1000), "nobody waits yet");
        assert!(slots.acquire(&site, 0, 1, 1, 1010).is_none());
        assert!(held.should_yield(1020));
        drop(held);
        // Shard 0 comes straight back, but shard 1 has waited longer: it goes first.
        assert!(slots.acquire(&site, 0, 1, 0, 1030).is_none());
        let turn = slots.acquire(&site, 0, 1, 1, 1050).expect("shard 1's turn");
        assert!(turn.should_yield(1060), "shard 0 waits now");
        // A waiter that stopped trying (no work left) no longer counts.
        assert!(!turn.should_yield(1030 + WAIT_FRESH_MS + 1));
        drop(turn);
        assert!(slots.acquire(&site, 0, 1, 0, 2000).is_some());
    }

    #[test]
    fn a_shard_keeps_its_share_of_a_larger_limit() {
        let slots = Arc::new(Slots::default());
        let site: Arc<str> = "mx.example".into();
        let mut shard0: Vec<Slot> = (0..4)
            .map(|_| slots.acquire(&site, 0, 4, 0, 0).expect("free"))
            .collect();
        assert!(slots.acquire(&site, 0, 4, 1, 10).is_none());
        // Share: 4 / 2 shards = 2. Shard 0 yields down to 2, shard 1 takes the freed ones.
        let mut shard1 = Vec::new();
        while shard0.last().is_some_and(|s| s.should_yield(20)) {
            shard0.pop();
            shard1.push(slots.acquire(&site, 0, 4, 1, 30).expect("shard 1"));
            assert!(slots.acquire(&site, 0, 4, 1, 30).is_none(), "limit holds");
        }
        assert_eq!((shard0.len(), shard1.len()), (2, 2));
        assert_eq!(slots.open(&site, 0), 4);
    }

    #[test]
    fn tenant_header_is_read_from_the_header_block_only() {
        let e = egress("[egress]\ntenant_header = \"X-Tenant\"").expect("egress");
        let body = b"Subject: hi\r\nx-tenant:  Acme\r\n  Corp\r\n\r\nX-Tenant: body\r\n";
        assert_eq!(e.tenant_of(body).as_deref(), Some("Acme  Corp"));
        assert_eq!(e.tenant_of(b"Subject: x\r\n\r\nX-Tenant: no\r\n"), None);
        assert_eq!(e.tenant_of(b"X-Tenantish: no\r\n\r\n"), None);
    }
}
