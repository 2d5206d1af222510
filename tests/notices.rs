//! Delivery status notices end to end: the real binary relaying to the loadgen's smart sink
//! (`tempfail@` gets a real 4xx, `permfail@` a 550), its notices to the sender's domain caught
//! by aiosmtpd and parsed with Python's `email` package: a delay notice (RFC 3464
//! `Action: delayed`) after `notices.delay_after_s`, once, across a restart too; the bounce
//! notice; the listener's and tenant's switches; dead letters.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{wait_until, Aiosmtpd, Epoxi, Opts, Sink, Smtp};
use serde_json::Value;

/// The sender's domain: routed to aiosmtpd, which keeps the notices.
const SENDER: &str = "alice@sender.example";

/// Routes: the sender's domain to the notice catcher, `*.test` to the sink.
fn routes(catcher: u16, sink: u16) -> String {
    format!(
        "[[route]]\ndomain = \"sender.example\"\ntarget = \"127.0.0.1:{catcher}\"\n\
         [[route]]\ndomain = \"*.test\"\ntarget = \"127.0.0.1:{sink}\"\n"
    )
}

/// The `.eml` files aiosmtpd stored in `dir`, in arrival order.
fn caught(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "eml"))
                .filter_map(|p| {
                    let n = p.file_stem()?.to_str()?.parse().ok()?;
                    Some((n, p))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files.into_iter().map(|(_, p)| p).collect()
}

/// A notice parsed by Python's `email`: the report's content type and report-type, the
/// per-message and per-recipient fields of its message/delivery-status part, the type of the
/// returned part, and whether Python found defects.
fn parse_notice(path: &Path) -> Value {
    const SCRIPT: &str = r#"
import email, json, sys
from email import policy
msg = email.message_from_binary_file(open(sys.argv[1], 'rb'), policy=policy.compat32)
out = {
    "content_type": msg.get_content_type(),
    "report_type": msg.get_param("report-type"),
    "subject": msg["Subject"],
    "from": msg["From"],
    "auto_submitted": msg["Auto-Submitted"],
    "parts": [p.get_content_type() for p in msg.get_payload()],
    "defects": [str(d) for d in msg.defects],
}
for part in msg.walk():
    if part.get_content_type() == "message/delivery-status":
        blocks = part.get_payload()
        out["per_message"] = dict(blocks[0].items())
        out["per_recipient"] = [dict(b.items()) for b in blocks[1:]]
print(json.dumps(out))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(path)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python could not parse {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("python's json")
}

/// Send one message from `from` to `rcpts` on `port`, with `headers` on top.
fn send(port: u16, from: &str, rcpts: &[&str], headers: &str) {
    let mut s = Smtp::connect(port);
    s.reply();
    s.expect("EHLO client.test", 250);
    let rcpts: Vec<String> = rcpts.iter().map(|r| (*r).to_owned()).collect();
    let body = format!("{headers}{}", common::message_body("n1", &["hello"]));
    let reply = s.send_message(from, &rcpts, &body);
    assert_eq!(reply.code, 250, "{}", reply.text);
    s.expect("QUIT", 221);
}

#[test]
fn delay_and_bounce_notices_are_rfc3464_reports_and_a_delay_goes_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("caught");
    let catcher_port = common::dead_port();
    let _catcher = Aiosmtpd::start(catcher_port, &store);
    let sink = Sink::start(dir.path(), &["--smart"]);
    let mut opts = Opts::new(dir.path())
        .set("notices", "delay_after_s", "1")
        .set("queue", "max_age_s", "3600");
    opts.conf.raw = routes(catcher_port, sink.port);
    let mut epoxi = Epoxi::start(&opts);
    send(
        epoxi.port,
        SENDER,
        &["tempfail@x.test", "permfail@x.test"],
        "",
    );
    // One bounce notice at once, one delay notice after a second of retries.
    wait_until("two notices", Duration::from_secs(30), || {
        caught(&store).len() >= 2
    });
    let notices: Vec<Value> = caught(&store).iter().map(|p| parse_notice(p)).collect();
    let (delay, bounce): (Vec<&Value>, Vec<&Value>) = notices
        .iter()
        .partition(|n| n["per_recipient"][0]["Action"] == "delayed");
    assert_eq!((delay.len(), bounce.len()), (1, 1), "{notices:#?}");
    for n in &notices {
        assert_eq!(n["content_type"], "multipart/report", "{n}");
        assert_eq!(n["report_type"], "delivery-status", "{n}");
        assert_eq!(n["defects"], serde_json::json!([]), "{n}");
        assert_eq!(n["auto_submitted"], "auto-replied", "{n}");
        assert_eq!(
            n["parts"],
            serde_json::json!([
                "text/plain",
                "message/delivery-status",
                "text/rfc822-headers"
            ]),
            "{n}"
        );
        assert_eq!(
            n["per_message"]["Reporting-MTA"], "dns; mx.epoxi.test",
            "{n}"
        );
        assert!(n["per_message"]["Arrival-Date"].is_string(), "{n}");
    }
    let d = &delay[0]["per_recipient"];
    assert_eq!(
        d.as_array().map(Vec::len),
        Some(1),
        "only the pending one: {d}"
    );
    assert_eq!(d[0]["Final-Recipient"], "rfc822; tempfail@x.test");
    let status = d[0]["Status"].as_str().unwrap_or("");
    assert!(status.starts_with("4."), "a delay is 4.x.x: {d}");
    assert!(d[0]["Will-Retry-Until"].is_string(), "{d}");
    assert!(
        d[0]["Diagnostic-Code"]
            .as_str()
            .is_some_and(|c| c.starts_with("smtp; 4")),
        "the last reply: {d}"
    );
    assert!(delay[0]["subject"]
        .as_str()
        .is_some_and(|s| s.contains("Delayed")));
    let b = &bounce[0]["per_recipient"];
    assert_eq!(b[0]["Final-Recipient"], "rfc822; permfail@x.test");
    assert_eq!(b[0]["Action"], "failed");
    assert_eq!(b[0]["Status"], "5.1.1");
    assert!(b[0].get("Will-Retry-Until").is_none(), "{b}");
    let lines = epoxi.events_of("Notice");
    assert!(
        lines.iter().any(|l| l["notice_action"] == "delayed"),
        "{lines:?}"
    );

    // The delay notice is recorded: after a restart the recipient keeps being retried, and
    // no second delay notice goes.
    epoxi.stop();
    let epoxi = Epoxi::start(&opts);
    let before = epoxi.events_of("TransientFailure").len();
    wait_until("retries after the restart", Duration::from_secs(30), || {
        epoxi.events_of("TransientFailure").len() >= before + 3
    });
    assert_eq!(caught(&store).len(), 2, "no second delay notice");
    drop(epoxi);
    drop(sink);
}

#[test]
fn notice_switches_per_listener_and_per_tenant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("caught");
    let catcher_port = common::dead_port();
    let _catcher = Aiosmtpd::start(catcher_port, &store);
    let sink = Sink::start(dir.path(), &["--smart"]);
    let quiet_port = common::dead_port();
    let mut opts = Opts::new(dir.path())
        .set("notices", "delay_after_s", "1")
        .set("queue", "max_age_s", "3600");
    opts.conf.raw = format!(
        "{}[[listener]]\naddress = \"127.0.0.1:{quiet_port}\"\nnotices = []\n\
         [[tenant]]\nname = \"hush\"\nnotices = [\"success\"]\n",
        routes(catcher_port, sink.port)
    );
    let epoxi = Epoxi::start(&opts);
    wait_until("the quiet listener", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", quiet_port)).is_ok()
    });
    // Through the listener without notices, and from the tenant without failure or delay
    // notices: none. The control message (main listener, no tenant) gets both.
    send(
        quiet_port,
        "quiet@sender.example",
        &["tempfail@x.test", "permfail@x.test"],
        "",
    );
    send(
        epoxi.port,
        "tenant@sender.example",
        &["tempfail@y.test", "permfail@y.test"],
        "X-Tenant: Hush\r\n",
    );
    send(
        epoxi.port,
        SENDER,
        &["tempfail@z.test", "permfail@z.test"],
        "",
    );
    wait_until("three bounces", Duration::from_secs(30), || {
        epoxi.events_of("Bounce").len() >= 3
    });
    wait_until("the control's two notices", Duration::from_secs(30), || {
        caught(&store).len() >= 2
    });
    // Every pending recipient has been retried well past delay_after_s meanwhile.
    let deferred = epoxi.events_of("TransientFailure").len();
    wait_until("more retries", Duration::from_secs(30), || {
        epoxi.events_of("TransientFailure").len() >= deferred + 6
    });
    let envs: Vec<String> = std::fs::read_dir(&store)
        .expect("store")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "env"))
        .map(|p| std::fs::read_to_string(p).expect("env"))
        .collect();
    assert_eq!(envs.len(), 2, "{envs:?}");
    for env in &envs {
        assert!(env.contains(SENDER), "only the control's sender: {env}");
    }
    drop(epoxi);
    drop(sink);
}

#[test]
fn a_permanent_failure_leaves_a_dead_letter() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("caught");
    let catcher_port = common::dead_port();
    let _catcher = Aiosmtpd::start(catcher_port, &store);
    let sink = Sink::start(dir.path(), &["--smart"]);
    let mut opts = Opts::new(dir.path()).set("dead_letter", "enabled", "true");
    opts.conf.raw = routes(catcher_port, sink.port);
    let mut epoxi = Epoxi::start(&opts);
    send(
        epoxi.port,
        SENDER,
        &["permfail@x.test", "someone@x.test"],
        "X-Tenant: acme\r\n",
    );
    let dead = opts.spool.join("deadletter").join("shard-0");
    wait_until("a dead letter", Duration::from_secs(30), || {
        std::fs::read_dir(&dead).is_ok_and(|rd| {
            rd.filter_map(|e| e.ok())
                .any(|e| e.path().extension().is_some_and(|x| x == "json"))
        })
    });
    epoxi.stop();
    let json = std::fs::read_dir(&dead)
        .expect("dead letters")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "json"))
        .expect("json");
    let letter: Value =
        serde_json::from_slice(&std::fs::read(&json).expect("read")).expect("dead letter json");
    assert_eq!(letter["sender"], SENDER, "{letter}");
    assert_eq!(letter["tenant"], "acme", "{letter}");
    let rcpts = letter["recipients"].as_array().expect("recipients");
    assert_eq!(rcpts.len(), 1, "only the failed one: {letter}");
    assert_eq!(rcpts[0]["address"], "permfail@x.test");
    assert_eq!(rcpts[0]["outcome"], "bounced");
    assert_eq!(rcpts[0]["code"], 550);
    assert_eq!(rcpts[0]["bounce_category"], "InvalidRecipient", "{letter}");
    let eml = std::fs::read(json.with_extension("eml")).expect("eml");
    assert!(common::find(&eml, b"X-Loadgen-Id: n1").is_some());
    assert!(common::find(&eml, b"Received: ").is_some(), "as spooled");
    // `epoxi deadletter list` reads the directory, no server needed.
    let ran = common::run_epoxi(&[
        std::ffi::OsStr::new("deadletter"),
        "list".as_ref(),
        "--spool".as_ref(),
        opts.spool.as_os_str(),
    ]);
    assert!(ran.status.success(), "{}", ran.stderr);
    let listed: Vec<Value> = ran
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(listed.len(), 1, "{}", ran.stdout);
    assert_eq!(listed[0]["reception_id"], letter["reception_id"]);
    assert_eq!(listed[0]["recipients"][0]["address"], "permfail@x.test");
    drop(sink);

    // Re-injected once the next hop takes it: a sink that accepts everything, and the dead
    // letter submitted again to its failed recipient only, then gone.
    let sink = Sink::start(dir.path(), &[]);
    opts.conf.raw = routes(catcher_port, sink.port);
    let mut epoxi = Epoxi::start(&opts);
    // Through the running server's admin socket (`epoxi reinject`): shard 0 reads the
    // directories and submits each through reception.
    let ran = common::run_epoxi(&[
        std::ffi::OsStr::new("reinject"),
        "--json".as_ref(),
        "--spool".as_ref(),
        opts.spool.as_os_str(),
    ]);
    assert!(ran.status.success(), "{}\n{}", ran.stdout, ran.stderr);
    let report: Value = serde_json::from_str(ran.stdout.trim()).expect("report");
    assert_eq!(
        report["reinjected"][0]["dead_letter"],
        letter["reception_id"]
    );
    assert_eq!(report["reinjected"][0]["recipients"], 1);
    // (The log directory holds the first run's lines too.)
    wait_until("the re-injected delivery", Duration::from_secs(30), || {
        epoxi
            .events_of("Delivery")
            .iter()
            .any(|d| d["recipient"] == "permfail@x.test" && d["sender"] == SENDER)
    });
    assert!(
        !json.exists() && !json.with_extension("eml").exists(),
        "removed"
    );
    epoxi.stop();
    let report = sink.stop();
    assert_eq!(report.count("unique"), 1, "{}", report.json);
}
