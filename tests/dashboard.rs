//! The dashboard at `/`, in a real browser (headless chromium over the DevTools protocol):
//! the login form and the session cookie, the figures it shows against `/metrics` while mail
//! flows and once it stopped, the destination site in its table, and an operator's Suspend
//! and Resume buttons, checked in the admin API. Also, without a browser: the static files,
//! the login answers and the cookie's attributes.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::browser::{Browser, Page};
use common::{wait_until, Epoxi, Inject, Opts, Sink, DEADLINE};
use epoxi::http::access::{add_token, Role};
use serde_json::{json, Value};

/// Messages sent through; enough to be flowing while the page loads, few enough to end in
/// seconds on two busy cores.
const MESSAGES: u64 = 400;

/// An agent that neither follows redirects nor treats 4xx as an error: tests look at both.
fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(DEADLINE))
        .http_status_as_error(false)
        .max_redirects(0)
        .max_redirects_will_error(false)
        .build()
        .into()
}

/// GET `url` with an optional bearer token: status, headers and body.
fn get(url: &str, token: Option<&str>) -> (u16, Vec<(String, String)>, String) {
    let mut req = agent().get(url);
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let mut resp = req.call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let body = resp.body_mut().read_to_string().expect("body");
    (status, headers, body)
}

fn get_json(url: &str, token: &str) -> Value {
    let (status, _, body) = get(url, Some(token));
    assert_eq!(status, 200, "GET {url}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {url} ({e}): {body}"))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// One Prometheus sample: name, labels, value.
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of a Prometheus text exposition (label values here have no escapes).
fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_owned(), v.trim_matches('"').to_owned()))
                })
                .collect();
            Some(Sample {
                name: name.to_owned(),
                labels,
                value: value.parse().ok()?,
            })
        })
        .collect()
}

/// What an operator reads off `/metrics`, in the page's terms (`data-metric` names).
#[derive(Debug, PartialEq)]
struct Figures {
    numbers: BTreeMap<String, String>,
    bounces: BTreeMap<String, String>,
    sites: Vec<String>,
}

fn metrics_figures(http: u16, token: &str) -> Figures {
    let (status, _, text) = get(&format!("http://127.0.0.1:{http}/metrics"), Some(token));
    assert_eq!(status, 200, "/metrics: {text}");
    let all = samples(&text);
    let total = |name: &str| -> u64 {
        all.iter()
            .filter(|s| s.name == name && s.labels.get("shard").map(String::as_str) == Some("all"))
            .map(|s| s.value as u64)
            .sum()
    };
    let mut numbers = BTreeMap::new();
    for (key, name) in [
        ("totals.received", "epoxi_received_total"),
        ("totals.delivered", "epoxi_delivered_total"),
        ("totals.bounced", "epoxi_bounced_total"),
        (
            "totals.transient_failures",
            "epoxi_transient_failures_total",
        ),
        ("totals.expired", "epoxi_expired_total"),
        ("totals.rejected", "epoxi_rejected_total"),
        ("queue.depth", "epoxi_queue_recipients"),
    ] {
        numbers.insert(key.to_owned(), total(name).to_string());
    }
    let bounces = all
        .iter()
        .filter(|s| s.name == "epoxi_bounces_by_category_total")
        .filter_map(|s| {
            Some((
                s.labels.get("category")?.clone(),
                (s.value as u64).to_string(),
            ))
        })
        .collect();
    let mut sites: Vec<String> = all
        .iter()
        .filter(|s| s.name == "epoxi_site_attempts_total" && s.value > 0.0)
        .filter_map(|s| s.labels.get("site").cloned())
        .filter(|s| s != "other")
        .collect();
    sites.sort();
    sites.dedup();
    Figures {
        numbers,
        bounces,
        sites,
    }
}

/// What the page shows now, by its `data-metric` attributes.
fn page_figures(page: &mut Page, keys: &[&str]) -> Figures {
    let script = format!(
        r#"(() => {{
            const text = (n) => {{ const e = document.querySelector('[data-metric="' + n + '"]');
                                  return e ? e.textContent : null; }};
            const numbers = {{}};
            for (const k of {keys}) {{ numbers[k] = text(k); }}
            const bounces = {{}};
            for (const tr of document.querySelectorAll('#bounces tr[data-category]')) {{
                bounces[tr.dataset.category] = tr.querySelector('[data-metric]').textContent;
            }}
            const sites = [...document.querySelectorAll('#sites tr[data-site]')].map(tr => tr.dataset.site);
            return {{ numbers, bounces, sites }};
        }})()"#,
        keys = serde_json::to_string(keys).expect("keys")
    );
    let v = page.eval(&script);
    let map = |v: &Value| -> BTreeMap<String, String> {
        v.as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("<missing>").to_owned()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut sites: Vec<String> = v["sites"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    sites.sort();
    Figures {
        numbers: map(&v["numbers"]),
        bounces: map(&v["bounces"]),
        sites,
    }
}

/// The page's poll count (how many snapshots it has shown).
fn polls(page: &mut Page) -> u64 {
    page.eval("Number(document.body.dataset.polls || 0)")
        .as_u64()
        .unwrap_or(0)
}

/// Waits until the page has shown a snapshot taken after this call.
fn next_poll(page: &mut Page) {
    let seen = polls(page);
    page.wait_for(
        "the page's next poll",
        &format!("Number(document.body.dataset.polls || 0) > {seen}"),
    );
}

/// Where the screenshot goes: `<target>/test-artifacts/`, next to the build, never in the
/// source tree.
fn artefact(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // <target>/<profile>/deps/<test>-<hash>
    let target = exe
        .ancestors()
        .nth(3)
        .expect("test binary lives in <target>/<profile>/deps");
    target.join("test-artifacts").join(name)
}

fn tokens(dir: &Path) -> (PathBuf, String, String) {
    let file = dir.join("tokens.jsonl");
    let operator = add_token(&file, "ops", Role::Operator, 0).expect("add operator");
    let viewer = add_token(&file, "watcher", Role::Viewer, 0).expect("add viewer");
    (file, operator, viewer)
}

fn start(dir: &Path, sink_port: u16, tokens_file: &Path) -> (Epoxi, u16) {
    let epoxi = Epoxi::start(&Opts::new(dir).shards(2).route(sink_port).http().set(
        "http",
        "tokens_file",
        &format!("{:?}", tokens_file.display().to_string()),
    ));
    let port = epoxi.http_addr().port();
    (epoxi, port)
}

#[test]
fn page_shows_what_metrics_says_and_suspends_a_site_from_its_button() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tokens_file, operator, viewer) = tokens(dir.path());
    // Some delivered, some bounced (550: a permanent failure, classified).
    let sink = Sink::start(dir.path(), &["--reply", "250:70,550:30", "--delay-ms", "5"]);
    let (epoxi, http) = start(dir.path(), sink.port, &tokens_file);
    let base = format!("http://127.0.0.1:{http}");

    // The JSON endpoints want a token (or the cookie); the page gets the login form instead.
    let (status, _, body) = get(&format!("{base}/api/dashboard/v1"), None);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("\"error\""), "{body}");

    let browser = Browser::start();
    let mut page = browser.open(&format!("{base}/"));
    page.wait_for(
        "the login form",
        "!!document.querySelector('form#login input[name=token]')",
    );
    // Log in with the form, as a person would: the answer sets the cookie and sends the
    // browser back to `/`, whose script then polls with the cookie alone.
    page.eval(&format!(
        "document.querySelector('#token').value = {}; document.querySelector('form#login').submit(); true",
        json!(operator)
    ));
    page.wait_for(
        "the dashboard after the login",
        "Number(document.body.dataset.polls || 0) >= 2",
    );
    assert_eq!(
        page.eval("document.querySelector('#who').dataset.role"),
        json!("operator")
    );
    // The cookie is HttpOnly: the page's script cannot read it.
    assert_eq!(page.eval("document.cookie"), json!(""));

    // Mail flows while the page is open.
    let injecting = Inject::new(MESSAGES)
        .connections(4)
        .spawn(dir.path(), epoxi.port);
    page.wait_for(
        "received mail on the page",
        "Number(document.querySelector('[data-metric=\"totals.received\"]').textContent) > 0",
    );
    next_poll(&mut page);
    // Mid-flow: the received rate is a number, computed from two polls.
    let rate = page.eval("document.querySelector('[data-metric=\"rate.received\"]').textContent");
    assert!(
        rate.as_str().is_some_and(|r| r.parse::<f64>().is_ok()),
        "rate.received shows {rate}"
    );
    let report = injecting.finish();
    let accepted = report.count("accepted");
    assert!(accepted > 0, "{:?}", report.json);

    // Once every message reached its end, the page shows exactly what /metrics says.
    let keys = [
        "totals.received",
        "totals.delivered",
        "totals.bounced",
        "totals.transient_failures",
        "totals.expired",
        "totals.rejected",
        "queue.depth",
    ];
    wait_until("every recipient delivered or bounced", DEADLINE, || {
        let m = metrics_figures(http, &viewer);
        let done = |k: &str| m.numbers[k].parse::<u64>().unwrap_or(0);
        done("totals.delivered") + done("totals.bounced") >= accepted && done("queue.depth") == 0
    });
    // Each round reads /metrics, then waits for a poll after it: once mail stopped the two
    // must agree exactly; a page that shows a wrong figure never gets there.
    let deadline = std::time::Instant::now() + DEADLINE;
    let (shown, from_metrics) = loop {
        let from_metrics = metrics_figures(http, &viewer);
        next_poll(&mut page);
        let shown = page_figures(&mut page, &keys);
        let same = shown.numbers == from_metrics.numbers
            && shown.bounces == from_metrics.bounces
            && from_metrics.sites.iter().all(|s| shown.sites.contains(s));
        if same {
            break (shown, from_metrics);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the page never showed /metrics' figures:\npage:     {shown:?}\n/metrics: {from_metrics:?}"
        );
    };
    eprintln!("page shows {shown:?}\n/metrics has {from_metrics:?}");
    let n = |k: &str| shown.numbers[k].parse::<u64>().expect("a number");
    // `received` counts a message once per shard holding recipients of it: at least once.
    assert!(n("totals.received") >= accepted, "{shown:?}");
    assert!(
        n("totals.delivered") > 0 && n("totals.bounced") > 0,
        "{shown:?}"
    );
    assert!(
        !shown.bounces.is_empty(),
        "no bounce categories shown: {shown:?}"
    );
    // The success rate is delivered out of delivered + bounced + expired.
    let rate = page.eval("document.querySelector('[data-metric=\"success_rate\"]').textContent");
    let expected = 100.0 * n("totals.delivered") as f64
        / (n("totals.delivered") + n("totals.bounced") + n("totals.expired")) as f64;
    assert_eq!(rate, json!(format!("{expected:.1}%")));
    page.screenshot(&artefact("dashboard.png"));

    // The destination site is in the table; its Suspend button suspends it.
    let site = from_metrics
        .sites
        .first()
        .expect("a destination site")
        .clone();
    let row = format!("document.querySelector('tr[data-site={}]')", json!(site));
    page.eval(&format!(
        "{row}.querySelector('button[data-action=suspend]').click(); true"
    ));
    page.wait_for(
        "the suspend call to succeed",
        &format!(
            "document.querySelector('#action-status').dataset.last === {}",
            json!(format!("suspend {site} ok"))
        ),
    );
    let suspended = |who: &str| -> bool {
        let list = get_json(&format!("{base}/api/admin/suspend/v1"), who);
        list.as_array().is_some_and(|l| {
            l.iter()
                .any(|s| s["selector"] == json!(format!("site {site}")))
        })
    };
    assert!(
        suspended(&viewer),
        "no suspension of {site} after the click: {}",
        get_json(&format!("{base}/api/admin/suspend/v1"), &viewer)
    );
    // Its Resume button ends it.
    page.eval(&format!(
        "{row}.querySelector('button[data-action=resume]').click(); true"
    ));
    page.wait_for(
        "the resume call to succeed",
        &format!(
            "document.querySelector('#action-status').dataset.last === {}",
            json!(format!("resume {site} ok"))
        ),
    );
    assert!(!suspended(&viewer), "{site} still suspended after Resume");

    // A viewer (logged in with the token in the address) sees no buttons, and the admin API
    // refuses it even when the page's script calls it with the cookie.
    let mut page = browser.open(&format!("{base}/?token={viewer}"));
    page.wait_for(
        "the viewer's dashboard",
        "Number(document.body.dataset.polls || 0) >= 1",
    );
    assert_eq!(
        page.eval("document.querySelector('#who').dataset.role"),
        json!("viewer")
    );
    assert_eq!(
        page.eval("document.querySelectorAll('button[data-action]').length"),
        json!(0)
    );
    assert_eq!(
        page.eval("location.search"),
        json!(""),
        "the token stays in the address bar"
    );
    let status = page.eval(&format!(
        "fetch('/api/admin/suspend/v1', {{method: 'POST', headers: {{'Content-Type': 'application/json'}},
            body: JSON.stringify({{site: {}}})}}).then(r => r.status)",
        json!(site)
    ));
    assert_eq!(status, json!(403));
    assert!(!suspended(&operator));
    drop(page);
    drop(browser);
    drop(epoxi);
    sink.stop();
}

#[test]
fn static_files_login_answers_and_the_cookie() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tokens_file, operator, _viewer) = tokens(dir.path());
    let sink = Sink::start(dir.path(), &[]);
    let (_epoxi, http) = start(dir.path(), sink.port, &tokens_file);
    let base = format!("http://127.0.0.1:{http}");

    // Static files need no token (they hold no data) and are the vendored ones.
    let (status, headers, body) = get(&format!("{base}/static/uPlot.iife.min.js"), None);
    assert_eq!(status, 200);
    assert!(body.starts_with("/*! https://github.com/leeoniya/uPlot (v1.6.32) */"));
    assert_eq!(
        header(&headers, "content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert_eq!(header(&headers, "x-content-type-options"), Some("nosniff"));
    for name in ["dashboard.js", "dashboard.css", "uPlot.min.css"] {
        let (status, _, _) = get(&format!("{base}/static/{name}"), None);
        assert_eq!(status, 200, "{name}");
    }
    let (status, _, body) = get(&format!("{base}/static/../Cargo.toml"), None);
    assert_eq!(status, 404, "{body}");

    // Without a session: the login form (HTML), not a JSON error.
    let (status, headers, body) = get(&format!("{base}/"), None);
    assert_eq!(status, 401);
    assert!(header(&headers, "content-type").is_some_and(|t| t.starts_with("text/html")));
    assert!(
        body.contains("<form method=\"post\" action=\"/login\""),
        "{body}"
    );
    assert!(!body.contains("login-error"));
    // An unknown token: the form again, saying so.
    let (status, _, body) = get(&format!("{base}/?token=epx_nope"), None);
    assert_eq!(status, 401);
    assert!(body.contains("id=\"login-error\""), "{body}");

    // A good token: a redirect to `/` with the session cookie.
    let mut resp = agent()
        .post(&format!("{base}/login"))
        .content_type("application/x-www-form-urlencoded")
        .send(format!("token={operator}"))
        .expect("POST /login");
    assert_eq!(resp.status().as_u16(), 303);
    let cookie = resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .expect("Set-Cookie")
        .to_owned();
    let _ = resp.body_mut().read_to_string();
    assert_eq!(
        resp.headers().get("location").and_then(|v| v.to_str().ok()),
        Some("/")
    );
    assert_eq!(
        cookie,
        format!("epoxi_session={operator}; HttpOnly; SameSite=Strict; Path=/")
    );
    // The cookie alone opens the page and the JSON endpoints.
    let session = format!("epoxi_session={operator}");
    let mut page = agent()
        .get(&format!("{base}/"))
        .header("Cookie", &session)
        .call()
        .expect("GET / with the cookie");
    assert_eq!(page.status().as_u16(), 200);
    let csp = page
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    let html = page.body_mut().read_to_string().expect("page");
    assert!(html.contains("data-metric=\"totals.delivered\""), "{html}");
    let mut who = agent()
        .get(&format!("{base}/api/whoami/v1"))
        .header("Cookie", &session)
        .call()
        .expect("whoami");
    assert_eq!(who.status().as_u16(), 200);
    let who: Value = serde_json::from_str(&who.body_mut().read_to_string().expect("whoami"))
        .expect("whoami JSON");
    assert_eq!(who, json!({"name": "ops", "role": "operator"}));
    sink.stop();
}
