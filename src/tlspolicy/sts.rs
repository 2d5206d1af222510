//! MTA-STS (RFC 8461) records and policies: the `_mta-sts` TXT record, the policy file and the
//! MX host match. No I/O, no clock.

/// The policy file's largest accepted size (RFC 8461 §3.3 suggests 64 KiB: a policy is a few
/// lines; more is not a policy).
pub const POLICY_BYTES_MAX: usize = 64 << 10;
/// RFC 8461 §3.2: max_age is at most 31557600 seconds (about a year).
pub const MAX_AGE_MAX_S: u64 = 31_557_600;
/// MX patterns kept per policy: a provider lists a handful; a bound keeps matching cheap.
pub const MX_PATTERNS_MAX: usize = 64;
/// RFC 8461 §3.1: the id is 1 to 32 letters and digits.
const ID_LEN_MAX: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StsError {
    #[error("no `v=STSv1` TXT record")]
    NoRecord,
    #[error("{0} `v=STSv1` TXT records (exactly one is allowed)")]
    ManyRecords(usize),
    #[error("bad `_mta-sts` TXT record `{0}`")]
    BadRecord(String),
    #[error("policy is larger than {POLICY_BYTES_MAX} bytes")]
    TooLarge,
    #[error("policy is not UTF-8 text")]
    NotText,
    #[error("policy version is not STSv1")]
    Version,
    #[error("policy mode `{0}` is not enforce, testing or none")]
    Mode(String),
    #[error("policy max_age `{0}` is not a number of seconds up to {MAX_AGE_MAX_S}")]
    MaxAge(String),
    #[error("policy has no max_age")]
    NoMaxAge,
    #[error("policy in mode {0} has no mx")]
    NoMx(&'static str),
    #[error("bad mx pattern `{0}`")]
    MxPattern(String),
    #[error("more than {MX_PATTERNS_MAX} mx patterns")]
    TooManyMx,
}

/// The policy id from the domain's `_mta-sts` TXT answer: the one record that starts with
/// `v=STSv1` (RFC 8461 §3.1; other TXT records at the name are ignored).
pub fn parse_txt(records: &[String]) -> Result<String, StsError> {
    let sts: Vec<&String> = records
        .iter()
        .filter(|r| r.trim_start().starts_with("v=STSv1"))
        .collect();
    let record = match sts.as_slice() {
        [] => return Err(StsError::NoRecord),
        [one] => *one,
        many => return Err(StsError::ManyRecords(many.len())),
    };
    let bad = || StsError::BadRecord(record.clone());
    let mut id = None;
    for (i, field) in record.split(';').enumerate() {
        let field = field.trim();
        if field.is_empty() {
            continue;
        }
        let (key, value) = field.split_once('=').ok_or_else(bad)?;
        match (i, key.trim(), value.trim()) {
            (0, "v", "STSv1") => {}
            (0, _, _) => return Err(bad()),
            (_, "id", v) => id = Some(v.to_owned()),
            // Other extension fields are ignored (RFC 8461 §3.1 sts-ext).
            _ => {}
        }
    }
    let id = id.ok_or_else(bad)?;
    let ok =
        !id.is_empty() && id.len() <= ID_LEN_MAX && id.bytes().all(|b| b.is_ascii_alphanumeric());
    if !ok {
        return Err(bad());
    }
    Ok(id)
}

/// The policy mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    Enforce,
    Testing,
    None,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }
}

/// A parsed policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// MX patterns, lower case, without a final dot: `mx.example.com` or `*.example.com`.
    pub mx: Vec<String>,
    pub max_age_s: u64,
}

impl Policy {
    /// Parse a policy body (RFC 8461 §3.2): `key: value` lines ended by LF or CRLF; unknown
    /// keys are ignored; version, mode and max_age are required, mx unless mode is none.
    pub fn parse(body: &[u8]) -> Result<Policy, StsError> {
        if body.len() > POLICY_BYTES_MAX {
            return Err(StsError::TooLarge);
        }
        let text = std::str::from_utf8(body).map_err(|_| StsError::NotText)?;
        let (mut version, mut mode, mut max_age) = (None, None, None);
        let mut mx = Vec::new();
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match key.trim() {
                "version" => version = Some(value == "STSv1"),
                "mode" => {
                    mode = Some(match value {
                        "enforce" => Mode::Enforce,
                        "testing" => Mode::Testing,
                        "none" => Mode::None,
                        other => return Err(StsError::Mode(other.to_owned())),
                    })
                }
                "max_age" => {
                    let secs = value
                        .parse::<u64>()
                        .ok()
                        .filter(|&s| s <= MAX_AGE_MAX_S && value.len() <= 10)
                        .ok_or_else(|| StsError::MaxAge(value.to_owned()))?;
                    max_age = Some(secs);
                }
                "mx" => {
                    if mx.len() == MX_PATTERNS_MAX {
                        return Err(StsError::TooManyMx);
                    }
                    mx.push(mx_pattern(value)?);
                }
                _ => {}
            }
        }
        if version != Some(true) {
            return Err(StsError::Version);
        }
        let mode = mode.ok_or_else(|| StsError::Mode(String::new()))?;
        let max_age_s = max_age.ok_or(StsError::NoMaxAge)?;
        if mx.is_empty() && mode != Mode::None {
            return Err(StsError::NoMx(mode.as_str()));
        }
        Ok(Policy {
            mode,
            mx,
            max_age_s,
        })
    }

    /// Whether MX host `host` is allowed (RFC 8461 §4.1): an exact name, or `*.` followed by
    /// the rest, standing for exactly one leftmost label. Case-insensitive, final dot ignored.
    /// Hot path: no allocation for ASCII-lower-case hosts.
    pub fn mx_matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.');
        self.mx
            .iter()
            .any(|pattern| match pattern.strip_prefix("*.") {
                Some(suffix) => match host.split_once('.') {
                    Some((label, rest)) => !label.is_empty() && rest.eq_ignore_ascii_case(suffix),
                    None => false,
                },
                None => host.eq_ignore_ascii_case(pattern),
            })
    }

    /// The policy as RFC 8460's `policy-string` lines.
    pub fn strings(&self) -> Vec<String> {
        let mut out = vec![
            "version: STSv1".to_owned(),
            format!("mode: {}", self.mode.as_str()),
        ];
        out.extend(self.mx.iter().map(|m| format!("mx: {m}")));
        out.push(format!("max_age: {}", self.max_age_s));
        out
    }

    /// The policy in its own file format (what [`Policy::parse`] reads back).
    pub fn to_text(&self) -> String {
        let mut text = self.strings().join("\n");
        text.push('\n');
        text
    }
}

fn mx_pattern(value: &str) -> Result<String, StsError> {
    let p = value.trim_end_matches('.').to_ascii_lowercase();
    let name = p.strip_prefix("*.").unwrap_or(&p);
    let ok = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !ok {
        return Err(StsError::MxPattern(value.to_owned()));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txt(records: &[&str]) -> Result<String, StsError> {
        parse_txt(&records.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn txt_records() {
        assert_eq!(txt(&["v=STSv1; id=20240101T01"]), Ok("20240101T01".into()));
        assert_eq!(txt(&["v=STSv1;id=abc;"]), Ok("abc".into()));
        assert_eq!(
            txt(&["google-site-verification=x", "v=STSv1; id=1; ext=y"]),
            Ok("1".into())
        );
        assert_eq!(txt(&["spf"]), Err(StsError::NoRecord));
        assert_eq!(
            txt(&["v=STSv1; id=1", "v=STSv1; id=2"]),
            Err(StsError::ManyRecords(2))
        );
        assert!(txt(&["v=STSv1"]).is_err(), "no id");
        assert!(txt(&["v=STSv1; id="]).is_err());
        assert!(txt(&["v=STSv1; id=has-dash"]).is_err());
        assert!(txt(&["v=STSv1; id=123456789012345678901234567890123"]).is_err());
        assert!(txt(&["id=1; v=STSv1"]).is_err(), "v= comes first");
    }

    #[test]
    fn policies_parse() {
        let p = Policy::parse(
            b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.Example.NET.\r\n\
              max_age: 604800\r\nfuture: ignored\r\n",
        )
        .expect("valid");
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.mx, vec!["mail.example.com", "*.example.net"]);
        assert_eq!(p.max_age_s, 604_800);
        assert_eq!(Policy::parse(p.to_text().as_bytes()), Ok(p.clone()));
        let none = Policy::parse(b"version: STSv1\nmode: none\nmax_age: 0\n").expect("none");
        assert_eq!(none.mode, Mode::None);

        let bad = |body: &str| Policy::parse(body.as_bytes()).expect_err(body);
        assert_eq!(
            bad("mode: enforce\nmx: a.test\nmax_age: 1\n"),
            StsError::Version
        );
        assert_eq!(
            bad("version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n"),
            StsError::Version
        );
        assert!(matches!(
            bad("version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n"),
            StsError::Mode(_)
        ));
        assert!(matches!(
            bad("version: STSv1\nmode: testing\nmx: a.test\nmax_age: 31557601\n"),
            StsError::MaxAge(_)
        ));
        assert!(matches!(
            bad("version: STSv1\nmode: testing\nmx: a.test\nmax_age: -1\n"),
            StsError::MaxAge(_)
        ));
        assert_eq!(
            bad("version: STSv1\nmode: testing\nmx: a.test\n"),
            StsError::NoMaxAge
        );
        assert_eq!(
            bad("version: STSv1\nmode: enforce\nmax_age: 5\n"),
            StsError::NoMx("enforce")
        );
        assert!(matches!(
            bad("version: STSv1\nmode: enforce\nmx: a..test\nmax_age: 5\n"),
            StsError::MxPattern(_)
        ));
        assert!(matches!(
            bad("version: STSv1\nmode: enforce\nmx: a.*.test\nmax_age: 5\n"),
            StsError::MxPattern(_)
        ));
        assert_eq!(
            Policy::parse(&vec![b'a'; POLICY_BYTES_MAX + 1]),
            Err(StsError::TooLarge)
        );
        assert_eq!(Policy::parse(b"\xff\xfe"), Err(StsError::NotText));
    }

    #[test]
    fn mx_patterns_match_one_label() {
        let p = Policy {
            mode: Mode::Enforce,
            mx: vec!["mail.example.com".into(), "*.example.net".into()],
            max_age_s: 1,
        };
        assert!(p.mx_matches("mail.example.com"));
        assert!(p.mx_matches("MAIL.Example.com."));
        assert!(!p.mx_matches("mail.example.com.evil"));
        assert!(!p.mx_matches("other.example.com"));
        assert!(p.mx_matches("mx1.example.net"));
        assert!(p.mx_matches("MX1.EXAMPLE.NET"));
        assert!(!p.mx_matches("a.b.example.net"), "one label only");
        assert!(!p.mx_matches("example.net"), "the wildcard needs a label");
        assert!(!p.mx_matches(".example.net"));
        assert!(!p.mx_matches("xexample.net"));
    }
}
