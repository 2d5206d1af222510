//! Driving the spool engine over the in-memory disk, as `spool::Spool` does: the committer
//! (take a batch, find its place, create a segment if needed, write, fdatasync, report), the
//! collector, and the compactor — with the storage faults drawn from the seed.

use epoxi::spool::engine::{scan_segment, Commit, LiveIndex, LiveMessage, Target};
use epoxi::spool::record::{self, MessageView, RecordKind, RECORD_HEADER_LEN};
use epoxi::spool::segment::{encode_header, SEGMENT_HEADER_LEN};
use epoxi::spool::Location;

use super::{Local, Tracked, World, Writing};

/// Compactions that reclaim nothing (they write back as many bytes as the segment holds) a run
/// tolerates: a few happen when a segment's copies and restatements fill it; past this many the
/// compactor is going round in circles.
const COMPACTIONS_NO_GAIN_MAX: u64 = 50;
use crate::ledger::Violation;

/// The core as compaction's index of live messages (what `CoreCell` is in production).
struct Index<'a>(&'a epoxi::core::Core);

impl LiveIndex for Index<'_> {
    fn live(&self, id: u64) -> Option<LiveMessage> {
        self.0.live(id)
    }
}

/// A message record read back, with what the checks need.
pub(super) struct ReadBack {
    pub id: u64,
    pub envelope: epoxi::envelope::Envelope,
    pub body: Vec<u8>,
}

/// Why a record could not be read.
pub(super) enum ReadError {
    /// The segment is gone.
    Missing,
    /// The bytes at the location are not a message record.
    Corrupt(String),
}

impl World {
    /// Wake the committer if a batch is due and none is being written.
    pub(super) fn schedule_commit(&mut self, s: usize) {
        let Some(sh) = self.shards[s].as_mut() else {
            return;
        };
        if sh.writing.is_some() || sh.commit_scheduled || !sh.engine.wants_commit() {
            return;
        }
        sh.commit_scheduled = true;
        // The commit window: appends arriving meanwhile ride the same batch.
        let delay = self.rng_fault.range(0, 2);
        self.local(delay, Local::Commit(s));
    }

    fn fault(&mut self, per_mille: u32) -> bool {
        !self.healing && self.rng_fault.chance(per_mille)
    }

    /// Take the open batch, put it where the engine says and write it (not synced yet).
    pub(super) fn commit_start(&mut self, s: usize) -> Result<(), Violation> {
        let f = self.sc.faults.clone();
        let Some(sh) = self.shards[s].as_mut() else {
            return Ok(());
        };
        sh.commit_scheduled = false;
        let Some(mut commit) = sh.engine.take_commit() else {
            return Ok(());
        };
        // Final outcomes appended since the last batch was taken ride this one.
        let finals = std::mem::take(&mut sh.finals_open);
        let buf = std::mem::take(&mut commit.buf);
        let target = sh.engine.target(buf.len() as u64);
        let header = SEGMENT_HEADER_LEN as u64;
        let (seq, base) = match target {
            Target::Append { seq, offset } => (seq, offset),
            Target::Create { seq } => {
                if self.fault(f.enospc) {
                    // create_segment_file fails and removes what it made.
                    return self.commit_done(s, commit, Err("ENOSPC creating segment".into()));
                }
                self.disks[s].create(seq, &encode_header(s as u32, seq));
                self.stats.segments_created += 1;
                if let Some(sh) = self.shards[s].as_mut() {
                    sh.engine.segment_created(seq, header);
                }
                (seq, header)
            }
        };
        if self.fault(f.enospc) {
            return self.commit_done(s, commit, Err("ENOSPC".into()));
        }
        if self.fault(f.torn_write) {
            // A short write: a prefix lands, the batch fails, the adapter cuts it off (which
            // itself may fail, leaving the prefix behind the engine's end of segment).
            let n = self.rng_fault.below(buf.len() as u64) as usize;
            self.disks[s].write(seq, base as usize, &buf[..n]);
            if !self.fault(f.truncate_fail) {
                self.disks[s].truncate(seq, base as usize);
            }
            return self.commit_done(s, commit, Err(format!("short write {n} of {}", buf.len())));
        }
        if !self.disks[s].write(seq, base as usize, &buf) {
            return self.commit_done(s, commit, Err(format!("segment {seq} is not open")));
        }
        let Some(sh) = self.shards[s].as_mut() else {
            return Ok(());
        };
        sh.writing = Some(Writing {
            commit,
            seq,
            base,
            finals,
        });
        let delay = self.rng_fault.range(0, 3);
        self.local(delay, Local::Sync(s));
        Ok(())
    }

    /// fdatasync returns.
    pub(super) fn commit_sync(&mut self, s: usize) -> Result<(), Violation> {
        let f = self.sc.faults.clone();
        let Some(w) = self.shards[s].as_mut().and_then(|sh| sh.writing.take()) else {
            return Ok(());
        };
        if self.fault(f.fsync_fail) {
            // The bytes may have reached the disk anyway; the adapter truncates them off.
            if self.rng_fault.chance(f.fsync_persisted) {
                self.disks[s].sync(w.seq);
            }
            if !self.fault(f.truncate_fail) {
                self.disks[s].truncate(w.seq, w.base as usize);
            }
            return self.commit_done(s, w.commit, Err("fdatasync failed".into()));
        }
        self.disks[s].sync(w.seq);
        for key in &w.finals {
            if let Some(e) = self.ledger.entries.get_mut(key) {
                e.durable_final = true;
            }
        }
        self.commit_done(s, w.commit, Ok((w.seq, w.base)))
    }

    /// Report a batch's fate to the engine, apply compaction's moves to the core at once, and
    /// answer the appenders waiting for it.
    fn commit_done(
        &mut self,
        s: usize,
        commit: Commit,
        result: Result<(u64, u64), String>,
    ) -> Result<(), Violation> {
        let no = commit.no;
        let Some(sh) = self.shards[s].as_mut() else {
            return Ok(());
        };
        let done = sh.engine.committed(commit, result.clone().map_err(|_| ()));
        let waiters = sh.waiting.remove(&no).unwrap_or_default();
        match &result {
            Ok(_) => self.stats.commits_ok += 1,
            Err(_) => self.stats.commits_failed += 1,
        }
        self.note(|| format!("s{s} commit {no}: {result:?}, moved {:?}", done.moved));
        if !done.moved.is_empty() {
            self.stats.moves += done.moved.len() as u64;
            for (id, loc) in &done.moved {
                if let Some(t) = self.msgs.get_mut(&(s, *id)) {
                    t.loc = *loc;
                }
            }
            let moved = done.moved;
            self.core_step(s, |c, _| c.relocated(&moved))?;
        }
        for w in waiters {
            let Some(part) = self.parts.get(&w.part) else {
                continue;
            };
            let Some(id) = part.id else { continue };
            match &result {
                Ok((seq, base)) => {
                    let loc = Location {
                        seq: *seq,
                        offset: base + w.offset,
                        len: w.len,
                    };
                    let envelope = part.envelope.clone();
                    self.msgs.insert(
                        (s, id),
                        Tracked {
                            rec: crate::ledger::rec_key(&envelope.reception),
                            rcpts: envelope.rcpts.iter().map(|r| r.address.clone()).collect(),
                            loc,
                        },
                    );
                    self.note(|| format!("s{s} accepted {id:#x} at {loc:?}"));
                    self.core_step(s, |c, now| c.accepted(id, &envelope, loc, None, now))?;
                    self.part_done(w.part, Ok(()))?;
                }
                Err(e) => {
                    self.core_step(s, |c, _| c.cancel(id))?;
                    self.part_done(w.part, Err(format!("spool I/O error: {e}")))?;
                }
            }
        }
        // Appenders waiting for room try again.
        let room: Vec<u64> = self.shards[s]
            .as_mut()
            .map(|sh| sh.room_wait.drain(..).collect())
            .unwrap_or_default();
        for p in room {
            self.append(p)?;
        }
        self.schedule_commit(s);
        self.schedule_collect(s);
        self.compact_check(s)
    }

    pub(super) fn schedule_collect(&mut self, s: usize) {
        let Some(sh) = self.shards[s].as_mut() else {
            return;
        };
        if sh.collect_scheduled {
            return;
        }
        sh.collect_scheduled = true;
        let delay = self.rng_fault.range(0, 5);
        self.local(delay, Local::Collect(s));
    }

    /// Delete the segments that hold nothing needed any more.
    pub(super) fn collect(&mut self, s: usize) -> Result<(), Violation> {
        let Some(sh) = self.shards[s].as_mut() else {
            return Ok(());
        };
        sh.collect_scheduled = false;
        // As `Spool::run_collector`: until nothing is collectable (deleting a segment can free
        // those whose outcomes were about it).
        let mut seqs = Vec::new();
        loop {
            let round = sh.engine.collectable();
            if round.is_empty() {
                break;
            }
            for seq in &round {
                self.disks[s].remove(*seq);
                sh.engine.segment_removed(*seq);
                self.stats.segments_deleted += 1;
            }
            seqs.extend(round);
        }
        if !seqs.is_empty() {
            self.note(|| format!("s{s} deleted segments {seqs:?}"));
        }
        self.compact_check(s)
    }

    /// The compactor looks for a segment worth compacting and starts reading it (at its rate).
    pub(super) fn compact_check(&mut self, s: usize) -> Result<(), Violation> {
        if self.sc.limits.compact_live_ratio <= 0.0 {
            return Ok(());
        }
        let Some(sh) = self.shards[s].as_mut() else {
            return Ok(());
        };
        if sh.compacting {
            return Ok(());
        }
        let Some(seq) = sh.engine.compaction_candidate() else {
            return Ok(());
        };
        let len = sh.engine.segments().get(&seq).map_or(0, |st| st.len) as usize;
        // The segment is closed: its bytes do not change while they are read.
        let Some(bytes) = self.disks[s].read(seq, 0, len) else {
            return Err(Violation::new(
                "spool",
                format!("s{s}: compaction candidate {seq} has no file of {len} bytes"),
            ));
        };
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(len);
        aligned.extend_from_slice(bytes);
        sh.compacting = true;
        let rate = self.sc.compaction_bytes_per_s.max(1);
        let delay = (len as u64 * 1000 / rate).max(1);
        self.local(delay, Local::CompactRun(s, seq, aligned));
        Ok(())
    }

    /// The read is done: compact, restating the states of this instant.
    pub(super) fn compact_run(
        &mut self,
        s: usize,
        seq: u64,
        bytes: rkyv::util::AlignedVec,
    ) -> Result<(), Violation> {
        let now = self.now;
        let Some(sh) = self.shards[s].as_mut() else {
            return Ok(());
        };
        sh.compacting = false;
        if bytes.len() < SEGMENT_HEADER_LEN {
            return Ok(());
        }
        let scan = scan_segment(&bytes[SEGMENT_HEADER_LEN..], SEGMENT_HEADER_LEN);
        if self.trace.on() {
            let st = sh.engine.segments().get(&seq).cloned().unwrap_or_default();
            let existing: Vec<u64> = sh.engine.segments().keys().copied().collect();
            let line = format!(
                "{:>9} s{s} compacting {seq}: live {} of {} bytes in {}, deps {:?}, segments {:?}",
                self.now - crate::scenario::EPOCH_MS,
                st.live_bytes,
                st.len,
                st.live,
                st.deps,
                existing
            );
            self.trace.line(line);
        }
        let Some(sh) = self.shards[s].as_mut() else {
            return Ok(());
        };
        let input_len = sh.engine.segments().get(&seq).map_or(0, |st| st.len);
        let index = Index(&sh.core);
        match sh.engine.compact(seq, &bytes, &scan, &index, now) {
            Ok(report) if report.no_gain => {
                self.stats.compactions_skipped += 1;
                self.note(|| format!("s{s} compaction of {seq} would gain nothing: skipped"));
                self.compact_check(s)
            }
            Ok(report) => {
                // Compaction should reclaim space: one that writes back as much as it read
                // leaves a segment just as sparse, compacted again and again.
                let written = report.copied_bytes
                    + u64::from(report.snapshots + report.tombstones) * outcome_framed_len();
                if report.copied > 0 && SEGMENT_HEADER_LEN as u64 + written >= input_len {
                    self.stats.compactions_no_gain += 1;
                    if self.stats.compactions_no_gain > COMPACTIONS_NO_GAIN_MAX {
                        return Err(Violation::new(
                            "compaction-progress",
                            format!(
                                "s{s}: {} compactions reclaimed nothing; the last, of segment \
                                 {seq} ({input_len} bytes), wrote {written} bytes again \
                                 ({report:?}): it stays below the live ratio",
                                self.stats.compactions_no_gain
                            ),
                        ));
                    }
                }
                self.stats.compactions += 1;
                self.stats.compaction_copies += u64::from(report.copied);
                self.note(|| format!("s{s} compacted segment {seq}: {report:?}"));
                self.schedule_commit(s);
                self.compact_check(s)
            }
            Err(e) => {
                // As the adapter: wait for the next change before trying again.
                self.stats.compaction_errors += 1;
                self.note(|| format!("s{s} compaction of {seq} failed: {e}"));
                Ok(())
            }
        }
    }

    /// Read the message record at `loc` of shard `s`, checked, as `Spool::read_message` does.
    pub(super) fn read_message(&self, s: usize, loc: Location) -> Result<ReadBack, ReadError> {
        let disk = &self.disks[s];
        if !disk.exists(loc.seq) {
            return Err(ReadError::Missing);
        }
        let Some(bytes) = disk.read(loc.seq, loc.offset as usize, loc.len as usize) else {
            return Err(ReadError::Corrupt(format!(
                "{loc:?} runs past the end of the file"
            )));
        };
        let aligned = record::aligned_copy(bytes);
        let (header, _) =
            record::decode(&aligned).map_err(|e| ReadError::Corrupt(e.to_string()))?;
        if header.kind != RecordKind::Message {
            return Err(ReadError::Corrupt(format!("{loc:?} is an outcome record")));
        }
        let payload = &aligned[RECORD_HEADER_LEN..RECORD_HEADER_LEN + header.payload_len];
        let view = MessageView::new(header.version, payload)
            .map_err(|e| ReadError::Corrupt(e.to_string()))?;
        let envelope = view
            .envelope()
            .map_err(|e| ReadError::Corrupt(e.to_string()))?;
        Ok(ReadBack {
            id: view.id(),
            envelope,
            body: view.body().to_vec(),
        })
    }
}

/// The framed length of an outcome record (they are all the same size).
fn outcome_framed_len() -> u64 {
    use std::sync::OnceLock;
    static LEN: OnceLock<u64> = OnceLock::new();
    *LEN.get_or_init(|| {
        let mut buf = Vec::new();
        let rec = epoxi::spool::record::OutcomeRecord {
            message: 1,
            rcpt: 0,
            kind: epoxi::spool::record::OutcomeKind::Deferred,
            attempts: 1,
            at_ms: 1,
            next_attempt_ms: 1,
        };
        record::encode_outcome(&mut buf, &rec).map_or(64, |(_, len)| len as u64)
    })
}
