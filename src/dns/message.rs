//! DNS queries and answers as bytes, through hickory-proto. No I/O.

use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("bad domain name `{0}`")]
    Name(String),
    #[error("cannot encode the query: {0}")]
    Encode(String),
}

/// Encode a recursive query for `name`/`rtype` with transaction id `id`.
pub fn build_query(id: u16, name: &str, rtype: RecordType) -> Result<Vec<u8>, DnsError> {
    let mut fqdn = Name::from_utf8(name).map_err(|_| DnsError::Name(name.to_owned()))?;
    fqdn.set_fqdn(true);
    let mut msg = Message::new();
    msg.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        // RFC 6840 §5.7: AD in a query asks a validating resolver to say whether the answer
        // is DNSSEC-secure, without the DO bit's signatures. Non-validating servers ignore it.
        .set_authentic_data(true)
        .add_query(Query::query(fqdn, rtype));
    msg.to_vec().map_err(|e| DnsError::Encode(e.to_string()))
}

/// `name` with internationalised labels as A-labels (UTS 46), without the final dot: the form
/// for DNS, TLS server names and logs. Unconvertible names come back as given (lower case).
pub fn ascii_host(name: &str) -> String {
    match Name::from_utf8(name) {
        Ok(n) => n.to_ascii().trim_end_matches('.').to_ascii_lowercase(),
        Err(_) => name.trim_end_matches('.').to_lowercase(),
    }
}

/// What an answer says, for the records we ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// MX records: (preference, exchange host without the final dot), and the smallest TTL.
    Mx(Vec<(u16, String)>, u32),
    /// A/AAAA addresses and the smallest TTL.
    Addrs(Vec<IpAddr>, u32),
    /// TXT records, each one's strings joined (RFC 7208 §3.3), and the smallest TTL.
    Txt(Vec<String>, u32),
    /// TLSA records (RFC 6698) and the smallest TTL.
    Tlsa(Vec<Tlsa>, u32),
    /// The name does not exist (permanent). TTL from the SOA minimum for negative caching.
    NxDomain(u32),
    /// The name exists but has no records of this type (RFC 2308 NODATA).
    NoData(u32),
    /// SERVFAIL, REFUSED and the like: try another resolver or later.
    Transient(String),
    /// The answer did not fit in UDP: ask again over TCP.
    Truncated,
}

/// One TLSA record: certificate usage, selector, matching type and the association data, as
/// numbers (the DANE code gives them meaning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlsa {
    pub usage: u8,
    pub selector: u8,
    pub matching: u8,
    pub data: Vec<u8>,
}

/// Negative answers without an SOA are cached this long (RFC 2308 §5 suggests 1–3 hours;
/// short, so a fixed zone is seen soon).
pub const NEGATIVE_TTL_DEFAULT_S: u32 = 300;

/// Read a response to query `id`. A response to another query, or garbage, is an error
/// (the resolver waits on; a spoofed or stale datagram must not be taken as the answer).
pub fn parse_answer(id: u16, bytes: &[u8], rtype: RecordType) -> Result<Answer, String> {
    parse_response(id, bytes, rtype).map(|(answer, _)| answer)
}

/// [`parse_answer`], and whether the resolver set the AD bit (RFC 4035 §3.2.3: it validated
/// the answer with DNSSEC). Only meaningful from a validating resolver one trusts, over a path
/// one trusts (a local unbound): nothing here checks signatures.
pub fn parse_response(id: u16, bytes: &[u8], rtype: RecordType) -> Result<(Answer, bool), String> {
    let msg = Message::from_vec(bytes).map_err(|e| format!("malformed DNS response: {e}"))?;
    if msg.id() != id || msg.message_type() != MessageType::Response {
        return Err("not the response to our query".into());
    }
    let ad = msg.authentic_data();
    if msg.truncated() {
        return Ok((Answer::Truncated, ad));
    }
    let negative_ttl = msg
        .name_servers()
        .iter()
        .find_map(|r| match r.data() {
            RData::SOA(soa) => Some(soa.minimum().min(r.ttl())),
            _ => None,
        })
        .unwrap_or(NEGATIVE_TTL_DEFAULT_S);
    match msg.response_code() {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => return Ok((Answer::NxDomain(negative_ttl), ad)),
        other => return Ok((Answer::Transient(format!("DNS {other}")), ad)),
    }
    let mut ttl = u32::MAX;
    let mut mx = Vec::new();
    let mut addrs = Vec::new();
    let mut txt = Vec::new();
    let mut tlsa = Vec::new();
    for record in msg.answers() {
        match record.data() {
            RData::MX(m) if rtype == RecordType::MX => {
                // A-labels (xn--...): what DNS, TLS server names and logs all take.
                let host = m.exchange().to_ascii();
                mx.push((m.preference(), host.trim_end_matches('.').to_owned()));
                ttl = ttl.min(record.ttl());
            }
            RData::A(a) if rtype == RecordType::A => {
                addrs.push(IpAddr::V4(a.0));
                ttl = ttl.min(record.ttl());
            }
            RData::AAAA(a) if rtype == RecordType::AAAA => {
                addrs.push(IpAddr::V6(a.0));
                ttl = ttl.min(record.ttl());
            }
            RData::TXT(t) if rtype == RecordType::TXT => {
                let joined: Vec<u8> = t.iter().flat_map(|part| part.iter().copied()).collect();
                txt.push(String::from_utf8_lossy(&joined).into_owned());
                ttl = ttl.min(record.ttl());
            }
            RData::TLSA(t) if rtype == RecordType::TLSA => {
                tlsa.push(Tlsa {
                    usage: t.cert_usage().into(),
                    selector: t.selector().into(),
                    matching: t.matching().into(),
                    data: t.cert_data().to_vec(),
                });
                ttl = ttl.min(record.ttl());
            }
            // CNAMEs and other records on the way are followed by the recursive resolver.
            _ => {}
        }
    }
    let answer = match rtype {
        RecordType::MX if !mx.is_empty() => Answer::Mx(mx, ttl),
        RecordType::A | RecordType::AAAA if !addrs.is_empty() => Answer::Addrs(addrs, ttl),
        RecordType::TXT if !txt.is_empty() => Answer::Txt(txt, ttl),
        RecordType::TLSA if !tlsa.is_empty() => Answer::Tlsa(tlsa, ttl),
        _ => Answer::NoData(negative_ttl),
    };
    Ok((answer, ad))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, MX, SOA};
    use hickory_proto::rr::Record;

    fn response(id: u16, code: ResponseCode, answers: Vec<Record>, soa: bool) -> Vec<u8> {
        let mut msg = Message::new();
        msg.set_id(id)
            .set_message_type(MessageType::Response)
            .set_response_code(code);
        for a in answers {
            msg.add_answer(a);
        }
        if soa {
            let zone = Name::from_ascii("test.").expect("name");
            let data = SOA::new(zone.clone(), zone.clone(), 1, 3600, 600, 86400, 120);
            msg.add_name_server(Record::from_rdata(zone, 900, RData::SOA(data)));
        }
        msg.to_vec().expect("encode")
    }

    fn mx(pref: u16, host: &str, ttl: u32) -> Record {
        let owner = Name::from_ascii("example.test.").expect("name");
        let exchange = Name::from_ascii(host).expect("name");
        Record::from_rdata(owner, ttl, RData::MX(MX::new(pref, exchange)))
    }

    #[test]
    fn query_round_trips() {
        let q = build_query(7, "bücher.example", RecordType::MX).expect("query");
        let msg = Message::from_vec(&q).expect("decode");
        assert_eq!(msg.id(), 7);
        assert!(msg.recursion_desired());
        assert_eq!(msg.queries()[0].query_type(), RecordType::MX);
        assert_eq!(msg.queries()[0].name().to_ascii(), "xn--bcher-kva.example.");
        assert_eq!(ascii_host("Bücher.Example."), "xn--bcher-kva.example");
        assert_eq!(ascii_host("mx1.example"), "mx1.example");
        assert!(build_query(1, "bad..name", RecordType::MX).is_err());
    }

    #[test]
    fn answers_are_classified() {
        let r = response(
            9,
            ResponseCode::NoError,
            vec![mx(10, "mx1.test.", 300), mx(5, "mx0.test.", 60)],
            false,
        );
        assert_eq!(
            parse_answer(9, &r, RecordType::MX),
            Ok(Answer::Mx(
                vec![(10, "mx1.test".into()), (5, "mx0.test".into())],
                60
            ))
        );
        let owner = Name::from_ascii("mx1.test.").expect("name");
        let a = Record::from_rdata(owner, 30, RData::A(A::new(127, 0, 0, 7)));
        let r = response(2, ResponseCode::NoError, vec![a], false);
        assert_eq!(
            parse_answer(2, &r, RecordType::A),
            Ok(Answer::Addrs(vec!["127.0.0.7".parse().expect("ip")], 30))
        );
        let r = response(3, ResponseCode::NXDomain, vec![], true);
        assert_eq!(
            parse_answer(3, &r, RecordType::MX),
            Ok(Answer::NxDomain(120)),
            "SOA minimum"
        );
        let r = response(4, ResponseCode::NoError, vec![], false);
        assert_eq!(
            parse_answer(4, &r, RecordType::MX),
            Ok(Answer::NoData(NEGATIVE_TTL_DEFAULT_S))
        );
        let r = response(5, ResponseCode::ServFail, vec![], false);
        assert!(matches!(
            parse_answer(5, &r, RecordType::MX),
            Ok(Answer::Transient(_))
        ));
        assert!(parse_answer(6, &r, RecordType::MX).is_err(), "wrong id");
        assert!(parse_answer(5, b"\x00garbage", RecordType::MX).is_err());
    }
}
