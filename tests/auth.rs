//! `epoxi passwd`: the users file for SMTP AUTH, written by the real binary.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn passwd(file: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_epoxi"))
        .arg("passwd")
        .arg("--file")
        .arg(file)
        .args(["--iterations", "1000"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn epoxi passwd");
    // epoxi may refuse (a bad users file) before reading stdin: a broken pipe is fine here.
    let _ = child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes());
    child.wait_with_output().expect("epoxi passwd output")
}

fn users(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .expect("users file")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn passwd_adds_replaces_and_deletes_users() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("users");

    let out = passwd(&file, &["alice"], "s3cret pass\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = users(&file);
    assert_eq!(lines.len(), 1);
    assert!(
        lines[0].starts_with("alice:pbkdf2-sha256$1000$"),
        "{lines:?}"
    );
    let text = std::fs::read_to_string(&file).expect("read");
    assert!(!text.contains("s3cret"), "the password is never stored");
    let mode = std::fs::metadata(&file).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    assert!(passwd(&file, &["bob"], "other\n").status.success());
    assert!(passwd(&file, &["alice"], "changed\n").status.success());
    let after = users(&file);
    assert_eq!(after.len(), 2);
    let alice = after
        .iter()
        .find(|l| l.starts_with("alice:"))
        .expect("alice kept");
    assert_ne!(alice, &lines[0], "new hash for the new password");

    assert!(passwd(&file, &["--delete", "bob"], "").status.success());
    assert_eq!(users(&file).len(), 1);
    let out = passwd(&file, &["--delete", "bob"], "");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no user `bob`"));
}

#[test]
fn passwd_refuses_bad_input_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("users");
    let out = passwd(&file, &["alice"], "\n");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid password"));
    let out = passwd(&file, &["al:ice"], "pw\n");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid user name"));
    assert!(!file.exists(), "nothing written on error");

    std::fs::write(&file, "alice:plaintext-password\n").expect("write");
    let out = passwd(&file, &["bob"], "pw\n");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 1") && err.contains("unknown hash scheme"),
        "{err}"
    );
}

mod common;

use common::*;

/// Run a Python smtplib script against epoxi; returns success and combined output.
fn python(script: &str) -> (bool, String) {
    let out = Command::new("python3")
        .args(["-c", script])
        .output()
        .expect("run python3");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

const PY_PRELUDE: &str = r#"
import smtplib, ssl, sys
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
def session(port):
    s = smtplib.SMTP("127.0.0.1", port, timeout=20)
    s.ehlo("client.test")
    s.starttls(context=ctx)
    s.ehlo("client.test")
    return s
"#;

#[test]
fn auth_over_starttls_lets_a_stranger_relay_and_limits_failures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users");
    assert!(passwd(&users, &["alice"], "right pw\n").status.success());
    let sink = Sink::start(dir.path(), &[]);
    // Loopback is not a relay network here, so only authenticated clients may relay.
    let epoxi = Epoxi::start(
        &Opts::new(dir.path())
            .route(sink.port)
            .set("server", "relay_networks", "[\"10.0.0.0/8\"]")
            .set("server", "auth_users", &format!("\"{}\"", users.display()))
            // smtplib's login() tries PLAIN then LOGIN: each wrong login is two failures.
            .set("server", "auth_failures_max", "6"),
    );
    let script = format!(
        r#"{PY_PRELUDE}
port = {port}
# Without AUTH: relaying denied.
s = session(port)
assert "auth" in s.esmtp_features, s.esmtp_features
try:
    s.sendmail("a@x.test", ["b@d1.test"], "X-Loadgen-Id: noauth\r\n\r\nx\r\n")
    sys.exit("relayed without AUTH")
except smtplib.SMTPRecipientsRefused as e:
    code = list(e.recipients.values())[0][0]
    assert code == 550, e.recipients
s.quit()
# AUTH PLAIN (smtplib's choice), then relay.
s = session(port)
s.login("alice", "right pw")
s.sendmail("a@x.test", ["b@d1.test"], "X-Loadgen-Id: plain-1\r\n\r\nx\r\n")
s.quit()
# AUTH LOGIN explicitly.
s = session(port)
s.user, s.password = "alice", "right pw"
code, _ = s.auth("LOGIN", s.auth_login)
assert code == 235, code
s.sendmail("a@x.test", ["b@d1.test"], "X-Loadgen-Id: login-1\r\n\r\nx\r\n")
s.quit()
# Failures: 3 wrong logins (6 attempts) get 535, then even the right one gets 454 for a while.
for i in range(3):
    s = session(port)
    try:
        s.login("alice", "wrong")
        sys.exit("wrong password accepted")
    except smtplib.SMTPAuthenticationError as e:
        assert e.smtp_code == 535, e
    s.quit()
s = session(port)
try:
    s.login("alice", "right pw")
    sys.exit("not rate limited")
except smtplib.SMTPAuthenticationError as e:
    assert e.smtp_code == 454, e
print("ok")
"#,
        port = epoxi.port
    );
    let (ok, out) = python(&script);
    assert!(ok, "smtplib:\n{out}");
    epoxi.wait_events("Delivery", 2);
    let mut epoxi = epoxi;
    epoxi.stop();
    let mut ids = sink.stop().ids;
    ids.sort();
    assert_eq!(ids, vec!["login-1".to_owned(), "plain-1".to_owned()]);
}

#[test]
fn bad_users_file_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users");
    std::fs::write(&users, "alice:plaintext\n").expect("write");
    let opts =
        Opts::new(dir.path()).set("server", "auth_users", &format!("\"{}\"", users.display()));
    let ran = Epoxi::try_start(&opts).err().expect("refused");
    assert!(
        ran.stderr.contains("server.auth_users") && ran.stderr.contains("line 1"),
        "{}",
        ran.stderr
    );
}

/// A submission from an authenticated client gets Date and Message-ID when it has none
/// (RFC 6409 §8); AUTH without TLS works from loopback when configured.
#[test]
fn submission_fills_in_date_and_message_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users");
    assert!(passwd(&users, &["dave"], "pw\n").status.success());
    let mut epoxi = Epoxi::start(
        &Opts::new(dir.path())
            .route(dead_port())
            .set("server", "auth_users", &format!("\"{}\"", users.display()))
            .set("server", "auth_plaintext_loopback", "true"),
    );
    let script = format!(
        r#"
import smtplib
s = smtplib.SMTP("127.0.0.1", {port}, timeout=20)
s.ehlo("client.test")
s.login("dave", "pw")
s.mail("d@x.test")
s.rcpt("e@d1.test")
code, resp = s.data(b"Subject: no date, no id\r\n\r\nbody\r\n")
assert code == 250, (code, resp)
print(resp.decode().split()[-1])
s.quit()
"#,
        port = epoxi.port
    );
    let (ok, out) = python(&script);
    assert!(ok, "smtplib:\n{out}");
    let id = out.trim().to_owned();
    epoxi.stop();
    let spooled: Vec<u8> = epoxi
        .segments()
        .iter()
        .flat_map(|p| std::fs::read(p).expect("segment"))
        .collect();
    let want_id = format!("Message-ID: <{id}@mx.epoxi.test>\r\nSubject: no date, no id");
    assert!(
        find(&spooled, want_id.as_bytes()).is_some(),
        "no `{want_id}` in the spool"
    );
    assert!(find(&spooled, b"\r\nDate: ").is_some(), "Date added");
    assert!(
        find(&spooled, b"with ESMTPA id").is_some(),
        "Received says authenticated"
    );
}

/// A second listener for submission (RFC 6409): MAIL only after AUTH there, while the main
/// listener keeps relaying for its networks.
#[test]
fn submission_listener_requires_auth() {
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users");
    assert!(passwd(&users, &["erin"], "pw\n").status.success());
    let sink = Sink::start(dir.path(), &[]);
    let submission = dead_port();
    let mut opts = Opts::new(dir.path()).route(sink.port).set(
        "server",
        "auth_users",
        &format!("\"{}\"", users.display()),
    );
    opts.conf.raw =
        format!("[[listener]]\naddress = \"127.0.0.1:{submission}\"\nauth_required = true\n");
    let epoxi = Epoxi::start(&opts);
    let script = format!(
        r#"{PY_PRELUDE}
s = session({submission})
try:
    s.sendmail("a@x.test", ["b@d1.test"], "X-Loadgen-Id: unauth\r\n\r\nx\r\n")
    sys.exit("submission without AUTH accepted")
except smtplib.SMTPSenderRefused as e:
    assert e.smtp_code == 530, e
s.login("erin", "pw")
s.sendmail("a@x.test", ["b@d1.test"], "X-Loadgen-Id: submitted\r\n\r\nx\r\n")
s.quit()
# The relay port is unchanged: loopback may relay without AUTH.
s = smtplib.SMTP("127.0.0.1", {relay}, timeout=20)
s.sendmail("a@x.test", ["b@d2.test"], "X-Loadgen-Id: relayed\r\n\r\nx\r\n")
s.quit()
"#,
        relay = epoxi.port
    );
    let (ok, out) = python(&script);
    assert!(ok, "smtplib:\n{out}");
    epoxi.wait_events("Delivery", 2);
    let mut epoxi = epoxi;
    epoxi.stop();
    let mut ids = sink.stop().ids;
    ids.sort();
    assert_eq!(ids, vec!["relayed".to_owned(), "submitted".to_owned()]);
}

#[test]
fn listener_config_errors_name_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = Opts::new(dir.path());
    opts.conf.raw = "[[listener]]\naddress = \"127.0.0.1:1\"\nauth_required = true\n".into();
    let ran = Epoxi::try_start(&opts).err().expect("refused");
    assert!(
        ran.stderr.contains("listener.auth_required"),
        "{}",
        ran.stderr
    );
}

/// Each listener has its own name, relay networks, limits and TLS policy; the main listener
/// keeps the server-wide ones.
#[test]
fn listeners_have_their_own_name_limits_and_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(dir.path(), &[]);
    let (strict, secure) = (dead_port(), dead_port());
    let mut opts = Opts::new(dir.path()).route(sink.port);
    opts.conf.raw = format!(
        "[[listener]]\naddress = \"127.0.0.1:{strict}\"\nhostname = \"strict.epoxi.test\"\n\
         relay_networks = []\nconnections_per_ip_max = 1\nsize_max = 4096\n\
         [[listener]]\naddress = \"127.0.0.1:{secure}\"\nhostname = \"secure.epoxi.test\"\n\
         tls_required = true\n"
    );
    let epoxi = Epoxi::start(&opts);

    // The strict listener: its name, its SIZE, no relaying for loopback, one connection per IP.
    let mut first = Smtp::connect(strict);
    let greeting = first.reply();
    assert!(
        greeting.text.contains("strict.epoxi.test"),
        "{}",
        greeting.text
    );
    let ehlo = first.expect("EHLO client.test", 250);
    assert!(ehlo.text.contains("SIZE 4096"), "{}", ehlo.text);
    first.expect("MAIL FROM:<a@x.test>", 250);
    let denied = first.expect("RCPT TO:<b@d1.test>", 550);
    assert!(denied.text.contains("5.7.1"), "{}", denied.text);
    let mut second = Smtp::connect(strict);
    let refused = second.reply();
    assert_eq!(refused.code, 421, "{}", refused.text);
    assert!(second.try_reply().is_none(), "closed after the 421");
    // The main listener is not affected by the strict one's limits or name.
    let mut main = Smtp::connect(epoxi.port);
    let greeting = main.reply();
    assert!(greeting.text.contains("mx.epoxi.test"), "{}", greeting.text);
    main.expect("EHLO client.test", 250);
    let body = message_body("main-listener", &[]);
    let reply = main.send_message("a@x.test", &["b@d1.test".into()], &body);
    assert_eq!(reply.code, 250, "{}", reply.text);
    first.expect("QUIT", 221);

    // The secure listener: MAIL only after STARTTLS.
    let script = format!(
        r#"{PY_PRELUDE}
s = smtplib.SMTP("127.0.0.1", {secure}, timeout=20)
s.ehlo("client.test")
code, msg = s.mail("a@x.test")
assert code == 530, (code, msg)
assert b"STARTTLS" in msg, msg
s.rset()
s.starttls(context=ctx)
s.ehlo("client.test")
s.sendmail("a@x.test", ["b@d2.test"], "X-Loadgen-Id: secure\r\n\r\nx\r\n")
s.quit()
"#
    );
    let (ok, out) = python(&script);
    assert!(ok, "smtplib:\n{out}");
    epoxi.wait_events("Delivery", 2);
    let mut epoxi = epoxi;
    epoxi.stop();
    let mut ids = sink.stop().ids;
    ids.sort();
    assert_eq!(ids, vec!["main-listener".to_owned(), "secure".to_owned()]);
}
