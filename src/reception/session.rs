//! One inbound SMTP session: the I/O-free server state machine driven over a glommio socket.
//!
//! A session reads, feeds the state machine, writes its replies in one write per batch
//! (PIPELINING), and when a message is complete hands it to reception, which answers only once
//! every part is durable on its owning shard. Waits are timers: each read carries the
//! command or data timeout (an io_uring timeout on the read), shortened to what is left of
//! the transaction's total time, and races the stop signal, so an idle session notices
//! shutdown at once without polling.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use super::listener::{refuse, Listener, TOO_MANY_FROM_IP};
use super::{BodyParts, Reception};
use crate::envelope::{Body, Envelope, Notify, Recipient, Ret};
use crate::smtp::received::{received_header, received_protocol, submission_headers};
use crate::smtp::reply::Reply;
use crate::smtp::server::{AuthVerdict, Credentials, Session, Step, Transaction};
use crate::tls::TlsLayer;

/// Bytes read from a client at a time. 64 KiB takes a 100 KiB message in two reads and a
/// pipelined batch of small ones in one.
const READ_BUF_BYTES: usize = 64 << 10;

const PROXY_UNTRUSTED: &[u8] = b"421 4.7.0 Connection not from a trusted proxy\r\n";
const PROXY_BAD: &[u8] = b"421 4.7.0 Bad or missing PROXY protocol header\r\n";

/// The bytes between a session and its socket: plain, or through TLS.
struct Transport {
    stream: TcpStream,
    /// Counts the rejections among the replies written (metrics).
    metrics: Rc<crate::metrics::Recorder>,
    tls: Option<TlsLayer>,
    /// Ciphertext to send (TLS only).
    wire: Vec<u8>,
    /// Plaintext decrypted from the last read (TLS only).
    plain: Vec<u8>,
}

impl Transport {
    /// Write the session's replies. Every reply goes through here, so this is where the
    /// rejections among them are counted (one pass over the bytes; see `metrics::replies`).
    async fn write(&mut self, out: &[u8]) -> std::io::Result<()> {
        self.metrics.replies_sent(out);
        match &mut self.tls {
            None => self.stream.write_all(out).await,
            Some(tls) => {
                self.wire.clear();
                tls.send(out, &mut self.wire)
                    .map_err(std::io::Error::other)?;
                self.stream.write_all(&self.wire).await
            }
        }
    }

    /// Read from the socket and hand the plaintext to `session`. Returns the bytes read from
    /// the socket (0: the client closed).
    async fn read_into(&mut self, buf: &mut [u8], session: &mut Session) -> std::io::Result<usize> {
        let n = self.stream.read(buf).await?;
        match &mut self.tls {
            None => session.input(&buf[..n]),
            Some(tls) => {
                self.plain.clear();
                self.wire.clear();
                let received = tls.receive(&buf[..n], &mut self.plain, &mut self.wire);
                if !self.wire.is_empty() {
                    self.stream.write_all(&self.wire).await?;
                }
                received.map_err(std::io::Error::other)?;
                session.input(&self.plain);
            }
        }
        Ok(n)
    }

    fn tls_info(&self) -> Option<String> {
        let info = self.tls.as_ref()?.info()?;
        Some(format!("{} {}", info.version, info.cipher))
    }
}

/// Read the PROXY header: the client's address, and any bytes that came after the header.
async fn read_proxy_header(
    reception: &Reception,
    stream: &mut TcpStream,
    socket_peer: SocketAddr,
) -> Result<(SocketAddr, Vec<u8>), &'static [u8]> {
    let settings = reception.settings();
    if !settings
        .proxy_trusted
        .iter()
        .any(|n| n.contains(socket_peer.ip()))
    {
        return Err(PROXY_UNTRUSTED);
    }
    let timeout = Duration::from_secs(settings.config.server.command_timeout_s);
    if stream.set_read_timeout(Some(timeout)).is_err() {
        return Err(PROXY_BAD);
    }
    let mut header = Vec::with_capacity(crate::proxy::V1_LEN_MAX);
    let mut chunk = [0u8; 256];
    loop {
        match crate::proxy::parse(&header) {
            Ok(Some((addr, n))) => return Ok((addr.unwrap_or(socket_peer), header.split_off(n))),
            Ok(None) => {}
            Err(_) => return Err(PROXY_BAD),
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(PROXY_BAD),
            Ok(n) => header.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The transaction's envelope, with its DSN parameters typed.
fn envelope_of(tx: &Transaction, reception: crate::envelope::ReceptionId, peer: &str) -> Envelope {
    use crate::smtp::parser::Ret as SmtpRet;
    let dsn = tx.dsn.as_ref();
    let rcpts = tx
        .rcpts
        .iter()
        .enumerate()
        .map(|(i, address)| {
            let r = tx.rcpt_dsn.get(i);
            Recipient {
                address: address.clone(),
                notify: match r.and_then(|r| r.notify) {
                    None => Notify::Default,
                    Some(n) if n.is_never() => Notify::Never,
                    Some(n) => Notify::On {
                        success: n.success,
                        failure: n.failure,
                        delay: n.delay,
                    },
                },
                orcpt: r
                    .and_then(|r| r.orcpt.as_ref())
                    .map(|o| format!("{};{}", o.addr_type, o.address)),
            }
        })
        .collect();
    Envelope {
        reception,
        sender: tx.mail_from.clone(),
        rcpts,
        ret: match dsn.and_then(|d| d.ret) {
            None => Ret::Unspecified,
            Some(SmtpRet::Full) => Ret::Full,
            Some(SmtpRet::Hdrs) => Ret::Headers,
        },
        envid: dsn.and_then(|d| d.envid.clone()),
        tenant: None,
        smtputf8: tx.smtputf8,
        body: if tx.body_binary {
            Body::BinaryMime
        } else if tx.body_8bit {
            Body::EightBitMime
        } else {
            Body::SevenBit
        },
        size: 0,
        peer: peer.to_owned(),
        notices: crate::envelope::NoticeSwitches::ALL,
        priority: Default::default(),
        campaign: None,
    }
}

/// Check AUTH credentials: refused outright while the client is over its failure limit (asked
/// of the address's owner shard), else verified on the executor's blocking thread, since
/// PBKDF2 takes tens of milliseconds of CPU that must not stall the shard's other sessions.
async fn check_credentials(
    reception: &Reception,
    ip: std::net::IpAddr,
    c: &Credentials,
) -> AuthVerdict {
    let Some(users) = reception.settings().auth_users.clone() else {
        return AuthVerdict::Rejected;
    };
    if !reception.peers().auth_allowed(ip).await {
        return AuthVerdict::Limited;
    }
    let (user, password) = (c.user.clone(), c.password.clone());
    let ok = glommio::executor()
        .spawn_blocking(move || users.verify(&user, &password))
        .await;
    reception.peers().auth_result(ip, ok);
    if ok {
        AuthVerdict::Accepted
    } else {
        AuthVerdict::Rejected
    }
}

/// A client address's connection slot at its owner shard, given back when dropped.
struct IpSlot {
    reception: Rc<Reception>,
    ip: std::net::IpAddr,
    listener: u16,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        self.reception
            .peers()
            .client_disconnect(self.ip, self.listener);
    }
}

/// What ended a wait for input.
enum Input {
    Read(std::io::Result<usize>),
    Stop,
}

pub(super) async fn session(
    reception: &Rc<Reception>,
    listener: &Rc<Listener>,
    mut stream: TcpStream,
) -> std::io::Result<()> {
    let implicit_tls = listener.implicit_tls;
    // The listener's policy as it is now: a reload meanwhile applies to later sessions.
    let policy = listener.policy();
    let hostname = policy.cfg.hostname.clone();
    let settings = reception.settings();
    let notices = policy.notices;
    let priority = policy.priority;
    let server = &settings.config.server;
    let _ = stream.set_nodelay(true);
    let socket_peer = stream.peer_addr()?;
    // Behind a load balancer the client's address comes in a PROXY header, trusted only from
    // the configured proxies; bytes after the header belong to the SMTP session.
    let (peer, early_input) = if server.proxy_protocol {
        match read_proxy_header(reception, &mut stream, socket_peer).await {
            Ok(found) => found,
            Err(reply) => {
                reception.metrics.replies_sent(reply);
                refuse(stream, reply).await;
                return Ok(());
            }
        }
    } else {
        (socket_peer, Vec::new())
    };
    let limits = policy.ip_limits(listener.index);
    if !reception.peers().client_connect(peer.ip(), limits).await {
        reception.metrics.replies_sent(TOO_MANY_FROM_IP);
        refuse(stream, TOO_MANY_FROM_IP).await;
        return Ok(());
    }
    let _slot = IpSlot {
        reception: reception.clone(),
        ip: peer.ip(),
        listener: listener.index,
    };
    let relay_allowed = policy.relay_networks.iter().any(|n| n.contains(peer.ip()));
    let peer_text = peer.to_string();
    let tls = if implicit_tls {
        Some(TlsLayer::new(settings.tls.clone()).map_err(std::io::Error::other)?)
    } else {
        None
    };
    let mut io = Transport {
        stream,
        metrics: reception.metrics.clone(),
        tls,
        wire: Vec::new(),
        plain: Vec::new(),
    };
    let mut session = Session::new(policy.cfg.clone(), relay_allowed);
    let mut dkim = super::signing::Follower::new(settings.dkim.clone(), settings.egress.clone());
    if implicit_tls {
        session.tls_started();
    }
    session.allow_auth_without_tls(server.auth_plaintext_loopback && peer.ip().is_loopback());
    let mut out = Vec::with_capacity(4096);
    let mut buf = vec![0u8; READ_BUF_BYTES];
    session.greeting(&mut out);
    if !early_input.is_empty() {
        session.input(&early_input);
    }
    let transaction_limit = Duration::from_secs(server.transaction_timeout_s);
    let mut transaction_since: Option<Instant> = None;
    loop {
        match session.poll(&mut out) {
            Step::NeedInput => {
                dkim.follow(&session);
                if !out.is_empty() {
                    io.write(&out).await?;
                    out.clear();
                }
                let in_data = session.in_data();
                if reception.stop.is_triggered() && !in_data {
                    session.shutdown(&mut out);
                    io.write(&out).await?;
                    break;
                }
                // The wait: the phase's idle timeout, or what is left of the transaction's.
                let idle = Duration::from_secs(if in_data {
                    server.data_timeout_s
                } else {
                    server.command_timeout_s
                });
                let wait = match (session.in_transaction(), transaction_since) {
                    (false, _) => {
                        transaction_since = None;
                        idle
                    }
                    (true, None) => {
                        transaction_since = Some(Instant::now());
                        idle.min(transaction_limit)
                    }
                    (true, Some(since)) => {
                        idle.min(transaction_limit.saturating_sub(since.elapsed()))
                    }
                };
                if wait.is_zero() {
                    session.timeout(&mut out);
                    io.write(&out).await?;
                    break;
                }
                io.stream.set_read_timeout(Some(wait))?;
                // In DATA a client finishes its message even during shutdown (the grace
                // period bounds it); elsewhere the stop signal ends the wait.
                let input = if in_data {
                    Input::Read(io.read_into(&mut buf, &mut session).await)
                } else {
                    futures_lite::future::or(
                        async { Input::Read(io.read_into(&mut buf, &mut session).await) },
                        async {
                            reception.stop.wait().await;
                            Input::Stop
                        },
                    )
                    .await
                };
                match input {
                    Input::Stop => continue,
                    Input::Read(Ok(0)) => break,
                    Input::Read(Ok(_)) => {}
                    Input::Read(Err(e)) if e.kind() == ErrorKind::TimedOut => {
                        session.timeout(&mut out);
                        io.write(&out).await?;
                        break;
                    }
                    Input::Read(Err(e)) => return Err(e),
                }
            }
            Step::Rcpt(address) => {
                let sender = session.mail_from().unwrap_or_default().to_owned();
                let refusal = reception.rcpt_refusal(&sender, &address, &peer_text).await;
                session.rcpt_done(refusal.as_ref(), &mut out);
            }
            Step::Message(tx) if tx.oob => {
                // A report to the out-of-band domain: read and logged before the 250, never
                // relayed (and never refused: one does not bounce a bounce).
                reception.take_report(&tx, &peer_text).await;
                session.report_done(&mut out);
            }
            Step::Message(tx) => {
                // Reception latency: from the end of the data to the 250 (signing and
                // spooling on every shard the message goes to).
                let data_ended = Instant::now();
                let received_ms = reception.clock.now_ms();
                let id = reception.next_id(received_ms);
                let reception_text = id.to_string();
                let protocol = received_protocol(
                    tx.esmtp,
                    tx.smtputf8,
                    io.tls.is_some(),
                    session.user().is_some(),
                );
                let for_rcpt = match tx.rcpts.as_slice() {
                    [only] => Some(only.as_str()),
                    _ => None,
                };
                // RFC 5321 §4.4: every relay adds its Received line on top of the message.
                // An authenticated client is submitting (RFC 6409): fill in Date and
                // Message-ID when its message has none. Both go in front of the body as a
                // separate piece: the body is not copied to prepend them.
                let mut head = received_header(
                    &hostname,
                    &tx.helo,
                    peer.ip(),
                    protocol,
                    &reception_text,
                    for_rcpt,
                    received_ms / 1000,
                );
                if session.user().is_some() {
                    head.push_str(&submission_headers(
                        &tx.body,
                        &reception_text,
                        &hostname,
                        received_ms / 1000,
                    ));
                }
                // DKIM signs last, over the headers above, and goes on top (RFC 6376 5.6).
                match dkim
                    .sign(&session, &head, &tx.body, received_ms / 1000)
                    .await
                {
                    Ok(signatures) => head.insert_str(0, &signatures),
                    Err(why) => {
                        tracing::error!(error = %why, "DKIM signing failed");
                        let reply =
                            Reply::new(451, Some((4, 3, 0)), format!("DKIM signing failed: {why}"));
                        session.message_done(Err(reply), &mut out);
                        continue;
                    }
                }
                let mut envelope = envelope_of(&tx, id, &peer_text);
                // A class the header does not name (or names wrongly) is the listener's.
                super::tag(&mut envelope, &settings, &tx.body, priority, notices);
                // The tenant's suppression list is known only now: its recipients are
                // bounced at acceptance (or the message refused when no other is left).
                let refused = reception.tenant_refusals(&envelope).await;
                if !refused.is_empty() && refused.len() == envelope.rcpts.len() {
                    if let Some(reply) = settings.suppression_reply.clone() {
                        session.message_done(Err(reply), &mut out);
                        continue;
                    }
                }
                let body = BodyParts {
                    head,
                    body: tx.body,
                };
                match reception
                    .accept_refusing(
                        envelope,
                        body,
                        io.tls_info(),
                        super::Intake::Client,
                        &refused,
                    )
                    .await
                {
                    Ok(()) => {
                        session.message_done(Ok(&reception_text), &mut out);
                        reception
                            .metrics
                            .reception_done(data_ended.elapsed().as_micros() as u64);
                    }
                    Err(why) => session.message_done(Err(why.reply()), &mut out),
                }
            }
            Step::Auth(credentials) => {
                let verdict = check_credentials(reception, peer.ip(), &credentials).await;
                session.auth_done(verdict, &credentials.user, &mut out);
            }
            Step::StartTls => {
                // The 220 goes out in plaintext; everything after it through TLS.
                io.write(&out).await?;
                out.clear();
                let tls = TlsLayer::new(settings.tls.clone()).map_err(std::io::Error::other)?;
                io.tls = Some(tls);
                session.tls_started();
            }
            Step::Close => {
                if !out.is_empty() {
                    io.write(&out).await?;
                }
                break;
            }
        }
    }
    let _ = io.stream.close().await;
    Ok(())
}
