//! The outbound SMTP client (RFC 5321 client side) as a state machine.
//!
//! Job: given the bytes a server sent, decide what to send next, and report per-recipient
//! outcomes. The delivery adapter owns the socket, the timers and the retry decisions.
//!
//! Driving it: `input` what was read, `poll` until it stops returning progress, write `out`.
//! `poll` walks greeting → EHLO (→ HELO if the server refuses EHLO with 5xx) and returns `Ready`.
//! Then `start` writes MAIL, RCPTs and DATA (as one batch when the server offers PIPELINING,
//! RFC 2920; one at a time otherwise), `poll` returns `SendBody` once DATA is accepted,
//! `write_body` writes the message, and `poll` returns `Done` with every reply. The client is
//! `Ready` again after `Done`, for the next message on the same connection.
//!
//! When the server offers CHUNKING (RFC 3030) the body goes with BDAT instead of DATA: `start`
//! writes MAIL and RCPTs only, `poll` returns `SendBody` once every RCPT is answered and one was
//! accepted, and `write_body` writes the body as it is, no dot-stuffing, in chunks of at most
//! `bdat_chunk_size_max` octets, the last one `BDAT n LAST`. Waiting for the RCPT replies costs
//! no round trip over DATA (whose 354 must be waited for too) and never sends a body to nobody.
//! With PIPELINING every chunk goes out at once; without it, one chunk per reply.
//!
//! Invariants:
//! - No I/O, no clock: timeouts are the adapter's timers.
//! - Replies are matched to commands strictly in order through a queue of expected replies, so
//!   a pipelined batch needs no special casing beyond what to send after each reply.
//! - The body is only written after a 354 (with BDAT: after the RCPT replies) and at least one
//!   accepted recipient. If a pipelined DATA is refused (all recipients failed: 503/554), no
//!   body is sent, and the connection is made usable again with RSET when the server may still
//!   hold our MAIL. If a broken server says 354 anyway, we end the empty message with "." alone
//!   and discard its reply.
//! - A refused BDAT chunk fails the transaction with its reply; no chunk is sent after it
//!   (RFC 3030 §2), the replies to chunks already pipelined are read and ignored, and RSET
//!   closes the transaction the server still holds. The reply to `BDAT LAST` ends the
//!   transaction as the reply to the final dot does, so the next one may ride behind it.
//! - A BINARYMIME body only goes with BDAT to a server that offers CHUNKING and BINARYMIME;
//!   otherwise the transaction ends at once with a local permanent refusal, nothing sent.
//! - Any 421, a malformed or unexpected reply, or a failed handshake makes the client `Failed`
//!   for good: the connection is no longer in a known state.
//! - Addresses are validated before they reach the wire, so a CR or LF in one can never inject a
//!   command; invalid ones get a local 501 in the outcome and are not sent.
//! - Buffered input is bounded by the reply parser's limits (`line_len_max`,
//!   `reply::REPLY_LINES_MAX`).

use std::collections::VecDeque;

use super::data::write_stuffed_parts;
use super::parser::{parse_mailbox, parse_mailbox_utf8};
use super::reply::{self, parse_reply, Reply};

/// Default `line_len_max` for reply lines. RFC 5321 4.5.3.1.5 says 512, but real servers send
/// longer banners and error texts; 2048 is lenient while still bounding the buffer.
pub const REPLY_LINE_LEN_MAX_DEFAULT: usize = 2048;

/// Default `bdat_chunk_size_max`. A server may take in a whole chunk before it looks at it, and
/// can only report an error (a full disk, a size limit) once a chunk is read (RFC 3030 §2 asks
/// for a chunk size suited to that); 1 MiB bounds both while each chunk's command and reply
/// (about 30 octets) stay noise. Most messages are smaller and go as a single `BDAT n LAST`.
pub const BDAT_CHUNK_SIZE_MAX_DEFAULT: usize = 1 << 20;

/// Client settings, shared by all outbound connections of a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Our name in EHLO/HELO.
    pub helo_name: String,
    /// Longest reply line accepted, CRLF included.
    pub line_len_max: usize,
    /// Whether to upgrade to TLS with STARTTLS (RFC 3207).
    pub starttls: TlsPolicy,
    /// Largest BDAT chunk, in octets (at least 1); bigger bodies go in several chunks.
    pub bdat_chunk_size_max: usize,
}

/// STARTTLS policy for a destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum TlsPolicy {
    /// Use STARTTLS when offered, go on in plaintext when not (or when it is refused).
    #[default]
    Opportunistic,
    /// Only deliver over TLS: a server that does not offer STARTTLS, or refuses it, fails the
    /// connection (transiently: the next attempt may find it fixed).
    Required,
    /// Never use STARTTLS.
    Disabled,
}

impl Default for ClientConfig {
    fn default() -> ClientConfig {
        ClientConfig {
            helo_name: "localhost".to_owned(),
            line_len_max: REPLY_LINE_LEN_MAX_DEFAULT,
            starttls: TlsPolicy::Opportunistic,
            bdat_chunk_size_max: BDAT_CHUNK_SIZE_MAX_DEFAULT,
        }
    }
}

/// What the server advertised in its EHLO reply (all false/None after a HELO fallback).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// RFC 2920.
    pub pipelining: bool,
    /// RFC 1870 SIZE: `Some(0)` when advertised without a limit.
    pub size: Option<usize>,
    /// RFC 6152.
    pub eight_bit_mime: bool,
    /// RFC 2034.
    pub enhanced_status_codes: bool,
    /// RFC 3030 CHUNKING: the body goes with BDAT.
    pub chunking: bool,
    /// RFC 3030 BINARYMIME: BODY=BINARYMIME is taken (with BDAT).
    pub binary_mime: bool,
    /// Every keyword line as the server sent it (`SIZE 1000`, `AUTH PLAIN`, ...).
    pub keywords: Vec<String>,
}

impl Capabilities {
    /// Reads the keyword lines of an EHLO reply (every line after the first).
    pub fn from_ehlo(reply: &Reply) -> Capabilities {
        let mut caps = Capabilities::default();
        for line in reply.lines().skip(1) {
            let line = line.trim();
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            if keyword.eq_ignore_ascii_case("PIPELINING") {
                caps.pipelining = true;
            } else if keyword.eq_ignore_ascii_case("SIZE") {
                caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0));
            } else if keyword.eq_ignore_ascii_case("8BITMIME") {
                caps.eight_bit_mime = true;
            } else if keyword.eq_ignore_ascii_case("ENHANCEDSTATUSCODES") {
                caps.enhanced_status_codes = true;
            } else if keyword.eq_ignore_ascii_case("CHUNKING") {
                caps.chunking = true;
            } else if keyword.eq_ignore_ascii_case("BINARYMIME") {
                caps.binary_mime = true;
            }
            caps.keywords.push(line.to_owned());
        }
        caps
    }

    /// Whether `keyword` was advertised (case-insensitive).
    pub fn has(&self, keyword: &str) -> bool {
        self.keywords.iter().any(|line| {
            line.split_ascii_whitespace()
                .next()
                .is_some_and(|k| k.eq_ignore_ascii_case(keyword))
        })
    }
}

/// What the adapter should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientStep {
    /// Write `out`, read more, call `input` then `poll`.
    NeedInput,
    /// Idle with a working session: call `start` or `quit`. Returned on every `poll` while idle.
    Ready,
    /// DATA was accepted (with BDAT: the RCPTs were answered, one accepted): call `write_body`.
    SendBody,
    /// The transaction is over; the client is `Ready` again.
    Done(TransactionOutcome),
    /// The connection is unusable (refused greeting or EHLO/HELO, 421, malformed reply); the
    /// reply says why. Returned on every later `poll`.
    Failed(Reply),
    /// The server answered QUIT; close the connection.
    Closed,
    /// The server accepted STARTTLS: run the TLS handshake on the socket, then call
    /// `tls_started` (or drop the connection if the handshake fails).
    StartTls,
}

/// Every reply of one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionOutcome {
    /// Reply to MAIL (or a local 501/554 if nothing could be sent).
    pub mail: Reply,
    /// One reply per recipient, in the order given to `start`. When MAIL failed, recipients that
    /// were sent carry the MAIL reply; invalid addresses carry a local 501 5.1.3.
    pub rcpts: Vec<Reply>,
    /// Reply to the final dot, or with BDAT to `BDAT LAST` or to the first refused chunk;
    /// `None` if no body was sent.
    pub data: Option<Reply>,
    /// Reply to the DATA command itself (354, or the refusal); `None` if DATA was not sent
    /// (BDAT has no such command).
    pub data_command: Option<Reply>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Greeting,
    Ehlo,
    Helo,
    Mail,
    /// The reply to the RCPT for this recipient slot.
    Rcpt(usize),
    Data,
    /// Reply to the final dot; `discard` when we only ended a DATA we had nothing to send for.
    Dot {
        discard: bool,
    },
    /// The reply to a BDAT chunk; `last` for `BDAT n LAST`.
    Bdat {
        last: bool,
    },
    Rset,
    Quit,
    StartTls,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Handshake,
    Ready,
    Transaction,
    AwaitBody,
    Quit,
    Closed,
    Failed(Reply),
}

#[derive(Debug)]
struct Txn {
    pipelined: bool,
    /// Valid recipients to send, with their slot in the outcome.
    wire: Vec<(String, usize)>,
    /// Lock-step only: index in `wire` of the next RCPT to send.
    next: usize,
    accepted: usize,
    mail: Option<Reply>,
    rcpts: Vec<Option<Reply>>,
    data_command: Option<Reply>,
    data: Option<Reply>,
    /// The body goes with BDAT (the server offers CHUNKING).
    bdat: bool,
    /// A chunk before the LAST one was refused: no more chunks, RSET once the replies owed for
    /// pipelined chunks are in.
    chunk_failed: bool,
    /// Lock-step BDAT only: the body, and how much of it has gone out, until the last chunk is
    /// written.
    body: Vec<u8>,
    body_at: usize,
}

impl Txn {
    fn mail_ok(&self) -> bool {
        self.mail.as_ref().is_some_and(Reply::is_positive)
    }

    fn into_outcome(self) -> TransactionOutcome {
        let mail = self.mail.unwrap_or_else(|| no_reply("MAIL"));
        let mail_ok = mail.is_positive();
        let sent: Vec<bool> = {
            let mut sent = vec![false; self.rcpts.len()];
            for (_, slot) in &self.wire {
                sent[*slot] = true;
            }
            sent
        };
        let rcpts = self
            .rcpts
            .into_iter()
            .zip(sent)
            .map(|(r, sent)| match r {
                Some(r) if mail_ok || !sent => r,
                _ if !mail_ok => mail.clone(),
                _ => no_reply("RCPT"),
            })
            .collect();
        TransactionOutcome {
            mail,
            rcpts,
            data: self.data,
            data_command: self.data_command,
        }
    }
}

/// Local reply when TLS is required and the server does not offer it. Transient (4.7.10 is
/// not defined; 4.7.5 is "cryptographic failure" in RFC 5248's registry): the server may
/// be fixed by the next attempt.
const TLS_NOT_OFFERED: reply::Canned = reply::Canned {
    code: 421,
    enhanced: Some((4, 7, 5)),
    text: "TLS required for this destination but STARTTLS is not offered",
    wire: b"421 4.7.5 TLS required for this destination but STARTTLS is not offered\r\n",
};

/// A local stand-in for a reply that never came; only reachable through a bug.
fn no_reply(cmd: &str) -> Reply {
    Reply::new(451, Some((4, 3, 0)), format!("No reply to {cmd}"))
}

/// Which reply the client waits for, so the adapter can apply RFC 5321 §4.5.3.2's timeout
/// for that phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Awaiting {
    /// Greeting, EHLO/HELO, MAIL, RCPT, RSET, QUIT, STARTTLS (§4.5.3.2.1–3: 5 minutes).
    Reply,
    /// The reply to DATA (§4.5.3.2.4: 2 minutes).
    DataInit,
    /// The reply to the final dot (§4.5.3.2.6: 10 minutes), or to `BDAT LAST`, which the
    /// server sends once it has processed the message just as for the final dot.
    FinalDot,
}

/// What MAIL declares about the message (RFC 1870 SIZE, RFC 6152 8BITMIME, RFC 3030
/// BINARYMIME, RFC 6531 SMTPUTF8).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MailOptions {
    /// Message size in octets, sent as SIZE= when the server supports SIZE.
    pub size: Option<usize>,
    /// The body has 8-bit octets: BODY=8BITMIME; refused locally if the server lacks 8BITMIME.
    pub eight_bit: bool,
    /// The body is binary (received with BODY=BINARYMIME): BODY=BINARYMIME and BDAT; refused
    /// locally if the server lacks CHUNKING or BINARYMIME. Takes precedence over `eight_bit`.
    pub binary: bool,
    /// The envelope or headers are UTF-8: SMTPUTF8; refused locally if the server lacks it.
    pub smtputf8: bool,
}

/// The next hop cannot take an SMTPUTF8 message; RFC 6531 §3.2 says not to downgrade silently.
const NO_SMTPUTF8: reply::Canned = reply::Canned {
    code: 553,
    enhanced: Some((5, 6, 7)),
    text: "Destination does not support SMTPUTF8, required by this message",
    wire: b"553 5.6.7 Destination does not support SMTPUTF8, required by this message\r\n",
};

/// The next hop cannot take 8-bit content, and we do not convert it (RFC 6152 §3 allows
/// returning it instead).
const NO_8BITMIME: reply::Canned = reply::Canned {
    code: 554,
    enhanced: Some((5, 6, 3)),
    text: "Destination does not support 8BITMIME, required by this message",
    wire: b"554 5.6.3 Destination does not support 8BITMIME, required by this message\r\n",
};

/// The next hop cannot take a binary body: RFC 3030 §3 allows it only with BDAT to a server
/// offering BINARYMIME, and sending it as DATA text would corrupt it (bare CR and LF, NUL).
const NO_BINARYMIME: reply::Canned = reply::Canned {
    code: 554,
    enhanced: Some((5, 6, 3)),
    text: "Destination does not support BINARYMIME and CHUNKING, required by this message",
    wire: b"554 5.6.3 Destination does not support BINARYMIME and CHUNKING, required by this \
            message\r\n",
};

/// One outbound SMTP connection.
#[derive(Debug)]
pub struct Client {
    cfg: ClientConfig,
    /// Received and not yet parsed bytes start at `buf[start]`.
    buf: Vec<u8>,
    start: usize,
    phase: Phase,
    expect: VecDeque<Expect>,
    caps: Capabilities,
    txn: Option<Txn>,
    /// A transaction started behind `txn` while `txn` awaited only its final reply
    /// (see [`Client::can_start_early`]); it becomes `txn` when that reply comes.
    next: Option<Next>,
    /// A transaction that failed locally (nothing sent), reported by the next `poll`.
    local_outcome: Option<TransactionOutcome>,
    /// TLS is up (after STARTTLS and the handshake).
    tls: bool,
}

/// The transaction queued behind the current one.
#[derive(Debug)]
enum Next {
    Sent(Txn),
    /// Failed locally (nothing sent); reported right after the current one's outcome.
    Local(TransactionOutcome),
}

impl Client {
    pub fn new(cfg: ClientConfig) -> Client {
        Client {
            cfg,
            buf: Vec::new(),
            start: 0,
            phase: Phase::Handshake,
            expect: VecDeque::from([Expect::Greeting]),
            caps: Capabilities::default(),
            txn: None,
            next: None,
            local_outcome: None,
            tls: false,
        }
    }

    /// The adapter finished the TLS handshake after `ClientStep::StartTls`. RFC 3207 §4.2: the
    /// client forgets what it knew about the server and says EHLO again.
    pub fn tls_started(&mut self, out: &mut Vec<u8>) {
        self.tls = true;
        self.caps = Capabilities::default();
        self.buf.clear();
        self.start = 0;
        self.write_hello(b"EHLO ", out);
        self.expect.push_back(Expect::Ehlo);
    }

    /// Whether the session runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The reply the client waits for next.
    pub fn awaiting(&self) -> Awaiting {
        match self.expect.front() {
            Some(Expect::Data) => Awaiting::DataInit,
            Some(Expect::Dot { .. } | Expect::Bdat { last: true }) => Awaiting::FinalDot,
            // A chunk before the last is answered as soon as it is read, like a command.
            _ => Awaiting::Reply,
        }
    }

    /// Whether `start` may be called now although the previous transaction is not done: the
    /// server offered PIPELINING and the previous transaction has sent its body and awaits only
    /// the reply to its final dot, or to its `BDAT LAST` with no chunk refused before it. RFC
    /// 2920 §3.1 lets the next MAIL follow the end of data in the same write, which saves a round
    /// trip and a write per message on a busy connection. A refused earlier chunk rules it out:
    /// that transaction still needs its RSET, which must not come after the next MAIL.
    pub fn can_start_early(&self) -> bool {
        let Some(txn) = &self.txn else {
            return false;
        };
        let only_final_reply_owed = match (self.expect.len(), self.expect.front()) {
            (1, Some(Expect::Dot { discard: false })) => true,
            (1, Some(Expect::Bdat { last: true })) => !txn.chunk_failed,
            _ => false,
        };
        self.caps.pipelining
            && self.phase == Phase::Transaction
            && self.next.is_none()
            && self.local_outcome.is_none()
            && only_final_reply_owed
    }

    /// Takes bytes read from the socket.
    pub fn input(&mut self, bytes: &[u8]) {
        if matches!(self.phase, Phase::Failed(_) | Phase::Closed) {
            return;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Processes buffered replies, appending any commands to send to `out`.
    pub fn poll(&mut self, out: &mut Vec<u8>) -> ClientStep {
        if let Some(outcome) = self.local_outcome.take() {
            return ClientStep::Done(outcome);
        }
        loop {
            match &self.phase {
                Phase::Failed(r) => return ClientStep::Failed(r.clone()),
                Phase::Closed => return ClientStep::Closed,
                _ => {}
            }
            match parse_reply(&self.buf[self.start..], self.cfg.line_len_max) {
                Err(e) => {
                    self.fail(Reply::new(
                        421,
                        Some((4, 5, 0)),
                        format!("Malformed reply from server: {e}"),
                    ));
                }
                Ok(None) => break,
                Ok(Some((reply, n))) => {
                    self.start += n;
                    if let Some(step) = self.on_reply(reply, out) {
                        self.compact();
                        return step;
                    }
                }
            }
        }
        self.compact();
        match self.phase {
            Phase::Ready => ClientStep::Ready,
            Phase::AwaitBody => ClientStep::SendBody,
            _ => ClientStep::NeedInput,
        }
    }

    /// Starts a transaction; only valid when `poll` returned `Ready` (otherwise the client fails,
    /// as the caller has lost track of the connection). `mail_from` is "" for the null sender.
    pub fn start(&mut self, mail_from: &str, rcpts: &[&str], out: &mut Vec<u8>) {
        self.start_with(mail_from, rcpts, MailOptions::default(), out);
    }

    /// `start`, declaring the message's size and content in MAIL. A message the server cannot
    /// take (SMTPUTF8 or 8BITMIME not offered) ends at once with a local permanent refusal,
    /// nothing sent.
    pub fn start_with(
        &mut self,
        mail_from: &str,
        rcpts: &[&str],
        opts: MailOptions,
        out: &mut Vec<u8>,
    ) {
        let early = self.can_start_early();
        if !early
            && (self.phase != Phase::Ready
                || !self.expect.is_empty()
                || self.local_outcome.is_some())
        {
            self.fail(Reply::new(
                421,
                Some((4, 3, 0)),
                "Client used out of sequence: start() while not ready",
            ));
            return;
        }
        let mut txn = Txn {
            pipelined: self.caps.pipelining,
            wire: Vec::with_capacity(rcpts.len()),
            next: 0,
            accepted: 0,
            mail: None,
            rcpts: vec![None; rcpts.len()],
            data_command: None,
            data: None,
            bdat: self.caps.chunking,
            chunk_failed: false,
            body: Vec::new(),
            body_at: 0,
        };
        let valid = |a: &str| {
            if opts.smtputf8 {
                parse_mailbox_utf8(a).is_ok()
            } else {
                parse_mailbox(a).is_ok()
            }
        };
        for (slot, rcpt) in rcpts.iter().enumerate() {
            if valid(rcpt) {
                txn.wire.push(((*rcpt).to_owned(), slot));
            } else {
                txn.rcpts[slot] = Some(reply::BAD_RECIPIENT.to_reply());
            }
        }
        let from_ok = mail_from.is_empty() || valid(mail_from);
        let unsupported = if opts.smtputf8 && !self.caps.has("SMTPUTF8") {
            Some(&NO_SMTPUTF8)
        } else if opts.binary && !(self.caps.chunking && self.caps.binary_mime) {
            Some(&NO_BINARYMIME)
        } else if !opts.binary && opts.eight_bit && !self.caps.eight_bit_mime {
            Some(&NO_8BITMIME)
        } else {
            None
        };
        if !from_ok || txn.wire.is_empty() || unsupported.is_some() {
            txn.mail = Some(match unsupported {
                Some(canned) => canned.to_reply(),
                None if from_ok => reply::NO_VALID_RECIPIENTS.to_reply(),
                None => reply::BAD_SENDER.to_reply(),
            });
            if unsupported.is_some() {
                // Every recipient fails the same way; none was refused on its own.
                let mail = txn.mail.clone();
                for r in txn.rcpts.iter_mut() {
                    *r = mail.clone();
                }
            }
            txn.wire.clear();
            if early {
                self.next = Some(Next::Local(txn.into_outcome()));
            } else {
                self.local_outcome = Some(txn.into_outcome());
            }
            return;
        }
        out.extend_from_slice(b"MAIL FROM:<");
        out.extend_from_slice(mail_from.as_bytes());
        out.extend_from_slice(b">");
        if let (Some(size), Some(_)) = (opts.size, self.caps.size) {
            out.extend_from_slice(format!(" SIZE={size}").as_bytes());
        }
        if opts.binary {
            out.extend_from_slice(b" BODY=BINARYMIME");
        } else if opts.eight_bit {
            out.extend_from_slice(b" BODY=8BITMIME");
        }
        if opts.smtputf8 {
            out.extend_from_slice(b" SMTPUTF8");
        }
        out.extend_from_slice(b"\r\n");
        self.expect.push_back(Expect::Mail);
        if txn.pipelined {
            for (rcpt, slot) in &txn.wire {
                write_rcpt(rcpt, out);
                self.expect.push_back(Expect::Rcpt(*slot));
            }
            // With BDAT the body waits for the RCPT replies (see the module comment).
            if !txn.bdat {
                out.extend_from_slice(b"DATA\r\n");
                self.expect.push_back(Expect::Data);
            }
            txn.next = txn.wire.len();
        }
        if early {
            self.next = Some(Next::Sent(txn));
        } else {
            self.txn = Some(txn);
            self.phase = Phase::Transaction;
        }
    }

    /// Writes the message after `SendBody`. After DATA: dot-stuffed, CRLF-terminated, then
    /// ".\r\n" (see `data::write_stuffed`, which also turns bare LFs into CRLF). With BDAT: the
    /// body byte for byte, as there is no end marker to stuff for or to smuggle one past; every
    /// chunk at once with PIPELINING, else the first one, the rest kept for the chunk replies.
    pub fn write_body(&mut self, body: &[u8], out: &mut Vec<u8>) {
        self.write_body_parts(&[body], out);
    }

    /// [`Client::write_body`] of the message made of `parts` in order (a header block with
    /// fields taken out, then the rest), without joining them: what goes on the wire is that
    /// of their concatenation. Only lock-step BDAT keeps a copy (of the whole, as it would).
    pub fn write_body_parts(&mut self, parts: &[&[u8]], out: &mut Vec<u8>) {
        let Some(txn) = self.txn.as_mut().filter(|_| self.phase == Phase::AwaitBody) else {
            self.fail(Reply::new(
                421,
                Some((4, 3, 0)),
                "Client used out of sequence: write_body() without SendBody",
            ));
            return;
        };
        self.phase = Phase::Transaction;
        if !txn.bdat {
            write_stuffed_parts(parts, out);
            self.expect.push_back(Expect::Dot { discard: false });
            return;
        }
        let chunk_max = self.cfg.bdat_chunk_size_max.max(1);
        let mut at = 0;
        loop {
            let last = write_chunk(parts, &mut at, chunk_max, out);
            self.expect.push_back(Expect::Bdat { last });
            if last {
                break;
            }
            if !txn.pipelined {
                // The one copy of the body this client makes, and only in lock-step.
                txn.body = parts.concat();
                txn.body_at = at;
                break;
            }
        }
    }

    /// Writes QUIT; `poll` returns `Closed` once the server answers (or just close the socket).
    /// Meant for when the client is `Ready`. Replies still owed for earlier commands are consumed
    /// and ignored. Right after `SendBody` the server would read QUIT as message text, so then
    /// nothing is written and the client is simply `Closed`.
    pub fn quit(&mut self, out: &mut Vec<u8>) {
        match self.phase {
            Phase::Failed(_) | Phase::Closed | Phase::Quit => return,
            Phase::AwaitBody => {
                self.phase = Phase::Closed;
                return;
            }
            _ => {}
        }
        out.extend_from_slice(b"QUIT\r\n");
        self.expect.push_back(Expect::Quit);
        self.txn = None;
        self.next = None;
        self.phase = Phase::Quit;
    }

    /// What the server advertised.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn compact(&mut self) {
        if self.start == self.buf.len() {
            self.buf.clear();
        } else {
            self.buf.drain(..self.start);
        }
        self.start = 0;
    }

    fn fail(&mut self, reply: Reply) -> Option<ClientStep> {
        self.phase = Phase::Failed(reply.clone());
        self.expect.clear();
        self.txn = None;
        self.next = None;
        self.buf.clear();
        self.start = 0;
        Some(ClientStep::Failed(reply))
    }

    /// Handles one reply; returns a step when the adapter has something to do.
    fn on_reply(&mut self, reply: Reply, out: &mut Vec<u8>) -> Option<ClientStep> {
        if self.phase == Phase::Quit {
            // Only the reply to QUIT matters now; anything owed before it is dropped.
            if self.expect.pop_front() == Some(Expect::Quit) {
                self.phase = Phase::Closed;
                return Some(ClientStep::Closed);
            }
            return None;
        }
        // RFC 5321 3.8: 421 may come at any time and means the server is closing.
        if reply.code == 421 {
            return self.fail(reply);
        }
        let Some(expect) = self.expect.pop_front() else {
            let text = format!(
                "Unexpected reply from server: {}",
                reply.to_string().trim_end()
            );
            return self.fail(Reply::new(421, Some((4, 5, 0)), text));
        };
        match expect {
            Expect::Greeting => {
                if reply.code != 220 {
                    return self.fail(reply);
                }
                self.write_hello(b"EHLO ", out);
                self.expect.push_back(Expect::Ehlo);
                None
            }
            Expect::Ehlo => {
                if reply.code / 100 == 2 {
                    self.caps = Capabilities::from_ehlo(&reply);
                    if !self.tls && self.cfg.starttls != TlsPolicy::Disabled {
                        if self.caps.has("STARTTLS") {
                            out.extend_from_slice(b"STARTTLS\r\n");
                            self.expect.push_back(Expect::StartTls);
                            return None;
                        }
                        if self.cfg.starttls == TlsPolicy::Required {
                            return self.fail(TLS_NOT_OFFERED.to_reply());
                        }
                    }
                    self.phase = Phase::Ready;
                    Some(ClientStep::Ready)
                } else if reply.is_permanent() {
                    // RFC 5321 3.2: a server that does not know EHLO answers 5xx; try HELO.
                    self.write_hello(b"HELO ", out);
                    self.expect.push_back(Expect::Helo);
                    None
                } else {
                    self.fail(reply)
                }
            }
            Expect::Helo => {
                if reply.code / 100 != 2 {
                    return self.fail(reply);
                }
                if !self.tls && self.cfg.starttls == TlsPolicy::Required {
                    return self.fail(TLS_NOT_OFFERED.to_reply());
                }
                self.caps = Capabilities::default();
                self.phase = Phase::Ready;
                Some(ClientStep::Ready)
            }
            Expect::Mail => self.on_mail(reply, out),
            Expect::Rcpt(slot) => self.on_rcpt(slot, reply, out),
            Expect::Data => self.on_data(reply, out),
            Expect::Bdat { last } => self.on_chunk(last, reply, out),
            Expect::Dot { discard } => {
                if let Some(txn) = self.txn.as_mut() {
                    if !discard {
                        txn.data = Some(reply);
                    }
                }
                self.finish()
            }
            Expect::Rset => {
                if !reply.is_positive() {
                    return self.fail(reply);
                }
                self.finish()
            }
            Expect::StartTls => {
                if reply.code == 220 {
                    return Some(ClientStep::StartTls);
                }
                if self.cfg.starttls == TlsPolicy::Required {
                    return self.fail(reply);
                }
                // Refused: RFC 3207 lets us go on in plaintext when TLS is only opportunistic.
                self.phase = Phase::Ready;
                Some(ClientStep::Ready)
            }
            // Handled above: QUIT is only expected in Phase::Quit.
            Expect::Quit => {
                self.phase = Phase::Closed;
                Some(ClientStep::Closed)
            }
        }
    }

    fn write_hello(&self, verb: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(verb);
        out.extend_from_slice(self.cfg.helo_name.as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    fn on_mail(&mut self, reply: Reply, out: &mut Vec<u8>) -> Option<ClientStep> {
        let Some(txn) = self.txn.as_mut() else {
            return self.fail(no_reply("MAIL"));
        };
        let ok = reply.is_positive();
        txn.mail = Some(reply);
        if txn.pipelined {
            // RCPT and DATA replies follow; if MAIL failed they are 503s and DATA decides.
            return None;
        }
        if ok {
            self.send_next_rcpt(out);
            None
        } else {
            // Nothing was opened on the server, so no RSET is needed.
            self.finish()
        }
    }

    fn on_rcpt(&mut self, slot: usize, reply: Reply, out: &mut Vec<u8>) -> Option<ClientStep> {
        let Some(txn) = self.txn.as_mut() else {
            return self.fail(no_reply("RCPT"));
        };
        if reply.is_positive() {
            txn.accepted += 1;
        }
        if let Some(r) = txn.rcpts.get_mut(slot) {
            *r = Some(reply);
        }
        if txn.pipelined {
            // Without BDAT the reply to DATA decides what comes next; with BDAT the last RCPT
            // reply does.
            let last_rcpt = txn.wire.last().is_some_and(|&(_, s)| s == slot);
            if !(txn.bdat && last_rcpt) {
                return None;
            }
            if !txn.mail_ok() {
                // Nothing was opened on the server, so no RSET is needed.
                return self.finish();
            }
        } else if txn.next < txn.wire.len() {
            self.send_next_rcpt(out);
            return None;
        }
        if txn.accepted == 0 {
            // MAIL is open on the server; close it so the connection can be reused.
            out.extend_from_slice(b"RSET\r\n");
            self.expect.push_back(Expect::Rset);
        } else if txn.bdat {
            self.phase = Phase::AwaitBody;
            return Some(ClientStep::SendBody);
        } else {
            out.extend_from_slice(b"DATA\r\n");
            self.expect.push_back(Expect::Data);
        }
        None
    }

    /// A BDAT chunk was answered. The first refusal is the transaction's reply; after a refused
    /// chunk no other is sent and, unless it was the LAST one, RSET follows the last reply owed.
    fn on_chunk(&mut self, last: bool, reply: Reply, out: &mut Vec<u8>) -> Option<ClientStep> {
        let Some(txn) = self.txn.as_mut() else {
            return self.fail(no_reply("BDAT"));
        };
        if !txn.chunk_failed {
            // RFC 3030 answers a chunk with 250; anything but 2xx (a 354 too) is a refusal.
            if reply.code / 100 != 2 {
                txn.chunk_failed = !last;
                txn.data = Some(reply);
            } else if last {
                txn.data = Some(reply);
            }
        }
        let more_owed = !last && txn.pipelined;
        if txn.chunk_failed {
            if !more_owed {
                txn.body = Vec::new();
                out.extend_from_slice(b"RSET\r\n");
                self.expect.push_back(Expect::Rset);
            }
            return None;
        }
        if last {
            return self.finish();
        }
        if !txn.pipelined {
            let chunk_max = self.cfg.bdat_chunk_size_max.max(1);
            let sent_last = write_chunk(&[&txn.body], &mut txn.body_at, chunk_max, out);
            if sent_last {
                txn.body = Vec::new();
            }
            self.expect.push_back(Expect::Bdat { last: sent_last });
        }
        None
    }

    fn on_data(&mut self, reply: Reply, out: &mut Vec<u8>) -> Option<ClientStep> {
        let Some(txn) = self.txn.as_mut() else {
            return self.fail(no_reply("DATA"));
        };
        let go = reply.code == 354;
        txn.data_command = Some(reply);
        let mail_ok = txn.mail_ok();
        if go {
            if mail_ok && txn.accepted > 0 {
                self.phase = Phase::AwaitBody;
                return Some(ClientStep::SendBody);
            }
            // A server that says 354 with no recipient is broken; RFC 2920 3.1 says end the
            // data with a lone dot rather than send the message to nobody.
            out.extend_from_slice(b".\r\n");
            self.expect.push_back(Expect::Dot { discard: true });
            return None;
        }
        if mail_ok {
            out.extend_from_slice(b"RSET\r\n");
            self.expect.push_back(Expect::Rset);
            None
        } else {
            self.finish()
        }
    }

    fn send_next_rcpt(&mut self, out: &mut Vec<u8>) {
        let Some(txn) = self.txn.as_mut() else {
            return;
        };
        if let Some((rcpt, slot)) = txn.wire.get(txn.next) {
            write_rcpt(rcpt, out);
            self.expect.push_back(Expect::Rcpt(*slot));
            txn.next += 1;
        }
    }

    /// Ends the transaction: the client is Ready again, or goes on with the one queued behind.
    fn finish(&mut self) -> Option<ClientStep> {
        let txn = self.txn.take()?;
        match self.next.take() {
            Some(Next::Sent(next)) => {
                self.txn = Some(next);
                self.phase = Phase::Transaction;
            }
            Some(Next::Local(outcome)) => {
                self.local_outcome = Some(outcome);
                self.phase = Phase::Ready;
            }
            None => self.phase = Phase::Ready,
        }
        Some(ClientStep::Done(txn.into_outcome()))
    }
}

/// Writes the chunk of the body (the concatenation of `parts`) starting at `at`, at most
/// `chunk_max` octets, as `BDAT n` or, when it reaches the end of the body, `BDAT n LAST`; moves
/// `at` past it and returns whether it was the last. An empty body is one `BDAT 0 LAST`.
fn write_chunk(parts: &[&[u8]], at: &mut usize, chunk_max: usize, out: &mut Vec<u8>) -> bool {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let start = (*at).min(total);
    let end = start.saturating_add(chunk_max).min(total);
    let last = end == total;
    out.reserve(end - start + 32);
    out.extend_from_slice(b"BDAT ");
    out.extend_from_slice((end - start).to_string().as_bytes());
    out.extend_from_slice(if last { b" LAST\r\n" } else { b"\r\n" });
    // The chunk's bytes from each part it overlaps.
    let mut part_start = 0;
    for part in parts {
        let part_end = part_start + part.len();
        if part_end > start && part_start < end {
            out.extend_from_slice(
                &part[start.max(part_start) - part_start..end.min(part_end) - part_start],
            );
        }
        part_start = part_end;
    }
    *at = end;
    last
}

fn write_rcpt(rcpt: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(b"RCPT TO:<");
    out.extend_from_slice(rcpt.as_bytes());
    out.extend_from_slice(b">\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::server::{ServerConfig, Session, Step};
    use std::rc::Rc;

    const EHLO_PIPE: &[u8] = b"250-mx.test greets you\r\n250-PIPELINING\r\n250-SIZE 1000\r\n\
        250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 AUTH PLAIN LOGIN\r\n";
    const EHLO_PLAIN: &[u8] = b"250-mx.test\r\n250 8BITMIME\r\n";

    fn client() -> Client {
        Client::new(ClientConfig {
            helo_name: "me.test".to_owned(),
            ..ClientConfig::default()
        })
    }

    fn client_with_chunks(bdat_chunk_size_max: usize) -> Client {
        Client::new(ClientConfig {
            helo_name: "me.test".to_owned(),
            bdat_chunk_size_max,
            ..ClientConfig::default()
        })
    }

    /// CHUNKING and BINARYMIME with PIPELINING, as Epoxi's own server offers them.
    const EHLO_CHUNKING: &[u8] = b"250-mx.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n\
        250-BINARYMIME\r\n250-CHUNKING\r\n250 ENHANCEDSTATUSCODES\r\n";
    /// CHUNKING without PIPELINING: one chunk per reply.
    const EHLO_CHUNKING_LOCK_STEP: &[u8] = b"250-mx.test\r\n250-CHUNKING\r\n250 8BITMIME\r\n";

    /// `ready` for a client that sends BDAT chunks of at most `chunk` octets.
    fn ready_chunks(ehlo: &[u8], chunk: usize) -> Client {
        let mut c = client_with_chunks(chunk);
        feed(&mut c, b"220 mx.test ESMTP\r\n");
        assert_eq!(feed(&mut c, ehlo), (String::new(), ClientStep::Ready));
        c
    }

    /// Feeds `input`, polls once; returns what the client wrote and the step.
    fn feed(c: &mut Client, input: &[u8]) -> (String, ClientStep) {
        c.input(input);
        let mut out = Vec::new();
        let step = c.poll(&mut out);
        (String::from_utf8_lossy(&out).into_owned(), step)
    }

    /// A client past the handshake with the given EHLO reply.
    fn ready(ehlo: &[u8]) -> Client {
        let mut c = client();
        assert_eq!(
            feed(&mut c, b"220 mx.test ESMTP\r\n"),
            ("EHLO me.test\r\n".to_owned(), ClientStep::NeedInput)
        );
        assert_eq!(feed(&mut c, ehlo), (String::new(), ClientStep::Ready));
        c
    }

    fn start(c: &mut Client, from: &str, rcpts: &[&str]) -> String {
        let mut out = Vec::new();
        c.start(from, rcpts, &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn body(c: &mut Client, body: &[u8]) -> String {
        let mut out = Vec::new();
        c.write_body(body, &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn done(step: ClientStep) -> TransactionOutcome {
        match step {
            ClientStep::Done(o) => o,
            other => panic!("expected Done, got {other:?}"),
        }
    }

    fn r(code: u16, enh: (u8, u16, u16), text: &str) -> Reply {
        Reply::new(code, Some(enh), text)
    }

    #[test]
    fn ehlo_capabilities() {
        let mut c = ready(EHLO_PIPE);
        let caps = c.capabilities().clone();
        assert!(caps.pipelining && caps.eight_bit_mime && caps.enhanced_status_codes);
        assert_eq!(caps.size, Some(1000));
        assert!(caps.has("auth") && !caps.has("STARTTLS"));
        assert_eq!(caps.keywords.len(), 5);
        // Ready is repeated while idle.
        assert_eq!(feed(&mut c, b""), (String::new(), ClientStep::Ready));
    }

    #[test]
    fn helo_fallback() {
        let mut c = client();
        feed(&mut c, b"220 old.test\r\n");
        assert_eq!(
            feed(&mut c, b"500 Command unrecognized\r\n"),
            ("HELO me.test\r\n".to_owned(), ClientStep::NeedInput)
        );
        assert_eq!(
            feed(&mut c, b"250 old.test\r\n"),
            (String::new(), ClientStep::Ready)
        );
        assert_eq!(c.capabilities(), &Capabilities::default());
        // Without PIPELINING the client goes lock-step.
        assert_eq!(
            start(&mut c, "a@b.test", &["x@y.test"]),
            "MAIL FROM:<a@b.test>\r\n"
        );
    }

    #[test]
    fn handshake_failures() {
        let mut c = client();
        let (_, step) = feed(&mut c, b"554 5.7.1 go away\r\n");
        assert_eq!(step, ClientStep::Failed(r(554, (5, 7, 1), "go away")));
        // Failed is sticky.
        assert_eq!(
            feed(&mut c, b"220 x\r\n").1,
            ClientStep::Failed(r(554, (5, 7, 1), "go away"))
        );

        let mut c = client();
        feed(&mut c, b"220 mx\r\n");
        let (_, step) = feed(&mut c, b"421 4.3.2 busy\r\n");
        assert_eq!(step, ClientStep::Failed(r(421, (4, 3, 2), "busy")));

        let mut c = client();
        feed(&mut c, b"220 mx\r\n");
        feed(&mut c, b"502 no\r\n");
        let (_, step) = feed(&mut c, b"550 no helo either\r\n");
        assert!(matches!(step, ClientStep::Failed(r) if r.code == 550));
    }

    #[test]
    fn pipelined_transaction() {
        let mut c = ready(EHLO_PIPE);
        assert_eq!(
            start(&mut c, "a@b.test", &["x@y.test", "z@y.test"]),
            "MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nRCPT TO:<z@y.test>\r\nDATA\r\n"
        );
        assert_eq!(
            feed(&mut c, b"250 2.1.0 Ok\r\n"),
            (String::new(), ClientStep::NeedInput)
        );
        assert_eq!(
            feed(&mut c, b"250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n"),
            (String::new(), ClientStep::SendBody)
        );
        assert_eq!(body(&mut c, b"Hi\r\n.\r\n"), "Hi\r\n..\r\n.\r\n");
        let (out, step) = feed(&mut c, b"250 2.0.0 Ok: queued as 1\r\n");
        assert_eq!(out, "");
        let o = done(step);
        assert_eq!(o.mail, r(250, (2, 1, 0), "Ok"));
        assert_eq!(o.rcpts, vec![r(250, (2, 1, 5), "Ok"); 2]);
        assert_eq!(o.data, Some(r(250, (2, 0, 0), "Ok: queued as 1")));
        assert_eq!(o.data_command, Some(Reply::new(354, None, "go")));
        // Ready for the next message on the same connection.
        assert_eq!(feed(&mut c, b""), (String::new(), ClientStep::Ready));
        assert!(start(&mut c, "", &["x@y.test"]).starts_with("MAIL FROM:<>\r\n"));
    }

    #[test]
    fn next_transaction_rides_behind_the_final_dot() {
        let mut c = ready(EHLO_PIPE);
        assert!(!c.can_start_early(), "nothing to ride behind yet");
        start(&mut c, "a@b.test", &["x@y.test"]);
        assert!(
            !c.can_start_early(),
            "first transaction has not sent its body"
        );
        assert_eq!(
            feed(&mut c, b"250 Ok\r\n250 Ok\r\n354 go\r\n").1,
            ClientStep::SendBody
        );
        let mut wire = body(&mut c, b"one\r\n");
        assert!(c.can_start_early());
        wire.push_str(&start(&mut c, "a@b.test", &["z@y.test"]));
        assert!(!c.can_start_early(), "one transaction queued at most");
        // Body, final dot and the next envelope go out in one write.
        assert_eq!(
            wire,
            "one\r\n.\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<z@y.test>\r\nDATA\r\n"
        );
        // The server answers everything in one batch: first outcome, then the next body.
        let (out, step) = feed(&mut c, b"250 2.0.0 first\r\n250 Ok\r\n250 Ok\r\n354 go\r\n");
        assert_eq!(out, "");
        assert_eq!(done(step).data, Some(r(250, (2, 0, 0), "first")));
        assert_eq!(feed(&mut c, b"").1, ClientStep::SendBody);
        assert_eq!(body(&mut c, b"two\r\n"), "two\r\n.\r\n");
        let o = done(feed(&mut c, b"550 5.7.1 second refused\r\n").1);
        assert_eq!(o.data, Some(r(550, (5, 7, 1), "second refused")));
        assert_eq!(feed(&mut c, b"").1, ClientStep::Ready);
    }

    #[test]
    fn early_start_needs_pipelining() {
        let mut c = ready(EHLO_PLAIN);
        start(&mut c, "a@b.test", &["x@y.test"]);
        feed(&mut c, b"250 Ok\r\n");
        feed(&mut c, b"250 Ok\r\n");
        assert_eq!(feed(&mut c, b"354 go\r\n").1, ClientStep::SendBody);
        body(&mut c, b"x\r\n");
        assert!(!c.can_start_early());
    }

    #[test]
    fn failure_after_early_start_fails_both() {
        let mut c = ready(EHLO_PIPE);
        start(&mut c, "a@b.test", &["x@y.test"]);
        feed(&mut c, b"250 Ok\r\n250 Ok\r\n354 go\r\n");
        body(&mut c, b"one\r\n");
        start(&mut c, "a@b.test", &["z@y.test"]);
        let (_, step) = feed(&mut c, b"421 4.3.2 going down\r\n");
        assert!(
            matches!(step, ClientStep::Failed(ref r) if r.code == 421),
            "{step:?}"
        );
        assert!(matches!(feed(&mut c, b"").1, ClientStep::Failed(_)));
    }

    #[test]
    fn local_failure_queued_behind_comes_second() {
        let mut c = ready(EHLO_PIPE);
        start(&mut c, "a@b.test", &["x@y.test"]);
        feed(&mut c, b"250 Ok\r\n250 Ok\r\n354 go\r\n");
        body(&mut c, b"one\r\n");
        // No valid recipient: nothing is written, the outcome waits its turn.
        assert_eq!(start(&mut c, "a@b.test", &["not an address"]), "");
        let first = done(feed(&mut c, b"250 2.0.0 first\r\n").1);
        assert_eq!(first.data, Some(r(250, (2, 0, 0), "first")));
        let second = done(feed(&mut c, b"").1);
        assert!(second.mail.is_permanent(), "{second:?}");
        assert_eq!(feed(&mut c, b"").1, ClientStep::Ready);
    }

    fn with_policy(starttls: TlsPolicy) -> Client {
        Client::new(ClientConfig {
            helo_name: "me.test".to_owned(),
            starttls,
            ..ClientConfig::default()
        })
    }

    const EHLO_TLS: &[u8] = b"250-mx.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n";

    #[test]
    fn starttls_upgrade_then_ehlo_again() {
        let mut c = with_policy(TlsPolicy::Opportunistic);
        assert_eq!(feed(&mut c, b"220 mx.test ESMTP\r\n").0, "EHLO me.test\r\n");
        assert_eq!(
            feed(&mut c, EHLO_TLS),
            ("STARTTLS\r\n".to_owned(), ClientStep::NeedInput)
        );
        assert_eq!(
            feed(&mut c, b"220 2.0.0 Ready to start TLS\r\n").1,
            ClientStep::StartTls
        );
        assert!(!c.is_tls());
        let mut out = Vec::new();
        c.tls_started(&mut out);
        assert_eq!(out, b"EHLO me.test\r\n");
        assert!(c.is_tls());
        assert!(!c.capabilities().pipelining, "forgotten until the new EHLO");
        let (out, step) = feed(&mut c, b"250-mx.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n");
        assert_eq!(
            (out.as_str(), step),
            ("", ClientStep::Ready),
            "no second STARTTLS"
        );
        assert!(c.capabilities().pipelining);
    }

    #[test]
    fn starttls_policies_when_not_offered_or_refused() {
        // Not offered: opportunistic goes on, required fails transiently, disabled never asks.
        let mut c = with_policy(TlsPolicy::Opportunistic);
        feed(&mut c, b"220 mx\r\n");
        assert_eq!(feed(&mut c, EHLO_PIPE).1, ClientStep::Ready);
        let mut c = with_policy(TlsPolicy::Required);
        feed(&mut c, b"220 mx\r\n");
        let step = feed(&mut c, EHLO_PIPE).1;
        assert!(
            matches!(step, ClientStep::Failed(ref r) if r.code == 421),
            "{step:?}"
        );
        let mut c = with_policy(TlsPolicy::Required);
        feed(&mut c, b"220 mx\r\n");
        feed(&mut c, b"500 no EHLO\r\n");
        assert!(
            matches!(feed(&mut c, b"250 mx\r\n").1, ClientStep::Failed(_)),
            "HELO has no TLS"
        );
        let mut c = with_policy(TlsPolicy::Disabled);
        feed(&mut c, b"220 mx\r\n");
        assert_eq!(feed(&mut c, EHLO_TLS), (String::new(), ClientStep::Ready));
        // Refused with 454: opportunistic goes on in plaintext, required fails.
        let mut c = with_policy(TlsPolicy::Opportunistic);
        feed(&mut c, b"220 mx\r\n");
        feed(&mut c, EHLO_TLS);
        assert_eq!(
            feed(&mut c, b"454 4.7.0 TLS not available\r\n").1,
            ClientStep::Ready
        );
        let mut c = with_policy(TlsPolicy::Required);
        feed(&mut c, b"220 mx\r\n");
        feed(&mut c, EHLO_TLS);
        let step = feed(&mut c, b"454 4.7.0 TLS not available\r\n").1;
        assert!(
            matches!(step, ClientStep::Failed(ref r) if r.code == 454),
            "{step:?}"
        );
    }

    #[test]
    fn mail_options_declare_size_body_and_smtputf8() {
        let mut c = ready(EHLO_PIPE);
        c.caps.keywords.push("SMTPUTF8".into());
        let opts = MailOptions {
            size: Some(1234),
            eight_bit: true,
            binary: false,
            smtputf8: true,
        };
        let mut out = Vec::new();
        c.start_with("a@b.test", &["ü@bücher.test"], opts, &mut out);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "MAIL FROM:<a@b.test> SIZE=1234 BODY=8BITMIME SMTPUTF8\r\nRCPT TO:<ü@bücher.test>\r\nDATA\r\n"
        );
    }

    #[test]
    fn what_the_server_cannot_take_fails_locally_and_permanently() {
        let mut c = ready(EHLO_PLAIN); // 8BITMIME, no SMTPUTF8, no SIZE
        let utf8 = MailOptions {
            smtputf8: true,
            ..MailOptions::default()
        };
        let mut out = Vec::new();
        c.start_with("a@b.test", &["ü@bücher.test", "x@y.test"], utf8, &mut out);
        assert!(out.is_empty(), "nothing sent");
        let o = done(c.poll(&mut out));
        assert_eq!((o.mail.code, o.mail.enhanced), (553, Some((5, 6, 7))));
        assert!(o.rcpts.iter().all(|r| r.code == 553), "{o:?}");
        assert_eq!(
            c.poll(&mut out),
            ClientStep::Ready,
            "connection still usable"
        );
        // No SIZE advertised: no SIZE= sent. 8-bit to a server without 8BITMIME: refused.
        c.start_with(
            "a@b.test",
            &["x@y.test"],
            MailOptions {
                size: Some(9),
                ..MailOptions::default()
            },
            &mut out,
        );
        assert_eq!(String::from_utf8_lossy(&out), "MAIL FROM:<a@b.test>\r\n");
        let mut c = ready(b"250-mx.test\r\n250 PIPELINING\r\n");
        let mut out = Vec::new();
        c.start_with(
            "a@b.test",
            &["x@y.test"],
            MailOptions {
                eight_bit: true,
                ..MailOptions::default()
            },
            &mut out,
        );
        assert_eq!(done(c.poll(&mut out)).mail.code, 554);
    }

    #[test]
    fn awaiting_follows_the_phase() {
        let mut c = ready_chunks(EHLO_CHUNKING_LOCK_STEP, 2);
        start(&mut c, "a@b.test", &["x@y.test"]);
        feed(&mut c, b"250 Ok\r\n");
        feed(&mut c, b"250 Ok\r\n");
        body(&mut c, b"abc");
        assert_eq!(c.awaiting(), Awaiting::Reply, "chunk before LAST");
        feed(&mut c, b"250 Ok\r\n");
        assert_eq!(c.awaiting(), Awaiting::FinalDot, "BDAT LAST");

        let c = client();
        assert_eq!(c.awaiting(), Awaiting::Reply, "greeting");
        let mut c = ready(EHLO_PLAIN);
        start(&mut c, "a@b.test", &["x@y.test"]);
        assert_eq!(c.awaiting(), Awaiting::Reply, "MAIL");
        feed(&mut c, b"250 Ok\r\n");
        feed(&mut c, b"250 Ok\r\n");
        assert_eq!(c.awaiting(), Awaiting::DataInit);
        feed(&mut c, b"354 go\r\n");
        body(&mut c, b"x\r\n");
        assert_eq!(c.awaiting(), Awaiting::FinalDot);
    }

    #[test]
    fn bdat_replaces_data_when_chunking_is_offered() {
        let mut c = ready(EHLO_CHUNKING);
        let caps = c.capabilities();
        assert!(caps.chunking && caps.binary_mime && caps.pipelining);
        // MAIL and RCPTs only: the body waits for their replies.
        assert_eq!(
            start(&mut c, "a@b.test", &["x@y.test", "z@y.test"]),
            "MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nRCPT TO:<z@y.test>\r\n"
        );
        assert_eq!(c.awaiting(), Awaiting::Reply);
        assert_eq!(
            feed(&mut c, b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"),
            (String::new(), ClientStep::NeedInput)
        );
        assert_eq!(
            feed(&mut c, b"550 5.1.1 no\r\n"),
            (String::new(), ClientStep::SendBody)
        );
        // No dot-stuffing, no end marker, no CRLF added, bare LF and CR left alone.
        let text = b"Hi\r\n.\r\n..x\r\n\n.\n\rno final CRLF";
        assert_eq!(
            body(&mut c, text),
            format!(
                "BDAT {} LAST\r\n{}",
                text.len(),
                String::from_utf8_lossy(text)
            )
        );
        assert_eq!(c.awaiting(), Awaiting::FinalDot);
        let (out, step) = feed(&mut c, b"250 2.0.0 Ok: queued as 7\r\n");
        assert_eq!(out, "");
        let o = done(step);
        assert_eq!(o.data, Some(r(250, (2, 0, 0), "Ok: queued as 7")));
        assert_eq!(o.data_command, None, "no DATA command");
        assert!(o.rcpts[0].is_positive() && o.rcpts[1].is_permanent());
        assert_eq!(feed(&mut c, b"").1, ClientStep::Ready);
        // An empty body is one empty LAST chunk.
        start(&mut c, "a@b.test", &["x@y.test"]);
        feed(&mut c, b"250 Ok\r\n250 Ok\r\n");
        assert_eq!(body(&mut c, b""), "BDAT 0 LAST\r\n");
        assert!(done(feed(&mut c, b"250 Ok\r\n").1).data.is_some());
    }

    #[test]
    fn bdat_chunks_are_pipelined_and_each_reply_checked() {
        let mut c = ready_chunks(EHLO_CHUNKING, 4);
        start(&mut c, "a@b.test", &["x@y.test"]);
        assert_eq!(
            feed(&mut c, b"250 Ok\r\n250 Ok\r\n").1,
            ClientStep::SendBody
        );
        assert_eq!(
            body(&mut c, b"abcdefghij"),
            "BDAT 4\r\nabcdBDAT 4\r\nefghBDAT 2 LAST\r\nij"
        );
        // The chunk replies come one by one; only the last one waits as long as a final dot.
        assert_eq!(c.awaiting(), Awaiting::Reply);
        assert!(!c.can_start_early(), "chunk replies still owed");
        assert_eq!(
            feed(&mut c, b"250 2.0.0 4 octets received\r\n"),
            (String::new(), ClientStep::NeedInput)
        );
        assert_eq!(
            feed(&mut c, b"250 2.0.0 4 octets received\r\n"),
            (String::new(), ClientStep::NeedInput)
        );
        assert_eq!(c.awaiting(), Awaiting::FinalDot);
        assert!(c.can_start_early(), "only the reply to LAST is owed");
        let o = done(feed(&mut c, b"250 2.0.0 Ok: queued\r\n").1);
        assert_eq!(o.data, Some(r(250, (2, 0, 0), "Ok: queued")));
        // A body of a whole number of chunks ends with a full LAST chunk, not an empty one.
        start(&mut c, "a@b.test", &["x@y.test"]);
        feed(&mut c, b"250 Ok\r\n250 Ok\r\n");
        assert_eq!(
            body(&mut c, b"abcdefgh"),
            "BDAT 4\r\nabcdBDAT 4 LAST\r\nefgh"
        );
    }

    #[test]
    fn a_body_in_parts_goes_out_as_their_concatenation() {
        let parts: [&[u8]; 3] = [b"Subject: a\r\n", b"", b"\r\n.dot\r\nend"];
        let whole = parts.concat();
        // DATA: stuffed as one text.
        let wire = |parts: &[&[u8]]| {
            let mut c = ready(EHLO_PIPE);
            start(&mut c, "a@b.test", &["x@y.test"]);
            assert_eq!(
                feed(&mut c, b"250 Ok\r\n250 Ok\r\n354 Go\r\n").1,
                ClientStep::SendBody
            );
            let mut out = Vec::new();
            c.write_body_parts(parts, &mut out);
            out
        };
        assert_eq!(wire(&parts), wire(&[&whole]));
        assert!(wire(&parts).ends_with(b"\r\n..dot\r\nend\r\n.\r\n"));
        // BDAT, pipelined: chunks across the parts' edges.
        let mut c = ready_chunks(EHLO_CHUNKING, 4);
        start(&mut c, "a@b.test", &["x@y.test"]);
        feed(&mut c, b"250 Ok\r\n250 Ok\r\n");
        let mut out = Vec::new();
        c.write_body_parts(&[b"abc", b"defgh", b"ij"], &mut out);
        assert_eq!(out, b"BDAT 4\r\nabcdBDAT 4\r\nefghBDAT 2 LAST\r\nij");
        // BDAT in lock-step: the rest of the parts goes with the chunk replies.
        let mut c = ready_chunks(EHLO_CHUNKING_LOCK_STEP, 4);
        start(&mut c, "a@b.test", &["x@y.test"]);
        feed(&mut c, b"250 Ok\r\n");
        feed(&mut c, b"250 Ok\r\n");
        let mut out = Vec::new();
        c.write_body_parts(&[b"ab", b"cdefghij"], &mut out);
        assert_eq!(out, b"BDAT 4\r\nabcd");
        assert_eq!(feed(&mut c, b"250 Ok\r\n").0, "BDAT 4\r\nefgh");
        assert_eq!(feed(&mut c, b"250 Ok\r\n").0, "BDAT 2 LAST\r\nij");
    }

    #[test]
    fn bdat_lock_step_without_pipelining() {
        let mut c = ready_chunks(EHLO_CHUNKING_LOCK_STEP, 4);
        assert_eq!(
            start(&mut c, "a@b.test", &["x@y.test"]),
            "MAIL FROM:<a@b.test>\r\n"
        );
        assert_eq!(feed(&mut c, b"250 Ok\r\n").0, "RCPT TO:<x@y.test>\r\n");
        assert_eq!(
            feed(&mut c, b"250 Ok\r\n"),
            (String::new(), ClientStep::SendBody)
        );
        assert_eq!(body(&mut c, b"abcdefghij"), "BDAT 4\r\nabcd");
        assert_eq!(c.awaiting(), Awaiting::Reply);
        assert_eq!(feed(&mut c, b"250 Ok\r\n").0, "BDAT 4\r\nefgh");
        assert_eq!(feed(&mut c, b"250 Ok\r\n").0, "BDAT 2 LAST\r\nij");
        assert_eq!(c.awaiting(), Awaiting::FinalDot);
        let o = done(feed(&mut c, b"250 2.0.0 queued\r\n").1);
        assert_eq!(o.data, Some(r(250, (2, 0, 0), "queued")));
        assert!(c.txn.is_none());
        assert_eq!(feed(&mut c, b"").1, ClientStep::Ready);
    }

    #[test]
    fn a_refused_chunk_fails_the_transaction_with_its_reply() {
        // Pipelined: the chunk behind the refused one is answered too; then RSET.
        let mut c = ready_chunks(EHLO_CHUNKING, 4);
        start(&mut c, "a@b.test", &["x@y.test", "z@y.test"]);
        feed(&mut c, b"250 Ok\r\n250 Ok\r\n250 Ok\r\n");
        body(&mut c, b"abcdefghij");
        assert_eq!(
            feed(&mut c, b"250 2.0.0 4 octets\r\n452 4.3.1 Disk full\r\n"),
            (String::new(), ClientStep::NeedInput)
        );
        assert!(!c.can_start_early(), "RSET must come first");
        assert_eq!(
            feed(&mut c, b"503 5.5.1 Bad sequence\r\n"),
            ("RSET\r\n".to_owned(), ClientStep::NeedInput)
        );
        let o = done(feed(&mut c, b"250 2.0.0 Ok\r\n").1);
        assert_eq!(o.data, Some(r(452, (4, 3, 1), "Disk full")));
        assert!(o.rcpts.iter().all(Reply::is_positive));
        assert_eq!(feed(&mut c, b"").1, ClientStep::Ready);

        // Lock-step: no chunk after the refused one; RSET at once.
        let mut c = ready_chunks(EHLO_CHUNKING_LOCK_STEP, 4);
        start(&mut c, "a@b.test", &["x@y.test"]);
        feed(&mut c, b"250 Ok\r\n");
        feed(&mut c, b"250 Ok\r\n");
        assert_eq!(body(&mut c, b"abcdefghij"), "BDAT 4\r\nabcd");
        assert_eq!(
            feed(&mut c, b"552 5.3.4 Message too big\r\n"),
            ("RSET\r\n".to_owned(), ClientStep::NeedInput)
        );
        let o = done(feed(&mut c, b"250 Ok\r\n").1);
        assert_eq!(o.data, Some(r(552, (5, 3, 4), "Message too big")));
        assert_eq!(feed(&mut c, b"").1, ClientStep::Ready);

        // The LAST chunk refused: that ends the transaction, like a refused final dot.
        let mut c = ready(EHLO_CHUNKING);
        start(&mut c, "a@b.test", &["x@y.test"]);
        feed(&mut c, b"250 Ok\r\n250 Ok\r\n");
        body(&mut c, b"spam\r\n");
        let (out, step) = feed(&mut c, b"554 5.7.1 Rejected as spam\r\n");
        assert_eq!(out, "", "no RSET after LAST");
        assert_eq!(done(step).data, Some(r(554, (5, 7, 1), "Rejected as spam")));
        assert_eq!(feed(&mut c, b"").1, ClientStep::Ready);
    }

    #[test]
    fn bdat_when_no_recipient_or_the_sender_is_refused() {
        let mut c = ready(EHLO_CHUNKING);
        start(&mut c, "a@b.test", &["x@y.test", "z@y.test"]);
        assert_eq!(
            feed(&mut c, b"250 Ok\r\n550 5.1.1 no\r\n550 5.1.1 no\r\n"),
            ("RSET\r\n".to_owned(), ClientStep::NeedInput),
            "no body for nobody"
        );
        let o = done(feed(&mut c, b"250 Ok\r\n").1);
        assert_eq!((o.data, o.data_command), (None, None));
        assert!(o.rcpts.iter().all(Reply::is_permanent));

        start(&mut c, "a@b.test", &["x@y.test"]);
        let (out, step) = feed(&mut c, b"451 4.3.0 later\r\n503 5.5.1 need MAIL\r\n");
        assert_eq!(out, "", "no RSET when MAIL was refused");
        assert_eq!(done(step).rcpts, [r(451, (4, 3, 0), "later")]);
        assert_eq!(feed(&mut c, b"").1, ClientStep::Ready);
    }

    #[test]
    fn next_transaction_rides_behind_bdat_last() {
        let mut c = ready(EHLO_CHUNKING);
        start(&mut c, "a@b.test", &["x@y.test"]);
        assert_eq!(
            feed(&mut c, b"250 Ok\r\n250 Ok\r\n").1,
            ClientStep::SendBody
        );
        let mut wire = body(&mut c, b"one\r\n");
        assert!(c.can_start_early());
        wire.push_str(&start(&mut c, "a@b.test", &["z@y.test"]));
        assert!(!c.can_start_early(), "one transaction queued at most");
        assert_eq!(
            wire,
            "BDAT 5 LAST\r\none\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<z@y.test>\r\n"
        );
        // The first outcome, then the second's body once its RCPT is answered.
        let (out, step) = feed(&mut c, b"250 2.0.0 first\r\n250 Ok\r\n250 Ok\r\n");
        assert_eq!(out, "");
        assert_eq!(done(step).data, Some(r(250, (2, 0, 0), "first")));
        assert_eq!(feed(&mut c, b"").1, ClientStep::SendBody);
        assert_eq!(body(&mut c, b"two"), "BDAT 3 LAST\r\ntwo");
        let mut wire = start(&mut c, "a@b.test", &["w@y.test"]);
        assert_eq!(wire, "MAIL FROM:<a@b.test>\r\nRCPT TO:<w@y.test>\r\n");
        // The second is refused at LAST: it still ends cleanly, and the third goes on.
        let (out, step) = feed(&mut c, b"550 5.7.1 second refused\r\n");
        assert_eq!(out, "", "no RSET behind LAST");
        assert_eq!(done(step).data, Some(r(550, (5, 7, 1), "second refused")));
        assert_eq!(
            feed(&mut c, b"250 Ok\r\n250 Ok\r\n").1,
            ClientStep::SendBody
        );
        wire = body(&mut c, b"three");
        assert_eq!(wire, "BDAT 5 LAST\r\nthree");
        assert!(done(feed(&mut c, b"250 Ok\r\n").1)
            .data
            .is_some_and(|d| d.is_positive()));
        assert_eq!(feed(&mut c, b"").1, ClientStep::Ready);
    }

    #[test]
    fn binarymime_goes_only_with_bdat_to_a_server_offering_it() {
        assert_eq!(
            NO_BINARYMIME.wire,
            NO_BINARYMIME.to_reply().to_string().as_bytes()
        );
        let binary = MailOptions {
            binary: true,
            eight_bit: true,
            ..MailOptions::default()
        };
        let mut c = ready(EHLO_CHUNKING);
        let mut out = Vec::new();
        c.start_with("a@b.test", &["x@y.test"], binary, &mut out);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "MAIL FROM:<a@b.test> BODY=BINARYMIME\r\nRCPT TO:<x@y.test>\r\n"
        );
        assert_eq!(
            feed(&mut c, b"250 Ok\r\n250 Ok\r\n").1,
            ClientStep::SendBody
        );
        let octets = b"\0\xff\r.\r\n.\n\r\n.\r\n";
        let mut want = format!("BDAT {} LAST\r\n", octets.len()).into_bytes();
        want.extend_from_slice(octets);
        let mut out = Vec::new();
        c.write_body(octets, &mut out);
        assert_eq!(out, want, "byte for byte");

        // Refused, nothing sent, every recipient bounced: without CHUNKING, without
        // BINARYMIME, or with BINARYMIME but no CHUNKING to carry it.
        for ehlo in [
            EHLO_PIPE,
            EHLO_CHUNKING_LOCK_STEP,
            b"250-mx.test\r\n250 BINARYMIME\r\n",
        ] {
            let mut c = ready(ehlo);
            let mut out = Vec::new();
            c.start_with("a@b.test", &["x@y.test", "z@y.test"], binary, &mut out);
            assert!(out.is_empty(), "nothing sent");
            let o = done(c.poll(&mut out));
            assert_eq!((o.mail.code, o.mail.enhanced), (554, Some((5, 6, 3))));
            assert!(o.mail.text.contains("BINARYMIME"), "{o:?}");
            assert!(o.rcpts.iter().all(|r| r.code == 554), "{o:?}");
            assert_eq!(
                c.poll(&mut out),
                ClientStep::Ready,
                "connection still usable"
            );
        }
    }

    #[test]
    fn lock_step_transaction() {
        let mut c = ready(EHLO_PLAIN);
        assert_eq!(
            start(&mut c, "a@b.test", &["x@y.test", "z@y.test"]),
            "MAIL FROM:<a@b.test>\r\n"
        );
        assert_eq!(feed(&mut c, b"250 ok\r\n").0, "RCPT TO:<x@y.test>\r\n");
        assert_eq!(
            feed(&mut c, b"550 5.1.1 no such user\r\n").0,
            "RCPT TO:<z@y.test>\r\n"
        );
        assert_eq!(feed(&mut c, b"250 ok\r\n").0, "DATA\r\n");
        assert_eq!(feed(&mut c, b"354 go\r\n").1, ClientStep::SendBody);
        assert_eq!(body(&mut c, b"x"), "x\r\n.\r\n");
        let o = done(feed(&mut c, b"250 queued\r\n").1);
        assert_eq!(
            o.rcpts,
            [
                r(550, (5, 1, 1), "no such user"),
                Reply::new(250, None, "ok")
            ]
        );
        assert_eq!(o.data, Some(Reply::new(250, None, "queued")));
    }

    #[test]
    fn partial_recipient_failures_pipelined() {
        let mut c = ready(EHLO_PIPE);
        start(&mut c, "a@b.test", &["x@y.test", "z@y.test", "w@y.test"]);
        let (_, step) = feed(
            &mut c,
            b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n452 4.5.3 Too many recipients\r\n\
              550 5.7.1 Relaying denied\r\n354 go\r\n",
        );
        assert_eq!(step, ClientStep::SendBody);
        body(&mut c, b"b\r\n");
        let o = done(feed(&mut c, b"250 2.0.0 Ok\r\n").1);
        assert!(o.rcpts[0].is_positive());
        assert!(o.rcpts[1].is_transient());
        assert!(o.rcpts[2].is_permanent());
        assert!(o.data.is_some_and(|d| d.is_positive()));
    }

    #[test]
    fn all_recipients_fail_pipelined_no_body_and_rset() {
        let mut c = ready(EHLO_PIPE);
        start(&mut c, "a@b.test", &["x@y.test", "z@y.test"]);
        let (out, step) = feed(
            &mut c,
            b"250 2.1.0 Ok\r\n550 5.1.1 no\r\n550 5.1.1 no\r\n554 5.5.1 No valid recipients\r\n",
        );
        assert_eq!(out, "RSET\r\n");
        assert_eq!(step, ClientStep::NeedInput);
        let o = done(feed(&mut c, b"250 2.0.0 Ok\r\n").1);
        assert_eq!(o.data, None);
        assert_eq!(
            o.data_command,
            Some(r(554, (5, 5, 1), "No valid recipients"))
        );
        assert!(o.rcpts.iter().all(Reply::is_permanent));
        // The connection is usable again.
        assert_eq!(feed(&mut c, b"").1, ClientStep::Ready);
        assert!(start(&mut c, "a@b.test", &["q@y.test"]).starts_with("MAIL"));
    }

    #[test]
    fn all_recipients_fail_lock_step_then_rset() {
        let mut c = ready(EHLO_PLAIN);
        start(&mut c, "a@b.test", &["x@y.test"]);
        feed(&mut c, b"250 ok\r\n");
        assert_eq!(
            feed(&mut c, b"550 no\r\n"),
            ("RSET\r\n".to_owned(), ClientStep::NeedInput)
        );
        let o = done(feed(&mut c, b"250 ok\r\n").1);
        assert_eq!(o.data_command, None);
        assert_eq!(o.rcpts, [Reply::new(550, None, "no")]);
    }

    #[test]
    fn broken_server_says_354_with_no_recipients() {
        let mut c = ready(EHLO_PIPE);
        start(&mut c, "a@b.test", &["x@y.test"]);
        let (out, step) = feed(&mut c, b"250 ok\r\n550 no\r\n354 go\r\n");
        assert_eq!((out.as_str(), step), (".\r\n", ClientStep::NeedInput));
        let o = done(feed(&mut c, b"554 5.5.1 empty\r\n").1);
        assert_eq!(o.data, None);
    }

    #[test]
    fn mail_failure_fills_recipients() {
        let mut c = ready(EHLO_PIPE);
        start(&mut c, "a@b.test", &["x@y.test", "z@y.test"]);
        let (out, step) = feed(
            &mut c,
            b"451 4.3.0 try later\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n\
              503 5.5.1 need MAIL\r\n",
        );
        assert_eq!(out, "", "no RSET when MAIL was refused");
        let o = done(step);
        assert_eq!(o.rcpts, vec![r(451, (4, 3, 0), "try later"); 2]);
        assert_eq!(o.data, None);

        let mut c = ready(EHLO_PLAIN);
        start(&mut c, "a@b.test", &["x@y.test", "z@y.test"]);
        let (out, step) = feed(&mut c, b"550 5.7.1 sender refused\r\n");
        assert_eq!(out, "");
        let o = done(step);
        assert_eq!(o.rcpts, vec![r(550, (5, 7, 1), "sender refused"); 2]);
        assert_eq!(o.data_command, None);
    }

    #[test]
    fn server_421_mid_session_fails_the_client() {
        let mut c = ready(EHLO_PIPE);
        start(&mut c, "a@b.test", &["x@y.test"]);
        let (_, step) = feed(&mut c, b"250 ok\r\n421 4.4.2 mx.test Timeout\r\n");
        assert_eq!(
            step,
            ClientStep::Failed(r(421, (4, 4, 2), "mx.test Timeout"))
        );
        assert_eq!(feed(&mut c, b"").1, step);

        let mut c = ready(EHLO_PIPE);
        let (_, step) = feed(&mut c, b"421 4.3.2 Service shutting down\r\n");
        assert!(matches!(step, ClientStep::Failed(r) if r.code == 421));
    }

    #[test]
    fn replies_split_across_reads() {
        let mut c = client();
        let mut wire = b"220-mx.test first\r\n220 second\r\n".to_vec();
        wire.extend_from_slice(EHLO_PIPE);
        let mut written = String::new();
        let mut last = ClientStep::NeedInput;
        for b in &wire {
            let (out, step) = feed(&mut c, std::slice::from_ref(b));
            written.push_str(&out);
            last = step;
        }
        assert_eq!(written, "EHLO me.test\r\n");
        assert_eq!(last, ClientStep::Ready);
        assert!(c.capabilities().pipelining);
    }

    #[test]
    fn multi_line_replies_in_a_transaction() {
        let mut c = ready(EHLO_PIPE);
        start(&mut c, "a@b.test", &["x@y.test"]);
        feed(&mut c, b"250 ok\r\n250 ok\r\n354 go\r\n");
        body(&mut c, b"");
        let o = done(
            feed(
                &mut c,
                b"550-5.7.1 rejected for policy\r\n550-5.7.1 see https://x.test\r\n550 5.7.1 bye\r\n",
            )
            .1,
        );
        assert_eq!(
            o.data,
            Some(r(
                550,
                (5, 7, 1),
                "rejected for policy\nsee https://x.test\nbye"
            ))
        );
    }

    #[test]
    fn malformed_and_unexpected_replies_fail() {
        let mut c = ready(EHLO_PIPE);
        start(&mut c, "a@b.test", &["x@y.test"]);
        let (_, step) = feed(&mut c, b"hello there\r\n");
        assert!(
            matches!(step, ClientStep::Failed(r) if r.code == 421 && r.enhanced == Some((4, 5, 0)))
        );

        let mut c = ready(EHLO_PIPE);
        let (_, step) = feed(&mut c, b"250 surprise\r\n");
        assert!(matches!(step, ClientStep::Failed(r) if r.text.contains("Unexpected")));

        let mut c = client();
        let (_, step) = feed(&mut c, &[b'2'; 5000]);
        assert!(matches!(step, ClientStep::Failed(r) if r.text.contains("longer than")));
    }

    #[test]
    fn invalid_addresses_never_reach_the_wire() {
        let mut c = ready(EHLO_PIPE);
        assert_eq!(
            start(&mut c, "a@b.test", &["x@y.test\r\nRSET", "ok@y.test"]),
            "MAIL FROM:<a@b.test>\r\nRCPT TO:<ok@y.test>\r\nDATA\r\n"
        );
        feed(&mut c, b"250 ok\r\n250 ok\r\n354 go\r\n");
        body(&mut c, b"b");
        let o = done(feed(&mut c, b"250 ok\r\n").1);
        assert_eq!(o.rcpts[0].code, 501);
        assert!(o.rcpts[1].is_positive());

        // Nothing valid: nothing written, a local outcome.
        assert_eq!(start(&mut c, "bad sender@x", &["x@y.test"]), "");
        let o = done(feed(&mut c, b"").1);
        assert_eq!(o.mail.enhanced, Some((5, 1, 7)));
        assert_eq!(start(&mut c, "a@b.test", &["nodomain"]), "");
        let o = done(feed(&mut c, b"").1);
        assert_eq!(o.mail.code, 554);
        assert_eq!(o.rcpts[0].enhanced, Some((5, 1, 3)));
        assert_eq!(feed(&mut c, b"").1, ClientStep::Ready);
    }

    #[test]
    fn misuse_fails_instead_of_corrupting_the_stream() {
        let mut c = client();
        assert_eq!(start(&mut c, "a@b.test", &["x@y.test"]), "");
        assert!(matches!(feed(&mut c, b"").1, ClientStep::Failed(_)));
        let mut c = ready(EHLO_PIPE);
        assert_eq!(body(&mut c, b"x"), "");
        assert!(matches!(feed(&mut c, b"").1, ClientStep::Failed(_)));
    }

    #[test]
    fn quit() {
        let mut c = ready(EHLO_PIPE);
        let mut out = Vec::new();
        c.quit(&mut out);
        assert_eq!(out, b"QUIT\r\n");
        assert_eq!(feed(&mut c, b"221 2.0.0 Bye\r\n").1, ClientStep::Closed);
    }

    /// Runs a `Client` against a `Session` in memory, feeding each one's output to the other,
    /// until the client reaches a step the caller must act on. Messages the server hands out are
    /// queued with ids "q0", "q1", ... and collected in `spooled`.
    struct Wire {
        client: Client,
        server: Session,
        to_server: Vec<u8>,
        spooled: Vec<crate::smtp::server::Transaction>,
        closed: bool,
    }

    impl Wire {
        fn new() -> Wire {
            Wire::with(|_| {}, client())
        }

        /// A server with its default settings changed by `f`, talking to `client`.
        fn with(f: impl FnOnce(&mut ServerConfig), mut client: Client) -> Wire {
            let mut cfg = ServerConfig {
                hostname: "mx.test".to_owned(),
                ..ServerConfig::default()
            };
            f(&mut cfg);
            let mut server = Session::new(Rc::new(cfg), true);
            let mut greeting = Vec::new();
            server.greeting(&mut greeting);
            client.input(&greeting);
            Wire {
                client,
                server,
                to_server: Vec::new(),
                spooled: Vec::new(),
                closed: false,
            }
        }

        /// Exchanges bytes until the client needs its caller.
        fn run(&mut self) -> ClientStep {
            for _ in 0..1000 {
                let step = self.client.poll(&mut self.to_server);
                if step != ClientStep::NeedInput {
                    return step;
                }
                self.pump();
            }
            panic!("no progress");
        }

        /// Delivers what the client wrote to the server and the server's replies back.
        fn pump(&mut self) {
            let mut to_client = Vec::new();
            self.server.input(&std::mem::take(&mut self.to_server));
            loop {
                match self.server.poll(&mut to_client) {
                    Step::NeedInput => break,
                    Step::Close => {
                        self.closed = true;
                        break;
                    }
                    // TLS is the identity in memory: the handshake is the adapter's job.
                    Step::StartTls => self.server.tls_started(),
                    // The client never sends AUTH; a verdict keeps the session in step anyway.
                    Step::Auth(c) => {
                        let verdict = crate::smtp::server::AuthVerdict::Rejected;
                        self.server.auth_done(verdict, &c.user, &mut to_client);
                    }
                    // No RCPT checks are configured here; accept if one comes anyway.
                    Step::Rcpt(_) => self.server.rcpt_done(None, &mut to_client),
                    Step::Message(t) => {
                        let id = format!("q{}", self.spooled.len());
                        self.spooled.push(t);
                        self.server.message_done(Ok(&id), &mut to_client);
                    }
                }
            }
            self.client.input(&to_client);
        }

        fn send(&mut self, from: &str, rcpts: &[&str], body: &[u8]) -> TransactionOutcome {
            self.send_with(from, rcpts, body, MailOptions::default())
        }

        fn send_with(
            &mut self,
            from: &str,
            rcpts: &[&str],
            body: &[u8],
            opts: MailOptions,
        ) -> TransactionOutcome {
            assert_eq!(self.run(), ClientStep::Ready);
            self.client
                .start_with(from, rcpts, opts, &mut self.to_server);
            match self.run() {
                ClientStep::SendBody => {
                    self.client.write_body(body, &mut self.to_server);
                    done(self.run())
                }
                step => done(step),
            }
        }
    }

    /// The same messages through our own server, with DATA (CHUNKING turned off) and with BDAT
    /// in chunks of 1000 octets, most of them pipelined.
    #[test]
    fn client_and_server_in_memory() {
        for chunking in [false, true] {
            let w = Wire::with(
                |c| {
                    c.chunking = chunking;
                    c.binarymime = chunking;
                },
                client_with_chunks(1000),
            );
            client_and_server_in_memory_with(w, chunking);
        }
    }

    fn client_and_server_in_memory_with(mut w: Wire, chunking: bool) {
        assert_eq!(w.run(), ClientStep::Ready);
        assert_eq!(w.client.capabilities().chunking, chunking);
        let bodies: [&[u8]; 5] = [
            b"Subject: one\r\n\r\nHello\r\n",
            b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\n...\r\n.\r\nend\r\n",
            b"",
            b".",
            b"Subject: long\r\n\r\n",
        ];
        let mut big = bodies[4].to_vec();
        for i in 0..2000 {
            big.extend_from_slice(format!(".line {i} of a longer message\r\n").as_bytes());
        }
        let mut expected = Vec::new();
        for (i, body) in bodies[..4]
            .iter()
            .chain(std::iter::once(&&big[..]))
            .enumerate()
        {
            let o = w.send("sender@a.test", &["r1@b.test", "\"r 2\"@b.test"], body);
            assert_eq!(
                o.data,
                Some(r(250, (2, 0, 0), &format!("Ok: queued as q{i}")))
            );
            assert!(o.rcpts.iter().all(Reply::is_positive));
            expected.push(body.to_vec());
        }
        if !chunking {
            // DATA: a body without a final CRLF gets one; that is the only change. BDAT sends
            // the octets as they are.
            expected[3] = b".\r\n".to_vec();
        }
        let got: Vec<Vec<u8>> = w.spooled.iter().map(|t| t.body.clone()).collect();
        assert_eq!(got, expected);
        for t in &w.spooled {
            assert_eq!(t.mail_from, "sender@a.test");
            assert_eq!(t.rcpts, ["r1@b.test", "\"r 2\"@b.test"]);
            assert_eq!(t.helo, "me.test");
        }

        // A null sender with a refused and an accepted recipient, then a refused batch.
        let o = w.send("", &["ok@b.test", "bad@-b.test"], b"x\r\n");
        assert!(o.rcpts[0].is_positive());
        assert!(o.rcpts[1].is_permanent());
        assert_eq!(w.spooled.last().map(|t| t.mail_from.as_str()), Some(""));

        w.client.quit(&mut w.to_server);
        w.pump();
        assert_eq!(w.run(), ClientStep::Closed);
        assert!(w.closed);
    }

    #[test]
    fn binary_body_through_our_server_byte_for_byte() {
        let mut w = Wire::with(|_| {}, client_with_chunks(3));
        let octets = b"\0\x01\xfe\xff\r\r\n.\r\n\n.\nQUIT\r\nBDAT 9 LAST\r\n";
        let binary = MailOptions {
            binary: true,
            ..MailOptions::default()
        };
        let o = w.send_with("a@a.test", &["x@b.test"], octets, binary);
        assert!(o.data.is_some_and(|d| d.is_positive()));
        let t = w.spooled.last().expect("spooled");
        assert!(t.body_binary && !t.body_8bit);
        assert_eq!(t.body, octets);
    }

    #[test]
    fn client_and_server_when_every_recipient_is_refused() {
        let mut w = Wire::new();
        let cfg = Rc::new(ServerConfig::default());
        w.server = Session::new(cfg, false);
        let mut greeting = Vec::new();
        w.server.greeting(&mut greeting);
        w.client = client();
        w.client.input(&greeting);
        let o = w.send("a@a.test", &["x@b.test"], b"never sent\r\n");
        assert_eq!(o.rcpts[0].enhanced, Some((5, 7, 1)));
        assert_eq!(o.data, None);
        assert!(w.spooled.is_empty());
        // The connection still works (the server got RSET, not a body).
        let o = w.send("a@a.test", &["y@b.test"], b"x");
        assert_eq!(o.rcpts[0].code, 550);
        assert_eq!(
            w.server
                .stats()
                .rejected(crate::smtp::Rejection::RelayDenied),
            2
        );
    }

    #[test]
    fn garbage_never_panics() {
        // A server that answers whatever is owed with random replies, now and then garbage.
        let pieces: [&[u8]; 8] = [
            b"250 ok\r\n",
            b"250-x\r\n250-PIPELINING\r\n250 SIZE\r\n",
            b"354 go\r\n",
            b"354 go\r\n",
            b"550 no\r\n",
            b"503 5.5.1 x\r\n",
            b"452 4.5.3 x\r\n",
            b"250 2.0.0 ok\r\n",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut outcomes = 0;
        let ehlos = [
            EHLO_PIPE,
            EHLO_PLAIN,
            EHLO_CHUNKING,
            EHLO_CHUNKING_LOCK_STEP,
        ];
        for _ in 0..600 {
            // Chunks of 4 octets: the body below goes in three of them.
            let mut c = ready_chunks(ehlos[next() as usize % ehlos.len()], 4);
            let mut out = Vec::new();
            // Transactions started and not yet Done (two when one rode behind the other).
            let mut open = 0;
            for _ in 0..100 {
                let r = next();
                match r % 64 {
                    3 => c.input(b"2"),
                    4 => c.input(b"\r\n"),
                    0 => {
                        let len = (r >> 8) % 30;
                        let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                        c.input(&bytes);
                    }
                    1 => c.input(b"421 4.4.2 bye\r\n"),
                    2 => c.input(b"250 unsolicited\r\n"),
                    _ if c.expect.is_empty() => {}
                    _ => c.input(pieces[(r >> 8) as usize % pieces.len()]),
                }
                match c.poll(&mut out) {
                    ClientStep::Ready if r % 50 == 7 => c.quit(&mut out),
                    ClientStep::Ready => {
                        let rcpts: &[&str] = if r % 5 == 1 {
                            &["x@y.z", "bad"]
                        } else {
                            &["x@y.z", "w@y.z"]
                        };
                        c.start("a@b.c", rcpts, &mut out);
                        open += 1;
                    }
                    ClientStep::SendBody => c.write_body(b"body\r\n.\r\n", &mut out),
                    ClientStep::Failed(_) | ClientStep::Closed => break,
                    ClientStep::Done(o) => {
                        assert_eq!(o.rcpts.len(), 2);
                        open -= 1;
                        if open == 0 {
                            assert!(c.txn.is_none() && c.expect.is_empty());
                        }
                        outcomes += 1;
                    }
                    ClientStep::StartTls => c.tls_started(&mut out),
                    ClientStep::NeedInput if r % 3 == 0 && c.can_start_early() => {
                        c.start("a@b.c", &["v@y.z", "u@y.z"], &mut out);
                        open += 1;
                    }
                    ClientStep::NeedInput => {}
                }
            }
        }
        assert!(outcomes > 100, "{outcomes}");
    }
}
