//! Operating a running server: the admin socket (JSON lines, answered from every shard), the
//! `epoxi queue`/`reload` commands, and runtime reload (SIGHUP and `epoxi reload`) under load.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::{run_epoxi, wait_until, Conf, Epoxi, Inject, Opts, Sink, DEADLINE};
use serde_json::Value;

/// A JSON-lines connection to the admin socket.
struct Admin {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Admin {
    fn connect(path: &Path) -> Admin {
        let stream = UnixStream::connect(path).expect("connect to the admin socket");
        stream
            .set_read_timeout(Some(DEADLINE))
            .expect("read timeout");
        let writer = stream.try_clone().expect("clone");
        Admin {
            reader: BufReader::new(stream),
            writer,
        }
    }

    fn send(&mut self, line: &[u8]) -> Value {
        self.writer.write_all(line).expect("write");
        self.writer.write_all(b"\n").expect("write");
        let mut answer = String::new();
        let n = self.reader.read_line(&mut answer).expect("read an answer");
        assert!(n > 0, "the server closed the connection");
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("not JSON ({e}): {answer}"))
    }
}

/// Every shard answered: those that gave an answer are counted in `shards`, those whose
/// answer is an error (a core that does not implement the operation yet) are in `errors`,
/// and none failed to answer.
fn answered_by(answer: &Value) -> usize {
    let ok = answer["shards"].as_u64().expect("shards") as usize;
    let errors = answer["errors"].as_array().cloned().unwrap_or_default();
    for e in &errors {
        let text = e["error"].as_str().unwrap_or_default();
        assert!(!text.contains("did not answer"), "{answer}");
    }
    ok + errors.len()
}

#[test]
fn socket_is_private_and_answers_from_every_shard() {
    let dir = tempfile::tempdir().expect("tempdir");
    let epoxi = Epoxi::start(&Opts::new(dir.path()).shards(2));
    let path = epoxi.admin_socket();
    let mode = std::fs::metadata(&path)
        .expect("admin.sock exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");

    let mut admin = Admin::connect(&path);
    let summary = admin.send(br#"{"op":"summary"}"#);
    assert_eq!(answered_by(&summary), 2, "{summary}");

    // Bad input gets an error line, and the connection goes on.
    let bad = admin.send(b"{not json");
    assert!(
        bad["error"]
            .as_str()
            .is_some_and(|e| e.contains("bad request")),
        "{bad}"
    );
    let unknown = admin.send(br#"{"op":"explode"}"#);
    assert!(
        unknown["error"]
            .as_str()
            .is_some_and(|e| e.contains("unknown variant `explode`")),
        "{unknown}"
    );
    let long = vec![b'x'; 100_000];
    let too_long = admin.send(&long);
    assert!(
        too_long["error"]
            .as_str()
            .is_some_and(|e| e.contains("longer than")),
        "{too_long}"
    );
    // Suppression is off by default: a clear error, from the hook.
    let suppression = admin.send(br#"{"op":"suppression","action":"list","tenant":null}"#);
    assert!(
        suppression["error"]
            .as_str()
            .is_some_and(|e| e.contains("not available")),
        "{suppression}"
    );
    let again = admin.send(br#"{"op":"summary"}"#);
    assert_eq!(answered_by(&again), 2, "{again}");

    // The CLI: JSON, and the table view; its exit status follows the answer's `error`.
    let spool = epoxi.spool.clone();
    let json = run_epoxi(&[
        "queue".as_ref(),
        "summary".as_ref(),
        "--json".as_ref(),
        "--spool".as_ref(),
        spool.as_os_str(),
    ]);
    let printed: Value = serde_json::from_str(&json.stdout)
        .unwrap_or_else(|e| panic!("queue summary --json ({e}): {json:?}"));
    assert_eq!(answered_by(&printed), 2, "{printed}");
    assert_eq!(
        json.status.success(),
        printed.get("error").is_none(),
        "{json:?}"
    );
    let table = run_epoxi(&[
        "queue".as_ref(),
        "summary".as_ref(),
        "--admin".as_ref(),
        path.as_os_str(),
    ]);
    assert!(table.stdout.contains("shards: "), "{table:?}");
    let suspend = run_epoxi(&[
        "suspend".as_ref(),
        "--domain".as_ref(),
        "d0.test".as_ref(),
        "--duration".as_ref(),
        "10m".as_ref(),
        "--spool".as_ref(),
        spool.as_os_str(),
    ]);
    let answer: Value = serde_json::from_str(&suspend.stdout).expect("suspend answer");
    assert_eq!(answered_by(&answer), 2, "{answer}");
    // A mutating operation is an Admin event of its own, with its arguments and peer.
    let mut admin_events = Vec::new();
    wait_until("the Admin event of suspend", DEADLINE, || {
        admin_events = epoxi.events_of("Admin");
        admin_events.iter().any(|e| e["op"] == "suspend")
    });
    let event = admin_events
        .iter()
        .find(|e| e["op"] == "suspend")
        .expect("suspend event");
    assert_eq!(event["args"]["selector"]["domain"], "d0.test", "{event}");
    assert_eq!(event["args"]["duration_s"], 600, "{event}");
    // SAFETY: getuid has no preconditions.
    assert_eq!(event["peer_uid"], unsafe { libc::getuid() }, "{event}");
    // Reads are not logged.
    assert!(!admin_events.iter().any(|e| e["op"] == "summary"));
}

#[test]
fn no_server_and_a_second_server_are_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let none = run_epoxi(&[
        "queue".as_ref(),
        "summary".as_ref(),
        "--spool".as_ref(),
        dir.path().as_os_str(),
    ]);
    assert!(!none.status.success());
    assert!(none.stderr.contains("no epoxi server answers"), "{none:?}");

    let opts = Opts::new(dir.path()).log_dir(dir.path().join("log1"));
    let mut first = Epoxi::start(&opts);
    let second = Epoxi::try_start(&Opts::new(dir.path()).log_dir(dir.path().join("log2")));
    let ran = match second {
        Ok(_) => panic!("a second server started on the same spool"),
        Err(ran) => ran,
    };
    assert!(!ran.status.success());
    assert!(
        ran.stderr
            .contains("another epoxi is running on this spool"),
        "{}",
        ran.stderr
    );
    // Killed, the first leaves its socket behind; the next start replaces it.
    first.kill9();
    assert!(first.admin_socket().exists());
    let mut again = Epoxi::start(&opts);
    let mut admin = Admin::connect(&again.admin_socket());
    assert_eq!(answered_by(&admin.send(br#"{"op":"summary"}"#)), 1);
    again.stop();
    assert!(!again.admin_socket().exists(), "a clean stop removes it");
}

/// A config routing every `*.test` domain to `port`, after the given routes.
fn routed(routes: &[(&str, u16)], port: u16) -> Conf {
    let mut conf = Conf::default();
    for (glob, to) in routes {
        conf.raw.push_str(&format!(
            "[[route]]\ndomain = \"{glob}\"\ntarget = \"127.0.0.1:{to}\"\n"
        ));
    }
    conf.raw.push_str(&format!(
        "[[route]]\ndomain = \"*.test\"\ntarget = \"127.0.0.1:{port}\"\n"
    ));
    conf
}

fn reload(epoxi: &Epoxi) -> (bool, Value, String) {
    let ran = run_epoxi(&[
        "reload".as_ref(),
        "--spool".as_ref(),
        epoxi.spool.as_os_str(),
    ]);
    let answer = serde_json::from_str(&ran.stdout).unwrap_or(Value::Null);
    (ran.status.success(), answer, ran.stderr)
}

#[test]
fn a_broken_reload_is_refused_and_the_old_config_keeps_working() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]);
    let mut opts = Opts::new(dir.path()).shards(2);
    opts.conf = routed(&[], sink.port);
    let mut epoxi = Epoxi::start(&opts);

    std::fs::write(epoxi.config_path(), "[server\nlisten = ").expect("break the config");
    let (ok, answer, stderr) = reload(&epoxi);
    assert!(!ok, "a broken config was accepted: {answer}");
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(error.contains("reload refused"), "{answer} {stderr}");
    assert!(
        error.contains("log.toml"),
        "the error names the file: {answer}"
    );
    // A config that parses but does not validate (a route glob that does not parse).
    let mut bad = routed(&[], sink.port);
    bad.raw
        .push_str("[[route]]\ndomain = \"[\"\ntarget = \"127.0.0.1:1\"\n");
    bad.write(&epoxi.config_path());
    let (ok, answer, _) = reload(&epoxi);
    assert!(!ok, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("route")),
        "{answer}"
    );
    // SIGHUP with the same file: refused too, and said on stderr.
    epoxi.sighup();
    wait_until("the refused SIGHUP reload on stderr", DEADLINE, || {
        epoxi.stderr().matches("reload refused").count() >= 3
    });

    // The old routes still deliver.
    let injected = Inject::new(20).domains(4).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 20, "{}", injected.json);
    epoxi.wait_events("Delivery", 20);
    let refused = epoxi
        .events_of("Admin")
        .into_iter()
        .filter(|e| e["op"] == "reload" && e["result"]["error"].is_string())
        .count();
    assert!(refused >= 3, "every refused reload is logged");
    epoxi.stop();
    let report = sink.stop();
    assert_eq!(report.count("unique"), 20, "{}", report.json);
}

#[test]
fn reload_under_load_loses_nothing_and_takes_effect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old_sink = Sink::start(dir.path(), &[]);
    let new_sink = Sink::start(dir.path(), &[]);
    let mut opts = Opts::new(dir.path()).shards(2);
    opts.conf = routed(&[], old_sink.port);
    let mut epoxi = Epoxi::start(&opts);

    const MESSAGES: u64 = 3000;
    let injecting = Inject::new(MESSAGES)
        .connections(8)
        .domains(10)
        .spawn(dir.path(), epoxi.port);
    wait_until("deliveries under way", DEADLINE, || {
        epoxi.events_of("Delivery").len() >= 200
    });
    // A real change, by SIGHUP: d0.test and d1.test go to the new sink from now on.
    routed(
        &[("d0.test", new_sink.port), ("d1.test", new_sink.port)],
        old_sink.port,
    )
    .write(&epoxi.config_path());
    epoxi.sighup();
    wait_until("the SIGHUP reload", DEADLINE, || {
        epoxi.stderr().contains("configuration reloaded")
    });
    // And again by `epoxi reload`, with one more route and a retry change.
    let mut conf = routed(
        &[
            ("d0.test", new_sink.port),
            ("d1.test", new_sink.port),
            ("d2.test", new_sink.port),
        ],
        old_sink.port,
    );
    conf.set("queue", "retry_base_ms", "300");
    conf.write(&epoxi.config_path());
    let (ok, answer, stderr) = reload(&epoxi);
    assert!(ok, "reload failed: {answer} {stderr}");
    assert_eq!(answer["shards"], 2, "{answer}");
    let applied: Vec<&str> = answer["applied"]
        .as_array()
        .expect("applied")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(applied.contains(&"route"), "{answer}");
    assert!(applied.contains(&"queue"), "{answer}");
    assert_eq!(answer["restart_needed"], serde_json::json!([]), "{answer}");

    let injected = injecting.finish();
    let accepted = injected.count("accepted");
    assert!(accepted > MESSAGES / 2, "{}", injected.json);
    wait_until(
        "every accepted message delivered",
        Duration::from_secs(120),
        || epoxi.events_of("Delivery").len() as u64 >= accepted,
    );
    // Give a duplicate, if there were one, time to show.
    std::thread::sleep(Duration::from_millis(500));
    let deliveries = epoxi.events_of("Delivery");
    epoxi.stop();
    let new_peer = format!("127.0.0.1:{}", new_sink.port);
    let old = old_sink.stop();
    let new = new_sink.stop();
    assert_eq!(old.count("duplicates"), 0, "{}", old.json);
    assert_eq!(new.count("duplicates"), 0, "{}", new.json);
    let old_ids: BTreeSet<&String> = old.ids.iter().collect();
    let new_ids: BTreeSet<&String> = new.ids.iter().collect();
    assert!(
        old_ids.is_disjoint(&new_ids),
        "a message went to both sinks"
    );
    let got: BTreeSet<&String> = old_ids.union(&new_ids).copied().collect();
    let sent: BTreeSet<&String> = injected.ids.iter().collect();
    assert_eq!(got, sent, "the sinks got other messages than were accepted");
    assert_eq!(
        deliveries.len() as u64,
        accepted,
        "one delivery per message"
    );
    // The new routes took effect: the new sink got mail, for those domains only.
    assert!(!new_ids.is_empty(), "nothing went the new route");
    for d in deliveries.iter().filter(|d| d["peer"] == new_peer.as_str()) {
        let domain = d["domain"].as_str().unwrap_or_default();
        assert!(["d0.test", "d1.test", "d2.test"].contains(&domain), "{d}");
    }
    let reloads: Vec<Value> = epoxi
        .events_of("Admin")
        .into_iter()
        .filter(|e| e["op"] == "reload")
        .collect();
    assert_eq!(reloads.len(), 2, "{reloads:?}");
    assert!(
        reloads.iter().all(|e| e["result"].get("error").is_none()),
        "{reloads:?}"
    );
}
