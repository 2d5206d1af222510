use super::*;
use crate::envelope::{Notify, Priority, ReceptionId, Recipient, Ret};
use crate::spool::record::OutcomeKind;

fn envelope(rcpts: &[&str]) -> Envelope {
    Envelope {
        reception: ReceptionId {
            ms: 1_000,
            shard: 1,
            n: 7,
        },
        sender: "s@x.test".into(),
        rcpts: rcpts.iter().map(|a| Recipient::new(*a)).collect(),
        ret: Ret::Unspecified,
        envid: None,
        tenant: Some("Acme".into()),
        smtputf8: false,
        body: Body::SevenBit,
        size: 100,
        peer: "127.0.0.1:1".into(),
        notices: crate::envelope::NoticeSwitches::ALL,
        priority: Default::default(),
        campaign: None,
    }
}

fn loc(seq: u64) -> Location {
    Location {
        seq,
        offset: 32,
        len: 512,
    }
}

fn route_dest() -> Dest {
    Dest {
        hop: Hop::Route(crate::route::Destination {
            addr: "127.0.0.1:25".parse().expect("addr"),
            host: "127.0.0.1".into(),
            tls: Default::default(),
        }),
        pool: 0,
    }
}

#[test]
fn ids_are_slots_and_generations_and_never_repeat() {
    let mut q = Queue::new(10);
    let a = q.reserve().expect("room");
    q.insert(a, &envelope(&["a@d.test"]), loc(1))
        .expect("inserted");
    assert_eq!(q.get(a).map(|m| m.sender()), Some("s@x.test"));
    assert_eq!(q.remove(a), Some(loc(1)));
    assert!(q.get(a).is_none());
    let b = q.reserve().expect("room");
    assert_eq!(a & SLOT_MASK, b & SLOT_MASK, "the slot is reused");
    assert_ne!(a, b, "with a new generation");
    q.cancel(b);
    let c = q.reserve().expect("room");
    assert_ne!(c, b);
    assert_eq!(
        q.insert(b, &envelope(&["a@d.test"]), loc(1)).map(|m| m.id),
        None
    );
}

#[test]
fn the_limit_counts_messages_being_spooled() {
    let mut q = Queue::new(2);
    let a = q.reserve().expect("room");
    let _b = q.reserve().expect("room");
    assert_eq!(q.reserve(), Err(QueueFull(2)));
    q.cancel(a);
    assert!(q.reserve().is_ok());
}

#[test]
fn messages_keep_addresses_tenant_and_state() {
    let mut q = Queue::new(10);
    let id = q.reserve().expect("room");
    let mut env = envelope(&["a@d1.test", "b@d2.test"]);
    env.rcpts[1].notify = Notify::On {
        success: true,
        failure: false,
        delay: false,
    };
    q.insert(id, &env, loc(3)).expect("inserted");
    let m = q.get(id).expect("queued");
    assert_eq!(
        (m.rcpt(0), m.rcpt(1), m.rcpt(2)),
        ("a@d1.test", "b@d2.test", "")
    );
    assert!(m.success_notices());
    assert_eq!(m.reception().to_string(), "3e8.1.7");
    assert_eq!(q.tenant(m), Some("Acme"));
    let m = q.get_mut(id).expect("queued");
    assert_eq!(m.attempted(0), 1);
    assert!(!m.finish(0, OutcomeKind::Delivered));
    assert!(m.is_done(0) && !m.is_done(1));
    assert!(m.finish(1, OutcomeKind::Bounced));
    assert!(m.finish(1, OutcomeKind::Bounced), "idempotent");
}

#[test]
fn the_schedule_releases_in_due_order_grouped_per_message() {
    let mut q = Queue::new(10);
    let a = q.reserve().expect("room");
    q.insert(a, &envelope(&["x@a.test", "y@a.test"]), loc(1));
    let b = q.reserve().expect("room");
    q.insert(b, &envelope(&["z@b.test"]), loc(1));
    q.schedule(a, 0, 30);
    q.schedule(b, 0, 10);
    q.schedule(a, 1, 30);
    assert_eq!(q.next_due_ms(), Some(10));
    assert!(q.take_due(9).is_empty());
    let due = q.take_due(30);
    assert_eq!(due.len(), 2);
    assert_eq!((due[0].id, due[0].rcpts.as_slice()), (b, &[0u16][..]));
    assert_eq!((due[1].id, due[1].rcpts.as_slice()), (a, &[0u16, 1][..]));
    assert_eq!(q.next_due_ms(), None);
    // Entries of a message that went meanwhile are dropped.
    q.schedule(b, 0, 40);
    q.remove(b);
    assert!(q.take_due(50).is_empty());
}

#[test]
fn ready_queues_are_per_destination_and_empty_ones_go() {
    let mut q = Queue::new(10);
    let d = route_dest();
    q.push_ready(
        &d,
        Job {
            id: 5,
            rcpts: smallvec::smallvec![0],
        },
    );
    assert_eq!((q.ready_len(), q.ready_for(&d)), (1, 1));
    assert_eq!(q.pop_ready(&d).map(|j| j.id), Some(5));
    assert_eq!(q.pop_ready(&d), None);
    assert_eq!(q.ready_dests().count(), 0);
}

#[test]
fn restored_messages_keep_their_ids_and_states_and_new_ids_go_above() {
    let mut q = Queue::new(10);
    let id = (5u64 << SLOT_BITS) | 3;
    let rec = RecoveredMessage {
        id,
        loc: loc(2),
        envelope: envelope(&["a@a.test", "b@b.test", "c@c.test"]),
        states: vec![
            RecoveredState::Final(OutcomeKind::Delivered),
            RecoveredState::Pending {
                attempts: 2,
                next_attempt_ms: 9_000,
                delay_notified: false,
            },
            RecoveredState::Pending {
                attempts: 0,
                next_attempt_ms: 0,
                delay_notified: false,
            },
        ],
    };
    let m = q.restore(&rec).expect("restored");
    assert_eq!((m.remaining(), m.attempts(1)), (2, 2));
    assert!(matches!(q.restore(&rec), Err(RestoreError::Duplicate(_))));
    q.restored(id);
    let live = q.live(id).expect("live");
    assert_eq!(
        live.rcpts,
        vec![
            RcptSnapshot::Final(OutcomeKind::Delivered),
            RcptSnapshot::Deferred {
                attempts: 2,
                next_attempt_ms: 9_000,
                delay_notified: false,
            },
            RcptSnapshot::Fresh
        ]
    );
    for _ in 0..4 {
        let new = q.reserve().expect("room");
        assert!(
            new >> SLOT_BITS > 5,
            "new ids are above every recovered generation"
        );
    }
    q.relocate(id, loc(9));
    assert_eq!(q.get(id).map(|m| m.loc().seq), Some(9));
}

#[test]
fn a_single_recipient_message_is_compact() {
    // Part of the memory budget (issue: ≤ 150 bytes per queued single-recipient message, all
    // in): the slot itself.
    assert!(
        std::mem::size_of::<Slot>() <= 96,
        "{}",
        std::mem::size_of::<Slot>()
    );
    // The priority class and campaign id took the message's last 4 bytes (72 to 80), and the
    // class's spare values carry the slot's tag: the slot stayed at 80.
    assert!(
        std::mem::size_of::<Slot>() <= 80,
        "{}",
        std::mem::size_of::<Slot>()
    );
    assert_eq!(std::mem::size_of::<Rcpt>(), 8);
    assert_eq!(std::mem::size_of::<Due>(), 16);
}

/// Queue `n` one-recipient messages of `priority` and `tenant`, each one ready job for `d`.
fn ready_jobs(
    q: &mut Queue,
    d: &Dest,
    priority: Priority,
    tenant: Option<&str>,
    n: usize,
) -> Vec<u64> {
    (0..n)
        .map(|_| {
            let id = q.reserve().expect("room");
            let mut env = envelope(&["a@d.test"]);
            env.priority = priority;
            env.tenant = tenant.map(str::to_owned);
            q.insert(id, &env, loc(1)).expect("inserted");
            q.push_ready(
                d,
                Job {
                    id,
                    rcpts: smallvec::smallvec![0],
                },
            );
            id
        })
        .collect()
}

fn class_of(q: &Queue, job: &Job) -> Priority {
    q.get(job.id).map(Message::priority).expect("queued")
}

#[test]
fn classes_take_turns_by_weight() {
    let mut q = Queue::new(10_000);
    let d = route_dest();
    for p in Priority::ALL {
        ready_jobs(&mut q, &d, p, None, 1000);
    }
    assert_eq!((q.ready_for(&d), q.ready_rcpts(&d)), (3000, 3000));
    let mut counts = [0usize; 3];
    for n in 1..=210 {
        let job = q.pop_ready(&d).expect("a job");
        counts[class_of(&q, &job).index()] += 1;
        // Smooth round robin: every run of 21 pops is 16:4:1, spread out, not in blocks.
        if n % 21 == 0 {
            assert_eq!(counts, [16 * n / 21, 4 * n / 21, n / 21], "after {n} pops");
        }
    }
    assert_eq!(counts, [160, 40, 10]);
    assert_eq!(q.ready_for(&d), 2790);
    // Other weights apply to the pops from then on; an empty class takes nothing.
    q.set_priority_weights([1, 1, 1]);
    let mut counts = [0usize; 3];
    for _ in 0..30 {
        let job = q.pop_ready(&d).expect("a job");
        counts[class_of(&q, &job).index()] += 1;
    }
    assert_eq!(counts, [10, 10, 10]);
}

#[test]
fn bulk_is_never_starved_by_endless_transactional_mail() {
    let mut q = Queue::new(10_000);
    let d = route_dest();
    let bulk = ready_jobs(&mut q, &d, Priority::Bulk, None, 10);
    ready_jobs(&mut q, &d, Priority::Transactional, None, 20);
    let (mut since_bulk, mut bulk_popped) = (0usize, Vec::new());
    for _ in 0..10 * 17 {
        let job = q.pop_ready(&d).expect("a job");
        since_bulk += 1;
        if class_of(&q, &job) == Priority::Bulk {
            bulk_popped.push(job.id);
            assert!(since_bulk <= 17, "bulk waited {since_bulk} pops (16:1)");
            since_bulk = 0;
        } else {
            // Transactional mail never runs out.
            ready_jobs(&mut q, &d, Priority::Transactional, None, 1);
        }
        q.remove(job.id);
    }
    assert_eq!(bulk_popped, bulk, "every bulk job, in order");
}

#[test]
fn tenants_take_turns_within_a_class() {
    let mut q = Queue::new(20_000);
    let d = route_dest();
    ready_jobs(&mut q, &d, Priority::Normal, Some("A"), 10_000);
    let b = ready_jobs(&mut q, &d, Priority::Normal, Some("B"), 10);
    let mut b_seen = Vec::new();
    for _ in 0..20 {
        let job = q.pop_ready(&d).expect("a job");
        if b.contains(&job.id) {
            b_seen.push(job.id);
        }
    }
    assert_eq!(b_seen, b, "B's ten within the first 20 pops, in order");
    // Mail without a tenant is a lane of its own; B's lane went when it emptied.
    let none = ready_jobs(&mut q, &d, Priority::Normal, None, 2);
    let popped: Vec<u64> = (0..4)
        .filter_map(|_| q.pop_ready(&d))
        .map(|j| j.id)
        .collect();
    assert_eq!(popped.iter().filter(|id| none.contains(id)).count(), 2);
    assert_eq!(q.ready_for(&d), 10_000 - 10 - 2);
}

#[test]
fn pop_ready_where_skips_refused_tenants_and_keeps_their_turn() {
    let mut q = Queue::new(100);
    let d = route_dest();
    let a = ready_jobs(&mut q, &d, Priority::Transactional, Some("A"), 3);
    let b = ready_jobs(&mut q, &d, Priority::Bulk, Some("B"), 2);
    let plain = ready_jobs(&mut q, &d, Priority::Bulk, None, 1);
    let id_a = q.tenant_key("A").expect("A is known");
    assert_eq!(q.tenant_name(id_a), Some("A"));
    assert_eq!(q.tenant_key("nobody"), None);
    let not_a = |t: Option<u16>| t != Some(id_a);
    // Transactional has only A's lane: the class is passed over, bulk serves.
    let mut asked = 0;
    let first = q
        .pop_ready_where(&d, |t| {
            asked += 1;
            not_a(t)
        })
        .expect("a bulk job");
    assert_eq!(first.id, b[0]);
    assert_eq!(asked, 2, "A's lane once, then B's");
    assert_eq!(q.pop_ready_where(&d, not_a).map(|j| j.id), Some(plain[0]));
    assert_eq!(q.pop_ready_where(&d, not_a).map(|j| j.id), Some(b[1]));
    // Only refused work left: none, and it stays queued.
    assert_eq!(q.pop_ready_where(&d, not_a), None);
    assert_eq!(q.ready_for(&d), 3);
    assert_eq!(q.pop_ready_where(&d, |_| false), None);
    // Allowed again, A's jobs come in their order.
    let rest: Vec<u64> = (0..3)
        .filter_map(|_| q.pop_ready(&d))
        .map(|j| j.id)
        .collect();
    assert_eq!(rest, a);
    assert_eq!(q.ready_dests().count(), 0, "the empty destination went");
}

#[test]
fn retained_jobs_keep_their_lanes_turns_and_credits_and_drains_are_stable() {
    let d = route_dest();
    let fill = || {
        let mut q = Queue::new(100);
        ready_jobs(&mut q, &d, Priority::Bulk, Some("A"), 3);
        let b = ready_jobs(&mut q, &d, Priority::Normal, Some("B"), 3);
        ready_jobs(&mut q, &d, Priority::Normal, Some("A"), 3);
        ready_jobs(&mut q, &d, Priority::Transactional, None, 3);
        // Some turns taken already, so lanes and credits are mid-rotation.
        q.pop_ready(&d);
        q.pop_ready(&d);
        (q, b)
    };
    let pops = |q: &mut Queue| -> Vec<u64> {
        std::iter::from_fn(|| q.pop_ready(&d))
            .map(|j| j.id)
            .collect()
    };
    // A pass that keeps every job changes nothing, mid-rotation as the lanes are.
    let (mut retained, b) = fill();
    let (mut untouched, _) = fill();
    let mut seen = 0;
    let gone = retained.retain_ready(&d, |job, queued| {
        seen += 1;
        let (m, names) = queued.expect("the message is queued");
        assert_eq!(m.id(), job.id);
        assert!(names.tenant.is_some() || m.priority() == Priority::Transactional);
        true
    });
    assert_eq!((seen, gone.len()), (10, 0));
    assert_eq!(pops(&mut retained), pops(&mut untouched));
    // A job taken out is gone from its lane, the rest stay.
    let (mut q, _) = fill();
    let gone = q.retain_ready(&d, |job, _| job.id != b[1]);
    assert_eq!(gone.iter().map(|j| j.id).collect::<Vec<_>>(), vec![b[1]]);
    assert_eq!((q.ready_for(&d), q.ready_rcpts(&d)), (9, 9));
    let left = pops(&mut q);
    assert_eq!(left.len(), 9);
    assert!(!left.contains(&b[1]));
    // Drains: every job, and the same order again after pushing them back.
    let (mut q, _) = fill();
    let first = q.drain_ready(&d);
    assert_eq!(
        (first.len(), q.ready_for(&d), q.ready_rcpts(&d)),
        (10, 0, 0)
    );
    for job in first.clone() {
        q.push_ready(&d, job);
    }
    assert_eq!(q.drain_ready(&d), first, "a stable order");
    assert!(q.retain_ready(&d, |_, _| false).is_empty(), "nothing waits");
}

#[test]
fn campaigns_are_kept_per_message_and_forgotten_with_the_last() {
    let mut q = Queue::new(10);
    let mut ids = Vec::new();
    for campaign in [Some("spring"), Some("spring"), None] {
        let id = q.reserve().expect("room");
        let mut env = envelope(&["a@d.test"]);
        env.campaign = campaign.map(str::to_owned);
        env.priority = Priority::Bulk;
        let m = q.insert(id, &env, loc(1)).expect("inserted");
        assert_eq!(m.priority(), Priority::Bulk);
        ids.push(id);
    }
    let campaign = |q: &Queue, id: u64| q.get(id).and_then(|m| q.campaign(m)).map(str::to_owned);
    assert_eq!(campaign(&q, ids[0]).as_deref(), Some("spring"));
    assert_eq!(campaign(&q, ids[2]), None);
    assert_eq!(q.campaigns_len(), 1);
    q.remove(ids[0]);
    assert_eq!(campaign(&q, ids[1]).as_deref(), Some("spring"));
    q.remove(ids[1]);
    assert_eq!(q.campaigns_len(), 0, "no message carries it any more");
}

#[test]
fn replay_restores_the_priority_from_the_record_and_the_campaign_given() {
    use crate::spool::record::{aligned_copy, decode, encode_message, MessageView};
    let mut env = envelope(&["a@d.test", "b@d.test"]);
    env.priority = Priority::Transactional;
    env.campaign = Some("ignored: not in the archive".into());
    let mut buf = Vec::new();
    let body: &[u8] = b"X-Campaign: spring\r\nSubject: s\r\n\r\nhi\r\n";
    encode_message(&mut buf, 1 << SLOT_BITS | 4, &env, &[body]).expect("encode");
    let buf = aligned_copy(&buf);
    let (header, payload) = decode(&buf).expect("frame");
    let view = MessageView::new(header.version, payload).expect("view");
    let mut q = Queue::new(10);
    let id = 1 << SLOT_BITS | 4;
    let moved = q
        .replay_message(id, loc(1), &view, Some("spring"))
        .expect("replayed");
    assert_eq!(moved, None);
    let m = q.get(id).expect("queued");
    assert_eq!(m.priority(), Priority::Transactional);
    assert_eq!(q.campaign(m), Some("spring"));
    assert_eq!(q.tenant(m), Some("Acme"));
    // A copy compaction made moves the message and keeps what it had.
    assert_eq!(
        q.replay_message(id, loc(2), &view, Some("spring")),
        Ok(Some(1))
    );
    assert_eq!(q.campaigns_len(), 1);
    // A newer message of the same slot supersedes it: the old one's campaign goes.
    let newer = 2 << SLOT_BITS | 4;
    q.replay_message(newer, loc(3), &view, None)
        .expect("replayed");
    assert_eq!(q.campaigns_len(), 0);
    assert_eq!(
        q.get(newer).map(Message::priority),
        Some(Priority::Transactional)
    );
}
