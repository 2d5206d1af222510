//! One shard's spool directory in memory, with a crash model.
//!
//! Each segment file has two images: what reads see now (`data`, the page cache) and what a
//! crash is sure to keep (`durable`, as of the last successful fdatasync). A crash keeps the
//! durable image and, when the file only grew since, a random prefix of what was written after
//! it (a torn write). A failed fdatasync may or may not have made the bytes durable; the
//! adapter then truncates them away, which is itself not durable until the next sync, so a
//! crash can bring them back. Creating a segment is durable at once (the adapter syncs the file
//! and the directory before using it); so is deleting one.

use std::collections::BTreeMap;

use epoxi::spool::recovery::SegmentBytes;

use crate::rng::Rng;

#[derive(Clone, Debug, Default)]
struct File {
    data: Vec<u8>,
    durable: Vec<u8>,
}

#[derive(Debug, Default)]
pub struct Disk {
    files: BTreeMap<u64, File>,
    /// Segments recovery set aside (a bad header), kept for the operator.
    set_aside: Vec<u64>,
}

impl Disk {
    /// Create segment `seq` holding `header`, durably.
    pub fn create(&mut self, seq: u64, header: &[u8]) {
        let file = File {
            data: header.to_vec(),
            durable: header.to_vec(),
        };
        self.files.insert(seq, file);
    }

    pub fn exists(&self, seq: u64) -> bool {
        self.files.contains_key(&seq)
    }

    /// Write `bytes` at `offset` of segment `seq` (not durable yet). False: no such file.
    pub fn write(&mut self, seq: u64, offset: usize, bytes: &[u8]) -> bool {
        let Some(f) = self.files.get_mut(&seq) else {
            return false;
        };
        let end = offset + bytes.len();
        if f.data.len() < end {
            f.data.resize(end, 0);
        }
        f.data[offset..end].copy_from_slice(bytes);
        true
    }

    pub fn truncate(&mut self, seq: u64, len: usize) {
        if let Some(f) = self.files.get_mut(&seq) {
            f.data.truncate(len);
        }
    }

    /// fdatasync: what reads see is now what a crash keeps.
    pub fn sync(&mut self, seq: u64) {
        if let Some(f) = self.files.get_mut(&seq) {
            f.durable.clear();
            f.durable.extend_from_slice(&f.data);
        }
    }

    pub fn remove(&mut self, seq: u64) {
        self.files.remove(&seq);
    }

    /// Up to `len` bytes at `offset` of segment `seq`, as reads see them now: fewer at the
    /// end of the file, as pread gives (None only past the end).
    pub fn read(&self, seq: u64, offset: usize, len: usize) -> Option<&[u8]> {
        let data = &self.files.get(&seq)?.data;
        data.get(offset..(offset + len).min(data.len()))
            .filter(|b| !b.is_empty() || len == 0)
    }

    /// The whole file as reads see it now.
    pub fn contents(&self, seq: u64) -> Option<&[u8]> {
        self.files.get(&seq).map(|f| f.data.as_slice())
    }

    pub fn len(&self, seq: u64) -> Option<usize> {
        self.files.get(&seq).map(|f| f.data.len())
    }

    pub fn seqs(&self) -> Vec<u64> {
        self.files.keys().copied().collect()
    }

    /// Segment files present.
    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    pub fn set_aside(&self) -> &[u64] {
        &self.set_aside
    }

    /// The process died: every file keeps what a crash keeps. `torn_per_mille`: how often the
    /// unsynced tail of a file that only grew survives in part.
    pub fn crash(&mut self, rng: &mut Rng, torn_per_mille: u32) {
        for f in self.files.values_mut() {
            let mut kept = f.durable.clone();
            let grew = f.data.len() > kept.len() && f.data[..kept.len()] == kept[..];
            if grew && rng.chance(torn_per_mille) {
                let extra = f.data.len() - kept.len();
                let n = rng.range(1, extra as u64) as usize;
                kept.extend_from_slice(&f.data[f.durable.len()..f.durable.len() + n]);
            } else if f.data.len() < f.durable.len() && rng.chance(500) {
                // A truncation after a failed sync reached the disk after all.
                kept.truncate(f.data.len());
            }
            f.data = kept.clone();
            f.durable = kept;
        }
    }

    /// Media corruption: flip one byte of a durable image past the first `skip` bytes of a
    /// random file. Returns (segment, offset), or None when no file is long enough.
    pub fn flip(&mut self, rng: &mut Rng, skip: usize) -> Option<(u64, usize)> {
        let candidates: Vec<u64> = self
            .files
            .iter()
            .filter(|(_, f)| f.durable.len() > skip)
            .map(|(s, _)| *s)
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let seq = candidates[rng.below(candidates.len() as u64) as usize];
        let f = self.files.get_mut(&seq)?;
        let at = rng.range(skip as u64, f.durable.len() as u64 - 1) as usize;
        let bit = 1u8 << rng.below(8);
        f.durable[at] ^= bit;
        f.data = f.durable.clone();
        Some((seq, at))
    }

    /// What `spool::recovery::recover` does to the directory before replaying it: files
    /// shorter than a header go (a crash while creating them), files whose header does not
    /// check are set aside; the rest are returned, 16-byte aligned, for `replay`.
    pub fn prepare_recovery(&mut self, shard: u32) -> Vec<SegmentBytes> {
        use epoxi::spool::segment;
        let mut out = Vec::new();
        for seq in self.seqs() {
            let Some(f) = self.files.get(&seq) else {
                continue;
            };
            if f.data.len() < segment::SEGMENT_HEADER_LEN {
                self.files.remove(&seq);
                continue;
            }
            if segment::check_header(&f.data, shard, seq).is_err() {
                self.files.remove(&seq);
                self.set_aside.push(seq);
                continue;
            }
            let mut bytes = rkyv::util::AlignedVec::<16>::with_capacity(f.data.len());
            bytes.extend_from_slice(&f.data);
            out.push(SegmentBytes { seq, bytes });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_keeps_synced_bytes_and_maybe_a_torn_prefix() {
        let mut rng = Rng::new(3);
        let mut torn = 0;
        for _ in 0..100 {
            let mut d = Disk::default();
            d.create(1, b"head");
            assert!(d.write(1, 4, b"synced"));
            d.sync(1);
            assert!(d.write(1, 10, b"unsynced"));
            d.crash(&mut rng, 500);
            let got = d.contents(1).map(<[u8]>::to_vec).unwrap_or_default();
            assert!(got.starts_with(b"headsynced"), "{got:?}");
            assert!(b"headsyncedunsynced".starts_with(&got));
            torn += usize::from(got.len() > 10);
        }
        assert!(torn > 20 && torn < 80, "{torn}");
    }

    #[test]
    fn bytes_of_a_failed_sync_may_come_back_after_truncation() {
        let mut rng = Rng::new(5);
        let mut back = 0;
        for _ in 0..100 {
            let mut d = Disk::default();
            d.create(1, b"head");
            assert!(d.write(1, 4, b"ghost"));
            // The failed fdatasync persisted them; the adapter truncates them off.
            d.sync(1);
            d.truncate(1, 4);
            assert_eq!(d.contents(1), Some(&b"head"[..]));
            d.crash(&mut rng, 0);
            back += usize::from(d.len(1) == Some(9));
        }
        assert!(back > 20 && back < 80, "{back}");
    }
}
