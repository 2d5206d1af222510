//! The spool's bookkeeping without I/O: group-commit batches, what each segment holds, which
//! segments may go, and compaction's moves. The glommio adapter (`spool::Spool`) and the
//! simulation's in-memory storage both drive it: take a batch, write it where it says, report
//! the result.
//!
//! Invariants (checked by the tests here and by the simulation):
//! - A message record's segment is deleted only once the message is final (or moved: its copy
//!   committed elsewhere), and a segment holding outcomes is deleted only once the segments of
//!   the messages those outcomes are about are gone, or compaction wrote what they said again.
//! - A copy made by compaction is followed in the same batch by outcome records that restate
//!   every recipient's state at the moment of the copy; outcomes appended after it are written
//!   after it, and depend on the copy's segment (never only on the segment it left).
//! - `live` and `live_bytes` of a segment count exactly the messages whose current record is in
//!   it and that are not final.
//! - Compaction makes progress: it is done only when it reclaims space (a segment whose copies
//!   and restatements would fill as much is left alone until its live messages change), and it
//!   writes a tombstone only while a segment holding a record of that message remains.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::record::{self, OutcomeKind, OutcomeRecord};
use super::{Location, SpoolError};
use crate::envelope::Envelope;

/// A segment is compacted when its live messages take less than this share of it (in bytes).
pub const COMPACT_LIVE_RATIO_DEFAULT: f64 = 0.5;

/// Limits of one shard's spool.
#[derive(Clone, Copy, Debug)]
pub struct EngineLimits {
    pub segment_size_max: u64,
    pub commit_batch_max: usize,
    /// Compact a closed segment whose live bytes fall below this share of its length.
    pub compact_live_ratio: f64,
}

/// What the engine knows of one segment.
#[derive(Clone, Debug, Default)]
pub struct SegmentState {
    /// Messages whose current record is here and that are not final.
    pub live: u32,
    /// Their framed bytes.
    pub live_bytes: u64,
    /// Bytes in the file (header included).
    pub len: u64,
    /// Segments of the messages that outcome records here are about.
    pub deps: BTreeSet<u64>,
    /// Ids of the message records here, current or left behind by a move: compaction writes a
    /// tombstone about a final message only while a segment holding its record remains. A
    /// plain vector (8 bytes an id, not a tree's ~20), sorted when compaction asks.
    pub ids: Vec<u64>,
    /// A compaction of this segment is under way (its copies ride batch `.0`).
    compacting: Option<u64>,
    /// Compacting it would reclaim nothing while it holds this many live messages.
    no_gain_live: Option<u32>,
}

/// Where a batch goes: appended to the current segment, or a new one must be created first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Append { seq: u64, offset: u64 },
    Create { seq: u64 },
}

/// A batch taken for writing.
#[derive(Debug)]
pub struct Commit {
    pub no: u64,
    /// The bytes to write; the writer may take them (the length stays in `len`).
    pub buf: Vec<u8>,
    len: u64,
    records: u32,
    messages: Vec<(u64, u64, u32)>,
    deps: Vec<Dep>,
    copies: Vec<Copy>,
    compacted: Vec<u64>,
    pub waiters: u32,
}

impl Commit {
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// What a committed batch changed for the callers: the moves compaction made.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Committed {
    /// Messages whose current record is now elsewhere: (id, new location).
    pub moved: Vec<(u64, Location)>,
}

#[derive(Clone, Copy, Debug)]
enum Dep {
    /// The message's record is in this segment.
    Seg(u64),
    /// The message is being moved by compaction: its copy's segment, known at commit.
    Moving(u64),
}

#[derive(Clone, Copy, Debug)]
struct Copy {
    id: u64,
    from: Location,
    /// Offset in the batch and framed length of the copy.
    offset: u64,
    len: u32,
}

#[derive(Debug, Default)]
struct Batch {
    no: u64,
    buf: Vec<u8>,
    records: u32,
    /// (id, offset in batch, framed len) of new messages.
    messages: Vec<(u64, u64, u32)>,
    deps: Vec<Dep>,
    copies: Vec<Copy>,
    /// Segments whose compaction this batch completes.
    compacted: Vec<u64>,
    waiters: u32,
}

/// A message being moved: final meanwhile, or not.
#[derive(Clone, Copy, Debug)]
struct Moving {
    finalized: bool,
}

/// One recipient's state as compaction restates it after a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RcptSnapshot {
    /// Never tried: nothing to restate.
    Fresh,
    Deferred {
        attempts: u32,
        next_attempt_ms: u64,
        /// Its delay notice is spooled: restated as `OutcomeKind::Delayed`.
        delay_notified: bool,
    },
    Final(OutcomeKind),
}

/// A live message as the queue knows it, for compaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveMessage {
    pub loc: Location,
    pub rcpts: Vec<RcptSnapshot>,
}

/// The owner of per-message state answers compaction's question: is this message live, where
/// is its record, and what is each recipient's state.
pub trait LiveIndex {
    fn live(&self, id: u64) -> Option<LiveMessage>;
}

/// What compaction found in a segment's bytes.
#[derive(Debug, Default)]
pub struct SegmentScan {
    /// Message records: id, offset in the segment, framed length.
    pub messages: Vec<(u64, u64, u32)>,
    /// Ids that outcome records are about.
    pub outcome_ids: BTreeSet<u64>,
}

/// What one compaction step did, for the log and the tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompactionReport {
    pub copied: u32,
    pub copied_bytes: u64,
    pub snapshots: u32,
    pub tombstones: u32,
    /// Compacting would have written back as many bytes as the segment holds: nothing was
    /// done, and the segment is no candidate again until its live messages change.
    pub no_gain: bool,
}

/// Counters for metrics and the benchmark report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub commits: u64,
    pub records: u64,
    pub bytes: u64,
    pub segments_deleted: u64,
    pub compactions: u64,
    pub compacted_bytes: u64,
}

pub struct Engine {
    limits: EngineLimits,
    batch: Batch,
    /// The batch being written, if any: its number.
    writing: Option<u64>,
    segments: BTreeMap<u64, SegmentState>,
    current: u64,
    moving: HashMap<u64, Moving>,
    /// After a failed commit the current segment takes no more records: the failed batch's
    /// bytes may reach the disk after all (an fdatasync error does not say they did not, and
    /// cutting them off is no more durable), and records written after them there could then
    /// be read before them.
    retire_current: bool,
    /// Messages a failed batch held a compaction copy of, and the segment it was written to:
    /// the copy may exist, so their outcomes depend on that segment too (a final outcome must
    /// not go before a copy that could bring the message back).
    maybe_copied: HashMap<u64, u64>,
    /// Where the copies of the last committed batch went (or stayed, when it failed): outcomes
    /// already appended to the batch after it, about those messages, depend on that segment.
    resolved_prev: HashMap<u64, u64>,
    closing: bool,
    stats: EngineStats,
}

impl SegmentState {
    /// A segment `len` bytes long holding nothing live yet.
    pub fn with_len(len: u64) -> SegmentState {
        SegmentState {
            len,
            ..SegmentState::default()
        }
    }
}

impl Engine {
    /// An engine over recovered segments (`current`: the fresh segment new records go to, which
    /// the caller has created, `SEGMENT_HEADER_LEN` bytes long).
    pub fn new(
        limits: EngineLimits,
        recovered: BTreeMap<u64, SegmentState>,
        current: u64,
        current_len: u64,
    ) -> Engine {
        let mut segments = recovered;
        segments.insert(
            current,
            SegmentState {
                len: current_len,
                ..SegmentState::default()
            },
        );
        Engine {
            limits,
            batch: Batch {
                no: 1,
                ..Batch::default()
            },
            writing: None,
            segments,
            current,
            moving: HashMap::new(),
            retire_current: false,
            maybe_copied: HashMap::new(),
            resolved_prev: HashMap::new(),
            closing: false,
            stats: EngineStats::default(),
        }
    }

    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    pub fn segments(&self) -> &BTreeMap<u64, SegmentState> {
        &self.segments
    }

    pub fn current(&self) -> u64 {
        self.current
    }

    pub fn is_closing(&self) -> bool {
        self.closing
    }

    /// Stop taking new messages (outcomes still ride the last batch).
    pub fn close(&mut self) {
        self.closing = true;
    }

    /// Whether the open batch has room for more appends.
    pub fn has_room(&self) -> bool {
        self.batch.buf.len() < self.limits.commit_batch_max
    }

    /// Whether a commit is due: records wait and none is being written.
    pub fn wants_commit(&self) -> bool {
        self.batch.records > 0 && self.writing.is_none()
    }

    /// Append message `id` to the open batch. Returns the batch number to wait for and the
    /// record's offset and length within the batch. No I/O; copies the body once.
    pub fn append_message(
        &mut self,
        id: u64,
        envelope: &Envelope,
        body: &[&[u8]],
    ) -> Result<(u64, u64, u32), SpoolError> {
        if self.closing {
            return Err(SpoolError::Closed);
        }
        let (offset, len) = record::encode_message(&mut self.batch.buf, id, envelope, body)?;
        let (offset, len) = (offset as u64, len as u32);
        self.batch.records += 1;
        self.batch.messages.push((id, offset, len));
        self.batch.waiters += 1;
        Ok((self.batch.no, offset, len))
    }

    /// Append an outcome for a message whose record the caller last knew in segment
    /// `message_seq`. It rides the next commit; nobody waits for it. No I/O.
    pub fn append_outcome(
        &mut self,
        message_seq: u64,
        rec: &OutcomeRecord,
    ) -> Result<(), SpoolError> {
        record::encode_outcome(&mut self.batch.buf, rec)?;
        self.batch.records += 1;
        let dep = match self.moving.contains_key(&rec.message) {
            true => Dep::Moving(rec.message),
            false => Dep::Seg(message_seq),
        };
        self.batch.deps.push(dep);
        if let Some(&seq) = self.maybe_copied.get(&rec.message) {
            self.batch.deps.push(Dep::Seg(seq));
        }
        Ok(())
    }

    /// Message `id`, whose record is at `loc`, is final for every recipient.
    pub fn message_final(&mut self, id: u64, loc: Location) {
        if let Some(m) = self.moving.get_mut(&id) {
            // Accounted when the move commits or fails.
            m.finalized = true;
            return;
        }
        self.release(loc);
    }

    fn release(&mut self, loc: Location) {
        if let Some(seg) = self.segments.get_mut(&loc.seq) {
            debug_assert!(seg.live > 0, "segment {} live count underflow", loc.seq);
            seg.live = seg.live.saturating_sub(1);
            seg.live_bytes = seg.live_bytes.saturating_sub(u64::from(loc.len));
        }
    }

    /// Take the open batch for writing. None when there is nothing to write or a batch is
    /// already being written (one at a time keeps records in order on disk).
    pub fn take_commit(&mut self) -> Option<Commit> {
        if !self.wants_commit() {
            return None;
        }
        // The next batch starts with room for about as much as this one: under steady load it
        // then does not grow by doubling, copying every body in it again.
        let len = self.batch.buf.len();
        let next = Batch {
            no: self.batch.no + 1,
            buf: Vec::with_capacity((len + len / 4).min(self.limits.commit_batch_max)),
            ..Batch::default()
        };
        let b = std::mem::replace(&mut self.batch, next);
        self.writing = Some(b.no);
        Some(Commit {
            no: b.no,
            len: b.buf.len() as u64,
            buf: b.buf,
            records: b.records,
            messages: b.messages,
            deps: b.deps,
            copies: b.copies,
            compacted: b.compacted,
            waiters: b.waiters,
        })
    }

    /// Where a batch of `len` bytes goes: the current segment, or a new one when it would grow
    /// past the size limit (a segment holding nothing yet takes any batch).
    pub fn target(&self, len: u64) -> Target {
        let cur_len = self.segments.get(&self.current).map_or(0, |s| s.len);
        let has_records = cur_len > super::segment::SEGMENT_HEADER_LEN as u64;
        if self.retire_current || (has_records && cur_len + len > self.limits.segment_size_max) {
            Target::Create {
                seq: self.current + 1,
            }
        } else {
            Target::Append {
                seq: self.current,
                offset: cur_len,
            }
        }
    }

    /// The caller created segment `seq` (its header durable): it becomes the current one.
    pub fn segment_created(&mut self, seq: u64, len: u64) {
        debug_assert!(seq > self.current, "segments only grow");
        self.retire_current = false;
        self.segments.insert(
            seq,
            SegmentState {
                len,
                ..SegmentState::default()
            },
        );
        self.current = seq;
    }

    /// The batch `commit` is durable at `offset` of segment `seq`, or failed. Returns the moves
    /// it made (for the owner of per-message state to apply at once, before anything else can
    /// append).
    pub fn committed(&mut self, commit: Commit, at: Result<(u64, u64), ()>) -> Committed {
        self.writing = None;
        let mut out = Committed::default();
        let mut resolved: HashMap<u64, u64> = HashMap::new();
        let Ok((seq, base)) = at else {
            // Nothing of the batch counts. Moves did not happen; a message finalized meanwhile
            // is released from where it still is. But the bytes may be on disk after all: no
            // more records go after them, and a copy there may exist (see `maybe_copied`).
            self.retire_current = true;
            let failed_in = self.current;
            if let Some(seg) = self.segments.get_mut(&failed_in) {
                // Compacting a segment whose outcomes are about these messages must then
                // write their tombstones as if the copies were there.
                seg.ids.extend(commit.copies.iter().map(|c| c.id));
            }
            for c in &commit.copies {
                self.maybe_copied.insert(c.id, failed_in);
                resolved.insert(c.id, c.from.seq);
                if let Some(m) = self.moving.remove(&c.id) {
                    if m.finalized {
                        self.release(c.from);
                    }
                }
            }
            for s in &commit.compacted {
                if let Some(seg) = self.segments.get_mut(s) {
                    seg.compacting = None;
                }
            }
            self.resolved_prev = resolved;
            return out;
        };
        self.stats.commits += 1;
        self.stats.records += u64::from(commit.records);
        self.stats.bytes += commit.len();
        let mut live_new = 0u32;
        let mut live_bytes_new = 0u64;
        let mut ids: Vec<u64> = Vec::with_capacity(commit.messages.len() + commit.copies.len());
        for &(id, _, len) in &commit.messages {
            live_new += 1;
            live_bytes_new += u64::from(len);
            ids.push(id);
        }
        for c in &commit.copies {
            let Some(m) = self.moving.remove(&c.id) else {
                continue;
            };
            // The record left its old segment either way.
            self.release(c.from);
            resolved.insert(c.id, seq);
            ids.push(c.id);
            if !m.finalized {
                live_new += 1;
                live_bytes_new += u64::from(c.len);
                let new = Location {
                    seq,
                    offset: base + c.offset,
                    len: c.len,
                };
                out.moved.push((c.id, new));
            }
        }
        let mut deps: BTreeSet<u64> = BTreeSet::new();
        for d in &commit.deps {
            match *d {
                Dep::Seg(s) => {
                    deps.insert(s);
                }
                // An outcome appended after a copy is about the copy: it depends on where the
                // copy went (this batch, or the one committed just before).
                Dep::Moving(id) => match resolved.get(&id).or(self.resolved_prev.get(&id)) {
                    Some(&s) => {
                        deps.insert(s);
                    }
                    None => {
                        debug_assert!(false, "outcome of moving message {id} unresolved");
                        // Stay safe: depend on everything older.
                        deps.extend(self.segments.keys().copied());
                    }
                },
            }
        }
        self.resolved_prev = resolved;
        for s in &commit.compacted {
            let inherited = match self.segments.get_mut(s) {
                Some(seg) => {
                    seg.compacting = None;
                    // What it said is said again in this batch: it depends on nothing now,
                    // and the batch inherits its dependencies for the tombstones it wrote.
                    std::mem::take(&mut seg.deps)
                }
                None => BTreeSet::new(),
            };
            deps.extend(inherited.into_iter().filter(|d| d != s));
            // And on the segment itself until it is deleted: its records of the messages
            // copied here are stale, and should it outlive this one (a crash before the
            // collector), compacting this one writes the tombstones that keep them final.
            deps.insert(*s);
            self.stats.compactions += 1;
        }
        deps.remove(&seq);
        // A dependency on a segment already deleted is moot; keeping it would only grow the
        // set, which compaction passes on from segment to segment.
        deps.retain(|d| self.segments.contains_key(d));
        if let Some(seg) = self.segments.get_mut(&seq) {
            seg.len = base + commit.len();
            seg.live += live_new;
            seg.live_bytes += live_bytes_new;
            seg.deps.extend(deps);
            seg.ids.extend(ids);
        }
        out
    }

    /// Segments that hold nothing needed any more (see the module invariants), oldest first.
    /// The caller deletes their files and reports each with [`Engine::segment_removed`].
    pub fn collectable(&self) -> Vec<u64> {
        self.segments
            .iter()
            .filter(|(&seq, seg)| {
                seq != self.current
                    && seg.live == 0
                    && seg.compacting.is_none()
                    && seg
                        .deps
                        .iter()
                        .all(|d| *d == seq || !self.segments.contains_key(d))
            })
            .map(|(&seq, _)| seq)
            .collect()
    }

    pub fn segment_removed(&mut self, seq: u64) {
        self.maybe_copied.retain(|_, s| *s != seq);
        if self.segments.remove(&seq).is_some() {
            self.stats.segments_deleted += 1;
        }
    }

    /// The closed segment most worth compacting: the one with the smallest live share among
    /// those below the threshold, or one that holds no live message but is kept only by what
    /// its outcomes say about messages elsewhere.
    pub fn compaction_candidate(&self) -> Option<u64> {
        let mut best: Option<(f64, u64)> = None;
        for (&seq, seg) in &self.segments {
            if seq == self.current
                || seg.compacting.is_some()
                || seg.len == 0
                || seg.no_gain_live == Some(seg.live)
            {
                continue;
            }
            let pinned = seg.live == 0
                && seg
                    .deps
                    .iter()
                    .any(|d| *d != seq && self.segments.contains_key(d));
            let ratio = seg.live_bytes as f64 / seg.len as f64;
            let wanted = (seg.live > 0 && ratio < self.limits.compact_live_ratio) || pinned;
            if wanted && best.is_none_or(|(r, _)| ratio < r) {
                best = Some((ratio, seq));
            }
        }
        best.map(|(_, seq)| seq)
    }

    /// Append to the open batch a tombstone: message `id` is final.
    fn tombstone(
        &mut self,
        id: u64,
        now_ms: u64,
        report: &mut CompactionReport,
    ) -> Result<(), SpoolError> {
        let rec = OutcomeRecord {
            message: id,
            rcpt: TOMBSTONE_RCPT,
            kind: OutcomeKind::Delivered,
            attempts: 0,
            at_ms: now_ms,
            next_attempt_ms: 0,
        };
        record::encode_outcome(&mut self.batch.buf, &rec)?;
        self.batch.records += 1;
        report.tombstones += 1;
        Ok(())
    }

    /// Compact segment `seq`, whose records `scan` lists and whose bytes are `bytes` (the whole
    /// file as read): copy each live message whose current record is there, restate its
    /// recipients, restate the messages its outcomes are about (or mark them final: a
    /// tombstone), all into the open batch. The segment goes once that batch is durable.
    /// Synchronous on purpose: the states restated are those of this instant, and anything
    /// appended later lands after them.
    pub fn compact(
        &mut self,
        seq: u64,
        bytes: &[u8],
        scan: &SegmentScan,
        index: &dyn LiveIndex,
        now_ms: u64,
    ) -> Result<CompactionReport, SpoolError> {
        let mut report = CompactionReport::default();
        if seq == self.current || !self.segments.contains_key(&seq) {
            return Ok(report);
        }
        // Where the batch stood, to take this compaction back out if it gains nothing.
        let mark = (
            self.batch.buf.len(),
            self.batch.records,
            self.batch.copies.len(),
            self.batch.deps.len(),
        );
        let mut restated: BTreeSet<u64> = BTreeSet::new();
        for &(id, offset, len) in &scan.messages {
            let Some(live) = index.live(id) else {
                continue;
            };
            if live.loc.seq != seq || live.loc.offset != offset || self.moving.contains_key(&id) {
                continue;
            }
            let start = offset as usize;
            // A crash can cut the zero padding after the last record of a segment: the record
            // is whole without it (the checksum covers header and payload), and skipping it
            // would leave it live here, the segment a candidate for ever.
            let end = (start + len as usize).min(bytes.len());
            let Some(framed) = bytes.get(start..end) else {
                continue;
            };
            // The record's own checksum travels with it; check it before trusting the copy.
            record::decode(framed)?;
            let at = self.batch.buf.len() as u64;
            self.batch.buf.extend_from_slice(framed);
            self.batch.buf.resize(at as usize + len as usize, 0);
            self.batch.records += 1;
            self.batch.copies.push(Copy {
                id,
                from: live.loc,
                offset: at,
                len,
            });
            self.moving.insert(id, Moving { finalized: false });
            report.copied += 1;
            report.copied_bytes += u64::from(len);
            report.snapshots += self.restate(id, &live, now_ms)?;
            restated.insert(id);
        }
        // A tombstone keeps a final message final after this segment goes, should its record
        // outlive it; that record is in a segment this one depends on. Only while one of those
        // holds it is a tombstone needed: written anyway, tombstones would be carried from
        // compaction to compaction (the next one finds them as outcomes about final messages)
        // for ever, and a segment of them would stay below the live ratio, compacted again and
        // again.
        let holder_seqs: Vec<u64> = self
            .segments
            .get(&seq)
            .map(|seg| seg.deps.iter().copied().filter(|d| *d != seq).collect())
            .unwrap_or_default();
        for d in &holder_seqs {
            if let Some(h) = self.segments.get_mut(d) {
                h.ids.sort_unstable();
                h.ids.dedup();
            }
        }
        let holders: Vec<&SegmentState> = holder_seqs
            .iter()
            .filter_map(|d| self.segments.get(d))
            .collect();
        let held = |id: &u64| holders.iter().any(|h| h.ids.binary_search(id).is_ok());
        let tombstoned: BTreeSet<u64> = scan.outcome_ids.iter().copied().filter(held).collect();
        // Records here of messages now final, whose older records a holder still has (this
        // segment holds the copies of a compacted one a crash kept from being deleted): the
        // outcomes that made them final depend on this segment only, and may go with it.
        let stale: BTreeSet<u64> = scan
            .messages
            .iter()
            .map(|&(id, _, _)| id)
            .filter(|id| !scan.outcome_ids.contains(id) && held(id) && index.live(*id).is_none())
            .collect();
        drop(holders);
        for &id in &scan.outcome_ids {
            if restated.contains(&id) {
                continue;
            }
            match index.live(id) {
                Some(live) => {
                    report.snapshots += self.restate(id, &live, now_ms)?;
                    self.batch.deps.push(if self.moving.contains_key(&id) {
                        Dep::Moving(id)
                    } else {
                        Dep::Seg(live.loc.seq)
                    });
                }
                None if !tombstoned.contains(&id) => {}
                // Final (or never ours): say so, in case its record outlives this segment.
                None => self.tombstone(id, now_ms, &mut report)?,
            }
        }
        for id in stale {
            self.tombstone(id, now_ms, &mut report)?;
        }
        let written = (self.batch.buf.len() - mark.0) as u64;
        let len = self.segments.get(&seq).map_or(0, |st| st.len);
        if written > 0 && super::segment::SEGMENT_HEADER_LEN as u64 + written >= len {
            // The copies and restatements fill as much as the segment: the new one would be
            // just as sparse, compacted again, and so on for ever. Take them back out, and
            // leave the segment be until its live messages change.
            for c in self.batch.copies.drain(mark.2..) {
                self.moving.remove(&c.id);
            }
            self.batch.buf.truncate(mark.0);
            self.batch.records = mark.1;
            self.batch.deps.truncate(mark.3);
            if let Some(seg) = self.segments.get_mut(&seq) {
                seg.no_gain_live = Some(seg.live);
            }
            return Ok(CompactionReport {
                no_gain: true,
                ..CompactionReport::default()
            });
        }
        if let Some(seg) = self.segments.get_mut(&seq) {
            seg.compacting = Some(self.batch.no);
        }
        self.batch.compacted.push(seq);
        self.stats.compacted_bytes += report.copied_bytes;
        // An empty batch would never commit and the segment would stay marked: make sure the
        // batch holds at least the marker's effect by counting it as a record-less commit.
        if self.batch.records == 0 {
            let rec = OutcomeRecord {
                message: 0,
                rcpt: u32::MAX,
                kind: OutcomeKind::Delivered,
                attempts: 0,
                at_ms: now_ms,
                next_attempt_ms: 0,
            };
            record::encode_outcome(&mut self.batch.buf, &rec)?;
            self.batch.records += 1;
        }
        Ok(report)
    }

    /// Outcome records for every recipient of `id` that is not fresh.
    fn restate(&mut self, id: u64, live: &LiveMessage, now_ms: u64) -> Result<u32, SpoolError> {
        let mut n = 0;
        for (i, state) in live.rcpts.iter().enumerate() {
            let (kind, attempts, next) = match *state {
                RcptSnapshot::Fresh => continue,
                RcptSnapshot::Deferred {
                    attempts,
                    next_attempt_ms,
                    delay_notified,
                } => (
                    if delay_notified {
                        OutcomeKind::Delayed
                    } else {
                        OutcomeKind::Deferred
                    },
                    attempts,
                    next_attempt_ms,
                ),
                RcptSnapshot::Final(kind) => (kind, 0, 0),
            };
            let rec = OutcomeRecord {
                message: id,
                rcpt: i as u32,
                kind,
                attempts,
                at_ms: now_ms,
                next_attempt_ms: next,
            };
            record::encode_outcome(&mut self.batch.buf, &rec)?;
            self.batch.records += 1;
            n += 1;
        }
        Ok(n)
    }
}

/// List the records of a segment body (bytes after the segment header; `base` is the header
/// length, so offsets come out as file offsets) for compaction.
pub fn scan_segment(bytes: &[u8], base: usize) -> SegmentScan {
    let mut scan = SegmentScan::default();
    for found in record::scan(bytes) {
        let record::Scanned::Record {
            offset,
            header,
            payload,
        } = found
        else {
            continue;
        };
        match header.kind {
            record::RecordKind::Message => {
                if let Ok(m) = record::MessageView::new(header.version, payload) {
                    scan.messages.push((
                        m.id(),
                        (base + offset) as u64,
                        header.framed_len() as u32,
                    ));
                }
            }
            record::RecordKind::Outcome => {
                if let Ok(o) = record::access_outcome(header.version, payload) {
                    if o.message != 0 {
                        scan.outcome_ids.insert(o.message);
                    }
                }
            }
        }
    }
    scan
}

/// The tombstone convention: an outcome for recipient `u32::MAX` marks the whole message final.
pub const TOMBSTONE_RCPT: u32 = u32::MAX;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::record::tests::envelope;
    use crate::spool::record::RECORD_HEADER_LEN;
    use crate::spool::segment::SEGMENT_HEADER_LEN;

    const HEADER: u64 = SEGMENT_HEADER_LEN as u64;

    struct Index(BTreeMap<u64, LiveMessage>);

    impl LiveIndex for Index {
        fn live(&self, id: u64) -> Option<LiveMessage> {
            self.0.get(&id).cloned()
        }
    }

    /// Commit the open batch where the engine says, into `disk` (segment → bytes).
    fn commit(e: &mut Engine, disk: &mut BTreeMap<u64, Vec<u8>>) -> (u64, u64, Committed) {
        let mut c = e.take_commit().expect("a batch");
        let buf = std::mem::take(&mut c.buf);
        let (seq, base) = match e.target(buf.len() as u64) {
            Target::Append { seq, offset } => (seq, offset),
            Target::Create { seq } => {
                disk.insert(seq, vec![0; SEGMENT_HEADER_LEN]);
                e.segment_created(seq, HEADER);
                (seq, HEADER)
            }
        };
        disk.entry(seq).or_default().extend_from_slice(&buf);
        let done = e.committed(c, Ok((seq, base)));
        (seq, base, done)
    }

    fn delivered(id: u64) -> OutcomeRecord {
        OutcomeRecord {
            message: id,
            rcpt: 0,
            kind: OutcomeKind::Delivered,
            attempts: 1,
            at_ms: 1,
            next_attempt_ms: 0,
        }
    }

    fn compact(
        e: &mut Engine,
        disk: &BTreeMap<u64, Vec<u8>>,
        seq: u64,
        index: &Index,
    ) -> CompactionReport {
        let bytes = record::aligned_copy(&disk[&seq]);
        let scan = scan_segment(&bytes[SEGMENT_HEADER_LEN..], SEGMENT_HEADER_LEN);
        e.compact(seq, &bytes, &scan, index, 2).expect("compact")
    }

    #[test]
    fn tombstones_only_while_a_record_they_speak_for_may_outlive_the_segment() {
        let limits = EngineLimits {
            segment_size_max: 4096,
            commit_batch_max: 1 << 20,
            compact_live_ratio: 0.9,
        };
        let mut e = Engine::new(limits, BTreeMap::new(), 1, HEADER);
        let mut disk: BTreeMap<u64, Vec<u8>> = BTreeMap::from([(1, vec![0; SEGMENT_HEADER_LEN])]);
        let (a, b, c) = (1 << 24 | 1, 1 << 24 | 2, 1 << 24 | 3);
        let body = [b'x'; 900];
        let (_, oa, la) = e
            .append_message(a, &envelope(a, 1), &[&body])
            .expect("append");
        let (_, ob, lb) = e
            .append_message(b, &envelope(b, 1), &[&body])
            .expect("append");
        let (seq, base, _) = commit(&mut e, &mut disk);
        let at = |offset: u64, len: u32| Location {
            seq,
            offset: base + offset,
            len,
        };
        // B is delivered in segment 1, where its record is.
        e.append_outcome(1, &delivered(b)).expect("outcome");
        e.message_final(b, at(ob, lb));
        commit(&mut e, &mut disk);
        // Segment 2: a big message C, A's delivery (A's record is in segment 1) and C's.
        let big = [b'y'; 2500];
        let (_, oc, lc) = e
            .append_message(c, &envelope(c, 1), &[&big])
            .expect("append");
        let (seq_c, base_c, _) = commit(&mut e, &mut disk);
        assert_eq!(seq_c, 2);
        e.append_outcome(1, &delivered(a)).expect("outcome");
        e.message_final(a, at(oa, la));
        e.append_outcome(2, &delivered(c)).expect("outcome");
        let loc_c = Location {
            seq: 2,
            offset: base_c + oc,
            len: lc,
        };
        e.message_final(c, loc_c);
        commit(&mut e, &mut disk);
        // Segment 3 becomes current.
        e.append_message(c + 1, &envelope(c + 1, 1), &[&big])
            .expect("append");
        assert_eq!(commit(&mut e, &mut disk).0, 3);
        let none = Index(BTreeMap::new());
        // Segment 1 depends on no other segment: B's tombstone would speak for no record.
        assert_eq!(compact(&mut e, &disk, 1, &none).tombstones, 0);
        // Segment 2's outcome about A speaks for A's record in segment 1, still there; the
        // one about C only for C's record in segment 2 itself, going with it: one tombstone.
        let mut again = Engine::new(limits, e.segments().clone(), 4, HEADER);
        assert_eq!(compact(&mut again, &disk, 2, &none).tombstones, 1);
        // Once segment 1 is gone, none.
        commit(&mut e, &mut disk);
        assert_eq!(e.collectable(), vec![1]);
        e.segment_removed(1);
        assert_eq!(compact(&mut e, &disk, 2, &none).tombstones, 0);
    }

    #[test]
    fn a_compaction_that_would_reclaim_nothing_is_not_done_until_the_segment_changes() {
        let limits = EngineLimits {
            segment_size_max: 4096,
            commit_batch_max: 1 << 20,
            compact_live_ratio: 0.9,
        };
        let mut e = Engine::new(limits, BTreeMap::new(), 1, HEADER);
        let mut disk: BTreeMap<u64, Vec<u8>> = BTreeMap::from([(1, vec![0; SEGMENT_HEADER_LEN])]);
        let a = 1 << 24 | 1;
        let (_, offset, len) = e
            .append_message(a, &envelope(a, 3), &[&[b'x'; 200]])
            .expect("append");
        let (seq, base, _) = commit(&mut e, &mut disk);
        let loc = Location {
            seq,
            offset: base + offset,
            len,
        };
        // Every recipient deferred once: segment 1 is A and what compaction would restate.
        let deferred = RcptSnapshot::Deferred {
            attempts: 1,
            next_attempt_ms: 9,
            delay_notified: false,
        };
        for rcpt in 0..3 {
            let rec = OutcomeRecord {
                kind: OutcomeKind::Deferred,
                next_attempt_ms: 9,
                rcpt,
                ..delivered(a)
            };
            e.append_outcome(1, &rec).expect("outcome");
        }
        commit(&mut e, &mut disk);
        e.append_message(a + 1, &envelope(a + 1, 1), &[&[b'y'; 3600]])
            .expect("append");
        assert_eq!(commit(&mut e, &mut disk).0, 2);
        assert_eq!(
            e.compaction_candidate(),
            Some(1),
            "A is below the live ratio"
        );
        let index = Index(BTreeMap::from([(
            a,
            LiveMessage {
                loc,
                rcpts: vec![deferred; 3],
            },
        )]));
        let report = compact(&mut e, &disk, 1, &index);
        assert!(report.no_gain, "{report:?}");
        assert!(!e.wants_commit(), "nothing was added to the batch");
        assert_eq!(e.compaction_candidate(), None, "not again while A is there");
        e.message_final(a, loc);
        assert_eq!(e.collectable(), vec![1]);
    }

    #[test]
    fn a_record_whose_padding_a_crash_cut_off_is_still_copied() {
        let limits = EngineLimits {
            segment_size_max: 1 << 20,
            commit_batch_max: 1 << 20,
            compact_live_ratio: 0.5,
        };
        let a = 1 << 24 | 1;
        let mut rec = Vec::new();
        // A body length that leaves padding after the payload.
        let (_, framed_len) = (0..16)
            .find_map(|n| {
                let mut buf = Vec::new();
                let body = vec![b'z'; 100 + n];
                let (_, len) =
                    record::encode_message(&mut buf, a, &envelope(a, 1), &[&body]).ok()?;
                let (header, _) = record::decode(&buf).ok()?;
                (RECORD_HEADER_LEN + header.payload_len < len).then(|| {
                    rec = buf;
                    (0, len)
                })
            })
            .expect("some body length leaves padding");
        // Segment 1 as recovery found it: the header, a message delivered since, then A's
        // record with its last padding byte gone.
        let mut bytes = vec![0u8; SEGMENT_HEADER_LEN];
        let b = 1 << 24 | 2;
        record::encode_message(&mut bytes, b, &envelope(b, 1), &[&[b'w'; 2000]]).expect("encode");
        let offset = bytes.len() as u64;
        bytes.extend_from_slice(&rec[..framed_len - 1]);
        let seg = SegmentState {
            live: 1,
            live_bytes: framed_len as u64,
            ids: vec![a, b],
            ..SegmentState::with_len(bytes.len() as u64)
        };
        let mut e = Engine::new(limits, BTreeMap::from([(1, seg)]), 2, HEADER);
        let loc = Location {
            seq: 1,
            offset,
            len: framed_len as u32,
        };
        let index = Index(BTreeMap::from([(
            a,
            LiveMessage {
                loc,
                rcpts: vec![RcptSnapshot::Fresh],
            },
        )]));
        let disk = BTreeMap::from([(1, bytes)]);
        let report = compact(&mut e, &disk, 1, &index);
        assert_eq!(report.copied, 1, "{report:?}");
        let mut out = BTreeMap::from([(2, vec![0u8; SEGMENT_HEADER_LEN])]);
        let (seq, _, done) = commit(&mut e, &mut out);
        assert_eq!(seq, 2);
        assert_eq!(done.moved.len(), 1);
        let copy = &out[&2][SEGMENT_HEADER_LEN..SEGMENT_HEADER_LEN + framed_len];
        assert_eq!(
            copy,
            &rec[..framed_len],
            "the copy is the whole record, padding included"
        );
        assert_eq!(e.collectable(), vec![1]);
    }
}
