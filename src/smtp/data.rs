//! Streaming reader for the text after DATA (RFC 5321 4.1.1.4 and 4.5.2).
//!
//! Job: find the end-of-data marker CRLF "." CRLF in bytes that arrive in arbitrary pieces,
//! remove the transparency dots the client added, and enforce the size and line-length limits,
//! appending the message to a body buffer as it goes.
//!
//! Invariants and decisions:
//! - The body starts right after DATA's CRLF, which counts as a line start, so an immediate
//!   ".\r\n" is an empty message. The CRLF before the final "." belongs to the body; the final
//!   ".\r\n" does not.
//! - Only CRLF starts a new line. A bare LF (or bare CR) is an ordinary body byte and is kept as
//!   is, so "\n.\r\n" or "\r\n.\n" never end the message. This is deliberately the narrowest
//!   reading: SMTP smuggling (CVE-2023-51766 and friends) exploits servers that disagree about
//!   where a message ends, and the strict terminator is the one every peer agrees on. The
//!   operator may go further ([`DataReader::reject_bare_lf`]): then a bare LF or bare CR
//!   anywhere in the text (RFC 5321 2.3.8 forbids both) makes `finish` report `BareLf` or
//!   `BareCr` after the reader has drained to the end marker, so the session refuses the message
//!   and stays in step.
//! - NUL octets are likewise kept unless [`DataReader::reject_nul`] is set (RFC 5321 4.1.1.4
//!   text is US-ASCII without NUL; some downstream software truncates at a NUL).
//! - Dot-unstuffing: a line that starts with "." has that dot removed (RFC 5321 4.5.2), unless
//!   the line is exactly "." (the end marker).
//! - Size: `size` counts unstuffed body bytes. Past `size_max` the reader stops storing but keeps
//!   reading to the end marker, so the session can answer 552 and carry on with the next command.
//! - Line length: `line_len_max` bounds the wire bytes between two LFs, LF included (so 1000 is
//!   RFC 5321's 998 characters plus CRLF). Counting from LF rather than CRLF means a message with
//!   bare-LF line endings is measured by its visible lines instead of being one huge "line". A
//!   longer line does not end the session: the reader drains to the end marker and `finish`
//!   reports `LineTooLong`, which the server answers with `552 5.3.4` (see `server`). Rejecting is
//!   safer than wrapping: a relay that rewrites lines breaks DKIM signatures.
//! - Memory is bounded by `size_max` (the body buffer) and nothing else: the reader keeps only a
//!   few bytes of state between calls.

use memchr::memchr;
use thiserror::Error;

/// Why a message read to its end marker is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DataError {
    #[error("message larger than {size_max} bytes")]
    TooBig { size_max: usize },
    #[error("message has a line longer than {line_len_max} bytes")]
    LineTooLong { line_len_max: usize },
    #[error("message has a bare LF")]
    BareLf,
    #[error("message has a bare CR")]
    BareCr,
    #[error("message has a NUL octet")]
    Nul,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// After CRLF (or at the very start): a "." here is special.
    LineStart,
    /// Saw "." at a line start.
    Dot,
    /// Saw ".\r" at a line start.
    DotCr,
    /// Inside a line.
    InLine,
    /// Read CRLF "." CRLF; nothing more is consumed.
    Done,
}

/// Streaming DATA reader; one per message.
#[derive(Debug, Clone)]
pub struct DataReader {
    state: State,
    /// The last byte consumed in `InLine` was CR, for a CRLF split across two `feed` calls.
    prev_cr: bool,
    /// Wire bytes since the last LF.
    line_len: usize,
    /// Unstuffed body bytes seen, stored or not.
    size: usize,
    size_max: usize,
    line_len_max: usize,
    /// Refuse text with an LF not preceded by CR.
    reject_bare_lf: bool,
    /// Refuse text with a NUL octet.
    reject_nul: bool,
    error: Option<DataError>,
}

impl DataReader {
    pub fn new(size_max: usize, line_len_max: usize) -> DataReader {
        DataReader {
            state: State::LineStart,
            prev_cr: false,
            line_len: 0,
            size: 0,
            size_max,
            line_len_max,
            reject_bare_lf: false,
            reject_nul: false,
            error: None,
        }
    }

    /// Refuse (rather than keep) bare line ends: an LF without CR before it, or a CR without LF
    /// after it (RFC 5321 2.3.8 forbids both); see the module notes.
    pub fn reject_bare_lf(mut self, on: bool) -> DataReader {
        self.reject_bare_lf = on;
        self
    }

    /// Refuse (rather than keep) NUL octets.
    pub fn reject_nul(mut self, on: bool) -> DataReader {
        self.reject_nul = on;
        self
    }

    /// True once the end marker has been consumed.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Body bytes seen so far (after unstuffing), including any not stored past `size_max`.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The verdict on the message; meaningful once `is_done`.
    pub fn finish(&self) -> Result<(), DataError> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Consumes bytes from `input` up to and including the end marker, appending the unstuffed
    /// body to `body`. Returns how many bytes were consumed: all of `input` unless the marker was
    /// found, in which case the rest (pipelined commands) belongs to the caller.
    ///
    /// Hot path: no I/O, no allocation beyond growing `body`. Whole line spans are copied with one
    /// `extend_from_slice` each; per byte, only the LF search runs.
    pub fn feed(&mut self, input: &[u8], body: &mut Vec<u8>) -> usize {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Done => break,
                State::LineStart => {
                    self.prev_cr = false;
                    if input[i] == b'.' {
                        self.line_len += 1;
                        self.state = State::Dot;
                        i += 1;
                    } else {
                        self.state = State::InLine;
                    }
                }
                State::Dot => {
                    if input[i] == b'\r' {
                        self.line_len += 1;
                        self.state = State::DotCr;
                        i += 1;
                    } else {
                        // A stuffed dot: dropped, and the line goes on from this byte.
                        self.state = State::InLine;
                    }
                }
                State::DotCr => {
                    if input[i] == b'\n' {
                        self.state = State::Done;
                        i += 1;
                        break;
                    }
                    // ".\r" then something else: the dot was stuffing, the CR is body text.
                    if self.reject_bare_lf {
                        self.fail(DataError::BareCr);
                    }
                    self.emit(b"\r", body);
                    self.prev_cr = true;
                    self.state = State::InLine;
                }
                State::InLine => {
                    // A run of plain lines is one span: it ends at a line that starts with a
                    // dot (stuffing, or the end marker) or at the end of the input, and what it
                    // stores is copied at once. Each line is still checked in order, as if
                    // emitted alone, so the verdict and the stored prefix are the same.
                    let span_start = i;
                    let mut store_end = i;
                    let mut pos = i;
                    loop {
                        let rest = &input[pos..];
                        match memchr(b'\n', rest) {
                            Some(k) => {
                                let crlf = if k > 0 {
                                    rest[k - 1] == b'\r'
                                } else {
                                    self.prev_cr
                                };
                                if self.reject_bare_lf {
                                    if !crlf {
                                        self.fail(DataError::BareLf);
                                    }
                                    self.check_bare_cr(&rest[..k]);
                                }
                                if self.account(&rest[..=k]) {
                                    store_end = pos + k + 1;
                                }
                                self.line_len += k + 1;
                                self.check_line_len();
                                self.line_len = 0;
                                self.prev_cr = false;
                                pos += k + 1;
                                if crlf {
                                    if pos >= input.len() || input[pos] == b'.' {
                                        self.state = State::LineStart;
                                        break;
                                    }
                                } else if pos >= input.len() {
                                    break;
                                }
                            }
                            None => {
                                if self.reject_bare_lf {
                                    self.check_bare_cr(rest);
                                }
                                if self.account(rest) {
                                    store_end = input.len();
                                }
                                self.line_len += rest.len();
                                self.check_line_len();
                                self.prev_cr = rest.last() == Some(&b'\r');
                                pos = input.len();
                                break;
                            }
                        }
                    }
                    body.extend_from_slice(&input[span_start..store_end]);
                    i = pos;
                }
            }
        }
        i
    }

    #[inline]
    fn emit(&mut self, bytes: &[u8], body: &mut Vec<u8>) {
        if self.account(bytes) {
            body.extend_from_slice(bytes);
        }
    }

    /// Count `bytes` of body and check them; true if they are to be stored. Once false, false
    /// for the rest of the message (an error is final), so what a span stores is a prefix.
    #[inline]
    fn account(&mut self, bytes: &[u8]) -> bool {
        self.size = self.size.saturating_add(bytes.len());
        if self.reject_nul && memchr(0, bytes).is_some() {
            self.fail(DataError::Nul);
        }
        // Once the message is refused, storing more of it is wasted memory.
        if self.error.is_some() {
            return false;
        }
        if self.size > self.size_max {
            self.error = Some(DataError::TooBig {
                size_max: self.size_max,
            });
            return false;
        }
        true
    }

    /// Flags a CR not followed by LF in `span`, which is the start of the rest of a line with no
    /// LF before its end. A CR as the last byte may be the first half of a CRLF, so it is left
    /// for the next call (`prev_cr`); a CR left over from the previous call was bare if `span`
    /// goes on (an LF there would have come as an empty span).
    ///
    /// Only runs when bare line ends are refused, so the default path scans nothing extra.
    fn check_bare_cr(&mut self, span: &[u8]) {
        let inner = span.strip_suffix(b"\r").unwrap_or(span);
        if (self.prev_cr && !span.is_empty()) || memchr(b'\r', inner).is_some() {
            self.fail(DataError::BareCr);
        }
    }

    /// Records the first reason to refuse the message; later ones add nothing for the client.
    #[inline]
    fn fail(&mut self, e: DataError) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }

    #[inline]
    fn check_line_len(&mut self) {
        if self.line_len > self.line_len_max && self.error.is_none() {
            self.error = Some(DataError::LineTooLong {
                line_len_max: self.line_len_max,
            });
        }
    }
}

/// Writes `body` as DATA text: dot-stuffed, bare LFs turned into CRLF, a CRLF added if the body
/// does not end with one, then the end marker ".\r\n". An empty body becomes just ".\r\n".
///
/// Bare LFs are normalised rather than passed through because receivers disagree on them: one
/// that treats "\n.\r\n" or "\n.\n" as the end of data would otherwise see a message end (or a
/// smuggled second message) inside ours. Lines are counted from LF here, unlike the reader, so a
/// "." after a bare LF is stuffed too and every receiver sees the same message. A body that is
/// already CRLF-only (what the server hands the spool) goes through byte for byte.
///
/// Hot path: no I/O, no allocation beyond growing `out` (reserved once up front).
pub fn write_stuffed(body: &[u8], out: &mut Vec<u8>) {
    write_stuffed_parts(&[body], out);
}

/// [`write_stuffed`] of the message made of `parts` in order (a header block with fields taken
/// out, then the rest, say), without joining them first: the output is that of the
/// concatenation, wherever the parts split it.
pub fn write_stuffed_parts(parts: &[&[u8]], out: &mut Vec<u8>) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    // Room for the body, a few stuffed dots and CRs, and the trailer; more is grown if needed.
    out.reserve(len + len / 64 + 5);
    let mut at = Stuffing {
        line_start: true,
        after_cr: false,
    };
    for part in parts {
        at.write(part, out);
    }
    if !at.line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

/// Where the text written so far ended: at the start of a line, or after a CR (so an LF that
/// starts the next part ends a CRLF, not a bare LF).
struct Stuffing {
    line_start: bool,
    after_cr: bool,
}

impl Stuffing {
    fn write(&mut self, body: &[u8], out: &mut Vec<u8>) {
        let mut i = 0;
        while i < body.len() {
            if self.line_start && body[i] == b'.' {
                out.push(b'.');
            }
            // A run of CRLF lines none of which starts with a dot is copied at once; the run
            // ends at a bare LF (a CR goes in), a line starting with a dot (stuffed), or the end.
            let run_start = i;
            let mut pos = i;
            let mut bare_lf = false;
            loop {
                match memchr(b'\n', &body[pos..]) {
                    Some(k) => {
                        let lf = pos + k;
                        pos = lf + 1;
                        let cr = match lf {
                            0 => self.after_cr,
                            _ => body[lf - 1] == b'\r',
                        };
                        if !cr {
                            bare_lf = true;
                            break;
                        }
                        if pos >= body.len() || body[pos] == b'.' {
                            break;
                        }
                    }
                    None => {
                        pos = body.len();
                        break;
                    }
                }
            }
            if bare_lf {
                // Everything up to the bare LF, then CRLF.
                out.extend_from_slice(&body[run_start..pos - 1]);
                out.extend_from_slice(b"\r\n");
                self.line_start = true;
                self.after_cr = false;
            } else {
                out.extend_from_slice(&body[run_start..pos]);
                self.line_start = body[pos - 1] == b'\n';
                self.after_cr = body[pos - 1] == b'\r';
            }
            i = pos;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BIG: usize = 1 << 20;

    /// Feeds `chunks` in order; returns (body, total consumed, done, verdict).
    fn read(chunks: &[&[u8]], size_max: usize, line_len_max: usize) -> (Vec<u8>, usize, bool) {
        let mut r = DataReader::new(size_max, line_len_max);
        let mut body = Vec::new();
        let mut consumed = 0;
        for c in chunks {
            if r.is_done() {
                break;
            }
            consumed += r.feed(c, &mut body);
        }
        (body, consumed, r.is_done())
    }

    #[test]
    fn empty_body() {
        assert_eq!(read(&[b".\r\n"], BIG, 1000), (vec![], 3, true));
        assert_eq!(read(&[b".", b"\r", b"\n"], BIG, 1000), (vec![], 3, true));
    }

    #[test]
    fn stops_at_the_marker_and_leaves_the_rest() {
        let input = b"a\r\n.\r\nQUIT\r\n";
        let (body, n, done) = read(&[input], BIG, 1000);
        assert!(done);
        assert_eq!(body, b"a\r\n");
        assert_eq!(&input[n..], b"QUIT\r\n");
    }

    #[test]
    fn terminator_split_at_every_boundary() {
        let input: &[u8] = b"Subject: x\r\n\r\n..leading\r\n..\r\n.x\r\nlast\r\n.\r\nNOOP\r\n";
        let want: &[u8] = b"Subject: x\r\n\r\n.leading\r\n.\r\nx\r\nlast\r\n";
        let end = input.len() - b"NOOP\r\n".len();
        for a in 0..=input.len() {
            for b in a..=input.len() {
                let (body, n, done) = read(&[&input[..a], &input[a..b], &input[b..]], BIG, 1000);
                assert!(done, "split {a} {b}");
                assert_eq!(body, want, "split {a} {b}");
                assert_eq!(n, end, "split {a} {b}");
            }
        }
    }

    #[test]
    fn byte_at_a_time() {
        let input: &[u8] = b"x\r\n..\r\n.\r.\r\n\r\n.\r\n";
        let mut r = DataReader::new(BIG, 1000);
        let mut body = Vec::new();
        for (i, b) in input.iter().enumerate() {
            assert!(!r.is_done(), "done early at {i}");
            assert_eq!(r.feed(std::slice::from_ref(b), &mut body), 1);
        }
        assert!(r.is_done());
        assert_eq!(body, b"x\r\n.\r\n\r.\r\n\r\n");
    }

    #[test]
    fn dot_unstuffing() {
        let (body, _, _) = read(&[b"..\r\n...x\r\n.y\r\n.\r\n"], BIG, 1000);
        assert_eq!(body, b".\r\n..x\r\ny\r\n");
    }

    #[test]
    fn bare_lf_does_not_end_the_message() {
        // Neither "\n.\n", "\n.\r\n" nor "\r\n.\n" is the marker: only CRLF "." CRLF is.
        let input: &[u8] = b"a\n.\nb\n.\r\nc\r\n.\nd\r\n.\r\n";
        let (body, n, done) = read(&[input], BIG, 1000);
        assert!(done);
        assert_eq!(n, input.len());
        // The dot after "\r\n" in "c\r\n.\nd" starts a CRLF line, so it is unstuffed.
        assert_eq!(body, b"a\n.\nb\n.\r\nc\r\n\nd\r\n");
    }

    #[test]
    fn size_limit_drains_to_the_end() {
        let mut r = DataReader::new(10, 1000);
        let mut body = Vec::new();
        let input = b"0123456789\r\nmore\r\n.\r\nRSET\r\n";
        let n = r.feed(input, &mut body);
        assert!(r.is_done());
        assert_eq!(&input[n..], b"RSET\r\n");
        assert_eq!(r.finish(), Err(DataError::TooBig { size_max: 10 }));
        assert!(body.len() <= 10);
        assert_eq!(r.size(), 18);
    }

    #[test]
    fn size_exactly_at_the_limit_is_fine() {
        let mut r = DataReader::new(5, 1000);
        let mut body = Vec::new();
        r.feed(b"abc\r\n.\r\n", &mut body);
        assert_eq!(r.finish(), Ok(()));
        assert_eq!(body, b"abc\r\n");
    }

    #[test]
    fn line_length_limit() {
        let ok = [vec![b'a'; 8], b"\r\n.\r\n".to_vec()].concat();
        let mut r = DataReader::new(BIG, 10);
        r.feed(&ok, &mut Vec::new());
        assert_eq!(r.finish(), Ok(()));

        let long = [vec![b'a'; 9], b"\r\n.\r\n".to_vec()].concat();
        for split in 0..long.len() {
            let mut r = DataReader::new(BIG, 10);
            let mut body = Vec::new();
            let n = r.feed(&long[..split], &mut body) + r.feed(&long[split..], &mut body);
            assert!(r.is_done());
            assert_eq!(n, long.len());
            assert_eq!(r.finish(), Err(DataError::LineTooLong { line_len_max: 10 }));
        }
    }

    #[test]
    fn stuffed_dot_counts_towards_line_length() {
        // ".aaaaaaaa\r\n" is 11 wire bytes even though the body line is 10.
        let mut r = DataReader::new(BIG, 10);
        r.feed(b"..aaaaaaa\r\n.\r\n", &mut Vec::new());
        assert_eq!(r.finish(), Err(DataError::LineTooLong { line_len_max: 10 }));
    }

    fn strict(input: &[u8], lf: bool, nul: bool) -> (Result<(), DataError>, usize, Vec<u8>) {
        let mut r = DataReader::new(BIG, 1000)
            .reject_bare_lf(lf)
            .reject_nul(nul);
        let mut body = Vec::new();
        let n = r.feed(input, &mut body);
        assert!(r.is_done());
        (r.finish(), n, body)
    }

    #[test]
    fn bare_lf_rejected_when_asked_after_draining() {
        for input in [
            &b"a\nb\r\n.\r\nNOOP\r\n"[..],
            b"a\r\n\n\r\n.\r\nNOOP\r\n",
            b".\nx\r\n.\r\nNOOP\r\n",
            b"a\r\n.\n\r\n.\r\nNOOP\r\n",
        ] {
            let (verdict, n, body) = strict(input, true, false);
            assert_eq!(verdict, Err(DataError::BareLf), "{input:?}");
            assert_eq!(&input[n..], b"NOOP\r\n", "{input:?}");
            // Nothing is stored once the message is refused.
            assert!(body.len() < n, "{input:?}");
            // The default keeps them.
            assert_eq!(strict(input, false, false).0, Ok(()), "{input:?}");
        }
        // A CRLF split across calls is not a bare LF.
        let mut r = DataReader::new(BIG, 1000).reject_bare_lf(true);
        let mut body = Vec::new();
        r.feed(b"a\r", &mut body);
        r.feed(b"\nb\r\n.\r\n", &mut body);
        assert_eq!(r.finish(), Ok(()));
        assert_eq!(body, b"a\r\nb\r\n");
    }

    #[test]
    fn bare_cr_rejected_when_asked_at_every_split() {
        for input in [
            &b"a\rb\r\n.\r\n"[..],
            b"a\r\r\n.\r\n",
            b".\rx\r\n.\r\n",
            b"ab\r\r\r\n.\r\n",
        ] {
            for split in 0..=input.len() {
                let mut r = DataReader::new(BIG, 1000).reject_bare_lf(true);
                let mut body = Vec::new();
                let n = r.feed(&input[..split], &mut body) + r.feed(&input[split..], &mut body);
                assert!(r.is_done(), "{input:?} {split}");
                assert_eq!(n, input.len());
                assert_eq!(r.finish(), Err(DataError::BareCr), "{input:?} {split}");
            }
            assert_eq!(strict(input, false, false).0, Ok(()), "{input:?}");
        }
        // Clean CRLF text split anywhere is fine.
        let clean = b"ab\r\n\r\n.x\r\n..\r\nc\r\n.\r\n";
        for split in 0..=clean.len() {
            let mut r = DataReader::new(BIG, 1000).reject_bare_lf(true);
            let mut body = Vec::new();
            r.feed(&clean[..split], &mut body);
            r.feed(&clean[split..], &mut body);
            assert_eq!(r.finish(), Ok(()), "{split}");
        }
    }

    #[test]
    fn nul_rejected_when_asked() {
        let input = b"a\0b\r\n.\r\n";
        assert_eq!(strict(input, false, true).0, Err(DataError::Nul));
        let (verdict, n, body) = strict(input, false, false);
        assert_eq!((verdict, n), (Ok(()), input.len()));
        assert_eq!(body, b"a\0b\r\n");
    }

    fn stuffed(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_stuffed(body, &mut out);
        out
    }

    #[test]
    fn stuffing() {
        assert_eq!(stuffed(b""), b".\r\n");
        assert_eq!(stuffed(b"a"), b"a\r\n.\r\n");
        assert_eq!(stuffed(b"a\r\n"), b"a\r\n.\r\n");
        assert_eq!(stuffed(b".\r\n"), b"..\r\n.\r\n");
        assert_eq!(stuffed(b"a\r\n.b\r\n..\r\n"), b"a\r\n..b\r\n...\r\n.\r\n");
        // Bare LF becomes CRLF, and a dot after it is stuffed.
        assert_eq!(stuffed(b"a\n.\nb"), b"a\r\n..\r\nb\r\n.\r\n");
    }

    #[test]
    fn stuffing_parts_is_stuffing_their_concatenation_wherever_they_split() {
        let bodies: [&[u8]; 6] = [
            b"Subject: t\r\n\r\n.\r\n..\r\n.x\r\n\r\n.\r\nend",
            b"a\n.\nb\r\n",
            b"x\r\n.\r.\r\n\n\n.",
            b"\n.\r\n",
            b".",
            b"",
        ];
        for body in bodies {
            let whole = stuffed(body);
            for cut in 0..=body.len() {
                for second in cut..=body.len() {
                    let parts = [&body[..cut], &body[cut..second], &body[second..]];
                    let mut out = Vec::new();
                    write_stuffed_parts(&parts, &mut out);
                    assert_eq!(out, whole, "{body:?} cut at {cut} and {second}");
                }
            }
        }
    }

    #[test]
    fn stuffing_then_reading_is_the_identity_on_crlf_bodies() {
        let bodies: [&[u8]; 5] = [
            b"",
            b"\r\n",
            b".\r\n",
            b"Subject: t\r\n\r\n.\r\n..\r\n.x\r\n\r\n.\r\nend\r\n",
            b"x\r\n.\r.\r\n",
        ];
        for body in bodies {
            let wire = stuffed(body);
            let mut r = DataReader::new(BIG, 1000);
            let mut got = Vec::new();
            assert_eq!(r.feed(&wire, &mut got), wire.len());
            assert!(r.is_done());
            assert_eq!(got, body, "{body:?}");
        }
    }
}
