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
//! - Paths in commands may carry UTF-8 (RFC 6531 3.3: UTF8-non-ascii in atext, qtext and
//!   domain labels); the parser only checks that it is well formed. Whether it is allowed (MAIL
//!   said SMTPUTF8) is the session's decision, because it depends on the transaction. Bare
//!   mailboxes the client writes ([`parse_mailbox`]) stay ASCII: we never negotiate SMTPUTF8
//!   outbound yet.
//! - DSN parameters (RFC 3461) are validated here, xtext included, and kept in their raw xtext
//!   form; [`xtext_decode`] turns them into text when the session keeps them.
//! - Lenient where real clients deviate harmlessly: verbs and parameter keywords are
//!   case-insensitive, spaces after `FROM:`/`TO:` and trailing spaces are accepted.

use std::net::{Ipv4Addr, Ipv6Addr};

use memchr::{memchr, memchr2};
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
/// Most digits in a SIZE value or a BDAT chunk size. 20 digits covers u64::MAX; longer is junk,
/// not a size.
pub const SIZE_DIGITS_MAX: usize = 20;
/// RFC 3461 4.4: an ENVID value is at most 100 characters.
pub const ENVID_LEN_MAX: usize = 100;
/// RFC 3461 4.2: an ORCPT value (type, ";" and xtext) is at most 500 characters.
pub const ORCPT_LEN_MAX: usize = 500;

/// One parsed command. Variants are added as extensions land (STARTTLS, AUTH).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// EHLO with the client's claimed name (first word of the argument).
    Ehlo(&'a str),
    /// HELO with the client's claimed name.
    Helo(&'a str),
    /// MAIL FROM; `from` is `None` for the null reverse-path `<>`.
    Mail {
        from: Option<Mailbox<'a>>,
        params: MailParams<'a>,
    },
    /// RCPT TO.
    Rcpt {
        to: Mailbox<'a>,
        params: RcptParams<'a>,
    },
    Data,
    /// BDAT (RFC 3030): `size` octets of message follow the command line, raw; `last` ends the
    /// message. `size` saturates like SIZE=, so an absurd value is drained, not a syntax error.
    Bdat {
        size: usize,
        last: bool,
    },
    Rset,
    /// RFC 3207.
    StartTls,
    /// RFC 4954: `AUTH mechanism [initial-response]`.
    Auth {
        mechanism: &'a str,
        initial: Option<&'a str>,
    },
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

/// BODY= values (RFC 6152, and RFC 3030 for BINARYMIME).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyType {
    SevenBit,
    EightBitMime,
    /// Only valid with BDAT; the session refuses DATA for it.
    BinaryMime,
}

/// RET= (RFC 3461 4.3): how much of the message a failure DSN returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ret {
    Full,
    Hdrs,
}

/// Parameters of MAIL FROM that we understand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MailParams<'a> {
    /// SIZE= (RFC 1870); saturates at `usize::MAX` so an absurd value is "too big", not a syntax
    /// error.
    pub size: Option<usize>,
    pub body: Option<BodyType>,
    /// The SMTPUTF8 keyword (RFC 6531 3.4).
    pub smtputf8: bool,
    /// RET= (RFC 3461 4.3).
    pub ret: Option<Ret>,
    /// ENVID= (RFC 3461 4.4), still xtext-encoded but validated.
    pub envid: Option<&'a str>,
}

/// NOTIFY= (RFC 3461 4.1). All three false means NEVER.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Notify {
    pub success: bool,
    pub failure: bool,
    pub delay: bool,
}

impl Notify {
    /// NOTIFY=NEVER.
    pub fn is_never(self) -> bool {
        !(self.success || self.failure || self.delay)
    }
}

/// ORCPT= (RFC 3461 4.2) as received: `addr_type` (e.g. "rfc822") and the xtext after ";",
/// validated but still encoded. For RFC 6533's `utf-8` type, `xtext` is its
/// `utf-8-addr-xtext` or (with SMTPUTF8, raw UTF-8) `utf-8-addr-unitext`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrcptParam<'a> {
    pub addr_type: &'a str,
    pub xtext: &'a str,
}

/// Parameters of RCPT TO that we understand (DSN's NOTIFY and ORCPT).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RcptParams<'a> {
    pub notify: Option<Notify>,
    pub orcpt: Option<OrcptParam<'a>>,
}

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
    #[error("bad DSN parameter value")]
    BadDsnParameter,
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
            ParseError::BadDsnParameter => Rejection::BadDsnParameter,
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
    #[error("malformed UTF-8 in path")]
    BadUtf8,
}

/// Parses one command line without its CRLF (a trailing CR is tolerated).
///
/// Hot path: no I/O, no allocation.
pub fn parse_command(line: &[u8]) -> Result<Command<'_>, ParseError> {
    if memchr(0, line).is_some() {
        return Err(ParseError::Nul);
    }
    let line = trim_end(line);
    let (verb, args) = match memchr(b' ', line) {
        Some(i) => (&line[..i], trim_start(&line[i + 1..])),
        None => (line, &line[line.len()..]),
    };
    if verb.eq_ignore_ascii_case(b"STARTTLS") {
        return no_args(args, Command::StartTls);
    }
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
        b"BDAT" => parse_bdat(args),
        b"RSET" => no_args(args, Command::Rset),
        b"AUTH" => {
            let args = text(args)?;
            let mut words = args.split(' ').filter(|w| !w.is_empty());
            let mechanism = words.next().ok_or(ParseError::Syntax)?;
            let initial = words.next();
            if words.next().is_some() {
                return Err(ParseError::Syntax);
            }
            Ok(Command::Auth { mechanism, initial })
        }
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
    let word = match memchr(b' ', args) {
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

/// `BDAT chunk-size [LAST]` (RFC 3030 2).
fn parse_bdat(args: &[u8]) -> Result<Command<'_>, ParseError> {
    let mut words = args.split(|&b| b == b' ').filter(|w| !w.is_empty());
    let size =
        parse_size(words.next().ok_or(ParseError::Syntax)?).map_err(|_| ParseError::Syntax)?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case(b"LAST") => true,
        Some(_) => return Err(ParseError::Syntax),
    };
    if words.next().is_some() {
        return Err(ParseError::Syntax);
    }
    Ok(Command::Bdat { size, last })
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
            Ok(match memchr(b'=', word) {
                Some(eq) => (&word[..eq], Some(&word[eq + 1..])),
                None => (word, None),
            })
        })
}

fn mail_params(s: &[u8]) -> Result<MailParams<'_>, ParseError> {
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
            } else if value.eq_ignore_ascii_case(b"BINARYMIME") {
                BodyType::BinaryMime
            } else {
                return Err(ParseError::BadParameter);
            });
        } else if key.eq_ignore_ascii_case(b"SMTPUTF8") {
            // RFC 6531 3.4: a keyword without a value.
            if value.is_some() || out.smtputf8 {
                return Err(ParseError::BadParameter);
            }
            out.smtputf8 = true;
        } else if key.eq_ignore_ascii_case(b"RET") {
            let value = value.ok_or(ParseError::BadDsnParameter)?;
            if out.ret.is_some() {
                return Err(ParseError::BadDsnParameter);
            }
            out.ret = Some(if value.eq_ignore_ascii_case(b"FULL") {
                Ret::Full
            } else if value.eq_ignore_ascii_case(b"HDRS") {
                Ret::Hdrs
            } else {
                return Err(ParseError::BadDsnParameter);
            });
        } else if key.eq_ignore_ascii_case(b"ENVID") {
            let value = value.ok_or(ParseError::BadDsnParameter)?;
            if out.envid.is_some() || value.is_empty() || value.len() > ENVID_LEN_MAX {
                return Err(ParseError::BadDsnParameter);
            }
            out.envid = Some(xtext(value)?);
        } else {
            return Err(ParseError::UnknownParameter);
        }
    }
    Ok(out)
}

fn rcpt_params(s: &[u8]) -> Result<RcptParams<'_>, ParseError> {
    let mut out = RcptParams::default();
    for param in params(s) {
        let (key, value) = param?;
        if key.eq_ignore_ascii_case(b"NOTIFY") {
            let value = value.ok_or(ParseError::BadDsnParameter)?;
            if out.notify.is_some() {
                return Err(ParseError::BadDsnParameter);
            }
            out.notify = Some(parse_notify(value)?);
        } else if key.eq_ignore_ascii_case(b"ORCPT") {
            let value = value.ok_or(ParseError::BadDsnParameter)?;
            if out.orcpt.is_some() || value.len() > ORCPT_LEN_MAX {
                return Err(ParseError::BadDsnParameter);
            }
            let semi = memchr(b';', value).ok_or(ParseError::BadDsnParameter)?;
            let (addr_type, rest) = (&value[..semi], &value[semi + 1..]);
            // addr-type is an atom (RFC 3461 4.2); "rfc822" and RFC 6533's "utf-8" in practice.
            if addr_type.is_empty() || !addr_type.iter().all(|&b| is_atext(b)) || rest.is_empty() {
                return Err(ParseError::BadDsnParameter);
            }
            let encoded = if addr_type.eq_ignore_ascii_case(b"utf-8") {
                utf8_addr(rest)?
            } else {
                xtext(rest)?
            };
            out.orcpt = Some(OrcptParam {
                addr_type: std::str::from_utf8(addr_type)
                    .map_err(|_| ParseError::BadDsnParameter)?,
                xtext: encoded,
            });
        } else {
            return Err(ParseError::UnknownParameter);
        }
    }
    Ok(out)
}

/// `NEVER` or a comma list of SUCCESS, FAILURE, DELAY (RFC 3461 4.1); NEVER mixes with nothing.
fn parse_notify(value: &[u8]) -> Result<Notify, ParseError> {
    if value.eq_ignore_ascii_case(b"NEVER") {
        return Ok(Notify::default());
    }
    let mut n = Notify::default();
    for word in value.split(|&b| b == b',') {
        let flag = if word.eq_ignore_ascii_case(b"SUCCESS") {
            &mut n.success
        } else if word.eq_ignore_ascii_case(b"FAILURE") {
            &mut n.failure
        } else if word.eq_ignore_ascii_case(b"DELAY") {
            &mut n.delay
        } else {
            return Err(ParseError::BadDsnParameter);
        };
        if *flag {
            return Err(ParseError::BadDsnParameter);
        }
        *flag = true;
    }
    Ok(n)
}

/// Validates xtext (RFC 3461 4): `xchar` is `!`..`~` except `+` and `=`, and `+XX` encodes any
/// octet in hex. We also refuse encoded octets that are not printable ASCII (space included):
/// these values end up in DSN header fields, where a CR, LF or control byte would let a client
/// inject headers, and RFC 3461 only ever expects printable text in them.
fn xtext(raw: &[u8]) -> Result<&str, ParseError> {
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => {
                let hex = raw.get(i + 1..i + 3).ok_or(ParseError::BadDsnParameter)?;
                let octet = hex_octet(hex).ok_or(ParseError::BadDsnParameter)?;
                if !(0x20..=0x7e).contains(&octet) {
                    return Err(ParseError::BadDsnParameter);
                }
                i += 3;
            }
            b'=' => return Err(ParseError::BadDsnParameter),
            0x21..=0x7e => i += 1,
            _ => return Err(ParseError::BadDsnParameter),
        }
    }
    // Every byte checked above is ASCII.
    std::str::from_utf8(raw).map_err(|_| ParseError::BadDsnParameter)
}

/// Validates RFC 6533 §3's `utf-8-addr-xtext` and `utf-8-addr-unitext`: printable ASCII but
/// `+`, `=` and `\`; `\x{HEX}` for a code point (1 to 6 hex digits); and, in unitext, UTF-8
/// characters. Control characters are refused, encoded or not: the value ends up in a DSN
/// header field.
fn utf8_addr(raw: &[u8]) -> Result<&str, ParseError> {
    let text = std::str::from_utf8(raw).map_err(|_| ParseError::BadDsnParameter)?;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let c = match c {
            '\\' => {
                let body = rest
                    .strip_prefix("\\x{")
                    .ok_or(ParseError::BadDsnParameter)?;
                let end = body.find('}').ok_or(ParseError::BadDsnParameter)?;
                let hex = &body[..end];
                if hex.is_empty() || hex.len() > 6 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(ParseError::BadDsnParameter);
                }
                rest = &body[end + 1..];
                u32::from_str_radix(hex, 16)
                    .ok()
                    .and_then(char::from_u32)
                    .ok_or(ParseError::BadDsnParameter)?
            }
            '+' | '=' => return Err(ParseError::BadDsnParameter),
            c => {
                rest = &rest[c.len_utf8()..];
                c
            }
        };
        if c.is_control() || c == ' ' {
            return Err(ParseError::BadDsnParameter);
        }
    }
    Ok(text)
}

/// `\x{HEX}` for every non-ASCII character: the ASCII `utf-8-addr-xtext` form of a validated
/// `utf-8` ORCPT (RFC 6533 §3), which fits a message/delivery-status field.
pub fn utf8_addr_ascii(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            out.push_str(&format!("\\x{{{:X}}}", u32::from(c)));
        }
    }
    out
}

/// Two hex digits to an octet. Lowercase is accepted although RFC 3461 says uppercase: being
/// strict would bounce nothing and lose the client's DSN request.
fn hex_octet(hex: &[u8]) -> Option<u8> {
    let digit = |b: u8| (b as char).to_digit(16);
    match hex {
        [h, l] => Some((digit(*h)? * 16 + digit(*l)?) as u8),
        _ => None,
    }
}

/// Decodes xtext that the parser validated (`MailParams::envid`, `OrcptParam::xtext`). Total: a
/// malformed `+` escape (only possible for unvalidated input) is kept literally.
pub fn xtext_decode(raw: &str) -> String {
    let b = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+' {
            if let Some(octet) = b.get(i + 1..i + 3).and_then(hex_octet) {
                if octet.is_ascii() {
                    out.push(char::from(octet));
                    i += 3;
                    continue;
                }
            }
        }
        out.push(char::from(b[i]));
        i += 1;
    }
    out
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
/// number of bytes the path took. UTF-8 is accepted (RFC 6531 3.3); the caller decides whether
/// the transaction allows it (`!mailbox.address.is_ascii()`).
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
    let (mailbox, end) = parse_mailbox_at(s, i, true)?;
    match s.get(end) {
        Some(b'>') => {}
        None => return Err(PathError::Unterminated),
        Some(_) => return Err(PathError::BadDomain),
    }
    if end + 1 > PATH_LEN_MAX {
        return Err(PathError::TooLong);
    }
    Ok((Some(mailbox), end + 1))
}

/// Validates a bare ASCII `local@domain` (no angle brackets), as the client does before writing
/// it.
pub fn parse_mailbox(address: &str) -> Result<Mailbox<'_>, PathError> {
    parse_whole_mailbox(address, false)
}

/// A whole `address` as one mailbox, within the path length limit.
fn parse_whole_mailbox(address: &str, utf8: bool) -> Result<Mailbox<'_>, PathError> {
    let (mailbox, end) = parse_mailbox_at(address.as_bytes(), 0, utf8)?;
    if end != address.len() {
        return Err(PathError::BadDomain);
    }
    if end + 2 > PATH_LEN_MAX {
        return Err(PathError::TooLong);
    }
    Ok(mailbox)
}

/// Like [`parse_mailbox`], also accepting UTF-8 local parts and domains (RFC 6531), for
/// messages sent with SMTPUTF8.
pub fn parse_mailbox_utf8(address: &str) -> Result<Mailbox<'_>, PathError> {
    parse_whole_mailbox(address, true)
}

/// Skips `@a,@b:` (RFC 5321 4.1.2 A-d-l), which servers must accept and ignore.
fn skip_source_route(s: &[u8], mut i: usize) -> Result<usize, PathError> {
    loop {
        if s.get(i) != Some(&b'@') {
            return Err(PathError::BadSourceRoute);
        }
        let start = i + 1;
        let len = memchr2(b',', b':', &s[start..]).ok_or(PathError::BadSourceRoute)?;
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
/// `utf8` admits non-ASCII octets where RFC 6531 3.3 does (local part and domain labels).
fn parse_mailbox_at(s: &[u8], start: usize, utf8: bool) -> Result<(Mailbox<'_>, usize), PathError> {
    let mut i = start;
    if s.get(i) == Some(&b'"') {
        i = quoted_string_end(s, i, utf8)?;
    } else {
        i = dot_string_end(s, i, utf8)?;
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
        let len = memchr(b']', &s[i..]).ok_or(PathError::BadAddressLiteral)?;
        if !is_address_literal(&s[i + 1..i + len]) {
            return Err(PathError::BadAddressLiteral);
        }
        i += len + 1;
    } else {
        while let Some(b) = s.get(i) {
            if b.is_ascii_alphanumeric() || *b == b'-' || *b == b'.' || (utf8 && !b.is_ascii()) {
                i += 1;
            } else {
                break;
            }
        }
        if i - domain_start > DOMAIN_LEN_MAX {
            return Err(PathError::DomainTooLong);
        }
        if !is_domain_with(&s[domain_start..i], utf8) {
            return Err(PathError::BadDomain);
        }
    }
    if i - domain_start > DOMAIN_LEN_MAX {
        return Err(PathError::DomainTooLong);
    }
    // Non-ASCII octets were only admitted when `utf8`, and must form valid UTF-8 then. The
    // split points are next to ASCII '@', so they are char boundaries; mapping the error and
    // using `get` keeps the function total without an unwrap.
    let address = std::str::from_utf8(&s[start..i]).map_err(|_| PathError::BadUtf8)?;
    let local = address.get(..local_end - start).ok_or(PathError::BadUtf8)?;
    let domain = address
        .get(domain_start - start..)
        .ok_or(PathError::BadUtf8)?;
    Ok((
        Mailbox {
            address,
            local,
            domain,
        },
        i,
    ))
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
fn dot_string_end(s: &[u8], mut i: usize, utf8: bool) -> Result<usize, PathError> {
    loop {
        let atom_start = i;
        while s
            .get(i)
            .is_some_and(|&b| is_atext(b) || (utf8 && !b.is_ascii()))
        {
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
fn quoted_string_end(s: &[u8], mut i: usize, utf8: bool) -> Result<usize, PathError> {
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
            // qtextSMTP = %d32-33 / %d35-91 / %d93-126 (the quote and backslash excluded above),
            // plus UTF8-non-ascii under RFC 6531.
            Some(b) if (32..=126).contains(b) || (utf8 && !b.is_ascii()) => i += 1,
            Some(b) if !b.is_ascii() => return Err(PathError::NonAscii),
            Some(_) => return Err(PathError::BadLocalPart),
        }
    }
}

/// `sub-domain *("." sub-domain)` with LDH labels of at most [`LABEL_LEN_MAX`] octets.
pub fn is_domain(d: &[u8]) -> bool {
    is_domain_with(d, false)
}

/// [`is_domain`], also admitting U-label octets (RFC 6531 3.3) when `utf8`. A U-label is only
/// checked for shape here (non-ASCII octets inside an LDH-shaped label, at most
/// [`LABEL_LEN_MAX`] octets); full IDNA2008 validation belongs to whoever converts it to an
/// A-label for DNS.
fn is_domain_with(d: &[u8], utf8: bool) -> bool {
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
        } else if b.is_ascii_alphanumeric()
            || (b == b'-' && label_len > 0)
            || (utf8 && !b.is_ascii())
        {
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
            bad(b"MAIL FROM:<a@b.c> BODY=BINARY"),
            Err(ParseError::BadParameter)
        );
        assert_eq!(
            bad(b"MAIL FROM:<a@b.c> SMTPUTF8=yes"),
            Err(ParseError::BadParameter)
        );
        assert_eq!(
            bad(b"MAIL FROM:<a@b.c> SMTPUTF8 SMTPUTF8"),
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
                params: RcptParams::default()
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
            parse_command(b"RCPT TO:<bob@example.net> FOO=1"),
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
            (b"<\xc3@b.c>", PathError::BadUtf8),
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

    fn mail_params_of(line: &[u8]) -> Result<MailParams<'_>, ParseError> {
        match parse_command(line)? {
            Command::Mail { params, .. } => Ok(params),
            other => panic!("{other:?}"),
        }
    }

    fn rcpt_params_of(line: &[u8]) -> Result<RcptParams<'_>, ParseError> {
        match parse_command(line)? {
            Command::Rcpt { params, .. } => Ok(params),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bdat() {
        assert_eq!(
            parse_command(b"BDAT 1000"),
            Ok(Command::Bdat {
                size: 1000,
                last: false
            })
        );
        assert_eq!(
            parse_command(b"bdat 0 last"),
            Ok(Command::Bdat {
                size: 0,
                last: true
            })
        );
        assert_eq!(
            parse_command(b"BDAT 99999999999999999999 LAST"),
            Ok(Command::Bdat {
                size: usize::MAX,
                last: true
            })
        );
        for bad in [
            &b"BDAT"[..],
            b"BDAT x",
            b"BDAT -1",
            b"BDAT 10 FIRST",
            b"BDAT 10 LAST x",
            b"BDAT 123456789012345678901",
        ] {
            assert_eq!(parse_command(bad), Err(ParseError::Syntax), "{bad:?}");
        }
    }

    #[test]
    fn smtputf8_and_binarymime_params() {
        let p = mail_params_of(b"MAIL FROM:<a@b.c> smtputf8 BODY=BinaryMIME").expect("parse");
        assert!(p.smtputf8);
        assert_eq!(p.body, Some(BodyType::BinaryMime));
        assert!(
            !mail_params_of(b"MAIL FROM:<a@b.c>")
                .expect("parse")
                .smtputf8
        );
    }

    #[test]
    fn utf8_paths_are_parsed_for_the_server_only() {
        // RFC 6531 3.3: UTF-8 local part and U-label domain.
        let line = "MAIL FROM:<pelé@exämple.test> SMTPUTF8";
        let Ok(Command::Mail { from: Some(m), .. }) = parse_command(line.as_bytes()) else {
            panic!("parse")
        };
        assert_eq!((m.local, m.domain), ("pelé", "exämple.test"));
        let Ok(Command::Rcpt { to, .. }) =
            parse_command("RCPT TO:<\"用 户\"@例子.测试>".as_bytes())
        else {
            panic!("parse")
        };
        assert_eq!(to.address, "\"用 户\"@例子.测试");
        // Malformed UTF-8 is still refused, wherever it is.
        for bad in [&b"<a\xff@b.c>"[..], b"<a@b\xc3.c>", b"<\"\xe4\xbd\"@b.c>"] {
            assert_eq!(
                parse_path(bad).map(|_| ()),
                Err(PathError::BadUtf8),
                "{bad:?}"
            );
        }
        // Labels still may not start or end with a hyphen.
        assert_eq!(
            parse_path("<a@-é.c>".as_bytes()).map(|_| ()),
            Err(PathError::BadDomain)
        );
        // The client validates with the ASCII rules.
        assert_eq!(parse_mailbox("pelé@b.c"), Err(PathError::NonAscii));
        assert_eq!(parse_mailbox("a@bé.c"), Err(PathError::BadDomain));
    }

    #[test]
    fn dsn_mail_params() {
        let p = mail_params_of(b"MAIL FROM:<a@b.c> RET=hdrs ENVID=QQ314159+2Bx").expect("parse");
        assert_eq!(p.ret, Some(Ret::Hdrs));
        assert_eq!(p.envid, Some("QQ314159+2Bx"));
        assert_eq!(xtext_decode("QQ314159+2Bx"), "QQ314159+x");
        assert_eq!(
            mail_params_of(b"MAIL FROM:<a@b.c> RET=FULL").map(|p| p.ret),
            Ok(Some(Ret::Full))
        );
        let envid_max = format!("MAIL FROM:<a@b.c> ENVID={}", "e".repeat(ENVID_LEN_MAX));
        assert!(mail_params_of(envid_max.as_bytes()).is_ok());
        let envid_long = format!("MAIL FROM:<a@b.c> ENVID={}", "e".repeat(ENVID_LEN_MAX + 1));
        for bad in [
            &b"MAIL FROM:<a@b.c> RET=ALL"[..],
            b"MAIL FROM:<a@b.c> RET",
            b"MAIL FROM:<a@b.c> RET=FULL RET=HDRS",
            b"MAIL FROM:<a@b.c> ENVID=",
            b"MAIL FROM:<a@b.c> ENVID=a+2",
            b"MAIL FROM:<a@b.c> ENVID=a+ZZ",
            b"MAIL FROM:<a@b.c> ENVID=a=b",
            // Encoded CR LF would end up in a DSN header.
            b"MAIL FROM:<a@b.c> ENVID=a+0D+0Ab",
            b"MAIL FROM:<a@b.c> ENVID=+C3+A9",
            b"MAIL FROM:<a@b.c> ENVID=\xc3\xa9",
            envid_long.as_bytes(),
        ] {
            assert_eq!(
                mail_params_of(bad),
                Err(ParseError::BadDsnParameter),
                "{bad:?}"
            );
        }
        assert_eq!(
            ParseError::BadDsnParameter.rejection(),
            Rejection::BadDsnParameter
        );
    }

    #[test]
    fn utf8_orcpt_values() {
        let orcpt = |v: &str| {
            let line = format!("RCPT TO:<b@c.d> ORCPT={v}");
            rcpt_params_of(line.as_bytes()).map(|p| {
                p.orcpt
                    .map(|o| (o.addr_type.to_owned(), o.xtext.to_owned()))
            })
        };
        let ok = |t: &str, x: &str| Ok(Some((t.to_owned(), x.to_owned())));
        assert_eq!(orcpt("utf-8;a\\x{E9}b@c.d"), ok("utf-8", "a\\x{E9}b@c.d"));
        assert_eq!(orcpt("utf-8;a\u{e9}b@c.d"), ok("utf-8", "a\u{e9}b@c.d"));
        for bad in [
            "utf-8;a\\x{}b",
            "utf-8;a\\x{110000}b",
            "utf-8;a\\x{1234567}",
            "utf-8;a\\xE9",
            "utf-8;a+40b",
            "utf-8;a\\x{7}b",
            "utf-8;a\u{85}b",
            "utf-8;a=b",
        ] {
            assert_eq!(orcpt(bad), Err(ParseError::BadDsnParameter), "{bad}");
        }
        assert_eq!(
            utf8_addr_ascii("j\u{f8}rn\u{1f600}@x"),
            "j\\x{F8}rn\\x{1F600}@x"
        );
    }

    #[test]
    fn dsn_rcpt_params() {
        let p = rcpt_params_of(b"RCPT TO:<b@c.d> NOTIFY=SUCCESS,delay ORCPT=rfc822;b+40c.d")
            .expect("parse");
        assert_eq!(
            p.notify,
            Some(Notify {
                success: true,
                failure: false,
                delay: true
            })
        );
        assert_eq!(
            p.orcpt,
            Some(OrcptParam {
                addr_type: "rfc822",
                xtext: "b+40c.d"
            })
        );
        assert_eq!(xtext_decode("b+40c.d"), "b@c.d");
        let never = rcpt_params_of(b"RCPT TO:<b@c.d> NOTIFY=NEVER").expect("parse");
        assert!(never.notify.is_some_and(Notify::is_never));
        let orcpt_max = format!(
            "RCPT TO:<b@c.d> ORCPT=rfc822;{}",
            "o".repeat(ORCPT_LEN_MAX - 7)
        );
        assert!(rcpt_params_of(orcpt_max.as_bytes()).is_ok());
        let orcpt_long = format!(
            "RCPT TO:<b@c.d> ORCPT=rfc822;{}",
            "o".repeat(ORCPT_LEN_MAX - 6)
        );
        for bad in [
            &b"RCPT TO:<b@c.d> NOTIFY=NEVER,SUCCESS"[..],
            b"RCPT TO:<b@c.d> NOTIFY=SUCCESS,SUCCESS",
            b"RCPT TO:<b@c.d> NOTIFY=",
            b"RCPT TO:<b@c.d> NOTIFY=SUCCESS,",
            b"RCPT TO:<b@c.d> NOTIFY=ALWAYS",
            b"RCPT TO:<b@c.d> NOTIFY=NEVER NOTIFY=NEVER",
            b"RCPT TO:<b@c.d> ORCPT=b@c.d",
            b"RCPT TO:<b@c.d> ORCPT=;b@c.d",
            b"RCPT TO:<b@c.d> ORCPT=rfc822;",
            b"RCPT TO:<b@c.d> ORCPT=rf(c;b@c.d",
            b"RCPT TO:<b@c.d> ORCPT=rfc822;b+0Ac.d",
            orcpt_long.as_bytes(),
        ] {
            assert_eq!(
                rcpt_params_of(bad),
                Err(ParseError::BadDsnParameter),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn xtext_decode_is_total() {
        assert_eq!(xtext_decode(""), "");
        assert_eq!(xtext_decode("a+2"), "a+2");
        assert_eq!(xtext_decode("+ZZ+41"), "+ZZA");
        assert_eq!(xtext_decode("+C3"), "+C3");
    }

    #[test]
    fn bare_mailbox_for_the_client() {
        assert_eq!(parse_mailbox("a@b.c").map(|m| m.domain), Ok("b.c"));
        assert!(parse_mailbox("a@b.c\r\nRSET").is_err());
        assert!(parse_mailbox("a@b.c>").is_err());
        assert!(parse_mailbox("a").is_err());
    }
}
