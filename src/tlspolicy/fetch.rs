//! The MTA-STS policy fetch (RFC 8461 §3.3): `GET https://mta-sts.<domain>/.well-known/
//! mta-sts.txt` with ureq on rustls/ring, blocking, so it runs on a thread of its own (the
//! shard's blocking pool); fetches are rare (once per domain per max_age or id change).
//!
//! The address comes from Epoxi's own resolver (looked up before the fetch), so ureq never
//! asks the system resolver. No redirects (§3.3: they are not followed), a 200 only, a body
//! of at most [`POLICY_BYTES_MAX`], and one timeout for the whole exchange.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ureq::unversioned::resolver::{ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};

use super::sts::POLICY_BYTES_MAX;
use super::verify::Trust;
use super::ResultType;

/// Why a fetch failed, with its RFC 8460 result type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("policy fetch failed: {0}")]
    Transport(String),
    #[error("policy server certificate refused: {0}")]
    Webpki(String),
    #[error("policy server answered HTTP {0}")]
    Status(u16),
    #[error("policy larger than {POLICY_BYTES_MAX} bytes")]
    TooLarge,
    #[error("policy host mta-sts.{0} has no address")]
    NoAddress(String),
}

impl FetchError {
    pub fn result_type(&self) -> ResultType {
        match self {
            FetchError::Webpki(_) => ResultType::StsWebpkiInvalid,
            FetchError::TooLarge => ResultType::StsPolicyInvalid,
            _ => ResultType::StsPolicyFetchError,
        }
    }
}

/// One fetch: where, trusting what, for how long.
#[derive(Clone, Debug)]
pub struct Request {
    pub domain: String,
    /// Addresses of `mta-sts.<domain>`, from Epoxi's resolver; the port is `port`.
    pub addrs: Vec<SocketAddr>,
    /// `delivery.mta_sts_https_port`: 443 but in tests.
    pub port: u16,
    pub trust: Trust,
    pub timeout: Duration,
}

/// ureq's resolver, answering with the addresses looked up already.
#[derive(Debug)]
struct Fixed(Vec<SocketAddr>);

impl Resolver for Fixed {
    fn resolve(
        &self,
        _uri: &ureq::http::Uri,
        _config: &ureq::config::Config,
        _timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let mut out = self.empty();
        for addr in self.0.iter().take(4) {
            out.push(*addr);
        }
        Ok(out)
    }
}

/// An HTTPS-only ureq agent that connects to `addrs` (looked up by Epoxi's resolver, so ureq
/// never asks the system's), trusts `trust`, follows no redirect, hands back every status and
/// gives the whole exchange `timeout`. Shared by the policy fetch and the TLS report POST.
pub fn https_agent(
    trust: &Trust,
    addrs: Vec<SocketAddr>,
    timeout: Duration,
    user_agent: &str,
) -> ureq::Agent {
    let roots = match &trust.certs {
        Some(certs) => ureq::tls::RootCerts::Specific(Arc::new(
            certs
                .iter()
                .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
                .collect(),
        )),
        None => ureq::tls::RootCerts::WebPki,
    };
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(roots)
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build();
    let config = ureq::config::Config::builder()
        .tls_config(tls)
        .https_only(true)
        .max_redirects(0)
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .user_agent(user_agent)
        .build();
    ureq::Agent::with_parts(config, DefaultConnector::default(), Fixed(addrs))
}

/// Fetch the policy body. Blocking: run it off the executor.
pub fn fetch(req: &Request) -> Result<Vec<u8>, FetchError> {
    if req.addrs.is_empty() {
        return Err(FetchError::NoAddress(req.domain.clone()));
    }
    let addrs: Vec<SocketAddr> = req
        .addrs
        .iter()
        .map(|a| SocketAddr::new(a.ip(), req.port))
        .collect();
    let agent = https_agent(&req.trust, addrs, req.timeout, "epoxi-mta-sts");
    let url = match req.port {
        443 => format!("https://mta-sts.{}/.well-known/mta-sts.txt", req.domain),
        port => format!(
            "https://mta-sts.{}:{port}/.well-known/mta-sts.txt",
            req.domain
        ),
    };
    let mut response = agent.get(&url).call().map_err(classify)?;
    let status = response.status().as_u16();
    if status != 200 {
        return Err(FetchError::Status(status));
    }
    response
        .body_mut()
        .with_config()
        .limit(POLICY_BYTES_MAX as u64)
        .read_to_vec()
        .map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(_) => FetchError::TooLarge,
            other => classify(other),
        })
}

fn classify(e: ureq::Error) -> FetchError {
    let cert = |r: &rustls::Error| matches!(r, rustls::Error::InvalidCertificate(_));
    match &e {
        ureq::Error::Rustls(r) if cert(r) => FetchError::Webpki(r.to_string()),
        ureq::Error::Io(io) => match io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(r) if cert(r) => FetchError::Webpki(r.to_string()),
            _ => FetchError::Transport(e.to_string()),
        },
        _ => FetchError::Transport(e.to_string()),
    }
}
