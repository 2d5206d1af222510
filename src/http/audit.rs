//! The audit log: one JSON line per admin call (over HTTP or the admin socket): who, what,
//! when, from where, and the result. Append-only (`O_APPEND`, mode 0600), each line synced
//! before the call is answered, so an answered operation is on record. Admin calls come at a
//! human pace, so a sync per line costs nothing that matters.

use std::io::Write as _;
use std::path::Path;

use serde::Serialize;

/// A result kept in the log is cut to this many bytes: the counts and errors matter, not
/// lists of messages.
const RESULT_TEXT_MAX: usize = 4096;

#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    pub ts_ms: u64,
    /// The token's name, `loopback`, or `uid:N` on the admin socket.
    pub who: &'a str,
    /// The token's role (`socket` for the admin socket).
    pub role: &'a str,
    /// The client's address, or `admin.sock`.
    pub from: &'a str,
    /// `POST /api/admin/suspend/v1`, or the socket's operation name.
    pub what: &'a str,
    /// The operation's arguments.
    pub args: &'a serde_json::Value,
    /// The HTTP status (200 for the socket's answers without `error`).
    pub status: u16,
    /// The answer, summarized (`admin::summary`), or the error.
    pub result: &'a serde_json::Value,
}

impl Entry<'_> {
    /// The line, newline included.
    pub fn line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        if line.len() > RESULT_TEXT_MAX * 2 {
            // Keep it one valid JSON line even for huge arguments.
            let short = serde_json::json!({
                "ts_ms": self.ts_ms, "who": self.who, "role": self.role, "from": self.from,
                "what": self.what, "status": self.status, "truncated": true,
            });
            line = serde_json::to_vec(&short).unwrap_or_default();
        }
        line.push(b'\n');
        line
    }
}

/// Append `line` to the audit log at `path` and sync it. Blocking: run it off the shard.
pub fn append(path: &Path, line: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(line)?;
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_append_and_stay_json() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("audit.jsonl");
        let args = serde_json::json!({"domain": "a.test"});
        let result = serde_json::json!({"matched": 2});
        for what in ["POST /api/admin/suspend/v1", "POST /api/admin/resume/v1"] {
            let entry = Entry {
                ts_ms: 1,
                who: "ops",
                role: "operator",
                from: "127.0.0.1",
                what,
                args: &args,
                status: 200,
                result: &result,
            };
            append(&path, &entry.line()).expect("append");
        }
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["what"], "POST /api/admin/resume/v1");
        assert_eq!(lines[0]["result"]["matched"], 2);
    }
}
