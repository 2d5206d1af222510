//! The TLSRPT DNS record (RFC 8460 §3): `_smtp._tls.<domain> TXT "v=TLSRPTv1; rua=..."`.

use thiserror::Error;

/// Where a domain wants its reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rua {
    /// `mailto:` an address: the report goes as a message through our own queue.
    Mailto(String),
    /// `https:` a URL: the report is POSTed.
    Https(String),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RuaError {
    #[error("not a TLSRPT record (no v=TLSRPTv1 first)")]
    NotTlsRpt,
    #[error("no rua= in the record")]
    NoRua,
    #[error("no usable report address in rua= (only mailto: and https: are defined)")]
    NoUsableUri,
}

/// Report addresses a domain may list; more is a misconfiguration we need not follow.
pub const RUA_URIS_MAX: usize = 8;

/// Parse the TXT record's text (its strings already joined). Unknown URI schemes are skipped,
/// as RFC 8460 §3 lets a sender ignore what it does not support.
pub fn parse(txt: &str) -> Result<Vec<Rua>, RuaError> {
    let mut fields = txt.split(';').map(str::trim).filter(|f| !f.is_empty());
    match fields.next() {
        Some(v) if v.replace(' ', "") == "v=TLSRPTv1" => {}
        _ => return Err(RuaError::NotTlsRpt),
    }
    let mut rua = None;
    for f in fields {
        if let Some((k, v)) = f.split_once('=') {
            if k.trim().eq_ignore_ascii_case("rua") {
                rua = Some(v.trim().to_string());
            }
        }
    }
    let rua = rua.ok_or(RuaError::NoRua)?;
    let mut out = Vec::new();
    for uri in rua.split(',').map(str::trim).take(RUA_URIS_MAX) {
        let (scheme, rest) = match uri.split_once(':') {
            Some(p) => p,
            None => continue,
        };
        if scheme.eq_ignore_ascii_case("mailto") {
            // `mailto:a@b?subject=...`: the address only; an address without a domain is no
            // address.
            let addr = rest.split('?').next().unwrap_or_default();
            let addr = percent_decode(addr);
            if addr.contains('@') && !addr.starts_with('@') && !addr.ends_with('@') {
                out.push(Rua::Mailto(addr));
            }
        } else if scheme.eq_ignore_ascii_case("https") && rest.starts_with("//") {
            out.push(Rua::Https(uri.to_string()));
        }
    }
    if out.is_empty() {
        return Err(RuaError::NoUsableUri);
    }
    Ok(out)
}

/// `%40` and friends, as URIs in the record may escape them.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_examples() {
        assert_eq!(
            parse("v=TLSRPTv1;rua=mailto:reports@example.com"),
            Ok(vec![Rua::Mailto("reports@example.com".into())])
        );
        assert_eq!(
            parse("v=TLSRPTv1; rua=https://reporting.example.com/v1/tlsrpt"),
            Ok(vec![Rua::Https(
                "https://reporting.example.com/v1/tlsrpt".into()
            )])
        );
        assert_eq!(
            parse("v=TLSRPTv1; rua=mailto:a%40b@example.com?subject=x , https://r.test/x"),
            Ok(vec![
                Rua::Mailto("a@b@example.com".into()),
                Rua::Https("https://r.test/x".into())
            ])
        );
    }

    #[test]
    fn bad_records() {
        assert_eq!(parse("v=spf1 -all"), Err(RuaError::NotTlsRpt));
        assert_eq!(
            parse("rua=mailto:a@b; v=TLSRPTv1"),
            Err(RuaError::NotTlsRpt)
        );
        assert_eq!(parse("v=TLSRPTv1;"), Err(RuaError::NoRua));
        assert_eq!(
            parse("v=TLSRPTv1; rua=ftp://x, mailto:nodomain"),
            Err(RuaError::NoUsableUri)
        );
        assert_eq!(parse("v=TLSRPTv1; rua=%"), Err(RuaError::NoUsableUri));
        assert_eq!(
            parse("v=TLSRPTv1; rua=mailto:%4"),
            Err(RuaError::NoUsableUri)
        );
    }
}
