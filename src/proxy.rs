//! The PROXY protocol (HAProxy, versions 1 and 2): a load balancer in front of Epoxi sends the
//! client's real address before the SMTP conversation starts. Only headers from configured
//! proxy addresses are trusted (the adapter checks); this module only parses, with no I/O.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Version 2 signature (12 bytes).
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Longest version 1 line, CRLF included (the specification's bound).
pub const V1_LEN_MAX: usize = 107;
/// Longest version 2 header we accept: the fixed 16 bytes and addresses with some TLVs.
/// Longer headers (big TLV payloads) are refused rather than buffered without bound.
pub const V2_LEN_MAX: usize = 16 + 512;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("malformed PROXY protocol v1 header")]
    BadV1,
    #[error("malformed PROXY protocol v2 header")]
    BadV2,
    #[error("PROXY protocol header too long")]
    TooLong,
}

/// A parsed header: the client's address (None for LOCAL/UNKNOWN: use the connection's own
/// peer) and the header's length in bytes.
pub type Parsed = (Option<SocketAddr>, usize);

/// Parse a header at the start of `buf`. `Ok(None)`: need more bytes. No I/O, no allocation.
pub fn parse(buf: &[u8]) -> Result<Option<Parsed>, ProxyError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] == b'\r' {
        return parse_v2(buf);
    }
    if buf[0] == b'P' {
        return parse_v1(buf);
    }
    Err(ProxyError::NotProxy)
}

fn parse_v1(buf: &[u8]) -> Result<Option<Parsed>, ProxyError> {
    let prefix = b"PROXY ";
    let n = prefix.len().min(buf.len());
    if buf[..n] != prefix[..n] {
        return Err(ProxyError::NotProxy);
    }
    let Some(end) = memchr::memmem::find(buf, b"\r\n") else {
        return if buf.len() >= V1_LEN_MAX {
            Err(ProxyError::TooLong)
        } else {
            Ok(None)
        };
    };
    if end + 2 > V1_LEN_MAX {
        return Err(ProxyError::TooLong);
    }
    let line = std::str::from_utf8(&buf[prefix.len()..end]).map_err(|_| ProxyError::BadV1)?;
    let fields: Vec<&str> = line.split(' ').collect();
    let addr = match fields.as_slice() {
        ["UNKNOWN", ..] => None,
        ["TCP4", src, _dst, sport, _dport] => {
            let ip: Ipv4Addr = src.parse().map_err(|_| ProxyError::BadV1)?;
            Some(SocketAddr::new(IpAddr::V4(ip), port(sport)?))
        }
        ["TCP6", src, _dst, sport, _dport] => {
            let ip: Ipv6Addr = src.parse().map_err(|_| ProxyError::BadV1)?;
            Some(SocketAddr::new(IpAddr::V6(ip), port(sport)?))
        }
        _ => return Err(ProxyError::BadV1),
    };
    Ok(Some((addr, end + 2)))
}

fn port(text: &str) -> Result<u16, ProxyError> {
    // The specification forbids leading zeros and signs; `parse` would accept "+25".
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ProxyError::BadV1);
    }
    text.parse().map_err(|_| ProxyError::BadV1)
}

fn parse_v2(buf: &[u8]) -> Result<Option<Parsed>, ProxyError> {
    let n = V2_SIGNATURE.len().min(buf.len());
    if buf[..n] != V2_SIGNATURE[..n] {
        return Err(ProxyError::NotProxy);
    }
    if buf.len() < 16 {
        return Ok(None);
    }
    let version_command = buf[12];
    if version_command >> 4 != 2 {
        return Err(ProxyError::BadV2);
    }
    let family = buf[13];
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if 16 + len > V2_LEN_MAX {
        return Err(ProxyError::TooLong);
    }
    if buf.len() < 16 + len {
        return Ok(None);
    }
    let body = &buf[16..16 + len];
    let addr = match (version_command & 0x0f, family) {
        // LOCAL: a health check from the proxy itself.
        (0x0, _) => None,
        (0x1, 0x11) if len >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Some(SocketAddr::new(
                IpAddr::V4(ip),
                u16::from_be_bytes([body[8], body[9]]),
            ))
        }
        (0x1, 0x21) if len >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[..16]);
            let ip = Ipv6Addr::from(octets);
            Some(SocketAddr::new(
                IpAddr::V6(ip),
                u16::from_be_bytes([body[32], body[33]]),
            ))
        }
        // PROXY with an unspecified or non-TCP family: the spec says use the real peer.
        (0x1, 0x00) => None,
        _ => return Err(ProxyError::BadV2),
    };
    Ok(Some((addr, 16 + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_tcp4_tcp6_unknown_and_partial() {
        let h = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\r\nEHLO x\r\n";
        let (addr, n) = parse(h).expect("valid").expect("complete");
        assert_eq!(addr, Some("192.0.2.7:56324".parse().expect("addr")));
        assert_eq!(&h[n..], b"EHLO x\r\n");
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 25\r\n";
        assert_eq!(
            parse(h).expect("ok").expect("done").0,
            Some("[2001:db8::1]:4000".parse().expect("a"))
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Ok(Some((None, 15))));
        for cut in 1..h.len() {
            assert_eq!(parse(&h[..cut]), Ok(None), "cut {cut}");
        }
    }

    #[test]
    fn v1_garbage_is_refused() {
        assert_eq!(parse(b"EHLO x\r\n"), Err(ProxyError::NotProxy));
        assert_eq!(parse(b"PROXY TCP4 nonsense\r\n"), Err(ProxyError::BadV1));
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 25\r\n"),
            Err(ProxyError::BadV1)
        );
        assert_eq!(parse(&[b'P'; 200]), Err(ProxyError::NotProxy));
        let long = format!("PROXY TCP4 1.2.3.4 5.6.7.8 1 25{}", " ".repeat(120));
        assert_eq!(parse(long.as_bytes()), Err(ProxyError::TooLong));
    }

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    #[test]
    fn v2_tcp4_tcp6_local_partial_and_bad() {
        let mut b4 = vec![192, 0, 2, 9, 198, 51, 100, 1];
        b4.extend_from_slice(&4242u16.to_be_bytes());
        b4.extend_from_slice(&25u16.to_be_bytes());
        let h = v2(1, 0x11, &b4);
        assert_eq!(
            parse(&h),
            Ok(Some((Some("192.0.2.9:4242".parse().expect("a")), 28)))
        );
        for cut in 1..h.len() {
            assert_eq!(parse(&h[..cut]), Ok(None), "cut {cut}");
        }
        let mut b6 = vec![0u8; 36];
        b6[15] = 1;
        b6[32..34].copy_from_slice(&7u16.to_be_bytes());
        assert_eq!(
            parse(&v2(1, 0x21, &b6)).expect("ok").expect("done").0,
            Some("[::1]:7".parse().expect("a"))
        );
        assert_eq!(parse(&v2(0, 0, &[])), Ok(Some((None, 16))));
        assert_eq!(parse(&v2(1, 0x11, &[1, 2, 3])), Err(ProxyError::BadV2));
        let mut bad_version = v2(1, 0x11, &b4);
        bad_version[12] = 0x11;
        assert_eq!(parse(&bad_version), Err(ProxyError::BadV2));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&huge), Err(ProxyError::TooLong));
    }
}
