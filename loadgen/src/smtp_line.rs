//! SMTP framing shared by the injector and the sink: command lines, replies and the end of DATA.
//!
//! Nothing here touches a socket or a clock. `ReplyReader` wraps any `Read`, so tests feed it
//! byte slices cut at awkward places; `DataScanner` keeps its own state between reads, so a
//! message never has to be buffered whole.
//!
//! Invariants: a reply line is never longer than `REPLY_LINE_LEN_MAX`; every line of a
//! multi-line reply carries the same code; `DataScanner` finds CRLF "." CRLF wherever the read
//! boundaries fall, and reports exactly the bytes up to and including it as consumed.

use std::io::{self, Read};

use memchr::memchr;

/// RFC 5321 4.5.3.1.5 caps a reply line at 512 octets; servers overstep it in EHLO keyword
/// lists and long texts, so allow four times that before calling the peer broken.
pub const REPLY_LINE_LEN_MAX: usize = 2048;

/// A multi-line reply longer than this is a runaway peer: real EHLO replies list about twenty
/// extensions.
pub const REPLY_LINES_MAX: usize = 128;

/// Read buffer of a `ReplyReader`. It holds at least one whole line of the longest length we
/// accept, plus its CRLF, so a line is never split by the buffer itself.
const REPLY_BUF_LEN: usize = 8192;
const _: () = assert!(REPLY_BUF_LEN >= REPLY_LINE_LEN_MAX + 2);

/// RFC 5322 2.1.1 limits a header line to 998 characters. Longer header lines are cut to this
/// length when they are captured; the data scan itself is unaffected.
pub const HEADER_LINE_LEN_MAX: usize = 998;

/// Why a reply could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("connection closed by peer")]
    Closed,
    #[error("malformed reply line {0:?}")]
    Malformed(String),
    #[error("reply line longer than {REPLY_LINE_LEN_MAX} bytes")]
    LineTooLong,
    #[error("multi-line reply longer than {REPLY_LINES_MAX} lines")]
    TooManyLines,
    #[error("multi-line reply mixes codes {0} and {1}")]
    MixedCodes(u16, u16),
}

/// One complete (possibly multi-line) reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// The text of every line, without codes, joined by '\n'.
    pub text: String,
}

impl Reply {
    /// The first digit: 2 success, 3 intermediate, 4 transient failure, 5 permanent failure.
    pub fn class(&self) -> u16 {
        self.code / 100
    }

    /// Whether an EHLO reply advertises `keyword` (RFC 5321 4.1.1.1: one keyword per line after
    /// the first, parameters after a space).
    pub fn has_extension(&self, keyword: &str) -> bool {
        self.text.lines().skip(1).any(|line| {
            line.split_ascii_whitespace()
                .next()
                .is_some_and(|k| k.eq_ignore_ascii_case(keyword))
        })
    }
}

/// Parses one reply line given without its line ending. Returns the code, whether it is the
/// last line of the reply, and the text.
pub fn parse_reply_line(line: &[u8]) -> Result<(u16, bool, &[u8]), ReplyError> {
    let malformed = || ReplyError::Malformed(String::from_utf8_lossy(line).into_owned());
    let digits = line.get(..3).ok_or_else(malformed)?;
    if !digits.iter().all(u8::is_ascii_digit) || !(b'2'..=b'5').contains(&digits[0]) {
        return Err(malformed());
    }
    let code = digits
        .iter()
        .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    match line.get(3) {
        None => Ok((code, true, b"")),
        Some(b' ') => Ok((code, true, &line[4..])),
        Some(b'-') => Ok((code, false, &line[4..])),
        Some(_) => Err(malformed()),
    }
}

/// Splits the first complete line off `buf`. Returns the line without its line ending and the
/// number of bytes it took, ending included. A bare LF ends a line too, since being lenient
/// here costs nothing and some test clients send it.
pub fn split_line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let lf = memchr(b'\n', buf)?;
    let line = &buf[..lf];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    Some((line, lf + 1))
}

/// Reads whole replies from a byte stream, buffering what arrives after them.
pub struct ReplyReader<R> {
    inner: R,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl<R: Read> ReplyReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: vec![0; REPLY_BUF_LEN].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// The underlying stream, for writing commands.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Reads the next complete reply, however many reads that takes.
    pub fn read_reply(&mut self) -> Result<Reply, ReplyError> {
        let mut text = String::new();
        let mut first_code = None;
        for _ in 0..REPLY_LINES_MAX {
            let (start, len) = self.next_line()?;
            let line = &self.buf[start..start + len];
            let (code, last, line_text) = parse_reply_line(line)?;
            match first_code {
                None => first_code = Some(code),
                Some(first) if first != code => return Err(ReplyError::MixedCodes(first, code)),
                Some(_) => text.push('\n'),
            }
            text.push_str(&String::from_utf8_lossy(line_text));
            if last {
                return Ok(Reply { code, text });
            }
        }
        Err(ReplyError::TooManyLines)
    }

    /// Returns the position and length (without line ending) of the next line in `buf`.
    fn next_line(&mut self) -> Result<(usize, usize), ReplyError> {
        loop {
            if let Some((line, taken)) = split_line(&self.buf[self.start..self.end]) {
                let at = self.start;
                let len = line.len();
                self.start += taken;
                if len > REPLY_LINE_LEN_MAX {
                    return Err(ReplyError::LineTooLong);
                }
                return Ok((at, len));
            }
            if self.end - self.start > REPLY_LINE_LEN_MAX {
                return Err(ReplyError::LineTooLong);
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(0) => return Err(ReplyError::Closed),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReplyError::Io(e)),
            }
        }
    }
}

/// Where the scan stands relative to the CRLF "." CRLF that ends DATA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScanState {
    /// Just after a line ending (or at the very start of the data).
    LineStart,
    /// Inside a line.
    Mid,
    /// Saw "." at the start of a line.
    Dot,
    /// Saw "." CR at the start of a line.
    DotCr,
}

/// Result of feeding bytes to a `DataScanner`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// All bytes were consumed and the end of data has not been seen yet.
    More,
    /// The data ended; this many bytes of the input were consumed, terminator included.
    End { consumed: usize },
}

/// Finds the end of a DATA section in a stream that arrives in pieces, and on the way captures
/// one header's value from the header block so the sink never buffers a message.
pub struct DataScanner {
    header_name: &'static [u8],
    state: ScanState,
    in_headers: bool,
    line: Vec<u8>,
    header_value: Option<String>,
    len: usize,
}

impl DataScanner {
    /// A scanner that captures the first header named `header_name` (case-insensitive).
    pub fn new(header_name: &'static str) -> Self {
        Self {
            header_name: header_name.as_bytes(),
            state: ScanState::LineStart,
            in_headers: true,
            line: Vec::with_capacity(128),
            header_value: None,
            len: 0,
        }
    }

    /// Makes the scanner ready for the next message.
    pub fn reset(&mut self) {
        self.state = ScanState::LineStart;
        self.in_headers = true;
        self.line.clear();
        self.header_value = None;
        self.len = 0;
    }

    /// The captured header value, if the header block had one.
    pub fn take_header_value(&mut self) -> Option<String> {
        self.header_value.take()
    }

    /// Bytes of data seen so far, as sent (dot-stuffed), terminator included once it is found.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Scans the next piece of data. Hot path: no allocation once the header block is past.
    pub fn feed(&mut self, buf: &[u8]) -> Scan {
        let mut pos = 0;
        while pos < buf.len() {
            match self.state {
                ScanState::LineStart => {
                    if buf[pos] == b'.' {
                        self.state = ScanState::Dot;
                        pos += 1;
                    } else {
                        self.state = ScanState::Mid;
                    }
                }
                ScanState::Dot => {
                    if buf[pos] == b'\r' {
                        self.state = ScanState::DotCr;
                        pos += 1;
                    } else {
                        // A stuffed or dotted line. Its leading dot is not kept for header
                        // matching: no header name starts with one.
                        self.state = ScanState::Mid;
                    }
                }
                ScanState::DotCr => {
                    if buf[pos] == b'\n' {
                        pos += 1;
                        self.len += pos;
                        return Scan::End { consumed: pos };
                    }
                    self.state = ScanState::Mid;
                }
                ScanState::Mid => match memchr(b'\n', &buf[pos..]) {
                    Some(i) => {
                        if self.in_headers {
                            self.push_header_bytes(&buf[pos..pos + i]);
                            self.end_header_line();
                        }
                        pos += i + 1;
                        self.state = ScanState::LineStart;
                    }
                    None => {
                        if self.in_headers {
                            self.push_header_bytes(&buf[pos..]);
                        }
                        pos = buf.len();
                    }
                },
            }
        }
        self.len += buf.len();
        Scan::More
    }

    fn push_header_bytes(&mut self, bytes: &[u8]) {
        let room = HEADER_LINE_LEN_MAX.saturating_sub(self.line.len());
        self.line.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn end_header_line(&mut self) {
        let line = self.line.strip_suffix(b"\r").unwrap_or(&self.line);
        if line.is_empty() {
            self.in_headers = false;
        } else if self.header_value.is_none() {
            let name_len = self.header_name.len();
            if line.len() > name_len
                && line[..name_len].eq_ignore_ascii_case(self.header_name)
                && line[name_len] == b':'
            {
                let value = String::from_utf8_lossy(&line[name_len + 1..]);
                self.header_value = Some(value.trim().to_owned());
            }
        }
        self.line.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out its bytes in fixed-size pieces, to cut lines anywhere.
    struct Chunked {
        data: Vec<u8>,
        pos: usize,
        piece: usize,
    }

    impl Read for Chunked {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.piece.min(out.len()).min(self.data.len() - self.pos);
            out[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    fn reader(data: &[u8], piece: usize) -> ReplyReader<Chunked> {
        ReplyReader::new(Chunked {
            data: data.to_vec(),
            pos: 0,
            piece,
        })
    }

    #[test]
    fn parses_reply_lines() {
        assert_eq!(
            parse_reply_line(b"250 2.0.0 Ok").unwrap(),
            (250, true, &b"2.0.0 Ok"[..])
        );
        assert_eq!(
            parse_reply_line(b"250-PIPELINING").unwrap(),
            (250, false, &b"PIPELINING"[..])
        );
        assert_eq!(parse_reply_line(b"354").unwrap(), (354, true, &b""[..]));
        for bad in [
            &b"25"[..],
            b"abc ok",
            b"250x",
            b"150 nope",
            b"650 nope",
            b"",
        ] {
            assert!(parse_reply_line(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reads_multi_line_replies_in_any_pieces() {
        let wire = b"220 sink ESMTP\r\n250-sink.test\r\n250-PIPELINING\r\n250-SIZE 100\r\n250 ENHANCEDSTATUSCODES\r\n451 4.3.0 Try again later\r\n";
        for piece in 1..wire.len() {
            let mut r = reader(wire, piece);
            let greeting = r.read_reply().unwrap();
            assert_eq!(greeting.code, 220);
            let ehlo = r.read_reply().unwrap();
            assert_eq!(ehlo.code, 250);
            assert!(ehlo.has_extension("pipelining"));
            assert!(ehlo.has_extension("SIZE"));
            assert!(
                !ehlo.has_extension("sink.test"),
                "the first line is not a keyword"
            );
            let tempfail = r.read_reply().unwrap();
            assert_eq!((tempfail.code, tempfail.class()), (451, 4));
            assert_eq!(tempfail.text, "4.3.0 Try again later");
            assert!(matches!(r.read_reply(), Err(ReplyError::Closed)));
        }
    }

    #[test]
    fn rejects_broken_replies() {
        assert!(matches!(
            reader(b"250-a\r\n251 b\r\n", 64).read_reply(),
            Err(ReplyError::MixedCodes(250, 251))
        ));
        let long = [b"250 ".to_vec(), vec![b'x'; REPLY_LINE_LEN_MAX + 10]].concat();
        assert!(matches!(
            reader(&long, 4096).read_reply(),
            Err(ReplyError::LineTooLong)
        ));
        assert!(matches!(
            reader(b"250 ok", 64).read_reply(),
            Err(ReplyError::Closed)
        ));
    }

    #[test]
    fn splits_lines() {
        assert_eq!(split_line(b"NOOP\r\nQUIT"), Some((&b"NOOP"[..], 6)));
        assert_eq!(split_line(b"NOOP\nQUIT"), Some((&b"NOOP"[..], 5)));
        assert_eq!(split_line(b"NOOP\r"), None);
    }

    const MESSAGE: &[u8] = b"From: <a@b.test>\r\nx-loadgen-id:  abc-123 \r\nSubject: hi\r\n\r\nbody\r\n..stuffed\r\n.\r\n";

    #[test]
    fn finds_data_end_across_every_split() {
        let tail = b"MAIL FROM:<x@y>\r\n";
        let wire = [MESSAGE, tail].concat();
        for cut in 0..=wire.len() {
            let mut scanner = DataScanner::new("X-Loadgen-Id");
            let (a, b) = wire.split_at(cut);
            let end = match scanner.feed(a) {
                Scan::End { consumed } => consumed,
                Scan::More => match scanner.feed(b) {
                    Scan::End { consumed } => a.len() + consumed,
                    Scan::More => panic!("end not found with cut at {cut}"),
                },
            };
            assert_eq!(end, MESSAGE.len(), "cut at {cut}");
            assert_eq!(scanner.len(), MESSAGE.len());
            assert_eq!(scanner.take_header_value().as_deref(), Some("abc-123"));
        }
    }

    #[test]
    fn finds_data_end_byte_by_byte() {
        let mut scanner = DataScanner::new("X-Loadgen-Id");
        let mut end = None;
        for (i, byte) in MESSAGE.iter().enumerate() {
            if let Scan::End { consumed } = scanner.feed(std::slice::from_ref(byte)) {
                assert_eq!(consumed, 1);
                end = Some(i + 1);
                break;
            }
        }
        assert_eq!(end, Some(MESSAGE.len()));
        assert_eq!(scanner.take_header_value().as_deref(), Some("abc-123"));
    }

    #[test]
    fn data_end_edge_cases() {
        // An empty message ends at once, since DATA's own CRLF starts the first line.
        let mut s = DataScanner::new("X-Loadgen-Id");
        assert_eq!(s.feed(b".\r\nQUIT\r\n"), Scan::End { consumed: 3 });
        assert_eq!(s.take_header_value(), None);

        // Dots that are not alone on their line, and a dot mid-line, do not end the data.
        s.reset();
        assert_eq!(s.feed(b"a\r\n.x\r\n..\r\nb.\r\n.\rx\r\n"), Scan::More);
        assert_eq!(s.feed(b".\r\n"), Scan::End { consumed: 3 });

        // A header after the blank line is body text, not a header.
        s.reset();
        assert_eq!(
            s.feed(b"Subject: x\r\n\r\nX-Loadgen-Id: body\r\n.\r\n"),
            Scan::End { consumed: 37 }
        );
        assert_eq!(s.take_header_value(), None);
    }
}
