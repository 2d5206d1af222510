//! DKIM signing (RFC 6376, with Ed25519 from RFC 8463), as I/O-free pieces the reception
//! adapter drives.
//!
//! - `canon`: header and body canonicalisation; the body one streams.
//! - `sign`: the header list, the signed data, the folded DKIM-Signature header.
//! - `key`: PKCS#8 keys (ring), the algorithm following the key.
//! - `keygen`: new keys and the DNS records that publish them.
//!
//! How a message is signed ([`MessageSigner`]): while DATA streams in, the signer is shown the
//! body buffer as it grows. Once the header section is complete it reads From (and the
//! tenant), picks the matching [`Signer`]s, and from then on hashes each new body byte once,
//! per body canonicalisation in use (at most two). When the message is complete, `finish`
//! builds the header data of each signature; signing it is the adapter's job, off the shard's
//! executor for RSA. A message no signer matches costs one scan of its header section.
//!
//! Which signers match (documented for operators in README.md): a `[[dkim]]` table signs when
//! its `domain` equals the domain of the (first) From address, ASCII case-insensitively and
//! without subdomain matching, or when it has `always = true` (an ESP's own signature on
//! every message); and, when it names a `tenant`, only messages of that tenant (the value of
//! `egress.tenant_header`). Every matching table adds its signature.

pub mod canon;
pub mod key;
pub mod keygen;
pub mod sign;

use std::sync::Arc;

use memchr::memmem;

pub use canon::{Canon, Canonicalization};
pub use key::{Algorithm, KeyError, SigningKey};

/// One configured signature: a `[[dkim]]` table with its key loaded.
#[derive(Debug)]
pub struct Signer {
    /// `d=`, lower case.
    pub domain: String,
    /// `s=`.
    pub selector: String,
    pub key: Arc<SigningKey>,
    /// Header names to sign when present; From is among them.
    pub headers: Vec<String>,
    pub canonicalization: Canonicalization,
    /// Sign only messages of this tenant.
    pub tenant: Option<String>,
    /// Sign every message, whatever its From.
    pub always: bool,
}

impl Signer {
    fn matches(&self, from_domain: Option<&str>, tenant: Option<&str>) -> bool {
        let domain =
            self.always || from_domain.is_some_and(|d| d.eq_ignore_ascii_case(&self.domain));
        let tenant = self
            .tenant
            .as_deref()
            .is_none_or(|t| tenant.is_some_and(|v| v.eq_ignore_ascii_case(t)));
        domain && tenant
    }
}

/// Every configured signer, in config order.
#[derive(Debug, Default)]
pub struct Signers {
    pub list: Vec<Signer>,
}

impl Signers {
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Indexes of the signers for a message from `from_domain` of `tenant`.
    pub fn select(&self, from_domain: Option<&str>, tenant: Option<&str>) -> Vec<usize> {
        (0..self.list.len())
            .filter(|&i| self.list[i].matches(from_domain, tenant))
            .collect()
    }
}

/// The domain of the first address in a From header field (the whole field, name included),
/// lower case. Quoted strings and comments are skipped, so `"a@b" <x@y>` gives `y`.
pub fn from_domain(field: &[u8]) -> Option<String> {
    let value = match memchr::memchr(b':', field) {
        Some(colon) => &field[colon + 1..],
        None => field,
    };
    let mut angle: Option<Vec<u8>> = None;
    let mut plain = Vec::new();
    let (mut quoted, mut escaped, mut comment) = (false, false, 0usize);
    for &b in value {
        if escaped {
            escaped = false;
            continue;
        }
        match b {
            b'\\' if quoted || comment > 0 => escaped = true,
            b'"' if comment == 0 => quoted = !quoted,
            b'(' if !quoted => comment += 1,
            b')' if !quoted && comment > 0 => comment -= 1,
            _ if quoted || comment > 0 => {}
            b'<' => angle = Some(Vec::new()),
            b'>' if angle.is_some() => break,
            // A list of addresses: the first one is the author here.
            b',' if angle.is_none() => break,
            _ => match angle.as_mut() {
                Some(a) => a.push(b),
                None => plain.push(b),
            },
        }
    }
    let addr = angle.unwrap_or(plain);
    let at = memchr::memrchr(b'@', &addr)?;
    let domain = std::str::from_utf8(&addr[at + 1..]).ok()?;
    let domain: String = domain
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    (!domain.is_empty()).then_some(domain)
}

/// Where the header section ends in `message` (so far): the offset of the body, after the
/// empty line. `from` is where a previous search stopped, to keep the scan linear.
fn body_start(message: &[u8], from: usize) -> Option<usize> {
    if message.starts_with(b"\r\n") {
        return Some(2);
    }
    let from = from.saturating_sub(3);
    memmem::find(&message[from..], b"\r\n\r\n").map(|k| from + k + 4)
}

/// One body hash in progress.
struct BodyHash {
    canon: Canon,
    canonicaliser: canon::BodyCanon,
    sha: Buffered,
}

/// SHA-256 fed through a small buffer: the canonicaliser hands over short slices (a line, or
/// less), and each `update` of the digest has a fixed cost.
struct Buffered {
    sha: ring::digest::Context,
    buf: Vec<u8>,
}

/// Bytes gathered before they go to the digest: a multiple of SHA-256's 64-byte block.
const HASH_BUFFER_BYTES: usize = 8 << 10;

impl Buffered {
    fn new() -> Buffered {
        Buffered {
            sha: ring::digest::Context::new(&ring::digest::SHA256),
            buf: Vec::with_capacity(HASH_BUFFER_BYTES),
        }
    }

    fn update(&mut self, s: &[u8]) {
        if self.buf.len() + s.len() > HASH_BUFFER_BYTES {
            self.sha.update(&self.buf);
            self.buf.clear();
            if s.len() >= HASH_BUFFER_BYTES {
                self.sha.update(s);
                return;
            }
        }
        self.buf.extend_from_slice(s);
    }

    fn finish(mut self) -> ring::digest::Digest {
        self.sha.update(&self.buf);
        self.sha.finish()
    }
}

enum State {
    /// Still in the header section; scanned this far.
    Headers { scanned: usize },
    /// No signer matches: nothing more to do.
    Unsigned,
    /// Hashing the body (from `body_start`), fed up to `fed`.
    Body {
        signers: Vec<usize>,
        body_start: usize,
        fed: usize,
        hashes: Vec<BodyHash>,
    },
}

/// A signature whose data is ready, for the adapter to sign and then to `assemble`.
pub struct Pending {
    pub key: Arc<SigningKey>,
    /// The canonicalised header data to sign.
    pub data: Vec<u8>,
    /// The header up to `b=`.
    pub unsigned: String,
}

impl Pending {
    /// The DKIM-Signature header, CRLF included, once `signature` is made over `data`.
    pub fn assemble(&self, signature: &[u8]) -> String {
        sign::signed_header(&self.unsigned, signature)
    }
}

/// Signs one message as it streams in; see the module notes.
pub struct MessageSigner {
    state: State,
}

impl Default for MessageSigner {
    fn default() -> MessageSigner {
        MessageSigner::new()
    }
}

impl MessageSigner {
    pub fn new() -> MessageSigner {
        MessageSigner {
            state: State::Headers { scanned: 0 },
        }
    }

    /// True once it is known that no signer matches this message.
    pub fn is_unsigned(&self) -> bool {
        matches!(self.state, State::Unsigned)
    }

    /// `message` is the message as received so far; every call sees the previous one's bytes
    /// again at its start, and more after them. `tenant_of` reads the tenant from a header
    /// section.
    ///
    /// Hot path: no I/O; each byte is hashed once.
    pub fn advance(
        &mut self,
        signers: &Signers,
        message: &[u8],
        tenant_of: &dyn Fn(&[u8]) -> Option<String>,
    ) {
        if let State::Headers { scanned } = self.state {
            match body_start(message, scanned) {
                None => {
                    self.state = State::Headers {
                        scanned: message.len(),
                    }
                }
                Some(start) => self.begin_body(signers, message, start, tenant_of),
            }
        }
        if let State::Body { fed, hashes, .. } = &mut self.state {
            if message.len() > *fed {
                let new = &message[*fed..];
                for h in hashes.iter_mut() {
                    let sha = &mut h.sha;
                    h.canonicaliser.feed(new, &mut |s| sha.update(s));
                }
                *fed = message.len();
            }
        }
    }

    /// The header section is complete (`message[..start]`): pick the signers.
    fn begin_body(
        &mut self,
        signers: &Signers,
        message: &[u8],
        start: usize,
        tenant_of: &dyn Fn(&[u8]) -> Option<String>,
    ) {
        let section = &message[..start];
        let from = canon::fields(section)
            .into_iter()
            .find(|f| f.name.eq_ignore_ascii_case(b"from"))
            .and_then(|f| from_domain(f.raw));
        let tenant = tenant_of(section);
        let chosen = signers.select(from.as_deref(), tenant.as_deref());
        if chosen.is_empty() {
            self.state = State::Unsigned;
            return;
        }
        let mut hashes: Vec<BodyHash> = Vec::new();
        for &i in &chosen {
            let canon = signers.list[i].canonicalization.body;
            if !hashes.iter().any(|h| h.canon == canon) {
                hashes.push(BodyHash {
                    canon,
                    canonicaliser: canon::BodyCanon::new(canon),
                    sha: Buffered::new(),
                });
            }
        }
        self.state = State::Body {
            signers: chosen,
            body_start: start,
            fed: start,
            hashes,
        };
    }

    /// The message is complete: `head` is what reception puts above it (Received, and Date
    /// and Message-ID for a submission), `message` the message as received. Returns the
    /// signatures to make, in config order; none if no signer matches.
    pub fn finish(
        mut self,
        signers: &Signers,
        head: &[u8],
        message: &[u8],
        timestamp: u64,
        tenant_of: &dyn Fn(&[u8]) -> Option<String>,
    ) -> Vec<Pending> {
        self.advance(signers, message, tenant_of);
        if let State::Headers { .. } = self.state {
            // No empty line: the whole message is a header section and the body is empty.
            self.begin_body(signers, message, message.len(), tenant_of);
        }
        let State::Body {
            signers: chosen,
            body_start,
            hashes,
            ..
        } = self.state
        else {
            return Vec::new();
        };
        let digests: Vec<(Canon, ring::digest::Digest)> = hashes
            .into_iter()
            .map(|mut h| {
                let sha = &mut h.sha;
                h.canonicaliser.finish(&mut |s| sha.update(s));
                (h.canon, h.sha.finish())
            })
            .collect();
        let mut fields = canon::fields(head);
        fields.extend(canon::fields(&message[..body_start]));
        let mut out = Vec::with_capacity(chosen.len());
        for i in chosen {
            let s = &signers.list[i];
            let Some((_, bh)) = digests.iter().find(|(c, _)| *c == s.canonicalization.body) else {
                continue;
            };
            let h = sign::h_list(&s.headers, &fields);
            let params = sign::Params {
                algorithm: s.key.algorithm(),
                canonicalization: s.canonicalization,
                domain: &s.domain,
                selector: &s.selector,
                timestamp,
                h: &h,
            };
            let unsigned = sign::unsigned_header(&params, bh.as_ref());
            let data = sign::header_data(s.canonicalization.header, &h, &fields, &unsigned);
            out.push(Pending {
                key: s.key.clone(),
                data,
                unsigned,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests;
