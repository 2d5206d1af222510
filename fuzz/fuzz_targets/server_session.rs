//! A server `Session` driven by arbitrary client bytes in arbitrary chunks.
//!
//! Input layout: byte 0 holds flags (bit 0: relay allowed; bits 1..: whether each message is
//! accepted or refused by the "spool"); then chunks, each a length byte followed by that many
//! bytes. Every `Step::Message` is answered with `message_done` before more input is given, as
//! the adapter does.
//!
//! Checks: no panic; everything the server writes is a sequence of complete replies with CRLF
//! line ends that our own client's reply parser accepts; a handed-out message obeys the config's
//! limits; nothing is written after `Close`; the session never writes more than a bounded amount
//! per input byte (no reply loops).
#![no_main]

use std::rc::Rc;

use epoxi::smtp::client::REPLY_LINE_LEN_MAX_DEFAULT;
use epoxi::smtp::reply::parse_reply;
use epoxi::smtp::server::AuthVerdict;
use epoxi::smtp::{Reply, ServerConfig, Session, Step};
use libfuzzer_sys::fuzz_target;

/// Small enough that the fuzzer reaches "message too big", big enough for real messages.
const SIZE_MAX: usize = 4096;
/// Upper bound on replies written for one input byte: each line is at least one byte and gets
/// one reply, plus EHLO's multi-line reply and a final 421.
const OUT_PER_BYTE_MAX: usize = 2048;

fn check_replies(out: &[u8]) {
    let mut pos = 0;
    while pos < out.len() {
        match parse_reply(&out[pos..], REPLY_LINE_LEN_MAX_DEFAULT) {
            Ok(Some((reply, n))) => {
                assert!(n > 0);
                assert!((200..=599).contains(&reply.code), "{reply:?}");
                pos += n;
            }
            other => panic!(
                "server wrote an unparsable reply {other:?}: {:?}",
                String::from_utf8_lossy(&out[pos..])
            ),
        }
    }
    for line in out.split_inclusive(|&b| b == b'\n') {
        assert!(line.ends_with(b"\r\n"), "line without CRLF: {line:?}");
        assert!(
            !line[..line.len() - 2].contains(&b'\r'),
            "bare CR in reply line {line:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let cfg = ServerConfig {
        hostname: "mx.example".to_owned(),
        size_max: SIZE_MAX,
        // The out-of-band domain and RCPT checks, on or off by the input.
        oob_domain: (flags & 2 == 2).then(|| "b.example".to_owned()),
        rcpt_check: flags & 4 == 4,
        ..ServerConfig::default()
    };
    assert!(cfg.validate().is_ok());
    let cfg = Rc::new(cfg);
    let mut s = Session::new(cfg.clone(), flags & 1 == 1);
    let mut out = Vec::new();
    s.greeting(&mut out);
    check_replies(&out);
    out.clear();

    let mut messages = 0u64;
    let mut closed = false;
    let mut fed = 0usize;
    let mut written = 0usize;
    while let Some((&len, tail)) = rest.split_first() {
        let n = usize::from(len).min(tail.len());
        let (chunk, tail) = tail.split_at(n);
        rest = tail;
        if closed {
            break;
        }
        s.input(chunk);
        fed += chunk.len();
        // Poll until the session needs input; a bound on rounds catches a livelock.
        for _ in 0..=chunk.len() + 2 {
            match s.poll(&mut out) {
                Step::NeedInput => break,
                Step::Close => {
                    closed = true;
                    break;
                }
                Step::StartTls => {
                    // Pretend the handshake worked; the client must say EHLO again.
                    s.tls_started();
                }
                Step::Rcpt(address) => {
                    // Refuse every other one, as a suppression list might.
                    let refuse = address.len() % 2 == 0;
                    let reply = Reply::new(550, Some((5, 7, 1)), "Recipient suppressed");
                    s.rcpt_done(refuse.then_some(&reply), &mut out);
                }
                Step::Auth(creds) => {
                    let _ = format!("{creds:?}");
                    let verdict = match flags >> 6 {
                        0 | 1 => AuthVerdict::Accepted,
                        2 => AuthVerdict::Rejected,
                        _ => AuthVerdict::Limited,
                    };
                    s.auth_done(verdict, "user", &mut out);
                }
                Step::Message(t) => {
                    assert!(t.body.len() <= cfg.size_max, "body {}", t.body.len());
                    assert!(!t.rcpts.is_empty() && t.rcpts.len() <= cfg.rcpts_max);
                    assert!(!s.wants_input());
                    let accept = (flags >> (1 + messages % 7)) & 1 == 0;
                    messages += 1;
                    if accept {
                        // A queue id with junk in it must not break the reply line.
                        let id = String::from_utf8_lossy(chunk).into_owned();
                        s.message_done(Ok(&id), &mut out);
                    } else {
                        let reply = Reply::new(451, Some((4, 3, 0)), "Spool unavailable");
                        s.message_done(Err(reply), &mut out);
                    }
                    // A second call is ignored.
                    let before = out.len();
                    s.message_done(Ok("again"), &mut out);
                    assert_eq!(out.len(), before, "message_done answered twice");
                }
            }
        }
        written += out.len();
        check_replies(&out);
        out.clear();
        assert!(written <= (fed + 2) * OUT_PER_BYTE_MAX, "{written} bytes for {fed}");
    }
    assert_eq!(s.stats().messages, messages);
    if closed {
        let mut out = Vec::new();
        s.input(b"NOOP\r\n");
        assert_eq!(s.poll(&mut out), Step::Close);
        s.timeout(&mut out);
        s.shutdown(&mut out);
        assert!(out.is_empty(), "wrote after close: {out:?}");
    } else {
        // The adapter's timer or a shutdown ends any session with one well-formed reply.
        s.shutdown(&mut out);
        s.timeout(&mut out);
        check_replies(&out);
        assert_eq!(s.poll(&mut Vec::new()), Step::Close);
    }
});
