//! `Core::reload`: settings swapped on a running core.

use super::*;

/// Settings with `*.test` routed to `target` by the file (so a reload can change it).
fn routed_to(target: &str, extra: &str) -> Rc<Settings> {
    let toml = format!("{extra}\n[[route]]\ndomain = \"*.test\"\ntarget = \"{target}\"\n");
    let settings = Config::parse(&toml)
        .expect("test config parses")
        .settle(Overrides {
            resolvers: vec!["127.0.0.1:53".into()],
            ..Default::default()
        })
        .expect("test config is valid");
    Rc::new(settings)
}

#[test]
fn reload_routes_waiting_mail_the_new_way_and_in_flight_mail_stays() {
    let old = routed_to("127.0.0.1:2600", "");
    let (mut core, _) = core_of(&old, 0, 1, true);
    let a = accept(&mut core, &envelope("s@x.test", &["r@d0.test"], T0), T0);
    let b = accept(&mut core, &envelope("s@x.test", &["r@d1.test"], T0), T0);
    let opened = connects(&core.take_actions());
    let (old_conn, old_dest, _) = opened
        .first()
        .cloned()
        .expect("a connection to the old route");
    core.conn_opened(old_conn, "127.0.0.1:2600", T0);
    // One job is on the connection already; the other waits in the ready queue.
    let NextJob::Job(in_flight) = core.next_job(old_conn, T0) else {
        panic!("no job for the open connection");
    };
    assert_eq!(in_flight.job.id, a);

    let new = routed_to(
        "127.0.0.1:2601",
        "[queue]\nretry_first_ms = 5\nretry_jitter = 0.0\n",
    );
    core.reload(new, T0 + 1);
    let reconnects = connects(&core.take_actions());
    let (new_conn, new_dest, _) = reconnects
        .iter()
        .find(|(_, d, _)| *d != old_dest)
        .cloned()
        .expect("a connection to the new route");
    assert!(
        matches!(&new_dest.hop, Hop::Route(r) if r.addr.port() == 2601),
        "{new_dest:?}"
    );
    // The waiting job moved to the new route; the old connection has nothing more.
    core.conn_opened(new_conn, "127.0.0.1:2601", T0 + 1);
    let NextJob::Job(moved) = core.next_job(new_conn, T0 + 1) else {
        panic!("the waiting job did not move to the new route");
    };
    assert_eq!(moved.job.id, b);
    assert!(!matches!(core.next_job(old_conn, T0 + 1), NextJob::Job(_)));
    // The job in flight finishes where it went, once.
    core.txn_done(old_conn, &in_flight.job, &all(&in_flight.job, ok()), T0 + 2);
    core.txn_done(new_conn, &moved.job, &all(&moved.job, ok()), T0 + 2);
    assert!(core.queue().is_empty(), "both delivered");
    // The new backoff is in force: a deferral waits 5 ms, not the default minute.
    let c = accept(&mut core, &envelope("s@x.test", &["r@d1.test"], T0), T0 + 3);
    let NextJob::Job(t) = core.next_job(new_conn, T0 + 3) else {
        panic!("no job for the new message");
    };
    assert_eq!(t.job.id, c);
    core.txn_done(new_conn, &t.job, &all(&t.job, tempfail()), T0 + 3);
    assert_eq!(core.next_wakeup(), Some(T0 + 3 + 5));
}
