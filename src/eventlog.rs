//! The event log: one JSON line per message event, one file per shard; an [`Observer`] of the
//! stage events.
//!
//! Lines: Reception, Delivery, TransientFailure, Bounce, Expiration, and Notice (the notice about
//! some recipients was spooled, with its `notice_id`, or was not needed: no `notice_id`),
//! Admin (an operator's operation that changed something: `op`, `args`, `result`, `peer_uid`);
//! OOB, Feedback and OobUnparsed (reports to the out-of-band domain), Suppressed (a recipient
//! refused for the suppression list), Suppression (a list entry added or removed) and Alert
//! (an alert rule started or stopped firing: `rule`, `alert_kind`, `state` firing|resolved,
//! `subject`, `value`, `threshold`, `since_ms`, `message`), each
//! with the fields of its event type in `events`. They are built in a buffer
//! on the shard (no syscall per message) and handed, a buffer at a time, to a writer thread over
//! a bounded crossbeam channel: the shard's executor never blocks on the file. The shard hands
//! a buffer over once it is past [`BUFFER_FLUSH_BYTES`], or [`FLUSH_DELAY_MS`] after its first
//! line (the shard's timer asks [`EventLog::flush_due_ms`]), and at shutdown. The writer renames
//! a file that grew past `file_size_max` to `shard-N.<unix-ms>.jsonl` and starts a new one.
//!
//! The log is an account for operators, not the source of truth: the spool is. A crash can lose
//! the last unflushed lines, never a message. If the disk cannot keep up, the shard keeps
//! buffering up to [`BACKLOG_MAX_BYTES`]; past it lines are dropped and counted (and a warning
//! says how many), rather than stalling mail.

use std::cell::{Cell, RefCell};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::events::{AttemptOutcome, Event, Observer, Response};

/// Buffered bytes that trigger a hand-over, so a burst cannot grow the buffer without bound.
pub const BUFFER_FLUSH_BYTES: usize = 256 << 10;
/// The oldest line waits at most this long for the writer (when traffic is light).
pub const FLUSH_DELAY_MS: u64 = 100;
/// Buffers in flight to the writer thread: with 256 KiB each, up to 4 MiB waiting for a slow
/// disk before the shard keeps them itself.
const CHANNEL_BUFFERS_MAX: usize = 16;
/// Past this much unwritten log, lines are dropped (and counted) instead of held.
pub const BACKLOG_MAX_BYTES: usize = 64 << 20;

/// Every `type` a line can have: what `[[webhook]] events` may name. `Alert` lines come
/// from the alert rules (issue 13), written through the same log.
pub const LINE_TYPES: &[&str] = &[
    "Reception",
    "Delivery",
    "TransientFailure",
    "Bounce",
    "Expiration",
    "Notice",
    "Admin",
    "OOB",
    "Feedback",
    "OobUnparsed",
    "Suppressed",
    "Suppression",
    "SiteDown",
    "SiteUp",
    "ShapingAction",
    "ShapingLifted",
    "Alert",
];

/// Where a log file stands in its shard's sequence, from its name: the rotated files by
/// their stamp (`shard-N.<unix-ms>.jsonl`, `shard-N.<unix-ms>-<k>.jsonl` for a second
/// rotation in the same millisecond), then the live `shard-N.jsonl`. Readers (the webhooks)
/// go through a shard's files in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FileOrder {
    Rotated { ms: u64, k: u32 },
    Live,
}

/// The shard and place of a log file name; None for anything else in the directory.
pub fn parse_file_name(name: &str) -> Option<(usize, FileOrder)> {
    let rest = name.strip_prefix("shard-")?.strip_suffix(".jsonl")?;
    let (shard, stamp) = match rest.split_once('.') {
        Some((shard, stamp)) => (shard, Some(stamp)),
        None => (rest, None),
    };
    let shard = shard.parse().ok()?;
    let order = match stamp {
        None => FileOrder::Live,
        Some(stamp) => {
            let (ms, k) = match stamp.split_once('-') {
                Some((ms, k)) => (ms, k.parse().ok()?),
                None => (stamp, 0),
            };
            FileOrder::Rotated {
                ms: ms.parse().ok()?,
                k,
            }
        }
    };
    Some((shard, order))
}

#[derive(Debug, thiserror::Error)]
#[error("event log {path}: {source}")]
pub struct LogError {
    path: PathBuf,
    source: std::io::Error,
}

/// One line, as serialized.
#[derive(Serialize)]
struct Line<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    ts_ms: u64,
    message_id: String,
    queue_id: u64,
    shard: usize,
    sender: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    recipient: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recipients: Option<Vec<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    domain: Option<&'a str>,
    attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    response: Option<&'a Response>,
    peer: &'a str,
    received_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_attempt_ms: Option<u64>,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<&'a str>,
    /// Delivery lines: the outbound TLS outcome, flattened to `tls_*` fields.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    outbound: Option<OutboundTls<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'a str>,
    /// Attempt lines: the destination's site key, when it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    site: Option<&'a str>,
    /// Attempt lines: the message's tenant, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant: Option<&'a str>,
    /// Notice lines: the notice's own id, when one was sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    notice_id: Option<String>,
    /// Notice lines: `delayed` for a delay notice (absent for notices of final outcomes).
    #[serde(skip_serializing_if = "Option::is_none")]
    notice_action: Option<&'static str>,
    /// TransientFailure, Bounce and Expiration lines: what the failure means.
    #[serde(skip_serializing_if = "Option::is_none")]
    bounce_category: Option<crate::bounce::Category>,
}

/// An Admin line: not about a message, so a shape of its own.
#[derive(Serialize)]
struct AdminLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    ts_ms: u64,
    shard: usize,
    op: &'a str,
    args: &'a serde_json::Value,
    result: &'a serde_json::Value,
    peer_uid: Option<u32>,
}

/// The TLS outcome of a delivery attempt, as its event line says it.
#[derive(Serialize)]
struct OutboundTls<'a> {
    /// none (plaintext), opportunistic (unverified), mta-sts or dane.
    tls_policy: crate::tlspolicy::VerifiedBy,
    tls_verified: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_version: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_cipher: Option<&'a str>,
    /// RFC 8460 terms, for TLS reporting.
    tls_policy_domain: &'a str,
    tls_policy_type: crate::tlspolicy::PolicyType,
    tls_mx_host: &'a str,
    tls_result: crate::tlspolicy::ResultType,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_failure: Option<&'a str>,
}

impl<'a> OutboundTls<'a> {
    fn of(o: &'a crate::tlspolicy::TlsOutcome, rcpt_domain: &'a str) -> OutboundTls<'a> {
        OutboundTls {
            tls_policy: o.verified_by,
            tls_verified: o.verified,
            tls_version: o.version.as_deref(),
            tls_cipher: o.cipher.as_deref(),
            tls_policy_domain: o.policy_domain.as_deref().unwrap_or(rcpt_domain),
            tls_policy_type: o.policy_type,
            tls_mx_host: &o.mx_host,
            tls_result: o.result,
            tls_failure: o.failure.as_deref(),
        }
    }
}

pub struct EventLog {
    shard: usize,
    buf: RefCell<Vec<u8>>,
    /// When the first line of `buf` was written (None: empty).
    first_ms: Cell<Option<u64>>,
    /// Buffers the writer channel had no room for, oldest first.
    backlog: RefCell<Vec<Vec<u8>>>,
    backlog_bytes: Cell<usize>,
    dropped: Cell<u64>,
    tx: RefCell<Option<crossbeam::channel::Sender<Vec<u8>>>>,
    writer: RefCell<Option<std::thread::JoinHandle<()>>>,
    /// Told when the buffer gets its first line (the shard's timer then flushes it in time).
    wake: RefCell<Option<std::rc::Rc<shards::Notify>>>,
}

impl EventLog {
    /// Open (append to) `dir/shard-N.jsonl` and start its writer thread.
    pub fn open(dir: &Path, shard: usize, file_size_max: u64) -> Result<EventLog, LogError> {
        std::fs::create_dir_all(dir).map_err(|source| LogError {
            path: dir.to_owned(),
            source,
        })?;
        let mut file = Writer::open(dir.to_owned(), shard, file_size_max)?;
        let (tx, rx) = crossbeam::channel::bounded::<Vec<u8>>(CHANNEL_BUFFERS_MAX);
        let writer = std::thread::Builder::new()
            .name(format!("eventlog-{shard}"))
            .spawn(move || {
                for buf in rx {
                    file.write(&buf);
                }
            })
            .map_err(|source| LogError {
                path: dir.to_owned(),
                source,
            })?;
        Ok(EventLog {
            shard,
            buf: RefCell::new(Vec::with_capacity(64 << 10)),
            first_ms: Cell::new(None),
            backlog: RefCell::new(Vec::new()),
            backlog_bytes: Cell::new(0),
            dropped: Cell::new(0),
            tx: RefCell::new(Some(tx)),
            writer: RefCell::new(Some(writer)),
            wake: RefCell::new(None),
        })
    }

    /// Who to tell when lines start waiting for a flush.
    pub fn set_wake(&self, wake: std::rc::Rc<shards::Notify>) {
        *self.wake.borrow_mut() = Some(wake);
    }

    pub fn path(dir: &Path, shard: usize) -> PathBuf {
        dir.join(format!("shard-{shard}.jsonl"))
    }

    /// When the buffered lines should go to the writer (None: nothing buffered).
    pub fn flush_due_ms(&self) -> Option<u64> {
        self.first_ms.get().map(|t| t + FLUSH_DELAY_MS)
    }

    fn line(&self, line: &Line<'_>) {
        self.write(line.ts_ms, line)
    }

    /// A line of its own shape (reports, suppression), with `type` first.
    fn tagged<T: Serialize>(&self, kind: &'static str, ts_ms: u64, body: &T) {
        #[derive(Serialize)]
        struct Tagged<'a, T> {
            #[serde(rename = "type")]
            kind: &'static str,
            #[serde(flatten)]
            body: &'a T,
        }
        self.write(ts_ms, &Tagged { kind, body });
    }

    /// Append one JSON line of any shape (message events use [`Line`]).
    fn write<T: Serialize>(&self, ts_ms: u64, line: &T) {
        if self.backlog_bytes.get() >= BACKLOG_MAX_BYTES {
            self.dropped.set(self.dropped.get() + 1);
            return;
        }
        let full = {
            let mut buf = self.buf.borrow_mut();
            // Serializing our own plain structs cannot fail; if it ever did, drop the line
            // rather than the shard.
            if serde_json::to_writer(&mut *buf, line).is_ok() {
                buf.push(b'\n');
            }
            buf.len() >= BUFFER_FLUSH_BYTES
        };
        if self.first_ms.get().is_none() {
            self.first_ms.set(Some(ts_ms));
            if let Some(wake) = self.wake.borrow().as_ref() {
                wake.notify_all();
            }
        }
        if full {
            self.flush();
        }
    }

    /// Hand the buffered lines to the writer. Never blocks: a full channel keeps them here.
    pub fn flush(&self) {
        let buf = std::mem::take(&mut *self.buf.borrow_mut());
        self.first_ms.set(None);
        let tx = self.tx.borrow();
        let Some(tx) = tx.as_ref() else { return };
        let mut backlog = self.backlog.borrow_mut();
        if !buf.is_empty() {
            self.backlog_bytes.set(self.backlog_bytes.get() + buf.len());
            backlog.push(buf);
        }
        while !backlog.is_empty() {
            let next = backlog.remove(0);
            let len = next.len();
            match tx.try_send(next) {
                Ok(()) => self.backlog_bytes.set(self.backlog_bytes.get() - len),
                Err(crossbeam::channel::TrySendError::Full(b)) => {
                    backlog.insert(0, b);
                    break;
                }
                Err(crossbeam::channel::TrySendError::Disconnected(_)) => {
                    self.backlog_bytes.set(self.backlog_bytes.get() - len);
                }
            }
        }
        let dropped = self.dropped.replace(0);
        if dropped > 0 {
            tracing::warn!(
                shard = self.shard,
                dropped,
                "event log cannot keep up: lines dropped"
            );
        }
    }

    /// Write everything and stop the writer thread. Blocking: call it from a blocking thread
    /// or at the very end of a shard's life.
    pub fn close(&self) {
        self.flush();
        let tx = self.tx.borrow_mut().take();
        if let Some(tx) = tx {
            for buf in self.backlog.borrow_mut().drain(..) {
                // The writer drains the channel; a blocking send is fine at shutdown.
                let _ = tx.send(buf);
            }
        }
        if let Some(writer) = self.writer.borrow_mut().take() {
            let _ = writer.join();
        }
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        self.close();
    }
}

impl Observer for EventLog {
    fn observe(&self, event: &Event<'_>) {
        match event {
            Event::Received(e) => {
                let env = e.envelope;
                let rcpts: Vec<&str> = env.rcpts.iter().map(|r| r.address.as_str()).collect();
                self.line(&Line {
                    kind: "Reception",
                    ts_ms: e.ts_ms,
                    message_id: env.reception.to_string(),
                    queue_id: e.id,
                    shard: e.shard,
                    sender: &env.sender,
                    recipient: None,
                    recipients: Some(rcpts),
                    domain: None,
                    attempts: 0,
                    response: None,
                    peer: &env.peer,
                    received_ms: env.received_ms(),
                    next_attempt_ms: None,
                    size: env.size,
                    tls: e.tls,
                    outbound: None,
                    source: None,
                    site: None,
                    tenant: None,
                    notice_id: None,
                    notice_action: None,
                    bounce_category: None,
                });
            }
            Event::Attempt(e) => {
                let (kind, next) = match e.outcome {
                    AttemptOutcome::Delivered => ("Delivery", None),
                    AttemptOutcome::Deferred { next_attempt_ms } => {
                        ("TransientFailure", Some(next_attempt_ms))
                    }
                    AttemptOutcome::Bounced => ("Bounce", None),
                    AttemptOutcome::Expired => ("Expiration", None),
                };
                self.line(&Line {
                    kind,
                    ts_ms: e.ts_ms,
                    message_id: e.reception.to_string(),
                    queue_id: e.id,
                    shard: e.shard,
                    sender: e.sender,
                    recipient: Some(e.rcpt),
                    recipients: None,
                    domain: Some(crate::envelope::domain_of(e.rcpt)),
                    attempts: e.attempts,
                    response: Some(e.response),
                    peer: e.peer,
                    received_ms: e.received_ms,
                    next_attempt_ms: next,
                    size: e.size,
                    tls: None,
                    outbound: e
                        .tls
                        .map(|o| OutboundTls::of(o, crate::envelope::domain_of(e.rcpt))),
                    source: e.source,
                    site: e.site,
                    tenant: e.tenant,
                    notice_id: None,
                    notice_action: None,
                    bounce_category: e.bounce_category,
                });
            }
            Event::Notice(e) => {
                self.line(&Line {
                    kind: "Notice",
                    ts_ms: e.ts_ms,
                    message_id: e.reception.to_string(),
                    queue_id: e.id,
                    shard: e.shard,
                    sender: e.sender,
                    recipient: None,
                    recipients: Some(e.rcpts.to_vec()),
                    domain: None,
                    attempts: 0,
                    response: None,
                    peer: "-",
                    received_ms: e.reception.ms,
                    next_attempt_ms: None,
                    size: 0,
                    tls: None,
                    outbound: None,
                    source: None,
                    site: None,
                    tenant: None,
                    notice_id: e.notice.map(|n| n.to_string()),
                    notice_action: e.delay.then_some("delayed"),
                    bounce_category: None,
                });
            }
            // Not a message event: it goes to the operational log (tracing).
            Event::SourceHealth(_) => {}
            Event::SiteHealth(e) => self.write(
                e.ts_ms,
                &SiteLine {
                    kind: match e.down_until_ms {
                        Some(_) => "SiteDown",
                        None => "SiteUp",
                    },
                    ts_ms: e.ts_ms,
                    shard: e.shard,
                    site: e.site,
                    source: e.source,
                    down_until_ms: e.down_until_ms,
                    failures: e.failures,
                    why: e.why,
                },
            ),
            Event::Shaping(e) => self.write(
                e.ts_ms,
                &ShapingLine {
                    kind: match e.lifted {
                        false => "ShapingAction",
                        true => "ShapingLifted",
                    },
                    ts_ms: e.ts_ms,
                    shard: e.shard,
                    rule: e.rule,
                    action: e.action,
                    site: e.site,
                    source: e.source,
                    target: e.target,
                    until_ms: e.until_ms,
                    detail: e.detail,
                },
            ),
            // Counted for TLS reports; the attempt's own event says how its connection went.
            Event::TlsSession(_) => {}
            Event::Admin(e) => self.write(
                e.ts_ms,
                &AdminLine {
                    kind: "Admin",
                    ts_ms: e.ts_ms,
                    shard: e.shard,
                    op: e.op,
                    args: e.args,
                    result: e.result,
                    peer_uid: e.peer_uid,
                },
            ),
            Event::Oob(e) => self.tagged("OOB", e.ts_ms, e),
            Event::Feedback(e) => self.tagged("Feedback", e.ts_ms, e),
            Event::OobUnparsed(e) => self.tagged("OobUnparsed", e.ts_ms, e),
            Event::Suppressed(e) => self.tagged("Suppressed", e.ts_ms, e),
            Event::Suppression(e) => self.tagged("Suppression", e.ts_ms, e),
            Event::Alert(e) => self.write(
                e.ts_ms,
                &AlertLine {
                    kind: "Alert",
                    ts_ms: e.ts_ms,
                    shard: e.shard,
                    rule: e.rule,
                    alert_kind: e.kind,
                    state: match e.firing {
                        true => "firing",
                        false => "resolved",
                    },
                    subject: e.subject,
                    value: e.value,
                    threshold: e.threshold,
                    since_ms: e.since_ms,
                    message: e.message,
                },
            ),
        }
    }
}

/// An `Alert` line: a rule started (`state` firing) or stopped (resolved) firing. The rule's
/// kind is `alert_kind`, since `kind` is the line's type.
#[derive(Serialize)]
struct AlertLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    ts_ms: u64,
    shard: usize,
    rule: &'a str,
    alert_kind: &'a str,
    state: &'static str,
    subject: &'a str,
    value: f64,
    threshold: f64,
    since_ms: u64,
    message: &'a str,
}

/// A `SiteDown` or `SiteUp` line.
#[derive(Serialize)]
struct SiteLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    ts_ms: u64,
    shard: usize,
    site: &'a str,
    source: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    down_until_ms: Option<u64>,
    failures: u32,
    why: &'a str,
}

#[derive(Serialize)]
struct ShapingLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    ts_ms: u64,
    shard: usize,
    rule: &'a str,
    action: &'a str,
    site: &'a str,
    source: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<&'a str>,
    until_ms: u64,
    detail: &'a str,
}

/// The writer thread's file.
struct Writer {
    dir: PathBuf,
    shard: usize,
    file_size_max: u64,
    file: Option<File>,
    written: u64,
}

impl Writer {
    fn open(dir: PathBuf, shard: usize, file_size_max: u64) -> Result<Writer, LogError> {
        let mut w = Writer {
            dir,
            shard,
            file_size_max,
            file: None,
            written: 0,
        };
        w.open_file()?;
        Ok(w)
    }

    fn open_file(&mut self) -> Result<(), LogError> {
        let path = EventLog::path(&self.dir, self.shard);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| LogError {
                path: path.clone(),
                source,
            })?;
        self.written = file.metadata().map(|m| m.len()).unwrap_or(0);
        self.file = Some(file);
        // A crash can leave a line half written; new lines start on a line of their own, so
        // readers see one bad line, not a good one glued to the torn one.
        if self.written > 0 && !ends_with_newline(&path) {
            self.write_raw(b"\n");
        }
        Ok(())
    }

    fn write(&mut self, buf: &[u8]) {
        self.write_raw(buf);
        if self.written >= self.file_size_max {
            self.rotate();
        }
    }

    fn write_raw(&mut self, buf: &[u8]) {
        if let Some(file) = self.file.as_mut() {
            if let Err(e) = file.write_all(buf) {
                tracing::error!(shard = self.shard, "event log write failed: {e}");
            }
        }
        self.written += buf.len() as u64;
    }

    fn rotate(&mut self) {
        let now = crate::clock::now_ms();
        // Two rotations within a millisecond must not overwrite each other's file.
        let mut rotated = self.dir.join(format!("shard-{}.{now}.jsonl", self.shard));
        let mut n = 1;
        while rotated.exists() {
            rotated = self
                .dir
                .join(format!("shard-{}.{now}-{n}.jsonl", self.shard));
            n += 1;
        }
        self.file = None;
        if let Err(e) = std::fs::rename(EventLog::path(&self.dir, self.shard), &rotated) {
            tracing::error!(shard = self.shard, "cannot rotate event log: {e}");
        }
        if let Err(e) = self.open_file() {
            tracing::error!(shard = self.shard, "{e}");
        }
    }
}

/// Whether the file's last byte is a newline (an unreadable file counts as one: nothing to
/// repair that we could see).
fn ends_with_newline(path: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let Ok(file) = File::open(path) else {
        return true;
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut last = [0u8; 1];
    len == 0 || file.read_exact_at(&mut last, len - 1).is_err() || last[0] == b'\n'
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::ReceptionId;

    #[test]
    fn file_names_order_rotated_then_live() {
        let mut names = [
            "shard-1.jsonl",
            "shard-1.200-1.jsonl",
            "shard-1.1000.jsonl",
            "shard-1.200.jsonl",
        ]
        .map(|n| parse_file_name(n).expect(n));
        names.sort();
        assert_eq!(
            names.map(|(_, o)| o),
            [
                FileOrder::Rotated { ms: 200, k: 0 },
                FileOrder::Rotated { ms: 200, k: 1 },
                FileOrder::Rotated { ms: 1000, k: 0 },
                FileOrder::Live,
            ]
        );
        assert_eq!(
            parse_file_name("shard-12.jsonl"),
            Some((12, FileOrder::Live))
        );
        for bad in [
            "shard-x.jsonl",
            "shard-1.jsonl.tmp",
            "webhooks",
            "shard-1.x.jsonl",
        ] {
            assert_eq!(parse_file_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_torn_last_line_is_not_glued_to_the_next() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(EventLog::path(dir.path(), 0), b"{\"type\":\"Rec").expect("torn");
        let mut w = Writer::open(dir.path().to_owned(), 0, 1 << 20).expect("open");
        w.write(b"{}\n");
        let text = std::fs::read_to_string(EventLog::path(dir.path(), 0)).expect("read");
        assert_eq!(text, "{\"type\":\"Rec\n{}\n");
    }
    use crate::events::Attempt;

    #[test]
    fn lines_are_json_and_files_rotate_by_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = EventLog::open(dir.path(), 3, 64 << 10).expect("open");
        let response = Response {
            code: 250,
            enhanced: "2.0.0".into(),
            text: "ok".into(),
        };
        for i in 0..2_000u64 {
            log.observe(&Event::Attempt(Attempt {
                ts_ms: 1,
                shard: 3,
                id: i,
                reception: ReceptionId {
                    ms: 1,
                    shard: 3,
                    n: i,
                },
                sender: "s@x.test",
                rcpt: "r@y.test",
                attempts: 1,
                outcome: AttemptOutcome::Delivered,
                response: &response,
                peer: "127.0.0.1:25",
                source: None,
                site: None,
                received_ms: 0,
                size: 10,
                tls: None,
                bounce_category: None,
                tenant: None,
            }));
            if i % 100 == 0 {
                log.flush();
            }
        }
        log.close();
        let mut files: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").path())
            .collect();
        files.sort();
        assert!(files.len() > 1, "rotated: {files:?}");
        let mut lines = 0;
        for f in &files {
            let text = std::fs::read_to_string(f).expect("read");
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line).expect("json line");
                assert_eq!(v["type"], "Delivery");
                assert_eq!(v["shard"], 3);
                assert_eq!(v["domain"], "y.test");
                lines += 1;
            }
        }
        assert_eq!(lines, 2_000, "no line lost across rotations");
        assert!(dir.path().join("shard-3.jsonl").exists());
    }
}
