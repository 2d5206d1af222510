//! Recovery: rebuild a shard's state from its segments at start, from the records alone.
//!
//! Segments are replayed in sequence order and their records in file order, so the last outcome
//! recorded for a recipient wins. A message record whose id was seen before is a copy made by
//! compaction: it moves the message and keeps its recipients' states (the copy is followed by
//! outcomes restating them). An outcome for recipient [`TOMBSTONE_RCPT`] marks the whole message
//! final. The envelope of every pending message comes from its record, so no body is read back
//! and no message is ever rebuilt without its sender.
//!
//! A segment with a bad header is renamed `*.corrupt` and left for the operator. Bytes inside a
//! segment that are not a valid record (a checksum or archive that does not verify) are copied
//! to `quarantine/` for the operator, reported with their location, and skipped; the rest of the
//! segment is still recovered. A torn tail (a write a crash cut short) was never acknowledged
//! and is only counted. Nothing here panics on bad data.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use super::engine::{SegmentState, TOMBSTONE_RCPT};
use super::record::{self, OutcomeKind, RecordKind, Scanned};
use super::segment;
use super::{io_err, Location, SpoolError};
use crate::envelope::Envelope;

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
    pub envelope: Envelope,
    pub states: Vec<RcptState>,
}

impl RecoveredMessage {
    pub fn is_final(&self) -> bool {
        self.states.iter().all(|s| matches!(s, RcptState::Final(_)))
    }
}

/// Bytes recovery could not read, for the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreadable {
    pub seq: u64,
    /// File offset in the segment.
    pub offset: u64,
    pub len: usize,
    pub why: String,
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
    /// Messages that looked pending but share their queue slot with a newer message: they
    /// were final before the slot was reused, and only their last outcome was lost.
    pub superseded: usize,
    /// Records that could not be read, with their location.
    pub unreadable: Vec<Unreadable>,
    /// Segments with a bad header, renamed for the operator.
    pub corrupt_segments: Vec<String>,
    /// Where the unreadable bytes were copied.
    pub quarantined: Vec<String>,
}

pub struct Recovered {
    /// Messages with at least one recipient not final, in id order.
    pub pending: Vec<RecoveredMessage>,
    /// Every segment replayed, with what is live in it.
    pub segments: BTreeMap<u64, SegmentState>,
    /// Every message id seen on disk is below this one in generation (see `queue::Ids`).
    pub id_max: u64,
    pub report: RecoveryReport,
}

/// One segment's bytes, the whole file.
pub struct SegmentBytes {
    pub seq: u64,
    pub bytes: rkyv::util::AlignedVec,
}

/// Replay `segments` (in any order; sorted here). Pure: no I/O, so the simulation runs it over
/// its own storage. Returns the state and, per unreadable record, its bytes to set aside.
pub fn replay(
    shard: u32,
    mut segments: Vec<SegmentBytes>,
) -> (Recovered, Vec<(Unreadable, Vec<u8>)>) {
    segments.sort_by_key(|s| s.seq);
    let mut report = RecoveryReport::default();
    let mut messages: BTreeMap<u64, RecoveredMessage> = BTreeMap::new();
    let mut infos: BTreeMap<u64, SegmentState> = BTreeMap::new();
    let mut set_aside = Vec::new();
    let mut id_max = 0u64;
    for seg in &segments {
        let seq = seg.seq;
        let bytes = &seg.bytes[..];
        if let Err(e) = segment::check_header(bytes, shard, seq) {
            // The caller checks headers before and renames bad files; one here is corruption
            // that appeared in between: skip it whole.
            report.unreadable.push(Unreadable {
                seq,
                offset: 0,
                len: bytes.len(),
                why: e.to_string(),
            });
            continue;
        }
        report.segments += 1;
        let mut info = SegmentState::with_len(bytes.len() as u64);
        let body = &bytes[segment::SEGMENT_HEADER_LEN..];
        for found in record::scan(body) {
            match found {
                Scanned::Record {
                    offset,
                    header,
                    payload,
                } => {
                    let file_offset = (segment::SEGMENT_HEADER_LEN + offset) as u64;
                    match header.kind {
                        RecordKind::Message => {
                            let view = match record::MessageView::new(header.version, payload) {
                                Ok(view) => view,
                                Err(e) => {
                                    let len = header.framed_len();
                                    let at = segment::SEGMENT_HEADER_LEN + offset;
                                    let u = Unreadable {
                                        seq,
                                        offset: file_offset,
                                        len,
                                        why: format!("message record: {e}"),
                                    };
                                    set_aside.push((u.clone(), bytes[at..at + len].to_vec()));
                                    report.unreadable.push(u);
                                    report.corrupt_records += 1;
                                    continue;
                                }
                            };
                            let id = view.id();
                            id_max = id_max.max(id);
                            info.ids.insert(id);
                            report.messages += 1;
                            let loc = Location {
                                seq,
                                offset: file_offset,
                                len: header.framed_len() as u32,
                            };
                            match messages.get_mut(&id) {
                                // A compaction copy: the message moved, its states stay.
                                Some(known) => known.loc = loc,
                                None => {
                                    let envelope = match view.envelope() {
                                        Ok(envelope) => envelope,
                                        Err(e) => {
                                            let len = header.framed_len();
                                            let at = segment::SEGMENT_HEADER_LEN + offset;
                                            let u = Unreadable {
                                                seq,
                                                offset: file_offset,
                                                len,
                                                why: format!("envelope: {e}"),
                                            };
                                            set_aside
                                                .push((u.clone(), bytes[at..at + len].to_vec()));
                                            report.unreadable.push(u);
                                            report.corrupt_records += 1;
                                            continue;
                                        }
                                    };
                                    let states = vec![
                                        RcptState::Pending {
                                            attempts: 0,
                                            next_attempt_ms: 0,
                                        };
                                        envelope.rcpts.len()
                                    ];
                                    messages.insert(
                                        id,
                                        RecoveredMessage {
                                            id,
                                            loc,
                                            envelope,
                                            states,
                                        },
                                    );
                                }
                            }
                        }
                        RecordKind::Outcome => {
                            let o = match record::access_outcome(header.version, payload) {
                                Ok(o) => o,
                                Err(e) => {
                                    // An outcome lost only means a retry; count it and go on.
                                    report.unreadable.push(Unreadable {
                                        seq,
                                        offset: file_offset,
                                        len: header.framed_len(),
                                        why: format!("outcome record: {e}"),
                                    });
                                    report.corrupt_records += 1;
                                    continue;
                                }
                            };
                            report.outcomes += 1;
                            let Some(msg) = messages.get_mut(&o.message) else {
                                // Its message's segment was already deleted: the message is
                                // final (or this is compaction's empty-batch marker).
                                continue;
                            };
                            info.deps.insert(msg.loc.seq);
                            let Some(kind) = o.kind else {
                                report.corrupt_records += 1;
                                continue;
                            };
                            if o.rcpt == TOMBSTONE_RCPT {
                                for s in &mut msg.states {
                                    *s = RcptState::Final(kind);
                                }
                                continue;
                            }
                            let Some(state) = msg.states.get_mut(o.rcpt as usize) else {
                                report.corrupt_records += 1;
                                continue;
                            };
                            *state = match kind {
                                OutcomeKind::Deferred => RcptState::Pending {
                                    attempts: o.attempts,
                                    next_attempt_ms: o.next_attempt_ms,
                                },
                                kind => RcptState::Final(kind),
                            };
                        }
                    }
                }
                Scanned::Corrupt { offset, len, error } => {
                    let at = segment::SEGMENT_HEADER_LEN + offset;
                    let u = Unreadable {
                        seq,
                        offset: at as u64,
                        len,
                        why: error.to_string(),
                    };
                    set_aside.push((u.clone(), bytes[at..at + len].to_vec()));
                    report.unreadable.push(u);
                    report.corrupt_records += 1;
                    report.corrupt_bytes += len;
                }
                Scanned::TornTail { len, .. } => {
                    report.torn_tails += 1;
                    report.corrupt_bytes += len;
                }
            }
        }
        infos.insert(seq, info);
    }

    // The queue gives a slot a new id only once the message holding it is final (or its
    // reservation was cancelled), so of the messages on disk sharing a slot only the newest
    // can be pending. An older one that still looks pending lost its final outcome (a batch
    // that failed after the message was done, or that a crash cut off, while a later one with
    // the newer message committed). It is final: restoring it would also take the newer
    // message's place in the queue, and that one would be set aside, never delivered.
    let mut newest: BTreeMap<u64, u64> = BTreeMap::new();
    for &id in messages.keys() {
        // Ids ascend: the last one seen in a slot is its newest.
        newest.insert(crate::queue::slot_of(id), id);
    }
    let mut pending = Vec::new();
    for msg in messages.into_values() {
        if msg.is_final() {
            continue;
        }
        if newest.get(&crate::queue::slot_of(msg.id)) != Some(&msg.id) {
            report.superseded += 1;
            continue;
        }
        if let Some(info) = infos.get_mut(&msg.loc.seq) {
            info.live += 1;
            info.live_bytes += u64::from(msg.loc.len);
        }
        pending.push(msg);
    }
    // A dependency on a segment that is not there any more is moot.
    let present: BTreeSet<u64> = infos.keys().copied().collect();
    for (seq, info) in infos.iter_mut() {
        info.deps.retain(|d| d != seq && present.contains(d));
    }
    report.pending_messages = pending.len();
    (
        Recovered {
            pending,
            segments: infos,
            id_max,
            report,
        },
        set_aside,
    )
}

/// Read and replay the segments in `dir`: incomplete new segments (shorter than a header) are
/// removed, segments with a bad header renamed `*.corrupt`, unreadable records copied (durably)
/// to `dir/quarantine/`. Blocking file I/O: run it before the shard serves, or on a blocking
/// thread.
pub fn recover(dir: &Path, shard: u32) -> Result<Recovered, SpoolError> {
    let mut seqs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_err("list spool dir", e))? {
        let entry = entry.map_err(|e| io_err("list spool dir", e))?;
        if let Some(seq) = entry.file_name().to_str().and_then(segment::parse_name) {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    let mut segments = Vec::new();
    let mut corrupt_segments = Vec::new();
    for seq in seqs {
        let path = segment::path(dir, seq);
        let bytes = read_aligned(&path)?;
        if bytes.len() < segment::SEGMENT_HEADER_LEN {
            // A crash while creating the segment: no record is written before the header is
            // durable, so nothing acknowledged can be in it.
            tracing::warn!(shard, path = %path.display(), "removing incomplete new segment");
            std::fs::remove_file(&path).map_err(|e| io_err("remove incomplete segment", e))?;
            continue;
        }
        if let Err(e) = segment::check_header(&bytes, shard, seq) {
            // An unreadable header means we cannot trust the file at all. Keep it for a human
            // rather than deleting mail, and keep going with the other segments.
            let bad = path.with_extension("corrupt");
            tracing::error!(
                shard,
                segment = %path.display(),
                renamed = %bad.display(),
                "segment unusable ({e}); set aside"
            );
            std::fs::rename(&path, &bad).map_err(|e| io_err("rename corrupt segment", e))?;
            corrupt_segments.push(bad.display().to_string());
            continue;
        }
        segments.push(SegmentBytes { seq, bytes });
    }
    let (mut recovered, set_aside) = replay(shard, segments);
    recovered.report.corrupt_segments = corrupt_segments;
    if !set_aside.is_empty() {
        let qdir = dir.join("quarantine");
        std::fs::create_dir_all(&qdir).map_err(|e| io_err("create quarantine dir", e))?;
        for (u, bytes) in &set_aside {
            let path = quarantine_path(&qdir, u);
            write_durably(&path, bytes)?;
            recovered
                .report
                .quarantined
                .push(path.display().to_string());
        }
        std::fs::File::open(&qdir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err("fsync quarantine dir", e))?;
    }
    for u in &recovered.report.unreadable {
        tracing::error!(
            shard,
            segment = u.seq,
            offset = u.offset,
            len = u.len,
            "unreadable record set aside: {}",
            u.why
        );
    }
    Ok(recovered)
}

/// `quarantine/<seq>-<offset>.rec`.
pub fn quarantine_path(qdir: &Path, u: &Unreadable) -> PathBuf {
    qdir.join(format!("{:020}-{:010}.rec", u.seq, u.offset))
}

fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), SpoolError> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| io_err("create quarantine file", e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| io_err("write quarantine file", e))
}

fn read_aligned(path: &Path) -> Result<rkyv::util::AlignedVec, SpoolError> {
    use std::io::Read;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::record::{encode_message, encode_outcome, tests::envelope, OutcomeRecord};

    /// One segment holding `records` (already framed), as recovery reads it.
    fn segment_of(seq: u64, records: &[u8]) -> SegmentBytes {
        let mut bytes = rkyv::util::AlignedVec::new();
        bytes.extend_from_slice(&segment::encode_header(0, seq));
        bytes.extend_from_slice(records);
        SegmentBytes { seq, bytes }
    }

    #[test]
    fn an_older_message_in_a_reused_slot_is_final_not_pending() {
        // Message `old` (generation 1 of slot 5) was delivered, but the batch with its outcome
        // failed; the slot went to `new` (generation 2), whose record committed. Then a crash.
        let old = 1 << 24 | 5;
        let new = 2 << 24 | 5;
        let other = 1 << 24 | 6;
        let mut buf = Vec::new();
        encode_message(&mut buf, old, &envelope(old, 1), &[b"old body"]).expect("encode");
        let deferred = OutcomeRecord {
            message: old,
            rcpt: 0,
            kind: OutcomeKind::Deferred,
            attempts: 1,
            at_ms: 5,
            next_attempt_ms: 10,
        };
        encode_outcome(&mut buf, &deferred).expect("encode");
        encode_message(&mut buf, other, &envelope(other, 1), &[b"other"]).expect("encode");
        encode_message(&mut buf, new, &envelope(new, 2), &[b"new body"]).expect("encode");
        let (rec, set_aside) = replay(0, vec![segment_of(1, &buf)]);
        assert!(set_aside.is_empty());
        let ids: Vec<u64> = rec.pending.iter().map(|m| m.id).collect();
        assert_eq!(ids, vec![other, new], "the newer message keeps the slot");
        assert_eq!(rec.report.superseded, 1);
        assert_eq!(
            rec.segments.get(&1).map(|s| s.live),
            Some(2),
            "only those two are live"
        );
        assert_eq!(rec.id_max, new);
    }
}
