//! Sending a report to an `https:` address (RFC 8460 §5.4): a POST of the gzip'd JSON as
//! `application/tlsrpt+gzip`, with ureq on rustls/ring. Blocking: run it off the executor.
//! The host's addresses come from Epoxi's own resolver, as for the MTA-STS fetch; the server's
//! certificate is checked against `delivery.tls_ca_file` (or the bundled web roots).

use std::net::SocketAddr;
use std::time::Duration;

use crate::tlspolicy::verify::Trust;

/// A report POST gets this long, all of it (RFC 8460 does not say; a receiver that takes
/// longer is not one to wait for).
pub const POST_TIMEOUT: Duration = Duration::from_secs(30);

/// The host of an `https://host[:port]/path` URL, and its port.
pub fn host_port(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit('@').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, tail) = v6.split_once(']')?;
        let port = match tail.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None => 443,
        };
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h.to_ascii_lowercase(), p.parse().ok()?)),
        None if !authority.is_empty() => Some((authority.to_ascii_lowercase(), 443)),
        None => None,
    }
}

/// POST `gz` to `url`, connecting to `addrs`. Any 2xx is success.
pub fn post(url: &str, addrs: Vec<SocketAddr>, trust: &Trust, gz: &[u8]) -> Result<(), String> {
    if addrs.is_empty() {
        return Err(format!("{url}: the host has no address"));
    }
    let agent = crate::tlspolicy::fetch::https_agent(trust, addrs, POST_TIMEOUT, "epoxi-tlsrpt");
    let response = agent
        .post(url)
        .header("Content-Type", "application/tlsrpt+gzip")
        .send(gz)
        .map_err(|e| format!("{url}: {e}"))?;
    let status = response.status().as_u16();
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(format!("{url}: HTTP {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_ports_of_urls() {
        assert_eq!(
            host_port("https://Reports.Example.com/v1/tlsrpt"),
            Some(("reports.example.com".into(), 443))
        );
        assert_eq!(
            host_port("https://r.test:8443/x?y"),
            Some(("r.test".into(), 8443))
        );
        assert_eq!(host_port("https://[::1]:9000/"), Some(("::1".into(), 9000)));
        assert_eq!(host_port("http://r.test/"), None);
        assert_eq!(host_port("https://r.test:x/"), None);
        assert_eq!(host_port("https:///"), None);
    }
}
