//! The event log: one JSON line per message event, one file per shard.
//!
//! Events: Reception, Delivery, TransientFailure, Bounce, Expiration. Lines are built in a
//! buffer and written by [`EventLog::flush`], which the shard calls on a timer and at shutdown,
//! so logging costs no syscall per message. A file that grows past `file_size_max` is renamed
//! `shard-N.<unix-ms>.jsonl` and a new one started.
//!
//! The log is an account for operators, not the source of truth: the spool is. A crash can lose
//! the last unflushed lines, never a message.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Buffered bytes that trigger an early flush, so a burst cannot grow the buffer without bound.
const BUFFER_FLUSH_BYTES: usize = 256 << 10;

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub enum EventKind {
    Reception,
    Delivery,
    TransientFailure,
    Bounce,
    Expiration,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq, Default)]
pub struct Response {
    pub code: u16,
    pub enhanced: String,
    pub text: String,
}

#[derive(Debug, Serialize)]
pub struct Event<'a> {
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// Unix time of the event, in milliseconds.
    pub ts_ms: u64,
    /// The id the client got in the 250 reply (shared by all shards' copies).
    pub message_id: &'a str,
    /// This shard's spool id of its copy.
    pub queue_id: u64,
    pub shard: usize,
    pub sender: &'a str,
    /// One recipient per line for delivery events; all of this shard's for Reception.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipient: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipients: Option<&'a [&'a str]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<&'a str>,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<&'a Response>,
    /// The client for Reception; the remote host for delivery events.
    pub peer: &'a str,
    pub received_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_ms: Option<u64>,
    pub size: usize,
    /// Reception over TLS: protocol version and cipher suite.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<&'a str>,
    /// Delivery events: the egress source the connection came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<&'a str>,
}

pub struct EventLog {
    dir: PathBuf,
    shard: usize,
    file_size_max: u64,
    inner: RefCell<Inner>,
}

struct Inner {
    file: Option<File>,
    written: u64,
    buf: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
#[error("event log {path}: {source}")]
pub struct LogError {
    path: PathBuf,
    source: std::io::Error,
}

impl EventLog {
    pub fn open(dir: &Path, shard: usize, file_size_max: u64) -> Result<EventLog, LogError> {
        std::fs::create_dir_all(dir).map_err(|source| LogError {
            path: dir.to_owned(),
            source,
        })?;
        let log = EventLog {
            dir: dir.to_owned(),
            shard,
            file_size_max,
            inner: RefCell::new(Inner {
                file: None,
                written: 0,
                buf: Vec::with_capacity(64 << 10),
            }),
        };
        log.open_file()?;
        Ok(log)
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(format!("shard-{}.jsonl", self.shard))
    }

    fn open_file(&self) -> Result<(), LogError> {
        let path = self.path();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| LogError {
                path: path.clone(),
                source,
            })?;
        let written = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut inner = self.inner.borrow_mut();
        inner.file = Some(file);
        inner.written = written;
        Ok(())
    }

    /// Queue one event line. No I/O unless the buffer is past its flush mark.
    pub fn record(&self, event: &Event<'_>) {
        let full = {
            let mut inner = self.inner.borrow_mut();
            // Serializing our own plain structs cannot fail; if it ever did, drop the line
            // rather than the shard.
            if serde_json::to_writer(&mut inner.buf, event).is_ok() {
                inner.buf.push(b'\n');
            }
            inner.buf.len() >= BUFFER_FLUSH_BYTES
        };
        if full {
            self.flush();
        }
    }

    /// Write buffered lines, rotating the file when it is past its size limit.
    pub fn flush(&self) {
        let rotate = {
            let mut inner = self.inner.borrow_mut();
            if inner.buf.is_empty() {
                return;
            }
            let buf = std::mem::take(&mut inner.buf);
            let len = buf.len() as u64;
            if let Some(file) = inner.file.as_mut() {
                if let Err(e) = file.write_all(&buf) {
                    eprintln!("shard {}: event log write failed: {e}", self.shard);
                }
            }
            inner.written += len;
            inner.buf = buf;
            inner.buf.clear();
            inner.written >= self.file_size_max
        };
        if rotate {
            self.rotate();
        }
    }

    fn rotate(&self) {
        let now = crate::clock::now_ms();
        let rotated = self.dir.join(format!("shard-{}.{now}.jsonl", self.shard));
        self.inner.borrow_mut().file = None;
        if let Err(e) = std::fs::rename(self.path(), &rotated) {
            eprintln!("shard {}: cannot rotate event log: {e}", self.shard);
        }
        if let Err(e) = self.open_file() {
            eprintln!("shard {}: {e}", self.shard);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> Event<'_> {
        Event {
            kind: EventKind::Delivery,
            ts_ms: 1,
            message_id: id,
            queue_id: 7,
            shard: 0,
            sender: "s@x.test",
            recipient: Some("r@y.test"),
            recipients: None,
            domain: Some("y.test"),
            attempts: 1,
            response: None,
            peer: "127.0.0.1:25",
            received_ms: 0,
            next_attempt_ms: None,
            size: 10,
            tls: None,
            source: None,
        }
    }

    #[test]
    fn lines_are_json_and_files_rotate_by_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = EventLog::open(dir.path(), 3, 64 << 10).expect("open");
        for i in 0..2_000 {
            log.record(&event(&format!("m{i}")));
            if i % 100 == 0 {
                log.flush();
            }
        }
        log.flush();
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
                assert_eq!(v["shard"], 0);
                lines += 1;
            }
        }
        assert_eq!(lines, 2_000, "no line lost across rotations");
        assert!(dir.path().join("shard-3.jsonl").exists());
    }
}
