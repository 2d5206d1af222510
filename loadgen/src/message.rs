//! The messages the injector sends, built once per connection and stamped per message.
//!
//! A `Template` holds the message exactly as it goes on the wire: headers, a body of printable
//! lines, dot-stuffing already applied, and the closing "." CRLF. Each message differs only in
//! its id, which sits at fixed offsets, so stamping it is a dozen byte writes and no allocation.
//!
//! Invariants: the unstuffed message (headers + body, without the closing dot) is exactly the
//! requested size, except that a size one byte over the header block comes out one byte short
//! and a size below it comes out as the header block alone; no line is longer than
//! `BODY_LINE_LEN_MAX` characters before stuffing; every line ends in CRLF; an id is unique
//! across runs and messages.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// RFC 5322 2.1.1 recommends lines of at most 78 characters; the body keeps to that so the
/// messages look like ordinary mail to any filter in the MTA.
pub const BODY_LINE_LEN_MAX: usize = 78;

/// The id ends in the message index as this many hex digits. 48 bits of index is far more
/// messages than one run can send, and a fixed width keeps the id at fixed offsets.
pub const ID_INDEX_HEX_LEN: usize = 12;

/// Largest message index an id can carry.
pub const ID_INDEX_MAX: u64 = (1 << (4 * ID_INDEX_HEX_LEN)) - 1;

/// Header that carries the id; the sink counts its distinct values.
pub const ID_HEADER: &str = "X-Loadgen-Id";

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Text the body lines are cut from, so bodies are readable and compress like mail.
const FILLER: &[u8] =
    b"The quick brown fox jumps over the lazy dog while 0123456789 sheep count Epoxi queues. ";

/// Ids of one run: a prefix unique to this process and moment, then the message index.
#[derive(Debug, Clone)]
pub struct IdPrefix(String);

impl IdPrefix {
    /// A prefix from the process id and the wall clock in nanoseconds, so two runs never share
    /// ids even when the sink outlives many injectors.
    pub fn for_this_run() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self(format!("lg{:08x}{:016x}-", std::process::id(), nanos))
    }

    /// The id of message `index`.
    pub fn id(&self, index: u64) -> String {
        let mut id = String::with_capacity(self.0.len() + ID_INDEX_HEX_LEN);
        id.push_str(&self.0);
        let _ = write!(id, "{index:0width$x}", width = ID_INDEX_HEX_LEN);
        id
    }
}

/// What every message of a run shares.
pub struct MessageSpec<'a> {
    pub from: &'a str,
    pub size_bytes: usize,
    pub id_prefix: &'a IdPrefix,
    /// Seconds since the Unix epoch for the Date header.
    pub date_unix_s: u64,
    /// More header fields, `Name: value` each (checked by the caller), after the others.
    pub headers: &'a [String],
}

/// One connection's message, ready to stamp and send.
pub struct Template {
    wire: Vec<u8>,
    /// Offsets of the index digits of each copy of the id (Message-ID and X-Loadgen-Id).
    index_at: [usize; 2],
    size_bytes: usize,
}

impl Template {
    pub fn build(spec: &MessageSpec) -> Self {
        let placeholder = spec.id_prefix.id(0);
        let index_in_id = placeholder.len() - ID_INDEX_HEX_LEN;
        let mut headers = String::new();
        let _ = write!(
            headers,
            "From: <{from}>\r\n\
             To: undisclosed-recipients:;\r\n\
             Subject: epoxi loadgen message\r\n\
             Date: {date}\r\n",
            from = spec.from,
            date = rfc5322_date(spec.date_unix_s),
        );
        for field in spec.headers {
            headers.push_str(field);
            headers.push_str("\r\n");
        }
        let message_id_at = headers.len() + "Message-ID: <".len() + index_in_id;
        let _ = write!(headers, "Message-ID: <{placeholder}@loadgen.test>\r\n");
        let loadgen_id_at = headers.len() + ID_HEADER.len() + 2 + index_in_id;
        let _ = write!(headers, "{ID_HEADER}: {placeholder}\r\n\r\n");

        let mut wire = Vec::with_capacity(spec.size_bytes + spec.size_bytes / 64 + 64);
        wire.extend_from_slice(headers.as_bytes());
        let mut size_bytes = headers.len();
        let mut line_no = 0usize;
        let mut line = Vec::with_capacity(BODY_LINE_LEN_MAX);
        // Each line costs its characters plus CRLF. Near the end, line lengths are chosen so
        // the total lands exactly on the target: 81 bytes cannot be one line, so it becomes a
        // line of 77 and an empty one.
        while spec.size_bytes.saturating_sub(size_bytes) >= 2 {
            let remaining = spec.size_bytes - size_bytes;
            let lone_dot_fits = remaining > BODY_LINE_LEN_MAX + 2 + 3 + 1;
            let len = if line_no % 50 == 7 && lone_dot_fits {
                1
            } else if remaining <= BODY_LINE_LEN_MAX + 2 {
                remaining - 2
            } else if remaining == BODY_LINE_LEN_MAX + 3 {
                BODY_LINE_LEN_MAX - 1
            } else {
                BODY_LINE_LEN_MAX
            };
            body_line(line_no, len, &mut line);
            // Dot-stuffing (RFC 5321 4.5.2): a line that starts with "." gets another one.
            if line.first() == Some(&b'.') {
                wire.push(b'.');
            }
            wire.extend_from_slice(&line);
            wire.extend_from_slice(b"\r\n");
            size_bytes += len + 2;
            line_no += 1;
        }
        wire.extend_from_slice(b".\r\n");
        Self {
            wire,
            index_at: [message_id_at, loadgen_id_at],
            size_bytes,
        }
    }

    /// Writes `index` into both copies of the id. Hot path: no allocation.
    pub fn stamp(&mut self, index: u64) {
        debug_assert!(index <= ID_INDEX_MAX);
        for at in self.index_at {
            let digits = &mut self.wire[at..at + ID_INDEX_HEX_LEN];
            for (k, digit) in digits.iter_mut().rev().enumerate() {
                *digit = HEX[((index >> (4 * k)) & 0xf) as usize];
            }
        }
    }

    /// The message as sent: dot-stuffed and ending in CRLF "." CRLF.
    pub fn wire(&self) -> &[u8] {
        &self.wire
    }

    /// Size of the message itself: unstuffed, without the closing dot.
    pub fn size_bytes(&self) -> usize {
        self.size_bytes
    }
}

/// Fills `line` with body line number `line_no`, `len` characters long. Every tenth line
/// starts with a dot and every fiftieth is a lone dot (when it fits), so the receiver's
/// dot-unstuffing is exercised on every message of a few KiB.
fn body_line(line_no: usize, len: usize, line: &mut Vec<u8>) {
    line.clear();
    if len == 0 {
        return;
    }
    if line_no % 10 == 3 || len == 1 && line_no % 50 == 7 {
        line.push(b'.');
    }
    let offset = line_no * 7 % FILLER.len();
    line.extend(FILLER.iter().cycle().skip(offset).take(len - line.len()));
}

/// Formats a Date header value (RFC 5322 3.3) in UTC.
pub fn rfc5322_date(unix_s: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix_s / 86_400;
    let secs = unix_s % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} +0000",
        DAYS[(days % 7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Year, month (1-12) and day (1-31) of a count of days since 1970-01-01, after Howard
/// Hinnant's `civil_from_days`, restricted to dates after the epoch.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(prefix: &IdPrefix, size_bytes: usize) -> MessageSpec<'_> {
        MessageSpec {
            from: "loadgen@loadgen.test",
            size_bytes,
            id_prefix: prefix,
            date_unix_s: 1_700_000_000,
            headers: &[],
        }
    }

    /// Undoes dot-stuffing and drops the closing dot, checking line shape on the way.
    fn unstuff(wire: &[u8]) -> Vec<u8> {
        let body = wire.strip_suffix(b".\r\n").expect("closing dot");
        assert!(body.ends_with(b"\r\n"));
        let mut out = Vec::new();
        for line in body.split_inclusive(|&b| b == b'\n') {
            assert!(line.ends_with(b"\r\n"), "bare LF in {line:?}");
            let text = &line[..line.len() - 2];
            assert_ne!(
                text, b".",
                "an unstuffed lone dot would end the message early"
            );
            let text = if text.first() == Some(&b'.') {
                &text[1..]
            } else {
                text
            };
            assert!(text.len() <= BODY_LINE_LEN_MAX);
            assert!(text.iter().all(|b| (b' '..=b'~').contains(b)));
            out.extend_from_slice(text);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    #[test]
    fn extra_header_fields_go_in_the_header_block_and_ids_still_stamp() {
        let prefix = IdPrefix::for_this_run();
        let fields = [
            "X-Tenant: acme".to_owned(),
            "X-Priority-Class: bulk".to_owned(),
        ];
        let mut t = Template::build(&MessageSpec {
            headers: &fields,
            ..spec(&prefix, 2048)
        });
        assert_eq!(t.size_bytes(), 2048);
        t.stamp(0xabc);
        let text = String::from_utf8_lossy(t.wire()).into_owned();
        let (head, _) = text.split_once("\r\n\r\n").expect("a header block");
        assert!(
            head.contains("\r\nX-Tenant: acme\r\nX-Priority-Class: bulk\r\n"),
            "{head}"
        );
        assert!(
            head.contains(&format!("{ID_HEADER}: {}", prefix.id(0xabc))),
            "{head}"
        );
        assert!(
            head.contains(&format!("Message-ID: <{}@", prefix.id(0xabc))),
            "{head}"
        );
    }

    #[test]
    fn message_has_requested_size_and_stuffed_dots() {
        let prefix = IdPrefix::for_this_run();
        let header_len = Template::build(&spec(&prefix, 0)).size_bytes();
        for target in (header_len..header_len + 400).chain([1024, 4096, 100 * 1024, 1 << 20]) {
            let t = Template::build(&spec(&prefix, target));
            let unstuffed = unstuff(t.wire());
            assert_eq!(unstuffed.len(), t.size_bytes());
            if target == header_len + 1 {
                assert_eq!(t.size_bytes(), header_len, "one byte cannot be a line");
            } else {
                assert_eq!(t.size_bytes(), target);
            }
        }
        let t = Template::build(&spec(&prefix, 4096));
        let wire = t.wire();
        let stuffed = wire.windows(4).filter(|w| w == b"\r\n..").count();
        assert!(stuffed >= 5, "only {stuffed} stuffed lines");
        assert!(wire.windows(6).any(|w| w == b"\r\n..\r\n"), "no lone dot");
        // The only CRLF "." CRLF is the terminator.
        let ends = wire.windows(5).filter(|w| w == b"\r\n.\r\n").count();
        assert_eq!(ends, 1);
    }

    #[test]
    fn stamped_ids_are_unique_and_in_both_headers() {
        let prefix = IdPrefix::for_this_run();
        let mut t = Template::build(&spec(&prefix, 1024));
        let mut seen = std::collections::HashSet::new();
        for index in [0, 1, 2, 0xabc, ID_INDEX_MAX] {
            t.stamp(index);
            let id = prefix.id(index);
            let text = String::from_utf8(t.wire().to_vec()).unwrap();
            assert!(text.contains(&format!("\r\nX-Loadgen-Id: {id}\r\n")));
            assert!(text.contains(&format!("\r\nMessage-ID: <{id}@loadgen.test>\r\n")));
            assert!(seen.insert(id));
        }
        let other_run = IdPrefix::for_this_run();
        assert_ne!(other_run.id(0), prefix.id(0));
    }

    #[test]
    fn formats_dates() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_700_000_000),
            "Tue, 14 Nov 2023 22:13:20 +0000"
        );
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
    }
}
