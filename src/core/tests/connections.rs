//! Connection lifecycle.

use super::*;

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
    let second = core.early_job(conn, 0).expect("the second job pipelines");
    assert_ne!(second.job.id, first.job.id);
    assert_eq!(core.early_job(conn, 0), None, "two is the most");
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
    assert_eq!(core.early_job(conn, 0), None);
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

pub(super) const TWO_SOURCES: &str = r#"
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
