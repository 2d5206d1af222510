//! Event webhooks: the event-log lines (all, or the types a `[[webhook]]` names) POSTed to
//! HTTP receivers in batches, with retries, from a durable cursor over the log files.
//!
//! Nothing rides the mail queues: a webhook reads the files the shards' event logs write
//! (`eventlog`: `LOG/shard-N.jsonl`, rotated to `shard-N.<unix-ms>.jsonl`) on an OS thread
//! of its own, never on a shard's executor, so a receiver that is down or slow only makes its
//! webhook fall behind in the files; mail never waits for it.
//!
//! Invariants:
//! - Per (webhook, shard) stream, lines go out in log order, one batch at a time. A batch is
//!   resent (never skipped) until the receiver answers 2xx, and only then does the stream's
//!   cursor move past it, durably ([`cursor`]). After a crash the last batch may come again
//!   (at-least-once); nothing else is sent twice, nothing is skipped.
//! - Only complete lines are read: a line the writer has not finished waits for its newline.
//! - A webhook holds at most `batch_max` lines (and one read chunk, [`tail::READ_CHUNK_MAX`]).
//! - A webhook with no cursor yet starts at the oldest log file present (nothing lost); a
//!   cursor whose file is gone (rotated away and deleted) restarts there too, with a warning.
//!
//! Parts: [`tail`] decides which file and offset come next and which lines make a batch (no
//! I/O but the reads it is handed); [`cursor`] is the durable position; [`backoff`] is the
//! retry schedule and the rate limit of warnings, on a clock passed in; [`sender`] is the
//! thread, a thin adapter that reads, POSTs and sleeps. [`Status`] is what the metrics and
//! the dashboard read: delivered count, lag in bytes, last error, failing since.

pub mod backoff;
pub mod cursor;
mod sender;
pub mod tail;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::{ConfigError, WebhookEntry};

/// Lines in one batch, at most: 10,000 event lines are a few MB of JSON, about what a
/// receiver takes in one request body.
pub const BATCH_MAX_CEILING: usize = 10_000;
/// Webhooks, at most: each is a thread with a connection of its own.
pub const WEBHOOKS_MAX: usize = 16;
/// A POST's timeout, at most (5 minutes): longer, and a stuck receiver holds up shutdown.
pub const TIMEOUT_MS_MAX: u64 = 300_000;
/// The retry delay's cap, at most (an hour): a receiver back after an outage should not
/// wait longer than that for the next try.
pub const RETRY_MS_MAX: u64 = 3_600_000;
/// A name is part of a file name: short, and of safe characters.
const NAME_LEN_MAX: usize = 64;

/// How a batch goes to the receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One POST with a JSON array of the batch's lines.
    Array,
    /// One POST per line, its JSON object.
    Object,
}

/// A `[[webhook]]` table, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub name: String,
    pub url: String,
    /// The line types it wants (None: every type).
    pub events: Option<Vec<&'static str>>,
    pub batch_max: usize,
    pub format: Format,
    pub headers: Vec<(String, String)>,
    pub timeout_ms: u64,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
}

impl Spec {
    /// Whether lines of type `kind` go to this webhook.
    pub fn wants(&self, kind: &str) -> bool {
        self.events.as_ref().is_none_or(|list| list.contains(&kind))
    }

    /// Check every `[[webhook]]` table; errors name the table and key.
    pub fn from_entries(entries: &[WebhookEntry]) -> Result<Vec<Spec>, ConfigError> {
        if entries.len() > WEBHOOKS_MAX {
            let reason = format!("{} webhooks, at most {WEBHOOKS_MAX}", entries.len());
            return Err(crate::config::invalid("webhook", reason));
        }
        let mut specs: Vec<Spec> = Vec::with_capacity(entries.len());
        for (index, e) in entries.iter().enumerate() {
            let err = |key: &'static str, reason: String| ConfigError::InTable {
                table: "webhook",
                index,
                key,
                reason,
            };
            let name = e.name.clone().unwrap_or_else(|| format!("webhook-{index}"));
            let safe = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
            if name.is_empty()
                || name.len() > NAME_LEN_MAX
                || !name.chars().all(safe)
                || name.starts_with('.')
            {
                let reason = format!(
                    "`{name}`: 1 to {NAME_LEN_MAX} letters, digits, `-`, `_` or `.` \
                     (it names the cursor files)"
                );
                return Err(err("name", reason));
            }
            if specs.iter().any(|s| s.name == name) {
                return Err(err("name", format!("`{name}` names two webhooks")));
            }
            check_url(&e.url).map_err(|why| err("url", format!("`{}`: {why}", e.url)))?;
            let events = match &e.events {
                None => None,
                Some(list) if list.is_empty() => {
                    return Err(err("events", "must name at least one type".into()))
                }
                Some(list) => Some(
                    list.iter()
                        .map(|k| {
                            crate::eventlog::LINE_TYPES
                                .iter()
                                .copied()
                                .find(|t| *t == k)
                                .ok_or_else(|| {
                                    let known = crate::eventlog::LINE_TYPES.join(", ");
                                    err("events", format!("unknown type `{k}` (known: {known})"))
                                })
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            if !(1..=BATCH_MAX_CEILING).contains(&e.batch_max) {
                let reason = format!("must be between 1 and {BATCH_MAX_CEILING}");
                return Err(err("batch_max", reason));
            }
            let format = match e.format.as_str() {
                "array" => Format::Array,
                "object" => Format::Object,
                other => {
                    let reason = format!("`{other}`: must be \"array\" or \"object\"");
                    return Err(err("format", reason));
                }
            };
            let mut headers = Vec::with_capacity(e.headers.len());
            for (k, v) in &e.headers {
                let Ok(header) = ureq::http::HeaderName::from_bytes(k.as_bytes()) else {
                    return Err(err("headers", format!("`{k}` is not a header name")));
                };
                if [
                    "content-type",
                    "content-length",
                    "host",
                    "transfer-encoding",
                ]
                .contains(&header.as_str())
                {
                    return Err(err("headers", format!("`{k}` is set by the sender itself")));
                }
                if ureq::http::HeaderValue::from_str(v).is_err() {
                    return Err(err(
                        "headers",
                        format!("`{k}`: the value is not a header value"),
                    ));
                }
                headers.push((k.clone(), v.clone()));
            }
            if !(1..=TIMEOUT_MS_MAX).contains(&e.timeout_ms) {
                let reason = format!("must be between 1 and {TIMEOUT_MS_MAX}");
                return Err(err("timeout_ms", reason));
            }
            if !(1..=RETRY_MS_MAX).contains(&e.retry_base_ms) {
                let reason = format!("must be between 1 and {RETRY_MS_MAX}");
                return Err(err("retry_base_ms", reason));
            }
            if !(e.retry_base_ms..=RETRY_MS_MAX).contains(&e.retry_max_ms) {
                let reason = format!("must be between retry_base_ms and {RETRY_MS_MAX}");
                return Err(err("retry_max_ms", reason));
            }
            specs.push(Spec {
                name,
                url: e.url.clone(),
                events,
                batch_max: e.batch_max,
                format,
                headers,
                timeout_ms: e.timeout_ms,
                retry_base_ms: e.retry_base_ms,
                retry_max_ms: e.retry_max_ms,
            });
        }
        Ok(specs)
    }
}

/// An `http://` or `https://` URL with a host.
fn check_url(url: &str) -> Result<(), &'static str> {
    let uri = ureq::http::Uri::try_from(url).map_err(|_| "not a URL")?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err("must start with http:// or https://"),
    }
    match uri.host() {
        Some(h) if !h.is_empty() => Ok(()),
        _ => Err("has no host"),
    }
}

/// One webhook's figures, updated by its thread, read by anyone (metrics, dashboard): atomics
/// and a small lock for the error text, so a reader never waits on a POST.
#[derive(Debug, Default)]
pub struct Status {
    pub name: String,
    /// Lines the receiver acknowledged (2xx), since start.
    delivered: AtomicU64,
    /// Bytes of log not yet read past, over the webhook's shards (refreshed about once a
    /// second, and as batches go).
    pending_bytes: AtomicU64,
    /// When the current run of failures began (Unix ms); 0: not failing.
    failing_since_ms: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// A [`Status`] read at one moment.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StatusView {
    pub name: String,
    pub delivered: u64,
    pub pending_bytes: u64,
    pub failing_since_ms: Option<u64>,
    pub last_error: Option<String>,
}

impl Status {
    fn new(name: &str) -> Status {
        Status {
            name: name.to_owned(),
            ..Status::default()
        }
    }

    pub fn view(&self) -> StatusView {
        let since = self.failing_since_ms.load(Ordering::Relaxed);
        StatusView {
            name: self.name.clone(),
            delivered: self.delivered.load(Ordering::Relaxed),
            pending_bytes: self.pending_bytes.load(Ordering::Relaxed),
            failing_since_ms: (since != 0).then_some(since),
            last_error: self.error_slot().clone(),
        }
    }

    fn error_slot(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // A panic elsewhere while holding it leaves a string: still fine to read or replace.
        self.last_error.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn delivered(&self, lines: u64) {
        self.delivered.fetch_add(lines, Ordering::Relaxed);
    }

    fn set_pending(&self, bytes: u64) {
        self.pending_bytes.store(bytes, Ordering::Relaxed);
    }

    fn failed(&self, since_ms: u64, error: &str) {
        self.failing_since_ms
            .store(since_ms.max(1), Ordering::Relaxed);
        *self.error_slot() = Some(error.to_owned());
    }

    /// The receiver took a batch again; the last error stays for whoever wants to see it.
    fn recovered(&self) {
        self.failing_since_ms.store(0, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhooks: cannot create {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("webhook {name}: cannot start its thread: {source}")]
    Thread {
        name: String,
        source: std::io::Error,
    },
}

/// The cursors' directory, under the log directory.
pub fn cursor_dir(log_dir: &Path) -> PathBuf {
    log_dir.join("webhooks")
}

/// The running webhooks: their threads and their figures. Dropping it stops them as
/// [`Webhooks::stop`] does.
pub struct Webhooks {
    running: Vec<sender::Running>,
    statuses: Vec<Arc<Status>>,
}

impl Webhooks {
    /// Start a thread per webhook over the logs of shards `0..shards` (and of any other
    /// shard with files in `log_dir`, left by a run with more shards).
    pub fn start(specs: &[Spec], log_dir: &Path, shards: usize) -> Result<Webhooks, WebhookError> {
        let mut running = Vec::with_capacity(specs.len());
        let mut statuses = Vec::with_capacity(specs.len());
        if specs.is_empty() {
            return Ok(Webhooks { running, statuses });
        }
        let dir = cursor_dir(log_dir);
        std::fs::create_dir_all(&dir).map_err(|source| WebhookError::Dir {
            path: dir.clone(),
            source,
        })?;
        let mut shard_list: std::collections::BTreeSet<usize> = (0..shards).collect();
        shard_list.extend(tail::shards_present(log_dir));
        for spec in specs {
            let status = Arc::new(Status::new(&spec.name));
            let r = sender::spawn(
                spec.clone(),
                log_dir.to_owned(),
                shard_list.iter().copied().collect(),
                status.clone(),
            )
            .map_err(|source| WebhookError::Thread {
                name: spec.name.clone(),
                source,
            })?;
            running.push(r);
            statuses.push(status);
        }
        Ok(Webhooks { running, statuses })
    }

    /// Each webhook's figures, in `[[webhook]]` order.
    pub fn statuses(&self) -> &[Arc<Status>] {
        &self.statuses
    }

    /// Let every webhook send what the log holds for up to [`sender::DRAIN_MS_MAX`] (call it
    /// once the shards have flushed their logs), then stop. What is left goes next start,
    /// from the cursors.
    pub fn stop(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        for r in &self.running {
            r.drain();
        }
        for r in self.running.drain(..) {
            r.join();
        }
    }
}

impl Drop for Webhooks {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests;
