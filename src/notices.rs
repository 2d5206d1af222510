//! The notices stage: delivery status notifications (RFC 3464), the notice sent back to a
//! message's sender when recipients fail (or, when asked with NOTIFY=SUCCESS, succeed, or are
//! still pending after `notices.delay_after_s`: a delay notice, `Action: delayed`). Pure
//! functions of their inputs; the core decides when one is due, the shard's adapter reads the
//! original and spools the notice like any other message, from the null sender so that a
//! notice about a notice is never generated.

use std::fmt::Write as _;

use crate::envelope::Body;

/// What happened to a recipient (RFC 3464 §2.3.3 Action).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Failed,
    Delivered,
    /// Not delivered yet, still being retried (a delay notice).
    Delayed,
}

/// One recipient in a notice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoticeRcpt {
    pub rcpt: String,
    /// ORCPT as received (`type;address`), or empty.
    pub orcpt: String,
    pub action: Action,
    /// Enhanced status code, e.g. "5.1.1".
    pub status: String,
    /// The remote server's reply, or our own reason (e.g. expiry).
    pub diagnostic: String,
    /// For `Delayed`: until when it is retried (RFC 3464 §2.3.7 Will-Retry-Until), an
    /// RFC 5322 date.
    pub will_retry_until: Option<String>,
}

/// How much of the original message to return (RFC 3461 §4.3 RET).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Return {
    Full,
    Headers,
}

/// The inputs of a notice.
pub struct Notice<'a> {
    pub host: &'a str,
    pub to: &'a str,
    pub envid: &'a str,
    pub notice_id: &'a str,
    pub arrival_date: &'a str,
    pub date: &'a str,
    pub rcpts: &'a [NoticeRcpt],
    pub original: &'a [u8],
    pub ret: Return,
}

/// Build the notice: headers and a multipart/report body, CRLF lines.
pub fn build(n: &Notice<'_>) -> Vec<u8> {
    let failed = n.rcpts.iter().any(|r| r.action == Action::Failed);
    let delayed = !failed && n.rcpts.iter().any(|r| r.action == Action::Delayed);
    let boundary = format!("{}/{}", n.notice_id, n.host);
    let mut m = String::with_capacity(2048);
    // Writing into a String cannot fail.
    let _ = write!(
        m,
        "From: Mail Delivery System <MAILER-DAEMON@{host}>\r\n\
         To: <{to}>\r\n\
         Subject: {subject}\r\n\
         Date: {date}\r\n\
         Message-ID: <{id}@{host}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\
         \tboundary=\"{boundary}\"\r\n\
         \r\n\
         This is a MIME-encapsulated delivery status notification.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n",
        host = n.host,
        to = n.to,
        subject = if failed {
            "Undelivered Mail Returned to Sender"
        } else if delayed {
            "Delayed Mail (still being retried)"
        } else {
            "Successful Mail Delivery Report"
        },
        date = n.date,
        id = n.notice_id,
    );
    let _ = write!(
        m,
        "This is the mail system at {}.\r\n\r\n{}\r\n\r\n",
        n.host,
        if failed {
            "Your message could not be delivered to one or more recipients:"
        } else if delayed {
            "Your message has not been delivered yet to the recipients below. The mail \
             system\r\nwill keep trying; you will be told if it finally fails. No action is \
             needed.\r\n\r\nStill being retried:"
        } else {
            "Your message was delivered to:"
        }
    );
    for r in n.rcpts {
        let _ = write!(m, "  <{}>: {}\r\n", r.rcpt, one_line(&r.diagnostic));
    }
    let _ = write!(
        m,
        "\r\n--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n\
         Reporting-MTA: dns; {}\r\n",
        n.host
    );
    if !n.envid.is_empty() {
        let _ = write!(m, "Original-Envelope-Id: {}\r\n", n.envid);
    }
    let _ = write!(m, "Arrival-Date: {}\r\n", n.arrival_date);
    for r in n.rcpts {
        m.push_str("\r\n");
        if let Some((kind, address)) = r.orcpt.split_once(';') {
            let _ = write!(m, "Original-Recipient: {kind};{address}\r\n");
        }
        let _ = write!(
            m,
            "Final-Recipient: rfc822; {}\r\nAction: {}\r\nStatus: {}\r\nDiagnostic-Code: smtp; {}\r\n",
            r.rcpt,
            match r.action {
                Action::Failed => "failed",
                Action::Delivered => "delivered",
                Action::Delayed => "delayed",
            },
            r.status,
            one_line(&r.diagnostic)
        );
        if let Some(until) = &r.will_retry_until {
            let _ = write!(m, "Will-Retry-Until: {until}\r\n");
        }
    }
    let (content_type, returned) = match n.ret {
        Return::Full => ("message/rfc822", n.original),
        Return::Headers => ("text/rfc822-headers", headers_of(n.original)),
    };
    let _ = write!(
        m,
        "\r\n--{boundary}\r\nContent-Type: {content_type}\r\n\r\n"
    );
    let mut bytes = m.into_bytes();
    bytes.extend_from_slice(returned);
    if !returned.ends_with(b"\r\n") {
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    bytes
}

/// What the next hop must offer to take a notice about a message whose body is `body`: what the
/// original needed when it is returned in full, but never BINARYMIME for the headers alone,
/// which are text (8-bit at most), so that a notice about a binary message can still reach a
/// sender whose server lacks BINARYMIME.
pub fn notice_body(body: Body, ret: Return) -> Body {
    match (ret, body) {
        (Return::Headers, Body::BinaryMime) => Body::EightBitMime,
        (_, body) => body,
    }
}

/// The header section of a message, up to and including its ending empty line.
fn headers_of(message: &[u8]) -> &[u8] {
    match memchr::memmem::find(message, b"\r\n\r\n") {
        Some(i) => &message[..i + 4],
        None => message,
    }
}

/// A reply text on one line (multi-line replies are joined), without control characters.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The enhanced status for a reply: its own, or one derived from the reply class.
pub fn status_of(code: u16, enhanced: &str) -> String {
    if !enhanced.is_empty() {
        return enhanced.to_owned();
    }
    match code {
        200..=299 => "2.0.0".into(),
        400..=499 => "4.0.0".into(),
        _ => "5.0.0".into(),
    }
}

/// One recipient of a notice request: which recipient, its final outcome and the response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome<'a> {
    pub rcpt: u16,
    pub kind: crate::spool::record::OutcomeKind,
    pub response: &'a crate::events::Response,
}

/// What [`compose`] needs of the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// `notices.delay_without_notify`: delay notices for recipients given without NOTIFY.
    pub delay_without_notify: bool,
    /// `queue.max_age_s` in ms: delay notices say the message is retried until its reception
    /// plus this.
    pub max_age_ms: u64,
}

impl Policy {
    pub fn of(config: &crate::config::Config) -> Policy {
        Policy {
            delay_without_notify: config.notices.delay_without_notify,
            max_age_ms: config.queue.max_age_s.saturating_mul(1000),
        }
    }
}

/// Whether a recipient with `notify` wants a delay notice (RFC 3461 §4.1: NOTIFY=DELAY asks,
/// another NOTIFY excludes it, none leaves it to the MTA).
pub fn wants_delay(notify: crate::envelope::Notify, policy: &Policy) -> bool {
    match notify {
        crate::envelope::Notify::Default => policy.delay_without_notify,
        other => other.on_delay(),
    }
}

/// The notice about `outcomes` of the message whose envelope is `original` (body `body`), for
/// its sender, or None when no recipient asked for one (NOTIFY). `notice` is the notice's own
/// reception id, `now_ms` its date. Outcomes that are not final (`Deferred`) make a delay
/// notice. Pure: the adapter reads the original and spools the result.
pub fn compose(
    host: &str,
    original: &crate::envelope::Envelope,
    body: &[u8],
    outcomes: &[Outcome<'_>],
    notice: crate::envelope::ReceptionId,
    now_ms: u64,
    policy: &Policy,
) -> Option<(crate::envelope::Envelope, Vec<u8>)> {
    use crate::envelope::{Envelope, Recipient, Ret};
    use crate::smtp::received::rfc5322_date;
    use crate::spool::record::OutcomeKind;
    let rcpts: Vec<NoticeRcpt> = outcomes
        .iter()
        .filter_map(|o| {
            let r = original.rcpts.get(usize::from(o.rcpt))?;
            let wanted = match o.kind {
                OutcomeKind::Delivered => r.notify.on_success(),
                OutcomeKind::Deferred | OutcomeKind::Delayed => wants_delay(r.notify, policy),
                OutcomeKind::Bounced | OutcomeKind::Expired => r.notify.on_failure(),
            };
            if !wanted {
                return None;
            }
            let response = o.response;
            let delayed = !o.kind.is_final();
            Some(NoticeRcpt {
                rcpt: r.address.clone(),
                orcpt: r.orcpt.clone().unwrap_or_default(),
                action: match o.kind {
                    OutcomeKind::Delivered => Action::Delivered,
                    _ if delayed => Action::Delayed,
                    _ => Action::Failed,
                },
                status: match o.kind {
                    // RFC 3463 4.4.7: delivery time expired.
                    OutcomeKind::Expired => "4.4.7".into(),
                    // A delay is persistent transient (4.x.x) whatever the last reply said.
                    _ if delayed => {
                        let s = status_of(response.code, &response.enhanced);
                        if s.starts_with('4') {
                            s
                        } else {
                            "4.0.0".into()
                        }
                    }
                    _ => status_of(response.code, &response.enhanced),
                },
                diagnostic: format!("{} {} {}", response.code, response.enhanced, response.text),
                will_retry_until: delayed.then(|| {
                    rfc5322_date(original.received_ms().saturating_add(policy.max_age_ms) / 1000)
                }),
            })
        })
        .collect();
    if rcpts.is_empty() || original.sender.is_empty() {
        return None;
    }
    // RET is about failure notices (RFC 3461 §4.3); a delay notice returns the headers.
    let delay = rcpts.iter().all(|r| r.action == Action::Delayed);
    let ret = if original.ret == Ret::Full && !delay {
        Return::Full
    } else {
        Return::Headers
    };
    let notice_text = notice.to_string();
    let bytes = build(&Notice {
        host,
        to: &original.sender,
        envid: original.envid.as_deref().unwrap_or(""),
        notice_id: &notice_text,
        arrival_date: &rfc5322_date(original.received_ms() / 1000),
        date: &rfc5322_date(now_ms / 1000),
        rcpts: &rcpts,
        original: body,
        ret,
    });
    let envelope = Envelope {
        reception: notice,
        sender: String::new(),
        rcpts: vec![Recipient::new(original.sender.clone())],
        ret: Ret::Unspecified,
        envid: None,
        tenant: original.tenant.clone(),
        smtputf8: original.smtputf8,
        body: notice_body(original.body, ret),
        size: bytes.len() as u64,
        peer: "local".into(),
        notices: crate::envelope::NoticeSwitches::ALL,
        priority: Default::default(),
        campaign: None,
    };
    Some((envelope, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGINAL: &[u8] = b"X-Id: 7\r\nSubject: hello\r\n\r\nsecret body\r\n";

    fn notice(ret: Return, rcpts: &[NoticeRcpt], envid: &str) -> String {
        String::from_utf8(build(&Notice {
            host: "mx.test",
            to: "sender@x.test",
            envid,
            notice_id: "n1",
            arrival_date: "Wed, 25 Nov 2026 05:00:00 +0000",
            date: "Wed, 25 Nov 2026 05:01:00 +0000",
            rcpts,
            original: ORIGINAL,
            ret,
        }))
        .expect("ascii")
    }

    fn failed(rcpt: &str, orcpt: &str) -> NoticeRcpt {
        NoticeRcpt {
            rcpt: rcpt.into(),
            orcpt: orcpt.into(),
            action: Action::Failed,
            status: "5.1.1".into(),
            diagnostic: "550 5.1.1 No such user\nhere".into(),
            will_retry_until: None,
        }
    }

    #[test]
    fn failure_notice_with_headers_only() {
        let n = notice(
            Return::Headers,
            &[failed("a@y.test", "rfc822;orig@y.test")],
            "env-42",
        );
        assert!(n.starts_with(
            "From: Mail Delivery System <MAILER-DAEMON@mx.test>\r\nTo: <sender@x.test>\r\n"
        ));
        assert!(n.contains("Subject: Undelivered Mail Returned to Sender\r\n"));
        assert!(n.contains("Auto-Submitted: auto-replied\r\n"));
        assert!(n.contains("Content-Type: multipart/report; report-type=delivery-status;"));
        assert!(n.contains("Reporting-MTA: dns; mx.test\r\nOriginal-Envelope-Id: env-42\r\n"));
        assert!(n.contains(
            "Original-Recipient: rfc822;orig@y.test\r\nFinal-Recipient: rfc822; a@y.test\r\n\
             Action: failed\r\nStatus: 5.1.1\r\nDiagnostic-Code: smtp; 550 5.1.1 No such user here\r\n"
        ));
        assert!(n.contains(
            "Content-Type: text/rfc822-headers\r\n\r\nX-Id: 7\r\nSubject: hello\r\n\r\n"
        ));
        assert!(!n.contains("secret body"), "RET=HDRS returns headers only");
        assert!(n.ends_with("\r\n--n1/mx.test--\r\n"));
        assert!(!n.replace("\r\n", "").contains('\n'), "CRLF lines only");
    }

    #[test]
    fn notice_of_a_binary_message_needs_binarymime_only_when_returned_in_full() {
        assert_eq!(
            notice_body(Body::BinaryMime, Return::Full),
            Body::BinaryMime
        );
        assert_eq!(
            notice_body(Body::BinaryMime, Return::Headers),
            Body::EightBitMime
        );
        assert_eq!(
            notice_body(Body::EightBitMime, Return::Headers),
            Body::EightBitMime
        );
        assert_eq!(notice_body(Body::SevenBit, Return::Full), Body::SevenBit);
    }

    #[test]
    fn full_return_and_success_notice() {
        let mut ok = failed("b@y.test", "");
        ok.action = Action::Delivered;
        ok.status = "2.0.0".into();
        let n = notice(Return::Full, &[ok], "");
        assert!(n.contains("Subject: Successful Mail Delivery Report"));
        assert!(n.contains("Action: delivered\r\nStatus: 2.0.0"));
        assert!(!n.contains("Original-Envelope-Id"));
        assert!(!n.contains("Original-Recipient"));
        assert!(n.contains(
            "Content-Type: message/rfc822\r\n\r\nX-Id: 7\r\nSubject: hello\r\n\r\nsecret body\r\n"
        ));
    }

    #[test]
    fn delay_notice_follows_notify_and_returns_headers_only() {
        use crate::envelope::{Envelope, Notify, ReceptionId, Recipient, Ret};
        use crate::spool::record::OutcomeKind;
        let mut asked = Recipient::new("d@y.test");
        asked.notify = Notify::On {
            success: false,
            failure: true,
            delay: true,
        };
        let mut failure_only = Recipient::new("f@y.test");
        failure_only.notify = Notify::On {
            success: false,
            failure: true,
            delay: false,
        };
        let original = Envelope {
            reception: ReceptionId {
                ms: 1_764_000_000_000,
                shard: 0,
                n: 1,
            },
            sender: "s@x.test".into(),
            rcpts: vec![asked, failure_only, Recipient::new("n@y.test")],
            ret: Ret::Full,
            envid: None,
            tenant: None,
            smtputf8: false,
            body: Body::SevenBit,
            size: ORIGINAL.len() as u64,
            peer: "t".into(),
            notices: crate::envelope::NoticeSwitches::ALL,
            priority: Default::default(),
            campaign: None,
        };
        let response = crate::events::Response {
            code: 451,
            enhanced: "4.7.1".into(),
            text: "greylisted".into(),
        };
        let outcomes: Vec<Outcome<'_>> = (0..3)
            .map(|rcpt| Outcome {
                rcpt,
                kind: OutcomeKind::Deferred,
                response: &response,
            })
            .collect();
        let id = ReceptionId {
            ms: 1_764_000_100_000,
            shard: 0,
            n: 2,
        };
        let policy = |delay_without_notify| Policy {
            delay_without_notify,
            max_age_ms: 86_400_000,
        };
        let (env, bytes) = compose(
            "mx.test",
            &original,
            ORIGINAL,
            &outcomes,
            id,
            id.ms,
            &policy(false),
        )
        .expect("one asked");
        let text = String::from_utf8(bytes).expect("ascii");
        assert_eq!(env.sender, "", "from the null sender");
        assert!(text.contains("Subject: Delayed Mail (still being retried)"));
        assert!(text
            .contains("Final-Recipient: rfc822; d@y.test\r\nAction: delayed\r\nStatus: 4.7.1\r\n"));
        assert!(text.contains("Will-Retry-Until: Tue, 25 Nov 2025 16:00:00 +0000\r\n"));
        assert!(!text.contains("f@y.test"), "NOTIFY without DELAY");
        assert!(
            !text.contains("n@y.test"),
            "no NOTIFY, and the MTA chose not to"
        );
        assert!(
            text.contains("text/rfc822-headers"),
            "headers only, RET=FULL or not"
        );
        assert!(!text.contains("secret body"));
        let (_, bytes) = compose(
            "mx.test",
            &original,
            ORIGINAL,
            &outcomes,
            id,
            id.ms,
            &policy(true),
        )
        .expect("two asked");
        let text = String::from_utf8(bytes).expect("ascii");
        assert!(text.contains("n@y.test") && !text.contains("f@y.test"));
    }

    #[test]
    fn status_from_reply() {
        assert_eq!(status_of(550, "5.7.1"), "5.7.1");
        assert_eq!(status_of(550, ""), "5.0.0");
        assert_eq!(status_of(451, ""), "4.0.0");
        assert_eq!(status_of(250, ""), "2.0.0");
    }
}
