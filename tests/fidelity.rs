//! Content fidelity end to end: what a client sends arrives at the next hop byte for byte,
//! apart from the Received header Epoxi puts on top. The next hop is aiosmtpd (PyPI, installed
//! by .ci/run), storing each message as received; it offers no PIPELINING, so Epoxi's
//! lock-step client path is what runs there. aiosmtpd has no CHUNKING, so BDAT and BINARYMIME
//! on the way out are checked against a second Epoxi, whose spool shows what it received.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Stored messages by their X-Fidelity-Id, with Epoxi's Received header taken off the top.
fn stored(dir: &Path) -> Vec<(String, Vec<u8>, String)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path: PathBuf = entry.path();
        if path.extension().is_some_and(|e| e == "eml") {
            let bytes = std::fs::read(&path).expect("read stored message");
            let envelope = std::fs::read_to_string(path.with_extension("env")).unwrap_or_default();
            assert!(
                bytes.starts_with(b"Received: from "),
                "Received header on top"
            );
            // The header and its continuation lines (starting with a tab).
            let mut at = 0;
            loop {
                let end = find(&bytes[at..], b"\r\n").expect("header line") + at + 2;
                at = end;
                if bytes.get(at) != Some(&b'\t') {
                    break;
                }
            }
            let body = bytes[at..].to_vec();
            let id = find(&body, b"X-Fidelity-Id: ")
                .map(|i| {
                    let rest = &body[i + 15..];
                    let end = find(rest, b"\r\n").unwrap_or(rest.len());
                    String::from_utf8_lossy(&rest[..end]).into_owned()
                })
                .unwrap_or_default();
            out.push((id, body, envelope));
        }
    }
    out
}

fn with_id(id: &str, text: &[u8]) -> Vec<u8> {
    let mut m = format!("X-Fidelity-Id: {id}\r\nSubject: fidelity\r\n\r\n").into_bytes();
    m.extend_from_slice(text);
    m
}

/// Dot-stuff for DATA (RFC 5321 §4.5.2).
fn stuffed(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 64);
    let mut line_start = true;
    for &b in message {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    out
}

/// The recipients the Notice lines `decisions` are about, in log order.
fn decided(decisions: &[Value]) -> Vec<&str> {
    decisions
        .iter()
        .flat_map(|n| n["recipients"].as_array().expect("recipients"))
        .map(|r| r.as_str().expect("recipient"))
        .collect()
}

/// The Notice lines about message `id` (its Reception's `message_id`).
fn notice_lines(epoxi: &Epoxi, id: &Value) -> Vec<Value> {
    epoxi
        .events_of("Notice")
        .into_iter()
        .filter(|n| &n["message_id"] == id)
        .collect()
}

/// The text of every message aiosmtpd stored in `dir`.
fn stored_notices(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
                .map(|e| {
                    String::from_utf8_lossy(&std::fs::read(e.path()).unwrap_or_default())
                        .into_owned()
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn messages_arrive_byte_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let port = dead_port();
    let _aiosmtpd = Aiosmtpd::start(port, &store);
    let mut epoxi = Epoxi::start(&Opts::new(dir.path()).shards(2).route(port));

    let eight_bit = with_id("8bit", "Grüße aus Köln, ça va? 日本語\r\n".as_bytes());
    let long_line = with_id(
        "998",
        &[&[b'x'; 998][..], b"\r\n", &[b'y'; 998][..], b"\r\n"].concat(),
    );
    let dots = with_id("dots", b".leading dot\r\n..two dots\r\n.\r\nend\r\n");
    let mut big_text = Vec::with_capacity(5 << 20);
    let mut i = 0u64;
    while big_text.len() < 5 << 20 {
        big_text.extend_from_slice(format!("{i:08} {}\r\n", "abcdefghij".repeat(6)).as_bytes());
        i += 1;
    }
    let big = with_id("5mb", &big_text);
    let bdat = with_id(
        "bdat",
        b"first chunk\r\n.\r\nsecond\r\nthird chunk, no final CRLF split ",
    );
    let bdat = [&bdat[..], b"here\r\n"].concat();
    let utf8 = with_id("utf8", "für jürgen\r\n".as_bytes());

    let mut c = Smtp::connect(epoxi.port);
    assert_eq!(c.reply().code, 220);
    c.expect("EHLO client.test", 250);
    let rcpt = |r: &str| vec![r.to_owned()];
    for (m, to) in [
        (&eight_bit, "a@d1.test"),
        (&long_line, "b@d2.test"),
        (&dots, "c@d3.test"),
        (&big, "d@d4.test"),
    ] {
        let reply = c.send_message("s@x.test", &rcpt(to), &String::from_utf8_lossy(&stuffed(m)));
        assert_eq!(reply.code, 250, "{}", reply.text);
    }
    // BDAT in three chunks, no dot-stuffing (RFC 3030).
    c.expect("MAIL FROM:<s@x.test> BODY=8BITMIME", 250);
    c.expect("RCPT TO:<e@d5.test>", 250);
    let (one, rest) = bdat.split_at(20);
    let (two, three) = rest.split_at(17);
    for (chunk, last) in [(one, false), (two, false), (three, true)] {
        let cmd = if last {
            format!("BDAT {} LAST\r\n", chunk.len())
        } else {
            format!("BDAT {}\r\n", chunk.len())
        };
        c.send(cmd.as_bytes());
        c.send(chunk);
        assert_eq!(c.reply().code, 250);
    }
    // SMTPUTF8 address, to a next hop that offers SMTPUTF8.
    c.expect("MAIL FROM:<s@x.test> SMTPUTF8", 250);
    c.expect("RCPT TO:<jürgen@bücher.test>", 250);
    c.expect("DATA", 354);
    c.send(&stuffed(&utf8));
    c.send(b".\r\n");
    assert_eq!(c.reply().code, 250);
    c.expect("QUIT", 221);

    epoxi.wait_events("Delivery", 6);
    let deadline = Instant::now() + DEADLINE;
    let mut got = stored(&store);
    while got.len() < 6 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        got = stored(&store);
    }
    epoxi.stop();
    assert_eq!(
        got.len(),
        6,
        "stored: {:?}",
        got.iter().map(|g| &g.0).collect::<Vec<_>>()
    );
    for (id, want) in [
        ("8bit", &eight_bit),
        ("998", &long_line),
        ("dots", &dots),
        ("5mb", &big),
        ("bdat", &bdat),
        ("utf8", &utf8),
    ] {
        let (_, body, envelope) = got
            .iter()
            .find(|g| g.0 == id)
            .unwrap_or_else(|| panic!("{id} not stored"));
        assert!(
            body == want,
            "{id}: {} bytes stored, {} sent",
            body.len(),
            want.len()
        );
        if id == "utf8" {
            assert!(envelope.contains("jürgen@bücher.test"), "{envelope}");
        }
    }
}

/// DSN (RFC 3461/3464): RET, ENVID, NOTIFY and ORCPT are kept with the message and used in the
/// notices sent back to the sender (here stored by aiosmtpd).
#[test]
fn delivery_status_notifications_follow_the_dsn_parameters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("notices");
    let aio_port = dead_port();
    let _aiosmtpd = Aiosmtpd::start(aio_port, &store);
    let refusing = Sink::start(dir.path(), &["--reply", "550:100"]);
    let accepting = Sink::start(dir.path(), &[]);
    let mut opts = Opts::new(dir.path());
    opts.conf.raw = format!(
        "[[route]]\ndomain = \"notices.test\"\ntarget = \"127.0.0.1:{aio_port}\"\n\
         [[route]]\ndomain = \"refuses.test\"\ntarget = \"127.0.0.1:{}\"\n\
         [[route]]\ndomain = \"ok.test\"\ntarget = \"127.0.0.1:{}\"\n",
        refusing.port, accepting.port
    );
    let mut epoxi = Epoxi::start(&opts);
    let mut c = Smtp::connect(epoxi.port);
    assert_eq!(c.reply().code, 220);
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<s@notices.test> RET=HDRS ENVID=env-77", 250);
    c.expect(
        "RCPT TO:<r1@refuses.test> NOTIFY=FAILURE ORCPT=rfc822;orig1@refuses.test",
        250,
    );
    c.expect("RCPT TO:<r2@refuses.test> NOTIFY=NEVER", 250);
    c.expect("RCPT TO:<r3@ok.test> NOTIFY=SUCCESS,FAILURE", 250);
    c.expect("DATA", 354);
    c.send(b"X-Fidelity-Id: dsn\r\nSubject: dsn test\r\n\r\nsecret body text\r\n.\r\n");
    assert_eq!(c.reply().code, 250);
    c.expect("QUIT", 221);

    // No third notice (for NOTIFY=NEVER) may come. What proves it, with no wait to see: each
    // recipient's notice is decided once, with its outcome, and a Notice line is written once
    // the decision's notice is spooled (with the notice's id; none when none was needed). Once
    // every recipient's notice is decided and spooled, no other can be made for this message.
    let id = epoxi
        .wait_events("Reception", 1)
        .into_iter()
        .find(|r| r["sender"] == "s@notices.test")
        .expect("the message's Reception")["message_id"]
        .clone();
    // The two failures come from one attempt and are decided together: one line naming both,
    // with the id of the one notice spooled, which reports r1 and leaves r2 (NOTIFY=NEVER) out.
    let failed = ["r1@refuses.test", "r2@refuses.test"];
    let mut failures: Vec<Value> = Vec::new();
    wait_until("the failures' notice decided", DEADLINE, || {
        failures = notice_lines(&epoxi, &id)
            .into_iter()
            .filter(|n| {
                decided(std::slice::from_ref(n))
                    .iter()
                    .all(|r| failed.contains(r))
            })
            .collect();
        decided(&failures).len() >= failed.len()
    });
    let mut covered = decided(&failures);
    covered.sort();
    assert_eq!(covered, failed, "each failure decided once: {failures:?}");
    for n in &failures {
        // Were r2 decided on its own, no notice would be needed.
        if decided(std::slice::from_ref(n)) == ["r2@refuses.test"] {
            assert!(n.get("notice_id").is_none(), "NOTIFY=NEVER: {n}");
        }
    }
    let failure_notice: BTreeSet<String> = field_set(&failures, "notice_id");
    assert_eq!(failure_notice.len(), 1, "one failure notice: {failures:?}");
    // The delivery to r3 is decided with its success notice: once that is stored, every
    // recipient's notice is decided and spooled. (r3's Notice line would say so too, but epoxi
    // does not always write it: see `every_notice_decision_is_logged`.)
    let failure_id = format!(
        "Message-ID: <{}@mx.epoxi.test>",
        failure_notice.first().expect("failure notice id")
    );
    let mut notices: Vec<String> = Vec::new();
    wait_until(
        "the failure and the success notice stored",
        DEADLINE,
        || {
            notices = stored_notices(&store);
            notices.iter().any(|n| n.contains(failure_id.as_str()))
                && notices.iter().any(|n| {
                    n.contains("Action: delivered")
                        && n.contains("Final-Recipient: rfc822; r3@ok.test")
                })
        },
    );
    epoxi.stop();
    // Stopped, nothing more arrives. Every notice epoxi spooled is a reception from the null
    // sender: the store holds exactly those, and the Notice lines name no other.
    let from_null: BTreeSet<String> = field_set(
        &epoxi
            .events_of("Reception")
            .into_iter()
            .filter(|r| r["sender"] == "")
            .collect::<Vec<_>>(),
        "message_id",
    );
    let notices = stored_notices(&store);
    let spooled: Vec<String> = from_null
        .iter()
        .map(|n| format!("Message-ID: <{n}@mx.epoxi.test>"))
        .collect();
    assert!(
        spooled
            .iter()
            .all(|m| notices.iter().any(|n| n.contains(m.as_str()))),
        "every notice spooled is stored: {spooled:?}"
    );
    assert_eq!(notices.len(), spooled.len(), "and no other: {notices:?}");
    let named = field_set(&notice_lines(&epoxi, &id), "notice_id");
    assert!(named.is_subset(&from_null), "{named:?} vs {from_null:?}");
    let count = notices.len();
    assert_eq!(
        count, 2,
        "a failure notice and a success notice: {notices:?}"
    );
    let failure = notices
        .iter()
        .find(|n| n.contains("Action: failed"))
        .expect("failure notice");
    let success = notices
        .iter()
        .find(|n| n.contains("Action: delivered"))
        .expect("success notice");
    for n in [failure, success] {
        assert!(n.contains("To: <s@notices.test>"), "{n}");
        assert!(n.contains("Original-Envelope-Id: env-77"), "{n}");
        assert!(
            n.contains("Content-Type: text/rfc822-headers"),
            "RET=HDRS: {n}"
        );
        assert!(n.contains("X-Fidelity-Id: dsn"), "{n}");
        assert!(
            !n.contains("secret body text"),
            "RET=HDRS returns no body: {n}"
        );
    }
    assert!(failure.contains("Original-Recipient: rfc822;orig1@refuses.test\r\nFinal-Recipient: rfc822; r1@refuses.test"), "{failure}");
    assert!(failure.contains("Status: 5.1.1"), "{failure}");
    assert!(
        !failure.contains("r2@refuses.test"),
        "NOTIFY=NEVER: {failure}"
    );
    assert!(
        success.contains("Final-Recipient: rfc822; r3@ok.test"),
        "{success}"
    );
    // The notices come from the null sender.
    let envelopes: Vec<String> = std::fs::read_dir(&store)
        .expect("store")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "env"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(
        envelopes
            .iter()
            .all(|e| e.starts_with("\n") || e.starts_with("<>")),
        "{envelopes:?}"
    );
    drop(refusing);
    drop(accepting);
}

/// Every notice decision is logged: a message whose recipients are decided in two attempts
/// (one bounced, one delivered with NOTIFY=SUCCESS) gets two notices and two Notice lines, one
/// per recipient, each with its notice's id.
///
/// A regression test: the failure's notice, spooled after the delivery but before the success
/// notice, used to finish the message and remove it from the queue, so the success notice's
/// decision found no message and logged no line (the message now stays until its last notice).
#[test]
fn every_notice_decision_is_logged() {
    const MESSAGES: usize = 5;
    let dir = tempfile::tempdir().expect("tempdir");
    let refusing = Sink::start(dir.path(), &["--reply", "550:100"]);
    let accepting = Sink::start(dir.path(), &[]);
    let mut opts = Opts::new(dir.path());
    opts.conf.raw = format!(
        "[[route]]\ndomain = \"refuses.test\"\ntarget = \"127.0.0.1:{}\"\n\
         [[route]]\ndomain = \"*.test\"\ntarget = \"127.0.0.1:{}\"\n",
        refusing.port, accepting.port
    );
    let mut epoxi = Epoxi::start(&opts);
    let mut c = Smtp::connect(epoxi.port);
    assert_eq!(c.reply().code, 220);
    c.expect("EHLO client.test", 250);
    for _ in 0..MESSAGES {
        c.expect("MAIL FROM:<s@notices.test>", 250);
        c.expect("RCPT TO:<r1@refuses.test> NOTIFY=FAILURE", 250);
        c.expect("RCPT TO:<r3@ok.test> NOTIFY=SUCCESS", 250);
        c.expect("DATA", 354);
        c.send(b"Subject: two notices\r\n\r\nbody\r\n.\r\n");
        assert_eq!(c.reply().code, 250);
    }
    c.expect("QUIT", 221);
    // Every notice delivered, and epoxi stopped: a notice's line is written once it is
    // spooled, before it can be delivered, so all the lines there will be are there.
    wait_until("every notice delivered", DEADLINE, || {
        epoxi
            .events_of("Delivery")
            .iter()
            .filter(|d| d["sender"] == "")
            .count()
            >= 2 * MESSAGES
    });
    epoxi.stop();
    let from_null: BTreeSet<String> = field_set(
        &epoxi
            .events_of("Reception")
            .into_iter()
            .filter(|r| r["sender"] == "")
            .collect::<Vec<_>>(),
        "message_id",
    );
    assert_eq!(from_null.len(), 2 * MESSAGES);
    let mut missing = Vec::new();
    for r in epoxi.events_of("Reception") {
        if r["sender"] != "s@notices.test" {
            continue;
        }
        let lines = notice_lines(&epoxi, &r["message_id"]);
        let mut covered = decided(&lines);
        covered.sort();
        if covered != ["r1@refuses.test", "r3@ok.test"] {
            let lines: Vec<String> = lines.iter().map(Value::to_string).collect();
            missing.push(format!("{}: {}", r["message_id"], lines.join(" ")));
        }
        for n in &lines {
            let notice = n["notice_id"].as_str().unwrap_or_default();
            assert!(from_null.contains(notice), "{n}");
        }
    }
    assert!(
        missing.is_empty(),
        "messages without a Notice line for each recipient:\n{}",
        missing.join("\n")
    );
    drop(refusing);
    drop(accepting);
}

/// What the next hop must offer, as bits: SMTPUTF8, 8BITMIME, BINARYMIME.
const FLAG_SMTPUTF8: u8 = 1;
const FLAG_8BITMIME: u8 = 2;
const FLAG_BINARYMIME: u8 = 4;

/// Every message in an epoxi spool (stopped): its flags (`FLAG_*`, from the envelope), first
/// recipient and body as spooled, Received headers included.
fn spooled(spool: &Path) -> Vec<(u8, String, Vec<u8>)> {
    use epoxi::envelope::Body;
    use epoxi::spool::record::{aligned_copy, scan, MessageView, RecordKind, Scanned};
    use epoxi::spool::segment::SEGMENT_HEADER_LEN;
    let mut out = Vec::new();
    for seg in segments(spool) {
        // Aligned, so rkyv can read the records in place.
        let bytes = aligned_copy(&std::fs::read(&seg).expect("read segment"));
        for found in scan(&bytes[SEGMENT_HEADER_LEN..]) {
            if let Scanned::Record {
                header, payload, ..
            } = found
            {
                if header.kind == RecordKind::Message {
                    let m = MessageView::new(header.version, payload).expect("message record");
                    let env = m.envelope().expect("envelope");
                    let rcpt = env
                        .rcpts
                        .first()
                        .map(|r| r.address.clone())
                        .unwrap_or_default();
                    let flags = (if env.smtputf8 { FLAG_SMTPUTF8 } else { 0 })
                        | match env.body {
                            Body::SevenBit => 0,
                            Body::EightBitMime => FLAG_8BITMIME,
                            Body::BinaryMime => FLAG_BINARYMIME,
                        };
                    out.push((flags, rcpt, m.body().to_vec()));
                }
            }
        }
    }
    out
}

/// `message` without the `n` Received headers (and their continuation lines) on top.
fn without_received(message: &[u8], n: usize) -> &[u8] {
    let mut at = 0;
    for _ in 0..n {
        assert!(
            message[at..].starts_with(b"Received: from "),
            "Received header expected"
        );
        loop {
            at += find(&message[at..], b"\r\n").expect("header line") + 2;
            if message.get(at) != Some(&b'\t') {
                break;
            }
        }
    }
    &message[at..]
}

/// Epoxi relaying to an Epoxi next hop, which offers CHUNKING and BINARYMIME: the bodies go by
/// BDAT (in several pipelined chunks when big) and arrive byte for byte, a lone dot line and a
/// bare LF included (DATA would have stuffed the one and turned the other into CRLF); a
/// BINARYMIME body of every octet value arrives with its binary flag. The same binary message to
/// a next hop without CHUNKING and BINARYMIME (the loadgen sink) is bounced with 554 5.6.3.
#[test]
fn bdat_to_an_epoxi_next_hop_is_byte_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let next_hop_dir = dir.path().join("next-hop");
    std::fs::create_dir(&next_hop_dir).expect("mkdir");
    let mut next_hop = Epoxi::start(&Opts::new(&next_hop_dir));
    let sink = Sink::start(dir.path(), &[]);
    let mut opts = Opts::new(dir.path())
        // 64 KiB chunks, the least allowed: the big message goes in four.
        .set("delivery", "bdat_chunk_size_max", "65536");
    opts.conf.raw = format!(
        "[[route]]\ndomain = \"nochunk.test\"\ntarget = \"127.0.0.1:{}\"\n\
         [[route]]\ndomain = \"*.test\"\ntarget = \"127.0.0.1:{}\"\n",
        sink.port, next_hop.port
    );
    let mut epoxi = Epoxi::start(&opts);

    let dots = with_id(
        "dots",
        "Grüße\r\n.\r\n..two\r\n.leading\r\nbare\nLF\r\n.\r\nend\r\n".as_bytes(),
    );
    let mut big_text = Vec::with_capacity(200 << 10);
    let mut i = 0u64;
    while big_text.len() < 200 << 10 {
        big_text.extend_from_slice(format!(".{i:08} {}\r\n", "abcdefghij".repeat(6)).as_bytes());
        i += 1;
    }
    let big = with_id("big", &big_text);
    let mut octets: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    octets.extend_from_slice(b"\r\n.\r\n\r.\n\0 no final CRLF");
    let binary = with_id("binary", &octets);

    let mut c = Smtp::connect(epoxi.port);
    assert_eq!(c.reply().code, 220);
    c.expect("EHLO client.test", 250);
    for (m, to) in [(&dots, "a@d1.test"), (&big, "b@d2.test")] {
        c.expect("MAIL FROM:<s@sender.example> BODY=8BITMIME", 250);
        c.expect(&format!("RCPT TO:<{to}>"), 250);
        c.expect("DATA", 354);
        c.send(&stuffed(m));
        c.send(b".\r\n");
        assert_eq!(c.reply().code, 250);
    }
    for to in ["c@d3.test", "r@nochunk.test"] {
        c.expect("MAIL FROM:<s@sender.example> BODY=BINARYMIME", 250);
        c.expect(&format!("RCPT TO:<{to}>"), 250);
        let (one, two) = binary.split_at(1000);
        c.send(format!("BDAT {}\r\n", one.len()).as_bytes());
        c.send(one);
        assert_eq!(c.reply().code, 250);
        c.send(format!("BDAT {} LAST\r\n", two.len()).as_bytes());
        c.send(two);
        assert_eq!(c.reply().code, 250);
    }
    c.expect("QUIT", 221);

    let delivered = epoxi.wait_events("Delivery", 3);
    assert!(
        delivered.iter().all(|e| e["recipient"] != "r@nochunk.test"),
        "{delivered:?}"
    );
    let bounces = epoxi.wait_events("Bounce", 1);
    let bounce = &bounces[0];
    assert_eq!(bounce["recipient"], "r@nochunk.test", "{bounce}");
    assert_eq!(bounce["response"]["code"], 554, "{bounce}");
    assert_eq!(bounce["response"]["enhanced"], "5.6.3", "{bounce}");
    next_hop.wait_events("Reception", 3);
    epoxi.stop();
    next_hop.stop();
    drop(sink);

    let got = spooled(&next_hop.spool);
    assert_eq!(
        got.len(),
        3,
        "{:?}",
        got.iter().map(|g| &g.1).collect::<Vec<_>>()
    );
    for (to, want, flags) in [
        ("a@d1.test", &dots, FLAG_8BITMIME),
        ("b@d2.test", &big, FLAG_8BITMIME),
        ("c@d3.test", &binary, FLAG_BINARYMIME),
    ] {
        let (got_flags, _, body) = got
            .iter()
            .find(|g| g.1 == to)
            .unwrap_or_else(|| panic!("{to} not spooled at the next hop"));
        // The next hop's Received header, then ours, then the message as the client sent it.
        let body = without_received(body, 2);
        assert!(
            body == want.as_slice(),
            "{to}: {} bytes spooled, {} sent",
            body.len(),
            want.len()
        );
        assert_eq!(*got_flags, flags, "{to}");
    }
}
