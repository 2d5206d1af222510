//! The spool: a shard's durable, append-only message store.
//!
//! Each shard owns a directory of segments (see [`segment`]) holding records (see [`record`]).
//! Appends go into an in-memory batch; one committer task per shard writes the batch at the end of
//! the current segment and fdatasyncs it, then wakes every appender of that batch (group commit:
//! one fdatasync for many messages). An append of a message returns only once its batch is
//! durable, which is what lets the SMTP server answer 250.
//!
//! Outcomes (delivered, deferred, bounced, expired) are appended records too; they ride the next
//! commit without the caller waiting, because losing one only means a retry, never a lost message.
//!
//! Invariants:
//! - Records are only ever appended; a segment is never written again after rotation, and after
//!   a restart new records go to a new segment (never after a torn tail).
//! - A segment is deleted only when every message in it is final and no outcome in it refers to a
//!   message whose segment still exists. Otherwise deleting it could revive a delivered
//!   recipient (its "delivered" outcome gone) or drop a deferral's attempt count.
//! - In memory the spool keeps per-segment counters only; per-message state belongs to the queue.

pub mod record;
pub mod recovery;
pub mod segment;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use glommio::io::{BufferedFile, OpenOptions};
use rkyv::util::AlignedVec;
use shards::Notify;

use record::{MessageRecord, OutcomeRecord, RecordError, RecordKind, RECORD_HEADER_LEN};
pub use recovery::{RcptState, Recovered, RecoveredMessage, RecoveryReport};

#[derive(Clone, Debug, thiserror::Error, PartialEq)]
pub enum SpoolError {
    #[error("spool I/O error: {0}")]
    Io(String),
    #[error("spool record error: {0}")]
    Record(#[from] RecordError),
    #[error("spool is shutting down")]
    Closed,
    #[error("segment {0} is not open")]
    UnknownSegment(u64),
}

fn io_err(context: &str, e: impl std::fmt::Display) -> SpoolError {
    SpoolError::Io(format!("{context}: {e}"))
}

#[derive(Clone, Debug)]
pub struct SpoolConfig {
    /// This shard's directory (`<spool>/shard-<id>`).
    pub dir: PathBuf,
    pub shard: u32,
    pub segment_size_max: u64,
    pub commit_window_us: u64,
    pub commit_batch_max: usize,
}

/// Where a record lives: segment, byte offset and framed length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub seq: u64,
    pub offset: u64,
    pub len: u32,
}

/// A message record read back from disk, 16-byte aligned so rkyv reads it in place.
pub struct StoredMessage {
    bytes: StoredBytes,
    payload_len: usize,
}

enum StoredBytes {
    /// glommio's read buffer itself, when it is aligned (it is page-aligned in practice).
    Read(glommio::io::ReadResult),
    /// A copy, when it was not.
    Copied(AlignedVec),
}

impl StoredMessage {
    pub fn message(&self) -> Result<&record::ArchivedMessageRecord, RecordError> {
        let bytes: &[u8] = match &self.bytes {
            StoredBytes::Read(read) => read,
            StoredBytes::Copied(copy) => copy,
        };
        record::access_message(&bytes[RECORD_HEADER_LEN..RECORD_HEADER_LEN + self.payload_len])
    }
}

/// Counters for the metrics and the benchmark report.
#[derive(Clone, Copy, Debug, Default)]
pub struct SpoolStats {
    pub commits: u64,
    pub records: u64,
    pub bytes: u64,
    pub segments_deleted: u64,
}

/// Where a committed batch landed: (segment, file offset of the batch), or why it failed.
type CommitResult = Result<(u64, u64), SpoolError>;

struct Batch {
    no: u64,
    buf: Vec<u8>,
    /// Records in the batch, to turn batch-relative offsets into locations.
    records: u32,
    messages: u32,
    /// Segments of the messages that outcome records in this batch refer to.
    deps: Vec<u64>,
    /// Appenders waiting for this batch to be durable.
    waiters: u32,
}

struct Segment {
    file: Rc<BufferedFile>,
    /// Messages with their record here that are not final yet.
    live: u32,
    /// Segments of messages that outcome records here refer to.
    deps: BTreeSet<u64>,
}

struct State {
    next_id: u64,
    batch: Batch,
    /// Results of committed batches that still have waiters, with the count still to read it.
    results: HashMap<u64, (CommitResult, u32)>,
    segments: BTreeMap<u64, Segment>,
    current: u64,
    current_len: u64,
    closing: bool,
    committer_done: bool,
    stats: SpoolStats,
}

pub struct Spool {
    /// Held for the life of the spool: a second process on the same directory would delete
    /// segments this one is still writing (see [`lock_dir`]).
    _lock: std::fs::File,
    cfg: SpoolConfig,
    state: RefCell<State>,
    /// Wakes the committer: records were appended or the spool is closing.
    appended: Notify,
    /// Wakes appenders: a batch was committed.
    committed: Notify,
}

impl Spool {
    /// Open a shard's spool: recover every segment, then start a fresh segment for new records.
    /// The caller must spawn [`Spool::run_committer`].
    pub async fn open(cfg: SpoolConfig) -> Result<(Rc<Spool>, Recovered), SpoolError> {
        std::fs::create_dir_all(&cfg.dir)
            .map_err(|e| io_err(&format!("create spool dir {}", cfg.dir.display()), e))?;
        let lock = lock_dir(&cfg.dir)?;
        let recovered = recovery::recover(&cfg.dir, cfg.shard)?;
        let mut segments = BTreeMap::new();
        for (seq, info) in &recovered.segments {
            let file = OpenOptions::new()
                .read(true)
                .buffered_open(segment::path(&cfg.dir, *seq))
                .await
                .map_err(|e| io_err("open segment", e))?;
            segments.insert(
                *seq,
                Segment {
                    file: Rc::new(file),
                    live: info.live,
                    deps: info.deps.clone(),
                },
            );
        }
        let current = recovered.segments.keys().next_back().map_or(1, |s| s + 1);
        let state = State {
            next_id: recovered.next_id,
            batch: Batch::new(1),
            results: HashMap::new(),
            segments,
            current,
            current_len: 0,
            closing: false,
            committer_done: false,
            stats: SpoolStats::default(),
        };
        let spool = Rc::new(Spool {
            _lock: lock,
            cfg,
            state: RefCell::new(state),
            appended: Notify::new(),
            committed: Notify::new(),
        });
        spool.create_segment(current).await?;
        spool.collect();
        Ok((spool, recovered))
    }

    pub fn shard(&self) -> u32 {
        self.cfg.shard
    }

    pub fn stats(&self) -> SpoolStats {
        self.state.borrow().stats
    }

    /// Segments on disk, current one included.
    pub fn segment_count(&self) -> usize {
        self.state.borrow().segments.len()
    }

    /// Append a message and wait until it is durable. Assigns and returns the message id.
    pub async fn append_message(
        &self,
        mut rec: MessageRecord,
    ) -> Result<(u64, Location), SpoolError> {
        self.wait_for_batch_room().await?;
        let (no, offset, len, id) = {
            let mut st = self.state.borrow_mut();
            if st.closing {
                return Err(SpoolError::Closed);
            }
            rec.id = st.next_id;
            st.next_id += 1;
            let (offset, len) = record::encode(&mut st.batch.buf, RecordKind::Message, &rec)?;
            st.batch.records += 1;
            st.batch.messages += 1;
            st.batch.waiters += 1;
            (st.batch.no, offset, len, rec.id)
        };
        self.appended.notify_all();
        let (seq, base) = self.wait_for_commit(no).await?;
        Ok((
            id,
            Location {
                seq,
                offset: base + offset as u64,
                len: len as u32,
            },
        ))
    }

    /// Append an outcome for a message stored in segment `message_seq`. Does not wait: the record
    /// rides the next commit. Returns an error only when the record cannot be queued at all.
    pub fn append_outcome(&self, message_seq: u64, rec: &OutcomeRecord) -> Result<(), SpoolError> {
        {
            let mut st = self.state.borrow_mut();
            if st.committer_done {
                return Err(SpoolError::Closed);
            }
            record::encode(&mut st.batch.buf, RecordKind::Outcome, rec)?;
            st.batch.records += 1;
            st.batch.deps.push(message_seq);
        }
        self.appended.notify_all();
        Ok(())
    }

    /// Read a message record back, checked (checksum and archive) on the way in from disk.
    pub async fn read_message(&self, loc: Location) -> Result<StoredMessage, SpoolError> {
        let file = self
            .state
            .borrow()
            .segments
            .get(&loc.seq)
            .map(|s| s.file.clone())
            .ok_or(SpoolError::UnknownSegment(loc.seq))?;
        let read = file
            .read_at(loc.offset, loc.len as usize)
            .await
            .map_err(|e| io_err("read record", e))?;
        let (header, _) = record::decode(&read)?;
        if header.kind != RecordKind::Message {
            return Err(RecordError::Kind(header.kind as u8).into());
        }
        // rkyv reads the archive in place; copy only if the buffer is not aligned for it.
        let bytes = if read.as_ptr().align_offset(record::RECORD_ALIGN) == 0 {
            StoredBytes::Read(read)
        } else {
            StoredBytes::Copied(record::aligned_copy(
                &read[..RECORD_HEADER_LEN + header.payload_len],
            ))
        };
        let stored = StoredMessage {
            bytes,
            payload_len: header.payload_len,
        };
        stored.message()?;
        Ok(stored)
    }

    /// A message whose record is in segment `seq` reached a final outcome for every recipient.
    pub fn message_final(&self, seq: u64) {
        {
            let mut st = self.state.borrow_mut();
            if let Some(seg) = st.segments.get_mut(&seq) {
                debug_assert!(seg.live > 0, "segment {seq} live count underflow");
                seg.live = seg.live.saturating_sub(1);
            }
        }
        self.collect();
    }

    /// Delete every segment that no longer holds anything needed (see the module invariants).
    fn collect(&self) {
        let mut st = self.state.borrow_mut();
        let current = st.current;
        let candidates: Vec<u64> = st
            .segments
            .keys()
            .copied()
            .filter(|&s| s != current)
            .collect();
        for seq in candidates {
            let deletable = match st.segments.get(&seq) {
                Some(seg) => {
                    seg.live == 0
                        && seg
                            .deps
                            .iter()
                            .all(|d| *d == seq || !st.segments.contains_key(d))
                }
                None => false,
            };
            if !deletable {
                continue;
            }
            let path = segment::path(&self.cfg.dir, seq);
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    st.segments.remove(&seq);
                    st.stats.segments_deleted += 1;
                }
                Err(e) => eprintln!(
                    "shard {}: cannot delete {}: {e}",
                    self.cfg.shard,
                    path.display()
                ),
            }
        }
    }

    /// Stop taking appends; the committer writes what is pending and returns.
    pub fn close(&self) {
        self.state.borrow_mut().closing = true;
        self.appended.notify_all();
    }

    /// The group-commit loop. Runs until [`Spool::close`] and the last batch is durable.
    pub async fn run_committer(self: Rc<Self>) {
        loop {
            loop {
                let ready = {
                    let st = self.state.borrow();
                    st.batch.records > 0 || st.closing
                };
                if ready {
                    break;
                }
                self.appended.notified().await;
            }
            if self.cfg.commit_window_us > 0 && !self.state.borrow().closing {
                glommio::timer::sleep(Duration::from_micros(self.cfg.commit_window_us)).await;
            }
            let batch = {
                let mut st = self.state.borrow_mut();
                if st.batch.records == 0 {
                    // Closing with nothing pending.
                    st.committer_done = true;
                    break;
                }
                let next = Batch::new(st.batch.no + 1);
                std::mem::replace(&mut st.batch, next)
            };
            let (no, waiters) = (batch.no, batch.waiters);
            let result = self.write_batch(batch).await;
            if let Err(e) = &result {
                eprintln!("shard {}: spool commit failed: {e}", self.cfg.shard);
            }
            if waiters > 0 {
                self.state
                    .borrow_mut()
                    .results
                    .insert(no, (result, waiters));
            }
            self.committed.notify_all();
        }
        self.committed.notify_all();
    }

    async fn write_batch(&self, batch: Batch) -> Result<(u64, u64), SpoolError> {
        let len = batch.buf.len() as u64;
        let (full, has_records) = {
            let st = self.state.borrow();
            (
                st.current_len + len > self.cfg.segment_size_max,
                st.current_len > segment::SEGMENT_HEADER_LEN as u64,
            )
        };
        if full && has_records {
            let next = self.state.borrow().current + 1;
            self.create_segment(next).await?;
        }
        let (seq, base, file) = {
            let st = self.state.borrow();
            let file = st.segments.get(&st.current).map(|s| s.file.clone());
            (
                st.current,
                st.current_len,
                file.ok_or(SpoolError::UnknownSegment(st.current))?,
            )
        };
        let written = write_all(&file, batch.buf, base).await.and(
            file.fdatasync()
                .await
                .map_err(|e| io_err("fdatasync segment", e)),
        );
        if let Err(e) = written {
            // Cut the failed batch off so the segment ends on a whole record; if even that fails,
            // recovery's checksum scan skips the partial batch.
            let _ = file.truncate(base).await;
            return Err(e);
        }
        let mut st = self.state.borrow_mut();
        st.current_len = base + len;
        st.stats.commits += 1;
        st.stats.records += u64::from(batch.records);
        st.stats.bytes += len;
        if let Some(seg) = st.segments.get_mut(&seq) {
            seg.live += batch.messages;
            seg.deps.extend(batch.deps);
        }
        Ok((seq, base))
    }

    async fn create_segment(&self, seq: u64) -> Result<(), SpoolError> {
        debug_assert!(
            !self.state.borrow().segments.contains_key(&seq),
            "segment {seq} exists"
        );
        let path = segment::path(&self.cfg.dir, seq);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .buffered_open(&path)
            .await
            .map_err(|e| io_err("create segment", e))?;
        // A failure here (a full disk, typically) leaves no half-made segment behind, so the
        // next commit can try the same sequence number again. `seq` is always past every
        // segment we hold, so truncating can only hit such a leftover.
        let made = async {
            let header = segment::encode_header(self.cfg.shard, seq).to_vec();
            write_all(&file, header, 0).await?;
            file.fdatasync()
                .await
                .map_err(|e| io_err("fdatasync new segment", e))?;
            // The new file's directory entry must be durable too, or a crash could lose it.
            sync_dir(&self.cfg.dir)
        };
        if let Err(e) = made.await {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let mut st = self.state.borrow_mut();
        st.segments.insert(
            seq,
            Segment {
                file: Rc::new(file),
                live: 0,
                deps: BTreeSet::new(),
            },
        );
        st.current = seq;
        st.current_len = segment::SEGMENT_HEADER_LEN as u64;
        Ok(())
    }

    async fn wait_for_batch_room(&self) -> Result<(), SpoolError> {
        loop {
            {
                let st = self.state.borrow();
                if st.closing {
                    return Err(SpoolError::Closed);
                }
                if st.batch.buf.len() < self.cfg.commit_batch_max {
                    return Ok(());
                }
            }
            self.committed.notified().await;
        }
    }

    async fn wait_for_commit(&self, no: u64) -> Result<(u64, u64), SpoolError> {
        loop {
            {
                let mut st = self.state.borrow_mut();
                if let Some((result, waiters)) = st.results.get_mut(&no) {
                    let result = result.clone();
                    *waiters -= 1;
                    if *waiters == 0 {
                        st.results.remove(&no);
                    }
                    return result;
                }
                if st.committer_done {
                    return Err(SpoolError::Closed);
                }
            }
            self.committed.notified().await;
        }
    }
}

impl Batch {
    fn new(no: u64) -> Batch {
        Batch {
            no,
            buf: Vec::new(),
            records: 0,
            messages: 0,
            deps: Vec::new(),
            waiters: 0,
        }
    }
}

async fn write_all(file: &BufferedFile, buf: Vec<u8>, pos: u64) -> Result<(), SpoolError> {
    let total = buf.len();
    let done = file
        .write_at(buf, pos)
        .await
        .map_err(|e| io_err("write segment", e))?;
    // A short write to a regular file means the disk or a quota is full. The batch fails as a
    // whole (its clients get 451) and the caller cuts the partial bytes off.
    if done < total {
        return Err(io_err(
            "write segment",
            format!("short write: {done} of {total} bytes"),
        ));
    }
    Ok(())
}

/// Take an exclusive lock on `dir/lock`, or fail if another process holds it. The kernel drops
/// the lock when the process dies, so a crash never leaves a stale lock behind.
fn lock_dir(dir: &Path) -> Result<std::fs::File, SpoolError> {
    use std::os::fd::AsRawFd;
    let path = dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io_err(&format!("open {}", path.display()), e))?;
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(SpoolError::Io(format!(
            "spool {} is in use by another epoxi process ({})",
            dir.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(file)
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("fsync spool dir", e))
}

#[cfg(test)]
mod tests {
    use super::record::OutcomeKind;
    use super::*;

    fn run<F: std::future::Future<Output = ()> + 'static>(f: F) {
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(256 << 10)
            .ring_depth(64)
            .make()
            .expect("executor");
        ex.run(f);
    }

    fn cfg(dir: &Path, segment_size_max: u64) -> SpoolConfig {
        SpoolConfig {
            dir: dir.to_owned(),
            shard: 0,
            segment_size_max,
            commit_window_us: 0,
            commit_batch_max: 1 << 20,
        }
    }

    fn message(i: usize, rcpts: usize) -> MessageRecord {
        MessageRecord {
            id: 0,
            reception_id: format!("r{i}"),
            received_ms: 1000 + i as u64,
            mail_from: "s@x.test".into(),
            rcpts: (0..rcpts).map(|r| format!("u{r}@d{r}.test")).collect(),
            peer: "127.0.0.1:1".into(),
            flags: 0,
            dsn_ret: 0,
            dsn_envid: String::new(),
            dsn_notify: vec![0; rcpts],
            dsn_orcpt: vec![String::new(); rcpts],
            body: vec![b'a' + (i % 26) as u8; 700],
        }
    }

    fn outcome(id: u64, rcpt: u32, kind: OutcomeKind) -> OutcomeRecord {
        OutcomeRecord {
            message: id,
            rcpt,
            kind: kind as u8,
            attempts: 1,
            at_ms: 5,
            next_attempt_ms: 77,
        }
    }

    #[test]
    fn append_read_recover_and_collect() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_owned();
        run(async move {
            // Session 1: 40 messages over several 1 MiB segments, concurrent appenders so
            // batches hold several messages.
            let (spool, rec) = Spool::open(cfg(&path, 1 << 20)).await.expect("open");
            assert!(rec.pending.is_empty());
            let committer = glommio::spawn_local(spool.clone().run_committer());
            let mut tasks = Vec::new();
            for i in 0..40 {
                let spool = spool.clone();
                tasks.push(glommio::spawn_local(async move {
                    let mut m = message(i, 2);
                    m.body = vec![b'a' + (i % 26) as u8; 60_000];
                    spool.append_message(m).await.expect("append")
                }));
            }
            let mut locs = Vec::new();
            for t in tasks {
                locs.push(t.await);
            }
            assert!(spool.stats().commits < 40, "group commit batches appends");
            assert!(spool.segment_count() > 1, "rotated");
            let stored = spool.read_message(locs[7].1).await.expect("read");
            assert_eq!(stored.message().expect("valid").reception_id.as_str(), "r7");
            // First 30 messages: both recipients delivered. Message 30: one deferred.
            for (id, loc) in &locs[..30] {
                spool
                    .append_outcome(loc.seq, &outcome(*id, 0, OutcomeKind::Delivered))
                    .expect("o");
                spool
                    .append_outcome(loc.seq, &outcome(*id, 1, OutcomeKind::Bounced))
                    .expect("o");
                spool.message_final(loc.seq);
            }
            let (id30, loc30) = locs[30];
            spool
                .append_outcome(loc30.seq, &outcome(id30, 0, OutcomeKind::Delivered))
                .expect("o");
            spool
                .append_outcome(loc30.seq, &outcome(id30, 1, OutcomeKind::Deferred))
                .expect("o");
            spool.close();
            committer.await;
            drop(spool);

            // Session 2: recovery sees 10 pending messages, message 30 with one pending rcpt.
            let (spool, rec) = Spool::open(cfg(&path, 1 << 20)).await.expect("reopen");
            assert_eq!(rec.pending.len(), 10, "{:?}", rec.report);
            let m30 = rec
                .pending
                .iter()
                .find(|m| m.id == id30)
                .expect("message 30 pending");
            assert_eq!(m30.states[0], RcptState::Final(OutcomeKind::Delivered));
            assert_eq!(
                m30.states[1],
                RcptState::Pending {
                    attempts: 1,
                    next_attempt_ms: 77
                }
            );
            assert_eq!(
                rec.next_id,
                locs.iter().map(|l| l.0).max().expect("ids") + 1
            );
            let before = spool.segment_count();
            let committer = glommio::spawn_local(spool.clone().run_committer());
            for m in &rec.pending {
                for r in 0..2 {
                    spool
                        .append_outcome(m.loc.seq, &outcome(m.id, r, OutcomeKind::Delivered))
                        .expect("o");
                }
                spool.message_final(m.loc.seq);
            }
            spool.close();
            committer.await;
            drop(spool);

            // Session 3: nothing pending; old segments were deleted once they held nothing live.
            let (spool, rec) = Spool::open(cfg(&path, 1 << 20)).await.expect("reopen");
            assert!(rec.pending.is_empty(), "{:?}", rec.report);
            assert!(
                spool.segment_count() < before,
                "{} < {before}",
                spool.segment_count()
            );
        });
    }

    #[test]
    fn recovery_survives_torn_and_flipped_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_owned();
        run(async move {
            let (spool, _) = Spool::open(cfg(&path, 64 << 20)).await.expect("open");
            let committer = glommio::spawn_local(spool.clone().run_committer());
            let mut locs = Vec::new();
            for i in 0..10 {
                locs.push(spool.append_message(message(i, 1)).await.expect("append"));
            }
            spool.close();
            committer.await;
            drop(spool);

            let seg = segment::path(&path, locs[0].1.seq);
            let mut bytes = std::fs::read(&seg).expect("read");
            // Flip a byte inside message 4's body, and tear the last record in half.
            let l4 = locs[4].1;
            bytes[(l4.offset + u64::from(l4.len) / 2) as usize] ^= 0xff;
            let l9 = locs[9].1;
            bytes.truncate((l9.offset + u64::from(l9.len) / 2) as usize);
            std::fs::write(&seg, &bytes).expect("write");

            let (_spool, rec) = Spool::open(cfg(&path, 64 << 20)).await.expect("reopen");
            let ids: Vec<u64> = rec.pending.iter().map(|m| m.id).collect();
            let expect: Vec<u64> = locs
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != 4 && *i != 9)
                .map(|(_, l)| l.0)
                .collect();
            assert_eq!(ids, expect);
            assert_eq!(rec.report.corrupt_records, 1, "{:?}", rec.report);
            assert_eq!(rec.report.torn_tails, 1, "{:?}", rec.report);
            // New ids never reuse a recovered one.
            assert!(rec.next_id > *ids.last().expect("ids"));
        });
    }

    #[test]
    fn bad_segment_header_is_set_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            segment::path(dir.path(), 3),
            b"garbage that is not a segment header",
        )
        .expect("write");
        let path = dir.path().to_owned();
        run(async move {
            let (spool, rec) = Spool::open(cfg(&path, 64 << 20)).await.expect("open");
            assert_eq!(rec.report.corrupt_segments.len(), 1);
            assert_eq!(spool.segment_count(), 1);
        });
        assert!(dir.path().join("00000000000000000003.corrupt").exists());
        assert!(!segment::path(dir.path(), 4).exists());
    }
}
