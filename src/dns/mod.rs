//! DNS for delivery: DNS messages built and read with hickory-proto, MX semantics, a per-shard
//! cache, and the resolver adapter over glommio sockets. All but `resolver` is I/O-free.
//!
//! - [`message`]: query building and answer classification (answer, NXDOMAIN, NODATA,
//!   transient failure, truncated: retry over TCP).
//! - [`mx`]: the delivery plan for a domain from its MX answer: preference order, equal
//!   preferences shuffled, null MX (RFC 7505), implicit MX (RFC 5321 §5.1).
//! - [`cache`]: answers kept for their TTL (clamped), negative answers too.
//! - [`resolver`]: UDP queries, TCP on truncation, failover across resolvers, coalescing.
//!
//! Which resolvers: `--resolver`, else `dns.resolvers`, else the nameservers of
//! /etc/resolv.conf ([`resolv_conf`]).

pub mod cache;
pub mod message;
pub mod mx;
pub mod resolver;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

/// The DNS port, for resolvers given without one.
const DNS_PORT: u16 = 53;

/// `IP`, `IP:PORT` or `[IPv6]:PORT`.
pub fn parse_resolver(text: &str) -> Option<SocketAddr> {
    let text = text.trim();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Some(addr);
    }
    let ip = text.trim_start_matches('[').trim_end_matches(']');
    ip.parse::<IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, DNS_PORT))
}

/// The `nameserver` lines of a resolv.conf file, in order. A missing file means no resolvers
/// (mail without a static route then waits and retries, saying why); an unreadable one is an
/// error.
pub fn resolv_conf(path: &Path) -> Result<Vec<SocketAddr>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    Ok(parse_resolv_conf(&text))
}

fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            // A scoped IPv6 address (fe80::1%eth0) names an interface we cannot use here.
            let word = words.next()?;
            word.parse::<IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, DNS_PORT))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolvers_from_flags_and_resolv_conf() {
        assert_eq!(
            parse_resolver("127.0.0.1:5353"),
            "127.0.0.1:5353".parse().ok()
        );
        assert_eq!(parse_resolver("10.0.0.1"), "10.0.0.1:53".parse().ok());
        assert_eq!(parse_resolver("[::1]:53"), "[::1]:53".parse().ok());
        assert_eq!(parse_resolver("::1"), "[::1]:53".parse().ok());
        assert_eq!(parse_resolver("resolver.example"), None);
        let conf = "# comment\nsearch example.com\nnameserver 10.0.0.2\n\
                    nameserver 2001:db8::1\nnameserver fe80::1%eth0\noptions ndots:2\n";
        assert_eq!(
            parse_resolv_conf(conf),
            vec![
                "10.0.0.2:53".parse::<SocketAddr>().expect("addr"),
                "[2001:db8::1]:53".parse().expect("addr")
            ]
        );
    }
}
