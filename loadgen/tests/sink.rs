//! The sink as a test harness sees it: the real binary on loopback, clients connecting from
//! chosen loopback addresses, and the JSON line it prints at exit.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};

use common::{Running, DEADLINE};
use serde_json::json;
use socket2::{Domain, Socket, Type};

/// A sink listening on `listen`, killed when dropped.
fn start_sink(listen: &str) -> Running {
    Running::start(&["sink", "--listen", listen])
}

/// A connection to `server` from `from` (port picked by the kernel), greeted.
fn connect_from(from: &str, server: SocketAddr) -> BufReader<TcpStream> {
    let from: IpAddr = from.parse().expect("client address");
    let socket = Socket::new(Domain::for_address(server), Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::new(from, 0).into())
        .expect("bind the client address");
    socket
        .connect_timeout(&server.into(), DEADLINE)
        .expect("connect to the sink");
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut conn = BufReader::new(stream);
    assert!(read_reply(&mut conn).starts_with("220 "), "greeting");
    conn
}

fn read_reply(conn: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    conn.read_line(&mut line).expect("read a reply");
    line
}

fn quit(mut conn: BufReader<TcpStream>) {
    conn.get_mut().write_all(b"QUIT\r\n").expect("write QUIT");
    assert!(read_reply(&mut conn).starts_with("221 "), "QUIT answered");
}

#[test]
fn report_names_the_peers() {
    let sink = start_sink("127.0.0.1:0");
    for from in ["127.0.0.2", "127.0.0.3", "127.0.0.2"] {
        quit(connect_from(from, sink.addr));
    }
    let report = sink.stop();
    assert_eq!(report["peers"], json!({"127.0.0.2": 2, "127.0.0.3": 1}));
    assert_eq!(report["connections"], 3);
    // The fields that were there before are still there.
    for key in [
        "received",
        "unique",
        "duplicates",
        "elapsed_s",
        "msgs_per_s",
        "rcpts",
        "tempfailed",
        "rejected",
    ] {
        assert!(report.get(key).is_some(), "{key} in {report}");
    }
}

#[test]
fn report_counts_connections_open_at_once() {
    let sink = start_sink("127.0.0.1:0");
    // All three are greeted, so all three are being served, before any goes away.
    let conns: Vec<_> = ["127.0.0.2", "127.0.0.3", "127.0.0.3"]
        .iter()
        .map(|from| connect_from(from, sink.addr))
        .collect();
    for conn in conns {
        quit(conn);
    }
    let report = sink.stop();
    assert_eq!(report["connections_max_concurrent"], 3);
    assert_eq!(report["connections"], 3);
    assert_eq!(report["peers"], json!({"127.0.0.2": 1, "127.0.0.3": 2}));
}

#[test]
fn report_names_ipv6_peers() {
    let sink = start_sink("[::1]:0");
    quit(connect_from("::1", sink.addr));
    let report = sink.stop();
    assert_eq!(report["peers"], json!({"::1": 1}));
    assert_eq!(report["connections_max_concurrent"], 1);
}

#[test]
fn an_idle_sink_reports_no_peers() {
    let sink = start_sink("127.0.0.1:0");
    let report = sink.stop();
    assert_eq!(report["peers"], json!({}));
    assert_eq!(report["connections_max_concurrent"], 0);
    assert_eq!(report["connections"], 0);
}
