//! The simulation over many seeds, determinism, and the seeds that found bugs.
//!
//! `cargo test -p epoxi-sim` runs about 350 seeds (the main 280 in four tests, so the harness
//! spreads them over the cores) in well under a minute in a debug build. Many more: `cargo run -p epoxi-sim
//! --release -- --seeds 10000`.

use epoxi_sim::{run, Options};

/// Run seeds `from..to`; fail with every failing seed's report.
fn seeds(from: u64, to: u64, opts: &Options) {
    let mut failed = Vec::new();
    for seed in from..to {
        if let Err(f) = run(seed, opts) {
            failed.push(f.to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} seeds failed:\n\n{}",
        failed.len(),
        to - from,
        failed.join("\n\n")
    );
}

/// The bulk runs carry 70% of a seed's messages (14 to 140): enough to fill queues, segments
/// and connection limits, and the suite stays well under a minute on a busy 2-core machine.
fn bulk() -> Options {
    Options {
        scale: Some(0.7),
        ..Options::default()
    }
}

#[test]
fn seeds_0_to_70() {
    seeds(0, 70, &bulk());
}

#[test]
fn seeds_70_to_140() {
    seeds(70, 140, &bulk());
}

#[test]
fn seeds_140_to_210() {
    seeds(140, 210, &bulk());
}

#[test]
fn seeds_210_to_280() {
    seeds(210, 280, &bulk());
}

/// Without crashes nothing may be delivered twice, compaction or not.
#[test]
fn seeds_without_crashes_have_no_duplicates() {
    let opts = Options {
        no_crashes: true,
        ..Options::default()
    };
    for seed in 1_000..1_030 {
        match run(seed, &opts) {
            Ok(s) => {
                assert_eq!(s.crashes, 0);
                assert_eq!(s.ledger.duplicates, 0, "seed {seed}");
            }
            Err(f) => panic!("{f}"),
        }
    }
}

/// A seed replays exactly: the same events in the same order, to the same end.
#[test]
fn a_seed_replays_exactly() {
    for seed in [7, 41, 98, 2_024] {
        let a = run(seed, &Options::default());
        let b = run(seed, &Options::default());
        match (a, b) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a.hash, b.hash, "seed {seed}");
                assert_eq!(a.events, b.events, "seed {seed}");
                assert_eq!(a.virtual_ms, b.virtual_ms, "seed {seed}");
                assert_eq!(a.ledger, b.ledger, "seed {seed}");
            }
            (a, b) => panic!("seed {seed}: {:?} / {:?}", a.err(), b.err()),
        }
    }
}

/// The runs do exercise what they are meant to: crashes, storage faults, compaction,
/// expiry, bounces and notices, several shards sharing a connection limit.
#[test]
fn the_scenarios_cover_the_mechanisms() {
    let mut crashes = 0;
    let mut failed_commits = 0;
    let mut compactions = 0;
    let mut expired = 0;
    let mut bounced = 0;
    let mut notices = 0;
    let mut multi_shard = 0;
    let mut quarantined = 0;
    for seed in 2_000..2_040 {
        let s = run(seed, &Options::default()).unwrap_or_else(|f| panic!("{f}"));
        crashes += s.crashes;
        failed_commits += s.stats.commits_failed;
        compactions += s.stats.compactions;
        expired += s.ledger.expired;
        bounced += s.ledger.bounced;
        notices += s.ledger.notices;
        multi_shard += u32::from(s.shards > 1);
        quarantined += s.stats.quarantined;
    }
    assert!(crashes > 10, "{crashes}");
    assert!(failed_commits > 10, "{failed_commits}");
    assert!(compactions > 100, "{compactions}");
    assert!(expired > 10, "{expired}");
    assert!(bounced > 50, "{bounced}");
    assert!(notices > 50, "{notices}");
    assert!(multi_shard > 20, "{multi_shard}");
    assert!(quarantined > 0, "{quarantined}");
}

/// The regression seeds' runs, as they were found: no operator operations (drawn since).
fn regression() -> Options {
    Options {
        no_admin: true,
        ..Options::default()
    }
}

// Seeds that found bugs, kept as they were found. Each still exercises the scenario that
// broke; the comment says what was wrong and where it was fixed.

/// Recovery restored an older message whose final outcome was lost (its batch failed) in a
/// queue slot a newer, acknowledged message had taken since: the newer one was set aside as
/// a duplicate id and never delivered (`no-loss`), and compaction then tombstoned it.
/// Fixed in `spool::recovery::replay` (superseded messages).
#[test]
fn seed_3_older_message_in_a_reused_slot() {
    seeds(3, 4, &regression());
}

/// Deleting a segment made another collectable, but the collector waited for the next change
/// and on a quiet spool it stayed for ever (`drain`). Fixed in `Spool::run_collector`.
#[test]
fn seed_5_collector_stops_before_all_is_collected() {
    seeds(5, 6, &regression());
}

/// Compaction re-wrote tombstones about final messages on every pass, for ever; segments of
/// them stayed below the live ratio (thousands of compactions). Fixed in `Engine::compact`
/// (tombstones only while a segment holding the record remains).
#[test]
fn seed_8_tombstones_carried_for_ever() {
    seeds(8, 9, &regression());
}

/// A notice retried after a failure to spool it read the message at its first location,
/// which compaction had since emptied and deleted: the bounce was recorded without a notice
/// (`notice`). Fixed in `Core::retry_notices` (as on branch coretests).
#[test]
fn seed_9_notice_retry_reads_a_moved_record() {
    seeds(9, 10, &regression());
}

/// The notice task read the record at the location of the request, but compaction moved it
/// and its segment was deleted before the task ran (`notice`). Fixed in
/// `shard::perform::Driver::notice` (asks the core where the record is now).
#[test]
fn seed_26_notice_reads_a_record_compaction_just_moved() {
    seeds(26, 27, &regression());
}

/// Tombstones were still carried along while any old segment stayed (not only one holding
/// their records); segments compacted every few ms. Fixed in `Engine::compact` (per-message
/// tombstones, `SegmentState::ids`).
#[test]
fn seed_41_tombstones_kept_by_an_unrelated_old_segment() {
    seeds(41, 42, &regression());
}

/// A segment of live messages and their restatements was below the live ratio; compacting it
/// wrote the same bytes again into a segment just as sparse, 4600 times in one run
/// (`compaction-progress`). Fixed in `Engine::compact` (a compaction that gains nothing is
/// not done until the segment's live count changes).
#[test]
fn seed_98_compaction_that_gains_nothing() {
    seeds(98, 99, &regression());
}

/// A crash cut the zero padding after the last record of a segment; recovery took the record
/// (its checksum covers no padding), but its framed length ran past the end of the file. The
/// simulation's reads were stricter than pread (`wrong-record`); in the engine, compaction
/// skipped such a record, leaving it live in a segment it would compact again and again.
/// Fixed in `Engine::compact` (copies the record and restores its padding).
#[test]
fn seed_39098_record_with_torn_padding() {
    seeds(39_098, 39_099, &regression());
}

/// With the queue at `queue.messages_max`, every queued message waiting for its bounce notice
/// (a failure is recorded only once its notice is spooled), the notices could not get a queue
/// slot (452) and were retried for ever: nothing drained (`drain`); with several shards, shards
/// full of messages waiting for notices to each other deadlocked too. Fixed in
/// `Queue::reserve_notice`: notices go past the limit, up to twice it (they are bounded by the
/// messages they report on).
#[test]
fn seed_12527_notices_deadlock_on_a_full_queue() {
    seeds(12_527, 12_528, &regression());
}

/// An fdatasync failed, yet the batch's bytes reached the disk; the adapter truncated them
/// off, which is not durable either, and later batches went to the same place. The batch held
/// a compaction copy; the retry copied the message elsewhere, it was delivered, its outcome
/// committed. After a crash the stale copy came back (its segment still held other live mail)
/// with the states of its time, and the message was pending again: delivered twice
/// (`durable-regression`). Fixed in `spool::engine`: after a failed commit the segment takes
/// no more records (nothing can be read after stale bytes), and the outcomes of a message a
/// failed batch may hold a copy of depend on that segment (its final outcome cannot go first).
#[test]
fn seed_101186_failed_batch_comes_back_after_a_crash() {
    seeds(101_186, 101_187, &regression());
}

/// The same failed batch, one step further: the message's outcome depended on the failed
/// segment, but when the segment holding that outcome was compacted, the tombstone that keeps
/// it final was not written (the engine knew of no record of the message in the failed
/// segment), the outcome's segment was deleted and after a crash the stale copy made the
/// message pending again (`durable-regression`). Fixed in `Engine::committed`: the copies a
/// failed batch held count as records of their segment.
#[test]
fn seed_301307_tombstone_for_a_copy_a_failed_batch_may_hold() {
    seeds(301_307, 301_308, &regression());
}

/// A message was let go (`Final`) once its last recipient was done while a success notice
/// about an earlier one (NOTIFY=SUCCESS) waited to be tried again after a full queue: the
/// retry found the original gone and the notice was dropped. Fixed in `Core::record_results`
/// and `Core::notice_spooled` (a message stays while a notice about it is pending).
#[test]
fn seed_75_success_notice_outlived_by_its_message() {
    let s = run(75, &regression()).unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(s.stats.notice_read_failures, 0);
}

/// With a connection rate, the owner of a (site, source) queued its own shard's permit
/// request for the rate but did not rearm its timer, so the permit was never granted and the
/// shard's mail sat in a ready queue with nothing left to happen (`drain`). Fixed in
/// `Core::owner_handle` (a paced request rearms the timer). Found with shaping drawn, so it
/// replays with the default options.
#[test]
fn seed_717_connection_rate_waiter_never_woken() {
    let s = run(717, &Options::default()).unwrap_or_else(|f| panic!("{f}"));
    assert!(s.stats.connections > 0);
}
