//! Event webhooks against a real HTTP receiver on loopback: every event-log line arrives, in
//! order per shard, through a receiver outage (while mail flows and the log rotates) and
//! through epoxi restarts, with nothing skipped and nothing sent twice beyond one
//! at-least-once redelivery of a last batch; the `events` filter, `format = "object"` and
//! custom headers.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::{wait_until, Epoxi, Inject, Opts, Sink, DEADLINE};
use serde_json::Value;

/// One request the receiver took.
#[derive(Clone, Debug)]
struct Post {
    path: String,
    /// Header names lower case.
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Post {
    /// The event lines in the body: an array's elements, or the one object.
    fn lines(&self) -> Vec<Value> {
        match serde_json::from_slice::<Value>(&self.body) {
            Ok(Value::Array(items)) => items,
            Ok(v @ Value::Object(_)) => vec![v],
            other => panic!("a POST body that is not JSON events: {other:?}"),
        }
    }
}

/// A small HTTP/1.1 receiver on a std listener: records every POST, answers 200 and closes.
/// Stopped (its port closed) when dropped; `start_on` the same port brings it back.
struct Receiver {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Receiver {
    fn start(posts: Arc<Mutex<Vec<Post>>>) -> Receiver {
        Receiver::start_on(0, posts)
    }

    fn start_on(port: u16, posts: Arc<Mutex<Vec<Post>>>) -> Receiver {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the receiver");
        let port = listener.local_addr().expect("receiver address").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, posts) = (stop.clone(), posts.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            if let Some(post) = serve(conn) {
                                posts.lock().expect("posts").push(post);
                            }
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        Receiver {
            port,
            stop,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("receiver thread");
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Read one request, answer it 200, record it (None: not a whole request).
fn serve(mut conn: TcpStream) -> Option<Post> {
    conn.set_nonblocking(false).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = common::find(&buf, b"\r\n\r\n") {
            break at;
        }
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request = lines.next()?;
    let path = request.split(' ').nth(1)?.to_owned();
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers.get("content-length")?.parse().ok()?;
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .ok()?;
    Some(Post {
        path,
        headers,
        body,
    })
}

/// Every complete line of every log file of `dir`, per shard, in file order (the rotated
/// files by stamp, then the live one).
fn log_lines(dir: &Path) -> BTreeMap<u64, Vec<Value>> {
    let mut files: Vec<((u64, u8, u64, u64), std::path::PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir).expect("log dir").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name
            .strip_prefix("shard-")
            .and_then(|r| r.strip_suffix(".jsonl"))
        else {
            continue;
        };
        let key = match rest.split_once('.') {
            None => (rest.parse().expect("shard"), 1, 0, 0),
            Some((shard, stamp)) => {
                let (ms, k) = stamp.split_once('-').unwrap_or((stamp, "0"));
                let shard = shard.parse().expect("shard");
                (shard, 0, ms.parse().expect("ms"), k.parse().expect("k"))
            }
        };
        files.push((key, entry.path()));
    }
    files.sort();
    let mut out: BTreeMap<u64, Vec<Value>> = BTreeMap::new();
    for ((shard, ..), path) in files {
        let text = std::fs::read_to_string(&path).expect("read log");
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        for line in complete.lines().filter(|l| !l.trim().is_empty()) {
            let v = serde_json::from_str(line).expect("log line");
            out.entry(shard).or_default().push(v);
        }
    }
    out
}

/// The lines received, per shard, in arrival order.
fn received(posts: &Mutex<Vec<Post>>) -> BTreeMap<u64, Vec<Value>> {
    let mut out: BTreeMap<u64, Vec<Value>> = BTreeMap::new();
    for post in posts.lock().expect("posts").iter() {
        for line in post.lines() {
            let shard = line["shard"].as_u64().expect("a line names its shard");
            out.entry(shard).or_default().push(line);
        }
    }
    out
}

fn count(lines: &BTreeMap<u64, Vec<Value>>) -> usize {
    lines.values().map(Vec::len).sum()
}

/// `got` is `want` in order, every line of it, where a run of lines may come again right
/// after it was sent (a redelivered batch of at most `batch_max`): returns how many lines
/// came twice. Panics on a line out of order, unknown, or missing.
fn check_stream(shard: u64, want: &[Value], got: &[Value], batch_max: usize) -> usize {
    let mut next = 0;
    let mut again = 0;
    for (i, g) in got.iter().enumerate() {
        if want.get(next) == Some(g) {
            next += 1;
            continue;
        }
        // A batch sent again: it starts at most batch_max lines back.
        let back = (next.saturating_sub(batch_max)..next).find(|&k| want[k] == *g);
        match back {
            Some(k) => {
                again += 1;
                next = k + 1;
            }
            None => panic!(
                "shard {shard}: received line {i} is out of order or unknown (expected log line \
                 {next}):\n got {g}\n want {:?}",
                want.get(next)
            ),
        }
    }
    assert_eq!(
        next,
        want.len(),
        "shard {shard}: only {next} of {} log lines arrived",
        want.len()
    );
    again
}

fn webhook_table(port: u16, extra: &str) -> String {
    format!(
        "[[webhook]]\nname = \"hook\"\nurl = \"http://127.0.0.1:{port}/events\"\n\
         retry_base_ms = 50\nretry_max_ms = 400\ntimeout_ms = 5000\n{extra}\n"
    )
}

#[test]
fn every_line_arrives_in_order_through_a_receiver_outage_and_rotations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]);
    let posts = Arc::new(Mutex::new(Vec::new()));
    let mut receiver = Receiver::start(posts.clone());
    let port = receiver.port;
    let batch_max = 50;
    let mut opts = Opts::new(dir.path())
        .shards(2)
        .route(sink.port)
        // The smallest rotation size: the outage's backlog spans rotated files.
        .set("log", "file_size_max", "65536");
    opts.conf.raw = webhook_table(
        port,
        &format!(
            "batch_max = {batch_max}\nheaders = {{ Authorization = \"Bearer s3cret\", \
             X-Epoxi-Test = \"yes\" }}"
        ),
    );
    let mut epoxi = Epoxi::start(&opts);

    let first = Inject::new(150).connections(2).run(dir.path(), epoxi.port);
    assert_eq!(first.count("accepted"), 150, "{}", first.json);
    epoxi.wait_events("Delivery", 150);
    wait_until("the first lines at the receiver", DEADLINE, || {
        count(&received(&posts)) >= 300
    });

    // The receiver goes away while mail keeps flowing, for several seconds.
    receiver.stop();
    let down_at = posts.lock().expect("posts").len();
    let second = Inject::new(150).connections(2).run(dir.path(), epoxi.port);
    assert_eq!(second.count("accepted"), 150, "{}", second.json);
    epoxi.wait_events("Delivery", 300);
    thread::sleep(Duration::from_secs(3));
    assert_eq!(
        posts.lock().expect("posts").len(),
        down_at,
        "nothing while down"
    );
    assert!(
        epoxi.stderr().contains("POST failed"),
        "the failures are logged:\n{}",
        epoxi.stderr()
    );
    let rotated = std::fs::read_dir(&epoxi.log_dir)
        .expect("log dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().matches('.').count() == 2)
        .count();
    assert!(rotated > 0, "the log rotated during the run");

    // Back on the same port: the backlog arrives, all of it, in order, once.
    let _receiver = Receiver::start_on(port, posts.clone());
    let want = log_lines(&epoxi.log_dir);
    assert_eq!(
        count(&want),
        600,
        "300 receptions and 300 deliveries logged"
    );
    wait_until("every logged line at the receiver", DEADLINE, || {
        count(&received(&posts)) >= 600
    });
    thread::sleep(Duration::from_millis(500));
    let got = received(&posts);
    assert_eq!(got.keys().collect::<Vec<_>>(), [&0, &1], "both shards");
    for (shard, lines) in &want {
        let again = check_stream(*shard, lines, &got[shard], batch_max);
        assert_eq!(again, 0, "shard {shard}: nothing twice without a crash");
    }
    for post in posts.lock().expect("posts").iter() {
        assert_eq!(post.path, "/events");
        assert_eq!(post.headers["authorization"], "Bearer s3cret");
        assert_eq!(post.headers["x-epoxi-test"], "yes");
        assert_eq!(post.headers["content-type"], "application/json");
        let n = post.lines().len();
        assert!((1..=batch_max).contains(&n), "a batch of {n}");
    }
    epoxi.stop();
    let cursors: Vec<String> = std::fs::read_dir(epoxi.log_dir.join("webhooks"))
        .expect("cursor dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        cursors.contains(&"hook.shard-0.json".to_owned())
            && cursors.contains(&"hook.shard-1.json".to_owned()),
        "{cursors:?}"
    );
}

#[test]
fn filtered_objects_resume_from_the_cursor_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]);
    let posts = Arc::new(Mutex::new(Vec::new()));
    let _receiver = Receiver::start(posts.clone());
    let batch_max = 10;
    let mut opts = Opts::new(dir.path()).shards(2).route(sink.port);
    opts.conf.raw = webhook_table(
        _receiver.port,
        &format!(
            "batch_max = {batch_max}\nformat = \"object\"\nevents = [\"Delivery\"]\n\
             headers = {{ X-Hook-Token = \"abc\" }}"
        ),
    );
    let deliveries = |dir: &Path| -> BTreeMap<u64, Vec<Value>> {
        log_lines(dir)
            .into_iter()
            .map(|(s, lines)| {
                let d = lines.into_iter().filter(|l| l["type"] == "Delivery");
                (s, d.collect())
            })
            .collect()
    };

    // A clean stop: the cursor is where the last acknowledged line was.
    let mut epoxi = Epoxi::start(&opts);
    Inject::new(40).run(dir.path(), epoxi.port);
    epoxi.wait_events("Delivery", 40);
    wait_until("40 deliveries at the receiver", DEADLINE, || {
        posts.lock().expect("posts").len() >= 40
    });
    epoxi.stop();
    drop(epoxi);

    let mut epoxi = Epoxi::start(&opts);
    Inject::new(40).run(dir.path(), epoxi.port);
    epoxi.wait_events("Delivery", 80);
    wait_until("80 deliveries at the receiver", DEADLINE, || {
        posts.lock().expect("posts").len() >= 80
    });
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        posts.lock().expect("posts").len(),
        80,
        "a restart resumes from the cursor: nothing sent again from the start"
    );

    // A crash (SIGKILL): at most the batch in flight comes again.
    epoxi.kill9();
    drop(epoxi);
    let epoxi = Epoxi::start(&opts);
    Inject::new(40).run(dir.path(), epoxi.port);
    // Recovery may deliver again what the crash left unrecorded: the log says what to expect.
    epoxi.wait_events("Delivery", 120);
    let (mut want, mut got) = (BTreeMap::new(), BTreeMap::new());
    wait_until("every logged delivery at the receiver", DEADLINE, || {
        want = deliveries(&epoxi.log_dir);
        got = received(&posts);
        want.iter().all(|(s, w)| {
            w.is_empty()
                || got
                    .get(s)
                    .is_some_and(|g: &Vec<Value>| g.last() == w.last())
        })
    });
    assert!(count(&want) >= 120);
    let mut again = 0;
    for (shard, lines) in &want {
        let none = Vec::new();
        again += check_stream(*shard, lines, got.get(shard).unwrap_or(&none), batch_max);
    }
    assert!(
        again <= 2 * batch_max,
        "{again} lines twice: more than a batch per shard"
    );
    for post in posts.lock().expect("posts").iter() {
        assert_eq!(post.headers["x-hook-token"], "abc");
        let v: Value = serde_json::from_slice(&post.body).expect("one JSON object");
        assert!(v.is_object(), "format = object: {v}");
        assert_eq!(v["type"], "Delivery", "only the types asked for");
    }
}

#[test]
fn a_bad_webhook_table_is_refused_with_its_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = Opts::new(dir.path());
    opts.conf.raw = "[[webhook]]\nurl = \"http://127.0.0.1:1/\"\nevents = [\"Delivered\"]\n".into();
    let ran = match Epoxi::try_start(&opts) {
        Ok(_) => panic!("a bad events list was accepted"),
        Err(ran) => ran,
    };
    assert!(
        ran.stderr.contains("webhook[0].events") && ran.stderr.contains("Delivered"),
        "{}",
        ran.stderr
    );
}
