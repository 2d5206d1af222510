//! HTTP injection (`POST /api/inject/v1`, KumoMTA's API) end to end: Python's urllib posts
//! to the real binary on loopback, the messages are delivered to aiosmtpd (or the loadgen
//! sink) and read there with Python's `email` package, as a receiver would.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// The HTTP address the server said it serves on.
fn http_addr(epoxi: &Epoxi) -> String {
    let err = epoxi.stderr();
    let line = err
        .lines()
        .find_map(|l| l.split("http api on ").nth(1))
        .unwrap_or_else(|| panic!("no `http api on` line:\n{err}"));
    line.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn with_http(opts: Opts) -> Opts {
    opts.set("http", "listen", "\"127.0.0.1:0\"")
}

/// POSTs `body` to `path` with urllib; the status and the JSON answer.
fn post(epoxi: &Epoxi, dir: &Path, path: &str, body: &[u8], token: Option<&str>) -> (u16, Value) {
    let file = dir.join("request.json");
    std::fs::write(&file, body).expect("write request");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/http_post.py");
    let url = format!("http://{}{path}", http_addr(epoxi));
    let mut cmd = Command::new("python3");
    cmd.arg(script).arg(&url).arg(&file);
    if let Some(t) = token {
        cmd.arg(t);
    }
    let out = cmd.output().expect("run python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, body) = text.split_once('\n').unwrap_or((&text, ""));
    let status: u16 = status
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("status in {text}"));
    let value = serde_json::from_str(body).unwrap_or_else(|e| panic!("JSON answer ({e}): {body}"));
    (status, value)
}

fn inject(epoxi: &Epoxi, dir: &Path, request: &Value, token: Option<&str>) -> (u16, Value) {
    post(
        epoxi,
        dir,
        "/api/inject/v1",
        request.to_string().as_bytes(),
        token,
    )
}

/// Every message aiosmtpd stored in `store`, as Python's `email` reads it.
fn received(store: &Path) -> Vec<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/mime_summary.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(store)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("summary JSON")
}

fn stored_count(store: &Path) -> usize {
    std::fs::read_dir(store)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
                .count()
        })
        .unwrap_or(0)
}

fn by_rcpt<'a>(messages: &'a [Value], rcpt: &str) -> &'a Value {
    messages
        .iter()
        .find(|m| m["rcpt"] == rcpt)
        .unwrap_or_else(|| panic!("nothing for {rcpt} in {messages:#?}"))
}

const GIF: &str = "R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7";

#[test]
fn raw_and_built_messages_arrive_with_each_recipients_substitutions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let port = dead_port();
    let _aiosmtpd = Aiosmtpd::start(port, &store);
    let epoxi = Epoxi::start(&with_http(Opts::new(dir.path()).shards(2).route(port)));

    let raw = json!({
        "envelope_sender": "bounces@sender.test",
        "content": "From: shop@sender.test\nTo: {{ to_header }}\nSubject: Hello {{ name }}\n\nHi {{ name }}, your code is {{ code }}.\n",
        "substitutions": {"code": "GLOBAL"},
        "recipients": [
            {"email": "ann@d1.test", "name": "Ann", "substitutions": {"code": "A1"}},
            {"email": "bob@d2.test", "name": "Bob"},
            {"email": "not an address"}
        ]
    });
    let (status, answer) = inject(&epoxi, dir.path(), &raw, None);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["success_count"], 2, "{answer}");
    assert_eq!(answer["fail_count"], 1, "{answer}");
    assert_eq!(answer["failed_recipients"], json!(["not an address"]));
    assert!(
        answer["errors"][0]
            .as_str()
            .is_some_and(|e| e.starts_with("not an address: ")),
        "{answer}"
    );

    let built = json!({
        "envelope_sender": "bounces@sender.test",
        "content": {
            "subject": "Order {{ order }} for {{ name }}",
            "text_body": "Dear {{ name }},\nyour order {{ order }} ships {{ when }}.\n",
            "html_body": "<p>Dear {{ name }}, order <b>{{ order }}</b></p><img src=\"cid:logo\">",
            "from": {"email": "shop@sender.test", "name": "The Shop"},
            "reply_to": {"email": "help@sender.test"},
            "headers": {"X-Custom": "c-{{ order }}"},
            "attachments": [
                {"data": GIF, "base64": true, "content_type": "image/gif", "file_name": "invoice.gif"},
                {"data": GIF, "base64": true, "content_type": "image/gif", "content_id": "logo"}
            ]
        },
        "substitutions": {"when": "today"},
        "recipients": [
            {"email": "carol@d3.test", "name": "Carol <3", "substitutions": {"order": 17}},
            {"email": "dave@d4.test", "name": "Dave", "substitutions": {"order": 18, "when": "tomorrow"}}
        ]
    });
    let (status, answer) = inject(&epoxi, dir.path(), &built, None);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        json!({"success_count": 2, "fail_count": 0, "failed_recipients": [], "errors": []})
    );

    wait_until("4 messages at aiosmtpd", Duration::from_secs(30), || {
        stored_count(&store) >= 4
    });
    let messages = received(&store);
    assert_eq!(messages.len(), 4, "{messages:#?}");
    for m in &messages {
        assert_eq!(m["sender"], "bounces@sender.test");
        // Received as a submission over HTTP: our trace header on top, Date and one
        // Message-ID (ours when the client gave none).
        assert!(
            m["first_line"]
                .as_str()
                .is_some_and(|l| l.starts_with("Received: from [127.0.0.1]")),
            "{m}"
        );
        assert!(
            m["received"]
                .as_str()
                .is_some_and(|r| r.contains("with HTTP")),
            "{m}"
        );
        assert!(
            m["message_id"]
                .as_str()
                .is_some_and(|i| i.contains("@mx.epoxi.test")),
            "{m}"
        );
        assert_eq!(m["message_ids"], 1, "{m}");
        assert!(m["date"].as_str().is_some_and(|d| !d.is_empty()), "{m}");
        assert_eq!(m["defects"], json!([]), "{m}");
    }
    let ann = by_rcpt(&messages, "ann@d1.test");
    assert_eq!(ann["subject"], "Hello Ann");
    assert_eq!(ann["to"], "Ann <ann@d1.test>");
    assert!(
        ann["text"]
            .as_str()
            .is_some_and(|t| t.contains("Hi Ann, your code is A1.")),
        "{ann}"
    );
    let bob = by_rcpt(&messages, "bob@d2.test");
    assert!(
        bob["text"]
            .as_str()
            .is_some_and(|t| t.contains("your code is GLOBAL.")),
        "{bob}"
    );

    let carol = by_rcpt(&messages, "carol@d3.test");
    assert_eq!(carol["subject"], "Order 17 for Carol <3");
    assert_eq!(carol["from"], "The Shop <shop@sender.test>");
    assert_eq!(carol["reply_to"], "help@sender.test");
    assert_eq!(carol["x_custom"], "c-17");
    assert_eq!(carol["content_type"], "multipart/mixed");
    for part in [
        "multipart/alternative",
        "multipart/related",
        "text/plain",
        "text/html",
    ] {
        assert!(
            carol["parts"]
                .as_array()
                .is_some_and(|p| p.iter().any(|x| x == part)),
            "{carol}"
        );
    }
    assert!(
        carol["text"]
            .as_str()
            .is_some_and(|t| t.contains("your order 17 ships today.")),
        "{carol}"
    );
    // Substituted into HTML, the name is escaped.
    assert!(
        carol["html"]
            .as_str()
            .is_some_and(|h| h.contains("Dear Carol &lt;3, order <b>17</b>")),
        "{carol}"
    );
    let attachments = carol["attachments"].as_array().expect("attachments");
    let invoice = attachments
        .iter()
        .find(|a| a["file_name"] == "invoice.gif")
        .unwrap_or_else(|| panic!("no invoice.gif in {carol}"));
    assert_eq!(invoice["content_type"], "image/gif");
    assert_eq!(invoice["data_b64"], GIF);
    let dave = by_rcpt(&messages, "dave@d4.test");
    assert_eq!(dave["subject"], "Order 18 for Dave");
    assert!(
        dave["text"]
            .as_str()
            .is_some_and(|t| t.contains("your order 18 ships tomorrow.")),
        "{dave}"
    );
    // The event log is written behind delivery: wait for its lines, then count them.
    epoxi.wait_events("Reception", 4);
    let receptions = epoxi.events_of("Reception");
    assert_eq!(receptions.len(), 4, "{receptions:#?}");
}

#[test]
fn ten_thousand_recipients_in_one_request_are_all_delivered() {
    const RECIPIENTS: usize = 10_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]);
    let epoxi = Epoxi::start(&with_http(
        Opts::new(dir.path())
            .shards(2)
            .route(sink.port)
            .set("queue", "messages_max", "20000"),
    ));
    let recipients: Vec<Value> = (0..RECIPIENTS)
        .map(|i| json!({"email": format!("user{i}@d{}.test", i % 37), "substitutions": {"n": i}}))
        .collect();
    let request = json!({
        "envelope_sender": "bulk@sender.test",
        "content": {"subject": "Bulk {{ n }}", "text_body": "Message {{ n }} for {{ email }}\n"},
        "recipients": recipients,
    });
    let (status, answer) = inject(&epoxi, dir.path(), &request, None);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["success_count"], RECIPIENTS, "{}", answer["errors"]);
    assert_eq!(answer["fail_count"], 0);
    epoxi.wait_events_within("Delivery", RECIPIENTS, Duration::from_secs(180));
    let report = sink.stop();
    let mut rcpts: Vec<&str> = report
        .rcpt_lines
        .iter()
        .flat_map(|l| l.split_whitespace().skip(1))
        .collect();
    rcpts.sort_unstable();
    rcpts.dedup();
    assert_eq!(rcpts.len(), RECIPIENTS);
}

#[test]
fn bad_requests_get_4xx_json_errors_and_spool_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let epoxi = Epoxi::start(&with_http(
        Opts::new(dir.path()).set("http", "body_max", "4096"),
    ));
    let d = dir.path();
    let error_of = |(status, answer): (u16, Value)| -> (u16, String) {
        let why = answer["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error in {answer}"))
            .to_owned();
        (status, why)
    };
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("malformed JSON", b"{\"envelope_sender\": ".to_vec(), 400, "invalid JSON"),
        (
            "missing recipients",
            br#"{"envelope_sender": "s@x.test", "content": "x"}"#.to_vec(),
            400,
            "recipients",
        ),
        (
            "content of the wrong type",
            br#"{"envelope_sender": "s@x.test", "content": 3, "recipients": [{"email": "r@x.test"}]}"#.to_vec(),
            400,
            "content: expected a string",
        ),
        (
            "recipients of the wrong type",
            br#"{"envelope_sender": "s@x.test", "content": "x", "recipients": "r@x.test"}"#.to_vec(),
            400,
            "invalid type",
        ),
        (
            "a bad sender",
            br#"{"envelope_sender": "nope", "content": "x", "recipients": [{"email": "r@x.test"}]}"#.to_vec(),
            400,
            "envelope_sender",
        ),
        (
            "no recipients",
            br#"{"envelope_sender": "s@x.test", "content": "x", "recipients": []}"#.to_vec(),
            400,
            "recipients: none given",
        ),
        (
            "a template that does not compile",
            br#"{"envelope_sender": "s@x.test", "content": "Subject: {{ oops\n\nx", "recipients": [{"email": "r@x.test"}]}"#.to_vec(),
            400,
            "template in content",
        ),
        (
            "no body to build",
            br#"{"envelope_sender": "s@x.test", "content": {"subject": "s"}, "recipients": [{"email": "r@x.test"}]}"#.to_vec(),
            400,
            "text_body",
        ),
        (
            "Handlebars",
            br#"{"envelope_sender": "s@x.test", "content": "x", "template_dialect": "Handlebars", "recipients": [{"email": "r@x.test"}]}"#.to_vec(),
            400,
            "template_dialect",
        ),
    ];
    for (what, body, status, needle) in cases {
        let (got, why) = error_of(post(&epoxi, d, "/api/inject/v1", &body, None));
        assert_eq!(got, status, "{what}: {why}");
        assert!(why.contains(needle), "{what}: `{why}` lacks `{needle}`");
    }
    let big = json!({
        "envelope_sender": "s@x.test",
        "content": "x".repeat(8000),
        "recipients": [{"email": "r@x.test"}]
    });
    let (got, why) = error_of(inject(&epoxi, d, &big, None));
    assert_eq!(got, 413, "{why}");
    assert!(why.contains("http.body_max"), "{why}");
    // Nothing of any of these was received.
    assert_eq!(epoxi.events_of("Reception").len(), 0);
}

#[test]
fn an_injector_token_may_inject_and_a_viewer_token_may_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let port = dead_port();
    let _aiosmtpd = Aiosmtpd::start(port, &store);
    let tokens = dir.path().join("tokens");
    let now = 1_700_000_000_000;
    let injector = epoxi::http::access::add_token(
        &tokens,
        "sender-app",
        epoxi::http::access::Role::Injector,
        now,
    )
    .expect("add injector token");
    let viewer =
        epoxi::http::access::add_token(&tokens, "grafana", epoxi::http::access::Role::Viewer, now)
            .expect("add viewer token");
    let epoxi = Epoxi::start(&with_http(Opts::new(dir.path()).route(port).set(
        "http",
        "tokens_file",
        &format!("{:?}", tokens.display().to_string()),
    )));
    let request = json!({
        "envelope_sender": "s@sender.test",
        "content": "Subject: t\n\nbody\n",
        "recipients": [{"email": "r@d1.test"}]
    });
    let (status, answer) = inject(&epoxi, dir.path(), &request, Some(&viewer));
    assert_eq!(status, 403, "{answer}");
    assert!(answer["error"].is_string(), "{answer}");
    let (status, answer) = inject(&epoxi, dir.path(), &request, Some("not-a-token"));
    assert_eq!(status, 401, "{answer}");
    let (status, answer) = inject(&epoxi, dir.path(), &request, None);
    assert_eq!(status, 401, "{answer}");
    let (status, answer) = inject(&epoxi, dir.path(), &request, Some(&injector));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["success_count"], 1, "{answer}");
    wait_until(
        "the injector's message at aiosmtpd",
        Duration::from_secs(30),
        || stored_count(&store) >= 1,
    );
    // The event log is written behind delivery: wait for the line (only the injector's).
    epoxi.wait_events("Reception", 1);
    assert_eq!(epoxi.events_of("Reception").len(), 1);
}
