//! Per MX host, what the TLS session must be, from the recipient domain's MTA-STS state and the
//! host's TLSA records; and the [`TlsOutcome`] of the connection made under that plan. Pure:
//! the delivery adapter looks the records up and runs the handshake.

use std::sync::Arc;

use super::store::Cached;
use super::sts::Mode;
use super::verify::Verdict;
use super::{dane, PolicyType, ResultType, TlsOutcome, VerifiedBy};
use crate::dns::message::Tlsa;

/// What a recipient domain's mail carries with it to its site: its policy domain and what
/// MTA-STS said. Present only when something domain-specific applies, and then the site is
/// the domain's own (see `route::Site`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainSecurity {
    /// The policy domain: the recipient domain (lower case, A-labels).
    pub domain: String,
    pub sts: Sts,
    /// The MX answer was DNSSEC-secure: DANE applies to its hosts (RFC 7672 §2.2.1).
    pub mx_secure: bool,
}

/// The domain's MTA-STS state at resolution time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sts {
    None,
    Policy(Arc<Cached>),
    /// A record was published but no policy could be had, and none was cached: delivery goes
    /// on as without a policy (RFC 8461 §5.1), and the failure is reported.
    Failed {
        result: ResultType,
        why: String,
    },
}

/// What the TLSA lookup of one MX host found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsaFinding {
    /// DANE off, or the MX or address answers were not secure: not looked up.
    NotApplicable,
    /// A secure denial (or an insecure answer, which counts as none).
    None,
    /// Secure TLSA records.
    Records(Vec<Tlsa>),
    /// The lookup failed (SERVFAIL: possibly a validation failure).
    Failed(String),
}

/// What to require of the session with one MX host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostTls {
    /// Do not connect to this host.
    Skip { result: ResultType, why: String },
    /// STARTTLS required, the certificate must match one of these (usable) records.
    Dane { records: Vec<Tlsa> },
    /// TLSA records exist but none is usable: STARTTLS required, certificate unchecked
    /// (RFC 7672 §2.2).
    DaneUnusable,
    /// MTA-STS: STARTTLS with a WebPKI check for the host name; required and enforced in
    /// `enforce` mode, only recorded in `testing` mode (`mx_mismatch` too).
    Sts { enforce: bool, mx_mismatch: bool },
    /// No policy: `delivery.starttls` as configured.
    Plain,
}

impl HostTls {
    /// Whether the session must not go on without TLS.
    pub fn tls_required(&self) -> bool {
        matches!(
            self,
            HostTls::Dane { .. } | HostTls::DaneUnusable | HostTls::Sts { enforce: true, .. }
        )
    }
}

/// The plan for MX host `host` of a domain with `sec`. DANE comes first (RFC 8461 §2).
pub fn host_tls(sec: Option<&DomainSecurity>, host: &str, tlsa: &TlsaFinding) -> HostTls {
    match tlsa {
        TlsaFinding::Records(records) => {
            let usable: Vec<Tlsa> = records
                .iter()
                .filter(|r| dane::usable(r))
                .cloned()
                .collect();
            return match usable.is_empty() {
                true => HostTls::DaneUnusable,
                false => HostTls::Dane { records: usable },
            };
        }
        TlsaFinding::Failed(why) => {
            return HostTls::Skip {
                result: ResultType::DnssecInvalid,
                why: format!("TLSA lookup for {host} failed: {why}"),
            }
        }
        TlsaFinding::NotApplicable | TlsaFinding::None => {}
    }
    let Some(Sts::Policy(cached)) = sec.map(|s| &s.sts) else {
        return HostTls::Plain;
    };
    let matched = cached.policy.mx_matches(host);
    match cached.policy.mode {
        Mode::Enforce if !matched => HostTls::Skip {
            result: ResultType::ValidationFailure,
            why: format!(
                "MX host {host} is not allowed by the MTA-STS policy of {}",
                sec.map_or("", |s| s.domain.as_str())
            ),
        },
        Mode::Enforce => HostTls::Sts {
            enforce: true,
            mx_mismatch: false,
        },
        Mode::Testing => HostTls::Sts {
            enforce: false,
            mx_mismatch: !matched,
        },
        Mode::None => HostTls::Plain,
    }
}

/// How the session with one host went, as far as TLS is concerned.
#[derive(Clone, Debug, Default)]
pub struct Session {
    /// Version and cipher, when TLS was established.
    pub tls: Option<(String, String)>,
    /// The verifier's verdict, when it was asked.
    pub verdict: Option<Verdict>,
    /// Why the session failed before it was ready, if it did.
    pub failure: Option<String>,
    /// TLS was required and the server did not offer STARTTLS (or refused it).
    pub no_starttls: bool,
}

/// The outcome of connecting to `host` under `plan`.
pub fn outcome(
    sec: Option<&DomainSecurity>,
    host: &str,
    plan: &HostTls,
    tlsa: &TlsaFinding,
    session: &Session,
) -> TlsOutcome {
    let mut o = TlsOutcome::no_policy(host);
    o.policy_domain = sec.map(|s| s.domain.clone());
    if let Some((version, cipher)) = &session.tls {
        o.version = Some(version.clone());
        o.cipher = Some(cipher.clone());
        o.verified_by = VerifiedBy::Opportunistic;
    }
    let verdict_ok = session
        .verdict
        .as_ref()
        .is_some_and(|v| v.result == ResultType::Success);
    let verdict_failure = session
        .verdict
        .as_ref()
        .filter(|v| v.result != ResultType::Success);
    match (plan, tlsa) {
        (HostTls::Dane { .. } | HostTls::DaneUnusable, TlsaFinding::Records(records)) => {
            o.policy_type = PolicyType::Tlsa;
            o.policy_strings = records.iter().map(dane::presentation).collect();
        }
        (HostTls::Skip { .. }, TlsaFinding::Failed(_)) => o.policy_type = PolicyType::Tlsa,
        _ => {
            if let Some(s) = sec {
                match &s.sts {
                    Sts::Policy(c) if c.policy.mode != Mode::None => {
                        o.policy_type = PolicyType::Sts;
                        o.policy_strings = c.policy.strings();
                    }
                    Sts::Failed { result, why } => {
                        o.policy_type = PolicyType::Sts;
                        o.result = *result;
                        o.failure = Some(why.clone());
                    }
                    _ => {}
                }
            }
        }
    }
    match plan {
        HostTls::Skip { result, why } => {
            o.result = *result;
            o.failure = Some(why.clone());
        }
        HostTls::Dane { .. } if session.tls.is_some() && verdict_ok => {
            o.verified = true;
            o.verified_by = VerifiedBy::Dane;
        }
        HostTls::Sts {
            enforce,
            mx_mismatch,
        } => {
            if session.tls.is_some() && verdict_ok && !mx_mismatch {
                o.verified = true;
                o.verified_by = VerifiedBy::MtaSts;
            } else if *mx_mismatch {
                o.result = ResultType::ValidationFailure;
                o.failure = Some(format!(
                    "MX host {host} is not allowed by the MTA-STS policy (testing mode)"
                ));
            }
            if let Some(v) = verdict_failure {
                o.result = v.result;
                o.failure = v.why.clone();
            }
            if session.tls.is_none() && !enforce && session.failure.is_none() {
                o.result = ResultType::StarttlsNotSupported;
                o.failure = Some(format!("{host} did not offer STARTTLS"));
            }
        }
        _ => {
            if let Some(v) = verdict_failure {
                o.result = v.result;
                o.failure = v.why.clone();
            }
        }
    }
    if session.no_starttls && plan.tls_required() {
        o.result = ResultType::StarttlsNotSupported;
        o.failure = Some(format!(
            "{host} did not offer STARTTLS, which its policy requires"
        ));
    } else if o.result == ResultType::Success {
        if let Some(why) = &session.failure {
            if plan.tls_required() && session.tls.is_none() {
                o.result = ResultType::ValidationFailure;
                o.failure = Some(why.clone());
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tlspolicy::sts::Policy;

    fn sec(mode: Mode, mx: &[&str]) -> DomainSecurity {
        DomainSecurity {
            domain: "a.test".into(),
            sts: Sts::Policy(Arc::new(Cached {
                id: "1".into(),
                policy: Policy {
                    mode,
                    mx: mx.iter().map(|s| s.to_string()).collect(),
                    max_age_s: 86_400,
                },
                fetched_ms: 0,
            })),
            mx_secure: false,
        }
    }

    fn tlsa() -> Tlsa {
        Tlsa {
            usage: 3,
            selector: 1,
            matching: 1,
            data: vec![7; 32],
        }
    }

    #[test]
    fn plans() {
        let na = TlsaFinding::NotApplicable;
        let enforce = sec(Mode::Enforce, &["*.mx.test"]);
        assert_eq!(
            host_tls(Some(&enforce), "a.mx.test", &na),
            HostTls::Sts {
                enforce: true,
                mx_mismatch: false
            }
        );
        assert!(matches!(
            host_tls(Some(&enforce), "evil.test", &na),
            HostTls::Skip {
                result: ResultType::ValidationFailure,
                ..
            }
        ));
        let testing = sec(Mode::Testing, &["*.mx.test"]);
        assert_eq!(
            host_tls(Some(&testing), "evil.test", &na),
            HostTls::Sts {
                enforce: false,
                mx_mismatch: true
            }
        );
        assert_eq!(
            host_tls(Some(&sec(Mode::None, &[])), "x.test", &na),
            HostTls::Plain
        );
        assert_eq!(host_tls(None, "x.test", &na), HostTls::Plain);
        // DANE first, even over an enforce policy that would refuse the host.
        let records = TlsaFinding::Records(vec![tlsa()]);
        assert_eq!(
            host_tls(Some(&enforce), "evil.test", &records),
            HostTls::Dane {
                records: vec![tlsa()]
            }
        );
        let mut pkix = tlsa();
        pkix.usage = 1;
        assert_eq!(
            host_tls(None, "x.test", &TlsaFinding::Records(vec![pkix])),
            HostTls::DaneUnusable
        );
        assert!(matches!(
            host_tls(None, "x.test", &TlsaFinding::Failed("SERVFAIL".into())),
            HostTls::Skip {
                result: ResultType::DnssecInvalid,
                ..
            }
        ));
    }

    #[test]
    fn outcomes() {
        let enforce = sec(Mode::Enforce, &["mx.test"]);
        let plan = HostTls::Sts {
            enforce: true,
            mx_mismatch: false,
        };
        let ok = Session {
            tls: Some(("TLSv1_3".into(), "AES".into())),
            verdict: Some(Verdict {
                result: ResultType::Success,
                why: None,
            }),
            ..Session::default()
        };
        let na = TlsaFinding::NotApplicable;
        let o = outcome(Some(&enforce), "mx.test", &plan, &na, &ok);
        assert_eq!(o.result, ResultType::Success);
        assert_eq!(o.policy_type, PolicyType::Sts);
        assert_eq!(o.verified_by, VerifiedBy::MtaSts);
        assert!(o.verified);
        assert_eq!(o.policy_domain.as_deref(), Some("a.test"));
        assert!(o.policy_strings.contains(&"mode: enforce".to_owned()));

        let bad = Session {
            verdict: Some(Verdict {
                result: ResultType::CertificateHostMismatch,
                why: Some("name".into()),
            }),
            failure: Some("handshake failed".into()),
            ..Session::default()
        };
        let o = outcome(Some(&enforce), "mx.test", &plan, &na, &bad);
        assert_eq!(o.result, ResultType::CertificateHostMismatch);
        assert!(!o.verified);

        let no_tls = Session {
            no_starttls: true,
            failure: Some("STARTTLS not offered".into()),
            ..Session::default()
        };
        let o = outcome(Some(&enforce), "mx.test", &plan, &na, &no_tls);
        assert_eq!(o.result, ResultType::StarttlsNotSupported);

        // Testing mode: delivered over unverified TLS, the failure kept for the report.
        let testing = sec(Mode::Testing, &["mx.test"]);
        let plan = HostTls::Sts {
            enforce: false,
            mx_mismatch: false,
        };
        let unverified = Session {
            tls: Some(("TLSv1_3".into(), "AES".into())),
            verdict: Some(Verdict {
                result: ResultType::CertificateNotTrusted,
                why: Some("unknown issuer".into()),
            }),
            ..Session::default()
        };
        let o = outcome(Some(&testing), "mx.test", &plan, &na, &unverified);
        assert_eq!(o.result, ResultType::CertificateNotTrusted);
        assert_eq!(o.verified_by, VerifiedBy::Opportunistic);

        let records = TlsaFinding::Records(vec![tlsa()]);
        let plan = HostTls::Dane {
            records: vec![tlsa()],
        };
        let o = outcome(None, "mx.test", &plan, &records, &ok);
        assert_eq!(o.policy_type, PolicyType::Tlsa);
        assert_eq!(o.verified_by, VerifiedBy::Dane);
        assert_eq!(o.policy_strings.len(), 1);

        let o = outcome(None, "mx.test", &HostTls::Plain, &na, &Session::default());
        assert_eq!(o.policy_type, PolicyType::NoPolicyFound);
        assert_eq!(o.verified_by, VerifiedBy::None);
    }
}
