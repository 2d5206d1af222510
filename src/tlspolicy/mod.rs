//! Outbound transport security: MTA-STS (RFC 8461) and DANE (RFC 7672), decided per recipient
//! domain and per MX host, and the TLS outcome of each delivery as a typed value (what TLS
//! reporting, RFC 8460, will count).
//!
//! - [`sts`]: the `_mta-sts` TXT record and the policy file: parser and MX matcher. No I/O.
//! - [`store`]: the per-shard policy cache (fresh, stale, refresh on id change) and its file
//!   format in the spool dir. Decisions are pure; reading and writing files is a thin edge.
//! - [`dane`]: TLSA matching and the rustls verifier built on it. No I/O.
//! - [`verify`]: the WebPKI verifier for MTA-STS hosts, recording its verdict for the outcome.
//! - [`fetch`]: the HTTPS policy fetch (ureq on rustls/ring), run off the executor.
//! - [`lookup`]: the async adapter: TXT lookup, cache, fetch, file; what a site carries.
//! - [`plan`]: per MX host, what to require of the TLS session. Pure.
//!
//! Invariants: a policy belongs to one policy domain (the recipient domain) and never travels
//! with the MX hosts: a site that carries a policy is keyed by its domain too, so two domains
//! sharing MX hosts never share a policy decision. DANE (per MX host) takes precedence over
//! MTA-STS. Neither ever falls back to plaintext where TLS is required.

pub mod dane;
pub mod fetch;
pub mod lookup;
pub mod plan;
pub mod store;
pub mod sts;
pub mod verify;

use serde::{Deserialize, Serialize};

/// RFC 8460 §4.4 policy types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyType {
    Sts,
    Tlsa,
    NoPolicyFound,
}

impl PolicyType {
    /// The RFC 8460 name.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyType::Sts => "sts",
            PolicyType::Tlsa => "tlsa",
            PolicyType::NoPolicyFound => "no-policy-found",
        }
    }
}

/// RFC 8460 §4.3 result types, and success.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResultType {
    Success,
    StarttlsNotSupported,
    CertificateHostMismatch,
    CertificateExpired,
    CertificateNotTrusted,
    ValidationFailure,
    StsPolicyFetchError,
    StsPolicyInvalid,
    StsWebpkiInvalid,
    TlsaInvalid,
    DnssecInvalid,
    DaneRequired,
}

impl ResultType {
    /// The RFC 8460 name.
    pub fn as_str(self) -> &'static str {
        match self {
            ResultType::Success => "success",
            ResultType::StarttlsNotSupported => "starttls-not-supported",
            ResultType::CertificateHostMismatch => "certificate-host-mismatch",
            ResultType::CertificateExpired => "certificate-expired",
            ResultType::CertificateNotTrusted => "certificate-not-trusted",
            ResultType::ValidationFailure => "validation-failure",
            ResultType::StsPolicyFetchError => "sts-policy-fetch-error",
            ResultType::StsPolicyInvalid => "sts-policy-invalid",
            ResultType::StsWebpkiInvalid => "sts-webpki-invalid",
            ResultType::TlsaInvalid => "tlsa-invalid",
            ResultType::DnssecInvalid => "dnssec-invalid",
            ResultType::DaneRequired => "dane-required",
        }
    }

    /// The result type of a certificate the WebPKI refused.
    pub fn of_cert_error(e: &rustls::Error) -> ResultType {
        use rustls::CertificateError as C;
        match e {
            rustls::Error::InvalidCertificate(c) => match c {
                C::NotValidForName | C::NotValidForNameContext { .. } => {
                    ResultType::CertificateHostMismatch
                }
                C::Expired | C::ExpiredContext { .. } | C::NotValidYet => {
                    ResultType::CertificateExpired
                }
                C::UnknownIssuer | C::BadSignature | C::Revoked => {
                    ResultType::CertificateNotTrusted
                }
                _ => ResultType::ValidationFailure,
            },
            _ => ResultType::ValidationFailure,
        }
    }
}

/// By what the peer's certificate was checked, as the delivery event says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerifiedBy {
    /// No TLS at all.
    None,
    /// TLS, certificate not checked (no policy, MTA-STS `testing` that failed, or DANE with
    /// only unusable TLSA records).
    Opportunistic,
    /// Checked against the CA bundle and the MX host name, as the domain's MTA-STS policy asks.
    MtaSts,
    /// Matched the MX host's TLSA records.
    Dane,
}

/// The TLS result of one connection to one MX host, for the delivery events and (later) TLS
/// reports. `policy_domain` is None where no domain-specific policy applied (a shared site):
/// the event fills in the recipient's domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsOutcome {
    pub policy_domain: Option<String>,
    pub policy_type: PolicyType,
    /// RFC 8460 `policy-string`: the MTA-STS policy lines, or the TLSA records in
    /// presentation form.
    pub policy_strings: Vec<String>,
    pub mx_host: String,
    pub result: ResultType,
    /// What went wrong, in words, when `result` is not success.
    pub failure: Option<String>,
    pub version: Option<String>,
    pub cipher: Option<String>,
    pub verified: bool,
    pub verified_by: VerifiedBy,
}

impl TlsOutcome {
    /// A connection with no policy: plain or opportunistic TLS.
    pub fn no_policy(mx_host: &str) -> TlsOutcome {
        TlsOutcome {
            policy_domain: None,
            policy_type: PolicyType::NoPolicyFound,
            policy_strings: Vec::new(),
            mx_host: mx_host.to_owned(),
            result: ResultType::Success,
            failure: None,
            version: None,
            cipher: None,
            verified: false,
            verified_by: VerifiedBy::None,
        }
    }
}
