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
