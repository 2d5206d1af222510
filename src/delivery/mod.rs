//! The delivery stage's adapter: one task per outbound SMTP connection, driving the I/O-free
//! client state machine over a glommio socket, asking the core what to do next.
//!
//! The core decides when a connection opens (with a permit for its site and source in hand),
//! which job it carries next, and when it closes (idle too long, carried
//! `messages_per_connection_max` messages, another shard's turn, shutdown). This task opens it
//! — walking the hosts: MX hosts in preference order, each host's addresses (A/AAAA, in
//! `delivery.address_order`), moving on when a host refuses the connection or greets with
//! anything but 220, all within the same attempt — then runs transactions, PIPELINING the next
//! one behind the previous final dot when the server allows it, and reports every result.
//!
//! A job is out of the queue while its transaction runs; if the process dies then, the spool
//! still has the message and recovery queues it again.

mod connect;
mod session;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use futures_lite::AsyncWriteExt;
use hickory_proto::rr::RecordType;

use crate::clock::Clock;
use crate::core::{ConnFailure, ConnId, CoreCell, NextJob, Ticket};
use crate::dns::message::Answer;
use crate::dns::resolver::Resolver;
use crate::envelope::Body;
use crate::outcome::RcptResult;
use crate::queue::{Dest, Job};
use crate::route::Hop;
use crate::smtp::client::{ClientStep, MailOptions, TlsPolicy, TransactionOutcome};
use crate::smtp::reply::Reply;
use crate::spool::{Spool, StoredMessage};

pub use connect::{connect_bound, BoundConnectError};
use connect::{connect_from, Refusal};
use session::{greet, Conn, SessionError};

use std::sync::Arc;

use crate::tlspolicy::plan::{host_tls, HostTls, Session, TlsaFinding};
use crate::tlspolicy::verify::Slot;
use crate::tlspolicy::TlsOutcome;

/// Addresses tried per connection attempt, over all MX hosts: enough for every host of a
/// large provider, few enough that a broken site cannot hold a connection task for long.
const ADDRESSES_PER_ATTEMPT_MAX: usize = 10;
/// Transactions in flight on one connection, at most. Two is enough to overlap one message's
/// final reply with the next one's envelope; more would only add messages to retry when a
/// connection breaks.
const INFLIGHT_MAX: usize = 2;

/// What a delivery connection needs of its shard.
pub struct DeliveryCtx {
    /// Read when a connection starts: it keeps those settings to its end.
    pub settings: Rc<crate::settings::Live>,
    pub core: Rc<CoreCell>,
    pub spool: Rc<Spool>,
    pub resolver: Option<Rc<Resolver>>,
    /// MTA-STS and DANE, when either is on and there is a resolver.
    pub tlspolicy: Option<Rc<crate::tlspolicy::lookup::Agent>>,
    pub clock: Rc<dyn Clock>,
    /// Notified on the core's `WakeIdle`: idle connections ask for work again.
    pub work: Rc<shards::Notify>,
    /// This shard's metrics: transaction times.
    pub metrics: Rc<crate::metrics::Recorder>,
}

impl DeliveryCtx {
    fn now(&self) -> u64 {
        self.clock.now_ms()
    }
}

/// Run connection `conn` to `dest` from egress source `source`, from open to close.
pub async fn connection(ctx: Rc<DeliveryCtx>, conn: ConnId, dest: Dest, source: usize) {
    match open(&ctx, &dest, source).await {
        Err((failure, tls)) => {
            let now = ctx.now();
            ctx.core.with(|c| {
                if let Some(tls) = tls {
                    c.conn_tls(conn, tls);
                }
                c.conn_failed(conn, failure, now);
                c.conn_closed(conn, now);
            });
        }
        Ok(Opened {
            conn: session,
            peer,
            tls,
        }) => {
            let now = ctx.now();
            ctx.core.with(|c| {
                c.conn_tls(conn, tls);
                c.conn_opened(conn, &peer, now)
            });
            serve(&ctx, conn, session).await;
            let now = ctx.now();
            ctx.core.with(|c| c.conn_closed(conn, now));
        }
    }
}

/// A random seed per connection, for the order of equal-preference MX hosts.
fn connection_seed() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(crate::clock::now_ms())
}

/// The addresses of an MX host, in the configured order; Err says why there are none.
async fn host_addrs(ctx: &DeliveryCtx, host: &str) -> Result<Vec<IpAddr>, String> {
    // An MX host given as an address literal ([192.0.2.1] or 192.0.2.1) needs no lookup.
    if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse() {
        return Ok(vec![ip]);
    }
    let Some(resolver) = &ctx.resolver else {
        return Err("no DNS resolver configured".into());
    };
    let order = ctx.settings.get().address_order;
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

/// A session ready for transactions, and who it is with.
struct Opened {
    conn: Conn,
    /// `host[address]:port`, for the log.
    peer: String,
    tls: TlsOutcome,
}

/// STARTTLS policy, client configuration (None: the settings' default for the policy) and the
/// verdict slot of one host.
type HostTlsSetup = (TlsPolicy, Option<Arc<rustls::ClientConfig>>, Option<Slot>);

/// The STARTTLS policy and client configuration for a host under `plan`; the slot receives
/// the verifier's verdict. Err: the configuration could not be built (the host is skipped).
fn tls_for(ctx: &DeliveryCtx, plan: &HostTls, base: TlsPolicy) -> Result<HostTlsSetup, String> {
    use crate::tlspolicy::{dane::DaneVerifier, verify};
    let settings = ctx.settings.get();
    Ok(match plan {
        HostTls::Plain | HostTls::Skip { .. } => (base, None, None),
        HostTls::DaneUnusable => (
            TlsPolicy::Required,
            Some(settings.tls_client_unverified.clone()),
            None,
        ),
        HostTls::Dane { records } => {
            let slot = verify::new_slot();
            let verifier = Arc::new(DaneVerifier::new(records.clone(), slot.clone()));
            let config = verify::client_config(verifier).map_err(|e| e.to_string())?;
            (TlsPolicy::Required, Some(config), Some(slot))
        }
        HostTls::Sts { enforce, .. } => {
            let trust = settings
                .tls_trust
                .as_ref()
                .ok_or("MTA-STS without trust roots")?;
            let slot = verify::new_slot();
            let verifier = Arc::new(verify::StsVerifier {
                inner: verify::webpki(trust.store.clone()).map_err(|e| e.to_string())?,
                enforce: *enforce,
                slot: slot.clone(),
            });
            let config = verify::client_config(verifier).map_err(|e| e.to_string())?;
            let policy = match (enforce, base) {
                (true, _) => TlsPolicy::Required,
                // Testing mode: as without a policy, but with STARTTLS tried where offered.
                (false, TlsPolicy::Disabled) => TlsPolicy::Opportunistic,
                (false, other) => other,
            };
            (policy, Some(config), Some(slot))
        }
    })
}

/// Open a session for `dest` from `source`: walk the hosts and their addresses until one
/// greets, takes EHLO (and STARTTLS when required).
async fn open(
    ctx: &DeliveryCtx,
    dest: &Dest,
    source: usize,
) -> Result<Opened, (ConnFailure, Option<TlsOutcome>)> {
    // One connection, one set of settings, even if a reload comes while it walks the hosts.
    let settings = ctx.settings.get();
    let cfg = &settings.config.delivery;
    let src = &settings.egress.sources[source];
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
    let security = match &dest.hop {
        Hop::Mx(site) => site.security.clone(),
        Hop::Route(_) => None,
    };
    let sec = security.as_deref();
    // The TLS outcome of the last host given up on, for the deferral's events.
    let mut last_tls: Option<TlsOutcome> = None;
    'hosts: for host in &hosts {
        // Routes are configuration: their TLS is the route's. MX hosts follow the recipient
        // domain's policy: DANE for the host first, then MTA-STS.
        let (plan, tlsa) = match (&dest.hop, &ctx.tlspolicy) {
            (Hop::Mx(_), Some(agent)) => {
                let tlsa = agent.tlsa(host, sec.is_some_and(|s| s.mx_secure)).await;
                (host_tls(sec, host, &tlsa), tlsa)
            }
            _ => (HostTls::Plain, TlsaFinding::NotApplicable),
        };
        if let HostTls::Skip { why, .. } = &plan {
            refusals.push(why.clone());
            let session = Session::default();
            let outcome = crate::tlspolicy::plan::outcome(sec, host, &plan, &tlsa, &session);
            // Skipped by the policy: a failed session for TLS reporting.
            let now = ctx.now();
            ctx.core.with(|c| c.tls_session(&outcome, None, now));
            last_tls = Some(outcome);
            continue;
        }
        let (host_policy, tls_config, slot) = match tls_for(ctx, &plan, tls) {
            Ok(chosen) => chosen,
            Err(why) => {
                refusals.push(format!("{host}: {why}"));
                continue;
            }
        };
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
                    let greeted = greet(
                        &settings,
                        stream,
                        src,
                        host,
                        host_policy,
                        tls_config.clone(),
                    )
                    .await;
                    let verdict = slot.as_ref().and_then(crate::tlspolicy::verify::take);
                    match greeted {
                        Ok(conn) => {
                            let session = Session {
                                tls: conn.tls_info(),
                                verdict,
                                ..Session::default()
                            };
                            let tls =
                                crate::tlspolicy::plan::outcome(sec, host, &plan, &tlsa, &session);
                            let now = ctx.now();
                            ctx.core.with(|c| c.tls_session(&tls, Some(addr.ip()), now));
                            return Ok(Opened { conn, peer, tls });
                        }
                        Err(why) => {
                            let session = Session {
                                verdict,
                                no_starttls: matches!(why, SessionError::NoStartTls(_)),
                                failure: Some(why.to_string()),
                                ..Session::default()
                            };
                            let outcome =
                                crate::tlspolicy::plan::outcome(sec, host, &plan, &tlsa, &session);
                            // A session that failed before TLS was at stake (a 421
                            // greeting, a timeout) is no TLS session to report.
                            if outcome.result != crate::tlspolicy::ResultType::Success {
                                let now = ctx.now();
                                ctx.core
                                    .with(|c| c.tls_session(&outcome, Some(addr.ip()), now));
                            }
                            last_tls = Some(outcome);
                            Refusal::Session(why.to_string())
                        }
                    }
                }
                Err(refusal) => refusal,
            };
            match refusal {
                Refusal::Bind(why) => return Err((ConnFailure::Bind { why }, None)),
                Refusal::Connect(e) => {
                    source_suspect |= !e.remote_answered;
                    refusals.push(format!("connect to {peer} failed: {}", e.why));
                }
                Refusal::Session(why) => refusals.push(format!("{peer}: {why}")),
            }
        }
    }
    if refusals.is_empty() {
        refusals.push(format!(
            "source `{}` ({}) cannot reach any address of {}",
            src.name,
            src.address.map_or("any".into(), |a| a.to_string()),
            dest.hop
        ));
    }
    Err((
        ConnFailure::Unreachable {
            why: refusals.join("; "),
            source_suspect: source_suspect && !connected,
        },
        last_tls,
    ))
}

/// A transaction on the wire.
struct Inflight {
    ticket: Box<Ticket>,
    body_sent: bool,
    /// The message, read before MAIL when headers are stripped (its SIZE is what is sent).
    stored: Option<StoredMessage>,
    /// When its MAIL FROM was queued for sending: the transaction's time is measured from
    /// here to the reply to its data (pipelined behind another, it includes the wait for
    /// that one's final reply, as the sender sees it).
    started: std::time::Instant,
}

/// Transactions until the core says close, or the connection breaks.
async fn serve(ctx: &DeliveryCtx, id: ConnId, mut conn: Conn) {
    // Oldest first: at most two, the second started behind the first's final dot (see
    // `Client::can_start_early`).
    let mut inflight: VecDeque<Inflight> = VecDeque::with_capacity(INFLIGHT_MAX);
    // The headers `egress.strip_headers` removes, as the connection's other settings: fixed
    // from its start.
    let settings = ctx.settings.get();
    let strip = settings.egress.stripped_headers();
    loop {
        if inflight.is_empty() {
            // Created before asking, so a wake-up between the answer and the wait is kept.
            let woken = ctx.work.notified();
            let now = ctx.now();
            match ctx.core.with(|c| c.next_job(id, now)) {
                NextJob::Job(ticket) => {
                    let item = prepare(ctx, ticket, &strip).await;
                    if let Some(item) = item.and_then(|i| begin(ctx, &mut conn, i)) {
                        inflight.push_back(item);
                    }
                }
                NextJob::Wait { until_ms } => {
                    let wait = Duration::from_millis(until_ms.saturating_sub(now).max(1));
                    futures_lite::future::or(woken, glommio::timer::sleep(wait)).await;
                }
                NextJob::Close => {
                    conn.quit().await;
                    return;
                }
            }
            continue;
        }
        match conn.client.poll(&mut conn.out) {
            ClientStep::NeedInput => {
                if inflight.len() < INFLIGHT_MAX && conn.client.can_start_early() {
                    let now = ctx.now();
                    if let Some(ticket) = ctx.core.with(|c| c.early_job(id, now)) {
                        let item = prepare(ctx, ticket, &strip).await;
                        if let Some(item) = item.and_then(|i| begin(ctx, &mut conn, i)) {
                            inflight.push_back(item);
                        }
                    }
                }
                if let Err(why) = conn.exchange().await {
                    return broken(ctx, id, conn, inflight, &why.to_string()).await;
                }
            }
            ClientStep::SendBody => {
                // The body goes to the oldest transaction that has not sent one yet; the client
                // frames it for DATA or BDAT.
                let Some(item) = inflight.iter_mut().find(|i| !i.body_sent) else {
                    let why = "server ready for a body with none to send";
                    return broken(ctx, id, conn, inflight, why).await;
                };
                item.body_sent = true;
                let loc = item.ticket.loc;
                let stored = match item.stored.take() {
                    Some(stored) => Ok(stored),
                    None => ctx.spool.read_message(loc).await,
                };
                let stored = match stored {
                    Ok(stored) => stored,
                    Err(e) => {
                        // DATA may be open and there is nothing to send: only closing the
                        // connection ends it without delivering a wrong message.
                        let why = format!("cannot read the spooled message: {e}");
                        return broken(ctx, id, conn, inflight, &why).await;
                    }
                };
                match stored.view() {
                    Ok(view) => {
                        // Slices of the spooled body around the stripped fields: no copy.
                        let pieces = crate::egress::without_headers(view.body(), &strip);
                        conn.client.write_body_parts(&pieces, &mut conn.out)
                    }
                    Err(e) => {
                        let why = format!("spooled message does not validate: {e}");
                        return broken(ctx, id, conn, inflight, &why).await;
                    }
                }
            }
            ClientStep::Done(outcome) => {
                if let Some(item) = inflight.pop_front() {
                    ctx.metrics
                        .transaction_done(item.started.elapsed().as_micros() as u64);
                    let results = per_rcpt(&item.ticket.job, &outcome);
                    let now = ctx.now();
                    ctx.core
                        .with(|c| c.txn_done(id, &item.ticket.job, &results, now));
                }
            }
            ClientStep::Failed(reply) => {
                let why = format!("session failed: {}", reply.to_string().trim_end());
                return broken(ctx, id, conn, inflight, &why).await;
            }
            ClientStep::Ready | ClientStep::Closed | ClientStep::StartTls => {
                let why = "server ended the transaction unexpectedly";
                return broken(ctx, id, conn, inflight, why).await;
            }
        }
    }
}

/// A ticket ready to start. When headers are stripped the message is read now, before MAIL,
/// so SIZE declares what will be sent; otherwise it is read only when the server asks for the
/// body. None: the message could not be read (its recipients are retried later; reported).
async fn prepare(ctx: &DeliveryCtx, mut ticket: Box<Ticket>, strip: &[&str]) -> Option<Inflight> {
    if strip.is_empty() {
        return Some(Inflight {
            ticket,
            body_sent: false,
            stored: None,
            started: std::time::Instant::now(),
        });
    }
    let stored = match ctx.spool.read_message(ticket.loc).await {
        Ok(stored) => stored,
        Err(e) => return unreadable(ctx, &ticket, &e.to_string()),
    };
    let sent: u64 = match stored.view() {
        Ok(view) => crate::egress::without_headers(view.body(), strip)
            .iter()
            .map(|p| p.len() as u64)
            .sum(),
        Err(e) => return unreadable(ctx, &ticket, &e.to_string()),
    };
    ticket.size = sent;
    Some(Inflight {
        ticket,
        body_sent: false,
        stored: Some(stored),
        started: std::time::Instant::now(),
    })
}

/// A ticket whose message could not be read before MAIL: nothing was sent, its recipients
/// are retried later.
fn unreadable(ctx: &DeliveryCtx, ticket: &Ticket, e: &str) -> Option<Inflight> {
    let why = format!("cannot read the spooled message: {e}");
    let results: Vec<(u16, RcptResult)> = ticket
        .job
        .rcpts
        .iter()
        .map(|&r| (r, RcptResult::Failure(why.clone())))
        .collect();
    let now = ctx.now();
    ctx.core.with(|c| c.txn_refused(&ticket.job, &results, now));
    None
}

/// Start a prepared ticket's transaction: the envelope comes from the queue. None: refused
/// before sending (reported).
fn begin(ctx: &DeliveryCtx, conn: &mut Conn, mut item: Inflight) -> Option<Inflight> {
    let ticket = &item.ticket;
    // RFC 1870: the server told us its limit; sending more would only be refused after the
    // whole body crossed the wire. Bounce now, saying why.
    if let Some(limit) = conn
        .client
        .capabilities()
        .size
        .filter(|&n| n > 0 && ticket.size > n as u64)
    {
        let text = format!(
            "Message of {} bytes exceeds the destination's SIZE limit of {limit}",
            ticket.size
        );
        let reply = Reply::new(552, Some((5, 3, 4)), text);
        let results: Vec<(u16, RcptResult)> = ticket
            .job
            .rcpts
            .iter()
            .map(|&r| (r, RcptResult::Reply(reply.clone())))
            .collect();
        let now = ctx.now();
        ctx.core.with(|c| c.txn_refused(&ticket.job, &results, now));
        return None;
    }
    let rcpt_refs: Vec<&str> = ticket.rcpts.iter().map(String::as_str).collect();
    let opts = MailOptions {
        size: Some(ticket.size as usize),
        eight_bit: ticket.body == Body::EightBitMime,
        binary: ticket.body == Body::BinaryMime,
        smtputf8: ticket.smtputf8,
    };
    conn.client
        .start_with(&ticket.sender, &rcpt_refs, opts, &mut conn.out);
    item.started = std::time::Instant::now();
    Some(item)
}

/// The connection broke: every transaction on it failed transiently.
async fn broken(
    ctx: &DeliveryCtx,
    id: ConnId,
    mut conn: Conn,
    inflight: VecDeque<Inflight>,
    why: &str,
) {
    let now = ctx.now();
    ctx.core.with(|c| {
        for item in &inflight {
            let results: Vec<(u16, RcptResult)> = item
                .ticket
                .job
                .rcpts
                .iter()
                .map(|&r| (r, RcptResult::Failure(why.to_owned())))
                .collect();
            c.txn_done(id, &item.ticket.job, &results, now);
        }
    });
    let _ = conn.stream.close().await;
}

/// Each recipient's fate: the first refusal among MAIL, its RCPT and the final dot, else the
/// reply to the final dot.
fn per_rcpt(job: &Job, outcome: &TransactionOutcome) -> Vec<(u16, RcptResult)> {
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
