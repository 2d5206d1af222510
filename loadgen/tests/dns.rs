//! The DNS server as a resolver sees it: the real binary on loopback, queries over UDP and TCP
//! built and read with hickory-proto, and the JSON line it prints at exit.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::{Command, Stdio};

use common::{Running, DEADLINE};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, RecordType};
use serde_json::json;

/// The zone bench/e2e.sh serves in MX mode, plus an IPv6 host and short negative TTLs.
fn start_bench_zone(listen: &str) -> Running {
    Running::start(&[
        "dns",
        "--listen",
        listen,
        "--mx",
        "*.test=10:mx.bench.test",
        "--a",
        "mx.bench.test=127.0.0.1",
        "--aaaa",
        "v6.bench.test=::1",
        "--ttl",
        "120",
        "--negative-ttl",
        "30",
    ])
}

fn query(id: u16, name: &str, rtype: RecordType) -> Vec<u8> {
    let mut message = Message::new();
    message
        .set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).expect("name"), rtype));
    message.to_vec().expect("encode the query")
}

fn udp_socket(server: SocketAddr) -> UdpSocket {
    let bind: SocketAddr = if server.is_ipv4() {
        "127.0.0.1:0".parse().expect("address")
    } else {
        "[::1]:0".parse().expect("address")
    };
    let socket = UdpSocket::bind(bind).expect("bind a UDP socket");
    socket.set_read_timeout(Some(DEADLINE)).expect("timeout");
    socket.connect(server).expect("connect the UDP socket");
    socket
}

fn ask_udp(server: SocketAddr, id: u16, name: &str, rtype: RecordType) -> Message {
    let socket = udp_socket(server);
    socket
        .send(&query(id, name, rtype))
        .expect("send the query");
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("an answer over UDP");
    Message::from_vec(&buf[..n]).expect("decode the answer")
}

fn send_tcp(stream: &mut TcpStream, id: u16, name: &str, rtype: RecordType) {
    let bytes = query(id, name, rtype);
    let len = u16::try_from(bytes.len()).expect("query length");
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    stream.write_all(&framed).expect("send the query");
}

fn read_tcp(stream: &mut TcpStream) -> Message {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).expect("an answer's length");
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).expect("an answer");
    Message::from_vec(&buf).expect("decode the answer")
}

fn connect_tcp(server: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&server, DEADLINE).expect("connect over TCP");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    stream
}

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

#[test]
fn answers_over_udp_and_tcp_and_reports_what_was_asked() {
    let dns = start_bench_zone("127.0.0.1:0");

    let answer = ask_udp(dns.addr, 101, "d0.test.", RecordType::MX);
    assert_eq!(answer.id(), 101);
    assert_eq!(answer.message_type(), MessageType::Response);
    assert!(answer.authoritative());
    assert_eq!(answer.response_code(), ResponseCode::NoError);
    assert_eq!(answer.queries()[0].name().to_ascii(), "d0.test.");
    assert_eq!(mx_of(&answer), [(10, "mx.bench.test.".into())]);
    assert_eq!(answer.answers()[0].ttl(), 120);

    // The sender's domain is covered by the glob too.
    let answer = ask_udp(dns.addr, 102, "loadgen.test.", RecordType::MX);
    assert_eq!(mx_of(&answer), [(10, "mx.bench.test.".into())]);

    // A known name without the type asked: NODATA, with the negative TTL.
    let answer = ask_udp(dns.addr, 103, "mx.bench.test.", RecordType::AAAA);
    assert_eq!(answer.response_code(), ResponseCode::NoError);
    assert!(answer.answers().is_empty());
    let soa = &answer.name_servers()[0];
    assert_eq!(soa.record_type(), RecordType::SOA);
    assert_eq!(soa.ttl(), 30);

    let answer = ask_udp(dns.addr, 104, "nobody.example.", RecordType::MX);
    assert_eq!(answer.response_code(), ResponseCode::NXDomain);
    assert!(answer.authoritative());

    // Garbage is not answered, and the server goes on.
    let socket = udp_socket(dns.addr);
    socket.send(b"not a DNS message").expect("send garbage");

    // Two queries on one TCP connection, sent before either answer is read.
    let mut stream = connect_tcp(dns.addr);
    send_tcp(&mut stream, 201, "mx.bench.test.", RecordType::A);
    send_tcp(&mut stream, 202, "d1.test.", RecordType::MX);
    let answer = read_tcp(&mut stream);
    assert_eq!(answer.id(), 201);
    assert!(answer.authoritative());
    assert_eq!(
        answer.answers()[0].data(),
        &RData::A(A(Ipv4Addr::LOCALHOST))
    );
    let answer = read_tcp(&mut stream);
    assert_eq!(answer.id(), 202);
    assert_eq!(mx_of(&answer), [(10, "mx.bench.test.".into())]);
    drop(stream);

    let answer = ask_udp(dns.addr, 105, "D0.TEST.", RecordType::MX);
    assert_eq!(answer.id(), 105);

    let report = dns.stop();
    assert_eq!(report["queries"], 7, "{report}");
    assert_eq!(report["udp"], 5);
    assert_eq!(report["tcp"], 2);
    assert_eq!(report["answered"], 5);
    assert_eq!(report["nodata"], 1);
    assert_eq!(report["nxdomain"], 1);
    assert_eq!(report["errors"], 0);
    assert_eq!(report["malformed"], 1);
    assert_eq!(
        report["names"],
        json!({
            "d0.test": {"MX": 2},
            "d1.test": {"MX": 1},
            "loadgen.test": {"MX": 1},
            "mx.bench.test": {"A": 1, "AAAA": 1},
            "nobody.example": {"MX": 1},
        })
    );
    assert_eq!(report["names_other"], 0);
}

#[test]
fn listens_on_ipv6_loopback() {
    let dns = start_bench_zone("[::1]:0");
    assert!(dns.addr.is_ipv6());
    let answer = ask_udp(dns.addr, 1, "v6.bench.test.", RecordType::AAAA);
    assert_eq!(answer.answers().len(), 1);
    let mut stream = connect_tcp(dns.addr);
    send_tcp(&mut stream, 2, "v6.bench.test.", RecordType::AAAA);
    assert_eq!(read_tcp(&mut stream).answers().len(), 1);
    drop(stream);
    let report = dns.stop();
    assert_eq!(report["names"], json!({"v6.bench.test": {"AAAA": 2}}));
}

#[test]
fn an_idle_server_reports_no_queries() {
    let report = start_bench_zone("127.0.0.1:0").stop();
    assert_eq!(report["queries"], 0);
    assert_eq!(report["names"], json!({}));
}

#[test]
fn a_bad_record_flag_is_refused_with_the_reason() {
    let out = Command::new(env!("CARGO_BIN_EXE_epoxi-loadgen"))
        .args(["dns", "--listen", "127.0.0.1:0", "--mx", "*.test"])
        .stdin(Stdio::null())
        .output()
        .expect("run epoxi-loadgen");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`*.test` is not GLOB=PREF:HOST"),
        "{stderr}"
    );
}
