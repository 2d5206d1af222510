//! The integration-test harness: the real `epoxi` binary and the `epoxi-loadgen` injector and
//! sink, run as child processes on loopback with ephemeral ports and temporary directories.
//!
//! Every process a test starts is owned by a guard whose `Drop` kills and reaps it, so a failing
//! assertion never leaves an MTA or a sink running. Every wait has a deadline: a test fails
//! with what it was waiting for instead of hanging.

// Each test file uses a different part of the harness.
#![allow(dead_code)]

pub mod browser;
pub mod dns;
pub mod tlspeers;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Longest any single wait in a test may take. Generous, because tests run in parallel on two
/// cores, but bounded, so a broken build fails instead of hanging.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// How often a wait re-checks its condition.
const POLL: Duration = Duration::from_millis(20);

/// Polls `cond` until it holds; panics naming `what` after `within`.
pub fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        thread::sleep(POLL);
    }
}

/// A loopback port nothing listens on: bound once by us and released. Another process could
/// take it in between, which is unlikely enough for a test.
pub fn dead_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a probe port");
    listener.local_addr().expect("probe address").port()
}

/// A number for output files, unique in this test process.
fn next_file_number() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Sends `signal` to `pid`.
fn signal(pid: u32, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) takes plain integers; sending a signal to our own child is harmless.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {signal}) failed: {}",
        std::io::Error::last_os_error()
    );
}

/// Waits for `child` to exit, killing it if it outlives `within`.
fn wait_child(child: &mut Child, what: &str, within: Duration) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {within:?}");
        }
        thread::sleep(POLL);
    }
}

/// Collects a child's output stream in the background, so it never blocks on a full pipe and
/// tests can look at what it printed so far.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<String>>);

impl Captured {
    fn spawn(stream: impl Read + Send + 'static, echo: &'static str) -> Captured {
        let captured = Captured::default();
        let text = captured.0.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
                // Shown by the test runner only when the test fails.
                if !echo.is_empty() {
                    eprint!("[{echo}] {line}");
                }
                text.lock().expect("capture lock").push_str(&line);
                line.clear();
            }
        });
        captured
    }

    fn text(&self) -> String {
        self.0.lock().expect("capture lock").clone()
    }
}

/// The `epoxi-loadgen` binary, built once per test process in the test binary's profile.
pub fn loadgen_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        // <target>/<profile>/deps/<test>-<hash>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in <target>/<profile>/deps")
            .to_owned();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(env!("CARGO_MANIFEST_DIR")).args([
            "build",
            "--quiet",
            "-p",
            "epoxi-loadgen",
        ]);
        if release {
            cmd.arg("--release");
        }
        // Build where this test binary was built, whatever CARGO_TARGET_DIR says.
        if let Some(target_dir) = profile_dir.parent() {
            cmd.env("CARGO_TARGET_DIR", target_dir);
        }
        let out = cmd.output().expect("run cargo build -p epoxi-loadgen");
        assert!(
            out.status.success(),
            "cargo build -p epoxi-loadgen failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = profile_dir.join("epoxi-loadgen");
        assert!(bin.exists(), "{} missing after the build", bin.display());
        bin
    })
}

/// An epoxi configuration file: `[section] key = value` lines with TOML literals.
/// The defaults suit tests: unpinned shards, little io_uring memory, fast retries.
#[derive(Clone, Debug)]
pub struct Conf {
    sections: BTreeMap<String, BTreeMap<String, String>>,
    /// Extra TOML appended verbatim, for tests of bad files.
    pub raw: String,
}

impl Default for Conf {
    fn default() -> Self {
        let mut conf = Conf {
            sections: BTreeMap::new(),
            raw: String::new(),
        };
        conf.set("shards", "pin", "false")
            .set("shards", "io_memory_bytes", "524288")
            .set("queue", "retry_base_ms", "200")
            .set("queue", "retry_cap_ms", "1000")
            .set("delivery", "connect_timeout_ms", "2000")
            .set("delivery", "reply_timeout_ms", "10000")
            .set("delivery", "idle_timeout_ms", "1000")
            .set("server", "hostname", "\"mx.epoxi.test\"")
            .set("server", "shutdown_grace_s", "10");
        conf
    }
}

impl Conf {
    /// Sets `section.key` to the TOML literal `value` (strings need their quotes).
    pub fn set(&mut self, section: &str, key: &str, value: &str) -> &mut Conf {
        self.sections
            .entry(section.to_owned())
            .or_default()
            .insert(key.to_owned(), value.to_owned());
        self
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        for (section, keys) in &self.sections {
            text.push_str(&format!("[{section}]\n"));
            for (key, value) in keys {
                text.push_str(&format!("{key} = {value}\n"));
            }
        }
        text.push_str(&self.raw);
        text
    }

    /// Writes the file to `path` and returns it.
    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.render()).expect("write config file");
        path.to_owned()
    }
}

/// How to start one epoxi process.
#[derive(Clone, Debug)]
pub struct Opts {
    pub shards: usize,
    pub conf: Conf,
    /// `--route '*.test=127.0.0.1:PORT'` when set.
    pub route_port: Option<u16>,
    /// `--resolver IP:PORT` for each, in order; without any, a dead loopback port, so that no
    /// test ever sends a DNS query off this machine.
    pub resolvers: Vec<SocketAddr>,
    /// `--delivery-port PORT`: the port delivery connects to on MX hosts, instead of 25.
    pub delivery_port: Option<u16>,
    pub spool: PathBuf,
    pub log_dir: PathBuf,
    /// `--log-format FORMAT` (a global flag, before `serve`) when set; `human` otherwise.
    pub log_format: Option<String>,
}

/// One HTTP response as a real client (Python's urllib) got it.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpReply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "HTTP {} body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Python's urllib as the HTTP client: sends one request, never follows redirects, and
/// returns whatever status came back (4xx and 5xx included).
const URLLIB_CLIENT: &str = r#"
import base64, json, ssl, sys, urllib.request, urllib.error
spec = json.load(sys.stdin)
class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **k):
        return None
# https: the test server's certificate is self-signed.
tls = urllib.request.HTTPSHandler(context=ssl._create_unverified_context())
opener = urllib.request.build_opener(NoRedirect, tls)
body = base64.b64decode(spec["body"]) if spec["body"] is not None else None
req = urllib.request.Request(spec["url"], data=body, method=spec["method"], headers=spec["headers"])
try:
    r = opener.open(req, timeout=spec["timeout"])
    status, headers, data = r.status, list(r.headers.items()), r.read()
except urllib.error.HTTPError as e:
    status, headers, data = e.code, list(e.headers.items()), e.read()
json.dump({"status": status, "headers": headers, "body": base64.b64encode(data).decode()}, sys.stdout)
"#;

/// Send one HTTP request with Python's urllib (a real client); `body` as given.
pub fn http_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> HttpReply {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let spec = serde_json::json!({
        "method": method,
        "url": url,
        "headers": headers.iter().map(|(n, v)| (n.to_string(), serde_json::Value::from(*v))).collect::<serde_json::Map<_, _>>(),
        "body": body.map(|b| b64.encode(b)),
        "timeout": 60,
    });
    let mut child = Command::new("python3")
        .args(["-c", URLLIB_CLIENT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(spec.to_string().as_bytes())
        .expect("write request spec");
    let out = child.wait_with_output().expect("python3 urllib");
    assert!(
        out.status.success(),
        "urllib {method} {url} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("urllib output");
    HttpReply {
        status: v["status"].as_u64().expect("status") as u16,
        headers: v["headers"]
            .as_array()
            .expect("headers")
            .iter()
            .map(|h| {
                (
                    h[0].as_str().unwrap_or("").to_owned(),
                    h[1].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect(),
        body: b64
            .decode(v["body"].as_str().expect("body"))
            .expect("base64 body"),
    }
}

/// GET with an optional bearer token.
pub fn http_get(url: &str, token: Option<&str>) -> HttpReply {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    http_request("GET", url, &headers, None)
}

/// A JSON request (POST, DELETE...) with an optional bearer token.
pub fn http_json(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: &serde_json::Value,
) -> HttpReply {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers: Vec<(&str, &str)> = vec![("Content-Type", "application/json")];
    headers.extend(auth.iter().map(|a| ("Authorization", a.as_str())));
    http_request(method, url, &headers, Some(body.to_string().as_bytes()))
}

impl Opts {
    /// Serve HTTP on a free loopback port (`Epoxi::http_url` says which).
    pub fn http(mut self) -> Opts {
        self.conf.set("http", "listen", "\"127.0.0.1:0\"");
        self
    }

    /// Spool and logs under `dir`, one shard, no route.
    pub fn new(dir: &Path) -> Opts {
        Opts {
            shards: 1,
            conf: Conf::default(),
            route_port: None,
            resolvers: Vec::new(),
            delivery_port: None,
            spool: dir.join("spool"),
            log_dir: dir.join("log"),
            log_format: None,
        }
    }

    pub fn shards(mut self, n: usize) -> Opts {
        self.shards = n;
        self
    }

    pub fn route(mut self, port: u16) -> Opts {
        self.route_port = Some(port);
        self
    }

    /// A DNS server epoxi asks, e.g. a `dns::DnsServer`'s `addr()`; several are tried in the
    /// order given.
    pub fn resolver(mut self, addr: SocketAddr) -> Opts {
        self.resolvers.push(addr);
        self
    }

    /// The SMTP port of MX hosts, e.g. the one `sinks_on_shared_port` returns.
    pub fn delivery_port(mut self, port: u16) -> Opts {
        self.delivery_port = Some(port);
        self
    }

    pub fn log_dir(mut self, dir: PathBuf) -> Opts {
        self.log_dir = dir;
        self
    }

    pub fn set(mut self, section: &str, key: &str, value: &str) -> Opts {
        self.conf.set(section, key, value);
        self
    }

    /// The operational log format on stderr: `"json"` or `"human"`.
    pub fn log_format(mut self, format: &str) -> Opts {
        self.log_format = Some(format.to_owned());
        self
    }

    /// The `epoxi [global flags] serve ...` arguments for a config file at `config_path`.
    pub fn serve_args(&self, config_path: &Path) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        if let Some(format) = &self.log_format {
            args.extend(["--log-format".into(), format.into()]);
        }
        args.extend(["serve".into(), "--config".into()]);
        args.push(config_path.into());
        args.extend(["--listen", "127.0.0.1:0", "--spool"].map(OsString::from));
        args.push(self.spool.clone().into());
        args.push("--log-dir".into());
        args.push(self.log_dir.clone().into());
        args.extend(["--shards".into(), self.shards.to_string().into()]);
        if let Some(port) = self.route_port {
            args.extend(["--route".into(), format!("*.test=127.0.0.1:{port}").into()]);
        }
        // Always a resolver on loopback: a test that forgot one must fail to resolve, not ask
        // the machine's resolver about test domains.
        let dead = [SocketAddr::from(([127, 0, 0, 1], dead_port()))];
        let resolvers = match self.resolvers.as_slice() {
            [] => &dead[..],
            given => given,
        };
        for resolver in resolvers {
            args.extend(["--resolver".into(), resolver.to_string().into()]);
        }
        if let Some(port) = self.delivery_port {
            args.extend(["--delivery-port".into(), port.to_string().into()]);
        }
        args
    }
}

/// What one shard's recovery line said.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    pub shard: usize,
    pub segments: u64,
    pub pending: u64,
    pub corrupt: u64,
    pub torn: u64,
}

/// A running `epoxi serve`, killed when dropped.
pub struct Epoxi {
    child: Child,
    pub port: u16,
    pub spool: PathBuf,
    pub log_dir: PathBuf,
    stderr: Captured,
    exit: Option<ExitStatus>,
}

impl Epoxi {
    /// Starts epoxi and waits until every shard listens.
    pub fn start(opts: &Opts) -> Epoxi {
        Epoxi::try_start(opts).unwrap_or_else(|ran| {
            panic!(
                "epoxi exited before listening ({}):\n{}",
                ran.status, ran.stderr
            )
        })
    }

    /// Starts epoxi; `Err` with what it said when it exits instead of listening.
    pub fn try_start(opts: &Opts) -> Result<Epoxi, Ran> {
        let config_path = opts.log_dir.with_extension("toml");
        opts.conf.write(&config_path);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_epoxi"));
        cmd.args(opts.serve_args(&config_path));
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn epoxi");
        let stderr = Captured::spawn(child.stderr.take().expect("stderr"), "epoxi");
        let mut epoxi = Epoxi {
            child,
            port: 0,
            spool: opts.spool.clone(),
            log_dir: opts.log_dir.clone(),
            stderr,
            exit: None,
        };
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(port) = listening_port(&epoxi.stderr.text(), "listening on ") {
                epoxi.port = port;
                return Ok(epoxi);
            }
            if let Some(status) = epoxi.child.try_wait().expect("try_wait") {
                epoxi.exit = Some(status);
                // Let the reader thread take the last lines.
                thread::sleep(Duration::from_millis(50));
                return Err(Ran {
                    status,
                    stdout: String::new(),
                    stderr: epoxi.stderr.text(),
                });
            }
            assert!(
                Instant::now() < deadline,
                "epoxi did not listen within {DEADLINE:?}:\n{}",
                epoxi.stderr.text()
            );
            thread::sleep(POLL);
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The HTTP endpoint's address (`http api on ADDR`), when `http.listen` is set (see
    /// [`Opts::http`]).
    pub fn http_addr(&self) -> SocketAddr {
        listening_addr(&self.stderr.text(), "http api on ")
            .unwrap_or_else(|| panic!("epoxi serves no HTTP:\n{}", self.stderr.text()))
    }

    /// `http://ADDR` of the HTTP endpoint.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http_addr())
    }

    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// The per-shard recovery lines printed at start.
    pub fn recovery(&self) -> Vec<Recovery> {
        self.stderr().lines().filter_map(parse_recovery).collect()
    }

    /// Messages pending over all shards at start.
    pub fn pending_at_start(&self) -> u64 {
        self.recovery().iter().map(|r| r.pending).sum()
    }

    pub fn sigterm(&self) {
        signal(self.child.id(), libc::SIGTERM);
    }

    pub fn sigint(&self) {
        signal(self.child.id(), libc::SIGINT);
    }

    /// SIGHUP: reload the configuration file it was started with (see `config_path`).
    pub fn sighup(&self) {
        signal(self.child.id(), libc::SIGHUP);
    }

    /// The configuration file it was started with; rewrite it before a reload.
    pub fn config_path(&self) -> PathBuf {
        self.log_dir.with_extension("toml")
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.spool.join("admin.sock")
    }

    /// SIGKILL, and reap: the spool is left as a crash leaves it.
    pub fn kill9(&mut self) {
        signal(self.child.id(), libc::SIGKILL);
        self.wait_exit();
    }

    /// Waits (bounded) for the process to end.
    pub fn wait_exit(&mut self) -> ExitStatus {
        if let Some(status) = self.exit {
            return status;
        }
        let status = wait_child(&mut self.child, "epoxi", DEADLINE);
        self.exit = Some(status);
        // Let the reader thread take the last lines.
        thread::sleep(Duration::from_millis(50));
        status
    }

    /// SIGTERM, then checks that it stopped cleanly with status 0.
    pub fn stop(&mut self) {
        self.sigterm();
        let status = self.wait_exit();
        let stderr = self.stderr();
        assert!(
            status.success(),
            "epoxi exited with {status} after SIGTERM:\n{stderr}"
        );
        assert!(
            stderr.contains("stopped cleanly"),
            "no clean stop:\n{stderr}"
        );
    }

    /// Every complete event-log line written so far, all shards.
    pub fn events(&self) -> Vec<Value> {
        events(&self.log_dir)
    }

    /// Events of `kind` ("Delivery", "Bounce", ...), all shards.
    pub fn events_of(&self, kind: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["type"] == kind)
            .collect()
    }

    /// Waits until at least `n` events of `kind` are logged; returns them.
    pub fn wait_events(&self, kind: &str, n: usize) -> Vec<Value> {
        self.wait_events_within(kind, n, DEADLINE)
    }

    /// As `wait_events`, with a deadline of its own (for waits that depend on retry timers
    /// on a loaded machine).
    pub fn wait_events_within(&self, kind: &str, n: usize, within: Duration) -> Vec<Value> {
        let mut found = Vec::new();
        wait_until(
            &format!("{n} {kind} events in {}", self.log_dir.display()),
            within,
            || {
                found = self.events_of(kind);
                found.len() >= n
            },
        );
        found
    }

    /// The segment files of every shard, in name order.
    pub fn segments(&self) -> Vec<PathBuf> {
        segments(&self.spool)
    }
}

impl Drop for Epoxi {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The port in a `<prefix>127.0.0.1:PORT` line.
fn listening_port(text: &str, prefix: &str) -> Option<u16> {
    listening_addr(text, prefix).map(|a| a.port())
}

/// The address after `<prefix>` in a line like `... <prefix>IP:PORT ...` (`[IPv6]:PORT` too).
fn listening_addr(text: &str, prefix: &str) -> Option<SocketAddr> {
    let line = text
        .lines()
        .find_map(|l| l.find(prefix).map(|at| &l[at + prefix.len()..]))?;
    let addr = line.split_whitespace().next()?;
    addr.parse::<SocketAddr>().ok()
}

/// `... shard 0 recovered 1 segments, 5 messages pending, 1 corrupt records, 1 torn tails`
fn parse_recovery(line: &str) -> Option<Recovery> {
    let at = line.find(" recovered ")?;
    let start = line[..at].rfind("shard ")?;
    let rest = &line[start + "shard ".len()..];
    let words: Vec<&str> = rest.split([' ', ',']).filter(|w| !w.is_empty()).collect();
    if words.get(1) != Some(&"recovered") {
        return None;
    }
    let number_before = |label: &str| -> Option<u64> {
        let at = words.iter().position(|w| *w == label)?;
        words.get(at.checked_sub(1)?)?.parse().ok()
    };
    Some(Recovery {
        shard: words.first()?.parse().ok()?,
        segments: number_before("segments")?,
        pending: number_before("messages")?,
        corrupt: number_before("corrupt")?,
        torn: number_before("torn")?,
    })
}

/// Every complete line of every `shard-*.jsonl` under `dir`. A line still being written (no
/// newline yet) is left for the next look.
pub fn events(dir: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("shard-") && n.ends_with(".jsonl"))
        })
        .collect();
    files.sort();
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        for line in complete.lines().filter(|l| !l.trim().is_empty()) {
            let value: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("bad event line in {}: {e}: {line}", file.display()));
            out.push(value);
        }
    }
    out
}

/// The `*.seg` files of every `shard-*` directory of a spool.
pub fn segments(spool: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(shards) = std::fs::read_dir(spool) else {
        return out;
    };
    for shard in shards.filter_map(Result::ok) {
        let Ok(files) = std::fs::read_dir(shard.path()) else {
            continue;
        };
        out.extend(
            files
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "seg")),
        );
    }
    out.sort();
    out
}

/// The one JSON line a loadgen command prints at its end, waited for (bounded).
fn report_line(stdout: &Captured, what: &str) -> Value {
    let mut json = None;
    wait_until(what, Duration::from_secs(5), || {
        json = stdout
            .text()
            .lines()
            .find_map(|l| serde_json::from_str(l).ok());
        json.is_some()
    });
    json.expect("report line")
}

/// A running `epoxi-loadgen sink`, killed when dropped.
pub struct Sink {
    child: Child,
    pub port: u16,
    /// Where it listens, as it said.
    pub addr: SocketAddr,
    stdout: Captured,
    stderr: Captured,
    ids_file: PathBuf,
    rcpts_file: PathBuf,
}

/// What the sink reported at exit.
#[derive(Debug)]
pub struct SinkReport {
    pub json: Value,
    /// Unique accepted X-Loadgen-Id values.
    pub ids: Vec<String>,
    /// One line per accepted message: id (or -) and its recipients.
    pub rcpt_lines: Vec<String>,
}

impl SinkReport {
    pub fn count(&self, key: &str) -> u64 {
        self.json[key]
            .as_u64()
            .unwrap_or_else(|| panic!("sink report has no `{key}`: {}", self.json))
    }
}

impl Sink {
    /// Starts a sink on an ephemeral port with `args` (e.g. `["--reply", "550:100"]`); its ids
    /// and recipients files go under `dir`.
    pub fn start(dir: &Path, args: &[&str]) -> Sink {
        Sink::start_on(dir, "127.0.0.1:0", args)
    }

    /// Starts a sink listening on `listen` (`IP:PORT`, `[IPv6]:PORT`).
    pub fn start_on(dir: &Path, listen: &str, args: &[&str]) -> Sink {
        Sink::try_start_on(dir, listen, args).unwrap_or_else(|why| panic!("{why}"))
    }

    /// Starts a sink on `listen`; `Err` with what it said when it exits instead of listening
    /// (the port is taken, say).
    pub fn try_start_on(dir: &Path, listen: &str, args: &[&str]) -> Result<Sink, String> {
        let n = next_file_number();
        let ids_file = dir.join(format!("sink-{n}.ids"));
        let rcpts_file = dir.join(format!("sink-{n}.rcpts"));
        let mut child = Command::new(loadgen_bin())
            .args(["sink", "--listen", listen])
            .arg("--ids-file")
            .arg(&ids_file)
            .arg("--rcpts-file")
            .arg(&rcpts_file)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn epoxi-loadgen sink");
        let stdout = Captured::spawn(child.stdout.take().expect("stdout"), "");
        let stderr = Captured::spawn(child.stderr.take().expect("stderr"), "sink");
        let mut sink = Sink {
            child,
            port: 0,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            stdout,
            stderr,
            ids_file,
            rcpts_file,
        };
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(addr) = listening_addr(&sink.stderr.text(), "listening on ") {
                sink.port = addr.port();
                sink.addr = addr;
                return Ok(sink);
            }
            if let Some(status) = sink.child.try_wait().expect("try_wait") {
                // Let the reader thread take the last lines.
                thread::sleep(Duration::from_millis(50));
                return Err(format!(
                    "sink on {listen} exited before listening ({status}):\n{}",
                    sink.stderr.text()
                ));
            }
            assert!(
                Instant::now() < deadline,
                "sink did not listen within {DEADLINE:?}"
            );
            thread::sleep(POLL);
        }
    }

    /// SIGTERM, then the report and files it wrote.
    pub fn stop(self) -> SinkReport {
        signal(self.child.id(), libc::SIGTERM);
        self.wait()
    }

    /// Waits (bounded) for a sink that exits by itself (`--exit-after`, `--idle-exit`).
    pub fn wait(mut self) -> SinkReport {
        let status = wait_child(&mut self.child, "sink", DEADLINE);
        assert!(
            status.success(),
            "sink exited with {status}:\n{}",
            self.stderr.text()
        );
        let json = report_line(&self.stdout, "the sink's report line");
        SinkReport {
            json,
            ids: read_lines(&self.ids_file),
            rcpt_lines: read_lines(&self.rcpts_file),
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Tries at finding one port free on every address `sinks_on_shared_port` is given.
const SHARED_PORT_ATTEMPTS_MAX: usize = 20;

/// One sink per address in `ips` ("127.0.0.2", "[::1]", ...), all on the same port, as MX hosts
/// are all reached on one delivery port. The first sink's port is picked by the kernel; when
/// another address has it taken, all start again on a new one.
pub fn sinks_on_shared_port(dir: &Path, ips: &[&str], args: &[&str]) -> (u16, Vec<Sink>) {
    let ips: Vec<IpAddr> = ips
        .iter()
        .map(|ip| {
            ip.trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .unwrap_or_else(|e| panic!("bad sink address {ip:?}: {e}"))
        })
        .collect();
    let (&first, rest) = ips.split_first().expect("at least one sink address");
    let mut last = String::new();
    'attempt: for _ in 0..SHARED_PORT_ATTEMPTS_MAX {
        let listen = SocketAddr::new(first, 0).to_string();
        let sink = Sink::start_on(dir, &listen, args);
        let port = sink.port;
        let mut sinks = vec![sink];
        for &ip in rest {
            match Sink::try_start_on(dir, &SocketAddr::new(ip, port).to_string(), args) {
                Ok(sink) => sinks.push(sink),
                Err(why) => {
                    // Dropping the sinks started so far kills them and frees the port.
                    last = why;
                    continue 'attempt;
                }
            }
        }
        return (port, sinks);
    }
    panic!("no port free on all of {ips:?} after {SHARED_PORT_ATTEMPTS_MAX} tries; last: {last}");
}

pub fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .lines()
        .map(str::to_owned)
        .collect()
}

/// What `epoxi-loadgen inject` reported.
#[derive(Debug)]
pub struct InjectReport {
    pub json: Value,
    /// X-Loadgen-Id of every message answered 250.
    pub ids: Vec<String>,
}

impl InjectReport {
    pub fn count(&self, key: &str) -> u64 {
        self.json[key]
            .as_u64()
            .unwrap_or_else(|| panic!("inject report has no `{key}`: {}", self.json))
    }
}

/// An inject run to start.
pub struct Inject {
    pub messages: u64,
    pub connections: u32,
    pub size: u64,
    pub domains: u32,
    /// `--header` fields, `Name: value`.
    pub headers: Vec<String>,
}

impl Inject {
    pub fn new(messages: u64) -> Inject {
        Inject {
            messages,
            connections: 2,
            size: 1000,
            domains: 10,
            headers: Vec::new(),
        }
    }

    /// One more header field in every message, `Name: value`.
    pub fn header(mut self, field: &str) -> Inject {
        self.headers.push(field.to_owned());
        self
    }

    pub fn connections(mut self, n: u32) -> Inject {
        self.connections = n;
        self
    }

    pub fn size(mut self, bytes: u64) -> Inject {
        self.size = bytes;
        self
    }

    pub fn domains(mut self, n: u32) -> Inject {
        self.domains = n;
        self
    }

    /// Runs to completion against `port`, writing its ids file under `dir`.
    pub fn run(&self, dir: &Path, port: u16) -> InjectReport {
        self.spawn(dir, port).finish()
    }

    /// Starts the run in the background.
    pub fn spawn(&self, dir: &Path, port: u16) -> Injecting {
        let n = next_file_number();
        let ids_file = dir.join(format!("inject-{n}.ids"));
        let mut child = Command::new(loadgen_bin())
            .arg("inject")
            .args(["--target", &format!("127.0.0.1:{port}")])
            .args(["--messages", &self.messages.to_string()])
            .args(["--connections", &self.connections.to_string()])
            .args(["--size", &self.size.to_string()])
            .args(["--domains", &self.domains.to_string()])
            .args(["--timeout-s", "10"])
            .args(self.headers.iter().flat_map(|h| ["--header", h.as_str()]))
            .arg("--ids-file")
            .arg(&ids_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn epoxi-loadgen inject");
        let stdout = Captured::spawn(child.stdout.take().expect("stdout"), "");
        let stderr = Captured::spawn(child.stderr.take().expect("stderr"), "inject");
        Injecting {
            child,
            stdout,
            stderr,
            ids_file,
            done: false,
        }
    }
}

/// A running inject, killed when dropped.
pub struct Injecting {
    child: Child,
    stdout: Captured,
    stderr: Captured,
    ids_file: PathBuf,
    done: bool,
}

impl Injecting {
    pub fn finish(mut self) -> InjectReport {
        let status = wait_child(&mut self.child, "inject", Duration::from_secs(60));
        self.done = true;
        assert!(
            status.success(),
            "inject exited with {status}:\n{}",
            self.stderr.text()
        );
        let json = report_line(&self.stdout, "the injector's report line");
        InjectReport {
            json,
            ids: read_lines(&self.ids_file),
        }
    }
}

impl Drop for Injecting {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A blocking SMTP client for tests that need more than the injector sends: several
/// recipients, pipelining by hand, sessions cut in the middle.
pub struct Smtp {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

/// One SMTP reply: its code and its lines, joined with newlines.
#[derive(Clone, Debug)]
pub struct Reply {
    pub code: u16,
    pub text: String,
}

impl Smtp {
    pub fn connect(port: u16) -> Smtp {
        Smtp::from_stream(TcpStream::connect(("127.0.0.1", port)).expect("connect to epoxi"))
    }

    pub fn from_stream(stream: TcpStream) -> Smtp {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .expect("write timeout");
        // Each write its own segment, so tests can split input where they like.
        stream.set_nodelay(true).expect("nodelay");
        let reader = BufReader::new(stream.try_clone().expect("clone stream"));
        Smtp { stream, reader }
    }

    /// Writes raw bytes (several commands at once, or part of a body).
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to epoxi");
    }

    /// Writes raw bytes, telling whether the server still took them.
    pub fn try_send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).is_ok()
    }

    /// Reads one (possibly multi-line) reply; `None` when the server closed the connection.
    pub fn try_reply(&mut self) -> Option<Reply> {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            let line = line.trim_end_matches(['\r', '\n']);
            assert!(line.len() >= 3, "short reply line {line:?}");
            let code: u16 = line[..3]
                .parse()
                .unwrap_or_else(|_| panic!("bad reply {line:?}"));
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return Some(Reply { code, text });
            }
        }
    }

    pub fn reply(&mut self) -> Reply {
        self.try_reply()
            .expect("a reply before the connection closed")
    }

    /// Sends one command line and reads its reply.
    pub fn cmd(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// Sends a command and asserts the reply code.
    pub fn expect(&mut self, line: &str, code: u16) -> Reply {
        let reply = self.cmd(line);
        assert_eq!(reply.code, code, "{line} got {}", reply.text);
        reply
    }

    /// A whole transaction, one command at a time; returns the reply to the final dot.
    pub fn send_message(&mut self, from: &str, rcpts: &[String], body: &str) -> Reply {
        self.expect(&format!("MAIL FROM:<{from}>"), 250);
        for rcpt in rcpts {
            self.expect(&format!("RCPT TO:<{rcpt}>"), 250);
        }
        self.expect("DATA", 354);
        self.send(body.as_bytes());
        self.send(b".\r\n");
        self.reply()
    }
}

/// A small message with an X-Loadgen-Id header, CRLF lines, dot-stuffed, without the final dot.
pub fn message_body(id: &str, extra_lines: &[&str]) -> String {
    let mut body = format!(
        "From: <sender@client.test>\r\nTo: undisclosed-recipients:;\r\n\
         Subject: epoxi integration test\r\nX-Loadgen-Id: {id}\r\n\r\n"
    );
    for line in extra_lines {
        if line.starts_with('.') {
            body.push('.');
        }
        body.push_str(line);
        body.push_str("\r\n");
    }
    body.push_str("Bye.\r\n");
    body
}

/// Whether `haystack` contains `needle`, and where first.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The distinct values of a string field over some events.
pub fn field_set(events: &[Value], key: &str) -> std::collections::BTreeSet<String> {
    events
        .iter()
        .filter_map(|e| e[key].as_str().map(str::to_owned))
        .collect()
}

/// What a short-lived `epoxi` command did.
#[derive(Debug)]
pub struct Ran {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `epoxi ARGS...` to completion (bounded by `DEADLINE`, killed past it).
pub fn run_epoxi<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Ran {
    let mut child = Command::new(env!("CARGO_BIN_EXE_epoxi"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn epoxi");
    let stdout = Captured::spawn(child.stdout.take().expect("stdout"), "");
    let stderr = Captured::spawn(child.stderr.take().expect("stderr"), "epoxi");
    let status = wait_child(&mut child, "epoxi", DEADLINE);
    // The readers finish once the pipes close, right after the exit.
    thread::sleep(Duration::from_millis(50));
    Ran {
        status,
        stdout: stdout.text(),
        stderr: stderr.text(),
    }
}

/// aiosmtpd on `port`, storing every message into `dir` (tests/data/aiosmtpd_store.py: `<n>.eml`,
/// its envelope `<n>.env` and its MAIL parameters `<n>.opts`); killed when dropped.
pub struct Aiosmtpd(std::process::Child);

impl Aiosmtpd {
    pub fn start(port: u16, dir: &Path) -> Aiosmtpd {
        std::fs::create_dir_all(dir).expect("store dir");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/aiosmtpd_store.py");
        let child = std::process::Command::new("python3")
            .arg(script)
            .arg(port.to_string())
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run aiosmtpd (pip install aiosmtpd)");
        let server = Aiosmtpd(child);
        wait_until("aiosmtpd listening", DEADLINE, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        server
    }
}

impl Drop for Aiosmtpd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
