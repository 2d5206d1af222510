//! Conformance against swaks, a widely used SMTP test client: STARTTLS and AUTH as a stranger
//! would use them. `.ci/run` installs swaks and its Perl TLS and SASL modules.

mod common;

use std::process::Command;

use common::*;

fn swaks(port: u16, args: &[&str]) -> (bool, String) {
    let out = Command::new("swaks")
        .args([
            "--server",
            &format!("127.0.0.1:{port}"),
            "--helo",
            "swaks.test",
        ])
        .args(["--from", "a@x.test", "--timeout", "20"])
        .args(args)
        .output()
        .expect("run swaks (apt-get install swaks libio-socket-ssl-perl libauthen-sasl-perl)");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn swaks_starttls_and_auth() {
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users");
    let mut child = Command::new(env!("CARGO_BIN_EXE_epoxi"))
        .args(["passwd", "--iterations", "1000", "--file"])
        .arg(&users)
        .arg("carol")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("epoxi passwd");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"pa ss\n")
        .expect("password");
    assert!(child.wait().expect("passwd").success());

    let sink = Sink::start(dir.path(), &[]);
    let epoxi = Epoxi::start(
        &Opts::new(dir.path())
            .route(sink.port)
            .set("server", "relay_networks", "[\"10.0.0.0/8\"]")
            .set("server", "auth_users", &format!("\"{}\"", users.display())),
    );
    let plain = [
        "--tls",
        "--auth",
        "PLAIN",
        "--auth-user",
        "carol",
        "--auth-password",
        "pa ss",
    ];
    let (ok, out) = swaks(
        epoxi.port,
        &[
            &[
                "--to",
                "r1@d1.test",
                "--header",
                "X-Loadgen-Id: swaks-plain",
            ][..],
            &plain[..],
        ]
        .concat(),
    );
    assert!(ok, "swaks AUTH PLAIN over STARTTLS:\n{out}");
    assert!(out.contains("220 2.0.0 Ready to start TLS"), "{out}");
    assert!(out.contains("235 2.7.0"), "{out}");
    let login = [
        "--tls",
        "--auth",
        "LOGIN",
        "--auth-user",
        "carol",
        "--auth-password",
        "pa ss",
    ];
    let (ok, out) = swaks(
        epoxi.port,
        &[
            &[
                "--to",
                "r2@d2.test",
                "--header",
                "X-Loadgen-Id: swaks-login",
            ][..],
            &login[..],
        ]
        .concat(),
    );
    assert!(ok, "swaks AUTH LOGIN over STARTTLS:\n{out}");

    let wrong = [
        "--tls",
        "--auth",
        "PLAIN",
        "--auth-user",
        "carol",
        "--auth-password",
        "nope",
    ];
    let (ok, out) = swaks(
        epoxi.port,
        &[&["--to", "r3@d3.test"][..], &wrong[..]].concat(),
    );
    assert!(
        !ok && out.contains("535 5.7.8"),
        "wrong password must fail:\n{out}"
    );
    // No AUTH: relaying refused.
    let (ok, out) = swaks(epoxi.port, &["--tls", "--to", "r4@d4.test"]);
    assert!(
        !ok && out.contains("550 5.7.1"),
        "relay without AUTH must fail:\n{out}"
    );

    epoxi.wait_events("Delivery", 2);
    let mut epoxi = epoxi;
    epoxi.stop();
    let mut ids = sink.stop().ids;
    ids.sort();
    assert_eq!(
        ids,
        vec!["swaks-login".to_owned(), "swaks-plain".to_owned()]
    );
}
