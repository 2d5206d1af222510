//! Outbound delivery: one task per SMTP connection, driving the I/O-free client state machine
//! over a glommio socket.
//!
//! A connection task serves one destination (a static route or an MX site, through one egress
//! pool) from one egress source. It opens by walking the hosts: MX hosts in preference order,
//! each host's addresses (A/AAAA, in `delivery.address_order`), moving on when a host refuses
//! the connection or greets with anything but 220, all within the same attempt. Then it takes
//! jobs from the destination's ready queue, one transaction per job, reusing the connection
//! (and PIPELINING when offered) until the queue stays empty for `idle_timeout_ms`, the
//! connection has carried `messages_per_connection_max` messages (`[delivery]`, or the
//! matching `[[site]]`), or the shard shuts down.
//! How many tasks run per (site, source) is bounded across shards by `egress::Slots`.
//!
//! A job is out of the queue while its transaction runs; if the process dies then, the spool
//! still has the message and recovery queues it again.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use hickory_proto::rr::RecordType;

use crate::clock::now_ms;
use crate::delivery_connect::{connect_bound, BoundConnectError};
use crate::dns::message::Answer;
use crate::egress::{Down, Slot, Source};
use crate::queue::{Dest, Job};
use crate::route::Hop;
use crate::shard::{RcptResult, ShardCtx, Via};
use crate::smtp::client::{
    Awaiting, Client, ClientConfig, ClientStep, MailOptions, TlsPolicy, TransactionOutcome,
};
use crate::spool::record::{FLAG_8BITMIME, FLAG_BINARYMIME, FLAG_SMTPUTF8};

/// Bytes read from the socket at a time. Replies are short; 16 KiB holds hundreds of them.
const READ_BUF_BYTES: usize = 16 << 10;
/// Longest reply line accepted from a server (RFC 5321 §4.5.3.1.5 says 512; be lenient).
const REPLY_LINE_LEN_MAX: usize = 4096;
/// Addresses tried per connection attempt, over all MX hosts: enough for every host of a
/// large provider, few enough that a broken site cannot hold a connection task for long.
const ADDRESSES_PER_ATTEMPT_MAX: usize = 10;
/// A connection carries at least this many messages before it hands its slot to a waiting
/// shard (so turns are not a connection per message), then checks every few messages.
const YIELD_AFTER_MESSAGES: usize = 32;
const YIELD_CHECK_EVERY: usize = 8;
/// Longest wait for the reply to QUIT.
const QUIT_REPLY_WAIT: Duration = Duration::from_secs(2);
/// How often an idle connection looks whether another shard waits for its slot.
const IDLE_SLOT_CHECK: Duration = Duration::from_millis(100);

#[derive(Debug)]
enum ConnError {
    /// Could not reach the destination at all: every job waiting for it fails the same way.
    Unreachable(String),
    /// The egress source could not be used (its address cannot be bound): nothing was tried,
    /// the jobs stay queued for another source.
    Source,
    /// The connection broke; the job in hand was already accounted for.
    Broken,
}

pub async fn connection(ctx: Rc<ShardCtx>, dest: Dest, source: usize, slot: Slot) {
    let target = Some(dest.clone());
    let result = serve(&ctx, &dest, source, &slot).await;
    drop(slot);
    {
        let mut queue = ctx.queue.borrow_mut();
        let dq = queue.dest(&target);
        dq.connections = dq.connections.saturating_sub(1);
    }
    ctx.deliveries.set(ctx.deliveries.get().saturating_sub(1));
    if let Err(ConnError::Unreachable(why)) = result {
        let jobs = ctx.queue.borrow_mut().drain_ready(&target);
        let src = &ctx.settings.egress.sources[source];
        let via = Via {
            peer: &dest.hop.to_string(),
            source: Some(&src.name),
        };
        for job in jobs {
            fail_job(&ctx, &job, &why, via);
        }
    }
    // Work may have arrived while this connection was closing: hand it to a fresh one.
    let waiting = ctx.queue.borrow_mut().drain_ready(&target);
    for job in waiting {
        ctx.requeue(job);
    }
}

fn fail_job(ctx: &Rc<ShardCtx>, job: &Job, why: &str, via: Via<'_>) {
    ctx.record_all(job, &RcptResult::Failure(why.to_owned()), via);
}

/// Why one address did not give a usable session.
enum Refusal {
    /// The source's address cannot be bound: no point trying other hosts from it.
    Bind(String),
    /// No TCP connection (refused, unreachable, timed out).
    Connect(ConnectError),
    /// Connected, but the greeting, EHLO or TLS failed.
    Session(String),
}

/// Why a TCP connection was not made.
struct ConnectError {
    why: String,
    /// The remote end answered (refused or reset): the source's path works, the host is the
    /// problem. Timeouts and unreachable networks may be the source's fault.
    remote_answered: bool,
}

impl From<std::io::Error> for ConnectError {
    fn from(e: std::io::Error) -> ConnectError {
        ConnectError {
            remote_answered: matches!(
                e.kind(),
                ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset
            ),
            why: e.to_string(),
        }
    }
}

/// Connect from `source` to `addr`: bound to the source's address when it has one.
async fn connect_from(
    addr: SocketAddr,
    source: &Source,
    timeout: Duration,
) -> Result<TcpStream, Refusal> {
    let Some(local) = source.address else {
        return TcpStream::connect_timeout(addr, timeout)
            .await
            .map_err(|e| Refusal::Connect(std::io::Error::from(e).into()));
    };
    connect_bound(local, addr, timeout)
        .await
        .map_err(|e| match e {
            BoundConnectError::Bind { .. } => Refusal::Bind(e.to_string()),
            BoundConnectError::Connect(e) => Refusal::Connect(e.into()),
        })
}

/// A random seed per connection, for the order of equal-preference MX hosts.
fn connection_seed() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(now_ms())
}

/// The addresses of an MX host, in the configured order; Err says why there are none.
async fn host_addrs(ctx: &ShardCtx, host: &str) -> Result<Vec<IpAddr>, String> {
    // An MX host given as an address literal ([192.0.2.1] or 192.0.2.1) needs no lookup.
    if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse() {
        return Ok(vec![ip]);
    }
    let Some(resolver) = &ctx.resolver else {
        return Err("no DNS resolver configured".into());
    };
    let order = ctx.settings.address_order;
    let mut addrs = Vec::new();
    let mut failures = Vec::new();
    use crate::egress::AddressOrder::*;
    let wanted: &[RecordType] = match order {
        Ipv4Only => &[RecordType::A],
        Ipv6Only => &[RecordType::AAAA],
        Ipv4First | Ipv6First => &[RecordType::A, RecordType::AAAA],
    };
    for &rtype in wanted {
        match resolver.lookup(host, rtype).await {
            Answer::Addrs(found, _) => addrs.extend(found),
            Answer::NxDomain(_) => return Err(format!("{host} does not exist (NXDOMAIN)")),
            Answer::NoData(_) => {}
            Answer::Transient(why) => failures.push(format!("{rtype} lookup failed: {why}")),
            other => failures.push(format!("{rtype} lookup: unexpected {other:?}")),
        }
    }
    order.arrange(&mut addrs);
    if addrs.is_empty() {
        return Err(match failures.is_empty() {
            true => format!("{host} has no addresses"),
            false => format!("{host}: {}", failures.join(", ")),
        });
    }
    Ok(addrs)
}

/// RFC 5321 §4.5.3.2's per-phase waits, from `[delivery]`.
struct Timeouts {
    reply: Duration,
    data_init: Duration,
    final_dot: Duration,
}

struct Conn {
    stream: TcpStream,
    timeouts: Timeouts,
    client: Client,
    buf: Vec<u8>,
    out: Vec<u8>,
    /// TLS after STARTTLS; `wire` holds ciphertext on its way to the socket.
    tls: Option<rustls::ClientConnection>,
    wire: Vec<u8>,
}

impl Conn {
    async fn flush(&mut self) -> std::io::Result<()> {
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
    async fn exchange(&mut self) -> Result<(), String> {
        self.flush()
            .await
            .map_err(|e| format!("write failed: {e}"))?;
        let n = self.read_socket().await?;
        match &mut self.tls {
            None => self.client.input(&self.buf[..n]),
            Some(tls) => {
                let mut rd = &self.buf[..n];
                while !rd.is_empty() {
                    tls.read_tls(&mut rd)
                        .map_err(|e| format!("TLS read failed: {e}"))?;
                    tls.process_new_packets()
                        .map_err(|e| format!("TLS error: {e}"))?;
                }
                let mut plain = [0u8; 4096];
                loop {
                    match tls.reader().read(&mut plain) {
                        Ok(0) => break,
                        Ok(m) => self.client.input(&plain[..m]),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => return Err(format!("TLS error: {e}")),
                    }
                }
            }
        }
        Ok(())
    }

    async fn read_socket(&mut self) -> Result<usize, String> {
        let timeout = match self.client.awaiting() {
            Awaiting::Reply => self.timeouts.reply,
            Awaiting::DataInit => self.timeouts.data_init,
            Awaiting::FinalDot => self.timeouts.final_dot,
        };
        let _ = self.stream.set_read_timeout(Some(timeout));
        match self.stream.read(&mut self.buf).await {
            Ok(0) => Err("connection closed by the remote server".into()),
            Ok(n) => Ok(n),
            Err(e) if e.kind() == ErrorKind::TimedOut => {
                Err("timed out waiting for a reply".into())
            }
            Err(e) => Err(format!("read failed: {e}")),
        }
    }

    /// Run the TLS handshake after the server accepted STARTTLS.
    async fn start_tls(
        &mut self,
        config: Arc<rustls::ClientConfig>,
        host: &str,
    ) -> Result<(), String> {
        self.flush()
            .await
            .map_err(|e| format!("write failed: {e}"))?;
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| format!("bad TLS server name `{host}`: {e}"))?;
        let mut tls =
            rustls::ClientConnection::new(config, name).map_err(|e| format!("TLS: {e}"))?;
        loop {
            self.wire.clear();
            while tls.wants_write() {
                tls.write_tls(&mut self.wire)
                    .map_err(|e| format!("TLS: {e}"))?;
            }
            if !self.wire.is_empty() {
                self.stream
                    .write_all(&self.wire)
                    .await
                    .map_err(|e| format!("write failed: {e}"))?;
            }
            if !tls.is_handshaking() {
                break;
            }
            let n = self.read_socket().await?;
            let mut rd = &self.buf[..n];
            while !rd.is_empty() {
                tls.read_tls(&mut rd)
                    .map_err(|e| format!("TLS read failed: {e}"))?;
                if let Err(e) = tls.process_new_packets() {
                    // Send our alert before giving up, so the server logs why.
                    self.wire.clear();
                    let _ = tls.write_tls(&mut self.wire);
                    let _ = self.stream.write_all(&self.wire).await;
                    return Err(format!("TLS handshake with {host} failed: {e}"));
                }
            }
        }
        self.tls = Some(tls);
        Ok(())
    }

    /// QUIT, then wait (briefly) for the server's reply before closing: RFC 5321 §3.3 asks
    /// for it, and a connection counted against a site's limit ends when the server knows it.
    async fn quit(mut self) {
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

/// A session ready for transactions, and who it is with.
struct Opened {
    conn: Conn,
    /// `host[address]:port`, for the log.
    peer: String,
}

/// Open a session for `dest` from `source`: walk the hosts and their addresses until one
/// greets, takes EHLO (and STARTTLS when required).
async fn open(ctx: &Rc<ShardCtx>, dest: &Dest, source: usize) -> Result<Opened, ConnError> {
    let cfg = &ctx.settings.config.delivery;
    let src = &ctx.settings.egress.sources[source];
    let (hosts, tls): (Vec<String>, TlsPolicy) = match &dest.hop {
        Hop::Route(route) => (vec![route.host.clone()], route.tls),
        Hop::Mx(site) => (
            // Equal preferences in a fresh order per connection, to spread the load.
            crate::dns::mx::order(&site.hosts, connection_seed())
                .into_iter()
                .map(str::to_owned)
                .collect(),
            crate::route::parse_tls_policy(&cfg.starttls).unwrap_or_default(),
        ),
    };
    let mut refusals: Vec<String> = Vec::new();
    let mut connected = false;
    // A connection attempt failed in a way that may be the source's fault.
    let mut source_suspect = false;
    let mut tried = 0usize;
    'hosts: for host in &hosts {
        let addrs: Vec<SocketAddr> = match &dest.hop {
            Hop::Route(route) => vec![route.addr],
            Hop::Mx(_) => match host_addrs(ctx, host).await {
                Ok(ips) => ips
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, cfg.port))
                    .collect(),
                Err(why) => {
                    refusals.push(why);
                    continue;
                }
            },
        };
        for addr in addrs {
            if !src.reaches(&addr) {
                continue;
            }
            if tried == ADDRESSES_PER_ATTEMPT_MAX {
                refusals.push(format!("stopped after {tried} addresses"));
                break 'hosts;
            }
            tried += 1;
            let peer = match &dest.hop {
                Hop::Route(_) => addr.to_string(),
                Hop::Mx(_) => format!("{host}[{}]:{}", addr.ip(), addr.port()),
            };
            let timeout = Duration::from_millis(cfg.connect_timeout_ms);
            let refusal = match connect_from(addr, src, timeout).await {
                Ok(stream) => {
                    connected = true;
                    match greet(ctx, stream, src, host, tls).await {
                        Ok(conn) => {
                            let change = ctx.egress.borrow_mut().success(source);
                            ctx.source_health(source, change, "");
                            return Ok(Opened { conn, peer });
                        }
                        Err(why) => Refusal::Session(why),
                    }
                }
                Err(refusal) => refusal,
            };
            match refusal {
                Refusal::Bind(why) => {
                    let egress = &ctx.settings.egress;
                    let change =
                        ctx.egress
                            .borrow_mut()
                            .failure(egress, source, Down::Bind, now_ms());
                    ctx.source_health(source, change, &why);
                    return Err(ConnError::Source);
                }
                Refusal::Connect(e) => {
                    source_suspect |= !e.remote_answered;
                    refusals.push(format!("connect to {peer} failed: {}", e.why));
                }
                Refusal::Session(why) => refusals.push(format!("{peer}: {why}")),
            }
        }
    }
    if source_suspect && !connected {
        let egress = &ctx.settings.egress;
        let why = refusals.join("; ");
        let change = ctx
            .egress
            .borrow_mut()
            .failure(egress, source, Down::Connect, now_ms());
        ctx.source_health(source, change, &why);
    }
    if refusals.is_empty() {
        refusals.push(format!(
            "source `{}` ({}) cannot reach any address of {}",
            src.name,
            src.address.map_or("any".into(), |a| a.to_string()),
            dest.hop
        ));
    }
    Err(ConnError::Unreachable(refusals.join("; ")))
}

/// Greeting, EHLO and STARTTLS on a fresh connection to `host`.
async fn greet(
    ctx: &Rc<ShardCtx>,
    stream: TcpStream,
    src: &Source,
    host: &str,
    tls: TlsPolicy,
) -> Result<Conn, String> {
    let cfg = &ctx.settings.config.delivery;
    let _ = stream.set_nodelay(true);
    stream
        .set_write_timeout(Some(Duration::from_millis(cfg.data_block_timeout_ms)))
        .map_err(|e| e.to_string())?;
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
                let config = match tls {
                    TlsPolicy::Required => ctx.settings.tls_client_verified.clone(),
                    _ => Some(ctx.settings.tls_client_unverified.clone()),
                };
                let Some(config) = config else {
                    conn.quit().await;
                    return Err("TLS required but no CA bundle loaded".into());
                };
                if let Err(why) = conn.start_tls(config, host).await {
                    let _ = conn.stream.close().await;
                    return Err(why);
                }
                conn.client.tls_started(&mut conn.out);
            }
            ClientStep::Failed(reply) => {
                conn.quit().await;
                return Err(format!(
                    "refused the session: {}",
                    reply.to_string().trim_end()
                ));
            }
            other => {
                let _ = conn.stream.close().await;
                return Err(format!("unexpected client step {other:?}"));
            }
        }
    }
}

async fn serve(
    ctx: &Rc<ShardCtx>,
    dest: &Dest,
    source: usize,
    slot: &Slot,
) -> Result<(), ConnError> {
    let Opened { mut conn, peer } = open(ctx, dest, source).await?;
    let src = &ctx.settings.egress.sources[source];
    let via = Via {
        peer: &peer,
        source: Some(&src.name),
    };
    let target = Some(dest.clone());
    let limits = ctx.settings.site_limits(&dest.hop);
    let idle = Duration::from_millis(limits.idle_timeout_ms);
    // Transactions on the wire, oldest first: at most two, the second started behind the
    // first's final dot (see `Client::can_start_early`).
    let mut inflight: VecDeque<Inflight> = VecDeque::with_capacity(INFLIGHT_MAX);
    let mut started = 0usize;
    // Set once the connection should take no more work: finish what is in flight, then quit.
    let mut winding_down = false;
    let mut yield_checked_at = 0usize;
    loop {
        if !winding_down
            && started >= YIELD_AFTER_MESSAGES
            && started.is_multiple_of(YIELD_CHECK_EVERY)
            && started != yield_checked_at
        {
            // Another shard waits for this site's slots and this one holds more than its
            // share: hand the slot on (checked every few messages, after a fair run).
            yield_checked_at = started;
            winding_down = slot.should_yield(now_ms());
        }
        winding_down |= started >= limits.messages_per_connection_max;
        if inflight.is_empty() {
            if winding_down {
                conn.quit().await;
                return Ok(());
            }
            let Some(job) = next_job(ctx, &target, idle, slot).await else {
                conn.quit().await;
                return Ok(());
            };
            if let Some(item) = begin(ctx, &mut conn, job) {
                inflight.push_back(item);
                started += 1;
            }
            continue;
        }
        match conn.client.poll(&mut conn.out) {
            ClientStep::NeedInput => {
                if inflight.len() < INFLIGHT_MAX
                    && !winding_down
                    && conn.client.can_start_early()
                    && !ctx.shutting_down()
                {
                    let next = ctx.queue.borrow_mut().pop_ready(&target);
                    if let Some(item) = next.and_then(|job| begin(ctx, &mut conn, job)) {
                        inflight.push_back(item);
                        started += 1;
                    }
                }
                if let Err(why) = conn.exchange().await {
                    return broken(ctx, conn, inflight, &why, via).await;
                }
            }
            ClientStep::SendBody => {
                // The body goes to the oldest transaction that has not sent one yet; the client
                // frames it for DATA or BDAT.
                let Some(item) = inflight.iter_mut().find(|i| !i.body_sent) else {
                    let why = "server ready for a body with none to send";
                    return broken(ctx, conn, inflight, why, via).await;
                };
                item.body_sent = true;
                let loc = item.loc;
                let stored = match ctx.spool.read_message(loc).await {
                    Ok(stored) => stored,
                    Err(e) => {
                        // DATA may be open and there is nothing to send: only closing the
                        // connection ends it without delivering a wrong message.
                        let why = format!("cannot read the spooled message: {e}");
                        return broken(ctx, conn, inflight, &why, via).await;
                    }
                };
                match stored.message() {
                    Ok(message) => conn
                        .client
                        .write_body(message.body.as_slice(), &mut conn.out),
                    Err(e) => {
                        let why = format!("spooled message does not validate: {e}");
                        return broken(ctx, conn, inflight, &why, via).await;
                    }
                }
            }
            ClientStep::Done(outcome) => {
                if let Some(item) = inflight.pop_front() {
                    ctx.record_results(&item.job, &per_rcpt(&item.job, &outcome), via);
                }
            }
            ClientStep::Failed(reply) => {
                let why = format!("session failed: {}", reply.to_string().trim_end());
                return broken(ctx, conn, inflight, &why, via).await;
            }
            ClientStep::Ready | ClientStep::Closed | ClientStep::StartTls => {
                let why = "server ended the transaction unexpectedly";
                return broken(ctx, conn, inflight, why, via).await;
            }
        }
    }
}

/// Transactions in flight on one connection, at most. Two is enough to overlap one message's
/// final reply with the next one's envelope; more would only add messages to retry when a
/// connection breaks.
const INFLIGHT_MAX: usize = 2;

struct Inflight {
    job: Job,
    loc: crate::spool::Location,
    body_sent: bool,
}

/// Start a job's transaction: the envelope comes from the queue, the body is read from the
/// spool only when the server asks for it. None: the message is gone (already final).
fn begin(ctx: &Rc<ShardCtx>, conn: &mut Conn, job: Job) -> Option<Inflight> {
    let (loc, mail_from, rcpts, size, flags) = {
        let queue = ctx.queue.borrow();
        let meta = queue.message(job.message)?;
        let rcpts: Vec<String> = job
            .rcpts
            .iter()
            .filter_map(|&r| meta.rcpts.get(r as usize).map(|x| x.address.to_string()))
            .collect();
        (
            meta.loc,
            meta.mail_from.to_string(),
            rcpts,
            meta.size,
            meta.flags,
        )
    };
    // RFC 1870: the server told us its limit; sending more would only be refused after the
    // whole body crossed the wire. Bounce now, saying why.
    if let Some(limit) = conn
        .client
        .capabilities()
        .size
        .filter(|&n| n > 0 && size > n)
    {
        let text =
            format!("Message of {size} bytes exceeds the destination's SIZE limit of {limit}");
        let reply = crate::smtp::reply::Reply::new(552, Some((5, 3, 4)), text);
        ctx.record_all(&job, &RcptResult::Reply(reply), Via::NONE);
        return None;
    }
    let rcpt_refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    let opts = MailOptions {
        size: Some(size),
        eight_bit: flags & FLAG_8BITMIME != 0,
        binary: flags & FLAG_BINARYMIME != 0,
        smtputf8: flags & FLAG_SMTPUTF8 != 0,
    };
    conn.client
        .start_with(&mail_from, &rcpt_refs, opts, &mut conn.out);
    Some(Inflight {
        job,
        loc,
        body_sent: false,
    })
}

/// The next job for this destination, waiting up to `idle` for one. None: close the connection
/// (idle too long, shutting down, or another shard waits for this idle connection's slot).
async fn next_job(
    ctx: &Rc<ShardCtx>,
    target: &crate::queue::Target,
    idle: Duration,
    slot: &Slot,
) -> Option<Job> {
    let deadline = std::time::Instant::now() + idle;
    let mut first_look = true;
    loop {
        if ctx.shutting_down() {
            return None;
        }
        if let Some(job) = ctx.queue.borrow_mut().pop_ready(target) {
            return Some(job);
        }
        // No work here: an idle connection is worth keeping only if no other shard wants its
        // slot. Looked at after `IDLE_SLOT_CHECK` without work and as often after that, so a
        // busy connection never takes the lock per message.
        if !first_look && slot.should_yield(now_ms()) {
            return None;
        }
        first_look = false;
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return None;
        }
        ctx.queue.borrow_mut().dest(target).idle += 1;
        let wait = left.min(IDLE_SLOT_CHECK);
        futures_lite::future::or(ctx.work.notified(), glommio::timer::sleep(wait)).await;
        let mut queue = ctx.queue.borrow_mut();
        let dq = queue.dest(target);
        dq.idle = dq.idle.saturating_sub(1);
    }
}

/// The connection broke: every transaction on it failed transiently.
async fn broken(
    ctx: &Rc<ShardCtx>,
    mut conn: Conn,
    inflight: VecDeque<Inflight>,
    why: &str,
    via: Via<'_>,
) -> Result<(), ConnError> {
    for item in &inflight {
        fail_job(ctx, &item.job, why, via);
    }
    let _ = conn.stream.close().await;
    Err(ConnError::Broken)
}

/// Each recipient's fate: the first refusal among MAIL, its RCPT and the final dot, else the
/// reply to the final dot.
fn per_rcpt(job: &Job, outcome: &TransactionOutcome) -> Vec<(u32, RcptResult)> {
    job.rcpts
        .iter()
        .enumerate()
        .map(|(i, &r)| {
            let reply = if !outcome.mail.is_positive() {
                outcome.mail.clone()
            } else {
                match outcome.rcpts.get(i) {
                    Some(rr) if !rr.is_positive() => rr.clone(),
                    _ => match &outcome.data {
                        Some(d) => d.clone(),
                        // DATA itself was refused: its reply decides (5xx bounces, 4xx retries).
                        None => match &outcome.data_command {
                            Some(d) if !d.is_positive() => d.clone(),
                            _ => return (r, RcptResult::Failure("DATA was not accepted".into())),
                        },
                    },
                }
            };
            (r, RcptResult::Reply(reply))
        })
        .collect()
}
