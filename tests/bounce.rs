//! Bounce classification end to end: the real binary delivering to the loadgen sink, and the
//! category of each failure in its event line.

mod common;

use common::{Epoxi, Inject, Opts, Sink};

#[test]
fn bounces_and_deferrals_carry_their_category() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The sink answers 550 5.1.1 "Mailbox unavailable" to every message.
    let sink = Sink::start(dir.path(), &["--reply", "550:100"]);
    let opts = Opts::new(dir.path()).shards(1).route(sink.port);
    let mut epoxi = Epoxi::start(&opts);
    let injected = Inject::new(3).domains(1).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 3, "inject: {}", injected.json);
    // Three bounces, and three more for their notices (the sink refuses those too).
    let bounces = epoxi.wait_events("Bounce", 6);
    epoxi.stop();
    for b in &bounces {
        assert_eq!(b["bounce_category"], "InvalidRecipient", "{b}");
    }
    drop(sink);

    // A deferral: 452 4.3.1 "Insufficient system storage".
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &["--reply", "452:100"]);
    let opts = Opts::new(dir.path()).shards(1).route(sink.port);
    let mut epoxi = Epoxi::start(&opts);
    let injected = Inject::new(1).domains(1).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 1, "inject: {}", injected.json);
    let deferred = epoxi.wait_events("TransientFailure", 1);
    epoxi.stop();
    assert_eq!(
        deferred[0]["bounce_category"], "QuotaIssues",
        "{}",
        deferred[0]
    );
    drop(sink);
}
