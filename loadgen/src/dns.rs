//! `dns`: a static authoritative DNS server, so that a benchmark or a demo can send mail
//! through epoxi's MX path (`epoxi serve --resolver`) without a real DNS.
//!
//! UDP and TCP listen on the same port. One thread answers every datagram; one thread accepts
//! TCP connections, each then served by a thread of its own (RFC 7766: length-prefixed
//! queries, answered one after another). The answers come from `zone`, which does no I/O.
//! The main thread only waits for SIGTERM or SIGINT and prints the report.
//!
//! Invariants: every message that decodes as a query is counted exactly once, in `queries`,
//! under its transport and under its outcome (`answered + nodata + nxdomain + errors`), before
//! its answer is sent; input that does not decode as one is counted in `malformed` and never
//! answered, and never fatal.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use anyhow::Context;
use hickory_proto::rr::RecordType;

use crate::stats::{self, DnsReport};
use crate::zone::{AEntry, AaaaEntry, MxEntry, Outcome, Response, Transport, Zone, TTL_MAX_S};

/// (name, type) pairs named in the report. A benchmark asks about a few dozen names; a server
/// exposed to many must not grow without bound, so further pairs are counted together in
/// `names_other`.
const NAMES_MAX: usize = 1024;

/// Largest query read over UDP. Queries are a few dozen bytes; a longer datagram is cut here
/// and then fails to decode, so it is dropped as malformed.
const UDP_QUERY_MAX: usize = 4096;

/// TCP connections served at once, each a thread. A stub resolver opens one only after a
/// truncated answer and closes it soon; past this a connection is closed unanswered rather
/// than spending threads.
const TCP_CONNECTIONS_MAX: usize = 256;

/// A TCP connection with no complete query for this long is closed (RFC 7766 §6.2.3 suggests
/// seconds); it also bounds how long a half-sent query holds a thread.
const TCP_IDLE_TIMEOUT_S: u64 = 10;

/// Read chunk on TCP connections: several whole queries.
const TCP_READ_LEN: usize = 4096;

/// Tries at finding a port free for both UDP and TCP when `--listen` asks for port 0: the
/// kernel picks the UDP port, and TCP may find it taken by someone else.
const BIND_ATTEMPTS_MAX: usize = 50;

/// How often the main thread looks for a signal; bounds how late the report comes.
const POLL_INTERVAL_MS: u64 = 10;

/// Pause after a failed accept (out of file descriptors, say) before trying again.
const ACCEPT_ERROR_PAUSE_MS: u64 = 10;

/// Connection threads only parse and answer small messages.
const THREAD_STACK_BYTES: usize = 256 * 1024;

#[derive(Debug, clap::Args)]
pub struct DnsArgs {
    /// Address to listen on, UDP and TCP, IP:PORT (port 0 picks a free one; see stderr).
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// MX record for every name matching GLOB (`*` any run, `?` one character), e.g.
    /// '*.test=10:mx.bench.test'; HOST `.` is a null MX. Repeatable; a name gets the records
    /// of the first glob it matches.
    #[arg(long, value_name = "GLOB=PREF:HOST")]
    mx: Vec<MxEntry>,
    /// A record, e.g. 'mx.bench.test=127.0.0.1'. Repeatable.
    #[arg(long = "a", value_name = "NAME=IPV4")]
    a: Vec<AEntry>,
    /// AAAA record, e.g. 'mx.bench.test=::1'. Repeatable.
    #[arg(long = "aaaa", value_name = "NAME=IPV6")]
    aaaa: Vec<AaaaEntry>,
    /// TTL of every record served, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(TTL_MAX_S)))]
    ttl: u32,
    /// TTL of NXDOMAIN and NODATA answers (their SOA's TTL and MINIMUM) [default: --ttl].
    #[arg(long, value_name = "SECS",
          value_parser = clap::value_parser!(u32).range(0..=i64::from(TTL_MAX_S)))]
    negative_ttl: Option<u32>,
}

/// What the report counts, under one lock so the report is one consistent cut.
#[derive(Default)]
struct Counts {
    queries: u64,
    udp: u64,
    tcp: u64,
    answered: u64,
    nodata: u64,
    nxdomain: u64,
    errors: u64,
    truncated: u64,
    malformed: u64,
    /// Queries by name, then type; at most `NAMES_MAX` pairs.
    names: BTreeMap<String, BTreeMap<String, u64>>,
    pairs: usize,
    names_other: u64,
}

impl Counts {
    fn count(&mut self, response: &Response, transport: Transport) {
        self.queries += 1;
        match transport {
            Transport::Udp => self.udp += 1,
            Transport::Tcp => self.tcp += 1,
        }
        match response.outcome {
            Outcome::Answer => self.answered += 1,
            Outcome::NoData => self.nodata += 1,
            Outcome::NxDomain => self.nxdomain += 1,
            Outcome::Error => self.errors += 1,
        }
        self.truncated += u64::from(response.truncated);
        if let Some((name, rtype)) = &response.question {
            self.count_name(name, *rtype);
        }
    }

    fn count_name(&mut self, name: &str, rtype: RecordType) {
        let rtype = match rtype {
            // RFC 3597's spelling, so that unknown types stay apart.
            RecordType::Unknown(code) => format!("TYPE{code}"),
            known => known.to_string(),
        };
        let known = self
            .names
            .get(name)
            .is_some_and(|types| types.contains_key(&rtype));
        if !known && self.pairs >= NAMES_MAX {
            self.names_other += 1;
            return;
        }
        if !known {
            self.pairs += 1;
        }
        *self
            .names
            .entry(name.to_owned())
            .or_default()
            .entry(rtype)
            .or_default() += 1;
    }

    fn report(&self) -> DnsReport {
        DnsReport {
            queries: self.queries,
            udp: self.udp,
            tcp: self.tcp,
            answered: self.answered,
            nodata: self.nodata,
            nxdomain: self.nxdomain,
            errors: self.errors,
            truncated: self.truncated,
            malformed: self.malformed,
            names: self.names.clone(),
            names_other: self.names_other,
        }
    }
}

/// The zone and the counts, shared by the server threads.
struct Server {
    zone: Zone,
    counts: Mutex<Counts>,
    tcp_active: AtomicUsize,
}

impl Server {
    fn counts(&self) -> MutexGuard<'_, Counts> {
        // A thread that panicked while counting left counts that are still whole.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The answer to `query`, counted; `None` for input that is not a query.
    fn respond(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let response = self.zone.respond(query, transport);
        let mut counts = self.counts();
        match response {
            Some(response) => {
                counts.count(&response, transport);
                Some(response.bytes)
            }
            None => {
                counts.malformed += 1;
                None
            }
        }
    }
}

pub fn run(args: DnsArgs) -> anyhow::Result<()> {
    let negative_ttl = args.negative_ttl.unwrap_or(args.ttl);
    let zone = Zone::new(&args.mx, &args.a, &args.aaaa, args.ttl, negative_ttl)?;
    let (udp, tcp) = bind_pair(args.listen)?;
    let addr = udp.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing a signal handler")?;
    }
    // Tests and scripts that listen on port 0 read the port from this line (stderr is
    // unbuffered) and may signal right after it, so the handlers are in place first.
    eprintln!("listening on {addr}");
    let server = Arc::new(Server {
        zone,
        counts: Mutex::new(Counts::default()),
        tcp_active: AtomicUsize::new(0),
    });
    {
        let server = Arc::clone(&server);
        thread::Builder::new()
            .name("dns-udp".into())
            .spawn(move || serve_udp(&udp, &server))
            .context("spawning the UDP thread")?;
    }
    {
        let server = Arc::clone(&server);
        thread::Builder::new()
            .name("dns-accept".into())
            .spawn(move || accept_loop(&tcp, &server))
            .context("spawning the TCP accept thread")?;
    }

    while !stop.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
    }
    let report = server.counts().report();
    stats::print_json_line(&report)?;
    // Server threads block in recv and accept; the counts are final, so they are not waited for.
    std::process::exit(0)
}

/// A UDP socket and a TCP listener on the same port of `listen`.
fn bind_pair(listen: SocketAddr) -> anyhow::Result<(UdpSocket, TcpListener)> {
    let bind = |addr: SocketAddr| -> anyhow::Result<(UdpSocket, TcpListener)> {
        let udp = UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}"))?;
        let addr = udp.local_addr()?;
        let tcp = TcpListener::bind(addr).with_context(|| format!("binding TCP {addr}"))?;
        Ok((udp, tcp))
    };
    if listen.port() != 0 {
        return bind(listen).with_context(|| format!("--listen {listen}"));
    }
    let mut last = None;
    for _ in 0..BIND_ATTEMPTS_MAX {
        match bind(listen) {
            Ok(pair) => return Ok(pair),
            Err(e) => last = Some(e),
        }
    }
    let last = last.map(|e| format!("{e:#}")).unwrap_or_default();
    anyhow::bail!("--listen {listen}: no port free for both UDP and TCP after {BIND_ATTEMPTS_MAX} tries: {last}")
}

fn serve_udp(socket: &UdpSocket, server: &Server) {
    let mut buf = vec![0u8; UDP_QUERY_MAX];
    loop {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            // ICMP errors from an earlier send surface here on Linux; nothing to do with them.
            Err(_) => continue,
        };
        if let Some(answer) = server.respond(&buf[..n], Transport::Udp) {
            // A client that went away is its own business.
            let _ = socket.send_to(&answer, from);
        }
    }
}

fn accept_loop(listener: &TcpListener, server: &Arc<Server>) {
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                eprintln!("accept: {e}");
                thread::sleep(Duration::from_millis(ACCEPT_ERROR_PAUSE_MS));
                continue;
            }
        };
        if server.tcp_active.fetch_add(1, Ordering::Relaxed) >= TCP_CONNECTIONS_MAX {
            server.tcp_active.fetch_sub(1, Ordering::Relaxed);
            continue;
        }
        let conn_server = Arc::clone(server);
        let spawned = thread::Builder::new()
            .name("dns-tcp".into())
            .stack_size(THREAD_STACK_BYTES)
            .spawn(move || {
                let _ = serve_tcp(stream, &conn_server);
                conn_server.tcp_active.fetch_sub(1, Ordering::Relaxed);
            });
        if let Err(e) = spawned {
            server.tcp_active.fetch_sub(1, Ordering::Relaxed);
            eprintln!("spawning a TCP thread: {e}");
        }
    }
}

/// Answers length-prefixed queries (RFC 1035 §4.2.2) one after another until the client
/// closes, sends something that is not a query, or idles past `TCP_IDLE_TIMEOUT_S`.
fn serve_tcp(mut stream: TcpStream, server: &Server) -> std::io::Result<()> {
    let idle = Some(Duration::from_secs(TCP_IDLE_TIMEOUT_S));
    stream.set_read_timeout(idle)?;
    stream.set_write_timeout(idle)?;
    stream.set_nodelay(true)?;
    // Every complete query is answered before the next read, so this holds less than one
    // query (at most 64 KiB) and one read.
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; TCP_READ_LEN];
    loop {
        while let Some(frame) = next_frame(&buf) {
            let frame_len = frame.len();
            let Some(answer) = server.respond(frame, Transport::Tcp) else {
                // A stream out of step cannot be trusted further.
                return Ok(());
            };
            buf.drain(..2 + frame_len);
            // The zone keeps every answer under 64 KiB, so the length fits.
            let Ok(len) = u16::try_from(answer.len()) else {
                return Ok(());
            };
            let mut framed = Vec::with_capacity(2 + answer.len());
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(&answer);
            stream.write_all(&framed)?;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The first complete length-prefixed message in `buf`, if there is one.
fn next_frame(buf: &[u8]) -> Option<&[u8]> {
    let len = usize::from(u16::from_be_bytes([*buf.first()?, *buf.get(1)?]));
    buf.get(2..2 + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(outcome: Outcome, question: Option<(&str, RecordType)>) -> Response {
        Response {
            bytes: Vec::new(),
            outcome,
            question: question.map(|(name, rtype)| (name.to_owned(), rtype)),
            truncated: false,
        }
    }

    #[test]
    fn every_query_is_counted_once_per_tally() {
        let mut counts = Counts::default();
        counts.count(
            &response(Outcome::Answer, Some(("d0.test", RecordType::MX))),
            Transport::Udp,
        );
        counts.count(
            &response(Outcome::Answer, Some(("d0.test", RecordType::MX))),
            Transport::Tcp,
        );
        counts.count(
            &response(Outcome::NoData, Some(("d0.test", RecordType::A))),
            Transport::Udp,
        );
        counts.count(
            &response(Outcome::NxDomain, Some(("x.example", RecordType::MX))),
            Transport::Udp,
        );
        counts.count(&response(Outcome::Error, None), Transport::Udp);
        counts.count(
            &response(
                Outcome::Answer,
                Some(("t.test", RecordType::Unknown(65280))),
            ),
            Transport::Udp,
        );
        let report = counts.report();
        assert_eq!(report.queries, 6);
        assert_eq!(report.udp + report.tcp, report.queries);
        assert_eq!(
            report.answered + report.nodata + report.nxdomain + report.errors,
            report.queries
        );
        let line = serde_json::to_string(&report).unwrap();
        assert_eq!(
            line,
            r#"{"queries":6,"udp":5,"tcp":1,"answered":3,"nodata":1,"nxdomain":1,"errors":1,"truncated":0,"malformed":0,"names":{"d0.test":{"A":1,"MX":2},"t.test":{"TYPE65280":1},"x.example":{"MX":1}},"names_other":0}"#
        );
    }

    #[test]
    fn names_past_the_limit_are_counted_together() {
        let mut counts = Counts::default();
        for i in 0..NAMES_MAX + 3 {
            counts.count_name(&format!("d{i}.test"), RecordType::MX);
        }
        // A pair already named keeps its own count, even once the limit is reached.
        counts.count_name("d0.test", RecordType::MX);
        // A new type at a known name is a new pair.
        counts.count_name("d0.test", RecordType::A);
        assert_eq!(counts.pairs, NAMES_MAX);
        assert_eq!(counts.names.len(), NAMES_MAX);
        assert_eq!(counts.names["d0.test"].len(), 1);
        assert_eq!(counts.names["d0.test"]["MX"], 2);
        assert_eq!(counts.names_other, 4);
    }

    #[test]
    fn frames_are_cut_at_their_length() {
        assert_eq!(next_frame(b""), None);
        assert_eq!(next_frame(b"\x00"), None);
        assert_eq!(next_frame(b"\x00\x03ab"), None);
        assert_eq!(next_frame(b"\x00\x03abcd"), Some(&b"abc"[..]));
        assert_eq!(next_frame(b"\x00\x00"), Some(&b""[..]));
    }
}
