//! Spool records: the framing on disk and the rkyv payloads inside it.
//!
//! Every record is 16-byte aligned in its segment and framed as (little-endian):
//!
//! ```text
//!  0  magic    u32  "EPXR"
//!  4  version  u8   RECORD_VERSION
//!  5  kind     u8   1 = message, 2 = outcome
//!  6  reserved u16  zero
//!  8  len      u32  payload length in bytes
//! 12  crc      u32  CRC-32C of bytes 0..12 followed by the payload
//! 16  payload  rkyv archive of MessageRecord or OutcomeRecord, zero-padded to 16 bytes
//! ```
//!
//! The header is 16 bytes, so a payload starts 16-byte aligned in the file; read into a 16-byte
//! aligned buffer it can be accessed in place with rkyv, no copy into owned structs.
//! Invariant: a record that passes [`decode`] has a valid header, checksum and archive.

use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Serialize};

pub const RECORD_MAGIC: [u8; 4] = *b"EPXR";
/// 2: message records carry `flags`. Version 1 segments are from before the first release and
/// are not read.
/// 3: message records carry the DSN envelope (RFC 3461).
pub const RECORD_VERSION: u8 = 3;
pub const RECORD_HEADER_LEN: usize = 16;
/// Records start on this boundary; it is rkyv's alignment for the archived types.
pub const RECORD_ALIGN: usize = 16;
/// Largest payload: the biggest message we could accept (server.size_max is capped well below
/// this at validation) plus envelope. Anything longer in a header is corruption.
pub const RECORD_PAYLOAD_MAX: usize = 1 << 30;

const _: () = assert!(RECORD_HEADER_LEN.is_multiple_of(RECORD_ALIGN));

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    Message = 1,
    Outcome = 2,
}

impl RecordKind {
    fn from_u8(b: u8) -> Option<RecordKind> {
        match b {
            1 => Some(RecordKind::Message),
            2 => Some(RecordKind::Outcome),
            _ => None,
        }
    }
}

/// A message copy as this shard spooled it: the envelope for its own recipients and the body.
#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
pub struct MessageRecord {
    /// Shard-local id, unique for the life of the spool (recovered as max + 1).
    pub id: u64,
    /// The id given to the client in the 250 reply; shared by all shards' copies.
    pub reception_id: String,
    pub received_ms: u64,
    pub mail_from: String,
    /// Only the recipients whose domains this shard owns.
    pub rcpts: Vec<String>,
    /// Client address, for the log.
    pub peer: String,
    /// What the message needs from the next hop: [`FLAG_SMTPUTF8`], [`FLAG_8BITMIME`],
    /// [`FLAG_BINARYMIME`].
    pub flags: u8,
    /// DSN RET: 0 not given, 1 FULL, 2 HDRS.
    pub dsn_ret: u8,
    /// DSN ENVID, or empty.
    pub dsn_envid: String,
    /// DSN NOTIFY per recipient (same order as `rcpts`): see [`NOTIFY_GIVEN`] and friends.
    pub dsn_notify: Vec<u8>,
    /// DSN ORCPT per recipient, `type;address`, or empty.
    pub dsn_orcpt: Vec<String>,
    /// The message as received: CRLF lines, dot-unstuffed, no final dot.
    pub body: Vec<u8>,
}

/// The message was received with SMTPUTF8: it must go out with SMTPUTF8 too.
pub const FLAG_SMTPUTF8: u8 = 1;
/// The message was declared BODY=8BITMIME.
pub const FLAG_8BITMIME: u8 = 2;
/// The message was declared BODY=BINARYMIME (RFC 3030): it may only go out with BDAT and
/// BODY=BINARYMIME. A new bit in the same field, so records keep their format version; a build
/// from before it would read such a message as plain text.
pub const FLAG_BINARYMIME: u8 = 4;

/// NOTIFY bits. Without [`NOTIFY_GIVEN`] the default applies: notices of failure only.
pub const NOTIFY_SUCCESS: u8 = 1;
pub const NOTIFY_FAILURE: u8 = 2;
pub const NOTIFY_DELAY: u8 = 4;
/// NOTIFY was given (alone: NOTIFY=NEVER).
pub const NOTIFY_GIVEN: u8 = 8;

/// Whether a recipient with these NOTIFY bits wants a notice of failure.
pub fn notify_failure(bits: u8) -> bool {
    bits & NOTIFY_GIVEN == 0 || bits & NOTIFY_FAILURE != 0
}

/// Whether a recipient with these NOTIFY bits wants a notice of successful delivery.
pub fn notify_success(bits: u8) -> bool {
    bits & NOTIFY_GIVEN != 0 && bits & NOTIFY_SUCCESS != 0
}

/// What became of one recipient of a message. The last outcome for a recipient wins.
#[derive(Archive, Serialize, Debug, Clone, Copy, PartialEq)]
pub struct OutcomeRecord {
    pub message: u64,
    pub rcpt: u32,
    pub kind: u8,
    pub attempts: u32,
    pub at_ms: u64,
    /// For `Deferred`: when the next attempt is due.
    pub next_attempt_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum OutcomeKind {
    Delivered = 1,
    Deferred = 2,
    Bounced = 3,
    Expired = 4,
}

impl OutcomeKind {
    pub fn from_u8(b: u8) -> Option<OutcomeKind> {
        match b {
            1 => Some(OutcomeKind::Delivered),
            2 => Some(OutcomeKind::Deferred),
            3 => Some(OutcomeKind::Bounced),
            4 => Some(OutcomeKind::Expired),
            _ => None,
        }
    }

    pub fn is_final(self) -> bool {
        !matches!(self, OutcomeKind::Deferred)
    }
}

#[derive(Clone, Debug, thiserror::Error, PartialEq)]
pub enum RecordError {
    #[error("bad magic")]
    Magic,
    #[error("unsupported record version {0}")]
    Version(u8),
    #[error("unknown record kind {0}")]
    Kind(u8),
    #[error("payload length {0} out of range")]
    Length(usize),
    #[error("record runs past the end of the data (torn write)")]
    Truncated,
    #[error("checksum mismatch")]
    Checksum,
    #[error("archive does not validate: {0}")]
    Archive(String),
    #[error("cannot serialize record: {0}")]
    Serialize(String),
}

/// Round `n` up to the record alignment.
pub const fn align_up(n: usize) -> usize {
    (n + RECORD_ALIGN - 1) & !(RECORD_ALIGN - 1)
}

/// Append a framed record to `buf`, whose length must be a multiple of the record alignment so
/// the payload lands aligned. Returns the record's offset in `buf` and its framed length.
pub fn encode<T>(
    buf: &mut Vec<u8>,
    kind: RecordKind,
    value: &T,
) -> Result<(usize, usize), RecordError>
where
    T: for<'a> Serialize<
        rkyv::api::high::HighSerializer<
            Vec<u8>,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rancor::Error,
        >,
    >,
{
    debug_assert_eq!(buf.len() % RECORD_ALIGN, 0, "records start aligned");
    let start = buf.len();
    buf.extend_from_slice(&[0u8; RECORD_HEADER_LEN]);
    let taken = std::mem::take(buf);
    *buf = rkyv::api::high::to_bytes_in::<_, rancor::Error>(value, taken)
        .map_err(|e| RecordError::Serialize(e.to_string()))?;
    let payload_len = buf.len() - start - RECORD_HEADER_LEN;
    if payload_len > RECORD_PAYLOAD_MAX {
        buf.truncate(start);
        return Err(RecordError::Length(payload_len));
    }
    let header = &mut buf[start..start + RECORD_HEADER_LEN];
    header[0..4].copy_from_slice(&RECORD_MAGIC);
    header[4] = RECORD_VERSION;
    header[5] = kind as u8;
    header[8..12].copy_from_slice(&(payload_len as u32).to_le_bytes());
    let crc = crc32c::crc32c(&buf[start..start + 12]);
    let crc = crc32c::crc32c_append(crc, &buf[start + RECORD_HEADER_LEN..]);
    buf[start + 12..start + 16].copy_from_slice(&crc.to_le_bytes());
    let end = align_up(buf.len());
    buf.resize(end, 0);
    let framed = end - start;
    // Assert the invariant on the way to disk: what we framed decodes.
    debug_assert!(decode_header(&buf[start..]).is_ok());
    Ok((start, framed))
}

/// A checked record header: kind and payload length.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Header {
    pub kind: RecordKind,
    pub payload_len: usize,
}

impl Header {
    /// Total bytes the record occupies, header and padding included.
    pub fn framed_len(&self) -> usize {
        align_up(RECORD_HEADER_LEN + self.payload_len)
    }
}

/// Check the fixed part of a header (not the checksum). No I/O, no allocation.
pub fn decode_header(bytes: &[u8]) -> Result<Header, RecordError> {
    if bytes.len() < RECORD_HEADER_LEN {
        return Err(RecordError::Truncated);
    }
    if bytes[0..4] != RECORD_MAGIC {
        return Err(RecordError::Magic);
    }
    if bytes[4] != RECORD_VERSION {
        return Err(RecordError::Version(bytes[4]));
    }
    let kind = RecordKind::from_u8(bytes[5]).ok_or(RecordError::Kind(bytes[5]))?;
    let payload_len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    if payload_len > RECORD_PAYLOAD_MAX {
        return Err(RecordError::Length(payload_len));
    }
    Ok(Header { kind, payload_len })
}

/// Check header and checksum of the record at the start of `bytes`; returns the header and the
/// payload slice. No I/O, no allocation.
pub fn decode(bytes: &[u8]) -> Result<(Header, &[u8]), RecordError> {
    let header = decode_header(bytes)?;
    let end = RECORD_HEADER_LEN + header.payload_len;
    if bytes.len() < end {
        return Err(RecordError::Truncated);
    }
    let stored = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    let crc = crc32c::crc32c(&bytes[0..12]);
    let crc = crc32c::crc32c_append(crc, &bytes[RECORD_HEADER_LEN..end]);
    if crc != stored {
        return Err(RecordError::Checksum);
    }
    Ok((header, &bytes[RECORD_HEADER_LEN..end]))
}

/// View a message payload in place. `payload` must be 16-byte aligned (it is when the record
/// was read into an [`AlignedVec`] at an aligned offset).
pub fn access_message(payload: &[u8]) -> Result<&ArchivedMessageRecord, RecordError> {
    rkyv::access::<ArchivedMessageRecord, rancor::Error>(payload)
        .map_err(|e| RecordError::Archive(e.to_string()))
}

pub fn access_outcome(payload: &[u8]) -> Result<&ArchivedOutcomeRecord, RecordError> {
    rkyv::access::<ArchivedOutcomeRecord, rancor::Error>(payload)
        .map_err(|e| RecordError::Archive(e.to_string()))
}

/// A record found by [`scan`].
#[derive(Debug)]
pub enum Scanned<'a> {
    Record {
        offset: usize,
        header: Header,
        payload: &'a [u8],
    },
    /// Bytes that are not a valid record (corrupt), skipped up to the next valid one.
    Corrupt {
        offset: usize,
        len: usize,
        error: RecordError,
    },
    /// An incomplete record at the end: a write that a crash cut short.
    TornTail { offset: usize, len: usize },
}

/// Walk the records in `bytes` (a segment body starting at an aligned offset). A bad record is
/// reported and skipped by searching forward, at record alignment, for the next record whose
/// header and checksum are valid, so one flipped byte costs one record, not the segment.
pub fn scan(bytes: &[u8]) -> impl Iterator<Item = Scanned<'_>> {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        if pos >= bytes.len() {
            return None;
        }
        // Zero padding at the end (e.g. preallocated space) is not a record and not corruption.
        if bytes[pos..].iter().all(|&b| b == 0) {
            pos = bytes.len();
            return None;
        }
        match decode(&bytes[pos..]) {
            Ok((header, payload)) => {
                let offset = pos;
                pos += header.framed_len();
                Some(Scanned::Record {
                    offset,
                    header,
                    payload,
                })
            }
            Err(error) => {
                let offset = pos;
                let mut next = pos + RECORD_ALIGN;
                while next < bytes.len() && decode(&bytes[next..]).is_err() {
                    next += RECORD_ALIGN;
                }
                pos = next.min(bytes.len());
                if pos >= bytes.len() && matches!(error, RecordError::Truncated) {
                    Some(Scanned::TornTail {
                        offset,
                        len: bytes.len() - offset,
                    })
                } else {
                    Some(Scanned::Corrupt {
                        offset,
                        len: pos - offset,
                        error,
                    })
                }
            }
        }
    })
}

/// Copy bytes into a 16-byte aligned buffer so rkyv can access them in place.
pub fn aligned_copy(bytes: &[u8]) -> AlignedVec {
    let mut v = AlignedVec::with_capacity(bytes.len());
    v.extend_from_slice(bytes);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: u64, body: &[u8]) -> MessageRecord {
        MessageRecord {
            id,
            reception_id: format!("r{id}"),
            received_ms: 1_700_000_000_000 + id,
            mail_from: "a@b.test".into(),
            rcpts: vec!["x@d0.test".into(), "y@d1.test".into()],
            peer: "127.0.0.1:5000".into(),
            flags: FLAG_8BITMIME,
            dsn_ret: 1,
            dsn_envid: "env".into(),
            dsn_notify: vec![0, NOTIFY_GIVEN | NOTIFY_SUCCESS],
            dsn_orcpt: vec![String::new(), "rfc822;y@d1.test".into()],
            body: body.to_vec(),
        }
    }

    fn outcome(id: u64) -> OutcomeRecord {
        OutcomeRecord {
            message: id,
            rcpt: 1,
            kind: OutcomeKind::Deferred as u8,
            attempts: 3,
            at_ms: 5,
            next_attempt_ms: 9,
        }
    }

    fn encode_all() -> Vec<u8> {
        let mut buf = Vec::new();
        encode(&mut buf, RecordKind::Message, &message(1, b"hello\r\n")).expect("encode");
        encode(&mut buf, RecordKind::Outcome, &outcome(1)).expect("encode");
        encode(&mut buf, RecordKind::Message, &message(2, &[7u8; 3000])).expect("encode");
        buf
    }

    #[test]
    fn records_round_trip_in_place() {
        let buf = aligned_copy(&encode_all());
        let found: Vec<_> = scan(&buf).collect();
        assert_eq!(found.len(), 3);
        let Scanned::Record {
            header, payload, ..
        } = &found[0]
        else {
            panic!("{found:?}")
        };
        assert_eq!(header.kind, RecordKind::Message);
        let m = access_message(payload).expect("valid");
        assert_eq!(m.id, 1);
        assert_eq!(m.body.as_slice(), b"hello\r\n");
        assert_eq!(m.rcpts[1].as_str(), "y@d1.test");
        let Scanned::Record { payload, .. } = &found[1] else {
            panic!("{found:?}")
        };
        let o = access_outcome(payload).expect("valid");
        assert_eq!(
            (
                o.message.to_native(),
                o.rcpt.to_native(),
                o.attempts.to_native()
            ),
            (1, 1, 3)
        );
        let Scanned::Record { payload, .. } = &found[2] else {
            panic!("{found:?}")
        };
        assert_eq!(access_message(payload).expect("valid").body.len(), 3000);
    }

    #[test]
    fn records_are_aligned() {
        let buf = encode_all();
        for s in scan(&buf) {
            let Scanned::Record { offset, .. } = s else {
                panic!("{s:?}")
            };
            assert_eq!(offset % RECORD_ALIGN, 0);
        }
    }

    #[test]
    fn torn_tail_is_detected_at_every_cut() {
        let full = encode_all();
        let (last_start, last_header) = match scan(&full).last() {
            Some(Scanned::Record { offset, header, .. }) => (offset, header),
            other => panic!("{other:?}"),
        };
        // A cut in the zero padding after a whole payload still leaves a whole record.
        let payload_end = last_start + RECORD_HEADER_LEN + last_header.payload_len;
        for cut in last_start + 1..payload_end {
            let buf = aligned_copy(&full[..cut]);
            let found: Vec<_> = scan(&buf).collect();
            let good = found
                .iter()
                .filter(|s| matches!(s, Scanned::Record { .. }))
                .count();
            assert_eq!(good, 2, "cut at {cut}: {found:?}");
            // Padding-only cuts (all zero tail) are not even reported.
            assert!(found.len() <= 3);
        }
    }

    #[test]
    fn flipped_byte_costs_one_record() {
        let full = encode_all();
        let offsets: Vec<usize> = scan(&full)
            .map(|s| match s {
                Scanned::Record { offset, .. } => offset,
                other => panic!("{other:?}"),
            })
            .collect();
        // Flip a byte in each record in turn (header, payload) and check the others survive.
        for (i, &start) in offsets.iter().enumerate() {
            for delta in [0usize, 5, 9, 13, 20] {
                let mut bad = full.clone();
                bad[start + delta] ^= 0x40;
                let bad = aligned_copy(&bad);
                let found: Vec<_> = scan(&bad).collect();
                let good: Vec<usize> = found
                    .iter()
                    .filter_map(|s| match s {
                        Scanned::Record { offset, .. } => Some(*offset),
                        _ => None,
                    })
                    .collect();
                let expect: Vec<usize> = offsets
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, o)| *o)
                    .collect();
                assert_eq!(good, expect, "flip in record {i} at +{delta}");
                assert!(found.iter().any(|s| !matches!(s, Scanned::Record { .. })));
            }
        }
    }

    #[test]
    fn header_checks() {
        let buf = encode_all();
        let mut v = buf.clone();
        v[4] = 9;
        assert_eq!(decode(&v).err(), Some(RecordError::Version(9)));
        let mut v = buf.clone();
        v[5] = 7;
        assert_eq!(decode(&v).err(), Some(RecordError::Kind(7)));
        assert_eq!(decode(&buf[..10]).err(), Some(RecordError::Truncated));
        let mut v = buf;
        v[0] = b'X';
        assert_eq!(decode(&v).err(), Some(RecordError::Magic));
    }
}
