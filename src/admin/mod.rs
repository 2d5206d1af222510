//! Queue operations on a running server: the requests an operator sends (over the admin
//! socket, later over HTTP) and what the shards answer.
//!
//! The wire is JSON lines: one [`Op`] per line in, one JSON object per line out, several per
//! connection. Every shard answers an operation about its own queue
//! (`Core::admin`); shard 0 merges the answers ([`merge`]). A request that is
//! not an operation gets `{"error": "..."}` and the connection stays usable.
//!
//! This module, [`merge`], [`reload`] and [`render`] do no I/O; [`socket`] binds the socket
//! and accepts on it (a thread), [`client`] is the CLI's blocking client, and `shard::admin`
//! serves the socket on shard 0.

pub mod client;
pub mod merge;
pub mod reload;
pub mod render;
pub mod socket;

use serde::{Deserialize, Serialize};

/// Longest request line, newline included. The largest operation is a few selectors and a
/// reason, well under 1 KiB; 64 KiB leaves room for long reasons and addresses while a
/// client that never sends a newline cannot make the server buffer without bound.
pub const REQUEST_LINE_MAX: usize = 64 << 10;

/// Longest string kept per field of the summary an Admin event line carries.
const SUMMARY_TEXT_MAX: usize = 1024;

/// One request line split off a connection's bytes, or a line that was too long (its bytes
/// are dropped up to its newline).
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Request(Vec<u8>),
    TooLong,
}

/// Splits a connection's bytes into request lines of at most [`REQUEST_LINE_MAX`] bytes,
/// holding at most that much.
#[derive(Debug, Default)]
pub struct Lines {
    buf: Vec<u8>,
    /// In a line that was too long: drop bytes until its newline.
    skipping: bool,
}

impl Lines {
    /// Take `bytes` read from the connection; the complete lines in them, in order.
    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<Line> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let newline = memchr::memchr(b'\n', bytes);
            let (part, rest) = match newline {
                Some(at) => (&bytes[..at], &bytes[at + 1..]),
                None => (bytes, &[][..]),
            };
            bytes = rest;
            if !self.skipping {
                if self.buf.len() + part.len() >= REQUEST_LINE_MAX {
                    self.buf.clear();
                    self.skipping = true;
                    out.push(Line::TooLong);
                } else {
                    self.buf.extend_from_slice(part);
                }
            }
            if newline.is_some() {
                if !self.skipping {
                    out.push(Line::Request(std::mem::take(&mut self.buf)));
                }
                self.skipping = false;
            }
        }
        out
    }
}

/// The operation on a request line, or why it is none (for an `error` answer).
pub fn parse_request(line: &[u8]) -> Result<Op, String> {
    let text = std::str::from_utf8(line).map_err(|_| "bad request: not UTF-8".to_owned())?;
    let text = text.trim();
    if text.is_empty() {
        return Err("bad request: empty line (send one JSON object per line)".into());
    }
    serde_json::from_str::<Op>(text).map_err(|e| format!("bad request: {e}"))
}

/// An answer saying only what went wrong.
pub fn error(why: impl std::fmt::Display) -> serde_json::Value {
    serde_json::json!({ "error": why.to_string() })
}

/// What an event line keeps of an answer: its numbers, booleans and short strings (counts,
/// `error`, `restart_needed`...), not its lists of rows.
pub fn summary(answer: &serde_json::Value) -> serde_json::Value {
    let Some(object) = answer.as_object() else {
        return serde_json::Value::Null;
    };
    let kept = object
        .iter()
        .filter_map(|(k, v)| {
            let v = match v {
                serde_json::Value::String(s) if s.len() > SUMMARY_TEXT_MAX => {
                    let mut end = SUMMARY_TEXT_MAX;
                    while !s.is_char_boundary(end) {
                        end -= 1;
                    }
                    serde_json::Value::String(format!("{}...", &s[..end]))
                }
                serde_json::Value::Array(a) if a.iter().all(|x| x.is_string()) && a.len() <= 64 => {
                    v.clone()
                }
                serde_json::Value::Array(_) | serde_json::Value::Object(_) => return None,
                other => other.clone(),
            };
            Some((k.clone(), v))
        })
        .collect();
    serde_json::Value::Object(kept)
}

/// Where operations the core does not carry out go: suppression lists and dead-letter
/// re-injection, wired in by their own stages. Called on every shard, like `Core::admin`, with
/// the answers merged the same way.
pub trait Hooks {
    fn suppression(&self, op: &SuppressionOp, now_ms: u64) -> serde_json::Value;
    fn reinject(&self, id: Option<&str>, now_ms: u64) -> serde_json::Value;
}

/// The hooks until those stages exist: every call answers that the operation is not
/// available.
pub struct Unwired;

impl Hooks for Unwired {
    fn suppression(&self, _op: &SuppressionOp, _now_ms: u64) -> serde_json::Value {
        error("`suppression` is not available on this server yet")
    }

    fn reinject(&self, _id: Option<&str>, _now_ms: u64) -> serde_json::Value {
        error("`reinject` is not available on this server yet")
    }
}

/// Which messages or destinations an operation is about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selector {
    /// A recipient domain (lower case).
    Domain(String),
    /// A site: the rolled-up MX host set as `epoxi queue summary` prints it, or a route.
    Site(String),
    /// A tenant (from `X-Tenant`).
    Tenant(String),
    /// A campaign (arrives with campaigns; matches nothing until then).
    Campaign(String),
    /// One message, by reception id or queue id.
    Id(String),
}

/// Suppression list operations. Not a queue operation: every shard answers through
/// [`Hooks::suppression`], wired to `suppression::AdminHooks` (`Suppression::admin_here`):
/// `List` gives that shard's entries (merged: concatenated), `Add`/`Remove` act on the shard
/// that owns the address's domain, durably before it answers, and count 0 on the others
/// (merged: summed), so the answer is `{"entries": [...]}`, `{"added": 0|1}` or
/// `{"removed": 0|1}`. `tenant: null` is the default list; `List` takes `"*"` for every list;
/// `limit` defaults to `suppression::LIST_DEFAULT_MAX`. Code on one shard that wants the
/// routed operation without the socket calls `Suppression::admin` (over the mesh).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum SuppressionOp {
    List {
        tenant: Option<String>,
        #[serde(default)]
        limit: Option<usize>,
    },
    Add {
        tenant: Option<String>,
        rcpt: String,
        #[serde(default)]
        reason: Option<String>,
    },
    Remove {
        tenant: Option<String>,
        rcpt: String,
    },
}

/// One operation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Per site and per tenant: ready, scheduled, in flight, oldest age, suspensions.
    Summary,
    Inspect {
        selector: Selector,
        #[serde(default)]
        limit: Option<usize>,
    },
    /// Hold matching messages (no delivery attempts) until resumed or `duration_s` passes.
    /// Max age still applies.
    Suspend {
        selector: Selector,
        #[serde(default)]
        duration_s: Option<u64>,
        #[serde(default)]
        reason: Option<String>,
    },
    Resume {
        selector: Selector,
    },
    /// Bounce matching queued messages, and new matching ones while the directive lasts
    /// (`duration_s`, default 5 min); `notify`: send RFC 3464 notices as for any bounce.
    Bounce {
        selector: Selector,
        #[serde(default)]
        duration_s: Option<u64>,
        #[serde(default)]
        reason: Option<String>,
        #[serde(default)]
        notify: bool,
    },
    /// Retry now: scheduled messages (all, or matching) become due, site backoffs end.
    Flush {
        #[serde(default)]
        selector: Option<Selector>,
    },
    /// Send mail for `domain` through egress pool `pool` from now on (until reload/restart).
    Rebind {
        domain: String,
        pool: String,
    },
    /// Re-inject dead letters (all, or one by id).
    Reinject {
        #[serde(default)]
        id: Option<String>,
    },
    Suppression(SuppressionOp),
    Reload,
}

impl Op {
    /// The name of the operation, for the event log.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Summary => "summary",
            Op::Inspect { .. } => "inspect",
            Op::Suspend { .. } => "suspend",
            Op::Resume { .. } => "resume",
            Op::Bounce { .. } => "bounce",
            Op::Flush { .. } => "flush",
            Op::Rebind { .. } => "rebind",
            Op::Reinject { .. } => "reinject",
            Op::Suppression(_) => "suppression",
            Op::Reload => "reload",
        }
    }

    /// Whether the operation changes anything (and is logged as an event).
    pub fn mutates(&self) -> bool {
        !matches!(
            self,
            Op::Summary | Op::Inspect { .. } | Op::Suppression(SuppressionOp::List { .. })
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_say_why() {
        assert_eq!(parse_request(br#"{"op":"summary"}"#), Ok(Op::Summary));
        assert_eq!(
            parse_request(br#"{"op":"suspend","selector":{"domain":"a.test"},"duration_s":60}"#),
            Ok(Op::Suspend {
                selector: Selector::Domain("a.test".into()),
                duration_s: Some(60),
                reason: None
            })
        );
        let unknown = parse_request(br#"{"op":"explode"}"#).expect_err("unknown op");
        assert!(unknown.contains("unknown variant `explode`"), "{unknown}");
        assert!(parse_request(b"{not json").is_err());
        assert!(parse_request(b"  ").is_err());
        assert!(parse_request(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn lines_split_and_overlong_ones_are_dropped_once() {
        let mut lines = Lines::default();
        assert_eq!(lines.push(b"{\"op\":"), vec![]);
        assert_eq!(
            lines.push(b"\"summary\"}\r\n{}\n"),
            vec![
                Line::Request(b"{\"op\":\"summary\"}\r".to_vec()),
                Line::Request(b"{}".to_vec())
            ]
        );
        let long = vec![b'x'; REQUEST_LINE_MAX];
        assert_eq!(lines.push(&long), vec![Line::TooLong]);
        assert_eq!(lines.push(&long), vec![]);
        assert_eq!(lines.push(b"xx\nok\n"), vec![Line::Request(b"ok".to_vec())]);
    }

    #[test]
    fn summaries_keep_counts_not_lists() {
        let answer = serde_json::json!({
            "matched": 3, "error": "x", "messages": [{"id": 1}], "restart_needed": ["spool"]
        });
        assert_eq!(
            summary(&answer),
            serde_json::json!({"matched": 3, "error": "x", "restart_needed": ["spool"]})
        );
    }
}
