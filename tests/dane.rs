//! DANE (RFC 7672) end to end: the harness DNS server answers with the AD bit (as a local
//! validating unbound would) and publishes TLSA records for MX hosts on 127.0.0.1; the MX is a
//! second Epoxi whose STARTTLS certificate is self-signed (DANE-EE needs no CA).

mod common;

use std::net::Ipv4Addr;
use std::path::Path;

use common::dns::DnsServer;
use common::tlspeers::{sha256, TestCa};
use common::{message_body, Epoxi, Opts, Sink, Smtp};

const TTL: u32 = 300;
const LOOPBACK: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

struct World {
    dns: DnsServer,
    b: Epoxi,
    sink: Sink,
}

/// B presents a certificate whose key is `spki`; g.test's MX has a matching `3 1 1` record,
/// h.test's MX a record for another key.
fn world(dir: &Path, secure: bool) -> World {
    let ca = TestCa::new("unused CA");
    let mx = ca.issue(dir, "mx", &["mx.dane.test", "mx2.dane.test"]);
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
    let dns = DnsServer::start();
    dns.secure(secure);
    dns.mx("g.test", 10, "mx.dane.test", TTL)
        .mx("h.test", 10, "mx2.dane.test", TTL)
        .a("mx.dane.test", LOOPBACK, TTL)
        .a("mx2.dane.test", LOOPBACK, TTL)
        .tlsa(
            &format!("_{}._tcp.mx.dane.test", b.port),
            3,
            1,
            1,
            sha256(&mx.spki_der),
            TTL,
        )
        .tlsa(
            &format!("_{}._tcp.mx2.dane.test", b.port),
            3,
            1,
            1,
            sha256(b"some other key"),
            TTL,
        );
    World { dns, b, sink }
}

fn sender(dir: &Path, w: &World, extra: &[(&str, &str)]) -> Epoxi {
    let mut opts = Opts::new(dir)
        .resolver(w.dns.addr())
        .delivery_port(w.b.port)
        .log_dir(dir.join("a-log"))
        .set("queue", "retry_base_ms", "300")
        .set("queue", "retry_cap_ms", "300");
    for (k, v) in extra {
        opts = opts.set("delivery", k, v);
    }
    Epoxi::start(&opts)
}

fn send(epoxi: &Epoxi, rcpt: &str, id: &str) {
    let mut smtp = Smtp::connect(epoxi.port);
    assert_eq!(smtp.reply().code, 220);
    smtp.expect("EHLO client.test", 250);
    let reply = smtp.send_message("s@x.test", &[rcpt.to_owned()], &message_body(id, &[]));
    assert_eq!(reply.code, 250, "{reply:?}");
    smtp.expect("QUIT", 221);
}

#[test]
fn matching_tlsa_delivers_and_a_mismatch_defers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = world(dir.path(), true);
    let mut a = sender(dir.path(), &w, &[]);
    send(&a, "r@g.test", "dane-g");
    send(&a, "r@h.test", "dane-h");
    let delivered = a.wait_events("Delivery", 1);
    assert_eq!(delivered[0]["domain"], "g.test", "{}", delivered[0]);
    assert_eq!(delivered[0]["tls_policy"], "dane", "{}", delivered[0]);
    assert_eq!(delivered[0]["tls_verified"], true, "{}", delivered[0]);
    assert_eq!(delivered[0]["tls_policy_type"], "tlsa", "{}", delivered[0]);
    let deferred = a.wait_events("TransientFailure", 1);
    assert_eq!(deferred[0]["domain"], "h.test", "{}", deferred[0]);
    assert_eq!(deferred[0]["tls_result"], "tlsa-invalid", "{}", deferred[0]);
    assert!(
        a.events_of("Delivery")
            .iter()
            .all(|e| e["domain"] != "h.test"),
        "a TLSA mismatch must never deliver"
    );
    a.stop();
    let World { mut b, sink, .. } = w;
    b.stop();
    assert_eq!(sink.stop().ids, vec!["dane-g".to_owned()]);
}

#[test]
fn without_the_ad_bit_or_with_dane_off_tlsa_is_ignored() {
    for (secure, extra) in [(false, None), (true, Some(("dane", "false")))] {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = world(dir.path(), secure);
        let extra: Vec<(&str, &str)> = extra.into_iter().collect();
        let mut a = sender(dir.path(), &w, &extra);
        send(&a, "r@h.test", "plain-h");
        let delivered = a.wait_events("Delivery", 1);
        assert_eq!(
            delivered[0]["tls_policy"], "opportunistic",
            "{}",
            delivered[0]
        );
        assert_eq!(
            delivered[0]["tls_policy_type"], "no-policy-found",
            "{}",
            delivered[0]
        );
        a.stop();
        let World { mut b, sink, .. } = w;
        b.stop();
        assert_eq!(sink.stop().ids, vec!["plain-h".to_owned()]);
    }
}
