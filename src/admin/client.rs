//! The admin socket's client, as `epoxi queue ...`, `epoxi reload` and the SIGHUP handler use
//! it: blocking, one request line out, one answer line back.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Op;

/// How long to wait for an answer. A reload reads and checks every file of the configuration
/// (and may load keys and certificates); a summary walks every shard's queue. Both take well
/// under a second; a minute means the server is stuck, and the operator should hear so.
pub const ANSWER_TIMEOUT_S: u64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no epoxi server answers on {path} ({source}); is `epoxi serve` running with this spool?"
    )]
    NoServer {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin socket {path}: the server closed the connection without answering")]
    Closed { path: PathBuf },
    #[error("admin socket {path}: the answer is not JSON: {why}")]
    BadAnswer { path: PathBuf, why: String },
}

/// One connection to the admin socket; several requests may go over it.
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::NoServer {
            path: path.to_owned(),
            source,
        })?;
        let io = |source| ClientError::Io {
            path: path.to_owned(),
            source,
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(ANSWER_TIMEOUT_S)))
            .map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        Ok(Client {
            path: path.to_owned(),
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Send `op` and read its answer.
    pub fn request(&mut self, op: &Op) -> Result<serde_json::Value, ClientError> {
        let line = serde_json::to_string(op).map_err(|e| ClientError::BadAnswer {
            path: self.path.clone(),
            why: e.to_string(),
        })?;
        self.request_line(&line)
    }

    /// Send one raw line (tests send bad ones) and read the answer line.
    pub fn request_line(&mut self, line: &str) -> Result<serde_json::Value, ClientError> {
        let io = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        self.writer.write_all(line.as_bytes()).map_err(io)?;
        self.writer.write_all(b"\n").map_err(io)?;
        let mut answer = String::new();
        let n = self.reader.read_line(&mut answer).map_err(io)?;
        if n == 0 {
            return Err(ClientError::Closed {
                path: self.path.clone(),
            });
        }
        serde_json::from_str(&answer).map_err(|e| ClientError::BadAnswer {
            path: self.path.clone(),
            why: e.to_string(),
        })
    }
}

/// Connect to `path`, send `op`, return the answer.
pub fn request(path: &Path, op: &Op) -> Result<serde_json::Value, ClientError> {
    Client::connect(path)?.request(op)
}

/// The HTTP admin API as the CLI uses it (`--url`, `--token`): the same operations, posted to
/// `/api/admin/op/v1` (the admin socket's request line as the body).
pub struct HttpTarget {
    /// `http://host:port` (a path after it is ignored).
    pub url: String,
    pub token: Option<String>,
    /// Accept the server's certificate without checking it (a self-signed one).
    pub insecure: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum HttpClientError {
    #[error("{url}: {why}")]
    Transport { url: String, why: String },
    #[error("{url}: HTTP {status}: the answer is not JSON: {why}")]
    BadAnswer {
        url: String,
        status: u16,
        why: String,
    },
}

impl HttpTarget {
    fn agent(&self) -> ureq::Agent {
        let mut tls = ureq::tls::TlsConfig::builder().unversioned_rustls_crypto_provider(
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        );
        if self.insecure {
            tls = tls.disable_verification(true);
        }
        let config = ureq::config::Config::builder()
            .tls_config(tls.build())
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(Duration::from_secs(ANSWER_TIMEOUT_S)))
            .user_agent("epoxi-cli")
            .build();
        ureq::Agent::new_with_config(config)
    }

    /// `base` + `path`, with the base's own path dropped.
    fn endpoint(&self, path: &str) -> String {
        let base = self.url.trim_end_matches('/');
        let scheme_end = base.find("://").map_or(0, |i| i + 3);
        let host_end = base[scheme_end..]
            .find('/')
            .map_or(base.len(), |i| scheme_end + i);
        format!("{}{path}", &base[..host_end])
    }

    /// GET `path`; the JSON answer and its status.
    pub fn get(&self, path: &str) -> Result<(u16, serde_json::Value), HttpClientError> {
        let url = self.endpoint(path);
        let mut req = self.agent().get(&url);
        if let Some(token) = &self.token {
            req = req.header("Authorization", &format!("Bearer {token}"));
        }
        let response = req.call();
        read_json(&url, response)
    }

    /// Send `op` and read its answer.
    pub fn request(&self, op: &Op) -> Result<serde_json::Value, HttpClientError> {
        let url = self.endpoint("/api/admin/op/v1");
        let body = serde_json::to_vec(op).map_err(|e| HttpClientError::Transport {
            url: url.clone(),
            why: e.to_string(),
        })?;
        let mut req = self
            .agent()
            .post(&url)
            .header("Content-Type", "application/json");
        if let Some(token) = &self.token {
            req = req.header("Authorization", &format!("Bearer {token}"));
        }
        read_json(&url, req.send(&body[..])).map(|(_, v)| v)
    }
}

fn read_json(
    url: &str,
    response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> Result<(u16, serde_json::Value), HttpClientError> {
    let mut response = response.map_err(|e| HttpClientError::Transport {
        url: url.to_owned(),
        why: e.to_string(),
    })?;
    let status = response.status().as_u16();
    let text = response
        .body_mut()
        .read_to_string()
        .map_err(|e| HttpClientError::Transport {
            url: url.to_owned(),
            why: e.to_string(),
        })?;
    let value = serde_json::from_str(&text).map_err(|e| HttpClientError::BadAnswer {
        url: url.to_owned(),
        status,
        why: e.to_string(),
    })?;
    Ok((status, value))
}
