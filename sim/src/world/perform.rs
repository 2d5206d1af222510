//! Performing the core's actions, as `shard::perform::Driver` does: outcomes and finals to the
//! spool engine, DNS lookups, connections, lease messages over the mesh, notices, and the one
//! timer per shard that wakes the core when something is due.

use epoxi::core::Action;
use epoxi::dns::message::Answer;
use epoxi::egress::lease::LeaseMsg;

use super::{Local, World};
use crate::ledger::Violation;
use crate::scenario::{MX_HOSTS, NX_DOMAIN};

impl World {
    pub(super) fn perform(&mut self, s: usize, actions: Vec<Action>) -> Result<(), Violation> {
        for action in actions {
            match action {
                Action::Outcome { seq, record } => {
                    let Some(sh) = self.shards[s].as_mut() else {
                        return Ok(());
                    };
                    if let Err(e) = sh.engine.append_outcome(seq, &record) {
                        return Err(Violation::new(
                            "spool",
                            format!("s{s}: outcome not appended: {e}"),
                        ));
                    }
                    if record.kind.is_final() {
                        let key = self.msgs.get(&(s, record.message)).and_then(|t| {
                            let rcpt = t.rcpts.get(record.rcpt as usize)?;
                            Some((t.rec, rcpt.clone()))
                        });
                        if let (Some(key), Some(sh)) = (key, self.shards[s].as_mut()) {
                            sh.finals_open.push(key);
                        }
                    }
                    self.schedule_commit(s);
                }
                Action::DeadLetter(request) => {
                    // The world keeps no dead-letter files: it checks the decision (only
                    // failed recipients, only final messages) and lets the record go.
                    let (id, loc) = (request.id, request.loc);
                    self.check_dead_letter(s, &request)?;
                    self.stats.dead_letters += 1;
                    if let Some(sh) = self.shards[s].as_mut() {
                        sh.engine.message_final(id, loc);
                    }
                    self.msgs.remove(&(s, id));
                    self.note(|| format!("s{s} dead letter {id:#x} at {loc:?}"));
                    self.schedule_collect(s);
                    self.compact_check(s)?;
                }
                Action::Final { id, loc } => {
                    if let Some(sh) = self.shards[s].as_mut() {
                        sh.engine.message_final(id, loc);
                    }
                    self.msgs.remove(&(s, id));
                    self.note(|| format!("s{s} final {id:#x} at {loc:?}"));
                    self.schedule_collect(s);
                    self.compact_check(s)?;
                }
                Action::Resolve { domain } => {
                    let delay = self.rng_net.range(1, 30);
                    self.local(delay, Local::Resolve(s, domain));
                }
                Action::Connect { conn, dest, source } => self.connect(s, conn, dest, source)?,
                Action::WakeIdle => self.wake_idle(s),
                Action::Lease { to, msg } => self.lease_send(s, to, msg),
                Action::Notice(request) => {
                    if request.is_delay() {
                        self.check_delay_request(s, &request)?;
                    }
                    let delay = self.rng_net.range(0, 5);
                    self.local(delay, Local::Notice(s, Box::new(request)));
                }
                Action::Rearm => self.local(0, Local::Rearm(s)),
            }
        }
        Ok(())
    }

    /// The shard's timer woke (its due time, or a re-arm): tick if something is due, then
    /// sleep until the core's next due time, as `Driver::run_timer` does.
    pub(super) fn timer_wake(&mut self, s: usize) -> Result<(), Violation> {
        let now = self.now;
        // As `Driver::run_timer`: every wake-up goes to the core, due or not.
        if self.shards[s].is_some() {
            self.core_step(s, |c, now| c.tick(now))?;
        }
        let Some(sh) = self.shards[s].as_mut() else {
            return Ok(());
        };
        sh.timer_gen += 1;
        let gen = sh.timer_gen;
        if let Some(at) = sh.core.next_wakeup() {
            let delay = at.saturating_sub(now);
            self.local(delay, Local::Timer(s, gen));
        }
        Ok(())
    }

    /// A lease message onto the mesh: FIFO per ordered pair of shards, with small delays.
    fn lease_send(&mut self, from: usize, to: usize, msg: LeaseMsg) {
        self.stats.lease_messages += 1;
        let delay = self.rng_net.range(0, 3);
        let now = self.now;
        let (queue, last) = self.mesh.entry((from, to)).or_default();
        let at = (now + delay).max(*last);
        *last = at;
        queue.push_back(msg);
        self.local(at - now, Local::Lease { from, to });
    }

    pub(super) fn lease_arrive(&mut self, from: usize, to: usize) -> Result<(), Violation> {
        let Some(msg) = self
            .mesh
            .get_mut(&(from, to))
            .and_then(|(q, _)| q.pop_front())
        else {
            return Ok(());
        };
        self.note(|| format!("s{to} lease from s{from}: {msg:?}"));
        self.core_step(to, |c, now| c.lease_in(from, msg, now))?;
        Ok(())
    }

    /// The simulation's DNS: the MX domains share one site, one domain does not exist, and
    /// lookups sometimes fail.
    pub(super) fn resolve(&mut self, s: usize, domain: String) -> Result<(), Violation> {
        let fail = !self.healing && self.rng_net.chance(self.sc.faults.dns_fail);
        let answer = if fail {
            Answer::Transient("SERVFAIL".into())
        } else if domain == NX_DOMAIN {
            Answer::NxDomain(300)
        } else if domain.ends_with(".mx.test") {
            let ttl = self.rng_net.range(1, 60) as u32;
            Answer::Mx(
                MX_HOSTS
                    .iter()
                    .map(|(p, h)| (*p, (*h).to_owned()))
                    .collect(),
                ttl,
            )
        } else {
            Answer::NoData(300)
        };
        self.note(|| format!("s{s} resolved {domain}: {answer:?}"));
        self.core_step(s, |c, now| c.resolved(&domain, &answer, None, now))?;
        Ok(())
    }
}

impl World {
    /// A delay notice is asked for: each recipient it names is still pending (no final
    /// outcome, none durable), has waited `notices.delay_after_s`, and its message allows
    /// delay notices.
    fn check_delay_request(
        &mut self,
        s: usize,
        request: &epoxi::core::NoticeRequest,
    ) -> Result<(), Violation> {
        let crashed = self.crashed();
        let delay_after_ms = self.sc.delay_after_s * 1000;
        let Some(t) = self.msgs.get(&(s, request.id)) else {
            return Ok(());
        };
        for r in &request.rcpts {
            let Some(rcpt) = t.rcpts.get(usize::from(r.rcpt)) else {
                continue;
            };
            let key = (t.rec, rcpt.clone());
            let Some(e) = self.ledger.entries.get(&key) else {
                continue;
            };
            if delay_after_ms == 0 || !e.switches.delay {
                return Err(Violation::new(
                    "delay-notice",
                    format!("{key:?}: a delay notice asked for with delay notices off"),
                ));
            }
            if self.now < e.received_ms + delay_after_ms {
                return Err(Violation::new(
                    "delay-notice",
                    format!(
                        "{key:?}: a delay notice at {} before {} + {delay_after_ms}",
                        self.now, e.received_ms
                    ),
                ));
            }
            if e.durable_final || (!crashed && !e.terminal.is_empty()) {
                return Err(Violation::new(
                    "delay-notice",
                    format!(
                        "{key:?}: a delay notice asked for after its final outcome {:?}",
                        e.terminal
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A dead letter names only recipients whose last outcome is a failure.
    fn check_dead_letter(
        &mut self,
        s: usize,
        request: &epoxi::core::DeadLetterRequest,
    ) -> Result<(), Violation> {
        let Some(t) = self.msgs.get(&(s, request.id)) else {
            return Ok(());
        };
        for r in &request.rcpts {
            let Some(rcpt) = t.rcpts.get(usize::from(r.rcpt)) else {
                continue;
            };
            let key = (t.rec, rcpt.clone());
            let last = self
                .ledger
                .entries
                .get(&key)
                .and_then(|e| e.terminal.last().map(|(_, o)| *o));
            if !matches!(
                last,
                Some(
                    epoxi::events::AttemptOutcome::Bounced | epoxi::events::AttemptOutcome::Expired
                )
            ) {
                return Err(Violation::new(
                    "dead-letter",
                    format!("{key:?}: in a dead letter, last outcome {last:?}"),
                ));
            }
        }
        Ok(())
    }
}
