//! SMTP TLS reporting (RFC 8460) end to end: Epoxi A delivers under MTA-STS policies (one
//! domain's sessions succeed, another's fail on a certificate for the wrong host), counts the
//! sessions, and at the end of each (short, for the test) period sends the aggregate reports
//! to the `rua` of each domain's `_smtp._tls` record: by mail (through its own queue, to a
//! downstream aiosmtpd) and by HTTPS POST (to the test's HTTPS server). Each report is parsed
//! by Python's own email and json modules, independent of Epoxi's code.

mod common;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::dns::DnsServer;
use common::tlspeers::{PolicyServer, TestCa};
use common::{dead_port, message_body, run_epoxi, wait_until, Aiosmtpd, Epoxi, Opts, Smtp};
use serde_json::Value;

const TTL: u32 = 300;
const LOOPBACK: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

/// The report in a stored message, as Python's email module finds it: the headers that
/// matter and the gunzip'd JSON of the `application/tlsrpt+gzip` part.
fn parse_mail(eml: &Path) -> Option<Value> {
    let script = r#"
import email, gzip, json, sys
from email import policy
m = email.message_from_binary_file(open(sys.argv[1], 'rb'), policy=policy.default)
out = {"domain": m.get("TLS-Report-Domain"), "submitter": m.get("TLS-Report-Submitter"),
       "content_type": m.get_content_type(), "report_type": m.get_param("report-type"),
       "subject": m.get("Subject"), "reports": []}
for part in m.walk():
    if part.get_content_type() == "application/tlsrpt+gzip":
        out["filename"] = part.get_filename()
        out["reports"].append(json.loads(gzip.decompress(part.get_payload(decode=True))))
print(json.dumps(out))
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(eml)
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// gunzip and parse a POSTed report, with Python.
fn parse_gzip(body: &[u8], dir: &Path) -> Value {
    let path = dir.join("post.json.gz");
    std::fs::write(&path, body).expect("write post");
    let out = Command::new("python3")
        .arg("-c")
        .arg("import gzip, json, sys; print(json.dumps(json.loads(gzip.decompress(open(sys.argv[1], 'rb').read()))))")
        .arg(&path)
        .output()
        .expect("python3");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not gzip'd JSON: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn report_mails(store: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(store).into_iter().flatten().flatten() {
        let path: PathBuf = entry.path();
        if path.extension().is_some_and(|e| e == "eml") {
            if let Some(mut v) = parse_mail(&path) {
                if v["domain"].is_string() {
                    v["path"] = Value::String(path.display().to_string());
                    out.push(v);
                }
            }
        }
    }
    out
}

/// Sum of (successful, failed) sessions over reports, for `domain`'s sts policy.
fn totals(reports: &[&Value], domain: &str) -> (u64, u64) {
    let mut t = (0, 0);
    for r in reports {
        for p in r["policies"].as_array().into_iter().flatten() {
            if p["policy"]["policy-domain"] == domain {
                t.0 += p["summary"]["total-successful-session-count"]
                    .as_u64()
                    .unwrap_or(0);
                t.1 += p["summary"]["total-failure-session-count"]
                    .as_u64()
                    .unwrap_or(0);
            }
        }
    }
    t
}

fn send(epoxi: &Epoxi, rcpt: &str, id: &str) {
    let mut smtp = Smtp::connect(epoxi.port);
    assert_eq!(smtp.reply().code, 220);
    smtp.expect("EHLO client.test", 250);
    let reply = smtp.send_message("s@x.test", &[rcpt.to_string()], &message_body(id, &[]));
    assert_eq!(reply.code, 250, "{reply:?}");
    smtp.expect("QUIT", 221);
}

#[test]
fn reports_by_mail_and_https_count_the_sessions_and_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let ca = TestCa::new("Epoxi Test CA");
    let ca_file = ca.write(&d.join("ca.pem"));
    let mx = ca.issue(d, "mx", &["mx.sts.test"]);
    let web = ca.issue(d, "web", &["mta-sts.a.test", "mta-sts.c.test", "rpt.test"]);
    // The report mailbox and the relayed test mail end up in aiosmtpd, behind Epoxi B.
    let store = d.join("store");
    let aio_port = dead_port();
    let _aiosmtpd = Aiosmtpd::start(aio_port, &store);
    let mut b = Epoxi::start(
        &Opts::new(&d.join("b"))
            .route(aio_port)
            .log_dir(d.join("b-log"))
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
    let https = PolicyServer::start(&web);
    let dns = DnsServer::start();
    for host in ["mx.sts.test", "wrong.sts.test", "rpt.test"] {
        dns.a(host, LOOPBACK, TTL);
    }
    let policy =
        |mx: &str| format!("version: STSv1\r\nmode: enforce\r\nmx: {mx}\r\nmax_age: 86400\r\n");
    // a.test: enforce, valid: sessions succeed; reports by mail.
    dns.mx("a.test", 10, "mx.sts.test", TTL);
    dns.txt("_mta-sts.a.test", "v=STSv1; id=1", TTL);
    dns.a("mta-sts.a.test", LOOPBACK, TTL);
    https.policy("a.test", &policy("mx.sts.test"));
    dns.txt(
        "_smtp._tls.a.test",
        "v=TLSRPTv1; rua=mailto:tls@reports.test",
        TTL,
    );
    dns.mx("reports.test", 10, "mx.sts.test", TTL);
    // c.test: enforce, but the MX's certificate names another host: sessions fail (the
    // message is deferred, tried again); reports by HTTPS.
    dns.mx("c.test", 10, "wrong.sts.test", TTL);
    dns.txt("_mta-sts.c.test", "v=STSv1; id=1", TTL);
    dns.a("mta-sts.c.test", LOOPBACK, TTL);
    https.policy("c.test", &policy("wrong.sts.test"));
    let rua = format!(
        "v=TLSRPTv1; rua=https://rpt.test:{}/tlsrpt",
        https.addr.port()
    );
    dns.txt("_smtp._tls.c.test", &rua, TTL);

    // The reports' From domain has a DKIM key: the report messages are signed.
    let key = d.join("sender.key");
    let ran = run_epoxi(&[
        "dkim",
        "keygen",
        "--domain",
        "sender.test",
        "--selector",
        "e1",
        "--algorithm",
        "ed25519",
        "--out",
        key.to_str().expect("utf-8 path"),
    ]);
    assert!(ran.status.success(), "{ran:?}");
    let txt: String = ran.stdout.trim().split('"').skip(1).step_by(2).collect();
    let mut opts = Opts::new(&d.join("a"))
        .resolver(dns.addr())
        .delivery_port(b.port)
        .log_dir(d.join("a-log"))
        .set(
            "delivery",
            "tls_ca_file",
            &format!("\"{}\"", ca_file.display()),
        )
        .set(
            "delivery",
            "mta_sts_https_port",
            &https.addr.port().to_string(),
        )
        .set("queue", "retry_base_ms", "500")
        .set("queue", "retry_cap_ms", "500")
        .set("tls_report", "period_s", "4")
        .set("tls_report", "send_delay_s", "0")
        .set("tls_report", "organization", "\"Epoxi Test\"")
        .set("tls_report", "from", "\"tlsrpt@sender.test\"");
    opts.conf.raw = format!(
        "[[dkim]]\ndomain = \"sender.test\"\nselector = \"e1\"\nkey_file = \"{}\"\n",
        key.display()
    );
    let mut a = Epoxi::start(&opts);
    send(&a, "r@a.test", "rpt-a1");
    send(&a, "r@c.test", "rpt-c1");
    a.wait_events("Delivery", 1);
    a.wait_events("TransientFailure", 1);
    // A graceful restart keeps the counts of the period in progress.
    a.stop();
    let saved: Vec<PathBuf> = (0..2)
        .map(|i| d.join(format!("a/spool/shard-{i}/tlsrpt.json")))
        .filter(|p| p.exists())
        .collect();
    assert!(!saved.is_empty(), "counts saved at stop");
    let mut a = Epoxi::start(&opts);
    send(&a, "r@a.test", "rpt-a2");

    // Reports arrive: by mail for a.test, by POST for c.test, at most a few periods later.
    let mut mails = Vec::new();
    wait_until("a.test's report by mail", Duration::from_secs(40), || {
        mails = report_mails(&store);
        let reports: Vec<&Value> = mails
            .iter()
            .flat_map(|m| m["reports"].as_array().into_iter().flatten())
            .collect();
        // Both messages to a.test: one before and one after the restart.
        totals(&reports, "a.test").0 >= 2
    });
    wait_until("c.test's report by HTTPS", Duration::from_secs(40), || {
        !https.posts.lock().expect("posts").is_empty()
    });
    a.stop();

    // Every report message verifies with dkimpy (an independent verifier).
    let keys = d.join("keys.txt");
    std::fs::write(&keys, format!("e1._domainkey.sender.test {txt}\n")).expect("keys");
    let emls: Vec<PathBuf> = mails
        .iter()
        .filter_map(|m| m["path"].as_str().map(PathBuf::from))
        .collect();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dkim_verify.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&keys)
        .args(&emls)
        .output()
        .expect("run dkimpy (pip install dkimpy pynacl)");
    let verdicts = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        verdicts.lines().count(),
        emls.len(),
        "{verdicts} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in verdicts.lines() {
        let v: Value = serde_json::from_str(line).expect("verifier JSON");
        assert_eq!(v["signatures"], 1, "{v}");
        assert_eq!(v["results"][0], true, "{v}");
    }
    let m = &mails[0];
    assert_eq!(m["domain"], "a.test", "{m}");
    assert_eq!(m["content_type"], "multipart/report", "{m}");
    assert_eq!(m["report_type"], "tlsrpt", "{m}");
    let filename = m["filename"].as_str().unwrap_or_default();
    assert!(
        filename.contains("!a.test!") && filename.ends_with(".json.gz"),
        "{m}"
    );
    let r = &m["reports"][0];
    assert_eq!(r["organization-name"], "Epoxi Test", "{r}");
    for key in ["start-datetime", "end-datetime"] {
        let t = r["date-range"][key].as_str().unwrap_or_default();
        assert!(t.ends_with('Z') && t.len() == 20, "RFC 3339 UTC: {t}");
    }
    assert!(r["report-id"].is_string(), "{r}");
    let p = &r["policies"][0];
    assert_eq!(p["policy"]["policy-type"], "sts", "{p}");
    assert_eq!(p["policy"]["policy-domain"], "a.test", "{p}");
    assert_eq!(p["policy"]["mx-host"][0], "mx.sts.test", "{p}");
    assert!(
        p["policy"]["policy-string"]
            .as_array()
            .is_some_and(|l| l.iter().any(|s| s == "mode: enforce")),
        "{p}"
    );
    let reports: Vec<&Value> = mails
        .iter()
        .flat_map(|m| m["reports"].as_array().into_iter().flatten())
        .collect();
    let (ok, failed) = totals(&reports, "a.test");
    assert!(ok >= 2, "sessions before and after the restart: {ok}");
    assert_eq!(failed, 0);

    let posts = https.posts.lock().expect("posts").clone();
    let post = &posts[0];
    assert_eq!(post.path, "/tlsrpt");
    assert_eq!(post.content_type, "application/tlsrpt+gzip");
    let r = parse_gzip(&post.body, d);
    let p = &r["policies"][0];
    assert_eq!(p["policy"]["policy-domain"], "c.test", "{r}");
    assert!(
        p["summary"]["total-failure-session-count"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "{r}"
    );
    assert_eq!(p["summary"]["total-successful-session-count"], 0, "{r}");
    let f = &p["failure-details"][0];
    assert_eq!(f["result-type"], "certificate-host-mismatch", "{r}");
    assert_eq!(f["receiving-mx-hostname"], "wrong.sts.test", "{r}");
    assert_eq!(f["receiving-ip"], "127.0.0.1", "{r}");
    b.stop();
}

#[test]
fn reporting_off_and_bad_settings() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (key, value) in [
        ("period_s", "0"),
        ("period_s", "90000"),
        ("from", "\"nobody\""),
    ] {
        let opts = Opts::new(dir.path()).set("tls_report", key, value);
        let ran = Epoxi::try_start(&opts).err().expect("refused");
        assert!(
            ran.stderr.contains(&format!("tls_report.{key}")),
            "{key}={value}: {}",
            ran.stderr
        );
    }
    // Off: no counts kept.
    let mut a = Epoxi::start(&Opts::new(dir.path()).set("tls_report", "enabled", "false"));
    a.stop();
    assert!(!dir.path().join("spool/shard-0/tlsrpt.json").exists());
}
