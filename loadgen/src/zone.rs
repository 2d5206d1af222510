//! The zone `dns` serves and its answer to one query: bytes in, bytes out, no I/O, so every
//! answer is unit-tested here and `dns` only moves datagrams and frames.
//!
//! The zone is fixed at start from the command line: MX records for every name matching a
//! glob (the records of the first glob that matches, in command-line order), and A and AAAA
//! records at exact names. The server acts as the authority for every top-level domain: a name
//! it has no records for is NXDOMAIN, unless it lies above a name it knows (an empty
//! non-terminal, NODATA, as RFC 8020 wants). Negative answers carry the SOA of the name's
//! top-level domain, whose TTL and MINIMUM are the negative TTL (RFC 2308 §5). There is no
//! additional-section processing: a client asks for the address of an MX host itself.
//!
//! Invariants: every answer echoes the query's id, question and RD flag and sets AA; a UDP
//! answer never exceeds what the client said it can take (512 bytes without EDNS), and a TCP
//! answer always fits its two-byte length prefix (checked at compile time below); input that
//! does not decode as a query gets no answer.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, MX, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

/// Records of one type at one name. A real domain has a handful of MX hosts and addresses;
/// the bound keeps the largest answer (an ANY query for a name with MX, A and AAAA records)
/// within a TCP message, as checked below.
pub const RECORDS_PER_NAME_MAX: usize = 32;

/// `--mx`, `--a` and `--aaaa` values together. Every query scans the MX globs in order, so
/// the zone stays small; a benchmark or demo needs a few.
pub const ZONE_ENTRIES_MAX: usize = 1024;

/// Longest encoded record, uncompressed: owner name (255), type, class, TTL and length (10),
/// and the largest RDATA served here, an MX (preference, 2, and a 255-byte name).
const RECORD_LEN_MAX: usize = 255 + 10 + 2 + 255;

/// Header (12), one question (255-byte name, type, class) and an OPT record (11).
const MESSAGE_OVERHEAD_MAX: usize = 12 + 255 + 4 + 11;

// Record types answered at one name: MX, A and AAAA (all three for ANY).
const _: () = assert!(
    MESSAGE_OVERHEAD_MAX + 3 * RECORDS_PER_NAME_MAX * RECORD_LEN_MAX <= u16::MAX as usize,
    "the largest answer must fit a TCP message's two-byte length"
);

/// RFC 1035 §4.2.1: without EDNS a UDP message is at most 512 bytes.
const UDP_PAYLOAD_CLASSIC: u16 = 512;

/// The payload size this server advertises and will send over UDP with EDNS: the 2020 DNS flag
/// day value, which avoids IP fragmentation. A client offering more gets at most this.
const UDP_PAYLOAD_EDNS: u16 = 1232;

/// RFC 2181 §8: a TTL is a 31-bit value.
pub const TTL_MAX_S: u32 = i32::MAX as u32;

#[derive(Debug, thiserror::Error)]
pub enum ZoneError {
    #[error("`{0}` is not GLOB=PREF:HOST")]
    MxSyntax(String),
    #[error("`{0}` is not NAME=ADDRESS")]
    AddrSyntax(String),
    #[error("bad domain glob `{0}` (give A-labels, `*` and `?`)")]
    Glob(String),
    #[error("bad MX preference `{0}` (0 to 65535)")]
    Preference(String),
    #[error("bad DNS name `{0}`: {1}")]
    Name(String, String),
    #[error("bad address `{0}`: {1}")]
    Address(String, std::net::AddrParseError),
    #[error("more than {RECORDS_PER_NAME_MAX} {1} records for `{0}`")]
    TooManyRecords(String, RecordType),
    #[error("more than {ZONE_ENTRIES_MAX} --mx, --a and --aaaa values")]
    TooManyEntries,
}

/// One `--mx GLOB=PREF:HOST` value. HOST `.` is the null MX of RFC 7505.
#[derive(Debug, Clone, PartialEq)]
pub struct MxEntry {
    glob: String,
    preference: u16,
    exchange: Name,
}

impl FromStr for MxEntry {
    type Err = ZoneError;

    fn from_str(text: &str) -> Result<Self, ZoneError> {
        let syntax = || ZoneError::MxSyntax(text.to_owned());
        let (glob, target) = text.split_once('=').ok_or_else(syntax)?;
        let (preference, host) = target.split_once(':').ok_or_else(syntax)?;
        let preference = preference
            .trim()
            .parse()
            .map_err(|_| ZoneError::Preference(preference.to_owned()))?;
        let host = host.trim();
        let exchange = if host == "." {
            Name::root()
        } else {
            fqdn(&key(host)?)?
        };
        Ok(MxEntry {
            glob: glob_key(glob)?,
            preference,
            exchange,
        })
    }
}

/// One `--a NAME=IPv4` value.
#[derive(Debug, Clone, PartialEq)]
pub struct AEntry {
    name: String,
    ip: Ipv4Addr,
}

impl FromStr for AEntry {
    type Err = ZoneError;

    fn from_str(text: &str) -> Result<Self, ZoneError> {
        let (name, ip) = split_addr(text)?;
        Ok(AEntry {
            name,
            ip: ip
                .parse()
                .map_err(|e| ZoneError::Address(ip.to_owned(), e))?,
        })
    }
}

/// One `--aaaa NAME=IPv6` value.
#[derive(Debug, Clone, PartialEq)]
pub struct AaaaEntry {
    name: String,
    ip: Ipv6Addr,
}

impl FromStr for AaaaEntry {
    type Err = ZoneError;

    fn from_str(text: &str) -> Result<Self, ZoneError> {
        let (name, ip) = split_addr(text)?;
        Ok(AaaaEntry {
            name,
            ip: ip
                .parse()
                .map_err(|e| ZoneError::Address(ip.to_owned(), e))?,
        })
    }
}

fn split_addr(text: &str) -> Result<(String, &str), ZoneError> {
    let (name, ip) = text
        .split_once('=')
        .ok_or_else(|| ZoneError::AddrSyntax(text.to_owned()))?;
    Ok((key(name)?, ip.trim()))
}

/// The MX records of every name matching `glob`.
struct MxRule {
    glob: String,
    records: Vec<RData>,
}

/// What the zone has at a name for a type.
#[derive(Debug, PartialEq)]
enum Lookup {
    Records(Vec<RData>),
    /// The SOA of a top-level domain, asked for at its apex.
    Soa,
    NoData,
    NxDomain,
}

/// How a query was answered, for the report. Every query is exactly one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// NOERROR with records.
    Answer,
    /// NOERROR without records: the name exists, not with that type.
    NoData,
    NxDomain,
    /// FORMERR, NOTIMP or REFUSED: not a query this server serves.
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// The answer to one query, encoded, and what the report counts of it.
pub struct Response {
    pub bytes: Vec<u8>,
    pub outcome: Outcome,
    /// The question's name (lowercase A-labels, no trailing dot) and type; `None` when the
    /// query did not have exactly one question.
    pub question: Option<(String, RecordType)>,
    /// Cut to its header and question with TC set, to fit a UDP datagram.
    pub truncated: bool,
}

pub struct Zone {
    mx: Vec<MxRule>,
    /// A and AAAA records by owner name.
    addrs: HashMap<String, Vec<RData>>,
    /// Names above a known name or glob: they exist without records of their own.
    ancestors: HashSet<String>,
    ttl: u32,
    negative_ttl: u32,
    /// The SOA's MNAME and RNAME, made once.
    soa_names: (Name, Name),
}

impl Zone {
    pub fn new(
        mx: &[MxEntry],
        a: &[AEntry],
        aaaa: &[AaaaEntry],
        ttl: u32,
        negative_ttl: u32,
    ) -> Result<Zone, ZoneError> {
        if mx.len() + a.len() + aaaa.len() > ZONE_ENTRIES_MAX {
            return Err(ZoneError::TooManyEntries);
        }
        let mut rules: Vec<MxRule> = Vec::new();
        for entry in mx {
            let index = match rules.iter().position(|r| r.glob == entry.glob) {
                Some(index) => index,
                None => {
                    rules.push(MxRule {
                        glob: entry.glob.clone(),
                        records: Vec::new(),
                    });
                    rules.len() - 1
                }
            };
            let rule = &mut rules[index];
            if rule.records.len() == RECORDS_PER_NAME_MAX {
                return Err(ZoneError::TooManyRecords(rule.glob.clone(), RecordType::MX));
            }
            let mx = MX::new(entry.preference, entry.exchange.clone());
            rule.records.push(RData::MX(mx));
        }
        let mut addrs: HashMap<String, Vec<RData>> = HashMap::new();
        let typed = a
            .iter()
            .map(|e| (&e.name, RData::A(A(e.ip))))
            .chain(aaaa.iter().map(|e| (&e.name, RData::AAAA(AAAA(e.ip)))));
        for (name, rdata) in typed {
            let records = addrs.entry(name.clone()).or_default();
            let rtype = rdata.record_type();
            if records.iter().filter(|r| r.record_type() == rtype).count() == RECORDS_PER_NAME_MAX {
                return Err(ZoneError::TooManyRecords(name.clone(), rtype));
            }
            records.push(rdata);
        }
        // `*.bench.test` implies bench.test and test; `mx.bench.test` too. Only the labels
        // after the last wildcard are certain: `d*.test` says nothing of any d-name.
        let mut ancestors = HashSet::new();
        let literal_tails = rules
            .iter()
            .map(|r| r.glob.rsplit(['*', '?']).next().unwrap_or_default())
            .chain(addrs.keys().map(String::as_str));
        for tail in literal_tails {
            for (dot, _) in tail.match_indices('.') {
                ancestors.insert(tail[dot + 1..].to_owned());
            }
        }
        Ok(Zone {
            mx: rules,
            addrs,
            ancestors,
            ttl,
            negative_ttl,
            soa_names: (fqdn("ns.epoxi-loadgen")?, fqdn("hostmaster.epoxi-loadgen")?),
        })
    }

    /// The answer to the query in `bytes`, or `None` when they are not a query. No I/O.
    pub fn respond(&self, bytes: &[u8], transport: Transport) -> Option<Response> {
        let query = Message::from_vec(bytes).ok()?;
        if query.message_type() != MessageType::Query {
            return None;
        }
        let mut response = Message::new();
        response
            .set_id(query.id())
            .set_message_type(MessageType::Response)
            .set_op_code(query.op_code())
            .set_authoritative(true)
            .set_recursion_desired(query.recursion_desired());
        // An EDNS query gets an OPT back (RFC 6891 §7). Only version 0 exists in practice, so
        // there is no BADVERS.
        if query.extensions().is_some() {
            let mut ours = Edns::new();
            ours.set_max_payload(UDP_PAYLOAD_EDNS).set_version(0);
            response.set_edns(ours);
        }
        let error = |mut response: Message, code, question| {
            response.set_response_code(code);
            finish(response, &query, transport, Outcome::Error, question)
        };
        if query.op_code() != OpCode::Query {
            return error(response, ResponseCode::NotImp, None);
        }
        let [question] = query.queries() else {
            return error(response, ResponseCode::FormErr, None);
        };
        response.add_query(question.clone());
        let name = name_key(question.name());
        let rtype = question.query_type();
        let counted = Some((name.clone(), rtype));
        if question.query_class() != DNSClass::IN {
            return error(response, ResponseCode::Refused, counted);
        }
        let outcome = match self.lookup(&name, rtype) {
            Lookup::Records(records) => {
                for rdata in records {
                    // The owner as the client spelled it, like the question (0x20 case).
                    let record = Record::from_rdata(question.name().clone(), self.ttl, rdata);
                    response.add_answer(record);
                }
                Outcome::Answer
            }
            Lookup::Soa => {
                response.add_answer(self.soa(question.name(), self.ttl));
                Outcome::Answer
            }
            Lookup::NoData => {
                response.add_name_server(self.soa(question.name(), self.negative_ttl));
                Outcome::NoData
            }
            Lookup::NxDomain => {
                response.add_name_server(self.soa(question.name(), self.negative_ttl));
                response.set_response_code(ResponseCode::NXDomain);
                Outcome::NxDomain
            }
        };
        finish(response, &query, transport, outcome, counted)
    }

    /// The records of `rtype` at `name` (a key: lowercase, no trailing dot).
    fn lookup(&self, name: &str, rtype: RecordType) -> Lookup {
        let mx = self
            .mx
            .iter()
            .find(|rule| glob_match(rule.glob.as_bytes(), name.as_bytes()));
        let addrs = self.addrs.get(name);
        let apex = !name.contains('.');
        let exists = mx.is_some() || addrs.is_some() || self.ancestors.contains(name);
        if !exists && !name.is_empty() {
            return Lookup::NxDomain;
        }
        let records: Vec<RData> = mx
            .map(|rule| rule.records.as_slice())
            .unwrap_or_default()
            .iter()
            .chain(addrs.map(Vec::as_slice).unwrap_or_default())
            .filter(|r| rtype == RecordType::ANY || r.record_type() == rtype)
            .cloned()
            .collect();
        if !records.is_empty() {
            return Lookup::Records(records);
        }
        if apex && rtype == RecordType::SOA {
            return Lookup::Soa;
        }
        Lookup::NoData
    }

    /// The SOA of the zone `name` is in: its top-level domain, served by this server.
    fn soa(&self, name: &Name, ttl: u32) -> Record {
        let zone = name.trim_to(1).to_lowercase();
        let (mname, rname) = self.soa_names.clone();
        let soa = SOA::new(mname, rname, 1, 3600, 600, 86400, self.negative_ttl);
        Record::from_rdata(zone, ttl, RData::SOA(soa))
    }
}

/// Encodes `response`, cut to fit a UDP datagram if it must be.
fn finish(
    response: Message,
    query: &Message,
    transport: Transport,
    outcome: Outcome,
    question: Option<(String, RecordType)>,
) -> Option<Response> {
    let mut bytes = response.to_vec().ok()?;
    let mut truncated = false;
    if transport == Transport::Udp {
        let limit = match query.extensions() {
            Some(edns) => edns
                .max_payload()
                .clamp(UDP_PAYLOAD_CLASSIC, UDP_PAYLOAD_EDNS),
            None => UDP_PAYLOAD_CLASSIC,
        };
        if bytes.len() > usize::from(limit) {
            // RFC 2181 §9: header and question with TC set, so the client asks over TCP.
            bytes = response.truncate().to_vec().ok()?;
            truncated = true;
        }
    }
    Some(Response {
        bytes,
        outcome,
        question,
        truncated,
    })
}

/// The zone's key for a name given on the command line: A-labels, lowercase, no trailing dot.
fn key(name: &str) -> Result<String, ZoneError> {
    let parsed = Name::from_utf8(name.trim())
        .map_err(|e| ZoneError::Name(name.to_owned(), e.to_string()))?;
    Ok(name_key(&parsed))
}

fn name_key(name: &Name) -> String {
    let mut key = name.to_ascii().to_ascii_lowercase();
    if key.ends_with('.') {
        key.pop();
    }
    key
}

/// The absolute name for a key.
fn fqdn(key: &str) -> Result<Name, ZoneError> {
    if key.is_empty() {
        return Ok(Name::root());
    }
    let mut name =
        Name::from_ascii(key).map_err(|e| ZoneError::Name(key.to_owned(), e.to_string()))?;
    name.set_fqdn(true);
    Ok(name)
}

/// A glob as matched: lowercase, no trailing dot. It matches the A-label form of names, so
/// it must be written in it.
fn glob_key(glob: &str) -> Result<String, ZoneError> {
    let glob = glob.trim().to_ascii_lowercase();
    let glob = glob.strip_suffix('.').unwrap_or(&glob);
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-_.*?".contains(c);
    if glob.is_empty() || !glob.chars().all(allowed) {
        return Err(ZoneError::Glob(glob.to_owned()));
    }
    Ok(glob.to_owned())
}

/// `*` matches any run of characters (dots too), `?` one character: the globs of epoxi's
/// `--route` (src/route.rs), so one pattern means the same to both.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;

    fn zone_of(mx: &[&str], a: &[&str], aaaa: &[&str]) -> Zone {
        let mx: Vec<MxEntry> = mx.iter().map(|s| s.parse().unwrap()).collect();
        let a: Vec<AEntry> = a.iter().map(|s| s.parse().unwrap()).collect();
        let aaaa: Vec<AaaaEntry> = aaaa.iter().map(|s| s.parse().unwrap()).collect();
        Zone::new(&mx, &a, &aaaa, 300, 60).unwrap()
    }

    fn bench_zone() -> Zone {
        zone_of(
            &[
                "*.test=10:mx.bench.test",
                "*.test=20:mx2.bench.test",
                "*=5:fallback.example",
                "null.example=0:.",
            ],
            &["mx.bench.test=127.0.0.1", "mx.bench.test=127.0.0.2"],
            &["mx2.bench.test=::1"],
        )
    }

    fn query_message(id: u16, name: &str, rtype: RecordType) -> Message {
        let mut message = Message::new();
        message
            .set_id(id)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        message
    }

    fn ask(zone: &Zone, name: &str, rtype: RecordType) -> (Message, Response) {
        let bytes = query_message(4242, name, rtype).to_vec().unwrap();
        let response = zone.respond(&bytes, Transport::Udp).expect("an answer");
        (Message::from_vec(&response.bytes).unwrap(), response)
    }

    /// The MX answers as (preference, exchange).
    fn mx_of(message: &Message) -> Vec<(u16, String)> {
        message
            .answers()
            .iter()
            .map(|r| match r.data() {
                RData::MX(mx) => (mx.preference(), mx.exchange().to_ascii()),
                other => panic!("not an MX: {other:?}"),
            })
            .collect()
    }

    /// The negative answer's SOA: owner, TTL and MINIMUM.
    fn soa_of(message: &Message) -> (String, u32, u32) {
        let [record] = message.name_servers() else {
            panic!("one SOA in {message:?}");
        };
        let RData::SOA(soa) = record.data() else {
            panic!("not an SOA: {record:?}");
        };
        (record.name().to_ascii(), record.ttl(), soa.minimum())
    }

    #[test]
    fn a_name_matching_a_glob_gets_its_mx_records_in_order() {
        let (answer, response) = ask(&bench_zone(), "D0.Test.", RecordType::MX);
        assert_eq!(answer.id(), 4242);
        assert_eq!(answer.message_type(), MessageType::Response);
        assert!(answer.authoritative());
        assert!(answer.recursion_desired());
        assert!(!answer.truncated());
        assert_eq!(answer.response_code(), ResponseCode::NoError);
        assert_eq!(
            answer.queries(),
            query_message(1, "D0.Test.", RecordType::MX).queries()
        );
        assert_eq!(
            mx_of(&answer),
            [
                (10, "mx.bench.test.".into()),
                (20, "mx2.bench.test.".into())
            ]
        );
        // The owner as the client spelled it, with the zone's TTL.
        for record in answer.answers() {
            assert_eq!(record.name().to_string(), "D0.Test.");
            assert_eq!(record.ttl(), 300);
        }
        assert_eq!(response.outcome, Outcome::Answer);
        assert_eq!(response.question, Some(("d0.test".into(), RecordType::MX)));
    }

    #[test]
    fn the_first_matching_glob_wins() {
        let zone = bench_zone();
        // `*` comes before `null.example`, so that null MX is never served.
        let (answer, _) = ask(&zone, "a.b.example.", RecordType::MX);
        assert_eq!(mx_of(&answer), [(5, "fallback.example.".into())]);
        let (answer, _) = ask(&zone, "null.example.", RecordType::MX);
        assert_eq!(mx_of(&answer), [(5, "fallback.example.".into())]);
        let zone = zone_with_null_mx();
        let (answer, _) = ask(&zone, "null.example.", RecordType::MX);
        assert_eq!(mx_of(&answer), [(0, ".".into())]);
    }

    fn zone_with_null_mx() -> Zone {
        zone_of(&["null.example=0:.", "*=5:fallback.example"], &[], &[])
    }

    #[test]
    fn addresses_are_served_at_exact_names() {
        let zone = bench_zone();
        let (answer, _) = ask(&zone, "mx.bench.test.", RecordType::A);
        let ips: Vec<_> = answer.answers().iter().map(|r| r.data().clone()).collect();
        assert_eq!(
            ips,
            [
                RData::A(A(Ipv4Addr::new(127, 0, 0, 1))),
                RData::A(A(Ipv4Addr::new(127, 0, 0, 2)))
            ]
        );
        let (answer, _) = ask(&zone, "mx2.bench.test.", RecordType::AAAA);
        let ips: Vec<_> = answer.answers().iter().map(|r| r.data().clone()).collect();
        assert_eq!(ips, [RData::AAAA(AAAA(Ipv6Addr::LOCALHOST))]);
    }

    #[test]
    fn a_known_name_without_the_type_is_nodata_with_the_negative_ttl() {
        let zone = bench_zone();
        for (name, rtype) in [
            ("mx.bench.test.", RecordType::AAAA),
            ("d0.test.", RecordType::A),
            ("mx.bench.test.", RecordType::TXT),
        ] {
            let (answer, response) = ask(&zone, name, rtype);
            assert_eq!(
                answer.response_code(),
                ResponseCode::NoError,
                "{name} {rtype}"
            );
            assert!(answer.answers().is_empty());
            assert!(answer.authoritative());
            assert_eq!(soa_of(&answer), ("test.".into(), 60, 60));
            assert_eq!(response.outcome, Outcome::NoData);
        }
    }

    #[test]
    fn an_unknown_name_is_nxdomain_with_the_soa_of_its_tld() {
        let zone = zone_of(&["*.test=10:mx.bench.test"], &[], &[]);
        let (answer, response) = ask(&zone, "nobody.example.", RecordType::MX);
        assert_eq!(answer.response_code(), ResponseCode::NXDomain);
        assert!(answer.answers().is_empty());
        assert!(answer.authoritative());
        assert_eq!(soa_of(&answer), ("example.".into(), 60, 60));
        assert_eq!(response.outcome, Outcome::NxDomain);
        // `*.test` needs at least one more label.
        let (answer, _) = ask(&zone, "test.", RecordType::MX);
        assert_eq!(answer.response_code(), ResponseCode::NoError);
        assert!(answer.answers().is_empty());
    }

    #[test]
    fn names_above_known_names_exist_without_records() {
        let zone = zone_of(
            &["*.mail.example=10:mx.example"],
            &["a.b.other=10.0.0.1"],
            &[],
        );
        for name in ["mail.example.", "example.", "b.other.", "other."] {
            let (answer, _) = ask(&zone, name, RecordType::MX);
            assert_eq!(answer.response_code(), ResponseCode::NoError, "{name}");
            assert!(answer.answers().is_empty(), "{name}");
        }
        for name in ["x.other.", "c.b.other.", "xmail.example.", "nothing."] {
            let (answer, _) = ask(&zone, name, RecordType::MX);
            assert_eq!(answer.response_code(), ResponseCode::NXDomain, "{name}");
        }
        // A wildcard in the middle promises nothing left of it.
        let zone = zone_of(&["d*.test=10:mx.example"], &[], &[]);
        let (answer, _) = ask(&zone, "test.", RecordType::MX);
        assert_eq!(answer.response_code(), ResponseCode::NoError);
        let (answer, _) = ask(&zone, "x.test.", RecordType::MX);
        assert_eq!(answer.response_code(), ResponseCode::NXDomain);
    }

    #[test]
    fn soa_at_a_known_tld_and_any_at_a_name() {
        let zone = bench_zone();
        let (answer, _) = ask(&zone, "test.", RecordType::SOA);
        let [record] = answer.answers() else {
            panic!("one SOA in {answer:?}");
        };
        assert_eq!(record.record_type(), RecordType::SOA);
        assert_eq!(record.ttl(), 300);
        let (answer, _) = ask(&zone, "mx.bench.test.", RecordType::ANY);
        let types: Vec<_> = answer.answers().iter().map(Record::record_type).collect();
        assert_eq!(
            types,
            [RecordType::MX, RecordType::MX, RecordType::A, RecordType::A]
        );
    }

    #[test]
    fn a_udp_answer_too_big_is_truncated_and_whole_over_tcp() {
        let mx: Vec<String> = (0..RECORDS_PER_NAME_MAX)
            // Distinct long labels, so that name compression cannot make them fit.
            .map(|i| format!("*.test={i}:mx{i}{}.test", "x".repeat(50)))
            .collect();
        let mx: Vec<&str> = mx.iter().map(String::as_str).collect();
        let zone = zone_of(&mx, &[], &[]);
        let mut query = query_message(7, "big.test.", RecordType::MX);
        for edns in [false, true] {
            if edns {
                let mut ours = Edns::new();
                ours.set_max_payload(4096);
                query.set_edns(ours);
            }
            let bytes = query.to_vec().unwrap();
            let response = zone.respond(&bytes, Transport::Udp).unwrap();
            let limit = if edns { 1232 } else { 512 };
            assert!(
                response.bytes.len() <= limit,
                "{} bytes",
                response.bytes.len()
            );
            assert!(response.truncated);
            let answer = Message::from_vec(&response.bytes).unwrap();
            assert!(answer.truncated());
            assert!(answer.answers().is_empty());
            assert_eq!(answer.queries(), query.queries());
            assert_eq!(answer.extensions().is_some(), edns);
            assert_eq!(response.outcome, Outcome::Answer);

            let response = zone.respond(&bytes, Transport::Tcp).unwrap();
            assert!(!response.truncated);
            let answer = Message::from_vec(&response.bytes).unwrap();
            assert!(!answer.truncated());
            assert_eq!(answer.answers().len(), RECORDS_PER_NAME_MAX);
        }
    }

    #[test]
    fn what_is_not_a_query_gets_no_answer() {
        let zone = bench_zone();
        assert!(zone.respond(b"", Transport::Udp).is_none());
        assert!(zone.respond(b"\x00\x01garbage", Transport::Tcp).is_none());
        let mut response = query_message(1, "d0.test.", RecordType::MX);
        response.set_message_type(MessageType::Response);
        let bytes = response.to_vec().unwrap();
        assert!(zone.respond(&bytes, Transport::Udp).is_none());
    }

    #[test]
    fn queries_this_server_does_not_serve_get_precise_errors() {
        let zone = bench_zone();
        let respond = |message: &Message| {
            let response = zone
                .respond(&message.to_vec().unwrap(), Transport::Udp)
                .unwrap();
            assert_eq!(response.outcome, Outcome::Error);
            let answer = Message::from_vec(&response.bytes).unwrap();
            assert_eq!(answer.id(), message.id());
            assert!(answer.answers().is_empty());
            (answer.response_code(), response.question)
        };
        let mut two = query_message(2, "d0.test.", RecordType::MX);
        two.add_query(Query::query(
            Name::from_ascii("d1.test.").unwrap(),
            RecordType::MX,
        ));
        assert_eq!(respond(&two), (ResponseCode::FormErr, None));
        let mut notify = query_message(3, "d0.test.", RecordType::SOA);
        notify.set_op_code(OpCode::Notify);
        assert_eq!(respond(&notify), (ResponseCode::NotImp, None));
        let mut chaos = Message::new();
        let mut question =
            Query::query(Name::from_ascii("version.bind.").unwrap(), RecordType::TXT);
        question.set_query_class(DNSClass::CH);
        chaos.set_id(4).add_query(question);
        assert_eq!(
            respond(&chaos),
            (
                ResponseCode::Refused,
                Some(("version.bind".into(), RecordType::TXT))
            )
        );
    }

    #[test]
    fn names_are_kept_as_lowercase_a_labels() {
        let zone = zone_of(
            &["*.TEST.=10:MX.Bücher.test"],
            &["Bücher.test=10.0.0.1"],
            &[],
        );
        let (answer, response) = ask(&zone, "xn--bcher-kva.test.", RecordType::A);
        assert_eq!(answer.answers().len(), 1);
        assert_eq!(
            response.question,
            Some(("xn--bcher-kva.test".into(), RecordType::A))
        );
        let (answer, _) = ask(&zone, "d0.test.", RecordType::MX);
        assert_eq!(mx_of(&answer), [(10, "mx.xn--bcher-kva.test.".into())]);
    }

    #[test]
    fn bad_flag_values_are_refused_with_the_reason() {
        let err = |text: &str| text.parse::<MxEntry>().unwrap_err().to_string();
        assert_eq!(err("*.test"), "`*.test` is not GLOB=PREF:HOST");
        assert_eq!(
            err("*.test=mx.test"),
            "`*.test=mx.test` is not GLOB=PREF:HOST"
        );
        assert_eq!(
            err("*.test=x:mx.test"),
            "bad MX preference `x` (0 to 65535)"
        );
        assert_eq!(
            err("*.test=65536:mx.test"),
            "bad MX preference `65536` (0 to 65535)"
        );
        assert!(err("bü*.test=1:mx.test").starts_with("bad domain glob"));
        assert!(err("=1:mx.test").starts_with("bad domain glob"));
        assert!(err("*.test=1:bad..name").starts_with("bad DNS name `bad..name`"));
        assert_eq!(
            "h.test".parse::<AEntry>().unwrap_err().to_string(),
            "`h.test` is not NAME=ADDRESS"
        );
        assert!("h.test=::1".parse::<AEntry>().is_err());
        assert!("h.test=127.0.0.1".parse::<AaaaEntry>().is_err());
    }

    #[test]
    fn records_per_name_are_bounded() {
        let a: Vec<AEntry> = (0..=RECORDS_PER_NAME_MAX)
            .map(|i| format!("h.test=10.0.0.{i}").parse().unwrap())
            .collect();
        let err = Zone::new(&[], &a, &[], 300, 60).err().unwrap();
        assert_eq!(err.to_string(), "more than 32 A records for `h.test`");
        let mx: Vec<MxEntry> = (0..=RECORDS_PER_NAME_MAX)
            .map(|i| format!("*.test={i}:mx.test").parse().unwrap())
            .collect();
        assert!(Zone::new(&mx, &[], &[], 300, 60).is_err());
        // Up to the bound is fine, whatever the other types hold.
        let aaaa: Vec<AaaaEntry> = (0..RECORDS_PER_NAME_MAX)
            .map(|i| format!("h.test=::{i}").parse().unwrap())
            .collect();
        assert!(Zone::new(&mx[1..], &a[1..], &aaaa, 300, 60).is_ok());
    }

    #[test]
    fn globs_match_like_epoxi_routes() {
        assert!(glob_match(b"*.test", b"d0.test"));
        assert!(glob_match(b"*", b"anything.example"));
        assert!(glob_match(b"example.com", b"example.com"));
        assert!(!glob_match(b"example.com", b"sub.example.com"));
        assert!(glob_match(b"*.example.com", b"a.b.example.com"));
        assert!(!glob_match(b"*.test", b"test"));
        assert!(glob_match(b"d?.test", b"d7.test"));
        assert!(!glob_match(b"d?.test", b"d10.test"));
    }
}
