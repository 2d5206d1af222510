//! The simulated world: a manual clock, a discrete-event scheduler, the shards of one process
//! (each a real `Core` and a real spool `Engine` over an in-memory disk), the mesh between
//! them, the clients that submit mail, the peers that take it, and the crashes.
//!
//! Everything the glommio adapters do is done here by events: the core's actions are
//! performed like `shard::perform` does, the spool engine is driven like `spool::Spool` does,
//! connections like `delivery::connection`. Events are ordered by (time, sequence), and every
//! random decision comes from the seed, so a seed replays exactly.
//!
//! Two kinds of state: what dies with the process (cores, engines, connections, pending
//! appends, mesh messages, events of the current incarnation, tagged with its epoch), and what
//! the world keeps across crashes (the disks, the peers, the ledger, the clock).

mod delivery;
mod perform;
mod reception;
mod storage;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;

use epoxi::core::{ConnId, Core, CoreConfig, NoticeRequest};
use epoxi::envelope::{Envelope, ReceptionId};
use epoxi::events::{Event, Observer, Observers};
use epoxi::settings::Settings;
use epoxi::spool::engine::{Commit, Engine};
use epoxi::spool::Location;

use crate::disk::Disk;
use crate::ledger::{rec_key, EntryKey, Ledger, RecKey, Violation};
use crate::peer::Peer;
use crate::rng::Rng;
use crate::scenario::{Options, Scenario, EPOCH_MS};
use crate::trace::Trace;

/// Events one run may process: far more than a healthy run needs (a few hundred thousand), so
/// hitting it means something spins (a timer that never advances, a compaction loop).
const EVENTS_MAX: u64 = 20_000_000;
/// How long after healing a run may take to drain before it counts as stuck, beyond the
/// longest a message may live: generous, since draining waits for every retry schedule.
const DRAIN_MS_MAX: u64 = 30 * 60_000;
/// Slack allowed past a message's deadline plus one retry interval for its final outcome: the
/// last attempt's own connect and replies, and queueing behind other mail at a busy site.
const FINAL_SLACK_MS: u64 = 60_000;

/// What a run did, for the report.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub seed: u64,
    pub shards: usize,
    pub messages: usize,
    pub crashes: u32,
    pub virtual_ms: u64,
    pub events: u64,
    pub hash: u64,
    pub ledger: crate::ledger::LedgerStats,
    pub stats: Stats,
}

/// Counters of what happened, for the report and for tuning the scenarios.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub commits_ok: u64,
    pub commits_failed: u64,
    pub segments_created: u64,
    pub segments_deleted: u64,
    pub compactions: u64,
    pub compaction_copies: u64,
    pub compaction_errors: u64,
    /// Compactions that wrote back as many bytes as they read.
    pub compactions_no_gain: u64,
    /// Compactions the engine declined: they would have gained nothing.
    pub compactions_skipped: u64,
    pub moves: u64,
    pub connections: u64,
    pub transactions: u64,
    pub pipelined: u64,
    pub conn_failures: u64,
    pub broken: u64,
    /// Bodies that could not be read when the peer asked for DATA (segment gone).
    pub body_read_failures: u64,
    /// Notices whose original could not be read (segment gone).
    pub notice_read_failures: u64,
    pub notices_failed: u64,
    /// Messages let go with a dead letter.
    pub dead_letters: u64,
    pub parts_failed: u64,
    pub queue_full: u64,
    pub recovered: u64,
    pub quarantined: u64,
    pub set_aside_segments: u64,
    pub restore_errors: u64,
    pub lease_messages: u64,
    pub max_open_per_key: u32,
}

impl Stats {
    /// Add another run's counters (for totals over many seeds).
    pub fn add(&mut self, o: &Stats) {
        self.commits_ok += o.commits_ok;
        self.commits_failed += o.commits_failed;
        self.segments_created += o.segments_created;
        self.segments_deleted += o.segments_deleted;
        self.compactions += o.compactions;
        self.compaction_copies += o.compaction_copies;
        self.compaction_errors += o.compaction_errors;
        self.compactions_no_gain += o.compactions_no_gain;
        self.compactions_skipped += o.compactions_skipped;
        self.moves += o.moves;
        self.connections += o.connections;
        self.transactions += o.transactions;
        self.pipelined += o.pipelined;
        self.conn_failures += o.conn_failures;
        self.broken += o.broken;
        self.body_read_failures += o.body_read_failures;
        self.notice_read_failures += o.notice_read_failures;
        self.notices_failed += o.notices_failed;
        self.dead_letters += o.dead_letters;
        self.parts_failed += o.parts_failed;
        self.queue_full += o.queue_full;
        self.recovered += o.recovered;
        self.quarantined += o.quarantined;
        self.set_aside_segments += o.set_aside_segments;
        self.restore_errors += o.restore_errors;
        self.lease_messages += o.lease_messages;
        self.max_open_per_key = self.max_open_per_key.max(o.max_open_per_key);
    }
}

/// A world event. The ones in [`Local`] belong to one incarnation of the process.
#[derive(Debug)]
enum Ev {
    Inject(usize),
    PeerChange(String),
    Crash,
    Restart,
    Heal,
    /// The scenario's `admin[k]`, to every shard up.
    Admin(usize),
    Local(u64, Local),
}

#[derive(Debug)]
enum Local {
    Commit(usize),
    Sync(usize),
    Collect(usize),
    CompactRun(usize, u64, rkyv::util::AlignedVec),
    Timer(usize, u64),
    Rearm(usize),
    ConnOpen(usize, ConnId),
    Ask(usize, ConnId),
    IdleWake(usize, ConnId, u64),
    TxnEnd(usize, ConnId),
    Quit(usize, ConnId),
    Resolve(usize, String),
    Notice(usize, Box<NoticeRequest>),
    Lease {
        from: usize,
        to: usize,
    },
    /// A part handed to another shard over the mesh arrives there.
    Submit(u64),
    /// A remote part's result arrives back at the shard that received the message.
    Answer(u64, Result<(), String>),
}

impl Ev {
    fn code(&self) -> u64 {
        match self {
            Ev::Inject(k) => 1 | (*k as u64) << 8,
            Ev::PeerChange(_) => 2,
            Ev::Crash => 3,
            Ev::Restart => 4,
            Ev::Heal => 5,
            Ev::Admin(k) => 6 | (*k as u64) << 8,
            Ev::Local(_, l) => match l {
                Local::Commit(s) => 10 | (*s as u64) << 8,
                Local::Sync(s) => 11 | (*s as u64) << 8,
                Local::Collect(s) => 12 | (*s as u64) << 8,
                Local::CompactRun(s, q, _) => 14 | (*s as u64) << 8 | q << 16,
                Local::Timer(s, g) => 15 | (*s as u64) << 8 | g << 16,
                Local::Rearm(s) => 16 | (*s as u64) << 8,
                Local::ConnOpen(s, c) => 17 | (*s as u64) << 8 | c.0 << 16,
                Local::Ask(s, c) => 18 | (*s as u64) << 8 | c.0 << 16,
                Local::IdleWake(s, c, _) => 19 | (*s as u64) << 8 | c.0 << 16,
                Local::TxnEnd(s, c) => 20 | (*s as u64) << 8 | c.0 << 16,
                Local::Quit(s, c) => 21 | (*s as u64) << 8 | c.0 << 16,
                Local::Resolve(s, _) => 22 | (*s as u64) << 8,
                Local::Notice(s, r) => 23 | (*s as u64) << 8 | r.token << 16,
                Local::Lease { from, to } => 24 | (*from as u64) << 8 | (*to as u64) << 16,
                Local::Submit(p) => 25 | p << 8,
                Local::Answer(p, _) => 26 | p << 8,
            },
        }
    }
}

/// What the observers of a core saw, copied out for the world.
#[derive(Debug)]
enum Seen {
    Attempt {
        shard: usize,
        id: u64,
        key: EntryKey,
        outcome: epoxi::events::AttemptOutcome,
        ts_ms: u64,
        code: u16,
    },
    NoticeQueued {
        shard: usize,
        id: u64,
    },
    Health {
        shard: usize,
        source: String,
        down: bool,
    },
}

/// An observer on one core, feeding the world (it outlives the core: the ledger is the
/// world's).
struct Tap {
    out: Rc<RefCell<Vec<Seen>>>,
}

impl Observer for Tap {
    fn observe(&self, event: &Event<'_>) {
        let seen = match event {
            Event::Attempt(a) => Seen::Attempt {
                shard: a.shard,
                id: a.id,
                key: (rec_key(&a.reception), a.rcpt.to_owned()),
                outcome: a.outcome,
                ts_ms: a.ts_ms,
                code: a.response.code,
            },
            // A notice spooled; decisions that needed none (NOTIFY asked for none) are not
            // notices the ledger waits for.
            Event::Notice(n) if n.notice.is_some() => Seen::NoticeQueued {
                shard: n.shard,
                id: n.id,
            },
            Event::Notice(_) => return,
            Event::SourceHealth(h) => Seen::Health {
                shard: h.shard,
                source: h.source.to_owned(),
                down: h.down_until_ms.is_some(),
            },
            // Site health, admin operations, reports and suppression happen outside the
            // simulated world's checks.
            Event::Received(_)
            | Event::TlsSession(_)
            | Event::SiteHealth(_)
            | Event::Shaping(_)
            | Event::Admin(_)
            | Event::Oob(_)
            | Event::Feedback(_)
            | Event::OobUnparsed(_)
            | Event::Suppressed(_)
            | Event::Suppression(_)
            | Event::Alert(_) => return,
        };
        self.out.borrow_mut().push(seen);
    }
}

/// A batch being written: the committer's state between write and fdatasync.
struct Writing {
    commit: Commit,
    seq: u64,
    base: u64,
    /// The recipients whose final outcomes ride this batch.
    finals: Vec<EntryKey>,
}

/// A part waiting for its batch to commit.
#[derive(Clone, Copy, Debug)]
struct Waiter {
    part: u64,
    offset: u64,
    len: u32,
}

/// One shard of the running process.
struct ShardState {
    core: Core,
    engine: Engine,
    writing: Option<Writing>,
    commit_scheduled: bool,
    /// Parts by the batch they wait for.
    waiting: BTreeMap<u64, Vec<Waiter>>,
    /// Parts waiting for room in the open batch.
    room_wait: VecDeque<u64>,
    conns: BTreeMap<ConnId, delivery::SimConn>,
    /// Recipients whose final outcomes were appended to the open batch.
    finals_open: Vec<EntryKey>,
    timer_gen: u64,
    compacting: bool,
    collect_scheduled: bool,
}

/// A part of a message being spooled on `shard`.
#[derive(Debug)]
struct Part {
    inbound: u64,
    shard: usize,
    envelope: Envelope,
    body: Rc<Vec<u8>>,
    id: Option<u64>,
}

/// A message being received: acknowledged once every part is durable.
#[derive(Debug)]
struct Inbound {
    origin: usize,
    left: usize,
    error: Option<String>,
    keys: Vec<EntryKey>,
    notice: Option<NoticeJob>,
}

/// A notice being spooled for the core's request `token`.
#[derive(Debug)]
struct NoticeJob {
    token: u64,
    notice: ReceptionId,
    /// The recipients (of the original) it reports on.
    covers: Vec<EntryKey>,
    /// A delay notice (its recipients are still pending).
    delay: bool,
}

/// What the world knows of a queued message, across crashes: whose it is and where its record
/// is (for the delivery checks and to tell corruption from loss).
#[derive(Clone, Debug)]
struct Tracked {
    rec: RecKey,
    rcpts: Vec<String>,
    loc: Location,
}

pub struct World {
    seed: u64,
    sc: Scenario,
    settings: Rc<Settings>,
    now: u64,
    seq: u64,
    events: BTreeMap<(u64, u64), Ev>,
    processed: u64,
    epoch: u64,
    up: bool,
    healing: bool,
    crashes: u32,
    downtime_ms: u64,
    rng_fault: Rng,
    rng_peer: Rng,
    rng_net: Rng,
    disks: Vec<Disk>,
    shards: Vec<Option<ShardState>>,
    peers: BTreeMap<String, Peer>,
    /// Lease messages in flight per (from, to), in order, and when the last one lands.
    mesh: BTreeMap<(usize, usize), (VecDeque<epoxi::egress::lease::LeaseMsg>, u64)>,
    /// Open connections per (site key, source), over all shards.
    open: BTreeMap<(String, u16), u32>,
    /// Per (site key, source): when recent transactions and connections started, for the
    /// rate invariants (within the last period of the run's rates).
    sent_at: BTreeMap<(String, u16), VecDeque<u64>>,
    /// Per (shard, site key): transactions begun since each class last had one while it had
    /// jobs waiting (the starvation invariant).
    starved: BTreeMap<(usize, String), [u32; 3]>,
    opened_at: BTreeMap<(String, u16), VecDeque<u64>>,
    parts: BTreeMap<u64, Part>,
    next_part: u64,
    inbound: BTreeMap<u64, Inbound>,
    next_inbound: u64,
    /// Injections that arrived while the process was down: the clients try again after it
    /// restarts.
    held: Vec<usize>,
    injected: usize,
    reception_n: u64,
    msgs: BTreeMap<(usize, u64), Tracked>,
    ledger: Ledger,
    seen: Rc<RefCell<Vec<Seen>>>,
    /// The byte media corruption flipped at the last crash (shard, segment, offset): recovery
    /// may not see it as corruption (in the last record it reads as a torn tail).
    flipped: Option<(usize, u64, usize)>,
    trace: Trace,
    stats: Stats,
}

impl World {
    pub fn new(seed: u64, opts: &Options, trace: Trace) -> Result<World, Violation> {
        let sc = Scenario::from_seed(seed, opts);
        let settings = sc
            .settings()
            .map_err(|e| Violation::new("setup", format!("settings do not settle: {e}")))?;
        let mut rng = Rng::new(seed);
        let rng_fault = rng.fork();
        let mut rng_peer = rng.fork();
        let rng_net = rng.fork();
        let mut peers = BTreeMap::new();
        for name in crate::scenario::site_keys() {
            let peer = Peer::new(name.clone(), &mut rng_peer);
            peers.insert(name, peer);
        }
        let ledger = Ledger::new(sc.max_age_s * 1000);
        let shards = sc.shards;
        Ok(World {
            seed,
            settings,
            now: EPOCH_MS,
            seq: 0,
            events: BTreeMap::new(),
            processed: 0,
            epoch: 0,
            up: false,
            healing: false,
            crashes: 0,
            downtime_ms: 0,
            rng_fault,
            rng_peer,
            rng_net,
            disks: (0..shards).map(|_| Disk::default()).collect(),
            shards: (0..shards).map(|_| None).collect(),
            peers,
            mesh: BTreeMap::new(),
            open: BTreeMap::new(),
            sent_at: BTreeMap::new(),
            starved: BTreeMap::new(),
            opened_at: BTreeMap::new(),
            parts: BTreeMap::new(),
            next_part: 1,
            inbound: BTreeMap::new(),
            next_inbound: 1,
            held: Vec::new(),
            injected: 0,
            reception_n: 0,
            msgs: BTreeMap::new(),
            ledger,
            seen: Rc::new(RefCell::new(Vec::new())),
            flipped: None,
            trace,
            stats: Stats::default(),
            sc,
        })
    }

    fn at(&mut self, at_ms: u64, ev: Ev) {
        self.seq += 1;
        self.events.insert((at_ms.max(self.now), self.seq), ev);
    }

    /// Schedule an event of the running incarnation `delay_ms` from now.
    fn local(&mut self, delay_ms: u64, l: Local) {
        let at = self.now + delay_ms;
        self.at(at, Ev::Local(self.epoch, l));
    }

    fn note(&mut self, f: impl FnOnce() -> String) {
        if self.trace.on() {
            let line = format!("{:>9} {}", self.now - EPOCH_MS, f());
            self.trace.line(line);
        }
    }

    fn crashed(&self) -> bool {
        self.crashes > 0
    }

    /// Run to the end: inject, fault, crash, heal, drain, check.
    pub fn run(&mut self) -> Result<Summary, Violation> {
        for k in 0..self.sc.messages.len() {
            let at = EPOCH_MS + self.sc.messages[k].at_ms;
            self.at(at, Ev::Inject(k));
        }
        let names: Vec<String> = self.peers.keys().cloned().collect();
        for name in names {
            let at = EPOCH_MS + self.rng_peer.range(500, 20_000);
            self.at(at, Ev::PeerChange(name));
        }
        for t in self.sc.faults.crashes.clone() {
            self.at(EPOCH_MS + t, Ev::Crash);
        }
        let heal_at = EPOCH_MS + self.sc.heal_at_ms;
        self.at(heal_at, Ev::Heal);
        for k in 0..self.sc.admin.len() {
            let at = EPOCH_MS + self.sc.admin[k].0;
            self.at(at, Ev::Admin(k));
        }
        self.start()?;
        let limit = heal_at + self.sc.max_age_s * 1000 + self.sc.retry_cap_ms * 4 + DRAIN_MS_MAX;
        loop {
            if self.healing && self.drained() {
                break;
            }
            let Some(((t, _), ev)) = self.events.pop_first() else {
                return Err(Violation::new(
                    "drain",
                    format!(
                        "nothing left to happen, yet not drained: {}",
                        self.pending()
                    ),
                ));
            };
            if t > limit {
                return Err(Violation::new(
                    "drain",
                    format!(
                        "not drained {} s after healing: {}",
                        (t - heal_at) / 1000,
                        self.pending()
                    ),
                ));
            }
            self.now = t;
            self.processed += 1;
            if self.processed > EVENTS_MAX {
                return Err(Violation::new(
                    "livelock",
                    format!("{EVENTS_MAX} events and still going: {}", self.pending()),
                ));
            }
            self.trace.mix(t);
            self.trace.mix(ev.code());
            self.handle(ev)?;
        }
        self.check_end()?;
        Ok(Summary {
            seed: self.seed,
            shards: self.sc.shards,
            messages: self.sc.messages.len(),
            crashes: self.crashes,
            virtual_ms: self.now - EPOCH_MS,
            events: self.processed,
            hash: self.trace.hash(),
            ledger: self.ledger.stats(),
            stats: self.stats.clone(),
        })
    }

    pub fn take_trace(&mut self) -> Vec<String> {
        self.trace.take_lines()
    }

    pub fn now_ms(&self) -> u64 {
        self.now - EPOCH_MS
    }

    fn handle(&mut self, ev: Ev) -> Result<(), Violation> {
        match ev {
            Ev::Inject(k) => self.inject(k),
            Ev::PeerChange(name) => {
                if self.healing {
                    return Ok(());
                }
                if let Some(p) = self.peers.get_mut(&name) {
                    p.change(&mut self.rng_peer);
                    let (profile, pipelining, size) = (p.profile, p.pipelining, p.size_max);
                    self.note(|| {
                        format!("peer {name}: {profile:?} pipelining={pipelining} size={size:?}")
                    });
                }
                let next = self.now + self.rng_peer.range(1_000, 30_000);
                self.at(next, Ev::PeerChange(name));
                Ok(())
            }
            Ev::Crash => self.crash(),
            Ev::Restart => self.start(),
            Ev::Admin(k) => {
                let op = self.sc.admin[k].1.clone();
                self.note(|| format!("admin {op:?}"));
                for s in 0..self.shards.len() {
                    // Mass operations step by step, actions performed between steps, as the
                    // shard adapter does.
                    let mut cursor = 0;
                    loop {
                        let step = self.core_step(s, |c, now| c.admin_step(&op, cursor, now))?;
                        match step.and_then(|st| st.next) {
                            Some(next) => cursor = next,
                            None => break,
                        }
                    }
                }
                Ok(())
            }
            Ev::Heal => {
                self.healing = true;
                for p in self.peers.values_mut() {
                    p.heal();
                }
                self.note(|| "heal: faults off, every peer accepts".into());
                Ok(())
            }
            Ev::Local(epoch, l) => {
                if epoch != self.epoch || !self.up {
                    return Ok(());
                }
                self.local_event(l)
            }
        }
    }

    fn local_event(&mut self, l: Local) -> Result<(), Violation> {
        match l {
            Local::Commit(s) => self.commit_start(s),
            Local::Sync(s) => self.commit_sync(s),
            Local::Collect(s) => self.collect(s),
            Local::CompactRun(s, seq, bytes) => self.compact_run(s, seq, bytes),
            Local::Timer(s, gen) => {
                let current = self.shards[s]
                    .as_ref()
                    .is_some_and(|sh| sh.timer_gen == gen);
                if current {
                    self.timer_wake(s)?;
                }
                Ok(())
            }
            Local::Rearm(s) => self.timer_wake(s),
            Local::ConnOpen(s, c) => self.conn_open(s, c),
            Local::Ask(s, c) => self.ask_if(s, c, delivery::Wake::Any),
            Local::IdleWake(s, c, gen) => self.ask_if(s, c, delivery::Wake::Idle(gen)),
            Local::TxnEnd(s, c) => self.txn_end(s, c),
            Local::Quit(s, c) => self.close(s, c),
            Local::Resolve(s, domain) => self.resolve(s, domain),
            Local::Notice(s, req) => self.notice(s, *req),
            Local::Lease { from, to } => self.lease_arrive(from, to),
            Local::Submit(p) => self.spool_part(p),
            Local::Answer(ib, result) => self.inbound_result(ib, result),
        }
    }

    /// Run one step of shard `s`'s core, then perform what it decided, as `CoreCell::with`
    /// does. None when the shard is not running.
    fn core_step<R>(
        &mut self,
        s: usize,
        f: impl FnOnce(&mut Core, u64) -> R,
    ) -> Result<Option<R>, Violation> {
        let now = self.now;
        let Some(sh) = self.shards.get_mut(s).and_then(Option::as_mut) else {
            return Ok(None);
        };
        let r = f(&mut sh.core, now);
        let actions = sh.core.take_actions();
        self.drain_seen()?;
        self.perform(s, actions)?;
        Ok(Some(r))
    }

    /// Feed what the observers saw to the ledger.
    fn drain_seen(&mut self) -> Result<(), Violation> {
        let seen: Vec<Seen> = std::mem::take(&mut *self.seen.borrow_mut());
        let crashed = self.crashed();
        for s in seen {
            match s {
                Seen::Attempt {
                    shard,
                    id,
                    key,
                    outcome,
                    ts_ms,
                    code,
                } => {
                    self.trace.mix(id);
                    self.trace.mix(u64::from(code));
                    self.note(|| format!("s{shard} attempt {id:#x} {key:?} {code} -> {outcome:?}"));
                    self.ledger.attempt(&key, outcome, ts_ms, crashed)?;
                }
                Seen::NoticeQueued { shard, id } => {
                    self.trace.mix(id);
                    self.note(|| format!("s{shard} notice queued about {id:#x}"));
                }
                Seen::Health {
                    shard,
                    source,
                    down,
                } => {
                    self.note(|| format!("s{shard} source {source} down={down}"));
                }
            }
        }
        Ok(())
    }

    /// Start (or restart) the process: recover every shard's spool, build its engine and core,
    /// requeue what recovery found.
    fn start(&mut self) -> Result<(), Violation> {
        use epoxi::spool::recovery::replay;
        use epoxi::spool::segment::{encode_header, SEGMENT_HEADER_LEN};
        let header_len = SEGMENT_HEADER_LEN as u64;
        let n = self.sc.shards;
        let mut recovered = Vec::with_capacity(n);
        let mut pending_keys: BTreeSet<EntryKey> = BTreeSet::new();
        // Where recovery found each pending recipient: (shard, id, record, state).
        let mut found: BTreeMap<EntryKey, (usize, u64, Location, epoxi::spool::RcptState)> =
            BTreeMap::new();
        // Per shard: unreadable ranges (seq, start, end) and segments set aside whole.
        let mut unreadable: Vec<Vec<(u64, u64, u64)>> = vec![Vec::new(); n];
        let mut aside: Vec<Vec<u64>> = vec![Vec::new(); n];
        for s in 0..n {
            let before = self.disks[s].set_aside().len();
            let segments = self.disks[s].prepare_recovery(s as u32);
            aside[s] = self.disks[s].set_aside()[before..].to_vec();
            self.stats.set_aside_segments += aside[s].len() as u64;
            if self.trace.on() {
                let lens: Vec<(u64, usize)> =
                    segments.iter().map(|b| (b.seq, b.bytes.len())).collect();
                self.note(|| format!("s{s} recovering segments (seq, bytes) {lens:?}"));
            }
            let (mut rec, _set_aside) = replay(s as u32, segments);
            for u in &rec.report.unreadable {
                unreadable[s].push((u.seq, u.offset, u.offset + u.len as u64));
            }
            let flipped_here = match self.flipped {
                Some((shard, seq, at)) if shard == s => Some((seq, at as u64, at as u64 + 1)),
                _ => None,
            };
            self.stats.quarantined += rec.report.unreadable.len() as u64;
            // Unreadable records are reported, never turned into messages.
            for m in &rec.pending {
                let (lo, hi) = (m.loc.offset, m.loc.offset + u64::from(m.loc.len));
                if let Some(u) = unreadable[s]
                    .iter()
                    .find(|(seq, a, b)| *seq == m.loc.seq && lo < *b && *a < hi)
                {
                    return Err(Violation::new(
                        "quarantine",
                        format!(
                            "s{s}: message {:#x} recovered from unreadable bytes {u:?}",
                            m.id
                        ),
                    ));
                }
                let rk = rec_key(&m.envelope.reception);
                for (i, state) in m.states.iter().enumerate() {
                    if matches!(state, epoxi::spool::RcptState::Pending { .. }) {
                        if let Some(r) = m.envelope.rcpts.get(i) {
                            pending_keys.insert((rk, r.address.clone()));
                            found.insert((rk, r.address.clone()), (s, m.id, m.loc, *state));
                        }
                    }
                }
            }
            unreadable[s].extend(flipped_here);
            if self.trace.on() {
                let locs: Vec<(u64, u64, u64)> = rec
                    .pending
                    .iter()
                    .map(|m| (m.id, m.loc.seq, m.loc.offset))
                    .collect();
                self.note(|| format!("s{s} recovered (id, seq, offset) {locs:x?}"));
            }
            let current = rec.segments.keys().next_back().map_or(1, |last| last + 1);
            self.disks[s].create(current, &encode_header(s as u32, current));
            let segments = std::mem::take(&mut rec.segments);
            let engine = Engine::new(self.sc.limits, segments, current, header_len);
            let observers = Observers::new(vec![Rc::new(Tap {
                out: self.seen.clone(),
            })]);
            let core = Core::new(
                CoreConfig {
                    shard: s,
                    shards: n,
                    settings: self.settings.clone(),
                    has_resolver: true,
                },
                observers,
            );
            self.shards[s] = Some(ShardState {
                core,
                engine,
                writing: None,
                commit_scheduled: false,
                waiting: BTreeMap::new(),
                room_wait: VecDeque::new(),
                conns: BTreeMap::new(),
                finals_open: Vec::new(),
                timer_gen: 0,
                compacting: false,
                collect_scheduled: false,
            });
            self.stats.recovered += rec.pending.len() as u64;
            recovered.push(rec);
        }
        self.up = true;
        self.flipped = None;
        let restart = self.crashed();
        if restart {
            self.check_recovered(&pending_keys, &unreadable, &aside)?;
        }
        // What was durably final stays final, unless media corruption took records away.
        let corrupted =
            unreadable.iter().any(|u| !u.is_empty()) || aside.iter().any(|a| !a.is_empty());
        if !corrupted {
            if let Some((key, _)) = self
                .ledger
                .entries
                .iter()
                .find(|(key, e)| e.durable_final && !e.exempt && pending_keys.contains(*key))
            {
                return Err(Violation::new(
                    "durable-regression",
                    format!(
                        "{key:?} had a final outcome committed, yet is pending after recovery: {:?}",
                        found.get(key)
                    ),
                ));
            }
        }
        // Pending now, whatever was durable before (corruption took the record): the later
        // checks (a delay notice only while pending) go by what recovery found.
        for key in &pending_keys {
            if let Some(e) = self.ledger.entries.get_mut(key) {
                e.durable_final = false;
            }
        }
        // Rates and class turns are in memory only: a restart starts them afresh (one more
        // burst may go), so their invariants count from here.
        self.sent_at.clear();
        self.opened_at.clear();
        self.starved.clear();
        self.note(|| {
            format!(
                "start: {} shards, {} messages recovered, {} unreadable records",
                n,
                recovered.iter().map(|r| r.pending.len()).sum::<usize>(),
                unreadable.iter().map(Vec::len).sum::<usize>()
            )
        });
        for (s, rec) in recovered.into_iter().enumerate() {
            // What the world knew of this shard's messages is replaced by what recovery found.
            self.msgs.retain(|(shard, _), _| *shard != s);
            for m in &rec.pending {
                self.msgs.insert(
                    (s, m.id),
                    Tracked {
                        rec: rec_key(&m.envelope.reception),
                        rcpts: m.envelope.rcpts.iter().map(|r| r.address.clone()).collect(),
                        loc: m.loc,
                    },
                );
            }
            let errors = self
                .core_step(s, |c, now| {
                    let mut errors = Vec::new();
                    for m in &rec.pending {
                        if let Err(e) = c.restore(m, now) {
                            errors.push(format!("{:#x} at {:?}: {e}", m.id, m.loc));
                        }
                    }
                    c.restored(rec.id_max);
                    errors
                })?
                .unwrap_or_default();
            self.stats.restore_errors += errors.len() as u64;
            if !errors.is_empty() {
                self.note(|| format!("s{s} recovered messages set aside: {errors:?}"));
            }
            self.timer_wake(s)?;
            self.compact_check(s)?;
            self.schedule_collect(s);
        }
        let held = std::mem::take(&mut self.held);
        for k in held {
            let delay = self.rng_net.range(1, 500);
            self.at(self.now + delay, Ev::Inject(k));
        }
        Ok(())
    }

    /// Nothing acknowledged is lost: every acknowledged recipient without a final outcome is
    /// pending again after recovery, unless its record was set aside as unreadable.
    fn check_recovered(
        &mut self,
        pending: &BTreeSet<EntryKey>,
        unreadable: &[Vec<(u64, u64, u64)>],
        aside: &[Vec<u64>],
    ) -> Result<(), Violation> {
        // Acknowledged recipients not pending now: those without a final outcome are lost,
        // unless media corruption took their record (then so is any notice still owed).
        let mut gone: Vec<(EntryKey, bool)> = Vec::new();
        for (key, e) in &self.ledger.entries {
            if e.acked_at.is_some() && !e.exempt && !pending.contains(key) {
                gone.push((key.clone(), e.terminal.is_empty()));
            }
        }
        let unreadable_any =
            unreadable.iter().any(|u| !u.is_empty()) || aside.iter().any(|a| !a.is_empty());
        for (key, unfinished) in gone {
            if !unfinished && !unreadable_any {
                continue;
            }
            // Where the world last knew its record to be.
            let place = self
                .msgs
                .iter()
                .find(|(_, t)| t.rec == key.0 && t.rcpts.contains(&key.1))
                .map(|((s, id), t)| (*s, *id, t.loc));
            let corrupt = place.is_some_and(|(s, _, loc)| {
                let (lo, hi) = (loc.offset, loc.offset + u64::from(loc.len));
                aside[s].contains(&loc.seq)
                    || unreadable[s]
                        .iter()
                        .any(|(seq, a, b)| *seq == loc.seq && lo < *b && *a < hi)
            });
            if corrupt {
                if let Some(e) = self.ledger.entries.get_mut(&key) {
                    e.exempt = true;
                }
                continue;
            }
            if !unfinished {
                continue;
            }
            return Err(Violation::new(
                "no-loss",
                format!(
                    "acknowledged {key:?} is not pending after recovery (last known at {place:?})"
                ),
            ));
        }
        Ok(())
    }

    /// The process dies: everything in memory goes; the disks keep what a crash keeps.
    fn crash(&mut self) -> Result<(), Violation> {
        if !self.up || self.healing {
            return Ok(());
        }
        self.crashes += 1;
        self.up = false;
        self.epoch += 1;
        for sh in &mut self.shards {
            *sh = None;
        }
        let torn = self.sc.faults.crash_torn;
        for disk in &mut self.disks {
            disk.crash(&mut self.rng_fault, torn);
        }
        let mut flipped = None;
        if self.rng_fault.chance(self.sc.faults.flip) {
            let s = self.rng_fault.below(self.disks.len() as u64) as usize;
            flipped = self.disks[s]
                .flip(&mut self.rng_fault, 0)
                .map(|(seq, at)| (s, seq, at));
        }
        self.flipped = flipped;
        self.open.clear();
        self.mesh.clear();
        self.parts.clear();
        self.inbound.clear();
        self.events.retain(|_, ev| !matches!(ev, Ev::Local(..)));
        let down = self.rng_fault.range(50, 3_000);
        self.downtime_ms += down;
        self.note(|| format!("CRASH (down {down} ms, flipped {flipped:?})"));
        self.at(self.now + down, Ev::Restart);
        Ok(())
    }

    /// Whether the healed run is done: nothing queued, in flight or left to write anywhere.
    fn drained(&self) -> bool {
        if !self.up
            || !self.parts.is_empty()
            || !self.inbound.is_empty()
            || !self.held.is_empty()
            || self.injected < self.sc.messages.len()
            || self.mesh.values().any(|(q, _)| !q.is_empty())
        {
            return false;
        }
        let compaction = self.sc.limits.compact_live_ratio > 0.0;
        self.shards.iter().all(|sh| {
            sh.as_ref().is_some_and(|sh| {
                sh.core.queue().is_empty()
                    && sh.core.connections() == 0
                    && sh.core.notices_pending() == 0
                    && sh.writing.is_none()
                    && !sh.engine.wants_commit()
                    && sh.waiting.is_empty()
                    && !sh.compacting
                    && !(compaction && sh.engine.compaction_candidate().is_some())
                    && sh.engine.collectable().is_empty()
            })
        })
    }

    /// What is still going on, for a report.
    fn pending(&self) -> String {
        let mut out = format!(
            "up={} parts={} inbound={} held={} injected={}/{} mesh={}",
            self.up,
            self.parts.len(),
            self.inbound.len(),
            self.held.len(),
            self.injected,
            self.sc.messages.len(),
            self.mesh.values().map(|(q, _)| q.len()).sum::<usize>()
        );
        for (s, sh) in self.shards.iter().enumerate() {
            let Some(sh) = sh else { continue };
            out.push_str(&format!(
                "; s{s}: queued={} ready={} scheduled={} next_wakeup={:?} conns={} notices={} \
                 writing={} wants_commit={} compacting={} candidate={:?} collectable={:?} segments={:?}",
                sh.core.queue().len(),
                sh.core.queue().ready_len(),
                sh.core.queue().scheduled_len(),
                sh.core.next_wakeup().map(|t| t.saturating_sub(self.now) as i64),
                sh.core.connections(),
                sh.core.notices_pending(),
                sh.writing.is_some(),
                sh.engine.wants_commit(),
                sh.compacting,
                sh.engine.compaction_candidate(),
                sh.engine.collectable(),
                sh.engine
                    .segments()
                    .iter()
                    .map(|(q, st)| (*q, st.live, st.len, st.deps.iter().copied().collect::<Vec<_>>()))
                    .collect::<Vec<_>>()
            ));
        }
        out
    }

    fn check_end(&mut self) -> Result<(), Violation> {
        let slack = FINAL_SLACK_MS + self.sc.reply_timeout_ms * 4 + self.downtime_ms;
        let found = self
            .ledger
            .check_end(self.crashed(), self.sc.retry_cap_ms, slack);
        if let Some(v) = found.into_iter().next() {
            return Err(v);
        }
        if let Some((key, n)) = self.open.iter().find(|(_, n)| **n > 0) {
            return Err(Violation::new(
                "connection-limit",
                format!("{n} connections to {key:?} still counted open after draining"),
            ));
        }
        // Everything final: the spool lets every segment go but the current one.
        for (s, sh) in self.shards.iter().enumerate() {
            let Some(sh) = sh else { continue };
            let segs = sh.engine.segments();
            if segs.len() != 1 || self.disks[s].file_count() != 1 {
                return Err(Violation::new(
                    "spool-leak",
                    format!(
                        "s{s}: segments {:?} (files {:?}) left after every message is final",
                        segs.iter()
                            .map(|(q, st)| (
                                *q,
                                st.live,
                                st.len,
                                st.deps.iter().copied().collect::<Vec<_>>()
                            ))
                            .collect::<Vec<_>>(),
                        self.disks[s].seqs()
                    ),
                ));
            }
        }
        Ok(())
    }
}
