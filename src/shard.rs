//! What one core runs: the spool, the queues, the event log and the inbound and outbound
//! SMTP adapters of one shard, wired together on top of the `shards` runtime.
//!
//! A message accepted on any shard is split by recipient domain: each part goes to the shard
//! that owns the domain (`shards::shard_of`), which spools it and answers when it is durable.
//! The accepting shard sends `250` only after every part is durable.
//!
//! Invariant: a shard only ever touches its own spool and queues. Other shards reach them by
//! sending a [`ShardMsg`] over the channel mesh.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use glommio::channels::local_channel::{self, LocalSender};
use hickory_proto::rr::RecordType;
use shards::{Notify, Peers};

use crate::bounce::{status_of, Action, Notice, NoticeRcpt, Return};
use crate::clock::now_ms;
use crate::config::{ListenerEntry, Settings};
use crate::dns::message::Answer;
use crate::dns::mx::Plan;
use crate::dns::resolver::{Resolver, ResolverConfig};
use crate::egress::{EgressState, HealthChange, Slots};
use crate::eventlog::{Event, EventKind, EventLog, Response};
use crate::queue::retry::{Backoff, Retry};
use crate::queue::{Dest, Job, MessageMeta, Queue, Rcpt};
use crate::route::{Hop, LookupError, Router, Site};
use crate::smtp::received::rfc5322_date;
use crate::smtp::reply::Reply;
use crate::spool::record::{
    notify_failure, notify_success, MessageRecord, OutcomeKind, OutcomeRecord,
};
use crate::spool::Location;
use crate::spool::{RcptState, Spool, SpoolConfig, SpoolError};

/// How often idle shards look at the shutdown flag and the retry schedule, in milliseconds.
/// Small enough that retries are late by at most this much; large enough to cost nothing.
const TICK_MS: u64 = 50;

/// A message the inbound side received, ready to spool.
pub struct Incoming {
    pub reception_id: String,
    pub received_ms: u64,
    pub mail_from: String,
    pub rcpts: Vec<String>,
    /// The message, our Received header already on top.
    pub body: Vec<u8>,
    pub peer: String,
    /// TLS version and cipher of the client's session, for the log.
    pub tls: Option<String>,
    /// `spool::record::FLAG_*`.
    pub flags: u8,
    pub dsn: Dsn,
}

/// The DSN envelope of a message (RFC 3461), as the spool keeps it.
#[derive(Clone, Debug, Default)]
pub struct Dsn {
    /// 0 not given, 1 FULL, 2 HDRS.
    pub ret: u8,
    pub envid: String,
    /// Per recipient, same order as the recipients: NOTIFY bits and ORCPT (`type;address`).
    pub notify: Vec<u8>,
    pub orcpt: Vec<String>,
}

/// One shard's share of a message: its recipients, their NOTIFY bits and ORCPTs.
type Part = (Vec<String>, Vec<u8>, Vec<String>);

/// A message part handed to its owning shard.
pub struct Submission {
    pub origin: usize,
    pub token: u64,
    pub reception_id: String,
    pub mail_from: String,
    pub rcpts: Vec<String>,
    pub body: Arc<Vec<u8>>,
    pub peer: String,
    pub received_ms: u64,
    /// TLS version and cipher of the client's session, for the log.
    pub tls: Option<String>,
    pub flags: u8,
    pub dsn: Dsn,
}

pub enum ShardMsg {
    Submit(Box<Submission>),
    /// The owning shard's answer: durable (its queue id) or not (why).
    Ack {
        token: u64,
        result: Result<u64, String>,
    },
}

/// State shared by all shards of one process: shutdown coordination only.
#[derive(Default)]
pub struct Shared {
    pub shutdown: AtomicBool,
    /// Shards whose inbound sessions have all ended since shutdown began.
    pub inbound_done: AtomicUsize,
    /// Shards that have bound their listener.
    pub listening: AtomicUsize,
    /// Delivery connections per (site, egress source), across shards.
    pub slots: Arc<Slots>,
}

/// Where a delivery attempt went, for the log: the remote host and the egress source.
#[derive(Clone, Copy, Debug)]
pub struct Via<'a> {
    pub peer: &'a str,
    pub source: Option<&'a str>,
}

impl Via<'_> {
    /// No connection was made (e.g. DNS said the domain takes no mail).
    pub const NONE: Via<'static> = Via {
        peer: "-",
        source: None,
    };
}

/// The outcome of one recipient in one attempt.
#[derive(Clone, Debug)]
pub enum RcptResult {
    Reply(Reply),
    /// No SMTP reply: connection refused, reset, timed out, protocol garbage.
    Failure(String),
}

pub struct ShardCtx {
    pub id: usize,
    pub count: usize,
    pub settings: Rc<Settings>,
    pub spool: Rc<Spool>,
    pub log: EventLog,
    pub router: Router,
    pub queue: RefCell<Queue>,
    pub backoff: Backoff,
    pub peers: Peers<ShardMsg>,
    pub shared: Arc<Shared>,
    acks: RefCell<HashMap<u64, LocalSender<Result<u64, String>>>>,
    next_token: Cell<u64>,
    next_reception: Cell<u64>,
    /// Wakes idle delivery connections: new ready jobs, or shutdown.
    pub work: Notify,
    /// Inbound sessions running on this shard.
    pub sessions: Cell<usize>,
    /// Of those, per client address (entries removed at zero, so the map stays small).
    pub sessions_by_ip: RefCell<HashMap<std::net::IpAddr, usize>>,
    /// Delivery connections running on this shard.
    pub deliveries: Cell<usize>,
    /// Failed AUTH attempts per client on this shard.
    pub auth_limiter: RefCell<crate::auth::AuthLimiter>,
    /// MX and address lookups; None when no resolver is configured.
    pub resolver: Option<Resolver>,
    /// This shard's view of the egress sources: health and round robin.
    pub egress: RefCell<EgressState>,
    /// Destinations with work waiting and no free connection slot (the site's limit is taken,
    /// maybe by other shards): tried again every tick.
    starved: RefCell<HashSet<Dest>>,
    /// Sites of recently resolved domains, until their MX answer's TTL runs out: what the
    /// resolver's cache holds, already turned into a site (no per-message parsing).
    sites: RefCell<HashMap<String, (Site, u64)>>,
}

impl ShardCtx {
    pub fn shutting_down(&self) -> bool {
        self.shared.shutdown.load(Ordering::Relaxed)
    }

    /// A new id for a received message: what the client is told in the 250 reply, what the
    /// Received header and every log line carry.
    pub fn reception_id(&self, now: u64) -> String {
        let n = self.next_reception.get();
        self.next_reception.set(n + 1);
        format!("{now:x}.{}.{n:x}", self.id)
    }

    /// Spool a transaction on the shards that own its recipients' domains. Returns the id to
    /// give the client once every part is durable, or the reason to give a temporary failure.
    pub async fn accept_message(self: &Rc<Self>, incoming: Incoming) -> Result<String, String> {
        let Incoming {
            reception_id,
            received_ms,
            mail_from,
            rcpts,
            body,
            peer,
            tls,
            flags,
            dsn,
        } = incoming;
        // Split by owning shard, each recipient with its own DSN parameters.
        let mut parts: BTreeMap<usize, Part> = BTreeMap::new();
        for (i, rcpt) in rcpts.into_iter().enumerate() {
            let domain = rcpt.rsplit_once('@').map_or("", |(_, d)| d);
            let part = parts
                .entry(shards::shard_of(domain, self.count))
                .or_default();
            part.1.push(dsn.notify.get(i).copied().unwrap_or(0));
            part.2.push(dsn.orcpt.get(i).cloned().unwrap_or_default());
            part.0.push(rcpt);
        }
        let part_dsn = |notify: Vec<u8>, orcpt: Vec<String>| Dsn {
            ret: dsn.ret,
            envid: dsn.envid.clone(),
            notify,
            orcpt,
        };
        // The common case, one part owned by this shard: no task, no shared body.
        if parts.len() == 1 && parts.contains_key(&self.id) {
            let (rcpts, notify, orcpt) = parts.into_values().next().unwrap_or_default();
            let sub = Submission {
                dsn: part_dsn(notify, orcpt),
                origin: self.id,
                token: 0,
                reception_id: reception_id.clone(),
                mail_from,
                rcpts,
                body: Arc::new(body),
                peer,
                received_ms,
                tls,
                flags,
            };
            return self.spool_part(sub).await.map(|_| reception_id);
        }
        let body = Arc::new(body);
        let mut tasks = Vec::with_capacity(parts.len());
        for (shard, (rcpts, notify, orcpt)) in parts {
            let sub = Submission {
                dsn: part_dsn(notify, orcpt),
                origin: self.id,
                token: 0,
                reception_id: reception_id.clone(),
                mail_from: mail_from.clone(),
                rcpts,
                body: body.clone(),
                peer: peer.clone(),
                received_ms,
                tls: tls.clone(),
                flags,
            };
            let ctx = self.clone();
            tasks.push(glommio::spawn_local(async move {
                if shard == ctx.id {
                    ctx.spool_part(sub).await
                } else {
                    ctx.submit_remote(shard, sub).await
                }
            }));
        }
        drop(body);
        let mut failure = None;
        for task in tasks {
            if let Err(e) = task.await {
                failure = Some(e);
            }
        }
        // Parts already durable on other shards stay queued: the client will retry after our
        // 4xx and the recipients may get the message twice, which SMTP allows; losing it is not.
        match failure {
            None => Ok(reception_id),
            Some(e) => Err(e),
        }
    }

    async fn submit_remote(&self, shard: usize, mut sub: Submission) -> Result<u64, String> {
        let token = self.next_token.get();
        self.next_token.set(token + 1);
        sub.token = token;
        let (tx, rx) = local_channel::new_bounded(1);
        self.acks.borrow_mut().insert(token, tx);
        if self
            .peers
            .send_to(shard, ShardMsg::Submit(Box::new(sub)))
            .await
            .is_err()
        {
            self.acks.borrow_mut().remove(&token);
            return Err(format!("shard {shard} is not accepting messages"));
        }
        match rx.recv().await {
            Some(result) => result,
            None => Err(format!("shard {shard} did not answer")),
        }
    }

    /// Spool one part on this shard and queue it for delivery.
    async fn spool_part(self: &Rc<Self>, sub: Submission) -> Result<u64, String> {
        let body = Arc::try_unwrap(sub.body).unwrap_or_else(|shared| (*shared).clone());
        let tenant = self.settings.egress.tenant_of(&body).map(Into::into);
        let success_notices = sub.dsn.notify.iter().any(|&b| notify_success(b));
        let size = body.len();
        let record = MessageRecord {
            id: 0,
            reception_id: sub.reception_id,
            received_ms: sub.received_ms,
            mail_from: sub.mail_from,
            rcpts: sub.rcpts,
            peer: sub.peer,
            flags: sub.flags,
            dsn_ret: sub.dsn.ret,
            dsn_envid: sub.dsn.envid,
            dsn_notify: sub.dsn.notify,
            dsn_orcpt: sub.dsn.orcpt,
            body,
        };
        // Keep the envelope for the queue; the body goes to disk only.
        let (reception_id, mail_from, rcpts, peer) = (
            record.reception_id.clone(),
            record.mail_from.clone(),
            record.rcpts.clone(),
            record.peer.clone(),
        );
        let (id, loc) = self
            .spool
            .append_message(record)
            .await
            .map_err(|e| match e {
                SpoolError::Closed => "shutting down".to_owned(),
                other => other.to_string(),
            })?;
        let rcpt_refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
        self.log.record(&Event {
            kind: EventKind::Reception,
            ts_ms: now_ms(),
            message_id: &reception_id,
            queue_id: id,
            shard: self.id,
            sender: &mail_from,
            recipient: None,
            recipients: Some(&rcpt_refs),
            domain: None,
            attempts: 0,
            response: None,
            peer: &peer,
            received_ms: sub.received_ms,
            next_attempt_ms: None,
            size,
            tls: sub.tls.as_deref(),
            source: None,
        });
        let meta = MessageMeta {
            id,
            loc,
            received_ms: sub.received_ms,
            reception_id: reception_id.into(),
            mail_from: mail_from.into(),
            size,
            flags: sub.flags,
            success_notices,
            tenant,
            remaining: rcpts.len() as u32,
            rcpts: rcpts
                .into_iter()
                .map(|a| Rcpt {
                    address: a.into(),
                    attempts: 0,
                    done: false,
                })
                .collect(),
        };
        let pending: Vec<u32> = (0..meta.rcpts.len() as u32).collect();
        self.queue.borrow_mut().insert(meta);
        self.dispatch(id, &pending, 0);
        Ok(id)
    }

    /// Handle a message from another shard.
    pub fn on_peer_message(self: &Rc<Self>, msg: ShardMsg) {
        match msg {
            ShardMsg::Submit(sub) => {
                let ctx = self.clone();
                glommio::spawn_local(async move {
                    let (origin, token) = (sub.origin, sub.token);
                    let result = ctx.spool_part(*sub).await;
                    // If the origin is gone it cannot answer its client either; the part is
                    // spooled and will be delivered, so nothing is lost.
                    let _ = ctx
                        .peers
                        .send_to(origin, ShardMsg::Ack { token, result })
                        .await;
                })
                .detach();
            }
            ShardMsg::Ack { token, result } => {
                if let Some(tx) = self.acks.borrow_mut().remove(&token) {
                    let _ = tx.try_send(result);
                }
            }
        }
    }

    /// Queue recipients of a message for delivery at `due_ms` (0 = now). Recipients are
    /// grouped by domain; each domain goes where a static route says, else to its MX site.
    pub fn dispatch(self: &Rc<Self>, message: u64, rcpts: &[u32], due_ms: u64) {
        let groups = {
            let queue = self.queue.borrow();
            let Some(meta) = queue.message(message) else {
                return;
            };
            let mut groups: Vec<(String, Vec<u32>)> = Vec::new();
            for &r in rcpts {
                let Some(rcpt) = meta.rcpts.get(r as usize) else {
                    continue;
                };
                if rcpt.done {
                    continue;
                }
                let domain = rcpt.domain().to_ascii_lowercase();
                match groups.iter_mut().find(|(d, _)| *d == domain) {
                    Some((_, v)) => v.push(r),
                    None => groups.push((domain, vec![r])),
                }
            }
            groups
                .into_iter()
                .map(|(domain, rcpts)| {
                    let tenant = meta.tenant.as_deref();
                    let pool = self
                        .settings
                        .egress
                        .pool_for(&meta.mail_from, &domain, tenant);
                    (domain, pool, rcpts)
                })
                .collect::<Vec<_>>()
        };
        let now = now_ms();
        for (domain, pool, rcpts) in groups {
            if due_ms > now {
                // Routed again when due: routes, MX records and pools may change meanwhile.
                let job = Job {
                    message,
                    rcpts,
                    target: None,
                };
                self.queue.borrow_mut().schedule(due_ms, job);
                continue;
            }
            match self.router.lookup(&domain) {
                Ok(dest) => self.ready_jobs(message, rcpts, Hop::Route(dest), pool),
                Err(LookupError::NoRoute) => self.dispatch_mx(message, rcpts, domain, pool),
            }
        }
    }

    /// Queue recipients for `domain`'s MX site: at once when its MX answer is cached, else
    /// once the lookup is done.
    fn dispatch_mx(self: &Rc<Self>, message: u64, rcpts: Vec<u32>, domain: String, pool: usize) {
        let Some(resolver) = &self.resolver else {
            let reply = Reply::new(
                451,
                Some((4, 4, 3)),
                format!("No route to {domain} and no DNS resolver configured"),
            );
            return self.fail_rcpts(message, &rcpts, &reply);
        };
        let known = self
            .sites
            .borrow()
            .get(&domain)
            .filter(|(_, expires_ms)| now_ms() < *expires_ms)
            .map(|(site, _)| site.clone());
        if let Some(site) = known {
            return self.ready_jobs(message, rcpts, Hop::Mx(site), pool);
        }
        if let Some((answer, until)) = resolver.cached(&domain, RecordType::MX) {
            let site = self.site_from(&domain, &answer, Some(until));
            return self.site_resolved(message, rcpts, pool, site);
        }
        let ctx = self.clone();
        glommio::spawn_local(async move {
            let answer = match &ctx.resolver {
                Some(resolver) => resolver.lookup(&domain, RecordType::MX).await,
                None => return,
            };
            let site = ctx.site_from(&domain, &answer, None);
            ctx.site_resolved(message, rcpts, pool, site);
        })
        .detach();
    }

    /// `domain`'s site from its MX answer, remembered as long as the resolver's cache keeps
    /// the answer: until `cached_until`, or for a fresh answer its (clamped) TTL.
    fn site_from(
        &self,
        domain: &str,
        answer: &Answer,
        cached_until: Option<u64>,
    ) -> Result<Site, Reply> {
        let site = site_of(domain, answer)?;
        let ttl_s = match answer {
            Answer::Mx(_, ttl) | Answer::NoData(ttl) => *ttl,
            _ => return Ok(site),
        };
        let dns = &self.settings.config.dns;
        let now = now_ms();
        let expires_ms = cached_until
            .unwrap_or_else(|| now + u64::from(ttl_s.clamp(dns.ttl_min_s, dns.ttl_max_s)) * 1000);
        let mut sites = self.sites.borrow_mut();
        if sites.len() >= dns.cache_entries_max {
            sites.retain(|_, (_, expires)| *expires > now);
            if sites.len() >= dns.cache_entries_max {
                sites.clear();
            }
        }
        sites.insert(domain.to_owned(), (site.clone(), expires_ms));
        Ok(site)
    }

    fn site_resolved(
        self: &Rc<Self>,
        message: u64,
        rcpts: Vec<u32>,
        pool: usize,
        site: Result<Site, Reply>,
    ) {
        match site {
            Ok(site) => self.ready_jobs(message, rcpts, Hop::Mx(site), pool),
            Err(reply) => self.fail_rcpts(message, &rcpts, &reply),
        }
    }

    /// Every recipient of `rcpts` gets `reply` without a connection being made.
    fn fail_rcpts(self: &Rc<Self>, message: u64, rcpts: &[u32], reply: &Reply) {
        let job = Job {
            message,
            rcpts: rcpts.to_vec(),
            target: None,
        };
        self.record_all(&job, &RcptResult::Reply(reply.clone()), Via::NONE);
    }

    /// The same outcome for every recipient of `job`.
    pub fn record_all(self: &Rc<Self>, job: &Job, result: &RcptResult, via: Via<'_>) {
        let results: Vec<(u32, RcptResult)> =
            job.rcpts.iter().map(|&r| (r, result.clone())).collect();
        self.record_results(job, &results, via);
    }

    /// Ready jobs for `hop`, at most `rcpts_per_transaction_max` recipients each.
    fn ready_jobs(self: &Rc<Self>, message: u64, rcpts: Vec<u32>, hop: Hop, pool: usize) {
        let cap = self.settings.config.delivery.rcpts_per_transaction_max;
        let dest = Dest { hop, pool };
        for chunk in rcpts.chunks(cap) {
            self.make_ready(Job {
                message,
                rcpts: chunk.to_vec(),
                target: Some(dest.clone()),
            });
        }
    }

    /// Put a job back on its ready queue (e.g. left over by a connection that closed).
    pub fn requeue(self: &Rc<Self>, job: Job) {
        self.make_ready(job);
    }

    fn make_ready(self: &Rc<Self>, job: Job) {
        let Some(dest) = job.target.clone() else {
            // Jobs without a destination are only ever scheduled; route it now.
            return self.dispatch(job.message, &job.rcpts, 0);
        };
        self.queue.borrow_mut().push_ready(job);
        self.connect_more(&dest);
        self.work.notify_all();
    }

    /// Open one more connection to `dest` when work waits that no idle connection will take,
    /// from the next source of its pool with a free slot for the site.
    fn connect_more(self: &Rc<Self>, dest: &Dest) {
        let target = Some(dest.clone());
        let egress = &self.settings.egress;
        let limit = self.settings.site_limits(&dest.hop).connections_max;
        {
            let mut queue = self.queue.borrow_mut();
            let dq = queue.dest(&target);
            // No work for another connection, or this shard alone already holds every slot
            // the pool's sources have for the site (its own connections will take the work;
            // no need to ask the shared count, which the busy path would otherwise do per
            // message).
            let slots_max = limit.saturating_mul(egress.pools[dest.pool].members.len());
            if dq.ready.len() <= dq.idle || dq.connections >= slots_max || self.shutting_down() {
                self.starved.borrow_mut().remove(dest);
                return;
            }
        }
        let sources = self
            .egress
            .borrow_mut()
            .candidates(egress, dest.pool, now_ms());
        if sources.is_empty() {
            // Every source of the pool has an address that cannot be bound.
            let pool = &egress.pools[dest.pool].name;
            let reply = Reply::new(
                451,
                Some((4, 4, 0)),
                format!("No usable source in egress pool `{pool}`"),
            );
            let jobs = self.queue.borrow_mut().drain_ready(&target);
            for job in jobs {
                self.fail_rcpts(job.message, &job.rcpts, &reply);
            }
            return;
        }
        let site = dest.hop.site_key();
        let Some((source, slot)) = sources.into_iter().find_map(|source| {
            self.shared
                .slots
                .acquire(&site, source, limit, self.id, now_ms())
                .map(|slot| (source, slot))
        }) else {
            self.starved.borrow_mut().insert(dest.clone());
            return;
        };
        self.starved.borrow_mut().remove(dest);
        self.queue.borrow_mut().dest(&target).connections += 1;
        self.deliveries.set(self.deliveries.get() + 1);
        let ctx = self.clone();
        glommio::spawn_local(crate::delivery::connection(ctx, dest.clone(), source, slot)).detach();
    }

    /// Log a change in an egress source's health (it left or rejoined rotation).
    pub fn source_health(&self, source: usize, change: Option<HealthChange>, why: &str) {
        let Some(change) = change else {
            return;
        };
        let src = &self.settings.egress.sources[source];
        let addr = src.address.map_or("any".to_owned(), |a| a.to_string());
        match change {
            HealthChange::Down { why: kind, until_ms } => eprintln!(
                "epoxi: shard {}: egress source `{}` ({addr}) out of rotation for {} s ({kind:?} failure): {why}",
                self.id,
                src.name,
                until_ms.saturating_sub(now_ms()).div_ceil(1000),
            ),
            HealthChange::Up => eprintln!(
                "epoxi: shard {}: egress source `{}` ({addr}) back in rotation",
                self.id, src.name
            ),
        }
    }

    /// Record what happened to each recipient of a job, log it, and reschedule what must be
    /// retried. `peer` is the remote host, for the log.
    pub fn record_results(self: &Rc<Self>, job: &Job, results: &[(u32, RcptResult)], via: Via<'_>) {
        let now = now_ms();
        let mut retry: Vec<(u64, u32)> = Vec::new();
        let mut final_seq = None;
        // Final outcomes that may call for a notice to the sender (decided by NOTIFY later).
        let mut notices: Vec<(u32, OutcomeKind, Response)> = Vec::new();
        let mut notice_for = None;
        // Failure outcomes whose notice must be durable first (see below).
        let mut after_notice: Vec<OutcomeRecord> = Vec::new();
        {
            let mut queue = self.queue.borrow_mut();
            let Some(meta) = queue.message_mut(job.message) else {
                return;
            };
            for (r, result) in results {
                let Some(rcpt) = meta.rcpts.get_mut(*r as usize) else {
                    continue;
                };
                if rcpt.done {
                    continue;
                }
                rcpt.attempts += 1;
                let response = match result {
                    RcptResult::Reply(reply) => response_of(reply),
                    RcptResult::Failure(why) => Response {
                        code: 451,
                        enhanced: "4.4.1".into(),
                        text: why.clone(),
                    },
                };
                let (kind, outcome, next) = if (200..300).contains(&response.code) {
                    (EventKind::Delivery, OutcomeKind::Delivered, None)
                } else if (500..600).contains(&response.code) {
                    (EventKind::Bounce, OutcomeKind::Bounced, None)
                } else {
                    match self
                        .backoff
                        .after_failure(rcpt.attempts, meta.received_ms, now)
                    {
                        Retry::At(at) => {
                            (EventKind::TransientFailure, OutcomeKind::Deferred, Some(at))
                        }
                        Retry::Expire => (EventKind::Expiration, OutcomeKind::Expired, None),
                    }
                };
                let record = OutcomeRecord {
                    message: meta.id,
                    rcpt: *r,
                    kind: outcome as u8,
                    attempts: rcpt.attempts,
                    at_ms: now,
                    next_attempt_ms: next.unwrap_or(0),
                };
                let wants_notice = match outcome {
                    OutcomeKind::Bounced | OutcomeKind::Expired => true,
                    OutcomeKind::Delivered => meta.success_notices,
                    OutcomeKind::Deferred => false,
                } && !meta.mail_from.is_empty();
                // A bounce or expiry is recorded only once its notice is spooled: a crash in
                // between leaves the recipient pending, so it bounces (and notifies) again
                // after restart: at least once. A delivery is recorded at once: its success
                // notice is at most once, since redelivering the message would be worse.
                let failure = matches!(outcome, OutcomeKind::Bounced | OutcomeKind::Expired);
                if wants_notice && failure {
                    after_notice.push(record);
                } else if let Err(e) = self.spool.append_outcome(meta.loc.seq, &record) {
                    eprintln!("shard {}: cannot record outcome: {e}", self.id);
                }
                self.log.record(&Event {
                    kind,
                    ts_ms: now,
                    message_id: &meta.reception_id,
                    queue_id: meta.id,
                    shard: self.id,
                    sender: &meta.mail_from,
                    recipient: Some(&rcpt.address),
                    recipients: None,
                    domain: Some(rcpt.domain()),
                    attempts: rcpt.attempts,
                    response: Some(&response),
                    peer: via.peer,
                    received_ms: meta.received_ms,
                    next_attempt_ms: next,
                    size: meta.size,
                    tls: None,
                    source: via.source,
                });
                if wants_notice {
                    notices.push((*r, outcome, response.clone()));
                }
                match next {
                    Some(at) => retry.push((at, *r)),
                    None => {
                        rcpt.done = true;
                        meta.remaining -= 1;
                    }
                }
            }
            if !notices.is_empty() {
                notice_for = Some((meta.loc, meta.mail_from.to_string(), meta.received_ms));
            }
            if meta.remaining == 0 {
                final_seq = Some(meta.loc.seq);
                queue.remove(job.message);
            }
        }
        match notice_for {
            // The notice task reads the original first, spools the notice, then records the
            // failures it reports and lets the original's segment go.
            Some((loc, mail_from, received_ms)) => {
                let ctx = self.clone();
                glommio::spawn_local(async move {
                    ctx.send_notice(loc, mail_from, received_ms, notices).await;
                    for record in &after_notice {
                        if let Err(e) = ctx.spool.append_outcome(loc.seq, record) {
                            eprintln!("shard {}: cannot record outcome: {e}", ctx.id);
                        }
                    }
                    if let Some(seq) = final_seq {
                        ctx.spool.message_final(seq);
                    }
                })
                .detach();
            }
            None => {
                if let Some(seq) = final_seq {
                    self.spool.message_final(seq);
                }
            }
        }
        // Recipients of one job retry together when they share a due time.
        retry.sort_unstable();
        let mut i = 0;
        while i < retry.len() {
            let at = retry[i].0;
            let rcpts: Vec<u32> = retry[i..]
                .iter()
                .take_while(|(t, _)| *t == at)
                .map(|(_, r)| *r)
                .collect();
            i += rcpts.len();
            self.dispatch(job.message, &rcpts, at);
        }
    }

    /// Build a delivery status notification (RFC 3464) for the recipients that asked for one
    /// (DSN NOTIFY, default: failures) and spool it to the sender from the null sender, so no
    /// notice is ever sent about a notice. Failures it reports are recorded only after it is
    /// spooled (at least once across a crash); success notices follow their delivery's record
    /// (at most once).
    async fn send_notice(
        self: &Rc<Self>,
        loc: Location,
        mail_from: String,
        received_ms: u64,
        finals: Vec<(u32, OutcomeKind, Response)>,
    ) {
        let stored = match self.spool.read_message(loc).await {
            Ok(stored) => stored,
            Err(e) => {
                eprintln!("shard {}: no notice: cannot read the message: {e}", self.id);
                return;
            }
        };
        let Ok(m) = stored.message() else { return };
        let rcpts: Vec<NoticeRcpt> = finals
            .iter()
            .filter_map(|(r, kind, response)| {
                let i = *r as usize;
                let bits = m.dsn_notify.get(i).copied().unwrap_or(0);
                let wanted = match kind {
                    OutcomeKind::Delivered => notify_success(bits),
                    _ => notify_failure(bits),
                };
                if !wanted {
                    return None;
                }
                Some(NoticeRcpt {
                    rcpt: m.rcpts.get(i)?.as_str().to_owned(),
                    orcpt: m
                        .dsn_orcpt
                        .get(i)
                        .map(|o| o.as_str().to_owned())
                        .unwrap_or_default(),
                    action: if *kind == OutcomeKind::Delivered {
                        Action::Delivered
                    } else {
                        Action::Failed
                    },
                    // RFC 3463 4.4.7: delivery time expired.
                    status: if *kind == OutcomeKind::Expired {
                        "4.4.7".into()
                    } else {
                        status_of(response.code, &response.enhanced)
                    },
                    diagnostic: format!(
                        "{} {} {}",
                        response.code, response.enhanced, response.text
                    ),
                })
            })
            .collect();
        if rcpts.is_empty() {
            return;
        }
        let now = now_ms();
        let notice_id = self.reception_id(now);
        let ret = if m.dsn_ret == 1 {
            Return::Full
        } else {
            Return::Headers
        };
        let body = crate::bounce::build(&Notice {
            host: &self.settings.hostname,
            to: &mail_from,
            envid: m.dsn_envid.as_str(),
            notice_id: &notice_id,
            arrival_date: &rfc5322_date(received_ms / 1000),
            date: &rfc5322_date(now / 1000),
            rcpts: &rcpts,
            original: m.body.as_slice(),
            ret,
        });
        let flags = crate::bounce::notice_flags(m.flags, ret);
        drop(stored);
        let incoming = Incoming {
            reception_id: notice_id,
            received_ms: now,
            mail_from: String::new(),
            rcpts: vec![mail_from],
            body,
            peer: "local".into(),
            tls: None,
            flags,
            dsn: Dsn::default(),
        };
        if let Err(e) = self.accept_message(incoming).await {
            eprintln!(
                "shard {}: cannot spool a delivery status notification: {e}",
                self.id
            );
        }
    }

    /// Move due retries to the ready queues, forever (until shutdown).
    async fn run_scheduler(self: Rc<Self>) {
        while !self.shutting_down() {
            let starved: Vec<Dest> = self.starved.borrow().iter().cloned().collect();
            for dest in starved {
                self.connect_more(&dest);
            }
            let due = self.queue.borrow_mut().take_due(now_ms());
            for job in due {
                // Route again: the configuration may have been missing a route last time.
                let rcpts = job.rcpts.clone();
                self.dispatch(job.message, &rcpts, 0);
            }
            glommio::timer::sleep(Duration::from_millis(TICK_MS)).await;
            self.log.flush();
        }
    }
}

/// A domain's site from its MX answer, or the reply for its recipients: bounce when the domain
/// does not exist or takes no mail (RFC 7505), retry when DNS failed.
fn site_of(domain: &str, answer: &Answer) -> Result<Site, Reply> {
    match crate::dns::mx::plan(domain, answer) {
        Plan::Hosts(hosts) => Ok(Site::new(hosts)),
        Plan::Refuse(_) if matches!(answer, Answer::NxDomain(_)) => Err(Reply::new(
            550,
            Some((5, 1, 2)),
            format!("Domain {domain} does not exist (NXDOMAIN)"),
        )),
        Plan::Refuse(_) => Err(Reply::new(
            556,
            Some((5, 1, 10)),
            format!("Domain {domain} does not accept mail (null MX)"),
        )),
        Plan::Retry(why) => Err(Reply::new(
            451,
            Some((4, 4, 3)),
            format!("MX lookup for {domain} failed: {why}"),
        )),
    }
}

pub fn response_of(reply: &Reply) -> Response {
    Response {
        code: reply.code,
        enhanced: reply
            .enhanced
            .map(|(a, b, c)| format!("{a}.{b}.{c}"))
            .unwrap_or_default(),
        text: reply.lines().collect::<Vec<_>>().join(" "),
    }
}

/// Run shard `shard`: recover, listen, deliver, until shutdown. Returns an error text when the
/// shard could not start.
pub async fn run(
    shard: shards::Shard<ShardMsg>,
    settings: Arc<Settings>,
    shared: Arc<Shared>,
) -> Result<(), String> {
    let settings = Rc::new((*settings).clone());
    let cfg = &settings.config;
    let spool_cfg = SpoolConfig {
        dir: cfg.spool.dir.join(format!("shard-{}", shard.id)),
        shard: shard.id as u32,
        segment_size_max: cfg.spool.segment_size_max,
        commit_window_us: cfg.spool.commit_window_us,
        commit_batch_max: cfg.spool.commit_batch_max,
    };
    let (spool, recovered) = Spool::open(spool_cfg)
        .await
        .map_err(|e| format!("shard {}: cannot open spool: {e}", shard.id))?;
    let log = EventLog::open(&cfg.log.dir, shard.id, cfg.log.file_size_max)
        .map_err(|e| format!("shard {}: {e}", shard.id))?;
    let report = &recovered.report;
    eprintln!(
        "epoxi: shard {} recovered {} segments, {} messages pending, {} corrupt records, {} torn tails",
        shard.id, report.segments, report.pending_messages, report.corrupt_records, report.torn_tails
    );
    let committer = glommio::spawn_local(spool.clone().run_committer());
    let ctx = Rc::new(ShardCtx {
        id: shard.id,
        count: shard.count,
        backoff: Backoff {
            base_ms: cfg.queue.retry_base_ms,
            factor: cfg.queue.retry_factor,
            cap_ms: cfg.queue.retry_cap_ms,
            max_age_ms: cfg.queue.max_age_s.saturating_mul(1000),
        },
        router: Router::new(settings.routes.clone()),
        settings: settings.clone(),
        spool: spool.clone(),
        log,
        queue: RefCell::new(Queue::default()),
        peers: shard.peers,
        shared: shared.clone(),
        acks: RefCell::new(HashMap::new()),
        next_token: Cell::new(1),
        next_reception: Cell::new(0),
        work: Notify::new(),
        sessions: Cell::new(0),
        sessions_by_ip: RefCell::new(HashMap::new()),
        deliveries: Cell::new(0),
        auth_limiter: RefCell::new(crate::auth::AuthLimiter::new(
            cfg.server.auth_failures_max,
            cfg.server.auth_failure_window_s.saturating_mul(1000),
        )),
        resolver: (!settings.resolvers.is_empty()).then(|| {
            Resolver::new(
                ResolverConfig {
                    servers: settings.resolvers.clone(),
                    timeout: Duration::from_millis(cfg.dns.timeout_ms),
                    attempts: cfg.dns.attempts,
                },
                crate::dns::cache::Cache::new(
                    cfg.dns.ttl_min_s,
                    cfg.dns.ttl_max_s,
                    cfg.dns.cache_entries_max,
                ),
            )
        }),
        egress: RefCell::new(EgressState::new(&settings.egress)),
        starved: RefCell::new(HashSet::new()),
        sites: RefCell::new(HashMap::new()),
    });

    // Requeue what recovery found.
    for msg in recovered.pending {
        let mut pending_now = Vec::new();
        let mut later: Vec<(u64, u32)> = Vec::new();
        let rcpts = msg
            .rcpts
            .iter()
            .zip(&msg.states)
            .enumerate()
            .map(|(i, (address, state))| {
                let (attempts, done) = match *state {
                    RcptState::Pending {
                        attempts,
                        next_attempt_ms,
                    } => {
                        if next_attempt_ms > 0 {
                            later.push((next_attempt_ms, i as u32));
                        } else {
                            pending_now.push(i as u32);
                        }
                        (attempts, false)
                    }
                    RcptState::Final(_) => (0, true),
                };
                Rcpt {
                    address: address.as_str().into(),
                    attempts,
                    done,
                }
            })
            .collect::<Vec<_>>();
        let stored = spool.read_message(msg.loc).await;
        let (reception_id, mail_from, size, flags, success_notices, tenant) = match &stored {
            Ok(s) => match s.message() {
                Ok(m) => (
                    m.reception_id.as_str().into(),
                    m.mail_from.as_str().into(),
                    m.body.len(),
                    m.flags,
                    m.dsn_notify.iter().any(|&b| notify_success(b)),
                    settings.egress.tenant_of(m.body.as_slice()).map(Into::into),
                ),
                Err(_) => ("?".into(), "".into(), 0, 0, false, None),
            },
            Err(_) => ("?".into(), "".into(), 0, 0, false, None),
        };
        let remaining = rcpts.iter().filter(|r| !r.done).count() as u32;
        ctx.queue.borrow_mut().insert(MessageMeta {
            id: msg.id,
            loc: msg.loc,
            received_ms: msg.received_ms,
            reception_id,
            mail_from,
            size,
            flags,
            success_notices,
            tenant,
            rcpts,
            remaining,
        });
        ctx.dispatch(msg.id, &pending_now, 0);
        for (at, r) in later {
            ctx.dispatch(msg.id, &[r], at);
        }
    }

    // Messages from other shards.
    let mut inbox_tasks = Vec::new();
    for (_, rx) in shard.inbox {
        let ctx = ctx.clone();
        inbox_tasks.push(glommio::spawn_local(async move {
            while let Some(msg) = rx.recv().await {
                ctx.on_peer_message(msg);
            }
        }));
    }

    let scheduler = glommio::spawn_local(ctx.clone().run_scheduler());
    let mut acceptors = Vec::new();
    let mut listeners = vec![ListenerEntry::plain(cfg.server.listen, false)];
    listeners.extend(
        settings
            .implicit_tls_listen
            .map(|address| ListenerEntry::plain(address, true)),
    );
    listeners.extend(cfg.listener.iter().cloned());
    for spec in listeners {
        let listener =
            crate::inbound::listen(spec.address).map_err(|e| format!("shard {}: {e}", ctx.id))?;
        acceptors.push(glommio::spawn_local(crate::inbound::accept_loop(
            ctx.clone(),
            listener,
            spec,
        )));
    }
    shared.listening.fetch_add(1, Ordering::SeqCst);

    // Wait for SIGTERM/SIGINT (set by main), then shut down in order.
    while !ctx.shutting_down() {
        glommio::timer::sleep(Duration::from_millis(TICK_MS)).await;
    }
    for acceptor in acceptors {
        acceptor.await;
    }
    ctx.work.notify_all();
    let grace = Duration::from_secs(cfg.server.shutdown_grace_s);
    let deadline = std::time::Instant::now() + grace;
    while ctx.sessions.get() > 0 && std::time::Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    // Other shards' sessions may still hand parts to this shard: keep the spool open until
    // every shard's inbound side is done.
    shared.inbound_done.fetch_add(1, Ordering::SeqCst);
    while shared.inbound_done.load(Ordering::SeqCst) < ctx.count
        && std::time::Instant::now() < deadline
    {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    while ctx.deliveries.get() > 0 && std::time::Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    scheduler.await;
    spool.close();
    committer.await;
    ctx.log.flush();
    ctx.peers.close();
    drop(inbox_tasks);
    Ok(())
}
