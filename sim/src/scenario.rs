//! What one run looks like, drawn from its seed: how many shards, the limits, the faults, the
//! workload. Everything here is decided before the run starts, so a seed names a scenario.

use std::rc::Rc;
use std::sync::OnceLock;

use epoxi::config::{Config, Overrides, PoolEntry, SourceEntry};
use epoxi::envelope::{NoticeSwitches, Notify, Ret};
use epoxi::settings::Settings;
use epoxi::spool::engine::EngineLimits;

use crate::rng::Rng;

/// Recipient domains: three static routes (one shared by three domains, so domains owned by
/// different shards share a site and its connection limit), two domains on one MX site, and
/// one that does not exist (its mail bounces, which makes notices).
pub const DOMAINS: &[&str] = &[
    "x.a.test",
    "y.a.test",
    "z.a.test",
    "x.b.test",
    "y.b.test",
    "c.test",
    "m1.mx.test",
    "m2.mx.test",
    "nx.test",
];
/// The static routes, as `--route` takes them.
pub const ROUTES: &[&str] = &[
    "*.a.test=127.0.0.1:2601",
    "*.b.test=127.0.0.1:2602",
    "c.test=127.0.0.1:2603",
];
/// The MX hosts of `*.mx.test`; one site.
pub const MX_HOSTS: &[(u16, &str)] = &[(10, "mx1.sim.test"), (20, "mx2.sim.test")];
/// The domain DNS says does not exist.
pub const NX_DOMAIN: &str = "nx.test";
/// Distinct local parts per domain: few, so recipients repeat across messages.
const LOCAL_PARTS_MAX: u64 = 12;
/// Where virtual time starts: a plausible Unix time in ms, so dates in notices look real.
pub const EPOCH_MS: u64 = 1_767_225_600_000;

/// Limits for one run; each tuned so the run exercises the mechanism (small segments rotate,
/// small connection limits make shards share, short ages expire mail within the run).
#[derive(Clone, Debug)]
pub struct Scenario {
    /// A message rate per (site, source) (`[shaping] message_rate`), in some runs.
    pub message_rate: Option<epoxi::shaping::Rate>,
    /// A connection rate per (site, source), in some runs.
    pub connection_rate: Option<epoxi::shaping::Rate>,
    pub shards: usize,
    pub sources: usize,
    pub connections_max: usize,
    pub messages_per_connection_max: usize,
    pub rcpts_per_transaction_max: usize,
    pub idle_timeout_ms: u64,
    pub reply_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    pub retry_base_ms: u64,
    pub retry_factor: f64,
    pub retry_cap_ms: u64,
    /// Spread of retry delays (0 in a third of the runs).
    pub retry_jitter: f64,
    pub max_age_s: u64,
    pub messages_max: usize,
    pub limits: EngineLimits,
    pub compaction_bytes_per_s: u64,
    pub faults: Faults,
    pub messages: Vec<Inject>,
    /// When faults stop, every peer accepts and the run drains.
    pub heal_at_ms: u64,
    /// Operators' operations, at their times (ms from the start), sent to every shard.
    pub admin: Vec<(u64, epoxi::admin::Op)>,
    /// `notices.delay_after_s` (0: no delay notices) and `notices.delay_without_notify`.
    pub delay_after_s: u64,
    pub delay_without_notify: bool,
    /// `dead_letter.enabled`.
    pub dead_letters: bool,
}

/// Per-mille chances of storage faults, per commit (off once the run heals).
#[derive(Clone, Debug, Default)]
pub struct Faults {
    pub enospc: u32,
    pub torn_write: u32,
    pub fsync_fail: u32,
    /// A failed fsync's bytes reached the disk anyway.
    pub fsync_persisted: u32,
    pub truncate_fail: u32,
    /// At a crash, how often the unsynced tail of a file survives in part.
    pub crash_torn: u32,
    /// Virtual times of process crashes (all shards at once, as a process dies).
    pub crashes: Vec<u64>,
    /// At a crash, how often one byte of the disk flips (set aside by recovery).
    pub flip: u32,
    /// DNS answers SERVFAIL.
    pub dns_fail: u32,
}

/// One message a client submits.
#[derive(Clone, Debug)]
pub struct Inject {
    pub at_ms: u64,
    /// The receiving shard (the one whose listener took the connection), modulo shards.
    pub origin: usize,
    pub sender: String,
    pub rcpts: Vec<(String, Notify)>,
    pub ret: Ret,
    pub body_len: usize,
    /// The notices its listener allows.
    pub notices: NoticeSwitches,
    /// Its priority class.
    pub priority: epoxi::envelope::Priority,
}

/// Knobs a caller may turn, on top of the seed.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// No crashes (so no duplicate is ever allowed).
    pub no_crashes: bool,
    /// No storage faults at all.
    pub no_faults: bool,
    /// No operator operations (the regression seeds replay the runs that found their bugs).
    pub no_admin: bool,
    /// Scale the number of messages (1.0: 20 to 200).
    pub scale: Option<f64>,
    /// Keep this many trace lines for a failure report.
    pub trace_lines: Option<usize>,
    /// Print every trace line as it happens.
    pub verbose: bool,
}

impl Scenario {
    pub fn from_seed(seed: u64, opts: &Options) -> Scenario {
        let mut rng = Rng::new(seed ^ 0x5eed_5eed_0000_0000);
        // Knobs added after the first regression seeds draw from a stream of their own, so an
        // old seed still draws the scenario it was kept for.
        let mut later = Rng::new(seed ^ 0x1a7e_5eed_0000_0000);
        let shards = rng.range(1, 3) as usize;
        let sources = rng.range(1, 2) as usize;
        let retry_base_ms = rng.range(300, 3_000);
        let retry_cap_ms = rng.range(retry_base_ms * 2, 20_000);
        let max_age_s = rng.range(10, 90);
        let scale = opts.scale.unwrap_or(1.0);
        let count = ((rng.range(20, 200) as f64) * scale).round().max(1.0) as usize;
        let inject_window_ms = rng.range(2_000, 60_000);
        let mut messages: Vec<Inject> = (0..count)
            .map(|_| Inject::draw(&mut rng, inject_window_ms))
            .collect();
        messages.sort_by_key(|m| m.at_ms);
        // The notice knobs come from a stream of their own, so that every draw above (and the
        // scenarios of the seeds kept as regressions) stays what it was before them.
        let mut nrng = Rng::new(seed ^ 0xde1a_7000_0000_0000);
        for m in &mut messages {
            m.notices = if nrng.chance(700) {
                NoticeSwitches::ALL
            } else {
                NoticeSwitches::from_byte(0x80 | nrng.below(16) as u8)
            };
        }
        // Classes from a stream of their own; regression seeds keep every message normal.
        let mut prng = Rng::new(seed ^ 0x9c1a_5500_0000_0000);
        if !opts.no_admin {
            for m in &mut messages {
                m.priority = epoxi::envelope::Priority::ALL[prng.below(3) as usize];
            }
        }
        let delay_after_s = if nrng.chance(300) {
            0
        } else {
            nrng.range(1, max_age_s - 1)
        };
        let delay_without_notify = nrng.chance(500);
        let dead_letters = nrng.chance(500);
        let heal_at_ms = inject_window_ms + rng.range(0, max_age_s * 1000 * 2);
        let admin = match opts.no_admin {
            true => Vec::new(),
            false => draw_admin(
                &mut Rng::new(seed ^ 0xad31_5eed_0000_0000),
                inject_window_ms + 5_000,
            ),
        };
        let faulty = !opts.no_faults && rng.chance(750);
        let level = if faulty { rng.range(1, 4) as u32 } else { 0 };
        let mut faults = Faults {
            enospc: 8 * level,
            torn_write: 6 * level,
            fsync_fail: 6 * level,
            fsync_persisted: 500,
            truncate_fail: 100,
            crash_torn: 600,
            crashes: Vec::new(),
            flip: if faulty && rng.chance(200) { 1000 } else { 0 },
            dns_fail: 20 * level,
        };
        if !opts.no_crashes && rng.chance(550) {
            let n = rng.range(1, 3);
            for _ in 0..n {
                faults.crashes.push(rng.range(1, heal_at_ms.max(2)));
            }
            faults.crashes.sort_unstable();
        }
        let compact_live_ratio = if rng.chance(750) {
            rng.range(20, 90) as f64 / 100.0
        } else {
            0.0
        };
        // Shaping draws from a stream of its own; regression seeds run without it, as they
        // were kept.
        let mut srng = Rng::new(seed ^ 0x5ba9_e000_0000_0000);
        let message_rate = (!opts.no_admin && srng.chance(500)).then(|| {
            let count = srng.range(2, 40) as u32;
            // Small bursts (asked for when spent) and large ones (refilled ahead).
            let burst = match srng.chance(700) {
                true => srng.range(1, 5),
                false => srng.range(8, u64::from(count).max(8)),
            };
            epoxi::shaping::Rate::parse(&format!("{count}/s")).map(|r| r.with_burst(burst as u32))
        });
        let connection_rate = (!opts.no_admin && srng.chance(250))
            .then(|| epoxi::shaping::Rate::parse(&format!("{}/s", srng.range(1, 10))));
        Scenario {
            message_rate: message_rate.and_then(Result::ok),
            connection_rate: connection_rate.and_then(Result::ok),
            shards,
            sources,
            connections_max: rng.range(1, 3) as usize,
            messages_per_connection_max: rng.range(1, 40) as usize,
            rcpts_per_transaction_max: rng.range(1, 3) as usize,
            idle_timeout_ms: rng.range(20, 2_000),
            reply_timeout_ms: rng.range(300, 4_000),
            connect_timeout_ms: rng.range(100, 2_000),
            retry_base_ms,
            retry_factor: [1.0, 1.5, 2.0, 3.0][rng.below(4) as usize],
            retry_cap_ms,
            retry_jitter: [0.0, 0.1, 0.5][later.below(3) as usize],
            max_age_s,
            messages_max: if rng.chance(200) {
                rng.range(5, 40) as usize
            } else {
                10_000
            },
            limits: EngineLimits {
                segment_size_max: rng.range(4 << 10, 64 << 10),
                commit_batch_max: rng.range(2 << 10, 32 << 10) as usize,
                compact_live_ratio,
            },
            compaction_bytes_per_s: rng.range(256 << 10, 8 << 20),
            faults,
            messages,
            heal_at_ms,
            admin,
            delay_after_s,
            delay_without_notify,
            dead_letters,
        }
    }

    /// The settings for this run: the settled base for its source count, with the run's limits.
    pub fn settings(&self) -> Result<Rc<Settings>, String> {
        let base = base_settings(self.sources)?;
        let mut s = base.clone();
        let c = &mut s.config;
        c.shards.count = self.shards;
        c.delivery.connections_per_destination_max = self.connections_max;
        c.delivery.messages_per_connection_max = self.messages_per_connection_max;
        c.delivery.rcpts_per_transaction_max = self.rcpts_per_transaction_max;
        c.delivery.idle_timeout_ms = self.idle_timeout_ms;
        c.delivery.reply_timeout_ms = self.reply_timeout_ms;
        c.delivery.connect_timeout_ms = self.connect_timeout_ms;
        c.queue.retry_base_ms = self.retry_base_ms;
        c.queue.retry_factor = self.retry_factor;
        c.queue.retry_cap_ms = self.retry_cap_ms;
        c.queue.max_age_s = self.max_age_s;
        c.queue.messages_max = self.messages_max;
        c.notices.delay_after_s = self.delay_after_s;
        c.notices.delay_without_notify = self.delay_without_notify;
        c.dead_letter.enabled = self.dead_letters;
        c.queue.retry_jitter = self.retry_jitter;
        // The retry policy is compiled at settle time: rebuild it from the run's values.
        s.retry = std::sync::Arc::new(epoxi::queue::retry::RetryPolicy::new(
            epoxi::queue::retry::Backoff {
                first_ms: self.retry_base_ms,
                base_ms: self.retry_base_ms,
                factor: self.retry_factor,
                cap_ms: self.retry_cap_ms,
                jitter: self.retry_jitter,
                max_age_ms: self.max_age_s * 1000,
            },
        ));
        s.shard_count = self.shards;
        if self.message_rate.is_some() || self.connection_rate.is_some() {
            let c = &mut s.config;
            c.shaping.message_rate = self.message_rate.map(|r| r.to_string());
            c.shaping.connection_rate = self.connection_rate.map(|r| r.to_string());
            let names: Vec<String> = s.egress.sources.iter().map(|x| x.name.clone()).collect();
            let layers = epoxi::shaping::layers::Layers::from_config(&s.config, &names)
                .map_err(|e| e.to_string())?;
            s.shaping = std::sync::Arc::new(layers);
        }
        Ok(Rc::new(s))
    }
}

/// Up to four operations in the first `window_ms`: suspensions (for up to 30 s, so the run
/// still drains), resumes, flushes and bounces (with notices, as for any bounce) by domain.
fn draw_admin(rng: &mut Rng, window_ms: u64) -> Vec<(u64, epoxi::admin::Op)> {
    use epoxi::admin::{Op, Selector};
    if rng.chance(500) {
        return Vec::new();
    }
    let n = rng.range(1, 4);
    let mut ops = Vec::new();
    for _ in 0..n {
        let at = rng.range(0, window_ms);
        let domain = DOMAINS[rng.below(DOMAINS.len() as u64) as usize].to_owned();
        let op = match rng.below(4) {
            0 => Op::Suspend {
                selector: Selector::Domain(domain),
                duration_s: Some(rng.range(1, 30)),
                reason: Some("sim".into()),
            },
            1 => Op::Resume {
                selector: Selector::Domain(domain),
            },
            2 => Op::Flush { selector: None },
            _ => Op::Bounce {
                selector: Selector::Domain(domain),
                duration_s: Some(rng.range(0, 10)),
                reason: Some("sim".into()),
                notify: true,
            },
        };
        ops.push((at, op));
    }
    ops.sort_by_key(|(at, _)| *at);
    ops
}

impl Inject {
    fn draw(rng: &mut Rng, window_ms: u64) -> Inject {
        let n = rng.range(1, 3) as usize;
        let mut rcpts: Vec<(String, Notify)> = Vec::with_capacity(n);
        while rcpts.len() < n {
            // The domain that does not exist is rare: most mail should be deliverable.
            let domain = if rng.chance(40) {
                NX_DOMAIN
            } else {
                DOMAINS[rng.below(DOMAINS.len() as u64 - 1) as usize]
            };
            let address = format!("u{}@{domain}", rng.below(LOCAL_PARTS_MAX));
            if rcpts.iter().any(|(a, _)| *a == address) {
                continue;
            }
            let notify = match rng.weighted(&[70, 10, 10, 10]) {
                0 => Notify::Default,
                1 => Notify::Never,
                2 => Notify::On {
                    success: true,
                    failure: true,
                    delay: false,
                },
                _ => Notify::On {
                    success: false,
                    failure: false,
                    delay: true,
                },
            };
            rcpts.push((address, notify));
        }
        let sender = if rng.chance(50) {
            String::new()
        } else {
            let domain = DOMAINS[rng.below(DOMAINS.len() as u64 - 1) as usize];
            format!("s{}@{domain}", rng.below(4))
        };
        Inject {
            at_ms: rng.below(window_ms),
            origin: rng.below(3) as usize,
            sender,
            rcpts,
            ret: [Ret::Unspecified, Ret::Full, Ret::Headers][rng.below(3) as usize],
            body_len: rng.range(64, 3_000) as usize,
            notices: NoticeSwitches::ALL,
            priority: epoxi::envelope::Priority::Normal,
        }
    }
}

/// Settled settings for one or two egress sources, built once per process: settling builds TLS
/// configurations, which costs milliseconds a run cannot spare.
fn base_settings(sources: usize) -> Result<&'static Settings, String> {
    static ONE: OnceLock<Result<Settings, String>> = OnceLock::new();
    static TWO: OnceLock<Result<Settings, String>> = OnceLock::new();
    let cell = if sources >= 2 { &TWO } else { &ONE };
    cell.get_or_init(|| settle(sources))
        .as_ref()
        .map_err(Clone::clone)
}

fn settle(sources: usize) -> Result<Settings, String> {
    let mut cfg = Config::default();
    cfg.server.hostname = "sim.epoxi.test".into();
    // Named, so settling reads no /etc/resolv.conf; the simulation answers DNS itself.
    cfg.dns.resolvers = vec!["127.0.0.53:53".into()];
    cfg.delivery.starttls = "disabled".into();
    if sources >= 2 {
        cfg.source = (0..sources)
            .map(|i| SourceEntry {
                name: format!("src{i}"),
                address: None,
                ehlo: None,
                message_rate: None,
                warmup: None,
                warmup_start: None,
                warmup_start_ms: None,
            })
            .collect();
        cfg.pool = vec![PoolEntry {
            name: "default".into(),
            sources: (0..sources).map(|i| format!("src{i}")).collect(),
        }];
    }
    cfg.settle(Overrides {
        routes: ROUTES.iter().map(|r| (*r).to_owned()).collect(),
        ..Overrides::default()
    })
    .map_err(|e| e.to_string())
}

/// The connection-limit keys (`Hop::site_key`) of the sites above: one peer each.
pub fn site_keys() -> Vec<String> {
    let mut keys: Vec<String> = ROUTES
        .iter()
        .filter_map(|r| r.split_once('='))
        .map(|(_, target)| format!("[{target}]"))
        .collect();
    let mut hosts: Vec<&str> = MX_HOSTS.iter().map(|(_, h)| *h).collect();
    hosts.sort_unstable();
    keys.push(hosts.join(","));
    keys
}
