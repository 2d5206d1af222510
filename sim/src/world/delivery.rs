//! Delivery connections, as `delivery::connection` runs them: open (or fail, then close), then
//! ask the core for work — a job, a wait (until a time or a `WakeIdle`), or close — pipelining
//! a second transaction behind the first when the peer allows it, reading each body from the
//! spool when the peer asks for it, and reporting every result.

use std::collections::VecDeque;

use epoxi::core::{ConnFailure, ConnId, NextJob, Ticket};
use epoxi::outcome::RcptResult;
use epoxi::queue::Dest;
use epoxi::smtp::reply::Reply;

use super::storage::ReadError;
use super::{Local, World};
use crate::ledger::Violation;
use crate::peer::{ConnectPlan, Peer, TxnPlan};
use crate::rng::Rng;

/// Transactions in flight on one connection, at most (as `delivery::INFLIGHT_MAX`).
const INFLIGHT_MAX: usize = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Opening(ConnectPlan),
    /// Asking the core (or about to): a wake-up now is not lost.
    Asking,
    Waiting,
    Busy,
    Quitting,
}

#[derive(Debug)]
pub(super) struct SimConn {
    site: String,
    source: u16,
    state: State,
    inflight: VecDeque<(Box<Ticket>, TxnPlan)>,
    /// A `WakeIdle` came while the core was being asked (the adapter's `woken` future).
    woken: bool,
    wait_gen: u64,
}

/// The peer of `site` (one is made for a site the scenario did not list).
fn peer_of<'a>(
    peers: &'a mut std::collections::BTreeMap<String, Peer>,
    rng: &mut Rng,
    site: &str,
) -> &'a mut Peer {
    peers
        .entry(site.to_owned())
        .or_insert_with(|| Peer::new(site.to_owned(), rng))
}

/// What an `Ask` event may wake.
pub(super) enum Wake {
    Any,
    Idle(u64),
}

impl World {
    fn conn_mut(&mut self, s: usize, c: ConnId) -> Option<&mut SimConn> {
        self.shards[s].as_mut()?.conns.get_mut(&c)
    }

    /// `Action::Connect`: a connection task starts; the world counts it against its limit.
    pub(super) fn connect(
        &mut self,
        s: usize,
        c: ConnId,
        dest: Dest,
        source: usize,
    ) -> Result<(), Violation> {
        let site = dest.hop.site_key().to_string();
        let limit = self
            .settings
            .site_shape(&dest.hop)
            .of(source)
            .connections_max;
        let key = (site.clone(), source as u16);
        let open = self.open.entry(key.clone()).or_insert(0);
        *open += 1;
        let n = *open;
        self.stats.connections += 1;
        self.stats.max_open_per_key = self.stats.max_open_per_key.max(n);
        if let Some(rate) = self.sc.connection_rate {
            let now = self.now;
            let q = self.opened_at.entry(key.clone()).or_default();
            let opened = within_rate(q, &rate, now);
            // Permits are granted at the owner's pace; mesh delays may bunch their arrivals
            // by one per shard.
            let bound = rate.count + rate.burst - 1 + self.sc.shards as u32;
            if opened > bound {
                return Err(Violation::new(
                    "connection-rate",
                    format!(
                        "{opened} connections to {key:?} within {} ms (rate {rate}, bound {bound})",
                        rate.per_ms
                    ),
                ));
            }
        }
        self.note(|| {
            format!("s{s} connect {c:?} to {site} from source {source}: {n}/{limit} open")
        });
        if n > limit {
            return Err(Violation::new(
                "connection-limit",
                format!("{n} connections open to {key:?}, limit {limit} (shard {s} opened {c:?})"),
            ));
        }
        let timeout = self.sc.connect_timeout_ms;
        let plan =
            peer_of(&mut self.peers, &mut self.rng_peer, &site).connect_plan(&mut self.rng_peer);
        let delay = match plan {
            ConnectPlan::Open { delay_ms } | ConnectPlan::Refuse { delay_ms } => delay_ms,
            ConnectPlan::Timeout => timeout,
            ConnectPlan::Bind => 0,
        };
        let Some(sh) = self.shards[s].as_mut() else {
            return Ok(());
        };
        sh.conns.insert(
            c,
            SimConn {
                site,
                source: source as u16,
                state: State::Opening(plan),
                inflight: VecDeque::new(),
                woken: false,
                wait_gen: 0,
            },
        );
        self.local(delay, Local::ConnOpen(s, c));
        Ok(())
    }

    pub(super) fn conn_open(&mut self, s: usize, c: ConnId) -> Result<(), Violation> {
        let Some(conn) = self.conn_mut(s, c) else {
            return Ok(());
        };
        let State::Opening(plan) = conn.state else {
            return Ok(());
        };
        let site = conn.site.clone();
        let failure = match plan {
            ConnectPlan::Open { .. } => {
                conn.state = State::Asking;
                self.core_step(s, |core, now| core.conn_opened(c, &site, now))?;
                return self.ask(s, c);
            }
            ConnectPlan::Refuse { .. } => ConnFailure::Unreachable {
                why: format!("connect to {site} refused"),
                source_suspect: false,
            },
            ConnectPlan::Timeout => ConnFailure::Unreachable {
                why: format!("connect to {site} timed out"),
                source_suspect: true,
            },
            ConnectPlan::Bind => ConnFailure::Bind {
                why: "cannot bind the source address".into(),
            },
        };
        self.stats.conn_failures += 1;
        self.note(|| format!("s{s} {c:?} failed: {failure:?}"));
        self.forget(s, c);
        self.core_step(s, |core, now| {
            core.conn_failed(c, failure, now);
            core.conn_closed(c, now);
        })?;
        Ok(())
    }

    /// The connection is gone from the world's count (its socket is closed).
    fn forget(&mut self, s: usize, c: ConnId) {
        let Some(conn) = self.shards[s].as_mut().and_then(|sh| sh.conns.remove(&c)) else {
            return;
        };
        if let Some(n) = self.open.get_mut(&(conn.site.clone(), conn.source)) {
            *n = n.saturating_sub(1);
        }
    }

    /// Close connection `c` (after QUIT, or broken) and tell the core.
    pub(super) fn close(&mut self, s: usize, c: ConnId) -> Result<(), Violation> {
        self.forget(s, c);
        self.note(|| format!("s{s} {c:?} closed"));
        self.core_step(s, |core, now| core.conn_closed(c, now))?;
        Ok(())
    }

    /// An `Ask` or idle timer fired for `c`.
    pub(super) fn ask_if(&mut self, s: usize, c: ConnId, wake: Wake) -> Result<(), Violation> {
        let Some(conn) = self.conn_mut(s, c) else {
            return Ok(());
        };
        let go = match wake {
            Wake::Any => conn.state == State::Asking,
            Wake::Idle(gen) => conn.state == State::Waiting && conn.wait_gen == gen,
        };
        if go {
            self.ask(s, c)?;
        }
        Ok(())
    }

    /// `Action::WakeIdle`: every connection waiting for work asks again.
    pub(super) fn wake_idle(&mut self, s: usize) {
        let Some(sh) = self.shards[s].as_mut() else {
            return;
        };
        let mut asks = Vec::new();
        for (id, conn) in sh.conns.iter_mut() {
            match conn.state {
                State::Waiting => {
                    conn.state = State::Asking;
                    asks.push(*id);
                }
                State::Asking => conn.woken = true,
                _ => {}
            }
        }
        for id in asks {
            self.local(0, Local::Ask(s, id));
        }
    }

    /// Ask the core what `c` does next, and do it.
    fn ask(&mut self, s: usize, c: ConnId) -> Result<(), Violation> {
        let Some(conn) = self.conn_mut(s, c) else {
            return Ok(());
        };
        conn.state = State::Asking;
        conn.woken = false;
        let Some(next) = self.core_step(s, |core, now| core.next_job(c, now))? else {
            return Ok(());
        };
        let now = self.now;
        let Some(conn) = self.conn_mut(s, c) else {
            return Ok(());
        };
        match next {
            NextJob::Job(ticket) => {
                conn.state = State::Busy;
                self.begin(s, c, ticket)
            }
            NextJob::Wait { until_ms } => {
                if conn.woken {
                    // Woken while asking: the adapter's wait returns at once.
                    self.local(0, Local::Ask(s, c));
                    return Ok(());
                }
                conn.state = State::Waiting;
                conn.wait_gen += 1;
                let gen = conn.wait_gen;
                let wait = until_ms.saturating_sub(now).max(1);
                self.local(wait, Local::IdleWake(s, c, gen));
                Ok(())
            }
            NextJob::Close => {
                conn.state = State::Quitting;
                let delay = self.rng_net.range(0, 10);
                self.local(delay, Local::Quit(s, c));
                Ok(())
            }
        }
    }

    /// Start a ticket's transaction (or refuse it for SIZE, as the adapter's `begin`).
    fn begin(&mut self, s: usize, c: ConnId, ticket: Box<Ticket>) -> Result<(), Violation> {
        let Some(site) = self.conn_mut(s, c).map(|conn| conn.site.clone()) else {
            return Ok(());
        };
        self.check_starvation(s, &site, &ticket)?;
        let size_max = peer_of(&mut self.peers, &mut self.rng_peer, &site).size_max;
        if let Some(limit) = size_max.filter(|&n| ticket.size > n) {
            let reply = Reply::new(
                552,
                Some((5, 3, 4)),
                format!(
                    "Message of {} bytes exceeds the destination's SIZE limit of {limit}",
                    ticket.size
                ),
            );
            let results: Vec<(u16, RcptResult)> = ticket
                .job
                .rcpts
                .iter()
                .map(|&r| (r, RcptResult::Reply(reply.clone())))
                .collect();
            self.core_step(s, |core, now| core.txn_refused(&ticket.job, &results, now))?;
            if self
                .conn_mut(s, c)
                .is_some_and(|conn| conn.inflight.is_empty())
            {
                if let Some(conn) = self.conn_mut(s, c) {
                    conn.state = State::Asking;
                }
                self.local(0, Local::Ask(s, c));
            }
            return Ok(());
        }
        self.stats.transactions += 1;
        if let Some(rate) = self.sc.message_rate {
            let source = self.conn_mut(s, c).map_or(0, |conn| conn.source);
            let (now, shards) = (self.now, self.sc.shards as u32);
            let q = self.sent_at.entry((site.clone(), source)).or_default();
            let n = within_rate(q, &rate, now);
            // The GCRA lets count + burst - 1 go in a period; credits granted just before a
            // window and spent in it add at most a batch and a quarter per shard (a batch is
            // at most a burst; see `shaping::credits`).
            let bound = rate.count + rate.burst - 1 + shards * (rate.burst + rate.burst / 4);
            if n > bound {
                return Err(Violation::new(
                    "message-rate",
                    format!("{n} transactions to {site} from source {source} within {} ms (rate {rate}, bound {bound})", rate.per_ms),
                ));
            }
        }
        let peer = peer_of(&mut self.peers, &mut self.rng_peer, &site);
        let pipelining = peer.pipelining;
        let plan = peer.txn_plan(&mut self.rng_peer, ticket.rcpts.len());
        let early =
            pipelining && self.rng_peer.chance(500) && matches!(plan, TxnPlan::Replies { .. });
        let delay = self.plan_delay(&plan);
        let Some(conn) = self.conn_mut(s, c) else {
            return Ok(());
        };
        let first = conn.inflight.is_empty();
        conn.inflight.push_back((ticket, plan));
        if first {
            self.local(delay, Local::TxnEnd(s, c));
        }
        if first && early && INFLIGHT_MAX > 1 {
            // PIPELINING: the next envelope behind this one's final dot.
            if let Some(Some(next)) = self.core_step(s, |core, now| core.early_job(c, now))? {
                self.stats.pipelined += 1;
                return self.begin(s, c, next);
            }
        }
        Ok(())
    }

    fn plan_delay(&self, plan: &TxnPlan) -> u64 {
        match plan {
            TxnPlan::Replies { delay_ms, .. } | TxnPlan::Drop { delay_ms, .. } => *delay_ms,
            TxnPlan::Stall => self.sc.reply_timeout_ms,
        }
    }

    /// The oldest transaction on `c` ends.
    pub(super) fn txn_end(&mut self, s: usize, c: ConnId) -> Result<(), Violation> {
        let Some((ticket, plan)) = self
            .conn_mut(s, c)
            .and_then(|conn| conn.inflight.front().cloned())
        else {
            return Ok(());
        };
        // The peer asked for the body: read it from the spool, and check it is this job's
        // message (compaction moves records; the ticket's location must still hold it).
        match self.read_message(s, ticket.loc) {
            Ok(back) => {
                let expected: Vec<String> = ticket
                    .job
                    .rcpts
                    .iter()
                    .filter_map(|&r| back.envelope.rcpts.get(usize::from(r)))
                    .map(|r| r.address.clone())
                    .collect();
                if back.id != ticket.job.id || expected != ticket.rcpts {
                    return Err(Violation::new(
                        "wrong-record",
                        format!(
                            "s{s}: job {:#x} {:?} read message {:#x} {:?} at {:?}",
                            ticket.job.id, ticket.rcpts, back.id, expected, ticket.loc
                        ),
                    ));
                }
            }
            Err(ReadError::Missing) => {
                self.stats.body_read_failures += 1;
                let why = format!(
                    "cannot read the spooled message: segment {} gone",
                    ticket.loc.seq
                );
                return self.broken(s, c, &why);
            }
            Err(ReadError::Corrupt(e)) => {
                return Err(Violation::new(
                    "wrong-record",
                    format!(
                        "s{s}: job {:#x} at {:?}: {e} (segment is {:?} bytes)",
                        ticket.job.id,
                        ticket.loc,
                        self.disks[s].len(ticket.loc.seq)
                    ),
                ));
            }
        }
        let site = self
            .conn_mut(s, c)
            .map(|conn| conn.site.clone())
            .unwrap_or_default();
        match plan {
            TxnPlan::Replies { rcpts, .. } => {
                if let Some(conn) = self.conn_mut(s, c) {
                    conn.inflight.pop_front();
                }
                let results: Vec<(u16, RcptResult)> = ticket
                    .job
                    .rcpts
                    .iter()
                    .zip(rcpts)
                    .map(|(&r, reply)| (r, RcptResult::Reply(reply)))
                    .collect();
                self.receipts(s, &site, &ticket, &results);
                self.core_step(s, |core, now| core.txn_done(c, &ticket.job, &results, now))?;
                let next = self
                    .conn_mut(s, c)
                    .and_then(|conn| conn.inflight.front().map(|(_, p)| p.clone()));
                match next {
                    Some(p) => {
                        let delay = self.plan_delay(&p);
                        self.local(delay, Local::TxnEnd(s, c));
                        Ok(())
                    }
                    None => self.ask(s, c),
                }
            }
            TxnPlan::Drop { got_it, .. } => {
                if got_it {
                    let ok: Vec<(u16, RcptResult)> = ticket
                        .job
                        .rcpts
                        .iter()
                        .map(|&r| (r, RcptResult::Reply(Reply::new(250, None, "OK"))))
                        .collect();
                    self.receipts(s, &site, &ticket, &ok);
                }
                self.broken(s, c, "connection reset by peer")
            }
            TxnPlan::Stall => self.broken(s, c, "timed out waiting for the server's reply"),
        }
    }

    /// The peer's own record of what it accepted.
    fn receipts(&mut self, s: usize, site: &str, ticket: &Ticket, results: &[(u16, RcptResult)]) {
        let Some(rec) = self.msgs.get(&(s, ticket.job.id)).map(|t| t.rec) else {
            return;
        };
        let peer = peer_of(&mut self.peers, &mut self.rng_peer, site);
        for ((_, result), addr) in results.iter().zip(&ticket.rcpts) {
            if matches!(result, RcptResult::Reply(r) if r.code / 100 == 2) {
                *peer
                    .receipts
                    .entry((rec.0, rec.1, rec.2, addr.clone()))
                    .or_insert(0) += 1;
            }
        }
    }

    /// The connection broke: every transaction on it failed transiently.
    fn broken(&mut self, s: usize, c: ConnId, why: &str) -> Result<(), Violation> {
        self.stats.broken += 1;
        let inflight: Vec<(Box<Ticket>, TxnPlan)> = self
            .conn_mut(s, c)
            .map(|conn| conn.inflight.drain(..).collect())
            .unwrap_or_default();
        self.note(|| format!("s{s} {c:?} broken: {why} ({} in flight)", inflight.len()));
        self.core_step(s, |core, now| {
            for (ticket, _) in &inflight {
                let results: Vec<(u16, RcptResult)> = ticket
                    .job
                    .rcpts
                    .iter()
                    .map(|&r| (r, RcptResult::Failure(why.to_owned())))
                    .collect();
                core.txn_done(c, &ticket.job, &results, now);
            }
        })?;
        self.close(s, c)
    }
}

impl World {
    /// No class starves: while a class has jobs waiting for a site on a shard, it gets a
    /// transaction within three rounds of the weights (16 + 4 + 1 = 21 by default). The
    /// smooth weighted round robin picks each busy class once per round while the busy set
    /// stays the same; classes that empty and come back (fast retries of transactional mail,
    /// say) carry their credit, which delays the others by up to about two rounds: 43
    /// transactions for a bound of 21 was the most seen, over 10,000 seeds.
    fn check_starvation(&mut self, s: usize, site: &str, ticket: &Ticket) -> Result<(), Violation> {
        use epoxi::envelope::Priority;
        let Some(sh) = self.shards.get(s).and_then(Option::as_ref) else {
            return Ok(());
        };
        let q = sh.core.queue();
        let class = q.get(ticket.job.id).map(|m| m.priority());
        let dests: Vec<&Dest> = q
            .ready_dests()
            .filter(|d| &*d.hop.site_key() == site)
            .collect();
        let waiting = Priority::ALL.map(|p| dests.iter().any(|d| q.ready_has_class(d, p)));
        let weights = epoxi::queue::lanes::weights(&self.settings.config.queue.priority_weights);
        let bound: u32 = 3 * weights.iter().sum::<u32>();
        let counters = self.starved.entry((s, site.to_owned())).or_insert([0; 3]);
        for p in Priority::ALL {
            let i = p.index();
            if class == Some(p) || !waiting[i] {
                counters[i] = 0;
                continue;
            }
            counters[i] += 1;
            if counters[i] > bound {
                return Err(Violation::new(
                    "starvation",
                    format!("{p:?} mail waited through {} transactions to {site} on shard {s} (bound {bound})", counters[i]),
                ));
            }
        }
        Ok(())
    }
}

/// Note a start at `now_ms` among the recent ones `q`; how many fall within the rate's period.
fn within_rate(
    q: &mut std::collections::VecDeque<u64>,
    rate: &epoxi::shaping::Rate,
    now_ms: u64,
) -> u32 {
    while q.front().is_some_and(|&t| t + rate.per_ms <= now_ms) {
        q.pop_front();
    }
    q.push_back(now_ms);
    q.len() as u32
}
