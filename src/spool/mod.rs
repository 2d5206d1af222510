//! The spool: a shard's durable, append-only message store.
//!
//! Each shard owns a directory of segments (see [`segment`]) holding records (see [`record`]).
//! Appends go into an in-memory batch; one committer task per shard writes the batch at the end
//! of the current segment and fdatasyncs it, then wakes every appender of that batch (group
//! commit: one fdatasync for many messages). An append of a message returns only once its batch
//! is durable, which is what lets the SMTP server answer 250.
//!
//! Outcomes (delivered, deferred, bounced, expired) are appended records too; they ride the
//! next commit without the caller waiting, because losing one only means a retry, never a lost
//! message.
//!
//! The bookkeeping (batches, what each segment holds, which may go, compaction's moves) is the
//! I/O-free [`engine::Engine`]; this module is its glommio adapter: files, the committer, the
//! collector that deletes segments and the compactor that copies a mostly-dead segment's live
//! records forward (rate-limited, on a low-priority task queue) so one long-deferred message
//! does not pin a whole segment.
//!
//! Invariants:
//! - Records are only ever appended; a segment is never written again after rotation, and after
//!   a restart new records go to a new segment (never after a torn tail).
//! - See `engine` for when a segment may go; per-message state belongs to the queue.

pub mod engine;
pub mod record;
pub mod recovery;
pub mod segment;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use glommio::io::{BufferedFile, OpenOptions};
use rkyv::util::AlignedVec;
use shards::Notify;

pub use engine::{CompactionReport, EngineStats, LiveIndex, LiveMessage, RcptSnapshot};
use engine::{Engine, EngineLimits, Target};
use record::{MessageView, OutcomeRecord, RecordError, RecordKind, RECORD_HEADER_LEN};
pub use recovery::{RcptState, Recovered, RecoveredMessage, RecoveryReport, Replay};

use crate::envelope::Envelope;

#[derive(Clone, Debug, thiserror::Error, PartialEq)]
pub enum SpoolError {
    /// The disk or a quota is full: the client should try again later (`452 4.3.1`).
    #[error("spool out of space: {0}")]
    NoSpace(String),
    /// Any other I/O failure (`451 4.3.0`).
    #[error("spool I/O error: {0}")]
    Io(String),
    #[error("spool record error: {0}")]
    Record(#[from] RecordError),
    /// The spool is shutting down (`421 4.3.2`).
    #[error("spool is shutting down")]
    Closed,
    #[error("segment {0} is not open")]
    UnknownSegment(u64),
}

/// An I/O error in `context`, with a full disk told apart: ENOSPC and EDQUOT mean "try later",
/// not "broken".
fn io_err(context: &str, e: impl Into<std::io::Error>) -> SpoolError {
    let e: std::io::Error = e.into();
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => SpoolError::NoSpace(format!("{context}: {e}")),
        _ => SpoolError::Io(format!("{context}: {e}")),
    }
}

/// The highest segment number the spool uses: the queue keeps record locations in 32 bits.
/// 4 billion segments of at least 1 MiB (the smallest `segment_size_max`) is 4 PiB written
/// per shard; past it the spool refuses to take more rather than misplace a record.
pub const SEGMENT_SEQ_MAX: u64 = u32::MAX as u64;

/// Compaction reads a segment this many bytes at a time, pausing between reads to keep to its
/// rate: small enough that a read never holds the disk long, big enough to be sequential.
const COMPACTION_READ_CHUNK: usize = 1 << 20;

#[derive(Clone, Debug)]
pub struct SpoolConfig {
    /// This shard's directory (`<spool>/shard-<id>`).
    pub dir: PathBuf,
    pub shard: u32,
    pub segment_size_max: u64,
    pub commit_window_us: u64,
    pub commit_batch_max: usize,
    /// Compact a closed segment whose live bytes fall below this share of it.
    pub compact_live_ratio: f64,
    /// Bytes per second compaction may read (its writes ride the group commit).
    pub compaction_bytes_per_s: u64,
}

/// Where a record lives: segment, byte offset and framed length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Location {
    pub seq: u64,
    pub offset: u64,
    pub len: u32,
}

/// A message record read back from disk, 16-byte aligned so rkyv reads it in place.
pub struct StoredMessage {
    bytes: StoredBytes,
    version: u8,
    payload_len: usize,
}

enum StoredBytes {
    /// glommio's read buffer itself, when it is aligned (it is page-aligned in practice).
    Read(glommio::io::ReadResult),
    /// A copy, when it was not.
    Copied(AlignedVec),
}

impl StoredMessage {
    pub fn view(&self) -> Result<MessageView<'_>, RecordError> {
        let bytes: &[u8] = match &self.bytes {
            StoredBytes::Read(read) => read,
            StoredBytes::Copied(copy) => copy,
        };
        MessageView::new(
            self.version,
            &bytes[RECORD_HEADER_LEN..RECORD_HEADER_LEN + self.payload_len],
        )
    }
}

/// Counters for the metrics and the benchmark report.
pub type SpoolStats = EngineStats;

/// What opening a spool found.
#[derive(Debug)]
pub struct Opened {
    pub report: RecoveryReport,
    /// Every message id seen on disk is at most this one.
    pub id_max: u64,
}

/// Where a committed batch landed: (segment, file offset of the batch), or why it failed.
type CommitResult = Result<(u64, u64), SpoolError>;

/// Called with the moves of each committed batch, synchronously (before anything else can
/// append): the owner of per-message state updates their locations.
pub type MoveHandler = Box<dyn Fn(&[(u64, Location)])>;

pub struct Spool {
    /// Held for the life of the spool: a second process on the same directory would delete
    /// segments this one is still writing (see [`lock_dir`]).
    _lock: std::fs::File,
    cfg: SpoolConfig,
    engine: RefCell<Engine>,
    files: RefCell<BTreeMap<u64, Rc<BufferedFile>>>,
    /// Results of committed batches that still have waiters, with the count still to read it.
    results: RefCell<HashMap<u64, (CommitResult, u32)>>,
    committer_done: Cell<bool>,
    /// Wakes the committer: records were appended or the spool is closing.
    appended: Notify,
    /// Wakes appenders: a batch was committed.
    committed: Notify,
    /// Wakes the collector and the compactor: something may have become deletable.
    changed: Notify,
    on_moved: RefCell<Option<MoveHandler>>,
}

impl Spool {
    /// Open a shard's spool: replay every segment into `sink`, one segment in memory at a
    /// time, then start a fresh segment for new records. Unreadable records are reported (and
    /// copied to `quarantine/`). The caller must spawn [`Spool::run_committer`] (and the
    /// collector and compactor).
    pub async fn open(
        mut cfg: SpoolConfig,
        sink: &mut dyn recovery::Replay,
    ) -> Result<(Rc<Spool>, Opened), SpoolError> {
        std::fs::create_dir_all(&cfg.dir)
            .map_err(|e| io_err(&format!("create spool dir {}", cfg.dir.display()), e))?;
        // glommio opens directories relative to no descriptor: give it an absolute path.
        cfg.dir = std::fs::canonicalize(&cfg.dir)
            .map_err(|e| io_err(&format!("resolve spool dir {}", cfg.dir.display()), e))?;
        let lock = lock_dir(&cfg.dir)?;
        let shard = cfg.shard;
        // Directory and file reads are blocking: they run on the executor's blocking pool,
        // a segment at a time, so memory holds one segment, not the spool.
        let dir = cfg.dir.clone();
        let (seqs, corrupt) = glommio::executor()
            .spawn_blocking(move || recovery::list_segments(&dir, shard))
            .await?;
        let mut report = RecoveryReport {
            corrupt_segments: corrupt,
            ..RecoveryReport::default()
        };
        let mut segments = BTreeMap::new();
        let mut set_aside = Vec::new();
        let mut id_max = 0u64;
        for seq in seqs {
            let bytes = read_segment(&cfg.dir, seq).await?;
            let info = recovery::replay_segment(
                seq,
                &bytes,
                sink,
                &mut report,
                &mut set_aside,
                &mut id_max,
            );
            segments.insert(seq, info);
        }
        recovery::settle(&mut segments, sink, &mut report);
        if !set_aside.is_empty() {
            let dir = cfg.dir.clone();
            report.quarantined = glommio::executor()
                .spawn_blocking(move || recovery::quarantine(&dir, &set_aside))
                .await?;
        }
        recovery::log_unreadable(shard, &report);
        let mut files = BTreeMap::new();
        for seq in segments.keys() {
            let file = OpenOptions::new()
                .read(true)
                .buffered_open(segment::path(&cfg.dir, *seq))
                .await
                .map_err(|e| io_err("open segment", e))?;
            files.insert(*seq, Rc::new(file));
        }
        let current = segments.keys().next_back().map_or(1, |s| s + 1);
        let limits = EngineLimits {
            segment_size_max: cfg.segment_size_max,
            commit_batch_max: cfg.commit_batch_max,
            compact_live_ratio: cfg.compact_live_ratio,
        };
        let file = create_segment_file(&cfg, current).await?;
        files.insert(current, Rc::new(file));
        let engine = Engine::new(
            limits,
            segments,
            current,
            segment::SEGMENT_HEADER_LEN as u64,
        );
        let spool = Rc::new(Spool {
            _lock: lock,
            cfg,
            engine: RefCell::new(engine),
            files: RefCell::new(files),
            results: RefCell::new(HashMap::new()),
            committer_done: Cell::new(false),
            appended: Notify::new(),
            committed: Notify::new(),
            changed: Notify::new(),
            on_moved: RefCell::new(None),
        });
        Ok((spool, Opened { report, id_max }))
    }

    /// [`Spool::open`] into a [`recovery::Collect`]: the pending messages as a list, for
    /// tests and tools.
    pub async fn open_collecting(cfg: SpoolConfig) -> Result<(Rc<Spool>, Recovered), SpoolError> {
        let mut sink = recovery::Collect::default();
        let (spool, opened) = Spool::open(cfg, &mut sink).await?;
        let segments = spool
            .engine
            .borrow()
            .segments()
            .iter()
            .filter(|(s, _)| **s != spool.engine.borrow().current())
            .map(|(s, st)| (*s, st.clone()))
            .collect();
        Ok((
            spool,
            Recovered {
                pending: sink.into_pending(),
                segments,
                id_max: opened.id_max,
                report: opened.report,
            },
        ))
    }

    pub fn shard(&self) -> u32 {
        self.cfg.shard
    }

    pub fn stats(&self) -> SpoolStats {
        self.engine.borrow().stats()
    }

    /// Bytes of the segment files and how many there are (for metrics), from the engine's
    /// account of them: no I/O.
    pub fn footprint(&self) -> (u64, u64) {
        let engine = self.engine.borrow();
        let segments = engine.segments();
        (
            segments.values().map(|s| s.len).sum(),
            segments.len() as u64,
        )
    }

    /// Segments on disk, current one included.
    pub fn segment_count(&self) -> usize {
        self.files.borrow().len()
    }

    /// Set who hears of compaction's moves (see [`MoveHandler`]).
    pub fn on_moved(&self, handler: MoveHandler) {
        *self.on_moved.borrow_mut() = Some(handler);
    }

    /// Append message `id` and wait until it is durable. The body (in pieces: our headers,
    /// then the message) is copied once, into the batch.
    pub async fn append_message(
        &self,
        id: u64,
        envelope: &Envelope,
        body: &[&[u8]],
    ) -> Result<Location, SpoolError> {
        self.wait_for_batch_room().await?;
        let (no, offset, len) = self
            .engine
            .borrow_mut()
            .append_message(id, envelope, body)?;
        self.appended.notify_all();
        let (seq, base) = self.wait_for_commit(no).await?;
        Ok(Location {
            seq,
            offset: base + offset,
            len,
        })
    }

    /// Append an outcome for a message stored in segment `message_seq`. Does not wait: the
    /// record rides the next commit. Returns an error only when it cannot be queued at all.
    pub fn append_outcome(&self, message_seq: u64, rec: &OutcomeRecord) -> Result<(), SpoolError> {
        if self.committer_done.get() {
            return Err(SpoolError::Closed);
        }
        self.engine.borrow_mut().append_outcome(message_seq, rec)?;
        self.appended.notify_all();
        Ok(())
    }

    /// Read a message record back, checked (checksum and archive) on the way in from disk.
    pub async fn read_message(&self, loc: Location) -> Result<StoredMessage, SpoolError> {
        let file = self
            .files
            .borrow()
            .get(&loc.seq)
            .cloned()
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
            version: header.version,
            payload_len: header.payload_len,
        };
        // Assert on the way in from disk: what we read is a valid record.
        stored.view()?;
        Ok(stored)
    }

    /// Message `id`, whose record is at `loc`, reached a final outcome for every recipient.
    pub fn message_final(&self, id: u64, loc: Location) {
        self.engine.borrow_mut().message_final(id, loc);
        self.changed.notify_all();
    }

    /// Stop taking messages; the committer writes what is pending and returns.
    pub fn close(&self) {
        self.engine.borrow_mut().close();
        self.appended.notify_all();
        self.changed.notify_all();
    }

    /// The group-commit loop. Runs until [`Spool::close`] and the last batch is durable.
    pub async fn run_committer(self: Rc<Self>) {
        loop {
            loop {
                let (ready, closing) = {
                    let e = self.engine.borrow();
                    (e.wants_commit(), e.is_closing())
                };
                if ready || closing {
                    break;
                }
                self.appended.notified().await;
            }
            if self.cfg.commit_window_us > 0 && !self.engine.borrow().is_closing() {
                glommio::timer::sleep(Duration::from_micros(self.cfg.commit_window_us)).await;
            }
            let Some(commit) = self.engine.borrow_mut().take_commit() else {
                if self.engine.borrow().is_closing() {
                    break;
                }
                continue;
            };
            let (no, waiters) = (commit.no, commit.waiters);
            let mut commit = commit;
            let buf = std::mem::take(&mut commit.buf);
            let result = self.write_batch(buf).await;
            if let Err(e) = &result {
                tracing::error!(shard = self.cfg.shard, "spool commit failed: {e}");
            }
            let done = self
                .engine
                .borrow_mut()
                .committed(commit, result.as_ref().map(|r| *r).map_err(|_| ()));
            if !done.moved.is_empty() {
                if let Some(handler) = self.on_moved.borrow().as_ref() {
                    handler(&done.moved);
                }
            }
            if waiters > 0 {
                self.results.borrow_mut().insert(no, (result, waiters));
            }
            self.committed.notify_all();
            self.changed.notify_all();
        }
        self.committer_done.set(true);
        self.committed.notify_all();
        self.changed.notify_all();
    }

    async fn write_batch(&self, buf: Vec<u8>) -> CommitResult {
        let len = buf.len() as u64;
        let target = self.engine.borrow().target(len);
        let (seq, base) = match target {
            Target::Append { seq, offset } => (seq, offset),
            Target::Create { seq } => {
                if seq > SEGMENT_SEQ_MAX {
                    return Err(SpoolError::Io(format!(
                        "segment numbers exhausted at {seq}: start over with an empty spool"
                    )));
                }
                let file = create_segment_file(&self.cfg, seq).await?;
                self.files.borrow_mut().insert(seq, Rc::new(file));
                let header = segment::SEGMENT_HEADER_LEN as u64;
                self.engine.borrow_mut().segment_created(seq, header);
                (seq, header)
            }
        };
        let file = self
            .files
            .borrow()
            .get(&seq)
            .cloned()
            .ok_or(SpoolError::UnknownSegment(seq))?;
        let written = write_all(&file, buf, base).await;
        let written = match written {
            Ok(()) => file
                .fdatasync()
                .await
                .map_err(|e| io_err("fdatasync segment", e)),
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            // Cut the failed batch off so the segment ends on a whole record; if even that fails,
            // recovery's checksum scan skips the partial batch.
            let _ = file.truncate(base).await;
            return Err(e);
        }
        Ok((seq, base))
    }

    /// Delete segments that hold nothing needed, as they become so, until the spool closes.
    pub async fn run_collector(self: Rc<Self>) {
        loop {
            // Looked at before the pass: once the committer is done, one more pass sees
            // everything its last commit made deletable.
            let last = self.committer_done.get();
            let changed = self.changed.notified();
            // Deleting a segment can free the ones whose outcomes were only about it: go on
            // until nothing is collectable (or deletions fail, to try again on the next change
            // rather than spin), or they would wait for the next change, maybe forever.
            loop {
                let seqs = self.engine.borrow().collectable();
                let mut removed = false;
                for seq in seqs {
                    removed |= self.remove_segment(seq).await;
                }
                if !removed {
                    break;
                }
            }
            if last {
                return;
            }
            changed.await;
        }
    }

    /// Delete segment `seq`; false when that failed.
    async fn remove_segment(&self, seq: u64) -> bool {
        let path = segment::path(&self.cfg.dir, seq);
        match glommio::io::remove(&path).await {
            Ok(()) => {
                // Readers holding the file keep it open until they finish.
                self.files.borrow_mut().remove(&seq);
                self.engine.borrow_mut().segment_removed(seq);
                true
            }
            Err(e) => {
                tracing::error!(shard = self.cfg.shard, path = %path.display(), "cannot delete segment: {e}");
                // Try again on the next change rather than spinning.
                false
            }
        }
    }

    /// Compact segments whose live share fell below the threshold, one at a time, reading at
    /// most `compaction_bytes_per_s`, until the spool closes. Run it on a low-priority task
    /// queue: it only ever trades its own latency.
    pub async fn run_compactor(
        self: Rc<Self>,
        index: Rc<dyn LiveIndex>,
        clock: Rc<dyn crate::clock::Clock>,
    ) {
        loop {
            if self.committer_done.get() || self.engine.borrow().is_closing() {
                return;
            }
            let candidate = self.engine.borrow().compaction_candidate();
            let Some(seq) = candidate else {
                self.changed.notified().await;
                continue;
            };
            match self.compact_one(seq, &*index, &*clock).await {
                Ok(report) => {
                    tracing::debug!(shard = self.cfg.shard, segment = seq, ?report, "compacted");
                    self.appended.notify_all();
                }
                Err(e) => {
                    tracing::warn!(
                        shard = self.cfg.shard,
                        segment = seq,
                        "compaction failed: {e}"
                    );
                    // Wait for the next change before trying again.
                    self.changed.notified().await;
                }
            }
        }
    }

    async fn compact_one(
        &self,
        seq: u64,
        index: &dyn LiveIndex,
        clock: &dyn crate::clock::Clock,
    ) -> Result<CompactionReport, SpoolError> {
        let file = self
            .files
            .borrow()
            .get(&seq)
            .cloned()
            .ok_or(SpoolError::UnknownSegment(seq))?;
        let len = self
            .engine
            .borrow()
            .segments()
            .get(&seq)
            .map_or(0, |s| s.len) as usize;
        let mut bytes: AlignedVec = AlignedVec::with_capacity(len);
        let rate = self.cfg.compaction_bytes_per_s.max(1);
        while bytes.len() < len {
            let want = COMPACTION_READ_CHUNK.min(len - bytes.len());
            let read = file
                .read_at(bytes.len() as u64, want)
                .await
                .map_err(|e| io_err("compaction read", e))?;
            if read.is_empty() {
                break;
            }
            bytes.extend_from_slice(&read);
            // Keep to the rate: this chunk's share of a second.
            let pause_us = (read.len() as u64).saturating_mul(1_000_000) / rate;
            glommio::timer::sleep(Duration::from_micros(pause_us)).await;
        }
        if bytes.len() < segment::SEGMENT_HEADER_LEN {
            return Ok(CompactionReport::default());
        }
        let scan = engine::scan_segment(
            &bytes[segment::SEGMENT_HEADER_LEN..],
            segment::SEGMENT_HEADER_LEN,
        );
        // The states restated are those of this instant: no await between reading them and
        // appending the copies.
        let report = self
            .engine
            .borrow_mut()
            .compact(seq, &bytes, &scan, index, clock.now_ms())?;
        self.appended.notify_all();
        Ok(report)
    }

    async fn wait_for_batch_room(&self) -> Result<(), SpoolError> {
        loop {
            {
                let e = self.engine.borrow();
                if e.is_closing() {
                    return Err(SpoolError::Closed);
                }
                if e.has_room() {
                    return Ok(());
                }
            }
            self.committed.notified().await;
        }
    }

    async fn wait_for_commit(&self, no: u64) -> Result<(u64, u64), SpoolError> {
        loop {
            {
                let mut results = self.results.borrow_mut();
                if let Some((result, waiters)) = results.get_mut(&no) {
                    let result = result.clone();
                    *waiters -= 1;
                    if *waiters == 0 {
                        results.remove(&no);
                    }
                    return result;
                }
                if self.committer_done.get() {
                    return Err(SpoolError::Closed);
                }
            }
            self.committed.notified().await;
        }
    }
}

/// Read segment `seq` whole, aligned for rkyv, with glommio's I/O on the shard's own thread:
/// the buffer is this thread's (a buffer filled and handed back by a blocking thread would be
/// freed here but owned by that thread's heap, which never takes it back while it idles).
async fn read_segment(dir: &Path, seq: u64) -> Result<AlignedVec, SpoolError> {
    let file = OpenOptions::new()
        .read(true)
        .buffered_open(segment::path(dir, seq))
        .await
        .map_err(|e| io_err("open segment", e))?;
    let len = file
        .file_size()
        .await
        .map_err(|e| io_err("stat segment", e))? as usize;
    let mut bytes: AlignedVec = AlignedVec::with_capacity(len);
    while bytes.len() < len {
        let want = RECOVERY_READ_CHUNK.min(len - bytes.len());
        let read = file
            .read_at(bytes.len() as u64, want)
            .await
            .map_err(|e| io_err("read segment", e))?;
        if read.is_empty() {
            break;
        }
        bytes.extend_from_slice(&read);
    }
    let _ = file.close().await;
    Ok(bytes)
}

/// Recovery reads a segment this many bytes at a time.
const RECOVERY_READ_CHUNK: usize = 8 << 20;

/// Create segment `seq` with its header, durably (file and directory entry).
async fn create_segment_file(cfg: &SpoolConfig, seq: u64) -> Result<BufferedFile, SpoolError> {
    let path = segment::path(&cfg.dir, seq);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .buffered_open(&path)
        .await
        .map_err(|e| io_err("create segment", e))?;
    // A failure here (a full disk, typically) leaves no half-made segment behind, so the next
    // commit can try the same sequence number again. `seq` is always past every segment we
    // hold, so truncating can only hit such a leftover.
    let made = async {
        let header = segment::encode_header(cfg.shard, seq).to_vec();
        write_all(&file, header, 0).await?;
        file.fdatasync()
            .await
            .map_err(|e| io_err("fdatasync new segment", e))?;
        // The new file's directory entry must be durable too, or a crash could lose it.
        let dir = glommio::io::Directory::open(&cfg.dir)
            .await
            .map_err(|e| io_err("open spool dir", e))?;
        dir.sync().await.map_err(|e| io_err("fsync spool dir", e))?;
        let _ = dir.close().await;
        Ok::<(), SpoolError>(())
    };
    if let Err(e) = made.await {
        let _ = glommio::io::remove(&path).await;
        return Err(e);
    }
    Ok(file)
}

async fn write_all(file: &BufferedFile, buf: Vec<u8>, pos: u64) -> Result<(), SpoolError> {
    let total = buf.len();
    let done = file
        .write_at(buf, pos)
        .await
        .map_err(|e| io_err("write segment", e))?;
    // A short write to a regular file means the disk or a quota is full. The batch fails as a
    // whole (its clients get 452) and the caller cuts the partial bytes off.
    if done < total {
        return Err(SpoolError::NoSpace(format!(
            "write segment: short write, {done} of {total} bytes"
        )));
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

#[cfg(test)]
mod tests;
