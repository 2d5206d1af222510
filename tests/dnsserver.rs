//! The harness's DNS server, tested as a resolver would see it: queries built with hickory-proto
//! and sent over real UDP and TCP sockets on loopback.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use common::dns::{DnsServer, RecordType, NEGATIVE_TTL_DEFAULT_S};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData};

/// How long a test waits for an answer that should come. Loopback answers in microseconds;
/// this is for a loaded machine.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

fn query(id: u16, name: &str, rtype: RecordType, edns: bool) -> Vec<u8> {
    let mut msg = Message::new();
    msg.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(
            Name::from_ascii(name).expect("query name"),
            rtype,
        ));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        msg.set_edns(e);
    }
    msg.to_vec().expect("encode query")
}

/// Sends `bytes` over UDP; the answer, or `None` when none comes within `wait`.
fn udp_exchange(server: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Message> {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind client socket");
    socket.set_read_timeout(Some(wait)).expect("read timeout");
    socket.send_to(bytes, server).expect("send query");
    let mut buf = [0u8; 65_535];
    let (n, from) = socket.recv_from(&mut buf).ok()?;
    assert_eq!(from, server, "answer from the server asked");
    Some(Message::from_vec(&buf[..n]).expect("the answer decodes"))
}

/// Sends `bytes` over UDP, then a query for `name` with `id`, from one socket; the answer to
/// that query. The server's one UDP thread takes datagrams in order and answers each before
/// it reads the next, so when the first datagram back answers the second query, `bytes` got
/// no answer: no wait for silence.
fn udp_unanswered(server: SocketAddr, bytes: &[u8], id: u16, name: &str) -> Message {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind client socket");
    socket
        .set_read_timeout(Some(ANSWER_WAIT))
        .expect("read timeout");
    socket
        .send_to(bytes, server)
        .expect("send the first datagram");
    let then = query(id, name, RecordType::A, false);
    socket
        .send_to(&then, server)
        .expect("send the query after it");
    let mut buf = [0u8; 65_535];
    let (n, from) = socket
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("no UDP answer for {name}: {e}"));
    assert_eq!(from, server, "answer from the server asked");
    let answer = Message::from_vec(&buf[..n]).expect("the answer decodes");
    assert_eq!(answer.id(), id, "{bytes:?} was answered: {answer:?}");
    check_echo(&answer, id, name, RecordType::A);
    answer
}

fn udp(server: SocketAddr, id: u16, name: &str, rtype: RecordType) -> Message {
    let answer = udp_exchange(server, &query(id, name, rtype, false), ANSWER_WAIT)
        .unwrap_or_else(|| panic!("no UDP answer for {name} {rtype}"));
    check_echo(&answer, id, name, rtype);
    answer
}

fn tcp_connect(server: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(server).expect("connect over TCP");
    stream.set_read_timeout(Some(ANSWER_WAIT)).expect("timeout");
    stream
}

fn tcp_send(stream: &mut TcpStream, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).expect("query fits a TCP frame");
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).expect("write query");
}

fn tcp_read(stream: &mut TcpStream) -> Message {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).expect("answer length");
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).expect("answer");
    Message::from_vec(&buf).expect("the answer decodes")
}

fn tcp(server: SocketAddr, id: u16, name: &str, rtype: RecordType) -> Message {
    let mut stream = tcp_connect(server);
    tcp_send(&mut stream, &query(id, name, rtype, false));
    let answer = tcp_read(&mut stream);
    check_echo(&answer, id, name, rtype);
    answer
}

/// Id and question echoed, a response, authoritative, RD copied.
fn check_echo(answer: &Message, id: u16, name: &str, rtype: RecordType) {
    assert_eq!(answer.id(), id);
    assert_eq!(answer.message_type(), MessageType::Response);
    assert!(answer.authoritative(), "AA set");
    assert!(answer.recursion_desired(), "RD copied");
    let question = answer.query().expect("question echoed");
    assert_eq!(question.name().to_ascii(), name);
    assert_eq!(question.query_type(), rtype);
}

fn mx_of(answer: &Message) -> Vec<(u16, String, u32)> {
    answer
        .answers()
        .iter()
        .map(|r| match r.data() {
            RData::MX(mx) => (mx.preference(), mx.exchange().to_ascii(), r.ttl()),
            other => panic!("not an MX record: {other:?}"),
        })
        .collect()
}

/// The negative TTL the SOA in the authority section gives (RFC 2308 §5: the smaller of its
/// TTL and its MINIMUM), and the SOA's owner.
fn negative_ttl(answer: &Message) -> (u32, String) {
    let [soa] = answer.name_servers() else {
        panic!("one SOA in the authority section: {answer:?}");
    };
    let RData::SOA(data) = soa.data() else {
        panic!("not an SOA: {soa:?}");
    };
    (soa.ttl().min(data.minimum()), soa.name().to_ascii())
}

#[test]
fn mx_a_and_aaaa_answers() {
    let dns = DnsServer::start();
    dns.mx("example.test", 10, "mx1.example.test", 300)
        .mx("example.test", 20, "mx2.example.test.", 600)
        .a("mx1.example.test", Ipv4Addr::new(127, 0, 0, 2), 120)
        .a("mx1.example.test", Ipv4Addr::new(127, 0, 0, 3), 120)
        .aaaa("mx1.example.test", Ipv6Addr::LOCALHOST, 90);

    let answer = udp(dns.addr(), 4242, "example.test.", RecordType::MX);
    assert_eq!(answer.response_code(), ResponseCode::NoError);
    assert_eq!(
        mx_of(&answer),
        vec![
            (10, "mx1.example.test.".to_owned(), 300),
            (20, "mx2.example.test.".to_owned(), 600)
        ]
    );
    assert!(answer.name_servers().is_empty());
    assert!(
        answer.extensions().is_none(),
        "no OPT for an EDNS-less query"
    );

    let answer = udp(dns.addr(), 1, "mx1.example.test.", RecordType::A);
    let addrs: Vec<_> = answer
        .answers()
        .iter()
        .map(|r| (r.data().clone(), r.ttl()))
        .collect();
    assert_eq!(
        addrs,
        vec![
            (RData::A(Ipv4Addr::new(127, 0, 0, 2).into()), 120),
            (RData::A(Ipv4Addr::new(127, 0, 0, 3).into()), 120)
        ]
    );
    let answer = tcp(dns.addr(), 2, "mx1.example.test.", RecordType::AAAA);
    assert_eq!(answer.answers().len(), 1);
    assert_eq!(
        answer.answers()[0].data(),
        &RData::AAAA(Ipv6Addr::LOCALHOST.into())
    );
    assert_eq!(answer.answers()[0].ttl(), 90);

    // Names are matched without case; the answer spells the owner as the question did.
    let answer = udp(dns.addr(), 3, "EXAMPLE.Test.", RecordType::MX);
    assert_eq!(mx_of(&answer).len(), 2);
    assert_eq!(answer.answers()[0].name().to_ascii(), "EXAMPLE.Test.");
}

#[test]
fn edns_queries_get_an_opt_back() {
    let dns = DnsServer::start();
    dns.mx("example.test", 10, "mx.example.test", 300);
    let bytes = query(77, "example.test.", RecordType::MX, true);
    let answer = udp_exchange(dns.addr(), &bytes, ANSWER_WAIT).expect("answer");
    check_echo(&answer, 77, "example.test.", RecordType::MX);
    let edns = answer.extensions().as_ref().expect("OPT in the answer");
    assert_eq!(edns.version(), 0);
    assert_eq!(mx_of(&answer).len(), 1);
}

#[test]
fn null_mx() {
    let dns = DnsServer::start();
    dns.null_mx("nomail.test");
    let answer = udp(dns.addr(), 9, "nomail.test.", RecordType::MX);
    assert_eq!(answer.response_code(), ResponseCode::NoError);
    let mx = mx_of(&answer);
    assert_eq!(mx.len(), 1);
    assert_eq!((mx[0].0, mx[0].1.as_str()), (0, "."));
}

#[test]
fn nxdomain_with_soa() {
    let dns = DnsServer::start();
    dns.mx("example.test", 10, "mx.example.test", 300)
        .nxdomain("gone.test")
        .negative_ttl(45);
    for name in [
        "gone.test.",
        "never-mentioned.test.",
        "deep.under.example.test.",
    ] {
        let answer = udp(dns.addr(), 5, name, RecordType::MX);
        assert_eq!(answer.response_code(), ResponseCode::NXDomain, "{name}");
        assert!(answer.answers().is_empty());
        assert_eq!(negative_ttl(&answer), (45, "test.".to_owned()), "{name}");
    }
    // A name that had records can be taken back.
    dns.nxdomain("example.test");
    let answer = udp(dns.addr(), 6, "example.test.", RecordType::MX);
    assert_eq!(answer.response_code(), ResponseCode::NXDomain);
    // And given records again.
    dns.mx("example.test", 5, "mx.example.test", 300);
    let answer = udp(dns.addr(), 7, "example.test.", RecordType::MX);
    assert_eq!(answer.response_code(), ResponseCode::NoError);
    assert_eq!(mx_of(&answer).len(), 1);
}

#[test]
fn nodata_with_soa() {
    let dns = DnsServer::start();
    dns.mx("example.test", 10, "mx.sub.example.test", 300);
    dns.a("mx.sub.example.test", Ipv4Addr::new(127, 0, 0, 2), 300);
    // Known name, other type; a name with something under it; the top-level domain itself.
    for (name, rtype) in [
        ("example.test.", RecordType::A),
        ("mx.sub.example.test.", RecordType::AAAA),
        ("sub.example.test.", RecordType::MX),
        ("test.", RecordType::MX),
    ] {
        let answer = udp(dns.addr(), 11, name, rtype);
        assert_eq!(
            answer.response_code(),
            ResponseCode::NoError,
            "{name} {rtype}"
        );
        assert!(answer.answers().is_empty(), "{name} {rtype}");
        assert_eq!(
            negative_ttl(&answer),
            (NEGATIVE_TTL_DEFAULT_S, "test.".to_owned())
        );
    }
}

#[test]
fn servfail_n_times_then_answers() {
    let dns = DnsServer::start();
    dns.mx("flaky.test", 10, "mx.flaky.test", 300)
        .servfail("flaky.test", 2);
    for id in 0..2 {
        let answer = udp(dns.addr(), id, "flaky.test.", RecordType::MX);
        assert_eq!(answer.response_code(), ResponseCode::ServFail);
        assert!(answer.answers().is_empty());
    }
    let answer = tcp(dns.addr(), 3, "flaky.test.", RecordType::MX);
    assert_eq!(answer.response_code(), ResponseCode::NoError);
    assert_eq!(mx_of(&answer).len(), 1);
    assert_eq!(dns.queries("flaky.test", RecordType::MX), 3);
}

#[test]
fn truncated_over_udp_then_full_over_tcp() {
    let dns = DnsServer::start();
    dns.mx("big.test", 10, "mx.big.test", 300)
        .truncate("big.test");
    let answer = udp(dns.addr(), 21, "big.test.", RecordType::MX);
    assert!(answer.truncated(), "TC set over UDP");
    assert!(answer.answers().is_empty());
    let answer = tcp(dns.addr(), 22, "big.test.", RecordType::MX);
    assert!(!answer.truncated());
    assert_eq!(mx_of(&answer).len(), 1);
    assert_eq!(dns.queries("big.test", RecordType::MX), 2);
    assert_eq!(dns.tcp_queries("big.test", RecordType::MX), 1);

    // `clear` ends the truncation (and the records).
    dns.clear("big.test").mx("big.test", 1, "mx.big.test", 300);
    let answer = udp(dns.addr(), 23, "big.test.", RecordType::MX);
    assert!(!answer.truncated());
    assert_eq!(mx_of(&answer).len(), 1);
}

#[test]
fn answers_too_big_for_udp_are_truncated_by_size() {
    let dns = DnsServer::start();
    // 40 A records are about 640 bytes: over 512, under the EDNS payload.
    for i in 0..40 {
        dns.a("many.test", Ipv4Addr::new(127, 0, 1, i), 300);
    }
    let plain = udp(dns.addr(), 31, "many.test.", RecordType::A);
    assert!(plain.truncated(), "over 512 bytes without EDNS");
    assert!(plain.answers().is_empty());

    let bytes = query(32, "many.test.", RecordType::A, true);
    let with_edns = udp_exchange(dns.addr(), &bytes, ANSWER_WAIT).expect("answer");
    assert!(!with_edns.truncated(), "fits the EDNS payload");
    assert_eq!(with_edns.answers().len(), 40);

    let full = tcp(dns.addr(), 33, "many.test.", RecordType::A);
    assert_eq!(full.answers().len(), 40);
}

#[test]
fn dropped_queries_get_no_answer() {
    let dns = DnsServer::start();
    dns.a("slow.test", Ipv4Addr::new(127, 0, 0, 2), 300)
        .drop_queries("slow.test", 1);
    let bytes = query(41, "slow.test.", RecordType::A, false);
    let answer = udp_unanswered(dns.addr(), &bytes, 42, "slow.test.");
    assert_eq!(answer.answers().len(), 1);

    // Over TCP the connection stays open and silent: the next query on it is answered first.
    // The server answers a connection's queries in order, one after another.
    dns.drop_queries("slow.test", 1);
    let mut stream = tcp_connect(dns.addr());
    tcp_send(&mut stream, &bytes);
    tcp_send(&mut stream, &query(43, "slow.test.", RecordType::A, false));
    let answer = tcp_read(&mut stream);
    assert_eq!(
        answer.id(),
        43,
        "the dropped query was answered: {answer:?}"
    );
    check_echo(&answer, 43, "slow.test.", RecordType::A);
    assert_eq!(dns.queries("slow.test", RecordType::A), 4);
}

#[test]
fn several_queries_on_one_tcp_connection() {
    let dns = DnsServer::start();
    dns.mx("one.test", 1, "mx.one.test", 300)
        .mx("two.test", 2, "mx.two.test", 300);
    let mut stream = tcp_connect(dns.addr());
    // Both sent before either answer is read (RFC 7766 §6.2.1.1 pipelining).
    tcp_send(&mut stream, &query(51, "one.test.", RecordType::MX, false));
    tcp_send(&mut stream, &query(52, "two.test.", RecordType::MX, true));
    let first = tcp_read(&mut stream);
    check_echo(&first, 51, "one.test.", RecordType::MX);
    assert_eq!(mx_of(&first)[0].0, 1);
    let second = tcp_read(&mut stream);
    check_echo(&second, 52, "two.test.", RecordType::MX);
    assert_eq!(mx_of(&second)[0].0, 2);
}

#[test]
fn garbage_is_ignored_and_the_server_goes_on() {
    let dns = DnsServer::start();
    dns.mx("example.test", 10, "mx.example.test", 300);
    // Each piece of junk is followed by a query, which must be the first thing answered.
    let mut probes = 0;
    for (id, junk) in (70..).zip([&b""[..], b"\x00", b"not a dns message at all", &[0xff; 600]]) {
        udp_unanswered(dns.addr(), junk, id, "example.test.");
        probes += 1;
    }
    // A response sent to the server is not a query either.
    let mut response = Message::from_vec(&query(60, "example.test.", RecordType::MX, false))
        .expect("decode our own query");
    response.set_message_type(MessageType::Response);
    let bytes = response.to_vec().expect("encode");
    udp_unanswered(dns.addr(), &bytes, 74, "example.test.");
    probes += 1;

    // TCP garbage closes that connection only.
    let mut stream = tcp_connect(dns.addr());
    tcp_send(&mut stream, b"garbage");
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    assert!(rest.is_empty(), "no answer to garbage over TCP");
    // And a connection that sends half a frame and goes away harms nothing.
    let mut half = tcp_connect(dns.addr());
    half.write_all(&[0, 40, 1, 2]).expect("write");
    drop(half);

    assert_eq!(
        dns.total_queries(),
        probes,
        "garbage is not counted, only the queries after it"
    );
    let answer = udp(dns.addr(), 61, "example.test.", RecordType::MX);
    assert_eq!(mx_of(&answer).len(), 1);
    let answer = tcp(dns.addr(), 62, "example.test.", RecordType::MX);
    assert_eq!(mx_of(&answer).len(), 1);
}

#[test]
fn counts_by_name_and_type() {
    let dns = DnsServer::start();
    dns.mx("example.test", 10, "mx.example.test", 300).a(
        "mx.example.test",
        Ipv4Addr::new(127, 0, 0, 2),
        300,
    );
    udp(dns.addr(), 1, "example.test.", RecordType::MX);
    udp(dns.addr(), 2, "Example.TEST.", RecordType::MX);
    tcp(dns.addr(), 3, "example.test.", RecordType::MX);
    udp(dns.addr(), 4, "mx.example.test.", RecordType::A);
    udp(dns.addr(), 5, "mx.example.test.", RecordType::AAAA);
    udp(dns.addr(), 6, "unknown.test.", RecordType::MX);

    for name in ["example.test", "example.test.", "EXAMPLE.test"] {
        assert_eq!(dns.queries(name, RecordType::MX), 3, "{name}");
    }
    assert_eq!(dns.tcp_queries("example.test", RecordType::MX), 1);
    assert_eq!(dns.queries("example.test", RecordType::A), 0);
    assert_eq!(dns.queries("mx.example.test", RecordType::A), 1);
    assert_eq!(dns.queries("mx.example.test", RecordType::AAAA), 1);
    assert_eq!(dns.queries("unknown.test", RecordType::MX), 1);
    assert_eq!(dns.total_queries(), 6);
    dns.reset_counts();
    assert_eq!(dns.total_queries(), 0);
    assert_eq!(
        mx_of(&udp(dns.addr(), 7, "example.test.", RecordType::MX)).len(),
        1,
        "the zone stays"
    );
}

#[test]
fn the_zone_changes_while_it_runs() {
    let dns = DnsServer::start();
    dns.mx("moving.test", 10, "old.moving.test", 300);
    let answer = udp(dns.addr(), 1, "moving.test.", RecordType::MX);
    assert_eq!(mx_of(&answer)[0].1, "old.moving.test.");
    dns.clear("moving.test")
        .mx("moving.test", 10, "new.moving.test", 60);
    let answer = udp(dns.addr(), 2, "moving.test.", RecordType::MX);
    assert_eq!(
        mx_of(&answer),
        vec![(10, "new.moving.test.".to_owned(), 60)]
    );
}

/// What epoxi's own answer parser makes of this server's answers: the harness speaks what the
/// MTA understands.
#[test]
fn epoxi_reads_the_answers_as_meant() {
    use epoxi::dns::message::{build_query, parse_answer, Answer};

    let dns = DnsServer::start();
    dns.mx("example.test", 10, "mx.example.test", 300)
        .null_mx("nomail.test")
        .a("mx.example.test", Ipv4Addr::new(127, 0, 0, 2), 120)
        .servfail("flaky.test", 1)
        .truncate("big.test")
        .negative_ttl(30);
    let ask = |id: u16, name: &str, rtype: RecordType| {
        let bytes = build_query(id, name, rtype).expect("query");
        let answer = udp_exchange(dns.addr(), &bytes, ANSWER_WAIT).expect("answer");
        parse_answer(id, &answer.to_vec().expect("encode"), rtype).expect("parses")
    };
    assert_eq!(
        ask(1, "example.test", RecordType::MX),
        Answer::Mx(vec![(10, "mx.example.test".into())], 300)
    );
    assert_eq!(
        ask(2, "nomail.test", RecordType::MX),
        Answer::Mx(vec![(0, String::new())], 300)
    );
    assert_eq!(
        ask(3, "mx.example.test", RecordType::A),
        Answer::Addrs(vec![Ipv4Addr::new(127, 0, 0, 2).into()], 120)
    );
    assert_eq!(ask(4, "missing.test", RecordType::MX), Answer::NxDomain(30));
    assert_eq!(
        ask(5, "mx.example.test", RecordType::AAAA),
        Answer::NoData(30)
    );
    assert!(matches!(
        ask(6, "flaky.test", RecordType::MX),
        Answer::Transient(_)
    ));
    assert_eq!(ask(7, "big.test", RecordType::MX), Answer::Truncated);
}

#[test]
fn drop_stops_the_server_and_frees_its_port() {
    let dns = DnsServer::start();
    dns.a("example.test", Ipv4Addr::new(127, 0, 0, 2), 300);
    let addr = dns.addr();
    // A TCP client still connected must not hold the server up.
    let _client = tcp_connect(addr);
    udp(addr, 1, "example.test.", RecordType::A);
    drop(dns);
    UdpSocket::bind(addr).expect("the UDP port is free again");
    TcpListener::bind(addr).expect("the TCP port is free again");
    // Nothing answers there now: a connected socket is told so at once (the ICMP port
    // unreachable), with no wait for silence.
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind client socket");
    socket
        .set_read_timeout(Some(ANSWER_WAIT))
        .expect("read timeout");
    socket.connect(addr).expect("connect the client socket");
    socket
        .send(&query(2, "example.test.", RecordType::A, false))
        .expect("send query");
    let mut buf = [0u8; 512];
    let refused = socket
        .recv(&mut buf)
        .expect_err("an answer from a dropped server");
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
}

#[test]
fn servers_run_side_by_side() {
    let one = DnsServer::start();
    let two = DnsServer::start();
    assert_ne!(one.addr(), two.addr());
    one.a("host.test", Ipv4Addr::new(127, 0, 0, 2), 300);
    let answer = udp(two.addr(), 1, "host.test.", RecordType::A);
    assert_eq!(answer.response_code(), ResponseCode::NXDomain);
    assert_eq!(one.total_queries(), 0);
    assert_eq!(two.queries("host.test", RecordType::A), 1);
}
