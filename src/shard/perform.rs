//! The shard's performer: what the core decides, done with glommio — spool writes, DNS
//! lookups, connection tasks, lease messages, notices — and the one timer that wakes the core
//! when something is due.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use hickory_proto::rr::RecordType;

use super::mesh::LeaseOutbox;
use crate::clock::Clock;
use crate::core::{Action, CoreCell, NoticeRequest};
use crate::delivery::DeliveryCtx;
use crate::dns::resolver::Resolver;
use crate::eventlog::EventLog;
use crate::reception::{BodyParts, Reception};
use crate::spool::Spool;

/// What the driver is made of.
pub(super) struct Parts {
    pub shard: usize,
    /// For notices: the host name they are written as (a reload may change it).
    pub settings: Rc<crate::settings::Live>,
    pub core: Rc<CoreCell>,
    pub spool: Rc<Spool>,
    pub reception: Rc<Reception>,
    pub delivery: Rc<DeliveryCtx>,
    pub resolver: Option<Rc<Resolver>>,
    pub clock: Rc<dyn Clock>,
    pub work: Rc<shards::Notify>,
    pub outbox: Rc<LeaseOutbox>,
    pub log: Rc<EventLog>,
    /// This shard's dead letters, when `dead_letter.enabled`.
    pub dead_letters: Option<Rc<crate::deadletter::Store>>,
}

pub(super) struct Driver {
    p: Parts,
    /// Wakes the timer: the core's earliest due time moved earlier, or the log has lines.
    rearm: Rc<shards::Notify>,
    deliveries: Cell<usize>,
    deliveries_changed: shards::Notify,
}

impl Driver {
    pub(super) fn new(p: Parts) -> Driver {
        let rearm = Rc::new(shards::Notify::new());
        p.log.set_wake(rearm.clone());
        Driver {
            p,
            rearm,
            deliveries: Cell::new(0),
            deliveries_changed: shards::Notify::new(),
        }
    }

    /// Perform `actions`, in order. Called right after a core step, outside its borrow.
    pub(super) fn perform(self: &Rc<Self>, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Outcome { seq, record } => {
                    if let Err(e) = self.p.spool.append_outcome(seq, &record) {
                        tracing::error!(shard = self.p.shard, "cannot record outcome: {e}");
                    }
                }
                Action::Final { id, loc } => self.p.spool.message_final(id, loc),
                Action::Resolve { domain } => self.resolve(domain),
                Action::Connect { conn, dest, source } => {
                    self.deliveries.set(self.deliveries.get() + 1);
                    let driver = self.clone();
                    let ctx = self.p.delivery.clone();
                    glommio::spawn_local(async move {
                        crate::delivery::connection(ctx, conn, dest, source).await;
                        driver.deliveries.set(driver.deliveries.get() - 1);
                        driver.deliveries_changed.notify_all();
                    })
                    .detach();
                }
                Action::WakeIdle => self.p.work.notify_all(),
                Action::Lease { to, msg } => self.p.outbox.push(to, msg),
                Action::Notice(request) => {
                    let driver = self.clone();
                    glommio::spawn_local(async move { driver.notice(request).await }).detach();
                }
                Action::Rearm => self.rearm.notify_all(),
                Action::DeadLetter(request) => {
                    let driver = self.clone();
                    glommio::spawn_local(async move { driver.dead_letter(request).await }).detach();
                }
            }
        }
    }

    /// Until no delivery connection of this shard is running.
    pub(super) async fn deliveries_drained(&self) {
        while self.deliveries.get() > 0 {
            self.deliveries_changed.notified().await;
        }
    }

    fn resolve(self: &Rc<Self>, domain: String) {
        let Some(resolver) = self.p.resolver.clone() else {
            return;
        };
        let agent = self.p.delivery.tlspolicy.clone();
        if agent.is_none() {
            if let Some((answer, until)) = resolver.cached(&domain, RecordType::MX) {
                let now = self.p.clock.now_ms();
                return self
                    .p
                    .core
                    .with(|c| c.resolved(&domain, &answer, Some(until), now));
            }
        }
        let core = self.p.core.clone();
        let clock = self.p.clock.clone();
        glommio::spawn_local(async move {
            let (answer, mx_secure) = resolver.lookup_secure(&domain, RecordType::MX).await;
            // The recipient domain's own policy, looked up by the shard that owns the domain:
            // only when there are MX hosts to deliver to.
            let security = match (&agent, &answer) {
                (Some(agent), crate::dns::message::Answer::Mx(..))
                | (Some(agent), crate::dns::message::Answer::NoData(_)) => {
                    agent.security(&domain, mx_secure).await
                }
                _ => None,
            };
            let now = clock.now_ms();
            core.with(|c| c.resolved_with(&domain, &answer, security, None, now));
        })
        .detach();
    }

    /// Build the notice of `request` from the original and spool it for the sender.
    async fn notice(&self, request: NoticeRequest) {
        let core = &self.p.core;
        let token = request.token;
        // Compaction may have moved the record since the request was made (and the old
        // segment be gone): read it where it is now.
        let loc = core
            .read(|c| c.live(request.id))
            .map_or(request.loc, |live| live.loc);
        let stored = match self.p.spool.read_message(loc).await {
            Ok(stored) => stored,
            Err(e) => {
                // Without the original there is nothing to report from; the failures are
                // recorded anyway rather than retried forever.
                tracing::error!(
                    shard = self.p.shard,
                    message = %request.reception,
                    "no notice: cannot read the message: {e}"
                );
                let now = self.p.clock.now_ms();
                return core.with(|c| c.notice_spooled(token, None, now));
            }
        };
        let now = self.p.clock.now_ms();
        let composed = stored.view().ok().and_then(|view| {
            let original = view.envelope().ok()?;
            let outcomes: Vec<crate::notices::Outcome<'_>> = request
                .rcpts
                .iter()
                .map(|r| crate::notices::Outcome {
                    rcpt: r.rcpt,
                    kind: r.kind,
                    response: &r.response,
                })
                .collect();
            let id = self.p.reception.next_id(now);
            crate::notices::compose(
                &self.p.settings.get().hostname,
                &original,
                view.body(),
                &outcomes,
                id,
                now,
                &crate::notices::Policy::of(&self.p.settings.get().config),
            )
        });
        drop(stored);
        let Some((envelope, body)) = composed else {
            // Nobody asked for one (NOTIFY=NEVER, or only failures were asked for).
            return core.with(|c| c.notice_spooled(token, None, now));
        };
        let id = envelope.reception;
        let parts = BodyParts {
            head: String::new(),
            body,
        };
        let result = self
            .p
            .reception
            .accept(envelope, parts, None, crate::reception::Intake::Notice)
            .await;
        let now = self.p.clock.now_ms();
        match result {
            Ok(()) => core.with(|c| c.notice_spooled(token, Some(id), now)),
            Err(e) => core.with(|c| c.notice_failed(token, &e.to_string(), now)),
        }
    }

    /// Write the dead letter of `request` (read from its record), then let the record go. A
    /// dead letter that cannot be written (a full disk, the bound reached) is logged and the
    /// record let go all the same: its sender was notified, and holding it would hold the
    /// spool segment forever.
    async fn dead_letter(&self, request: crate::core::DeadLetterRequest) {
        let crate::core::DeadLetterRequest { id, loc, rcpts } = request;
        let now = self.p.clock.now_ms();
        let read = match self.p.spool.read_message(loc).await {
            Ok(stored) => stored.view().ok().and_then(|view| {
                let envelope = view.envelope().ok()?;
                let letter =
                    crate::deadletter::DeadLetter::of(&envelope, self.p.shard, id, &rcpts, now);
                Some((letter, view.body().to_vec()))
            }),
            Err(e) => {
                tracing::error!(shard = self.p.shard, "no dead letter for {id:#x}: {e}");
                None
            }
        };
        if let (Some(store), Some((letter, body))) = (&self.p.dead_letters, read) {
            let name = letter.reception_id.clone();
            match store.keep(letter, body).await {
                Ok(true) => {}
                Ok(false) => tracing::warn!(
                    shard = self.p.shard,
                    message = %name,
                    "dead-letter directory full (dead_letter.messages_max / bytes_max): \
                     message let go without a dead letter"
                ),
                Err(e) => tracing::error!(
                    shard = self.p.shard,
                    message = %name,
                    "cannot write dead letter: {e}"
                ),
            }
        }
        self.p.spool.message_final(id, loc);
    }

    /// Sleep until the core's next due time or the log's next flush, whichever is first, or
    /// until told the time moved earlier; then tick. Until the stop signal.
    pub(super) async fn run_timer(self: Rc<Self>, stop: Rc<shards::LocalStop>) {
        loop {
            let rearmed = self.rearm.notified();
            let core_due = self.p.core.read(|c| c.next_wakeup());
            let log_due = self.p.log.flush_due_ms();
            let due = match (core_due, log_due) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let now = self.p.clock.now_ms();
            let stopped = match due {
                Some(at) if at <= now => false,
                Some(at) => {
                    let sleep = glommio::timer::sleep(Duration::from_millis(at - now));
                    wait_any(sleep, rearmed, &stop).await
                }
                None => wait_any(std::future::pending::<()>(), rearmed, &stop).await,
            };
            if stopped {
                self.p.log.flush();
                return;
            }
            let now = self.p.clock.now_ms();
            if self.p.log.flush_due_ms().is_some_and(|t| t <= now) {
                self.p.log.flush();
            }
            // Every wake-up goes to the core, due or not: it learns its timer fired, so a
            // later due time re-arms it (see `Core::rearm`).
            self.p.core.with(|c| c.tick(now));
        }
    }
}

/// Wait for the timer, a re-arm or the stop signal; true for the stop signal.
async fn wait_any(
    sleep: impl std::future::Future<Output = ()>,
    rearmed: impl std::future::Future<Output = ()>,
    stop: &shards::LocalStop,
) -> bool {
    futures_lite::future::or(
        futures_lite::future::or(
            async {
                sleep.await;
                false
            },
            async {
                rearmed.await;
                false
            },
        ),
        async {
            stop.wait().await;
            true
        },
    )
    .await
}
