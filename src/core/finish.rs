//! The core's outcome side: what each recipient's result means, what goes to the spool and
//! when, retries, and the notices that must be spooled before a failure is recorded.

use super::deliver::Via;
use super::notify::{self, DeadRcpt};
use super::{Action, Core, NoticeRcpt, NoticeRequest};
use crate::events::{Attempt, AttemptOutcome, Event, Notice};
use crate::outcome::{self, RcptResult};
use crate::spool::record::{OutcomeKind, OutcomeRecord};

/// A notice being built and spooled, and what waits for it.
#[derive(Debug)]
pub(super) struct PendingNotice {
    pub(super) request: NoticeRequest,
    /// Failure records to append once the notice is durable.
    after: Vec<OutcomeRecord>,
    /// When to try again after a failure to spool it (None: under way).
    pub(super) retry_at_ms: Option<u64>,
    failures: u32,
}

impl PendingNotice {
    pub(super) fn new(request: NoticeRequest, after: Vec<OutcomeRecord>) -> PendingNotice {
        PendingNotice {
            request,
            after,
            retry_at_ms: None,
            failures: 0,
        }
    }
}

impl Core {
    /// Record what happened to each recipient of message `id`, log it, and reschedule what
    /// must be retried.
    pub(super) fn record_results(
        &mut self,
        id: u64,
        results: &[(u16, RcptResult)],
        via: &Via,
        hop: Option<&crate::route::Hop>,
        now_ms: u64,
    ) {
        let settings = self.settings.clone();
        let mut retries: Vec<(u16, u64)> = Vec::new();
        let mut notice_rcpts: Vec<NoticeRcpt> = Vec::new();
        let mut after: Vec<OutcomeRecord> = Vec::new();
        let mut records: Vec<OutcomeRecord> = Vec::new();
        let mut delay_rcpts: Vec<NoticeRcpt> = Vec::new();
        let mut dead: Vec<DeadRcpt> = Vec::new();
        let switches = self.switches_of(id);
        let source = via
            .source
            .and_then(|s| self.settings.egress.sources.get(s))
            .map(|s| s.name.clone());
        // The connection's site, else the hop's (once per transaction: an Arc's count for MX
        // sites, a short string for routes).
        let site = via.site.clone().or_else(|| hop.map(|h| h.site_key()));
        let peer = if via.peer.is_empty() {
            "-"
        } else {
            via.peer.as_str()
        };
        // The tenant, for observers (suppression keeps a list per tenant); copied out because
        // the message is borrowed mutably below. Allocates only for mail that has a tenant.
        let tenant: Option<String> = self
            .queue
            .get(id)
            .and_then(|m| self.queue.tenant(m))
            .map(str::to_owned);
        // Adaptive rules matched by this attempt's failures: reported once per attempt.
        let mut matched: smallvec::SmallVec<[u16; 4]> = smallvec::SmallVec::new();
        let mut adaptive_hosts: Option<std::sync::Arc<str>> = None;
        let (seq, final_now, notice_for) = {
            let Some(m) = self.queue.get_mut(id) else {
                return;
            };
            for (r, result) in results {
                let r = *r;
                if m.is_done(r) {
                    continue;
                }
                let attempts = m.attempted(r);
                let response = outcome::response_of_result(result);
                // Failures only: a delivery needs no category and no retry policy.
                let failed = !(200..300).contains(&response.code);
                let category = match (&settings.bounce, failed) {
                    (Some(c), true) => {
                        Some(c.classify(response.code, &response.enhanced, &response.text))
                    }
                    _ => None,
                };
                if let (true, Some(hop), Some(_)) = (failed, hop, via.source) {
                    if !settings.adaptive.is_empty() {
                        let hosts = adaptive_hosts.get_or_insert_with(|| Core::adaptive_hosts(hop));
                        for rule in settings.adaptive.matching(
                            response.code,
                            parse_enhanced(&response.enhanced),
                            &response.text,
                            category,
                            hosts,
                        ) {
                            if !matched.contains(&rule) {
                                matched.push(rule);
                            }
                        }
                    }
                }
                let choice =
                    settings
                        .retry
                        .choose(crate::envelope::domain_of(m.rcpt(r)), hop, category);
                let decision = outcome::decide(
                    response.code,
                    choice,
                    attempts,
                    crate::queue::retry::AttemptKey { id, rcpt: r },
                    m.received_ms(),
                    now_ms,
                );
                let mut record = OutcomeRecord {
                    message: id,
                    rcpt: u32::from(r),
                    kind: outcome::record_kind(decision),
                    attempts,
                    at_ms: now_ms,
                    next_attempt_ms: match decision {
                        AttemptOutcome::Deferred { next_attempt_ms } => next_attempt_ms,
                        _ => 0,
                    },
                };
                let notice = !self.notices_off
                    && outcome::wants_notice(decision, m.success_notices(), m.sender())
                    && notify::allows(switches, decision);
                if let AttemptOutcome::Deferred { .. } = decision {
                    // Once its delay notice is asked for, every deferral says so (the last
                    // record wins at recovery); this one is the notice's own record.
                    if m.delay_notified(r) {
                        record.kind = OutcomeKind::Delayed;
                    } else if notify::delay_due(self.delay_after_ms, switches, m, r, now_ms) {
                        m.set_delay_notified(r);
                        delay_rcpts.push(NoticeRcpt {
                            rcpt: r,
                            kind: OutcomeKind::Deferred,
                            response: response.clone(),
                        });
                    }
                }
                // A bounce or expiry is recorded only once its notice is spooled: a crash in
                // between leaves the recipient pending, so it bounces (and notifies) again
                // after restart: at least once. A delivery is recorded at once: its success
                // notice is at most once, since redelivering the message would be worse.
                if notice && outcome::notice_first(decision) {
                    after.push(record);
                } else {
                    records.push(record);
                }
                let bounce_category = outcome::bounce_category(category, decision);
                self.observers.emit(&Event::Attempt(Attempt {
                    ts_ms: now_ms,
                    shard: self.shard,
                    id,
                    reception: m.reception(),
                    sender: m.sender(),
                    rcpt: m.rcpt(r),
                    attempts,
                    outcome: decision,
                    response: &response,
                    peer,
                    source: source.as_deref(),
                    site: site.as_deref(),
                    received_ms: m.received_ms(),
                    size: m.size(),
                    tls: via.tls.as_deref(),
                    bounce_category,
                    tenant: tenant.as_deref(),
                }));
                if self.dead_letters && outcome::notice_first(decision) {
                    dead.push(DeadRcpt {
                        rcpt: r,
                        kind: record.kind,
                        response: response.clone(),
                        category: bounce_category,
                        at_ms: now_ms,
                    });
                }
                if notice {
                    notice_rcpts.push(NoticeRcpt {
                        rcpt: r,
                        kind: record.kind,
                        response,
                    });
                }
                match decision {
                    AttemptOutcome::Deferred { next_attempt_ms } => {
                        retries.push((r, next_attempt_ms));
                    }
                    _ if notice && outcome::notice_first(decision) => {
                        // Final once its notice is durable; no more attempts meanwhile.
                        m.finishing(r, record.kind);
                    }
                    _ => {
                        m.finish(r, record.kind);
                    }
                }
            }
            let notice_for = (!notice_rcpts.is_empty() || !delay_rcpts.is_empty())
                .then(|| (m.loc(), m.sender().to_owned(), m.reception()));
            (m.loc().seq, m.remaining() == 0, notice_for)
        };
        if let (false, Some(hop), Some(source)) = (matched.is_empty(), hop, via.source) {
            let campaign: Option<String> = self
                .queue
                .get(id)
                .and_then(|m| self.queue.campaign(m))
                .map(str::to_owned);
            self.adaptive_report(
                hop,
                source,
                &matched,
                tenant.as_deref(),
                campaign.as_deref(),
                now_ms,
            );
        }
        if !dead.is_empty() {
            self.dead.entry(id).or_default().extend(dead);
        }
        for record in records {
            self.actions.push(Action::Outcome { seq, record });
        }
        for (r, at) in retries {
            self.queue.schedule(id, r, at);
        }
        match notice_for {
            Some(of) => {
                // Delay notices go apart from those of final outcomes (another Action, other
                // records after them); recipients deferred together share one.
                if !delay_rcpts.is_empty() {
                    self.push_notice(id, of.clone(), delay_rcpts, Vec::new());
                }
                if !notice_rcpts.is_empty() {
                    self.push_notice(id, of, notice_rcpts, after);
                }
            }
            // Another notice about this message may still be on its way (a success notice,
            // say, and this failure's): the message stays until the last one is spooled.
            None if final_now && !self.notice_pending_for(id) => self.release(id),
            None => {}
        }
        self.rearm();
    }

    /// Whether a notice about message `id` is being built or waits to be tried again.
    fn notice_pending_for(&self, id: u64) -> bool {
        self.notice_ids
            .range((id, 0)..=(id, u64::MAX))
            .next()
            .is_some()
    }

    /// The notice of request `token` is durable (or there was nothing to send): record the
    /// failures it reports, and let the message go if it is final.
    pub fn notice_spooled(
        &mut self,
        token: u64,
        notice: Option<crate::envelope::ReceptionId>,
        now_ms: u64,
    ) {
        let Some(pending) = self.notices.remove(&token) else {
            return;
        };
        let id = pending.request.id;
        self.notice_ids.remove(&(id, token));
        if let Some(m) = self.queue.get(id) {
            let rcpts: Vec<&str> = pending
                .request
                .rcpts
                .iter()
                .map(|r| m.rcpt(r.rcpt))
                .collect();
            self.observers.emit(&Event::Notice(Notice {
                ts_ms: now_ms,
                shard: self.shard,
                id,
                reception: pending.request.reception,
                sender: m.sender(),
                rcpts: &rcpts,
                notice,
                delay: pending.request.is_delay(),
            }));
        }
        if pending.request.is_delay() {
            self.delay_spooled(id, &pending.request.rcpts, now_ms);
        }
        let Some(m) = self.queue.get_mut(id) else {
            return;
        };
        // The record may have moved since the request: the current segment counts.
        let seq = m.loc().seq;
        for record in &pending.after {
            m.finish(record.rcpt as u16, record.kind);
        }
        let final_now = m.remaining() == 0;
        for record in pending.after {
            self.actions.push(Action::Outcome { seq, record });
        }
        if final_now && !self.notice_pending_for(id) {
            self.release(id);
        }
    }

    /// Spooling the notice of request `token` failed (a full disk, shutdown): try again later;
    /// the failures it reports stay unrecorded until it is durable.
    pub fn notice_failed(&mut self, token: u64, why: &str, now_ms: u64) {
        let backoff = self.settings.retry.default;
        let delay = backoff.base_ms.max(1000);
        if let Some(p) = self.notices.get_mut(&token) {
            p.failures += 1;
            let wait = delay.saturating_mul(u64::from(p.failures.min(16)));
            p.retry_at_ms = Some(now_ms + wait.min(backoff.cap_ms.max(delay)));
            tracing::warn!(
                shard = self.shard,
                message = %p.request.reception,
                "cannot spool a delivery status notification ({why}); trying again in {} s",
                wait / 1000
            );
        }
        self.rearm();
    }

    pub(super) fn retry_notices(&mut self, now_ms: u64) {
        if self.stopping {
            return;
        }
        let due: Vec<u64> = self
            .notices
            .iter()
            .filter(|(_, p)| p.retry_at_ms.is_some_and(|t| t <= now_ms))
            .map(|(t, _)| *t)
            .collect();
        let mut moot: Vec<u64> = Vec::new();
        for token in due {
            if let Some(p) = self.notices.get_mut(&token) {
                p.retry_at_ms = None;
                // Compaction may have moved the message since the request: the notice reads
                // it where it is now (the old place may be gone).
                if let Some(m) = self.queue.get(p.request.id) {
                    p.request.loc = m.loc();
                    // A delay notice never reports a recipient that became final meanwhile.
                    if p.request.is_delay() {
                        p.request.rcpts.retain(|r| !m.is_done(r.rcpt));
                        if p.request.rcpts.is_empty() {
                            moot.push(token);
                            continue;
                        }
                    }
                }
                self.actions.push(Action::Notice(p.request.clone()));
            }
        }
        for token in moot {
            self.notice_spooled(token, None, now_ms);
        }
    }
}

/// `4.7.0` as numbers (None when it is not an enhanced status code).
fn parse_enhanced(text: &str) -> Option<(u8, u16, u16)> {
    let mut parts = text.split('.');
    let class = parts.next()?.parse().ok()?;
    let subject = parts.next()?.parse().ok()?;
    let detail = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((class, subject, detail))
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use crate::config::{Config, Overrides};
    use crate::core::{Action, Core, CoreConfig};
    use crate::envelope::{Envelope, Notify, ReceptionId, Recipient};
    use crate::outcome::RcptResult;
    use crate::queue::Job;
    use crate::smtp::reply::Reply;
    use crate::spool::Location;

    fn core() -> Core {
        let settings = Config::default()
            .settle(Overrides {
                routes: vec!["*.test=127.0.0.1:2600".into()],
                ..Overrides::default()
            })
            .expect("settings");
        let cfg = CoreConfig {
            shard: 0,
            shards: 1,
            settings: Rc::new(settings),
            has_resolver: false,
        };
        Core::new(cfg, crate::events::Observers::default())
    }

    fn delivered(c: &mut Core, id: u64, rcpt: u16, now: u64) {
        let job = Job {
            id,
            rcpts: [rcpt].into_iter().collect(),
        };
        let ok = RcptResult::Reply(Reply::new(250, Some((2, 0, 0)), "OK"));
        c.txn_refused(&job, &[(rcpt, ok)], now);
    }

    fn finals(actions: &[Action]) -> usize {
        actions
            .iter()
            .filter(|a| matches!(a, Action::Final { .. }))
            .count()
    }

    #[test]
    fn a_message_stays_while_a_success_notice_about_it_is_pending() {
        let mut c = core();
        let id = c.reserve().expect("room");
        let mut first = Recipient::new("a@x.test");
        first.notify = Notify::On {
            success: true,
            failure: true,
            delay: false,
        };
        let envelope = Envelope {
            reception: ReceptionId {
                ms: 1,
                shard: 0,
                n: 1,
            },
            sender: "s@y.test".into(),
            rcpts: vec![first, Recipient::new("b@x.test")],
            ret: Default::default(),
            envid: None,
            tenant: None,
            smtputf8: false,
            body: Default::default(),
            size: 10,
            peer: "test".into(),
            notices: crate::envelope::NoticeSwitches::ALL,
            priority: Default::default(),
            campaign: None,
        };
        let loc = Location {
            seq: 1,
            offset: 32,
            len: 512,
        };
        c.accepted(id, &envelope, loc, None, 1);
        c.take_actions();
        // The first recipient is delivered and asked for a notice; spooling it fails.
        delivered(&mut c, id, 0, 2);
        let token = c
            .take_actions()
            .iter()
            .find_map(|a| match a {
                Action::Notice(r) => Some(r.token),
                _ => None,
            })
            .expect("a success notice");
        c.notice_failed(token, "disk full", 3);
        // The last recipient is delivered: the message is final, but the notice, to be tried
        // again, still needs the original.
        delivered(&mut c, id, 1, 4);
        let actions = c.take_actions();
        assert_eq!(finals(&actions), 0, "let go with its notice pending");
        assert_eq!(c.queue().len(), 1);
        // (This delivery asks for a notice too: NOTIFY decides when one is built.)
        let second: Vec<u64> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Notice(r) => Some(r.token),
                _ => None,
            })
            .collect();
        for t in second {
            c.notice_spooled(t, None, 5);
        }
        assert_eq!(finals(&c.take_actions()), 0, "the first is still pending");
        c.notice_spooled(token, None, 6);
        assert_eq!(finals(&c.take_actions()), 1);
        assert!(c.queue().is_empty());
    }
}
