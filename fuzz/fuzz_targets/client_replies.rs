//! An outbound `Client` fed arbitrary server bytes, with `start`, `write_body`, `quit` and `poll`
//! calls in an order the fuzzer picks (including out-of-sequence ones, which must fail cleanly).
//!
//! Input: a sequence of operations, each an opcode byte and its operand:
//! - 0: `input` of the next length-prefixed chunk, then `poll`;
//! - 1: `poll`;
//! - 2: `start_with` a sender and recipients picked from a fixed table by the next byte, whose
//!   top bits also ask for BODY=8BITMIME (bit 7) and BODY=BINARYMIME (bit 6);
//! - 3: `write_body` of the next length-prefixed chunk;
//! - 4: `quit`;
//! - otherwise: feed a canned good reply (so the fuzzer gets past the handshake easily); one of
//!   them is an EHLO reply with CHUNKING and BINARYMIME, so BDAT is reached too.
//!
//! Checks: no panic; every command the client writes is CRLF-terminated; once `Failed` it stays
//! so, and once `Closed` it is never usable again; a `Done` outcome has one reply per recipient given to `start`.
//! A body goes either as DATA text (ending with the end marker) or as BDAT chunks of at most
//! `CHUNK_MAX` octets whose payloads, in order, are the body given to `write_body` byte for
//! byte, the last one (and only it) marked LAST; chunks written later by `poll` (lock-step
//! BDAT) continue the same body.
#![no_main]

use epoxi::smtp::client::MailOptions;
use epoxi::smtp::{Client, ClientConfig, ClientStep};
use libfuzzer_sys::fuzz_target;

/// Small, so that bodies of a few dozen octets already go in several chunks.
const CHUNK_MAX: usize = 16;

const ADDRS: [&str; 6] = [
    "a@example.com",
    "",
    "bad address",
    "b@[127.0.0.1]",
    "\"q x\"@example.org",
    "c@example.net",
];

const CANNED: [&[u8]; 9] = [
    b"220 mx ESMTP\r\n",
    b"250-mx\r\n250-PIPELINING\r\n250-SIZE 100\r\n250 8BITMIME\r\n",
    b"250-mx\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-BINARYMIME\r\n250 CHUNKING\r\n",
    b"250 2.1.0 Ok\r\n",
    b"354 Go ahead\r\n",
    b"250 2.0.0 Ok: queued\r\n",
    b"550 5.1.1 No such user\r\n",
    b"421 4.3.2 Bye\r\n",
    b"221 2.0.0 Bye\r\n",
];

struct Ops<'a>(&'a [u8]);

impl<'a> Ops<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn chunk(&mut self) -> &'a [u8] {
        let len = usize::from(self.byte().unwrap_or(0)).min(self.0.len());
        let (c, rest) = self.0.split_at(len);
        self.0 = rest;
        c
    }
}

#[derive(Default)]
struct Track {
    failed: bool,
    closed: bool,
    rcpts_started: Vec<usize>,
    /// The body given to the last `write_body` that went out as BDAT, and how much of it the
    /// chunks written so far carried.
    bdat: Option<(Vec<u8>, usize)>,
}

/// Checks what the client wrote: command lines ending in CRLF, and BDAT chunks continuing the
/// body in `t.bdat`.
fn check_out(out: &mut Vec<u8>, t: &mut Track) {
    let mut rest = &out[..];
    while !rest.is_empty() {
        let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
            panic!("line without CRLF: {rest:?}");
        };
        let line = &rest[..=lf];
        assert!(line.ends_with(b"\r\n"), "line without CRLF: {line:?}");
        rest = &rest[lf + 1..];
        if let Some(args) = line.strip_prefix(b"BDAT ") {
            let args = std::str::from_utf8(&args[..args.len() - 2]).expect("ASCII BDAT line");
            let (size, last) = match args.split_once(' ') {
                Some((size, "LAST")) => (size, true),
                None => (args, false),
                Some(_) => panic!("bad BDAT line {args:?}"),
            };
            let size: usize = size.parse().expect("BDAT size");
            assert!(size <= CHUNK_MAX, "chunk of {size}");
            assert!(rest.len() >= size, "BDAT {size} with {} octets", rest.len());
            let (payload, tail) = rest.split_at(size);
            rest = tail;
            let (body, sent) = t.bdat.as_mut().expect("a chunk with no body given");
            assert_eq!(
                payload,
                &body[*sent..*sent + size],
                "chunk out of step with the body"
            );
            *sent += size;
            assert!(size > 0 || last, "empty chunk before LAST");
            assert_eq!(
                last,
                *sent == body.len(),
                "LAST on the chunk that ends the body"
            );
            if last {
                t.bdat = None;
            }
        }
    }
    out.clear();
}

fn poll(c: &mut Client, out: &mut Vec<u8>, t: &mut Track) {
    // A few rounds: `Done` is returned once per transaction and pipelined replies may follow.
    for _ in 0..4 {
        let step = c.poll(out);
        if t.failed {
            assert!(
                matches!(step, ClientStep::Failed(_)),
                "left Failed: {step:?}"
            );
        }
        // `Closed` may still turn into `Failed` when the caller misuses the client afterwards
        // (`start` or `write_body` out of sequence); it never goes back to working.
        if t.closed {
            assert!(
                matches!(step, ClientStep::Closed | ClientStep::Failed(_)),
                "left Closed: {step:?}"
            );
        }
        match step {
            ClientStep::Failed(r) => {
                // The reply says why; it may be the server's own (even a 221 as greeting).
                assert!((200..=599).contains(&r.code), "{r:?}");
                t.failed = true;
                break;
            }
            ClientStep::Closed => {
                t.closed = true;
                break;
            }
            ClientStep::Done(o) => {
                if !t.rcpts_started.is_empty() {
                    let n = t.rcpts_started.remove(0);
                    assert_eq!(o.rcpts.len(), n, "{o:?}");
                }
            }
            ClientStep::StartTls => {
                // Pretend the handshake worked; the client must say EHLO again.
                c.tls_started(out);
                break;
            }
            ClientStep::NeedInput | ClientStep::Ready | ClientStep::SendBody => break,
        }
    }
    check_out(out, t);
}

fuzz_target!(|data: &[u8]| {
    let mut c = Client::new(ClientConfig {
        bdat_chunk_size_max: CHUNK_MAX,
        ..ClientConfig::default()
    });
    let mut out = Vec::new();
    let mut t = Track::default();
    let mut ops = Ops(data);
    let mut steps = 0;
    while let Some(op) = ops.byte() {
        steps += 1;
        if steps > 4096 {
            break;
        }
        match op {
            0 => {
                c.input(ops.chunk());
                poll(&mut c, &mut out, &mut t);
            }
            1 => poll(&mut c, &mut out, &mut t),
            2 => {
                let pick = ops.byte().unwrap_or(0);
                let from = ADDRS[usize::from(pick) % ADDRS.len()];
                let n = usize::from(pick >> 4) % 4;
                let rcpts: Vec<&str> = (0..n)
                    .map(|i| ADDRS[(usize::from(pick) + i * 5) % ADDRS.len()])
                    .collect();
                let opts = MailOptions {
                    eight_bit: pick & 0x80 != 0,
                    binary: pick & 0x40 != 0,
                    ..MailOptions::default()
                };
                let ready_before = !t.failed && !t.closed;
                c.start_with(from, &rcpts, opts, &mut out);
                check_out(&mut out, &mut t);
                // Only transactions that were accepted produce a `Done`; when `start` was out of
                // sequence the client fails instead, and the tracking stops mattering.
                if ready_before {
                    t.rcpts_started.push(n);
                }
            }
            3 => {
                let body = ops.chunk();
                // The transaction (if any) was started after EHLO, so it uses BDAT exactly when
                // the server offered CHUNKING.
                let bdat = c.capabilities().chunking;
                c.write_body(body, &mut out);
                if bdat && !out.is_empty() {
                    t.bdat = Some((body.to_vec(), 0));
                    check_out(&mut out, &mut t);
                } else if !out.is_empty() {
                    assert!(out.ends_with(b"\r\n.\r\n") || out == b".\r\n", "{out:?}");
                    out.clear();
                }
            }
            4 => {
                c.quit(&mut out);
                check_out(&mut out, &mut t);
            }
            n => {
                c.input(CANNED[usize::from(n) % CANNED.len()]);
                poll(&mut c, &mut out, &mut t);
            }
        }
    }
});
