//! The core's outcome side: what each recipient's result means, what goes to the spool and
//! when, retries, and the notices that must be spooled before a failure is recorded.

use super::deliver::Via;
use super::{Action, Core, NoticeRcpt, NoticeRequest};
use crate::events::{Attempt, AttemptOutcome, Event, NoticeQueued};
use crate::outcome::{self, RcptResult};
use crate::spool::record::OutcomeRecord;

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

impl Core {
    /// Record what happened to each recipient of message `id`, log it, and reschedule what
    /// must be retried.
    pub(super) fn record_results(
        &mut self,
        id: u64,
        results: &[(u16, RcptResult)],
        via: &Via,
        now_ms: u64,
    ) {
        let mut retries: Vec<(u16, u64)> = Vec::new();
        let mut notice_rcpts: Vec<NoticeRcpt> = Vec::new();
        let mut after: Vec<OutcomeRecord> = Vec::new();
        let mut records: Vec<OutcomeRecord> = Vec::new();
        let source = via
            .source
            .and_then(|s| self.settings.egress.sources.get(s))
            .map(|s| s.name.clone());
        let peer = if via.peer.is_empty() {
            "-"
        } else {
            via.peer.as_str()
        };
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
                let decision = outcome::decide(
                    response.code,
                    &self.backoff,
                    attempts,
                    m.received_ms,
                    now_ms,
                );
                let record = OutcomeRecord {
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
                let notice = outcome::wants_notice(decision, m.success_notices, m.sender());
                // A bounce or expiry is recorded only once its notice is spooled: a crash in
                // between leaves the recipient pending, so it bounces (and notifies) again
                // after restart: at least once. A delivery is recorded at once: its success
                // notice is at most once, since redelivering the message would be worse.
                if notice && outcome::notice_first(decision) {
                    after.push(record);
                } else {
                    records.push(record);
                }
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
                    received_ms: m.received_ms,
                    size: u64::from(m.size),
                }));
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
            let notice_for =
                (!notice_rcpts.is_empty()).then(|| (m.loc(), m.sender().to_owned(), m.reception()));
            (m.loc().seq, m.remaining() == 0, notice_for)
        };
        for record in records {
            self.actions.push(Action::Outcome { seq, record });
        }
        for (r, at) in retries {
            self.queue.schedule(id, r, at);
        }
        match notice_for {
            Some((loc, sender, reception)) => {
                let token = self.next_notice;
                self.next_notice += 1;
                let request = NoticeRequest {
                    token,
                    id,
                    loc,
                    sender,
                    reception,
                    rcpts: notice_rcpts,
                };
                self.actions.push(Action::Notice(request.clone()));
                self.notices.insert(
                    token,
                    PendingNotice {
                        request,
                        after,
                        retry_at_ms: None,
                        failures: 0,
                    },
                );
            }
            None if final_now => {
                if let Some(loc) = self.queue.remove(id) {
                    self.actions.push(Action::Final { id, loc });
                }
            }
            None => {}
        }
        self.rearm();
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
        if let Some(notice) = notice {
            self.observers.emit(&Event::NoticeQueued(NoticeQueued {
                ts_ms: now_ms,
                shard: self.shard,
                id,
                reception: pending.request.reception,
                notice,
                rcpts: pending.request.rcpts.len(),
            }));
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
        if final_now {
            if let Some(loc) = self.queue.remove(id) {
                self.actions.push(Action::Final { id, loc });
            }
        }
    }

    /// Spooling the notice of request `token` failed (a full disk, shutdown): try again later;
    /// the failures it reports stay unrecorded until it is durable.
    pub fn notice_failed(&mut self, token: u64, why: &str, now_ms: u64) {
        let delay = self.backoff.base_ms.max(1000);
        if let Some(p) = self.notices.get_mut(&token) {
            p.failures += 1;
            let wait = delay.saturating_mul(u64::from(p.failures.min(16)));
            p.retry_at_ms = Some(now_ms + wait.min(self.backoff.cap_ms.max(delay)));
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
        for token in due {
            if let Some(p) = self.notices.get_mut(&token) {
                p.retry_at_ms = None;
                // Compaction may have moved the message since the request: the notice reads
                // it where it is now (the old place may be gone).
                if let Some(m) = self.queue.get(p.request.id) {
                    p.request.loc = m.loc();
                }
                self.actions.push(Action::Notice(p.request.clone()));
            }
        }
    }
}
