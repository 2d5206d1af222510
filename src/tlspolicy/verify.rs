//! Certificate verifiers for policy-bound TLS sessions, each recording its verdict in a slot
//! the delivery adapter reads after the handshake: the WebPKI check of MTA-STS (against
//! `delivery.tls_ca_file`, or the bundled web roots), and the client configurations built on
//! them. The verifiers do no I/O.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::ResultType;
use crate::tls::TlsError;

/// What a verifier concluded about the certificate, when it was asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub result: ResultType,
    pub why: Option<String>,
}

/// Where a verifier leaves its verdict for the connection that made it.
pub type Slot = Arc<Mutex<Option<Verdict>>>;

pub fn new_slot() -> Slot {
    Arc::new(Mutex::new(None))
}

/// The verdict left in `slot`, if the handshake got as far as the certificate.
pub fn take(slot: &Slot) -> Option<Verdict> {
    slot.lock().ok().and_then(|mut v| v.take())
}

pub(super) fn record(slot: &Slot, verdict: Verdict) {
    if let Ok(mut v) = slot.lock() {
        *v = Some(verdict);
    }
}

/// The roots MX hosts and MTA-STS policy servers are checked against.
#[derive(Clone, Debug)]
pub struct Trust {
    pub store: Arc<RootCertStore>,
    /// The certificates of the configured bundle; None: the bundled web roots.
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// The PEM bundle at `ca_file` when given, else the Mozilla roots bundled with webpki-roots.
pub fn trust(ca_file: Option<&Path>) -> Result<Trust, TlsError> {
    let Some(ca_file) = ca_file else {
        return Ok(Trust {
            store: Arc::new(RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            }),
            certs: None,
        });
    };
    let cert_err = |reason: String| TlsError::Certificate {
        path: ca_file.display().to_string(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    let mut certs = Vec::new();
    for cert in CertificateDer::pem_file_iter(ca_file).map_err(|e| cert_err(e.to_string()))? {
        let cert = cert.map_err(|e| cert_err(e.to_string()))?;
        // Bundles hold the odd certificate webpki cannot parse; skip it rather than fail all.
        if roots.add(cert.clone()).is_ok() {
            certs.push(cert);
        }
    }
    if roots.is_empty() {
        return Err(cert_err("no usable CA certificate".into()));
    }
    Ok(Trust {
        store: Arc::new(roots),
        certs: Some(Arc::new(certs)),
    })
}

/// A client configuration (TLS 1.2 and 1.3, ring) that checks certificates with `verifier`.
pub fn client_config(
    verifier: Arc<dyn ServerCertVerifier>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The WebPKI verifier over `roots`, on ring.
pub fn webpki(roots: Arc<RootCertStore>) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    WebPkiServerVerifier::builder_with_provider(roots, provider)
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))
}

/// MTA-STS (RFC 8461 §4.2): the certificate must chain to a trusted root and be valid for the
/// MX host name. In `enforce` mode a failure fails the handshake; in `testing` mode it is only
/// recorded and the session goes on.
#[derive(Debug)]
pub struct StsVerifier {
    pub inner: Arc<WebPkiServerVerifier>,
    pub enforce: bool,
    pub slot: Slot,
}

impl ServerCertVerifier for StsVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let checked =
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        let verdict = match &checked {
            Ok(_) => Verdict {
                result: ResultType::Success,
                why: None,
            },
            Err(e) => Verdict {
                result: ResultType::of_cert_error(e),
                why: Some(e.to_string()),
            },
        };
        record(&self.slot, verdict);
        match checked {
            Err(e) if self.enforce => Err(e),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
