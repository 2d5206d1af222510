//! `inject`: sends N messages over C reused SMTP connections and reports what happened.
//!
//! Each connection is a thread with a blocking socket. Threads claim message numbers from one
//! shared counter, so exactly N are attempted whichever connections live or die, and the
//! optional rate is kept by giving message k the start time k / rate.
//!
//! Invariants: every claimed message is counted exactly once, as accepted, tempfailed,
//! rejected or an error, and every message never claimed (all connections gave up) is an
//! error, so the four add up to N. The run always ends: each read and write has a timeout and
//! a connection gives up after `RECONNECT_ATTEMPTS_MAX` failures in a row.

use std::fmt::Write as _;
use std::io::{BufWriter, IsTerminal, Write as _};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressState, ProgressStyle};

use crate::client::{Client, ClientError, Outcome};
use crate::message::{IdPrefix, MessageSpec, Template, ID_INDEX_MAX};
use crate::stats::{self, InjectReport, LatencyMs};

/// One thread and one socket per connection; beyond this, threads cost more than they test.
pub const CONNECTIONS_MAX: u32 = 10_000;

/// A connection that fails this many times in a row (connects or transactions) gives up. With
/// the backoff below that is 1.55 s of pauses plus any timeouts, so a dead target ends the run
/// quickly, while a restart that takes a second or so is ridden out.
pub const RECONNECT_ATTEMPTS_MAX: u32 = 6;

/// First pause before reconnecting; it doubles on each further failure.
pub const RECONNECT_BACKOFF_MS_FIRST: u64 = 50;

/// Upper bound of one reconnect pause, so a flapping target is retried about once a second.
pub const RECONNECT_BACKOFF_MS_MAX: u64 = 1000;

/// Errors printed per connection before the rest are only counted, so a dead target does not
/// flood stderr.
const ERRORS_LOGGED_MAX: u32 = 3;

/// Past 100 MiB a message exceeds any MTA's SIZE limit, and each connection holds a copy.
pub const MESSAGE_SIZE_BYTES_MAX: usize = 100 * 1024 * 1024;

/// A rate below one message in 1000 s is surely a typo, and this floor keeps the pacing
/// arithmetic (interval times message number) far from overflowing `Duration`.
pub const RATE_MSGS_PER_S_MIN: f64 = 0.001;

/// An hour is longer than any SMTP timeout RFC 5321 4.5.3.2 suggests (10 minutes at most).
pub const TIMEOUT_S_MAX: u64 = 3600;

/// How often the progress bar is redrawn.
const PROGRESS_INTERVAL_MS: u64 = 100;

/// Threads only run the client loop and hold no large stack data.
const THREAD_STACK_BYTES: usize = 256 * 1024;

#[derive(Debug, clap::Args)]
pub struct InjectArgs {
    /// SMTP server to send to, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    target: String,
    /// Messages to attempt in total.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(0..=ID_INDEX_MAX))]
    messages: u64,
    /// Concurrent SMTP connections, each reused for many messages.
    #[arg(long, value_name = "C", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=CONNECTIONS_MAX as i64))]
    connections: u32,
    /// Size of each message in bytes, headers included.
    #[arg(long = "size", value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..=MESSAGE_SIZE_BYTES_MAX as u64))]
    size_bytes: u64,
    /// Recipient domains d0.test ... d{D-1}.test, used round-robin.
    #[arg(long, value_name = "D", value_parser = clap::value_parser!(u32).range(1..))]
    domains: u32,
    /// Total send rate over all connections; as fast as possible when absent.
    #[arg(long = "rate", value_name = "MSGS_PER_S", value_parser = parse_rate)]
    rate_msgs_per_s: Option<f64>,
    /// Envelope and header sender.
    #[arg(long, value_name = "ADDR", default_value = "loadgen@loadgen.test")]
    from: String,
    /// Timeout of each connect, read and write, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=TIMEOUT_S_MAX))]
    timeout_s: u64,
    /// Write the X-Loadgen-Id of every accepted message here, one per line.
    #[arg(long, value_name = "PATH")]
    ids_file: Option<PathBuf>,
    /// Another header field in every message, `Name: value` (repeatable), e.g.
    /// `X-Tenant: acme`.
    #[arg(long = "header", value_name = "FIELD", value_parser = parse_header)]
    headers: Vec<String>,
}

/// A header field as `--header` takes it: a name of printable ASCII without a colon, then a
/// colon and a value on one line.
fn parse_header(s: &str) -> Result<String, String> {
    let (name, value) = s.split_once(':').ok_or("want Name: value")?;
    let name_ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
    if !name_ok || value.contains(['\r', '\n']) || s.len() > HEADER_LEN_MAX {
        return Err(format!(
            "want Name: value, one line of at most {HEADER_LEN_MAX} characters"
        ));
    }
    Ok(s.to_owned())
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if rate.is_finite() && rate >= RATE_MSGS_PER_S_MIN {
        Ok(rate)
    } else {
        Err(format!(
            "must be at least {RATE_MSGS_PER_S_MIN} messages per second"
        ))
    }
}

/// Longest `--header` field: RFC 5322 2.1.1's line limit, so it needs no folding.
const HEADER_LEN_MAX: usize = 998;

/// What all connections share.
struct Plan {
    target: SocketAddr,
    messages: u64,
    domains: u64,
    from: String,
    size_bytes: usize,
    headers: Vec<String>,
    timeout: Duration,
    /// Pause between message starts over the whole run, when rate-limited.
    interval: Option<Duration>,
    keep_ids: bool,
    id_prefix: IdPrefix,
    date_unix_s: u64,
    start: Instant,
    /// Next message number to claim; may run past `messages`.
    next: AtomicU64,
    /// Messages finished, for the progress bar.
    done: AtomicU64,
}

impl Plan {
    fn claim(&self) -> Option<u64> {
        let index = self.next.fetch_add(1, Ordering::Relaxed);
        (index < self.messages).then_some(index)
    }

    /// Sleeps until message `index` may start under the rate limit.
    fn pace(&self, index: u64) {
        if let Some(interval) = self.interval {
            let due = self.start + interval.mul_f64(index as f64);
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
        }
    }

    fn connect(&self) -> Result<Client<TcpStream>, ClientError> {
        let stream = TcpStream::connect_timeout(&self.target, self.timeout)?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        // Commands and replies are small and strictly alternate: Nagle would only add delay.
        stream.set_nodelay(true)?;
        Client::handshake(stream)
    }
}

/// One connection's tally.
struct ConnStats {
    sent: u64,
    accepted: u64,
    tempfailed: u64,
    rejected: u64,
    errors: u64,
    latency_us: Histogram<u64>,
    accepted_indexes: Vec<u64>,
}

/// Prints the first few errors of a connection and counts the rest.
struct ErrorLog {
    conn: u32,
    logged: u32,
}

impl ErrorLog {
    fn note(&mut self, what: &str, error: &ClientError) {
        self.logged += 1;
        if self.logged <= ERRORS_LOGGED_MAX {
            eprintln!("connection {}: {what}: {error}", self.conn);
        } else if self.logged == ERRORS_LOGGED_MAX + 1 {
            eprintln!(
                "connection {}: further errors are counted, not printed",
                self.conn
            );
        }
    }
}

pub fn run(args: InjectArgs) -> anyhow::Result<()> {
    let target = args
        .target
        .to_socket_addrs()
        .with_context(|| format!("resolving --target {}", args.target))?
        .next()
        .with_context(|| format!("--target {} resolves to no address", args.target))?;
    let interval = args
        .rate_msgs_per_s
        .map(|rate| Duration::from_secs_f64(1.0 / rate));
    let size_bytes = usize::try_from(args.size_bytes).context("--size")?;
    let mut plan = Plan {
        target,
        messages: args.messages,
        domains: u64::from(args.domains),
        from: args.from,
        size_bytes,
        headers: args.headers,
        timeout: Duration::from_secs(args.timeout_s),
        interval,
        keep_ids: args.ids_file.is_some(),
        id_prefix: IdPrefix::for_this_run(),
        date_unix_s: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        start: Instant::now(),
        next: AtomicU64::new(0),
        done: AtomicU64::new(0),
    };

    // The first connection is made before anything else, so a target that is not there at
    // all is a failed run rather than N errors.
    let first = plan
        .connect()
        .with_context(|| format!("could not connect to {target}"))?;
    if !first.pipelining() {
        eprintln!("{target} does not offer PIPELINING; sending in lock-step");
    }
    let message_size_bytes = Template::build(&MessageSpec {
        from: &plan.from,
        size_bytes,
        id_prefix: &plan.id_prefix,
        date_unix_s: plan.date_unix_s,
        headers: &plan.headers,
    })
    .size_bytes();
    if message_size_bytes != size_bytes {
        eprintln!(
            "messages are {message_size_bytes} bytes: --size {size_bytes} cannot be met exactly"
        );
    }
    let histogram = stats::latency_histogram()?;
    let start = Instant::now();
    plan.start = start;

    let per_conn: Vec<ConnStats> = thread::scope(|scope| -> anyhow::Result<Vec<ConnStats>> {
        let mut first = Some(first);
        let mut handles = Vec::with_capacity(args.connections as usize);
        for conn in 0..args.connections {
            let plan = &plan;
            let client = first.take();
            let histogram = Histogram::new_from(&histogram);
            let handle = thread::Builder::new()
                .name(format!("inject-{conn}"))
                .stack_size(THREAD_STACK_BYTES)
                .spawn_scoped(scope, move || run_connection(plan, conn, client, histogram))
                .context("spawning a connection thread")?;
            handles.push(handle);
        }
        if std::io::stdout().is_terminal() {
            show_progress(&plan, &handles);
        }
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a connection thread panicked"))
            })
            .collect()
    })?;
    let elapsed_s = start.elapsed().as_secs_f64();

    let mut latency_us = histogram;
    let (mut sent, mut accepted, mut tempfailed, mut rejected, mut errors) = (0, 0, 0, 0, 0);
    let mut accepted_indexes = Vec::new();
    for c in per_conn {
        sent += c.sent;
        accepted += c.accepted;
        tempfailed += c.tempfailed;
        rejected += c.rejected;
        errors += c.errors;
        latency_us.add(&c.latency_us)?;
        accepted_indexes.extend(c.accepted_indexes);
    }
    // Messages no connection was left to claim.
    let claimed = plan.next.load(Ordering::Relaxed).min(plan.messages);
    errors += plan.messages - claimed;
    debug_assert_eq!(accepted + tempfailed + rejected + errors, plan.messages);
    let report = InjectReport {
        sent,
        accepted,
        tempfailed,
        rejected,
        errors,
        elapsed_s: stats::round3(elapsed_s),
        msgs_per_s: stats::rate(accepted, elapsed_s),
        latency_ms: LatencyMs::from_histogram_us(&latency_us),
        size: message_size_bytes,
        connections: args.connections,
    };

    if let Some(path) = &args.ids_file {
        accepted_indexes.sort_unstable();
        write_ids(path, &plan.id_prefix, &accepted_indexes)
            .with_context(|| format!("writing --ids-file {}", path.display()))?;
    }
    stats::print_json_line(&report)
}

fn run_connection(
    plan: &Plan,
    conn: u32,
    mut client: Option<Client<TcpStream>>,
    latency_us: Histogram<u64>,
) -> ConnStats {
    let mut stats = ConnStats {
        sent: 0,
        accepted: 0,
        tempfailed: 0,
        rejected: 0,
        errors: 0,
        latency_us,
        accepted_indexes: Vec::new(),
    };
    let mut log = ErrorLog { conn, logged: 0 };
    let mut template = Template::build(&MessageSpec {
        from: &plan.from,
        size_bytes: plan.size_bytes,
        id_prefix: &plan.id_prefix,
        date_unix_s: plan.date_unix_s,
        headers: &plan.headers,
    });
    let mut rcpt = String::with_capacity(64);
    // Failures in a row, connects and transactions alike; a completed transaction clears it.
    let mut failures = 0u32;

    while let Some(index) = plan.claim() {
        plan.pace(index);
        if client.is_none() {
            client = reconnect(plan, &mut failures, &mut log);
        }
        let Some(session) = client.as_mut() else {
            // Giving up: this message and, unless other connections take them, the rest.
            stats.errors += 1;
            plan.done.fetch_add(1, Ordering::Relaxed);
            break;
        };

        rcpt.clear();
        let _ = write!(rcpt, "user{index}@d{}.test", index % plan.domains);
        template.stamp(index);
        let dots_before = session.dots_sent();
        let result = session.send(&plan.from, &rcpt, template.wire());
        stats.sent += session.dots_sent() - dots_before;

        let keep_session = match result {
            Ok(tx) => {
                failures = 0;
                match tx.outcome {
                    Outcome::Accepted { latency } => {
                        stats.accepted += 1;
                        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
                        stats.latency_us.saturating_record(us.max(1));
                        if plan.keep_ids {
                            stats.accepted_indexes.push(index);
                        }
                    }
                    Outcome::TempFailed => stats.tempfailed += 1,
                    Outcome::Rejected => stats.rejected += 1,
                }
                if tx.server_closing {
                    false
                } else if matches!(tx.outcome, Outcome::Accepted { .. }) {
                    true
                } else {
                    match session.reset() {
                        Ok(()) => true,
                        Err(e) => {
                            log.note("RSET", &e);
                            false
                        }
                    }
                }
            }
            Err(e) => {
                stats.errors += 1;
                failures += 1;
                log.note("transaction", &e);
                false
            }
        };
        if !keep_session {
            client = None;
        }
        plan.done.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(session) = client {
        session.quit();
    }
    stats
}

/// Opens a new session, pausing before each try after the first failure. Returns `None` once
/// `failures` reaches `RECONNECT_ATTEMPTS_MAX`.
fn reconnect(plan: &Plan, failures: &mut u32, log: &mut ErrorLog) -> Option<Client<TcpStream>> {
    while *failures < RECONNECT_ATTEMPTS_MAX {
        if *failures > 0 {
            thread::sleep(reconnect_backoff(*failures));
        }
        match plan.connect() {
            Ok(client) => return Some(client),
            Err(e) => {
                *failures += 1;
                log.note("connect", &e);
            }
        }
    }
    eprintln!(
        "connection {}: giving up after {RECONNECT_ATTEMPTS_MAX} failures in a row",
        log.conn
    );
    None
}

/// Pause before the next connect after `failures` failures in a row (at least one).
fn reconnect_backoff(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    Duration::from_millis((RECONNECT_BACKOFF_MS_FIRST << shift).min(RECONNECT_BACKOFF_MS_MAX))
}

fn show_progress(plan: &Plan, handles: &[thread::ScopedJoinHandle<'_, ConnStats>]) {
    let bar = ProgressBar::new(plan.messages);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} messages {rate} eta {eta}")
    {
        // indicatif's own {per_sec} prints four decimals; whole messages read better.
        let style = style.with_key(
            "rate",
            |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0}/s", state.per_sec());
            },
        );
        bar.set_style(style);
    }
    while !handles.iter().all(|h| h.is_finished()) {
        bar.set_position(plan.done.load(Ordering::Relaxed));
        thread::sleep(Duration::from_millis(PROGRESS_INTERVAL_MS));
    }
    bar.finish_and_clear();
}

fn write_ids(path: &std::path::Path, prefix: &IdPrefix, indexes: &[u64]) -> anyhow::Result<()> {
    let mut out = BufWriter::new(std::fs::File::create(path)?);
    for &index in indexes {
        writeln!(out, "{}", prefix.id(index))?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let ms: Vec<u128> = (1..=8).map(|f| reconnect_backoff(f).as_millis()).collect();
        assert_eq!(ms, [50, 100, 200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(reconnect_backoff(u32::MAX).as_millis(), 1000);
    }
}
