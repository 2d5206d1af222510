//! The spool adapter over real files: append, read back, recover, collect, compact.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;

use super::record::{tests::envelope, OutcomeKind};
use super::*;
use crate::clock::ManualClock;

fn run<F: std::future::Future<Output = ()> + 'static>(f: F) {
    let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(256 << 10)
        .ring_depth(64)
        .make()
        .expect("executor");
    ex.run(f);
}

fn cfg(dir: &Path, segment_size_max: u64) -> SpoolConfig {
    SpoolConfig {
        dir: dir.to_owned(),
        shard: 0,
        segment_size_max,
        commit_window_us: 0,
        commit_batch_max: 1 << 20,
        compact_live_ratio: 0.5,
        compaction_bytes_per_s: 1 << 30,
    }
}

/// Ids as the queue makes them (24 slot bits): generation 1, slot `i`.
fn id(i: usize) -> u64 {
    (1 << 24) | i as u64
}

fn outcome(id: u64, rcpt: u32, kind: OutcomeKind) -> OutcomeRecord {
    OutcomeRecord {
        message: id,
        rcpt,
        kind,
        attempts: 1,
        at_ms: 5,
        next_attempt_ms: 77,
    }
}

struct Tasks {
    committer: glommio::Task<()>,
    collector: glommio::Task<()>,
}

fn start(spool: &Rc<Spool>) -> Tasks {
    Tasks {
        committer: glommio::spawn_local(spool.clone().run_committer()),
        collector: glommio::spawn_local(spool.clone().run_collector()),
    }
}

async fn stop(spool: Rc<Spool>, tasks: Tasks) {
    spool.close();
    tasks.committer.await;
    tasks.collector.await;
}

#[test]
fn append_read_recover_and_collect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_owned();
    run(async move {
        // Session 1: 40 messages over several 1 MiB segments, concurrent appenders so batches
        // hold several messages.
        let (spool, rec) = Spool::open_collecting(cfg(&path, 1 << 20))
            .await
            .expect("open");
        assert!(rec.pending.is_empty());
        let tasks = start(&spool);
        let mut appends = Vec::new();
        for i in 0..40 {
            let spool = spool.clone();
            appends.push(glommio::spawn_local(async move {
                let env = envelope(i as u64, 2);
                let body = vec![b'a' + (i % 26) as u8; 60_000];
                let loc = spool
                    .append_message(id(i), &env, &[&body])
                    .await
                    .expect("append");
                (id(i), loc)
            }));
        }
        let mut locs = Vec::new();
        for t in appends {
            locs.push(t.await);
        }
        assert!(spool.stats().commits < 40, "group commit batches appends");
        assert!(spool.segment_count() > 1, "rotated");
        let stored = spool.read_message(locs[7].1).await.expect("read");
        let view = stored.view().expect("valid");
        assert_eq!(view.id(), id(7));
        assert_eq!(view.body().len(), 60_000);
        // First 30 messages: both recipients final. Message 30: one deferred.
        for (mid, loc) in &locs[..30] {
            spool
                .append_outcome(loc.seq, &outcome(*mid, 0, OutcomeKind::Delivered))
                .expect("o");
            spool
                .append_outcome(loc.seq, &outcome(*mid, 1, OutcomeKind::Bounced))
                .expect("o");
            spool.message_final(*mid, *loc);
        }
        let (id30, loc30) = locs[30];
        spool
            .append_outcome(loc30.seq, &outcome(id30, 0, OutcomeKind::Delivered))
            .expect("o");
        spool
            .append_outcome(loc30.seq, &outcome(id30, 1, OutcomeKind::Deferred))
            .expect("o");
        stop(spool, tasks).await;

        // Session 2: recovery sees 10 pending messages, message 30 with one pending rcpt, and
        // every envelope whole, from the records alone.
        let (spool, rec) = Spool::open_collecting(cfg(&path, 1 << 20))
            .await
            .expect("reopen");
        assert_eq!(rec.pending.len(), 10, "{:?}", rec.report);
        let m30 = rec
            .pending
            .iter()
            .find(|m| m.id == id30)
            .expect("message 30 pending");
        assert_eq!(m30.states[0], RcptState::Final(OutcomeKind::Delivered));
        assert_eq!(
            m30.states[1],
            RcptState::Pending {
                attempts: 1,
                next_attempt_ms: 77,
                delay_notified: false,
            }
        );
        assert_eq!(m30.envelope, envelope(30, 2));
        assert_eq!(rec.id_max, locs.iter().map(|l| l.0).max().expect("ids"));
        let before = spool.segment_count();
        let tasks = start(&spool);
        for m in &rec.pending {
            for r in 0..2 {
                spool
                    .append_outcome(m.loc.seq, &outcome(m.id, r, OutcomeKind::Delivered))
                    .expect("o");
            }
            spool.message_final(m.id, m.loc);
        }
        stop(spool, tasks).await;

        // Session 3: nothing pending; old segments were deleted once they held nothing live.
        let (spool, rec) = Spool::open_collecting(cfg(&path, 1 << 20))
            .await
            .expect("reopen");
        assert!(rec.pending.is_empty(), "{:?}", rec.report);
        assert!(
            spool.segment_count() < before,
            "{} < {before}",
            spool.segment_count()
        );
    });
}

#[test]
fn unreadable_records_are_reported_set_aside_and_the_rest_recovered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_owned();
    run(async move {
        let (spool, _) = Spool::open_collecting(cfg(&path, 64 << 20))
            .await
            .expect("open");
        let tasks = start(&spool);
        let mut locs = Vec::new();
        for i in 0..10 {
            let loc = spool
                .append_message(id(i), &envelope(i as u64, 1), &[&[b'x'; 700]])
                .await
                .expect("append");
            locs.push((id(i), loc));
        }
        stop(spool, tasks).await;

        let seg = segment::path(&path, locs[0].1.seq);
        let mut bytes = std::fs::read(&seg).expect("read");
        // Flip a byte inside message 4's body, and tear the last record in half.
        let l4 = locs[4].1;
        let flipped_at = (l4.offset + u64::from(l4.len) / 2) as usize;
        bytes[flipped_at] ^= 0xff;
        let l9 = locs[9].1;
        bytes.truncate((l9.offset + u64::from(l9.len) / 2) as usize);
        std::fs::write(&seg, &bytes).expect("write");

        let (_spool, rec) = Spool::open_collecting(cfg(&path, 64 << 20))
            .await
            .expect("reopen");
        let ids: Vec<u64> = rec.pending.iter().map(|m| m.id).collect();
        let expect: Vec<u64> = locs
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 4 && *i != 9)
            .map(|(_, l)| l.0)
            .collect();
        assert_eq!(ids, expect);
        assert!(rec.pending.iter().all(|m| m.envelope.sender == "a@b.test"));
        assert_eq!(rec.report.corrupt_records, 1, "{:?}", rec.report);
        assert_eq!(rec.report.torn_tails, 1, "{:?}", rec.report);
        // The unreadable record is reported with its place and copied out for the operator.
        assert_eq!(rec.report.unreadable.len(), 1, "{:?}", rec.report);
        let u = &rec.report.unreadable[0];
        assert_eq!((u.seq, u.offset), (l4.seq, l4.offset));
        assert_eq!(rec.report.quarantined.len(), 1);
        let kept = std::fs::read(&rec.report.quarantined[0]).expect("quarantine file");
        assert_eq!(
            kept,
            bytes[l4.offset as usize..l4.offset as usize + l4.len as usize]
        );
    });
}

#[test]
fn bad_segment_header_is_set_aside() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        segment::path(dir.path(), 3),
        b"garbage that is not a segment header",
    )
    .expect("write");
    let path = dir.path().to_owned();
    run(async move {
        let (spool, rec) = Spool::open_collecting(cfg(&path, 64 << 20))
            .await
            .expect("open");
        assert_eq!(rec.report.corrupt_segments.len(), 1);
        assert_eq!(spool.segment_count(), 1);
    });
    assert!(dir.path().join("00000000000000000003.corrupt").exists());
    assert!(!segment::path(dir.path(), 4).exists());
}

/// A stand-in for the queue: live messages, their locations and recipient states.
#[derive(Default)]
struct Live(RefCell<HashMap<u64, LiveMessage>>);

impl LiveIndex for Live {
    fn live(&self, id: u64) -> Option<LiveMessage> {
        self.0.borrow().get(&id).cloned()
    }
}

#[test]
fn compaction_moves_the_few_live_messages_and_frees_the_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_owned();
    run(async move {
        let (spool, _) = Spool::open_collecting(cfg(&path, 256 << 10))
            .await
            .expect("open");
        let live = Rc::new(Live::default());
        {
            let live = live.clone();
            spool.on_moved(Box::new(move |moves| {
                for (id, loc) in moves {
                    if let Some(m) = live.0.borrow_mut().get_mut(id) {
                        m.loc = *loc;
                    }
                }
            }));
        }
        let tasks = start(&spool);
        let clock: Rc<dyn crate::clock::Clock> = Rc::new(ManualClock::new(1_000));
        let compactor = glommio::spawn_local(spool.clone().run_compactor(live.clone(), clock));
        // 400 messages of ~2 KiB over ~4 segments; every 50th stays deferred (attempted
        // once), the rest are delivered.
        for i in 0..400 {
            let mid = id(i);
            let loc = spool
                .append_message(mid, &envelope(i as u64, 1), &[&[b'y'; 2000]])
                .await
                .expect("append");
            if i % 50 == 0 {
                spool
                    .append_outcome(loc.seq, &outcome(mid, 0, OutcomeKind::Deferred))
                    .expect("o");
                live.0.borrow_mut().insert(
                    mid,
                    LiveMessage {
                        loc,
                        rcpts: vec![RcptSnapshot::Deferred {
                            attempts: 1,
                            next_attempt_ms: 77,
                            delay_notified: false,
                        }],
                    },
                );
            } else {
                spool
                    .append_outcome(loc.seq, &outcome(mid, 0, OutcomeKind::Delivered))
                    .expect("o");
                spool.message_final(mid, loc);
            }
        }
        // Wait (bounded) for compaction to leave only the current segment and those the
        // copies went to.
        for _ in 0..500 {
            if spool.segment_count() <= 2 && spool.stats().compactions > 0 {
                break;
            }
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        assert!(spool.stats().compactions > 0, "{:?}", spool.stats());
        assert!(spool.segment_count() <= 2, "{}", spool.segment_count());
        // Every live message still reads back from where the queue now says it is.
        let locs: Vec<(u64, Location)> = live.0.borrow().iter().map(|(i, m)| (*i, m.loc)).collect();
        for (mid, loc) in &locs {
            let stored = spool.read_message(*loc).await.expect("read moved");
            assert_eq!(stored.view().expect("valid").id(), *mid);
        }
        spool.close();
        compactor.await;
        stop(spool, tasks).await;

        // After a restart the 8 deferred messages are there once each, with their state.
        let (_spool, rec) = Spool::open_collecting(cfg(&path, 256 << 10))
            .await
            .expect("reopen");
        assert_eq!(rec.pending.len(), 8, "{:?}", rec.report);
        for m in &rec.pending {
            assert_eq!(
                m.states,
                vec![RcptState::Pending {
                    attempts: 1,
                    next_attempt_ms: 77,
                    delay_notified: false,
                }]
            );
        }
    });
}
