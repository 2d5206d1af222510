//! Reports as real reporters write them (Postfix DSN, ARF from RFC 5965's example), and
//! garbage.

use super::*;

const OURS: &[&str] = &["mx.epoxi.test"];

fn ours() -> Vec<String> {
    OURS.iter().map(|s| s.to_string()).collect()
}

fn parse_it(body: &str) -> Result<Report, ParseError> {
    let names = ours();
    parse(
        body.as_bytes(),
        &Ours {
            hostnames: &names,
            tenant_header: Some("X-Tenant"),
        },
    )
}

const DSN: &str = "From: MAILER-DAEMON@mx.remote.test\r\n\
Subject: Undelivered Mail Returned to Sender\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status;\r\n\
\tboundary=\"B0UND\"\r\n\
\r\n\
--B0UND\r\n\
Content-Type: text/plain\r\n\
\r\n\
Your message could not be delivered.\r\n\
--B0UND\r\n\
Content-Type: message/delivery-status\r\n\
\r\n\
Reporting-MTA: dns; mx.remote.test\r\n\
Arrival-Date: Tue, 1 Dec 2026 10:00:00 +0000\r\n\
\r\n\
Final-Recipient: rfc822; bob@remote.test\r\n\
Original-Recipient: rfc822;Bob@remote.test\r\n\
Action: failed\r\n\
Status: 5.1.1\r\n\
Remote-MTA: dns; mailstore.remote.test\r\n\
Diagnostic-Code: smtp; 550 5.1.1 <bob@remote.test>: Recipient address\r\n\
\t  rejected: User unknown in local recipient table\r\n\
\r\n\
Final-Recipient: rfc822; carol@remote.test\r\n\
Action: delayed\r\n\
Status: 4.2.2\r\n\
Diagnostic-Code: smtp; 452 4.2.2 Mailbox full\r\n\
--B0UND\r\n\
Content-Type: text/rfc822-headers\r\n\
\r\n\
Received: from client.test ([127.0.0.1])\r\n\
\tby mx.epoxi.test with ESMTP id 18c2f3a4b5.0.1f\r\n\
\tfor <bob@remote.test>; Tue, 1 Dec 2026 09:59:59 +0000\r\n\
From: alice@sender.test\r\n\
To: bob@remote.test\r\n\
X-Tenant: acme\r\n\
Message-ID: <m1@sender.test>\r\n\
Subject: hello\r\n\
--B0UND--\r\n";

#[test]
fn a_dsn_is_read_block_by_block() {
    let Ok(Report::Dsn(dsn)) = parse_it(DSN) else {
        panic!("{:?}", parse_it(DSN));
    };
    assert_eq!(dsn.reporting_mta.as_deref(), Some("mx.remote.test"));
    assert_eq!(dsn.recipients.len(), 2);
    let bob = &dsn.recipients[0];
    assert_eq!(bob.final_recipient.as_deref(), Some("bob@remote.test"));
    assert_eq!(bob.original_recipient.as_deref(), Some("Bob@remote.test"));
    assert_eq!(bob.action.as_deref(), Some("failed"));
    assert_eq!(bob.status.as_deref(), Some("5.1.1"));
    assert_eq!(
        bob.diagnostic.as_deref(),
        Some(
            "550 5.1.1 <bob@remote.test>: Recipient address rejected: User unknown in local \
             recipient table"
        ),
        "folded, type stripped"
    );
    assert_eq!(bob.remote_mta.as_deref(), Some("mailstore.remote.test"));
    assert_eq!(dsn.recipients[1].action.as_deref(), Some("delayed"));
    let id = ReceptionId::parse("18c2f3a4b5.0.1f");
    assert_eq!(dsn.original.reception, id, "matched by our Received header");
    assert_eq!(dsn.original.message_id.as_deref(), Some("m1@sender.test"));
    assert_eq!(dsn.original.tenant.as_deref(), Some("acme"));
}

#[test]
fn a_dsn_decides_category_suppression_and_match() {
    let report = parse_it(DSN).expect("dsn");
    let classifier = Classifier::defaults().expect("rules");
    let arrival = Arrival {
        ts_ms: 5,
        shard: 0,
        peer: "127.0.0.1:4000",
        sender: "",
        recipient: "bounces@oob.test",
        verp: None,
    };
    let d = decide(&report, &arrival, Some(&classifier));
    assert_eq!(d.bounces.len(), 2);
    assert_eq!(
        d.bounces[0].bounce_category,
        Some(Category::InvalidRecipient)
    );
    assert!(d.bounces[0].suppressed);
    assert_eq!(d.bounces[0].matched_by, Some(MatchedBy::Received));
    assert_eq!(d.bounces[0].message_id.as_deref(), Some("18c2f3a4b5.0.1f"));
    assert_eq!(d.bounces[1].bounce_category, Some(Category::QuotaIssues));
    assert!(!d.bounces[1].suppressed, "a delay is no hard bounce");
    assert_eq!(
        d.suppress,
        vec![(
            Some("acme".to_owned()),
            "bob@remote.test".to_owned(),
            crate::suppression::Reason::Bounce
        )]
    );
    // VERP wins over the Received header.
    let verp = ReceptionId {
        ms: 0xabc,
        shard: 1,
        n: 2,
    };
    let d = decide(
        &report,
        &Arrival {
            verp: Some(verp),
            ..arrival
        },
        Some(&classifier),
    );
    assert_eq!(d.bounces[0].matched_by, Some(MatchedBy::Verp));
    assert_eq!(d.bounces[0].message_id, Some(verp.to_string()));
}

#[test]
fn verp_addresses_round_trip() {
    let id = ReceptionId {
        ms: 0x18c2f3a4b5,
        shard: 3,
        n: 0x1f,
    };
    let a = verp_address(id, "oob.test");
    assert_eq!(a, "b+18c2f3a4b5.3.1f@oob.test");
    assert_eq!(verp_id(&a, "oob.test"), Some(id));
    assert_eq!(verp_id(&a.to_uppercase(), "oob.test"), Some(id));
    assert_eq!(verp_id(&a, "other.test"), None);
    assert_eq!(verp_id("postmaster@oob.test", "oob.test"), None);
    assert_eq!(verp_id("b+zz@oob.test", "oob.test"), None);
}

const ARF: &str = "From: <abusedesk@example.com>\r\n\
To: <abuse@oob.test>\r\n\
Subject: FW: Earn money\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=feedback-report;\r\n\
\tboundary=\"part1_13d.2e68ed54_boundary\"\r\n\
\r\n\
--part1_13d.2e68ed54_boundary\r\n\
Content-Type: text/plain; charset=\"US-ASCII\"\r\n\
\r\n\
This is an email abuse report.\r\n\
--part1_13d.2e68ed54_boundary\r\n\
Content-Type: message/feedback-report\r\n\
\r\n\
Feedback-Type: abuse\r\n\
User-Agent: SomeGenerator/1.0\r\n\
Version: 1\r\n\
Original-Mail-From: <somespammer@sender.test>\r\n\
Original-Rcpt-To: <user@example.com>\r\n\
Arrival-Date: Thu, 8 Mar 2005 14:00:00 EDT\r\n\
Source-IP: 192.0.2.2\r\n\
Reported-Domain: sender.test\r\n\
\r\n\
--part1_13d.2e68ed54_boundary\r\n\
Content-Type: message/rfc822\r\n\
Content-Disposition: inline\r\n\
\r\n\
Received: from client.test ([127.0.0.1])\r\n\
\tby mx.epoxi.test with ESMTP id 18c2f3a4b5.0.20\r\n\
\tfor <user@example.com>; Tue, 1 Dec 2026 09:59:59 +0000\r\n\
From: <somespammer@sender.test>\r\n\
To: <user@example.com>\r\n\
Subject: Earn money\r\n\
Message-ID: <8787KJKJ3K4J3K4J3K4J3.mail@sender.test>\r\n\
\r\n\
Spam Spam Spam\r\n\
--part1_13d.2e68ed54_boundary--\r\n";

#[test]
fn an_arf_report_is_a_complaint() {
    let report = parse_it(ARF).expect("arf");
    let Report::Feedback(f) = &report else {
        panic!("{report:?}");
    };
    assert_eq!(f.feedback_type, "abuse");
    assert_eq!(f.user_agent.as_deref(), Some("SomeGenerator/1.0"));
    assert_eq!(f.original_rcpt_to.as_deref(), Some("user@example.com"));
    assert_eq!(
        f.original_mail_from.as_deref(),
        Some("somespammer@sender.test")
    );
    assert_eq!(f.source_ip.as_deref(), Some("192.0.2.2"));
    assert_eq!(f.original.reception, ReceptionId::parse("18c2f3a4b5.0.20"));
    assert_eq!(
        f.original.message_id.as_deref(),
        Some("8787KJKJ3K4J3K4J3K4J3.mail@sender.test")
    );
    let d = decide(
        &report,
        &Arrival {
            ts_ms: 1,
            shard: 0,
            peer: "-",
            sender: "abusedesk@example.com",
            recipient: "abuse@oob.test",
            verp: None,
        },
        None,
    );
    let fb = d.feedback.expect("a feedback line");
    assert!(fb.suppressed);
    assert_eq!(fb.message_id.as_deref(), Some("18c2f3a4b5.0.20"));
    assert_eq!(d.suppress.len(), 1);
    assert_eq!(d.suppress[0].2, crate::suppression::Reason::Complaint);
}

#[test]
fn a_received_header_of_another_host_does_not_match() {
    let other = DSN.replace("by mx.epoxi.test", "by mx.elsewhere.test");
    let Ok(Report::Dsn(dsn)) = parse_it(&other) else {
        panic!("dsn");
    };
    assert_eq!(dsn.original.reception, None);
    assert_eq!(dsn.original.message_id.as_deref(), Some("m1@sender.test"));
}

#[test]
fn what_is_not_a_report_says_why() {
    assert_eq!(parse_it(""), Err(ParseError::NotMime));
    assert!(matches!(
        parse_it("Subject: hi\r\nContent-Type: text/plain\r\n\r\nhello\r\n"),
        Err(ParseError::NotReport(_))
    ));
    assert!(matches!(
        parse_it(
            "Content-Type: multipart/report; report-type=disposition-notification; \
             boundary=x\r\n\r\n--x\r\n\r\nhi\r\n--x--\r\n"
        ),
        Err(ParseError::OtherReport(_))
    ));
    assert_eq!(
        parse_it(
            "Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n\r\n\
             --x\r\nContent-Type: text/plain\r\n\r\nhi\r\n--x--\r\n"
        ),
        Err(ParseError::NoReportPart("message/delivery-status"))
    );
    assert_eq!(
        parse_it(
            "Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n\r\n\
             --x\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; a\r\n\
             --x--\r\n"
        ),
        Err(ParseError::NoRecipients)
    );
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn garbage_never_panics() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let pieces: [&[u8]; 8] = [
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n",
        b"--x\r\n",
        b"Content-Type: message/delivery-status\r\n",
        b"\r\n",
        b"Final-Recipient: rfc822;",
        b"Status: 5.",
        b"\xff\xfe\x00",
        b"Content-Type: message/rfc822\r\n",
    ];
    for _ in 0..2_000 {
        let mut body = Vec::new();
        for _ in 0..(xorshift(&mut seed) % 24) {
            let r = xorshift(&mut seed);
            if r.is_multiple_of(3) {
                body.push((r >> 8) as u8);
            } else {
                body.extend_from_slice(pieces[(r % pieces.len() as u64) as usize]);
            }
        }
        let _ = parse_it(&String::from_utf8_lossy(&body));
        let names = ours();
        let _ = parse(
            &body,
            &Ours {
                hostnames: &names,
                tenant_header: None,
            },
        );
    }
    // Real reports cut at every byte.
    for text in [DSN, ARF] {
        for cut in 0..text.len() {
            if text.is_char_boundary(cut) {
                let _ = parse_it(&text[..cut]);
            }
        }
    }
}
