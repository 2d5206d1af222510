//! The inbound SMTP session (RFC 5321 server side) as a state machine.
//!
//! Job: given the bytes a client sent, produce the replies it is owed and hand complete
//! transactions (envelope and body) to the caller. The glommio adapter owns the socket, the
//! timers and the spool; this owns the protocol.
//!
//! Driving it: `greeting`, then repeatedly `input` what was read and `poll` until it returns
//! `NeedInput`, writing `out` after each `poll` (all replies of a pipelined batch land in `out`
//! together, in order, so they go out in one write). On `Step::Message` the session stops
//! consuming input until `message_done` reports whether the spool took the message; commands
//! pipelined after the final dot stay buffered meanwhile. On `Step::Close` close the connection.
//!
//! Invariants:
//! - No I/O, no clock: timeouts are the adapter's timers calling `timeout`.
//! - Replies come out in command order, one per command (RFC 2920), and every reply except the
//!   greeting, EHLO/HELO, 221 and 354 carries an enhanced status code.
//! - Buffered input is bounded while commands are read: a line that reaches `line_len_max`
//!   without an LF is answered with `500 5.5.6` and its bytes are discarded up to the next LF.
//!   While the session waits for `message_done` it does not consume input; `wants_input` tells
//!   the adapter to stop reading then.
//! - A message body never holds more than `size_max` bytes; bigger messages are drained and
//!   refused (see `data`).
//! - The transaction (MAIL, RCPTs, BDAT chunks so far) is reset by RSET, EHLO/HELO, the end of
//!   DATA, the LAST chunk, and any refusal of the message, so nothing leaks from one message into
//!   the next.
//! - BDAT (RFC 3030): the chunk's octets are always consumed, whether the chunk is accepted or
//!   not, so a refused BDAT never leaves message bytes to be read as commands. Its reply is
//!   written once the chunk has been read, as RFC 3030 asks.
//! - SMTPUTF8 (RFC 6531): non-ASCII addresses are accepted only in a transaction whose MAIL
//!   carried SMTPUTF8; otherwise `553 5.6.7`.

use std::io::Write as _;
use std::rc::Rc;

use base64::Engine as _;

use thiserror::Error;

use super::data::{DataError, DataReader};
use super::parser::{
    parse_command, utf8_addr_ascii, xtext_decode, BodyType, Command, MailParams, Mailbox, Notify,
    RcptParams, Ret,
};
use super::reply::{self, Rejection, Reply};

/// RFC 5321 4.5.3.1.8: a server must accept at least 100 recipients per message.
pub const RCPTS_MAX_RFC: usize = 100;
/// RFC 5321 4.5.3.1.4: a command line is at most 512 octets, CRLF included.
pub const LINE_LEN_MAX_RFC: usize = 512;
/// Default `line_len_max`. Service extensions may lengthen command lines (RFC 5321 4.5.3.1.4),
/// and DSN does by a lot: ORCPT alone may be 500 characters (RFC 3461 4.2), on top of a
/// 256-octet path and NOTIFY. 1024 holds the longest DSN RCPT line, with room, while still
/// bounding what one line can make us buffer.
pub const LINE_LEN_MAX_DEFAULT: usize = 1024;
const _: () = assert!(
    LINE_LEN_MAX_DEFAULT >= LINE_LEN_MAX_RFC + super::parser::ORCPT_LEN_MAX,
    "a DSN RCPT line must fit the default line limit"
);
/// RFC 5321 4.5.3.1.6: a text line is at most 1000 octets, CRLF included.
pub const DATA_LINE_LEN_MAX_RFC: usize = 1000;
/// The most an operator may raise `data_line_len_max` to. Lines this long only come from broken
/// generators, and downstream relays and MUAs start truncating well before 64 KiB.
pub const DATA_LINE_LEN_MAX_CEILING: usize = 64 * 1024;
/// Default `size_max`: 25 MiB is what the large mailbox providers accept, so a bigger message
/// would bounce downstream anyway.
pub const SIZE_MAX_DEFAULT: usize = 25 * 1024 * 1024;
/// Default `errors_max`: a client that sends ten bad commands is not an MTA having a bad day.
pub const ERRORS_MAX_DEFAULT: usize = 10;
/// Most body capacity reserved up front from a SIZE= declaration. The declaration is only a hint
/// (and free to lie), so reserving all of it would let idle connections pin memory; past 1 MiB
/// the Vec's doubling costs little.
pub const BODY_RESERVE_MAX: usize = 1024 * 1024;

/// Server-side protocol settings, shared by all sessions of a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Our name in the greeting, EHLO reply and 421s.
    pub hostname: String,
    /// Largest message accepted, in bytes; advertised as SIZE and enforced on MAIL and DATA.
    pub size_max: usize,
    /// Most recipients per message; at least [`RCPTS_MAX_RFC`].
    pub rcpts_max: usize,
    /// Longest command line, CRLF included; at least [`LINE_LEN_MAX_RFC`].
    pub line_len_max: usize,
    /// Longest message text line, CRLF included; between [`DATA_LINE_LEN_MAX_RFC`] and
    /// [`DATA_LINE_LEN_MAX_CEILING`].
    pub data_line_len_max: usize,
    /// Protocol errors tolerated before `421 4.7.0` and disconnect.
    pub errors_max: usize,
    /// Messages accepted per connection before MAIL gets `421 4.7.0` and the session closes;
    /// 0 means no limit. Bounds how long one connection can hold a shard's attention.
    pub messages_per_session_max: usize,
    /// Offer STARTTLS (RFC 3207). The adapter must be able to run TLS when it is on.
    pub starttls: bool,
    /// Offer AUTH PLAIN and LOGIN (RFC 4954) over TLS. The adapter checks the credentials.
    pub auth: bool,
    /// Submission (RFC 6409): MAIL is refused with `530 5.7.0` until the client authenticated.
    pub auth_required: bool,
    /// MAIL is refused with `530 5.7.0` until the session is encrypted (RFC 3207 §4).
    pub tls_required: bool,
    /// Advertise SMTPUTF8 (RFC 6531) and accept UTF-8 addresses in transactions that ask for it.
    pub smtputf8: bool,
    /// Advertise CHUNKING (RFC 3030) and accept BDAT.
    pub chunking: bool,
    /// Advertise BINARYMIME (RFC 3030) and accept BODY=BINARYMIME with BDAT; needs `chunking`.
    /// The body is kept byte for byte and marked binary, and our client relays it only with
    /// BDAT to a server offering BINARYMIME (bouncing it otherwise), never as DATA text, which
    /// would turn its bare CR and LF into CRLF.
    pub binarymime: bool,
    /// Advertise DSN (RFC 3461) and accept RET, ENVID, NOTIFY and ORCPT.
    pub dsn: bool,
    /// What to do with a bare LF or bare CR in DATA text.
    pub bare_lf: BareLf,
    /// What to do with a NUL octet in DATA text.
    pub nul: NulByte,
    /// The out-of-band report domain (lower case): its addresses are taken from any client,
    /// relay or not, in transactions of their own (a mix gets `452 4.5.3` for the recipients
    /// of the other kind), and handed out with `Transaction::oob` set.
    pub oob_domain: Option<String>,
    /// Ask the adapter about each relayed recipient before accepting it (`Step::Rcpt`, then
    /// `rcpt_done`): the suppression list. Off, RCPT is answered at once, as before.
    pub rcpt_check: bool,
}

/// Policy for bare line ends in DATA text: LF not preceded by CR, or CR not followed by LF
/// (RFC 5321 2.3.8 forbids both).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BareLf {
    /// Keep them as body bytes (they never end the message; see `data`). Many old clients send
    /// them, so this is the default.
    #[default]
    Accept,
    /// Refuse the message with `554 5.6.0` after reading it to the end marker.
    Reject,
}

/// Policy for NUL octets in DATA text (RFC 5321 4.1.1.4: text is US-ASCII, no NUL).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NulByte {
    /// Keep them, as before this setting existed.
    #[default]
    Accept,
    /// Refuse the message with `554 5.6.0` after reading it to the end marker.
    Reject,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            hostname: "localhost".to_owned(),
            size_max: SIZE_MAX_DEFAULT,
            rcpts_max: RCPTS_MAX_RFC,
            line_len_max: LINE_LEN_MAX_DEFAULT,
            data_line_len_max: DATA_LINE_LEN_MAX_RFC,
            errors_max: ERRORS_MAX_DEFAULT,
            messages_per_session_max: 0,
            starttls: false,
            auth: false,
            auth_required: false,
            tls_required: false,
            smtputf8: true,
            chunking: true,
            binarymime: true,
            dsn: true,
            bare_lf: BareLf::Accept,
            nul: NulByte::Accept,
            oob_domain: None,
            rcpt_check: false,
        }
    }
}

/// A `ServerConfig` value that would make the server misbehave; names the key.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("hostname must be a non-empty name of printable ASCII without spaces, got {0:?}")]
    Hostname(String),
    #[error("size_max must be at least 1 byte")]
    SizeMax,
    #[error("rcpts_max must be at least {RCPTS_MAX_RFC} (RFC 5321 4.5.3.1.8), got {0}")]
    RcptsMax(usize),
    #[error("line_len_max must be at least {LINE_LEN_MAX_RFC} (RFC 5321 4.5.3.1.4), got {0}")]
    LineLenMax(usize),
    #[error(
        "data_line_len_max must be between {DATA_LINE_LEN_MAX_RFC} and \
         {DATA_LINE_LEN_MAX_CEILING}, got {0}"
    )]
    DataLineLenMax(usize),
    #[error("errors_max must be at least 1")]
    ErrorsMax,
    #[error("binarymime needs chunking: BINARYMIME bodies can only be sent with BDAT")]
    BinaryMimeNeedsChunking,
}

impl ServerConfig {
    /// Checks every limit; the config loader calls this so bad values fail at startup.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let h = self.hostname.as_bytes();
        if h.is_empty() || !h.iter().all(|b| (0x21..=0x7e).contains(b)) {
            return Err(ConfigError::Hostname(self.hostname.clone()));
        }
        if self.size_max == 0 {
            return Err(ConfigError::SizeMax);
        }
        if self.rcpts_max < RCPTS_MAX_RFC {
            return Err(ConfigError::RcptsMax(self.rcpts_max));
        }
        if self.line_len_max < LINE_LEN_MAX_RFC {
            return Err(ConfigError::LineLenMax(self.line_len_max));
        }
        if !(DATA_LINE_LEN_MAX_RFC..=DATA_LINE_LEN_MAX_CEILING).contains(&self.data_line_len_max) {
            return Err(ConfigError::DataLineLenMax(self.data_line_len_max));
        }
        if self.errors_max == 0 {
            return Err(ConfigError::ErrorsMax);
        }
        if self.binarymime && !self.chunking {
            return Err(ConfigError::BinaryMimeNeedsChunking);
        }
        Ok(())
    }

    /// The EHLO keywords we advertise, in order. Later extensions (STARTTLS, AUTH) are added
    /// here, conditioned on config and on session state.
    pub fn extensions(&self) -> impl Iterator<Item = Extension> {
        [
            Some(Extension::Pipelining),
            Some(Extension::Size(self.size_max)),
            Some(Extension::EightBitMime),
            (self.chunking && self.binarymime).then_some(Extension::BinaryMime),
            self.chunking.then_some(Extension::Chunking),
            self.dsn.then_some(Extension::Dsn),
            Some(Extension::EnhancedStatusCodes),
            self.smtputf8.then_some(Extension::SmtpUtf8),
        ]
        .into_iter()
        .flatten()
    }
}

/// AUTH outside its place: before EHLO, twice, or inside a transaction (RFC 4954 §4).
const AUTH_BAD_SEQUENCE: &[u8] = b"503 5.5.1 AUTH not allowed now\r\n";
const AUTH_UNKNOWN_MECHANISM: &[u8] = b"504 5.5.4 Unrecognized authentication type\r\n";
const AUTH_CANCELLED: &[u8] = b"501 5.0.0 Authentication cancelled\r\n";
const AUTH_BAD_BASE64: &[u8] = b"501 5.5.2 Cannot decode response\r\n";
const AUTH_FAILED: &[u8] = b"535 5.7.8 Authentication credentials invalid\r\n";
const AUTH_REQUIRED: &[u8] = b"530 5.7.0 Authentication required\r\n";
const TLS_REQUIRED: &[u8] = b"530 5.7.0 Must issue a STARTTLS command first\r\n";
const AUTH_OK: &[u8] = b"235 2.7.0 Authentication successful\r\n";
const AUTH_LIMITED: &[u8] = b"454 4.7.0 Too many failed authentications, try again later\r\n";

/// Where an AUTH exchange stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AuthStage {
    Plain,
    LoginUser,
    LoginPassword(Vec<u8>),
}

/// Credentials the client sent, for the adapter to check.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    // Never print a password, even in a debug log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// The adapter's verdict on AUTH credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthVerdict {
    Accepted,
    Rejected,
    /// Too many failures from this client recently.
    Limited,
}

/// Reply to STARTTLS (RFC 3207 §4: 220, then the handshake).
const TLS_GO: &[u8] = b"220 2.0.0 Ready to start TLS\r\n";
/// STARTTLS on a session that already runs over TLS.
const TLS_ACTIVE: &[u8] = b"503 5.5.1 TLS already active\r\n";

/// One EHLO keyword line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extension {
    /// RFC 2920.
    Pipelining,
    /// RFC 1870, with our limit in bytes.
    Size(usize),
    /// RFC 6152.
    EightBitMime,
    /// RFC 2034.
    EnhancedStatusCodes,
    /// RFC 3030.
    Chunking,
    /// RFC 3030.
    BinaryMime,
    /// RFC 3461.
    Dsn,
    /// RFC 6531.
    SmtpUtf8,
}

impl Extension {
    fn write_to(self, out: &mut Vec<u8>) {
        match self {
            Extension::Pipelining => out.extend_from_slice(b"PIPELINING"),
            Extension::Size(n) => {
                // Writing into a Vec cannot fail.
                let _ = write!(out, "SIZE {n}");
            }
            Extension::EightBitMime => out.extend_from_slice(b"8BITMIME"),
            Extension::EnhancedStatusCodes => out.extend_from_slice(b"ENHANCEDSTATUSCODES"),
            Extension::Chunking => out.extend_from_slice(b"CHUNKING"),
            Extension::BinaryMime => out.extend_from_slice(b"BINARYMIME"),
            Extension::Dsn => out.extend_from_slice(b"DSN"),
            Extension::SmtpUtf8 => out.extend_from_slice(b"SMTPUTF8"),
        }
    }
}

/// What the adapter should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Write `out`, read more, call `input` then `poll`.
    NeedInput,
    /// Write `out`, spool the message, then call `message_done`.
    Message(Transaction),
    /// Write `out` (in plaintext), start TLS on the connection, then call `tls_started`.
    StartTls,
    /// Check these AUTH credentials, then call `auth_done`.
    Auth(Credentials),
    /// May this recipient (`local@domain`, as given) be accepted? Call `rcpt_done` (only
    /// with `ServerConfig::rcpt_check`).
    Rcpt(String),
    /// Write `out` and close the connection.
    Close,
}

/// One accepted message, ready to spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// Reverse-path as received; "" for the null sender `<>`.
    pub mail_from: String,
    /// Forward-paths as received (`local@domain`), in RCPT order.
    pub rcpts: Vec<String>,
    /// The message: CRLF line endings as sent, dot-unstuffed, without the final ".\r\n" (after
    /// DATA); or the BDAT chunks concatenated, byte for byte.
    pub body: Vec<u8>,
    /// The EHLO/HELO name the client gave.
    pub helo: String,
    /// BODY=8BITMIME was given on MAIL.
    pub body_8bit: bool,
    /// SIZE= given on MAIL, if any.
    pub size_declared: Option<usize>,
    /// SMTPUTF8 was given on MAIL (RFC 6531): addresses and headers may be UTF-8, and the
    /// message may only be relayed to servers that offer SMTPUTF8.
    pub smtputf8: bool,
    /// BODY=BINARYMIME was given on MAIL (RFC 3030); the body came by BDAT.
    pub body_binary: bool,
    /// The client said EHLO (not HELO): "ESMTP" rather than "SMTP" in Received.
    pub esmtp: bool,
    /// RET and ENVID from MAIL (RFC 3461), if either was given.
    pub dsn: Option<DsnEnvelope>,
    /// NOTIFY and ORCPT of each recipient, parallel to `rcpts` (same length, same order).
    pub rcpt_dsn: Vec<RcptDsn>,
    /// Every recipient is at the out-of-band report domain: a report to read, not a message
    /// to relay.
    pub oob: bool,
}

/// The DSN parameters of MAIL (RFC 3461 4.3, 4.4), for a later bounce notice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DsnEnvelope {
    pub ret: Option<Ret>,
    /// ENVID, xtext-decoded (printable ASCII, at most `parser::ENVID_LEN_MAX` characters).
    pub envid: Option<String>,
}

/// The DSN parameters of one RCPT (RFC 3461 4.1, 4.2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RcptDsn {
    /// `None` when NOTIFY was not given: the default is FAILURE (and perhaps DELAY).
    pub notify: Option<Notify>,
    pub orcpt: Option<Orcpt>,
}

/// ORCPT= decoded: the address type (e.g. "rfc822") and the original recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orcpt {
    pub addr_type: String,
    /// xtext-decoded (printable ASCII).
    pub address: String,
}

/// Counters for one session, for the adapter to add to the shard's metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Complete command lines processed (including refused ones).
    pub commands: u64,
    /// Messages handed to the caller with `Step::Message`.
    pub messages: u64,
    /// Refusals by kind, indexed by [`Rejection::index`].
    pub rejections: [u64; Rejection::COUNT],
}

impl SessionStats {
    pub fn rejected(&self, r: Rejection) -> u64 {
        self.rejections[r.index()]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading command lines.
    Command,
    /// Reading message text after 354.
    Data,
    /// Reading the octets of a BDAT chunk.
    Chunk,
    /// Handed out a message; waiting for `message_done`.
    AwaitQueue,
    /// Said 220 to STARTTLS; waiting for the adapter's `tls_started`.
    AwaitTls,
    /// Handed out credentials; waiting for `auth_done`.
    AwaitAuth,
    /// Handed out a recipient to check; waiting for `rcpt_done`.
    AwaitRcpt,
    /// Said 221 or 421; nothing more will be read or written.
    Closed,
}

/// The envelope of the transaction being built.
#[derive(Debug)]
struct Envelope {
    mail_from: String,
    rcpts: Vec<String>,
    rcpt_dsn: Vec<RcptDsn>,
    body_8bit: bool,
    body_binary: bool,
    size_declared: Option<usize>,
    smtputf8: bool,
    dsn: Option<DsnEnvelope>,
    /// A BDAT chunk was accepted: the body so far is in `Proto::body`, and DATA is refused.
    bdat: bool,
    /// The recipients are at the out-of-band domain (set by the first one).
    oob: bool,
}

/// One SMTP server connection.
#[derive(Debug)]
pub struct Session {
    /// Bytes received and not yet consumed start at `buf[start]`. Kept apart from `proto` so a
    /// command line can borrow `buf` while `proto` is updated.
    buf: Vec<u8>,
    start: usize,
    proto: Proto,
}

#[derive(Debug)]
struct Proto {
    cfg: Rc<ServerConfig>,
    relay_allowed: bool,
    state: State,
    helo: Option<String>,
    /// The last EHLO/HELO was EHLO.
    esmtp: bool,
    txn: Option<Envelope>,
    body: Vec<u8>,
    /// Changes whenever `body` starts over (a new DATA or BDAT body, or a reset), so an
    /// observer following the body as it grows knows when it is another one.
    body_seq: u64,
    reader: DataReader,
    /// Octets of the current BDAT chunk still to read.
    chunk_left: usize,
    /// Size of the current BDAT chunk, for its reply.
    chunk_len: usize,
    /// The current BDAT chunk has LAST.
    chunk_last: bool,
    /// The refusal owed once the current chunk is read; `None` if the chunk is being kept.
    chunk_verdict: Option<Rejection>,
    errors: usize,
    /// The session runs over TLS (after STARTTLS, or implicit TLS).
    tls: bool,
    /// AUTH may be offered without TLS on this connection (e.g. loopback, when configured).
    auth_plaintext: bool,
    /// The client authenticated as this user.
    user: Option<String>,
    /// Where an AUTH exchange stands while the client sends its responses.
    auth_stage: Option<AuthStage>,
    /// Credentials handed to the adapter by `poll`.
    credentials: Option<Credentials>,
    /// Discarding the rest of an over-long command line (its 500 is already written).
    discarding: bool,
    /// The recipient handed out by `poll` for the adapter to check, and the one waiting for
    /// its verdict (with its DSN parameters).
    rcpt_ask: Option<String>,
    rcpt_pending: Option<(String, RcptDsn)>,
    stats: SessionStats,
}

impl Session {
    /// A session for one connection. `relay_allowed` says whether this client may send to any
    /// domain (decided by the adapter, e.g. from the peer address).
    pub fn new(cfg: Rc<ServerConfig>, relay_allowed: bool) -> Session {
        let reader = DataReader::new(cfg.size_max, cfg.data_line_len_max);
        Session {
            buf: Vec::new(),
            start: 0,
            proto: Proto {
                cfg,
                relay_allowed,
                state: State::Command,
                helo: None,
                esmtp: false,
                txn: None,
                body: Vec::new(),
                body_seq: 0,
                reader,
                chunk_left: 0,
                chunk_len: 0,
                chunk_last: false,
                chunk_verdict: None,
                errors: 0,
                tls: false,
                auth_plaintext: false,
                user: None,
                auth_stage: None,
                credentials: None,
                discarding: false,
                rcpt_ask: None,
                rcpt_pending: None,
                stats: SessionStats::default(),
            },
        }
    }

    /// Writes the 220 greeting.
    pub fn greeting(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"220 ");
        out.extend_from_slice(self.proto.cfg.hostname.as_bytes());
        out.extend_from_slice(b" ESMTP Epoxi\r\n");
    }

    /// Takes bytes read from the socket.
    ///
    /// Hot path: no I/O. While a message body streams in and nothing is buffered, the bytes go
    /// straight to the DATA reader (one copy, into the body) instead of through the buffer.
    pub fn input(&mut self, bytes: &[u8]) {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        match self.proto.state {
            State::Closed => {}
            State::Data if self.buf.is_empty() && !self.proto.reader.is_done() => {
                let n = self.proto.feed_data(bytes);
                self.buf.extend_from_slice(&bytes[n..]);
            }
            State::Chunk if self.buf.is_empty() && self.proto.chunk_left > 0 => {
                let n = self.proto.feed_chunk(bytes);
                self.buf.extend_from_slice(&bytes[n..]);
            }
            _ => self.buf.extend_from_slice(bytes),
        }
    }

    /// Processes buffered input as far as possible, appending replies to `out`.
    pub fn poll(&mut self, out: &mut Vec<u8>) -> Step {
        let step = loop {
            match self.proto.state {
                State::Closed => break Step::Close,
                // The adapter owes us `message_done`; input stays buffered until then.
                State::AwaitQueue => break Step::NeedInput,
                State::AwaitAuth => match self.proto.credentials.take() {
                    Some(c) => break Step::Auth(c),
                    None => break Step::NeedInput,
                },
                // Pipelined commands after the RCPT wait until its verdict is in, so replies
                // stay in command order.
                State::AwaitRcpt => match self.proto.rcpt_ask.take() {
                    Some(a) => break Step::Rcpt(a),
                    None => break Step::NeedInput,
                },
                State::AwaitTls => {
                    // RFC 3207 §4.2: nothing the client pipelined after STARTTLS may be acted
                    // on; it was sent before the handshake and could have been injected.
                    self.start = self.buf.len();
                    break Step::StartTls;
                }
                State::Data => {
                    if !self.proto.reader.is_done() {
                        let n = self.proto.feed_data(&self.buf[self.start..]);
                        self.start += n;
                        if !self.proto.reader.is_done() {
                            break Step::NeedInput;
                        }
                    }
                    if let Some(t) = self.proto.end_data(out) {
                        break Step::Message(t);
                    }
                }
                State::Chunk => {
                    if self.proto.chunk_left > 0 {
                        let n = self.proto.feed_chunk(&self.buf[self.start..]);
                        self.start += n;
                        if self.proto.chunk_left > 0 {
                            break Step::NeedInput;
                        }
                    }
                    if let Some(t) = self.proto.end_chunk(out) {
                        break Step::Message(t);
                    }
                }
                State::Command => {
                    let pending = &self.buf[self.start..];
                    match memchr::memchr(b'\n', pending) {
                        Some(k) => {
                            let line = &pending[..=k];
                            self.start += k + 1;
                            self.proto.command_line(line, out);
                        }
                        None => {
                            if self.proto.discarding {
                                self.start = self.buf.len();
                            } else if pending.len() >= self.proto.cfg.line_len_max {
                                // This line will be longer than the limit whatever follows:
                                // answer now and stop buffering it.
                                self.start = self.buf.len();
                                self.proto.discarding = true;
                                self.proto.reject(Rejection::LineTooLong, out);
                                continue;
                            }
                            break Step::NeedInput;
                        }
                    }
                }
            }
        };
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 0 {
            // What is left is a partial line or pipelined commands we will read next, so the
            // move is small.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        step
    }

    /// Reports the fate of the message from the last `Step::Message`: `Ok(queue id)` writes
    /// `250 2.0.0 Ok: queued as <id>`, `Err(reply)` writes that reply (e.g. `451 4.3.0 ...`).
    /// Either way the transaction is over; call `poll` again for pipelined commands. Ignored
    /// unless a `Step::Message` is outstanding, so a stray call cannot write an unasked-for reply.
    pub fn message_done(&mut self, result: Result<&str, Reply>, out: &mut Vec<u8>) {
        if self.proto.state != State::AwaitQueue {
            return;
        }
        match result {
            Ok(id) => {
                out.extend_from_slice(b"250 2.0.0 Ok: queued as ");
                // The id is ours, but a CR or LF in it would split the reply line.
                out.extend(id.bytes().filter(|b| (0x21..=0x7e).contains(b)));
                out.extend_from_slice(b"\r\n");
            }
            Err(reply) => reply.write_to(out),
        }
        self.proto.state = State::Command;
    }

    /// The message of the last `Step::Message` was a report to the out-of-band domain, read
    /// and logged: `250 2.0.0 Ok: report received`. Ignored unless a `Step::Message` is
    /// outstanding.
    pub fn report_done(&mut self, out: &mut Vec<u8>) {
        if self.proto.state != State::AwaitQueue {
            return;
        }
        out.extend_from_slice(reply::REPORT_OK.wire);
        self.proto.state = State::Command;
    }

    /// The verdict on the recipient of the last `Step::Rcpt`: `None` accepts it (`250`),
    /// `Some(reply)` refuses it with that reply (counted as `Rejection::Suppressed`). Ignored
    /// unless a `Step::Rcpt` is outstanding.
    pub fn rcpt_done(&mut self, refusal: Option<&Reply>, out: &mut Vec<u8>) {
        if self.proto.state != State::AwaitRcpt {
            return;
        }
        self.proto.state = State::Command;
        let Some((address, dsn)) = self.proto.rcpt_pending.take() else {
            return;
        };
        match (refusal, self.proto.txn.as_mut()) {
            (Some(reply), _) => {
                self.proto.stats.rejections[Rejection::Suppressed.index()] += 1;
                reply.write_to(out);
            }
            (None, Some(txn)) => {
                txn.rcpts.push(address);
                txn.rcpt_dsn.push(dsn);
                out.extend_from_slice(reply::RCPT_OK.wire);
            }
            // The transaction cannot end while a verdict is awaited (no command is read).
            (None, None) => out.extend_from_slice(reply::INTERNAL.wire),
        }
    }

    /// True while message text (DATA or a BDAT chunk) is being read, so the adapter uses the
    /// DATA timeout (RFC 5321 4.5.3.2.6: 10 minutes) rather than the command timeout (5 minutes).
    /// The adapter finished the TLS handshake after `Step::StartTls` (or the connection is
    /// implicit TLS from the start). The client must say EHLO again (RFC 3207 §4.2).
    pub fn tls_started(&mut self) {
        let p = &mut self.proto;
        p.tls = true;
        p.helo = None;
        p.auth_stage = None;
        p.esmtp = false;
        p.reset_txn();
        if p.state == State::AwaitTls {
            p.state = State::Command;
        }
        self.buf.clear();
        self.start = 0;
    }

    /// A transaction is open: MAIL was accepted and the message is not finished yet.
    pub fn in_transaction(&self) -> bool {
        self.proto.txn.is_some() || matches!(self.proto.state, State::Data | State::Chunk)
    }

    /// Whether the session runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.proto.tls
    }

    /// Offer AUTH on this connection even without TLS (e.g. a loopback client, when the
    /// operator configured it).
    pub fn allow_auth_without_tls(&mut self, allow: bool) {
        self.proto.auth_plaintext = allow;
    }

    /// The adapter's verdict after `Step::Auth`. An accepted user may relay.
    pub fn auth_done(&mut self, verdict: AuthVerdict, user: &str, out: &mut Vec<u8>) {
        let p = &mut self.proto;
        if p.state != State::AwaitAuth {
            return;
        }
        p.state = State::Command;
        match verdict {
            AuthVerdict::Accepted => {
                p.user = Some(user.to_owned());
                p.relay_allowed = true;
                out.extend_from_slice(AUTH_OK);
            }
            AuthVerdict::Rejected => out.extend_from_slice(AUTH_FAILED),
            AuthVerdict::Limited => out.extend_from_slice(AUTH_LIMITED),
        }
    }

    /// The reverse-path of the transaction under way (`""` for the null sender).
    pub fn mail_from(&self) -> Option<&str> {
        self.proto.txn.as_ref().map(|t| t.mail_from.as_str())
    }

    /// The authenticated user, if any.
    pub fn user(&self) -> Option<&str> {
        self.proto.user.as_deref()
    }

    pub fn in_data(&self) -> bool {
        matches!(self.proto.state, State::Data | State::Chunk)
    }

    /// False while the session waits for `message_done` or is closed: reading more then would
    /// only grow the buffer.
    pub fn wants_input(&self) -> bool {
        matches!(
            self.proto.state,
            State::Command | State::Data | State::Chunk
        )
    }

    /// The adapter's timer fired: writes `421 4.4.2` and closes.
    pub fn timeout(&mut self, out: &mut Vec<u8>) {
        if self.proto.state == State::Closed {
            return;
        }
        out.extend_from_slice(b"421 4.4.2 ");
        out.extend_from_slice(self.proto.cfg.hostname.as_bytes());
        out.extend_from_slice(b" Timeout, closing connection\r\n");
        self.proto.state = State::Closed;
    }

    /// Graceful stop between transactions: writes `421 4.3.2` and closes.
    pub fn shutdown(&mut self, out: &mut Vec<u8>) {
        if self.proto.state == State::Closed {
            return;
        }
        out.extend_from_slice(reply::SHUTDOWN.wire);
        self.proto.state = State::Closed;
    }

    /// Counters for metrics.
    pub fn stats(&self) -> &SessionStats {
        &self.proto.stats
    }

    /// The EHLO/HELO name, once given.
    pub fn helo(&self) -> Option<&str> {
        self.proto.helo.as_deref()
    }

    /// The body of the current transaction as received so far (unstuffed), with the number
    /// of that body: the adapter feeds the DKIM signer from here while the body streams in.
    /// After `Step::Message` the number stays that of the message handed out until the next
    /// body starts.
    pub fn body_so_far(&self) -> (u64, &[u8]) {
        (self.proto.body_seq, &self.proto.body)
    }
}

impl Proto {
    /// Hot path: no I/O, no allocation beyond the body buffer.
    fn feed_data(&mut self, bytes: &[u8]) -> usize {
        self.reader.feed(bytes, &mut self.body)
    }

    /// Consumes up to `chunk_left` octets of a BDAT chunk, keeping them if the chunk is accepted.
    ///
    /// Hot path: no I/O, no allocation beyond the body buffer.
    fn feed_chunk(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.chunk_left);
        if self.chunk_verdict.is_none() {
            self.body.extend_from_slice(&bytes[..n]);
        }
        self.chunk_left -= n;
        n
    }

    /// Ends the transaction and frees what it held.
    fn reset_txn(&mut self) {
        self.txn = None;
        self.body = Vec::new();
        self.body_seq += 1;
    }

    /// One complete line, LF included.
    fn command_line(&mut self, line: &[u8], out: &mut Vec<u8>) {
        if self.discarding {
            // The tail of an over-long line, already answered.
            self.discarding = false;
            return;
        }
        if let Some(stage) = self.auth_stage.take() {
            let line = line.strip_suffix(b"\n").unwrap_or(line);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            return self.auth_response(stage, line, out);
        }
        self.stats.commands += 1;
        if line.len() > self.cfg.line_len_max {
            self.reject(Rejection::LineTooLong, out);
            return;
        }
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        match parse_command(line) {
            Ok(cmd) => self.execute(cmd, out),
            Err(e) => self.reject(e.rejection(), out),
        }
    }

    fn execute(&mut self, cmd: Command<'_>, out: &mut Vec<u8>) {
        match cmd {
            Command::Ehlo(name) => {
                self.reset_txn();
                self.helo = Some(name.to_owned());
                self.esmtp = true;
                self.write_ehlo(out);
            }
            Command::Helo(name) => {
                self.reset_txn();
                self.helo = Some(name.to_owned());
                self.esmtp = false;
                out.extend_from_slice(b"250 ");
                out.extend_from_slice(self.cfg.hostname.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            Command::Mail { from, params } => self.mail(from, params, out),
            Command::Rcpt { to, params } => self.rcpt(to, params, out),
            Command::Data => self.data(out),
            Command::Bdat { size, last } => self.bdat(size, last),
            Command::Rset => {
                self.reset_txn();
                out.extend_from_slice(reply::OK.wire);
            }
            Command::Noop => out.extend_from_slice(reply::OK.wire),
            Command::Auth { mechanism, initial } => self.auth(mechanism, initial, out),
            Command::StartTls => {
                if !self.cfg.starttls {
                    return self.reject(Rejection::UnknownCommand, out);
                }
                if self.tls {
                    out.extend_from_slice(TLS_ACTIVE);
                    return;
                }
                // RFC 3207 §4.2: the session starts over after the handshake.
                self.reset_txn();
                out.extend_from_slice(TLS_GO);
                self.state = State::AwaitTls;
            }
            Command::Quit => {
                out.extend_from_slice(reply::BYE.wire);
                self.state = State::Closed;
            }
            Command::Vrfy(_) => out.extend_from_slice(reply::VRFY.wire),
            Command::Expn(_) => self.reject(Rejection::NotImplemented, out),
            Command::Help(_) => out.extend_from_slice(reply::HELP.wire),
        }
    }

    /// AUTH is offered over TLS, or without it where the adapter allows (e.g. loopback).
    fn auth_offered(&self) -> bool {
        self.cfg.auth && (self.tls || self.auth_plaintext)
    }

    fn auth(&mut self, mechanism: &str, initial: Option<&str>, out: &mut Vec<u8>) {
        if !self.auth_offered() {
            return self.reject(Rejection::UnknownCommand, out);
        }
        if self.helo.is_none() || self.user.is_some() || self.txn.is_some() {
            // RFC 4954 §4: after EHLO, once per session, not inside a transaction.
            out.extend_from_slice(AUTH_BAD_SEQUENCE);
            return;
        }
        let stage = if mechanism.eq_ignore_ascii_case("PLAIN") {
            AuthStage::Plain
        } else if mechanism.eq_ignore_ascii_case("LOGIN") {
            AuthStage::LoginUser
        } else {
            out.extend_from_slice(AUTH_UNKNOWN_MECHANISM);
            return;
        };
        match (stage, initial) {
            (stage, Some(response)) => self.auth_response(stage, response.as_bytes(), out),
            (AuthStage::Plain, None) => {
                out.extend_from_slice(b"334 \r\n");
                self.auth_stage = Some(AuthStage::Plain);
            }
            (_, None) => {
                out.extend_from_slice(b"334 VXNlcm5hbWU6\r\n");
                self.auth_stage = Some(AuthStage::LoginUser);
            }
        }
    }

    /// One client response in an AUTH exchange (base64, `=` for empty, `*` to cancel).
    fn auth_response(&mut self, stage: AuthStage, line: &[u8], out: &mut Vec<u8>) {
        if line == b"*" {
            out.extend_from_slice(AUTH_CANCELLED);
            return;
        }
        let decoded = if line == b"=" {
            Ok(Vec::new())
        } else {
            base64::engine::general_purpose::STANDARD.decode(line)
        };
        let Ok(decoded) = decoded else {
            out.extend_from_slice(AUTH_BAD_BASE64);
            return;
        };
        match stage {
            AuthStage::Plain => {
                // RFC 4616: authzid NUL authcid NUL password.
                let mut parts = decoded.split(|&b| b == 0);
                let (Some(authz), Some(user), Some(password), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    out.extend_from_slice(AUTH_BAD_BASE64);
                    return;
                };
                if !authz.is_empty() && authz != user {
                    out.extend_from_slice(AUTH_FAILED);
                    return;
                }
                self.hand_out_credentials(user, password, out);
            }
            AuthStage::LoginUser => {
                out.extend_from_slice(b"334 UGFzc3dvcmQ6\r\n");
                self.auth_stage = Some(AuthStage::LoginPassword(decoded));
            }
            AuthStage::LoginPassword(user) => self.hand_out_credentials(&user, &decoded, out),
        }
    }

    fn hand_out_credentials(&mut self, user: &[u8], password: &[u8], out: &mut Vec<u8>) {
        match (std::str::from_utf8(user), std::str::from_utf8(password)) {
            (Ok(user), Ok(password)) if !user.is_empty() => {
                self.credentials = Some(Credentials {
                    user: user.to_owned(),
                    password: password.to_owned(),
                });
                self.state = State::AwaitAuth;
            }
            _ => out.extend_from_slice(AUTH_FAILED),
        }
    }

    fn write_ehlo(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"250-");
        out.extend_from_slice(self.cfg.hostname.as_bytes());
        out.extend_from_slice(b"\r\n");
        if self.cfg.starttls && !self.tls {
            out.extend_from_slice(b"250-STARTTLS\r\n");
        }
        if self.auth_offered() {
            out.extend_from_slice(b"250-AUTH PLAIN LOGIN\r\n");
        }
        let mut exts = self.cfg.extensions().peekable();
        while let Some(ext) = exts.next() {
            out.extend_from_slice(if exts.peek().is_some() {
                b"250-"
            } else {
                b"250 "
            });
            ext.write_to(out);
            out.extend_from_slice(b"\r\n");
        }
    }

    fn mail(&mut self, from: Option<Mailbox<'_>>, params: MailParams<'_>, out: &mut Vec<u8>) {
        if self.helo.is_none() {
            return self.reject(Rejection::NeedHelo, out);
        }
        let max = self.cfg.messages_per_session_max;
        if max > 0 && self.stats.messages >= max as u64 {
            // The client did nothing wrong; it is told to go on over a fresh connection.
            self.stats.rejections[Rejection::TooManyMessages.index()] += 1;
            out.extend_from_slice(reply::TOO_MANY_MESSAGES.wire);
            self.state = State::Closed;
            return;
        }
        if self.txn.is_some() {
            return self.reject(Rejection::NestedMail, out);
        }
        if self.cfg.tls_required && !self.tls {
            out.extend_from_slice(TLS_REQUIRED);
            return;
        }
        if self.cfg.auth_required && self.user.is_none() {
            out.extend_from_slice(AUTH_REQUIRED);
            return;
        }
        // Parameters of extensions we did not advertise are refused (RFC 5321 4.1.1.11).
        let dsn_given = params.ret.is_some() || params.envid.is_some();
        if (params.smtputf8 && !self.cfg.smtputf8) || (dsn_given && !self.cfg.dsn) {
            return self.reject(Rejection::UnknownParameter, out);
        }
        if params.body == Some(BodyType::BinaryMime) && !(self.cfg.chunking && self.cfg.binarymime)
        {
            return self.reject(Rejection::Syntax, out);
        }
        if from.is_some_and(|m| !m.address.is_ascii()) && !params.smtputf8 {
            return self.reject(Rejection::NonAsciiSender, out);
        }
        if from.is_some_and(|m| !idn_ok(m.address)) {
            return self.reject(Rejection::BadIdnSender, out);
        }
        if params.size.is_some_and(|n| n > self.cfg.size_max) {
            return self.reject(Rejection::SizeExceeded, out);
        }
        self.txn = Some(Envelope {
            mail_from: from.map_or_else(String::new, |m| m.address.to_owned()),
            rcpts: Vec::new(),
            rcpt_dsn: Vec::new(),
            body_8bit: params.body == Some(BodyType::EightBitMime),
            body_binary: params.body == Some(BodyType::BinaryMime),
            size_declared: params.size,
            smtputf8: params.smtputf8,
            dsn: dsn_given.then(|| DsnEnvelope {
                ret: params.ret,
                envid: params.envid.map(xtext_decode),
            }),
            bdat: false,
            oob: false,
        });
        out.extend_from_slice(reply::MAIL_OK.wire);
    }

    fn rcpt(&mut self, to: Mailbox<'_>, params: RcptParams<'_>, out: &mut Vec<u8>) {
        let Some(txn) = self.txn.as_mut() else {
            return self.reject(Rejection::NeedMail, out);
        };
        if (params.notify.is_some() || params.orcpt.is_some()) && !self.cfg.dsn {
            return self.reject(Rejection::UnknownParameter, out);
        }
        if !to.address.is_ascii() && !txn.smtputf8 {
            return self.reject(Rejection::NonAsciiRecipient, out);
        }
        if !idn_ok(to.address) {
            return self.reject(Rejection::BadIdnRecipient, out);
        }
        if txn.rcpts.len() >= self.cfg.rcpts_max {
            return self.reject(Rejection::TooManyRecipients, out);
        }
        // A report to the out-of-band domain comes from anywhere (the receivers of our mail),
        // relay permission or not; it is read, never relayed, so it cannot share a
        // transaction with mail that is.
        let oob = self.cfg.oob_domain.as_deref().is_some_and(|d| {
            to.address
                .rsplit_once('@')
                .is_some_and(|(_, domain)| domain.eq_ignore_ascii_case(d))
        });
        if !oob && !self.relay_allowed {
            return self.reject(Rejection::RelayDenied, out);
        }
        if !txn.rcpts.is_empty() && txn.oob != oob {
            return self.reject(Rejection::OobMixed, out);
        }
        txn.oob = oob;
        // RFC 6533: a `utf-8` ORCPT in raw UTF-8 needs SMTPUTF8; it is kept in its ASCII
        // `\x{..}` form, the others xtext-decoded.
        let orcpt = match params.orcpt {
            Some(o) if o.addr_type.eq_ignore_ascii_case("utf-8") => {
                if !o.xtext.is_ascii() && !txn.smtputf8 {
                    return self.reject(Rejection::BadDsnParameter, out);
                }
                Some(Orcpt {
                    addr_type: "utf-8".to_owned(),
                    address: utf8_addr_ascii(o.xtext),
                })
            }
            Some(o) => Some(Orcpt {
                addr_type: o.addr_type.to_owned(),
                address: xtext_decode(o.xtext),
            }),
            None => None,
        };
        let dsn = RcptDsn {
            notify: params.notify,
            orcpt,
        };
        if self.cfg.rcpt_check && !oob {
            self.rcpt_ask = Some(to.address.to_owned());
            self.rcpt_pending = Some((to.address.to_owned(), dsn));
            self.state = State::AwaitRcpt;
            return;
        }
        txn.rcpts.push(to.address.to_owned());
        txn.rcpt_dsn.push(dsn);
        out.extend_from_slice(reply::RCPT_OK.wire);
    }

    fn data(&mut self, out: &mut Vec<u8>) {
        let declared = match &self.txn {
            None => return self.reject(Rejection::NeedMail, out),
            Some(t) if t.bdat => {
                // RFC 3030 3 leaves the transaction "indeterminate"; ending it means the next
                // MAIL starts clean instead of inheriting half a message.
                self.reset_txn();
                return self.reject(Rejection::DataAfterBdat, out);
            }
            Some(t) if t.body_binary => return self.reject(Rejection::BinaryMimeNeedsBdat, out),
            Some(t) if t.rcpts.is_empty() => {
                return self.reject(Rejection::NoValidRecipients, out);
            }
            Some(t) => t.size_declared,
        };
        out.extend_from_slice(reply::DATA_GO.wire);
        self.reader = DataReader::new(self.cfg.size_max, self.cfg.data_line_len_max)
            .reject_bare_lf(self.cfg.bare_lf == BareLf::Reject)
            .reject_nul(self.cfg.nul == NulByte::Reject);
        self.body = body_buffer(declared, self.cfg.size_max);
        self.body_seq += 1;
        self.state = State::Data;
    }

    /// `BDAT size [LAST]`: decides now whether the chunk is kept, but answers only after its
    /// octets are read (in `end_chunk`), so the reply order matches the command order.
    fn bdat(&mut self, size: usize, last: bool) {
        self.chunk_left = size;
        self.chunk_len = size;
        self.chunk_last = last;
        self.chunk_verdict = self.chunk_refusal(size);
        if self.chunk_verdict.is_none() {
            if let Some(env) = self.txn.as_mut() {
                if !env.bdat {
                    env.bdat = true;
                    self.body = body_buffer(env.size_declared, self.cfg.size_max);
                    self.body_seq += 1;
                }
            }
        }
        self.state = State::Chunk;
    }

    /// Why the chunk about to be read will be refused, if it will.
    fn chunk_refusal(&self, size: usize) -> Option<Rejection> {
        if !self.cfg.chunking {
            return Some(Rejection::NotImplemented);
        }
        let Some(env) = &self.txn else {
            return Some(Rejection::NeedMail);
        };
        if env.rcpts.is_empty() {
            return Some(Rejection::NoValidRecipients);
        }
        let so_far = if env.bdat { self.body.len() } else { 0 };
        if so_far.saturating_add(size) > self.cfg.size_max {
            return Some(Rejection::MessageTooBig);
        }
        None
    }

    /// A BDAT chunk was read: answer it, and hand out the message after LAST.
    fn end_chunk(&mut self, out: &mut Vec<u8>) -> Option<Transaction> {
        self.state = State::Command;
        if let Some(r) = self.chunk_verdict.take() {
            if r == Rejection::MessageTooBig {
                // The message cannot be completed; the client must start over with MAIL.
                self.reset_txn();
            }
            self.reject(r, out);
            return None;
        }
        if !self.chunk_last {
            // Writing into a Vec cannot fail.
            let _ = write!(out, "250 2.0.0 {} octets received\r\n", self.chunk_len);
            return None;
        }
        let body = std::mem::take(&mut self.body);
        match self.txn.take() {
            Some(env) => Some(self.hand_out(env, body)),
            // `chunk_refusal` only accepts a chunk with a transaction open.
            None => {
                out.extend_from_slice(reply::INTERNAL.wire);
                None
            }
        }
    }

    /// Completes a transaction: the session waits for `message_done`.
    fn hand_out(&mut self, env: Envelope, body: Vec<u8>) -> Transaction {
        self.state = State::AwaitQueue;
        self.stats.messages += 1;
        Transaction {
            mail_from: env.mail_from,
            rcpts: env.rcpts,
            body,
            helo: self.helo.clone().unwrap_or_default(),
            body_8bit: env.body_8bit,
            size_declared: env.size_declared,
            smtputf8: env.smtputf8,
            body_binary: env.body_binary,
            esmtp: self.esmtp,
            dsn: env.dsn,
            rcpt_dsn: env.rcpt_dsn,
            oob: env.oob,
        }
    }

    /// The end marker was read: hand the message out, or refuse it and carry on.
    fn end_data(&mut self, out: &mut Vec<u8>) -> Option<Transaction> {
        let txn = self.txn.take();
        let body = std::mem::take(&mut self.body);
        self.state = State::Command;
        match self.reader.finish() {
            Err(DataError::TooBig { .. }) => self.reject(Rejection::MessageTooBig, out),
            Err(DataError::LineTooLong { .. }) => self.reject(Rejection::DataLineTooLong, out),
            Err(DataError::BareLf) => self.reject(Rejection::BareLf, out),
            Err(DataError::BareCr) => self.reject(Rejection::BareCr, out),
            Err(DataError::Nul) => self.reject(Rejection::NulInMessage, out),
            Ok(()) => match txn {
                Some(env) => return Some(self.hand_out(env, body)),
                // `data` only enters State::Data with a transaction open, and nothing clears it
                // there; answer rather than leave the client waiting.
                None => out.extend_from_slice(reply::INTERNAL.wire),
            },
        }
        None
    }

    /// Writes the refusal, counts it, and enforces `errors_max`.
    fn reject(&mut self, r: Rejection, out: &mut Vec<u8>) {
        self.stats.rejections[r.index()] += 1;
        out.extend_from_slice(r.canned().wire);
        if r.is_protocol_error() {
            self.errors += 1;
            if self.errors >= self.cfg.errors_max {
                self.stats.rejections[Rejection::TooManyErrors.index()] += 1;
                out.extend_from_slice(reply::TOO_MANY_ERRORS.wire);
                self.state = State::Closed;
            }
        }
    }
}

/// Whether an address's domain, when internationalized (UTF-8), is a valid IDNA2008 name
/// (RFC 6531 §3.3), checked as UTS 46 non-transitional processing with STD3 rules, hyphen and
/// DNS length checks. ASCII domains and address literals are the parser's business.
fn idn_ok(address: &str) -> bool {
    let Some((_, domain)) = address.rsplit_once('@') else {
        return true;
    };
    domain.is_ascii() || idna::domain_to_ascii_strict(domain).is_ok()
}

/// A body buffer for a message that declared `declared` bytes: the declaration is a hint, so at
/// most [`BODY_RESERVE_MAX`] is reserved up front.
fn body_buffer(declared: Option<usize>, size_max: usize) -> Vec<u8> {
    Vec::with_capacity(declared.unwrap_or(0).min(size_max).min(BODY_RESERVE_MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_with(f: impl FnOnce(&mut ServerConfig)) -> Rc<ServerConfig> {
        let mut cfg = ServerConfig {
            hostname: "mx.test".to_owned(),
            ..ServerConfig::default()
        };
        f(&mut cfg);
        Rc::new(cfg)
    }

    fn session_with(cfg: Rc<ServerConfig>, relay: bool) -> Session {
        let mut s = Session::new(cfg, relay);
        let mut out = Vec::new();
        s.greeting(&mut out);
        s
    }

    /// A session past the greeting.
    fn fresh() -> Session {
        session_with(cfg_with(|_| {}), true)
    }

    /// A session past EHLO.
    fn ready() -> Session {
        let mut s = fresh();
        let (_, step) = talk(&mut s, b"EHLO client.test\r\n");
        assert_eq!(step, Step::NeedInput);
        s
    }

    /// Feeds `input`, polls once; returns the replies written and the step.
    fn talk(s: &mut Session, input: &[u8]) -> (String, Step) {
        s.input(input);
        let mut out = Vec::new();
        let step = s.poll(&mut out);
        (String::from_utf8_lossy(&out).into_owned(), step)
    }

    fn replies(s: &mut Session, input: &[u8]) -> String {
        talk(s, input).0
    }

    fn message(step: Step) -> Transaction {
        match step {
            Step::Message(t) => t,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    fn done_ok(s: &mut Session, id: &str) -> String {
        let mut out = Vec::new();
        s.message_done(Ok(id), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn default_config_is_valid_and_bad_values_name_the_key() {
        assert_eq!(ServerConfig::default().validate(), Ok(()));
        let bad = |f: fn(&mut ServerConfig)| {
            let mut c = ServerConfig::default();
            f(&mut c);
            c.validate()
        };
        assert_eq!(bad(|c| c.rcpts_max = 99), Err(ConfigError::RcptsMax(99)));
        assert_eq!(
            bad(|c| c.line_len_max = 100),
            Err(ConfigError::LineLenMax(100))
        );
        assert_eq!(
            bad(|c| c.data_line_len_max = 999),
            Err(ConfigError::DataLineLenMax(999))
        );
        assert_eq!(
            bad(|c| c.data_line_len_max = DATA_LINE_LEN_MAX_CEILING + 1),
            Err(ConfigError::DataLineLenMax(DATA_LINE_LEN_MAX_CEILING + 1))
        );
        assert_eq!(bad(|c| c.errors_max = 0), Err(ConfigError::ErrorsMax));
        assert_eq!(
            bad(|c| {
                c.binarymime = true;
                c.chunking = false;
            }),
            Err(ConfigError::BinaryMimeNeedsChunking)
        );
        assert_eq!(bad(|c| c.size_max = 0), Err(ConfigError::SizeMax));
        assert!(bad(|c| c.hostname = "a b".to_owned())
            .is_err_and(|e| e.to_string().starts_with("hostname")));
    }

    #[test]
    fn greeting() {
        let mut s = Session::new(cfg_with(|_| {}), true);
        let mut out = Vec::new();
        s.greeting(&mut out);
        assert_eq!(out, b"220 mx.test ESMTP Epoxi\r\n");
    }

    #[test]
    fn ehlo_advertises_extensions() {
        let mut s = fresh();
        assert_eq!(
            replies(&mut s, b"EHLO client.test\r\n"),
            "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 26214400\r\n250-8BITMIME\r\n\
             250-BINARYMIME\r\n250-CHUNKING\r\n250-DSN\r\n250-ENHANCEDSTATUSCODES\r\n\
             250 SMTPUTF8\r\n"
        );
        assert_eq!(s.helo(), Some("client.test"));
    }

    #[test]
    fn helo() {
        let mut s = fresh();
        assert_eq!(replies(&mut s, b"helo client.test\r\n"), "250 mx.test\r\n");
        assert_eq!(
            replies(&mut s, b"MAIL FROM:<a@b.test>\r\n"),
            "250 2.1.0 Ok\r\n"
        );
        assert_eq!(
            replies(&mut s, b"HELO\r\n"),
            "501 5.5.4 Syntax error in parameters or arguments\r\n"
        );
    }

    #[test]
    fn simple_commands() {
        let mut s = ready();
        assert_eq!(replies(&mut s, b"NOOP\r\n"), "250 2.0.0 Ok\r\n");
        assert_eq!(replies(&mut s, b"noop hello\r\n"), "250 2.0.0 Ok\r\n");
        assert_eq!(replies(&mut s, b"RSET\r\n"), "250 2.0.0 Ok\r\n");
        assert_eq!(
            replies(&mut s, b"VRFY bob\r\n"),
            "252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery\r\n"
        );
        assert!(replies(&mut s, b"HELP\r\n").starts_with("214 2.0.0 "));
        assert_eq!(
            replies(&mut s, b"EXPN list\r\n"),
            "502 5.5.1 Command not implemented\r\n"
        );
        assert_eq!(
            talk(&mut s, b"QUIT\r\n"),
            ("221 2.0.0 Bye\r\n".to_owned(), Step::Close)
        );
        // Closed sessions ignore input.
        assert_eq!(talk(&mut s, b"NOOP\r\n"), (String::new(), Step::Close));
    }

    #[test]
    fn unknown_nul_and_syntax_errors() {
        let mut s = ready();
        assert_eq!(
            replies(&mut s, b"FOO\r\n"),
            "500 5.5.2 Command unrecognized\r\n"
        );
        assert_eq!(
            replies(&mut s, b"NO\0OP\r\n"),
            "500 5.5.2 NUL byte in command\r\n"
        );
        assert_eq!(
            replies(&mut s, b"DATA now\r\n"),
            "501 5.5.4 Syntax error in parameters or arguments\r\n"
        );
        assert_eq!(
            replies(&mut s, b"MAIL FROM:<a@b.test> SIZE=abc\r\n"),
            "501 5.5.4 Syntax error in parameters or arguments\r\n"
        );
        assert_eq!(
            replies(&mut s, b"MAIL FROM:<a@b.test> XRET=FULL\r\n"),
            "555 5.5.4 Unsupported MAIL FROM or RCPT TO parameter\r\n"
        );
        assert_eq!(
            replies(&mut s, b"MAIL FROM:<a..b@b.test>\r\n"),
            "501 5.1.7 Bad sender address syntax\r\n"
        );
        assert_eq!(
            replies(&mut s, b"MAIL FROM:<a@b.test>\r\n"),
            "250 2.1.0 Ok\r\n"
        );
        assert_eq!(
            replies(&mut s, b"RCPT TO:<x@-bad>\r\n"),
            "501 5.1.3 Bad recipient address syntax\r\n"
        );
        assert_eq!(
            replies(&mut s, b"RCPT TO:<postmaster>\r\n"),
            "501 5.1.3 Bad recipient address syntax\r\n"
        );
        assert_eq!(
            replies(&mut s, b"RCPT TO:<x@y.test> XNOTIFY=NEVER\r\n"),
            "555 5.5.4 Unsupported MAIL FROM or RCPT TO parameter\r\n"
        );
        assert_eq!(s.stats().rejected(Rejection::UnknownParameter), 2);
        assert_eq!(s.stats().rejected(Rejection::BadRecipient), 2);
    }

    #[test]
    fn sequencing() {
        let mut s = fresh();
        assert_eq!(
            replies(&mut s, b"MAIL FROM:<a@b.test>\r\n"),
            "503 5.5.1 Send EHLO or HELO first\r\n"
        );
        let mut s = ready();
        assert_eq!(
            replies(&mut s, b"RCPT TO:<x@y.test>\r\n"),
            "503 5.5.1 Send MAIL first\r\n"
        );
        assert_eq!(
            replies(&mut s, b"DATA\r\n"),
            "503 5.5.1 Send MAIL first\r\n"
        );
        assert_eq!(replies(&mut s, b"MAIL FROM:<>\r\n"), "250 2.1.0 Ok\r\n");
        assert_eq!(
            replies(&mut s, b"MAIL FROM:<a@b.test>\r\n"),
            "503 5.5.1 Nested MAIL command\r\n"
        );
        assert_eq!(
            replies(&mut s, b"DATA\r\n"),
            "554 5.5.1 No valid recipients\r\n"
        );
        // RSET ends the transaction.
        assert_eq!(replies(&mut s, b"RSET\r\n"), "250 2.0.0 Ok\r\n");
        assert_eq!(
            replies(&mut s, b"RCPT TO:<x@y.test>\r\n"),
            "503 5.5.1 Send MAIL first\r\n"
        );
        // So does EHLO.
        assert_eq!(replies(&mut s, b"MAIL FROM:<>\r\n"), "250 2.1.0 Ok\r\n");
        assert!(replies(&mut s, b"EHLO again.test\r\n").starts_with("250-mx.test\r\n"));
        assert_eq!(
            replies(&mut s, b"RCPT TO:<x@y.test>\r\n"),
            "503 5.5.1 Send MAIL first\r\n"
        );
    }

    #[test]
    fn one_transaction() {
        let mut s = ready();
        assert_eq!(
            replies(
                &mut s,
                b"MAIL FROM:<Alice@A.test> SIZE=20 BODY=8BITMIME\r\n"
            ),
            "250 2.1.0 Ok\r\n"
        );
        assert_eq!(
            replies(&mut s, b"RCPT TO:<\"b o b\"@B.test>\r\n"),
            "250 2.1.5 Ok\r\n"
        );
        let (r, step) = talk(&mut s, b"DATA\r\n");
        assert_eq!(r, "354 End data with <CR><LF>.<CR><LF>\r\n");
        assert_eq!(step, Step::NeedInput);
        assert!(s.in_data());
        let (r, step) = talk(&mut s, b"Hi\r\n.\r\n");
        assert_eq!(r, "");
        assert!(!s.in_data());
        assert!(!s.wants_input());
        assert_eq!(
            message(step),
            Transaction {
                mail_from: "Alice@A.test".to_owned(),
                rcpts: vec!["\"b o b\"@B.test".to_owned()],
                body: b"Hi\r\n".to_vec(),
                helo: "client.test".to_owned(),
                body_8bit: true,
                size_declared: Some(20),
                smtputf8: false,
                body_binary: false,
                esmtp: true,
                dsn: None,
                rcpt_dsn: vec![RcptDsn::default()],
                oob: false,
            }
        );
        assert_eq!(
            done_ok(&mut s, "0001AB"),
            "250 2.0.0 Ok: queued as 0001AB\r\n"
        );
        assert!(s.wants_input());
        assert_eq!(s.stats().messages, 1);
        // The transaction was reset.
        assert_eq!(
            replies(&mut s, b"RCPT TO:<x@y.test>\r\n"),
            "503 5.5.1 Send MAIL first\r\n"
        );
    }

    #[test]
    fn message_done_with_an_error_reply() {
        let mut s = ready();
        let step = talk(
            &mut s,
            b"MAIL FROM:<>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n.\r\n",
        )
        .1;
        assert_eq!(message(step).body, b"");
        let mut out = Vec::new();
        s.message_done(
            Err(Reply::new(451, Some((4, 3, 0)), "Spool unavailable")),
            &mut out,
        );
        assert_eq!(out, b"451 4.3.0 Spool unavailable\r\n");
        assert_eq!(replies(&mut s, b"MAIL FROM:<>\r\n"), "250 2.1.0 Ok\r\n");
    }

    #[test]
    fn pipelined_batch_replies_in_order_and_waits_for_the_spool() {
        let mut s = fresh();
        let (r, step) = talk(
            &mut s,
            b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nRCPT TO:<bad>\r\n\
              RCPT TO:<z@y.test>\r\nDATA\r\nline\r\n..dot\r\n.\r\nNOOP\r\nQUIT\r\n",
        );
        assert_eq!(
            r,
            "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 26214400\r\n250-8BITMIME\r\n\
             250-BINARYMIME\r\n250-CHUNKING\r\n250-DSN\r\n250-ENHANCEDSTATUSCODES\r\n\
             250 SMTPUTF8\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n\
             501 5.1.3 Bad recipient address syntax\r\n250 2.1.5 Ok\r\n\
             354 End data with <CR><LF>.<CR><LF>\r\n"
        );
        let t = message(step);
        assert_eq!(t.rcpts, ["x@y.test", "z@y.test"]);
        assert_eq!(t.body, b"line\r\n.dot\r\n");
        // Nothing after the dot is processed until the spool answers.
        assert_eq!(talk(&mut s, b""), (String::new(), Step::NeedInput));
        assert_eq!(done_ok(&mut s, "Q1"), "250 2.0.0 Ok: queued as Q1\r\n");
        assert_eq!(
            talk(&mut s, b""),
            ("250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n".to_owned(), Step::Close)
        );
    }

    #[test]
    fn commands_with_bare_lf_are_accepted() {
        let mut s = fresh();
        assert!(replies(&mut s, b"EHLO c.test\nNOOP\n").ends_with("250 2.0.0 Ok\r\n"));
    }

    #[test]
    fn partial_command_lines_wait_for_the_rest() {
        let mut s = ready();
        assert_eq!(talk(&mut s, b"NO"), (String::new(), Step::NeedInput));
        assert_eq!(talk(&mut s, b"OP\r"), (String::new(), Step::NeedInput));
        assert_eq!(replies(&mut s, b"\n"), "250 2.0.0 Ok\r\n");
    }

    const SAMPLE: &[u8] = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n\
        Subject: split\r\n\r\n..one\r\n.\r\r\n\r\nlast\r\n.\r\nNOOP\r\n";
    const SAMPLE_BODY: &[u8] = b"Subject: split\r\n\r\n.one\r\n\r\r\n\r\nlast\r\n";

    #[test]
    fn end_of_data_split_at_every_byte_boundary() {
        for split in 0..=SAMPLE.len() {
            let mut s = ready();
            let (mut r, mut step) = talk(&mut s, &SAMPLE[..split]);
            if !matches!(step, Step::Message(_)) {
                let (r2, step2) = talk(&mut s, &SAMPLE[split..]);
                r.push_str(&r2);
                step = step2;
            } else {
                s.input(&SAMPLE[split..]);
            }
            assert_eq!(
                r, "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n",
                "split {split}"
            );
            assert_eq!(message(step).body, SAMPLE_BODY, "split {split}");
            done_ok(&mut s, "x");
            assert_eq!(replies(&mut s, b""), "250 2.0.0 Ok\r\n", "split {split}");
        }
    }

    #[test]
    fn byte_at_a_time_session() {
        let mut s = ready();
        let mut all = String::new();
        let mut msg = None;
        for b in SAMPLE {
            let (r, step) = talk(&mut s, std::slice::from_ref(b));
            all.push_str(&r);
            if let Step::Message(t) = step {
                msg = Some(t);
                done_ok(&mut s, "x");
            }
        }
        assert_eq!(msg.map(|t| t.body), Some(SAMPLE_BODY.to_vec()));
        assert!(all.ends_with("354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok\r\n"));
    }

    #[test]
    fn empty_body() {
        let mut s = ready();
        let step = talk(&mut s, b"MAIL FROM:<>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n").1;
        assert_eq!(step, Step::NeedInput);
        assert_eq!(message(talk(&mut s, b".\r\n").1).body, b"");
    }

    #[test]
    fn declared_size_over_the_limit() {
        let mut s = session_with(cfg_with(|c| c.size_max = 1000), true);
        replies(&mut s, b"EHLO c.test\r\n");
        assert_eq!(
            replies(&mut s, b"MAIL FROM:<a@b.test> SIZE=1001\r\n"),
            "552 5.3.4 Message size exceeds fixed maximum message size\r\n"
        );
        assert_eq!(
            replies(&mut s, b"MAIL FROM:<a@b.test> SIZE=1000\r\n"),
            "250 2.1.0 Ok\r\n"
        );
    }

    #[test]
    fn oversize_body_is_drained_then_refused_and_the_session_goes_on() {
        let mut s = session_with(cfg_with(|c| c.size_max = 100), true);
        replies(
            &mut s,
            b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n",
        );
        let line = [b'x'; 48];
        for _ in 0..4 {
            s.input(&line);
            assert_eq!(replies(&mut s, b"\r\n"), "");
        }
        assert_eq!(
            talk(&mut s, b".\r\n"),
            ("552 5.3.4 Message too big\r\n".to_owned(), Step::NeedInput)
        );
        assert_eq!(s.stats().rejected(Rejection::MessageTooBig), 1);
        // The next transaction works.
        replies(
            &mut s,
            b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n",
        );
        assert_eq!(
            message(talk(&mut s, b"small\r\n.\r\n").1).body,
            b"small\r\n"
        );
    }

    #[test]
    fn long_data_line_is_refused_after_the_dot() {
        let mut s = ready();
        replies(
            &mut s,
            b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n",
        );
        let mut body = vec![b'y'; DATA_LINE_LEN_MAX_RFC - 1];
        body.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(
            talk(&mut s, &body),
            (
                "552 5.3.4 Message has a line too long\r\n".to_owned(),
                Step::NeedInput
            )
        );
        // A line of exactly 1000 bytes with its CRLF is fine.
        replies(
            &mut s,
            b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n",
        );
        let mut body = vec![b'y'; DATA_LINE_LEN_MAX_RFC - 2];
        body.extend_from_slice(b"\r\n.\r\n");
        assert!(matches!(talk(&mut s, &body).1, Step::Message(_)));
    }

    #[test]
    fn recipient_limit() {
        let mut s = ready();
        replies(&mut s, b"MAIL FROM:<a@b.test>\r\n");
        let mut batch = Vec::new();
        for i in 0..RCPTS_MAX_RFC + 1 {
            batch.extend_from_slice(format!("RCPT TO:<r{i}@y.test>\r\n").as_bytes());
        }
        let r = replies(&mut s, &batch);
        assert_eq!(r.matches("250 2.1.5 Ok\r\n").count(), RCPTS_MAX_RFC);
        assert!(r.ends_with("250 2.1.5 Ok\r\n452 4.5.3 Too many recipients\r\n"));
        let t = message(talk(&mut s, b"DATA\r\n.\r\n").1);
        assert_eq!(t.rcpts.len(), RCPTS_MAX_RFC);
        assert_eq!(t.rcpts[99], "r99@y.test");
    }

    #[test]
    fn relay_denied() {
        let mut s = session_with(cfg_with(|_| {}), false);
        replies(&mut s, b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n");
        assert_eq!(
            replies(&mut s, b"RCPT TO:<x@y.test>\r\n"),
            "550 5.7.1 Relaying denied\r\n"
        );
        assert_eq!(
            replies(&mut s, b"DATA\r\n"),
            "554 5.5.1 No valid recipients\r\n"
        );
    }

    #[test]
    fn line_too_long_in_one_piece() {
        let mut s = ready();
        let mut line = b"NOOP ".to_vec();
        line.resize(LINE_LEN_MAX_DEFAULT - 1, b'a');
        line.extend_from_slice(b"\r\n");
        assert_eq!(line.len(), LINE_LEN_MAX_DEFAULT + 1);
        assert_eq!(replies(&mut s, &line), "500 5.5.6 Line too long\r\n");
        assert_eq!(replies(&mut s, b"NOOP\r\n"), "250 2.0.0 Ok\r\n");
        // Exactly at the limit is fine.
        line.truncate(LINE_LEN_MAX_DEFAULT - 2);
        line.extend_from_slice(b"\r\n");
        assert_eq!(replies(&mut s, &line), "250 2.0.0 Ok\r\n");
    }

    #[test]
    fn line_too_long_in_pieces_is_answered_once_and_discarded() {
        let mut s = ready();
        assert_eq!(replies(&mut s, &[b'a'; 600]), "");
        assert_eq!(replies(&mut s, &[b'a'; 600]), "500 5.5.6 Line too long\r\n");
        assert!(s.buf.is_empty(), "over-long bytes are not kept");
        assert_eq!(replies(&mut s, &[b'a'; 3000]), "");
        assert!(s.buf.is_empty());
        assert_eq!(replies(&mut s, b"aaa\r\nNOOP\r\n"), "250 2.0.0 Ok\r\n");
        assert_eq!(s.stats().rejected(Rejection::LineTooLong), 1);
    }

    #[test]
    fn too_many_errors_closes() {
        let mut s = session_with(cfg_with(|c| c.errors_max = 3), true);
        assert_eq!(
            talk(
                &mut s,
                b"EHLO c.test\r\nX\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test> A=B\r\n"
            ),
            (
                String::new()
                    + "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 26214400\r\n250-8BITMIME\r\n"
                    + "250-BINARYMIME\r\n250-CHUNKING\r\n250-DSN\r\n"
                    + "250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n"
                    + "500 5.5.2 Command unrecognized\r\n"
                    + "250 2.1.0 Ok\r\n555 5.5.4 Unsupported MAIL FROM or RCPT TO parameter\r\n",
                Step::NeedInput
            )
        );
        assert_eq!(
            talk(&mut s, b"MAIL FROM:<a@b.test>\r\nNOOP\r\n"),
            (
                "503 5.5.1 Nested MAIL command\r\n421 4.7.0 Too many errors\r\n".to_owned(),
                Step::Close
            )
        );
        assert_eq!(s.stats().rejected(Rejection::TooManyErrors), 1);
    }

    #[test]
    fn policy_refusals_do_not_count_as_errors() {
        let mut s = session_with(cfg_with(|c| c.errors_max = 2), false);
        replies(&mut s, b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n");
        for _ in 0..5 {
            assert_eq!(
                replies(&mut s, b"RCPT TO:<x@y.test>\r\n"),
                "550 5.7.1 Relaying denied\r\n"
            );
        }
        assert_eq!(
            replies(&mut s, b"EXPN x\r\n"),
            "502 5.5.1 Command not implemented\r\n"
        );
        assert_eq!(talk(&mut s, b"NOOP\r\n").1, Step::NeedInput);
    }

    #[test]
    fn timeout_and_shutdown() {
        let mut s = ready();
        let mut out = Vec::new();
        s.timeout(&mut out);
        assert_eq!(out, b"421 4.4.2 mx.test Timeout, closing connection\r\n");
        assert_eq!(s.poll(&mut out), Step::Close);
        let mut s = ready();
        let mut out = Vec::new();
        s.shutdown(&mut out);
        assert_eq!(out, b"421 4.3.2 Service shutting down\r\n");
        assert_eq!(s.poll(&mut out), Step::Close);
        // A second call writes nothing.
        let mut out = Vec::new();
        s.timeout(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn body_streams_straight_into_the_reader() {
        let mut s = ready();
        replies(
            &mut s,
            b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n",
        );
        s.input(b"part one\r\n");
        assert!(s.buf.is_empty(), "body bytes bypass the input buffer");
        s.input(b"part two\r\n.\r\nNOOP\r\n");
        assert_eq!(s.buf, b"NOOP\r\n");
        let (r, step) = talk(&mut s, b"");
        assert_eq!(r, "");
        assert_eq!(message(step).body, b"part one\r\npart two\r\n");
        done_ok(&mut s, "x");
        assert_eq!(replies(&mut s, b""), "250 2.0.0 Ok\r\n");
    }

    #[test]
    fn stats_count_commands_and_rejections() {
        let mut s = ready();
        replies(&mut s, b"NOOP\r\nFOO\r\nBAR\r\n");
        assert_eq!(s.stats().commands, 4);
        assert_eq!(s.stats().rejected(Rejection::UnknownCommand), 2);
    }

    /// Deterministic xorshift, so the garbage test needs no crate and always replays the same.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn garbage_never_panics_and_buffers_stay_bounded() {
        // Fragments that steer the session into every state, mixed with random bytes and with
        // whole transactions carrying random bodies.
        let pieces: [&[u8]; 19] = [
            b"EHLO x\r\n",
            b"MAIL FROM:<a@b.c>\r\n",
            b"MAIL FROM:<a@b.c> SIZE=99999999999\r\n",
            b"RCPT TO:<x@y.z>\r\n",
            b"DATA\r\n",
            b".\r\n",
            b"\r\n.\r\n",
            b"..",
            b"\r",
            b"\n",
            b"\0",
            b"<\"@[",
            b"RSET\r\n",
            b"MAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nDATA\r\n",
            b"BDAT 7\r\n",
            b"BDAT 2 LAST\r\n",
            b"BDAT 0 LAST\r\n",
            b"MAIL FROM:<\xc3\xa9@b.c> SMTPUTF8 BODY=BINARYMIME RET=FULL ENVID=x\r\n",
            b"RCPT TO:<x@y.z> NOTIFY=NEVER ORCPT=rfc822;x+40y\r\n",
        ];
        let cfg = cfg_with(|c| {
            c.size_max = 2000;
            c.errors_max = 1000;
            c.bare_lf = BareLf::Reject;
            c.binarymime = true;
        });
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut messages = 0;
        for _ in 0..300 {
            let mut s = session_with(cfg.clone(), xorshift(&mut seed) & 3 != 3);
            s.input(b"EHLO fuzz\r\n");
            let mut out = Vec::new();
            for _ in 0..200 {
                let mut chunk = Vec::new();
                for _ in 0..(xorshift(&mut seed) % 6) {
                    let r = xorshift(&mut seed);
                    match r % 16 {
                        0..=3 => {
                            let len = (r >> 8) % 40;
                            chunk.extend((0..len).map(|_| xorshift(&mut seed) as u8));
                        }
                        4 => {
                            chunk.extend_from_slice(pieces[13]);
                            let len = (r >> 8) % 3000;
                            chunk.extend((0..len).map(|_| xorshift(&mut seed) as u8));
                            chunk.extend_from_slice(b"\r\n.\r\n");
                        }
                        5 if (r >> 8) % 50 == 1 => chunk.extend_from_slice(b"QUIT\r\n"),
                        _ => chunk.extend_from_slice(pieces[(r >> 8) as usize % pieces.len()]),
                    }
                }
                s.input(&chunk);
                let mut step = s.poll(&mut out);
                while let Step::Message(t) = step {
                    assert!(t.body.len() <= 2000);
                    messages += 1;
                    s.message_done(Ok("id"), &mut out);
                    step = s.poll(&mut out);
                }
                if step == Step::Close {
                    break;
                }
                if s.proto.state == State::Command {
                    assert!(s.buf.len() < cfg.line_len_max, "{}", s.buf.len());
                }
                assert!(s.proto.body.len() <= 2000);
            }
        }
        // The mix must reach DATA often enough to exercise it.
        assert!(messages > 100, "{messages}");
    }
    fn ehlo_line(s: &mut Session) -> String {
        replies(s, b"EHLO client.test\r\n")
    }

    #[test]
    fn starttls_upgrade_discards_pipelined_input_and_needs_a_new_ehlo() {
        let mut s = session_with(cfg_with(|c| c.starttls = true), true);
        assert!(ehlo_line(&mut s).starts_with("250-mx.test\r\n250-STARTTLS\r\n"));
        // A command pipelined behind STARTTLS was sent in plaintext: it must not run.
        let (out, step) = talk(&mut s, b"STARTTLS\r\nMAIL FROM:<a@b.test>\r\n");
        assert_eq!(
            (out.as_str(), step),
            ("220 2.0.0 Ready to start TLS\r\n", Step::StartTls)
        );
        assert!(!s.is_tls());
        s.tls_started();
        assert!(s.is_tls());
        assert!(
            replies(&mut s, b"MAIL FROM:<a@b.test>\r\n").starts_with("503 5.5.1"),
            "EHLO first"
        );
        let ehlo = ehlo_line(&mut s);
        assert!(!ehlo.contains("STARTTLS"), "not offered twice: {ehlo}");
        assert_eq!(
            replies(&mut s, b"STARTTLS\r\n"),
            "503 5.5.1 TLS already active\r\n"
        );
        assert!(replies(&mut s, b"MAIL FROM:<a@b.test>\r\n").starts_with("250"));
    }

    fn auth_session(tls: bool) -> Session {
        let mut s = session_with(
            cfg_with(|c| {
                c.starttls = true;
                c.auth = true;
            }),
            false,
        );
        if tls {
            s.tls_started();
        }
        s
    }

    #[test]
    fn auth_is_offered_only_over_tls_or_where_allowed() {
        let mut s = auth_session(false);
        assert!(!ehlo_line(&mut s).contains("AUTH"));
        assert!(replies(&mut s, b"AUTH PLAIN AGFsaWNlAHB3\r\n").starts_with("500 5.5.2"));
        let mut s = auth_session(true);
        assert!(ehlo_line(&mut s).contains("250-AUTH PLAIN LOGIN\r\n"));
        let mut s = auth_session(false);
        s.allow_auth_without_tls(true);
        assert!(ehlo_line(&mut s).contains("AUTH PLAIN LOGIN"));
    }

    #[test]
    fn auth_plain_initial_response_then_relay() {
        let mut s = auth_session(true);
        ehlo_line(&mut s);
        // Not authenticated and not a relay client: relaying is refused.
        replies(&mut s, b"MAIL FROM:<a@b.test>\r\n");
        assert!(replies(&mut s, b"RCPT TO:<x@y.test>\r\n").starts_with("550 5.7.1"));
        assert!(
            replies(&mut s, b"AUTH PLAIN AGFsaWNlAHB3\r\n").starts_with("503 5.5.1"),
            "not in a transaction"
        );
        replies(&mut s, b"RSET\r\n");
        // "\0alice\0pw"
        let (out, step) = talk(&mut s, b"AUTH PLAIN AGFsaWNlAHB3\r\nNOOP\r\n");
        assert_eq!(out, "");
        let Step::Auth(c) = step else {
            panic!("{step:?}")
        };
        assert_eq!((c.user.as_str(), c.password.as_str()), ("alice", "pw"));
        assert!(
            !format!("{c:?}").contains("pw"),
            "passwords never in debug output"
        );
        let mut out = Vec::new();
        s.auth_done(AuthVerdict::Accepted, "alice", &mut out);
        assert_eq!(out, b"235 2.7.0 Authentication successful\r\n");
        assert_eq!(s.user(), Some("alice"));
        // The pipelined NOOP waited for the verdict.
        assert!(talk(&mut s, b"").0.starts_with("250"));
        replies(&mut s, b"MAIL FROM:<a@b.test>\r\n");
        assert!(
            replies(&mut s, b"RCPT TO:<x@y.test>\r\n").starts_with("250"),
            "may relay now"
        );
        replies(&mut s, b"RSET\r\n");
        assert!(
            replies(&mut s, b"AUTH PLAIN AGFsaWNlAHB3\r\n").starts_with("503"),
            "only once"
        );
    }

    #[test]
    fn internationalized_domains_must_be_valid_idna() {
        let mut s = session_with(cfg_with(|_| {}), true);
        ehlo_line(&mut s);
        // A UTF-8 sender domain with a disallowed code point (U+2488, a "digit full stop").
        assert_eq!(
            replies(
                &mut s,
                "MAIL FROM:<a@\u{2488}x.test> SMTPUTF8\r\n".as_bytes()
            ),
            "553 5.1.7 Sender domain is not a valid internationalized domain name\r\n"
        );
        assert!(replies(
            &mut s,
            "MAIL FROM:<\u{e9}@b\u{fc}cher.test> SMTPUTF8\r\n".as_bytes()
        )
        .starts_with("250"));
        assert!(replies(&mut s, "RCPT TO:<x@m\u{fc}nchen.test>\r\n".as_bytes()).starts_with("250"));
        // A label starting with a combining mark, and one over 63 octets once encoded.
        assert_eq!(
            replies(
                &mut s,
                "RCPT TO:<x@\u{301}m\u{fc}nchen.test>\r\n".as_bytes()
            ),
            "553 5.1.3 Recipient domain is not a valid internationalized domain name\r\n"
        );
        let long = format!("RCPT TO:<x@{}\u{fc}.test>\r\n", "a".repeat(60));
        assert!(replies(&mut s, long.as_bytes()).starts_with("553 5.1.3"));
        assert_eq!(s.stats().rejected(Rejection::BadIdnRecipient), 2);
    }

    #[test]
    fn tls_required_refuses_mail_until_starttls() {
        let mut s = session_with(
            cfg_with(|c| {
                c.starttls = true;
                c.tls_required = true;
            }),
            true,
        );
        ehlo_line(&mut s);
        assert_eq!(
            replies(&mut s, b"MAIL FROM:<a@b.test>\r\n"),
            "530 5.7.0 Must issue a STARTTLS command first\r\n"
        );
        s.tls_started();
        ehlo_line(&mut s);
        assert!(replies(&mut s, b"MAIL FROM:<a@b.test>\r\n").starts_with("250"));
    }

    #[test]
    fn submission_requires_auth_before_mail() {
        let mut s = session_with(
            cfg_with(|c| {
                c.auth = true;
                c.auth_required = true;
            }),
            true,
        );
        s.tls_started();
        ehlo_line(&mut s);
        assert_eq!(
            replies(&mut s, b"MAIL FROM:<a@b.test>\r\n"),
            "530 5.7.0 Authentication required\r\n"
        );
        let (_, step) = talk(&mut s, b"AUTH PLAIN AGFsaWNlAHB3\r\n");
        assert!(matches!(step, Step::Auth(_)));
        let mut out = Vec::new();
        s.auth_done(AuthVerdict::Accepted, "alice", &mut out);
        assert!(replies(&mut s, b"MAIL FROM:<a@b.test>\r\n").starts_with("250"));
    }

    #[test]
    fn auth_login_exchange_failures_and_cancel() {
        let mut s = auth_session(true);
        ehlo_line(&mut s);
        assert_eq!(replies(&mut s, b"AUTH LOGIN\r\n"), "334 VXNlcm5hbWU6\r\n");
        assert_eq!(replies(&mut s, b"Ym9i\r\n"), "334 UGFzc3dvcmQ6\r\n");
        let (_, step) = talk(&mut s, b"c2VjcmV0\r\n");
        let Step::Auth(c) = step else {
            panic!("{step:?}")
        };
        assert_eq!((c.user.as_str(), c.password.as_str()), ("bob", "secret"));
        let mut out = Vec::new();
        s.auth_done(AuthVerdict::Rejected, "bob", &mut out);
        assert!(String::from_utf8_lossy(&out).starts_with("535 5.7.8"));
        assert_eq!(replies(&mut s, b"AUTH PLAIN\r\n"), "334 \r\n");
        assert!(
            replies(&mut s, b"*\r\n").starts_with("501 5.0.0"),
            "cancelled"
        );
        assert!(replies(&mut s, b"AUTH PLAIN !!notbase64\r\n").starts_with("501 5.5.2"));
        assert!(replies(&mut s, b"AUTH CRAM-MD5\r\n").starts_with("504 5.5.4"));
        let (_, step) = talk(&mut s, b"AUTH LOGIN Ym9i\r\nc2VjcmV0\r\n");
        assert!(matches!(step, Step::Auth(_)), "{step:?}");
        let mut out = Vec::new();
        s.auth_done(AuthVerdict::Limited, "bob", &mut out);
        assert!(String::from_utf8_lossy(&out).starts_with("454 4.7.0"));
    }

    /// Found by the command_parser fuzz target: the parser accepts a UTF-8 mailbox (SMTPUTF8
    /// exists), so the session must be what refuses it when MAIL lacks SMTPUTF8.
    #[test]
    fn fuzz_regression_utf8_sender_without_smtputf8() {
        let mut s = fresh();
        replies(&mut s, b"EHLO client.test\r\n");
        let line = b"MAIL FROM:<GilGaGGG@ekkkk.ple.kDkk.coGGGc.GkGe.oGGGoGGGGle.cke.oGG\xc2\xbale.GG2GBm>\r\n";
        assert!(replies(&mut s, line).starts_with("553 5.6.7"));
        assert!(
            replies(&mut s, b"RCPT TO:<x@y.test>\r\n").starts_with("503"),
            "no transaction opened"
        );
    }

    #[test]
    fn starttls_not_offered_is_an_unknown_command() {
        let mut s = session_with(cfg_with(|_| {}), true);
        assert!(!ehlo_line(&mut s).contains("STARTTLS"));
        assert!(replies(&mut s, b"STARTTLS\r\n").starts_with("500 5.5.2"));
        assert!(
            replies(&mut s, b"STARTTLS now\r\n").starts_with("50"),
            "no arguments"
        );
    }

    #[test]
    fn extensions_follow_the_config() {
        let mut s = session_with(
            cfg_with(|c| {
                c.smtputf8 = false;
                c.chunking = false;
                c.binarymime = false;
                c.dsn = false;
            }),
            true,
        );
        assert_eq!(
            ehlo_line(&mut s),
            "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 26214400\r\n250-8BITMIME\r\n\
             250 ENHANCEDSTATUSCODES\r\n"
        );
        // Parameters of extensions not advertised are refused.
        for line in [
            &b"MAIL FROM:<a@b.test> SMTPUTF8\r\n"[..],
            b"MAIL FROM:<a@b.test> RET=FULL\r\n",
            b"MAIL FROM:<a@b.test> ENVID=x\r\n",
        ] {
            assert_eq!(
                replies(&mut s, line),
                "555 5.5.4 Unsupported MAIL FROM or RCPT TO parameter\r\n",
                "{line:?}"
            );
        }
        assert_eq!(
            replies(&mut s, b"MAIL FROM:<a@b.test> BODY=BINARYMIME\r\n"),
            "501 5.5.4 Syntax error in parameters or arguments\r\n"
        );
        assert_eq!(
            replies(&mut s, "MAIL FROM:<pelé@b.test>\r\n".as_bytes()),
            "553 5.6.7 Non-ASCII addresses not permitted for that sender\r\n"
        );
        replies(&mut s, b"MAIL FROM:<a@b.test>\r\n");
        assert_eq!(
            replies(&mut s, b"RCPT TO:<x@y.test> NOTIFY=NEVER\r\n"),
            "555 5.5.4 Unsupported MAIL FROM or RCPT TO parameter\r\n"
        );
        replies(&mut s, b"RCPT TO:<x@y.test>\r\n");
        // BDAT is refused, but its octets are still read, so "QUIT" inside is not a command.
        assert_eq!(
            talk(&mut s, b"BDAT 6\r\nQUIT\r\nNOOP\r\n"),
            (
                "502 5.5.1 Command not implemented\r\n250 2.0.0 Ok\r\n".to_owned(),
                Step::NeedInput
            )
        );
    }

    #[test]
    fn smtputf8_addresses_need_the_mail_parameter() {
        let mut s = ready();
        assert_eq!(
            replies(&mut s, "MAIL FROM:<pelé@exämple.test>\r\n".as_bytes()),
            "553 5.6.7 Non-ASCII addresses not permitted for that sender\r\n"
        );
        assert_eq!(s.stats().rejected(Rejection::NonAsciiSender), 1);
        replies(&mut s, b"MAIL FROM:<a@b.test>\r\n");
        assert_eq!(
            replies(&mut s, "RCPT TO:<用户@例子.测试>\r\n".as_bytes()),
            "553 5.6.7 Non-ASCII addresses not permitted for that recipient\r\n"
        );
        assert_eq!(replies(&mut s, b"RSET\r\n"), "250 2.0.0 Ok\r\n");
        let (r, step) = talk(
            &mut s,
            "MAIL FROM:<pelé@exämple.test> SMTPUTF8\r\nRCPT TO:<用户@例子.测试>\r\n\
             RCPT TO:<x@y.test>\r\nDATA\r\nSubject: héllo\r\n.\r\n"
                .as_bytes(),
        );
        assert_eq!(
            r,
            "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n\
             354 End data with <CR><LF>.<CR><LF>\r\n"
        );
        let t = message(step);
        assert!(t.smtputf8);
        assert_eq!(t.mail_from, "pelé@exämple.test");
        assert_eq!(t.rcpts, ["用户@例子.测试", "x@y.test"]);
        assert_eq!(t.body, "Subject: héllo\r\n".as_bytes());
        done_ok(&mut s, "q");
        // The next transaction starts without SMTPUTF8 again.
        replies(&mut s, b"MAIL FROM:<a@b.test>\r\n");
        assert_eq!(
            replies(&mut s, "RCPT TO:<用户@例子.测试>\r\n".as_bytes()),
            "553 5.6.7 Non-ASCII addresses not permitted for that recipient\r\n"
        );
    }

    /// A session with MAIL and RCPT done.
    fn in_transaction(cfg: Rc<ServerConfig>, mail: &str) -> Session {
        let mut s = session_with(cfg, true);
        let r = replies(
            &mut s,
            format!("EHLO c.test\r\n{mail}\r\nRCPT TO:<x@y.test>\r\n").as_bytes(),
        );
        assert!(r.ends_with("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"), "{r}");
        s
    }

    #[test]
    fn bdat_chunks_are_raw_and_answered_with_their_size() {
        let mut s = in_transaction(cfg_with(|_| {}), "MAIL FROM:<a@b.test>");
        let (r, step) = talk(&mut s, b"BDAT 8\r\n..x\r\n.\r\n");
        assert_eq!(
            (r.as_str(), step),
            ("250 2.0.0 8 octets received\r\n", Step::NeedInput)
        );
        let (r, step) = talk(&mut s, b"BDAT 0\r\nBDAT 3 LAST\r\nend");
        assert_eq!(r, "250 2.0.0 0 octets received\r\n");
        let t = message(step);
        // No dot-unstuffing and no end marker: the octets as sent.
        assert_eq!(t.body, b"..x\r\n.\r\nend");
        assert_eq!(t.rcpt_dsn.len(), 1);
        assert_eq!(done_ok(&mut s, "B1"), "250 2.0.0 Ok: queued as B1\r\n");
        assert_eq!(s.stats().messages, 1);
        // The transaction is over.
        assert_eq!(
            replies(&mut s, b"RCPT TO:<x@y.test>\r\n"),
            "503 5.5.1 Send MAIL first\r\n"
        );
    }

    #[test]
    fn bdat_zero_last_ends_the_message() {
        let mut s = in_transaction(cfg_with(|_| {}), "MAIL FROM:<>");
        let (r, step) = talk(&mut s, b"BDAT 4\r\nabcdBDAT 0 LAST\r\n");
        assert_eq!(r, "250 2.0.0 4 octets received\r\n");
        assert_eq!(message(step).body, b"abcd");
    }

    /// BINARYMIME is on by default.
    fn binary_cfg() -> Rc<ServerConfig> {
        cfg_with(|_| {})
    }

    #[test]
    fn binarymime_is_advertised_by_default_and_can_be_turned_off() {
        let mut s = session_with(binary_cfg(), true);
        assert!(ehlo_line(&mut s).contains("\r\n250-BINARYMIME\r\n250-CHUNKING\r\n"));
        let mut s = session_with(cfg_with(|c| c.binarymime = false), true);
        assert!(!ehlo_line(&mut s).contains("BINARYMIME"));
        assert_eq!(
            replies(&mut s, b"MAIL FROM:<a@b.test> BODY=BINARYMIME\r\n"),
            "501 5.5.4 Syntax error in parameters or arguments\r\n"
        );
    }

    const BDAT_SAMPLE: &[u8] = b"MAIL FROM:<a@b.test> BODY=BINARYMIME\r\nRCPT TO:<x@y.test>\r\n\
        BDAT 7\r\n\0\n\r.\r\n\xffBDAT 5 LAST\r\nQUIT\r\nNOOP\r\n";
    const BDAT_BODY: &[u8] = b"\0\n\r.\r\n\xffQUIT\r";

    #[test]
    fn bdat_pipelined_and_split_at_every_byte_boundary() {
        for split in 0..=BDAT_SAMPLE.len() {
            let mut s = session_with(binary_cfg(), true);
            replies(&mut s, b"EHLO c.test\r\n");
            let (mut r, mut step) = talk(&mut s, &BDAT_SAMPLE[..split]);
            if matches!(step, Step::Message(_)) {
                s.input(&BDAT_SAMPLE[split..]);
            } else {
                let (r2, step2) = talk(&mut s, &BDAT_SAMPLE[split..]);
                r.push_str(&r2);
                step = step2;
            }
            assert_eq!(
                r, "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 7 octets received\r\n",
                "split {split}"
            );
            let t = message(step);
            assert_eq!(t.body, BDAT_BODY, "split {split}");
            assert!(t.body_binary && !t.body_8bit);
            done_ok(&mut s, "x");
            // The "\n" left after the chunk is an empty line: a syntax error, then NOOP.
            assert_eq!(
                replies(&mut s, b""),
                "500 5.5.2 Command unrecognized\r\n250 2.0.0 Ok\r\n",
                "split {split}"
            );
        }
    }

    #[test]
    fn bdat_octets_stream_straight_into_the_body() {
        let mut s = in_transaction(cfg_with(|_| {}), "MAIL FROM:<a@b.test>");
        assert_eq!(
            talk(&mut s, b"BDAT 10 LAST\r\n"),
            (String::new(), Step::NeedInput)
        );
        assert!(s.in_data() && s.wants_input());
        s.input(b"01234");
        assert!(s.buf.is_empty(), "chunk bytes bypass the input buffer");
        s.input(b"56789NOOP\r\n");
        assert_eq!(s.buf, b"NOOP\r\n");
        let (r, step) = talk(&mut s, b"");
        assert_eq!(r, "");
        assert_eq!(message(step).body, b"0123456789");
        assert!(!s.in_data());
    }

    #[test]
    fn bdat_size_limit_across_chunks() {
        let mut s = in_transaction(cfg_with(|c| c.size_max = 10), "MAIL FROM:<a@b.test>");
        assert_eq!(
            replies(&mut s, b"BDAT 6\r\n123456"),
            "250 2.0.0 6 octets received\r\n"
        );
        // The chunk that goes over is read in full, refused, and ends the transaction; a
        // pipelined chunk behind it is read and refused too.
        assert_eq!(
            talk(&mut s, b"BDAT 6\r\nRSET\r\nBDAT 4 LAST\r\nQUITNOOP\r\n"),
            (
                "552 5.3.4 Message too big\r\n503 5.5.1 Send MAIL first\r\n250 2.0.0 Ok\r\n"
                    .to_owned(),
                Step::NeedInput
            )
        );
        assert_eq!(s.stats().rejected(Rejection::MessageTooBig), 1);
        // A message of exactly size_max is fine.
        replies(&mut s, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\n");
        let t = message(talk(&mut s, b"BDAT 4\r\n1234BDAT 6 LAST\r\n123456").1);
        assert_eq!(t.body, b"1234123456");
        done_ok(&mut s, "x");
        // An absurd size is drained, not buffered.
        replies(&mut s, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\n");
        assert_eq!(
            talk(&mut s, b"BDAT 99999999999999999999\r\n"),
            (String::new(), Step::NeedInput)
        );
        s.input(&[b'z'; 5000]);
        assert!(s.buf.is_empty() && s.proto.body.is_empty());
    }

    #[test]
    fn bdat_sequencing() {
        // Without MAIL, without RCPT: refused after the octets are consumed.
        let mut s = ready();
        assert_eq!(
            talk(&mut s, b"BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n"),
            (
                "503 5.5.1 Send MAIL first\r\n250 2.0.0 Ok\r\n".to_owned(),
                Step::NeedInput
            )
        );
        replies(&mut s, b"MAIL FROM:<a@b.test>\r\n");
        assert_eq!(
            replies(&mut s, b"BDAT 4\r\nRSET"),
            "554 5.5.1 No valid recipients\r\n"
        );
        // BDAT then DATA in one transaction.
        replies(&mut s, b"RCPT TO:<x@y.test>\r\n");
        assert_eq!(
            replies(&mut s, b"BDAT 2\r\nhiDATA\r\n"),
            "250 2.0.0 2 octets received\r\n503 5.5.1 DATA not allowed after BDAT\r\n"
        );
        assert_eq!(s.stats().rejected(Rejection::DataAfterBdat), 1);
        // The transaction, and its chunks, are gone.
        assert!(s.proto.txn.is_none() && s.proto.body.is_empty());
        // RSET drops chunks received so far.
        replies(&mut s, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\n");
        replies(&mut s, b"BDAT 3\r\nold");
        assert_eq!(replies(&mut s, b"RSET\r\n"), "250 2.0.0 Ok\r\n");
        replies(&mut s, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\n");
        assert_eq!(message(talk(&mut s, b"BDAT 3 LAST\r\nnew").1).body, b"new");
    }

    #[test]
    fn binarymime_needs_bdat() {
        let mut s = in_transaction(binary_cfg(), "MAIL FROM:<a@b.test> BODY=BINARYMIME");
        assert_eq!(
            replies(&mut s, b"DATA\r\n"),
            "503 5.5.1 BODY=BINARYMIME requires BDAT\r\n"
        );
        // The transaction survives, so the client can still send it properly.
        let t = message(talk(&mut s, b"BDAT 2 LAST\r\n\0\0").1);
        assert!(t.body_binary);
        assert_eq!(t.body, b"\0\0");
    }

    #[test]
    fn dsn_parameters_are_kept_for_bounces() {
        let mut s = ready();
        let (r, step) = talk(
            &mut s,
            b"MAIL FROM:<a@b.test> RET=HDRS ENVID=QQ+2B1\r\n\
              RCPT TO:<x@y.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;X+40Y.test\r\n\
              RCPT TO:<bad> NOTIFY=NEVER\r\n\
              RCPT TO:<z@y.test>\r\nRCPT TO:<w@y.test> NOTIFY=NEVER\r\nDATA\r\n.\r\n",
        );
        assert!(r.contains("501 5.1.3"), "{r}");
        let t = message(step);
        assert_eq!(
            t.dsn,
            Some(DsnEnvelope {
                ret: Some(Ret::Hdrs),
                envid: Some("QQ+1".to_owned())
            })
        );
        assert_eq!(t.rcpts.len(), 3);
        assert_eq!(
            t.rcpt_dsn,
            [
                RcptDsn {
                    notify: Some(Notify {
                        success: true,
                        failure: true,
                        delay: false
                    }),
                    orcpt: Some(Orcpt {
                        addr_type: "rfc822".to_owned(),
                        address: "X@Y.test".to_owned()
                    })
                },
                RcptDsn::default(),
                RcptDsn {
                    notify: Some(Notify::default()),
                    orcpt: None
                },
            ]
        );
        done_ok(&mut s, "x");
        // Without DSN parameters there is no DSN envelope.
        replies(&mut s, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\n");
        assert_eq!(message(talk(&mut s, b"DATA\r\n.\r\n").1).dsn, None);
    }

    #[test]
    fn utf8_orcpt_is_kept_in_its_ascii_form() {
        let mut s = ready();
        let (r, step) = talk(
            &mut s,
            "MAIL FROM:<a@b.test> SMTPUTF8\r\n\
             RCPT TO:<j\u{f8}rn@y.test> ORCPT=utf-8;j\u{f8}rn@y.test\r\n\
             RCPT TO:<x@y.test> ORCPT=UTF-8;x\\x{E9}@y.test\r\nDATA\r\n.\r\n"
                .as_bytes(),
        );
        assert!(!r.contains("555"), "{r}");
        let t = message(step);
        let orcpts: Vec<String> = t
            .rcpt_dsn
            .iter()
            .filter_map(|d| d.orcpt.as_ref())
            .map(|o| format!("{};{}", o.addr_type, o.address))
            .collect();
        assert_eq!(orcpts, ["utf-8;j\\x{F8}rn@y.test", "utf-8;x\\x{E9}@y.test"]);
        done_ok(&mut s, "x");
        // Raw UTF-8 needs SMTPUTF8 (RFC 6533 §3); the escaped form does not.
        replies(&mut s, b"MAIL FROM:<a@b.test>\r\n");
        assert_eq!(
            replies(
                &mut s,
                "RCPT TO:<x@y.test> ORCPT=utf-8;\u{e9}@y.test\r\n".as_bytes()
            ),
            "555 5.5.4 Invalid DSN parameter value\r\n"
        );
        assert!(replies(
            &mut s,
            b"RCPT TO:<x@y.test> ORCPT=utf-8;x\\x{E9}@y.test\r\n"
        )
        .starts_with("250"));
    }

    #[test]
    fn bad_dsn_values_get_555() {
        let mut s = ready();
        let bad = "555 5.5.4 Invalid DSN parameter value\r\n";
        assert_eq!(replies(&mut s, b"MAIL FROM:<a@b.test> RET=BODY\r\n"), bad);
        assert_eq!(
            replies(&mut s, b"MAIL FROM:<a@b.test> ENVID=a+0Ab\r\n"),
            bad
        );
        replies(&mut s, b"MAIL FROM:<a@b.test>\r\n");
        assert_eq!(
            replies(&mut s, b"RCPT TO:<x@y.test> NOTIFY=NEVER,DELAY\r\n"),
            bad
        );
        assert_eq!(
            replies(&mut s, b"RCPT TO:<x@y.test> ORCPT=x@y.test\r\n"),
            bad
        );
        assert_eq!(s.stats().rejected(Rejection::BadDsnParameter), 4);
    }

    #[test]
    fn a_dsn_rcpt_line_of_maximum_length_fits() {
        let mut s = in_transaction(cfg_with(|_| {}), "MAIL FROM:<a@b.test>");
        let local = "l".repeat(64);
        let domain = vec!["d".repeat(60); 3].join(".");
        let orcpt = "o".repeat(super::super::parser::ORCPT_LEN_MAX - "rfc822;".len());
        let line = format!(
            "RCPT TO:<{local}@{domain}> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;{orcpt}\r\n"
        );
        assert!(line.len() > LINE_LEN_MAX_RFC);
        assert_eq!(replies(&mut s, line.as_bytes()), "250 2.1.5 Ok\r\n");
    }

    #[test]
    fn bare_lf_policy() {
        const MSG: &[u8] = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\na\nb\r\n.\r\n";
        // Default: kept, as before.
        let mut s = ready();
        assert_eq!(message(talk(&mut s, MSG).1).body, b"a\nb\r\n");
        // Reject: refused after the end marker, and the session goes on.
        let mut s = session_with(cfg_with(|c| c.bare_lf = BareLf::Reject), true);
        replies(&mut s, b"EHLO c.test\r\n");
        assert_eq!(
            talk(&mut s, MSG),
            (
                "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n\
                 554 5.6.0 Bare LF not allowed in message, use CRLF\r\n"
                    .to_owned(),
                Step::NeedInput
            )
        );
        assert_eq!(s.stats().rejected(Rejection::BareLf), 1);
        assert!(s.proto.txn.is_none());
        let cr = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\na\rb\r\n.\r\n";
        assert!(talk(&mut s, cr)
            .0
            .ends_with("\r\n554 5.6.0 Bare CR not allowed in message, use CRLF\r\n"));
        let ok = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\nfine\r\n.\r\n";
        assert_eq!(message(talk(&mut s, ok).1).body, b"fine\r\n");
    }

    #[test]
    fn nul_policy() {
        const MSG: &[u8] = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\na\0b\r\n.\r\n";
        let mut s = ready();
        assert_eq!(message(talk(&mut s, MSG).1).body, b"a\0b\r\n");
        let mut s = session_with(cfg_with(|c| c.nul = NulByte::Reject), true);
        replies(&mut s, b"EHLO c.test\r\n");
        assert!(talk(&mut s, MSG)
            .0
            .ends_with("\r\n554 5.6.0 NUL byte not allowed in message\r\n"));
        assert_eq!(s.stats().rejected(Rejection::NulInMessage), 1);
    }

    #[test]
    fn messages_per_session_limit() {
        let mut s = session_with(cfg_with(|c| c.messages_per_session_max = 2), true);
        replies(&mut s, b"EHLO c.test\r\n");
        let txn = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n.\r\n";
        for _ in 0..2 {
            message(talk(&mut s, txn).1);
            done_ok(&mut s, "x");
        }
        assert_eq!(
            talk(&mut s, b"RSET\r\nMAIL FROM:<a@b.test>\r\nNOOP\r\n"),
            (
                "250 2.0.0 Ok\r\n421 4.7.0 Too many messages, reconnect\r\n".to_owned(),
                Step::Close
            )
        );
        assert_eq!(s.stats().rejected(Rejection::TooManyMessages), 1);
        // 0 means unlimited.
        let mut s = ready();
        for _ in 0..20 {
            message(talk(&mut s, txn).1);
            done_ok(&mut s, "x");
        }
    }

    #[test]
    fn reports_to_the_oob_domain_come_from_anyone_in_transactions_of_their_own() {
        let cfg = cfg_with(|c| c.oob_domain = Some("bounces.test".to_owned()));
        // Not a relay client: only the report domain is taken.
        let mut s = session_with(cfg.clone(), false);
        let r = replies(
            &mut s,
            b"EHLO mx.remote\r\nMAIL FROM:<>\r\nRCPT TO:<b+1.0.2@Bounces.test>\r\n\
              RCPT TO:<x@y.test>\r\nDATA\r\n",
        );
        assert!(
            r.contains("250 2.1.5 Ok\r\n550 5.7.1 Relaying denied\r\n354"),
            "{r}"
        );
        let (_, step) = talk(&mut s, b"report\r\n.\r\n");
        let t = message(step);
        assert!(t.oob);
        assert_eq!(t.rcpts, ["b+1.0.2@Bounces.test"]);
        let mut out = Vec::new();
        s.report_done(&mut out);
        assert_eq!(out, b"250 2.0.0 Ok: report received\r\n");
        // A relay client mixing the two kinds is asked for another transaction.
        let mut s = session_with(cfg, true);
        let r = replies(
            &mut s,
            b"EHLO c\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<x@y.test>\r\n\
              RCPT TO:<abuse@bounces.test>\r\nDATA\r\n",
        );
        assert!(
            r.contains("250 2.1.5 Ok\r\n452 4.5.3 Reports to the bounce domain"),
            "{r}"
        );
        let (_, step) = talk(&mut s, b"hi\r\n.\r\n");
        let t = message(step);
        assert!(!t.oob);
        assert_eq!(t.rcpts, ["x@y.test"]);
        assert_eq!(s.stats().rejected(Rejection::OobMixed), 1);
    }

    #[test]
    fn rcpt_checks_wait_for_their_verdict_in_order() {
        let cfg = cfg_with(|c| {
            c.rcpt_check = true;
            c.oob_domain = Some("bounces.test".to_owned());
        });
        let mut s = session_with(cfg, true);
        let mut out = Vec::new();
        s.input(
            b"EHLO c\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<x@y.test>\r\nRCPT TO:<z@y.test>\r\n\
              DATA\r\n",
        );
        assert_eq!(s.poll(&mut out), Step::Rcpt("x@y.test".to_owned()));
        // Nothing pipelined behind it is read meanwhile.
        assert_eq!(s.poll(&mut out), Step::NeedInput);
        assert!(!s.wants_input());
        let refusal = Reply::new(550, Some((5, 7, 1)), "Recipient suppressed");
        s.rcpt_done(Some(&refusal), &mut out);
        // A second verdict is ignored.
        s.rcpt_done(None, &mut out);
        assert_eq!(s.poll(&mut out), Step::Rcpt("z@y.test".to_owned()));
        s.rcpt_done(None, &mut out);
        assert_eq!(s.poll(&mut out), Step::NeedInput);
        let text = String::from_utf8_lossy(&out).into_owned();
        assert!(
            text.ends_with(
                "250 2.1.0 Ok\r\n550 5.7.1 Recipient suppressed\r\n250 2.1.5 Ok\r\n354 End data \
                 with <CR><LF>.<CR><LF>\r\n"
            ),
            "{text}"
        );
        let (_, step) = talk(&mut s, b"hi\r\n.\r\n");
        assert_eq!(message(step).rcpts, ["z@y.test"]);
        assert_eq!(s.stats().rejected(Rejection::Suppressed), 1);
        // Reports are never checked.
        let mut out = Vec::new();
        s.message_done(Ok("q1"), &mut out);
        s.input(b"MAIL FROM:<>\r\nRCPT TO:<b@bounces.test>\r\n");
        assert_eq!(s.poll(&mut out), Step::NeedInput);
        assert!(String::from_utf8_lossy(&out).ends_with("250 2.1.5 Ok\r\n"));
    }
}
