//! A webhook's thread: for each shard's stream in turn, read the next chunk of its log, POST
//! the lines `tail::scan` picks, and move the stream's cursor once the receiver said 2xx.
//! A thin adapter over `tail`, `cursor` and `backoff`: it does the reads, the requests and
//! the sleeps, and decides nothing they do not.
//!
//! One thread per webhook, round-robin over its shards, one batch in flight: per shard the
//! order of the log is kept, and a webhook holds one batch at a time. While a batch fails the
//! thread retries it (with backoff) before anything else: a receiver that refuses a batch
//! forever (a 4xx, say) holds its webhook there, which is the at-least-once contract.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::eventlog::FileOrder;
use crate::webhook::backoff::{Backoff, Failing};
use crate::webhook::cursor::{self, Cursor};
use crate::webhook::tail::{self, Next, Start, READ_CHUNK_MAX};
use crate::webhook::{Format, Spec, Status};

/// At shutdown a webhook gets this long to send what the log holds (the shards have flushed
/// it by then); what is left goes next start, from the cursor. Short, so a stop stays quick
/// whatever the receiver does.
pub const DRAIN_MS_MAX: u64 = 3_000;
/// A stream with nothing new is looked at again after this long: the event log hands lines
/// to its writer every 100 ms (`eventlog::FLUSH_DELAY_MS`), so polling faster gains nothing.
const IDLE_POLL_MS: u64 = 100;
/// A cursor moved only past unwanted lines is written at most this often (each write is an
/// fsync); falling behind only means reading those lines again, never sending them twice.
const SKIP_SYNC_MS: u64 = 1_000;
/// The lag figure is refreshed (a listing per shard) this often.
const LAG_REFRESH_MS: u64 = 1_000;
/// Of an error answer's body, this much goes to the log and the status.
const ERROR_BODY_MAX: usize = 200;

/// A started webhook thread.
pub(super) struct Running {
    name: String,
    stop: crossbeam::channel::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Running {
    /// Ask it to send what is left, for up to [`DRAIN_MS_MAX`], and stop.
    pub(super) fn drain(&self) {
        let _ = self.stop.try_send(());
    }

    pub(super) fn join(self) {
        if self.thread.join().is_err() {
            tracing::error!(webhook = %self.name, "webhook thread panicked");
        }
    }
}

pub(super) fn spawn(
    spec: Spec,
    log_dir: PathBuf,
    shards: Vec<usize>,
    status: Arc<Status>,
) -> std::io::Result<Running> {
    let (stop, stopped) = crossbeam::channel::bounded(1);
    let name = spec.name.clone();
    let thread = std::thread::Builder::new()
        .name(format!("webhook-{}", spec.name))
        .spawn(move || {
            let mut sender = Sender::new(spec, log_dir, &shards, status);
            sender.run(&Control {
                stopped,
                drain_until: std::cell::Cell::new(None),
            });
        })?;
    Ok(Running { name, stop, thread })
}

/// The stop signal, and the drain deadline once it came.
struct Control {
    stopped: crossbeam::channel::Receiver<()>,
    drain_until: std::cell::Cell<Option<Instant>>,
}

impl Control {
    fn poll(&self) {
        if self.drain_until.get().is_none() && self.stopped.try_recv().is_ok() {
            self.start_drain();
        }
    }

    fn start_drain(&self) {
        self.drain_until
            .set(Some(Instant::now() + Duration::from_millis(DRAIN_MS_MAX)));
    }

    fn draining(&self) -> bool {
        self.drain_until.get().is_some()
    }

    /// Past the drain deadline: stop now.
    fn over(&self) -> bool {
        self.drain_until.get().is_some_and(|t| Instant::now() >= t)
    }

    /// Sleep `ms` (cut short by the stop signal, or by the drain deadline); false when the
    /// deadline has passed.
    fn sleep(&self, ms: u64) -> bool {
        let d = Duration::from_millis(ms);
        match self.drain_until.get() {
            Some(until) => {
                let now = Instant::now();
                if now >= until {
                    return false;
                }
                std::thread::sleep(d.min(until - now));
                Instant::now() < until
            }
            None => {
                use crossbeam::channel::RecvTimeoutError;
                match self.stopped.recv_timeout(d) {
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => self.start_drain(),
                    Err(RecvTimeoutError::Timeout) => {}
                }
                true
            }
        }
    }
}

/// The file a stream is reading.
struct Current {
    file: File,
    name: String,
    inode: u64,
    /// Its place when last listed (Live until it is seen rotated).
    order: FileOrder,
    offset: u64,
}

struct Stream {
    shard: usize,
    cursor_path: PathBuf,
    /// The cursor read at start, until the stream has opened its first file.
    resume_from: Option<Cursor>,
    started: bool,
    cur: Option<Current>,
    /// The offset moved past unwanted lines since the cursor was last written (and when).
    unsaved_since: Option<Instant>,
    discarding: bool,
    pending_bytes: u64,
}

/// What a stream's step did.
#[derive(PartialEq, Eq)]
enum Step {
    /// Sent or skipped something, or moved to another file: step again soon.
    Busy,
    /// Nothing new.
    Idle,
    /// Stopped (drain deadline) before a batch went through.
    Stopped,
}

struct Sender {
    spec: Spec,
    log_dir: PathBuf,
    status: Arc<Status>,
    agent: ureq::Agent,
    streams: Vec<Stream>,
    backoff: Backoff,
    failing: Failing,
    lag_at: Option<Instant>,
}

impl Sender {
    fn new(spec: Spec, log_dir: PathBuf, shards: &[usize], status: Arc<Status>) -> Sender {
        let cursor_dir = super::cursor_dir(&log_dir);
        let streams = shards
            .iter()
            .map(|&shard| {
                let cursor_path = cursor::path(&cursor_dir, &spec.name, shard);
                let resume_from = match cursor::load(&cursor_path) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(webhook = %spec.name, shard,
                            "{e}: starting at the oldest log file (lines may come again)");
                        None
                    }
                };
                Stream {
                    shard,
                    cursor_path,
                    resume_from,
                    started: false,
                    cur: None,
                    unsaved_since: None,
                    discarding: false,
                    pending_bytes: 0,
                }
            })
            .collect();
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(spec.timeout_ms)))
            .http_status_as_error(false)
            .user_agent("epoxi-webhook")
            .max_redirects(0)
            .build();
        let seed = crate::clock::now_ms() ^ (std::process::id() as u64) << 32;
        Sender {
            backoff: Backoff::new(spec.retry_base_ms, spec.retry_max_ms, seed),
            agent: ureq::Agent::new_with_config(config),
            spec,
            log_dir,
            status,
            streams,
            failing: Failing::default(),
            lag_at: None,
        }
    }

    fn run(&mut self, ctl: &Control) {
        'run: loop {
            ctl.poll();
            if ctl.over() {
                break;
            }
            let mut busy = false;
            for s in 0..self.streams.len() {
                match self.step(s, ctl) {
                    Step::Busy => busy = true,
                    Step::Idle => {}
                    Step::Stopped => break 'run,
                }
            }
            self.refresh_lag();
            if !busy {
                // Caught up with every shard: nothing left to drain.
                if ctl.draining() {
                    break;
                }
                ctl.sleep(IDLE_POLL_MS);
            }
        }
        for s in 0..self.streams.len() {
            self.save(s);
        }
    }

    fn step(&mut self, s: usize, ctl: &Control) -> Step {
        if self.streams[s].cur.is_none() && !self.open_first(s) {
            return Step::Idle;
        }
        let (chunk, full) = match self.read(s) {
            Ok(read) => read,
            Err(e) => {
                let st = &self.streams[s];
                tracing::warn!(webhook = %self.spec.name, shard = st.shard,
                    "cannot read the event log: {e}");
                return Step::Idle;
            }
        };
        let spec = &self.spec;
        let st = &mut self.streams[s];
        let scan = tail::scan(&chunk, st.discarding, full, spec.batch_max, |k| {
            spec.wants(k)
        });
        st.discarding = scan.discarding;
        if scan.bad > 0 {
            tracing::warn!(webhook = %spec.name, shard = st.shard, lines = scan.bad,
                "event log lines that are not JSON events (torn by a crash?): skipped");
        }
        if scan.consumed == 0 {
            return self.at_end(s);
        }
        if scan.lines.is_empty() {
            let st = &mut self.streams[s];
            if let Some(cur) = st.cur.as_mut() {
                cur.offset += scan.consumed as u64;
            }
            st.pending_bytes = st.pending_bytes.saturating_sub(scan.consumed as u64);
            let since = *st.unsaved_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= Duration::from_millis(SKIP_SYNC_MS) {
                self.save(s);
            }
            return Step::Busy;
        }
        let lines: Vec<&[u8]> = scan.lines.iter().map(|r| &chunk[r.clone()]).collect();
        let sent = self.deliver(&lines, ctl);
        let st = &mut self.streams[s];
        let Some(cur) = st.cur.as_mut() else {
            return Step::Idle;
        };
        if sent < lines.len() {
            // Stopped in the middle (one POST per line): keep what was acknowledged.
            if sent > 0 {
                cur.offset += scan.lines[sent].start as u64;
                st.unsaved_since.get_or_insert_with(Instant::now);
            }
            self.status.delivered(sent as u64);
            return Step::Stopped;
        }
        cur.offset += scan.consumed as u64;
        st.pending_bytes = st.pending_bytes.saturating_sub(scan.consumed as u64);
        st.unsaved_since.get_or_insert_with(Instant::now);
        self.save(s);
        self.status.delivered(sent as u64);
        self.status.set_pending(self.lag());
        Step::Busy
    }

    /// Open the stream's first file: where its cursor says, else the oldest.
    fn open_first(&mut self, s: usize) -> bool {
        let shard = self.streams[s].shard;
        let files = tail::list(&self.log_dir, shard);
        let st = &mut self.streams[s];
        let from = if st.started {
            None
        } else {
            st.resume_from.as_ref()
        };
        let start = tail::resume(from, &files, |f| {
            File::open(self.log_dir.join(&f.name))
                .ok()
                .and_then(|file| read_head(&file))
        });
        let (index, offset) = match start {
            Start::Nothing => return false,
            Start::At { index, offset } => (index, offset),
            Start::Oldest { warning } => {
                if let Some(w) = warning {
                    tracing::warn!(webhook = %self.spec.name, shard,
                        "the cursor cannot be followed ({w}): starting at the oldest log file \
                         present, {}", files[0].name);
                }
                (0, 0)
            }
        };
        st.started = true;
        st.resume_from = None;
        self.open(s, &files[index], offset)
    }

    fn open(&mut self, s: usize, info: &tail::FileInfo, offset: u64) -> bool {
        let st = &mut self.streams[s];
        match File::open(self.log_dir.join(&info.name)) {
            Ok(file) => {
                // The file opened is the one listed only if the inode agrees (a rotation
                // can come in between); if not, the next look lists again.
                let inode = file.metadata().map(|m| m.ino()).unwrap_or(0);
                if inode != info.inode {
                    return false;
                }
                st.cur = Some(Current {
                    file,
                    name: info.name.clone(),
                    inode,
                    order: info.order,
                    offset,
                });
                st.discarding = false;
                true
            }
            Err(e) => {
                tracing::warn!(webhook = %self.spec.name, shard = st.shard,
                    "cannot open {}: {e}", info.name);
                false
            }
        }
    }

    /// The next chunk at the stream's offset, and whether it is as long as a read gets.
    fn read(&self, s: usize) -> std::io::Result<(Vec<u8>, bool)> {
        let Some(cur) = self.streams[s].cur.as_ref() else {
            return Ok((Vec::new(), false));
        };
        let len = cur.file.metadata()?.len();
        let want = len.saturating_sub(cur.offset).min(READ_CHUNK_MAX as u64) as usize;
        let mut chunk = vec![0; want];
        let mut got = 0;
        while got < want {
            match cur
                .file
                .read_at(&mut chunk[got..], cur.offset + got as u64)?
            {
                0 => break,
                n => got += n,
            }
        }
        chunk.truncate(got);
        Ok((chunk, got == READ_CHUNK_MAX))
    }

    /// No complete line after the offset: wait if the file is live, else go to the next one.
    fn at_end(&mut self, s: usize) -> Step {
        let shard = self.streams[s].shard;
        let live = crate::eventlog::EventLog::path(&self.log_dir, shard);
        let live_inode = std::fs::metadata(&live).ok().map(|m| m.ino());
        let Some(cur) = self.streams[s].cur.as_ref() else {
            return Step::Idle;
        };
        if live_inode == Some(cur.inode) {
            return Step::Idle;
        }
        // Rotated: the writer never writes to it again. Lines written just before the
        // rename are read first; a tail without a newline (a crash) can never end: skipped.
        let len = cur.file.metadata().map(|m| m.len()).unwrap_or(0);
        if len > cur.offset {
            match self.read(s) {
                Ok((chunk, _)) if memchr::memchr(b'\n', &chunk).is_some() => return Step::Busy,
                _ => tracing::warn!(webhook = %self.spec.name, shard,
                    "{}: {} bytes after its last line, never finished: skipped",
                    cur.name, len - cur.offset),
            }
        }
        let files = tail::list(&self.log_dir, shard);
        let (inode, order) = (cur.inode, cur.order);
        let order = files
            .iter()
            .find(|f| f.inode == inode)
            .map_or(order, |f| f.order);
        match tail::next_after(&files, inode, order) {
            Next::NotYet => {
                if let Some(cur) = self.streams[s].cur.as_mut() {
                    cur.order = order;
                }
                Step::Idle
            }
            Next::File(i) => {
                self.save(s);
                if self.open(s, &files[i], 0) {
                    self.streams[s].unsaved_since = Some(Instant::now());
                    self.save(s);
                }
                Step::Busy
            }
            Next::Lost => {
                tracing::warn!(webhook = %self.spec.name, shard,
                    "the log file being read was rotated and deleted before its successor \
                     was seen: starting at the oldest log file present");
                self.streams[s].cur = None;
                Step::Busy
            }
        }
    }

    /// Write the stream's cursor if it moved since it was last written.
    fn save(&mut self, s: usize) {
        let st = &mut self.streams[s];
        if st.unsaved_since.is_none() {
            return;
        }
        let Some(cur) = st.cur.as_ref() else { return };
        // A file without a complete first line has nothing read in it yet either.
        let Some(head) = read_head(&cur.file) else {
            return;
        };
        let c = Cursor {
            file: cur.name.clone(),
            inode: cur.inode,
            head_crc32c: head,
            offset: cur.offset,
        };
        match cursor::store(&st.cursor_path, &c) {
            Ok(()) => st.unsaved_since = None,
            Err(e) => tracing::warn!(webhook = %self.spec.name, shard = st.shard, "{e}"),
        }
    }

    /// POST `lines` until the receiver takes them (or the drain deadline passes); how many
    /// went through.
    fn deliver(&mut self, lines: &[&[u8]], ctl: &Control) -> usize {
        let mut sent = 0;
        while sent < lines.len() {
            let result = match self.spec.format {
                Format::Array => self.post(&array_body(lines)).map(|()| lines.len()),
                Format::Object => self.post(lines[sent]).map(|()| sent + 1),
            };
            match result {
                Ok(n) => {
                    sent = n;
                    self.backoff.reset();
                    if let Some((since_ms, failures)) = self.failing.recovered() {
                        self.status.recovered();
                        tracing::info!(webhook = %self.spec.name, failures,
                            failing_for_ms = crate::clock::now_ms().saturating_sub(since_ms),
                            "the receiver takes batches again");
                    }
                }
                Err(e) => {
                    let now = crate::clock::now_ms();
                    if let Some(w) = self.failing.failed(now) {
                        self.status.failed(w.since_ms, &e.text);
                        let refused = if e.refused {
                            "; the receiver refuses this batch: the webhook is blocked until \
                             it accepts it (events are never skipped)"
                        } else {
                            ""
                        };
                        tracing::warn!(webhook = %self.spec.name, failures = w.failures,
                            not_logged = w.quiet,
                            failing_for_ms = now.saturating_sub(w.since_ms),
                            "POST failed: {}{refused}; retrying with backoff", e.text);
                    } else {
                        self.status
                            .failed(self.failing.since_ms().unwrap_or(now), &e.text);
                    }
                    ctl.poll();
                    if !ctl.sleep(self.backoff.failed()) {
                        break;
                    }
                }
            }
        }
        sent
    }

    fn post(&self, body: &[u8]) -> Result<(), PostError> {
        let mut req = self
            .agent
            .post(&self.spec.url)
            .header("Content-Type", "application/json");
        for (k, v) in &self.spec.headers {
            req = req.header(k, v);
        }
        let mut resp = req.send(body).map_err(|e| PostError {
            text: e.to_string(),
            refused: false,
        })?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 << 10)
            .read_to_string()
            .unwrap_or_default();
        if (200..300).contains(&status) {
            return Ok(());
        }
        let mut end = text.len().min(ERROR_BODY_MAX);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        Err(PostError {
            text: format!("HTTP {status} {}", text[..end].trim()),
            refused: (400..500).contains(&status) && status != 408 && status != 429,
        })
    }

    fn lag(&self) -> u64 {
        self.streams.iter().map(|s| s.pending_bytes).sum()
    }

    /// Recount each stream's lag from a listing, about once a second.
    fn refresh_lag(&mut self) {
        let due = self
            .lag_at
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(LAG_REFRESH_MS));
        if !due {
            return;
        }
        self.lag_at = Some(Instant::now());
        for st in &mut self.streams {
            let files = tail::list(&self.log_dir, st.shard);
            st.pending_bytes = match &st.cur {
                Some(cur) => tail::pending_bytes(&files, cur.inode, cur.offset),
                None => files.iter().map(|f| f.len).sum(),
            };
        }
        self.status.set_pending(self.lag());
    }
}

/// Why a POST did not go through.
struct PostError {
    text: String,
    /// The receiver answered that it will not take it (4xx but 408 and 429).
    refused: bool,
}

/// `[line,line,...]`: the lines are JSON objects already.
fn array_body(lines: &[&[u8]]) -> Vec<u8> {
    let len = lines.iter().map(|l| l.len() + 1).sum::<usize>() + 2;
    let mut body = Vec::with_capacity(len);
    body.push(b'[');
    for (i, line) in lines.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(line);
    }
    body.push(b']');
    body
}

/// The first-line checksum of an open file.
fn read_head(file: &File) -> Option<u32> {
    let mut head = vec![0; cursor::HEAD_BYTES_MAX];
    let mut got = 0;
    while got < head.len() {
        match file.read_at(&mut head[got..], got as u64) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    cursor::head_crc(&head[..got])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_array_body_is_the_lines_as_a_json_array() {
        let body = array_body(&[b"{\"a\":1}", b"{\"b\":2}"]);
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v, serde_json::json!([{"a": 1}, {"b": 2}]));
        assert_eq!(array_body(&[]), b"[]");
    }
}
