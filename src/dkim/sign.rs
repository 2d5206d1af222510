//! The DKIM-Signature header: which fields it signs (RFC 6376 5.4), the data that is signed
//! (3.7), and the header text, folded at 76 columns (5.5 leaves the layout to the signer).
//!
//! The signed data ends with the DKIM-Signature header itself, canonicalised, with an empty
//! `b=` and without its final CRLF. The header is laid out once, `b=` last on a line of its
//! own, so the text up to `b=` is exactly what a verifier sees after it deletes the `b=`
//! value (and its folding) from the header it received.

use base64::Engine as _;

use super::canon::{self, Canon, Canonicalization, Field};
use super::key::Algorithm;

/// Header fields signed when a `[[dkim]]` table has no `headers`: the ones a receiver shows or
/// acts on, so a replay cannot change what the reader sees. Received, Return-Path and the
/// DKIM-Signature of others are left out: relays add to them.
pub const HEADERS_DEFAULT: &[&str] = &[
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Reply-To",
    "In-Reply-To",
    "References",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "Feedback-ID",
];

/// Columns of a folded DKIM-Signature line, CRLF not counted (RFC 5322 2.1.1 asks for 78 at
/// most; 76 leaves room for a verifier that counts the CRLF).
pub const LINE_LEN_MAX: usize = 76;

/// The `h=` list for a message with `fields`: each name of `names` once per instance present
/// (RFC 6376 5.4.2), and From once more than present ("oversigned", so a second From added on
/// the way breaks the signature). Names absent from the message are left out, except From.
/// Each name keeps its spelling from `names`; a name listed twice in `names` counts once.
pub fn h_list(names: &[String], fields: &[Field<'_>]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, name) in names.iter().enumerate() {
        if names[..i].iter().any(|n| n.eq_ignore_ascii_case(name)) {
            continue;
        }
        let present = fields
            .iter()
            .filter(|f| f.name.eq_ignore_ascii_case(name.as_bytes()))
            .count();
        let extra = usize::from(name.eq_ignore_ascii_case("from"));
        out.extend(std::iter::repeat_n(name.clone(), present + extra));
    }
    out
}

/// The header data to sign: the fields `h` names, each instance taken from the bottom up
/// (RFC 6376 5.4.2; a name listed more often than present selects nothing the extra times),
/// then `sig_header` (the DKIM-Signature text up to and including `b=`), all with `canon`.
pub fn header_data(canon: Canon, h: &[String], fields: &[Field<'_>], sig_header: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    // How many instances of each name (by index of its first mention in `h`) are used.
    let mut used: Vec<(usize, usize)> = Vec::new();
    for name in h {
        let first = h
            .iter()
            .position(|n| n.eq_ignore_ascii_case(name))
            .unwrap_or(0);
        let count = match used.iter_mut().find(|(k, _)| *k == first) {
            Some((_, c)) => c,
            None => {
                used.push((first, 0));
                let last = used.len() - 1;
                &mut used[last].1
            }
        };
        let instance = fields
            .iter()
            .rev()
            .filter(|f| f.name.eq_ignore_ascii_case(name.as_bytes()))
            .nth(*count);
        *count += 1;
        if let Some(f) = instance {
            canon::header(canon, f.raw, &mut out);
        }
    }
    match canon {
        Canon::Simple => out.extend_from_slice(sig_header.as_bytes()),
        Canon::Relaxed => canon::relaxed_header_line(sig_header.as_bytes(), &mut out),
    }
    out
}

/// What a signature says besides `bh=` and `b=`.
#[derive(Clone, Debug)]
pub struct Params<'a> {
    pub algorithm: Algorithm,
    pub canonicalization: Canonicalization,
    pub domain: &'a str,
    pub selector: &'a str,
    /// `t=`, seconds since the epoch.
    pub timestamp: u64,
    pub h: &'a [String],
}

/// Lays out a header, folding between tokens so no line passes `LINE_LEN_MAX`.
struct Folder {
    out: String,
    col: usize,
}

impl Folder {
    /// Appends `token`, after `sep` on the same line, or on a new line if it does not fit.
    fn push(&mut self, sep: &str, token: &str) {
        if self.col + sep.len() + token.len() > LINE_LEN_MAX && self.col > 1 {
            self.out.push_str("\r\n ");
            self.col = 1;
        } else {
            self.out.push_str(sep);
            self.col += sep.len();
        }
        self.out.push_str(token);
        self.col += token.len();
    }
}

/// The DKIM-Signature header up to and including `b=`, folded; `bh` is the body hash.
pub fn unsigned_header(p: &Params<'_>, bh: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut f = Folder {
        out: String::with_capacity(512),
        col: 0,
    };
    f.push("", "DKIM-Signature:");
    f.push(" ", "v=1;");
    f.push(" ", &format!("a={};", p.algorithm.tag()));
    f.push(" ", &format!("c={};", p.canonicalization.tag()));
    f.push(" ", &format!("d={};", p.domain));
    f.push(" ", &format!("s={};", p.selector));
    f.push(" ", &format!("t={};", p.timestamp));
    // h= folds after any colon (RFC 6376 3.5 allows FWS around them).
    for (i, name) in p.h.iter().enumerate() {
        let token = match (i == 0, i + 1 == p.h.len()) {
            (true, true) => format!("h={name};"),
            (true, false) => format!("h={name}:"),
            (false, true) => format!("{name};"),
            (false, false) => format!("{name}:"),
        };
        f.push(if i == 0 { " " } else { "" }, &token);
    }
    f.push(" ", &format!("bh={};", b64.encode(bh)));
    // b= starts a line of its own, so its value can fill whole lines.
    f.out.push_str("\r\n b=");
    f.out
}

/// The whole header: `unsigned` (from `unsigned_header`) with the signature as `b=`, wrapped at
/// `LINE_LEN_MAX`, and the final CRLF.
pub fn signed_header(unsigned: &str, signature: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(signature);
    let mut out = String::with_capacity(unsigned.len() + b64.len() + 64);
    out.push_str(unsigned);
    // " b=" opens the line: three columns used.
    let mut room = LINE_LEN_MAX - 3;
    let mut rest = b64.as_str();
    while !rest.is_empty() {
        let (line, tail) = rest.split_at(rest.len().min(room));
        out.push_str(line);
        rest = tail;
        if !rest.is_empty() {
            out.push_str("\r\n ");
            room = LINE_LEN_MAX - 1;
        }
    }
    out.push_str("\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn h_counts_instances_and_oversigns_from() {
        let section = b"Received: x\r\nTo: a\r\nFrom: f\r\nTo: b\r\nsubject: s\r\n";
        let f = canon::fields(section);
        let h = h_list(&names(&["From", "To", "Subject", "Cc", "to"]), &f);
        assert_eq!(h, names(&["From", "From", "To", "To", "Subject"]));
    }

    #[test]
    fn instances_are_taken_bottom_up() {
        let section = b"To: first\r\nFrom: f\r\nTo: second\r\n";
        let f = canon::fields(section);
        let h = names(&["To", "From", "From", "To", "To"]);
        let data = header_data(Canon::Simple, &h, &f, "DKIM-Signature: b=");
        assert_eq!(
            data,
            b"To: second\r\nFrom: f\r\nTo: first\r\nDKIM-Signature: b=".to_vec()
        );
        let data = header_data(Canon::Relaxed, &h, &f, "DKIM-Signature:  v=1;\r\n b=");
        assert_eq!(
            data,
            b"to:second\r\nfrom:f\r\nto:first\r\ndkim-signature:v=1; b=".to_vec()
        );
    }

    #[test]
    fn header_is_folded_and_b_wrapped() {
        let h = names(HEADERS_DEFAULT);
        let p = Params {
            algorithm: Algorithm::RsaSha256,
            canonicalization: Canonicalization::RELAXED,
            domain: "example.com",
            selector: "s2048",
            timestamp: 1_700_000_000,
            h: &h,
        };
        let unsigned = unsigned_header(&p, &[7u8; 32]);
        assert!(unsigned.starts_with(
            "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com;\r\n s=s2048;"
        ));
        assert!(unsigned.ends_with(";\r\n b="));
        let full = signed_header(&unsigned, &[0xa5u8; 256]);
        assert!(full.starts_with(&unsigned));
        assert!(full.ends_with("\r\n"));
        for line in full.split("\r\n") {
            assert!(line.len() <= LINE_LEN_MAX, "{line:?}");
        }
        // The b= value is the base64 of the signature, once its folding is gone.
        let b: String = full[unsigned.len()..]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        assert_eq!(
            b,
            base64::engine::general_purpose::STANDARD.encode([0xa5u8; 256])
        );
    }
}
