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
//! - The transaction (MAIL, RCPTs) is reset by RSET, EHLO/HELO, the end of DATA, and any refusal
//!   of the message, so nothing leaks from one message into the next.

use std::io::Write as _;
use std::rc::Rc;

use thiserror::Error;

use super::data::{DataError, DataReader};
use super::find_lf;
use super::parser::{parse_command, BodyType, Command, MailParams, Mailbox};
use super::reply::{self, Rejection, Reply};

/// RFC 5321 4.5.3.1.8: a server must accept at least 100 recipients per message.
pub const RCPTS_MAX_RFC: usize = 100;
/// RFC 5321 4.5.3.1.4: a command line is at most 512 octets, CRLF included.
pub const LINE_LEN_MAX_RFC: usize = 512;
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
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            hostname: "localhost".to_owned(),
            size_max: SIZE_MAX_DEFAULT,
            rcpts_max: RCPTS_MAX_RFC,
            line_len_max: LINE_LEN_MAX_RFC,
            data_line_len_max: DATA_LINE_LEN_MAX_RFC,
            errors_max: ERRORS_MAX_DEFAULT,
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
        Ok(())
    }

    /// The EHLO keywords we advertise, in order. Later extensions (STARTTLS, AUTH, SMTPUTF8,
    /// CHUNKING, DSN) are added here, conditioned on config and on session state.
    pub fn extensions(&self) -> impl Iterator<Item = Extension> {
        [
            Extension::Pipelining,
            Extension::Size(self.size_max),
            Extension::EightBitMime,
            Extension::EnhancedStatusCodes,
        ]
        .into_iter()
    }
}

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
    /// The message: CRLF line endings as sent, dot-unstuffed, without the final ".\r\n".
    pub body: Vec<u8>,
    /// The EHLO/HELO name the client gave.
    pub helo: String,
    /// BODY=8BITMIME was given on MAIL.
    pub body_8bit: bool,
    /// SIZE= given on MAIL, if any.
    pub size_declared: Option<usize>,
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
    /// Handed out a message; waiting for `message_done`.
    AwaitQueue,
    /// Said 221 or 421; nothing more will be read or written.
    Closed,
}

/// The envelope of the transaction being built.
#[derive(Debug)]
struct Envelope {
    mail_from: String,
    rcpts: Vec<String>,
    body_8bit: bool,
    size_declared: Option<usize>,
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
    txn: Option<Envelope>,
    body: Vec<u8>,
    reader: DataReader,
    errors: usize,
    /// Discarding the rest of an over-long command line (its 500 is already written).
    discarding: bool,
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
                txn: None,
                body: Vec::new(),
                reader,
                errors: 0,
                discarding: false,
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
                State::Command => {
                    let pending = &self.buf[self.start..];
                    match find_lf(pending) {
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

    /// True while message text is being read, so the adapter uses the DATA timeout
    /// (RFC 5321 4.5.3.2.6: 10 minutes) rather than the command timeout (5 minutes).
    pub fn in_data(&self) -> bool {
        self.proto.state == State::Data
    }

    /// False while the session waits for `message_done` or is closed: reading more then would
    /// only grow the buffer.
    pub fn wants_input(&self) -> bool {
        matches!(self.proto.state, State::Command | State::Data)
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
}

impl Proto {
    /// Hot path: no I/O, no allocation beyond the body buffer.
    fn feed_data(&mut self, bytes: &[u8]) -> usize {
        self.reader.feed(bytes, &mut self.body)
    }

    /// One complete line, LF included.
    fn command_line(&mut self, line: &[u8], out: &mut Vec<u8>) {
        if self.discarding {
            // The tail of an over-long line, already answered.
            self.discarding = false;
            return;
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
                self.txn = None;
                self.helo = Some(name.to_owned());
                self.write_ehlo(out);
            }
            Command::Helo(name) => {
                self.txn = None;
                self.helo = Some(name.to_owned());
                out.extend_from_slice(b"250 ");
                out.extend_from_slice(self.cfg.hostname.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            Command::Mail { from, params } => self.mail(from, params, out),
            Command::Rcpt { to, .. } => self.rcpt(to, out),
            Command::Data => self.data(out),
            Command::Rset => {
                self.txn = None;
                out.extend_from_slice(reply::OK.wire);
            }
            Command::Noop => out.extend_from_slice(reply::OK.wire),
            Command::Quit => {
                out.extend_from_slice(reply::BYE.wire);
                self.state = State::Closed;
            }
            Command::Vrfy(_) => out.extend_from_slice(reply::VRFY.wire),
            Command::Expn(_) => self.reject(Rejection::NotImplemented, out),
            Command::Help(_) => out.extend_from_slice(reply::HELP.wire),
        }
    }

    fn write_ehlo(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"250-");
        out.extend_from_slice(self.cfg.hostname.as_bytes());
        out.extend_from_slice(b"\r\n");
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

    fn mail(&mut self, from: Option<Mailbox<'_>>, params: MailParams, out: &mut Vec<u8>) {
        if self.helo.is_none() {
            return self.reject(Rejection::NeedHelo, out);
        }
        if self.txn.is_some() {
            return self.reject(Rejection::NestedMail, out);
        }
        if params.size.is_some_and(|n| n > self.cfg.size_max) {
            return self.reject(Rejection::SizeExceeded, out);
        }
        self.txn = Some(Envelope {
            mail_from: from.map_or_else(String::new, |m| m.address.to_owned()),
            rcpts: Vec::new(),
            body_8bit: params.body == Some(BodyType::EightBitMime),
            size_declared: params.size,
        });
        out.extend_from_slice(reply::MAIL_OK.wire);
    }

    fn rcpt(&mut self, to: Mailbox<'_>, out: &mut Vec<u8>) {
        let Some(txn) = self.txn.as_mut() else {
            return self.reject(Rejection::NeedMail, out);
        };
        if txn.rcpts.len() >= self.cfg.rcpts_max {
            return self.reject(Rejection::TooManyRecipients, out);
        }
        if !self.relay_allowed {
            return self.reject(Rejection::RelayDenied, out);
        }
        txn.rcpts.push(to.address.to_owned());
        out.extend_from_slice(reply::RCPT_OK.wire);
    }

    fn data(&mut self, out: &mut Vec<u8>) {
        let declared = match &self.txn {
            None => return self.reject(Rejection::NeedMail, out),
            Some(t) if t.rcpts.is_empty() => {
                return self.reject(Rejection::NoValidRecipients, out);
            }
            Some(t) => t.size_declared,
        };
        out.extend_from_slice(reply::DATA_GO.wire);
        self.reader = DataReader::new(self.cfg.size_max, self.cfg.data_line_len_max);
        self.body = Vec::with_capacity(
            declared
                .unwrap_or(0)
                .min(self.cfg.size_max)
                .min(BODY_RESERVE_MAX),
        );
        self.state = State::Data;
    }

    /// The end marker was read: hand the message out, or refuse it and carry on.
    fn end_data(&mut self, out: &mut Vec<u8>) -> Option<Transaction> {
        let txn = self.txn.take();
        let body = std::mem::take(&mut self.body);
        self.state = State::Command;
        match self.reader.finish() {
            Err(DataError::TooBig { .. }) => self.reject(Rejection::MessageTooBig, out),
            Err(DataError::LineTooLong { .. }) => self.reject(Rejection::DataLineTooLong, out),
            Ok(()) => match txn {
                Some(env) => {
                    self.state = State::AwaitQueue;
                    self.stats.messages += 1;
                    return Some(Transaction {
                        mail_from: env.mail_from,
                        rcpts: env.rcpts,
                        body,
                        helo: self.helo.clone().unwrap_or_default(),
                        body_8bit: env.body_8bit,
                        size_declared: env.size_declared,
                    });
                }
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
             250 ENHANCEDSTATUSCODES\r\n"
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
            replies(&mut s, b"MAIL FROM:<a@b.test> RET=FULL\r\n"),
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
            replies(&mut s, b"RCPT TO:<x@y.test> NOTIFY=NEVER\r\n"),
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
             250 ENHANCEDSTATUSCODES\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n\
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
        line.resize(LINE_LEN_MAX_RFC - 1, b'a');
        line.extend_from_slice(b"\r\n");
        assert_eq!(line.len(), LINE_LEN_MAX_RFC + 1);
        assert_eq!(replies(&mut s, &line), "500 5.5.6 Line too long\r\n");
        assert_eq!(replies(&mut s, b"NOOP\r\n"), "250 2.0.0 Ok\r\n");
        // Exactly at the limit is fine.
        line.truncate(LINE_LEN_MAX_RFC - 2);
        line.extend_from_slice(b"\r\n");
        assert_eq!(replies(&mut s, &line), "250 2.0.0 Ok\r\n");
    }

    #[test]
    fn line_too_long_in_pieces_is_answered_once_and_discarded() {
        let mut s = ready();
        assert_eq!(replies(&mut s, &[b'a'; 300]), "");
        assert_eq!(replies(&mut s, &[b'a'; 300]), "500 5.5.6 Line too long\r\n");
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
                    + "250 ENHANCEDSTATUSCODES\r\n500 5.5.2 Command unrecognized\r\n"
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
        let pieces: [&[u8]; 14] = [
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
        ];
        let cfg = cfg_with(|c| {
            c.size_max = 2000;
            c.errors_max = 1000;
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
                    assert!(s.buf.len() < LINE_LEN_MAX_RFC, "{}", s.buf.len());
                }
                assert!(s.proto.body.len() <= 2000);
            }
        }
        // The mix must reach DATA often enough to exercise it.
        assert!(messages > 100, "{messages}");
    }
}
