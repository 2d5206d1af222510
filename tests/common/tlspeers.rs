//! TLS peers for the transport-security tests: a test CA (rcgen), certificates it signs, and a
//! small HTTPS server on loopback serving MTA-STS policies by Host header. The server thread
//! polls a stop flag, so dropping it ends it.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A certificate authority for tests.
pub struct TestCa {
    key: rcgen::KeyPair,
    cert: rcgen::Certificate,
}

/// A certificate and key, as PEM files and as DER.
pub struct Issued {
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
    pub cert_der: CertificateDer<'static>,
    pub key_der: Vec<u8>,
    /// The DER SubjectPublicKeyInfo, for TLSA `3 1 x` records.
    pub spki_der: Vec<u8>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("CA cert");
        TestCa { key, cert }
    }

    /// Writes the CA certificate (PEM) to `path`.
    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.cert.pem()).expect("write CA");
        path.to_owned()
    }

    /// A certificate for `names`, written to `dir/<stem>.{crt,key}`.
    pub fn issue(&self, dir: &Path, stem: &str, names: &[&str]) -> Issued {
        let key = rcgen::KeyPair::generate().expect("key");
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let cert = rcgen::CertificateParams::new(names)
            .expect("params")
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign");
        let cert_pem = dir.join(format!("{stem}.crt"));
        let key_pem = dir.join(format!("{stem}.key"));
        std::fs::write(&cert_pem, cert.pem()).expect("write cert");
        std::fs::write(&key_pem, key.serialize_pem()).expect("write key");
        Issued {
            cert_pem,
            key_pem,
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
            spki_der: key.public_key_der(),
        }
    }
}

pub fn sha256(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

/// A POST the server took.
#[derive(Clone, Debug)]
pub struct Post {
    pub path: String,
    pub content_type: String,
    pub body: Vec<u8>,
}

/// An HTTPS server on 127.0.0.1 serving `/.well-known/mta-sts.txt` by Host, and taking POSTs
/// (answered 201) for TLS reports.
pub struct PolicyServer {
    pub addr: SocketAddr,
    pub fetches: Arc<AtomicUsize>,
    /// POSTs received (TLS reports, RFC 8460 §5.4): path, content type, body.
    pub posts: Arc<Mutex<Vec<Post>>>,
    policies: Arc<Mutex<HashMap<String, String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PolicyServer {
    pub fn start(identity: &Issued) -> PolicyServer {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key_der.clone()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![identity.cert_der.clone()], key)
            .expect("server config");
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind HTTPS");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let fetches = Arc::new(AtomicUsize::new(0));
        let policies: Arc<Mutex<HashMap<String, String>>> = Arc::default();
        let posts: Arc<Mutex<Vec<Post>>> = Arc::default();
        let (s, f, p, q) = (
            stop.clone(),
            fetches.clone(),
            policies.clone(),
            posts.clone(),
        );
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => serve_one(stream, &config, &p, &f, &q),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        PolicyServer {
            addr,
            fetches,
            posts,
            policies,
            stop,
            thread: Some(thread),
        }
    }

    /// Serve `body` for `mta-sts.<domain>`.
    pub fn policy(&self, domain: &str, body: &str) -> &Self {
        self.policies
            .lock()
            .expect("policies")
            .insert(format!("mta-sts.{domain}"), body.to_owned());
        self
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for PolicyServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_one(
    stream: std::net::TcpStream,
    config: &Arc<rustls::ServerConfig>,
    policies: &Mutex<HashMap<String, String>>,
    fetches: &AtomicUsize,
    posts: &Mutex<Vec<Post>>,
) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(conn, stream);
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 << 10 {
        match tls.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&req).to_string();
    let host = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("host").then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    let host = host.split(':').next().unwrap_or_default().to_owned();
    let header = |name: &str| {
        text.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
            .unwrap_or_default()
    };
    if let Some(rest) = text.strip_prefix("POST ") {
        let path = rest.split(' ').next().unwrap_or_default().to_owned();
        let len: usize = header("content-length").parse().unwrap_or(0);
        let start = req
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(req.len(), |p| p + 4);
        let mut body = req[start..].to_vec();
        while body.len() < len.min(1 << 20) {
            match tls.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => body.extend_from_slice(&buf[..n]),
            }
        }
        posts.lock().expect("posts").push(Post {
            path,
            content_type: header("content-type"),
            body,
        });
        let _ = tls
            .write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        let _ = tls.flush();
        tls.conn.send_close_notify();
        let _ = tls.flush();
        return;
    }
    let ok_path = text.starts_with("GET /.well-known/mta-sts.txt ");
    let body = policies.lock().expect("policies").get(&host).cloned();
    let response = match (ok_path, body) {
        (true, Some(body)) => {
            fetches.fetch_add(1, Ordering::SeqCst);
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        }
        _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
    };
    let _ = tls.write_all(response.as_bytes());
    let _ = tls.flush();
    tls.conn.send_close_notify();
    let _ = tls.flush();
}
