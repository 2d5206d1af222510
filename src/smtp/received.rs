//! The trace header a receiving MTA prepends (RFC 5321 4.4), as a pure function.
//!
//! Job: format `Received:` exactly, from values the adapter already has (our name, the client's
//! EHLO name and address, the queue id, the time). No clock is read here: the time comes in as
//! Unix seconds, so the output is reproducible in tests and in simulation.
//!
//! Invariants:
//! - The result is one header field in wire form: folded lines joined by CRLF + TAB, ending in
//!   CRLF, every byte printable ASCII or TAB except a UTF-8 recipient in an SMTPUTF8 message
//!   (RFC 6532 allows UTF-8 in header fields then).
//! - Client-supplied text (the EHLO name) cannot inject CR, LF or anything outside printable
//!   ASCII into the header: such bytes are dropped.

use std::fmt::Write as _;
use std::net::IpAddr;

use time::format_description::well_known::Rfc2822;
use time::OffsetDateTime;

/// What [`rfc5322_date`] writes for a time past the end of year 9999, the last instant a
/// four-digit year can name. Only a broken clock gets there; a date that is late but well-formed
/// keeps the header parseable everywhere.
const DATE_MAX: &str = "Fri, 31 Dec 9999 23:59:59 +0000";

/// The `with` protocol keyword (RFC 3848 for the ESMTP family, RFC 6531 3.7.3 for UTF8SMTP):
/// `esmtp` is EHLO rather than HELO, `smtputf8` the transaction's MAIL parameter, `tls` a
/// STARTTLS-protected session, `auth` an authenticated client.
pub fn received_protocol(esmtp: bool, smtputf8: bool, tls: bool, auth: bool) -> &'static str {
    match (esmtp || smtputf8, smtputf8, tls, auth) {
        (false, _, _, _) => "SMTP",
        (true, false, false, false) => "ESMTP",
        (true, false, true, false) => "ESMTPS",
        (true, false, false, true) => "ESMTPA",
        (true, false, true, true) => "ESMTPSA",
        (true, true, false, false) => "UTF8SMTP",
        (true, true, true, false) => "UTF8SMTPS",
        (true, true, false, true) => "UTF8SMTPA",
        (true, true, true, true) => "UTF8SMTPSA",
    }
}

/// An RFC 5322 3.3 date-time in UTC for `unix_s` seconds since the epoch, e.g.
/// `Wed, 25 Nov 2026 05:53:25 +0000`: `time`'s RFC 2822 format, which RFC 5322 keeps (day of
/// month two digits, `+0000` for UTC). Times after year 9999 come out as [`DATE_MAX`].
pub fn rfc5322_date(unix_s: u64) -> String {
    i64::try_from(unix_s)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| t.format(&Rfc2822).ok())
        .unwrap_or_else(|| DATE_MAX.to_owned())
}

/// Appends `s` keeping only printable ASCII, so client text cannot break the header.
fn push_printable(out: &mut String, s: &str) {
    out.extend(s.chars().filter(|c| matches!(c, '!'..='~')));
}

/// The `Received:` header field for one message, CRLF-terminated, ready to prepend to the body:
///
/// ```text
/// Received: from client.example ([192.0.2.1])\r\n
/// \tby mx.example.net with ESMTP id 0001AB\r\n
/// \tfor <bob@example.net>; Wed, 25 Nov 2026 05:53:25 +0000\r\n
/// ```
///
/// `from_helo` is the EHLO/HELO name as given, `peer_ip` the client's address (written as an
/// address literal, RFC 5321 4.1.3), `protocol` a keyword from [`received_protocol`], `id` our
/// queue id, `for_rcpt` the recipient when the message has exactly one (RFC 5321 4.4 advises
/// against listing several, which leaks Bcc), and `unix_s` the time of receipt.
pub fn received_header(
    by_host: &str,
    from_helo: &str,
    peer_ip: IpAddr,
    protocol: &str,
    id: &str,
    for_rcpt: Option<&str>,
    unix_s: u64,
) -> String {
    let mut h = String::with_capacity(160);
    h.push_str("Received: from ");
    push_printable(&mut h, from_helo);
    // Writing into a String cannot fail.
    let _ = match peer_ip {
        IpAddr::V4(ip) => write!(h, " ([{ip}])"),
        IpAddr::V6(ip) => write!(h, " ([IPv6:{ip}])"),
    };
    h.push_str("\r\n\tby ");
    push_printable(&mut h, by_host);
    h.push_str(" with ");
    push_printable(&mut h, protocol);
    h.push_str(" id ");
    push_printable(&mut h, id);
    if let Some(rcpt) = for_rcpt {
        h.push_str("\r\n\tfor <");
        // A UTF-8 address is allowed in an SMTPUTF8 message; controls and spaces never are.
        h.extend(rcpt.chars().filter(|c| !c.is_control() && *c != ' '));
        h.push('>');
    }
    h.push_str(";\r\n\t");
    h.push_str(&rfc5322_date(unix_s));
    h.push_str("\r\n");
    h
}

/// Headers a submission server adds when the message lacks them (RFC 6409 §8.2 and §8.3):
/// `Date:` and `Message-ID:`. Only the header section (up to the first empty line) is looked
/// at; names match case-insensitively. Returns the lines to add (empty when none are missing).
pub fn submission_headers(body: &[u8], message_id: &str, host: &str, unix_s: u64) -> String {
    let header_end = find_header_end(body);
    let headers = &body[..header_end];
    let has = |name: &[u8]| {
        super::split_lf(headers).any(|line| {
            line.len() > name.len()
                && line[..name.len()].eq_ignore_ascii_case(name)
                && line[name.len()] == b':'
        })
    };
    let mut add = String::new();
    if !has(b"Date") {
        add.push_str("Date: ");
        add.push_str(&rfc5322_date(unix_s));
        add.push_str("\r\n");
    }
    if !has(b"Message-ID") {
        add.push_str("Message-ID: <");
        push_printable(&mut add, message_id);
        add.push('@');
        push_printable(&mut add, host);
        add.push_str(">\r\n");
    }
    add
}

/// Length of the header section: up to and including the first empty line, or all of `body`.
fn find_header_end(body: &[u8]) -> usize {
    let mut line_start = 0;
    for i in memchr::memchr_iter(b'\n', body) {
        let line = &body[line_start..i];
        if line.is_empty() || line == b"\r" {
            return line_start;
        }
        line_start = i + 1;
    }
    body.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// 2026-11-25 05:53:25 UTC, a Wednesday.
    const T: u64 = 1_795_586_005;

    #[test]
    fn submission_headers_fill_only_what_is_missing() {
        let bare = b"Subject: hi\r\n\r\nDate: in the body does not count\r\n";
        assert_eq!(
            submission_headers(bare, "abc.0.1", "mx.test", T),
            "Date: Wed, 25 Nov 2026 05:53:25 +0000\r\nMessage-ID: <abc.0.1@mx.test>\r\n"
        );
        let full = b"date: Tue, 1 Jan 2030 00:00:00 +0000\r\nMESSAGE-ID: <x@y>\r\n\r\nbody\r\n";
        assert_eq!(submission_headers(full, "abc", "mx.test", T), "");
        let no_body = b"Message-Id: <x@y>\r\n";
        assert!(submission_headers(no_body, "a", "h", T).starts_with("Date: "));
        assert!(
            !submission_headers(b"Dated: x\r\n\r\n", "a", "h", T).is_empty(),
            "exact names"
        );
    }

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(T), "Wed, 25 Nov 2026 05:53:25 +0000");
        // Leap day, and the day after.
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(rfc5322_date(951_868_799), "Tue, 29 Feb 2000 23:59:59 +0000");
        assert_eq!(rfc5322_date(951_868_800), "Wed, 01 Mar 2000 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_704_067_199),
            "Sun, 31 Dec 2023 23:59:59 +0000"
        );
        // The last second of year 9999, and past it (a broken clock) the same.
        assert_eq!(rfc5322_date(253_402_300_799), DATE_MAX);
        assert_eq!(rfc5322_date(253_402_300_800), DATE_MAX);
        assert_eq!(rfc5322_date(u64::MAX), DATE_MAX);
    }

    #[test]
    fn exact_format_with_one_recipient() {
        let h = received_header(
            "mx.example.net",
            "client.example",
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            "ESMTP",
            "0001AB",
            Some("bob@example.net"),
            T,
        );
        assert_eq!(
            h,
            "Received: from client.example ([192.0.2.1])\r\n\
             \tby mx.example.net with ESMTP id 0001AB\r\n\
             \tfor <bob@example.net>;\r\n\
             \tWed, 25 Nov 2026 05:53:25 +0000\r\n"
        );
    }

    #[test]
    fn ipv6_no_recipient_and_hostile_helo() {
        let h = received_header(
            "mx.test",
            "evil\r\nX-Injected: 1",
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            "UTF8SMTPS",
            "Q1",
            None,
            0,
        );
        assert_eq!(
            h,
            "Received: from evilX-Injected:1 ([IPv6:::1])\r\n\
             \tby mx.test with UTF8SMTPS id Q1;\r\n\
             \tThu, 01 Jan 1970 00:00:00 +0000\r\n"
        );
        assert_eq!(h.matches("\r\n").count(), 3);
    }

    #[test]
    fn protocols() {
        assert_eq!(received_protocol(false, false, false, false), "SMTP");
        assert_eq!(received_protocol(true, false, false, false), "ESMTP");
        assert_eq!(received_protocol(true, false, true, false), "ESMTPS");
        assert_eq!(received_protocol(true, false, true, true), "ESMTPSA");
        assert_eq!(received_protocol(true, true, false, false), "UTF8SMTP");
        assert_eq!(received_protocol(true, true, true, true), "UTF8SMTPSA");
    }
}
