//! Headless chromium for tests, driven over the DevTools protocol (JSON over a WebSocket):
//! open a page, evaluate script in it (reading what the page shows, clicking its buttons),
//! take a screenshot.
//!
//! Chromium runs in its own process group with a fresh profile directory; the guard's `Drop`
//! kills the group (the browser and its renderer and helper processes) and reaps the browser.
//! Every call waits at most `DEADLINE`.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

use super::DEADLINE;

/// Debian's chromium, or `$CHROMIUM`. `.ci/run` installs it.
pub fn chromium_bin() -> PathBuf {
    std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// A running headless chromium, killed with its helpers when dropped.
pub struct Browser {
    child: Child,
    /// Where its DevTools HTTP endpoint listens.
    port: u16,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub fn start() -> Browser {
        let bin = chromium_bin();
        assert!(
            bin.exists(),
            "{} is missing: `apt-get install -y chromium` (.ci/run does), or set CHROMIUM",
            bin.display()
        );
        let profile = tempfile::tempdir().expect("profile dir");
        let mut child = Command::new(&bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1280,1400",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(rest) = line.split("DevTools listening on ws://").nth(1) {
                        let _ = tx.send(rest.to_owned());
                        sent = true;
                        continue;
                    }
                }
                eprintln!("[chromium] {line}");
            }
        });
        let mut browser = Browser {
            child,
            port: 0,
            _profile: profile,
        };
        let endpoint = rx
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|_| panic!("chromium did not say where DevTools listens"));
        // 127.0.0.1:PORT/devtools/browser/ID
        let port = endpoint
            .split('/')
            .next()
            .and_then(|hostport| hostport.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {endpoint}"));
        browser.port = port;
        browser
    }

    /// A new tab showing `url`.
    pub fn open(&self, url: &str) -> Page {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(DEADLINE))
            .build()
            .into();
        // /json/new takes the URL as the query, unencoded; it must be PUT.
        let answer = agent
            .put(&format!("http://127.0.0.1:{}/json/new?{url}", self.port))
            .send_empty()
            .expect("DevTools /json/new")
            .body_mut()
            .read_to_string()
            .expect("/json/new answer");
        let target: Value = serde_json::from_str(&answer).expect("/json/new JSON");
        let ws_url = target["webSocketDebuggerUrl"]
            .as_str()
            .unwrap_or_else(|| panic!("no webSocketDebuggerUrl in {target}"));
        let stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to DevTools");
        stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("read timeout");
        let (ws, _) = tungstenite::client(ws_url, stream).expect("DevTools WebSocket");
        let mut page = Page { ws, next_id: 1 };
        page.call("Runtime.enable", json!({}));
        page
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) with plain integers; the group is the one chromium was started
            // in (process_group(0) made its pid the group id), holding only its processes.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One tab, over its DevTools WebSocket.
pub struct Page {
    ws: WebSocket<TcpStream>,
    next_id: u64,
}

impl Page {
    /// Calls a DevTools method and returns its `result`; panics on an error answer.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.try_call(method, params)
            .unwrap_or_else(|error| panic!("{method} failed: {error}"))
    }

    /// Calls a DevTools method: its `result`, or its `error`. Events that arrive meanwhile
    /// are dropped, except console errors and exceptions, which are echoed for a failing test.
    pub fn try_call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({"id": id, "method": method, "params": params});
        self.ws
            .send(Message::text(request.to_string()))
            .unwrap_or_else(|e| panic!("send {method}: {e}"));
        let deadline = Instant::now() + DEADLINE;
        loop {
            assert!(
                Instant::now() < deadline,
                "no answer to {method} within {DEADLINE:?}"
            );
            let message = match self.ws.read() {
                Ok(m) => m,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => panic!("DevTools read for {method}: {e}"),
            };
            let Message::Text(text) = message else {
                continue;
            };
            let value: Value = serde_json::from_str(text.as_str()).expect("DevTools JSON");
            if value["id"].as_u64() == Some(id) {
                if let Some(error) = value.get("error") {
                    return Err(error.clone());
                }
                return Ok(value["result"].clone());
            }
            match value["method"].as_str() {
                Some("Runtime.exceptionThrown") => {
                    eprintln!("[page] exception: {}", value["params"]["exceptionDetails"]);
                }
                Some("Runtime.consoleAPICalled")
                    if value["params"]["type"].as_str() == Some("error") =>
                {
                    eprintln!("[page] console.error: {}", value["params"]["args"]);
                }
                _ => {}
            }
        }
    }

    /// The value of a script expression in the page (promises awaited); panics when it throws.
    pub fn eval(&mut self, expression: &str) -> Value {
        self.try_eval(expression)
            .unwrap_or_else(|e| panic!("script `{expression}` failed: {e}"))
    }

    /// The value of a script expression, or why there is none (it threw, or the page was
    /// between two documents).
    pub fn try_eval(&mut self, expression: &str) -> Result<Value, Value> {
        let result = self.try_call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        )?;
        if let Some(e) = result.get("exceptionDetails") {
            return Err(e.clone());
        }
        Ok(result["result"]["value"].clone())
    }

    /// Polls `expression` until it is `true` (a page still loading counts as not yet);
    /// panics naming `what` after `DEADLINE`.
    pub fn wait_for(&mut self, what: &str, expression: &str) {
        let deadline = Instant::now() + DEADLINE;
        while self.try_eval(expression).ok() != Some(Value::Bool(true)) {
            if Instant::now() >= deadline {
                let seen = self
                    .try_eval("location.href + '\\n' + document.body.innerText.slice(0, 2000)")
                    .unwrap_or_else(|e| e);
                panic!(
                    "timed out after {DEADLINE:?} waiting for {what} (`{expression}`); the page \
                     shows:\n{}",
                    seen.as_str().unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Saves a PNG of the whole page at `path`.
    pub fn screenshot(&mut self, path: &Path) {
        use base64::Engine as _;
        let shot = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("screenshot base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("artefact dir");
        }
        std::fs::write(path, png).expect("write the screenshot");
    }
}
