//! The HTTP endpoint against the real binary: probes, the loopback-only default, tokens and
//! roles, the session cookie, the KumoMTA-shaped admin API with real mail queued, the audit
//! log, bad input, keep-alive and HTTPS. The client is Python's urllib (tests/common).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{dead_port, http_get, http_json, http_request, wait_until, Epoxi, Inject, Opts};
use serde_json::{json, Value};

fn epoxi_cmd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_epoxi"))
        .args(args)
        .output()
        .expect("run epoxi")
}

fn add_token(file: &Path, role: &str, name: &str) -> String {
    let out = epoxi_cmd(&[
        "token",
        "add",
        "--file",
        file.to_str().expect("utf8"),
        "--role",
        role,
        "--name",
        name,
    ]);
    assert!(
        out.status.success(),
        "token add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_owned()
}

fn audit_lines(epoxi: &Epoxi) -> Vec<Value> {
    let text = std::fs::read_to_string(epoxi.log_dir.join("audit.jsonl")).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
        .collect()
}

/// Raw bytes over one TCP connection; everything the server sent until it closed or `wait`.
fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(wait)).expect("timeout");
    s.write_all(bytes).expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn probes_loopback_default_and_bad_input() {
    let dir = tempfile::tempdir().expect("tmp");
    let opts = Opts::new(dir.path())
        .shards(2)
        .http()
        .set("http", "body_max", "4096");
    let epoxi = Epoxi::start(&opts);
    let url = epoxi.http_url();

    let live = http_get(&format!("{url}/api/check-liveness/v1"), None);
    assert_eq!(live.status, 200);
    let ready = http_get(&format!("{url}/api/check-readiness/v1"), None);
    assert_eq!(
        (ready.status, ready.json()["ready"].clone()),
        (200, json!(true))
    );

    // No tokens configured: loopback clients have every role.
    let who = http_get(&format!("{url}/api/whoami/v1"), None).json();
    assert_eq!(who, json!({"name": "loopback", "role": "admin"}));
    let summary = http_get(&format!("{url}/api/admin/summary/v1"), None);
    assert_eq!(summary.status, 200, "{}", summary.text());
    assert_eq!(summary.json()["shards"], 2);

    // Bad input: every error is JSON with a 4xx.
    let cases: Vec<(u16, common::HttpReply)> = vec![
        (404, http_get(&format!("{url}/api/nothing/v1"), None)),
        (
            400,
            http_request(
                "POST",
                &format!("{url}/api/admin/suspend/v1"),
                &[("Content-Type", "application/json")],
                Some(b"{not json"),
            ),
        ),
        (
            400,
            http_json(
                "POST",
                &format!("{url}/api/admin/suspend/v1"),
                None,
                &json!({"reason": "no selector"}),
            ),
        ),
        (
            400,
            http_json(
                "POST",
                &format!("{url}/api/admin/suspend/v1"),
                None,
                &json!({"domain": "a.test", "tenant": "t", "reason": "both"}),
            ),
        ),
        (
            405,
            http_request(
                "PUT",
                &format!("{url}/api/admin/suspend/v1"),
                &[],
                Some(b"{}"),
            ),
        ),
        (
            413,
            http_request(
                "POST",
                &format!("{url}/api/admin/suspend/v1"),
                &[("Content-Type", "application/json")],
                Some(&vec![b' '; 5000]),
            ),
        ),
    ];
    for (want, reply) in &cases {
        assert_eq!(reply.status, *want, "{}", reply.text());
        assert!(
            reply.json()["error"]
                .as_str()
                .is_some_and(|e| !e.is_empty()),
            "{}",
            reply.text()
        );
        assert_eq!(reply.header("content-type"), Some("application/json"));
    }

    // Garbage on the socket: a 400 and the connection closes (no hang, no crash).
    let garbage = raw_exchange(
        epoxi.http_addr(),
        b"\x16\x03\x01garbage\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
    // Keep-alive: two requests on one connection, answered in order.
    let two = raw_exchange(
        epoxi.http_addr(),
        b"GET /api/check-liveness/v1 HTTP/1.1\r\nHost: x\r\n\r\nGET /api/whoami/v1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert_eq!(two.matches("HTTP/1.1 200 OK").count(), 2, "{two}");
    assert!(two.find("alive") < two.find("loopback"), "{two}");
    // A request that never completes is cut off with 408 (request_timeout_ms).
    drop(epoxi);
    let opts = Opts::new(dir.path())
        .shards(2)
        .http()
        .set("http", "request_timeout_ms", "500");
    let epoxi = Epoxi::start(&opts);
    let slow = raw_exchange(
        epoxi.http_addr(),
        b"GET / HTTP/1.1\r\nHo",
        Duration::from_secs(5),
    );
    assert!(slow.starts_with("HTTP/1.1 408"), "{slow}");
    assert!(epoxi.stderr().lines().all(|l| !l.contains("panicked")));
}

#[test]
fn tokens_roles_cookie_and_audit() {
    let dir = tempfile::tempdir().expect("tmp");
    let tokens = dir.path().join("tokens");
    let viewer = add_token(&tokens, "viewer", "grafana");
    let operator = add_token(&tokens, "operator", "oncall");
    let injector = add_token(&tokens, "injector", "app");
    let admin = add_token(&tokens, "admin", "root");
    assert!(viewer.starts_with("epx_") && viewer.len() > 40, "{viewer}");
    let stored = std::fs::read_to_string(&tokens).expect("tokens file");
    for t in [&viewer, &operator, &injector, &admin] {
        assert!(
            !stored.contains(t.as_str()),
            "a token is stored in the clear"
        );
    }
    let list = epoxi_cmd(&["token", "list", "--file", tokens.to_str().expect("utf8")]);
    let listed = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(
        listed.contains("grafana\tviewer") && listed.contains("root\tadmin"),
        "{listed}"
    );
    let dup = epoxi_cmd(&[
        "token",
        "add",
        "--file",
        tokens.to_str().expect("utf8"),
        "--role",
        "viewer",
        "--name",
        "grafana",
    ]);
    assert!(!dup.status.success());
    let bad_role = epoxi_cmd(&[
        "token",
        "add",
        "--file",
        tokens.to_str().expect("utf8"),
        "--role",
        "god",
        "--name",
        "x",
    ]);
    assert!(!bad_role.status.success());

    let opts = Opts::new(dir.path()).shards(2).http().set(
        "http",
        "tokens_file",
        &format!("{:?}", tokens.to_str().expect("utf8")),
    );
    let epoxi = Epoxi::start(&opts);
    let url = epoxi.http_url();
    let summary_url = format!("{url}/api/admin/summary/v1");
    let suspend_url = format!("{url}/api/admin/suspend/v1");

    // Probes need no token; everything else does.
    assert_eq!(
        http_get(&format!("{url}/api/check-liveness/v1"), None).status,
        200
    );
    let none = http_get(&summary_url, None);
    assert_eq!(none.status, 401, "{}", none.text());
    assert!(none.json()["error"].as_str().is_some());
    let unknown = http_get(&summary_url, Some("epx_not-a-token"));
    assert_eq!(unknown.status, 401);

    assert_eq!(http_get(&summary_url, Some(&viewer)).status, 200);
    let body = json!({"domain": "held.test", "reason": "maintenance", "duration": "10m"});
    let denied = http_json("POST", &suspend_url, Some(&viewer), &body);
    assert_eq!(denied.status, 403, "{}", denied.text());
    assert!(denied.json()["error"]
        .as_str()
        .expect("error")
        .contains("operator"));
    assert_eq!(http_get(&summary_url, Some(&injector)).status, 403);
    let reload = http_json(
        "POST",
        &format!("{url}/api/admin/reload/v1"),
        Some(&operator),
        &json!({}),
    );
    assert_eq!(reload.status, 403, "an operator cannot reload");

    let suspended = http_json("POST", &suspend_url, Some(&operator), &body);
    assert_eq!(suspended.status, 200, "{}", suspended.text());
    let id = suspended.json()["id"].as_str().expect("id").to_owned();
    let listed = http_get(&suspend_url, Some(&viewer)).json();
    assert!(
        listed
            .as_array()
            .expect("list")
            .iter()
            .any(|s| s["selector"] == "domain held.test"),
        "{listed}"
    );
    let lifted = http_json(
        "DELETE",
        &suspend_url,
        Some(&operator),
        &json!({ "id": id }),
    );
    assert_eq!(lifted.status, 200, "{}", lifted.text());
    assert_eq!(lifted.json()["lifted"], 2, "{}", lifted.text());

    // The dashboard's login: a token becomes an HttpOnly, SameSite=Strict session cookie.
    let page = http_get(&format!("{url}/"), None);
    assert_eq!(page.status, 401);
    assert!(page.text().contains("<form"), "{}", page.text());
    let login = http_request(
        "POST",
        &format!("{url}/login"),
        &[("Content-Type", "application/x-www-form-urlencoded")],
        Some(format!("token={operator}").as_bytes()),
    );
    assert_eq!(login.status, 303, "{}", login.text());
    let cookie = login.header("set-cookie").expect("set-cookie").to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().expect("pair").to_owned();
    let with_cookie = http_request("GET", &summary_url, &[("Cookie", &pair)], None);
    assert_eq!(with_cookie.status, 200);
    let by_query = http_get(&format!("{url}/?token={viewer}"), None);
    assert_eq!(by_query.status, 303);
    assert!(by_query.header("set-cookie").is_some());
    let wrong = http_request(
        "POST",
        &format!("{url}/login"),
        &[("Content-Type", "application/x-www-form-urlencoded")],
        Some(b"token=epx_wrong"),
    );
    assert_eq!(wrong.status, 401);
    assert!(wrong.header("set-cookie").is_none());

    // The CLI over HTTP: the same operations with --url and --token.
    let out = epoxi_cmd(&[
        "queue", "summary", "--url", &url, "--token", &viewer, "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(answer["shards"], 2);
    let out = epoxi_cmd(&[
        "suspend", "--domain", "cli.test", "--url", &url, "--token", &viewer,
    ]);
    assert!(!out.status.success(), "a viewer's suspend must fail");

    // Tokens over HTTP (admin only); a removed token stops working.
    let tokens_url = format!("{url}/api/admin/tokens/v1");
    assert_eq!(http_get(&tokens_url, Some(&operator)).status, 403);
    let made = http_json(
        "POST",
        &tokens_url,
        Some(&admin),
        &json!({"name": "temp", "role": "viewer"}),
    );
    assert_eq!(made.status, 200, "{}", made.text());
    let temp = made.json()["token"].as_str().expect("token").to_owned();
    wait_until("the new token works", Duration::from_secs(5), || {
        http_get(&summary_url, Some(&temp)).status == 200
    });
    let removed = http_json(
        "DELETE",
        &tokens_url,
        Some(&admin),
        &json!({"name": "temp"}),
    );
    assert_eq!(removed.status, 200, "{}", removed.text());
    wait_until(
        "the removed token is refused",
        Duration::from_secs(5),
        || http_get(&summary_url, Some(&temp)).status == 401,
    );

    // Every admin call is in the audit log: who, what, from where, the result.
    let lines = audit_lines(&epoxi);
    let find = |who: &str, what: &str, status: u64| {
        lines.iter().any(|l| {
            l["who"] == who
                && l["what"].as_str().is_some_and(|w| w == what)
                && l["status"] == status
        })
    };
    assert!(
        find("oncall", "POST /api/admin/suspend/v1", 200),
        "{lines:#?}"
    );
    assert!(
        find("oncall", "DELETE /api/admin/suspend/v1", 200),
        "{lines:#?}"
    );
    assert!(
        find("grafana", "POST /api/admin/suspend/v1", 403),
        "{lines:#?}"
    );
    assert!(find("-", "GET /api/admin/summary/v1", 401), "{lines:#?}");
    assert!(find("root", "POST /api/admin/tokens/v1", 200), "{lines:#?}");
    assert!(lines
        .iter()
        .all(|l| l["from"] == "127.0.0.1" && l["ts_ms"].as_u64().is_some()));
    let audit_text = std::fs::read_to_string(epoxi.log_dir.join("audit.jsonl")).expect("audit");
    assert!(
        !audit_text.contains(&temp),
        "a new token leaked into the audit log"
    );
    let suspend_line = lines
        .iter()
        .find(|l| l["what"] == "POST /api/admin/suspend/v1" && l["status"] == 200)
        .expect("line");
    assert_eq!(suspend_line["args"]["selector"]["domain"], "held.test");
    assert_eq!(suspend_line["role"], "operator");
}

#[test]
fn admin_api_acts_on_queued_mail() {
    let dir = tempfile::tempdir().expect("tmp");
    // Mail to a closed port stays queued (deferred), so the operations have work.
    let opts = Opts::new(dir.path()).shards(2).http().route(dead_port());
    let epoxi = Epoxi::start(&opts);
    let url = epoxi.http_url();
    let report = Inject::new(20).domains(4).run(dir.path(), epoxi.port);
    assert_eq!(report.count("accepted"), 20, "{:?}", report.json);
    wait_until("20 queued", Duration::from_secs(10), || {
        http_get(&format!("{url}/api/admin/summary/v1"), None).json()["messages"] == 20
    });
    let inspect = http_get(
        &format!("{url}/api/admin/inspect/v1?domain=d0.test&limit=50"),
        None,
    );
    assert_eq!(inspect.status, 200, "{}", inspect.text());
    let shown = inspect.json()["messages"].as_array().map_or(0, Vec::len);
    assert!(shown > 0, "{}", inspect.text());
    // One message, its body read from the spool on demand.
    let id = inspect.json()["messages"][0]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let one = http_get(
        &format!("{url}/api/admin/inspect-message/v1?id={id}&want_body=true"),
        None,
    );
    assert_eq!(one.status, 200, "{}", one.text());
    let one = one.json();
    assert_eq!(one["id"], id.as_str());
    assert!(
        one["message"]["recipient"][0]
            .as_str()
            .is_some_and(|r| r.ends_with("@d0.test")),
        "{one}"
    );
    let data = one["message"]["data"].as_str().expect("data");
    assert!(
        data.contains("Received:") && data.contains("\r\n\r\n"),
        "{data}"
    );
    let meta_only = http_get(&format!("{url}/api/admin/inspect-message/v1?id={id}"), None).json();
    assert!(meta_only["message"]["data"].is_null(), "{meta_only}");
    let missing = http_get(&format!("{url}/api/admin/inspect-message/v1?id=nope"), None);
    assert_eq!(missing.status, 404);
    // KumoMTA's bounce body: every queued message of the domain bounces now.
    let bounced = http_json(
        "POST",
        &format!("{url}/api/admin/bounce/v1"),
        None,
        &json!({"domain": "d0.test", "reason": "list cleanup", "duration": "1m"}),
    );
    assert_eq!(bounced.status, 200, "{}", bounced.text());
    let answer = bounced.json();
    assert_eq!(
        answer["total_bounced"].as_u64(),
        Some(shown as u64),
        "{answer}"
    );
    assert_eq!(answer["id"], "domain:d0.test");
    wait_until("the domain's mail is gone", Duration::from_secs(10), || {
        http_get(&format!("{url}/api/admin/summary/v1"), None).json()["messages"]
            == 20 - shown as u64
    });
    let flushed = http_json(
        "POST",
        &format!("{url}/api/admin/flush/v1"),
        None,
        &json!({}),
    );
    assert_eq!(flushed.status, 200, "{}", flushed.text());
    // The socket's request line works as a body too.
    let raw = http_json(
        "POST",
        &format!("{url}/api/admin/op/v1"),
        None,
        &json!({"op": "summary"}),
    );
    assert_eq!(raw.status, 200);
    let reload = http_json(
        "POST",
        &format!("{url}/api/admin/reload/v1"),
        None,
        &json!({}),
    );
    assert_eq!(reload.status, 200, "{}", reload.text());
    assert!(reload.json()["applied"].is_array(), "{}", reload.text());
}

#[test]
fn https_with_the_smtp_certificate() {
    let dir = tempfile::tempdir().expect("tmp");
    let opts = Opts::new(dir.path()).http().set("http", "tls", "true");
    let epoxi = Epoxi::start(&opts);
    let url = format!("https://{}", epoxi.http_addr());
    let live = http_get(&format!("{url}/api/check-liveness/v1"), None);
    assert_eq!(live.status, 200, "{}", live.text());
    let summary = http_get(&format!("{url}/api/admin/summary/v1"), None);
    assert_eq!(summary.status, 200);
    // Plain HTTP to the TLS port is not answered as HTTP.
    let plain = raw_exchange(
        epoxi.http_addr(),
        b"GET /api/check-liveness/v1 HTTP/1.1\r\n\r\n",
        Duration::from_secs(3),
    );
    assert!(!plain.contains("alive"), "{plain}");
}
