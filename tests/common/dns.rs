//! An authoritative DNS server on loopback for the integration tests, on hickory-proto.
//!
//! `DnsServer::start()` answers over UDP and TCP on one port of 127.0.0.1 from a zone the test
//! changes while it runs: MX, A and AAAA records, explicit NXDOMAIN, and faults (SERVFAIL for the
//! next n queries, UDP answers truncated, queries dropped). It counts every query by name and
//! type, so a test can check what a resolver asked and how often.
//!
//! It acts as the authority for every top-level domain: a name with no records is NXDOMAIN,
//! unless a known name lies under it (an empty non-terminal, NODATA, as RFC 8020 wants). Negative
//! answers carry the SOA of the name's top-level domain, whose TTL and MINIMUM are the negative
//! TTL (RFC 2308 §5). There is no additional-section processing: a client asks for the address of
//! an MX host itself, so the counts say what it needed.
//!
//! Invariants: every answer echoes the query's id, question and RD flag and sets AA; a UDP answer
//! never exceeds what the client said it can take (512 bytes without EDNS); input that does not
//! decode as a query is dropped, never answered and never fatal. The threads poll a stop flag, so
//! `Drop` ends them and closes the sockets within a few poll intervals.

use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, MX, SOA, TLSA, TXT};
use hickory_proto::rr::{Name, RData, Record};

pub use hickory_proto::rr::RecordType;

/// How often the server threads look at the stop flag: bounds how long `Drop` takes.
const POLL: Duration = Duration::from_millis(20);

/// Tries at finding a port free for both UDP and TCP before the test gives up.
const BIND_ATTEMPTS_MAX: usize = 50;

/// Largest query read over UDP. Queries are a few dozen bytes; anything longer is not one we
/// care to decode, and is cut short and dropped as garbage.
const UDP_QUERY_MAX: usize = 4096;

/// RFC 1035 §4.2.1: without EDNS a UDP message is at most 512 bytes.
const UDP_PAYLOAD_CLASSIC: u16 = 512;

/// The payload size this server advertises and will send over UDP with EDNS: the 2020 DNS flag
/// day value, which avoids IP fragmentation. A client offering more gets at most this.
const UDP_PAYLOAD_EDNS: u16 = 1232;

/// TCP connections served at once. A test opens a handful; past this one is closed unanswered
/// rather than spending a thread on it.
const TCP_CONNECTIONS_MAX: usize = 64;

/// A TCP connection with no complete query for this long is closed (RFC 7766 §6.2.3 suggests
/// seconds); it also bounds how long a half-sent query keeps a thread.
const TCP_IDLE_MAX: Duration = Duration::from_secs(10);

/// TTL of the NXDOMAIN/NODATA SOA, and so of negative caching, until `negative_ttl` sets it.
pub const NEGATIVE_TTL_DEFAULT_S: u32 = 60;

/// TTL of the record `null_mx` adds.
pub const NULL_MX_TTL_S: u32 = 300;

/// What the server does with the next queries for one name.
#[derive(Default)]
struct Faults {
    /// Queries left to drop without an answer.
    drop: usize,
    /// Queries left to answer SERVFAIL.
    servfail: usize,
    /// Answer with TC set over UDP, in full over TCP; until `clear`.
    truncate: bool,
}

/// The zone and the counters, shared by the test thread and the server threads.
struct Zone {
    /// Records by owner name (lowercase, no trailing dot), in the order they were added.
    records: HashMap<String, Vec<Record>>,
    /// Names answered NXDOMAIN whatever else is known under them.
    nxdomain: HashSet<String>,
    faults: HashMap<String, Faults>,
    negative_ttl: u32,
    /// Set AD on every answer, as a validating resolver does for a signed zone.
    secure: bool,
    /// Queries by (name, type, over TCP).
    queries: HashMap<(String, RecordType, bool), usize>,
}

/// What becomes of a query: an answer to send, or silence (`drop_queries`).
enum Outcome {
    Answer(Message),
    Dropped,
}

/// A running DNS server on loopback, stopped when dropped.
pub struct DnsServer {
    addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl DnsServer {
    /// Listens on 127.0.0.1, UDP and TCP on the same ephemeral port.
    pub fn start() -> DnsServer {
        DnsServer::start_on(IpAddr::V4(Ipv4Addr::LOCALHOST))
    }

    /// Listens on `ip` (a loopback address), UDP and TCP on the same ephemeral port.
    pub fn start_on(ip: IpAddr) -> DnsServer {
        let (udp, tcp) = bind_pair(ip);
        let addr = udp.local_addr().expect("DNS server address");
        udp.set_read_timeout(Some(POLL)).expect("UDP read timeout");
        tcp.set_nonblocking(true)
            .expect("non-blocking TCP listener");
        let zone = Arc::new(Mutex::new(Zone {
            records: HashMap::new(),
            nxdomain: HashSet::new(),
            faults: HashMap::new(),
            negative_ttl: NEGATIVE_TTL_DEFAULT_S,
            secure: false,
            queries: HashMap::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let udp_thread = {
            let (zone, stop) = (zone.clone(), stop.clone());
            thread::Builder::new()
                .name("dns-udp".into())
                .spawn(move || serve_udp(&udp, &zone, &stop))
                .expect("spawn the DNS UDP thread")
        };
        let tcp_thread = {
            let (zone, stop) = (zone.clone(), stop.clone());
            thread::Builder::new()
                .name("dns-tcp".into())
                .spawn(move || serve_tcp(&tcp, &zone, &stop))
                .expect("spawn the DNS TCP thread")
        };
        DnsServer {
            addr,
            zone,
            stop,
            threads: vec![udp_thread, tcp_thread],
        }
    }

    /// Where to send queries, UDP or TCP.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn zone(&self) -> MutexGuard<'_, Zone> {
        lock(&self.zone)
    }

    /// Adds `record` under `name`; a name given records is no longer NXDOMAIN.
    fn add(&self, name: &str, ttl: u32, data: RData) -> &Self {
        let key = key(name);
        let owner = fqdn(&key);
        let mut zone = self.zone();
        zone.nxdomain.remove(&key);
        zone.records
            .entry(key)
            .or_default()
            .push(Record::from_rdata(owner, ttl, data));
        self
    }

    /// Adds `domain MX pref host` (one more; earlier MX records stay).
    pub fn mx(&self, domain: &str, pref: u16, host: &str, ttl: u32) -> &Self {
        self.add(domain, ttl, RData::MX(MX::new(pref, fqdn(&key(host)))))
    }

    /// Adds the null MX of RFC 7505, `domain MX 0 .`: the domain accepts no mail.
    pub fn null_mx(&self, domain: &str) -> &Self {
        self.add(domain, NULL_MX_TTL_S, RData::MX(MX::new(0, Name::root())))
    }

    /// Adds a TXT record with one string.
    pub fn txt(&self, name: &str, text: &str, ttl: u32) -> &Self {
        self.add(name, ttl, RData::TXT(TXT::new(vec![text.to_owned()])))
    }

    /// Adds a TLSA record (RFC 6698) at `name` (`_25._tcp.mx.example`).
    pub fn tlsa(
        &self,
        name: &str,
        usage: u8,
        selector: u8,
        matching: u8,
        data: Vec<u8>,
        ttl: u32,
    ) -> &Self {
        let rdata = TLSA::new(usage.into(), selector.into(), matching.into(), data);
        self.add(name, ttl, RData::TLSA(rdata))
    }

    /// Answer as a validating resolver would for a DNSSEC-signed zone: AD set on every answer
    /// (`false`: on none, as for an unsigned zone).
    pub fn secure(&self, on: bool) -> &Self {
        self.zone().secure = on;
        self
    }

    pub fn a(&self, name: &str, ip: Ipv4Addr, ttl: u32) -> &Self {
        self.add(name, ttl, RData::A(A(ip)))
    }

    pub fn aaaa(&self, name: &str, ip: Ipv6Addr, ttl: u32) -> &Self {
        self.add(name, ttl, RData::AAAA(AAAA(ip)))
    }

    /// Makes `name` NXDOMAIN and removes its records. Names nobody mentioned are NXDOMAIN
    /// already; this says so in the test, or takes back a name that had records. Names below
    /// `name` keep theirs: a test that wants a whole subtree gone clears those too.
    pub fn nxdomain(&self, name: &str) -> &Self {
        let key = key(name);
        let mut zone = self.zone();
        zone.records.remove(&key);
        zone.nxdomain.insert(key);
        self
    }

    /// Forgets everything about `name`: records, NXDOMAIN and faults (not its counts).
    pub fn clear(&self, name: &str) -> &Self {
        let key = key(name);
        let mut zone = self.zone();
        zone.records.remove(&key);
        zone.nxdomain.remove(&key);
        zone.faults.remove(&key);
        self
    }

    /// TTL and MINIMUM of the SOA sent with NXDOMAIN and NODATA answers from now on.
    pub fn negative_ttl(&self, secs: u32) -> &Self {
        self.zone().negative_ttl = secs;
        self
    }

    /// Answers SERVFAIL to the next `n` queries for `name` (any type), then normally.
    pub fn servfail(&self, name: &str, n: usize) -> &Self {
        self.zone().faults.entry(key(name)).or_default().servfail = n;
        self
    }

    /// Answers queries for `name` over UDP with TC set and no records, so that clients ask
    /// again over TCP, where they get the full answer. Until `clear`.
    pub fn truncate(&self, name: &str) -> &Self {
        self.zone().faults.entry(key(name)).or_default().truncate = true;
        self
    }

    /// Leaves the next `n` queries for `name` (any type, UDP or TCP) unanswered, so that
    /// clients time out. Dropping comes before `servfail`: each query uses up one of either.
    pub fn drop_queries(&self, name: &str, n: usize) -> &Self {
        self.zone().faults.entry(key(name)).or_default().drop = n;
        self
    }

    /// Queries received for `name` and `rtype`, over UDP and TCP, answered or not. Names are
    /// compared without case and with or without the trailing dot.
    pub fn queries(&self, name: &str, rtype: RecordType) -> usize {
        let key = key(name);
        let zone = self.zone();
        [false, true]
            .into_iter()
            .filter_map(|tcp| zone.queries.get(&(key.clone(), rtype, tcp)))
            .sum()
    }

    /// Queries received over TCP for `name` and `rtype`.
    pub fn tcp_queries(&self, name: &str, rtype: RecordType) -> usize {
        let zone = self.zone();
        zone.queries
            .get(&(key(name), rtype, true))
            .copied()
            .unwrap_or_default()
    }

    /// Every query received, any name, type or transport. Garbage is not a query.
    pub fn total_queries(&self) -> usize {
        self.zone().queries.values().sum()
    }

    /// Forgets the counts, not the zone.
    pub fn reset_counts(&self) {
        self.zone().queries.clear();
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            // A server thread that panicked has said why on stderr; the test goes on.
            let _ = thread.join();
        }
    }
}

fn lock(zone: &Mutex<Zone>) -> MutexGuard<'_, Zone> {
    // A test thread that panicked while holding the lock left a zone that is still whole.
    zone.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A UDP socket and a TCP listener on the same port of `ip`. The kernel picks the UDP port;
/// TCP may find it taken by someone else, so a new one is picked then.
fn bind_pair(ip: IpAddr) -> (UdpSocket, TcpListener) {
    let mut last = None;
    for _ in 0..BIND_ATTEMPTS_MAX {
        let udp = UdpSocket::bind(SocketAddr::new(ip, 0)).expect("bind the DNS UDP socket");
        let addr = udp.local_addr().expect("DNS UDP address");
        match TcpListener::bind(addr) {
            Ok(tcp) => return (udp, tcp),
            Err(e) => last = Some(e),
        }
    }
    panic!("no port free for both UDP and TCP on {ip} after {BIND_ATTEMPTS_MAX} tries: {last:?}");
}

/// The zone's key for a name: ASCII (punycode), lowercase, without the trailing dot.
fn key(name: &str) -> String {
    let parsed = Name::from_utf8(name).unwrap_or_else(|e| panic!("bad DNS name {name:?}: {e}"));
    parsed
        .to_ascii()
        .to_ascii_lowercase()
        .trim_end_matches('.')
        .to_owned()
}

/// The absolute name for a key.
fn fqdn(key: &str) -> Name {
    if key.is_empty() {
        return Name::root();
    }
    let mut name = Name::from_ascii(key).unwrap_or_else(|e| panic!("bad DNS name {key:?}: {e}"));
    name.set_fqdn(true);
    name
}

fn serve_udp(socket: &UdpSocket, zone: &Mutex<Zone>, stop: &AtomicBool) {
    let mut buf = vec![0u8; UDP_QUERY_MAX];
    while !stop.load(Ordering::Relaxed) {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            // ICMP errors from an earlier send surface here on Linux; nothing to do with them.
            Err(_) => continue,
        };
        if let Some(Outcome::Answer(answer)) = respond(zone, &buf[..n], false) {
            let Ok(bytes) = answer.to_vec() else {
                continue;
            };
            // A client that went away is its own business.
            let _ = socket.send_to(&bytes, from);
        }
    }
}

fn serve_tcp(listener: &TcpListener, zone: &Arc<Mutex<Zone>>, stop: &Arc<AtomicBool>) {
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                thread::sleep(POLL);
                continue;
            }
            Err(_) => {
                thread::sleep(POLL);
                continue;
            }
        };
        connections.retain(|c| !c.is_finished());
        if connections.len() >= TCP_CONNECTIONS_MAX {
            continue;
        }
        let (zone, stop) = (zone.clone(), stop.clone());
        if let Ok(handle) = thread::Builder::new()
            .name("dns-tcp-conn".into())
            .spawn(move || serve_tcp_connection(stream, &zone, &stop))
        {
            connections.push(handle);
        }
    }
    for connection in connections {
        let _ = connection.join();
    }
}

/// Answers length-prefixed queries (RFC 1035 §4.2.2), one after another, until the client
/// closes, sends garbage, idles past `TCP_IDLE_MAX` or the server stops.
fn serve_tcp_connection(mut stream: TcpStream, zone: &Mutex<Zone>, stop: &AtomicBool) {
    if stream.set_nonblocking(false).is_err()
        || stream.set_read_timeout(Some(POLL)).is_err()
        || stream.set_write_timeout(Some(TCP_IDLE_MAX)).is_err()
    {
        return;
    }
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut last_query = Instant::now();
    while !stop.load(Ordering::Relaxed) && last_query.elapsed() < TCP_IDLE_MAX {
        // Answer every complete query in the buffer.
        while buf.len() >= 2 {
            let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
            if buf.len() < 2 + len {
                break;
            }
            let query: Vec<u8> = buf.drain(..2 + len).skip(2).collect();
            last_query = Instant::now();
            match respond(zone, &query, true) {
                // Garbage: a TCP stream out of step cannot be trusted further.
                None => return,
                Some(Outcome::Dropped) => {}
                Some(Outcome::Answer(answer)) => {
                    let Ok(bytes) = answer.to_vec() else {
                        return;
                    };
                    let Ok(len) = u16::try_from(bytes.len()) else {
                        return;
                    };
                    let mut framed = len.to_be_bytes().to_vec();
                    framed.extend_from_slice(&bytes);
                    if stream.write_all(&framed).is_err() {
                        return;
                    }
                }
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// What to do with one message: `None` for garbage (not a query with one question), else
/// the answer or the decision to drop it. Counts the query.
fn respond(zone: &Mutex<Zone>, bytes: &[u8], tcp: bool) -> Option<Outcome> {
    let query = Message::from_vec(bytes).ok()?;
    if query.message_type() != MessageType::Query {
        return None;
    }
    let transport = if tcp { "tcp" } else { "udp" };
    let mut response = Message::new();
    response
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_authoritative(true)
        .set_recursion_desired(query.recursion_desired());
    // An EDNS query gets an OPT back (RFC 6891 §7). This server knows version 0 only and does
    // not answer BADVERS to others: no client here sends them.
    if query.extensions().is_some() {
        let mut ours = Edns::new();
        ours.set_max_payload(UDP_PAYLOAD_EDNS).set_version(0);
        response.set_edns(ours);
    }
    // Only standard queries with exactly one question are served; the rest is refused in the
    // precise way RFC 1035 asks for, but not counted: no name to count it under.
    if query.op_code() != OpCode::Query {
        response.set_response_code(ResponseCode::NotImp);
        return Some(Outcome::Answer(response));
    }
    let [question] = query.queries() else {
        response.set_response_code(ResponseCode::FormErr);
        return Some(Outcome::Answer(response));
    };
    response.add_query(question.clone());
    let name = question.name().to_ascii().to_ascii_lowercase();
    let name = name.trim_end_matches('.');
    let rtype = question.query_type();

    let mut zone = lock(zone);
    response.set_authentic_data(zone.secure);
    *zone
        .queries
        .entry((name.to_owned(), rtype, tcp))
        .or_default() += 1;
    if let Some(faults) = zone.faults.get_mut(name) {
        if faults.drop > 0 {
            faults.drop -= 1;
            eprintln!("[dns] {transport} {name} {rtype}: dropped");
            return Some(Outcome::Dropped);
        }
        if faults.servfail > 0 {
            faults.servfail -= 1;
            response.set_response_code(ResponseCode::ServFail);
            eprintln!("[dns] {transport} {name} {rtype}: SERVFAIL");
            return Some(Outcome::Answer(response));
        }
        if faults.truncate && !tcp {
            response.set_truncated(true);
            eprintln!("[dns] {transport} {name} {rtype}: truncated");
            return Some(Outcome::Answer(response));
        }
    }
    let answers = zone.lookup(name, rtype);
    let code = match &answers {
        Some(records) if !records.is_empty() => {
            for record in records {
                // The owner as the client spelled it, like the question.
                let mut record = record.clone();
                record.set_name(question.name().clone());
                response.add_answer(record);
            }
            ResponseCode::NoError
        }
        Some(_) => {
            response.add_name_server(zone.soa(name));
            ResponseCode::NoError
        }
        None => {
            response.add_name_server(zone.soa(name));
            ResponseCode::NXDomain
        }
    };
    drop(zone);
    response.set_response_code(code);
    if !tcp {
        response = fit_udp(response, &query);
    }
    eprintln!(
        "[dns] {transport} {name} {rtype}: {code} {} answers{}",
        response.answers().len(),
        if response.truncated() {
            " (truncated)"
        } else {
            ""
        }
    );
    Some(Outcome::Answer(response))
}

/// The UDP answer itself if it fits in what the client takes, else its header and question
/// with TC set (RFC 2181 §9), so the client asks again over TCP.
fn fit_udp(response: Message, query: &Message) -> Message {
    let limit = match query.extensions() {
        Some(edns) => edns
            .max_payload()
            .clamp(UDP_PAYLOAD_CLASSIC, UDP_PAYLOAD_EDNS),
        None => UDP_PAYLOAD_CLASSIC,
    };
    let fits = response
        .to_vec()
        .is_ok_and(|bytes| bytes.len() <= usize::from(limit));
    if fits {
        return response;
    }
    let mut cut = response.truncate();
    cut.set_truncated(true);
    cut
}

impl Zone {
    /// The records of `rtype` at `name`; `Some(empty)` when the name exists without them
    /// (NODATA), `None` when it does not exist (NXDOMAIN).
    fn lookup(&self, name: &str, rtype: RecordType) -> Option<Vec<Record>> {
        if self.nxdomain.contains(name) {
            return None;
        }
        if let Some(records) = self.records.get(name) {
            return Some(
                records
                    .iter()
                    .filter(|r| rtype == RecordType::ANY || r.record_type() == rtype)
                    .cloned()
                    .collect(),
            );
        }
        let apex = !name.is_empty() && !name.contains('.');
        if rtype == RecordType::SOA && apex {
            return Some(vec![self.soa(name)]);
        }
        // A top-level domain (the apex of its zone) and a name with something under it exist.
        let suffix = format!(".{name}");
        let below = self
            .records
            .keys()
            .any(|k| name.is_empty() || k.ends_with(&suffix));
        (apex || below).then(Vec::new)
    }

    /// The SOA of the zone `name` is in: its top-level domain, served by this server.
    fn soa(&self, name: &str) -> Record {
        let tld = name.rsplit('.').next().unwrap_or_default();
        let zone = fqdn(tld);
        let mname = Name::from_ascii("ns.epoxi-test-dns.").expect("SOA mname");
        let rname = Name::from_ascii("hostmaster.epoxi-test-dns.").expect("SOA rname");
        let ttl = self.negative_ttl;
        let soa = SOA::new(mname, rname, 1, 3600, 600, 86400, ttl);
        Record::from_rdata(zone, ttl, RData::SOA(soa))
    }
}
