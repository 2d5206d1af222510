//! SMTP command-line parser (RFC 5321 4.1), borrowing from the line.
//!
//! Job: turn one command line (CRLF already removed) into a [`Command`], or a [`ParseError`] that
//! names the precise reply the server owes (`ParseError::rejection`).
//!
//! Invariants:
//! - Hot path: no I/O, no allocation. Every `&str` in a `Command` is a slice of the input line.
//! - Paths are validated to RFC 5321 4.1.2 syntax: a dot-string or quoted local part, and a domain
//!   of LDH labels or an address literal. Addresses are kept exactly as received (case included,
//!   quotes included); only the source route of an old-style `<@a,@b:x@y>` path is dropped, as
//!   RFC 5321 4.1.1.3 asks.
//! - Paths are ASCII for now; a non-ASCII byte is a path error until SMTPUTF8 (RFC 6531) lands.
//! - Lenient where real clients deviate harmlessly: verbs and parameter keywords are
//!   case-insensitive, spaces after `FROM:`/`TO:` and trailing spaces are accepted.

use std::net::{Ipv4Addr, Ipv6Addr};

use thiserror::Error;

use super::reply::Rejection;

/// RFC 5321 4.5.3.1.1: a local part is at most 64 octets.
pub const LOCAL_PART_LEN_MAX: usize = 64;
/// RFC 5321 4.5.3.1.2: a domain is at most 255 octets.
pub const DOMAIN_LEN_MAX: usize = 255;
/// RFC 5321 4.5.3.1.3: a path, angle brackets included, is at most 256 octets.
pub const PATH_LEN_MAX: usize = 256;
/// RFC 1035 2.3.4: a DNS label is at most 63 octets.
pub const LABEL_LEN_MAX: usize = 63;
/// Most MAIL/RCPT parameters on one command. Every extension we will speak adds one or two
/// (SIZE, BODY, RET, ENVID, AUTH, SMTPUTF8, NOTIFY, ORCPT), so 16 is room to spare while bounding
/// the parameter loop.
pub const PARAMS_MAX: usize = 16;
/// Most digits in a SIZE value. 20 digits covers u64::MAX; longer is junk, not a size.
pub const SIZE_DIGITS_MAX: usize = 20;

/// One parsed command. Variants are added as extensions land (STARTTLS, AUTH, BDAT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// EHLO with the client's claimed name (first word of the argument).
    Ehlo(&'a str),
    /// HELO with the client's claimed name.
    Helo(&'a str),
    /// MAIL FROM; `from` is `None` for the null reverse-path `<>`.
    Mail {
        from: Option<Mailbox<'a>>,
        params: MailParams,
    },
    /// RCPT TO.
    Rcpt {
        to: Mailbox<'a>,
        params: RcptParams,
    },
    Data,
    Rset,
    Noop,
    Quit,
    Vrfy(&'a str),
    Expn(&'a str),
    /// HELP with its optional topic.
    Help(Option<&'a str>),
}

/// A validated `local@domain`, borrowing from the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mailbox<'a> {
    /// `local@domain` exactly as received.
    pub address: &'a str,
    /// The local part, quotes included if it was quoted.
    pub local: &'a str,
    /// The domain or address literal (brackets included).
    pub domain: &'a str,
}

/// BODY= values (RFC 6152).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyType {
    SevenBit,
    EightBitMime,
}

/// Parameters of MAIL FROM that we understand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MailParams {
    /// SIZE= (RFC 1870); saturates at `usize::MAX` so an absurd value is "too big", not a syntax
    /// error.
    pub size: Option<usize>,
    pub body: Option<BodyType>,
}

/// Parameters of RCPT TO that we understand: none yet (DSN's NOTIFY and ORCPT come later).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RcptParams {}

/// Why a command line was refused; each maps to one reply via [`ParseError::rejection`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ParseError {
    #[error("unrecognised command")]
    UnknownCommand,
    #[error("NUL byte in command")]
    Nul,
    #[error("syntax error in arguments")]
    Syntax,
    #[error("bad sender path: {0}")]
    BadSender(PathError),
    #[error("bad recipient path: {0}")]
    BadRecipient(PathError),
    #[error("unsupported parameter")]
    UnknownParameter,
    #[error("bad parameter value")]
    BadParameter,
}

impl ParseError {
    /// The reply the server owes for this error.
    pub fn rejection(self) -> Rejection {
        match self {
            ParseError::UnknownCommand => Rejection::UnknownCommand,
            ParseError::Nul => Rejection::NulInCommand,
            ParseError::Syntax | ParseError::BadParameter => Rejection::Syntax,
            ParseError::BadSender(_) => Rejection::BadSender,
            ParseError::BadRecipient(_) => Rejection::BadRecipient,
            ParseError::UnknownParameter => Rejection::UnknownParameter,
        }
    }
}

/// What is wrong with a `<path>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PathError {
    #[error("path not in angle brackets")]
    NoAngleBrackets,
    #[error("path not terminated by '>'")]
    Unterminated,
    #[error("path longer than {PATH_LEN_MAX} octets")]
    TooLong,
    #[error("bad source route")]
    BadSourceRoute,
    #[error("bad local part")]
    BadLocalPart,
    #[error("local part longer than {LOCAL_PART_LEN_MAX} octets")]
    LocalPartTooLong,
    #[error("address has no domain")]
    MissingDomain,
    #[error("bad domain")]
    BadDomain,
    #[error("domain longer than {DOMAIN_LEN_MAX} octets")]
    DomainTooLong,
    #[error("bad address literal")]
    BadAddressLiteral,
    #[error("null path not allowed here")]
    NullNotAllowed,
    #[error("non-ASCII octet in path")]
    NonAscii,
}

/// Parses one command line without its CRLF (a trailing CR is tolerated).
///
/// Hot path: no I/O, no allocation.
pub fn parse_command(line: &[u8]) -> Result<Command<'_>, ParseError> {
    if line.contains(&0) {
        return Err(ParseError::Nul);
    }
    let line = trim_end(line);
    let (verb, args) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], trim_start(&line[i + 1..])),
        None => (line, &line[line.len()..]),
    };
    let [a, b, c, d] = verb else {
        return Err(ParseError::UnknownCommand);
    };
    let verb = [
        a.to_ascii_uppercase(),
        b.to_ascii_uppercase(),
        c.to_ascii_uppercase(),
        d.to_ascii_uppercase(),
    ];
    match &verb {
        b"EHLO" => Ok(Command::Ehlo(helo_name(args)?)),
        b"HELO" => Ok(Command::Helo(helo_name(args)?)),
        b"MAIL" => parse_mail(args),
        b"RCPT" => parse_rcpt(args),
        b"DATA" => no_args(args, Command::Data),
        b"RSET" => no_args(args, Command::Rset),
        b"QUIT" => no_args(args, Command::Quit),
        // RFC 5321 4.1.1.9: NOOP may carry a string, which is ignored.
        b"NOOP" => Ok(Command::Noop),
        b"VRFY" => Ok(Command::Vrfy(required_text(args)?)),
        b"EXPN" => Ok(Command::Expn(required_text(args)?)),
        b"HELP" => Ok(Command::Help(if args.is_empty() {
            None
        } else {
            Some(text(args)?)
        })),
        _ => Err(ParseError::UnknownCommand),
    }
}

fn trim_end(s: &[u8]) -> &[u8] {
    let mut s = s.strip_suffix(b"\r").unwrap_or(s);
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn trim_start(s: &[u8]) -> &[u8] {
    let mut s = s;
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    s
}

fn no_args<'a>(args: &[u8], cmd: Command<'a>) -> Result<Command<'a>, ParseError> {
    if args.is_empty() {
        Ok(cmd)
    } else {
        Err(ParseError::Syntax)
    }
}

fn text(args: &[u8]) -> Result<&str, ParseError> {
    std::str::from_utf8(args).map_err(|_| ParseError::Syntax)
}

fn required_text(args: &[u8]) -> Result<&str, ParseError> {
    if args.is_empty() {
        return Err(ParseError::Syntax);
    }
    text(args)
}

/// The EHLO/HELO argument. Clients send all sorts of names here (bare hostnames, unbracketed IPs),
/// and rejecting them gains nothing, so any printable ASCII word is accepted; extra words are
/// ignored.
fn helo_name(args: &[u8]) -> Result<&str, ParseError> {
    let word = match args.iter().position(|&b| b == b' ') {
        Some(i) => &args[..i],
        None => args,
    };
    if word.is_empty() || !word.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(ParseError::Syntax);
    }
    text(word)
}

/// Strips a case-insensitive keyword such as `FROM:` from the front of `args`.
fn strip_keyword<'a>(args: &'a [u8], keyword: &[u8]) -> Option<&'a [u8]> {
    if args.len() >= keyword.len() && args[..keyword.len()].eq_ignore_ascii_case(keyword) {
        Some(&args[keyword.len()..])
    } else {
        None
    }
}

fn parse_mail(args: &[u8]) -> Result<Command<'_>, ParseError> {
    let rest = strip_keyword(args, b"FROM:").ok_or(ParseError::Syntax)?;
    let rest = trim_start(rest);
    let (from, n) = parse_path(rest).map_err(ParseError::BadSender)?;
    let params = mail_params(after_path(&rest[n..]).ok_or(ParseError::Syntax)?)?;
    Ok(Command::Mail { from, params })
}

fn parse_rcpt(args: &[u8]) -> Result<Command<'_>, ParseError> {
    let rest = strip_keyword(args, b"TO:").ok_or(ParseError::Syntax)?;
    let rest = trim_start(rest);
    let (to, n) = parse_path(rest).map_err(ParseError::BadRecipient)?;
    let to = to.ok_or(ParseError::BadRecipient(PathError::NullNotAllowed))?;
    let params = rcpt_params(after_path(&rest[n..]).ok_or(ParseError::Syntax)?)?;
    Ok(Command::Rcpt { to, params })
}

/// What follows a path must be nothing or a space and parameters.
fn after_path(rest: &[u8]) -> Option<&[u8]> {
    match rest {
        [] => Some(rest),
        [b' ', ..] => Some(trim_start(rest)),
        _ => None,
    }
}

/// Splits `KEY=VALUE KEY2` into (key, optional value) pairs, at most [`PARAMS_MAX`].
fn params(s: &[u8]) -> impl Iterator<Item = Result<(&[u8], Option<&[u8]>), ParseError>> + '_ {
    s.split(|&b| b == b' ')
        .filter(|w| !w.is_empty())
        .enumerate()
        .map(|(i, word)| {
            if i >= PARAMS_MAX {
                return Err(ParseError::BadParameter);
            }
            Ok(match word.iter().position(|&b| b == b'=') {
                Some(eq) => (&word[..eq], Some(&word[eq + 1..])),
                None => (word, None),
            })
        })
}

fn mail_params(s: &[u8]) -> Result<MailParams, ParseError> {
    let mut out = MailParams::default();
    for param in params(s) {
        let (key, value) = param?;
        if key.eq_ignore_ascii_case(b"SIZE") {
            let value = value.ok_or(ParseError::BadParameter)?;
            if out.size.is_some() {
                return Err(ParseError::BadParameter);
            }
            out.size = Some(parse_size(value)?);
        } else if key.eq_ignore_ascii_case(b"BODY") {
            let value = value.ok_or(ParseError::BadParameter)?;
            if out.body.is_some() {
                return Err(ParseError::BadParameter);
            }
            out.body = Some(if value.eq_ignore_ascii_case(b"7BIT") {
                BodyType::SevenBit
            } else if value.eq_ignore_ascii_case(b"8BITMIME") {
                BodyType::EightBitMime
            } else {
                return Err(ParseError::BadParameter);
            });
        } else {
            return Err(ParseError::UnknownParameter);
        }
    }
    Ok(out)
}

fn rcpt_params(s: &[u8]) -> Result<RcptParams, ParseError> {
    if let Some(param) = params(s).next() {
        param?;
        return Err(ParseError::UnknownParameter);
    }
    Ok(RcptParams {})
}

fn parse_size(value: &[u8]) -> Result<usize, ParseError> {
    if value.is_empty() || value.len() > SIZE_DIGITS_MAX || !value.iter().all(u8::is_ascii_digit) {
        return Err(ParseError::BadParameter);
    }
    Ok(value.iter().fold(0usize, |n, d| {
        n.saturating_mul(10).saturating_add(usize::from(d - b'0'))
    }))
}

/// Parses `<...>` at the start of `s`: `Ok((None, 2))` for `<>`, otherwise the mailbox and the
/// number of bytes the path took.
///
/// Hot path: no I/O, no allocation.
pub fn parse_path(s: &[u8]) -> Result<(Option<Mailbox<'_>>, usize), PathError> {
    if s.first() != Some(&b'<') {
        return Err(PathError::NoAngleBrackets);
    }
    let mut i = 1;
    if s.get(i) == Some(&b'>') {
        return Ok((None, 2));
    }
    if s.get(i) == Some(&b'@') {
        i = skip_source_route(s, i)?;
    }
    let (mailbox, end) = parse_mailbox_at(s, i)?;
    match s.get(end) {
        Some(b'>') => {}
        None => return Err(PathError::Unterminated),
        Some(b) if !b.is_ascii() => return Err(PathError::NonAscii),
        Some(_) => return Err(PathError::BadDomain),
    }
    if end + 1 > PATH_LEN_MAX {
        return Err(PathError::TooLong);
    }
    Ok((Some(mailbox), end + 1))
}

/// Validates a bare `local@domain` (no angle brackets), as the client does before writing it.
pub fn parse_mailbox(address: &str) -> Result<Mailbox<'_>, PathError> {
    let (mailbox, end) = parse_mailbox_at(address.as_bytes(), 0)?;
    if end != address.len() {
        return Err(PathError::BadDomain);
    }
    if end + 2 > PATH_LEN_MAX {
        return Err(PathError::TooLong);
    }
    Ok(mailbox)
}

/// Skips `@a,@b:` (RFC 5321 4.1.2 A-d-l), which servers must accept and ignore.
fn skip_source_route(s: &[u8], mut i: usize) -> Result<usize, PathError> {
    loop {
        if s.get(i) != Some(&b'@') {
            return Err(PathError::BadSourceRoute);
        }
        let start = i + 1;
        let len = s[start..]
            .iter()
            .position(|&b| b == b',' || b == b':')
            .ok_or(PathError::BadSourceRoute)?;
        if !is_domain(&s[start..start + len]) {
            return Err(PathError::BadSourceRoute);
        }
        i = start + len + 1;
        if s[start + len] == b':' {
            return Ok(i);
        }
    }
}

/// Parses `local@domain` starting at `s[start]`; returns the mailbox and the index after it.
fn parse_mailbox_at(s: &[u8], start: usize) -> Result<(Mailbox<'_>, usize), PathError> {
    let mut i = start;
    if s.get(i) == Some(&b'"') {
        i = quoted_string_end(s, i)?;
    } else {
        i = dot_string_end(s, i)?;
    }
    let local_end = i;
    if local_end - start > LOCAL_PART_LEN_MAX {
        return Err(PathError::LocalPartTooLong);
    }
    match s.get(i) {
        Some(b'@') => {}
        Some(b'>') | None => return Err(PathError::MissingDomain),
        Some(b) if !b.is_ascii() => return Err(PathError::NonAscii),
        Some(_) => return Err(PathError::BadLocalPart),
    }
    i += 1;
    let domain_start = i;
    if s.get(i) == Some(&b'[') {
        let len = s[i..]
            .iter()
            .position(|&b| b == b']')
            .ok_or(PathError::BadAddressLiteral)?;
        if !is_address_literal(&s[i + 1..i + len]) {
            return Err(PathError::BadAddressLiteral);
        }
        i += len + 1;
    } else {
        while let Some(b) = s.get(i) {
            if b.is_ascii_alphanumeric() || *b == b'-' || *b == b'.' {
                i += 1;
            } else {
                break;
            }
        }
        if i - domain_start > DOMAIN_LEN_MAX {
            return Err(PathError::DomainTooLong);
        }
        if !is_domain(&s[domain_start..i]) {
            return Err(PathError::BadDomain);
        }
    }
    if i - domain_start > DOMAIN_LEN_MAX {
        return Err(PathError::DomainTooLong);
    }
    // Every byte accepted above is ASCII, so the conversion cannot fail and every index is a char
    // boundary; mapping the error and using `get` keeps the function total without an unwrap.
    let address = ascii(&s[start..i])?;
    let local = address
        .get(..local_end - start)
        .ok_or(PathError::NonAscii)?;
    let domain = address
        .get(domain_start - start..)
        .ok_or(PathError::NonAscii)?;
    Ok((
        Mailbox {
            address,
            local,
            domain,
        },
        i,
    ))
}

fn ascii(r: &[u8]) -> Result<&str, PathError> {
    std::str::from_utf8(r).map_err(|_| PathError::NonAscii)
}

/// RFC 5322 atext, as used by RFC 5321 Atom, as a table: local parts are scanned byte by byte,
/// and a lookup beats searching the list of specials for every byte.
const ATEXT: [bool; 256] = {
    let mut table = [false; 256];
    let specials = b"!#$%&'*+-/=?^_`{|}~";
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let mut i = 0;
    while i < specials.len() {
        table[specials[i] as usize] = true;
        i += 1;
    }
    table
};

#[inline]
fn is_atext(b: u8) -> bool {
    ATEXT[usize::from(b)]
}

/// End of `Atom *("." Atom)` starting at `i`.
fn dot_string_end(s: &[u8], mut i: usize) -> Result<usize, PathError> {
    loop {
        let atom_start = i;
        while s.get(i).is_some_and(|&b| is_atext(b)) {
            i += 1;
        }
        if i == atom_start {
            // Empty atom: leading dot, ".." or trailing dot, or no local part at all.
            return Err(match s.get(i) {
                Some(b) if !b.is_ascii() => PathError::NonAscii,
                _ => PathError::BadLocalPart,
            });
        }
        if s.get(i) == Some(&b'.') {
            i += 1;
        } else {
            return Ok(i);
        }
    }
}

/// End (after the closing quote) of a quoted string starting at `s[i] == '"'`.
fn quoted_string_end(s: &[u8], mut i: usize) -> Result<usize, PathError> {
    i += 1;
    loop {
        match s.get(i) {
            None => return Err(PathError::Unterminated),
            Some(b'"') => return Ok(i + 1),
            // quoted-pairSMTP = "\" followed by %d32-126.
            Some(b'\\') => match s.get(i + 1) {
                Some(b) if (32..=126).contains(b) => i += 2,
                Some(b) if !b.is_ascii() => return Err(PathError::NonAscii),
                _ => return Err(PathError::BadLocalPart),
            },
            // qtextSMTP = %d32-33 / %d35-91 / %d93-126 (the quote and backslash excluded above).
            Some(b) if (32..=126).contains(b) => i += 1,
            Some(b) if !b.is_ascii() => return Err(PathError::NonAscii),
            Some(_) => return Err(PathError::BadLocalPart),
        }
    }
}

/// `sub-domain *("." sub-domain)` with LDH labels of at most [`LABEL_LEN_MAX`] octets.
pub fn is_domain(d: &[u8]) -> bool {
    if d.is_empty() || d.len() > DOMAIN_LEN_MAX {
        return false;
    }
    // One pass, as this runs on every MAIL and RCPT.
    let mut label_len = 0;
    let mut prev = b'.';
    for &b in d {
        if b == b'.' {
            if label_len == 0 || prev == b'-' {
                return false;
            }
            label_len = 0;
        } else if b.is_ascii_alphanumeric() || (b == b'-' && label_len > 0) {
            label_len += 1;
            if label_len > LABEL_LEN_MAX {
                return false;
            }
        } else {
            return false;
        }
        prev = b;
    }
    label_len > 0 && prev != b'-'
}

/// The inside of `[...]`: IPv4, `IPv6:` followed by an IPv6 address, or a general
/// `tag:content` literal (RFC 5321 4.1.3).
fn is_address_literal(inner: &[u8]) -> bool {
    let Ok(inner) = std::str::from_utf8(inner) else {
        return false;
    };
    if inner.parse::<Ipv4Addr>().is_ok() {
        return true;
    }
    let Some(colon) = inner.find(':') else {
        return false;
    };
    let (tag, content) = (&inner[..colon], &inner[colon + 1..]);
    if tag.eq_ignore_ascii_case("IPv6") {
        return content.parse::<Ipv6Addr>().is_ok();
    }
    // General-address-literal: Standardized-tag ":" 1*dcontent, dcontent = %d33-90 / %d94-126.
    let tag_ok = matches!(tag.as_bytes(), [first, .., last] | [first @ last]
        if first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric())
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    tag_ok
        && !content.is_empty()
        && content
            .bytes()
            .all(|b| (33..=90).contains(&b) || (94..=126).contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox<'a>(address: &'a str, local: &'a str, domain: &'a str) -> Mailbox<'a> {
        Mailbox {
            address,
            local,
            domain,
        }
    }

    #[test]
    fn simple_commands_any_case() {
        assert_eq!(parse_command(b"DATA"), Ok(Command::Data));
        assert_eq!(parse_command(b"data"), Ok(Command::Data));
        assert_eq!(parse_command(b"rSeT "), Ok(Command::Rset));
        assert_eq!(parse_command(b"QUIT\r"), Ok(Command::Quit));
        assert_eq!(parse_command(b"NOOP"), Ok(Command::Noop));
        assert_eq!(parse_command(b"NOOP anything"), Ok(Command::Noop));
        assert_eq!(parse_command(b"HELP"), Ok(Command::Help(None)));
        assert_eq!(parse_command(b"HELP mail"), Ok(Command::Help(Some("mail"))));
        assert_eq!(parse_command(b"VRFY bob"), Ok(Command::Vrfy("bob")));
        assert_eq!(parse_command(b"EXPN list"), Ok(Command::Expn("list")));
    }

    #[test]
    fn helo_and_ehlo() {
        assert_eq!(
            parse_command(b"EHLO client.example.org"),
            Ok(Command::Ehlo("client.example.org"))
        );
        assert_eq!(
            parse_command(b"helo [192.0.2.1]"),
            Ok(Command::Helo("[192.0.2.1]"))
        );
        assert_eq!(parse_command(b"EHLO a b"), Ok(Command::Ehlo("a")));
        assert_eq!(parse_command(b"EHLO"), Err(ParseError::Syntax));
        assert_eq!(parse_command(b"EHLO \x01x"), Err(ParseError::Syntax));
    }

    #[test]
    fn arguments_where_none_are_allowed() {
        for line in [&b"DATA x"[..], b"RSET x", b"QUIT now", b"VRFY", b"EXPN"] {
            assert_eq!(parse_command(line), Err(ParseError::Syntax), "{line:?}");
        }
    }

    #[test]
    fn unknown_and_nul() {
        assert_eq!(parse_command(b"FOO"), Err(ParseError::UnknownCommand));
        assert_eq!(
            parse_command(b"MAILFROM:<a@b>"),
            Err(ParseError::UnknownCommand)
        );
        assert_eq!(parse_command(b""), Err(ParseError::UnknownCommand));
        assert_eq!(parse_command(b"NO\0OP"), Err(ParseError::Nul));
        assert_eq!(parse_command(b"MAIL FROM:<a\0@b>"), Err(ParseError::Nul));
    }

    #[test]
    fn mail_from() {
        assert_eq!(
            parse_command(b"MAIL FROM:<Alice@Example.COM>"),
            Ok(Command::Mail {
                from: Some(mailbox("Alice@Example.COM", "Alice", "Example.COM")),
                params: MailParams::default(),
            })
        );
        assert_eq!(
            parse_command(b"mail from:<>"),
            Ok(Command::Mail {
                from: None,
                params: MailParams::default()
            })
        );
        // Lenient: a space after the colon, trailing spaces.
        assert!(matches!(
            parse_command(b"MAIL FROM: <a@b.c>  "),
            Ok(Command::Mail { from: Some(m), .. }) if m.address == "a@b.c"
        ));
    }

    #[test]
    fn mail_params_size_and_body() {
        let Ok(Command::Mail { params, .. }) =
            parse_command(b"MAIL FROM:<a@b.c> size=1000 BODY=8bitmime")
        else {
            panic!("parse")
        };
        assert_eq!(params.size, Some(1000));
        assert_eq!(params.body, Some(BodyType::EightBitMime));
        let Ok(Command::Mail { params, .. }) = parse_command(b"MAIL FROM:<a@b.c> BODY=7BIT") else {
            panic!("parse")
        };
        assert_eq!(params.body, Some(BodyType::SevenBit));
        let Ok(Command::Mail { params, .. }) =
            parse_command(b"MAIL FROM:<a@b.c> SIZE=99999999999999999999")
        else {
            panic!("parse")
        };
        assert_eq!(params.size, Some(usize::MAX));
    }

    #[test]
    fn mail_param_errors() {
        fn bad(l: &[u8]) -> Result<Command<'_>, ParseError> {
            parse_command(l)
        }
        assert_eq!(
            bad(b"MAIL FROM:<a@b.c> FOO=1"),
            Err(ParseError::UnknownParameter)
        );
        assert_eq!(
            bad(b"MAIL FROM:<a@b.c> SIZE=x"),
            Err(ParseError::BadParameter)
        );
        assert_eq!(
            bad(b"MAIL FROM:<a@b.c> SIZE"),
            Err(ParseError::BadParameter)
        );
        assert_eq!(
            bad(b"MAIL FROM:<a@b.c> SIZE=1 SIZE=2"),
            Err(ParseError::BadParameter)
        );
        assert_eq!(
            bad(b"MAIL FROM:<a@b.c> BODY=BINARYMIME"),
            Err(ParseError::BadParameter)
        );
        let mut many = b"MAIL FROM:<a@b.c>".to_vec();
        for _ in 0..=PARAMS_MAX {
            many.extend_from_slice(b" BODY=7BIT");
        }
        assert_eq!(bad(&many), Err(ParseError::BadParameter));
        assert_eq!(bad(b"MAIL FROM:<a@b.c>x"), Err(ParseError::Syntax));
        assert_eq!(bad(b"MAIL TO:<a@b.c>"), Err(ParseError::Syntax));
        assert_eq!(bad(b"MAIL"), Err(ParseError::Syntax));
        assert_eq!(
            ParseError::UnknownParameter.rejection(),
            Rejection::UnknownParameter
        );
        assert_eq!(ParseError::BadParameter.rejection(), Rejection::Syntax);
    }

    #[test]
    fn rcpt_to() {
        assert_eq!(
            parse_command(b"RCPT TO:<bob@example.net>"),
            Ok(Command::Rcpt {
                to: mailbox("bob@example.net", "bob", "example.net"),
                params: RcptParams {}
            })
        );
        assert_eq!(
            parse_command(b"RCPT TO:<>"),
            Err(ParseError::BadRecipient(PathError::NullNotAllowed))
        );
        assert_eq!(
            parse_command(b"RCPT TO:<bob>"),
            Err(ParseError::BadRecipient(PathError::MissingDomain))
        );
        assert_eq!(
            parse_command(b"RCPT TO:<bob@example.net> NOTIFY=NEVER"),
            Err(ParseError::UnknownParameter)
        );
        assert_eq!(
            parse_command(b"RCPT TO:bob@example.net"),
            Err(ParseError::BadRecipient(PathError::NoAngleBrackets))
        );
    }

    #[test]
    fn quoted_local_parts_are_kept_as_given() {
        let Ok(Command::Rcpt { to, .. }) = parse_command(br#"RCPT TO:<"john \"q\" doe>"@x.org>"#)
        else {
            panic!("parse")
        };
        assert_eq!(to.local, r#""john \"q\" doe>""#);
        assert_eq!(to.domain, "x.org");
        assert_eq!(to.address, r#""john \"q\" doe>"@x.org"#);
    }

    #[test]
    fn source_routes_are_dropped() {
        let Ok(Command::Rcpt { to, .. }) = parse_command(b"RCPT TO:<@a.org,@b.org:c@d.org>") else {
            panic!("parse")
        };
        assert_eq!(to.address, "c@d.org");
        assert_eq!(parse_path(b"<@:c@d.org>"), Err(PathError::BadSourceRoute));
    }

    #[test]
    fn address_literals() {
        for ok in [
            &b"<a@[192.0.2.1]>"[..],
            b"<a@[IPv6:2001:db8::1]>",
            b"<a@[ipv6:::1]>",
            b"<a@[x-tag:stuff]>",
        ] {
            assert!(parse_path(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            &b"<a@[192.0.2.300]>"[..],
            b"<a@[IPv6:2001:db8::g]>",
            b"<a@[]>",
            b"<a@[192.0.2.1>",
            b"<a@[-x:y]>",
        ] {
            assert_eq!(
                parse_path(bad).map(|_| ()),
                Err(PathError::BadAddressLiteral),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn path_errors() {
        let cases: [(&[u8], PathError); 14] = [
            (b"<a@b", PathError::Unterminated),
            (b"<.a@b>", PathError::BadLocalPart),
            (b"<a..b@c>", PathError::BadLocalPart),
            (b"<a.@c>", PathError::BadLocalPart),
            (b"<@c>", PathError::BadSourceRoute),
            (b"<a b@c>", PathError::BadLocalPart),
            (b"<a@>", PathError::BadDomain),
            (b"<a@-b.c>", PathError::BadDomain),
            (b"<a@b-.c>", PathError::BadDomain),
            (b"<a@b..c>", PathError::BadDomain),
            (b"<a@b_c.d>", PathError::BadDomain),
            (b"<\xc3\xa9@b.c>", PathError::NonAscii),
            (b"<\"a@b.c>", PathError::Unterminated),
            (b"<\"a\x01\"@b.c>", PathError::BadLocalPart),
        ];
        for (path, err) in cases {
            assert_eq!(parse_path(path).map(|_| ()), Err(err), "{path:?}");
        }
    }

    #[test]
    fn length_limits() {
        let local = "l".repeat(LOCAL_PART_LEN_MAX + 1);
        let path = format!("<{local}@b.c>");
        assert_eq!(
            parse_path(path.as_bytes()).map(|_| ()),
            Err(PathError::LocalPartTooLong)
        );
        let label = "d".repeat(LABEL_LEN_MAX + 1);
        assert!(!is_domain(label.as_bytes()));
        assert!(is_domain("d".repeat(LABEL_LEN_MAX).as_bytes()));
        let domain = vec!["d".repeat(60); 5].join(".");
        let path = format!("<a@{domain}>");
        assert_eq!(
            parse_path(path.as_bytes()).map(|_| ()),
            Err(PathError::DomainTooLong)
        );
        let domain = vec!["d".repeat(60); 4].join(".");
        let path = format!("<{}@{domain}>", "l".repeat(14));
        assert!(path.len() > PATH_LEN_MAX);
        assert_eq!(
            parse_path(path.as_bytes()).map(|_| ()),
            Err(PathError::TooLong)
        );
    }

    #[test]
    fn bare_mailbox_for_the_client() {
        assert_eq!(parse_mailbox("a@b.c").map(|m| m.domain), Ok("b.c"));
        assert!(parse_mailbox("a@b.c\r\nRSET").is_err());
        assert!(parse_mailbox("a@b.c>").is_err());
        assert!(parse_mailbox("a").is_err());
    }
}
