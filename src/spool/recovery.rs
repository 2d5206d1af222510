//! Recovery: rebuild a shard's state from its segments at start.
//!
//! Segments are read in sequence order and their records in file order, so the last outcome
//! recorded for a recipient wins. A segment with a bad header is renamed `*.corrupt` and left for
//! the operator; a bad record inside a segment is skipped by its checksum (see `record::scan`)
//! and the rest of the segment is still recovered. Nothing here panics on bad data.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::Path;

use super::record::{self, OutcomeKind, RecordKind, Scanned};
use super::segment;
use super::{io_err, Location, SpoolError};

/// Per-recipient state after replaying the outcomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RcptState {
    /// Not final: due for an attempt at this time (0 = now).
    Pending {
        attempts: u32,
        next_attempt_ms: u64,
    },
    Final(OutcomeKind),
}

#[derive(Clone, Debug)]
pub struct RecoveredMessage {
    pub id: u64,
    pub loc: Location,
    pub received_ms: u64,
    pub rcpts: Vec<String>,
    pub states: Vec<RcptState>,
}

impl RecoveredMessage {
    pub fn is_final(&self) -> bool {
        self.states.iter().all(|s| matches!(s, RcptState::Final(_)))
    }
}

#[derive(Clone, Debug, Default)]
pub struct SegmentInfo {
    pub live: u32,
    pub deps: BTreeSet<u64>,
}

/// What recovery found, for the log and the tests.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RecoveryReport {
    pub segments: usize,
    pub messages: usize,
    pub outcomes: usize,
    pub pending_messages: usize,
    pub corrupt_records: usize,
    pub corrupt_bytes: usize,
    pub torn_tails: usize,
    pub corrupt_segments: Vec<String>,
}

pub struct Recovered {
    /// Messages with at least one recipient not final, in id order.
    pub pending: Vec<RecoveredMessage>,
    pub segments: BTreeMap<u64, SegmentInfo>,
    pub next_id: u64,
    pub report: RecoveryReport,
}

pub fn recover(dir: &Path, shard: u32) -> Result<Recovered, SpoolError> {
    let mut seqs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_err("list spool dir", e))? {
        let entry = entry.map_err(|e| io_err("list spool dir", e))?;
        if let Some(seq) = entry.file_name().to_str().and_then(segment::parse_name) {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();

    let mut report = RecoveryReport::default();
    let mut messages: BTreeMap<u64, RecoveredMessage> = BTreeMap::new();
    let mut segments: BTreeMap<u64, SegmentInfo> = BTreeMap::new();
    let mut next_id = 1u64;
    for seq in seqs {
        let path = segment::path(dir, seq);
        let bytes = read_aligned(&path)?;
        if bytes.len() < segment::SEGMENT_HEADER_LEN {
            // A crash while creating the segment: no record is written before the header is
            // durable, so nothing acknowledged can be in it.
            eprintln!(
                "shard {shard}: removing incomplete new segment {}",
                path.display()
            );
            std::fs::remove_file(&path).map_err(|e| io_err("remove incomplete segment", e))?;
            continue;
        }
        if let Err(e) = segment::check_header(&bytes, shard, seq) {
            // An unreadable header means we cannot trust the file at all. Keep it for a human
            // rather than deleting mail, and keep going with the other segments.
            let bad = path.with_extension("corrupt");
            eprintln!(
                "shard {shard}: segment {} unusable ({e}); renamed to {}",
                path.display(),
                bad.display()
            );
            std::fs::rename(&path, &bad).map_err(|e| io_err("rename corrupt segment", e))?;
            report.corrupt_segments.push(bad.display().to_string());
            continue;
        }
        report.segments += 1;
        let mut info = SegmentInfo::default();
        let body = &bytes[segment::SEGMENT_HEADER_LEN..];
        for found in record::scan(body) {
            match found {
                Scanned::Record {
                    offset,
                    header,
                    payload,
                } => match header.kind {
                    RecordKind::Message => {
                        let Ok(m) = record::access_message(payload) else {
                            report.corrupt_records += 1;
                            continue;
                        };
                        let id = u64::from(m.id);
                        next_id = next_id.max(id + 1);
                        report.messages += 1;
                        let rcpts: Vec<String> =
                            m.rcpts.iter().map(|r| r.as_str().to_owned()).collect();
                        let states = vec![
                            RcptState::Pending {
                                attempts: 0,
                                next_attempt_ms: 0
                            };
                            rcpts.len()
                        ];
                        let loc = Location {
                            seq,
                            offset: (segment::SEGMENT_HEADER_LEN + offset) as u64,
                            len: header.framed_len() as u32,
                        };
                        messages.insert(
                            id,
                            RecoveredMessage {
                                id,
                                loc,
                                received_ms: m.received_ms.into(),
                                rcpts,
                                states,
                            },
                        );
                    }
                    RecordKind::Outcome => {
                        let Ok(o) = record::access_outcome(payload) else {
                            report.corrupt_records += 1;
                            continue;
                        };
                        report.outcomes += 1;
                        let id = u64::from(o.message);
                        let Some(msg) = messages.get_mut(&id) else {
                            // Its message's segment was already deleted: the message is final.
                            continue;
                        };
                        info.deps.insert(msg.loc.seq);
                        let Some(state) = msg.states.get_mut(u32::from(o.rcpt) as usize) else {
                            report.corrupt_records += 1;
                            continue;
                        };
                        *state = match OutcomeKind::from_u8(o.kind) {
                            Some(OutcomeKind::Deferred) => RcptState::Pending {
                                attempts: o.attempts.into(),
                                next_attempt_ms: o.next_attempt_ms.into(),
                            },
                            Some(kind) => RcptState::Final(kind),
                            None => {
                                report.corrupt_records += 1;
                                continue;
                            }
                        };
                    }
                },
                Scanned::Corrupt { offset, len, error } => {
                    eprintln!(
                        "shard {shard}: segment {seq}: skipped {len} corrupt bytes at offset {} ({error})",
                        segment::SEGMENT_HEADER_LEN + offset
                    );
                    report.corrupt_records += 1;
                    report.corrupt_bytes += len;
                }
                Scanned::TornTail { offset, len } => {
                    eprintln!(
                        "shard {shard}: segment {seq}: torn tail of {len} bytes at offset {} ignored",
                        segment::SEGMENT_HEADER_LEN + offset
                    );
                    report.torn_tails += 1;
                    report.corrupt_bytes += len;
                }
            }
        }
        segments.insert(seq, info);
    }

    let mut pending = Vec::new();
    for msg in messages.into_values() {
        if msg.is_final() {
            continue;
        }
        if let Some(info) = segments.get_mut(&msg.loc.seq) {
            info.live += 1;
        }
        pending.push(msg);
    }
    report.pending_messages = pending.len();
    Ok(Recovered {
        pending,
        segments,
        next_id,
        report,
    })
}

fn read_aligned(path: &Path) -> Result<rkyv::util::AlignedVec, SpoolError> {
    let mut file = std::fs::File::open(path).map_err(|e| io_err("open segment", e))?;
    let len = file
        .metadata()
        .map_err(|e| io_err("stat segment", e))?
        .len() as usize;
    let mut buf = rkyv::util::AlignedVec::with_capacity(len);
    buf.resize(len, 0);
    file.read_exact(&mut buf)
        .map_err(|e| io_err("read segment", e))?;
    Ok(buf)
}

/// Messages by id, for tests that look at a recovery result.
pub fn by_id(recovered: &Recovered) -> HashMap<u64, &RecoveredMessage> {
    recovered.pending.iter().map(|m| (m.id, m)).collect()
}
