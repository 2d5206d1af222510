//! Priority classes, tenants and campaigns as the core sees them: which job a busy
//! destination's connection takes next, the campaign selector, and recovery of both.

use super::*;
use crate::admin::{Op, Selector};
use crate::envelope::Priority;

fn tagged(priority: Priority, tenant: Option<&str>, campaign: Option<&str>) -> Envelope {
    let mut env = envelope("s@x.test", &["a@d.test"], T0);
    env.priority = priority;
    env.tenant = tenant.map(str::to_owned);
    env.campaign = campaign.map(str::to_owned);
    env
}

#[test]
fn a_transactional_message_overtakes_a_bulk_backlog_on_a_busy_destination() {
    let (mut core, _) = one_core("[delivery]\nconnections_per_destination_max = 1\n");
    let bulk: Vec<u64> = (0..50)
        .map(|_| accept(&mut core, &tagged(Priority::Bulk, None, None), T0))
        .collect();
    let actions = core.take_actions();
    let (conn, first) = open_and_take(&mut core, &actions, T0);
    assert_eq!(first.job.id, bulk[0]);
    let urgent = accept(
        &mut core,
        &tagged(Priority::Transactional, None, None),
        T0 + 1,
    );
    assert!(
        connects(&core.take_actions()).is_empty(),
        "one connection at most"
    );
    core.txn_done(conn, &first.job, &all(&first.job, ok()), T0 + 2);
    let next = job_for(&mut core, conn, T0 + 2);
    assert_eq!(next.job.id, urgent, "the transactional job goes next");
    core.txn_done(conn, &next.job, &all(&next.job, ok()), T0 + 3);
    let after = job_for(&mut core, conn, T0 + 3);
    assert_eq!(after.job.id, bulk[1], "then the backlog again, in order");
}

#[test]
fn one_tenants_backlog_does_not_hold_up_another_tenants_mail() {
    let (mut core, _) = one_core("[delivery]\nconnections_per_destination_max = 1\n");
    for _ in 0..100 {
        accept(&mut core, &tagged(Priority::Normal, Some("A"), None), T0);
    }
    let actions = core.take_actions();
    let (conn, mut ticket) = open_and_take(&mut core, &actions, T0);
    let b: Vec<u64> = (0..5)
        .map(|_| {
            accept(
                &mut core,
                &tagged(Priority::Normal, Some("B"), None),
                T0 + 1,
            )
        })
        .collect();
    let (mut b_done, mut jobs) = (0, 0);
    while b_done < b.len() {
        assert!(jobs < 10, "B's five within ten jobs, {b_done} so far");
        core.txn_done(conn, &ticket.job, &all(&ticket.job, ok()), T0 + 2);
        ticket = job_for(&mut core, conn, T0 + 2);
        b_done += usize::from(b.contains(&ticket.job.id));
        jobs += 1;
    }
    assert_eq!(b_done, b.len());
}

#[test]
fn a_campaign_suspension_holds_that_campaign_only_and_the_summary_lists_it() {
    let (mut core, _) = one_core("");
    let answer = core.admin(
        &Op::Suspend {
            selector: Selector::Campaign("spring".into()),
            duration_s: Some(3600),
            reason: None,
        },
        T0,
    );
    assert!(answer.get("error").is_none(), "{answer}");
    let held = accept(&mut core, &tagged(Priority::Bulk, None, Some("spring")), T0);
    let other = accept(&mut core, &tagged(Priority::Bulk, None, Some("fall")), T0);
    let actions = core.take_actions();
    let (_, ticket) = open_and_take(&mut core, &actions, T0);
    assert_eq!(ticket.job.id, other, "only the other campaign goes");
    assert_eq!(
        core.queue().get(held).and_then(|m| m.due_ms(0)),
        Some(T0 + 3_600_000),
        "held until the suspension ends"
    );
    let inspect = core.admin(
        &Op::Inspect {
            selector: Selector::Campaign("spring".into()),
            limit: None,
        },
        T0,
    );
    let listed = inspect["messages"].as_array().expect("messages");
    assert_eq!(listed.len(), 1, "{inspect}");
    assert_eq!(listed[0]["campaign"], "spring");
    assert_eq!(listed[0]["priority"], "bulk");
    let summary = core.admin(&Op::Summary, T0);
    let rows = summary["campaigns"].as_array().expect("campaign rows");
    let spring = rows.iter().find(|r| r["campaign"] == "spring");
    assert_eq!(
        spring.map(|r| r["scheduled"].clone()),
        Some(1.into()),
        "{summary}"
    );
    // Ready mail of the campaign is held too when the suspension comes after it.
    let (mut core, _) = one_core("[delivery]\nconnections_per_destination_max = 1\n");
    let first = accept(&mut core, &tagged(Priority::Normal, None, None), T0);
    let late = accept(&mut core, &tagged(Priority::Normal, None, Some("fall")), T0);
    let answer = core.admin(
        &Op::Suspend {
            selector: Selector::Campaign("fall".into()),
            duration_s: None,
            reason: None,
        },
        T0 + 1,
    );
    assert_eq!(answer["held"], 1, "{answer}");
    assert!(core
        .queue()
        .get(late)
        .is_some_and(|m| m.due_ms(0).is_some()));
    let actions = core.take_actions();
    let (_, ticket) = open_and_take(&mut core, &actions, T0 + 1);
    assert_eq!(ticket.job.id, first);
}

#[test]
fn recovery_reads_the_class_from_the_record_and_the_campaign_from_the_body() {
    use crate::spool::record::{aligned_copy, decode, encode_message, MessageView};
    use crate::spool::Replay;
    let (mut core, _) = one_core("[egress]\ncampaign_header = \"X-Mailing\"\n");
    let id = (3 << crate::queue::SLOT_BITS) | 2;
    let mut env = tagged(Priority::Transactional, Some("acme"), Some("not spooled"));
    env.reception.ms = T0;
    let body: &[u8] =
        b"Received: by us\r\nX-Mailing:  spring\r\n 2026\r\nX-Priority-Class: bulk\r\n\
                        \r\nX-Mailing: in the body\r\n";
    let mut buf = Vec::new();
    encode_message(&mut buf, id, &env, &[body]).expect("encode");
    let buf = aligned_copy(&buf);
    let (header, payload) = decode(&buf).expect("frame");
    let view = MessageView::new(header.version, payload).expect("view");
    assert_eq!(core.message(id, loc_of(id), &view), Ok(None));
    core.replayed(id, T0);
    let q = core.queue();
    let m = q.get(id).expect("recovered");
    // The class as spooled (the header is not read again), the campaign as the header says.
    assert_eq!(m.priority(), Priority::Transactional);
    assert_eq!(q.campaign(m), Some("spring 2026"));
    assert_eq!(q.tenant(m), Some("acme"));
    let found = core.admin(
        &Op::Inspect {
            selector: Selector::Campaign("spring 2026".into()),
            limit: None,
        },
        T0,
    );
    assert_eq!(
        found["messages"].as_array().map(Vec::len),
        Some(1),
        "{found}"
    );
}
