//! The core's delivery side: when to open a connection and from which source, the permits
//! that bound connections per (site, source) across shards, and what each connection does next.

use std::collections::VecDeque;
use std::rc::Rc;

use super::{Action, Core, DestState, PendingLease};
use crate::egress::lease::{owner_of, LeaseKey, LeaseMsg};
use crate::envelope::Body;
use crate::events::{Event, SourceHealth};
use crate::outcome::RcptResult;
use crate::queue::{Dest, Job};
use crate::shaping::layers::SiteShape;
use crate::smtp::reply::Reply;
use crate::spool::Location;

/// A connection carries at least this many messages before it hands its permit to a waiting
/// shard (so turns are not a connection per message).
pub const YIELD_AFTER_MESSAGES: u32 = 32;

/// Sites whose limits a shard memoises; past it the memo starts over (sites are far fewer
/// than this on any real queue; the bound keeps a pathological one from growing it forever).
const SHAPES_MAX: usize = 65_536;

/// Why held messages expire when their site's backoff outlasts their max age.
pub(super) const HOLD_SITE_DOWN: &str = "Destination in backoff after repeated connection failures";

/// A delivery connection of this shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// Where an attempt went, for the log: the remote host and the egress source.
#[derive(Clone, Debug)]
pub struct Via {
    pub peer: String,
    pub source: Option<usize>,
    /// The TLS outcome of the connection (or of its last failed host).
    pub tls: Option<Rc<crate::tlspolicy::TlsOutcome>>,
    /// The connection's site key (a reference count, not a copy): attempts report it even
    /// when the hop itself is not passed (deliveries need no retry policy).
    pub site: Option<std::sync::Arc<str>>,
}

impl Via {
    /// No connection was made (e.g. DNS said the domain takes no mail).
    pub const NONE: Via = Via {
        peer: String::new(),
        source: None,
        tls: None,
        site: None,
    };
}

/// Why a connection did not open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnFailure {
    /// No host of the destination could be reached: every job waiting for it fails the same
    /// way. `source_suspect`: the failures may be the source's fault (timeouts, unreachable
    /// networks, not refusals), and no connection was made at all.
    Unreachable { why: String, source_suspect: bool },
    /// The egress source's address cannot be bound: nothing was tried; the jobs stay queued
    /// for another source.
    Bind { why: String },
}

/// A job handed to a connection, with what its transaction needs from the queue.
#[derive(Clone, Debug, PartialEq)]
pub struct Ticket {
    pub job: Job,
    pub loc: Location,
    pub sender: String,
    pub rcpts: Vec<String>,
    pub size: u64,
    pub body: Body,
    pub smtputf8: bool,
}

/// What a connection should do now.
#[derive(Clone, Debug, PartialEq)]
pub enum NextJob {
    Job(Box<Ticket>),
    /// No work: wait until this time (or a [`Action::WakeIdle`]) and ask again.
    Wait {
        until_ms: u64,
    },
    /// Quit: idle too long, carried enough, another shard's turn, or shutting down.
    Close,
}

#[derive(Debug)]
pub(super) struct Conn {
    dest: Dest,
    key: LeaseKey,
    source: usize,
    started: u32,
    messages_max: u32,
    idle_timeout_ms: u64,
    idle_since_ms: Option<u64>,
    idle: bool,
    peer: String,
    tls: Option<Rc<crate::tlspolicy::TlsOutcome>>,
}

impl Core {
    /// The limits of `hop` from each source, memoised per site (see `shaping::layers`).
    pub(super) fn shape_of(&mut self, hop: &crate::route::Hop) -> Rc<SiteShape> {
        if let Some(s) = self.shapes.get(hop) {
            return s.clone();
        }
        if self.shapes.len() >= SHAPES_MAX {
            self.shapes.clear();
        }
        let shape = Rc::new(self.settings.site_shape(hop));
        self.shapes.insert(hop.clone(), shape.clone());
        shape
    }

    fn dest_state(&mut self, dest: &Dest) -> &mut DestState {
        self.dests.entry(dest.clone()).or_default()
    }

    fn tidy_dest(&mut self, dest: &Dest) {
        if let Some(d) = self.dests.get(dest) {
            if d.conns == 0 && d.requested == 0 {
                self.dests.remove(dest);
            }
        }
    }

    /// Ask for one more connection to `dest` when work waits that no idle or coming
    /// connection will take, from the next source of its pool.
    pub(super) fn connect_more(&mut self, dest: &Dest, now_ms: u64) {
        if self.stopping {
            return;
        }
        let ready = self.queue.ready_for(dest) as u32;
        let shape = self.shape_of(&dest.hop);
        let slots_max: u32 = self.settings.egress.pools[dest.pool]
            .members
            .iter()
            .map(|&(s, _)| shape.of(s).connections_max)
            .fold(0, u32::saturating_add);
        let ds = *self.dest_state(dest);
        if ready <= ds.idle + ds.requested || ds.conns + ds.requested >= slots_max {
            if ready > ds.idle {
                // Saturated: work waits in the ready queue; the timer must know when the
                // oldest may reach its deadline there.
                self.rearm();
            }
            self.tidy_dest(dest);
            return;
        }
        let mut sources = self
            .health
            .candidates(&self.settings.egress, dest.pool, now_ms);
        if !self.holds.is_empty() && !sources.is_empty() {
            let site = dest.hop.site_key();
            let mut until_min: Option<(u64, &'static str)> = None;
            sources.retain(|&s| {
                let key = LeaseKey {
                    site: site.clone(),
                    source: s as u16,
                };
                match self.holds.get(&key) {
                    Some(&(until, why)) if until > now_ms => {
                        if until_min.is_none_or(|(u, _)| until < u) {
                            until_min = Some((until, why));
                        }
                        false
                    }
                    _ => true,
                }
            });
            if let (true, Some((until, why))) = (sources.is_empty(), until_min) {
                // Every source's way to this site is held (a backoff, an adaptive
                // suspension, a warmup cap): its work waits, untried.
                if ds.conns == 0 && ds.requested == 0 {
                    let jobs = self.queue.drain_ready(dest);
                    self.hold_jobs(jobs, Some(&dest.hop), until, why, now_ms);
                }
                self.tidy_dest(dest);
                return;
            }
        }
        let Some((&first, rest)) = sources.split_first() else {
            // Every source of the pool has an address that cannot be bound.
            let pool = &self.settings.egress.pools[dest.pool].name;
            let reply = Reply::new(
                451,
                Some((4, 4, 0)),
                format!("No usable source in egress pool `{pool}`"),
            );
            let jobs = self.queue.drain_ready(dest);
            for job in jobs {
                self.fail(
                    job.id,
                    &job.rcpts,
                    &RcptResult::Reply(reply.clone()),
                    now_ms,
                );
            }
            self.tidy_dest(dest);
            return;
        };
        let pending = PendingLease {
            dest: dest.clone(),
            fallbacks: rest.iter().rev().copied().collect(),
            queued: false,
        };
        self.request_permit(first, pending, now_ms);
    }

    fn request_permit(&mut self, source: usize, pending: PendingLease, now_ms: u64) {
        let key = LeaseKey {
            site: pending.dest.hop.site_key(),
            source: source as u16,
        };
        let shape = *self.shape_of(&pending.dest.hop).of(source);
        self.dest_state(&pending.dest).requested += 1;
        self.pending_leases
            .entry(key.clone())
            .or_default()
            .push_back(pending);
        let msg = self
            .permits
            .want(&key, shape.connections_max, shape.connection_rate);
        self.send_lease(owner_of(&key, self.shards), msg, now_ms);
    }

    /// Send a lease message; this shard's own are handled at once.
    pub(super) fn send_lease(&mut self, to: usize, msg: LeaseMsg, now_ms: u64) {
        if to != self.shard {
            self.actions.push(Action::Lease { to, msg });
            return;
        }
        // Handle locally, iteratively (an answer can cause more messages), first in first out
        // as the mesh would carry them.
        let mut work = VecDeque::from([(self.shard, to, msg)]);
        while let Some((from, at, msg)) = work.pop_front() {
            debug_assert_eq!(at, self.shard);
            if is_request(&msg) {
                for (dest, reply) in self.owner_handle(from, msg, now_ms) {
                    if dest == self.shard {
                        work.push_back((self.shard, self.shard, reply));
                    } else {
                        self.actions.push(Action::Lease {
                            to: dest,
                            msg: reply,
                        });
                    }
                }
                self.site_changes(now_ms);
            } else {
                self.lease_answer(msg, now_ms);
            }
        }
    }

    /// Log the health changes of keys this shard owns.
    pub(super) fn site_changes(&mut self, now_ms: u64) {
        for change in self.budgets.take_changes() {
            let source = self
                .settings
                .egress
                .sources
                .get(usize::from(change.key.source))
                .map_or("?", |s| s.name.as_str());
            match change.down_until_ms {
                Some(until) => tracing::warn!(
                    "shard {}: site {} from source `{source}` in backoff for {} s after {} failed connections: {}",
                    self.shard,
                    change.key.site,
                    until.saturating_sub(now_ms).div_ceil(1000),
                    change.failures,
                    change.why
                ),
                None => tracing::info!(
                    "shard {}: site {} from source `{source}` is up again",
                    self.shard,
                    change.key.site
                ),
            }
            self.observers
                .emit(&Event::SiteHealth(crate::events::SiteHealth {
                    ts_ms: now_ms,
                    shard: self.shard,
                    site: &change.key.site,
                    source,
                    down_until_ms: change.down_until_ms,
                    failures: change.failures,
                    why: &change.why,
                }));
        }
    }

    /// Hold `jobs` for `hop` until `until_ms` (a site in backoff, a suspension) without an
    /// attempt: each recipient is scheduled for then, or for its message's deadline if that
    /// comes first, and expires at once when it has passed. No message outlives its max age
    /// because of a hold.
    pub(super) fn hold_jobs(
        &mut self,
        jobs: Vec<Job>,
        hop: Option<&crate::route::Hop>,
        until_ms: u64,
        why: &str,
        now_ms: u64,
    ) {
        let policy = self.settings.retry.clone();
        for job in jobs {
            let mut expired: Vec<(u16, RcptResult)> = Vec::new();
            {
                let Some(m) = self.queue.get(job.id) else {
                    continue;
                };
                let received = m.received_ms();
                let mut due: Vec<(u16, u64)> = Vec::with_capacity(job.rcpts.len());
                for &r in &job.rcpts {
                    if m.is_done(r) {
                        continue;
                    }
                    let domain = crate::envelope::domain_of(m.rcpt(r));
                    let deadline = received.saturating_add(policy.max_age_ms(domain, hop));
                    if now_ms >= deadline {
                        expired.push((
                            r,
                            RcptResult::Reply(Reply::new(451, Some((4, 4, 1)), why.to_owned())),
                        ));
                    } else {
                        due.push((r, until_ms.min(deadline)));
                    }
                }
                for (r, at) in due {
                    self.queue.schedule(job.id, r, at);
                }
            }
            if !expired.is_empty() {
                self.record_results(job.id, &expired, &Via::NONE, hop, now_ms);
            }
        }
        self.rearm();
    }

    /// A lease message from shard `from` (a request for a budget this shard owns, or an answer
    /// about a permit it asked for).
    pub fn lease_in(&mut self, from: usize, msg: LeaseMsg, now_ms: u64) {
        if is_request(&msg) {
            for (to, reply) in self.owner_handle(from, msg, now_ms) {
                self.send_lease(to, reply, now_ms);
            }
            self.site_changes(now_ms);
        } else {
            self.lease_answer(msg, now_ms);
        }
    }

    fn lease_answer(&mut self, msg: LeaseMsg, now_ms: u64) {
        match msg {
            LeaseMsg::Credit {
                key,
                granted,
                retry_at_ms,
            } => {
                if matches!(key, crate::shaping::credits::MeterKey::Tenant(_)) {
                    // Tenants waiting for an answer may go again (the next check says).
                    self.tenant_blocked.retain(|_, until| until.is_some());
                }
                self.credits.granted(&key, granted, retry_at_ms, now_ms);
                // Connections waiting for the answer take a message now, or learn how long
                // to wait for the next credit.
                self.actions.push(Action::WakeIdle);
            }
            LeaseMsg::Shaped {
                key,
                rule,
                until_ms,
                target,
            } => self.shaped(key, rule, until_ms, target, now_ms),
            LeaseMsg::Granted { key } => self.granted(key, now_ms),
            LeaseMsg::Queued { key } => self.queued(key, now_ms),
            LeaseMsg::Yield { key } => {
                self.permits.yield_asked(&key);
                self.actions.push(Action::WakeIdle);
            }
            LeaseMsg::Down { key, until_ms } => self.down(key, until_ms, now_ms),
            LeaseMsg::Up { key } => {
                self.holds.remove(&key);
            }
            _ => {}
        }
    }

    /// The owner dropped our oldest request for `key`: it is down until `until_ms`. Another
    /// source of the pool may still serve; else the destination's work waits.
    fn down(&mut self, key: LeaseKey, until_ms: u64, now_ms: u64) {
        self.permits.dropped(&key);
        let held = self
            .holds
            .entry(key.clone())
            .or_insert((until_ms, HOLD_SITE_DOWN));
        held.0 = held.0.max(until_ms);
        let pending = self
            .pending_leases
            .get_mut(&key)
            .and_then(|q| q.pop_front());
        if self.pending_leases.get(&key).is_some_and(|q| q.is_empty()) {
            self.pending_leases.remove(&key);
        }
        let Some(mut pending) = pending else {
            return;
        };
        let ds = self.dest_state(&pending.dest);
        ds.requested = ds.requested.saturating_sub(1);
        let dest = pending.dest.clone();
        if let Some(next) = pending.fallbacks.pop() {
            pending.queued = false;
            return self.request_permit(next, pending, now_ms);
        }
        self.connect_more(&dest, now_ms);
    }

    fn granted(&mut self, key: LeaseKey, now_ms: u64) {
        self.permits.granted(&key);
        let pending = self
            .pending_leases
            .get_mut(&key)
            .and_then(|q| q.pop_front());
        if self.pending_leases.get(&key).is_some_and(|q| q.is_empty()) {
            self.pending_leases.remove(&key);
        }
        let Some(pending) = pending else {
            // Not asked for (cannot happen): give it back.
            let msg = self.permits.release(&key);
            return self.send_lease(owner_of(&key, self.shards), msg, now_ms);
        };
        let dest = pending.dest;
        let ds = self.dest_state(&dest);
        ds.requested = ds.requested.saturating_sub(1);
        let idle = ds.idle;
        let wanted = !self.stopping && self.queue.ready_for(&dest) as u32 > idle;
        if !wanted {
            let msg = self.permits.release(&key);
            self.tidy_dest(&dest);
            return self.send_lease(owner_of(&key, self.shards), msg, now_ms);
        }
        let source = usize::from(key.source);
        let limits = *self.shape_of(&dest.hop).of(source);
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        self.dest_state(&dest).conns += 1;
        self.conns.insert(
            conn,
            Conn {
                dest: dest.clone(),
                key,
                source,
                started: 0,
                messages_max: limits.messages_per_connection_max,
                idle_timeout_ms: limits.idle_timeout_ms,
                idle_since_ms: None,
                idle: false,
                peer: String::new(),
                tls: None,
            },
        );
        self.actions.push(Action::Connect { conn, dest, source });
    }

    fn queued(&mut self, key: LeaseKey, now_ms: u64) {
        // The oldest request not answered yet is the one queued (answers come in order).
        let Some(q) = self.pending_leases.get_mut(&key) else {
            return;
        };
        let Some(p) = q.iter_mut().find(|p| !p.queued) else {
            return;
        };
        p.queued = true;
        let Some(next) = p.fallbacks.pop() else {
            return;
        };
        // Ask the pool's next source too; whichever grants first serves, the other's permit
        // goes back if it is not needed by then.
        let retry = PendingLease {
            dest: p.dest.clone(),
            fallbacks: std::mem::take(&mut p.fallbacks),
            queued: false,
        };
        self.request_permit(next, retry, now_ms);
    }

    /// Connection `conn` greeted and took EHLO, with `peer` (`host[address]:port`).
    /// The TLS outcome of connection `conn` (its session, or the last host it gave up on):
    /// every attempt it reports from now on carries it.
    pub fn conn_tls(&mut self, conn: ConnId, tls: crate::tlspolicy::TlsOutcome) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.tls = Some(Rc::new(tls));
        }
    }

    /// One TLS session to an MX host (or the attempt at one) ended with `tls`: for TLS
    /// reporting. Only sessions under a domain's own policy are counted: a connection to MX
    /// hosts shared by domains without one serves all of them, and none in particular.
    pub fn tls_session(
        &mut self,
        tls: &crate::tlspolicy::TlsOutcome,
        receiving_ip: Option<std::net::IpAddr>,
        now_ms: u64,
    ) {
        let Some(session) = crate::tlsrpt::Session::of(tls, receiving_ip) else {
            return;
        };
        self.observers
            .emit(&Event::TlsSession(crate::events::TlsSession {
                ts_ms: now_ms,
                shard: self.shard,
                session: &session,
            }));
    }

    pub fn conn_opened(&mut self, conn: ConnId, peer: &str, now_ms: u64) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.peer = peer.to_owned();
        let (source, key) = (c.source, c.key.clone());
        if let Some(change) = self.health.success(source) {
            self.source_health(source, change, "", now_ms);
        }
        // The owner resets the key's failure count (and ends a backoff this probe tested).
        self.send_lease(
            owner_of(&key, self.shards),
            LeaseMsg::Opened { key },
            now_ms,
        );
    }

    /// Connection `conn` did not open. The adapter calls [`Core::conn_closed`] after.
    pub fn conn_failed(&mut self, conn: ConnId, failure: ConnFailure, now_ms: u64) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let (dest, source, tls, key) = (c.dest.clone(), c.source, c.tls.clone(), c.key.clone());
        let key_site = key.site.clone();
        match failure {
            ConnFailure::Bind { why } => {
                let change = self.health.failure(
                    &self.settings.egress,
                    source,
                    crate::egress::Down::Bind,
                    now_ms,
                );
                if let Some(change) = change {
                    self.source_health(source, change, &why, now_ms);
                }
            }
            ConnFailure::Unreachable {
                why,
                source_suspect,
            } => {
                if source_suspect {
                    let change = self.health.failure(
                        &self.settings.egress,
                        source,
                        crate::egress::Down::Connect,
                        now_ms,
                    );
                    if let Some(change) = change {
                        self.source_health(source, change, &why, now_ms);
                    }
                }
                self.send_lease(
                    owner_of(&key, self.shards),
                    LeaseMsg::Failed {
                        key,
                        why: why.clone(),
                    },
                    now_ms,
                );
                let via = Via {
                    peer: dest.hop.to_string(),
                    source: Some(source),
                    tls,
                    site: Some(key_site),
                };
                let jobs = self.queue.drain_ready(&dest);
                let result = RcptResult::Failure(why);
                for job in jobs {
                    let results: Vec<(u16, RcptResult)> =
                        job.rcpts.iter().map(|&r| (r, result.clone())).collect();
                    self.record_results(job.id, &results, &via, Some(&dest.hop), now_ms);
                }
            }
        }
    }

    /// What connection `conn` should do next (it has no transaction in flight).
    pub fn next_job(&mut self, conn: ConnId, now_ms: u64) -> NextJob {
        let Some(c) = self.conns.get(&conn) else {
            return NextJob::Close;
        };
        let (dest, key, started, messages_max) =
            (c.dest.clone(), c.key.clone(), c.started, c.messages_max);
        let close = self.stopping
            || started >= messages_max
            || (started >= YIELD_AFTER_MESSAGES && self.permits.take_yield(&key))
            || self.held(&key, now_ms);
        let mut paced: Option<Option<u64>> = None;
        let next = if close || self.queue.ready_for(&dest) == 0 {
            None
        } else {
            match self.rate_gate(&dest, &key, now_ms) {
                Ok(()) => self.take_ticket(&dest, now_ms),
                Err(until) => {
                    paced = Some(until);
                    None
                }
            }
        };
        match next {
            Some(ticket) => {
                self.set_idle(conn, false, now_ms);
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.started += 1;
                }
                NextJob::Job(Box::new(ticket))
            }
            None if close => {
                self.set_idle(conn, false, now_ms);
                NextJob::Close
            }
            None => {
                // No work: an idle connection hands its permit to a waiting shard at once.
                if self.permits.take_yield(&key) {
                    self.set_idle(conn, false, now_ms);
                    return NextJob::Close;
                }
                self.set_idle(conn, true, now_ms);
                if let Some(until) = paced {
                    // Work waits for a rate, not for work: the connection is not idle
                    // for its timeout, and waits for the next credit (or a grant).
                    let Some(c) = self.conns.get_mut(&conn) else {
                        return NextJob::Close;
                    };
                    c.idle_since_ms = Some(now_ms);
                    let idle_until = now_ms + c.idle_timeout_ms;
                    return NextJob::Wait {
                        until_ms: until.map_or(idle_until, |u| u.min(idle_until)),
                    };
                }
                let Some(c) = self.conns.get(&conn) else {
                    return NextJob::Close;
                };
                let until_ms = c.idle_since_ms.unwrap_or(now_ms) + c.idle_timeout_ms;
                if now_ms >= until_ms {
                    self.set_idle(conn, false, now_ms);
                    return NextJob::Close;
                }
                NextJob::Wait { until_ms }
            }
        }
    }

    /// Another job for `conn` right away, to pipeline behind the one in flight; None when
    /// there is none or the connection should take no more.
    pub fn early_job(&mut self, conn: ConnId, now_ms: u64) -> Option<Box<Ticket>> {
        let c = self.conns.get(&conn)?;
        // `started` already counts the job in flight: this one would be number `started + 1`.
        if self.stopping || c.started >= c.messages_max {
            return None;
        }
        let (dest, key) = (c.dest.clone(), c.key.clone());
        if c.started >= YIELD_AFTER_MESSAGES && self.permits.yields_pending(&key) {
            return None;
        }
        if self.queue.ready_for(&dest) == 0 {
            return None;
        }
        if self.rate_gate(&dest, &key, now_ms).is_err() {
            return None;
        }
        let ticket = self.take_ticket(&dest, now_ms)?;
        if let Some(c) = self.conns.get_mut(&conn) {
            c.started += 1;
        }
        Some(Box::new(ticket))
    }

    fn set_idle(&mut self, conn: ConnId, idle: bool, now_ms: u64) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.idle == idle {
            return;
        }
        c.idle = idle;
        c.idle_since_ms = idle.then_some(now_ms);
        let dest = c.dest.clone();
        let ds = self.dest_state(&dest);
        if idle {
            ds.idle += 1;
        } else {
            ds.idle = ds.idle.saturating_sub(1);
        }
    }

    /// The next ready job of `dest` with what its transaction needs; jobs of messages gone
    /// meanwhile are skipped.
    fn take_ticket(&mut self, dest: &Dest, now_ms: u64) -> Option<Ticket> {
        let tenant_rates = self.settings.shaping.has_tenant_rates();
        loop {
            let job = match tenant_rates {
                false => self.queue.pop_ready(dest)?,
                true => {
                    // Tenants whose rate has no credit now keep their turn for later.
                    let blocked = &self.tenant_blocked;
                    self.queue.pop_ready_where(dest, |t| {
                        t.is_none_or(|id| {
                            !blocked
                                .get(&id)
                                .is_some_and(|until| until.is_none_or(|u| u > now_ms))
                        })
                    })?
                }
            };
            let Some(tenant) = self.queue.get(job.id).map(|m| m.tenant_id()) else {
                continue;
            };
            if tenant_rates && !self.tenant_credit(tenant, now_ms) {
                self.queue.push_ready(dest, job);
                continue;
            }
            let Some(m) = self.queue.get(job.id) else {
                continue;
            };
            let rcpts = job.rcpts.iter().map(|&r| m.rcpt(r).to_owned()).collect();
            // VERP (`oob.verp`): the return path names the message, so a bounce that comes
            // back out of band is matched by its envelope alone. The null sender stays null:
            // nothing may bounce back at a notice.
            let sender = match (&self.settings.oob_domain, self.settings.config.oob.verp) {
                (Some(domain), true) if !m.sender().is_empty() => {
                    crate::oob::verp_address(m.reception(), domain)
                }
                _ => m.sender().to_owned(),
            };
            return Some(Ticket {
                loc: m.loc(),
                sender,
                rcpts,
                size: m.size(),
                body: m.body(),
                smtputf8: m.smtputf8(),
                job,
            });
        }
    }

    /// The transaction of `job` on `conn` ended: each recipient's result.
    pub fn txn_done(
        &mut self,
        conn: ConnId,
        job: &Job,
        results: &[(u16, RcptResult)],
        now_ms: u64,
    ) {
        // The hop matters to the retry policy of failures only: no clone for a delivery.
        let failed = results.iter().any(|(_, r)| match r {
            RcptResult::Reply(reply) => !(200..300).contains(&reply.code),
            RcptResult::Failure(_) => true,
        });
        let (via, hop) = match self.conns.get(&conn) {
            Some(c) => (
                Via {
                    peer: c.peer.clone(),
                    source: Some(c.source),
                    tls: c.tls.clone(),
                    site: Some(c.key.site.clone()),
                },
                failed.then(|| c.dest.hop.clone()),
            ),
            None => (Via::NONE, None),
        };
        self.record_results(job.id, results, &via, hop.as_ref(), now_ms);
    }

    /// The transaction of `job` did not happen (e.g. the message's SIZE is over the next hop's
    /// limit, checked before sending): each recipient's result, logged without a peer.
    pub fn txn_refused(&mut self, job: &Job, results: &[(u16, RcptResult)], now_ms: u64) {
        self.record_results(job.id, results, &Via::NONE, None, now_ms);
    }

    /// Connection `conn` is closed (after QUIT, a failure, or never opened): its permit goes
    /// back, and work it left gets a fresh connection.
    pub fn conn_closed(&mut self, conn: ConnId, now_ms: u64) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        let ds = self.dest_state(&c.dest);
        ds.conns = ds.conns.saturating_sub(1);
        if c.idle {
            ds.idle = ds.idle.saturating_sub(1);
        }
        let msg = self.permits.release(&c.key);
        self.send_lease(owner_of(&c.key, self.shards), msg, now_ms);
        self.connect_more(&c.dest, now_ms);
        self.tidy_dest(&c.dest);
    }

    fn source_health(
        &mut self,
        source: usize,
        change: crate::egress::HealthChange,
        why: &str,
        now_ms: u64,
    ) {
        let src = &self.settings.egress.sources[source];
        let addr = src.address.map_or("any".to_owned(), |a| a.to_string());
        let down_until_ms = match change {
            crate::egress::HealthChange::Down {
                why: kind,
                until_ms,
            } => {
                tracing::warn!(
                    "shard {}: egress source `{}` ({addr}) out of rotation for {} s ({kind:?} failure): {why}",
                    self.shard,
                    src.name,
                    until_ms.saturating_sub(now_ms).div_ceil(1000)
                );
                Some(until_ms)
            }
            crate::egress::HealthChange::Up => {
                tracing::info!(
                    "shard {}: egress source `{}` ({addr}) back in rotation",
                    self.shard,
                    src.name
                );
                None
            }
        };
        self.observers.emit(&Event::SourceHealth(SourceHealth {
            ts_ms: now_ms,
            shard: self.shard,
            source: &src.name,
            down_until_ms,
            why,
        }));
    }
}

fn is_request(msg: &LeaseMsg) -> bool {
    matches!(
        msg,
        LeaseMsg::Acquire { .. }
            | LeaseMsg::Release { .. }
            | LeaseMsg::Cancel { .. }
            | LeaseMsg::Failed { .. }
            | LeaseMsg::Opened { .. }
            | LeaseMsg::Want { .. }
            | LeaseMsg::Matched { .. }
    )
}
