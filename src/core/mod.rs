//! The core: one shard's orchestration as an I/O-free state machine.
//!
//! It owns the stages' decision state: the queue (messages, ready jobs, the retry schedule),
//! routing (static routes and the site memo), egress (source health and rotation, the
//! connection permits it holds and the budgets it owns), the delivery connections it runs, and
//! the outcomes and notices in progress. It is fed events — a message spooled, an MX answer, a
//! connection opened or broken, a transaction's replies, a lease message from another shard, the
//! clock reaching a due time — each with the current time, and answers with [`Action`]s for the
//! adapters to perform: spool an outcome, release a record, resolve a domain, open a
//! connection, send a lease message, build a notice, wake idle connections. Events at stage
//! boundaries go to the [`Observers`] as they happen.
//!
//! Nothing here reads a clock, touches a socket or a file, or awaits: the glommio driver
//! (`shard`) and the deterministic simulation (`epoxi-sim`) run the same code.

mod deliver;
mod finish;
mod gauges;
mod handle;
mod notify;
mod ops;
mod shape;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;

use crate::egress::lease::{Budgets, LeaseKey, LeaseMsg, Permits};
use crate::egress::EgressState;
use crate::envelope::{Envelope, ReceptionId};
use crate::events::{Event, Observers, Received, Response};
use crate::outcome::RcptResult;
use crate::queue::{Dest, Job, JobRcpts, Queue, QueueFull};
use crate::route::{Hop, LookupError, Router, SiteMemo};
use crate::settings::Settings;
use crate::smtp::reply::Reply;
use crate::spool::engine::LiveMessage;
use crate::spool::record::{OutcomeKind, OutcomeRecord};
use crate::spool::{Location, RecoveredMessage};

pub use deliver::{ConnFailure, ConnId, NextJob, Ticket, Via};
pub use handle::CoreCell;
pub use ops::{merge_counts, Step};

/// Least time between two checks of the ready queues for jobs past their deadline.
pub const READY_CHECK_GAP_MS: u64 = 1_000;
pub use notify::{DeadLetterRequest, DeadRcpt};

/// What the core asks its adapters to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Append an outcome record for a message whose record is in segment `seq`.
    Outcome { seq: u64, record: OutcomeRecord },
    /// Every recipient of message `id` (record at `loc`) is final: the spool may let it go.
    Final { id: u64, loc: Location },
    /// Look up the MX records of `domain` and report with [`Core::resolved`].
    Resolve { domain: String },
    /// Open delivery connection `conn` to `dest` from egress source `source`; report with
    /// [`Core::conn_opened`] / [`Core::conn_failed`], then drive it with [`Core::next_job`].
    Connect {
        conn: ConnId,
        dest: Dest,
        source: usize,
    },
    /// Idle connections should ask [`Core::next_job`] again (work, a yield, or shutdown).
    WakeIdle,
    /// Send a lease message to shard `to` (never this shard: the core handles its own).
    Lease { to: usize, msg: LeaseMsg },
    /// Build a delivery status notification and spool it for the sender; report with
    /// [`Core::notice_spooled`] or [`Core::notice_failed`].
    Notice(NoticeRequest),
    /// The earliest due time moved earlier: the timer should look at [`Core::next_wakeup`].
    Rearm,
    /// Message `id` failed for good (`dead_letter.enabled`): write its dead letter, durably,
    /// then let its record go as for [`Action::Final`].
    DeadLetter(DeadLetterRequest),
}

/// A recipient's final outcome that a notice may report (NOTIFY decides when it is built).
#[derive(Debug, Clone, PartialEq)]
pub struct NoticeRcpt {
    pub rcpt: u16,
    pub kind: OutcomeKind,
    pub response: Response,
}

/// What the notice stage needs to build and spool a notice.
#[derive(Debug, Clone, PartialEq)]
pub struct NoticeRequest {
    pub token: u64,
    pub id: u64,
    pub loc: Location,
    pub sender: String,
    pub reception: ReceptionId,
    pub rcpts: Vec<NoticeRcpt>,
}

/// How the core is set up: the settings every shard shares, and this shard's place.
pub struct CoreConfig {
    pub shard: usize,
    pub shards: usize,
    pub settings: Rc<Settings>,
    /// Whether a DNS resolver is configured (without one, unrouted mail is deferred).
    pub has_resolver: bool,
}

/// Per destination: the connections this shard has to it.
#[derive(Debug, Default, Clone, Copy)]
struct DestState {
    /// Connections open or opening.
    conns: u32,
    /// Of those, waiting for work.
    idle: u32,
    /// Permit requests out (sent, not granted yet).
    requested: u32,
}

/// A permit request out: which destination it is for, and the pool's other sources to ask if
/// this one queues it.
#[derive(Debug, Clone)]
struct PendingLease {
    dest: Dest,
    fallbacks: Vec<usize>,
    /// The owner answered `Queued`.
    queued: bool,
}

pub struct Core {
    shard: usize,
    shards: usize,
    settings: Rc<Settings>,
    has_resolver: bool,
    queue: Queue,
    router: Router,
    sites: SiteMemo,
    health: EgressState,
    permits: Permits,
    budgets: Budgets,
    /// The message rates this shard owns (see `shaping::credits`).
    meters: crate::shaping::credits::Meters,
    /// The send credits this shard holds.
    credits: crate::shaping::credits::Credits,
    /// Adaptive rules' match counts for the (site, source) keys this shard owns.
    tracker: crate::shaping::Tracker<LeaseKey>,
    /// Adaptive actions in force that this shard started as owner: (key, rule, until,
    /// target), for summaries and the lifted events.
    adaptive_active: Vec<(LeaseKey, u16, u64, Option<std::sync::Arc<str>>)>,
    /// Adaptive throttles in force, from any owner: (key) → (rule, until).
    throttles: HashMap<LeaseKey, (u16, u64)>,
    /// Tenants (queue ids) whose rate has no credit now: until when (None: an answer is
    /// awaited). Their lanes are skipped meanwhile.
    tenant_blocked: HashMap<u16, Option<u64>>,
    /// (site, source) keys their owners said are down, and until when: their messages wait
    /// in the schedule instead of asking for connections.
    holds: HashMap<LeaseKey, (u64, &'static str)>,
    /// Operators' suspensions and bounces in force (see `ops`).
    directives: Vec<ops::Directive>,
    /// Recipient domains an operator sent through another egress pool.
    rebinds: HashMap<String, usize>,
    /// While an operator's bounce without notices is recorded.
    notices_off: bool,
    /// When a job waiting in a ready queue (a throttled or slow site) may reach its deadline:
    /// the ready queues are checked then, so none outlives its max age there either.
    ready_check_ms: Option<u64>,
    dests: HashMap<Dest, DestState>,
    /// Each site's limits per source, resolved once (cleared on reload).
    shapes: HashMap<Hop, Rc<crate::shaping::layers::SiteShape>>,
    conns: HashMap<ConnId, deliver::Conn>,
    next_conn: u64,
    /// Domains being resolved, and the recipients waiting for their site.
    resolving: HashMap<String, Vec<(u64, JobRcpts, usize)>>,
    pending_leases: HashMap<LeaseKey, VecDeque<PendingLease>>,
    /// By token: iterated in order, so a run replays exactly (the simulation relies on it).
    notices: BTreeMap<u64, finish::PendingNotice>,
    /// (message, token) of every notice pending: a message is let go only once none about it
    /// is, since each reads the original.
    notice_ids: std::collections::BTreeSet<(u64, u64)>,
    next_notice: u64,
    /// `notices.delay_after_s` in ms; 0: no delay notices.
    delay_after_ms: u64,
    /// `dead_letter.enabled`.
    dead_letters: bool,
    /// Per message, its failed recipients so far, for its dead letter (only when dead letters
    /// are on; bounded by the queue: one entry per queued message at most).
    dead: BTreeMap<u64, Vec<DeadRcpt>>,
    observers: Observers,
    actions: Vec<Action>,
    /// The earliest due time the timer was last told about.
    armed_ms: Option<u64>,
    stopping: bool,
}

impl Core {
    pub fn new(cfg: CoreConfig, observers: Observers) -> Core {
        let c = &cfg.settings.config;
        Core {
            shard: cfg.shard,
            shards: cfg.shards.max(1),
            has_resolver: cfg.has_resolver,
            queue: {
                let mut queue = Queue::new(c.queue.messages_max);
                queue.set_priority_weights(crate::queue::lanes::weights(&c.queue.priority_weights));
                queue
            },
            router: Router::new(cfg.settings.routes.clone()),
            sites: SiteMemo::new(c.dns.ttl_min_s, c.dns.ttl_max_s, c.dns.cache_entries_max),
            health: EgressState::new(&cfg.settings.egress),
            permits: Permits::default(),
            meters: Default::default(),
            credits: Default::default(),
            tracker: crate::shaping::Tracker::new(&cfg.settings.adaptive),
            adaptive_active: Vec::new(),
            throttles: HashMap::new(),
            tenant_blocked: HashMap::new(),
            budgets: Budgets::new(crate::egress::lease::SiteBackoff {
                failures_max: c.delivery.site_failures_max,
                backoff_ms: c.delivery.site_backoff_ms,
                cap_ms: c.delivery.site_backoff_cap_ms,
            }),
            holds: HashMap::new(),
            directives: Vec::new(),
            rebinds: HashMap::new(),
            notices_off: false,
            ready_check_ms: None,
            dests: HashMap::new(),
            shapes: HashMap::new(),
            conns: HashMap::new(),
            next_conn: 1,
            resolving: HashMap::new(),
            pending_leases: HashMap::new(),
            notices: BTreeMap::new(),
            notice_ids: std::collections::BTreeSet::new(),
            next_notice: 1,
            delay_after_ms: c.notices.delay_after_s.saturating_mul(1000),
            dead_letters: c.dead_letter.enabled,
            dead: BTreeMap::new(),
            observers,
            actions: Vec::new(),
            armed_ms: None,
            stopping: false,
            settings: cfg.settings,
        }
    }

    pub fn shard(&self) -> usize {
        self.shard
    }

    pub fn settings(&self) -> &Rc<Settings> {
        &self.settings
    }

    /// Swap in reloaded settings (see `admin::reload` for what a reload may change): routes,
    /// the retry policy (backoff, `[[retry]]` rules, max age), transaction size, bounce rules,
    /// site limits and pool rules apply from now on. Ready jobs are routed again when routes
    /// or pool rules changed, so queued mail follows the new routes too; jobs a connection
    /// holds finish where they are going, and connections keep the limits they opened with.
    /// The egress sources and pools must be the running ones (their indices key permits and
    /// ready queues). Walks the ready queues once: no I/O, but not free on a deep queue.
    pub fn reload(&mut self, settings: Rc<Settings>, now_ms: u64) {
        let (old, new) = (&self.settings.config, &settings.config);
        let reroute = old.route != new.route
            || old.pool_rule != new.pool_rule
            || old.egress != new.egress
            || settings.routes.len() != self.settings.routes.len();
        if settings.egress.sources != self.settings.egress.sources {
            // Not what `admin::reload::plan` hands over; a health table of the wrong size would
            // index out of bounds, so start it over rather than trust it.
            debug_assert!(false, "reload changed the egress sources");
            self.health = EgressState::new(&settings.egress);
        }
        let c = &settings.config;
        self.queue
            .set_priority_weights(crate::queue::lanes::weights(&c.queue.priority_weights));
        self.budgets.set_backoff(crate::egress::lease::SiteBackoff {
            failures_max: c.delivery.site_failures_max,
            backoff_ms: c.delivery.site_backoff_ms,
            cap_ms: c.delivery.site_backoff_cap_ms,
        });
        self.router = Router::new(settings.routes.clone());
        if old.adaptive != new.adaptive {
            // Counts are per rule: new rules start counting afresh (actions in force run on).
            self.tracker = crate::shaping::Tracker::new(&settings.adaptive);
        }
        self.settings = settings;
        self.shapes.clear();
        let dests: Vec<Dest> = self.queue.ready_dests().cloned().collect();
        if reroute {
            for dest in &dests {
                for job in self.queue.drain_ready(dest) {
                    self.dispatch(job.id, &job.rcpts, now_ms);
                }
            }
        }
        // Site limits may have grown: waiting work may get more connections now.
        let dests: Vec<Dest> = self.queue.ready_dests().cloned().collect();
        for dest in &dests {
            self.connect_more(dest, now_ms);
        }
        self.rearm();
    }

    /// The actions decided so far, for the adapters (in order).
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// The lease budgets this shard owns (for invariant checks).
    pub fn budgets(&self) -> &Budgets {
        &self.budgets
    }

    /// Delivery connections open or opening on this shard.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Notices not spooled yet.
    pub fn notices_pending(&self) -> usize {
        self.notices.len()
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping
    }

    /// What compaction needs of a live message (see `spool::LiveIndex`).
    pub fn live(&self, id: u64) -> Option<LiveMessage> {
        self.queue.live(id)
    }

    /// Compaction moved message records.
    pub fn relocated(&mut self, moves: &[(u64, Location)]) {
        for (id, loc) in moves {
            self.queue.relocate(*id, *loc);
        }
    }

    /// An id for a message about to be spooled here, or `QueueFull` (reception answers
    /// `452 4.3.1`).
    pub fn reserve(&mut self) -> Result<u64, QueueFull> {
        self.queue.reserve()
    }

    /// An id for a notice about to be spooled here: past the queue limit if need be (see
    /// `Queue::reserve_notice`), so a full queue waiting for its bounce notices never
    /// deadlocks.
    pub fn reserve_notice(&mut self) -> Result<u64, QueueFull> {
        self.queue.reserve_notice()
    }

    /// The spool did not take message `id`.
    pub fn cancel(&mut self, id: u64) {
        self.queue.cancel(id);
    }

    /// Message `id` is durable at `loc`: queue it and route its recipients.
    pub fn accepted(
        &mut self,
        id: u64,
        envelope: &Envelope,
        loc: Location,
        tls: Option<&str>,
        now_ms: u64,
    ) {
        self.accepted_refusing(id, envelope, loc, tls, &[], None, now_ms)
    }

    /// [`Core::accepted`], with recipients `refused` (indices into the envelope's) bounced at
    /// once with `reply` instead of routed: those a tenant's suppression list names. They
    /// are recorded and noticed as any bounce is (a `Bounce` line, a notice per NOTIFY).
    #[allow(clippy::too_many_arguments)]
    pub fn accepted_refusing(
        &mut self,
        id: u64,
        envelope: &Envelope,
        loc: Location,
        tls: Option<&str>,
        refused: &[u16],
        reply: Option<&Reply>,
        now_ms: u64,
    ) {
        if self.queue.insert(id, envelope, loc).is_none() {
            debug_assert!(false, "message {id:#x} accepted without a reservation");
            return;
        }
        self.observers.emit(&Event::Received(Received {
            ts_ms: now_ms,
            shard: self.shard,
            id,
            envelope,
            tls,
        }));
        let all = 0..envelope.rcpts.len().min(u16::MAX as usize) as u16;
        match reply {
            Some(reply) if !refused.is_empty() => {
                let rcpts: JobRcpts = all.filter(|r| !refused.contains(r)).collect();
                // Routed first: bouncing every refused recipient may finish the message when
                // no other is left, and then there is nothing to route.
                self.dispatch(id, &rcpts, now_ms);
                self.fail(id, refused, &RcptResult::Reply(reply.clone()), now_ms);
            }
            _ => {
                let rcpts: JobRcpts = all.collect();
                self.dispatch(id, &rcpts, now_ms);
            }
        }
    }

    /// Queue a message recovery found: its pending recipients now or when due.
    pub fn restore(
        &mut self,
        msg: &RecoveredMessage,
        now_ms: u64,
    ) -> Result<(), crate::queue::RestoreError> {
        self.queue.restore(msg)?;
        let mut now: JobRcpts = JobRcpts::new();
        for (i, state) in msg.states.iter().enumerate() {
            if let crate::spool::RcptState::Pending {
                next_attempt_ms, ..
            } = *state
            {
                if next_attempt_ms > now_ms {
                    self.queue.schedule(msg.id, i as u16, next_attempt_ms);
                } else {
                    now.push(i as u16);
                }
            }
        }
        if !now.is_empty() {
            self.dispatch(msg.id, &now, now_ms);
        }
        self.rearm();
        Ok(())
    }

    /// Recovery is over; `id_max` is the largest message id it saw.
    pub fn restored(&mut self, id_max: u64) {
        self.queue.restored(id_max);
    }

    /// The spool replayed its records into this core (see the `Replay` impl): set the ids
    /// above every one on disk, then route the pending recipients that are due and schedule
    /// the others.
    pub fn replayed(&mut self, id_max: u64, now_ms: u64) {
        self.queue.restored(id_max);
        let mut due_now: Vec<(u64, JobRcpts)> = Vec::new();
        for (id, rcpt, due) in self.queue.pending_rcpts() {
            if due > now_ms {
                self.queue.schedule(id, rcpt, due);
                continue;
            }
            match due_now.last_mut() {
                Some((last, rcpts)) if *last == id => rcpts.push(rcpt),
                _ => due_now.push((id, smallvec::smallvec![rcpt])),
            }
        }
        for (id, rcpts) in due_now {
            self.dispatch(id, &rcpts, now_ms);
        }
        self.rearm();
    }

    /// When [`Core::tick`] is next due (retries, notices to try again).
    pub fn next_wakeup(&self) -> Option<u64> {
        // A stopping core tries no notice again (see `retry_notices`): reporting their times
        // would have the timer tick at a time that never passes.
        let notices = match self.stopping {
            true => None,
            false => self.notices.values().filter_map(|n| n.retry_at_ms).min(),
        };
        // The ready queues' check only while something waits in them.
        let ready_check = self.ready_check_ms.filter(|_| self.queue.has_ready());
        [
            self.queue.next_due_ms(),
            notices,
            ready_check,
            self.budgets.next_due_ms(),
            self.shaping_next_ms(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn rearm(&mut self) {
        let next = self.next_wakeup();
        if next.is_some() && (self.armed_ms.is_none() || next < self.armed_ms) {
            self.actions.push(Action::Rearm);
        }
        self.armed_ms = next;
    }

    /// The timer woke at `now_ms` (due or not): release due retries, retry notices that
    /// failed, check the ready queues when their check is due, and note what the timer should
    /// wait for next. Drivers call it on every wake-up, so [`Core::rearm`]'s idea of the armed
    /// time is never one that already passed.
    pub fn tick(&mut self, now_ms: u64) {
        let due = self.queue.take_due(now_ms);
        for job in due {
            // Routed again: routes, MX records and pools may have changed meanwhile.
            self.dispatch(job.id, &job.rcpts, now_ms);
        }
        self.retry_notices(now_ms);
        for (to, msg) in self.budgets.tick(now_ms) {
            self.send_lease(to, msg, now_ms);
        }
        self.shaping_tick(now_ms);
        if self.credits.len() > crate::shaping::credits::METERS_MAX {
            self.credits.tidy(now_ms);
        }
        if self.ready_check_ms.is_some_and(|at| at <= now_ms) {
            self.expire_ready(now_ms);
        }
        self.armed_ms = self.next_wakeup();
    }

    /// Stop starting work: no new connections, idle ones close, busy ones finish their
    /// transactions.
    pub fn stop(&mut self) {
        self.stopping = true;
        self.actions.push(Action::WakeIdle);
    }

    /// Route recipients `rcpts` of message `id`, grouped by domain: each domain goes where a
    /// static route says, else to its MX site (resolving it first when its answer is not fresh).
    fn dispatch(&mut self, id: u64, rcpts: &[u16], now_ms: u64) {
        let groups = {
            let Some(m) = self.queue.get(id) else { return };
            let tenant = self.queue.tenant(m);
            let mut groups: Vec<(String, usize, JobRcpts)> = Vec::new();
            for &r in rcpts {
                if m.is_done(r) {
                    continue;
                }
                let domain = crate::envelope::domain_of(m.rcpt(r)).to_ascii_lowercase();
                match groups.iter_mut().find(|(d, _, _)| *d == domain) {
                    Some((_, _, v)) => v.push(r),
                    None => {
                        let pool = match self.rebinds.get(&domain) {
                            Some(&pool) => pool,
                            None => self.settings.egress.pool_for(m.sender(), &domain, tenant),
                        };
                        groups.push((domain, pool, smallvec::smallvec![r]));
                    }
                }
            }
            groups
        };
        for (domain, pool, rcpts) in groups {
            match self.router.lookup(&domain) {
                Ok(route) => self.ready(id, rcpts, Hop::Route(route), pool, now_ms),
                Err(LookupError::NoRoute) => self.dispatch_mx(id, rcpts, domain, pool, now_ms),
            }
        }
    }

    fn dispatch_mx(&mut self, id: u64, rcpts: JobRcpts, domain: String, pool: usize, now_ms: u64) {
        if !self.has_resolver {
            let reply = Reply::new(
                451,
                Some((4, 4, 3)),
                format!("No route to {domain} and no DNS resolver configured"),
            );
            return self.fail(id, &rcpts, &RcptResult::Reply(reply), now_ms);
        }
        if let Some(site) = self.sites.get(&domain, now_ms) {
            let site = self.own_site(&domain, site);
            return self.ready(id, rcpts, Hop::Mx(site), pool, now_ms);
        }
        let waiting = self.resolving.entry(domain.clone()).or_default();
        let first = waiting.is_empty();
        waiting.push((id, rcpts, pool));
        if first {
            self.actions.push(Action::Resolve { domain });
        }
    }

    /// The MX answer for `domain` (from the resolver's cache until `cached_until`, or fresh).
    pub fn resolved(
        &mut self,
        domain: &str,
        answer: &crate::dns::message::Answer,
        cached_until: Option<u64>,
        now_ms: u64,
    ) {
        self.resolved_with(domain, answer, None, cached_until, now_ms)
    }

    /// [`Core::resolved`], with the domain's transport security (MTA-STS, DANE), which makes
    /// the domain a site of its own (see `route::Site`).
    pub fn resolved_with(
        &mut self,
        domain: &str,
        answer: &crate::dns::message::Answer,
        security: Option<crate::tlspolicy::plan::DomainSecurity>,
        cached_until: Option<u64>,
        now_ms: u64,
    ) {
        let site = self
            .sites
            .resolved(domain, answer, security, cached_until, now_ms);
        let site = site.map(|s| self.own_site(domain, s));
        let waiting = self.resolving.remove(domain).unwrap_or_default();
        for (id, rcpts, pool) in waiting {
            match &site {
                Ok(site) => self.ready(id, rcpts, Hop::Mx(site.clone()), pool, now_ms),
                Err(reply) => self.fail(id, &rcpts, &RcptResult::Reply(reply.clone()), now_ms),
            }
        }
    }

    /// `domain`'s site: its own when it has limits of its own (`[[domain]]`), else the MX
    /// host set's.
    fn own_site(&self, domain: &str, site: crate::route::Site) -> crate::route::Site {
        match self.settings.shaping.has_domain(domain) {
            true => site.shaped_for(domain),
            false => site,
        }
    }

    /// Ready jobs for `hop`, at most its `rcpts_per_transaction_max` recipients each.
    fn ready(&mut self, id: u64, rcpts: JobRcpts, hop: Hop, pool: usize, now_ms: u64) {
        let rcpts = self.apply_directives(id, rcpts, Some(&hop), now_ms);
        if rcpts.is_empty() {
            return;
        }
        let dest = Dest { hop, pool };
        if let Some(m) = self.queue.get(id) {
            // A lower bound of its deadline (exact at the check): one min per job.
            // The timer learns of it when the destination is saturated (`connect_more`): an
            // unsaturated one takes the job at once.
            let floor = m
                .received_ms()
                .saturating_add(self.settings.retry.max_age_floor_ms())
                .saturating_add(READY_CHECK_GAP_MS);
            if self.ready_check_ms.is_none_or(|at| floor < at) {
                self.ready_check_ms = Some(floor);
            }
        }
        let per_txn = self.shape_of(&dest.hop).base.rcpts_per_transaction_max as usize;
        for chunk in rcpts.chunks(per_txn.max(1)) {
            self.queue.push_ready(
                &dest,
                Job {
                    id,
                    rcpts: chunk.iter().copied().collect(),
                },
            );
        }
        if self.dests.get(&dest).is_some_and(|d| d.idle > 0) {
            self.actions.push(Action::WakeIdle);
        }
        self.connect_more(&dest, now_ms);
    }

    /// Expire what waits in ready queues past its deadline (a destination too slow or too
    /// throttled to reach it in time), and set the next check. Checks are at least
    /// [`READY_CHECK_GAP_MS`] apart, so a backlog whose deadlines follow each other closely
    /// costs one pass over the ready queues per gap, not one per message.
    fn expire_ready(&mut self, now_ms: u64) {
        let policy = self.settings.retry.clone();
        let dests: Vec<Dest> = self.queue.ready_dests().cloned().collect();
        let mut next: Option<u64> = None;
        let mut expired: Vec<(u64, JobRcpts, Hop)> = Vec::new();
        for dest in dests {
            // In place: the jobs left keep their lanes and turns (see `queue::lanes`).
            let gone = self.queue.retain_ready(&dest, |job, queued| {
                let Some((m, _)) = queued else {
                    return false;
                };
                let deadline = job
                    .rcpts
                    .iter()
                    .map(|&r| {
                        let domain = crate::envelope::domain_of(m.rcpt(r));
                        m.received_ms()
                            .saturating_add(policy.max_age_ms(domain, Some(&dest.hop)))
                    })
                    .min()
                    .unwrap_or(u64::MAX);
                // A grace of one gap: a retry moved up to its deadline gets its attempt.
                let keep = deadline.saturating_add(READY_CHECK_GAP_MS) > now_ms;
                if keep {
                    next = Some(next.map_or(deadline, |n: u64| n.min(deadline)));
                }
                keep
            });
            // Jobs of messages gone meanwhile are dropped; the others expired.
            for job in gone {
                if self.queue.get(job.id).is_some() {
                    expired.push((job.id, job.rcpts, dest.hop.clone()));
                }
            }
        }
        self.ready_check_ms =
            next.map(|n| (n + READY_CHECK_GAP_MS).max(now_ms + READY_CHECK_GAP_MS));
        let reply = Reply::new(
            451,
            Some((4, 4, 7)),
            "Message expired waiting for a connection to a busy destination".to_owned(),
        );
        for (id, rcpts, hop) in expired {
            let results: Vec<(u16, RcptResult)> = rcpts
                .iter()
                .map(|&r| (r, RcptResult::Reply(reply.clone())))
                .collect();
            self.record_results(id, &results, &deliver::Via::NONE, Some(&hop), now_ms);
        }
    }

    /// Every recipient of `rcpts` gets `result` without a connection being made.
    fn fail(&mut self, id: u64, rcpts: &[u16], result: &RcptResult, now_ms: u64) {
        let results: Vec<(u16, RcptResult)> = rcpts.iter().map(|&r| (r, result.clone())).collect();
        self.record_results(id, &results, &deliver::Via::NONE, None, now_ms);
    }
}

/// Recovery replays the spool straight into the queue.
impl crate::spool::Replay for Core {
    fn message(
        &mut self,
        id: u64,
        loc: Location,
        view: &crate::spool::record::MessageView<'_>,
    ) -> Result<Option<u64>, String> {
        // The campaign is a header of the body, under the name configured now.
        let campaign = self.settings.egress.campaign_of(view.body());
        self.queue
            .replay_message(id, loc, view, campaign.as_deref())
    }

    fn outcome(&mut self, o: &crate::spool::record::Outcome) -> Option<u64> {
        self.queue.replay_outcome(o)
    }

    fn for_each_pending(&self, f: &mut dyn FnMut(Location)) {
        self.queue.for_each_location(f);
    }

    fn superseded(&self) -> usize {
        self.queue.superseded()
    }
}

#[cfg(test)]
mod tests;
