//! `parse_reply` on arbitrary bytes.
//!
//! Input layout: bytes 0..2 pick `line_len_max`; the rest is what the server sent.
//!
//! Checks: no panic; a parsed reply consumed at least one full line and no more than the buffer,
//! ending on an LF; its code is a valid reply code; its line count is within `REPLY_LINES_MAX`;
//! and writing it back out gives a reply that parses to the same code and lines.
#![no_main]

use epoxi::smtp::reply::{parse_reply, REPLY_LINES_MAX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let line_len_max = 1 + usize::from(u16::from_le_bytes([data[0], data[1]]) % 4096);
    let buf = &data[2..];
    let Ok(Some((reply, n))) = parse_reply(buf, line_len_max) else {
        return;
    };
    assert!(n > 0 && n <= buf.len(), "consumed {n} of {}", buf.len());
    assert_eq!(buf[n - 1], b'\n');
    assert!((200..=559).contains(&reply.code), "{reply:?}");
    let lines = reply.lines().count();
    assert!(lines >= 1 && lines <= REPLY_LINES_MAX, "{lines} lines");
    assert_eq!(lines, buf[..n].iter().filter(|&&b| b == b'\n').count());
    if let Some((class, _, _)) = reply.enhanced {
        assert_eq!(u16::from(class), reply.code / 100, "{reply:?}");
    }

    // What a relay would write back (e.g. in a bounce) must parse again.
    let mut wire = Vec::new();
    reply.write_to(&mut wire);
    match parse_reply(&wire, usize::MAX) {
        Ok(Some((again, m))) => {
            assert_eq!(m, wire.len(), "{wire:?}");
            assert_eq!(again.code, reply.code);
            assert_eq!(again.lines().count(), lines, "{reply:?} -> {again:?}");
        }
        other => panic!("re-serialised reply does not parse: {other:?} from {wire:?}"),
    }
});
