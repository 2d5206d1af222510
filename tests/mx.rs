//! Real destinations: MX resolution against a real DNS server on loopback (the harness's
//! authoritative server), sinks on several 127.0.0.x addresses sharing one delivery port,
//! connection pools per site, egress sources and pools.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::dns::DnsServer;
use common::{message_body, sinks_on_shared_port, Epoxi, Inject, Opts, Smtp};
use hickory_proto::rr::RecordType;

const TTL: u32 = 300;

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

/// Epoxi resolving with `dns` and delivering to `port`, retrying fast.
fn opts(dir: &std::path::Path, dns: &DnsServer, port: u16) -> Opts {
    Opts::new(dir)
        .resolver(dns.addr())
        .delivery_port(port)
        .set("queue", "retry_base_ms", "300")
        .set("queue", "retry_cap_ms", "300")
}

/// Injects `inject`'s messages, all of which must be accepted, and waits until each one is
/// delivered; returns the Delivery events.
fn delivered(dir: &std::path::Path, epoxi: &Epoxi, inject: Inject) -> Vec<serde_json::Value> {
    let n = inject.messages;
    let injected = inject.run(dir, epoxi.port);
    assert_eq!(injected.count("accepted"), n, "{}", injected.json);
    epoxi.wait_events("Delivery", n as usize)
}

/// A host that greets every connection with `421` and closes it: a busy MX.
struct Busy {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Busy {
    fn start(ip: Ipv4Addr, port: u16) -> Busy {
        let listener = TcpListener::bind((ip, port)).expect("bind busy host");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (s, a) = (stop.clone(), accepted.clone());
        let thread = thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        a.fetch_add(1, Ordering::SeqCst);
                        let _ = stream.write_all(b"421 4.3.2 busy.example too busy\r\n");
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Busy {
            stop,
            accepted,
            thread: Some(thread),
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn delivers_to_the_most_preferred_mx() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, sinks) = sinks_on_shared_port(dir.path(), &["127.0.0.2", "127.0.0.3"], &[]);
    let dns = DnsServer::start();
    dns.mx("d0.test", 20, "backup.d0.test", TTL);
    dns.mx("d0.test", 10, "primary.d0.test", TTL);
    dns.a("primary.d0.test", ip(2), TTL);
    dns.a("backup.d0.test", ip(3), TTL);
    let epoxi = Epoxi::start(&opts(dir.path(), &dns, port));

    let deliveries = delivered(dir.path(), &epoxi, Inject::new(5).domains(1));
    for d in &deliveries {
        let peer = d["peer"].as_str().unwrap_or_default();
        assert_eq!(peer, format!("primary.d0.test[127.0.0.2]:{port}"), "{d}");
        assert_eq!(d["source"], "default", "{d}");
    }
    let mut sinks = sinks.into_iter();
    let (primary, backup) = (
        sinks.next().expect("sink").stop(),
        sinks.next().expect("sink").stop(),
    );
    assert_eq!(primary.count("unique"), 5, "{}", primary.json);
    assert_eq!(backup.count("unique"), 0, "{}", backup.json);
}

#[test]
fn refused_or_busy_mx_falls_back_within_the_attempt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, sinks) = sinks_on_shared_port(dir.path(), &["127.0.0.3"], &[]);
    let busy = Busy::start(ip(5), port);
    let dns = DnsServer::start();
    // Most preferred: a host greeting 421; then one refusing connections (nothing listens on
    // 127.0.0.4); then the sink.
    dns.mx("d0.test", 5, "busy.d0.test", TTL);
    dns.mx("d0.test", 10, "down.d0.test", TTL);
    dns.mx("d0.test", 20, "up.d0.test", TTL);
    dns.a("busy.d0.test", ip(5), TTL);
    dns.a("down.d0.test", ip(4), TTL);
    dns.a("up.d0.test", ip(3), TTL);
    let epoxi = Epoxi::start(&opts(dir.path(), &dns, port));

    let deliveries = delivered(dir.path(), &epoxi, Inject::new(3).domains(1));
    for d in &deliveries {
        assert_eq!(d["attempts"], 1, "delivered in the first attempt: {d}");
        assert!(d["peer"]
            .as_str()
            .unwrap_or_default()
            .starts_with("up.d0.test[127.0.0.3]"));
    }
    assert!(epoxi.events_of("TransientFailure").is_empty());
    assert!(busy.accepted() >= 1, "the busy host was tried first");
    let report = sinks.into_iter().next().expect("sink").stop();
    assert_eq!(report.count("unique"), 3, "{}", report.json);
}

#[test]
fn implicit_mx_and_static_routes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, sinks) = sinks_on_shared_port(dir.path(), &["127.0.0.2", "127.0.0.3"], &[]);
    let dns = DnsServer::start();
    // d0.test has no MX, only an address: it is its own mail host (RFC 5321 §5.1).
    dns.a("d0.test", ip(2), TTL);
    // d1.test has an MX, but a static route wins.
    dns.mx("d1.test", 10, "mx.d1.test", TTL);
    dns.a("mx.d1.test", ip(2), TTL);
    let mut sinks = sinks.into_iter();
    let (mx_sink, route_sink) = (sinks.next().expect("sink"), sinks.next().expect("sink"));
    let mut o = opts(dir.path(), &dns, port);
    o.conf.raw.push_str(&format!(
        "[[route]]\ndomain = \"d1.test\"\ntarget = \"127.0.0.3:{port}\"\n"
    ));
    let epoxi = Epoxi::start(&o);

    delivered(dir.path(), &epoxi, Inject::new(4).domains(2));
    let (mx, route) = (mx_sink.stop(), route_sink.stop());
    assert_eq!(
        mx.count("unique"),
        2,
        "d0.test via its A record: {}",
        mx.json
    );
    assert_eq!(
        route.count("unique"),
        2,
        "d1.test via the route: {}",
        route.json
    );
    assert_eq!(
        dns.queries("d1.test", RecordType::MX),
        0,
        "routes need no DNS"
    );
}

#[test]
fn null_mx_and_nxdomain_bounce() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, sinks) = sinks_on_shared_port(dir.path(), &["127.0.0.2"], &[]);
    let dns = DnsServer::start();
    dns.null_mx("d0.test");
    dns.nxdomain("d1.test");
    let epoxi = Epoxi::start(&opts(dir.path(), &dns, port));

    let injected = Inject::new(2).domains(2).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 2, "{}", injected.json);
    let bounces: Vec<_> = epoxi
        .wait_events("Bounce", 2)
        .into_iter()
        .filter(|b| b["domain"] != "loadgen.test")
        .collect();
    let by_domain = |d: &str| {
        bounces
            .iter()
            .find(|b| b["domain"] == d)
            .unwrap_or_else(|| panic!("no bounce for {d}: {bounces:?}"))
            .clone()
    };
    let null = by_domain("d0.test");
    assert_eq!(null["response"]["code"], 556, "{null}");
    assert_eq!(null["response"]["enhanced"], "5.1.10", "{null}");
    let nx = by_domain("d1.test");
    assert_eq!(nx["response"]["code"], 550, "{nx}");
    assert_eq!(nx["response"]["enhanced"], "5.1.2", "{nx}");
    assert!(epoxi.events_of("Delivery").is_empty());
    let report = sinks.into_iter().next().expect("sink").stop();
    assert_eq!(report.count("received"), 0, "{}", report.json);
}

/// Resolvers are tried in order: the first one is dead (nothing listens), the second answers.
#[test]
fn a_dead_resolver_fails_over_to_the_next() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, sinks) = sinks_on_shared_port(dir.path(), &["127.0.0.2"], &[]);
    let dns = DnsServer::start();
    dns.mx("d0.test", 10, "mx.d0.test", TTL);
    dns.a("mx.d0.test", ip(2), TTL);
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], common::dead_port()));
    let o = Opts::new(dir.path())
        .resolver(dead)
        .resolver(dns.addr())
        .delivery_port(port)
        .set("dns", "timeout_ms", "300");
    let epoxi = Epoxi::start(&o);

    let deliveries = delivered(dir.path(), &epoxi, Inject::new(3).domains(1));
    assert!(
        deliveries.iter().all(|d| d["attempts"] == 1),
        "{deliveries:?}"
    );
    assert!(epoxi.events_of("TransientFailure").is_empty());
    let report = sinks.into_iter().next().expect("sink").stop();
    assert_eq!(report.count("unique"), 3, "{}", report.json);
}

#[test]
fn servfail_is_retried_then_delivered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, sinks) = sinks_on_shared_port(dir.path(), &["127.0.0.2"], &[]);
    let dns = DnsServer::start();
    dns.mx("d0.test", 10, "mx.d0.test", TTL);
    dns.a("mx.d0.test", ip(2), TTL);
    // Every resolver attempt of the first lookup fails (2 attempts by default).
    dns.servfail("d0.test", 2);
    let epoxi = Epoxi::start(&opts(dir.path(), &dns, port));

    let deliveries = delivered(dir.path(), &epoxi, Inject::new(1).domains(1));
    let failures = epoxi.events_of("TransientFailure");
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0]["response"]["code"], 451, "{}", failures[0]);
    assert_eq!(
        failures[0]["response"]["enhanced"], "4.4.3",
        "{}",
        failures[0]
    );
    assert_eq!(deliveries[0]["attempts"], 2);
    let report = sinks.into_iter().next().expect("sink").stop();
    assert_eq!(report.count("unique"), 1, "{}", report.json);
}

#[test]
fn answers_are_cached_for_their_ttl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, sinks) = sinks_on_shared_port(dir.path(), &["127.0.0.2"], &[]);
    let dns = DnsServer::start();
    dns.mx("d0.test", 10, "mx.d0.test", 2);
    dns.a("mx.d0.test", ip(2), 2);
    let epoxi = Epoxi::start(&opts(dir.path(), &dns, port).set("dns", "ttl_min_s", "1"));

    let first = Inject::new(20)
        .connections(4)
        .domains(1)
        .run(dir.path(), epoxi.port);
    assert_eq!(first.count("accepted"), 20, "{}", first.json);
    epoxi.wait_events("Delivery", 20);
    assert_eq!(
        dns.queries("d0.test", RecordType::MX),
        1,
        "20 messages, one MX query"
    );
    assert_eq!(dns.queries("mx.d0.test", RecordType::A), 1);
    // Past the 2 s TTL the next message asks again.
    thread::sleep(Duration::from_millis(2500));
    let second = Inject::new(1).domains(1).run(dir.path(), epoxi.port);
    assert_eq!(second.count("accepted"), 1, "{}", second.json);
    epoxi.wait_events("Delivery", 21);
    assert_eq!(
        dns.queries("d0.test", RecordType::MX),
        2,
        "asked again after the TTL"
    );
    let report = sinks.into_iter().next().expect("sink").stop();
    assert_eq!(report.count("unique"), 21, "{}", report.json);
}

/// Two domains with the same MX hosts are one site: one shard, a limit of one connection for
/// the site, so both domains' mail goes over a single connection.
#[test]
fn domains_sharing_mx_hosts_share_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, sinks) = sinks_on_shared_port(dir.path(), &["127.0.0.2"], &[]);
    let dns = DnsServer::start();
    for d in ["d0.test", "d1.test"] {
        dns.mx(d, 10, "mx1.shared.test", TTL);
        dns.mx(d, 20, "mx2.shared.test", TTL);
    }
    dns.a("mx1.shared.test", ip(2), TTL);
    dns.a("mx2.shared.test", ip(2), TTL);
    // The limit comes from a [[site]] entry matching the MX hosts.
    let mut o = opts(dir.path(), &dns, port);
    o.conf.raw.push_str(
        "[[site]]\nmx = \"mx?.shared.test\"\nconnections_max = 1\nidle_timeout_ms = 3000\n",
    );
    let epoxi = Epoxi::start(&o);

    delivered(
        dir.path(),
        &epoxi,
        Inject::new(20).connections(4).domains(2),
    );
    let report = sinks.into_iter().next().expect("sink").stop();
    assert_eq!(report.count("unique"), 20, "{}", report.json);
    assert_eq!(
        report.count("connections"),
        1,
        "one pool for the site: {}",
        report.json
    );
}

/// A site spanning shards keeps its limit: domains owned by different shards, same MX, a
/// limit of one connection: never two at once at the sink.
#[test]
fn a_site_limit_holds_across_shards() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, sinks) = sinks_on_shared_port(dir.path(), &["127.0.0.2"], &["--delay-ms", "20"]);
    let dns = DnsServer::start();
    let domains: Vec<String> = (0..10).map(|i| format!("d{i}.test")).collect();
    let owners: BTreeSet<usize> = domains.iter().map(|d| shards::shard_of(d, 2)).collect();
    assert_eq!(owners.len(), 2, "the domains span both shards");
    for d in &domains {
        dns.mx(d, 10, "mx.shared.test", TTL);
    }
    dns.a("mx.shared.test", ip(2), TTL);
    let epoxi = Epoxi::start(
        &opts(dir.path(), &dns, port)
            .shards(2)
            .set("delivery", "connections_per_destination_max", "1")
            .set("delivery", "idle_timeout_ms", "100"),
    );

    delivered(
        dir.path(),
        &epoxi,
        Inject::new(40).connections(4).domains(10),
    );
    let report = sinks.into_iter().next().expect("sink").stop();
    assert_eq!(report.count("unique"), 40, "{}", report.json);
    assert_eq!(
        report.count("connections_max_concurrent"),
        1,
        "the site's limit held: {}",
        report.json
    );
}

const SOURCES: &str = r#"
[egress]
default_pool = "main"
[[source]]
name = "s7"
address = "127.0.0.7"
ehlo = "s7.epoxi.test"
[[source]]
name = "s8"
address = "127.0.0.8"
[[source]]
name = "unbindable"
address = "192.0.2.1"
[[pool]]
name = "main"
sources = ["s7"]
[[pool]]
name = "flaky"
sources = ["unbindable:10", "s8:1"]
[[pool]]
name = "tenant"
sources = ["s8"]
[[pool_rule]]
sender_domain = "flaky.example"
pool = "flaky"
[[pool_rule]]
tenant = "acme"
pool = "tenant"
"#;

#[test]
fn egress_sources_bind_and_pools_fall_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, sinks) = sinks_on_shared_port(dir.path(), &["127.0.0.2"], &[]);
    let dns = DnsServer::start();
    dns.mx("d0.test", 10, "mx.d0.test", TTL);
    dns.a("mx.d0.test", ip(2), TTL);
    let mut o = opts(dir.path(), &dns, port);
    o.conf.raw.push_str(SOURCES);
    let epoxi = Epoxi::start(&o);

    // Default pool: source s7, bound to 127.0.0.7.
    let plain = Inject::new(3).domains(1).run(dir.path(), epoxi.port);
    assert_eq!(plain.count("accepted"), 3, "{}", plain.json);
    epoxi.wait_events("Delivery", 3);
    // Sender rule: the flaky pool, whose heavier source cannot bind: it leaves rotation and
    // the pool falls back to s8.
    let mut smtp = Smtp::connect(epoxi.port);
    assert_eq!(smtp.reply().code, 220);
    smtp.expect("EHLO client.test", 250);
    for i in 0..3 {
        let body = message_body(&format!("flaky-{i}"), &[]);
        let reply = smtp.send_message("news@flaky.example", &["a@d0.test".into()], &body);
        assert_eq!(reply.code, 250, "{}", reply.text);
    }
    // Tenant rule: the header picks the pool.
    let body = format!("X-Tenant: ACME\r\n{}", message_body("tenant-0", &[]));
    let reply = smtp.send_message("x@shop.example", &["b@d0.test".into()], &body);
    assert_eq!(reply.code, 250, "{}", reply.text);
    smtp.expect("QUIT", 221);

    let deliveries = epoxi.wait_events("Delivery", 7);
    let sources: Vec<&str> = deliveries
        .iter()
        .map(|d| d["source"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        sources.iter().filter(|s| **s == "s7").count(),
        3,
        "{sources:?}"
    );
    assert_eq!(
        sources.iter().filter(|s| **s == "s8").count(),
        4,
        "{sources:?}"
    );
    assert!(epoxi.events_of("TransientFailure").is_empty());
    let stderr = epoxi.stderr();
    assert!(
        stderr.contains("egress source `unbindable` (192.0.2.1) out of rotation"),
        "{stderr}"
    );
    let report = sinks.into_iter().next().expect("sink").stop();
    assert_eq!(report.count("unique"), 7, "{}", report.json);
    let peers = &report.json["peers"];
    assert!(
        peers["127.0.0.7"].as_u64().unwrap_or(0) >= 1,
        "{}",
        report.json
    );
    assert!(
        peers["127.0.0.8"].as_u64().unwrap_or(0) >= 1,
        "{}",
        report.json
    );
    assert_eq!(
        peers.as_object().map(|m| m.len()),
        Some(2),
        "{}",
        report.json
    );
}

#[test]
fn ipv6_mx_hosts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, sinks) = sinks_on_shared_port(dir.path(), &["[::1]"], &[]);
    let dns = DnsServer::start();
    dns.mx("d0.test", 10, "mx6.d0.test", TTL);
    dns.aaaa("mx6.d0.test", Ipv6Addr::LOCALHOST, TTL);
    let epoxi = Epoxi::start(&opts(dir.path(), &dns, port));

    let deliveries = delivered(dir.path(), &epoxi, Inject::new(2).domains(1));
    assert_eq!(
        deliveries[0]["peer"].as_str().unwrap_or_default(),
        format!("mx6.d0.test[::1]:{port}")
    );
    let report = sinks.into_iter().next().expect("sink").stop();
    assert_eq!(report.count("unique"), 2, "{}", report.json);
}

/// The shards sharing a site take turns: with a limit of one connection and both shards'
/// queues full, the connection holding the slot hands it over after a run of messages instead
/// of keeping it until its own queue is empty (here, idle connections would stay 30 s).
#[test]
fn shards_take_turns_at_a_site_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, sinks) = sinks_on_shared_port(dir.path(), &["127.0.0.2"], &["--delay-ms", "2"]);
    let dns = DnsServer::start();
    for i in 0..10 {
        dns.mx(&format!("d{i}.test"), 10, "mx.shared.test", TTL);
    }
    dns.a("mx.shared.test", ip(2), TTL);
    let epoxi = Epoxi::start(
        &opts(dir.path(), &dns, port)
            .shards(2)
            .set("delivery", "connections_per_destination_max", "1")
            .set("delivery", "idle_timeout_ms", "30000"),
    );

    let mut deliveries = delivered(
        dir.path(),
        &epoxi,
        Inject::new(300).connections(4).domains(10),
    );
    deliveries.sort_by_key(|d| d["ts_ms"].as_u64().unwrap_or(0));
    let shard_of = |d: &serde_json::Value| d["shard"].as_u64().unwrap_or(9);
    let first = shard_of(&deliveries[0]);
    let last_of_first = deliveries.iter().rposition(|d| shard_of(d) == first);
    let first_of_other = deliveries.iter().position(|d| shard_of(d) != first);
    assert!(
        first_of_other.is_some() && first_of_other < last_of_first,
        "the other shard only got the site after shard {first} was done"
    );
    let report = sinks.into_iter().next().expect("sink").stop();
    assert_eq!(report.count("unique"), 300, "{}", report.json);
    assert_eq!(
        report.count("connections_max_concurrent"),
        1,
        "{}",
        report.json
    );
}

/// MX hosts of equal preference share the load: each connection tries them in a fresh order.
#[test]
fn equal_preference_mx_hosts_share_the_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, sinks) = sinks_on_shared_port(dir.path(), &["127.0.0.2", "127.0.0.3"], &[]);
    let dns = DnsServer::start();
    dns.mx("d0.test", 10, "a.mx.test", TTL);
    dns.mx("d0.test", 10, "b.mx.test", TTL);
    dns.a("a.mx.test", ip(2), TTL);
    dns.a("b.mx.test", ip(3), TTL);
    // One message per connection: 40 connections, each choosing its own order.
    let epoxi = Epoxi::start(&opts(dir.path(), &dns, port).set(
        "delivery",
        "messages_per_connection_max",
        "1",
    ));

    delivered(dir.path(), &epoxi, Inject::new(40).domains(1));
    let counts: Vec<u64> = sinks
        .into_iter()
        .map(|s| s.stop().count("unique"))
        .collect();
    assert_eq!(counts.iter().sum::<u64>(), 40, "{counts:?}");
    assert!(
        counts.iter().all(|&n| n > 0),
        "both hosts got mail: {counts:?}"
    );
}

/// A pool whose every source is unusable fails its mail transiently, saying why, and nothing
/// is sent from anywhere else.
#[test]
fn a_pool_without_usable_sources_defers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, sinks) = sinks_on_shared_port(dir.path(), &["127.0.0.2"], &[]);
    let dns = DnsServer::start();
    dns.mx("d0.test", 10, "mx.d0.test", TTL);
    dns.a("mx.d0.test", ip(2), TTL);
    let mut o = opts(dir.path(), &dns, port);
    o.conf.raw.push_str(
        "[egress]\ndefault_pool = \"broken\"\n\
         [[source]]\nname = \"unbindable\"\naddress = \"192.0.2.1\"\n\
         [[pool]]\nname = \"broken\"\nsources = [\"unbindable\"]\n",
    );
    let epoxi = Epoxi::start(&o);

    let injected = Inject::new(1).domains(1).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 1, "{}", injected.json);
    let failures = epoxi.wait_events("TransientFailure", 1);
    let text = failures[0]["response"]["text"].as_str().unwrap_or_default();
    assert!(
        text.contains("No usable source in egress pool `broken`"),
        "{}",
        failures[0]
    );
    assert!(epoxi.events_of("Delivery").is_empty());
    let report = sinks.into_iter().next().expect("sink").stop();
    assert_eq!(report.count("connections"), 0, "{}", report.json);
}
