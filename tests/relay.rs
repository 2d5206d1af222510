//! Relaying: what goes in comes out at the destination, once, from the shards that own the
//! recipients' domains.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{field_set, message_body, Epoxi, Inject, Opts, Sink, Smtp};

#[test]
fn relay_many_domains_both_shards() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]);
    let epoxi = Epoxi::start(&Opts::new(dir.path()).shards(2).route(sink.port));

    let injected = Inject::new(400)
        .connections(4)
        .domains(10)
        .run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 400, "inject: {}", injected.json);
    assert_eq!(injected.ids.len(), 400);

    let deliveries = epoxi.wait_events("Delivery", 400);
    let report = sink.stop();
    assert_eq!(report.count("unique"), 400, "sink: {}", report.json);
    assert_eq!(report.count("duplicates"), 0, "sink: {}", report.json);
    let sent: BTreeSet<&String> = injected.ids.iter().collect();
    let got: BTreeSet<&String> = report.ids.iter().collect();
    assert_eq!(sent, got, "the sink got other messages than were accepted");

    // The log tells the same story: 400 receptions, 400 deliveries of 400 distinct messages,
    // with both shards delivering their own domains.
    let deliveries_now = epoxi.events_of("Delivery");
    assert_eq!(deliveries_now.len(), 400, "more deliveries than messages");
    assert_eq!(epoxi.events_of("Reception").len(), 400);
    assert_eq!(field_set(&deliveries, "message_id").len(), 400);
    for d in &deliveries {
        assert_eq!(d["response"]["code"], 250, "{d}");
        assert_eq!(d["attempts"], 1, "{d}");
    }
    let shards: BTreeSet<u64> = deliveries
        .iter()
        .filter_map(|d| d["shard"].as_u64())
        .collect();
    assert_eq!(shards, BTreeSet::from([0, 1]), "both shards should deliver");
    // A domain belongs to exactly one shard.
    let mut owner: BTreeMap<String, u64> = BTreeMap::new();
    for d in &deliveries {
        let domain = d["domain"].as_str().expect("domain").to_owned();
        let shard = d["shard"].as_u64().expect("shard");
        assert_eq!(
            *owner.entry(domain.clone()).or_insert(shard),
            shard,
            "{domain} on two shards"
        );
    }
    assert_eq!(owner.len(), 10);
}

#[test]
fn multi_domain_message_split() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]);
    let epoxi = Epoxi::start(&Opts::new(dir.path()).shards(2).route(sink.port));

    // 6 domains, 3 recipients each; with 2 shards some domains land on each (checked below).
    let rcpts: Vec<String> = (0..6)
        .flat_map(|d| (0..3).map(move |u| format!("user{u}@d{d}.test")))
        .collect();
    let id = format!("multi-{}", std::process::id());
    let mut smtp = Smtp::connect(epoxi.port);
    assert_eq!(smtp.reply().code, 220);
    smtp.expect("EHLO client.test", 250);
    let done = smtp.send_message(
        "sender@client.test",
        &rcpts,
        &message_body(&id, &["Hello."]),
    );
    assert_eq!(done.code, 250, "{}", done.text);
    smtp.expect("QUIT", 221);

    let deliveries = epoxi.wait_events("Delivery", rcpts.len());
    let report = sink.stop();

    // Every recipient got the message exactly once, over several transactions that all carry
    // the same message.
    let mut delivered_to: Vec<String> = Vec::new();
    for line in &report.rcpt_lines {
        let mut words = line.split_whitespace();
        assert_eq!(
            words.next(),
            Some(id.as_str()),
            "transaction of another message: {line}"
        );
        delivered_to.extend(words.map(str::to_owned));
    }
    let mut expected = rcpts.clone();
    expected.sort();
    delivered_to.sort();
    assert_eq!(delivered_to, expected, "recipients as the sink saw them");
    assert!(
        report.rcpt_lines.len() >= 2,
        "one transaction per shard at least: {report:?}"
    );
    assert_eq!(report.count("unique"), 1);
    assert_eq!(
        report.count("duplicates") + 1,
        report.rcpt_lines.len() as u64
    );

    // One Delivery event per recipient, all for the one message id the client was given.
    assert_eq!(deliveries.len(), rcpts.len(), "{deliveries:?}");
    let logged: BTreeSet<String> = field_set(&deliveries, "recipient");
    assert_eq!(logged, rcpts.iter().cloned().collect::<BTreeSet<_>>());
    let ids = field_set(&deliveries, "message_id");
    assert_eq!(ids.len(), 1, "one message id across shards: {ids:?}");
    let queued_as = ids.iter().next().expect("an id");
    assert!(
        done.text.contains(queued_as.as_str()),
        "250 said {}, log says {queued_as}",
        done.text
    );
    let shards: BTreeSet<u64> = deliveries
        .iter()
        .filter_map(|d| d["shard"].as_u64())
        .collect();
    assert_eq!(
        shards,
        BTreeSet::from([0, 1]),
        "d0..d5.test should span both shards"
    );
    let receptions = epoxi.events_of("Reception");
    assert_eq!(receptions.len(), 2, "one copy per shard: {receptions:?}");
}

#[test]
fn mixed_replies_each_message_final_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &["--reply", "250:80,451:10,550:10"]);
    let epoxi = Epoxi::start(&Opts::new(dir.path()).shards(2).route(sink.port));

    let injected = Inject::new(200).connections(4).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 200, "inject: {}", injected.json);

    // Each message ends delivered or bounced; a 451 is retried until one of those.
    common::wait_until("200 messages final", common::DEADLINE, || {
        let events = epoxi.events();
        let finals = events
            .iter()
            .filter(|e| (e["type"] == "Delivery" || e["type"] == "Bounce") && e["sender"] != "");
        finals.count() >= 200
    });
    let report = sink.stop();
    // Bounce notices (from the null sender) are mail of their own; count the originals.
    let original = |kind: &str| -> Vec<serde_json::Value> {
        epoxi
            .events_of(kind)
            .into_iter()
            .filter(|e| e["sender"] != "")
            .collect()
    };
    let deliveries = original("Delivery");
    let bounces = original("Bounce");
    assert_eq!(deliveries.len() + bounces.len(), 200);
    let delivered = field_set(&deliveries, "message_id");
    let bounced = field_set(&bounces, "message_id");
    assert_eq!(
        delivered.len(),
        deliveries.len(),
        "a message delivered twice"
    );
    assert_eq!(bounced.len(), bounces.len(), "a message bounced twice");
    assert!(
        delivered.is_disjoint(&bounced),
        "a message both delivered and bounced"
    );
    assert!(
        !bounces.is_empty() && !deliveries.is_empty(),
        "the mix should give both"
    );
    for b in &bounces {
        assert_eq!(b["response"]["code"], 550, "{b}");
    }
    assert!(!epoxi.events_of("TransientFailure").is_empty());
    assert_eq!(
        report.count("unique"),
        deliveries.len() as u64,
        "sink: {}",
        report.json
    );
    assert_eq!(report.count("duplicates"), 0, "sink: {}", report.json);
    // The sink also refuses some of the bounce notices (they may still be in flight when it
    // stops), so its count is at least the originals' bounces.
    assert!(
        report.count("rejected") >= bounces.len() as u64,
        "sink: {}",
        report.json
    );
    assert!(epoxi.events_of("Expiration").is_empty());
}

#[test]
fn transaction_and_connection_limits_split_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]);
    let opts = Opts::new(dir.path())
        .route(sink.port)
        .set("delivery", "rcpts_per_transaction_max", "2")
        .set("delivery", "messages_per_connection_max", "3")
        .set("delivery", "connections_per_destination_max", "2");
    let epoxi = Epoxi::start(&opts);

    let rcpts: Vec<String> = (0..7).map(|u| format!("user{u}@d0.test")).collect();
    let id = format!("limits-{}", std::process::id());
    let mut smtp = Smtp::connect(epoxi.port);
    assert_eq!(smtp.reply().code, 220);
    smtp.expect("EHLO client.test", 250);
    let done = smtp.send_message("sender@client.test", &rcpts, &message_body(&id, &[]));
    assert_eq!(done.code, 250, "{}", done.text);
    smtp.expect("QUIT", 221);
    let injected = Inject::new(30).domains(3).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 30, "inject: {}", injected.json);

    epoxi.wait_events("Delivery", 37);
    let report = sink.stop();
    let mut seen: Vec<String> = Vec::new();
    for line in report.rcpt_lines.iter().filter(|l| l.starts_with(&id)) {
        let words: Vec<&str> = line.split_whitespace().skip(1).collect();
        assert!(
            words.len() <= 2,
            "more than 2 recipients in one transaction: {line}"
        );
        seen.extend(words.iter().map(|w| (*w).to_owned()));
    }
    seen.sort();
    assert_eq!(
        seen, rcpts,
        "each recipient once, in transactions of at most 2"
    );
    assert_eq!(report.count("unique"), 31, "sink: {}", report.json);
    // 4 transactions of the big message and 30 others, at most 3 per connection.
    let connections = report.count("connections");
    assert!(
        connections >= 34 / 3,
        "messages_per_connection_max ignored: {}",
        report.json
    );
}

#[test]
fn large_messages_rotate_and_free_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]);
    // Segments of 1 MiB hold three 300 KB messages: twelve messages need several.
    let opts = Opts::new(dir.path())
        .route(sink.port)
        .set("spool", "segment_size_max", "1048576");
    let mut epoxi = Epoxi::start(&opts);
    let injected = Inject::new(12).size(300_000).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 12, "inject: {}", injected.json);
    let deliveries = epoxi.wait_events("Delivery", 12);
    // The logged size is the message as spooled: what was sent plus our Received header.
    assert!(
        deliveries.iter().all(|d| {
            let size = d["size"].as_u64().unwrap_or(0);
            (300_000 + 60..300_000 + 512).contains(&size)
        }),
        "{deliveries:?}"
    );
    // Every message is final, so only the segment being written may remain.
    common::wait_until("delivered segments deleted", common::DEADLINE, || {
        epoxi.segments().len() <= 1
    });
    let current = epoxi.segments();
    let seq: u64 = current
        .first()
        .and_then(|p| p.file_stem()?.to_str()?.parse().ok())
        .expect("the current segment");
    assert!(
        seq >= 3,
        "3.6 MB in 1 MiB segments should rotate: {current:?}"
    );
    epoxi.stop();
    let report = sink.stop();
    assert_eq!(report.count("unique"), 12, "sink: {}", report.json);
    assert_eq!(report.count("duplicates"), 0, "sink: {}", report.json);

    let mut again = Epoxi::start(&opts.log_dir(dir.path().join("log2")));
    assert_eq!(again.pending_at_start(), 0, "{}", again.stderr());
    again.stop();
}

#[test]
fn event_log_rotation_keeps_every_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]);
    // 300 messages log ~600 lines of ~350 bytes: several 64 KiB files.
    let opts = Opts::new(dir.path())
        .route(sink.port)
        .set("log", "file_size_max", "65536");
    let mut epoxi = Epoxi::start(&opts);
    let injected = Inject::new(300).connections(4).run(dir.path(), epoxi.port);
    assert_eq!(injected.count("accepted"), 300, "inject: {}", injected.json);
    epoxi.wait_events("Delivery", 300);
    epoxi.stop();
    sink.stop();
    let files = std::fs::read_dir(&epoxi.log_dir).expect("log dir").count();
    assert!(files >= 2, "the log should have rotated");
    let receptions = epoxi.events_of("Reception");
    let deliveries = epoxi.events_of("Delivery");
    assert_eq!(receptions.len(), 300, "Reception lines lost in rotation");
    assert_eq!(deliveries.len(), 300, "Delivery lines lost in rotation");
    assert_eq!(field_set(&deliveries, "message_id").len(), 300);
}

/// The next hop advertises SIZE: a message over it bounces at once with a clear reason instead
/// of being sent and refused (or retried) over and over.
#[test]
fn destination_size_limit_bounces_without_sending() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]);
    let b = Epoxi::start(
        &Opts::new(&dir.path().join("b"))
            .route(sink.port)
            .log_dir(dir.path().join("b-log"))
            .set("server", "size_max", "2048"),
    );
    let a = Epoxi::start(
        &Opts::new(&dir.path().join("a"))
            .route(b.port)
            .log_dir(dir.path().join("a-log")),
    );
    let small = Inject::new(1).size(800).domains(1).run(dir.path(), a.port);
    let big = Inject::new(1).size(5000).domains(1).run(dir.path(), a.port);
    assert_eq!(small.count("accepted") + big.count("accepted"), 2);
    let bounces = a.wait_events("Bounce", 1);
    assert_eq!(bounces[0]["response"]["code"], 552, "{}", bounces[0]);
    let text = bounces[0]["response"]["text"].as_str().unwrap_or_default();
    assert!(text.contains("SIZE limit of 2048"), "{text}");
    b.wait_events("Delivery", 1);
    // B also receives A's bounce notice for the big one (null sender); count the originals.
    let originals = b
        .events_of("Reception")
        .into_iter()
        .filter(|r| r["sender"] != "")
        .count();
    assert_eq!(originals, 1, "the big one never reached B");
    let (mut a, mut b) = (a, b);
    a.stop();
    b.stop();
    assert_eq!(sink.stop().ids, small.ids);
}

/// SMTPUTF8 end to end: a UTF-8 address is relayed to a next hop that offers SMTPUTF8, and
/// bounced (553 5.6.7), never mangled, when the next hop does not.
#[test]
fn smtputf8_is_relayed_or_bounced_never_mangled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]); // offers no SMTPUTF8
    let b = Epoxi::start(
        &Opts::new(&dir.path().join("b"))
            .route(common::dead_port())
            .log_dir(dir.path().join("b-log")),
    );
    let mut conf = Opts::new(&dir.path().join("a")).log_dir(dir.path().join("a-log"));
    conf.conf.raw = format!(
        "[[route]]\ndomain = \"*.via-b.test\"\ntarget = \"127.0.0.1:{}\"\n\
         [[route]]\ndomain = \"*\"\ntarget = \"127.0.0.1:{}\"\n",
        b.port, sink.port
    );
    let a = Epoxi::start(&conf);
    let script = format!(
        r#"
import smtplib
s = smtplib.SMTP("127.0.0.1", {port}, timeout=20)
s.ehlo("client.test")
assert s.has_extn("smtputf8")
msg = "Subject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\n\r\nhallo\r\n".encode()
s.sendmail("absender@x.test", ["jürgen@bücher.via-b.test"], msg, mail_options=["SMTPUTF8"])
s.sendmail("absender@x.test", ["jürgen@bücher.test"], msg, mail_options=["SMTPUTF8"])
s.quit()
"#,
        port = a.port
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "smtplib: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Through B: the UTF-8 recipient arrives as it was sent.
    let at_b = b.wait_events("Reception", 1);
    assert_eq!(
        at_b[0]["recipients"][0], "jürgen@bücher.via-b.test",
        "{}",
        at_b[0]
    );
    // To the sink: bounced, with the reason.
    let bounces = a.wait_events("Bounce", 1);
    assert_eq!(bounces[0]["recipient"], "jürgen@bücher.test");
    assert_eq!(bounces[0]["response"]["code"], 553, "{}", bounces[0]);
    assert_eq!(
        bounces[0]["response"]["enhanced"], "5.6.7",
        "{}",
        bounces[0]
    );
    let (mut a, mut b) = (a, b);
    a.stop();
    b.stop();
    assert_eq!(sink.stop().count("received"), 0, "nothing reached the sink");
}
