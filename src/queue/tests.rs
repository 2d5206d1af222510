use super::*;
use crate::envelope::{Notify, ReceptionId, Recipient, Ret};
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
    assert_eq!(std::mem::size_of::<Rcpt>(), 8);
    assert_eq!(std::mem::size_of::<Due>(), 16);
}
