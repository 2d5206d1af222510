//! The core driven by hand: no I/O, a manual clock, and the actions and events it answers with.
//!
//! Each test plays the adapters' part: it feeds the core what reception, the resolver, a
//! delivery connection or another shard would report, and checks what the core asks for. Two
//! cores wired back to back stand in for the mesh where leases are at stake.

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use super::deliver::YIELD_AFTER_MESSAGES;
use super::*;
use crate::config::{Config, Overrides};
use crate::dns::message::Answer;
use crate::egress::lease::owner_of;
use crate::envelope::{Body, Notify, Recipient, Ret};
use crate::events::{AttemptOutcome, Observer, Recorded, Recorder};
use crate::spool::engine::RcptSnapshot;
use crate::spool::RcptState;

/// A plausible Unix time, so reception times in the past stay positive.
const T0: u64 = 1_700_000_000_000;
/// The route every `*.test` domain takes.
const ROUTE: &str = "127.0.0.1:2600";

/// Settings from `toml`, with `*.test` routed to [`ROUTE`] and a resolver named (so nothing
/// reads `/etc/resolv.conf`).
fn settings(toml: &str) -> Rc<Settings> {
    let mut config = Config::parse(toml).expect("test config parses");
    // Exact retry times in these tests: no jitter unless a test asks for it.
    if !toml.contains("retry_jitter") {
        config.queue.retry_jitter = 0.0;
    }
    let settings = config
        .settle(Overrides {
            routes: vec![format!("*.test={ROUTE}")],
            resolvers: vec!["127.0.0.1:53".into()],
            ..Default::default()
        })
        .expect("test config is valid");
    Rc::new(settings)
}

/// Shard `shard` of `shards`, with a recorder of its events.
fn core_of(
    settings: &Rc<Settings>,
    shard: usize,
    shards: usize,
    has_resolver: bool,
) -> (Core, Rc<Recorder>) {
    let recorder = Rc::new(Recorder::default());
    let observers = Observers::new(vec![recorder.clone() as Rc<dyn Observer>]);
    let core = Core::new(
        CoreConfig {
            shard,
            shards,
            settings: settings.clone(),
            has_resolver,
        },
        observers,
    );
    (core, recorder)
}

fn one_core(toml: &str) -> (Core, Rc<Recorder>) {
    core_of(&settings(toml), 0, 1, true)
}

fn envelope(sender: &str, rcpts: &[&str], received_ms: u64) -> Envelope {
    Envelope {
        reception: ReceptionId {
            ms: received_ms,
            shard: 0,
            n: 1,
        },
        sender: sender.into(),
        rcpts: rcpts.iter().map(|a| Recipient::new(*a)).collect(),
        ret: Ret::Unspecified,
        envid: None,
        tenant: None,
        smtputf8: false,
        body: Body::EightBitMime,
        size: 1234,
        peer: "192.0.2.1:40000".into(),
        notices: crate::envelope::NoticeSwitches::ALL,
    }
}

/// Where a message's record is, one slot's worth apart per id.
fn loc_of(id: u64) -> Location {
    Location {
        seq: 1,
        offset: 4096 * (id & 0xff_ffff),
        len: 2048,
    }
}

/// Reserve, spool (pretend) and queue `env`; returns the id.
fn accept(core: &mut Core, env: &Envelope, now_ms: u64) -> u64 {
    let id = core.reserve().expect("room in the queue");
    core.accepted(id, env, loc_of(id), None, now_ms);
    id
}

fn reply(code: u16, enhanced: (u8, u16, u16), text: &str) -> RcptResult {
    RcptResult::Reply(Reply::new(code, Some(enhanced), text))
}

fn ok() -> RcptResult {
    reply(250, (2, 0, 0), "OK queued")
}

fn tempfail() -> RcptResult {
    reply(451, (4, 3, 0), "Try again later")
}

fn bounce() -> RcptResult {
    reply(550, (5, 1, 1), "No such user")
}

/// The same result for every recipient of `job`.
fn all(job: &Job, result: RcptResult) -> Vec<(u16, RcptResult)> {
    job.rcpts.iter().map(|&r| (r, result.clone())).collect()
}

fn connects(actions: &[Action]) -> Vec<(ConnId, Dest, usize)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Connect { conn, dest, source } => Some((*conn, dest.clone(), *source)),
            _ => None,
        })
        .collect()
}

/// The one connection `actions` open.
fn the_connect(actions: &[Action]) -> (ConnId, Dest, usize) {
    let mut found = connects(actions);
    assert_eq!(found.len(), 1, "one Connect expected in {actions:?}");
    found.remove(0)
}

fn outcomes(actions: &[Action]) -> Vec<OutcomeRecord> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Outcome { record, .. } => Some(*record),
            _ => None,
        })
        .collect()
}

fn notices(actions: &[Action]) -> Vec<NoticeRequest> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Notice(n) => Some(n.clone()),
            _ => None,
        })
        .collect()
}

fn finals(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Final { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

fn has(actions: &[Action], wanted: &Action) -> bool {
    actions.contains(wanted)
}

/// The next job of `conn`, which must have one.
fn job_for(core: &mut Core, conn: ConnId, now_ms: u64) -> Box<Ticket> {
    match core.next_job(conn, now_ms) {
        NextJob::Job(ticket) => ticket,
        other => panic!("a job expected, got {other:?}"),
    }
}

/// A connection for the work `actions` asked one for, opened, with its first job.
fn open_and_take(core: &mut Core, actions: &[Action], now_ms: u64) -> (ConnId, Box<Ticket>) {
    let (conn, _, _) = the_connect(actions);
    core.conn_opened(conn, ROUTE, now_ms);
    let ticket = job_for(core, conn, now_ms);
    (conn, ticket)
}

fn attempts_seen(recorder: &Recorder) -> Vec<(u64, String, AttemptOutcome, u16)> {
    recorder
        .seen
        .borrow()
        .iter()
        .filter_map(|r| match r {
            Recorded::Attempt {
                id,
                rcpt,
                outcome,
                code,
            } => Some((*id, rcpt.clone(), *outcome, *code)),
            _ => None,
        })
        .collect()
}

fn route_hop() -> Hop {
    Hop::Route(crate::route::Destination {
        addr: ROUTE.parse().expect("route address"),
        host: "127.0.0.1".into(),
        tls: Default::default(),
    })
}

// 1. The way through: accepted, connected, ticketed, delivered, final.

#[test]
fn an_accepted_message_is_connected_ticketed_delivered_and_let_go() {
    let (mut core, rec) = one_core("");
    let env = envelope("s@x.test", &["a@d.test", "b@d.test"], T0);
    let id = accept(&mut core, &env, T0);
    let actions = core.take_actions();
    // On one shard the permit is granted locally at once: the Connect is the only action.
    assert_eq!(actions.len(), 1, "{actions:?}");
    let (conn, dest, source) = the_connect(&actions);
    assert_eq!(source, 0);
    assert_eq!(dest.hop, route_hop());
    assert_eq!(core.connections(), 1);

    core.conn_opened(conn, ROUTE, T0 + 5);
    let ticket = job_for(&mut core, conn, T0 + 5);
    assert_eq!(ticket.job.id, id);
    assert_eq!(ticket.job.rcpts.as_slice(), &[0, 1]);
    assert_eq!(ticket.sender, "s@x.test");
    assert_eq!(ticket.rcpts, vec!["a@d.test", "b@d.test"]);
    assert_eq!(ticket.loc, loc_of(id));
    assert_eq!(
        (ticket.size, ticket.body, ticket.smtputf8),
        (1234, Body::EightBitMime, false)
    );

    core.txn_done(conn, &ticket.job, &all(&ticket.job, ok()), T0 + 10);
    let delivered = |rcpt| OutcomeRecord {
        message: id,
        rcpt,
        kind: OutcomeKind::Delivered,
        attempts: 1,
        at_ms: T0 + 10,
        next_attempt_ms: 0,
    };
    assert_eq!(
        core.take_actions(),
        vec![
            Action::Outcome {
                seq: 1,
                record: delivered(0)
            },
            Action::Outcome {
                seq: 1,
                record: delivered(1)
            },
            Action::Final {
                id,
                loc: loc_of(id)
            },
        ]
    );
    assert!(core.queue().is_empty());
    assert_eq!(core.live(id), None, "a final message is not live");
    assert_eq!(core.next_wakeup(), None);
    assert_eq!(
        *rec.seen.borrow(),
        vec![
            Recorded::Received { id, rcpts: 2 },
            Recorded::Attempt {
                id,
                rcpt: "a@d.test".into(),
                outcome: AttemptOutcome::Delivered,
                code: 250
            },
            Recorded::Attempt {
                id,
                rcpt: "b@d.test".into(),
                outcome: AttemptOutcome::Delivered,
                code: 250
            },
        ]
    );
}

#[test]
fn recipients_are_grouped_by_domain_and_split_per_transaction() {
    let (mut core, _) = one_core(
        "[delivery]\nrcpts_per_transaction_max = 2\nconnections_per_destination_max = 1\n",
    );
    let env = envelope(
        "s@x.test",
        &["a@d.test", "x@example.com", "b@D.test", "c@e.test"],
        T0,
    );
    let id = accept(&mut core, &env, T0);
    let actions = core.take_actions();
    // d.test and e.test share the route (one destination); example.com needs its MX.
    assert!(has(
        &actions,
        &Action::Resolve {
            domain: "example.com".into()
        }
    ));
    let (conn, ticket) = open_and_take(&mut core, &actions, T0);
    assert_eq!(ticket.job.rcpts.as_slice(), &[0, 2], "d.test, at most two");
    assert_eq!(ticket.rcpts, vec!["a@d.test", "b@D.test"]);
    core.txn_done(conn, &ticket.job, &all(&ticket.job, ok()), T0);
    let ticket = job_for(&mut core, conn, T0);
    assert_eq!((ticket.job.id, ticket.job.rcpts.as_slice()), (id, &[3][..]));
}

// 2. Deferrals: recorded, scheduled, routed again when due.

#[test]
fn a_deferral_is_recorded_scheduled_and_routed_again_when_due() {
    let (mut core, rec) = one_core("[queue]\nretry_base_ms = 1000\n");
    let id = accept(&mut core, &envelope("s@x.test", &["a@d.test"], T0), T0);
    let actions = core.take_actions();
    let (conn, ticket) = open_and_take(&mut core, &actions, T0);
    core.txn_done(conn, &ticket.job, &all(&ticket.job, tempfail()), T0 + 100);
    let due = T0 + 100 + 1000;
    assert_eq!(
        core.take_actions(),
        vec![
            Action::Outcome {
                seq: 1,
                record: OutcomeRecord {
                    message: id,
                    rcpt: 0,
                    kind: OutcomeKind::Deferred,
                    attempts: 1,
                    at_ms: T0 + 100,
                    next_attempt_ms: due,
                }
            },
            Action::Rearm,
        ]
    );
    assert_eq!(core.next_wakeup(), Some(due));
    assert_eq!(core.queue().len(), 1, "a deferred message stays queued");
    assert_eq!(core.queue().scheduled_len(), 1);
    assert_eq!(
        core.live(id).map(|l| l.rcpts),
        Some(vec![RcptSnapshot::Deferred {
            attempts: 1,
            next_attempt_ms: due,
            delay_notified: false,
        }])
    );
    assert_eq!(
        attempts_seen(&rec),
        vec![(
            id,
            "a@d.test".into(),
            AttemptOutcome::Deferred {
                next_attempt_ms: due
            },
            451
        )]
    );

    // The connection has nothing to do until then.
    assert_eq!(
        core.next_job(conn, T0 + 100),
        NextJob::Wait {
            until_ms: T0 + 100 + 5000
        }
    );
    core.tick(due - 1);
    assert_eq!(core.take_actions(), vec![]);
    // Due: routed again; the idle connection is woken rather than another one opened.
    core.tick(due);
    assert_eq!(core.take_actions(), vec![Action::WakeIdle]);
    // No retry due; the job waiting in the ready queue is checked at its deadline.
    assert_eq!(
        core.next_wakeup(),
        Some(T0 + 5 * 86_400_000 + crate::core::READY_CHECK_GAP_MS)
    );
    let ticket = job_for(&mut core, conn, due);
    assert_eq!(ticket.job.id, id);
    core.txn_done(conn, &ticket.job, &all(&ticket.job, ok()), due + 10);
    let actions = core.take_actions();
    assert_eq!(outcomes(&actions)[0].attempts, 2);
    assert_eq!(outcomes(&actions)[0].kind, OutcomeKind::Delivered);
    assert_eq!(finals(&actions), vec![id]);
}

#[test]
fn a_retry_after_its_connection_closed_opens_a_new_one() {
    let (mut core, _) = one_core("[queue]\nretry_base_ms = 1000\n");
    accept(&mut core, &envelope("s@x.test", &["a@d.test"], T0), T0);
    let actions = core.take_actions();
    let (conn, ticket) = open_and_take(&mut core, &actions, T0);
    core.txn_done(conn, &ticket.job, &all(&ticket.job, tempfail()), T0);
    core.conn_closed(conn, T0);
    core.take_actions();
    assert_eq!(core.connections(), 0);
    core.tick(T0 + 1000);
    let (again, _, _) = the_connect(&core.take_actions());
    assert_ne!(again, conn, "a fresh connection id");
}

#[test]
fn rearm_only_when_the_earliest_due_time_moves_earlier() {
    let (mut core, _) = one_core(
        "[queue]\nretry_base_ms = 4000\nmax_age_s = 10\n\
         [delivery]\nconnections_per_destination_max = 1\n",
    );
    let t = T0;
    let a = accept(&mut core, &envelope("s@x.test", &["a@d.test"], t), t);
    let c = accept(&mut core, &envelope("s@x.test", &["c@d.test"], t), t);
    // B is nearly 10 s old: its retry is moved up to its deadline, before A's.
    let b = accept(&mut core, &envelope("s@x.test", &["b@d.test"], t - 9000), t);
    let actions = core.take_actions();
    // One connection for three jobs: saturated, so the timer learns when the oldest waiting
    // job may pass its deadline in the ready queue (B's, plus the check's gap).
    assert!(has(&actions, &Action::Rearm), "ready queue check");
    assert_eq!(core.next_wakeup(), Some(t + 2000));
    let (conn, ta) = open_and_take(&mut core, &actions, t);
    assert_eq!(ta.job.id, a);
    core.txn_done(conn, &ta.job, &all(&ta.job, tempfail()), t);
    assert!(
        !has(&core.take_actions(), &Action::Rearm),
        "a later due time needs no re-arm"
    );
    assert_eq!(core.next_wakeup(), Some(t + 2000));

    let tc = job_for(&mut core, conn, t + 500);
    assert_eq!(tc.job.id, c);
    core.txn_done(conn, &tc.job, &all(&tc.job, tempfail()), t + 500);
    assert!(
        !has(&core.take_actions(), &Action::Rearm),
        "a later due time needs no re-arm"
    );

    let tb = job_for(&mut core, conn, t + 500);
    assert_eq!(tb.job.id, b);
    core.txn_done(conn, &tb.job, &all(&tb.job, tempfail()), t + 500);
    let actions = core.take_actions();
    assert_eq!(outcomes(&actions)[0].next_attempt_ms, t + 1000);
    assert!(has(&actions, &Action::Rearm), "an earlier due time");
    // Nothing waits in a ready queue any more: the retry is the next wake-up.
    assert_eq!(core.next_wakeup(), Some(t + 1000));
}

// 3. Bounces and notices.

#[test]
fn a_bounce_is_recorded_only_once_its_notice_is_spooled() {
    let (mut core, rec) = one_core("");
    let env = envelope("s@x.test", &["a@d.test"], T0);
    let id = accept(&mut core, &env, T0);
    let actions = core.take_actions();
    let (conn, ticket) = open_and_take(&mut core, &actions, T0);
    core.txn_done(conn, &ticket.job, &all(&ticket.job, bounce()), T0 + 10);
    let actions = core.take_actions();
    assert_eq!(outcomes(&actions), vec![], "no record before the notice");
    assert_eq!(finals(&actions), Vec::<u64>::new());
    let [Action::Notice(request)] = actions.as_slice() else {
        panic!("one Notice expected: {actions:?}");
    };
    assert_eq!(
        (request.id, request.loc, request.sender.as_str()),
        (id, loc_of(id), "s@x.test")
    );
    assert_eq!(request.reception, env.reception);
    assert_eq!(
        request.rcpts,
        vec![NoticeRcpt {
            rcpt: 0,
            kind: OutcomeKind::Bounced,
            response: Response {
                code: 550,
                enhanced: "5.1.1".into(),
                text: "No such user".into()
            }
        }]
    );
    assert_eq!(core.notices_pending(), 1);
    // Not tried again meanwhile, and on disk (for compaction) it is still as it was.
    assert_eq!(
        core.next_job(conn, T0 + 10),
        NextJob::Wait {
            until_ms: T0 + 10 + 5000
        }
    );
    assert_eq!(
        core.live(id).map(|l| l.rcpts),
        Some(vec![RcptSnapshot::Fresh])
    );
    assert_eq!(
        attempts_seen(&rec),
        vec![(id, "a@d.test".into(), AttemptOutcome::Bounced, 550)]
    );

    let notice_id = ReceptionId {
        ms: T0 + 20,
        shard: 0,
        n: 2,
    };
    core.notice_spooled(request.token, Some(notice_id), T0 + 20);
    assert_eq!(
        core.take_actions(),
        vec![
            Action::Outcome {
                seq: 1,
                record: OutcomeRecord {
                    message: id,
                    rcpt: 0,
                    kind: OutcomeKind::Bounced,
                    attempts: 1,
                    at_ms: T0 + 10,
                    next_attempt_ms: 0,
                }
            },
            Action::Final {
                id,
                loc: loc_of(id)
            },
        ]
    );
    assert!(core.queue().is_empty());
    assert_eq!(core.notices_pending(), 0);
    assert_eq!(
        rec.seen.borrow().last(),
        Some(&Recorded::Notice {
            id,
            rcpts: 1,
            sent: true
        })
    );
}

#[test]
fn a_notice_that_fails_to_spool_is_tried_again_at_its_time() {
    let (mut core, _) = one_core("[queue]\nretry_base_ms = 1000\n");
    let id = accept(&mut core, &envelope("s@x.test", &["a@d.test"], T0), T0);
    let actions = core.take_actions();
    let (conn, ticket) = open_and_take(&mut core, &actions, T0);
    core.txn_done(conn, &ticket.job, &all(&ticket.job, bounce()), T0);
    let request = notices(&core.take_actions()).remove(0);

    core.notice_failed(request.token, "spool out of space", T0 + 100);
    assert_eq!(core.take_actions(), vec![Action::Rearm]);
    assert_eq!(core.next_wakeup(), Some(T0 + 1100));
    core.tick(T0 + 1099);
    assert_eq!(core.take_actions(), vec![]);
    core.tick(T0 + 1100);
    assert_eq!(core.take_actions(), vec![Action::Notice(request.clone())]);
    assert_eq!(core.next_wakeup(), None, "under way again");

    // A second failure waits longer.
    core.notice_failed(request.token, "spool out of space", T0 + 2000);
    assert_eq!(core.next_wakeup(), Some(T0 + 4000));
    core.tick(T0 + 4000);
    assert_eq!(notices(&core.take_actions()), vec![request.clone()]);

    core.notice_spooled(request.token, None, T0 + 4100);
    let actions = core.take_actions();
    assert_eq!(outcomes(&actions).len(), 1);
    assert_eq!(outcomes(&actions)[0].kind, OutcomeKind::Bounced);
    assert_eq!(finals(&actions), vec![id]);
}

/// Regression: a notice tried again after compaction moved the message asked for it at its
/// old place (`finish.rs`, `retry_notices`), where it may be gone by then.
#[test]
fn a_retried_notice_reads_the_message_where_it_is_now() {
    let (mut core, _) = one_core("[queue]\nretry_base_ms = 1000\n");
    let id = accept(&mut core, &envelope("s@x.test", &["a@d.test"], T0), T0);
    let actions = core.take_actions();
    let (conn, ticket) = open_and_take(&mut core, &actions, T0);
    core.txn_done(conn, &ticket.job, &all(&ticket.job, bounce()), T0);
    let request = notices(&core.take_actions()).remove(0);
    core.notice_failed(request.token, "spool out of space", T0);
    let moved = Location {
        seq: 7,
        offset: 64,
        len: 2048,
    };
    core.relocated(&[(id, moved)]);
    core.tick(T0 + 1000);
    let retried = notices(&core.take_actions()).remove(0);
    assert_eq!(retried.loc, moved);
    core.notice_spooled(retried.token, None, T0 + 1000);
    let actions = core.take_actions();
    assert!(has(
        &actions,
        &Action::Outcome {
            seq: 7,
            record: OutcomeRecord {
                message: id,
                rcpt: 0,
                kind: OutcomeKind::Bounced,
                attempts: 1,
                at_ms: T0,
                next_attempt_ms: 0,
            }
        }
    ));
    assert!(has(&actions, &Action::Final { id, loc: moved }));
}

/// Regression: while stopping, notices are not tried again, so `next_wakeup` must not report
/// their retry times (`mod.rs`, `next_wakeup`): a timer would tick at that time for ever.
#[test]
fn a_stopping_core_reports_no_notice_retry_it_will_not_make() {
    let (mut core, _) = one_core("[queue]\nretry_base_ms = 1000\n");
    accept(&mut core, &envelope("s@x.test", &["a@d.test"], T0), T0);
    let actions = core.take_actions();
    let (conn, ticket) = open_and_take(&mut core, &actions, T0);
    core.txn_done(conn, &ticket.job, &all(&ticket.job, bounce()), T0);
    let request = notices(&core.take_actions()).remove(0);
    core.notice_failed(request.token, "shutting down", T0);
    core.stop();
    core.tick(T0 + 1000);
    assert_eq!(notices(&core.take_actions()), vec![]);
    assert!(
        core.next_wakeup().is_none_or(|t| t > T0 + 1000),
        "tick at {:?} would do nothing",
        core.next_wakeup()
    );
    assert_eq!(core.notices_pending(), 1, "the failure stays unrecorded");
}

#[test]
fn the_null_sender_gets_no_notice() {
    let (mut core, _) = one_core("");
    let id = accept(&mut core, &envelope("", &["a@d.test"], T0), T0);
    let actions = core.take_actions();
    let (conn, ticket) = open_and_take(&mut core, &actions, T0);
    core.txn_done(conn, &ticket.job, &all(&ticket.job, bounce()), T0);
    let actions = core.take_actions();
    assert_eq!(notices(&actions), vec![]);
    assert_eq!(outcomes(&actions)[0].kind, OutcomeKind::Bounced);
    assert_eq!(finals(&actions), vec![id]);
    assert_eq!(core.notices_pending(), 0);
}

#[test]
fn notify_success_asks_for_a_notice_and_records_the_delivery_at_once() {
    let (mut core, _) = one_core("");
    let mut env = envelope("s@x.test", &["a@d.test"], T0);
    env.rcpts[0].notify = Notify::On {
        success: true,
        failure: true,
        delay: false,
    };
    let id = accept(&mut core, &env, T0);
    let actions = core.take_actions();
    let (conn, ticket) = open_and_take(&mut core, &actions, T0);
    core.txn_done(conn, &ticket.job, &all(&ticket.job, ok()), T0);
    let actions = core.take_actions();
    // The delivery is on disk at once (redelivering would be worse than a lost notice) ...
    assert!(matches!(
        actions.first(),
        Some(Action::Outcome {
            record: OutcomeRecord {
                kind: OutcomeKind::Delivered,
                ..
            },
            ..
        })
    ));
    let request = notices(&actions).remove(0);
    assert_eq!(request.rcpts[0].kind, OutcomeKind::Delivered);
    assert_eq!(request.rcpts[0].response.code, 250);
    // ... but the record stays until the notice has read it.
    assert_eq!(finals(&actions), Vec::<u64>::new());
    assert_eq!(core.queue().len(), 1);
    core.notice_spooled(request.token, None, T0 + 1);
    assert_eq!(
        core.take_actions(),
        vec![Action::Final {
            id,
            loc: loc_of(id)
        }]
    );
}

// 4. Expiry.

#[test]
fn a_deferral_at_the_deadline_expires_with_a_notice() {
    let (mut core, rec) = one_core("[queue]\nretry_base_ms = 4000\nmax_age_s = 10\n");
    let id = accept(&mut core, &envelope("s@x.test", &["a@d.test"], T0), T0);
    let actions = core.take_actions();
    let (conn, ticket) = open_and_take(&mut core, &actions, T0);
    core.txn_done(conn, &ticket.job, &all(&ticket.job, tempfail()), T0 + 1000);
    assert_eq!(core.next_wakeup(), Some(T0 + 5000));
    core.tick(T0 + 5000);
    let ticket = job_for(&mut core, conn, T0 + 5000);
    core.txn_done(conn, &ticket.job, &all(&ticket.job, tempfail()), T0 + 5000);
    // 8 s later would be past the deadline: the last try is moved up to it.
    assert_eq!(core.next_wakeup(), Some(T0 + 10_000));
    core.take_actions();
    core.tick(T0 + 10_000);
    let ticket = job_for(&mut core, conn, T0 + 10_000);
    core.txn_done(
        conn,
        &ticket.job,
        &all(&ticket.job, tempfail()),
        T0 + 10_000,
    );
    let actions = core.take_actions();
    assert_eq!(outcomes(&actions), vec![], "recorded once the notice is");
    let request = notices(&actions).remove(0);
    assert_eq!(request.rcpts[0].kind, OutcomeKind::Expired);
    assert_eq!(core.next_wakeup(), None, "no more attempts");
    assert_eq!(
        attempts_seen(&rec).last().map(|a| a.2),
        Some(AttemptOutcome::Expired)
    );
    core.notice_spooled(request.token, None, T0 + 10_001);
    let actions = core.take_actions();
    assert_eq!(outcomes(&actions)[0].kind, OutcomeKind::Expired);
    assert_eq!(outcomes(&actions)[0].attempts, 3);
    assert_eq!(finals(&actions), vec![id]);
}

// 5. Connection lifecycle.

#[test]
fn an_idle_connection_waits_then_closes_after_the_idle_timeout() {
    let (mut core, _) = one_core("[delivery]\nidle_timeout_ms = 5000\n");
    accept(&mut core, &envelope("s@x.test", &["a@d.test"], T0), T0);
    let actions = core.take_actions();
    let (conn, ticket) = open_and_take(&mut core, &actions, T0);
    core.txn_done(conn, &ticket.job, &all(&ticket.job, ok()), T0);
    core.take_actions();
    let t1 = T0 + 100;
    assert_eq!(
        core.next_job(conn, t1),
        NextJob::Wait {
            until_ms: t1 + 5000
        }
    );
    // Asking again while idle does not move the deadline.
    assert_eq!(
        core.next_job(conn, t1 + 2000),
        NextJob::Wait {
            until_ms: t1 + 5000
        }
    );
    // New work wakes the idle connection instead of opening another.
    let id = accept(
        &mut core,
        &envelope("s@x.test", &["b@d.test"], t1),
        t1 + 3000,
    );
    assert_eq!(core.take_actions(), vec![Action::WakeIdle]);
    let ticket = job_for(&mut core, conn, t1 + 3000);
    assert_eq!(ticket.job.id, id);
    core.txn_done(conn, &ticket.job, &all(&ticket.job, ok()), t1 + 3000);
    core.take_actions();
    // Idle again: the timeout counts from now.
    let t2 = t1 + 4000;
    assert_eq!(
        core.next_job(conn, t2),
        NextJob::Wait {
            until_ms: t2 + 5000
        }
    );
    assert_eq!(core.next_job(conn, t2 + 5000), NextJob::Close);
    core.conn_closed(conn, t2 + 5000);
    assert_eq!(core.take_actions(), vec![]);
    assert_eq!(core.connections(), 0);
    assert_eq!(
        core.next_job(conn, t2 + 5000),
        NextJob::Close,
        "unknown now"
    );
}

#[test]
fn a_connection_closes_after_messages_per_connection_max_jobs() {
    let (mut core, _) = one_core(
        "[delivery]\nmessages_per_connection_max = 2\nconnections_per_destination_max = 1\n",
    );
    let ids: Vec<u64> = (0..3)
        .map(|i| {
            let rcpt = format!("r{i}@d.test");
            accept(&mut core, &envelope("s@x.test", &[&rcpt], T0), T0)
        })
        .collect();
    let actions = core.take_actions();
    let (conn, first) = open_and_take(&mut core, &actions, T0);
    assert_eq!(first.job.id, ids[0]);
    core.txn_done(conn, &first.job, &all(&first.job, ok()), T0);
    let second = job_for(&mut core, conn, T0);
    assert_eq!(second.job.id, ids[1]);
    core.txn_done(conn, &second.job, &all(&second.job, ok()), T0);
    assert_eq!(core.next_job(conn, T0), NextJob::Close, "two carried");
    core.take_actions();
    core.conn_closed(conn, T0);
    // The third job gets a connection of its own.
    let actions = core.take_actions();
    let (next, third) = open_and_take(&mut core, &actions, T0);
    assert_ne!(next, conn);
    assert_eq!(third.job.id, ids[2]);
}

/// Regression: `early_job` (`deliver.rs`) refused the last job a connection may carry, so it
/// was never pipelined (`started + 1 >= messages_max` where `started` already counts the job
/// in flight).
#[test]
fn early_jobs_pipeline_up_to_messages_per_connection_max() {
    let (mut core, _) = one_core(
        "[delivery]\nmessages_per_connection_max = 2\nconnections_per_destination_max = 1\n",
    );
    for i in 0..3 {
        let rcpt = format!("r{i}@d.test");
        accept(&mut core, &envelope("s@x.test", &[&rcpt], T0), T0);
    }
    let actions = core.take_actions();
    let (conn, first) = open_and_take(&mut core, &actions, T0);
    let second = core.early_job(conn).expect("the second job pipelines");
    assert_ne!(second.job.id, first.job.id);
    assert_eq!(core.early_job(conn), None, "two is the most");
    core.txn_done(conn, &first.job, &all(&first.job, ok()), T0);
    core.txn_done(conn, &second.job, &all(&second.job, ok()), T0);
    assert_eq!(core.next_job(conn, T0), NextJob::Close);
    assert_eq!(
        core.queue().ready_len(),
        1,
        "the third waits for a connection"
    );
}

#[test]
fn stop_wakes_idle_connections_and_closes_them() {
    let (mut core, _) = one_core("");
    accept(&mut core, &envelope("s@x.test", &["a@d.test"], T0), T0);
    let actions = core.take_actions();
    let (conn, ticket) = open_and_take(&mut core, &actions, T0);
    core.txn_done(conn, &ticket.job, &all(&ticket.job, ok()), T0);
    core.take_actions();
    assert!(matches!(core.next_job(conn, T0), NextJob::Wait { .. }));
    core.stop();
    assert!(core.is_stopping());
    assert_eq!(core.take_actions(), vec![Action::WakeIdle]);
    // Work that arrives now waits for the next start: no job, no new connection.
    accept(&mut core, &envelope("s@x.test", &["b@d.test"], T0), T0 + 1);
    assert_eq!(connects(&core.take_actions()), vec![]);
    assert_eq!(core.next_job(conn, T0 + 1), NextJob::Close);
    assert_eq!(core.early_job(conn), None);
    core.conn_closed(conn, T0 + 1);
    assert_eq!(connects(&core.take_actions()), vec![]);
    assert_eq!(core.connections(), 0);
    assert_eq!(core.queue().len(), 1, "still queued, for recovery");
}

#[test]
fn an_unreachable_destination_fails_its_ready_jobs_transiently() {
    let (mut core, rec) = one_core(
        "[queue]\nretry_base_ms = 1000\n[delivery]\nconnections_per_destination_max = 1\n",
    );
    let a = accept(&mut core, &envelope("s@x.test", &["a@d.test"], T0), T0);
    let b = accept(&mut core, &envelope("s@x.test", &["b@e.test"], T0), T0);
    let (conn, _, _) = the_connect(&core.take_actions());
    core.conn_failed(
        conn,
        ConnFailure::Unreachable {
            why: "connect to 127.0.0.1:2600 failed: connection refused".into(),
            source_suspect: false,
        },
        T0 + 10,
    );
    let actions = core.take_actions();
    let records = outcomes(&actions);
    assert_eq!(
        records
            .iter()
            .map(|r| (r.message, r.kind))
            .collect::<Vec<_>>(),
        vec![(a, OutcomeKind::Deferred), (b, OutcomeKind::Deferred)]
    );
    assert!(records.iter().all(|r| r.next_attempt_ms == T0 + 1010));
    assert!(has(&actions, &Action::Rearm));
    assert_eq!(
        attempts_seen(&rec)
            .iter()
            .map(|a| (a.0, a.3))
            .collect::<Vec<_>>(),
        vec![(a, 451), (b, 451)]
    );
    core.conn_closed(conn, T0 + 10);
    assert_eq!(
        connects(&core.take_actions()),
        vec![],
        "nothing left to carry"
    );
    assert_eq!(core.queue().ready_len(), 0);
    assert_eq!(core.queue().scheduled_len(), 2);
    // A refusal is not the source's fault: no health change.
    assert!(!rec
        .seen
        .borrow()
        .iter()
        .any(|r| matches!(r, Recorded::SourceHealth { .. })));
}

#[test]
fn suspect_connect_failures_take_the_source_out_of_rotation_for_a_while() {
    let (mut core, rec) = one_core("[egress]\nsource_failures_max = 3\n");
    let health = |rec: &Recorder| -> Vec<Recorded> {
        rec.seen
            .borrow()
            .iter()
            .filter(|r| matches!(r, Recorded::SourceHealth { .. }))
            .cloned()
            .collect()
    };
    for i in 0..3 {
        accept(&mut core, &envelope("s@x.test", &["a@d.test"], T0), T0);
        let (conn, _, _) = the_connect(&core.take_actions());
        assert!(
            health(&rec).is_empty(),
            "not before the third failure ({i})"
        );
        core.conn_failed(
            conn,
            ConnFailure::Unreachable {
                why: "connect timed out".into(),
                source_suspect: true,
            },
            T0,
        );
        core.conn_closed(conn, T0);
        core.take_actions();
    }
    assert_eq!(
        health(&rec),
        vec![Recorded::SourceHealth {
            source: "default".into(),
            down: true
        }]
    );
    // The whole pool is down for connect failures: its source is still tried, and back in
    // rotation once a connection gets through.
    accept(&mut core, &envelope("s@x.test", &["a@d.test"], T0), T0);
    let (conn, _, _) = the_connect(&core.take_actions());
    core.conn_opened(conn, ROUTE, T0 + 1);
    assert_eq!(
        health(&rec).last(),
        Some(&Recorded::SourceHealth {
            source: "default".into(),
            down: false
        })
    );
}

const TWO_SOURCES: &str = r#"
[[source]]
name = "a"
address = "127.0.0.1"

[[source]]
name = "b"
address = "127.0.0.2"
"#;

#[test]
fn a_source_that_cannot_bind_leaves_rotation_and_its_jobs_stay_queued() {
    let (mut core, rec) = one_core(TWO_SOURCES);
    let id = accept(&mut core, &envelope("s@x.test", &["a@d.test"], T0), T0);
    let (conn, _, source) = the_connect(&core.take_actions());
    assert_eq!(source, 0);
    core.conn_failed(
        conn,
        ConnFailure::Bind {
            why: "cannot assign requested address".into(),
        },
        T0,
    );
    let actions = core.take_actions();
    assert_eq!(outcomes(&actions), vec![], "nothing was tried");
    assert_eq!(core.queue().ready_len(), 1, "the job stays ready");
    assert_eq!(attempts_seen(&rec), vec![]);
    assert_eq!(
        rec.seen.borrow().last(),
        Some(&Recorded::SourceHealth {
            source: "a".into(),
            down: true
        })
    );
    core.conn_closed(conn, T0);
    // The next connection comes from the other source, and carries the job.
    let actions = core.take_actions();
    let (next, _, source) = the_connect(&actions);
    assert_eq!(source, 1);
    core.conn_opened(next, ROUTE, T0);
    assert_eq!(job_for(&mut core, next, T0).job.id, id);
    // Source a stays out while quarantined (60 s by default).
    accept(
        &mut core,
        &envelope("s@x.test", &["b@d.test"], T0),
        T0 + 1000,
    );
    let (_, _, source) = the_connect(&core.take_actions());
    assert_eq!(source, 1);
}

#[test]
fn with_no_source_left_that_binds_the_jobs_are_deferred() {
    let (mut core, rec) = one_core("[queue]\nretry_base_ms = 1000\n");
    let id = accept(&mut core, &envelope("s@x.test", &["a@d.test"], T0), T0);
    let (conn, _, _) = the_connect(&core.take_actions());
    core.conn_failed(
        conn,
        ConnFailure::Bind {
            why: "cannot assign requested address".into(),
        },
        T0,
    );
    assert_eq!(outcomes(&core.take_actions()), vec![]);
    core.conn_closed(conn, T0);
    let actions = core.take_actions();
    assert_eq!(connects(&actions), vec![]);
    let records = outcomes(&actions);
    assert_eq!(
        records
            .iter()
            .map(|r| (r.message, r.kind))
            .collect::<Vec<_>>(),
        vec![(id, OutcomeKind::Deferred)]
    );
    assert_eq!(attempts_seen(&rec)[0].3, 451);
}

// 6. Leases across two shards.

/// Two cores wired back to back: lease messages go straight to the other's `lease_in`.
struct Pair {
    cores: Vec<Core>,
    /// Connections asked for and not closed yet: (shard, connection) → egress source.
    open: BTreeMap<(usize, ConnId), usize>,
    /// Connections per (site, source).
    limit: usize,
}

impl Pair {
    fn new(toml: &str) -> Pair {
        let s = settings(toml);
        let limit = s.config.delivery.connections_per_destination_max;
        Pair {
            cores: vec![core_of(&s, 0, 2, true).0, core_of(&s, 1, 2, true).0],
            open: BTreeMap::new(),
            limit,
        }
    }

    /// Carry lease messages until none are left; the other actions, per shard. Checks that
    /// the limit of every source holds across shards at every step (all mail here goes to
    /// one site).
    fn pump(&mut self, now_ms: u64) -> [Vec<Action>; 2] {
        let mut out: [Vec<Action>; 2] = [Vec::new(), Vec::new()];
        loop {
            let mut mail = Vec::new();
            for (shard, core) in self.cores.iter_mut().enumerate() {
                for action in core.take_actions() {
                    match action {
                        Action::Lease { to, msg } => {
                            assert_ne!(to, shard, "a shard handles its own lease messages");
                            mail.push((shard, to, msg));
                        }
                        Action::Connect { conn, source, .. } => {
                            self.open.insert((shard, conn), source);
                            out[shard].push(action);
                        }
                        other => out[shard].push(other),
                    }
                }
            }
            let mut per_source: BTreeMap<usize, usize> = BTreeMap::new();
            for source in self.open.values() {
                *per_source.entry(*source).or_default() += 1;
            }
            assert!(
                per_source.values().all(|&n| n <= self.limit),
                "connections {:?} over the limit {}",
                self.open,
                self.limit
            );
            if mail.is_empty() {
                return out;
            }
            for (from, to, msg) in mail {
                self.cores[to].lease_in(from, msg, now_ms);
            }
        }
    }

    fn closed(&mut self, shard: usize, conn: ConnId, now_ms: u64) {
        self.cores[shard].conn_closed(conn, now_ms);
        self.open.remove(&(shard, conn));
    }

    /// Permits out at the keys' owners, over the (at most two) sources.
    fn permits_out(&self) -> u32 {
        (0..2)
            .map(|source| {
                let key = LeaseKey {
                    site: route_hop().site_key(),
                    source,
                };
                self.cores[owner_of(&key, 2)].budgets().open(&key)
            })
            .sum()
    }
}

fn accept_many(core: &mut Core, n: usize, now_ms: u64) {
    for i in 0..n {
        let rcpt = format!("r{i}@d.test");
        accept(core, &envelope("s@x.test", &[&rcpt], now_ms), now_ms);
    }
}

#[test]
fn the_limit_holds_across_shards_and_a_busy_holder_yields_after_a_fair_run() {
    let mut p = Pair::new("[delivery]\nconnections_per_destination_max = 1\n");
    let extra = 8;
    accept_many(&mut p.cores[0], YIELD_AFTER_MESSAGES as usize + extra, T0);
    let out = p.pump(T0);
    let (conn0, _, _) = the_connect(&out[0]);
    assert!(connects(&out[1]).is_empty());
    assert_eq!(p.permits_out(), 1);

    // Shard 1 wants the site too: it waits, and shard 0 is asked to yield.
    accept_many(&mut p.cores[1], 1, T0);
    let out = p.pump(T0);
    assert!(connects(&out[1]).is_empty(), "shard 1 waits: {:?}", out[1]);
    assert!(has(&out[0], &Action::WakeIdle), "{:?}", out[0]);

    // Shard 0 finishes a fair run first, then closes.
    p.cores[0].conn_opened(conn0, ROUTE, T0);
    for n in 0..YIELD_AFTER_MESSAGES {
        let ticket = job_for(&mut p.cores[0], conn0, T0);
        p.cores[0].txn_done(conn0, &ticket.job, &all(&ticket.job, ok()), T0);
        let out = p.pump(T0);
        assert!(connects(&out[1]).is_empty(), "shard 1 still waits ({n})");
    }
    assert_eq!(p.cores[0].next_job(conn0, T0), NextJob::Close);
    p.closed(0, conn0, T0);
    let out = p.pump(T0);
    // The permit goes to shard 1; shard 0, with work left, waits its turn.
    let (conn1, _, _) = the_connect(&out[1]);
    assert!(connects(&out[0]).is_empty());
    assert_eq!(p.permits_out(), 1);

    // Shard 1 is asked to yield in turn: after its one job, idle, it closes at once.
    p.cores[1].conn_opened(conn1, ROUTE, T0);
    let ticket = job_for(&mut p.cores[1], conn1, T0);
    p.cores[1].txn_done(conn1, &ticket.job, &all(&ticket.job, ok()), T0);
    p.pump(T0);
    assert_eq!(p.cores[1].next_job(conn1, T0), NextJob::Close);
    p.closed(1, conn1, T0);
    let out = p.pump(T0);
    let (conn0, _, _) = the_connect(&out[0]);
    assert!(connects(&out[1]).is_empty());

    // Shard 0 carries the rest, and keeps its connection while nobody waits.
    p.cores[0].conn_opened(conn0, ROUTE, T0);
    for _ in 0..extra {
        let ticket = job_for(&mut p.cores[0], conn0, T0);
        p.cores[0].txn_done(conn0, &ticket.job, &all(&ticket.job, ok()), T0);
    }
    assert!(matches!(
        p.cores[0].next_job(conn0, T0),
        NextJob::Wait { .. }
    ));
    assert!(p.cores[0].queue().is_empty() && p.cores[1].queue().is_empty());
    p.closed(0, conn0, T0);
    p.pump(T0);
    assert_eq!(p.permits_out(), 0);
}

#[test]
fn an_idle_holder_gives_its_permit_up_at_once() {
    for holder in [0, 1] {
        let waiter = 1 - holder;
        let mut p = Pair::new("[delivery]\nconnections_per_destination_max = 1\n");
        accept_many(&mut p.cores[holder], 1, T0);
        let out = p.pump(T0);
        let (conn, _, _) = the_connect(&out[holder]);
        p.cores[holder].conn_opened(conn, ROUTE, T0);
        let ticket = job_for(&mut p.cores[holder], conn, T0);
        p.cores[holder].txn_done(conn, &ticket.job, &all(&ticket.job, ok()), T0);
        assert!(matches!(
            p.cores[holder].next_job(conn, T0),
            NextJob::Wait { .. }
        ));
        p.pump(T0);

        accept_many(&mut p.cores[waiter], 1, T0 + 10);
        let out = p.pump(T0 + 10);
        assert!(connects(&out[waiter]).is_empty());
        assert!(has(&out[holder], &Action::WakeIdle), "holder {holder}");
        assert_eq!(p.cores[holder].next_job(conn, T0 + 10), NextJob::Close);
        p.closed(holder, conn, T0 + 10);
        let out = p.pump(T0 + 10);
        let (conn, _, _) = the_connect(&out[waiter]);
        p.cores[waiter].conn_opened(conn, ROUTE, T0 + 10);
        job_for(&mut p.cores[waiter], conn, T0 + 10);
    }
}

#[test]
fn two_shards_sharing_two_sources_deliver_everything_within_each_sources_limit() {
    let mut p = Pair::new(&format!(
        "{TWO_SOURCES}\n[delivery]\nconnections_per_destination_max = 1\n\
         messages_per_connection_max = 5\nidle_timeout_ms = 1000\n"
    ));
    let per_shard = 30;
    accept_many(&mut p.cores[0], per_shard, T0);
    accept_many(&mut p.cores[1], per_shard, T0);
    let mut now = T0;
    let mut opened: BTreeSet<(usize, ConnId)> = BTreeSet::new();
    let mut delivered = 0;
    let mut sources_used = BTreeSet::new();
    for _ in 0..10_000 {
        let out = p.pump(now);
        for (shard, actions) in out.iter().enumerate() {
            delivered += outcomes(actions)
                .iter()
                .filter(|r| r.kind == OutcomeKind::Delivered)
                .count();
            for (conn, _, source) in connects(actions) {
                p.cores[shard].conn_opened(conn, ROUTE, now);
                opened.insert((shard, conn));
                sources_used.insert(source);
            }
        }
        if opened.is_empty() && p.cores.iter().all(|c| c.queue().is_empty()) {
            break;
        }
        // Every open connection takes one step; when none can, time moves on.
        let mut progress = false;
        let mut wake: Option<u64> = None;
        for (shard, conn) in opened.clone() {
            match p.cores[shard].next_job(conn, now) {
                NextJob::Job(ticket) => {
                    let results = all(&ticket.job, ok());
                    p.cores[shard].txn_done(conn, &ticket.job, &results, now);
                    progress = true;
                }
                NextJob::Close => {
                    p.closed(shard, conn, now);
                    opened.remove(&(shard, conn));
                    progress = true;
                }
                NextJob::Wait { until_ms } => {
                    wake = Some(wake.map_or(until_ms, |w| w.min(until_ms)));
                }
            }
        }
        if !progress {
            now = wake.expect("work left and nothing to wait for: stuck");
        }
    }
    assert_eq!(delivered, 2 * per_shard);
    assert!(opened.is_empty() && p.open.is_empty());
    assert_eq!(sources_used.len(), 2, "both sources carried mail");
    assert_eq!(p.permits_out(), 0, "every permit came back");
}

/// A yield is answered by whichever of the holder's connections closes first: the owner counts
/// any release against it. The holder's own count (`Permits`, `egress/lease.rs`) is only
/// lowered by a connection that closes *for* the yield (`take_yield`), so when another one
/// closes for another reason (here `messages_per_connection_max`), a stale yield stays behind
/// and a later idle connection closes at once, although nobody waits for its permit.
#[test]
fn a_yield_answered_by_another_close_is_not_answered_twice() {
    let mut p = Pair::new(
        "[delivery]\nconnections_per_destination_max = 2\nmessages_per_connection_max = 3\n",
    );
    accept_many(&mut p.cores[0], 5, T0);
    let out = p.pump(T0);
    let conns: Vec<ConnId> = connects(&out[0]).iter().map(|c| c.0).collect();
    assert_eq!(conns.len(), 2, "{:?}", out[0]);
    let (a, b) = (conns[0], conns[1]);
    accept_many(&mut p.cores[1], 1, T0);
    let out = p.pump(T0);
    assert!(
        has(&out[0], &Action::WakeIdle),
        "shard 0 is asked to yield one"
    );
    p.cores[0].conn_opened(a, ROUTE, T0);
    p.cores[0].conn_opened(b, ROUTE, T0);
    for _ in 0..3 {
        let ticket = job_for(&mut p.cores[0], a, T0);
        p.cores[0].txn_done(a, &ticket.job, &all(&ticket.job, ok()), T0);
    }
    assert_eq!(
        p.cores[0].next_job(a, T0),
        NextJob::Close,
        "carried its three"
    );
    p.closed(0, a, T0);
    let out = p.pump(T0);
    the_connect(&out[1]);
    // Each shard holds one permit of two now: its fair share. Nobody waits for b's.
    for _ in 0..2 {
        let ticket = job_for(&mut p.cores[0], b, T0);
        p.cores[0].txn_done(b, &ticket.job, &all(&ticket.job, ok()), T0);
    }
    p.pump(T0);
    assert!(
        matches!(p.cores[0].next_job(b, T0), NextJob::Wait { .. }),
        "b should idle until its timeout, not answer the yield a already answered"
    );
}

// 7. The queue limit.

#[test]
fn the_queue_limit_refuses_reservations_and_cancel_gives_room_back() {
    let (mut core, _) = one_core("[queue]\nmessages_max = 2\n");
    let a = core.reserve().expect("room for one");
    let b = core.reserve().expect("room for two");
    assert_eq!(core.reserve(), Err(QueueFull(2)));
    core.cancel(a);
    let c = core.reserve().expect("room again");
    assert_ne!(c, a, "an id is not given twice");
    assert_eq!(core.reserve(), Err(QueueFull(2)));
    // A message that goes final gives its room back too.
    core.accepted(
        b,
        &envelope("s@x.test", &["a@d.test"], T0),
        loc_of(b),
        None,
        T0,
    );
    let actions = core.take_actions();
    let (conn, ticket) = open_and_take(&mut core, &actions, T0);
    core.txn_done(conn, &ticket.job, &all(&ticket.job, ok()), T0);
    assert_eq!(finals(&core.take_actions()), vec![b]);
    assert!(core.reserve().is_ok());
}

// 8. Recovery.

#[test]
fn recovered_messages_are_queued_by_state() {
    let (mut core, _) = one_core("");
    let now = T0;
    let id = (5 << crate::queue::SLOT_BITS) | 3;
    let msg = RecoveredMessage {
        id,
        loc: loc_of(id),
        envelope: envelope(
            "s@x.test",
            &["a@d.test", "b@d.test", "c@d.test", "d@d.test"],
            now - 100_000,
        ),
        states: vec![
            RcptState::Final(OutcomeKind::Delivered),
            RcptState::Pending {
                attempts: 2,
                next_attempt_ms: now + 30_000,
                delay_notified: false,
            },
            RcptState::Pending {
                attempts: 0,
                next_attempt_ms: 0,
                delay_notified: false,
            },
            RcptState::Pending {
                attempts: 1,
                next_attempt_ms: now - 5,
                delay_notified: false,
            },
        ],
    };
    core.restore(&msg, now).expect("restored");
    let actions = core.take_actions();
    let (conn, _, _) = the_connect(&actions);
    assert!(has(&actions, &Action::Rearm));
    assert_eq!(core.next_wakeup(), Some(now + 30_000));

    // A message due later only: scheduled, and the timer re-armed for it.
    let later = (5 << crate::queue::SLOT_BITS) | 4;
    let msg2 = RecoveredMessage {
        id: later,
        loc: loc_of(later),
        envelope: envelope("s@x.test", &["e@d.test"], now - 1000),
        states: vec![RcptState::Pending {
            attempts: 1,
            next_attempt_ms: now + 10_000,
            delay_notified: false,
        }],
    };
    core.restore(&msg2, now).expect("restored");
    assert_eq!(core.take_actions(), vec![Action::Rearm]);
    assert_eq!(core.next_wakeup(), Some(now + 10_000));
    assert_eq!(
        core.restore(&msg2, now),
        Err(crate::queue::RestoreError::Duplicate(later))
    );
    core.restored(later);
    let fresh = core.reserve().expect("room");
    assert!(
        fresh >> crate::queue::SLOT_BITS > 5,
        "new ids are above every recovered one"
    );
    core.cancel(fresh);

    // Compaction restates what the queue knows.
    assert_eq!(
        core.live(id),
        Some(LiveMessage {
            loc: loc_of(id),
            rcpts: vec![
                RcptSnapshot::Final(OutcomeKind::Delivered),
                RcptSnapshot::Deferred {
                    attempts: 2,
                    next_attempt_ms: now + 30_000,
                    delay_notified: false,
                },
                RcptSnapshot::Fresh,
                RcptSnapshot::Deferred {
                    attempts: 1,
                    next_attempt_ms: now - 5,
                    delay_notified: false,
                },
            ]
        })
    );
    // ... and when it moves the record, tickets follow.
    let moved = Location {
        seq: 9,
        offset: 128,
        len: 2048,
    };
    core.relocated(&[(id, moved)]);
    assert_eq!(core.live(id).map(|l| l.loc), Some(moved));

    core.conn_opened(conn, ROUTE, now);
    let ticket = job_for(&mut core, conn, now);
    assert_eq!(ticket.job.id, id);
    assert_eq!(ticket.job.rcpts.as_slice(), &[2, 3], "the due ones");
    assert_eq!(ticket.rcpts, vec!["c@d.test", "d@d.test"]);
    assert_eq!(ticket.loc, moved);
    core.txn_done(conn, &ticket.job, &all(&ticket.job, ok()), now);
    let actions = core.take_actions();
    assert_eq!(
        outcomes(&actions)
            .iter()
            .map(|r| (r.rcpt, r.attempts, r.kind))
            .collect::<Vec<_>>(),
        vec![
            (2, 1, OutcomeKind::Delivered),
            (3, 2, OutcomeKind::Delivered)
        ]
    );
    assert!(
        actions.iter().all(|a| match a {
            Action::Outcome { seq, .. } => *seq == 9,
            _ => true,
        }),
        "records go with the message's current segment"
    );
    assert_eq!(finals(&actions), Vec::<u64>::new(), "b is still pending");

    core.tick(now + 10_000);
    core.take_actions();
    assert_eq!(job_for(&mut core, conn, now + 10_000).job.id, later);
    core.tick(now + 30_000);
    let ticket = job_for(&mut core, conn, now + 30_000);
    assert_eq!((ticket.job.id, ticket.job.rcpts.as_slice()), (id, &[1][..]));
    core.txn_done(conn, &ticket.job, &all(&ticket.job, ok()), now + 30_000);
    assert!(has(&core.take_actions(), &Action::Final { id, loc: moved }));
}

// 9. MX routing.

fn mx(hosts: &[(u16, &str)]) -> Answer {
    Answer::Mx(
        hosts.iter().map(|(p, h)| (*p, (*h).to_owned())).collect(),
        300,
    )
}

#[test]
fn an_unrouted_domain_is_resolved_once_and_its_mail_goes_to_its_mx_site() {
    let (mut core, _) = one_core("");
    let a = accept(&mut core, &envelope("s@x.test", &["a@example.com"], T0), T0);
    let b = accept(&mut core, &envelope("s@x.test", &["b@Example.COM"], T0), T0);
    assert_eq!(
        core.take_actions(),
        vec![Action::Resolve {
            domain: "example.com".into()
        }],
        "one lookup for both"
    );
    let answer = mx(&[(20, "mx2.example.net"), (10, "mx1.example.net")]);
    core.resolved("example.com", &answer, None, T0 + 5);
    let actions = core.take_actions();
    let found = connects(&actions);
    assert!(!found.is_empty());
    for (_, dest, _) in &found {
        match &dest.hop {
            Hop::Mx(site) => assert_eq!(&*site.key, "mx1.example.net,mx2.example.net"),
            other => panic!("an MX site expected, got {other:?}"),
        }
    }
    let (conn, _, _) = found[0].clone();
    core.conn_opened(conn, "mx1.example.net[192.0.2.10]:25", T0 + 5);
    let ticket = job_for(&mut core, conn, T0 + 5);
    assert_eq!(ticket.job.id, a);
    assert_eq!(ticket.rcpts, vec!["a@example.com"]);
    core.txn_done(conn, &ticket.job, &all(&ticket.job, ok()), T0 + 6);
    let ticket = job_for(&mut core, conn, T0 + 6);
    assert_eq!(ticket.job.id, b);
    core.txn_done(conn, &ticket.job, &all(&ticket.job, ok()), T0 + 6);
    assert!(matches!(core.next_job(conn, T0 + 6), NextJob::Wait { .. }));
    core.take_actions();

    // While the answer is fresh no lookup is needed; after its TTL, one is.
    accept(
        &mut core,
        &envelope("s@x.test", &["c@example.com"], T0),
        T0 + 10,
    );
    let actions = core.take_actions();
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Resolve { .. })),
        "{actions:?}"
    );
    assert!(has(&actions, &Action::WakeIdle));
    accept(
        &mut core,
        &envelope("s@x.test", &["d@example.com"], T0),
        T0 + 301_000,
    );
    assert!(has(
        &core.take_actions(),
        &Action::Resolve {
            domain: "example.com".into()
        }
    ));
}

#[test]
fn nxdomain_and_null_mx_bounce_and_a_dns_failure_defers() {
    let (mut core, rec) = one_core("[queue]\nretry_base_ms = 1000\n");
    let nx = accept(&mut core, &envelope("s@x.test", &["a@nx.example"], T0), T0);
    assert_eq!(
        core.take_actions(),
        vec![Action::Resolve {
            domain: "nx.example".into()
        }]
    );
    core.resolved("nx.example", &Answer::NxDomain(300), None, T0);
    let actions = core.take_actions();
    let request = notices(&actions).remove(0);
    assert_eq!(request.id, nx);
    assert_eq!(
        (
            request.rcpts[0].kind,
            request.rcpts[0].response.code,
            request.rcpts[0].response.enhanced.as_str()
        ),
        (OutcomeKind::Bounced, 550, "5.1.2")
    );
    assert_eq!(connects(&actions), vec![]);

    let null = accept(
        &mut core,
        &envelope("s@x.test", &["a@null.example"], T0),
        T0,
    );
    core.take_actions();
    core.resolved("null.example", &mx(&[(0, ".")]), None, T0);
    let request = notices(&core.take_actions()).remove(0);
    assert_eq!((request.id, request.rcpts[0].response.code), (null, 556));

    let flaky = accept(
        &mut core,
        &envelope("s@x.test", &["a@flaky.example"], T0),
        T0,
    );
    core.take_actions();
    core.resolved(
        "flaky.example",
        &Answer::Transient("SERVFAIL".into()),
        None,
        T0,
    );
    let actions = core.take_actions();
    assert_eq!(
        outcomes(&actions)
            .iter()
            .map(|r| (r.message, r.kind, r.next_attempt_ms))
            .collect::<Vec<_>>(),
        vec![(flaky, OutcomeKind::Deferred, T0 + 1000)]
    );
    assert!(has(&actions, &Action::Rearm));
    assert_eq!(
        attempts_seen(&rec)
            .iter()
            .map(|a| (a.0, a.3))
            .collect::<Vec<_>>(),
        vec![(nx, 550), (null, 556), (flaky, 451)]
    );
    // A failed lookup is not remembered: the retry asks again.
    core.tick(T0 + 1000);
    assert_eq!(
        core.take_actions(),
        vec![Action::Resolve {
            domain: "flaky.example".into()
        }]
    );
}

#[test]
fn without_a_resolver_unrouted_mail_is_deferred() {
    let (mut core, rec) = core_of(&settings("[queue]\nretry_base_ms = 1000\n"), 0, 1, false);
    let id = accept(&mut core, &envelope("s@x.test", &["a@example.com"], T0), T0);
    let actions = core.take_actions();
    assert!(!actions.iter().any(|a| matches!(a, Action::Resolve { .. })));
    assert_eq!(
        outcomes(&actions)
            .iter()
            .map(|r| (r.message, r.kind))
            .collect::<Vec<_>>(),
        vec![(id, OutcomeKind::Deferred)]
    );
    assert_eq!(attempts_seen(&rec)[0].3, 451);
}
mod ops;
mod reload;
