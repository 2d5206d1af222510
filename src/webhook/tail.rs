//! Following one shard's event log: which file comes next, where a stream resumes, and which
//! complete lines of a chunk make a batch. Decisions only; the reads are the caller's.
//!
//! A shard's files, in order, are its rotated files by stamp, then the live one
//! (`eventlog::FileOrder`). Rotation renames the live file and starts a new one, so a reader
//! that reaches the end of its file asks whether the file is still the live one: if so, more
//! lines will come; if not, it is final, and the next file in order follows.

use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::eventlog::FileOrder;
use crate::webhook::cursor::Cursor;

/// Bytes read at a time, and so the longest line a webhook sends: an event line is well under
/// a KiB; one over a MiB is not an event line, and is skipped (and counted).
pub const READ_CHUNK_MAX: usize = 1 << 20;

/// One log file of a shard, as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileInfo {
    pub name: String,
    pub order: FileOrder,
    pub inode: u64,
    pub len: u64,
}

/// The log files of `shard` in `dir`, oldest first (none when the directory is missing).
pub fn list(dir: &Path, shard: usize) -> Vec<FileInfo> {
    let mut files = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return files;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((s, order)) = crate::eventlog::parse_file_name(name) else {
            continue;
        };
        if s != shard {
            continue;
        }
        // Gone between the listing and the look (deleted): not a file any more.
        let Ok(meta) = entry.metadata() else { continue };
        files.push(FileInfo {
            name: name.to_owned(),
            order,
            inode: meta.ino(),
            len: meta.len(),
        });
    }
    files.sort_by_key(|f| f.order);
    files
}

/// The shards with log files in `dir`.
pub fn shards_present(dir: &Path) -> std::collections::BTreeSet<usize> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Default::default();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            crate::eventlog::parse_file_name(name.to_str()?).map(|(s, _)| s)
        })
        .collect()
}

/// Where a stream starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// In `files[index]`, at `offset`.
    At { index: usize, offset: u64 },
    /// At the start of the oldest file; `warning` says why, when there was a cursor.
    Oldest { warning: Option<String> },
    /// No file yet.
    Nothing,
}

/// Resume from `cursor` among `files`; `head` gives a file's first-line checksum (None: it
/// has none yet).
pub fn resume(
    cursor: Option<&Cursor>,
    files: &[FileInfo],
    mut head: impl FnMut(&FileInfo) -> Option<u32>,
) -> Start {
    if files.is_empty() {
        return Start::Nothing;
    }
    let Some(c) = cursor else {
        return Start::Oldest { warning: None };
    };
    let found = files
        .iter()
        .position(|f| f.inode == c.inode && head(f) == Some(c.head_crc32c));
    let warning = match found {
        Some(index) if c.offset <= files[index].len => {
            return Start::At {
                index,
                offset: c.offset,
            }
        }
        Some(index) => format!(
            "its file {} is shorter ({} bytes) than the cursor's offset {}",
            files[index].name, files[index].len, c.offset
        ),
        None => format!("its file {} (inode {}) is gone", c.file, c.inode),
    };
    Start::Oldest {
        warning: Some(warning),
    }
}

/// What follows a finished (rotated) file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// `files[index]`.
    File(usize),
    /// Nothing yet: the writer has not opened its new file.
    NotYet,
    /// The finished file is no longer listed, and where it stood cannot be told: start over
    /// at the oldest file present.
    Lost,
}

/// The file after the one with `inode`, which stood at `order` when last listed.
pub fn next_after(files: &[FileInfo], inode: u64, order: FileOrder) -> Next {
    if let Some(i) = files.iter().position(|f| f.inode == inode) {
        return match files.get(i + 1) {
            Some(_) => Next::File(i + 1),
            None => Next::NotYet,
        };
    }
    // Deleted once read to its end: the files after it are those of a later stamp. A file
    // last seen live had no stamp yet, so its place is lost.
    match order {
        FileOrder::Live => Next::Lost,
        FileOrder::Rotated { .. } => match files.iter().position(|f| f.order > order) {
            Some(i) => Next::File(i),
            None => Next::NotYet,
        },
    }
}

/// Bytes of log after a position: the rest of its file and every later one.
pub fn pending_bytes(files: &[FileInfo], inode: u64, offset: u64) -> u64 {
    match files.iter().position(|f| f.inode == inode) {
        Some(i) => {
            files[i].len.saturating_sub(offset) + files[i + 1..].iter().map(|f| f.len).sum::<u64>()
        }
        None => files.iter().map(|f| f.len).sum(),
    }
}

/// What one chunk of a file gives.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// The lines to send (without their newline), as ranges of the chunk, in order.
    pub lines: Vec<Range<usize>>,
    /// Bytes of the chunk done with: sent once `lines` are, skipped otherwise.
    pub consumed: usize,
    /// Lines that are not JSON objects with a `type` (a torn line after a crash), or too
    /// long: skipped.
    pub bad: u64,
    /// The chunk ended inside a line too long to send: skip up to its newline next time.
    pub discarding: bool,
}

/// The complete lines at the start of `chunk` that `wants` takes, up to `batch_max` of them.
/// `discarding`: the chunk starts inside an over-long line. `full`: the chunk is as long as a
/// read gets ([`READ_CHUNK_MAX`]), so a line that does not end in it never will.
/// No I/O, and no allocation but the ranges.
pub fn scan(
    chunk: &[u8],
    discarding: bool,
    full: bool,
    batch_max: usize,
    mut wants: impl FnMut(&str) -> bool,
) -> Scan {
    let mut out = Scan::default();
    let mut pos = 0;
    if discarding {
        match memchr::memchr(b'\n', chunk) {
            Some(nl) => pos = nl + 1,
            None => {
                out.consumed = chunk.len();
                out.discarding = true;
                return out;
            }
        }
    }
    while out.lines.len() < batch_max {
        let Some(nl) = memchr::memchr(b'\n', &chunk[pos..]) else {
            break;
        };
        let line = &chunk[pos..pos + nl];
        match line_type(line) {
            Some(kind) if wants(&kind) => out.lines.push(pos..pos + nl),
            Some(_) => {}
            None if line.iter().all(u8::is_ascii_whitespace) => {}
            None => out.bad += 1,
        }
        pos += nl + 1;
    }
    if pos == 0 && full && !chunk.is_empty() {
        // One line longer than a read: never sendable, so skipped.
        out.bad += 1;
        out.discarding = true;
        pos = chunk.len();
    }
    out.consumed = pos;
    out
}

/// The `type` of a JSON line; None when it is not a JSON object with a string `type`.
fn line_type(line: &[u8]) -> Option<std::borrow::Cow<'_, str>> {
    #[derive(serde::Deserialize)]
    struct Typed<'a> {
        #[serde(rename = "type", borrow)]
        kind: std::borrow::Cow<'a, str>,
    }
    serde_json::from_slice::<Typed<'_>>(line)
        .ok()
        .map(|t| t.kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, inode: u64, len: u64) -> FileInfo {
        FileInfo {
            name: name.into(),
            order: crate::eventlog::parse_file_name(name).expect("name").1,
            inode,
            len,
        }
    }

    #[test]
    fn scan_takes_complete_wanted_lines_up_to_batch_max() {
        let chunk = b"{\"type\":\"Delivery\",\"n\":1}\n{\"type\":\"Reception\"}\n\
                      {\"type\":\"Delivery\",\"n\":2}\n{\"type\":\"Delivery\",\"n\":3}\n{\"type\":\"Deli";
        let s = scan(chunk, false, false, 10, |k| k == "Delivery");
        assert_eq!(s.lines.len(), 3);
        assert_eq!(
            &chunk[s.lines[0].clone()],
            b"{\"type\":\"Delivery\",\"n\":1}"
        );
        assert_eq!(s.bad, 0);
        // The partial last line is not consumed: it waits for its newline.
        assert_eq!(&chunk[s.consumed..], b"{\"type\":\"Deli");
        // batch_max stops the scan right after the last line taken; the skipped Reception
        // line before the second Delivery is consumed with it.
        let s = scan(chunk, false, false, 2, |k| k == "Delivery");
        assert_eq!(s.lines.len(), 2);
        assert_eq!(s.consumed, s.lines[1].end + 1);
        // Nothing wanted: all complete lines consumed, none to send.
        let s = scan(chunk, false, false, 10, |k| k == "Bounce");
        assert!(s.lines.is_empty());
        assert_eq!(&chunk[s.consumed..], b"{\"type\":\"Deli");
    }

    #[test]
    fn bad_and_overlong_lines_are_skipped_and_counted() {
        let s = scan(
            b"{\"type\":\"Rec\n{\"type\":\"A\"}\n\n",
            false,
            false,
            10,
            |_| true,
        );
        assert_eq!((s.lines.len(), s.bad), (1, 1));
        let long = vec![b'x'; 100];
        let s = scan(&long, false, true, 10, |_| true);
        assert!(s.discarding && s.consumed == 100 && s.bad == 1);
        let s = scan(b"xxxx", true, false, 10, |_| true);
        assert!(s.discarding && s.consumed == 4 && s.bad == 0);
        let s = scan(b"xx\n{\"type\":\"A\"}\n", true, false, 10, |_| true);
        assert!(!s.discarding);
        assert_eq!(s.lines, vec![3..15]);
        // An unfinished line in a chunk that is not full just waits.
        let s = scan(b"{\"type\"", false, false, 10, |_| true);
        assert_eq!(s, Scan::default());
    }

    #[test]
    fn resume_finds_the_file_by_inode_and_head_through_a_rotation() {
        let cursor = Cursor {
            file: "shard-0.jsonl".into(),
            inode: 5,
            head_crc32c: 42,
            offset: 300,
        };
        // The live file was rotated since: same inode, new name.
        let files = vec![
            file("shard-0.100.jsonl", 5, 400),
            file("shard-0.jsonl", 6, 10),
        ];
        let head = |f: &FileInfo| Some(if f.inode == 5 { 42 } else { 1 });
        assert_eq!(
            resume(Some(&cursor), &files, head),
            Start::At {
                index: 0,
                offset: 300
            }
        );
        // Deleted, and its inode reused by a new file: the head tells.
        let files = vec![file("shard-0.jsonl", 5, 400)];
        let start = resume(Some(&cursor), &files, |_| Some(7));
        assert!(matches!(start, Start::Oldest { warning: Some(w) } if w.contains("gone")));
        // Truncated under us: start over, and say so.
        let files = vec![file("shard-0.jsonl", 5, 100)];
        let start = resume(Some(&cursor), &files, |_| Some(42));
        assert!(matches!(start, Start::Oldest { warning: Some(w) } if w.contains("shorter")));
        assert_eq!(
            resume(None, &files, |_| None),
            Start::Oldest { warning: None }
        );
        assert_eq!(resume(Some(&cursor), &[], |_| None), Start::Nothing);
    }

    #[test]
    fn next_file_is_the_next_in_order_or_waits_for_the_writer() {
        let files = vec![
            file("shard-0.100.jsonl", 1, 10),
            file("shard-0.200.jsonl", 2, 10),
            file("shard-0.jsonl", 3, 10),
        ];
        let live = FileOrder::Live;
        assert_eq!(next_after(&files, 1, live), Next::File(1));
        assert_eq!(next_after(&files, 2, live), Next::File(2));
        assert_eq!(next_after(&files, 3, live), Next::NotYet);
        // Rotated and deleted once read: the next by stamp.
        let gone = FileOrder::Rotated { ms: 150, k: 0 };
        assert_eq!(next_after(&files, 9, gone), Next::File(1));
        assert_eq!(next_after(&files, 9, live), Next::Lost);
        // Between the writer's rename and its new file: nothing after the rotated one yet.
        let files = vec![file("shard-0.100.jsonl", 1, 10)];
        assert_eq!(next_after(&files, 1, live), Next::NotYet);
        assert_eq!(pending_bytes(&files, 1, 4), 6);
    }
}
