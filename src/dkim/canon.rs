//! Canonicalisation (RFC 6376 3.4): header fields "simple" and "relaxed", and the body as a
//! streaming canonicaliser fed chunks of any size.
//!
//! Only CRLF ends a line, as in the DATA reader (`smtp::data`): a bare CR or LF is an ordinary
//! byte. The body canonicaliser keeps a few counters between chunks and never buffers body
//! bytes: empty lines are held back as a count (they are dropped if nothing but empty lines
//! follows them, RFC 6376 3.4.3 and 3.4.4), so a body of a million blank lines costs a
//! counter, not a megabyte.

use memchr::{memchr, memchr2};

/// One canonicalisation algorithm, for the header or the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Canon {
    Simple,
    Relaxed,
}

impl Canon {
    pub fn name(self) -> &'static str {
        match self {
            Canon::Simple => "simple",
            Canon::Relaxed => "relaxed",
        }
    }
}

/// The `c=` pair: header canonicalisation, then body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Canonicalization {
    pub header: Canon,
    pub body: Canon,
}

impl Canonicalization {
    pub const RELAXED: Canonicalization = Canonicalization {
        header: Canon::Relaxed,
        body: Canon::Relaxed,
    };

    /// `"relaxed/relaxed"`, `"simple/simple"`, `"relaxed/simple"` or `"simple/relaxed"`. A
    /// single word means that header algorithm and a simple body, as RFC 6376 3.5 reads `c=`.
    pub fn parse(text: &str) -> Option<Canonicalization> {
        let word = |w: &str| match w.trim().to_ascii_lowercase().as_str() {
            "simple" => Some(Canon::Simple),
            "relaxed" => Some(Canon::Relaxed),
            _ => None,
        };
        let (h, b) = match text.split_once('/') {
            Some((h, b)) => (word(h)?, word(b)?),
            None => (word(text)?, Canon::Simple),
        };
        Some(Canonicalization { header: h, body: b })
    }

    /// The `c=` tag value.
    pub fn tag(self) -> String {
        format!("{}/{}", self.header.name(), self.body.name())
    }
}

/// One header field as received: its name and the whole field (name, colon, value and every
/// continuation line, with the final CRLF).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field<'a> {
    pub name: &'a [u8],
    pub raw: &'a [u8],
}

/// Splits a header section (the bytes before the empty line) into fields, top to bottom. A
/// line that starts with SP or HTAB continues the field above it. A line without a colon is
/// kept as a field with an empty name, which no header list selects.
pub fn fields(section: &[u8]) -> Vec<Field<'_>> {
    let mut out: Vec<Field<'_>> = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    while pos < section.len() {
        // The end of this line, CRLF included (or the end of the section).
        let mut end = section.len();
        let mut search = pos;
        while let Some(k) = memchr(b'\n', &section[search..]) {
            let lf = search + k;
            if lf > 0 && section[lf - 1] == b'\r' {
                end = lf + 1;
                break;
            }
            search = lf + 1;
        }
        let continues = matches!(section.get(end), Some(b' ' | b'\t'));
        if !continues {
            let raw = &section[start..end];
            let name = match memchr(b':', raw) {
                Some(colon) => trim_wsp_end(&raw[..colon]),
                None => &raw[..0],
            };
            out.push(Field { name, raw });
            start = end;
        }
        pos = end;
    }
    out
}

fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_wsp_end(mut s: &[u8]) -> &[u8] {
    while let [rest @ .., last] = s {
        if !is_wsp(*last) {
            break;
        }
        s = rest;
    }
    s
}

/// Appends field `raw` canonicalised with `canon`, ending in CRLF (RFC 6376 3.4.1, 3.4.2).
/// A field without a final CRLF (the last of a section cut short) gets one, as it would have
/// had in a complete message.
pub fn header(canon: Canon, raw: &[u8], out: &mut Vec<u8>) {
    match canon {
        Canon::Simple => {
            out.extend_from_slice(raw);
            if !raw.ends_with(b"\r\n") {
                out.extend_from_slice(b"\r\n");
            }
        }
        Canon::Relaxed => {
            relaxed_header_line(raw, out);
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// Relaxed header canonicalisation without the final CRLF: lower-case name, unfolded value,
/// WSP runs as one SP, no WSP at the ends of the value or around the colon.
pub fn relaxed_header_line(raw: &[u8], out: &mut Vec<u8>) {
    let raw = raw.strip_suffix(b"\r\n").unwrap_or(raw);
    let (name, value) = match memchr(b':', raw) {
        Some(colon) => (&raw[..colon], &raw[colon + 1..]),
        None => (raw, &raw[..0]),
    };
    out.extend(trim_wsp_end(name).iter().map(u8::to_ascii_lowercase));
    out.push(b':');
    let mut wsp = false;
    let mut started = false;
    let mut i = 0;
    while i < value.len() {
        let b = value[i];
        if b == b'\r' && value.get(i + 1) == Some(&b'\n') {
            // Unfolding: the CRLF of a continuation line goes; its WSP follows.
            i += 2;
            continue;
        }
        if is_wsp(b) {
            wsp = true;
        } else {
            if wsp && started {
                out.push(b' ');
            }
            wsp = false;
            started = true;
            out.push(b);
        }
        i += 1;
    }
}

/// Where the next byte that needs care is in `data`: a CR, and for relaxed a WSP that is not a
/// lone SP between two content bytes. Lone spaces (most of them, in text) stay inside the span
/// so text goes to the hash in long slices rather than word by word.
fn next_special(relaxed: bool, data: &[u8]) -> Option<usize> {
    if !relaxed {
        return memchr(b'\r', data);
    }
    // Up to the next CR or HTAB (once a line, in text), the only spaces that need care are a
    // space at the start (the one before it may have been WSP), the first of two or more, and
    // one just before that CR or HTAB (or the end of the chunk). Two SIMD scans a line rather
    // than one per word: relaxed hashing of text runs at about the speed of SHA-256 itself.
    let end = memchr2(b'\r', b'\t', data).unwrap_or(data.len());
    let line = &data[..end];
    let first = (line.first() == Some(&b' ')).then_some(0);
    let double = DOUBLE_SPACE.find(line);
    let last = (line.last() == Some(&b' ')).then(|| end - 1);
    [first, double, last]
        .into_iter()
        .flatten()
        .min()
        .or((end < data.len()).then_some(end))
}

/// Two spaces: where relaxed canonicalisation rewrites a run of WSP.
static DOUBLE_SPACE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"  "));

/// Sixty-four bytes of CRLFs, to emit held-back empty lines in few calls.
const CRLFS: &[u8; 64] = b"\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n";

/// Streaming body canonicaliser: `feed` it the body in chunks of any size and it hands the
/// canonical bytes to `emit`, in order; `finish` emits the end.
///
/// Hot path: no I/O, no allocation; spans between special bytes (CR, and SP/HTAB for relaxed)
/// go to `emit` as slices of the input.
#[derive(Clone, Debug)]
pub struct BodyCanon {
    canon: Canon,
    /// Line ends seen after the last content byte, not yet emitted.
    crlfs: u64,
    /// The last byte fed was a CR whose LF may come in the next chunk.
    cr: bool,
    /// Relaxed: WSP seen after the last content byte on this line, not yet emitted.
    wsp: bool,
    /// Some content byte was emitted.
    any: bool,
}

impl BodyCanon {
    pub fn new(canon: Canon) -> BodyCanon {
        BodyCanon {
            canon,
            crlfs: 0,
            cr: false,
            wsp: false,
            any: false,
        }
    }

    /// Content follows: the held-back line ends and WSP are not trailing after all.
    fn content(&mut self, span: &[u8], emit: &mut impl FnMut(&[u8])) {
        while self.crlfs > 0 {
            let n = self.crlfs.min(32);
            // n <= 32, so 2n <= 64: in bounds.
            emit(&CRLFS[..(2 * n) as usize]);
            self.crlfs -= n;
        }
        if self.wsp {
            emit(b" ");
            self.wsp = false;
        }
        emit(span);
        self.any = true;
    }

    pub fn feed(&mut self, mut data: &[u8], emit: &mut impl FnMut(&[u8])) {
        let relaxed = self.canon == Canon::Relaxed;
        while !data.is_empty() {
            if self.cr {
                self.cr = false;
                if data[0] == b'\n' {
                    // A line end: WSP before it is trailing (relaxed drops it).
                    self.wsp = false;
                    self.crlfs += 1;
                    data = &data[1..];
                } else {
                    self.content(b"\r", emit);
                }
                continue;
            }
            let Some(i) = next_special(relaxed, data) else {
                self.content(data, emit);
                return;
            };
            if i > 0 {
                self.content(&data[..i], emit);
            }
            if data[i] == b'\r' {
                self.cr = true;
            } else {
                self.wsp = true;
            }
            data = &data[i + 1..];
        }
    }

    /// The end of the body: a trailing CR is content, trailing WSP and empty lines go, and the
    /// last line gets its CRLF. A simple body that is empty becomes CRLF; a relaxed one stays
    /// empty (RFC 6376 3.4.3, 3.4.4 and erratum 1384).
    pub fn finish(mut self, emit: &mut impl FnMut(&[u8])) {
        if self.cr {
            self.cr = false;
            self.content(b"\r", emit);
        }
        if self.canon == Canon::Simple || self.any {
            emit(b"\r\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(canon: Canon, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut c = BodyCanon::new(canon);
        for chunk in chunks {
            c.feed(chunk, &mut |s| out.extend_from_slice(s));
        }
        c.finish(&mut |s| out.extend_from_slice(s));
        out
    }

    /// Every split of `input` into two chunks, and byte by byte, gives the same result.
    fn body_all_splits(canon: Canon, input: &[u8]) -> Vec<u8> {
        let whole = body(canon, &[input]);
        for k in 0..=input.len() {
            assert_eq!(body(canon, &[&input[..k], &input[k..]]), whole, "split {k}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(body(canon, &bytes), whole, "byte by byte");
        whole
    }

    #[test]
    fn simple_body() {
        let s = |b: &[u8]| body_all_splits(Canon::Simple, b);
        assert_eq!(s(b""), b"\r\n");
        assert_eq!(s(b"\r\n"), b"\r\n");
        assert_eq!(s(b"\r\n\r\n\r\n"), b"\r\n");
        assert_eq!(s(b"abc"), b"abc\r\n");
        assert_eq!(s(b"abc\r\n"), b"abc\r\n");
        assert_eq!(s(b"abc\r\n\r\n\r\n"), b"abc\r\n");
        assert_eq!(s(b"a \t b  \r\n\r\nc\r\n\r\n"), b"a \t b  \r\n\r\nc\r\n");
        assert_eq!(s(b"abc\r"), b"abc\r\r\n");
        assert_eq!(s(b"abc\r\r\n"), b"abc\r\r\n");
        assert_eq!(s(b"a\nb\r\n\n"), b"a\nb\r\n\n\r\n");
        assert_eq!(s(b"  \r\n"), b"  \r\n");
    }

    #[test]
    fn relaxed_body() {
        let r = |b: &[u8]| body_all_splits(Canon::Relaxed, b);
        assert_eq!(r(b""), b"");
        assert_eq!(r(b"\r\n"), b"");
        assert_eq!(r(b"\r\n\r\n  \r\n\t\r\n"), b"");
        assert_eq!(r(b"abc"), b"abc\r\n");
        assert_eq!(r(b"abc \t "), b"abc\r\n");
        assert_eq!(r(b"a \t b  \r\n\r\nc\r\n \r\n\r\n"), b"a b\r\n\r\nc\r\n");
        assert_eq!(r(b"  lead\r\n"), b" lead\r\n");
        assert_eq!(r(b"abc \r"), b"abc \r\r\n");
        assert_eq!(r(b"x \r y\r\n"), b"x \r y\r\n");
        assert_eq!(
            r(b"8bit \xc3\xa9t\xc3\xa9  \r\n"),
            b"8bit \xc3\xa9t\xc3\xa9\r\n"
        );
    }

    /// RFC 6376 3.4.5, the example: " C \r\nD \t E\r\n\r\n\r\n".
    #[test]
    fn rfc6376_example_body() {
        let input = b" C \r\nD \t E\r\n\r\n\r\n";
        assert_eq!(body_all_splits(Canon::Relaxed, input), b" C\r\nD E\r\n");
        assert_eq!(body_all_splits(Canon::Simple, input), b" C \r\nD \t E\r\n");
    }

    /// RFC 6376 3.4.5, the example headers.
    #[test]
    fn rfc6376_example_headers() {
        let section = b"A: X\r\nB : Y\t\r\n\tZ  \r\n";
        let f = fields(section);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].name, b"A");
        assert_eq!(f[1].name, b"B");
        assert_eq!(f[1].raw, b"B : Y\t\r\n\tZ  \r\n");
        let mut out = Vec::new();
        for field in &f {
            header(Canon::Relaxed, field.raw, &mut out);
        }
        assert_eq!(out, b"a:X\r\nb:Y Z\r\n");
        out.clear();
        for field in &f {
            header(Canon::Simple, field.raw, &mut out);
        }
        assert_eq!(out, section);
    }

    #[test]
    fn fields_keep_bare_lf_inside_and_odd_lines() {
        let f = fields(b"Subject: a\nb\r\nnocolon\r\nTo: x\r\n");
        let names: Vec<&[u8]> = f.iter().map(|f| f.name).collect();
        assert_eq!(names, [&b"Subject"[..], b"", b"To"]);
        assert_eq!(f[0].raw, b"Subject: a\nb\r\n");
        let mut out = Vec::new();
        header(
            Canon::Relaxed,
            b"SUBJECT :  \r\n  two  words \r\n",
            &mut out,
        );
        assert_eq!(out, b"subject:two words\r\n");
        out.clear();
        header(Canon::Relaxed, b"X-Empty:\r\n", &mut out);
        assert_eq!(out, b"x-empty:\r\n");
        out.clear();
        header(Canon::Simple, b"X: cut", &mut out);
        assert_eq!(out, b"X: cut\r\n");
    }

    #[test]
    fn canonicalization_names() {
        let p = Canonicalization::parse;
        assert_eq!(p("relaxed/relaxed"), Some(Canonicalization::RELAXED));
        assert_eq!(
            p("simple/relaxed").map(|c| c.tag()).as_deref(),
            Some("simple/relaxed")
        );
        assert_eq!(p("relaxed").map(|c| c.body), Some(Canon::Simple));
        assert_eq!(p("relaxed/fancy"), None);
        assert_eq!(p(""), None);
    }

    #[test]
    fn many_blank_lines_cost_a_counter() {
        let mut input = b"x\r\n".to_vec();
        input.extend(std::iter::repeat_n(*b"\r\n", 1000).flatten());
        input.extend_from_slice(b"y");
        let out = body(Canon::Simple, &[&input]);
        assert_eq!(out.len(), input.len() + 2);
    }
}
