//! MTA-STS (RFC 8461) end to end: the harness DNS server publishes `_mta-sts` TXT records and
//! MX hosts on 127.0.0.1; a local HTTPS server (test CA) serves the policies; the MX is a
//! second Epoxi offering STARTTLS with a certificate from the test CA, relaying to a sink.

mod common;

use std::net::Ipv4Addr;
use std::path::Path;

use common::dns::DnsServer;
use common::tlspeers::{Issued, PolicyServer, TestCa};
use common::{message_body, Epoxi, Opts, Sink, Smtp};

const TTL: u32 = 300;
const LOOPBACK: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

/// The peers: DNS, the policy server, the MX (B, with `mx_cert`) and its sink.
struct World {
    dns: DnsServer,
    https: PolicyServer,
    ca_file: std::path::PathBuf,
    b: Epoxi,
    sink: Sink,
}

fn world(dir: &Path) -> World {
    let ca = TestCa::new("Epoxi Test CA");
    let ca_file = ca.write(&dir.join("ca.pem"));
    let mx: Issued = ca.issue(dir, "mx", &["mx.sts.test"]);
    let web = ca.issue(
        dir,
        "web",
        &[
            "mta-sts.a.test",
            "mta-sts.b.test",
            "mta-sts.c.test",
            "mta-sts.d.test",
            "mta-sts.f.test",
        ],
    );
    let sink = Sink::start(dir, &[]);
    let b = Epoxi::start(
        &Opts::new(&dir.join("b"))
            .route(sink.port)
            .log_dir(dir.join("b-log"))
            .set(
                "server",
                "tls_cert",
                &format!("\"{}\"", mx.cert_pem.display()),
            )
            .set(
                "server",
                "tls_key",
                &format!("\"{}\"", mx.key_pem.display()),
            ),
    );
    let https = PolicyServer::start(&web);
    let dns = DnsServer::start();
    for host in ["mx.sts.test", "wrong.sts.test", "evil.sts.test"] {
        dns.a(host, LOOPBACK, TTL);
    }
    World {
        dns,
        https,
        ca_file,
        b,
        sink,
    }
}

/// Publish an MTA-STS policy for `domain` with MX host `mx`.
fn publish(w: &World, domain: &str, mx: &str, policy: &str) {
    w.dns.mx(domain, 10, mx, TTL);
    w.dns
        .txt(&format!("_mta-sts.{domain}"), "v=STSv1; id=20240101", TTL);
    w.dns.a(&format!("mta-sts.{domain}"), LOOPBACK, TTL);
    w.https.policy(domain, policy);
}

fn enforce(mx: &str) -> String {
    format!("version: STSv1\r\nmode: enforce\r\nmx: {mx}\r\nmax_age: 86400\r\n")
}

/// Epoxi A: resolving with the harness, delivering to B, trusting the test CA.
fn sender_opts(dir: &Path, w: &World) -> Opts {
    Opts::new(dir)
        .resolver(w.dns.addr())
        .delivery_port(w.b.port)
        .log_dir(dir.join("a-log"))
        .set(
            "delivery",
            "tls_ca_file",
            &format!("\"{}\"", w.ca_file.display()),
        )
        .set(
            "delivery",
            "mta_sts_https_port",
            &w.https.addr.port().to_string(),
        )
        .set("queue", "retry_base_ms", "300")
        .set("queue", "retry_cap_ms", "300")
}

fn send(epoxi: &Epoxi, rcpts: &[&str], id: &str) {
    let mut smtp = Smtp::connect(epoxi.port);
    assert_eq!(smtp.reply().code, 220);
    smtp.expect("EHLO client.test", 250);
    let rcpts: Vec<String> = rcpts.iter().map(|s| s.to_string()).collect();
    let reply = smtp.send_message("s@x.test", &rcpts, &message_body(id, &[]));
    assert_eq!(reply.code, 250, "{reply:?}");
    smtp.expect("QUIT", 221);
}

fn for_domain<'a>(events: &'a [serde_json::Value], domain: &str) -> Vec<&'a serde_json::Value> {
    events.iter().filter(|e| e["domain"] == domain).collect()
}

#[test]
fn enforce_testing_mismatch_bad_certificate_and_no_leak_across_shared_mx() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world(dir.path());
    // a: enforce, MX allowed, certificate valid: delivered over verified TLS.
    publish(&w, "a.test", "mx.sts.test", &enforce("mx.sts.test"));
    // b: enforce, but its MX is not in the policy: deferred.
    publish(&w, "b.test", "mx.sts.test", &enforce("*.other.test"));
    // c: enforce, MX allowed, but the certificate is for mx.sts.test: deferred.
    publish(&w, "c.test", "wrong.sts.test", &enforce("wrong.sts.test"));
    // d: testing, same bad certificate: delivered, the failure recorded.
    publish(
        &w,
        "d.test",
        "wrong.sts.test",
        "version: STSv1\nmode: testing\nmx: wrong.sts.test\nmax_age: 86400\n",
    );
    // e: no policy, the same MX host as b (whose policy refuses it): delivered.
    w.dns.mx("e.test", 10, "mx.sts.test", TTL);

    let mut a = Epoxi::start(&sender_opts(dir.path(), &w));
    send(&a, &["r@a.test"], "sts-a");
    send(&a, &["r@b.test", "r@e.test"], "sts-be");
    send(&a, &["r@c.test"], "sts-c");
    send(&a, &["r@d.test"], "sts-d");

    let delivered = a.wait_events("Delivery", 3);
    let deferred = a.wait_events("TransientFailure", 2);
    let ev = for_domain(&delivered, "a.test");
    assert_eq!(ev.len(), 1, "{delivered:?}");
    assert_eq!(ev[0]["tls_policy"], "mta-sts", "{}", ev[0]);
    assert_eq!(ev[0]["tls_verified"], true, "{}", ev[0]);
    assert_eq!(ev[0]["tls_policy_type"], "sts", "{}", ev[0]);
    assert_eq!(ev[0]["tls_result"], "success", "{}", ev[0]);
    assert!(ev[0]["tls_version"]
        .as_str()
        .unwrap_or("")
        .starts_with("TLSv1_"));

    let ev = for_domain(&delivered, "d.test");
    assert_eq!(ev.len(), 1, "testing mode delivers: {delivered:?}");
    assert_eq!(ev[0]["tls_verified"], false, "{}", ev[0]);
    assert_eq!(
        ev[0]["tls_result"], "certificate-host-mismatch",
        "{}",
        ev[0]
    );
    assert_eq!(ev[0]["tls_policy_type"], "sts", "{}", ev[0]);

    let ev = for_domain(&delivered, "e.test");
    assert_eq!(ev.len(), 1, "b's policy must not apply to e: {delivered:?}");
    assert_eq!(ev[0]["tls_policy"], "opportunistic", "{}", ev[0]);
    assert_eq!(ev[0]["tls_policy_type"], "no-policy-found", "{}", ev[0]);
    assert_eq!(ev[0]["tls_policy_domain"], "e.test", "{}", ev[0]);

    let ev = for_domain(&deferred, "b.test");
    assert!(!ev.is_empty(), "{deferred:?}");
    let text = ev[0]["response"]["text"].as_str().unwrap_or("");
    assert!(text.contains("MTA-STS"), "{}", ev[0]);
    let ev = for_domain(&deferred, "c.test");
    assert!(!ev.is_empty(), "{deferred:?}");
    assert_eq!(
        ev[0]["tls_result"], "certificate-host-mismatch",
        "{}",
        ev[0]
    );
    assert_eq!(ev[0]["tls_policy_domain"], "c.test", "{}", ev[0]);
    for d in ["b.test", "c.test"] {
        assert!(
            for_domain(&a.events_of("Delivery"), d).is_empty(),
            "{d} must never be delivered"
        );
    }
    // The policy is kept in the spool dir.
    assert!(dir.path().join("spool/mta-sts/a.test.policy").exists());
    a.stop();
    let World { mut b, sink, .. } = w;
    b.stop();
    let ids = sink.stop().ids;
    for id in ["sts-a", "sts-be", "sts-d"] {
        assert!(ids.iter().any(|i| i == id), "{id} not delivered: {ids:?}");
    }
    assert!(!ids.iter().any(|i| i == "sts-c"), "{ids:?}");
}

#[test]
fn a_cached_policy_survives_a_restart_without_the_policy_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world(dir.path());
    publish(&w, "f.test", "mx.sts.test", &enforce("mx.sts.test"));
    let opts = sender_opts(dir.path(), &w);
    let mut a = Epoxi::start(&opts);
    send(&a, &["r@f.test"], "cached-1");
    let ev = a.wait_events("Delivery", 1);
    assert_eq!(ev[0]["tls_policy"], "mta-sts", "{}", ev[0]);
    a.stop();
    let World {
        dns,
        https,
        ca_file: _,
        mut b,
        sink,
    } = w;
    assert_eq!(https.fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
    https.stop();
    // The MX moves to a host the cached policy does not allow: after the restart the policy
    // (from the spool dir, the server being gone) still refuses it.
    dns.clear("f.test");
    dns.mx("f.test", 10, "evil.sts.test", TTL);
    let mut a = Epoxi::start(&opts);
    send(&a, &["r@f.test"], "cached-2");
    let deferred = a.wait_events("TransientFailure", 1);
    let text = deferred[0]["response"]["text"].as_str().unwrap_or("");
    assert!(text.contains("MTA-STS"), "{}", deferred[0]);
    assert_eq!(deferred[0]["tls_policy_type"], "sts", "{}", deferred[0]);
    a.stop();
    b.stop();
    let ids = sink.stop().ids;
    assert_eq!(ids, vec!["cached-1".to_owned()]);
}

#[test]
fn mta_sts_off_delivers_as_before() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world(dir.path());
    publish(&w, "b.test", "mx.sts.test", &enforce("*.other.test"));
    let mut a = Epoxi::start(&sender_opts(dir.path(), &w).set("delivery", "mta_sts", "false"));
    send(&a, &["r@b.test"], "off-1");
    let ev = a.wait_events("Delivery", 1);
    assert_eq!(ev[0]["tls_policy"], "opportunistic", "{}", ev[0]);
    assert_eq!(ev[0]["tls_policy_type"], "no-policy-found", "{}", ev[0]);
    assert_eq!(w.https.fetches.load(std::sync::atomic::Ordering::SeqCst), 0);
    a.stop();
    let World { mut b, sink, .. } = w;
    b.stop();
    assert_eq!(sink.stop().ids, vec!["off-1".to_owned()]);
}

#[test]
fn a_bad_https_port_is_a_config_error_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Opts::new(dir.path()).set("delivery", "mta_sts_https_port", "0");
    let ran = Epoxi::try_start(&opts).err().expect("refused");
    assert!(
        ran.stderr.contains("delivery.mta_sts_https_port"),
        "{}",
        ran.stderr
    );
}
