//! Rejections found in the replies a session sends: the reception adapter hands its output
//! buffer here before writing it, so the SMTP state machine stays as it is and every reply
//! it can send is counted, whatever path produced it.
//!
//! The buffer holds whole reply lines (`CODE SP text CRLF`, or `CODE-text CRLF` for all but
//! the last line of a multi-line reply). A rejection is a final line (`CODE SP`) whose code is
//! 4xx or 5xx; its enhanced code (RFC 3463) is read from the start of its text when there is
//! one. No allocation; one pass over the bytes.

use std::fmt;

/// A reply code and its enhanced code (`class.subject.detail`, class 0 when absent). Ordered
/// and small, so it keys counters without allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rejection {
    pub code: u16,
    pub enhanced: (u8, u16, u16),
}

impl Rejection {
    /// The code class alone (`550` → `500`, no enhanced code): where rare kinds are counted
    /// once the table is full.
    pub fn class(self) -> Rejection {
        Rejection {
            code: self.code / 100 * 100,
            enhanced: (0, 0, 0),
        }
    }

    /// The enhanced code as written (`5.1.1`), empty when the reply had none.
    pub fn enhanced_text(&self) -> String {
        match self.enhanced {
            (0, _, _) => String::new(),
            (c, s, d) => format!("{c}.{s}.{d}"),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.enhanced_text())
    }
}

/// Call `found` for every rejection (final 4xx or 5xx line) in `out`.
pub fn rejections(out: &[u8], mut found: impl FnMut(Rejection)) {
    for line in out.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let [d0 @ (b'4' | b'5'), d1 @ b'0'..=b'9', d2 @ b'0'..=b'9', b' ', rest @ ..] = line else {
            continue;
        };
        let code = u16::from(d0 - b'0') * 100 + u16::from(d1 - b'0') * 10 + u16::from(d2 - b'0');
        found(Rejection {
            code,
            enhanced: enhanced(rest)
                .filter(|e| e.0 == d0 - b'0')
                .unwrap_or((0, 0, 0)),
        });
    }
}

/// An enhanced status code at the start of `text` (`5.1.1 ...`): class one digit, subject and
/// detail one to three digits each (RFC 3463), then a space or the end.
fn enhanced(text: &[u8]) -> Option<(u8, u16, u16)> {
    let end = text.iter().position(|&b| b == b' ').unwrap_or(text.len());
    let mut parts = text[..end].split(|&b| b == b'.');
    let mut num = |max_len: usize| -> Option<u16> {
        let p = parts.next()?;
        if p.is_empty() || p.len() > max_len || !p.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(p.iter().fold(0u16, |n, &b| n * 10 + u16::from(b - b'0')))
    };
    let class = num(1)? as u8;
    let (subject, detail) = (num(3)?, num(3)?);
    parts.next().is_none().then_some((class, subject, detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(out: &[u8]) -> Vec<String> {
        let mut v = Vec::new();
        rejections(out, |r| v.push(r.to_string()));
        v
    }

    #[test]
    fn finds_final_rejection_lines_with_their_enhanced_codes() {
        let out = b"250 2.1.0 Ok\r\n550 5.1.1 No such user\r\n452 4.5.3 Too many recipients\r\n\
                    421 example.org closing\r\n554-5.7.1 first\r\n554 5.7.1 last\r\n";
        assert_eq!(
            all(out),
            vec!["550 5.1.1", "452 4.5.3", "421 ", "554 5.7.1"],
            "one per reply, continuation lines skipped"
        );
    }

    #[test]
    fn positive_and_malformed_lines_are_not_rejections() {
        assert!(all(b"220 hi\r\n354 go\r\n250-PIPELINING\r\n250 OK\r\n").is_empty());
        assert!(all(b"55 short\r\n5500 long\r\n").is_empty());
        // A mismatched class or a bad enhanced code: the code still counts, without it.
        assert_eq!(
            all(b"550 4.1.1 odd\r\n550 5.1 two\r\n"),
            vec!["550 ", "550 "]
        );
        assert_eq!(all(b"451 4.3.0"), vec!["451 4.3.0"], "no line end");
    }

    #[test]
    fn class_folds_rare_kinds() {
        let r = Rejection {
            code: 553,
            enhanced: (5, 1, 3),
        };
        assert_eq!(r.class().to_string(), "500 ");
    }
}
