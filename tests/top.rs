//! `epoxi top` under a pseudo-terminal (tests/data/pty_screen.py keeps its screen through a
//! terminal emulator): it shows the totals `/api/dashboard/v1` has, the destination site, and
//! quits on `q`; without a terminal it refuses with a clear error.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::{run_epoxi, wait_until, Epoxi, Inject, Opts, Sink, DEADLINE};
use serde_json::Value;

/// How long `q` may take to end `epoxi top`: it reads keys every 100 ms.
const QUIT_WITHIN: Duration = Duration::from_secs(10);

/// A command under a pseudo-terminal; killed (with the terminal, which ends the command)
/// when dropped.
struct Pty {
    child: Child,
    stdin: ChildStdin,
    screen: PathBuf,
    exit: mpsc::Receiver<Value>,
}

impl Pty {
    fn start(dir: &Path, name: &str, args: &[&str]) -> Pty {
        let screen = dir.join(format!("{name}.screen"));
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/pty_screen.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(&screen)
            .args(["120", "40", "120", "--", env!("CARGO_BIN_EXE_epoxi")])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn pty_screen.py (python3 with pyte)");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, exit) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        Pty {
            child,
            stdin,
            screen,
            exit,
        }
    }

    fn screen(&self) -> String {
        std::fs::read_to_string(&self.screen).unwrap_or_default()
    }

    /// Waits until the screen shows `text`; panics with the screen after `DEADLINE`.
    fn wait_for(&self, text: &str) {
        let deadline = std::time::Instant::now() + DEADLINE;
        while !self.screen().contains(text) {
            assert!(
                std::time::Instant::now() < deadline,
                "the screen never showed {text:?}:\n{}",
                self.screen()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn key(&mut self, key: &str) {
        writeln!(self.stdin, "{key}").expect("type a key");
        self.stdin.flush().expect("flush");
    }

    /// The command's exit code once it ended (within `within`).
    fn exit_code(&self, within: Duration) -> Value {
        let report = self
            .exit
            .recv_timeout(within)
            .unwrap_or_else(|_| panic!("no exit within {within:?}:\n{}", self.screen()));
        report["exit"].clone()
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dashboard(http: u16) -> Value {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(DEADLINE))
        .build()
        .into();
    let body = agent
        .get(&format!("http://127.0.0.1:{http}/api/dashboard/v1"))
        .call()
        .expect("GET /api/dashboard/v1")
        .body_mut()
        .read_to_string()
        .expect("body");
    serde_json::from_str(&body).expect("dashboard JSON")
}

/// The totals line `epoxi top` draws for `d`.
fn totals_line(d: &Value) -> String {
    let t = &d["totals"];
    let n = |k: &str| t[k].as_u64().unwrap_or_else(|| panic!("totals.{k} in {d}"));
    format!(
        "Totals  received {}  delivered {}  bounced {}  transient {}  expired {}  rejected {}",
        n("received"),
        n("delivered"),
        n("bounced"),
        n("transient_failures"),
        n("expired"),
        n("rejected")
    )
}

#[test]
fn top_shows_the_dashboard_figures_and_quits_on_q() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &["--reply", "250:80,550:20"]);
    // No tokens: loopback clients are served, as `epoxi top` on the server's machine is.
    let epoxi = Epoxi::start(&Opts::new(dir.path()).shards(2).route(sink.port).set(
        "http",
        "listen",
        "\"127.0.0.1:0\"",
    ));
    let http = epoxi.http_addr().port();
    let url = format!("http://127.0.0.1:{http}");

    let mut top = Pty::start(dir.path(), "top", &["top", "--url", &url]);
    top.wait_for("Epoxi mx.epoxi.test  2 shards");

    let report = Inject::new(60).run(dir.path(), epoxi.port);
    let accepted = report.count("accepted");
    wait_until("every recipient delivered or bounced", DEADLINE, || {
        let d = dashboard(http);
        let t = &d["totals"];
        t["delivered"].as_u64().unwrap_or(0) + t["bounced"].as_u64().unwrap_or(0) >= accepted
            && d["queue"]["depth"].as_u64() == Some(0)
    });
    // Mail has stopped: the screen shows what the endpoint says (within a refresh or two).
    let d = dashboard(http);
    // `received` counts a message once per shard holding recipients of it: at least once.
    assert!(d["totals"]["received"].as_u64() >= Some(accepted), "{d}");
    assert!(d["totals"]["bounced"].as_u64() > Some(0), "{d}");
    top.wait_for(&totals_line(&d));
    top.wait_for("Queue   depth 0  ready 0  scheduled 0  in_flight 0");
    if let Some(site) = d["sites"][0]["site"].as_str() {
        top.wait_for(site);
    }
    for category in d["bounce_categories"]
        .as_object()
        .expect("categories")
        .keys()
    {
        top.wait_for(category);
    }
    top.key("q");
    assert_eq!(
        top.exit_code(QUIT_WITHIN),
        Value::from(0),
        "{}",
        top.screen()
    );

    // The URL from the configuration's http.listen.
    let config = dir.path().join("top.toml");
    std::fs::write(&config, format!("[http]\nlisten = \"127.0.0.1:{http}\"\n")).expect("config");
    let config = config.display().to_string();
    let mut top = Pty::start(dir.path(), "top-config", &["top", "--config", &config]);
    top.wait_for(&totals_line(&d));
    top.key("q");
    assert_eq!(top.exit_code(QUIT_WITHIN), Value::from(0));

    // A server that is not there: the screen says so, and q still quits.
    let dead = format!("http://127.0.0.1:{}", common::dead_port());
    let mut top = Pty::start(dir.path(), "top-dead", &["top", "--url", &dead]);
    top.wait_for("error: ");
    top.key("q");
    assert_eq!(top.exit_code(QUIT_WITHIN), Value::from(0));

    // Not a terminal: a clear error, no escape codes.
    let ran = run_epoxi(&["top", "--url", url.as_str()]);
    assert_eq!(ran.status.code(), Some(2), "{ran:?}");
    assert!(ran.stderr.contains("needs a terminal"), "{ran:?}");
    assert!(ran.stdout.is_empty(), "{ran:?}");
    drop(epoxi);
    sink.stop();
}
