//! The harness pieces MX tests stand on, tested on their own: several sinks sharing one port
//! on different loopback addresses, and the flags `Epoxi::try_start` passes.

mod common;

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;

use common::dns::DnsServer;
use common::{sinks_on_shared_port, Opts, Smtp};

/// The value after `flag` in `args`, if the flag is there.
fn flag_value(args: &[OsString], flag: &str) -> Option<String> {
    let at = args.iter().position(|a| a == flag)?;
    Some(args.get(at + 1)?.to_str()?.to_owned())
}

#[test]
fn sinks_share_one_port_on_several_addresses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ips = ["127.0.0.2", "127.0.0.3", "[::1]"];
    let (port, sinks) = sinks_on_shared_port(dir.path(), &ips, &[]);
    assert_eq!(sinks.len(), 3);
    let want: Vec<IpAddr> = ["127.0.0.2", "127.0.0.3", "::1"]
        .iter()
        .map(|ip| ip.parse().expect("ip"))
        .collect();
    for (sink, ip) in sinks.iter().zip(&want) {
        assert_eq!(sink.addr, SocketAddr::new(*ip, port));
        assert_eq!(sink.port, port);
    }
    // Each address reaches its own sink: one connection each, from where we connected.
    for sink in &sinks {
        let mut smtp = Smtp::from_stream(TcpStream::connect(sink.addr).expect("connect"));
        assert_eq!(smtp.reply().code, 220);
        smtp.expect("QUIT", 221);
    }
    for (sink, ip) in sinks.into_iter().zip(&want) {
        let report = sink.stop();
        assert_eq!(report.count("connections"), 1);
        // The kernel picks the source address (127.0.0.1 for any 127/8 target): a loopback
        // address of the sink's family.
        let peers = report.json["peers"].as_object().expect("peers");
        assert_eq!(peers.len(), 1, "{peers:?}");
        let (peer, n) = peers.iter().next().expect("one peer");
        let peer: IpAddr = peer.parse().expect("peer address");
        assert!(
            peer.is_loopback() && peer.is_ipv4() == ip.is_ipv4(),
            "{peer} for {ip}"
        );
        assert_eq!(n, 1);
    }
}

#[test]
fn epoxi_always_gets_a_loopback_resolver() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = Opts::new(dir.path()).serve_args(Path::new("epoxi.toml"));
    let resolver: SocketAddr = flag_value(&args, "--resolver")
        .expect("--resolver passed without one configured")
        .parse()
        .expect("IP:PORT");
    assert!(resolver.ip().is_loopback(), "{resolver}");
    assert_eq!(flag_value(&args, "--delivery-port"), None);
}

#[test]
fn epoxi_gets_the_resolver_and_delivery_port_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dns = DnsServer::start();
    let args = Opts::new(dir.path())
        .resolver(dns.addr())
        .delivery_port(2525)
        .route(2626)
        .serve_args(Path::new("epoxi.toml"));
    assert_eq!(
        flag_value(&args, "--resolver"),
        Some(dns.addr().to_string())
    );
    assert_eq!(
        flag_value(&args, "--delivery-port").as_deref(),
        Some("2525")
    );
    assert_eq!(
        flag_value(&args, "--route").as_deref(),
        Some("*.test=127.0.0.1:2626")
    );
    assert_eq!(flag_value(&args, "--config").as_deref(), Some("epoxi.toml"));
}
