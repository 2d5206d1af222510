//! Inbound SMTP: the accept loop and one task per session, driving the I/O-free server state
//! machine over a glommio socket.
//!
//! Every shard listens on the same address (SO_REUSEPORT), so the kernel spreads clients over
//! the shards. A session reads, feeds the state machine, writes its replies in one write per
//! batch (PIPELINING), and when a message is complete hands it to `ShardCtx::accept_message`,
//! which answers only once every part is durable on its owning shard.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

use crate::config::{ListenerEntry, Network};
use crate::shard::{Dsn, Incoming, ShardCtx};
use crate::smtp::received::{received_header, received_protocol, submission_headers};
use crate::smtp::reply::Reply;
use crate::smtp::server::{AuthVerdict, BareLf, Credentials, NulByte, ServerConfig, Session, Step};
use crate::spool::record::{FLAG_8BITMIME, FLAG_BINARYMIME, FLAG_SMTPUTF8};
use crate::tls::TlsLayer;

/// Bytes read from a client at a time. 64 KiB takes a 100 KiB message in two reads and a
/// pipelined batch of small ones in one.
const READ_BUF_BYTES: usize = 64 << 10;
/// Reads wait at most this long at a time, so an idle session notices shutdown promptly; the
/// configured command/data timeouts are counted across slices.
const READ_SLICE_MS: u64 = 500;

/// Self-connects tried to wake the accept loop at shutdown (about 100 ms each at most).
const KNOCKS_MAX: usize = 200;

const TOO_MANY_FROM_IP: &[u8] =
    b"421 4.7.0 Too many connections from your address, try again later\r\n";

const TOO_MANY_CONNECTIONS: &[u8] = b"421 4.7.0 Too many connections, try again later\r\n";

/// The session settings of a listener: `[server]`'s, with the listener's own values on top.
pub fn server_config(
    ctx: &ShardCtx,
    spec: &ListenerEntry,
) -> Result<ServerConfig, crate::smtp::server::ConfigError> {
    let server = &ctx.settings.config.server;
    let cfg = ServerConfig {
        hostname: spec
            .hostname
            .clone()
            .unwrap_or_else(|| ctx.settings.hostname.clone()),
        size_max: spec.size_max.unwrap_or(server.size_max),
        rcpts_max: spec.rcpts_max.unwrap_or(server.rcpts_max),
        errors_max: server.errors_max,
        line_len_max: server.line_len_max,
        data_line_len_max: server.data_line_len_max,
        messages_per_session_max: spec
            .messages_per_connection_max
            .unwrap_or(server.messages_per_connection_max),
        smtputf8: server.smtputf8,
        chunking: server.chunking,
        binarymime: server.binarymime,
        dsn: server.dsn,
        bare_lf: if server.bare_lf == "reject" {
            BareLf::Reject
        } else {
            BareLf::Accept
        },
        nul: if server.nul == "reject" {
            NulByte::Reject
        } else {
            NulByte::Accept
        },
        starttls: true,
        auth: ctx.settings.auth_users.is_some(),
        auth_required: spec.auth_required,
        tls_required: spec.tls_required && !spec.implicit_tls,
    };
    cfg.validate()?;
    Ok(cfg)
}

pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .map_err(|e| std::io::Error::other(format!("cannot listen on {addr}: {e}")))
}

/// One listener's policy on this shard, and its connection counts.
struct Listener {
    cfg: Rc<ServerConfig>,
    implicit_tls: bool,
    relay_networks: Vec<Network>,
    connections_max: usize,
    connections_per_ip_max: usize,
    sessions: Cell<usize>,
    by_ip: RefCell<HashMap<IpAddr, usize>>,
}

impl Listener {
    fn new(ctx: &ShardCtx, spec: &ListenerEntry) -> Result<Listener, String> {
        let server = &ctx.settings.config.server;
        let cfg = server_config(ctx, spec).map_err(|e| e.to_string())?;
        let relay_networks = match &spec.relay_networks {
            Some(nets) => nets
                .iter()
                .map(|n| Network::parse(n).ok_or_else(|| format!("bad network `{n}`")))
                .collect::<Result<Vec<_>, _>>()?,
            None => ctx.settings.relay_networks.clone(),
        };
        Ok(Listener {
            cfg: Rc::new(cfg),
            implicit_tls: spec.implicit_tls,
            relay_networks,
            connections_max: spec.connections_max.unwrap_or(server.connections_max),
            connections_per_ip_max: spec
                .connections_per_ip_max
                .unwrap_or(server.connections_per_ip_max),
            sessions: Cell::new(0),
            by_ip: RefCell::new(HashMap::new()),
        })
    }
}

/// Accept on `listener` until shutdown, with that listener's policy: implicit TLS (a TLS
/// handshake before the greeting, port 465 style), AUTH or TLS required, its own host name,
/// relay networks and limits.
pub async fn accept_loop(ctx: Rc<ShardCtx>, listener: TcpListener, spec: ListenerEntry) {
    let policy = match Listener::new(&ctx, &spec) {
        Ok(policy) => Rc::new(policy),
        Err(e) => {
            // Validated with the configuration at start; if it still fails here, refuse
            // connections rather than serve with a broken config.
            eprintln!(
                "shard {}: invalid settings for listener {}: {e}",
                ctx.id, spec.address
            );
            return;
        }
    };
    let stopped = Rc::new(Cell::new(false));
    let waker = glommio::spawn_local(wake_on_shutdown(
        ctx.clone(),
        listener.local_addr().ok(),
        stopped.clone(),
    ));
    loop {
        let accepted = listener.accept().await;
        if ctx.shutting_down() {
            break;
        }
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => {
                // EMFILE and friends: back off a little instead of spinning.
                eprintln!("shard {}: accept failed: {e}", ctx.id);
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if ctx.sessions.get() >= ctx.settings.config.server.connections_max
            || policy.sessions.get() >= policy.connections_max
        {
            glommio::spawn_local(refuse(stream, TOO_MANY_CONNECTIONS)).detach();
            continue;
        }
        ctx.sessions.set(ctx.sessions.get() + 1);
        policy.sessions.set(policy.sessions.get() + 1);
        let session_ctx = ctx.clone();
        let policy = policy.clone();
        glommio::spawn_local(async move {
            if let Err(e) = session(&session_ctx, &policy, stream).await {
                if e.kind() != ErrorKind::ConnectionReset && e.kind() != ErrorKind::BrokenPipe {
                    eprintln!("shard {}: session error: {e}", session_ctx.id);
                }
            }
            session_ctx.sessions.set(session_ctx.sessions.get() - 1);
            policy.sessions.set(policy.sessions.get() - 1);
        })
        .detach();
    }
    stopped.set(true);
    drop(listener);
    waker.await;
}

/// An accept can't be cancelled safely once io_uring has it, so shutdown wakes the accept loop
/// by connecting to our own address; the loop then sees the flag and ends.
async fn wake_on_shutdown(ctx: Rc<ShardCtx>, addr: Option<SocketAddr>, stopped: Rc<Cell<bool>>) {
    while !ctx.shutting_down() {
        glommio::timer::sleep(Duration::from_millis(50)).await;
    }
    let Some(mut addr) = addr else { return };
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    // A knock lands on any shard's listener (the kernel picks); keep knocking until ours has
    // stopped. Bounded, so a wedged listener cannot hold shutdown forever.
    for _ in 0..KNOCKS_MAX {
        if stopped.get() {
            return;
        }
        if let Ok(s) = TcpStream::connect_timeout(addr, Duration::from_millis(100)).await {
            drop(s);
        }
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
}

/// Check AUTH credentials: refused outright while the client is over its failure limit, else
/// verified on the executor's blocking thread, since PBKDF2 takes tens of milliseconds of CPU
/// that must not stall the shard's other sessions.
async fn check_credentials(
    ctx: &Rc<ShardCtx>,
    ip: std::net::IpAddr,
    c: &Credentials,
) -> AuthVerdict {
    let Some(users) = ctx.settings.auth_users.clone() else {
        return AuthVerdict::Rejected;
    };
    let now = crate::clock::now_ms();
    if !ctx.auth_limiter.borrow().allowed(ip, now) {
        return AuthVerdict::Limited;
    }
    let (user, password) = (c.user.clone(), c.password.clone());
    let ok = glommio::executor()
        .spawn_blocking(move || users.verify(&user, &password))
        .await;
    let mut limiter = ctx.auth_limiter.borrow_mut();
    if ok {
        limiter.succeeded(ip);
        AuthVerdict::Accepted
    } else {
        limiter.failed(ip, crate::clock::now_ms());
        AuthVerdict::Rejected
    }
}

/// Tell a client why it is turned away (one 421 line) and close. Best effort: it may be gone.
async fn refuse(mut stream: TcpStream, reply: &[u8]) {
    let _ = stream.write_all(reply).await;
    let _ = stream.close().await;
}

/// One of a client address's connection slots on this shard (all listeners) and on its
/// listener, given back when dropped.
struct IpSlot {
    ctx: Rc<ShardCtx>,
    listener: Rc<Listener>,
    ip: std::net::IpAddr,
}

impl IpSlot {
    fn take(ctx: &Rc<ShardCtx>, listener: &Rc<Listener>, ip: std::net::IpAddr) -> Option<IpSlot> {
        let shard_max = ctx.settings.config.server.connections_per_ip_max;
        let mut shard = ctx.sessions_by_ip.borrow_mut();
        let mut own = listener.by_ip.borrow_mut();
        if shard.get(&ip).copied().unwrap_or(0) >= shard_max
            || own.get(&ip).copied().unwrap_or(0) >= listener.connections_per_ip_max
        {
            return None;
        }
        *shard.entry(ip).or_insert(0) += 1;
        *own.entry(ip).or_insert(0) += 1;
        Some(IpSlot {
            ctx: ctx.clone(),
            listener: listener.clone(),
            ip,
        })
    }
}

/// Take one from `ip`'s count, removing it at zero so the map stays small.
fn release(by_ip: &RefCell<HashMap<IpAddr, usize>>, ip: IpAddr) {
    let mut by_ip = by_ip.borrow_mut();
    if let Some(n) = by_ip.get_mut(&ip) {
        *n -= 1;
        if *n == 0 {
            by_ip.remove(&ip);
        }
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        release(&self.ctx.sessions_by_ip, self.ip);
        release(&self.listener.by_ip, self.ip);
    }
}

const PROXY_UNTRUSTED: &[u8] = b"421 4.7.0 Connection not from a trusted proxy\r\n";
const PROXY_BAD: &[u8] = b"421 4.7.0 Bad or missing PROXY protocol header\r\n";

/// Read the PROXY header: the client's address, and any bytes that came after the header.
async fn read_proxy_header(
    ctx: &Rc<ShardCtx>,
    stream: &mut TcpStream,
    socket_peer: SocketAddr,
) -> Result<(SocketAddr, Vec<u8>), &'static [u8]> {
    if !ctx
        .settings
        .proxy_trusted
        .iter()
        .any(|n| n.contains(socket_peer.ip()))
    {
        return Err(PROXY_UNTRUSTED);
    }
    let mut header = Vec::with_capacity(crate::proxy::V1_LEN_MAX);
    let mut chunk = [0u8; 256];
    let mut waited_ms = 0;
    loop {
        match crate::proxy::parse(&header) {
            Ok(Some((addr, n))) => return Ok((addr.unwrap_or(socket_peer), header.split_off(n))),
            Ok(None) => {}
            Err(_) => return Err(PROXY_BAD),
        }
        match stream.read(&mut chunk).await {
            Ok(0) => return Err(PROXY_BAD),
            Ok(n) => header.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::TimedOut => {
                waited_ms += READ_SLICE_MS;
                if waited_ms >= ctx.settings.config.server.command_timeout_s * 1000 {
                    return Err(PROXY_BAD);
                }
            }
            Err(_) => return Err(PROXY_BAD),
        }
    }
}

/// The transaction's DSN parameters (RFC 3461) in the spool's form.
fn dsn_of(tx: &crate::smtp::server::Transaction) -> Dsn {
    use crate::smtp::parser::Ret;
    use crate::spool::record::{NOTIFY_DELAY, NOTIFY_FAILURE, NOTIFY_GIVEN, NOTIFY_SUCCESS};
    let envelope = tx.dsn.as_ref();
    Dsn {
        ret: match envelope.and_then(|d| d.ret) {
            None => 0,
            Some(Ret::Full) => 1,
            Some(Ret::Hdrs) => 2,
        },
        envid: envelope.and_then(|d| d.envid.clone()).unwrap_or_default(),
        notify: tx
            .rcpt_dsn
            .iter()
            .map(|r| match r.notify {
                None => 0,
                Some(n) => {
                    NOTIFY_GIVEN
                        | if n.success { NOTIFY_SUCCESS } else { 0 }
                        | if n.failure { NOTIFY_FAILURE } else { 0 }
                        | if n.delay { NOTIFY_DELAY } else { 0 }
                }
            })
            .collect(),
        orcpt: tx
            .rcpt_dsn
            .iter()
            .map(|r| {
                r.orcpt
                    .as_ref()
                    .map(|o| format!("{};{}", o.addr_type, o.address))
                    .unwrap_or_default()
            })
            .collect(),
    }
}

/// The bytes between a session and its socket: plain, or through TLS.
struct Transport {
    stream: TcpStream,
    tls: Option<TlsLayer>,
    /// Ciphertext to send (TLS only).
    wire: Vec<u8>,
    /// Plaintext decrypted from the last read (TLS only).
    plain: Vec<u8>,
}

impl Transport {
    async fn write(&mut self, out: &[u8]) -> std::io::Result<()> {
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

async fn session(
    ctx: &Rc<ShardCtx>,
    listener: &Rc<Listener>,
    mut stream: TcpStream,
) -> std::io::Result<()> {
    let implicit_tls = listener.implicit_tls;
    let hostname = listener.cfg.hostname.clone();
    let server = &ctx.settings.config.server;
    let _ = stream.set_nodelay(true);
    stream.set_read_timeout(Some(Duration::from_millis(READ_SLICE_MS)))?;
    let socket_peer = stream.peer_addr()?;
    // Behind a load balancer the client's address comes in a PROXY header, trusted only from
    // the configured proxies; bytes after the header belong to the SMTP session.
    let (peer, early_input) = if server.proxy_protocol {
        match read_proxy_header(ctx, &mut stream, socket_peer).await {
            Ok(found) => found,
            Err(reply) => {
                refuse(stream, reply).await;
                return Ok(());
            }
        }
    } else {
        (socket_peer, Vec::new())
    };
    let Some(_slot) = IpSlot::take(ctx, listener, peer.ip()) else {
        refuse(stream, TOO_MANY_FROM_IP).await;
        return Ok(());
    };
    let relay_allowed = listener
        .relay_networks
        .iter()
        .any(|n| n.contains(peer.ip()));
    let peer_text = peer.to_string();
    let tls = if implicit_tls {
        Some(TlsLayer::new(ctx.settings.tls.clone()).map_err(std::io::Error::other)?)
    } else {
        None
    };
    let mut io = Transport {
        stream,
        tls,
        wire: Vec::new(),
        plain: Vec::new(),
    };
    let mut session = Session::new(listener.cfg.clone(), relay_allowed);
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
    let mut waited_ms = 0u64;
    let transaction_limit = Duration::from_secs(server.transaction_timeout_s);
    let mut transaction_since: Option<std::time::Instant> = None;
    loop {
        match session.poll(&mut out) {
            Step::NeedInput => {
                if !out.is_empty() {
                    io.write(&out).await?;
                    out.clear();
                }
                match (session.in_transaction(), transaction_since) {
                    (false, _) => transaction_since = None,
                    (true, None) => transaction_since = Some(std::time::Instant::now()),
                    (true, Some(since)) if since.elapsed() >= transaction_limit => {
                        session.timeout(&mut out);
                        io.write(&out).await?;
                        break;
                    }
                    (true, Some(_)) => {}
                }
                if ctx.shutting_down() && !session.in_data() {
                    session.shutdown(&mut out);
                    io.write(&out).await?;
                    break;
                }
                match io.read_into(&mut buf, &mut session).await {
                    Ok(0) => break,
                    Ok(_) => waited_ms = 0,
                    Err(e) if e.kind() == ErrorKind::TimedOut => {
                        waited_ms += READ_SLICE_MS;
                        let limit_s = if session.in_data() {
                            server.data_timeout_s
                        } else {
                            server.command_timeout_s
                        };
                        if waited_ms >= limit_s * 1000 {
                            session.timeout(&mut out);
                            io.write(&out).await?;
                            break;
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            Step::Message(tx) => {
                let received_ms = crate::clock::now_ms();
                let reception_id = ctx.reception_id(received_ms);
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
                let header = received_header(
                    &hostname,
                    &tx.helo,
                    peer.ip(),
                    protocol,
                    &reception_id,
                    for_rcpt,
                    received_ms / 1000,
                );
                // RFC 5321 §4.4: every relay adds its Received line on top of the message.
                // An authenticated client is submitting (RFC 6409): fill in Date and
                // Message-ID when its message has none.
                let submission = if session.user().is_some() {
                    submission_headers(&tx.body, &reception_id, &hostname, received_ms / 1000)
                } else {
                    String::new()
                };
                let mut body = Vec::with_capacity(header.len() + submission.len() + tx.body.len());
                body.extend_from_slice(header.as_bytes());
                body.extend_from_slice(submission.as_bytes());
                body.extend_from_slice(&tx.body);
                let dsn = dsn_of(&tx);
                let incoming = Incoming {
                    dsn,
                    reception_id,
                    received_ms,
                    mail_from: tx.mail_from,
                    rcpts: tx.rcpts,
                    body,
                    peer: peer_text.clone(),
                    tls: io.tls_info(),
                    flags: (if tx.smtputf8 { FLAG_SMTPUTF8 } else { 0 })
                        | (if tx.body_8bit { FLAG_8BITMIME } else { 0 })
                        | (if tx.body_binary { FLAG_BINARYMIME } else { 0 }),
                };
                match ctx.accept_message(incoming).await {
                    Ok(id) => session.message_done(Ok(&id), &mut out),
                    Err(why) => {
                        let reply =
                            Reply::new(451, Some((4, 3, 0)), format!("Message not queued: {why}"));
                        session.message_done(Err(reply), &mut out);
                    }
                }
            }
            Step::Auth(credentials) => {
                let verdict = check_credentials(ctx, peer.ip(), &credentials).await;
                session.auth_done(verdict, &credentials.user, &mut out);
            }
            Step::StartTls => {
                // The 220 goes out in plaintext; everything after it through TLS.
                io.write(&out).await?;
                out.clear();
                let tls = TlsLayer::new(ctx.settings.tls.clone()).map_err(std::io::Error::other)?;
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
