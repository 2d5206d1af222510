//! DNS for delivery (issue 5 groundwork, not wired into delivery yet): DNS messages built and
//! read with hickory-proto, MX semantics, a per-shard cache, and the resolver adapter over
//! glommio sockets. All but `resolver` is I/O-free.
//!
//! - [`message`]: query building and answer classification (answer, NXDOMAIN, NODATA,
//!   transient failure, truncated: retry over TCP).
//! - [`mx`]: the delivery plan for a domain from its MX answer: preference order, equal
//!   preferences shuffled, null MX (RFC 7505), implicit MX (RFC 5321 §5.1).
//! - [`cache`]: answers kept for their TTL (clamped), negative answers too.
//! - [`resolver`]: UDP queries, TCP on truncation, failover across resolvers, coalescing.

pub mod cache;
pub mod message;
pub mod mx;
pub mod resolver;
