//! The sink's SMTP server session as a state machine: bytes in, replies out, no I/O.
//!
//! `feed` consumes as much input as it can and stops at the next event the caller must act
//! on: more input needed, a message whose DATA completed (the caller decides the reply, so
//! counting happens before the client can see it), a MAIL FROM the caller must admit or refuse
//! (only when asked to, with `gate_mail`; the sink's rate limits), or the end of the connection.
//! Commands are answered in order, so a pipelined batch (RFC 2920) gets its replies in one
//! buffer.
//!
//! Invariants: in command mode an incomplete line is never consumed, and one longer than
//! `COMMAND_LINE_LEN_MAX` ends the session; in data mode every byte is consumed, since the
//! scanner keeps the state that spans reads; a message is reported only after a MAIL and at
//! least one RCPT were accepted.

use std::sync::Arc;

use crate::message::ID_HEADER;
use crate::smtp_line::{split_line, DataScanner, Scan};

use crate::reply_mix::FinalReply;
use crate::smart::{Kind, Providers};
use crate::throttle::Refusal;

/// RFC 5321 4.5.3.1.4 allows 512 octets per command line, more with extensions' parameters.
/// Four times that is generous; anything longer is not SMTP.
pub const COMMAND_LINE_LEN_MAX: usize = 2048;

/// RFC 5321 4.5.3.1.8 requires accepting at least 100 recipients; ten times that keeps one
/// transaction's memory bounded while never refusing a realistic MTA batch.
pub const RCPTS_MAX: usize = 1000;

/// A recipient address longer than RFC 5321's 256-octet path limit is refused.
pub const PATH_LEN_MAX: usize = 256;

/// Advertised in EHLO and enforced: 100 MiB, well above any message a load test sends.
pub const MESSAGE_SIZE_MAX: usize = 100 * 1024 * 1024;

const HOSTNAME: &str = "sink.loadgen.test";

const GREETING: &[u8] = b"220 sink.loadgen.test ESMTP epoxi-loadgen sink\r\n";
const EHLO_REPLY: &[u8] = b"250-sink.loadgen.test\r\n\
250-PIPELINING\r\n\
250-8BITMIME\r\n\
250-SIZE 104857600\r\n\
250 ENHANCEDSTATUSCODES\r\n";
const _: () = assert!(
    MESSAGE_SIZE_MAX == 104_857_600,
    "keep EHLO_REPLY's SIZE in step"
);
const OK: &[u8] = b"250 2.0.0 Ok\r\n";
const MAIL_OK: &[u8] = b"250 2.1.0 Sender ok\r\n";
const RCPT_OK: &[u8] = b"250 2.1.5 Recipient ok\r\n";
const DATA_GO: &[u8] = b"354 End data with <CR><LF>.<CR><LF>\r\n";
const BYE: &[u8] = b"221 2.0.0 Bye\r\n";
const NEED_HELO: &[u8] = b"503 5.5.1 Send EHLO or HELO first\r\n";
const NESTED_MAIL: &[u8] = b"503 5.5.1 Sender already given\r\n";
const NEED_MAIL: &[u8] = b"503 5.5.1 Send MAIL first\r\n";
const NEED_RCPT: &[u8] = b"554 5.5.1 No valid recipients\r\n";
const TOO_MANY_RCPTS: &[u8] = b"452 4.5.3 Too many recipients\r\n";
const TOO_BIG: &[u8] = b"552 5.3.4 Message too big\r\n";
const SYNTAX: &[u8] = b"501 5.5.4 Syntax error in parameters\r\n";
const UNKNOWN: &[u8] = b"500 5.5.2 Command not recognized\r\n";
const LINE_TOO_LONG: &[u8] = b"500 5.5.2 Line too long\r\n";

/// What the caller must do after `feed`.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Everything complete was handled; read more input.
    NeedInput,
    /// A message's DATA completed; answer it with `answer_data`.
    Message(Message),
    /// Flush the output and close the connection.
    Close,
    /// A `--smart` refusal of this kind was appended to the output at RCPT; count it.
    Refused(Kind),
    /// With `gate_mail`, a well-formed MAIL FROM arrived; admit or refuse it with
    /// `answer_mail`.
    Mail,
}

/// A message whose DATA completed.
#[derive(Debug, PartialEq, Eq)]
pub struct Message {
    /// The X-Loadgen-Id header's value, if there was one.
    pub id: Option<String>,
    pub rcpts: Vec<String>,
    /// The name the client gave in EHLO/HELO (lossy UTF-8).
    pub helo: Option<Arc<str>>,
    /// With `--smart`, the refusal a recipient asked for after the final dot (`spam@`),
    /// rendered; the caller answers with it instead of its own choice.
    pub refusal: Option<(Kind, FinalReply)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Command,
    Data,
    /// The final dot was seen and `answer_data` has not been called yet.
    AwaitingAnswer,
    /// With `gate_mail`, a MAIL was seen and `answer_mail` has not been called yet.
    AwaitingMail,
    Closed,
}

pub struct Session {
    mode: Mode,
    greeted: bool,
    in_transaction: bool,
    rcpts: Vec<String>,
    helo: Option<Arc<str>>,
    data: DataScanner,
    /// `--smart` replies, and the client's address they may name.
    smart: Option<(Arc<Providers>, Box<str>)>,
    /// A refusal written at RCPT and not yet reported as `Event::Refused`.
    refused: Option<Kind>,
    /// The first accepted recipient whose refusal comes after the final dot.
    refuse_at_data: Option<(Kind, String)>,
    /// Whether a MAIL FROM waits for the caller's `answer_mail`.
    gate_mail: bool,
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

impl Session {
    pub fn new() -> Self {
        Self {
            mode: Mode::Command,
            greeted: false,
            in_transaction: false,
            rcpts: Vec::new(),
            helo: None,
            data: DataScanner::new(ID_HEADER),
            smart: None,
            refused: None,
            refuse_at_data: None,
            gate_mail: false,
        }
    }

    /// A session that refuses recipients as `--smart` says; `client_ip` fills `{ip}`.
    pub fn with_smart(providers: Arc<Providers>, client_ip: &str) -> Self {
        Self {
            smart: Some((providers, client_ip.into())),
            ..Self::new()
        }
    }

    /// From now on every well-formed MAIL FROM is handed to the caller as `Event::Mail`,
    /// so it can refuse the transaction (a rate limit); without this MAIL is answered here.
    pub fn gate_mail(&mut self) {
        self.gate_mail = true;
    }

    pub fn greet(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(GREETING);
    }

    /// Consumes input up to the next event. Returns the bytes consumed and the event; replies
    /// are appended to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, Event) {
        let mut pos = 0;
        loop {
            match self.mode {
                Mode::Closed => return (pos, Event::Close),
                Mode::AwaitingAnswer | Mode::AwaitingMail => return (pos, Event::NeedInput),
                Mode::Data => match self.data.feed(&input[pos..]) {
                    Scan::More => return (input.len(), Event::NeedInput),
                    Scan::End { consumed } => {
                        pos += consumed;
                        if self.data.len() > MESSAGE_SIZE_MAX {
                            out.extend_from_slice(TOO_BIG);
                            self.reset_transaction();
                            self.mode = Mode::Command;
                            continue;
                        }
                        self.mode = Mode::AwaitingAnswer;
                        let refusal = self.refusal_at_data();
                        let message = Message {
                            id: self.data.take_header_value(),
                            rcpts: std::mem::take(&mut self.rcpts),
                            helo: self.helo.clone(),
                            refusal,
                        };
                        return (pos, Event::Message(message));
                    }
                },
                Mode::Command => {
                    let Some((line, taken)) = split_line(&input[pos..]) else {
                        if input.len() - pos > COMMAND_LINE_LEN_MAX {
                            out.extend_from_slice(LINE_TOO_LONG);
                            self.mode = Mode::Closed;
                            continue;
                        }
                        return (pos, Event::NeedInput);
                    };
                    pos += taken;
                    if line.len() > COMMAND_LINE_LEN_MAX {
                        out.extend_from_slice(LINE_TOO_LONG);
                        self.mode = Mode::Closed;
                        continue;
                    }
                    self.command(line, out);
                    if let Some(kind) = self.refused.take() {
                        return (pos, Event::Refused(kind));
                    }
                    if self.mode == Mode::AwaitingMail {
                        return (pos, Event::Mail);
                    }
                }
            }
        }
    }

    /// Answers the final dot of the message last returned by `feed`.
    pub fn answer_data(&mut self, reply: &FinalReply, out: &mut Vec<u8>) {
        debug_assert_eq!(self.mode, Mode::AwaitingAnswer);
        out.extend_from_slice(&reply.line);
        self.reset_transaction();
        self.mode = if reply.closes_connection() {
            Mode::Closed
        } else {
            Mode::Command
        };
    }

    /// Answers the MAIL FROM last returned by `feed` as `Event::Mail`: `None` admits it and
    /// opens the transaction; a refusal is sent instead and leaves no transaction, closing the
    /// connection if it says so.
    pub fn answer_mail(&mut self, refusal: Option<&Refusal>, out: &mut Vec<u8>) {
        debug_assert_eq!(self.mode, Mode::AwaitingMail);
        self.mode = Mode::Command;
        match refusal {
            None => {
                self.in_transaction = true;
                out.extend_from_slice(MAIL_OK);
            }
            Some(refusal) => {
                out.extend_from_slice(&refusal.line);
                if refusal.closes {
                    self.mode = Mode::Closed;
                }
            }
        }
    }

    /// The rendered refusal for the message whose DATA just ended, if a recipient asked for
    /// one after the final dot.
    fn refusal_at_data(&mut self) -> Option<(Kind, FinalReply)> {
        let (kind, rcpt) = self.refuse_at_data.take()?;
        let (providers, ip) = self.smart.as_ref()?;
        let domain = rcpt.rsplit_once('@').map_or("", |(_, d)| d);
        let reply = providers.reply(domain, kind);
        Some((
            kind,
            FinalReply {
                code: reply.code,
                line: reply.render(ip, &rcpt).into_boxed_slice(),
            },
        ))
    }

    fn reset_transaction(&mut self) {
        self.in_transaction = false;
        self.refuse_at_data = None;
        self.rcpts.clear();
        self.data.reset();
    }

    fn command(&mut self, line: &[u8], out: &mut Vec<u8>) {
        let (verb, arg) = match line.iter().position(|&b| b == b' ') {
            Some(space) => (&line[..space], trim(&line[space + 1..])),
            None => (line, &b""[..]),
        };
        let verb = verb.to_ascii_uppercase();
        match verb.as_slice() {
            b"EHLO" | b"HELO" => {
                if arg.is_empty() {
                    out.extend_from_slice(SYNTAX);
                    return;
                }
                self.greeted = true;
                self.helo = Some(String::from_utf8_lossy(arg).into());
                self.reset_transaction();
                if verb == b"EHLO" {
                    out.extend_from_slice(EHLO_REPLY);
                } else {
                    out.extend_from_slice(format!("250 {HOSTNAME}\r\n").as_bytes());
                }
            }
            b"MAIL" => self.mail(arg, out),
            b"RCPT" => self.rcpt(arg, out),
            b"DATA" => {
                if !self.in_transaction {
                    out.extend_from_slice(NEED_MAIL);
                } else if self.rcpts.is_empty() {
                    // RFC 2920 3.1: with no valid recipient, DATA must fail, so a pipelining
                    // client's message text is then read as commands and rejected.
                    out.extend_from_slice(NEED_RCPT);
                } else {
                    out.extend_from_slice(DATA_GO);
                    self.data.reset();
                    self.mode = Mode::Data;
                }
            }
            b"RSET" => {
                self.reset_transaction();
                out.extend_from_slice(OK);
            }
            b"NOOP" => out.extend_from_slice(OK),
            b"QUIT" => {
                out.extend_from_slice(BYE);
                self.mode = Mode::Closed;
            }
            _ => out.extend_from_slice(UNKNOWN),
        }
    }

    fn mail(&mut self, arg: &[u8], out: &mut Vec<u8>) {
        if !self.greeted {
            out.extend_from_slice(NEED_HELO);
            return;
        }
        if self.in_transaction {
            out.extend_from_slice(NESTED_MAIL);
            return;
        }
        let Some((_path, params)) = parse_path(arg, b"FROM:") else {
            out.extend_from_slice(SYNTAX);
            return;
        };
        let declared_size = params
            .split(|&b| b == b' ')
            .filter_map(|p| {
                p.get(..5)
                    .filter(|k| k.eq_ignore_ascii_case(b"SIZE="))
                    .map(|_| &p[5..])
            })
            .find_map(|v| std::str::from_utf8(v).ok()?.parse::<usize>().ok());
        if declared_size.is_some_and(|size| size > MESSAGE_SIZE_MAX) {
            out.extend_from_slice(TOO_BIG);
            return;
        }
        if self.gate_mail {
            self.mode = Mode::AwaitingMail;
            return;
        }
        self.in_transaction = true;
        out.extend_from_slice(MAIL_OK);
    }

    fn rcpt(&mut self, arg: &[u8], out: &mut Vec<u8>) {
        if !self.in_transaction {
            out.extend_from_slice(NEED_MAIL);
            return;
        }
        let Some((path, _params)) = parse_path(arg, b"TO:") else {
            out.extend_from_slice(SYNTAX);
            return;
        };
        if path.is_empty() || path.len() > PATH_LEN_MAX {
            out.extend_from_slice(SYNTAX);
            return;
        }
        if self.rcpts.len() == RCPTS_MAX {
            out.extend_from_slice(TOO_MANY_RCPTS);
            return;
        }
        let rcpt = String::from_utf8_lossy(path).into_owned();
        if let Some((providers, ip)) = &self.smart {
            if let Some((kind, reply)) = providers.for_rcpt(&rcpt) {
                if kind.at_data() {
                    self.refuse_at_data.get_or_insert((kind, rcpt.clone()));
                } else {
                    out.extend_from_slice(&reply.render(ip, &rcpt));
                    self.refused = Some(kind);
                    if reply.closes_connection() {
                        self.mode = Mode::Closed;
                    }
                    return;
                }
            }
        }
        self.rcpts.push(rcpt);
        out.extend_from_slice(RCPT_OK);
    }
}

/// Splits `FROM:<path> params` (with `keyword` "FROM:" or "TO:", case-insensitive, a space
/// after the colon tolerated) into the path without brackets and the parameters.
fn parse_path<'a>(arg: &'a [u8], keyword: &[u8]) -> Option<(&'a [u8], &'a [u8])> {
    let head = arg.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = trim(&arg[keyword.len()..]);
    if let Some(inner) = rest.strip_prefix(b"<") {
        let close = inner.iter().position(|&b| b == b'>')?;
        Some((&inner[..close], trim(&inner[close + 1..])))
    } else {
        // Bare paths are not RFC 5321, but some test clients send them.
        let end = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
        Some((&rest[..end], trim(&rest[end..])))
    }
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace());
    let end = bytes.iter().rposition(|b| !b.is_ascii_whitespace());
    match (start, end) {
        (Some(s), Some(e)) => &bytes[s..=e],
        _ => b"",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `piece` bytes the way the sink's connection loop does,
    /// answering every message with `reply`. Returns the output and the messages.
    fn run(input: &[u8], piece: usize, reply: u16) -> (String, Vec<Message>, bool) {
        let (out, messages, _, closed) = run_session(Session::new(), input, piece, reply);
        (out, messages, closed)
    }

    /// `run` with a given session; a message's own refusal is its answer, as in the sink.
    /// Also returns the refusals reported at RCPT.
    fn run_session(
        mut session: Session,
        input: &[u8],
        piece: usize,
        reply: u16,
    ) -> (String, Vec<Message>, Vec<Kind>, bool) {
        let reply = FinalReply::new(reply);
        let mut out = Vec::new();
        session.greet(&mut out);
        let mut buf = Vec::new();
        let mut messages = Vec::new();
        let mut refused = Vec::new();
        for chunk in input.chunks(piece) {
            buf.extend_from_slice(chunk);
            loop {
                let (n, event) = session.feed(&buf, &mut out);
                buf.drain(..n);
                match event {
                    Event::NeedInput => break,
                    Event::Message(m) => {
                        let answer = m.refusal.as_ref().map_or(&reply, |(_, r)| r).clone();
                        messages.push(m);
                        session.answer_data(&answer, &mut out);
                    }
                    Event::Refused(kind) => refused.push(kind),
                    Event::Mail => unreachable!("these sessions do not gate MAIL"),
                    Event::Close => {
                        return (String::from_utf8(out).unwrap(), messages, refused, true)
                    }
                }
            }
        }
        (String::from_utf8(out).unwrap(), messages, refused, false)
    }

    fn codes(out: &str) -> Vec<&str> {
        out.lines()
            .filter(|l| l.as_bytes().get(3) != Some(&b'-'))
            .map(|l| &l[..3])
            .collect()
    }

    const PIPELINED: &[u8] = b"EHLO client.test\r\n\
MAIL FROM:<a@b.test> SIZE=1000\r\nRCPT TO:<u1@d0.test>\r\nRCPT TO:<u2@d1.test>\r\nDATA\r\n\
X-Loadgen-Id: id-1\r\n\r\nhello\r\n..dot\r\n.\r\n\
MAIL FROM:<>\r\nRCPT TO:<u3@d2.test>\r\nDATA\r\nSubject: no id\r\n\r\nbody\r\n.\r\n\
NOOP\r\nRSET\r\nQUIT\r\nNOOP\r\n";

    #[test]
    fn answers_pipelined_batches_in_order_across_any_split() {
        for piece in [1, 2, 3, 7, 64, PIPELINED.len()] {
            let (out, messages, closed) = run(PIPELINED, piece, 250);
            assert!(closed, "QUIT closes");
            assert_eq!(
                codes(&out),
                [
                    "220", "250", "250", "250", "250", "354", "250", "250", "250", "354", "250",
                    "250", "250", "221"
                ],
                "piece {piece}: {out}"
            );
            assert!(out.contains("250-PIPELINING\r\n"));
            assert!(out.contains("250 ENHANCEDSTATUSCODES\r\n"));
            assert_eq!(
                messages,
                [
                    Message {
                        id: Some("id-1".into()),
                        rcpts: vec!["u1@d0.test".into(), "u2@d1.test".into()],
                        helo: Some("client.test".into()),
                        refusal: None,
                    },
                    Message {
                        id: None,
                        rcpts: vec!["u3@d2.test".into()],
                        helo: Some("client.test".into()),
                        refusal: None,
                    }
                ]
            );
        }
    }

    #[test]
    fn refuses_out_of_order_commands() {
        let (out, messages, _) = run(
            b"MAIL FROM:<a@b>\r\nHELO c\r\nRCPT TO:<x@y>\r\nDATA\r\nMAIL FROM:<a@b>\r\n\
MAIL FROM:<a@b>\r\nDATA\r\nRCPT TO:<>\r\nRCPT TO <x@y>\r\nBOGUS\r\n\r\nEHLO\r\n\
RSET\r\nMAIL FROM:<a@b> SIZE=999999999999\r\n",
            5,
            250,
        );
        assert_eq!(
            codes(&out),
            [
                "220", "503", "250", "503", "503", "250", "503", "554", "501", "501", "500", "500",
                "501", "250", "552"
            ],
            "{out}"
        );
        assert!(messages.is_empty());
    }

    #[test]
    fn final_reply_comes_from_the_caller_and_421_closes() {
        let input = b"HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\n.\r\nNOOP\r\n";
        let (out, messages, closed) = run(input, 3, 451);
        assert!(
            out.ends_with("451 4.3.0 Try again later\r\n250 2.0.0 Ok\r\n"),
            "{out}"
        );
        assert_eq!(messages.len(), 1);
        assert!(!closed);
        let (out, _, closed) = run(input, 3, 421);
        assert!(
            out.ends_with("421 4.3.2 Service shutting down\r\n"),
            "{out}"
        );
        assert!(closed);
    }

    #[test]
    fn overlong_command_line_closes() {
        let mut input = b"NOOP ".to_vec();
        input.resize(COMMAND_LINE_LEN_MAX + 100, b'x');
        let (out, _, closed) = run(&input, 512, 250);
        assert!(closed);
        assert!(out.ends_with("500 5.5.2 Line too long\r\n"));
    }

    fn smart_session() -> Session {
        Session::with_smart(Arc::new(Providers::builtin().unwrap()), "192.0.2.9")
    }

    #[test]
    fn smart_refuses_at_rcpt_by_local_part_and_keeps_the_rest() {
        let input = b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<permfail@gmail.com>\r\n\
RCPT TO:<quota+3@outlook.com>\r\nRCPT TO:<blocked@yahoo.com>\r\nRCPT TO:<ok@gmail.com>\r\n\
DATA\r\n\r\nhi\r\n.\r\nQUIT\r\n";
        for piece in [1, 5, input.len()] {
            let (out, messages, refused, closed) = run_session(smart_session(), input, piece, 250);
            assert!(closed);
            assert_eq!(refused, [Kind::Permfail, Kind::Quota, Kind::Blocked]);
            assert_eq!(
                codes(&out),
                ["220", "250", "250", "550", "452", "553", "250", "354", "250", "221"],
                "{out}"
            );
            assert!(out.contains(
                "550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n\
550-5.1.1 double-checking"
            ));
            assert!(out.contains("452 4.3.1 Insufficient system resources\r\n"));
            assert!(out.contains("from 192.0.2.9, because"), "{out}");
            assert_eq!(messages.len(), 1);
            assert_eq!(messages[0].rcpts, ["ok@gmail.com"]);
            assert_eq!(messages[0].refusal, None);
        }
    }

    #[test]
    fn smart_spam_is_refused_after_the_dot_and_421_closes_at_rcpt() {
        let input = b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<spam@gmail.com>\r\n\
DATA\r\n\r\nbuy\r\n.\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@gmail.com>\r\nDATA\r\n.\r\n\
MAIL FROM:<a@b.test>\r\nRCPT TO:<tempfail@gmail.com>\r\nNOOP\r\n";
        let (out, messages, refused, closed) = run_session(smart_session(), input, 4, 250);
        assert!(closed, "Gmail's 421 closes");
        assert_eq!(refused, [Kind::Tempfail]);
        assert_eq!(
            codes(&out),
            ["220", "250", "250", "250", "354", "550", "250", "250", "354", "250", "250", "421"],
            "{out}"
        );
        assert!(out.contains("550-5.7.1 [192.0.2.9] Gmail has detected that this message is\r\n"));
        assert!(out.contains("likely unsolicited mail"));
        assert!(out.ends_with("421 4.7.0  https://support.google.com/a/answer/3221692 - gsmtp\r\n"));
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].refusal.as_ref().map(|r| r.0), Some(Kind::Spam));
        assert_eq!(messages[1].refusal, None, "the next transaction is clean");
    }

    /// Feeds `input` at once to a session that gates MAIL, answering each MAIL with the next
    /// of `answers` (`None` admits). Returns the output and whether the session closed.
    fn run_gated(input: &[u8], answers: &[Option<Refusal>]) -> (String, bool) {
        let mut session = Session::new();
        session.gate_mail();
        let mut out = Vec::new();
        session.greet(&mut out);
        let mut answers = answers.iter();
        let mut pos = 0;
        loop {
            let (n, event) = session.feed(&input[pos..], &mut out);
            pos += n;
            match event {
                Event::Mail => {
                    let answer = answers.next().expect("an answer for every MAIL");
                    session.answer_mail(answer.as_ref(), &mut out);
                }
                Event::Message(_) => session.answer_data(&FinalReply::new(250), &mut out),
                Event::NeedInput => return (String::from_utf8(out).unwrap(), false),
                Event::Close => return (String::from_utf8(out).unwrap(), true),
                Event::Refused(_) => {}
            }
        }
    }

    #[test]
    fn a_gated_mail_refused_leaves_no_transaction_and_the_connection_open() {
        let deferred = Refusal {
            line: b"451-4.7.1 slow\r\n451 4.7.1 down\r\n".to_vec(),
            closes: false,
        };
        // A pipelining client's RCPT, DATA and text after a refused MAIL are refused too.
        let input = b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\nhi\r\n.\r\n\
RSET\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\nhi\r\n.\r\nMAIL FROM:<bad\r\nQUIT\r\n";
        let (out, closed) = run_gated(input, &[Some(deferred), None]);
        assert!(closed);
        assert_eq!(
            codes(&out),
            [
                "220", "250", "451", "503", "503", "500", "500", "250", "250", "250", "354", "250",
                "501", "221"
            ],
            "{out}"
        );
        assert!(
            out.contains("451-4.7.1 slow\r\n451 4.7.1 down\r\n"),
            "{out}"
        );
    }

    #[test]
    fn a_gated_mail_refused_with_421_closes() {
        let closing = Refusal {
            line: b"421 4.7.0 go away\r\n".to_vec(),
            closes: true,
        };
        let input = b"HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\n";
        let (out, closed) = run_gated(input, &[Some(closing)]);
        assert!(closed);
        assert!(
            out.ends_with("250 sink.loadgen.test\r\n421 4.7.0 go away\r\n"),
            "{out}"
        );
    }

    #[test]
    fn without_smart_the_names_mean_nothing() {
        let input = b"HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<permfail@gmail.com>\r\n";
        let (out, _, refused, _) = run_session(Session::new(), input, 64, 250);
        assert!(refused.is_empty());
        assert!(out.ends_with("250 2.1.5 Recipient ok\r\n"));
    }
}
