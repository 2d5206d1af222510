//! TLS for SMTP (STARTTLS and implicit TLS) with rustls on the ring provider, as a layer that
//! does no I/O: the adapter feeds it bytes read from the socket and writes what it returns, the
//! same way it drives the SMTP state machines.
//!
//! The certificate and key come from PEM files; with none configured a self-signed certificate
//! for the server's hostname is generated at start, so STARTTLS always works (senders on the
//! internet encrypt opportunistically and do not verify certificates).

use std::io::{ErrorKind, Read, Write};
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Plaintext drained from rustls per call to its reader; bounds a stack buffer only.
const PLAINTEXT_CHUNK_BYTES: usize = 16 << 10;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read TLS certificate file {path}: {reason}")]
    Certificate { path: String, reason: String },
    #[error("cannot read TLS key file {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    #[error("TLS configuration rejected: {0}")]
    Config(String),
    #[error("TLS error: {0}")]
    Protocol(String),
}

/// The certificate chain and key to serve.
pub type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// Load a certificate chain and private key from PEM files.
pub fn load_identity(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
    let cert_err = |reason: String| TlsError::Certificate {
        path: cert.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_err("no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok((certs, key))
}

/// A self-signed certificate for `hostname`.
pub fn self_signed(hostname: &str) -> Result<Identity, TlsError> {
    let made = rcgen::generate_simple_self_signed(vec![hostname.to_owned()])
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    let key = PrivatePkcs8KeyDer::from(made.key_pair.serialize_der());
    Ok((vec![made.cert.der().clone()], PrivateKeyDer::Pkcs8(key)))
}

/// A server configuration (TLS 1.2 and 1.3, ring's cipher suites) for `identity`.
pub fn server_config(identity: Identity) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (certs, key) = identity;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(config))
}

/// What the log records about an established TLS session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsInfo {
    pub version: String,
    pub cipher: String,
}

/// One TLS connection, server side, with no I/O.
pub struct TlsLayer {
    conn: rustls::ServerConnection,
}

impl TlsLayer {
    pub fn new(config: Arc<rustls::ServerConfig>) -> Result<TlsLayer, TlsError> {
        let conn =
            rustls::ServerConnection::new(config).map_err(|e| TlsError::Protocol(e.to_string()))?;
        Ok(TlsLayer { conn })
    }

    /// Take bytes read from the socket: decrypted application data is appended to `plain`,
    /// and anything rustls must send (handshake, alerts) to `wire_out`.
    pub fn receive(
        &mut self,
        mut wire_in: &[u8],
        plain: &mut Vec<u8>,
        wire_out: &mut Vec<u8>,
    ) -> Result<(), TlsError> {
        while !wire_in.is_empty() {
            self.conn
                .read_tls(&mut wire_in)
                .map_err(|e| TlsError::Protocol(e.to_string()))?;
            let state = self.conn.process_new_packets();
            // Even on error rustls may have an alert to send; send it before giving up.
            self.flush(wire_out);
            state.map_err(|e| TlsError::Protocol(e.to_string()))?;
            self.drain_plaintext(plain)?;
        }
        self.flush(wire_out);
        Ok(())
    }

    /// Encrypt `plain` for the socket, appending the records to `wire_out`.
    pub fn send(&mut self, plain: &[u8], wire_out: &mut Vec<u8>) -> Result<(), TlsError> {
        self.conn
            .writer()
            .write_all(plain)
            .map_err(|e| TlsError::Protocol(e.to_string()))?;
        self.flush(wire_out);
        Ok(())
    }

    /// Still negotiating: application data cannot flow yet.
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Version and cipher suite, once the handshake is done.
    pub fn info(&self) -> Option<TlsInfo> {
        let version = self.conn.protocol_version()?;
        let cipher = self.conn.negotiated_cipher_suite()?;
        Some(TlsInfo {
            version: format!("{version:?}"),
            cipher: format!("{:?}", cipher.suite()),
        })
    }

    fn flush(&mut self, wire_out: &mut Vec<u8>) {
        while self.conn.wants_write() {
            // Writing into a Vec cannot fail.
            if self.conn.write_tls(wire_out).is_err() {
                break;
            }
        }
    }

    fn drain_plaintext(&mut self, plain: &mut Vec<u8>) -> Result<(), TlsError> {
        let mut chunk = [0u8; PLAINTEXT_CHUNK_BYTES];
        loop {
            match self.conn.reader().read(&mut chunk) {
                Ok(0) => return Ok(()),
                Ok(n) => plain.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(TlsError::Protocol(e.to_string())),
            }
        }
    }
}

/// Client configuration for opportunistic STARTTLS: encrypt, but accept any certificate, as
/// mail servers on the internet mostly present ones that would not verify. Handshake signatures
/// are still checked.
pub fn client_config_unverified() -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(AnyCertificate(provider.clone()));
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Client configuration for required TLS: certificates must chain to a root in `ca_file` (PEM,
/// e.g. the system bundle) and match the destination's host name.
pub fn client_config_verified(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let cert_err = |reason: String| TlsError::Certificate {
        path: ca_file.display().to_string(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).map_err(|e| cert_err(e.to_string()))? {
        let cert = cert.map_err(|e| cert_err(e.to_string()))?;
        // Bundles hold the odd certificate webpki cannot parse; skip it rather than fail all.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(cert_err("no usable CA certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that trusts exactly `cert`.
    fn client_for(cert: &CertificateDer<'static>, name: &str) -> rustls::ClientConnection {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.clone()).expect("trust the test certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(name.to_owned()).expect("server name");
        rustls::ClientConnection::new(Arc::new(config), name).expect("client")
    }

    /// Run client and server against each other in memory until neither has anything to send.
    fn pump(client: &mut rustls::ClientConnection, server: &mut TlsLayer, plain: &mut Vec<u8>) {
        for _ in 0..20 {
            let mut to_server = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut to_server).expect("client write");
            }
            let mut to_client = Vec::new();
            server
                .receive(&to_server, plain, &mut to_client)
                .expect("server receive");
            let mut rd = &to_client[..];
            while !rd.is_empty() {
                client.read_tls(&mut rd).expect("client read");
                client.process_new_packets().expect("client process");
            }
            if to_server.is_empty() && to_client.is_empty() {
                return;
            }
        }
        panic!("handshake did not settle");
    }

    #[test]
    fn self_signed_handshake_and_data_both_ways() {
        let identity = self_signed("mx.epoxi.test").expect("generate");
        let cert = identity.0[0].clone();
        let mut server = TlsLayer::new(server_config(identity).expect("config")).expect("layer");
        let mut client = client_for(&cert, "mx.epoxi.test");
        let mut plain = Vec::new();
        pump(&mut client, &mut server, &mut plain);
        assert!(!server.is_handshaking());
        let info = server.info().expect("negotiated");
        assert!(info.version.contains("TLS"), "{info:?}");
        assert!(!info.cipher.is_empty());

        client
            .writer()
            .write_all(b"EHLO client.test\r\n")
            .expect("client plaintext");
        pump(&mut client, &mut server, &mut plain);
        assert_eq!(plain, b"EHLO client.test\r\n");

        let mut wire = Vec::new();
        server
            .send(b"250 mx.epoxi.test\r\n", &mut wire)
            .expect("server send");
        let mut rd = &wire[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).expect("client read");
            client.process_new_packets().expect("process");
        }
        let mut got = vec![0u8; 64];
        let n = client.reader().read(&mut got).expect("client reads reply");
        assert_eq!(&got[..n], b"250 mx.epoxi.test\r\n");
    }

    #[test]
    fn identity_loads_from_pem_files_and_bad_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let made = rcgen::generate_simple_self_signed(vec!["a.test".to_owned()]).expect("gen");
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        std::fs::write(&cert_path, made.cert.pem()).expect("write cert");
        std::fs::write(&key_path, made.key_pair.serialize_pem()).expect("write key");
        let identity = load_identity(&cert_path, &key_path).expect("load");
        assert_eq!(identity.0.len(), 1);
        assert!(server_config(identity).is_ok());

        let err = load_identity(&dir.path().join("missing.pem"), &key_path).expect_err("missing");
        assert!(err.to_string().contains("missing.pem"), "{err}");
        std::fs::write(dir.path().join("empty.pem"), "not pem\n").expect("write");
        let err = load_identity(&dir.path().join("empty.pem"), &key_path).expect_err("empty");
        assert!(err.to_string().contains("empty.pem"), "{err}");
        let err = load_identity(&cert_path, &cert_path).expect_err("cert is not a key");
        assert!(err.to_string().contains("key file"), "{err}");
    }

    #[test]
    fn garbage_from_the_client_is_an_error_not_a_panic() {
        let identity = self_signed("mx.epoxi.test").expect("generate");
        let mut server = TlsLayer::new(server_config(identity).expect("config")).expect("layer");
        let (mut plain, mut out) = (Vec::new(), Vec::new());
        let err = server.receive(
            b"EHLO plaintext where TLS was expected\r\n",
            &mut plain,
            &mut out,
        );
        assert!(err.is_err());
        assert!(plain.is_empty());
    }
}
