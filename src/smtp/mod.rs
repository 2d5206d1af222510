//! SMTP as state machines that do no I/O.
//!
//! The job of this module is to speak RFC 5321 on both sides of a connection, inbound
//! ([`server::Session`]) and outbound ([`client::Client`]), without touching a socket, a clock or a
//! file. The glommio adapters read bytes, hand them to `input`, call `poll`, and write whatever
//! `poll` appended to `out`. That keeps the protocol testable byte by byte, fuzzable, and
//! simulatable in memory: the tests in `client` connect a `Client` to a `Session` with no
//! network between them.
//!
//! - [`reply`]: the `Reply` value, the reply parser used by the client, and the server's canned
//!   replies as static wire bytes.
//! - [`parser`]: the command-line parser (`MAIL FROM:<a@b> SIZE=10`), borrowing from the line.
//! - [`data`]: the streaming DATA reader (end marker, dot-unstuffing, limits) and the client's
//!   dot-stuffing writer.
//! - [`server`]: the inbound session state machine.
//! - [`client`]: the outbound client state machine.
//! - [`received`]: the `Received:` trace header (RFC 5321 4.4), a pure function of its inputs.
//!
//! Invariants shared by everything here:
//! - No I/O and no clock. Time enters only as an explicit call (`Session::timeout`).
//! - Every buffer is bounded by a named limit: command lines by `line_len_max`, message bodies by
//!   `size_max`, reply lines by the client's `line_len_max` and `reply::REPLY_LINES_MAX`.
//! - Every rejection the server writes is a precise reply with an enhanced status code
//!   (RFC 3463), and is counted in `server::SessionStats`.
//! - Lines end with CRLF on the wire. Command lines ending in a bare LF are accepted (many
//!   clients send them), but only CRLF "." CRLF ends a message: see `data` for why.

pub mod client;
pub mod data;
pub mod parser;
pub mod received;
pub mod reply;
pub mod server;

pub use client::{Capabilities, Client, ClientConfig, ClientStep, TransactionOutcome};
pub use data::{DataError, DataReader};
pub use parser::{parse_command, Command, ParseError, PathError};
pub use received::{received_header, received_protocol, submission_headers};
pub use reply::{Canned, Rejection, Reply, ReplyError};
pub use server::{
    BareLf, DsnEnvelope, NulByte, Orcpt, RcptDsn, ServerConfig, Session, SessionStats, Step,
    Transaction,
};

/// The pieces of `hay` between LFs, exactly as `hay.split(|&b| b == b'\n')` yields them (CRs
/// kept; a last piece after the final LF, empty when `hay` ends in one), but found with
/// `memchr`'s vectorised search instead of a closure called per byte.
///
/// Hot path (header scans per message): no I/O, no allocation.
pub(crate) fn split_lf(hay: &[u8]) -> impl Iterator<Item = &[u8]> + '_ {
    let mut rest = Some(hay);
    std::iter::from_fn(move || {
        let r = rest?;
        match memchr::memchr(b'\n', r) {
            Some(k) => {
                rest = Some(&r[k + 1..]);
                Some(&r[..k])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::split_lf;

    #[test]
    fn split_lf_is_slice_split() {
        let cases: [&[u8]; 8] = [
            b"",
            b"\n",
            b"\n\n",
            b"a",
            b"a\n",
            b"a\r\nb",
            b"\na\r\n\r\nb\n",
            b"no line end at all, but longer than one vector register of bytes",
        ];
        for hay in cases {
            let want: Vec<&[u8]> = hay.split(|&b| b == b'\n').collect();
            assert_eq!(split_lf(hay).collect::<Vec<_>>(), want, "{hay:?}");
        }
    }
}
