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
use super::record::{self, MessageView, Outcome, OutcomeKind, RecordKind, Scanned};
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
        /// Its delay notice is spooled (`OutcomeKind::Delayed`): none follows again.
        delay_notified: bool,
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
    /// Every message id seen on disk is at most this one (see `queue::Queue::restored`).
    pub id_max: u64,
    pub report: RecoveryReport,
}

/// One segment's bytes, the whole file.
pub struct SegmentBytes {
    pub seq: u64,
    pub bytes: rkyv::util::AlignedVec,
}

/// Who rebuilds per-message state from the records, as recovery replays them: the queue in
/// production (no intermediate copy of a million envelopes), [`Collect`] in tests and the
/// simulation.
pub trait Replay {
    /// A message record at `loc`. The first one seen with an id is the message; a later one is
    /// a copy compaction made: the message moved, and its recipients' states stay. Returns the
    /// segment of the record a copy supersedes (None for a new message): while that older
    /// record is on disk, the copy's segment must stay (see `scan_into`).
    fn message(
        &mut self,
        id: u64,
        loc: Location,
        view: &MessageView<'_>,
    ) -> Result<Option<u64>, String>;
    /// An outcome record (a tombstone when its recipient is [`TOMBSTONE_RCPT`]). Returns the
    /// segment the message it is about lives in, or None when that message is not known (its
    /// record is gone: it was final).
    fn outcome(&mut self, o: &Outcome) -> Option<u64>;
    /// Every message still pending, once replay is over.
    fn for_each_pending(&self, f: &mut dyn FnMut(Location));
    /// Messages found pending whose slot a newer message took: final (see `ids`).
    fn superseded(&self) -> usize {
        0
    }
}

/// A [`Replay`] that keeps every message (owned envelopes), for tests and the simulation.
#[derive(Default)]
pub struct Collect {
    messages: BTreeMap<u64, RecoveredMessage>,
    /// The newest id seen in each slot.
    newest: BTreeMap<u64, u64>,
    superseded: usize,
    /// Where the latest record of each message a newer one of its slot replaced is.
    superseded_at: BTreeMap<u64, u64>,
}

impl Replay for Collect {
    fn message(
        &mut self,
        id: u64,
        loc: Location,
        view: &MessageView<'_>,
    ) -> Result<Option<u64>, String> {
        if let Some(known) = self.messages.get_mut(&id) {
            let before = known.loc.seq;
            known.loc = loc;
            return Ok(Some(before));
        }
        // Of the messages sharing a slot only the newest can be pending (see `ids`): an older
        // one still looking pending lost its final outcome (a batch that failed after it was
        // done, or that a crash cut off, while a later one with the newer message committed).
        let slot = crate::ids::slot_of(id);
        if let Some(&older) = self.newest.get(&slot) {
            if older > id {
                let before = self.superseded_at.insert(id, loc.seq);
                self.superseded += usize::from(before.is_none());
                return Ok(before);
            }
            if let Some(m) = self.messages.remove(&older) {
                self.superseded_at.insert(older, m.loc.seq);
                self.superseded += usize::from(!m.is_final());
            }
        }
        self.newest.insert(slot, id);
        let envelope = view.envelope().map_err(|e| format!("envelope: {e}"))?;
        let states = vec![
            RcptState::Pending {
                attempts: 0,
                next_attempt_ms: 0,
                delay_notified: false,
            };
            envelope.rcpts.len()
        ];
        self.messages.insert(
            id,
            RecoveredMessage {
                id,
                loc,
                envelope,
                states,
            },
        );
        Ok(None)
    }

    fn outcome(&mut self, o: &Outcome) -> Option<u64> {
        let Some(msg) = self.messages.get_mut(&o.message) else {
            return self.superseded_at.get(&o.message).copied();
        };
        let seq = msg.loc.seq;
        let kind = o.kind?;
        if o.rcpt == TOMBSTONE_RCPT {
            for s in &mut msg.states {
                *s = RcptState::Final(kind);
            }
        } else if let Some(state) = msg.states.get_mut(o.rcpt as usize) {
            *state = match kind {
                OutcomeKind::Deferred | OutcomeKind::Delayed => RcptState::Pending {
                    attempts: o.attempts,
                    next_attempt_ms: o.next_attempt_ms,
                    delay_notified: kind == OutcomeKind::Delayed,
                },
                kind => RcptState::Final(kind),
            };
        }
        Some(seq)
    }

    fn for_each_pending(&self, f: &mut dyn FnMut(Location)) {
        for m in self.messages.values().filter(|m| !m.is_final()) {
            f(m.loc);
        }
    }

    fn superseded(&self) -> usize {
        self.superseded
    }
}

impl Collect {
    /// The pending messages, in id order.
    pub fn into_pending(self) -> Vec<RecoveredMessage> {
        self.messages
            .into_values()
            .filter(|m| !m.is_final())
            .collect()
    }
}

/// Replay one segment's records (the whole file, header checked by the caller) into `sink`.
/// Returns what the segment holds (its live counts come with [`settle`]). Unreadable records
/// are reported in `report` and, with their bytes, in `set_aside`. Pure: no I/O.
pub fn replay_segment(
    seq: u64,
    bytes: &[u8],
    sink: &mut dyn Replay,
    report: &mut RecoveryReport,
    set_aside: &mut Vec<(Unreadable, Vec<u8>)>,
    id_max: &mut u64,
) -> SegmentState {
    report.segments += 1;
    let mut info = SegmentState::with_len(bytes.len() as u64);
    let body = bytes.get(segment::SEGMENT_HEADER_LEN..).unwrap_or_default();
    let mut unreadable = |at: usize, len: usize, why: String, keep: bool| {
        let u = Unreadable {
            seq,
            offset: at as u64,
            len,
            why,
        };
        if keep {
            let end = (at + len).min(bytes.len());
            set_aside.push((u.clone(), bytes[at.min(end)..end].to_vec()));
        }
        u
    };
    for found in record::scan(body) {
        match found {
            Scanned::Record {
                offset,
                header,
                payload,
            } => {
                let at = segment::SEGMENT_HEADER_LEN + offset;
                let len = header.framed_len();
                match header.kind {
                    RecordKind::Message => {
                        let loc = Location {
                            seq,
                            offset: at as u64,
                            len: len as u32,
                        };
                        let result = record::MessageView::new(header.version, payload)
                            .map_err(|e| format!("message record: {e}"))
                            .and_then(|view| {
                                *id_max = (*id_max).max(view.id());
                                info.ids.push(view.id());
                                sink.message(view.id(), loc, &view)
                            })
                            .map(|copied_from| {
                                // A copy, its original still on disk (a crash before compaction
                                // deleted it): the copy's segment depends on the original's, so
                                // compacting it once the message is final writes the tombstone
                                // that keeps the original from bringing it back.
                                if let Some(from) = copied_from.filter(|s| *s != seq) {
                                    info.deps.insert(from);
                                }
                            });
                        match result {
                            Ok(()) => report.messages += 1,
                            Err(why) => {
                                report.unreadable.push(unreadable(at, len, why, true));
                                report.corrupt_records += 1;
                            }
                        }
                    }
                    RecordKind::Outcome => match record::access_outcome(header.version, payload) {
                        Ok(o) => {
                            report.outcomes += 1;
                            if o.kind.is_none() {
                                report.corrupt_records += 1;
                            }
                            // Its message's segment was already deleted when None: the message
                            // is final (or this is compaction's empty-batch marker).
                            if let Some(message_seq) = sink.outcome(&o) {
                                info.deps.insert(message_seq);
                            }
                        }
                        Err(e) => {
                            // An outcome lost only means a retry; count it and go on.
                            report.unreadable.push(unreadable(
                                at,
                                len,
                                format!("outcome record: {e}"),
                                false,
                            ));
                            report.corrupt_records += 1;
                        }
                    },
                }
            }
            Scanned::Corrupt { offset, len, error } => {
                let at = segment::SEGMENT_HEADER_LEN + offset;
                report
                    .unreadable
                    .push(unreadable(at, len, error.to_string(), true));
                report.corrupt_records += 1;
                report.corrupt_bytes += len;
            }
            Scanned::TornTail { len, .. } => {
                report.torn_tails += 1;
                report.corrupt_bytes += len;
            }
        }
    }
    info
}

/// After the last segment: count each segment's live messages, and drop dependencies on
/// segments that are not there any more (they are moot).
pub fn settle(
    segments: &mut BTreeMap<u64, SegmentState>,
    sink: &dyn Replay,
    report: &mut RecoveryReport,
) {
    let mut pending = 0;
    sink.for_each_pending(&mut |loc| {
        pending += 1;
        if let Some(info) = segments.get_mut(&loc.seq) {
            info.live += 1;
            info.live_bytes += u64::from(loc.len);
        }
    });
    let present: BTreeSet<u64> = segments.keys().copied().collect();
    for (seq, info) in segments.iter_mut() {
        info.deps.retain(|d| d != seq && present.contains(d));
    }
    report.pending_messages = pending;
    report.superseded = sink.superseded();
    for info in segments.values_mut() {
        info.ids.sort_unstable();
        info.ids.dedup();
    }
}

/// Replay `segments` (in any order; sorted here) into a [`Collect`]. Pure: the simulation runs
/// it over its own storage. Returns the state and, per unreadable record, its bytes.
pub fn replay(
    shard: u32,
    mut segments: Vec<SegmentBytes>,
) -> (Recovered, Vec<(Unreadable, Vec<u8>)>) {
    segments.sort_by_key(|s| s.seq);
    let mut report = RecoveryReport::default();
    let mut sink = Collect::default();
    let mut infos: BTreeMap<u64, SegmentState> = BTreeMap::new();
    let mut set_aside = Vec::new();
    let mut id_max = 0u64;
    for seg in &segments {
        if let Err(e) = segment::check_header(&seg.bytes, shard, seg.seq) {
            // The caller checks headers before and renames bad files; one here is corruption
            // that appeared in between: skip it whole.
            report.unreadable.push(Unreadable {
                seq: seg.seq,
                offset: 0,
                len: seg.bytes.len(),
                why: e.to_string(),
            });
            continue;
        }
        let info = replay_segment(
            seg.seq,
            &seg.bytes,
            &mut sink,
            &mut report,
            &mut set_aside,
            &mut id_max,
        );
        infos.insert(seg.seq, info);
    }
    settle(&mut infos, &sink, &mut report);
    (
        Recovered {
            pending: sink.into_pending(),
            segments: infos,
            id_max,
            report,
        },
        set_aside,
    )
}

/// The segments of `dir`, in order, with bad files dealt with: incomplete new segments
/// (shorter than a header) removed, segments with a bad header renamed `*.corrupt` (listed in
/// the second value). Blocking file I/O.
pub fn list_segments(dir: &Path, shard: u32) -> Result<(Vec<u64>, Vec<String>), SpoolError> {
    let mut seqs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_err("list spool dir", e))? {
        let entry = entry.map_err(|e| io_err("list spool dir", e))?;
        if let Some(seq) = entry.file_name().to_str().and_then(segment::parse_name) {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    let mut good = Vec::new();
    let mut corrupt = Vec::new();
    for seq in seqs {
        let path = segment::path(dir, seq);
        let mut header = [0u8; segment::SEGMENT_HEADER_LEN];
        let read = std::fs::File::open(&path).and_then(|mut f| {
            use std::io::Read;
            let mut n = 0;
            while n < header.len() {
                let got = f.read(&mut header[n..])?;
                if got == 0 {
                    break;
                }
                n += got;
            }
            Ok(n)
        });
        let n = read.map_err(|e| io_err("read segment header", e))?;
        if n < segment::SEGMENT_HEADER_LEN {
            // A crash while creating the segment: no record is written before the header is
            // durable, so nothing acknowledged can be in it.
            tracing::warn!(shard, path = %path.display(), "removing incomplete new segment");
            std::fs::remove_file(&path).map_err(|e| io_err("remove incomplete segment", e))?;
            continue;
        }
        if let Err(e) = segment::check_header(&header, shard, seq) {
            // An unreadable header means we cannot trust the file at all. Keep it for a human
            // rather than deleting mail, and keep going with the other segments.
            let bad = path.with_extension("corrupt");
            tracing::error!(
                "shard {shard}: segment {} unusable ({e}); renamed to {}",
                path.display(),
                bad.display()
            );
            std::fs::rename(&path, &bad).map_err(|e| io_err("rename corrupt segment", e))?;
            corrupt.push(bad.display().to_string());
            continue;
        }
        good.push(seq);
    }
    Ok((good, corrupt))
}

/// Read segment `seq` of `dir` whole, aligned for rkyv. Blocking file I/O.
pub fn read_segment(dir: &Path, seq: u64) -> Result<rkyv::util::AlignedVec, SpoolError> {
    read_aligned(&segment::path(dir, seq))
}

/// Copy unreadable records to `dir/quarantine/`, durably; returns the files written.
/// Blocking file I/O.
pub fn quarantine(
    dir: &Path,
    set_aside: &[(Unreadable, Vec<u8>)],
) -> Result<Vec<String>, SpoolError> {
    if set_aside.is_empty() {
        return Ok(Vec::new());
    }
    let qdir = dir.join("quarantine");
    std::fs::create_dir_all(&qdir).map_err(|e| io_err("create quarantine dir", e))?;
    let mut written = Vec::new();
    for (u, bytes) in set_aside {
        let path = quarantine_path(&qdir, u);
        write_durably(&path, bytes)?;
        written.push(path.display().to_string());
    }
    std::fs::File::open(&qdir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("fsync quarantine dir", e))?;
    Ok(written)
}

/// Log what recovery found unreadable, with its place.
pub fn log_unreadable(shard: u32, report: &RecoveryReport) {
    for u in &report.unreadable {
        tracing::error!(
            "shard {shard}: unreadable record set aside: segment {} offset {} length {}: {}",
            u.seq,
            u.offset,
            u.len,
            u.why
        );
    }
}

/// Recover `dir` into a [`Collect`]: everything at once, for tests and tools. Blocking.
pub fn recover(dir: &Path, shard: u32) -> Result<Recovered, SpoolError> {
    let (seqs, corrupt) = list_segments(dir, shard)?;
    let mut segments = Vec::new();
    for seq in seqs {
        segments.push(SegmentBytes {
            seq,
            bytes: read_segment(dir, seq)?,
        });
    }
    let (mut recovered, set_aside) = replay(shard, segments);
    recovered.report.corrupt_segments = corrupt;
    recovered.report.quarantined = quarantine(dir, &set_aside)?;
    log_unreadable(shard, &recovered.report);
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
