use super::*;
use mail_parser::{MessageParser, MimeHeaders};

const LIMITS: Limits = Limits {
    size_max: 1 << 20,
    line_len_max: 1000,
};

const STAMP: Stamp<'static> = Stamp {
    message_id: "0001@mx.example",
    unix_s: 1_700_000_000,
};

fn request(json: &str) -> InjectV1Request {
    serde_json::from_str(json).expect("request parses")
}

fn messages(req: &InjectV1Request) -> Vec<Result<String, RecipientError>> {
    let g = Generator::new(req, LIMITS).expect("request compiles");
    req.recipients
        .iter()
        .map(|r| {
            g.message_for(r, STAMP)
                .map(|m| String::from_utf8(m.message).expect("utf-8"))
        })
        .collect()
}

#[test]
fn raw_content_is_a_template_per_recipient_with_crlf_line_ends() {
    let req = request(
        r#"{"envelope_sender": "noreply@example.com",
            "content": "To: \"{{ name }}\" <{{ email }}>\nSubject: hi {{ first }}\n\nHello {{ first }} from {{ team }}\n",
            "substitutions": {"team": "Sales", "first": "nobody"},
            "recipients": [
                {"email": "a@example.net", "name": "Ann", "substitutions": {"first": "Ann"}},
                {"email": "b@example.net"}
            ]}"#,
    );
    let out = messages(&req);
    let a = out[0].as_ref().expect("a");
    assert_eq!(
        a,
        "To: \"Ann\" <a@example.net>\r\nSubject: hi Ann\r\n\r\nHello Ann from Sales\r\n"
    );
    // No name: undefined, so empty (not "none"); the global `first` applies.
    let b = out[1].as_ref().expect("b");
    assert_eq!(
        b,
        "To: \"\" <b@example.net>\r\nSubject: hi nobody\r\n\r\nHello nobody from Sales\r\n"
    );
}

#[test]
fn a_recipients_substitutions_win_over_email_name_and_the_globals() {
    let req = request(
        r#"{"envelope_sender": "", "content": "X: {{ email }} {{ name }} {{ to_header }} {{ v }}\n\nb",
            "substitutions": {"v": "global", "email": "not-this"},
            "recipients": [
                {"email": "a@example.net", "name": "A \"B\"", "substitutions": {"v": "own"}},
                {"email": "c@example.net", "substitutions": {"name": "Own name"}}
            ]}"#,
    );
    let out = messages(&req);
    assert_eq!(
        out[0].as_ref().expect("a"),
        "X: a@example.net A \"B\" \"A \\\"B\\\"\" <a@example.net> own\r\n\r\nb"
    );
    assert_eq!(
        out[1].as_ref().expect("c"),
        "X: c@example.net Own name c@example.net global\r\n\r\nb"
    );
}

#[test]
fn a_builder_makes_alternative_parts_an_attachment_and_escapes_html_substitutions() {
    let req = request(
        r#"{"envelope_sender": "noreply@example.com",
            "content": {
                "subject": "Order {{ order }} for {{ name }}",
                "text_body": "Dear {{ name }}, order {{ order }}",
                "html_body": "<p>Dear {{ name }}</p>",
                "from": {"email": "shop@example.com", "name": "The Shop"},
                "reply_to": {"email": "help@example.com"},
                "headers": {"X-Campaign": "fall-{{ order }}", "message-id": "<given@example.com>"},
                "attachments": [
                    {"data": "R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7", "base64": true,
                     "content_type": "image/gif", "file_name": "pixel.gif"}
                ]
            },
            "recipients": [{"email": "ann@example.net", "name": "Ann <b>", "substitutions": {"order": 42}}]}"#,
    );
    let out = messages(&req);
    let raw = out[0].as_ref().expect("built");
    assert!(raw.contains("\r\n") && !raw.replace("\r\n", "").contains('\n'));
    let m = MessageParser::default()
        .parse(raw.as_bytes())
        .expect("MIME");
    assert_eq!(m.subject(), Some("Order 42 for Ann <b>"));
    assert_eq!(m.body_text(0).as_deref(), Some("Dear Ann <b>, order 42"));
    let html = m.body_html(0).expect("html");
    assert!(html.contains("<p>Dear Ann &lt;b&gt;</p>"), "{html}");
    let from = m.from().and_then(|a| a.first()).expect("from");
    assert_eq!(from.address(), Some("shop@example.com"));
    assert_eq!(from.name(), Some("The Shop"));
    let to = m.to().and_then(|a| a.first()).expect("to");
    assert_eq!(to.address(), Some("ann@example.net"));
    assert_eq!(
        m.reply_to()
            .and_then(|a| a.first())
            .and_then(|a| a.address()),
        Some("help@example.com")
    );
    assert_eq!(m.header_raw("X-Campaign").map(str::trim), Some("fall-42"));
    // The client's Message-ID (in lower case) is kept, not doubled; Date is ours.
    assert_eq!(raw.matches("Message-ID:").count(), 1, "{raw}");
    assert_eq!(m.message_id(), Some("given@example.com"));
    assert_eq!(
        m.date().map(|d| d.to_timestamp()),
        Some(STAMP.unix_s as i64)
    );
    assert_eq!(m.content_type().map(|c| c.ctype()), Some("multipart"));
    assert_eq!(m.content_type().and_then(|c| c.subtype()), Some("mixed"));
    assert_eq!(m.attachment_count(), 1);
    let gif = m.attachment(0).expect("attachment");
    assert_eq!(gif.attachment_name(), Some("pixel.gif"));
    assert_eq!(gif.contents()[..6], *b"GIF89a");
}

#[test]
fn an_inline_attachment_goes_with_the_html_in_multipart_related() {
    let req = request(
        r#"{"envelope_sender": "s@example.com",
            "content": {"text_body": "t", "html_body": "<img src=\"cid:logo\">",
                "attachments": [{"data": "PNG!", "content_type": "image/png", "content_id": "logo"}]},
            "recipients": [{"email": "r@example.net"}]}"#,
    );
    let raw = messages(&req).remove(0).expect("built");
    let m = MessageParser::default()
        .parse(raw.as_bytes())
        .expect("MIME");
    assert_eq!(
        m.content_type().and_then(|c| c.subtype()),
        Some("alternative")
    );
    assert!(raw.contains("multipart/related"), "{raw}");
    assert!(raw.contains("Content-ID: <logo>"), "{raw}");
    // The Message-ID and Date come from the stamp when the client gives none.
    assert_eq!(m.message_id(), Some("0001@mx.example"));
    assert_eq!(m.body_text(0).as_deref(), Some("t"));
}

#[test]
fn request_errors_refuse_the_whole_request() {
    let err = |json: &str| match Generator::new(&request(json), LIMITS) {
        Err(e) => e,
        Ok(_) => panic!("accepted: {json}"),
    };
    let rcpt = r#""recipients": [{"email": "r@example.net"}]"#;
    assert_eq!(
        err(&format!(
            r#"{{"envelope_sender": "not an address", "content": "x", {rcpt}}}"#
        )),
        RequestError::Sender("not an address".into())
    );
    assert_eq!(
        err(r#"{"envelope_sender": "s@example.com", "content": "x", "recipients": []}"#),
        RequestError::NoRecipients
    );
    assert_eq!(
        err(&format!(
            r#"{{"envelope_sender": "s@example.com", "content": {{"subject": "x"}}, {rcpt}}}"#
        )),
        RequestError::NoBody
    );
    assert_eq!(
        err(&format!(
            r#"{{"envelope_sender": "s@example.com", "content": {{"text_body": "x", "headers": {{"Bad Name": "v"}}}}, {rcpt}}}"#
        )),
        RequestError::HeaderName("Bad Name".into())
    );
    assert!(matches!(
        err(&format!(
            r#"{{"envelope_sender": "s@example.com", "content": "Subject: {{{{ oops\n\nx", {rcpt}}}"#
        )),
        RequestError::Template { part, .. } if part == "content"
    ));
    assert_eq!(
        err(&format!(
            r#"{{"envelope_sender": "s@example.com", "content": "x", "template_dialect": "Handlebars", {rcpt}}}"#
        )),
        RequestError::Dialect(TemplateDialect::Handlebars)
    );
    assert!(matches!(
        err(&format!(
            r#"{{"envelope_sender": "s@example.com", "content": {{"text_body": "x",
                "attachments": [{{"data": "!!", "base64": true, "content_type": "image/gif"}}]}}, {rcpt}}}"#
        )),
        RequestError::Attachment(0, _)
    ));
    assert!(matches!(
        err(&format!(
            r#"{{"envelope_sender": "s@example.com", "content": {{"text_body": "x",
                "attachments": [{{"data": "x", "content_type": "gif"}}]}}, {rcpt}}}"#
        )),
        RequestError::Attachment(0, _)
    ));
    assert_eq!(
        err(&format!(
            r#"{{"envelope_sender": "s@example.com", "content": {{"text_body": "x", "from": {{"email": "nope"}}}}, {rcpt}}}"#
        )),
        RequestError::Address("from", "nope".into())
    );
}

#[test]
fn json_shape_errors_name_the_field() {
    let err = |json: &str| {
        serde_json::from_str::<InjectV1Request>(json)
            .expect_err(json)
            .to_string()
    };
    assert!(err(r#"{"content": "x", "recipients": []}"#).contains("envelope_sender"));
    assert!(
        err(r#"{"envelope_sender": "a@b.c", "content": 5, "recipients": []}"#)
            .contains("content: expected a string")
    );
    assert!(
        err(r#"{"envelope_sender": "a@b.c", "content": "x", "recipients": "r@x.y"}"#)
            .contains("expected a sequence")
    );
    assert!(
        err(r#"{"envelope_sender": "a@b.c", "content": {"text_body": 7}, "recipients": []}"#)
            .contains("content: invalid type")
    );
    // Fields KumoMTA has and we ignore are accepted.
    let req = request(
        r#"{"envelope_sender": "a@b.c", "content": "x", "deferred_generation": true,
            "trace_headers": {"received_header": false}, "deferred_spool": false,
            "recipients": [{"email": "r@x.y", "metadata": {"k": "v"}}]}"#,
    );
    assert!(req.deferred_generation);
}

#[test]
fn recipient_errors_fail_that_recipient_only() {
    let req = request(
        r#"{"envelope_sender": "s@example.com",
            "content": {"subject": "{{ who.first }}", "text_body": "x", "headers": {"X-Tag": "{{ tag }}"}},
            "recipients": [
                {"email": "ok@example.net", "substitutions": {"who": {"first": "Ann"}, "tag": "t"}},
                {"email": "not an address"},
                {"email": "nowho@example.net"},
                {"email": "inject@example.net", "substitutions": {"who": {"first": "x"}, "tag": "a\r\nBcc: evil@example.org"}}
            ]}"#,
    );
    let out = messages(&req);
    assert!(out[0].is_ok(), "{:?}", out[0]);
    assert_eq!(
        out[1],
        Err(RecipientError::Address("not an address".into()))
    );
    assert!(
        matches!(&out[2], Err(RecipientError::Template { part, .. }) if part == "subject"),
        "{:?}",
        out[2]
    );
    assert_eq!(out[3], Err(RecipientError::HeaderBreak("X-Tag".into())));
}

#[test]
fn a_runaway_template_runs_out_of_fuel() {
    let req = request(
        r#"{"envelope_sender": "s@example.com",
            "content": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "recipients": [{"email": "r@example.net"}]}"#,
    );
    assert!(matches!(
        &messages(&req)[0],
        Err(RecipientError::Template { .. })
    ));
}

#[test]
fn static_dialect_uses_the_text_as_given() {
    let req = request(
        r#"{"envelope_sender": "s@example.com", "template_dialect": "Static",
            "content": "Subject: {{ name }}\n\n{% raw %}", "recipients": [{"email": "r@example.net", "name": "N"}]}"#,
    );
    assert_eq!(
        messages(&req)[0].as_deref(),
        Ok("Subject: {{ name }}\r\n\r\n{% raw %}")
    );
}

#[test]
fn the_smtp_limits_apply_to_generated_messages() {
    let long = "x".repeat(1200);
    let req = request(&format!(
        r#"{{"envelope_sender": "s@example.com", "content": "Subject: s\n\n{{{{ body }}}}",
            "recipients": [{{"email": "a@example.net", "substitutions": {{"body": "{long}"}}}},
                           {{"email": "b@example.net", "substitutions": {{"body": "short"}}}}]}}"#
    ));
    let out = messages(&req);
    assert_eq!(
        out[0],
        Err(RecipientError::LineTooLong {
            len: 1202,
            max: 1000
        })
    );
    assert!(out[1].is_ok());
    let small = Limits {
        size_max: 10,
        line_len_max: 1000,
    };
    let g = Generator::new(&req, small).expect("compiles");
    assert!(matches!(
        g.message_for(&req.recipients[1], STAMP),
        Err(RecipientError::TooBig { max: 10, .. })
    ));
}

#[test]
fn line_ends_become_crlf() {
    assert_eq!(
        generate::crlf_for_tests(b"a\nb\r\nc\rd"),
        b"a\r\nb\r\nc\r\nd"
    );
}

#[test]
fn the_response_reads_as_kumomtas() {
    let mut r = InjectV1Response::default();
    r.succeeded();
    r.failed(
        "x@example.net",
        RecipientError::Address("x@example.net".into()),
    );
    let json = serde_json::to_value(&r).expect("json");
    assert_eq!(
        json,
        serde_json::json!({
            "success_count": 1, "fail_count": 1,
            "failed_recipients": ["x@example.net"],
            "errors": ["x@example.net: `x@example.net` is not an email address"]
        })
    );
}
