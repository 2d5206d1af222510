//! `DataReader::feed` on arbitrary input split at a fuzzer-chosen boundary.
//!
//! Input layout: byte 0 picks `size_max`, byte 1 picks `line_len_max`, bytes 2..4 pick the
//! split point; the rest is the text after DATA.
//!
//! Checks: `consumed <= input.len()`; a call consumes everything unless it finished the message;
//! once done, feeding consumes 0 and stores nothing; the body never exceeds `size_max`; feeding
//! in two pieces gives the same consumed count, size and accept/refuse verdict as feeding in one
//! (and the same body when accepted); and an accepted CRLF-only body written back with
//! `write_stuffed` reads back identically.
#![no_main]

use epoxi::smtp::data::write_stuffed;
use epoxi::smtp::DataReader;
use libfuzzer_sys::fuzz_target;

struct Run {
    body: Vec<u8>,
    consumed: usize,
    done: bool,
    size: usize,
    verdict: Result<(), epoxi::smtp::DataError>,
}

fn feed_checked(r: &mut DataReader, input: &[u8], body: &mut Vec<u8>, size_max: usize) -> usize {
    let was_done = r.is_done();
    let before = body.len();
    let n = r.feed(input, body);
    assert!(n <= input.len(), "consumed {n} of {}", input.len());
    if was_done {
        assert_eq!(n, 0, "consumed after done");
        assert_eq!(body.len(), before, "stored after done");
    } else if !r.is_done() {
        assert_eq!(n, input.len(), "stopped early without the end marker");
    } else {
        // The marker ends with LF, and is the last thing consumed.
        assert!(n > 0 && input[n - 1] == b'\n', "done without consuming an LF");
    }
    assert!(body.len() <= size_max, "body {} > size_max {size_max}", body.len());
    // The body counter covers at least what was stored.
    assert!(r.size() >= body.len());
    n
}

fn run(parts: &[&[u8]], size_max: usize, line_len_max: usize) -> Run {
    let mut r = DataReader::new(size_max, line_len_max);
    let mut body = Vec::new();
    let mut consumed = 0;
    for part in parts {
        consumed += feed_checked(&mut r, part, &mut body, size_max);
    }
    // Once done, more input (say a pipelined command) is left alone.
    if r.is_done() {
        let n = feed_checked(&mut r, b"QUIT\r\n.\r\n", &mut body, size_max);
        assert_eq!(n, 0);
    }
    Run {
        done: r.is_done(),
        size: r.size(),
        verdict: r.finish(),
        body,
        consumed,
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let size_max = 1 + usize::from(data[0]) * 16;
    let line_len_max = 1 + usize::from(data[1]);
    let input = &data[4..];
    let split = usize::from(u16::from_le_bytes([data[2], data[3]])) % (input.len() + 1);
    let (a, b) = input.split_at(split);

    let whole = run(&[input], size_max, line_len_max);
    let split = run(&[a, b], size_max, line_len_max);
    // After a refusal the stored body is partial and thrown away, so only an accepted one must
    // not depend on how the input was split.
    if whole.verdict.is_ok() {
        assert_eq!(whole.body, split.body, "split at {}", a.len());
    }
    assert_eq!(whole.consumed, split.consumed);
    assert_eq!(whole.done, split.done);
    assert_eq!(whole.size, split.size);
    // Which refusal is reported (too big or line too long) may depend on the split, because the
    // size and the line length are checked in the order the bytes arrive; whether it is refused
    // must not.
    assert_eq!(whole.verdict.is_ok(), split.verdict.is_ok(), "{:?} {:?}", whole.verdict, split.verdict);
    if whole.verdict.is_ok() {
        assert_eq!(whole.size, whole.body.len());
    }

    // Round trip: a complete, accepted body with only CRLF line ends (what the server spools)
    // goes through the client's dot-stuffing writer and back unchanged.
    let bare_lf = whole
        .body
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || whole.body[i - 1] != b'\r'));
    if whole.done && whole.verdict.is_ok() && !bare_lf {
        let mut wire = Vec::new();
        write_stuffed(&whole.body, &mut wire);
        let mut r = DataReader::new(usize::MAX, usize::MAX);
        let mut back = Vec::new();
        let n = r.feed(&wire, &mut back);
        assert!(r.is_done(), "stuffed body has no end marker");
        assert_eq!(n, wire.len(), "end marker before the end of the stuffed body");
        assert_eq!(back, whole.body, "round trip changed the body");
    }
});
