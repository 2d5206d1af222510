//! Outbound delivery: one task per SMTP connection, driving the I/O-free client state machine
//! over a glommio socket.
//!
//! A connection task serves one destination: it takes jobs from that destination's ready
//! queue, one transaction per job, reusing the connection (and PIPELINING when offered) until
//! the queue stays empty for `idle_timeout_ms`, the connection has carried
//! `messages_per_connection_max` messages, or the shard shuts down. The number of tasks per
//! destination is bounded by `connections_per_destination_max` (see `ShardCtx::make_ready`).
//!
//! A job is out of the queue while its transaction runs; if the process dies then, the spool
//! still has the message and recovery queues it again.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use crate::queue::Job;
use crate::route::Destination;
use crate::shard::{RcptResult, ShardCtx};
use crate::smtp::client::{
    Awaiting, Client, ClientConfig, ClientStep, MailOptions, TlsPolicy, TransactionOutcome,
};
use crate::spool::record::{FLAG_8BITMIME, FLAG_BINARYMIME, FLAG_SMTPUTF8};

/// Bytes read from the socket at a time. Replies are short; 16 KiB holds hundreds of them.
const READ_BUF_BYTES: usize = 16 << 10;
/// Longest reply line accepted from a server (RFC 5321 §4.5.3.1.5 says 512; be lenient).
const REPLY_LINE_LEN_MAX: usize = 4096;

#[derive(Debug)]
enum ConnError {
    /// Could not reach the destination at all: every job waiting for it fails the same way.
    Unreachable(String),
    /// The connection broke; the job in hand was already accounted for.
    Broken,
}

pub async fn connection(ctx: Rc<ShardCtx>, dest: Destination) {
    let target = Some(dest.clone());
    let result = serve(&ctx, &dest).await;
    {
        let mut queue = ctx.queue.borrow_mut();
        let dq = queue.dest(&target);
        dq.connections = dq.connections.saturating_sub(1);
    }
    ctx.deliveries.set(ctx.deliveries.get().saturating_sub(1));
    if let Err(ConnError::Unreachable(why)) = result {
        let jobs = ctx.queue.borrow_mut().drain_ready(&target);
        for job in jobs {
            fail_job(&ctx, &job, &why, &dest);
        }
    }
    // Work may have arrived while this connection was closing: hand it to a fresh one.
    let waiting = ctx.queue.borrow_mut().drain_ready(&target);
    for job in waiting {
        ctx.requeue(job);
    }
}

fn fail_job(ctx: &Rc<ShardCtx>, job: &Job, why: &str, dest: &Destination) {
    let results: Vec<(u32, RcptResult)> = job
        .rcpts
        .iter()
        .map(|&r| (r, RcptResult::Failure(why.to_owned())))
        .collect();
    ctx.record_results(job, &results, &dest.to_string());
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

    async fn quit(mut self) {
        self.client.quit(&mut self.out);
        let _ = self.flush().await;
        let _ = self.stream.close().await;
    }
}

async fn serve(ctx: &Rc<ShardCtx>, dest: &Destination) -> Result<(), ConnError> {
    let cfg = &ctx.settings.config.delivery;
    let stream =
        TcpStream::connect_timeout(dest.addr, Duration::from_millis(cfg.connect_timeout_ms))
            .await
            .map_err(|e| ConnError::Unreachable(format!("connect to {dest} failed: {e}")))?;
    let _ = stream.set_nodelay(true);
    stream
        .set_write_timeout(Some(Duration::from_millis(cfg.data_block_timeout_ms)))
        .map_err(|e| ConnError::Unreachable(e.to_string()))?;
    let client = Client::new(ClientConfig {
        helo_name: ctx.settings.helo_name.clone(),
        line_len_max: REPLY_LINE_LEN_MAX,
        starttls: dest.tls,
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

    // Greeting and EHLO.
    loop {
        match conn.client.poll(&mut conn.out) {
            ClientStep::Ready => break,
            ClientStep::NeedInput => conn.exchange().await.map_err(ConnError::Unreachable)?,
            ClientStep::StartTls => {
                let config = match dest.tls {
                    TlsPolicy::Required => ctx.settings.tls_client_verified.clone(),
                    _ => Some(ctx.settings.tls_client_unverified.clone()),
                };
                let config = config.ok_or_else(|| {
                    ConnError::Unreachable("TLS required but no CA bundle loaded".into())
                })?;
                conn.start_tls(config, &dest.host)
                    .await
                    .map_err(ConnError::Unreachable)?;
                conn.client.tls_started(&mut conn.out);
            }
            ClientStep::Failed(reply) => {
                return Err(ConnError::Unreachable(format!(
                    "{dest} refused the session: {}",
                    reply.to_string().trim_end()
                )))
            }
            other => {
                return Err(ConnError::Unreachable(format!(
                    "unexpected client step {other:?}"
                )));
            }
        }
    }

    let target = Some(dest.clone());
    let peer = dest.to_string();
    let idle = Duration::from_millis(cfg.idle_timeout_ms);
    // Transactions on the wire, oldest first: at most two, the second started behind the
    // first's final dot (see `Client::can_start_early`).
    let mut inflight: VecDeque<Inflight> = VecDeque::with_capacity(INFLIGHT_MAX);
    let mut started = 0usize;
    loop {
        if inflight.is_empty() {
            if started >= cfg.messages_per_connection_max {
                conn.quit().await;
                return Ok(());
            }
            let Some(job) = next_job(ctx, &target, idle).await else {
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
                    && started < cfg.messages_per_connection_max
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
                    return broken(ctx, conn, inflight, &why, dest).await;
                }
            }
            ClientStep::SendBody => {
                // The body goes to the oldest transaction that has not sent one yet; the client
                // frames it for DATA or BDAT.
                let Some(item) = inflight.iter_mut().find(|i| !i.body_sent) else {
                    let why = "server ready for a body with none to send";
                    return broken(ctx, conn, inflight, why, dest).await;
                };
                item.body_sent = true;
                let loc = item.loc;
                let stored = match ctx.spool.read_message(loc).await {
                    Ok(stored) => stored,
                    Err(e) => {
                        // DATA may be open and there is nothing to send: only closing the
                        // connection ends it without delivering a wrong message.
                        let why = format!("cannot read the spooled message: {e}");
                        return broken(ctx, conn, inflight, &why, dest).await;
                    }
                };
                match stored.message() {
                    Ok(message) => conn
                        .client
                        .write_body(message.body.as_slice(), &mut conn.out),
                    Err(e) => {
                        let why = format!("spooled message does not validate: {e}");
                        return broken(ctx, conn, inflight, &why, dest).await;
                    }
                }
            }
            ClientStep::Done(outcome) => {
                if let Some(item) = inflight.pop_front() {
                    ctx.record_results(&item.job, &per_rcpt(&item.job, &outcome), &peer);
                }
            }
            ClientStep::Failed(reply) => {
                let why = format!("session failed: {}", reply.to_string().trim_end());
                return broken(ctx, conn, inflight, &why, dest).await;
            }
            ClientStep::Ready | ClientStep::Closed | ClientStep::StartTls => {
                let why = "server ended the transaction unexpectedly";
                return broken(ctx, conn, inflight, why, dest).await;
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
        let results: Vec<(u32, RcptResult)> = job
            .rcpts
            .iter()
            .map(|&r| (r, RcptResult::Reply(reply.clone())))
            .collect();
        ctx.record_results(&job, &results, "-");
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

/// The next job for this destination, waiting up to `idle` for one. None: close the connection.
async fn next_job(
    ctx: &Rc<ShardCtx>,
    target: &crate::queue::Target,
    idle: Duration,
) -> Option<Job> {
    let deadline = std::time::Instant::now() + idle;
    loop {
        if ctx.shutting_down() {
            return None;
        }
        if let Some(job) = ctx.queue.borrow_mut().pop_ready(target) {
            return Some(job);
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return None;
        }
        ctx.queue.borrow_mut().dest(target).idle += 1;
        futures_lite::future::or(ctx.work.notified(), glommio::timer::sleep(left)).await;
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
    dest: &Destination,
) -> Result<(), ConnError> {
    for item in &inflight {
        fail_job(ctx, &item.job, why, dest);
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
