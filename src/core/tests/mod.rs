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
        priority: Default::default(),
        campaign: None,
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
mod connections;
mod lanes;
mod leases;
mod ops;
mod reload;
