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

/// Index of the first LF in `hay`.
///
/// Hot path (DATA bodies, command lines, replies): no I/O, no allocation. It scans a word at a
/// time with the classic "has zero byte" bit trick, which is several times faster than a
/// byte-by-byte `position` because LLVM does not vectorise early-exit loops. The lowest flagged
/// byte of a word is always exact (borrows only propagate upward), and we take the lowest.
#[inline]
pub(crate) fn find_lf(hay: &[u8]) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    const PAT: u64 = LO * b'\n' as u64;
    let mut chunks = hay.chunks_exact(16);
    let mut base = 0;
    for chunk in &mut chunks {
        let (a, b) = chunk.split_at(8);
        let mut wa = [0u8; 8];
        let mut wb = [0u8; 8];
        wa.copy_from_slice(a);
        wb.copy_from_slice(b);
        let xa = u64::from_le_bytes(wa) ^ PAT;
        let xb = u64::from_le_bytes(wb) ^ PAT;
        let fa = xa.wrapping_sub(LO) & !xa & HI;
        let fb = xb.wrapping_sub(LO) & !xb & HI;
        if fa | fb != 0 {
            return Some(if fa != 0 {
                base + (fa.trailing_zeros() / 8) as usize
            } else {
                base + 8 + (fb.trailing_zeros() / 8) as usize
            });
        }
        base += 16;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == b'\n')
        .map(|p| base + p)
}

#[cfg(test)]
mod tests {
    use super::find_lf;

    #[test]
    fn find_lf_matches_naive_search_at_every_position() {
        for len in 0..70 {
            for at in 0..=len {
                let mut hay = vec![b'a'; len];
                // Bytes around '\n' (0x0a) that could trip the bit trick.
                for (i, b) in hay.iter_mut().enumerate() {
                    *b = [b'a', 0x0b, 0x09, 0x8a, 0x00, 0xff][i % 6];
                }
                if at < len {
                    hay[at] = b'\n';
                    if at + 3 < len {
                        hay[at + 3] = b'\n';
                    }
                }
                let naive = hay.iter().position(|&b| b == b'\n');
                assert_eq!(find_lf(&hay), naive, "len {len} at {at}");
            }
        }
    }
}
