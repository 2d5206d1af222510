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
        self.notices
            .insert(token, super::finish::PendingNotice::new(request, after));
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
                next_attempt_ms: m.due_ms(r.rcpt).unwrap_or(0),
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
    use std::rc::Rc;

    use super::*;
    use crate::config::{Config, Overrides};
    use crate::core::CoreConfig;
    use crate::envelope::{Envelope, ReceptionId, Recipient};
    use crate::outcome::RcptResult;
    use crate::queue::Job;
    use crate::smtp::reply::Reply;

    const T0: u64 = 1_700_000_000_000;

    fn core(toml: &str) -> Core {
        let settings = Config::parse(toml)
            .expect("parses")
            .settle(Overrides {
                routes: vec!["*.test=127.0.0.1:2600".into()],
                resolvers: vec!["127.0.0.1:53".into()],
                ..Overrides::default()
            })
            .expect("settings");
        Core::new(
            CoreConfig {
                shard: 0,
                shards: 1,
                settings: Rc::new(settings),
                has_resolver: false,
            },
            crate::events::Observers::default(),
        )
    }

    fn accept(c: &mut Core, tenant: Option<&str>, notices: NoticeSwitches) -> u64 {
        let id = c.reserve().expect("room");
        let envelope = Envelope {
            reception: ReceptionId {
                ms: T0,
                shard: 0,
                n: 1,
            },
            sender: "s@y.test".into(),
            rcpts: vec![Recipient::new("a@x.test"), Recipient::new("b@x.test")],
            ret: Default::default(),
            envid: None,
            tenant: tenant.map(str::to_owned),
            smtputf8: false,
            body: Default::default(),
            size: 10,
            peer: "test".into(),
            notices,
            priority: Default::default(),
            campaign: None,
        };
        let loc = Location {
            seq: 1,
            offset: 32,
            len: 512,
        };
        c.accepted(id, &envelope, loc, None, T0);
        c.take_actions();
        id
    }

    fn attempt(c: &mut Core, id: u64, rcpts: &[u16], code: u16, now: u64) -> Vec<Action> {
        let job = Job {
            id,
            rcpts: rcpts.iter().copied().collect(),
        };
        let reply = Reply::new(code, Some(((code / 100) as u8, 0, 0)), "try later");
        let results: Vec<(u16, RcptResult)> = rcpts
            .iter()
            .map(|&r| (r, RcptResult::Reply(reply.clone())))
            .collect();
        c.txn_refused(&job, &results, now);
        c.take_actions()
    }

    fn delay_requests(actions: &[Action]) -> Vec<NoticeRequest> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Notice(r) if r.is_delay() => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    fn kinds(actions: &[Action]) -> Vec<OutcomeKind> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Outcome { record, .. } => Some(record.kind),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn one_delay_notice_per_recipient_after_the_delay_recorded_once_spooled() {
        let mut c = core("[notices]\ndelay_after_s = 60\n");
        let id = accept(&mut c, None, NoticeSwitches::ALL);
        // Before the delay: none.
        let a = attempt(&mut c, id, &[0, 1], 451, T0 + 1_000);
        assert!(delay_requests(&a).is_empty());
        // Both deferred together past it: one notice for both.
        let a = attempt(&mut c, id, &[0, 1], 451, T0 + 61_000);
        let d = delay_requests(&a);
        assert_eq!(d.len(), 1, "{a:?}");
        assert_eq!(d[0].rcpts.len(), 2);
        assert_eq!(kinds(&a), vec![OutcomeKind::Deferred; 2]);
        // Asked for: never again, even before it is spooled.
        let a = attempt(&mut c, id, &[0], 451, T0 + 62_000);
        assert!(delay_requests(&a).is_empty());
        assert_eq!(kinds(&a), vec![OutcomeKind::Delayed]);
        // Spooled: each recipient's deferral restated as Delayed.
        c.notice_spooled(d[0].token, None, T0 + 62_500);
        assert_eq!(kinds(&c.take_actions()), vec![OutcomeKind::Delayed; 2]);
        let live = c.live(id).expect("live");
        assert!(live.rcpts.iter().all(|r| matches!(
            r,
            crate::spool::engine::RcptSnapshot::Deferred {
                delay_notified: true,
                ..
            }
        )));
    }

    #[test]
    fn switches_of_the_listener_and_the_tenant_suppress_notices() {
        let toml = "[notices]\ndelay_after_s = 60\n\
                    [[tenant]]\nname = \"hush\"\nnotices = [\"success\"]\n";
        // The tenant allows no delay and no bounce notice.
        let mut c = core(toml);
        let id = accept(&mut c, Some("HUSH"), NoticeSwitches::ALL);
        let a = attempt(&mut c, id, &[0], 451, T0 + 61_000);
        assert!(delay_requests(&a).is_empty(), "{a:?}");
        let a = attempt(&mut c, id, &[1], 550, T0 + 61_000);
        assert!(!a.iter().any(|x| matches!(x, Action::Notice(_))), "{a:?}");
        assert_eq!(kinds(&a), vec![OutcomeKind::Bounced], "recorded at once");
        // The listener allows bounces only.
        let mut c = core(toml);
        let bounces = NoticeSwitches {
            bounce: true,
            ..NoticeSwitches::NONE
        };
        let id = accept(&mut c, None, bounces);
        let a = attempt(&mut c, id, &[0], 451, T0 + 61_000);
        assert!(delay_requests(&a).is_empty(), "{a:?}");
        let a = attempt(&mut c, id, &[1], 550, T0 + 61_000);
        assert!(a.iter().any(|x| matches!(x, Action::Notice(_))), "{a:?}");
        // Delay notices off (the default): none.
        let mut c = core("");
        let id = accept(&mut c, None, NoticeSwitches::ALL);
        let a = attempt(&mut c, id, &[0], 451, T0 + 10 * 86_400_000 / 3);
        assert!(delay_requests(&a).is_empty(), "{a:?}");
    }

    #[test]
    fn a_failed_message_leaves_a_dead_letter_of_its_failures() {
        let mut c = core("[dead_letter]\nenabled = true\n");
        let id = accept(&mut c, None, NoticeSwitches::NONE);
        let a = attempt(&mut c, id, &[0], 250, T0 + 1_000);
        assert!(!a.iter().any(|x| matches!(x, Action::DeadLetter(_))));
        let a = attempt(&mut c, id, &[1], 550, T0 + 2_000);
        let dead: Vec<&DeadLetterRequest> = a
            .iter()
            .filter_map(|x| match x {
                Action::DeadLetter(d) => Some(d),
                _ => None,
            })
            .collect();
        assert_eq!(dead.len(), 1, "{a:?}");
        assert_eq!(dead[0].rcpts.len(), 1);
        assert_eq!(
            (dead[0].rcpts[0].rcpt, dead[0].rcpts[0].kind),
            (1, OutcomeKind::Bounced)
        );
        assert!(!a.iter().any(|x| matches!(x, Action::Final { .. })));
        assert!(c.queue().is_empty());
    }

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
