//! One outbound SMTP session's I/O: the socket (plain or TLS after STARTTLS), the per-phase
//! reply timeouts (RFC 5321 §4.5.3.2, as io_uring timeouts on each read), greeting and EHLO,
//! and QUIT. The client state machine decides what to send; this moves the bytes.

use std::io::{ErrorKind, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use crate::egress::Source;
use crate::settings::Settings;
use crate::smtp::client::{Awaiting, Client, ClientConfig, ClientStep, TlsPolicy};

/// Bytes read from the socket at a time. Replies are short; 16 KiB holds hundreds of them.
const READ_BUF_BYTES: usize = 16 << 10;
/// Longest reply line accepted from a server (RFC 5321 §4.5.3.1.5 says 512; be lenient).
const REPLY_LINE_LEN_MAX: usize = 4096;
/// Longest wait for the reply to QUIT.
const QUIT_REPLY_WAIT: Duration = Duration::from_secs(2);

/// Why an outbound session failed. The text is what the recipients' events and deferrals say.
#[derive(Debug, thiserror::Error)]
pub(super) enum SessionError {
    #[error("write failed: {0}")]
    Write(std::io::Error),
    #[error("read failed: {0}")]
    Read(std::io::Error),
    #[error("connection closed by the remote server")]
    Closed,
    #[error("timed out waiting for a reply")]
    Timeout,
    #[error("TLS error: {0}")]
    Tls(String),
    #[error("bad TLS server name `{host}`: {why}")]
    ServerName { host: String, why: String },
    #[error("TLS handshake with {host} failed: {why}")]
    Handshake { host: String, why: String },
    #[error("TLS required but no CA bundle loaded")]
    NoCaBundle,
    #[error("refused the session: {0}")]
    Refused(String),
    #[error("TLS required but STARTTLS not offered or refused: {0}")]
    NoStartTls(String),
    #[error("unexpected client step {0}")]
    Unexpected(String),
}

/// RFC 5321 §4.5.3.2's per-phase waits, from `[delivery]`.
pub(super) struct Timeouts {
    reply: Duration,
    data_init: Duration,
    final_dot: Duration,
}

pub(super) struct Conn {
    pub(super) stream: TcpStream,
    pub(super) timeouts: Timeouts,
    pub(super) client: Client,
    buf: Vec<u8>,
    pub(super) out: Vec<u8>,
    /// TLS after STARTTLS; `wire` holds ciphertext on its way to the socket.
    tls: Option<rustls::ClientConnection>,
    wire: Vec<u8>,
}

impl Conn {
    pub(super) async fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        match &mut self.tls {
            None => self.stream.write_all(&self.out).await?,
            Some(tls) => {
                // rustls buffers at most 64 KiB (its default limit) of records not yet written
                // out and takes no more plaintext until they are: a message body is fed to it
                // piece by piece, each piece's records sent before the next.
                let mut rest = &self.out[..];
                while !rest.is_empty() {
                    let n = tls.writer().write(rest)?;
                    rest = &rest[n..];
                    self.wire.clear();
                    while tls.wants_write() {
                        tls.write_tls(&mut self.wire)?;
                    }
                    if n == 0 && self.wire.is_empty() {
                        return Err(ErrorKind::WriteZero.into());
                    }
                    self.stream.write_all(&self.wire).await?;
                }
            }
        }
        self.out.clear();
        Ok(())
    }

    /// Flush what the client wrote, then read more of the server's replies into it.
    pub(super) async fn exchange(&mut self) -> Result<(), SessionError> {
        self.flush().await.map_err(SessionError::Write)?;
        let n = self.read_socket().await?;
        match &mut self.tls {
            None => self.client.input(&self.buf[..n]),
            Some(tls) => {
                let mut rd = &self.buf[..n];
                while !rd.is_empty() {
                    tls.read_tls(&mut rd)
                        .map_err(|e| SessionError::Tls(format!("read failed: {e}")))?;
                    tls.process_new_packets()
                        .map_err(|e| SessionError::Tls(e.to_string()))?;
                }
                let mut plain = [0u8; 4096];
                loop {
                    match tls.reader().read(&mut plain) {
                        Ok(0) => break,
                        Ok(m) => self.client.input(&plain[..m]),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => return Err(SessionError::Tls(e.to_string())),
                    }
                }
            }
        }
        Ok(())
    }

    pub(super) async fn read_socket(&mut self) -> Result<usize, SessionError> {
        let timeout = match self.client.awaiting() {
            Awaiting::Reply => self.timeouts.reply,
            Awaiting::DataInit => self.timeouts.data_init,
            Awaiting::FinalDot => self.timeouts.final_dot,
        };
        let _ = self.stream.set_read_timeout(Some(timeout));
        match self.stream.read(&mut self.buf).await {
            Ok(0) => Err(SessionError::Closed),
            Ok(n) => Ok(n),
            Err(e) if e.kind() == ErrorKind::TimedOut => Err(SessionError::Timeout),
            Err(e) => Err(SessionError::Read(e)),
        }
    }

    /// Run the TLS handshake after the server accepted STARTTLS.
    async fn start_tls(
        &mut self,
        config: Arc<rustls::ClientConfig>,
        host: &str,
    ) -> Result<(), SessionError> {
        self.flush().await.map_err(SessionError::Write)?;
        let name = rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| {
            SessionError::ServerName {
                host: host.to_owned(),
                why: e.to_string(),
            }
        })?;
        let mut tls = rustls::ClientConnection::new(config, name)
            .map_err(|e| SessionError::Tls(e.to_string()))?;
        loop {
            self.wire.clear();
            while tls.wants_write() {
                tls.write_tls(&mut self.wire)
                    .map_err(|e| SessionError::Tls(e.to_string()))?;
            }
            if !self.wire.is_empty() {
                self.stream
                    .write_all(&self.wire)
                    .await
                    .map_err(SessionError::Write)?;
            }
            if !tls.is_handshaking() {
                break;
            }
            let n = self.read_socket().await?;
            let mut rd = &self.buf[..n];
            while !rd.is_empty() {
                tls.read_tls(&mut rd)
                    .map_err(|e| SessionError::Tls(format!("read failed: {e}")))?;
                if let Err(e) = tls.process_new_packets() {
                    // Send our alert before giving up, so the server logs why.
                    self.wire.clear();
                    let _ = tls.write_tls(&mut self.wire);
                    let _ = self.stream.write_all(&self.wire).await;
                    return Err(SessionError::Handshake {
                        host: host.to_owned(),
                        why: e.to_string(),
                    });
                }
            }
        }
        self.tls = Some(tls);
        Ok(())
    }

    /// TLS version and cipher suite, once STARTTLS succeeded.
    pub(super) fn tls_info(&self) -> Option<(String, String)> {
        let tls = self.tls.as_ref()?;
        let version = tls.protocol_version()?;
        let cipher = tls.negotiated_cipher_suite()?;
        Some((format!("{version:?}"), format!("{:?}", cipher.suite())))
    }

    /// QUIT, then wait (briefly) for the server's reply before closing: RFC 5321 §3.3 asks
    /// for it, and a connection counted against a site's limit ends when the server knows it.
    pub(super) async fn quit(mut self) {
        self.client.quit(&mut self.out);
        if self.flush().await.is_ok() {
            self.timeouts.reply = self.timeouts.reply.min(QUIT_REPLY_WAIT);
            while self.client.poll(&mut self.out) == ClientStep::NeedInput {
                if self.exchange().await.is_err() {
                    break;
                }
            }
            // Then the server's close (it ends the session after 221), still bounded.
            if self.client.poll(&mut self.out) == ClientStep::Closed {
                let _ = self.read_socket().await;
            }
        }
        let _ = self.stream.close().await;
    }
}

/// Greeting, EHLO and STARTTLS on a fresh connection to `host`. `tls_config` replaces the
/// configuration `tls` would pick (a policy's verifier: MTA-STS or DANE).
pub(super) async fn greet(
    settings: &Settings,
    stream: TcpStream,
    src: &Source,
    host: &str,
    tls: TlsPolicy,
    tls_config: Option<Arc<rustls::ClientConfig>>,
) -> Result<Conn, SessionError> {
    let cfg = &settings.config.delivery;
    let _ = stream.set_nodelay(true);
    stream
        .set_write_timeout(Some(Duration::from_millis(cfg.data_block_timeout_ms)))
        .map_err(|e| SessionError::Write(e.into()))?;
    let client = Client::new(ClientConfig {
        helo_name: src.ehlo.clone(),
        line_len_max: REPLY_LINE_LEN_MAX,
        starttls: tls,
        bdat_chunk_size_max: cfg.bdat_chunk_size_max,
    });
    let mut conn = Conn {
        stream,
        client,
        buf: vec![0u8; READ_BUF_BYTES],
        out: Vec::with_capacity(4096),
        tls: None,
        wire: Vec::new(),
        timeouts: Timeouts {
            reply: Duration::from_millis(cfg.reply_timeout_ms),
            data_init: Duration::from_millis(cfg.data_init_timeout_ms),
            final_dot: Duration::from_millis(cfg.final_dot_timeout_ms),
        },
    };
    loop {
        match conn.client.poll(&mut conn.out) {
            ClientStep::Ready => return Ok(conn),
            ClientStep::NeedInput => {
                if let Err(why) = conn.exchange().await {
                    let _ = conn.stream.close().await;
                    return Err(why);
                }
            }
            ClientStep::StartTls => {
                let config = match (&tls_config, tls) {
                    (Some(config), _) => Some(config.clone()),
                    (None, TlsPolicy::Required) => settings.tls_client_verified.clone(),
                    (None, _) => Some(settings.tls_client_unverified.clone()),
                };
                let Some(config) = config else {
                    conn.quit().await;
                    return Err(SessionError::NoCaBundle);
                };
                if let Err(why) = conn.start_tls(config, host).await {
                    let _ = conn.stream.close().await;
                    return Err(why);
                }
                conn.client.tls_started(&mut conn.out);
            }
            ClientStep::Failed(reply) => {
                // EHLO went through (or STARTTLS was refused) and TLS never started: the
                // server will not do the TLS this destination requires.
                let no_tls = tls == TlsPolicy::Required
                    && conn.tls.is_none()
                    && (reply.code == 421 && reply.text.contains("STARTTLS")
                        || conn.client.capabilities().has("STARTTLS"));
                conn.quit().await;
                let text = reply.to_string().trim_end().to_owned();
                return Err(match no_tls {
                    true => SessionError::NoStartTls(text),
                    false => SessionError::Refused(text),
                });
            }
            other => {
                let _ = conn.stream.close().await;
                return Err(SessionError::Unexpected(format!("{other:?}")));
            }
        }
    }
}
