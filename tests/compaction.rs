//! Spool compaction: a few long-deferred messages do not pin the segments they share with
//! thousands of delivered ones, and a kill -9 while compaction copies records forward loses
//! nothing and delivers nothing twice.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// Bytes of segment files in a spool, all shards.
fn spool_bytes(spool: &Path) -> u64 {
    segments(spool)
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum()
}

/// Epoxi relaying `d0.test` (1 domain in 100: 1% of the messages) to `dead`, where nothing
/// listens yet, and every other domain to `sink`; small segments so the flow fills many.
fn opts(dir: &Path, dead: u16, sink: u16) -> Opts {
    let mut opts = Opts::new(dir)
        .shards(1)
        .set("spool", "segment_size_max", "1048576")
        .set("queue", "retry_base_ms", "500")
        .set("queue", "retry_cap_ms", "1000");
    opts.conf.raw = format!(
        "[[route]]\ndomain = \"d0.test\"\ntarget = \"127.0.0.1:{dead}\"\n\
         [[route]]\ndomain = \"*.test\"\ntarget = \"127.0.0.1:{sink}\"\n"
    );
    opts
}

const MESSAGES: u64 = 8_000;
const SIZE: u64 = 4096;
/// Round-robin over 100 domains: d0.test gets every hundredth.
const DEFERRED: u64 = MESSAGES / 100;

#[test]
fn deferred_messages_do_not_pin_segments_and_a_kill_during_compaction_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dead = dead_port();
    let sink = Sink::start(dir.path(), &[]);
    let mut epoxi = Epoxi::start(&opts(dir.path(), dead, sink.port));

    let injected = Inject::new(MESSAGES)
        .size(SIZE)
        .connections(16)
        .domains(100)
        .run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), MESSAGES, "{}", injected.json);
    epoxi.wait_events("Delivery", (MESSAGES - DEFERRED) as usize);
    let written = MESSAGES * SIZE;

    // The 1% stay deferred (their destination refuses connections); compaction copies them out
    // of the segments they shared with the delivered 99%, and those segments go.
    let live = DEFERRED * (SIZE + 1024);
    let bound = 2 * live + (1 << 20);
    let deadline = Instant::now() + DEADLINE * 2;
    let mut used = spool_bytes(&epoxi.spool);
    while used > bound && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        used = spool_bytes(&epoxi.spool);
    }
    eprintln!(
        "written {written} bytes; live about {live}; spool now {used} bytes in {} segments",
        epoxi.segments().len()
    );
    assert!(
        used <= bound,
        "spool {used} bytes > 2 x live ({live}) + one segment: deferred messages pin segments"
    );

    // Kill -9 at a few moments while compaction works. After each restart the previous current
    // segment (the copies, retry outcomes and dead records) is closed and mostly dead, so it is
    // compacted at once; at 1 MiB/s its read takes about as long as the run before the next
    // kill, so the kills land before, during and after the copies are committed.
    for round in 0..4 {
        epoxi.kill9();
        let again = Epoxi::start(&opts(dir.path(), dead, sink.port).set(
            "spool",
            "compaction_bytes_per_s",
            "1048576",
        ));
        assert_eq!(
            again.pending_at_start(),
            DEFERRED,
            "round {round}: every deferred message recovered, once: {}",
            again.stderr()
        );
        std::thread::sleep(Duration::from_millis(300 + 400 * round));
        epoxi = again;
    }

    // The destination comes up: each deferred message arrives, exactly once.
    let late = Sink::start_on(dir.path(), &format!("127.0.0.1:{dead}"), &[]);
    let deliveries_before: usize = epoxi.events_of("Delivery").len();
    // Retries after the restarts (cap 1 s); generous for a loaded CI machine.
    epoxi.wait_events_within(
        "Delivery",
        deliveries_before + DEFERRED as usize,
        Duration::from_secs(120),
    );
    epoxi.stop();
    let report = late.stop();
    assert_eq!(report.count("unique"), DEFERRED, "{}", report.json);
    assert_eq!(report.count("duplicates"), 0, "{}", report.json);
    let first = sink.stop();
    assert_eq!(first.count("duplicates"), 0, "{}", first.json);
    let delivered: BTreeSet<&String> = first.ids.iter().chain(&report.ids).collect();
    for id in &injected.ids {
        assert!(delivered.contains(id), "acknowledged {id} never arrived");
    }
}
