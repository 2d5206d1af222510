//! Recovery: a message acknowledged with 250 survives a clean stop, a SIGKILL and damage to
//! its spool segment's neighbours, and is delivered once it can be.

mod common;

use std::collections::BTreeSet;

use common::{dead_port, find, message_body, Epoxi, Inject, Opts, Sink, Smtp, DEADLINE};

/// Waits until the restarted `epoxi` has logged a delivery for every message it recovered;
/// its log directory must be fresh, so only this run's events count.
fn wait_recovered_delivered(epoxi: &Epoxi) -> u64 {
    let pending = epoxi.pending_at_start();
    let what = format!("{pending} recovered messages delivered");
    common::wait_until(&what, DEADLINE, || {
        let delivered: BTreeSet<(u64, u64)> = epoxi
            .events_of("Delivery")
            .iter()
            .filter_map(|d| Some((d["shard"].as_u64()?, d["queue_id"].as_u64()?)))
            .collect();
        delivered.len() as u64 >= pending
    });
    pending
}

#[test]
fn restart_with_backlog() {
    let dir = tempfile::tempdir().expect("tempdir");
    let down = dead_port();
    let mut epoxi = Epoxi::start(&Opts::new(dir.path()).shards(2).route(down));

    let injected = Inject::new(100).domains(10).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 100, "inject: {}", injected.json);
    // Delivery is being tried and failing: the messages wait in the spool.
    epoxi.wait_events("TransientFailure", 10);
    assert!(epoxi.events_of("Delivery").is_empty());
    epoxi.stop();

    let sink = Sink::start(dir.path(), &[]);
    let opts = Opts::new(dir.path())
        .shards(2)
        .route(sink.port)
        .log_dir(dir.path().join("log2"));
    let mut again = Epoxi::start(&opts);
    assert_eq!(again.pending_at_start(), 100, "{}", again.stderr());
    wait_recovered_delivered(&again);
    again.stop();

    let report = sink.stop();
    assert_eq!(report.count("unique"), 100, "sink: {}", report.json);
    assert_eq!(report.count("duplicates"), 0, "sink: {}", report.json);
    assert_eq!(
        injected.ids.iter().collect::<BTreeSet<_>>(),
        report.ids.iter().collect::<BTreeSet<_>>()
    );
    assert_eq!(again.events_of("Delivery").len(), 100);
}

#[test]
fn kill9_during_injection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]);
    let mut epoxi = Epoxi::start(&Opts::new(dir.path()).shards(2).route(sink.port));

    let injecting = Inject::new(3000)
        .connections(4)
        .domains(10)
        .spawn(dir.path(), epoxi.port);
    // Kill once the injection is well under way, mid-stream.
    epoxi.wait_events("Reception", 100);
    epoxi.kill9();
    let injected = injecting.finish();
    assert!(
        injected.count("errors") > 0,
        "the kill should cut the injection: {}",
        injected.json
    );
    let acked = injected.count("accepted");
    assert!(acked >= 100, "inject: {}", injected.json);
    assert_eq!(injected.ids.len() as u64, acked);

    let opts = Opts::new(dir.path())
        .shards(2)
        .route(sink.port)
        .log_dir(dir.path().join("log2"));
    let mut again = Epoxi::start(&opts);
    wait_recovered_delivered(&again);
    again.stop();

    // Every message the client saw acknowledged arrived. A message delivered just before the
    // kill, whose outcome was not yet durable, may arrive twice: SMTP allows that.
    let report = sink.stop();
    let got: BTreeSet<&String> = report.ids.iter().collect();
    let lost: Vec<&String> = injected.ids.iter().filter(|id| !got.contains(id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {acked} acknowledged messages lost after SIGKILL, e.g. {:?}; sink: {}",
        lost.len(),
        &lost[..lost.len().min(5)],
        report.json
    );
}

/// Bytes of the spool segment holding message `id`, and its path.
fn segment_with(epoxi: &Epoxi, id: &str) -> (std::path::PathBuf, Vec<u8>) {
    for path in epoxi.segments() {
        let bytes = std::fs::read(&path).expect("read segment");
        if find(&bytes, id.as_bytes()).is_some() {
            return (path, bytes);
        }
    }
    panic!("no segment under {} holds {id}", epoxi.spool.display());
}

#[test]
fn torn_and_flipped_segment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Opts::new(dir.path()).route(dead_port());
    let mut epoxi = Epoxi::start(&opts);
    let injected = Inject::new(50).domains(5).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 50, "inject: {}", injected.json);
    epoxi.stop();

    // Flip one byte in the body of one message, well past its X-Loadgen-Id header.
    let victim = &injected.ids[17];
    let (path, mut bytes) = segment_with(&epoxi, victim);
    let at = find(&bytes, victim.as_bytes()).expect("victim id") + victim.len() + 200;
    bytes[at] ^= 0x20;
    // And end the segment with a torn record: a copy of the start of its first record, as a
    // crash in the middle of an append leaves it.
    let first_record = 32;
    assert_eq!(
        &bytes[first_record..first_record + 4],
        b"EPXR",
        "record magic"
    );
    let torn = bytes[first_record..first_record + 40].to_vec();
    let padding = (16 - bytes.len() % 16) % 16;
    bytes.resize(bytes.len() + padding, 0);
    bytes.extend_from_slice(&torn);
    std::fs::write(&path, &bytes).expect("write damaged segment");

    let sink = Sink::start(dir.path(), &[]);
    let opts = Opts::new(dir.path())
        .route(sink.port)
        .log_dir(dir.path().join("log2"));
    let mut again = Epoxi::start(&opts);
    let recovery = again.recovery();
    assert_eq!(recovery.len(), 1, "{}", again.stderr());
    assert_eq!(
        recovery[0].corrupt,
        1,
        "the flipped record: {}",
        again.stderr()
    );
    assert_eq!(recovery[0].torn, 1, "the torn tail: {}", again.stderr());
    assert_eq!(recovery[0].pending, 49, "{}", again.stderr());
    wait_recovered_delivered(&again);
    again.stop();

    let report = sink.stop();
    assert_eq!(report.count("duplicates"), 0, "sink: {}", report.json);
    let expected: BTreeSet<&String> = injected.ids.iter().filter(|id| *id != victim).collect();
    let got: BTreeSet<&String> = report.ids.iter().collect();
    assert_eq!(got, expected, "exactly the undamaged messages");
    assert!(
        !got.contains(victim),
        "a damaged message must not be delivered"
    );

    // Once everything recovered is final, the damaged segment has served its purpose: a third
    // start finds nothing pending and no damage left behind.
    let opts = Opts::new(dir.path())
        .route(dead_port())
        .log_dir(dir.path().join("log3"));
    let mut third = Epoxi::start(&opts);
    let recovery = third.recovery();
    assert_eq!(recovery.len(), 1, "{}", third.stderr());
    assert_eq!(recovery[0].pending, 0, "{}", third.stderr());
    assert_eq!(
        recovery[0].corrupt,
        0,
        "damage found again: {}",
        third.stderr()
    );
    assert_eq!(
        recovery[0].torn,
        0,
        "torn tail found again: {}",
        third.stderr()
    );
    third.stop();
}

#[test]
fn partial_delivery_survives_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The first copy to arrive is deferred for 3 s; the other is delivered at once.
    let sink = Sink::start(dir.path(), &["--tempfail-first", "1"]);
    let opts = Opts::new(dir.path())
        .shards(2)
        .route(sink.port)
        .set("queue", "retry_base_ms", "3000")
        .set("queue", "retry_cap_ms", "3000");
    let mut epoxi = Epoxi::start(&opts);

    // Recipients in 6 domains: copies on both shards.
    let rcpts: Vec<String> = (0..6).map(|d| format!("user@d{d}.test")).collect();
    let id = format!("partial-{}", std::process::id());
    let mut smtp = Smtp::connect(epoxi.port);
    assert_eq!(smtp.reply().code, 220);
    smtp.expect("EHLO client.test", 250);
    let done = smtp.send_message("sender@client.test", &rcpts, &message_body(&id, &[]));
    assert_eq!(done.code, 250, "{}", done.text);
    smtp.expect("QUIT", 221);
    let receptions = epoxi.wait_events("Reception", 2);
    assert_eq!(receptions.len(), 2, "copies on both shards: {receptions:?}");

    epoxi.wait_events("TransientFailure", 1);
    let delivered_first = epoxi.wait_events("Delivery", 1);
    epoxi.stop();
    let deferred: BTreeSet<String> =
        common::field_set(&epoxi.events_of("TransientFailure"), "recipient");

    let mut again = Epoxi::start(&opts.clone().log_dir(dir.path().join("log2")));
    assert_eq!(
        again.pending_at_start(),
        1,
        "only the deferred copy: {}",
        again.stderr()
    );
    let delivered_again = again.wait_events("Delivery", deferred.len());
    again.stop();
    let redelivered = common::field_set(&delivered_again, "recipient");
    assert_eq!(
        redelivered, deferred,
        "exactly the deferred recipients, after the restart"
    );
    for d in &delivered_again {
        assert!(
            d["attempts"].as_u64().expect("attempts") >= 2,
            "attempts kept: {d}"
        );
    }

    let report = sink.stop();
    let mut seen: Vec<String> = Vec::new();
    for line in &report.rcpt_lines {
        seen.extend(line.split_whitespace().skip(1).map(str::to_owned));
    }
    seen.sort();
    assert_eq!(seen, rcpts, "each recipient exactly once over both runs");
    assert_eq!(delivered_first.len() + delivered_again.len(), rcpts.len());
}

#[test]
fn sigterm_with_deliveries_in_flight() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A slow destination: deliveries are still going on when the stop comes.
    let sink = Sink::start(dir.path(), &["--delay-ms", "20"]);
    let opts = Opts::new(dir.path()).shards(2).route(sink.port);
    let mut epoxi = Epoxi::start(&opts);
    let injected = Inject::new(200).connections(4).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 200, "inject: {}", injected.json);
    epoxi.stop();
    let delivered_before = epoxi.events_of("Delivery").len();

    let mut again = Epoxi::start(&opts.clone().log_dir(dir.path().join("log2")));
    let pending = wait_recovered_delivered(&again);
    again.stop();
    let report = sink.stop();

    assert_eq!(
        delivered_before as u64 + pending,
        200,
        "first run: {delivered_before}"
    );
    let got: BTreeSet<&String> = report.ids.iter().collect();
    assert_eq!(got, injected.ids.iter().collect::<BTreeSet<_>>());
    // A clean stop finishes or abandons each delivery with its outcome recorded: nothing is
    // sent twice.
    assert_eq!(report.count("duplicates"), 0, "sink: {}", report.json);
}

#[test]
fn destination_down_then_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The destination takes 40 messages, then goes away; later a new one comes up on its port.
    let first = Sink::start(dir.path(), &["--exit-after", "40"]);
    let port = first.port;
    // A short site backoff: the destination is back within a second of a probe.
    let epoxi = Epoxi::start(
        &Opts::new(dir.path())
            .shards(2)
            .route(port)
            .set("delivery", "site_backoff_ms", "500")
            .set("delivery", "site_backoff_cap_ms", "1000"),
    );
    let injected = Inject::new(150).connections(4).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 150, "inject: {}", injected.json);
    let first = first.wait();
    epoxi.wait_events("TransientFailure", 1);

    let second = Sink::start_on(dir.path(), &format!("127.0.0.1:{port}"), &[]);
    common::wait_until("150 deliveries", DEADLINE, || {
        epoxi.events_of("Delivery").len() >= 150
    });
    let second = second.stop();

    let a: BTreeSet<&String> = first.ids.iter().collect();
    let b: BTreeSet<&String> = second.ids.iter().collect();
    assert!(a.len() >= 40, "first sink: {}", first.json);
    assert!(
        a.is_disjoint(&b),
        "delivered to both: {:?}",
        a.intersection(&b).next()
    );
    let all: BTreeSet<&String> = a.union(&b).copied().collect();
    assert_eq!(all, injected.ids.iter().collect::<BTreeSet<_>>());
    assert_eq!(epoxi.events_of("Delivery").len(), 150);
}

#[test]
fn restarts_never_revive_delivered_messages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]);
    let mut ids: BTreeSet<String> = BTreeSet::new();

    // Run 1: the destination is down, so messages wait in segment 1 with deferrals.
    let opts = Opts::new(dir.path()).shards(2).route(dead_port());
    let mut epoxi = Epoxi::start(&opts);
    let injected = Inject::new(40).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 40, "inject: {}", injected.json);
    ids.extend(injected.ids);
    epoxi.wait_events("TransientFailure", 1);
    epoxi.stop();

    // Runs 2..4: the destination is up. Old messages are delivered from old segments while
    // new ones arrive in new segments; each start must find exactly what is still undelivered.
    let mut delivered_total = 0;
    for run in 2..=4 {
        let opts = Opts::new(dir.path())
            .shards(2)
            .route(sink.port)
            .log_dir(dir.path().join(format!("log{run}")));
        let mut epoxi = Epoxi::start(&opts);
        let expected_pending = if run == 2 { 40 } else { 0 };
        assert_eq!(
            epoxi.pending_at_start(),
            expected_pending,
            "run {run}: {}",
            epoxi.stderr()
        );
        let injected = Inject::new(30).run(dir.path(), epoxi.port);
        assert_eq!(injected.count("accepted"), 30, "inject: {}", injected.json);
        ids.extend(injected.ids);
        let n = expected_pending as usize + 30;
        epoxi.wait_events("Delivery", n);
        epoxi.stop();
        delivered_total += epoxi.events_of("Delivery").len();
    }
    assert_eq!(delivered_total, ids.len());

    let report = sink.stop();
    assert_eq!(
        report.count("duplicates"),
        0,
        "a delivered message came back: {}",
        report.json
    );
    assert_eq!(report.ids.iter().cloned().collect::<BTreeSet<_>>(), ids);
}

#[test]
fn more_shards_after_restart_still_deliver_the_backlog() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut epoxi = Epoxi::start(&Opts::new(dir.path()).shards(1).route(dead_port()));
    let injected = Inject::new(40).domains(10).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 40, "inject: {}", injected.json);
    epoxi.stop();

    // Domains of shard 0's backlog now belong partly to shard 1: shard 0 still delivers it.
    let sink = Sink::start(dir.path(), &[]);
    let opts = Opts::new(dir.path())
        .shards(2)
        .route(sink.port)
        .log_dir(dir.path().join("log2"));
    let mut again = Epoxi::start(&opts);
    assert_eq!(again.pending_at_start(), 40, "{}", again.stderr());
    wait_recovered_delivered(&again);
    again.stop();
    let report = sink.stop();
    assert_eq!(report.count("duplicates"), 0, "sink: {}", report.json);
    assert_eq!(
        report.ids.iter().collect::<BTreeSet<_>>(),
        injected.ids.iter().collect::<BTreeSet<_>>()
    );
}

#[test]
fn fewer_shards_with_queued_mail_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Opts::new(dir.path()).shards(2).route(dead_port());
    let mut epoxi = Epoxi::start(&opts);
    let injected = Inject::new(20).domains(10).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 20, "inject: {}", injected.json);
    epoxi.stop();

    // Shard 1's spool would be stranded with one shard: epoxi must refuse, not ignore it.
    let conf = opts.conf.write(&dir.path().join("one-shard.toml"));
    let ran = common::run_epoxi(&[
        "serve".as_ref(),
        "--config".as_ref(),
        conf.as_os_str(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--shards".as_ref(),
        "1".as_ref(),
        "--spool".as_ref(),
        opts.spool.as_os_str(),
        "--log-dir".as_ref(),
        dir.path().join("log2").as_os_str(),
    ]);
    assert!(
        !ran.status.success(),
        "started with a stranded shard spool: {ran:?}"
    );
    assert!(ran.stderr.contains("shard 1"), "{ran:?}");
    assert!(!ran.stderr.contains("listening on"), "{ran:?}");

    // With the right count again, every message is still there.
    let mut again = Epoxi::start(&opts.log_dir(dir.path().join("log3")));
    assert_eq!(again.pending_at_start(), 20, "{}", again.stderr());
    again.stop();
}

#[test]
fn repeated_kill9_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Some deliveries fail temporarily, so deferrals are in the spool when the kills come.
    let sink = Sink::start(dir.path(), &["--reply", "250:80,451:20"]);
    let opts = |run: u32| {
        Opts::new(dir.path())
            .shards(2)
            .route(sink.port)
            .log_dir(dir.path().join(format!("log{run}")))
    };

    let mut epoxi = Epoxi::start(&opts(1));
    let injecting = Inject::new(600)
        .connections(4)
        .size(20_000)
        .spawn(dir.path(), epoxi.port);
    epoxi.wait_events("Reception", 100);
    epoxi.kill9();
    let injected = injecting.finish();
    let acked: BTreeSet<String> = injected.ids.iter().cloned().collect();
    assert!(!acked.is_empty(), "inject: {}", injected.json);

    // Crash again while the recovered backlog is being delivered.
    let mut epoxi = Epoxi::start(&opts(2));
    if epoxi.pending_at_start() > 10 {
        epoxi.wait_events("Delivery", 5);
    }
    epoxi.kill9();

    let mut epoxi = Epoxi::start(&opts(3));
    wait_recovered_delivered(&epoxi);
    epoxi.stop();
    let report = sink.stop();
    let got: BTreeSet<String> = report.ids.iter().cloned().collect();
    let lost: Vec<&String> = acked.difference(&got).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged messages lost after two SIGKILLs, e.g. {:?}; sink: {}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)],
        report.json
    );
}

/// Regression: a second epoxi on a spool in use used to delete the first one's current segment
/// at recovery, losing everything the first one acknowledged afterwards. Each shard directory is
/// now locked (`flock`) before recovery, and a second process is refused.
#[test]
fn second_instance_on_same_spool_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Opts::new(dir.path()).route(dead_port());
    let mut first = Epoxi::start(&opts);

    // Same spool, its own port and log: an operator starting a second copy by mistake.
    let second = Epoxi::try_start(&opts.clone().log_dir(dir.path().join("log2")));
    let refused = second.as_ref().err().map(|ran| ran.stderr.clone());
    let injected = Inject::new(20).run(dir.path(), first.port);
    assert_eq!(injected.count("accepted"), 20, "inject: {}", injected.json);
    first.stop();
    if let Ok(mut second) = second {
        second.stop();
    }

    let mut again = Epoxi::start(&opts.log_dir(dir.path().join("log3")));
    let pending = again.pending_at_start();
    again.stop();
    assert_eq!(
        pending,
        20,
        "acknowledged messages lost: a second epoxi ran on the same spool ({})",
        refused.as_deref().unwrap_or("it was not refused")
    );
    let refusal = refused.expect("a second epoxi on a spool in use must refuse to start");
    assert!(
        refusal.contains("spool"),
        "the refusal should name the spool: {refusal}"
    );
}

/// A record recovery cannot read is reported with its place, its bytes are kept for the
/// operator in `quarantine/`, and it never becomes a message of its own (say, one without a
/// sender, which could never bounce).
#[test]
fn an_unreadable_record_is_reported_and_set_aside() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Opts::new(dir.path()).route(dead_port());
    let mut epoxi = Epoxi::start(&opts);
    let injected = Inject::new(20).domains(1).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 20, "inject: {}", injected.json);
    epoxi.stop();

    let victim = &injected.ids[7];
    let (path, mut bytes) = segment_with(&epoxi, victim);
    let at = find(&bytes, victim.as_bytes()).expect("victim id") + victim.len() + 100;
    bytes[at] ^= 0x01;
    std::fs::write(&path, &bytes).expect("write damaged segment");

    let mut again = Epoxi::start(&opts.clone().log_dir(dir.path().join("log2")));
    let stderr = again.stderr();
    assert_eq!(again.pending_at_start(), 19, "{stderr}");
    assert!(
        stderr.contains("unreadable record set aside: segment"),
        "reported with its place: {stderr}"
    );
    let shard_dir = path.parent().expect("shard dir");
    let kept: Vec<_> = std::fs::read_dir(shard_dir.join("quarantine"))
        .expect("quarantine dir")
        .flatten()
        .map(|e| std::fs::read(e.path()).expect("read quarantined"))
        .collect();
    assert_eq!(kept.len(), 1, "one record set aside");
    assert!(
        find(&kept[0], victim.as_bytes()).is_some(),
        "the damaged record's bytes are kept"
    );
    again.stop();
    // No message from the null sender (or any) was made of it: nothing but the 19 deferrals.
    let receptions = again.events_of("Reception");
    assert!(receptions.is_empty(), "no new message: {receptions:?}");
}
