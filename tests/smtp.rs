//! The SMTP server as a client sees it over a real socket. The state machine has its own unit
//! tests; these check the adapter: replies in order, bodies as spooled, relay policy, and a
//! graceful stop that finishes the transaction in flight.

mod common;

use std::thread;
use std::time::Duration;

use common::{dead_port, find, message_body, Epoxi, Opts, Reply, Sink, Smtp, DEADLINE};

#[test]
fn smtp_basics_over_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Nothing to deliver to: the message stays in the spool, where the test reads it.
    let epoxi = Epoxi::start(&Opts::new(dir.path()).route(dead_port()));
    let mut smtp = Smtp::connect(epoxi.port);

    let greeting = smtp.reply();
    assert_eq!(greeting.code, 220, "{}", greeting.text);
    assert!(greeting.text.contains("mx.epoxi.test"), "{}", greeting.text);
    let ehlo = smtp.expect("EHLO client.test", 250);
    for extension in ["PIPELINING", "SIZE", "8BITMIME", "ENHANCEDSTATUSCODES"] {
        assert!(
            ehlo.text.lines().any(|l| l[4..].starts_with(extension)),
            "EHLO lacks {extension}:\n{}",
            ehlo.text
        );
    }

    let early = smtp.expect("RCPT TO:<user@d0.test>", 503);
    assert!(early.text.starts_with("503 5.5.1"), "{}", early.text);
    let big = smtp.expect("MAIL FROM:<sender@client.test> SIZE=999999999999", 552);
    assert!(big.text.starts_with("552 5.3.4"), "{}", big.text);

    // One write, four commands: four replies, in order.
    smtp.send(
        b"MAIL FROM:<sender@client.test>\r\nRCPT TO:<a@d0.test>\r\n\
          RCPT TO:<b@d1.test>\r\nDATA\r\n",
    );
    let codes: Vec<u16> = (0..4).map(|_| smtp.reply().code).collect();
    assert_eq!(codes, [250, 250, 250, 354]);

    // Body, final dot and the next command in one write too. The body has a line that starts
    // with a dot and one that is a lone dot: both go on the wire stuffed.
    let id = format!("basics-{}", std::process::id());
    let marker = format!(".leading-dot-{id}");
    let body = message_body(&id, &[&marker, "."]);
    assert!(body.contains(&format!("\r\n.{marker}\r\n..\r\n")));
    smtp.send(format!("{body}.\r\nQUIT\r\n").as_bytes());
    let queued = smtp.reply();
    assert_eq!(queued.code, 250, "{}", queued.text);
    assert_eq!(smtp.reply().code, 221);

    // 250 means durable: the spool holds the body, dot-unstuffed.
    let spooled = epoxi
        .segments()
        .iter()
        .map(|p| std::fs::read(p).expect("read segment"))
        .find(|bytes| find(bytes, id.as_bytes()).is_some())
        .expect("the message is in a segment");
    let unstuffed = format!("\r\n{marker}\r\n.\r\nBye.\r\n");
    assert!(
        find(&spooled, unstuffed.as_bytes()).is_some(),
        "body not unstuffed in the spool"
    );
    assert!(
        find(&spooled, format!(".{marker}").as_bytes()).is_none(),
        "stuffed dot spooled"
    );
}

#[test]
fn relay_denied_outside_relay_networks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Opts::new(dir.path()).route(dead_port()).set(
        "server",
        "relay_networks",
        "[\"10.0.0.0/8\"]",
    );
    let epoxi = Epoxi::start(&opts);
    let mut smtp = Smtp::connect(epoxi.port);
    assert_eq!(smtp.reply().code, 220);
    smtp.expect("EHLO client.test", 250);
    smtp.expect("MAIL FROM:<sender@client.test>", 250);
    let denied = smtp.expect("RCPT TO:<user@d0.test>", 550);
    assert!(denied.text.starts_with("550 5.7.1"), "{}", denied.text);
    // No recipient, no transaction (RFC 2920 suggests 554, RFC 5321 allows 503).
    let data = smtp.cmd("DATA");
    assert!(
        matches!(data.code, 503 | 554),
        "DATA with no recipient: {}",
        data.text
    );
    smtp.expect("QUIT", 221);
    assert!(epoxi.events_of("Reception").is_empty());
}

#[test]
fn graceful_shutdown_mid_session() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut epoxi = Epoxi::start(&Opts::new(dir.path()).route(dead_port()));
    let mut smtp = Smtp::connect(epoxi.port);
    assert_eq!(smtp.reply().code, 220);
    smtp.expect("EHLO client.test", 250);
    smtp.expect("MAIL FROM:<sender@client.test>", 250);
    smtp.expect("RCPT TO:<user@d0.test>", 250);
    smtp.expect("DATA", 354);
    let id = format!("graceful-{}", std::process::id());
    let body = message_body(&id, &["first half", "second half"]);
    let (first, second) = body.split_at(body.find("second half").expect("marker"));
    smtp.send(first.as_bytes());

    epoxi.sigterm();
    // Let the shards see the signal and stop accepting before the body is finished.
    common::wait_until("epoxi to stop accepting", DEADLINE, || {
        match std::net::TcpStream::connect(epoxi.addr()) {
            Err(_) => true,
            Ok(probe) => {
                // A shard still accepting answers 220; one shutting down says 421 or closes.
                let mut probe = Smtp::from_stream(probe);
                !matches!(probe.try_reply(), Some(r) if r.code == 220)
            }
        }
    });
    thread::sleep(Duration::from_millis(100));
    smtp.send(second.as_bytes());
    smtp.send(b".\r\n");
    let queued = smtp.reply();
    assert_eq!(
        queued.code, 250,
        "the transaction in flight must finish: {}",
        queued.text
    );
    // Then the session ends: 421 (possibly before we ask anything) or a close.
    let _ = smtp.try_send(b"NOOP\r\n");
    match smtp.try_reply() {
        None => {}
        Some(r) => assert_eq!(r.code, 421, "after shutdown: {}", r.text),
    }
    let status = epoxi.wait_exit();
    assert!(status.success(), "exit {status}:\n{}", epoxi.stderr());
    assert!(
        epoxi.stderr().contains("epoxi: stopped cleanly"),
        "{}",
        epoxi.stderr()
    );

    // The message it acknowledged while stopping is delivered after a restart.
    let sink = Sink::start(dir.path(), &[]);
    let opts = Opts::new(dir.path())
        .route(sink.port)
        .log_dir(dir.path().join("log2"));
    let mut again = Epoxi::start(&opts);
    assert_eq!(again.pending_at_start(), 1, "{}", again.stderr());
    again.wait_events("Delivery", 1);
    again.stop();
    let report = sink.stop();
    assert_eq!(report.ids, [id]);
}

#[test]
fn size_limit_enforced_on_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Opts::new(dir.path())
        .route(dead_port())
        .set("server", "size_max", "4096");
    let epoxi = Epoxi::start(&opts);
    let mut smtp = Smtp::connect(epoxi.port);
    assert_eq!(smtp.reply().code, 220);
    let ehlo = smtp.expect("EHLO client.test", 250);
    assert!(ehlo.text.contains("SIZE 4096"), "{}", ehlo.text);
    // No SIZE= declared: the limit is enforced on the body itself, and the session goes on.
    let filler = "x".repeat(70);
    let lines = vec![filler.as_str(); 100];
    let big = message_body("too-big", &lines);
    let rcpts = ["user@d0.test".to_owned()];
    let refused = smtp.send_message("sender@client.test", &rcpts, &big);
    assert_eq!(refused.code, 552, "{}", refused.text);
    let fits = smtp.send_message("sender@client.test", &rcpts, &message_body("fits", &[]));
    assert_eq!(fits.code, 250, "{}", fits.text);
    smtp.expect("QUIT", 221);
    common::wait_until("the accepted message logged", DEADLINE, || {
        epoxi.events_of("Reception").len() == 1
    });
}

#[test]
fn idle_client_times_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Opts::new(dir.path())
        .route(dead_port())
        .set("server", "command_timeout_s", "1");
    let epoxi = Epoxi::start(&opts);
    let mut smtp = Smtp::connect(epoxi.port);
    assert_eq!(smtp.reply().code, 220);
    smtp.expect("EHLO client.test", 250);
    let bye = smtp.reply();
    assert!(bye.text.starts_with("421 4.4.2"), "{}", bye.text);
    assert!(smtp.try_reply().is_none(), "closed after the 421");
}

#[test]
fn connections_over_the_limit_get_421() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Opts::new(dir.path())
        .route(dead_port())
        .set("server", "connections_max", "1");
    let epoxi = Epoxi::start(&opts);
    let mut first = Smtp::connect(epoxi.port);
    assert_eq!(first.reply().code, 220);
    let mut second = Smtp::connect(epoxi.port);
    let busy = second.reply();
    assert!(busy.text.starts_with("421 4.7.0"), "{}", busy.text);
    first.expect("QUIT", 221);
    drop(first);
    // The slot is free again once the first session has ended.
    common::wait_until("a new session to be greeted", DEADLINE, || {
        Smtp::connect(epoxi.port)
            .try_reply()
            .is_some_and(|r| r.code == 220)
    });
}

#[test]
fn sigterm_with_idle_session() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut epoxi = Epoxi::start(&Opts::new(dir.path()).route(dead_port()));
    let mut smtp = Smtp::connect(epoxi.port);
    assert_eq!(smtp.reply().code, 220);
    smtp.expect("EHLO client.test", 250);
    epoxi.sigterm();
    // An idle session is told, without waiting for the grace period or a command.
    let bye = smtp.try_reply();
    assert!(
        matches!(&bye, None | Some(Reply { code: 421, .. })),
        "{bye:?}"
    );
    let status = epoxi.wait_exit();
    assert!(status.success(), "exit {status}:\n{}", epoxi.stderr());
    assert!(
        epoxi.stderr().contains("epoxi: stopped cleanly"),
        "{}",
        epoxi.stderr()
    );
}

#[test]
fn sigterm_abandons_stalled_transaction_after_grace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Opts::new(dir.path())
        .route(dead_port())
        .set("server", "shutdown_grace_s", "1");
    let mut epoxi = Epoxi::start(&opts);
    let mut smtp = Smtp::connect(epoxi.port);
    assert_eq!(smtp.reply().code, 220);
    smtp.expect("EHLO client.test", 250);
    smtp.expect("MAIL FROM:<sender@client.test>", 250);
    smtp.expect("RCPT TO:<user@d0.test>", 250);
    smtp.expect("DATA", 354);
    smtp.send(b"Subject: never finished\r\n\r\nhalf a body\r\n");
    // The client stalls for good; the grace period bounds the stop.
    epoxi.sigterm();
    let status = epoxi.wait_exit();
    assert!(status.success(), "exit {status}:\n{}", epoxi.stderr());
    assert!(
        epoxi.stderr().contains("epoxi: stopped cleanly"),
        "{}",
        epoxi.stderr()
    );
    // Nothing was acknowledged, so nothing may be delivered later.
    let _ = smtp.try_send(b".\r\n");
    let late = smtp.try_reply();
    assert!(
        !matches!(&late, Some(Reply { code: 250, .. })),
        "250 after exit: {late:?}"
    );
    let mut again = Epoxi::start(&opts.log_dir(dir.path().join("log2")));
    assert_eq!(again.pending_at_start(), 0, "{}", again.stderr());
    again.stop();
}

#[test]
fn pipelined_messages_and_split_terminators() {
    let dir = tempfile::tempdir().expect("tempdir");
    let epoxi = Epoxi::start(&Opts::new(dir.path()).route(dead_port()));
    let mut smtp = Smtp::connect(epoxi.port);
    assert_eq!(smtp.reply().code, 220);
    smtp.expect("EHLO client.test", 250);

    // Two whole transactions in two writes: the second starts right after the first's dot.
    let pid = std::process::id();
    let (one, two) = (format!("pipe-one-{pid}"), format!("pipe-two-{pid}"));
    let envelope = "MAIL FROM:<sender@client.test>\r\nRCPT TO:<user@d0.test>\r\nDATA\r\n";
    smtp.send(envelope.as_bytes());
    let codes: Vec<u16> = (0..3).map(|_| smtp.reply().code).collect();
    assert_eq!(codes, [250, 250, 354]);
    smtp.send(format!("{}.\r\n{envelope}", message_body(&one, &[".a"])).as_bytes());
    let codes: Vec<u16> = (0..4).map(|_| smtp.reply().code).collect();
    assert_eq!(
        codes,
        [250, 250, 250, 354],
        "the commands after the dot were lost"
    );

    // The body of the second one trickles in, split inside a stuffed dot and inside the
    // terminator.
    let marker = format!(".split-{pid}");
    let body = message_body(&two, &[&marker]);
    let stuffed_at = body.find(&format!("\r\n.{marker}")).expect("stuffed line") + 3;
    let (head, tail) = body.split_at(stuffed_at);
    for piece in [head, tail, "\r", "\n.", "\r", "\n"] {
        smtp.send(piece.as_bytes());
        thread::sleep(Duration::from_millis(30));
    }
    assert!(tail.ends_with("\r\n"));
    let done = smtp.reply();
    // The pieces above ended the body with CRLF CR LF "." CR LF: an empty line, then the dot.
    assert_eq!(done.code, 250, "{}", done.text);
    smtp.expect("QUIT", 221);

    common::wait_until("both messages logged", DEADLINE, || {
        epoxi.events_of("Reception").len() == 2
    });
    let spool: Vec<u8> = epoxi
        .segments()
        .iter()
        .flat_map(|p| std::fs::read(p).expect("read segment"))
        .collect();
    for id in [&one, &two] {
        assert!(find(&spool, id.as_bytes()).is_some(), "{id} not spooled");
    }
    let unstuffed = format!("\r\n{marker}\r\nBye.\r\n\r\n");
    assert!(
        find(&spool, unstuffed.as_bytes()).is_some(),
        "split body spooled wrong"
    );
    assert!(
        find(&spool, b"\r\n.a\r\nBye.\r\n").is_some(),
        "first body spooled wrong"
    );
}

#[test]
fn sigint_stops_cleanly_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut epoxi = Epoxi::start(&Opts::new(dir.path()).shards(2).route(dead_port()));
    epoxi.sigint();
    let status = epoxi.wait_exit();
    assert!(status.success(), "exit {status}:\n{}", epoxi.stderr());
    assert!(
        epoxi.stderr().contains("epoxi: stopped cleanly"),
        "{}",
        epoxi.stderr()
    );
    assert!(
        std::net::TcpStream::connect(epoxi.addr()).is_err(),
        "still listening"
    );
}

/// Every accepted message gets our Received header on top (RFC 5321 §4.4), naming the client's
/// EHLO name and address, the protocol, the id given in the 250 reply and the one recipient.
#[test]
fn received_header_is_prepended() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut epoxi = Epoxi::start(&Opts::new(dir.path()).route(dead_port()));
    let mut smtp = Smtp::connect(epoxi.port);
    assert_eq!(smtp.reply().code, 220);
    smtp.expect("EHLO client.test", 250);
    let body = message_body("received-1", &[]);
    let reply = smtp.send_message("a@x.test", &["b@d1.test".to_owned()], &body);
    assert_eq!(reply.code, 250, "{}", reply.text);
    let id = reply
        .text
        .rsplit(' ')
        .next()
        .expect("queued as <id>")
        .to_owned();
    smtp.expect("QUIT", 221);
    epoxi.stop();

    let spooled: Vec<u8> = epoxi
        .segments()
        .iter()
        .flat_map(|p| std::fs::read(p).expect("segment"))
        .collect();
    let want = format!(
        "Received: from client.test ([127.0.0.1])\r\n\tby mx.epoxi.test with ESMTP id {id}\r\n\tfor <b@d1.test>;"
    );
    let at = find(&spooled, want.as_bytes()).unwrap_or_else(|| panic!("no `{want}` in the spool"));
    // The header comes right before the message as the client sent it.
    let rest = &spooled[at..];
    let header_end = find(rest, b"+0000\r\n").expect("header date") + b"+0000\r\n".len();
    assert!(rest[header_end..].starts_with(b"From: <sender@client.test>"));
}

#[test]
fn per_ip_connection_and_per_connection_message_limits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut epoxi = Epoxi::start(
        &Opts::new(dir.path())
            .route(dead_port())
            .set("server", "connections_per_ip_max", "2")
            .set("server", "messages_per_connection_max", "1"),
    );
    let mut a = Smtp::connect(epoxi.port);
    assert_eq!(a.reply().code, 220);
    let mut b = Smtp::connect(epoxi.port);
    assert_eq!(b.reply().code, 220);
    let mut c = Smtp::connect(epoxi.port);
    let refused = c.reply();
    assert_eq!(refused.code, 421, "{}", refused.text);
    assert!(refused.text.contains("4.7.0"), "{}", refused.text);
    b.expect("QUIT", 221);
    drop(b);
    // The slot frees once the session ends.
    common::wait_until("a free connection slot", common::DEADLINE, || {
        let mut d = Smtp::connect(epoxi.port);
        d.reply().code == 220
    });

    // One message per connection: the second MAIL is told to reconnect.
    a.expect("EHLO client.test", 250);
    let reply = a.send_message(
        "a@x.test",
        &["b@d1.test".to_owned()],
        &message_body("m-1", &[]),
    );
    assert_eq!(reply.code, 250, "{}", reply.text);
    a.expect("MAIL FROM:<a@x.test>", 421);
    epoxi.stop();
}

#[test]
fn session_options_are_validated_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (key, value, named) in [
        ("bare_lf", "\"maybe\"", "server.bare_lf"),
        ("line_len_max", "100", "server.line_len_max"),
        (
            "connections_per_ip_max",
            "0",
            "server.connections_per_ip_max",
        ),
    ] {
        let ran = Epoxi::try_start(&Opts::new(dir.path()).set("server", key, value))
            .err()
            .expect("refused");
        assert!(ran.stderr.contains(named), "{key}: {}", ran.stderr);
    }
}

/// Slowloris: a client that keeps a transaction open by trickling commands is cut off when the
/// whole transaction takes longer than `server.transaction_timeout_s`, though no single wait
/// reaches the idle timeout.
#[test]
fn transaction_time_limit_stops_trickling_clients() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut epoxi = Epoxi::start(&Opts::new(dir.path()).route(dead_port()).set(
        "server",
        "transaction_timeout_s",
        "2",
    ));
    // A session without a transaction, open from before the trickling one starts: it is idle
    // for longer than the transaction limit by the time that one is cut off.
    let mut idle = Smtp::connect(epoxi.port);
    assert_eq!(idle.reply().code, 220);
    let idle_since = std::time::Instant::now();
    let mut c = Smtp::connect(epoxi.port);
    assert_eq!(c.reply().code, 220);
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<a@x.test>", 250);
    let started = std::time::Instant::now();
    let cut = loop {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let reply = c.cmd("NOOP");
        if reply.code != 250 {
            break reply;
        }
        assert!(started.elapsed() < common::DEADLINE, "never cut off");
    };
    assert_eq!(cut.code, 421, "{}", cut.text);
    assert!(cut.text.contains("4.4.2"), "{}", cut.text);
    // Idle sessions without a transaction are not affected by it.
    let idle_for = idle_since.elapsed();
    assert!(
        idle_for > std::time::Duration::from_secs(2),
        "idle for {idle_for:?} only: cut off before the transaction limit"
    );
    idle.expect("NOOP", 250);
    epoxi.stop();
}

/// Behind a load balancer: the client's address comes from the PROXY header (v1 here), and
/// relay control, limits and the log use it. Headers from untrusted peers, and connections
/// without a header, are refused.
#[test]
fn proxy_protocol_gives_the_real_client_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]);
    let mut epoxi = Epoxi::start(
        &Opts::new(dir.path())
            .route(sink.port)
            .set("server", "proxy_protocol", "true")
            // Only the proxied client's network may relay, not the proxy's own loopback.
            .set("server", "relay_networks", "[\"198.51.100.0/24\"]"),
    );
    let stream = std::net::TcpStream::connect(("127.0.0.1", epoxi.port)).expect("connect");
    let mut c = Smtp::from_stream(stream);
    c.send(b"PROXY TCP4 198.51.100.7 127.0.0.1 40001 25\r\n");
    assert_eq!(c.reply().code, 220);
    c.expect("EHLO client.test", 250);
    let reply = c.send_message(
        "a@x.test",
        &["b@d1.test".to_owned()],
        &message_body("proxied-1", &[]),
    );
    assert_eq!(
        reply.code, 250,
        "relay allowed for the proxied address: {}",
        reply.text
    );
    c.expect("QUIT", 221);
    let receptions = epoxi.wait_events("Reception", 1);
    assert_eq!(
        receptions[0]["peer"], "198.51.100.7:40001",
        "{}",
        receptions[0]
    );

    // A connection without a PROXY header is refused.
    let mut plain = Smtp::connect(epoxi.port);
    plain.send(b"EHLO client.test\r\n");
    let reply = plain.reply();
    assert_eq!(reply.code, 421, "{}", reply.text);
    epoxi.wait_events("Delivery", 1);
    epoxi.stop();
    assert_eq!(sink.stop().ids, vec!["proxied-1".to_owned()]);

    // Peers outside proxy_trusted are not believed.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let mut strict = Epoxi::start(
        &Opts::new(dir2.path())
            .set("server", "proxy_protocol", "true")
            .set("server", "proxy_trusted", "[\"192.0.2.0/24\"]"),
    );
    let mut c = Smtp::connect(strict.port);
    c.send(b"PROXY TCP4 198.51.100.7 127.0.0.1 40001 25\r\n");
    let reply = c.reply();
    assert_eq!(reply.code, 421, "{}", reply.text);
    assert!(reply.text.contains("trusted proxy"), "{}", reply.text);
    strict.stop();
}

/// The remaining abuse limits, each tripped over a real socket, each followed by a client that
/// is served normally: errors_max (421), over-long command lines (500 5.5.6), the recipient
/// limit (452 4.5.3), bare LF and NUL in message text when configured to refuse them (554 5.6.0).
#[test]
fn abuse_limits_trip_and_the_next_client_is_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut epoxi = Epoxi::start(
        &Opts::new(dir.path())
            .route(dead_port())
            .set("server", "errors_max", "3")
            .set("server", "bare_lf", "\"reject\"")
            .set("server", "nul", "\"reject\""),
    );
    let served_normally = |port: u16| {
        let mut c = Smtp::connect(port);
        assert_eq!(c.reply().code, 220);
        c.expect("EHLO next.test", 250);
        let reply = c.send_message(
            "a@x.test",
            &["b@d1.test".to_owned()],
            &message_body("ok", &[]),
        );
        assert_eq!(reply.code, 250, "{}", reply.text);
        c.expect("QUIT", 221);
    };

    // errors_max: the third bad command gets its reply, then 421 and the connection closes.
    let mut c = Smtp::connect(epoxi.port);
    assert_eq!(c.reply().code, 220);
    c.expect("BOGUS", 500);
    c.expect("BOGUS", 500);
    c.send(b"BOGUS\r\n");
    assert_eq!(c.reply().code, 500);
    let closing = c.reply();
    assert_eq!(closing.code, 421, "{}", closing.text);
    served_normally(epoxi.port);

    // Over-long command line: 500 5.5.6, and the session goes on.
    let mut c = Smtp::connect(epoxi.port);
    assert_eq!(c.reply().code, 220);
    let long = format!("EHLO {}", "h".repeat(5000));
    let reply = c.cmd(&long);
    assert_eq!(reply.code, 500, "{}", reply.text);
    assert!(reply.text.contains("5.5.6"), "{}", reply.text);
    c.expect("EHLO client.test", 250);

    // Recipient limit: the 101st RCPT gets 452 4.5.3; the message still goes to the first 100.
    c.expect("MAIL FROM:<a@x.test>", 250);
    for i in 0..100 {
        c.expect(&format!("RCPT TO:<r{i}@d1.test>"), 250);
    }
    let reply = c.cmd("RCPT TO:<r100@d1.test>");
    assert_eq!(reply.code, 452, "{}", reply.text);
    assert!(reply.text.contains("4.5.3"), "{}", reply.text);
    c.expect("RSET", 250);

    // Bare LF and NUL in message text, refused after the message is read to its end.
    for (what, body) in [
        ("bare LF", "Subject: x\r\n\r\nline\nwith bare LF\r\n"),
        ("NUL", "Subject: x\r\n\r\nnul \0 byte\r\n"),
    ] {
        c.expect("MAIL FROM:<a@x.test>", 250);
        c.expect("RCPT TO:<b@d1.test>", 250);
        c.expect("DATA", 354);
        c.send(body.as_bytes());
        c.send(b".\r\n");
        let reply = c.reply();
        assert_eq!(reply.code, 554, "{what}: {}", reply.text);
        assert!(reply.text.contains("5.6.0"), "{what}: {}", reply.text);
    }
    c.expect("NOOP", 250);
    c.expect("QUIT", 221);
    served_normally(epoxi.port);
    epoxi.stop();
}
