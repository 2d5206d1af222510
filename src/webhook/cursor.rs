//! A webhook's durable position in one shard's event log: which file, and how far in.
//!
//! The file is named by its inode and a checksum of its first line, not only by its name:
//! rotation renames the live file (same inode, new name), and an inode can be reused by a
//! new file once an old one is deleted; the first line tells them apart. The name is kept
//! for people reading the cursor.
//!
//! A cursor is written atomically (a temporary file, fsync, rename, fsync of the directory):
//! after a crash it is the old one or the new one, never a mix. It only ever moves past
//! lines the receiver acknowledged.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// The file's name when the cursor was written (informative: it may have been rotated).
    pub file: String,
    pub inode: u64,
    /// crc32c of the file's first line (newline included, at most [`HEAD_BYTES_MAX`]).
    pub head_crc32c: u32,
    /// Bytes of the file sent (or skipped as unwanted): the next line starts here.
    pub offset: u64,
}

/// The first line's checksum covers at most this much: event lines are far shorter, and an
/// identity needs no more.
pub const HEAD_BYTES_MAX: usize = 4096;

#[derive(Debug, thiserror::Error)]
#[error("webhook cursor {path}: {source}")]
pub struct CursorError {
    path: PathBuf,
    source: std::io::Error,
}

/// `DIR/NAME.shard-N.json`.
pub fn path(dir: &Path, webhook: &str, shard: usize) -> PathBuf {
    dir.join(format!("{webhook}.shard-{shard}.json"))
}

/// The checksum of a file's first line, from its first bytes; None while it has no complete
/// first line (nor [`HEAD_BYTES_MAX`] bytes).
pub fn head_crc(head: &[u8]) -> Option<u32> {
    let head = &head[..head.len().min(HEAD_BYTES_MAX)];
    match memchr::memchr(b'\n', head) {
        Some(nl) => Some(crc32c::crc32c(&head[..=nl])),
        None if head.len() == HEAD_BYTES_MAX => Some(crc32c::crc32c(head)),
        None => None,
    }
}

/// The cursor at `path`; None when there is none yet. A cursor that cannot be parsed is an
/// error (the caller says so, and starts over: at-least-once).
pub fn load(path: &Path) -> Result<Option<Cursor>, CursorError> {
    let err = |source| CursorError {
        path: path.to_owned(),
        source,
    };
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

/// Replace the cursor at `path` with `cursor`, durably.
pub fn store(path: &Path, cursor: &Cursor) -> Result<(), CursorError> {
    let err = |source| CursorError {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("json.tmp");
    let mut body = serde_json::to_vec(cursor)
        .map_err(|e| err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    body.push(b'\n');
    let mut file = std::fs::File::create(&tmp).map_err(err)?;
    file.write_all(&body).map_err(err)?;
    file.sync_all().map_err(err)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(err)?;
    // The rename itself is durable only once the directory is.
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_and_replaces_the_old_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = path(dir.path(), "hook", 1);
        assert_eq!(load(&p).expect("none"), None);
        let mut c = Cursor {
            file: "shard-1.jsonl".into(),
            inode: 7,
            head_crc32c: 9,
            offset: 100,
        };
        store(&p, &c).expect("store");
        c.offset = 250;
        store(&p, &c).expect("store again");
        assert_eq!(load(&p).expect("load"), Some(c));
        assert!(!p.with_extension("json.tmp").exists(), "no temporary left");
        std::fs::write(&p, b"{\"file\":").expect("garble");
        assert!(load(&p).is_err(), "a torn cursor is an error, not a start");
    }

    #[test]
    fn head_checksum_needs_a_complete_first_line() {
        assert_eq!(head_crc(b"{\"a\":1}"), None);
        let one = head_crc(b"{\"a\":1}\n").expect("line");
        assert_eq!(head_crc(b"{\"a\":1}\n{\"b\":2}\n"), Some(one));
        assert_ne!(head_crc(b"{\"a\":2}\n"), Some(one));
        assert!(head_crc(&[b'x'; HEAD_BYTES_MAX + 10]).is_some());
    }
}
