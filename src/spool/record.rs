//! Spool records: the framing on disk and the payloads inside it.
//!
//! Every record is 16-byte aligned in its segment and framed as (little-endian):
//!
//! ```text
//!  0  magic    u32  "EPXR"
//!  4  version  u8   RECORD_VERSION (3 is still read)
//!  5  kind     u8   1 = message, 2 = outcome
//!  6  reserved u16  zero
//!  8  len      u32  payload length in bytes
//! 12  crc      u32  CRC-32C of bytes 0..12 followed by the payload
//! 16  payload  zero-padded to 16 bytes
//! ```
//!
//! A version 4 message payload is the message id, then the envelope as an rkyv archive, then the
//! body as raw bytes (so encoding copies the body once, into the batch, and an envelope can be
//! read without deserialising anything):
//!
//! ```text
//!  0  id       u64
//!  8  env_len  u32  length of the envelope archive
//! 12  notices  u8   the envelope's notice switches (`NoticeSwitches::to_byte`; 0 in records
//!                   written before them: every notice allowed)
//! 13  priority u8   the priority class (`Priority::to_byte`: 1 transactional, 2 normal,
//!                   3 bulk; 0 in records written before classes: normal)
//! 14  reserved 2    zero
//! 16  envelope rkyv archive of `envelope::Envelope` (16-byte aligned)
//! 16+env_len  body
//! ```
//!
//! Builds before a prefix byte was given a meaning never read it, so they read records that
//! have it (and ignore it). The campaign is not in the prefix: it is a header of the body,
//! which recovery reads again (see `queue::replay`).
//!
//! An outcome payload is the rkyv archive of [`OutcomeRecord`]. Version 3 records (envelope and
//! body in one archive, DSN values as bits) are read and converted; they are never written.
//! Invariant: a record that passes [`decode`] has a valid header and checksum; a message or
//! outcome view that passes [`MessageView::new`] / [`access_outcome`] has a valid archive.

use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Serialize};

use crate::envelope::{
    ArchivedEnvelope, Body, Envelope, NoticeSwitches, Notify, Priority, ReceptionId, Recipient, Ret,
};

pub const RECORD_MAGIC: [u8; 4] = *b"EPXR";
/// 2: message records carry `flags`. Version 1 and 2 records are from before the first
/// release and are not read.
/// 3: message records carry the DSN envelope (RFC 3461).
/// 4: message records are id + typed envelope archive + raw body; outcomes carry a typed kind.
pub const RECORD_VERSION: u8 = 4;
/// The oldest version still read (and converted).
pub const RECORD_VERSION_MIN: u8 = 3;
/// Bytes before the envelope archive in a version 4 message payload.
pub const MESSAGE_PREFIX_LEN: usize = 16;
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

/// What became of one recipient of a message. The last outcome for a recipient wins.
#[derive(Archive, Serialize, Debug, Clone, Copy, PartialEq)]
pub struct OutcomeRecord {
    pub message: u64,
    pub rcpt: u32,
    pub kind: OutcomeKind,
    pub attempts: u32,
    pub at_ms: u64,
    /// For `Deferred`: when the next attempt is due (0: at once).
    pub next_attempt_ms: u64,
}

#[derive(Archive, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug))]
#[repr(u8)]
pub enum OutcomeKind {
    Delivered = 1,
    Deferred = 2,
    Bounced = 3,
    Expired = 4,
    /// Deferred, and its delay notice is spooled (RFC 3464 `Action: delayed`): pending like
    /// `Deferred` in every way, but no second delay notice follows, after a restart too. A
    /// build from before this kind reads such a record as corrupt and skips it (the recipient
    /// is then as its previous record says: retried, never lost).
    Delayed = 5,
}

impl OutcomeKind {
    pub fn from_u8(b: u8) -> Option<OutcomeKind> {
        match b {
            1 => Some(OutcomeKind::Delivered),
            2 => Some(OutcomeKind::Deferred),
            3 => Some(OutcomeKind::Bounced),
            4 => Some(OutcomeKind::Expired),
            5 => Some(OutcomeKind::Delayed),
            _ => None,
        }
    }

    pub fn is_final(self) -> bool {
        !matches!(self, OutcomeKind::Deferred | OutcomeKind::Delayed)
    }
}

impl ArchivedOutcomeKind {
    pub fn to_native(&self) -> OutcomeKind {
        match self {
            ArchivedOutcomeKind::Delivered => OutcomeKind::Delivered,
            ArchivedOutcomeKind::Deferred => OutcomeKind::Deferred,
            ArchivedOutcomeKind::Bounced => OutcomeKind::Bounced,
            ArchivedOutcomeKind::Expired => OutcomeKind::Expired,
            ArchivedOutcomeKind::Delayed => OutcomeKind::Delayed,
        }
    }
}

/// An outcome as read back, whatever its version.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Outcome {
    pub message: u64,
    pub rcpt: u32,
    /// None: a kind this build does not know (counted as corrupt by recovery).
    pub kind: Option<OutcomeKind>,
    pub attempts: u32,
    pub at_ms: u64,
    pub next_attempt_ms: u64,
}

/// Version 3 records, kept to read spools written before version 4.
pub mod v3 {
    use rkyv::{Archive, Serialize};

    #[derive(Archive, Serialize, Debug, Clone, PartialEq)]
    #[rkyv(derive(Debug))]
    pub struct MessageRecord {
        pub id: u64,
        pub reception_id: String,
        pub received_ms: u64,
        pub mail_from: String,
        pub rcpts: Vec<String>,
        pub peer: String,
        /// SMTPUTF8 1, 8BITMIME 2, BINARYMIME 4.
        pub flags: u8,
        /// 0 not given, 1 FULL, 2 HDRS.
        pub dsn_ret: u8,
        pub dsn_envid: String,
        /// Given 8, delay 4, failure 2, success 1.
        pub dsn_notify: Vec<u8>,
        pub dsn_orcpt: Vec<String>,
        pub body: Vec<u8>,
    }

    #[derive(Archive, Serialize, Debug, Clone, Copy, PartialEq)]
    #[rkyv(derive(Debug))]
    pub struct OutcomeRecord {
        pub message: u64,
        pub rcpt: u32,
        pub kind: u8,
        pub attempts: u32,
        pub at_ms: u64,
        pub next_attempt_ms: u64,
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

/// Frame the payload that occupies `buf[start + RECORD_HEADER_LEN..]`: fill in the header
/// before it and pad to the alignment. Returns the framed length.
fn frame(buf: &mut Vec<u8>, start: usize, kind: RecordKind) -> Result<usize, RecordError> {
    let payload_len = buf.len() - start - RECORD_HEADER_LEN;
    if payload_len > RECORD_PAYLOAD_MAX {
        buf.truncate(start);
        return Err(RecordError::Length(payload_len));
    }
    let header = &mut buf[start..start + RECORD_HEADER_LEN];
    header[0..4].copy_from_slice(&RECORD_MAGIC);
    header[4] = RECORD_VERSION;
    header[5] = kind as u8;
    header[6..8].copy_from_slice(&[0, 0]);
    header[8..12].copy_from_slice(&(payload_len as u32).to_le_bytes());
    let crc = crc32c::crc32c(&buf[start..start + 12]);
    let crc = crc32c::crc32c_append(crc, &buf[start + RECORD_HEADER_LEN..]);
    buf[start + 12..start + 16].copy_from_slice(&crc.to_le_bytes());
    let end = align_up(buf.len());
    buf.resize(end, 0);
    // Assert the invariant on the way to disk: what we framed decodes.
    debug_assert!(decode(&buf[start..]).is_ok());
    Ok(end - start)
}

/// Append `value` as an rkyv archive at the end of `buf` (whose length must be aligned).
fn archive_into<T>(buf: &mut Vec<u8>, value: &T) -> Result<(), RecordError>
where
    T: for<'a> Serialize<
        rkyv::api::high::HighSerializer<
            Vec<u8>,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rancor::Error,
        >,
    >,
{
    let taken = std::mem::take(buf);
    *buf = rkyv::api::high::to_bytes_in::<_, rancor::Error>(value, taken)
        .map_err(|e| RecordError::Serialize(e.to_string()))?;
    Ok(())
}

/// Append a framed outcome record to `buf`, whose length must be a multiple of the record
/// alignment. Returns the record's offset in `buf` and its framed length. No I/O.
pub fn encode_outcome(
    buf: &mut Vec<u8>,
    rec: &OutcomeRecord,
) -> Result<(usize, usize), RecordError> {
    debug_assert_eq!(buf.len() % RECORD_ALIGN, 0, "records start aligned");
    let start = buf.len();
    buf.extend_from_slice(&[0u8; RECORD_HEADER_LEN]);
    if let Err(e) = archive_into(buf, rec) {
        buf.truncate(start);
        return Err(e);
    }
    Ok((start, frame(buf, start, RecordKind::Outcome)?))
}

/// Append a framed message record (id, envelope, body) to `buf`, whose length must be a
/// multiple of the record alignment. The body comes in pieces (our headers, then the message as
/// received) and is copied once, into `buf`. Returns the record's offset in `buf` and its
/// framed length. No I/O.
pub fn encode_message(
    buf: &mut Vec<u8>,
    id: u64,
    envelope: &Envelope,
    body: &[&[u8]],
) -> Result<(usize, usize), RecordError> {
    debug_assert_eq!(buf.len() % RECORD_ALIGN, 0, "records start aligned");
    let start = buf.len();
    buf.extend_from_slice(&[0u8; RECORD_HEADER_LEN + MESSAGE_PREFIX_LEN]);
    let env_start = buf.len();
    if let Err(e) = archive_into(buf, envelope) {
        buf.truncate(start);
        return Err(e);
    }
    let env_len = buf.len() - env_start;
    let prefix = start + RECORD_HEADER_LEN;
    buf[prefix..prefix + 8].copy_from_slice(&id.to_le_bytes());
    buf[prefix + 8..prefix + 12].copy_from_slice(&(env_len as u32).to_le_bytes());
    buf[prefix + 12] = envelope.notices.to_byte();
    buf[prefix + 13] = envelope.priority.to_byte();
    for part in body {
        buf.extend_from_slice(part);
    }
    Ok((start, frame(buf, start, RecordKind::Message)?))
}

/// A checked record header: version, kind and payload length.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Header {
    pub version: u8,
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
    let version = bytes[4];
    if !(RECORD_VERSION_MIN..=RECORD_VERSION).contains(&version) {
        return Err(RecordError::Version(version));
    }
    let kind = RecordKind::from_u8(bytes[5]).ok_or(RecordError::Kind(bytes[5]))?;
    let payload_len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    if payload_len > RECORD_PAYLOAD_MAX {
        return Err(RecordError::Length(payload_len));
    }
    Ok(Header {
        version,
        kind,
        payload_len,
    })
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

/// A message record viewed in place: its id, envelope and body, whatever its version.
#[derive(Clone, Copy, Debug)]
pub enum MessageView<'a> {
    V4 {
        id: u64,
        envelope: &'a ArchivedEnvelope,
        /// From the prefix (the archive skips the field).
        notices: NoticeSwitches,
        /// From the prefix too.
        priority: Priority,
        body: &'a [u8],
    },
    V3(&'a v3::ArchivedMessageRecord),
}

impl<'a> MessageView<'a> {
    /// Check and view a message payload of `version`. `payload` must be 16-byte aligned (it is
    /// when the record was read into an [`AlignedVec`] at an aligned offset). No allocation.
    pub fn new(version: u8, payload: &'a [u8]) -> Result<MessageView<'a>, RecordError> {
        if version == 3 {
            return rkyv::access::<v3::ArchivedMessageRecord, rancor::Error>(payload)
                .map(MessageView::V3)
                .map_err(|e| RecordError::Archive(e.to_string()));
        }
        if payload.len() < MESSAGE_PREFIX_LEN {
            return Err(RecordError::Archive("message payload too short".into()));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&payload[0..8]);
        let env_len = u32::from_le_bytes([payload[8], payload[9], payload[10], payload[11]]);
        let env_end = MESSAGE_PREFIX_LEN
            .checked_add(env_len as usize)
            .filter(|&end| end <= payload.len())
            .ok_or_else(|| RecordError::Archive(format!("envelope length {env_len}")))?;
        let envelope =
            rkyv::access::<ArchivedEnvelope, rancor::Error>(&payload[MESSAGE_PREFIX_LEN..env_end])
                .map_err(|e| RecordError::Archive(e.to_string()))?;
        Ok(MessageView::V4 {
            id: u64::from_le_bytes(id),
            envelope,
            notices: NoticeSwitches::from_byte(payload[12]),
            priority: Priority::from_byte(payload[13]),
            body: &payload[env_end..],
        })
    }

    pub fn id(&self) -> u64 {
        match self {
            MessageView::V4 { id, .. } => *id,
            MessageView::V3(m) => m.id.to_native(),
        }
    }

    pub fn body(&self) -> &'a [u8] {
        match self {
            MessageView::V4 { body, .. } => body,
            MessageView::V3(m) => m.body.as_slice(),
        }
    }

    /// The priority class (Normal for records from before classes).
    pub fn priority(&self) -> Priority {
        match self {
            MessageView::V4 { priority, .. } => *priority,
            MessageView::V3(_) => Priority::Normal,
        }
    }

    /// The notice switches the listener gave (every notice for records from before them).
    pub fn notices(&self) -> NoticeSwitches {
        match self {
            MessageView::V4 { notices, .. } => *notices,
            MessageView::V3(_) => NoticeSwitches::ALL,
        }
    }

    pub fn rcpt_count(&self) -> usize {
        match self {
            MessageView::V4 { envelope, .. } => envelope.rcpts.len(),
            MessageView::V3(m) => m.rcpts.len(),
        }
    }

    /// The owned envelope (allocates: for recovery and notices, not per delivery). Its
    /// campaign is None: the header it comes from is the configuration's to name (see
    /// `queue::replay`).
    pub fn envelope(&self) -> Result<Envelope, RecordError> {
        match self {
            MessageView::V4 {
                envelope,
                notices,
                priority,
                ..
            } => envelope
                .to_owned_envelope()
                .map(|e| Envelope {
                    notices: *notices,
                    priority: *priority,
                    ..e
                })
                .map_err(|e| RecordError::Archive(e.to_string())),
            MessageView::V3(m) => Ok(envelope_of_v3(m)),
        }
    }
}

/// A version 3 record's envelope in today's types.
fn envelope_of_v3(m: &v3::ArchivedMessageRecord) -> Envelope {
    let flags = m.flags;
    let received_ms = m.received_ms.to_native();
    let reception = ReceptionId::parse(m.reception_id.as_str()).unwrap_or(ReceptionId {
        ms: received_ms,
        shard: 0,
        n: m.id.to_native(),
    });
    let rcpts = m
        .rcpts
        .iter()
        .enumerate()
        .map(|(i, address)| Recipient {
            address: address.as_str().to_owned(),
            notify: Notify::from_bits(m.dsn_notify.get(i).copied().unwrap_or(0)),
            orcpt: m
                .dsn_orcpt
                .get(i)
                .map(|o| o.as_str())
                .filter(|o| !o.is_empty())
                .map(str::to_owned),
        })
        .collect();
    Envelope {
        // The v3 id was printed from the same clock reading as received_ms.
        reception: ReceptionId {
            ms: received_ms,
            ..reception
        },
        sender: m.mail_from.as_str().to_owned(),
        rcpts,
        ret: match m.dsn_ret {
            1 => Ret::Full,
            2 => Ret::Headers,
            _ => Ret::Unspecified,
        },
        envid: Some(m.dsn_envid.as_str())
            .filter(|e| !e.is_empty())
            .map(str::to_owned),
        // The tenant header was read from the body at run time then; pool rules by tenant do not
        // apply to mail queued by a version 3 build.
        tenant: None,
        smtputf8: flags & 1 != 0,
        body: if flags & 4 != 0 {
            Body::BinaryMime
        } else if flags & 2 != 0 {
            Body::EightBitMime
        } else {
            Body::SevenBit
        },
        size: m.body.len() as u64,
        peer: m.peer.as_str().to_owned(),
        notices: NoticeSwitches::ALL,
        priority: Priority::Normal,
        campaign: None,
    }
}

/// Check and read an outcome payload of `version`. No allocation.
pub fn access_outcome(version: u8, payload: &[u8]) -> Result<Outcome, RecordError> {
    if version == 3 {
        let o = rkyv::access::<v3::ArchivedOutcomeRecord, rancor::Error>(payload)
            .map_err(|e| RecordError::Archive(e.to_string()))?;
        return Ok(Outcome {
            message: o.message.to_native(),
            rcpt: o.rcpt.to_native(),
            kind: OutcomeKind::from_u8(o.kind),
            attempts: o.attempts.to_native(),
            at_ms: o.at_ms.to_native(),
            next_attempt_ms: o.next_attempt_ms.to_native(),
        });
    }
    let o = rkyv::access::<ArchivedOutcomeRecord, rancor::Error>(payload)
        .map_err(|e| RecordError::Archive(e.to_string()))?;
    Ok(Outcome {
        message: o.message.to_native(),
        rcpt: o.rcpt.to_native(),
        kind: Some(o.kind.to_native()),
        attempts: o.attempts.to_native(),
        at_ms: o.at_ms.to_native(),
        next_attempt_ms: o.next_attempt_ms.to_native(),
    })
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
pub(crate) mod tests {
    use super::*;

    pub(crate) fn envelope(id: u64, rcpts: usize) -> Envelope {
        Envelope {
            reception: ReceptionId {
                ms: 1_700_000_000_000 + id,
                shard: 0,
                n: id,
            },
            sender: "a@b.test".into(),
            rcpts: (0..rcpts)
                .map(|r| Recipient {
                    address: format!("u{r}@d{r}.test"),
                    notify: if r == 1 {
                        Notify::On {
                            success: true,
                            failure: false,
                            delay: false,
                        }
                    } else {
                        Notify::Default
                    },
                    orcpt: (r == 1).then(|| format!("rfc822;u{r}@d{r}.test")),
                })
                .collect(),
            ret: Ret::Full,
            envid: Some("env".into()),
            tenant: None,
            smtputf8: false,
            body: Body::EightBitMime,
            size: 0,
            peer: "127.0.0.1:5000".into(),
            notices: NoticeSwitches {
                delay: false,
                ..NoticeSwitches::ALL
            },
            priority: Priority::Bulk,
            campaign: None,
        }
    }

    fn outcome(id: u64) -> OutcomeRecord {
        OutcomeRecord {
            message: id,
            rcpt: 1,
            kind: OutcomeKind::Deferred,
            attempts: 3,
            at_ms: 5,
            next_attempt_ms: 9,
        }
    }

    fn encode_all() -> Vec<u8> {
        let mut buf = Vec::new();
        encode_message(&mut buf, 1, &envelope(1, 2), &[b"hel", b"lo\r\n"]).expect("encode");
        encode_outcome(&mut buf, &outcome(1)).expect("encode");
        encode_message(&mut buf, 2, &envelope(2, 2), &[&[7u8; 3000]]).expect("encode");
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
        let m = MessageView::new(header.version, payload).expect("valid");
        assert_eq!(m.id(), 1);
        assert_eq!(m.body(), b"hello\r\n");
        assert_eq!(m.envelope().expect("envelope"), envelope(1, 2));
        assert_eq!(m.rcpt_count(), 2);
        let Scanned::Record {
            header, payload, ..
        } = &found[1]
        else {
            panic!("{found:?}")
        };
        let o = access_outcome(header.version, payload).expect("valid");
        assert_eq!(
            (o.message, o.rcpt, o.attempts, o.kind),
            (1, 1, 3, Some(OutcomeKind::Deferred))
        );
        let Scanned::Record {
            header, payload, ..
        } = &found[2]
        else {
            panic!("{found:?}")
        };
        let m = MessageView::new(header.version, payload).expect("valid");
        assert_eq!(m.body().len(), 3000);
    }

    /// Frame `value` as a version 3 record, as a build before version 4 wrote it.
    fn encode_v3<T>(buf: &mut Vec<u8>, kind: RecordKind, value: &T)
    where
        T: for<'a> Serialize<
            rkyv::api::high::HighSerializer<
                Vec<u8>,
                rkyv::ser::allocator::ArenaHandle<'a>,
                rancor::Error,
            >,
        >,
    {
        let start = buf.len();
        buf.extend_from_slice(&[0u8; RECORD_HEADER_LEN]);
        archive_into(buf, value).expect("archive");
        frame(buf, start, kind).expect("frame");
        buf[start + 4] = 3;
        let crc = crc32c::crc32c(&buf[start..start + 12]);
        let len = u32::from_le_bytes([
            buf[start + 8],
            buf[start + 9],
            buf[start + 10],
            buf[start + 11],
        ]) as usize;
        let crc = crc32c::crc32c_append(
            crc,
            &buf[start + RECORD_HEADER_LEN..start + RECORD_HEADER_LEN + len],
        );
        buf[start + 12..start + 16].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn version_3_records_are_read_and_converted() {
        let mut buf = Vec::new();
        let old = v3::MessageRecord {
            id: 7,
            reception_id: "18c00000001.1.2a".into(),
            received_ms: 0x18c_0000_0001,
            mail_from: "s@x.test".into(),
            rcpts: vec!["a@a.test".into(), "b@b.test".into()],
            peer: "127.0.0.1:9".into(),
            flags: 1 | 2,
            dsn_ret: 2,
            dsn_envid: String::new(),
            dsn_notify: vec![0, 8 | 1 | 2],
            dsn_orcpt: vec![String::new(), "rfc822;b@b.test".into()],
            body: b"Subject: old\r\n\r\nbody\r\n".to_vec(),
        };
        encode_v3(&mut buf, RecordKind::Message, &old);
        let out = v3::OutcomeRecord {
            message: 7,
            rcpt: 1,
            kind: 3,
            attempts: 2,
            at_ms: 10,
            next_attempt_ms: 0,
        };
        encode_v3(&mut buf, RecordKind::Outcome, &out);
        let buf = aligned_copy(&buf);
        let found: Vec<_> = scan(&buf).collect();
        let Scanned::Record {
            header, payload, ..
        } = &found[0]
        else {
            panic!("{found:?}")
        };
        assert_eq!(header.version, 3);
        let m = MessageView::new(header.version, payload).expect("v3 message");
        assert_eq!((m.id(), m.body()), (7, old.body.as_slice()));
        let env = m.envelope().expect("envelope");
        assert_eq!(env.reception.to_string(), "18c00000001.1.2a");
        assert_eq!(env.sender, "s@x.test");
        assert_eq!(
            (env.smtputf8, env.body, env.ret),
            (true, Body::EightBitMime, Ret::Headers)
        );
        assert_eq!(env.envid, None);
        assert_eq!(env.rcpts[0].notify, Notify::Default);
        assert_eq!(
            env.rcpts[1].notify,
            Notify::On {
                success: true,
                failure: true,
                delay: false
            }
        );
        assert_eq!(env.rcpts[1].orcpt.as_deref(), Some("rfc822;b@b.test"));
        let Scanned::Record {
            header, payload, ..
        } = &found[1]
        else {
            panic!("{found:?}")
        };
        let o = access_outcome(header.version, payload).expect("v3 outcome");
        assert_eq!((o.message, o.kind), (7, Some(OutcomeKind::Bounced)));
    }

    #[test]
    fn the_priority_rides_in_the_prefix_and_a_record_without_one_is_normal() {
        for priority in Priority::ALL {
            let mut env = envelope(1, 1);
            env.priority = priority;
            let mut buf = Vec::new();
            encode_message(&mut buf, 1, &env, &[b"x"]).expect("encode");
            let buf = aligned_copy(&buf);
            let (header, payload) = decode(&buf).expect("frame");
            let m = MessageView::new(header.version, payload).expect("valid");
            assert_eq!(m.priority(), priority);
            assert_eq!(m.envelope().expect("envelope").priority, priority);
            assert_eq!(m.envelope().expect("envelope").campaign, None);
        }
        // As a build from before classes wrote it: byte 13 of the prefix reserved, zero.
        let mut buf = Vec::new();
        encode_message(&mut buf, 1, &envelope(1, 1), &[b"x"]).expect("encode");
        buf[RECORD_HEADER_LEN + 13] = 0;
        let len = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
        let crc = crc32c::crc32c(&buf[0..12]);
        let crc = crc32c::crc32c_append(crc, &buf[RECORD_HEADER_LEN..RECORD_HEADER_LEN + len]);
        buf[12..16].copy_from_slice(&crc.to_le_bytes());
        let buf = aligned_copy(&buf);
        let (header, payload) = decode(&buf).expect("frame");
        let m = MessageView::new(header.version, payload).expect("valid");
        assert_eq!(m.priority(), Priority::Normal);
        let env = m.envelope().expect("envelope");
        assert_eq!(
            (env.priority, env.notices, env.sender.as_str()),
            (Priority::Normal, envelope(1, 1).notices, "a@b.test")
        );
    }

    #[test]
    fn a_lying_envelope_length_is_an_error_not_a_panic() {
        let mut buf = Vec::new();
        encode_message(&mut buf, 1, &envelope(1, 1), &[b"x"]).expect("encode");
        let buf = aligned_copy(&buf);
        let (header, payload) = decode(&buf).expect("frame");
        let mut bad = aligned_copy(payload);
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(MessageView::new(header.version, &bad).is_err());
        bad[8..12].copy_from_slice(&3u32.to_le_bytes());
        assert!(MessageView::new(header.version, &bad).is_err());
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
