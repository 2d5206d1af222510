//! DNS for delivery (issue 5 groundwork, not wired into delivery yet): DNS messages built and
//! read with hickory-proto, MX semantics, and a per-shard cache. Everything here is I/O-free;
//! the UDP/TCP adapter over glommio sockets comes with the resolver.
//!
//! - [`message`]: query building and answer classification (answer, NXDOMAIN, NODATA,
//!   transient failure, truncated: retry over TCP).
//! - [`mx`]: the delivery plan for a domain from its MX answer: preference order, equal
//!   preferences shuffled, null MX (RFC 7505), implicit MX (RFC 5321 §5.1).
//! - [`cache`]: answers kept for their TTL (clamped), negative answers too.

pub mod cache;
pub mod message;
pub mod mx;
