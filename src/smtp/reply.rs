//! SMTP replies: the value both sides share, the parser for replies read off the wire, and the
//! server's canned replies.
//!
//! Invariants:
//! - A `Reply` always formats back to valid wire text: each line of `text` (split on `\n`) becomes
//!   one reply line, continuation lines use `code-`, the last uses `code `, and the enhanced code
//!   (when present) is repeated on every line as RFC 2034 asks.
//! - Parsing then formatting a reply is the identity on its meaning: the parser strips the
//!   enhanced code from every line that repeats it, so it is not duplicated on the way back out.
//! - `Canned::wire` is byte for byte what `Canned::to_reply().to_string()` yields (a test checks
//!   every canned reply), so the server writes static bytes on the hot path and never formats.
//! - The parser never looks past the end of the first complete reply and refuses replies with a
//!   line over `line_len_max` bytes or more than [`REPLY_LINES_MAX`] lines, so a hostile server
//!   cannot grow the client's buffer without bound.

use std::fmt;
use std::io::Write as _;

use thiserror::Error;

use super::split_lf;

/// An RFC 3463 enhanced status code: class (2, 4 or 5), subject, detail.
pub type EnhancedCode = (u8, u16, u16);

/// Most lines a reply may have. Real EHLO responses have about a dozen lines and other replies one
/// or two; 128 is generous for odd banners yet bounds what a hostile server can make us buffer
/// (`REPLY_LINES_MAX * line_len_max`).
pub const REPLY_LINES_MAX: usize = 128;

/// One SMTP reply, possibly multi-line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reply {
    /// Three-digit reply code (RFC 5321 4.2).
    pub code: u16,
    /// Enhanced status code taken from the first line, when the server sent one.
    pub enhanced: Option<EnhancedCode>,
    /// The reply text without codes; lines of a multi-line reply are joined with `\n`.
    pub text: String,
}

impl Reply {
    pub fn new(code: u16, enhanced: Option<EnhancedCode>, text: impl Into<String>) -> Reply {
        Reply {
            code,
            enhanced,
            text: text.into(),
        }
    }

    /// 2xx (completion) or 3xx (intermediate): the command was accepted.
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// 4xx: try again later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// 5xx: do not retry as is.
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// The lines of the reply text (one for a single-line reply).
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.text.split('\n')
    }

    /// Appends the wire form (with CRLF line endings) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        // Writing into a Vec cannot fail; the Result only exists for the io::Write signature.
        let _ = write!(out, "{self}");
    }
}

/// The wire form, CRLF line endings included.
impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut lines = self.text.split('\n').peekable();
        while let Some(line) = lines.next() {
            // A stray CR in text built by a caller would end the reply line early on the wire.
            let line = line.trim_end_matches('\r');
            let sep = if lines.peek().is_some() { '-' } else { ' ' };
            write!(f, "{}", self.code)?;
            match (self.enhanced, line.is_empty()) {
                (Some((c, s, d)), true) => write!(f, "{sep}{c}.{s}.{d}")?,
                (Some((c, s, d)), false) => write!(f, "{sep}{c}.{s}.{d} {line}")?,
                (None, true) if sep == '-' => f.write_str("-")?,
                (None, true) => {}
                (None, false) => write!(f, "{sep}{line}")?,
            }
            f.write_str("\r\n")?;
        }
        Ok(())
    }
}

/// Why bytes from a server are not a valid reply. Any of these makes the connection unusable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReplyError {
    #[error("reply line longer than {line_len_max} bytes")]
    LineTooLong { line_len_max: usize },
    #[error("reply longer than {REPLY_LINES_MAX} lines")]
    TooManyLines,
    #[error("malformed reply line")]
    Malformed,
    #[error("reply code changed within a multi-line reply ({first} then {then})")]
    CodeMismatch { first: u16, then: u16 },
}

/// Parses the first complete reply in `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of a reply (read more and call again),
/// `Ok(Some((reply, consumed)))` otherwise; bytes after `consumed` belong to later replies.
/// Lines may end in CRLF or bare LF. Text that is not UTF-8 is kept lossily: it is only for logs
/// and bounces.
pub fn parse_reply(buf: &[u8], line_len_max: usize) -> Result<Option<(Reply, usize)>, ReplyError> {
    // Pass 1 finds the end without allocating, because a partial reply (a split read) is common
    // and we would throw the work away.
    let mut pos = 0;
    let mut lines = 0;
    let mut code = None;
    let end = loop {
        let rest = &buf[pos..];
        let Some(k) = memchr::memchr(b'\n', rest) else {
            if rest.len() >= line_len_max {
                return Err(ReplyError::LineTooLong { line_len_max });
            }
            return Ok(None);
        };
        if k + 1 > line_len_max {
            return Err(ReplyError::LineTooLong { line_len_max });
        }
        let (c, last, _) = split_line(strip_cr(&rest[..k]))?;
        match code {
            None => code = Some(c),
            Some(first) if first != c => return Err(ReplyError::CodeMismatch { first, then: c }),
            Some(_) => {}
        }
        lines += 1;
        if lines > REPLY_LINES_MAX {
            return Err(ReplyError::TooManyLines);
        }
        pos += k + 1;
        if last {
            break pos;
        }
    };
    let code = code.ok_or(ReplyError::Malformed)?;

    // Pass 2 builds the reply from the complete lines.
    let mut enhanced = None;
    let mut text = String::new();
    for (i, raw) in split_lf(&buf[..end]).take(lines).enumerate() {
        let (_, _, line_text) = split_line(strip_cr(raw))?;
        let line_text = String::from_utf8_lossy(line_text);
        let body = if i == 0 {
            let (enh, body) = split_enhanced(code, &line_text);
            enhanced = enh;
            body
        } else {
            match split_enhanced(code, &line_text) {
                (Some(e), body) if Some(e) == enhanced => body,
                _ => &line_text,
            }
        };
        if i > 0 {
            text.push('\n');
        }
        text.push_str(body);
    }
    Ok(Some((
        Reply {
            code,
            enhanced,
            text,
        },
        end,
    )))
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Splits `250-text` into (250, is_last, text).
fn split_line(line: &[u8]) -> Result<(u16, bool, &[u8]), ReplyError> {
    let [d0, d1, d2, rest @ ..] = line else {
        return Err(ReplyError::Malformed);
    };
    // RFC 5321 4.2: first digit 2..5, second 0..5, third any digit.
    if !(b'2'..=b'5').contains(d0) || !(b'0'..=b'5').contains(d1) || !d2.is_ascii_digit() {
        return Err(ReplyError::Malformed);
    }
    let code = u16::from(d0 - b'0') * 100 + u16::from(d1 - b'0') * 10 + u16::from(d2 - b'0');
    match rest {
        [] => Ok((code, true, rest)),
        [b' ', text @ ..] => Ok((code, true, text)),
        [b'-', text @ ..] => Ok((code, false, text)),
        _ => Err(ReplyError::Malformed),
    }
}

/// Splits `"2.1.0 Ok"` into the enhanced code and `"Ok"`, if the text starts with an enhanced
/// code whose class matches the reply code's first digit (RFC 2034 section 4).
fn split_enhanced(code: u16, text: &str) -> (Option<EnhancedCode>, &str) {
    let (token, rest) = match text.find(' ') {
        Some(i) => (&text[..i], &text[i + 1..]),
        None => (text, ""),
    };
    match parse_enhanced(token) {
        Some(e) if u16::from(e.0) == code / 100 => (Some(e), rest),
        _ => (None, text),
    }
}

fn parse_enhanced(token: &str) -> Option<EnhancedCode> {
    let mut parts = token.split('.');
    let class = parts.next()?;
    let subject = parts.next()?;
    let detail = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    let number = |s: &str| -> Option<u16> {
        if (1..=3).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()) {
            s.parse().ok()
        } else {
            None
        }
    };
    let class = match class {
        "2" => 2,
        "4" => 4,
        "5" => 5,
        _ => return None,
    };
    Some((class, number(subject)?, number(detail)?))
}

/// A fixed server reply, kept both as parts and as its static wire bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Canned {
    pub code: u16,
    pub enhanced: Option<EnhancedCode>,
    pub text: &'static str,
    /// Exactly `self.to_reply().to_string()`, built at compile time.
    pub wire: &'static [u8],
}

impl Canned {
    pub fn to_reply(&self) -> Reply {
        Reply::new(self.code, self.enhanced, self.text)
    }
}

/// Declares a canned reply whose wire bytes are assembled at compile time, so the two forms
/// cannot drift apart by hand-editing.
macro_rules! canned {
    ($(#[$doc:meta])* $name:ident = $code:literal ($c:literal, $s:literal, $d:literal) $text:literal) => {
        $(#[$doc])*
        pub const $name: Canned = Canned {
            code: $code,
            enhanced: Some(($c, $s, $d)),
            text: $text,
            wire: concat!($code, " ", $c, ".", $s, ".", $d, " ", $text, "\r\n").as_bytes(),
        };
    };
    ($(#[$doc:meta])* $name:ident = $code:literal $text:literal) => {
        $(#[$doc])*
        pub const $name: Canned = Canned {
            code: $code,
            enhanced: None,
            text: $text,
            wire: concat!($code, " ", $text, "\r\n").as_bytes(),
        };
    };
}

canned!(OK = 250 (2, 0, 0) "Ok");
canned!(MAIL_OK = 250 (2, 1, 0) "Ok");
canned!(RCPT_OK = 250 (2, 1, 5) "Ok");
canned!(
    /// RFC 5321 4.2: 354 has no enhanced code (the client is about to send text, not a command).
    DATA_GO = 354 "End data with <CR><LF>.<CR><LF>"
);
canned!(BYE = 221 (2, 0, 0) "Bye");
canned!(HELP = 214 (2, 0, 0) "See RFC 5321 (https://www.rfc-editor.org/rfc/rfc5321)");
canned!(
    /// RFC 5321 3.5.3: 252 tells the client we will not verify but will accept.
    VRFY = 252 (2, 1, 5) "Cannot VRFY user, but will accept message and attempt delivery"
);
canned!(NOT_IMPLEMENTED = 502 (5, 5, 1) "Command not implemented");
canned!(UNKNOWN_COMMAND = 500 (5, 5, 2) "Command unrecognized");
canned!(NUL_IN_COMMAND = 500 (5, 5, 2) "NUL byte in command");
canned!(LINE_TOO_LONG = 500 (5, 5, 6) "Line too long");
canned!(SYNTAX = 501 (5, 5, 4) "Syntax error in parameters or arguments");
canned!(BAD_SENDER = 501 (5, 1, 7) "Bad sender address syntax");
canned!(BAD_RECIPIENT = 501 (5, 1, 3) "Bad recipient address syntax");
canned!(UNKNOWN_PARAMETER = 555 (5, 5, 4) "Unsupported MAIL FROM or RCPT TO parameter");
canned!(NEED_HELO = 503 (5, 5, 1) "Send EHLO or HELO first");
canned!(NEED_MAIL = 503 (5, 5, 1) "Send MAIL first");
canned!(NESTED_MAIL = 503 (5, 5, 1) "Nested MAIL command");
canned!(NO_VALID_RECIPIENTS = 554 (5, 5, 1) "No valid recipients");
canned!(SIZE_EXCEEDED = 552 (5, 3, 4) "Message size exceeds fixed maximum message size");
canned!(MESSAGE_TOO_BIG = 552 (5, 3, 4) "Message too big");
canned!(DATA_LINE_TOO_LONG = 552 (5, 3, 4) "Message has a line too long");
canned!(TOO_MANY_RECIPIENTS = 452 (4, 5, 3) "Too many recipients");
canned!(RELAY_DENIED = 550 (5, 7, 1) "Relaying denied");
canned!(TOO_MANY_ERRORS = 421 (4, 7, 0) "Too many errors");
canned!(REPORT_OK = 250 (2, 0, 0) "Ok: report received");
canned!(
    /// A recipient of the out-of-band report domain in a transaction of relayed mail, or the
    /// other way round. RFC 5321 §4.5.3.1.10: a client sends recipients refused with 452 in a
    /// later transaction, which is what is asked.
    OOB_MIXED = 452 (4, 5, 3) "Reports to the bounce domain go in a transaction of their own"
);
canned!(
    /// The default `suppression.reply` (the configured reply is what is written).
    SUPPRESSED = 550 (5, 7, 1) "Recipient suppressed"
);
canned!(
    /// RFC 6531 3.7.4 (X.6.7 from RFC 5248): a non-ASCII address without SMTPUTF8 on MAIL.
    NON_ASCII_SENDER = 553 (5, 6, 7) "Non-ASCII addresses not permitted for that sender"
);
canned!(NON_ASCII_RECIPIENT = 553 (5, 6, 7) "Non-ASCII addresses not permitted for that recipient");
canned!(
    /// RFC 6531 §3.3: a UTF-8 domain must be a valid internationalized domain name (IDNA2008).
    BAD_IDN_SENDER = 553 (5, 1, 7) "Sender domain is not a valid internationalized domain name"
);
canned!(
    BAD_IDN_RECIPIENT = 553 (5, 1, 3) "Recipient domain is not a valid internationalized domain name"
);
canned!(BAD_DSN_PARAMETER = 555 (5, 5, 4) "Invalid DSN parameter value");
canned!(
    /// RFC 3030 3: DATA after BDAT in one transaction is a bad sequence.
    DATA_AFTER_BDAT = 503 (5, 5, 1) "DATA not allowed after BDAT"
);
canned!(
    /// RFC 3030 3: BINARYMIME bodies can only be sent with BDAT.
    BINARYMIME_NEEDS_BDAT = 503 (5, 5, 1) "BODY=BINARYMIME requires BDAT"
);
canned!(
    /// RFC 5321 2.3.8: lines end in CRLF; a bare LF is what SMTP smuggling hides behind.
    BARE_LF = 554 (5, 6, 0) "Bare LF not allowed in message, use CRLF"
);
canned!(BARE_CR = 554 (5, 6, 0) "Bare CR not allowed in message, use CRLF");
canned!(NUL_IN_MESSAGE = 554 (5, 6, 0) "NUL byte not allowed in message");
canned!(TOO_MANY_MESSAGES = 421 (4, 7, 0) "Too many messages, reconnect");
canned!(SHUTDOWN = 421 (4, 3, 2) "Service shutting down");
canned!(
    /// Only reachable through a bug: DATA ended with no transaction open.
    INTERNAL = 451 (4, 3, 0) "Internal error, transaction lost"
);

/// Every reason the server refuses a command or a message. Each maps to one canned reply, and
/// the session counts them by kind so the adapter can export them as metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    UnknownCommand,
    NulInCommand,
    LineTooLong,
    Syntax,
    BadSender,
    BadRecipient,
    UnknownParameter,
    NeedHelo,
    NeedMail,
    NestedMail,
    NoValidRecipients,
    SizeExceeded,
    MessageTooBig,
    DataLineTooLong,
    TooManyRecipients,
    RelayDenied,
    NotImplemented,
    NonAsciiSender,
    NonAsciiRecipient,
    BadIdnSender,
    BadIdnRecipient,
    BadDsnParameter,
    DataAfterBdat,
    BinaryMimeNeedsBdat,
    BareLf,
    BareCr,
    NulInMessage,
    TooManyMessages,
    TooManyErrors,
    OobMixed,
    Suppressed,
}

impl Rejection {
    pub const COUNT: usize = 31;
    pub const ALL: [Rejection; Rejection::COUNT] = [
        Rejection::UnknownCommand,
        Rejection::NulInCommand,
        Rejection::LineTooLong,
        Rejection::Syntax,
        Rejection::BadSender,
        Rejection::BadRecipient,
        Rejection::UnknownParameter,
        Rejection::NeedHelo,
        Rejection::NeedMail,
        Rejection::NestedMail,
        Rejection::NoValidRecipients,
        Rejection::SizeExceeded,
        Rejection::MessageTooBig,
        Rejection::DataLineTooLong,
        Rejection::TooManyRecipients,
        Rejection::RelayDenied,
        Rejection::NotImplemented,
        Rejection::NonAsciiSender,
        Rejection::NonAsciiRecipient,
        Rejection::BadIdnSender,
        Rejection::BadIdnRecipient,
        Rejection::BadDsnParameter,
        Rejection::DataAfterBdat,
        Rejection::BinaryMimeNeedsBdat,
        Rejection::BareLf,
        Rejection::BareCr,
        Rejection::NulInMessage,
        Rejection::TooManyMessages,
        Rejection::TooManyErrors,
        Rejection::OobMixed,
        Rejection::Suppressed,
    ];

    /// Position in [`Rejection::ALL`], for counters kept in a flat array.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn canned(self) -> &'static Canned {
        match self {
            Rejection::UnknownCommand => &UNKNOWN_COMMAND,
            Rejection::NulInCommand => &NUL_IN_COMMAND,
            Rejection::LineTooLong => &LINE_TOO_LONG,
            Rejection::Syntax => &SYNTAX,
            Rejection::BadSender => &BAD_SENDER,
            Rejection::BadRecipient => &BAD_RECIPIENT,
            Rejection::UnknownParameter => &UNKNOWN_PARAMETER,
            Rejection::NeedHelo => &NEED_HELO,
            Rejection::NeedMail => &NEED_MAIL,
            Rejection::NestedMail => &NESTED_MAIL,
            Rejection::NoValidRecipients => &NO_VALID_RECIPIENTS,
            Rejection::SizeExceeded => &SIZE_EXCEEDED,
            Rejection::MessageTooBig => &MESSAGE_TOO_BIG,
            Rejection::DataLineTooLong => &DATA_LINE_TOO_LONG,
            Rejection::TooManyRecipients => &TOO_MANY_RECIPIENTS,
            Rejection::RelayDenied => &RELAY_DENIED,
            Rejection::NotImplemented => &NOT_IMPLEMENTED,
            Rejection::NonAsciiSender => &NON_ASCII_SENDER,
            Rejection::NonAsciiRecipient => &NON_ASCII_RECIPIENT,
            Rejection::BadIdnSender => &BAD_IDN_SENDER,
            Rejection::BadIdnRecipient => &BAD_IDN_RECIPIENT,
            Rejection::BadDsnParameter => &BAD_DSN_PARAMETER,
            Rejection::DataAfterBdat => &DATA_AFTER_BDAT,
            Rejection::BinaryMimeNeedsBdat => &BINARYMIME_NEEDS_BDAT,
            Rejection::BareLf => &BARE_LF,
            Rejection::BareCr => &BARE_CR,
            Rejection::NulInMessage => &NUL_IN_MESSAGE,
            Rejection::TooManyMessages => &TOO_MANY_MESSAGES,
            Rejection::TooManyErrors => &TOO_MANY_ERRORS,
            Rejection::OobMixed => &OOB_MIXED,
            Rejection::Suppressed => &SUPPRESSED,
        }
    }

    /// Whether this counts towards `errors_max`. Only protocol errors do (a client that cannot
    /// speak SMTP, or is probing); policy refusals such as relay denied or too many recipients
    /// are answers to well-formed commands and have their own limits.
    pub fn is_protocol_error(self) -> bool {
        matches!(
            self,
            Rejection::UnknownCommand
                | Rejection::NulInCommand
                | Rejection::LineTooLong
                | Rejection::Syntax
                | Rejection::BadSender
                | Rejection::BadRecipient
                | Rejection::UnknownParameter
                | Rejection::NeedHelo
                | Rejection::NeedMail
                | Rejection::NestedMail
                | Rejection::NoValidRecipients
                | Rejection::BadDsnParameter
                | Rejection::DataAfterBdat
                | Rejection::BinaryMimeNeedsBdat
        )
    }
}

// `ALL` must list every variant exactly once in declaration order for `index` to be valid; the
// test `rejection_index_matches_all` checks the order, this checks the length.
const _: () = assert!(Rejection::ALL.len() == Rejection::Suppressed as usize + 1);

#[cfg(test)]
mod tests {
    use super::*;

    const LEN: usize = 512;

    fn parse_one(wire: &[u8]) -> Reply {
        match parse_reply(wire, LEN) {
            Ok(Some((r, n))) => {
                assert_eq!(n, wire.len());
                r
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_canned_wire_matches_its_parts() {
        let all = [
            OK,
            MAIL_OK,
            RCPT_OK,
            DATA_GO,
            BYE,
            HELP,
            VRFY,
            NOT_IMPLEMENTED,
            UNKNOWN_COMMAND,
            NUL_IN_COMMAND,
            LINE_TOO_LONG,
            SYNTAX,
            BAD_SENDER,
            BAD_RECIPIENT,
            UNKNOWN_PARAMETER,
            NEED_HELO,
            NEED_MAIL,
            NESTED_MAIL,
            NO_VALID_RECIPIENTS,
            SIZE_EXCEEDED,
            MESSAGE_TOO_BIG,
            DATA_LINE_TOO_LONG,
            TOO_MANY_RECIPIENTS,
            RELAY_DENIED,
            TOO_MANY_ERRORS,
            SHUTDOWN,
            INTERNAL,
            NON_ASCII_SENDER,
            NON_ASCII_RECIPIENT,
            BAD_IDN_SENDER,
            BAD_IDN_RECIPIENT,
            BAD_DSN_PARAMETER,
            DATA_AFTER_BDAT,
            BINARYMIME_NEEDS_BDAT,
            BARE_LF,
            BARE_CR,
            NUL_IN_MESSAGE,
            TOO_MANY_MESSAGES,
            OOB_MIXED,
            SUPPRESSED,
            REPORT_OK,
        ];
        for c in all {
            assert_eq!(c.to_reply().to_string().as_bytes(), c.wire, "{c:?}");
            assert_eq!(parse_one(c.wire), c.to_reply());
        }
    }

    #[test]
    fn rejection_index_matches_all() {
        for (i, r) in Rejection::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }

    #[test]
    fn classes() {
        let r = |code| Reply::new(code, None, "");
        assert!(r(250).is_positive() && r(354).is_positive());
        assert!(r(421).is_transient() && !r(421).is_positive());
        assert!(r(550).is_permanent() && !r(550).is_transient());
    }

    #[test]
    fn single_line_with_enhanced_code() {
        let r = parse_one(b"250 2.1.0 Sender ok\r\n");
        assert_eq!(r, Reply::new(250, Some((2, 1, 0)), "Sender ok"));
    }

    #[test]
    fn enhanced_code_of_the_wrong_class_is_text() {
        let r = parse_one(b"550 2.1.0 odd\r\n");
        assert_eq!(r, Reply::new(550, None, "2.1.0 odd"));
    }

    #[test]
    fn multi_line_reply_strips_repeated_enhanced_codes() {
        let wire = b"250-2.0.0 first\r\n250-2.0.0 second\r\n250 2.0.0 third\r\n";
        let r = parse_one(wire);
        assert_eq!(r.enhanced, Some((2, 0, 0)));
        assert_eq!(r.text, "first\nsecond\nthird");
        assert_eq!(r.to_string().as_bytes(), wire);
    }

    #[test]
    fn ehlo_style_reply_round_trips() {
        let wire = b"250-mx.example.com\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 8BITMIME\r\n";
        let r = parse_one(wire);
        assert_eq!(r.enhanced, None);
        assert_eq!(r.lines().count(), 4);
        assert_eq!(r.to_string().as_bytes(), wire);
    }

    #[test]
    fn bare_code_and_bare_lf_are_accepted() {
        assert_eq!(parse_one(b"250\n"), Reply::new(250, None, ""));
        assert_eq!(parse_one(b"250 \r\n").to_string(), "250\r\n");
    }

    #[test]
    fn partial_reply_needs_more() {
        let wire = b"250-a\r\n250-b\r\n250 c\r\n";
        for cut in 0..wire.len() {
            assert_eq!(parse_reply(&wire[..cut], LEN), Ok(None), "cut {cut}");
        }
    }

    #[test]
    fn only_the_first_reply_is_consumed() {
        let wire = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n";
        let (r, n) = parse_reply(wire, LEN).ok().flatten().expect("reply");
        assert_eq!(r.enhanced, Some((2, 1, 0)));
        assert_eq!(n, 14);
    }

    #[test]
    fn malformed_replies_are_errors() {
        for bad in [
            &b"25\r\n"[..],
            b"abc ok\r\n",
            b"650 no\r\n",
            b"260 no\r\n",
            b"250_no\r\n",
        ] {
            assert_eq!(parse_reply(bad, LEN), Err(ReplyError::Malformed), "{bad:?}");
        }
        assert_eq!(
            parse_reply(b"250-a\r\n251 b\r\n", LEN),
            Err(ReplyError::CodeMismatch {
                first: 250,
                then: 251
            })
        );
    }

    #[test]
    fn limits_are_enforced() {
        let long = vec![b'2'; 600];
        assert_eq!(
            parse_reply(&long, LEN),
            Err(ReplyError::LineTooLong { line_len_max: LEN })
        );
        let mut many = Vec::new();
        for _ in 0..=REPLY_LINES_MAX {
            many.extend_from_slice(b"250-x\r\n");
        }
        many.extend_from_slice(b"250 x\r\n");
        assert_eq!(parse_reply(&many, LEN), Err(ReplyError::TooManyLines));
    }

    #[test]
    fn display_strips_stray_cr_and_handles_empty_lines() {
        let r = Reply::new(451, Some((4, 3, 0)), "a\r\n\nb");
        assert_eq!(r.to_string(), "451-4.3.0 a\r\n451-4.3.0\r\n451 4.3.0 b\r\n");
        let r = Reply::new(220, None, "\nx");
        assert_eq!(r.to_string(), "220-\r\n220 x\r\n");
    }
}
