//! Segment files: naming and the segment header.
//!
//! A shard's spool directory holds `NNNNNNNNNNNNNNNNNNNN.seg` files, numbered by a sequence that
//! only grows. Each starts with a 32-byte header, then records (see `record`):
//!
//! ```text
//!  0 magic "EPXS" | 4 version u16 | 6 reserved u16 | 8 shard u32 | 12 reserved u32
//! 16 seq u64      | 24 crc u32 (CRC-32C of bytes 0..24) | 28 reserved u32
//! ```

use std::path::{Path, PathBuf};

pub const SEGMENT_MAGIC: [u8; 4] = *b"EPXS";
pub const SEGMENT_VERSION: u16 = 1;
pub const SEGMENT_HEADER_LEN: usize = 32;
const _: () = assert!(SEGMENT_HEADER_LEN.is_multiple_of(super::record::RECORD_ALIGN));

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SegmentError {
    #[error("segment header too short")]
    Short,
    #[error("bad segment magic")]
    Magic,
    #[error("unsupported segment version {0}")]
    Version(u16),
    #[error("segment header checksum mismatch")]
    Checksum,
    #[error("segment belongs to shard {found}, not {expected}")]
    Shard { expected: u32, found: u32 },
    #[error("segment header says seq {found}, file name says {expected}")]
    Seq { expected: u64, found: u64 },
}

pub fn file_name(seq: u64) -> String {
    format!("{seq:020}.seg")
}

pub fn path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(file_name(seq))
}

/// The sequence number in a segment file name, or None for other files.
pub fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

pub fn encode_header(shard: u32, seq: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..4].copy_from_slice(&SEGMENT_MAGIC);
    h[4..6].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    h[8..12].copy_from_slice(&shard.to_le_bytes());
    h[16..24].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

pub fn check_header(bytes: &[u8], shard: u32, seq: u64) -> Result<(), SegmentError> {
    if bytes.len() < SEGMENT_HEADER_LEN {
        return Err(SegmentError::Short);
    }
    if bytes[0..4] != SEGMENT_MAGIC {
        return Err(SegmentError::Magic);
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != SEGMENT_VERSION {
        return Err(SegmentError::Version(version));
    }
    let crc = u32::from_le_bytes([bytes[24], bytes[25], bytes[26], bytes[27]]);
    if crc != crc32c::crc32c(&bytes[0..24]) {
        return Err(SegmentError::Checksum);
    }
    let found_shard = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if found_shard != shard {
        return Err(SegmentError::Shard {
            expected: shard,
            found: found_shard,
        });
    }
    let mut s = [0u8; 8];
    s.copy_from_slice(&bytes[16..24]);
    let found_seq = u64::from_le_bytes(s);
    if found_seq != seq {
        return Err(SegmentError::Seq {
            expected: seq,
            found: found_seq,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_name(&file_name(42)), Some(42));
        assert_eq!(parse_name("00000000000000000042.tmp"), None);
        assert_eq!(parse_name("42.seg"), None);
    }

    #[test]
    fn header_checks() {
        let h = encode_header(3, 7);
        assert_eq!(check_header(&h, 3, 7), Ok(()));
        assert_eq!(
            check_header(&h, 2, 7),
            Err(SegmentError::Shard {
                expected: 2,
                found: 3
            })
        );
        assert_eq!(
            check_header(&h, 3, 8),
            Err(SegmentError::Seq {
                expected: 8,
                found: 7
            })
        );
        let mut bad = h;
        bad[17] ^= 1;
        assert_eq!(check_header(&bad, 3, 7), Err(SegmentError::Checksum));
        assert_eq!(check_header(&h[..10], 3, 7), Err(SegmentError::Short));
    }
}
