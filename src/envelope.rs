//! The envelope: one type for a message's routing facts from reception to the queue.
//!
//! Reception builds it from the SMTP transaction (or a notice from its inputs), the spool writes
//! it as it is next to the body (see `spool::record`), and recovery rebuilds the queue from the
//! spooled envelopes alone, without reading a body. Every DSN parameter is a typed value here;
//! the on-disk form is the rkyv archive of these same types, but for the notice switches, which
//! ride in a byte of the record's prefix (see `spool::record`): that byte was reserved (zero)
//! in version 4 records, so records with switches stay readable by the builds before them and
//! old records read as "every notice allowed", which is what those builds did. The priority
//! class rides in the next reserved byte the same way (0: Normal). The campaign is not spooled
//! apart: it is a header of the spooled body, read again at recovery.

use std::fmt;

use rkyv::{Archive, Deserialize, Serialize};

/// The id a client is given in the `250` reply, carried by the Received header and every log
/// line: the receiving shard's clock and counter, `{ms:x}.{shard}.{n:x}` when printed. The
/// copies of a message split over shards share it.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug))]
pub struct ReceptionId {
    /// Unix time of reception, in milliseconds (the message's age counts from here).
    pub ms: u64,
    /// The shard that accepted the transaction.
    pub shard: u16,
    /// That shard's counter since it started.
    pub n: u64,
}

impl fmt::Display for ReceptionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}.{}.{:x}", self.ms, self.shard, self.n)
    }
}

impl ReceptionId {
    /// Parse the printed form back (records written before the typed id carried the text).
    pub fn parse(text: &str) -> Option<ReceptionId> {
        let mut parts = text.split('.');
        let ms = u64::from_str_radix(parts.next()?, 16).ok()?;
        let shard = parts.next()?.parse().ok()?;
        let n = u64::from_str_radix(parts.next()?, 16).ok()?;
        parts
            .next()
            .is_none()
            .then_some(ReceptionId { ms, shard, n })
    }
}

/// DSN RET (RFC 3461 §4.3): how much of the original a failure notice returns.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[rkyv(derive(Debug))]
#[repr(u8)]
pub enum Ret {
    /// Not given: the headers (our default, RFC 3461 leaves it to the MTA).
    #[default]
    Unspecified,
    Full,
    Headers,
}

/// DSN NOTIFY of one recipient (RFC 3461 §4.1).
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[rkyv(derive(Debug))]
#[repr(u8)]
pub enum Notify {
    /// Not given: notices of failure only (delay notices are the MTA's choice).
    #[default]
    Default,
    /// NOTIFY=NEVER.
    Never,
    /// NOTIFY= with these conditions.
    On {
        success: bool,
        failure: bool,
        delay: bool,
    },
}

impl Notify {
    /// Whether a failure (bounce or expiry) of this recipient calls for a notice.
    pub fn on_failure(self) -> bool {
        match self {
            Notify::Default => true,
            Notify::Never => false,
            Notify::On { failure, .. } => failure,
        }
    }

    /// Whether a successful delivery calls for a notice.
    pub fn on_success(self) -> bool {
        matches!(self, Notify::On { success: true, .. })
    }

    /// Whether the sender asked to hear of delays.
    pub fn on_delay(self) -> bool {
        matches!(self, Notify::On { delay: true, .. })
    }

    /// The v3 record's NOTIFY bits (given 8, delay 4, failure 2, success 1).
    pub fn from_bits(bits: u8) -> Notify {
        if bits & 8 == 0 {
            return Notify::Default;
        }
        let (success, failure, delay) = (bits & 1 != 0, bits & 2 != 0, bits & 4 != 0);
        if !(success || failure || delay) {
            return Notify::Never;
        }
        Notify::On {
            success,
            failure,
            delay,
        }
    }
}

/// Which notices a message's sender may get, as its listener (`[[listener]] notices`) allowed
/// them at reception; a tenant's own switches (`[[tenant]] notices`) apply on top, when the
/// notice is due. NOTIFY (RFC 3461) still decides per recipient within what these allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoticeSwitches {
    /// A recipient bounced (5xx).
    pub bounce: bool,
    /// A recipient expired (`queue.max_age_s`).
    pub expiry: bool,
    /// A recipient is still pending after `notices.delay_after_s`.
    pub delay: bool,
    /// A recipient was delivered and asked for it (NOTIFY=SUCCESS).
    pub success: bool,
}

impl Default for NoticeSwitches {
    fn default() -> Self {
        NoticeSwitches::ALL
    }
}

impl NoticeSwitches {
    pub const ALL: NoticeSwitches = NoticeSwitches {
        bounce: true,
        expiry: true,
        delay: true,
        success: true,
    };
    pub const NONE: NoticeSwitches = NoticeSwitches {
        bounce: false,
        expiry: false,
        delay: false,
        success: false,
    };

    /// Bit 7 of the spooled byte says the switches were given: a zero byte is a record written
    /// before them, which allows every notice.
    const GIVEN: u8 = 0x80;

    /// Only what both allow.
    pub fn and(self, other: NoticeSwitches) -> NoticeSwitches {
        NoticeSwitches {
            bounce: self.bounce && other.bounce,
            expiry: self.expiry && other.expiry,
            delay: self.delay && other.delay,
            success: self.success && other.success,
        }
    }

    /// The byte in the record prefix: given 0x80, bounce 1, expiry 2, delay 4, success 8.
    pub fn to_byte(self) -> u8 {
        NoticeSwitches::GIVEN
            | u8::from(self.bounce)
            | u8::from(self.expiry) << 1
            | u8::from(self.delay) << 2
            | u8::from(self.success) << 3
    }

    /// The switches of a spooled byte (see [`NoticeSwitches::to_byte`]); 0 is every notice.
    pub fn from_byte(b: u8) -> NoticeSwitches {
        if b & NoticeSwitches::GIVEN == 0 {
            return NoticeSwitches::ALL;
        }
        NoticeSwitches {
            bounce: b & 1 != 0,
            expiry: b & 2 != 0,
            delay: b & 4 != 0,
            success: b & 8 != 0,
        }
    }
}

/// A message's priority class: which ready lane it waits in (see `queue::lanes`). From the
/// `egress.priority_header` header, else the listener's `priority`; spooled in a byte of the
/// record prefix (see `spool::record`), 0 in records from before classes, read as Normal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Priority {
    /// Password resets, receipts: ahead of the rest, by weight.
    Transactional = 0,
    #[default]
    Normal = 1,
    /// Newsletters and campaigns: behind the rest, by weight, never starved.
    Bulk = 2,
}

impl Priority {
    /// Every class, in the order of `queue.priority_weights`.
    pub const ALL: [Priority; 3] = [Priority::Transactional, Priority::Normal, Priority::Bulk];

    /// `transactional`, `normal`, `bulk` (and `high`, `low`), case and spaces ignored.
    pub fn parse(text: &str) -> Option<Priority> {
        let text = text.trim();
        let is = |word: &str| text.eq_ignore_ascii_case(word);
        if is("transactional") || is("high") {
            Some(Priority::Transactional)
        } else if is("normal") {
            Some(Priority::Normal)
        } else if is("bulk") || is("low") {
            Some(Priority::Bulk)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Priority::Transactional => "transactional",
            Priority::Normal => "normal",
            Priority::Bulk => "bulk",
        }
    }

    /// Its place in [`Priority::ALL`] (and in `queue.priority_weights`).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The byte in the record prefix: 1, 2, 3 (0 is a record from before classes).
    pub fn to_byte(self) -> u8 {
        self as u8 + 1
    }

    /// The class of a spooled byte (see [`Priority::to_byte`]); 0, or a value a newer build
    /// wrote, is Normal.
    pub fn from_byte(b: u8) -> Priority {
        match b {
            1 => Priority::Transactional,
            3 => Priority::Bulk,
            _ => Priority::Normal,
        }
    }
}

/// What the body needs from the next hop (RFC 6152, RFC 3030).
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[rkyv(derive(Debug))]
#[repr(u8)]
pub enum Body {
    #[default]
    SevenBit,
    /// BODY=8BITMIME.
    EightBitMime,
    /// BODY=BINARYMIME: only with BDAT to a next hop offering CHUNKING and BINARYMIME.
    BinaryMime,
}

/// One recipient with its DSN parameters.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Recipient {
    /// `local@domain` as received.
    pub address: String,
    pub notify: Notify,
    /// ORCPT as `type;address` (xtext decoded; RFC 6533 `utf-8` in its `\x{..}` form).
    pub orcpt: Option<String>,
}

impl Recipient {
    pub fn new(address: impl Into<String>) -> Recipient {
        Recipient {
            address: address.into(),
            notify: Notify::Default,
            orcpt: None,
        }
    }

    /// The domain part (after the last `@`), as given.
    pub fn domain(&self) -> &str {
        domain_of(&self.address)
    }
}

/// The domain part of `local@domain` (after the last `@`), or "" for an address without one.
/// No I/O, no allocation.
pub fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map_or("", |(_, d)| d)
}

/// A message's envelope. A message split over shards has one envelope per part, each with that
/// shard's recipients and everything else the same.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Envelope {
    pub reception: ReceptionId,
    /// Reverse-path; "" for the null sender (a notice, which never causes another).
    pub sender: String,
    pub rcpts: Vec<Recipient>,
    pub ret: Ret,
    /// DSN ENVID, when given.
    pub envid: Option<String>,
    /// The value of the tenant header, for pool rules (and shaping later).
    pub tenant: Option<String>,
    /// SMTPUTF8 was given: the message goes out only with SMTPUTF8.
    pub smtputf8: bool,
    pub body: Body,
    /// Body length in bytes, headers we added included.
    pub size: u64,
    /// The client's address, for the log (`local` for our own notices).
    pub peer: String,
    /// The notices the listener allowed. Not in the envelope's archive: spooled in the
    /// record prefix (see the module doc), so it is last and skipped here.
    #[rkyv(with = rkyv::with::Skip)]
    pub notices: NoticeSwitches,
    /// The priority class (`egress.priority_header`, else the listener's). In the record
    /// prefix, like `notices`.
    #[rkyv(with = rkyv::with::Skip)]
    pub priority: Priority,
    /// The value of the campaign header (`egress.campaign_header`). Not spooled apart from the
    /// body: recovery reads it from the spooled header block again.
    #[rkyv(with = rkyv::with::Skip)]
    pub campaign: Option<String>,
}

impl Envelope {
    /// Unix time of reception, in milliseconds.
    pub fn received_ms(&self) -> u64 {
        self.reception.ms
    }

    /// This envelope with only the recipients at `indices` (in that order): one shard's part.
    pub fn part(&self, indices: &[usize]) -> Envelope {
        Envelope {
            rcpts: indices
                .iter()
                .filter_map(|&i| self.rcpts.get(i).cloned())
                .collect(),
            ..self.without_rcpts()
        }
    }

    fn without_rcpts(&self) -> Envelope {
        Envelope {
            reception: self.reception,
            sender: self.sender.clone(),
            rcpts: Vec::new(),
            ret: self.ret,
            envid: self.envid.clone(),
            tenant: self.tenant.clone(),
            smtputf8: self.smtputf8,
            body: self.body,
            size: self.size,
            peer: self.peer.clone(),
            notices: self.notices,
            priority: self.priority,
            campaign: self.campaign.clone(),
        }
    }
}

impl ArchivedEnvelope {
    /// The owned envelope (allocates; for recovery and notices, not the hot path).
    pub fn to_owned_envelope(&self) -> Result<Envelope, rkyv::rancor::Error> {
        rkyv::deserialize::<Envelope, rkyv::rancor::Error>(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reception_ids_print_and_parse() {
        let id = ReceptionId {
            ms: 0x18c_0000_0001,
            shard: 3,
            n: 0x2a,
        };
        assert_eq!(id.to_string(), "18c00000001.3.2a");
        assert_eq!(ReceptionId::parse(&id.to_string()), Some(id));
        assert_eq!(ReceptionId::parse("x.1.2"), None);
        assert_eq!(ReceptionId::parse("1.2"), None);
        assert_eq!(ReceptionId::parse("1.2.3.4"), None);
    }

    #[test]
    fn notify_follows_rfc3461_defaults() {
        assert!(Notify::Default.on_failure() && !Notify::Default.on_success());
        assert!(!Notify::Never.on_failure());
        let s = Notify::On {
            success: true,
            failure: false,
            delay: false,
        };
        assert!(s.on_success() && !s.on_failure() && !s.on_delay());
        assert_eq!(Notify::from_bits(0), Notify::Default);
        assert_eq!(Notify::from_bits(8), Notify::Never);
        assert_eq!(Notify::from_bits(8 | 1), s);
    }

    #[test]
    fn notice_switches_round_trip_and_zero_is_all() {
        assert_eq!(NoticeSwitches::from_byte(0), NoticeSwitches::ALL);
        for b in 0..16u8 {
            let s = NoticeSwitches::from_byte(0x80 | b);
            assert_eq!(NoticeSwitches::from_byte(s.to_byte()), s);
        }
        assert_eq!(
            NoticeSwitches::from_byte(NoticeSwitches::NONE.to_byte()),
            NoticeSwitches::NONE
        );
        let bounce_only = NoticeSwitches {
            bounce: true,
            ..NoticeSwitches::NONE
        };
        assert_eq!(NoticeSwitches::ALL.and(bounce_only), bounce_only);
    }

    #[test]
    fn priorities_parse_and_round_trip_through_their_byte() {
        assert_eq!(
            Priority::parse(" Transactional "),
            Some(Priority::Transactional)
        );
        assert_eq!(Priority::parse("HIGH"), Some(Priority::Transactional));
        assert_eq!(Priority::parse("normal"), Some(Priority::Normal));
        assert_eq!(Priority::parse("Bulk"), Some(Priority::Bulk));
        assert_eq!(Priority::parse("low"), Some(Priority::Bulk));
        assert_eq!(Priority::parse("urgent"), None);
        assert_eq!(Priority::parse(""), None);
        for p in Priority::ALL {
            assert_eq!(Priority::from_byte(p.to_byte()), p);
            assert_eq!(Priority::parse(p.name()), Some(p));
            assert_eq!(Priority::ALL[p.index()], p);
        }
        assert_eq!(
            Priority::from_byte(0),
            Priority::Normal,
            "a record from before classes"
        );
        assert_eq!(Priority::from_byte(9), Priority::Normal);
    }

    #[test]
    fn parts_keep_everything_but_the_other_recipients() {
        let env = Envelope {
            reception: ReceptionId {
                ms: 1,
                shard: 0,
                n: 2,
            },
            sender: "s@x.test".into(),
            rcpts: vec![Recipient::new("a@a.test"), Recipient::new("b@b.test")],
            ret: Ret::Full,
            envid: Some("e1".into()),
            tenant: None,
            smtputf8: false,
            body: Body::EightBitMime,
            size: 10,
            peer: "127.0.0.1:1".into(),
            notices: NoticeSwitches::ALL,
            priority: Priority::Bulk,
            campaign: Some("spring".into()),
        };
        let part = env.part(&[1]);
        assert_eq!(
            (part.priority, part.campaign.as_deref()),
            (Priority::Bulk, Some("spring"))
        );
        assert_eq!(part.rcpts, vec![Recipient::new("b@b.test")]);
        assert_eq!(
            (part.ret, part.body, part.size),
            (Ret::Full, Body::EightBitMime, 10)
        );
        assert_eq!(part.rcpts[0].domain(), "b.test");
    }
}
