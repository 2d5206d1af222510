//! An outbound `Client` fed arbitrary server bytes, with `start`, `write_body`, `quit` and `poll`
//! calls in an order the fuzzer picks (including out-of-sequence ones, which must fail cleanly).
//!
//! Input: a sequence of operations, each an opcode byte and its operand:
//! - 0: `input` of the next length-prefixed chunk, then `poll`;
//! - 1: `poll`;
//! - 2: `start` with a sender and recipients picked from a fixed table by the next byte;
//! - 3: `write_body` of the next length-prefixed chunk;
//! - 4: `quit`;
//! - otherwise: feed a canned good reply (so the fuzzer gets past the handshake easily).
//!
//! Checks: no panic; every command the client writes is CRLF-terminated; once `Failed` it stays
//! so, and once `Closed` it is never usable again; a `Done` outcome has one reply per recipient given to `start`.
#![no_main]

use epoxi::smtp::{Client, ClientConfig, ClientStep};
use libfuzzer_sys::fuzz_target;

const ADDRS: [&str; 6] = [
    "a@example.com",
    "",
    "bad address",
    "b@[127.0.0.1]",
    "\"q x\"@example.org",
    "c@example.net",
];

const CANNED: [&[u8]; 8] = [
    b"220 mx ESMTP\r\n",
    b"250-mx\r\n250-PIPELINING\r\n250-SIZE 100\r\n250 8BITMIME\r\n",
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
}

fn check_out(out: &mut Vec<u8>) {
    for line in out.split_inclusive(|&b| b == b'\n') {
        assert!(line.ends_with(b"\r\n"), "line without CRLF: {line:?}");
    }
    out.clear();
}

fn poll(c: &mut Client, out: &mut Vec<u8>, t: &mut Track) {
    // A few rounds: `Done` is returned once per transaction and pipelined replies may follow.
    for _ in 0..4 {
        let step = c.poll(out);
        if t.failed {
            assert!(matches!(step, ClientStep::Failed(_)), "left Failed: {step:?}");
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
    check_out(out);
}

fuzz_target!(|data: &[u8]| {
    let mut c = Client::new(ClientConfig::default());
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
                let ready_before = !t.failed && !t.closed;
                c.start(from, &rcpts, &mut out);
                check_out(&mut out);
                // Only transactions that were accepted produce a `Done`; when `start` was out of
                // sequence the client fails instead, and the tracking stops mattering.
                if ready_before {
                    t.rcpts_started.push(n);
                }
            }
            3 => {
                c.write_body(ops.chunk(), &mut out);
                let wire = std::mem::take(&mut out);
                if !wire.is_empty() {
                    assert!(wire.ends_with(b"\r\n.\r\n") || wire == b".\r\n", "{wire:?}");
                }
            }
            4 => {
                c.quit(&mut out);
                check_out(&mut out);
            }
            n => {
                c.input(CANNED[usize::from(n) % CANNED.len()]);
                poll(&mut c, &mut out, &mut t);
            }
        }
    }
});
