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
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write password");
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
