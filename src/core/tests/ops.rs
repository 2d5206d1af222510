//! Operations (see `ops.rs`): suspend, resume, bounce, flush, mass steps.
use super::*;
use crate::admin::{Op, Selector};

fn dom(d: &str) -> Selector {
    Selector::Domain(d.into())
}

#[test]
fn a_suspended_domain_is_held_untried_and_expires_on_time() {
    let (mut core, rec) = one_core("[queue]\nretry_base_ms = 1000\nmax_age_s = 60\n");
    let answer = core.admin(
        &Op::Suspend {
            selector: dom("d.test"),
            duration_s: None,
            reason: Some("maintenance".into()),
        },
        T0,
    );
    assert_eq!(answer["held"], 0, "{answer}");
    let id = accept(&mut core, &envelope("s@x.test", &["a@d.test"], T0), T0);
    let other = accept(&mut core, &envelope("s@x.test", &["b@e.test"], T0), T0);
    let actions = core.take_actions();
    // Only the other domain's message asks for a connection.
    let (conn, ticket) = open_and_take(&mut core, &actions, T0);
    assert_eq!(ticket.job.id, other);
    core.txn_done(conn, &ticket.job, &all(&ticket.job, ok()), T0 + 10);
    assert!(core.queue().get(id).is_some());
    assert_eq!(
        core.next_wakeup(),
        Some(T0 + 60_000),
        "held until its deadline"
    );
    // The summary shows the suspension.
    let summary = core.admin(&Op::Summary, T0 + 20);
    assert_eq!(summary["suspensions"][0]["kind"], "suspend", "{summary}");
    assert_eq!(summary["suspensions"][0]["selector"], "domain d.test");
    // At its deadline it expires without having been tried.
    core.take_actions();
    core.tick(T0 + 60_000);
    let seen = attempts_seen(&rec);
    assert!(
        seen.iter()
            .any(|(i, _, o, _)| *i == id && *o == AttemptOutcome::Expired),
        "{seen:?}"
    );
    assert_eq!(
        seen.iter().filter(|(i, _, _, _)| *i == id).count(),
        1,
        "one event for it: the expiry"
    );
}

#[test]
fn resume_releases_held_messages_now() {
    let (mut core, _) = one_core("[queue]\nretry_base_ms = 1000\n");
    core.admin(
        &Op::Suspend {
            selector: dom("d.test"),
            duration_s: Some(3600),
            reason: None,
        },
        T0,
    );
    let id = accept(&mut core, &envelope("s@x.test", &["a@d.test"], T0), T0);
    assert!(connects(&core.take_actions()).is_empty());
    let answer = core.admin(
        &Op::Resume {
            selector: dom("d.test"),
        },
        T0 + 5,
    );
    assert_eq!(answer["lifted"], 1, "{answer}");
    assert_eq!(answer["released"], 1, "{answer}");
    core.take_actions();
    core.tick(T0 + 5);
    let actions = core.take_actions();
    let (conn, ticket) = open_and_take(&mut core, &actions, T0 + 5);
    assert_eq!(ticket.job.id, id);
    core.txn_done(conn, &ticket.job, &all(&ticket.job, ok()), T0 + 6);
    assert!(core.queue().get(id).is_none(), "delivered");
}

#[test]
fn bounce_takes_queued_and_new_messages_without_notices_unless_asked() {
    let (mut core, rec) = one_core("[queue]\nretry_base_ms = 1000\n");
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(accept(
            &mut core,
            &envelope("s@x.test", &["a@d.test"], T0),
            T0,
        ));
    }
    core.take_actions();
    let answer = core.admin(
        &Op::Bounce {
            selector: dom("d.test"),
            duration_s: Some(60),
            reason: Some("list cleanup".into()),
            notify: false,
        },
        T0 + 1,
    );
    assert_eq!(answer["bounced"], 3, "{answer}");
    let actions = core.take_actions();
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Notice(_))),
        "no notices: {actions:?}"
    );
    assert_eq!(
        actions
            .iter()
            .filter(|a| matches!(a, Action::Final { .. }))
            .count(),
        3
    );
    // A new message for the domain meets the directive.
    let late = accept(
        &mut core,
        &envelope("s@x.test", &["b@d.test"], T0 + 2),
        T0 + 2,
    );
    assert!(core.queue().get(late).is_none(), "bounced on arrival");
    let bounced = attempts_seen(&rec)
        .into_iter()
        .filter(|(_, _, o, code)| *o == AttemptOutcome::Bounced && *code == 550)
        .count();
    assert_eq!(bounced, 4);
    // With notify, the sender hears about it.
    core.admin(
        &Op::Bounce {
            selector: dom("n.test"),
            duration_s: None,
            reason: None,
            notify: true,
        },
        T0 + 3,
    );
    accept(
        &mut core,
        &envelope("s@x.test", &["c@n.test"], T0 + 3),
        T0 + 3,
    );
    assert!(core
        .take_actions()
        .iter()
        .any(|a| matches!(a, Action::Notice(_))));
}

#[test]
fn a_mass_bounce_walks_the_queue_a_bounded_step_at_a_time() {
    let (mut core, _) = one_core("[queue]\nretry_base_ms = 1000\n");
    let n = crate::core::ops::MASS_STEP_SLOTS * 2 + 10;
    for _ in 0..n {
        accept(&mut core, &envelope("s@x.test", &["a@d.test"], T0), T0);
    }
    core.take_actions();
    let op = Op::Bounce {
        selector: dom("d.test"),
        duration_s: None,
        reason: None,
        notify: false,
    };
    let mut cursor = 0;
    let mut steps = 0;
    let mut bounced = 0;
    loop {
        let step = core.admin_step(&op, cursor, T0 + 1);
        bounced += step.answer["bounced"].as_u64().unwrap_or(0);
        let actions = core.take_actions();
        // Two actions per message (outcome, release), a step's worth at most.
        assert!(actions.len() <= 2 * crate::core::ops::MASS_STEP_SLOTS + 4);
        steps += 1;
        match step.next {
            Some(next) => cursor = next,
            None => break,
        }
    }
    assert_eq!(bounced as usize, n);
    assert_eq!(steps, 3);
    assert_eq!(core.queue().len(), 0);
}

#[test]
fn flush_retries_scheduled_recipients_now_once() {
    let (mut core, _) = one_core("[queue]\nretry_base_ms = 60000\n");
    let id = accept(&mut core, &envelope("s@x.test", &["a@d.test"], T0), T0);
    let actions = core.take_actions();
    let (conn, ticket) = open_and_take(&mut core, &actions, T0);
    core.txn_done(conn, &ticket.job, &all(&ticket.job, tempfail()), T0 + 1);
    core.take_actions();
    assert_eq!(core.next_wakeup(), Some(T0 + 60_001));
    let answer = core.admin(&Op::Flush { selector: None }, T0 + 2);
    assert_eq!(answer["flushed"], 1, "{answer}");
    // Flushing twice schedules it twice: the stale entries are skipped, one job results.
    core.admin(&Op::Flush { selector: None }, T0 + 2);
    core.tick(T0 + 2);
    core.take_actions();
    let job = job_for(&mut core, conn, T0 + 2);
    assert_eq!(job.job.id, id);
    assert!(core.early_job(conn, 0).is_none(), "one job, not three");
    // The old retry time passes: nothing more comes due for it.
    core.txn_done(conn, &job.job, &all(&job.job, ok()), T0 + 3);
    core.tick(T0 + 60_001);
    assert!(core.queue().get(id).is_none());
}

#[test]
fn jobs_waiting_for_a_saturated_destination_expire_on_time() {
    let (mut core, rec) = one_core(
        "[queue]\nretry_base_ms = 1000\nmax_age_s = 10\n\
         [delivery]\nconnections_per_destination_max = 1\n",
    );
    let ids: Vec<u64> = (0..3)
        .map(|_| accept(&mut core, &envelope("s@x.test", &["a@d.test"], T0), T0))
        .collect();
    let actions = core.take_actions();
    // The one connection takes the first job and never finishes it (a stalled peer).
    let (_conn, first) = open_and_take(&mut core, &actions, T0);
    assert_eq!(first.job.id, ids[0]);
    let check = core
        .next_wakeup()
        .expect("the ready queue's check is armed");
    assert!(check <= T0 + 10_000 + crate::core::READY_CHECK_GAP_MS);
    core.tick(check);
    let expired: Vec<u64> = attempts_seen(&rec)
        .into_iter()
        .filter(|(_, _, o, _)| *o == AttemptOutcome::Expired)
        .map(|(id, _, _, _)| id)
        .collect();
    assert_eq!(
        expired,
        vec![ids[1], ids[2]],
        "the two waiting ones, on time"
    );
}
