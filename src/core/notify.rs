//! The core's notice policy beyond NOTIFY: which notices the listener's and tenant's switches
//! allow, when a pending recipient is due its one delay notice, and the dead letter a
//! terminally failed message leaves before its record goes. Decisions only, from the time
//! given; the retry path (`finish`) calls them.
//!
//! Delay notices are once per recipient: the queue marks the recipient when the notice is
//! asked for, and once the notice is durable an outcome record `Delayed` restates the
//! recipient's deferral with that mark, so a restart does not send it again. Every later
//! deferral of the recipient is recorded as `Delayed` too (the last record wins). A crash
//! between the notice being spooled and its `Delayed` record makes it go again after the
//! restart (at least once, as for failures).

use super::{Action, Core, NoticeRcpt, NoticeRequest};
use crate::envelope::NoticeSwitches;
use crate::events::{AttemptOutcome, Response};
use crate::queue::Message;
use crate::spool::record::{OutcomeKind, OutcomeRecord};
use crate::spool::Location;

/// Whether `switches` allow a notice about `decision` (NOTIFY is asked later, per recipient).
pub(super) fn allows(switches: NoticeSwitches, decision: AttemptOutcome) -> bool {
    match decision {
        AttemptOutcome::Bounced => switches.bounce,
        AttemptOutcome::Expired => switches.expiry,
        AttemptOutcome::Delivered => switches.success,
        AttemptOutcome::Deferred { .. } => switches.delay,
    }
}

/// Whether recipient `r` of `m`, just deferred at `now_ms`, is due its delay notice: delay
/// notices are on (`delay_after_ms` > 0) and allowed, the message has a sender to tell, the
/// recipient has waited `delay_after_ms` since reception and has not had one. No I/O.
pub(super) fn delay_due(
    delay_after_ms: u64,
    switches: NoticeSwitches,
    m: &Message,
    r: u16,
    now_ms: u64,
) -> bool {
    delay_after_ms > 0
        && switches.delay
        && !m.sender().is_empty()
        && !m.delay_notified(r)
        && now_ms >= m.received_ms().saturating_add(delay_after_ms)
}

/// A failed recipient as a dead letter keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadRcpt {
    pub rcpt: u16,
    pub kind: OutcomeKind,
    pub response: Response,
    pub category: Option<crate::bounce::Category>,
    pub at_ms: u64,
}

/// A message that failed for good: write its dead letter (envelope and body, read from
/// `loc`), then let the record go as for [`Action::Final`].
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterRequest {
    pub id: u64,
    pub loc: Location,
    pub rcpts: Vec<DeadRcpt>,
}

impl NoticeRequest {
    /// A delay notice: about recipients still pending, not final outcomes.
    pub fn is_delay(&self) -> bool {
        self.rcpts.iter().all(|r| !r.kind.is_final())
    }
}

impl Core {
    /// The switches in force for message `id`: its listener's, and its tenant's.
    pub(super) fn switches_of(&self, id: u64) -> NoticeSwitches {
        match self.queue.get(id) {
            Some(m) => m
                .notice_switches()
                .and(self.settings.tenant_notices(self.queue.tenant(m))),
            None => NoticeSwitches::NONE,
        }
    }

    /// Ask for a notice about `rcpts` of message `id`; `after` are the failure records that
    /// wait for it to be durable.
    pub(super) fn push_notice(
        &mut self,
        id: u64,
        (loc, sender, reception): (Location, String, crate::envelope::ReceptionId),
        rcpts: Vec<NoticeRcpt>,
        after: Vec<OutcomeRecord>,
    ) {
        let token = self.next_notice;
        self.next_notice += 1;
        let request = NoticeRequest {
            token,
            id,
            loc,
            sender,
            reception,
            rcpts,
        };
        self.actions.push(Action::Notice(request.clone()));
        self.notice_ids.insert((id, token));
        self.notices.insert(
            token,
            super::finish::PendingNotice::new(request, after),
        );
    }

    /// The delay notice about `rcpts` of message `id` is durable: record each recipient still
    /// pending as `Delayed`, restating its attempts and due time, so no restart sends another.
    pub(super) fn delay_spooled(&mut self, id: u64, rcpts: &[NoticeRcpt], now_ms: u64) {
        let Some(m) = self.queue.get(id) else { return };
        let seq = m.loc().seq;
        let records: Vec<OutcomeRecord> = rcpts
            .iter()
            .filter(|r| !m.is_done(r.rcpt))
            .map(|r| OutcomeRecord {
                message: id,
                rcpt: u32::from(r.rcpt),
                kind: OutcomeKind::Delayed,
                attempts: m.attempts(r.rcpt),
                at_ms: now_ms,
                next_attempt_ms: m.due_ms(r.rcpt),
            })
            .collect();
        for record in records {
            self.actions.push(Action::Outcome { seq, record });
        }
    }

    /// Message `id` is final: let its record go, leaving a dead letter first when dead letters
    /// are on and some recipient failed.
    pub(super) fn release(&mut self, id: u64) {
        let dead = self.dead.remove(&id);
        let Some(loc) = self.queue.remove(id) else {
            return;
        };
        match dead {
            Some(rcpts) if !rcpts.is_empty() => {
                self.actions
                    .push(Action::DeadLetter(DeadLetterRequest { id, loc, rcpts }));
            }
            _ => self.actions.push(Action::Final { id, loc }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_allow_by_kind() {
        let only_delay = NoticeSwitches {
            delay: true,
            ..NoticeSwitches::NONE
        };
        assert!(allows(
            only_delay,
            AttemptOutcome::Deferred { next_attempt_ms: 1 }
        ));
        assert!(!allows(only_delay, AttemptOutcome::Bounced));
        assert!(!allows(only_delay, AttemptOutcome::Expired));
        assert!(!allows(only_delay, AttemptOutcome::Delivered));
        assert!(allows(NoticeSwitches::ALL, AttemptOutcome::Expired));
    }
}
