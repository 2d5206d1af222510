//! `sink`: an SMTP server that accepts, counts and discards, for measuring an MTA's output.
//!
//! One thread per connection drives a `server::Session` over a blocking socket: it reads,
//! lets the session answer every complete command in the buffer, and writes all the replies
//! in one go once the input is drained, which is what a pipelining client wants. The main
//! thread only watches the exit conditions and prints the report.
//!
//! Invariants: a message is counted (and its id recorded) before its reply is written, and at
//! exit the ledger is closed before the report is taken, so every message a client saw
//! acknowledged is in the report and the files; `unique` counts distinct X-Loadgen-Id
//! values of messages answered 2xx, and `duplicates` the further ones. Every accepted
//! connection is counted once in `connections` and once under its client's address in `peers`;
//! `connections_max_concurrent` is the most that were being served at the same time.
//!
//! With `--limit-*` or `--stats-per-ip`, one table of clients (`throttle::Clients`) holds the
//! limits' state and the per-client counts. Without them it does not exist, and a connection
//! or a message costs one `Option` check more than before. Lock order: the ledger, then the
//! clients, never the other way.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufWriter, ErrorKind, Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::reply_mix::{FinalReply, ReplyMix};
use crate::server::{Event, Message, Session, COMMAND_LINE_LEN_MAX};
use crate::smart::{Kind, Providers};
use crate::stats::{self, SinkReport};
use crate::throttle::{Clients, LimitReply, LimitStyle, Limits};

/// Each connection costs a thread and a read buffer; a loopback test never needs more, and
/// past this the sink answers 421 rather than exhausting threads.
pub const CONNECTIONS_ACTIVE_MAX: usize = 4096;

/// Client addresses named in the report. Tests and benchmarks connect from a few loopback or
/// egress addresses; a sink exposed to many clients must not grow without bound, so further
/// addresses are counted together under `PEERS_OTHER`.
const PEERS_MAX: usize = 1024;

/// The `peers` key for connections from addresses past `PEERS_MAX`.
const PEERS_OTHER: &str = "other";

/// Per-connection read buffer: a few pipelined batches, or a good slice of a large message.
const READ_BUF_LEN: usize = 64 * 1024;
const _: () = assert!(
    READ_BUF_LEN > COMMAND_LINE_LEN_MAX,
    "a command line the session accepts must fit in the buffer"
);

/// RFC 5321 4.5.3.2.7: a server should wait at least 5 minutes for the next command.
const IDLE_TIMEOUT_S: u64 = 300;

/// How often the main thread checks the exit conditions; bounds how late an exit is.
const POLL_INTERVAL_MS: u64 = 10;

/// Pause after a failed accept (out of file descriptors, say) before trying again.
const ACCEPT_ERROR_PAUSE_MS: u64 = 10;

/// Longest the sink waits at exit for replies to counted messages to be written, so a client
/// sees the acknowledgement of every message the report counts; a client that stopped
/// reading must not keep the sink alive.
const EXIT_FLUSH_WAIT_MS_MAX: u64 = 1000;

/// A reply delayed past ten minutes outlasts RFC 5321's DATA termination timeout, so no
/// client would still be waiting for it.
const DELAY_MS_MAX: u64 = 600_000;

/// Connection threads only run the session loop; their buffers live on the heap.
const THREAD_STACK_BYTES: usize = 256 * 1024;

const TOO_MANY_CONNECTIONS: &[u8] = b"421 4.3.2 Too many connections, try again later\r\n";
const TIMEOUT: &[u8] = b"421 4.4.2 Idle timeout, closing connection\r\n";

#[derive(Debug, clap::Args)]
pub struct SinkArgs {
    /// Address to listen on, HOST:PORT (port 0 picks a free one; see stderr).
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// Exit after this many unique accepted messages.
    #[arg(long, value_name = "N")]
    exit_after: Option<u64>,
    /// Exit after this many seconds without a message (or since start if none came).
    #[arg(long = "idle-exit", value_name = "SECS", value_parser = parse_idle_exit)]
    idle_exit: Option<Duration>,
    /// Weighted replies to the final dot, CODE:WEIGHT,... e.g. 250:90,451:5,550:5.
    #[arg(long, value_name = "MIX", default_value = "250:1")]
    reply: ReplyMix,
    /// The first K messages to arrive get 451 4.3.0, the rest the --reply mix.
    #[arg(long, value_name = "K", default_value_t = 0)]
    tempfail_first: u64,
    /// Added latency before each reply to the final dot, in milliseconds.
    #[arg(long, value_name = "X", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=DELAY_MS_MAX))]
    delay_ms: u64,
    /// On exit, write every unique accepted X-Loadgen-Id here, one per line.
    #[arg(long, value_name = "PATH")]
    ids_file: Option<PathBuf>,
    /// On exit, write one line per accepted message: its X-Loadgen-Id (or -) and recipients.
    #[arg(long, value_name = "PATH")]
    rcpts_file: Option<PathBuf>,
    /// Refuse recipients by local part the way big providers do: tempfail@, permfail@,
    /// quota@, blocked@, ratelimit@, greylist@ at RCPT, spam@ after the final dot.
    #[arg(long)]
    smart: bool,
    /// With --smart: a TOML table of domain globs and provider replies laid over the
    /// built-in one (its format is in loadgen/src/providers.toml).
    #[arg(long, value_name = "FILE", requires = "smart")]
    providers: Option<PathBuf>,
    /// For the first SECS seconds, greet every connection with `421 4.3.2` and close it,
    /// like a site that is down (counted as `greeting_refused`).
    #[arg(long = "greet-421-secs", value_name = "SECS", value_parser = parse_idle_exit)]
    greet_421: Option<Duration>,
    /// At most N concurrent connections per client IP; one more is greeted with a 421 and
    /// closed (counted as `throttled_connections`).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    limit_conns_per_ip: Option<u32>,
    /// At most N MAIL FROM per client IP in each whole second since start; one more gets
    /// --limit-reply (counted as `throttled_messages`).
    #[arg(long = "limit-msgs-per-sec", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    limit_msgs_per_s: Option<u32>,
    /// At most N MAIL FROM per client IP in each whole minute since start; one more gets
    /// --limit-reply (counted as `throttled_messages`).
    #[arg(long = "limit-msgs-per-min", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    limit_msgs_per_min: Option<u32>,
    /// The reply to a MAIL over a message limit: 451 (4.7.x, the connection stays open) or
    /// 421 (4.7.x, and the connection is closed).
    #[arg(long, value_name = "CODE", value_enum, default_value = "451")]
    limit_reply: LimitReply,
    /// Whose words the limits' refusals use.
    #[arg(long, value_name = "STYLE", value_enum, default_value = "gmail")]
    limit_style: LimitStyle,
    /// Add `per_ip` to the report: for each client IP, messages accepted, the most accepted
    /// in one second and in one minute, and its throttled connections and messages.
    #[arg(long)]
    stats_per_ip: bool,
}

fn parse_idle_exit(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|e| format!("{e}"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{e}"))
}

/// State shared by all connections.
struct Sink {
    start: Instant,
    mix: ReplyMix,
    tempfail_reply: FinalReply,
    shutdown_reply: FinalReply,
    tempfail_first: u64,
    delay: Duration,
    keep_rcpts: bool,
    /// The --smart table, if on.
    providers: Option<Arc<Providers>>,
    /// Connections in this time from start get a 421 greeting.
    greet_421: Option<Duration>,
    greeting_refused: AtomicU64,
    /// Whether --limit-* asked for the throttled counts in the report.
    limited: bool,
    /// Whether a MAIL FROM must be admitted by `clients` first.
    limits_messages: bool,
    /// Per-client limits and counts, with --limit-* or --stats-per-ip.
    clients: Option<Mutex<Clients>>,
    connections: AtomicU64,
    active: AtomicUsize,
    /// The highest `active` has been.
    active_max: AtomicUsize,
    /// Connections by client address.
    peers: Mutex<Peers>,
    /// Copy of `Ledger::unique` that the main thread polls without taking the lock.
    unique: AtomicU64,
    /// Nanoseconds from `start` to the last completed DATA; 0 while none has.
    last_message_ns: AtomicU64,
    /// Messages whose reply is chosen but not yet written to the socket.
    replies_unwritten: AtomicU64,
    ledger: Mutex<Ledger>,
}

/// The counts and what is kept of accepted messages. One lock covers them all, so the report
/// and the files are one consistent cut: once `closed` is set nothing more is acknowledged.
#[derive(Default)]
struct Ledger {
    closed: bool,
    /// Messages whose DATA completed, whatever the reply; also each one's arrival number.
    received: u64,
    unique: u64,
    duplicates: u64,
    rcpts: u64,
    tempfailed: u64,
    rejected: u64,
    ids: HashSet<Box<str>>,
    first_accepted: Option<Instant>,
    last_accepted: Option<Instant>,
    /// One line per accepted message, when --rcpts-file asks for it.
    rcpt_lines: Vec<String>,
    /// Accepted messages by the EHLO name of their session, at most `PEERS_MAX` names.
    helos: BTreeMap<String, u64>,
    /// With --smart, the refusals given by `Kind::index`, at RCPT and after DATA.
    refused_by_kind: Option<[u64; Kind::ALL.len()]>,
}

/// Connections counted by client address, at most `PEERS_MAX` of them by name.
#[derive(Default)]
struct Peers(BTreeMap<String, u64>);

impl Peers {
    fn count(&mut self, ip: IpAddr) {
        // A client reaching an IPv6 socket over IPv4 is the IPv4 client it is.
        let mut key = ip.to_canonical().to_string();
        if !self.0.contains_key(&key) && self.0.len() >= PEERS_MAX {
            key = PEERS_OTHER.to_owned();
        }
        *self.0.entry(key).or_default() += 1;
    }
}

impl Sink {
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // A connection thread that panicked leaves counts that are still right.
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn clients(&self) -> Option<MutexGuard<'_, Clients>> {
        // As for the ledger: a panicked connection thread leaves counts that are still right.
        self.clients
            .as_ref()
            .map(|clients| clients.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Counts a --smart refusal given at RCPT.
    fn on_refused(&self, kind: Kind) {
        let mut ledger = self.ledger();
        if !ledger.closed {
            ledger.count_refused(kind);
        }
    }

    /// Counts a message whose DATA completed and picks its reply: the --smart refusal the
    /// message carries, else the mix. After the ledger is closed, messages are refused with
    /// 421 and not counted. `client` is the address the message came from.
    fn on_message<'a>(&'a self, message: &'a Message, client: Option<IpAddr>) -> &'a FinalReply {
        self.replies_unwritten.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let since_start_ns = u64::try_from((now - self.start).as_nanos()).unwrap_or(u64::MAX);
        self.last_message_ns
            .fetch_max(since_start_ns.max(1), Ordering::Relaxed);

        let mut ledger = self.ledger();
        if ledger.closed {
            return &self.shutdown_reply;
        }
        let arrival = ledger.received;
        ledger.received += 1;
        let reply = if let Some((kind, reply)) = &message.refusal {
            ledger.count_refused(*kind);
            reply
        } else if arrival < self.tempfail_first {
            &self.tempfail_reply
        } else {
            self.mix.pick(arrival)
        };
        match reply.code / 100 {
            2 => {
                if let Some(mut clients) = self.clients() {
                    clients.accepted(client, now - self.start);
                }
                ledger.rcpts += message.rcpts.len() as u64;
                ledger.first_accepted.get_or_insert(now);
                ledger.last_accepted = Some(now);
                if let Some(id) = &message.id {
                    if ledger.ids.insert(id.as_str().into()) {
                        ledger.unique += 1;
                        self.unique.store(ledger.unique, Ordering::Relaxed);
                    } else {
                        ledger.duplicates += 1;
                    }
                }
                let mut helo = message.helo.as_deref().unwrap_or("-");
                if !ledger.helos.contains_key(helo) && ledger.helos.len() >= PEERS_MAX {
                    helo = PEERS_OTHER;
                }
                *ledger.helos.entry(helo.to_owned()).or_default() += 1;
                if self.keep_rcpts {
                    let mut line = message.id.clone().unwrap_or_else(|| "-".to_owned());
                    for rcpt in &message.rcpts {
                        line.push(' ');
                        line.push_str(rcpt);
                    }
                    ledger.rcpt_lines.push(line);
                }
            }
            4 => ledger.tempfailed += 1,
            _ => ledger.rejected += 1,
        }
        reply
    }
}

impl Ledger {
    fn count_refused(&mut self, kind: Kind) {
        if let Some(counts) = &mut self.refused_by_kind {
            counts[kind.index()] += 1;
        }
    }

    fn report(
        &self,
        connections: u64,
        connections_max_concurrent: usize,
        peers: BTreeMap<String, u64>,
    ) -> SinkReport {
        let elapsed_s = match (self.first_accepted, self.last_accepted) {
            (Some(first), Some(last)) => (last - first).as_secs_f64(),
            _ => 0.0,
        };
        SinkReport {
            received: self.received,
            unique: self.unique,
            duplicates: self.duplicates,
            elapsed_s: stats::round3(elapsed_s),
            msgs_per_s: stats::rate(self.unique, elapsed_s),
            connections,
            rcpts: self.rcpts,
            tempfailed: self.tempfailed,
            rejected: self.rejected,
            connections_max_concurrent: connections_max_concurrent as u64,
            peers,
            helos: self.helos.clone(),
            refused_by_kind: self.refused_by_kind.map(|counts| {
                Kind::ALL
                    .iter()
                    .map(|kind| (kind.name(), counts[kind.index()]))
                    .collect()
            }),
            greeting_refused: 0,
            throttled_connections: None,
            throttled_messages: None,
            per_ip: None,
        }
    }
}

pub fn run(args: SinkArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&args.listen)
        .with_context(|| format!("binding --listen {}", args.listen))?;
    let addr = listener.local_addr()?;
    // Handlers first: whoever reads the line below may stop the sink at once, and must get a
    // report rather than the default action's silent death.
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing a signal handler")?;
    }
    // Tests that listen on port 0 read the port from this line; stderr is unbuffered.
    let providers = if args.smart {
        let overlay = match &args.providers {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading --providers {}", path.display()))?,
            ),
            None => None,
        };
        let providers = Providers::parse(overlay.as_deref())
            .map_err(anyhow::Error::msg)
            .context("loading the --smart providers")?;
        eprintln!("smart replies: {}", providers.describe());
        Some(Arc::new(providers))
    } else {
        None
    };
    let limits = Limits {
        conns_per_ip: args.limit_conns_per_ip,
        msgs_per_s: args.limit_msgs_per_s,
        msgs_per_min: args.limit_msgs_per_min,
        reply: args.limit_reply,
        style: args.limit_style,
    };
    eprintln!("listening on {addr}");

    let sink = Arc::new(Sink {
        start: Instant::now(),
        mix: args.reply,
        tempfail_reply: FinalReply::new(451),
        shutdown_reply: FinalReply::new(421),
        tempfail_first: args.tempfail_first,
        delay: Duration::from_millis(args.delay_ms),
        keep_rcpts: args.rcpts_file.is_some(),
        ledger: Mutex::new(Ledger {
            refused_by_kind: providers.as_ref().map(|_| [0; Kind::ALL.len()]),
            ..Ledger::default()
        }),
        providers,
        greet_421: args.greet_421,
        greeting_refused: AtomicU64::new(0),
        limited: limits.any(),
        limits_messages: limits.limits_messages(),
        clients: (limits.any() || args.stats_per_ip).then(|| Mutex::new(Clients::new(limits))),
        connections: AtomicU64::new(0),
        active: AtomicUsize::new(0),
        active_max: AtomicUsize::new(0),
        peers: Mutex::new(Peers::default()),
        unique: AtomicU64::new(0),
        last_message_ns: AtomicU64::new(0),
        replies_unwritten: AtomicU64::new(0),
    });
    {
        let sink = Arc::clone(&sink);
        thread::Builder::new()
            .name("accept".into())
            .spawn(move || accept_loop(&listener, &sink))
            .context("spawning the accept thread")?;
    }

    loop {
        thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if args
            .exit_after
            .is_some_and(|n| sink.unique.load(Ordering::Relaxed) >= n)
        {
            break;
        }
        if let Some(idle) = args.idle_exit {
            let last = Duration::from_nanos(sink.last_message_ns.load(Ordering::Relaxed));
            if sink.start.elapsed().saturating_sub(last) >= idle {
                break;
            }
        }
    }

    // Close the ledger first: from here on messages get 421 and are not counted, so nothing
    // acknowledged is missing from the report. Then let the replies already chosen go out.
    sink.ledger().closed = true;
    let flush_deadline = Instant::now() + Duration::from_millis(EXIT_FLUSH_WAIT_MS_MAX);
    while sink.replies_unwritten.load(Ordering::Relaxed) > 0 && Instant::now() < flush_deadline {
        thread::sleep(Duration::from_millis(1));
    }
    let ledger = sink.ledger();
    let peers = std::mem::take(&mut sink.peers.lock().unwrap_or_else(PoisonError::into_inner).0);
    let mut report = ledger.report(
        sink.connections.load(Ordering::Relaxed),
        sink.active_max.load(Ordering::Relaxed),
        peers,
    );
    report.greeting_refused = sink.greeting_refused.load(Ordering::Relaxed);
    if let Some(clients) = sink.clients() {
        if sink.limited {
            let (connections, messages) = clients.throttled();
            report.throttled_connections = Some(connections);
            report.throttled_messages = Some(messages);
        }
        if args.stats_per_ip {
            report.per_ip = Some(clients.report());
        }
    }
    if let Some(path) = &args.ids_file {
        let mut ids: Vec<&str> = ledger.ids.iter().map(|id| &**id).collect();
        ids.sort_unstable();
        write_lines(path, &ids)
            .with_context(|| format!("writing --ids-file {}", path.display()))?;
    }
    if let Some(path) = &args.rcpts_file {
        write_lines(path, &ledger.rcpt_lines)
            .with_context(|| format!("writing --rcpts-file {}", path.display()))?;
    }
    stats::print_json_line(&report)?;
    // Open connections are not waited for: the report is out and the counts are final.
    std::process::exit(0)
}

fn accept_loop(listener: &TcpListener, sink: &Arc<Sink>) {
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                eprintln!("accept: {e}");
                thread::sleep(Duration::from_millis(ACCEPT_ERROR_PAUSE_MS));
                continue;
            }
        };
        sink.connections.fetch_add(1, Ordering::Relaxed);
        if let Ok(peer) = stream.peer_addr() {
            sink.peers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .count(peer.ip());
        }
        let active_before = sink.active.fetch_add(1, Ordering::Relaxed);
        if active_before >= CONNECTIONS_ACTIVE_MAX {
            sink.active.fetch_sub(1, Ordering::Relaxed);
            let _ = stream.write_all(TOO_MANY_CONNECTIONS);
            continue;
        }
        // `active` only rises here, so every peak passes through this line.
        sink.active_max
            .fetch_max(active_before + 1, Ordering::Relaxed);
        let conn_sink = Arc::clone(sink);
        let spawned = thread::Builder::new()
            .name("sink-conn".into())
            .stack_size(THREAD_STACK_BYTES)
            .spawn(move || {
                // `serve` counts the connection as ended before closing it.
                if let Err(e) = serve(stream, &conn_sink) {
                    // Clients that vanish mid-session are normal under load; say why, briefly.
                    if !matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) {
                        eprintln!("connection: {e}");
                    }
                }
            });
        if let Err(e) = spawned {
            sink.active.fetch_sub(1, Ordering::Relaxed);
            eprintln!("spawning a connection thread: {e}");
        }
    }
}

/// Runs one SMTP session until the client quits or goes away.
fn serve(stream: TcpStream, sink: &Sink) -> std::io::Result<()> {
    let mut conn = Conn {
        stream,
        out: Vec::with_capacity(4096),
        replies_pending: 0,
    };
    let result = serve_session(&mut conn, sink);
    // Replies that can no longer be written must not hold up the exit.
    sink.replies_unwritten
        .fetch_sub(conn.replies_pending, Ordering::Relaxed);
    // No longer active before the socket closes: a client that saw our close and connected
    // again must not be counted as concurrent with this connection.
    sink.active.fetch_sub(1, Ordering::Relaxed);
    drop(conn);
    result
}

/// A socket and the replies waiting to go out on it.
struct Conn {
    stream: TcpStream,
    out: Vec<u8>,
    /// Final-dot replies in `out`, counted in `Sink::replies_unwritten`.
    replies_pending: u64,
}

impl Conn {
    /// Writes out what is buffered.
    fn write_out(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out)?;
            self.out.clear();
        }
        Ok(())
    }

    /// Writes out what is buffered and retires the pending replies it held.
    fn flush(&mut self, sink: &Sink) -> std::io::Result<()> {
        self.write_out()?;
        sink.replies_unwritten
            .fetch_sub(self.replies_pending, Ordering::Relaxed);
        self.replies_pending = 0;
        Ok(())
    }
}

/// An admitted connection counted against its client's limit, until dropped.
struct ClientSlot<'a> {
    sink: &'a Sink,
    client: Option<IpAddr>,
}

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        if let Some(mut clients) = self.sink.clients() {
            clients.close(self.client);
        }
    }
}

fn serve_session(conn: &mut Conn, sink: &Sink) -> std::io::Result<()> {
    conn.stream.set_nodelay(true)?;
    if sink.greet_421.is_some_and(|d| sink.start.elapsed() < d) {
        sink.greeting_refused.fetch_add(1, Ordering::Relaxed);
        conn.out.extend_from_slice(
            b"421 4.3.2 Service not available, closing transmission channel\r\n",
        );
        return conn.write_out();
    }
    let client = conn.stream.peer_addr().ok().map(|a| a.ip().to_canonical());
    // Dropped when this returns, before `serve` closes the socket: a client that saw the close
    // and connects again is not counted as concurrent with this connection.
    let _slot = match sink.clients().map(|mut clients| clients.open(client)) {
        Some(Err(refusal)) => {
            conn.out.extend_from_slice(&refusal.line);
            return conn.write_out();
        }
        Some(Ok(())) => Some(ClientSlot { sink, client }),
        None => None,
    };
    conn.stream
        .set_read_timeout(Some(Duration::from_secs(IDLE_TIMEOUT_S)))?;
    let mut session = match &sink.providers {
        Some(providers) => {
            let ip = client.map(|ip| ip.to_string()).unwrap_or_default();
            Session::with_smart(Arc::clone(providers), &ip)
        }
        None => Session::new(),
    };
    if sink.limits_messages {
        session.gate_mail();
    }
    let mut buf = vec![0u8; READ_BUF_LEN];
    let (mut start, mut end) = (0usize, 0usize);
    session.greet(&mut conn.out);

    loop {
        loop {
            let (consumed, event) = session.feed(&buf[start..end], &mut conn.out);
            start += consumed;
            match event {
                Event::NeedInput => break,
                Event::Message(message) => {
                    let reply = sink.on_message(&message, client);
                    conn.replies_pending += 1;
                    if !sink.delay.is_zero() {
                        // Earlier replies go out now; this one only after the delay.
                        conn.write_out()?;
                        thread::sleep(sink.delay);
                    }
                    session.answer_data(reply, &mut conn.out);
                }
                Event::Refused(kind) => sink.on_refused(kind),
                Event::Mail => {
                    let now = sink.start.elapsed();
                    let refusal = sink
                        .clients()
                        .and_then(|mut clients| clients.admit_mail(client, now));
                    session.answer_mail(refusal.as_ref(), &mut conn.out);
                }
                Event::Close => {
                    conn.flush(sink)?;
                    return Ok(());
                }
            }
        }
        // Everything complete is answered: send the whole batch of replies at once.
        conn.flush(sink)?;
        if start == end {
            (start, end) = (0, 0);
        } else if start > 0 {
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
        match conn.stream.read(&mut buf[end..]) {
            Ok(0) => return Ok(()),
            Ok(n) => end += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                let _ = conn.stream.write_all(TIMEOUT);
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
}

fn write_lines<S: AsRef<str>>(path: &Path, lines: &[S]) -> anyhow::Result<()> {
    let mut file = BufWriter::new(std::fs::File::create(path)?);
    for line in lines {
        writeln!(file, "{}", line.as_ref())?;
    }
    file.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_counted_by_canonical_address() {
        let mut peers = Peers::default();
        peers.count("127.0.0.2".parse().unwrap());
        peers.count("::ffff:127.0.0.2".parse().unwrap());
        peers.count("::1".parse().unwrap());
        let want: BTreeMap<String, u64> = [("127.0.0.2".into(), 2), ("::1".into(), 1)].into();
        assert_eq!(peers.0, want);
    }

    #[test]
    fn peers_past_the_limit_are_counted_together() {
        let mut peers = Peers::default();
        for i in 0..PEERS_MAX as u32 + 3 {
            peers.count(IpAddr::V4(std::net::Ipv4Addr::from(0x7f00_0000 + i)));
        }
        // An address already named keeps its own count.
        peers.count("127.0.0.0".parse().unwrap());
        assert_eq!(peers.0.len(), PEERS_MAX + 1);
        assert_eq!(peers.0[PEERS_OTHER], 3);
        assert_eq!(peers.0["127.0.0.0"], 2);
        assert_eq!(peers.0.values().sum::<u64>(), PEERS_MAX as u64 + 4);
    }

    #[test]
    fn report_adds_peers_and_concurrency_after_the_old_fields() {
        let ledger = Ledger {
            received: 2,
            unique: 2,
            helos: [("mta1.test".into(), 2)].into(),
            ..Ledger::default()
        };
        let peers: BTreeMap<String, u64> =
            [("127.0.0.3".into(), 1), ("127.0.0.2".into(), 2)].into();
        let line = serde_json::to_string(&ledger.report(3, 2, peers)).unwrap();
        let old = r#"{"received":2,"unique":2,"duplicates":0,"elapsed_s":0.0,"msgs_per_s":0.0,"connections":3,"rcpts":0,"tempfailed":0,"rejected":0,"#;
        assert!(line.starts_with(old), "{line}");
        assert!(
            line.ends_with(
                r#""connections_max_concurrent":2,"peers":{"127.0.0.2":2,"127.0.0.3":1},"helos":{"mta1.test":2}}"#
            ),
            "{line}"
        );
    }

    #[test]
    fn report_counts_smart_refusals_by_kind_only_with_smart() {
        let mut ledger = Ledger {
            refused_by_kind: Some([0; Kind::ALL.len()]),
            ..Ledger::default()
        };
        ledger.count_refused(Kind::Spam);
        ledger.count_refused(Kind::Permfail);
        ledger.count_refused(Kind::Permfail);
        let line = serde_json::to_string(&ledger.report(0, 0, BTreeMap::new())).unwrap();
        assert!(
            line.ends_with(
                r#""refused_by_kind":{"blocked":0,"greylist":0,"permfail":2,"quota":0,"ratelimit":0,"spam":1,"tempfail":0}}"#
            ),
            "{line}"
        );
        let mut plain = Ledger::default();
        plain.count_refused(Kind::Spam);
        let line = serde_json::to_string(&plain.report(0, 0, BTreeMap::new())).unwrap();
        assert!(!line.contains("refused_by_kind"), "{line}");
    }
}
