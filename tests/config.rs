//! Configuration errors an operator can make: each one stops epoxi with a non-zero status and
//! a message that names the culprit, before anything listens.

mod common;

use std::path::Path;

use common::{run_epoxi, Conf, Ran};

/// `epoxi check-config --config <file with text>`.
fn check(dir: &Path, text: &str) -> (Ran, String) {
    let path = dir.join("epoxi.toml");
    std::fs::write(&path, text).expect("write config");
    let path_text = path.to_str().expect("utf-8 temp path").to_owned();
    (
        run_epoxi(&["check-config", "--config", &path_text]),
        path_text,
    )
}

fn assert_refused(ran: &Ran, mention: &str) {
    assert!(
        !ran.status.success(),
        "accepted, should have refused: {ran:?}"
    );
    assert!(
        ran.stderr.contains(mention),
        "the error should name {mention:?}: {ran:?}"
    );
}

#[test]
fn good_config_is_accepted_and_flags_override_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut conf = Conf::default();
    conf.set("server", "listen", "\"127.0.0.1:2500\"")
        .set("queue", "retry_factor", "1.5");
    conf.raw
        .push_str("[[route]]\ndomain = \"*.example\"\ntarget = \"127.0.0.1:2600\"\n");
    let path = conf.write(&dir.path().join("epoxi.toml"));
    let ran = run_epoxi(&[
        "check-config".as_ref(),
        "--config".as_ref(),
        path.as_os_str(),
        "--listen".as_ref(),
        "127.0.0.1:2626".as_ref(),
    ]);
    assert!(ran.status.success(), "{ran:?}");
    assert!(
        ran.stdout.contains("2626"),
        "--listen overrides the file: {}",
        ran.stdout
    );
    assert!(
        !ran.stdout.contains("2500"),
        "--listen overrides the file: {}",
        ran.stdout
    );
    assert!(
        ran.stdout.contains("1.5"),
        "retry_factor from the file: {}",
        ran.stdout
    );
}

#[test]
fn unknown_key_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ran, _) = check(dir.path(), "[server]\nlisten_adress = \"127.0.0.1:25\"\n");
    assert_refused(&ran, "listen_adress");
    let (ran, _) = check(dir.path(), "[queues]\nretry_base_ms = 10\n");
    assert_refused(&ran, "queues");
}

#[test]
fn invalid_value_names_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ran, _) = check(dir.path(), "[queue]\nretry_factor = 0.5\n");
    assert_refused(&ran, "`queue.retry_factor`");
    let (ran, _) = check(dir.path(), "[spool]\nsegment_size_max = 4096\n");
    assert_refused(&ran, "`spool.segment_size_max`");
    let (ran, _) = check(dir.path(), "[server]\nrelay_networks = [\"10.0.0.0/33\"]\n");
    assert_refused(&ran, "`server.relay_networks`");
    // The same checks stop `serve` before it listens.
    let path = dir.path().join("epoxi.toml");
    std::fs::write(&path, "[queue]\nretry_factor = 0.5\n").expect("write config");
    let spool = dir.path().join("spool");
    let ran = run_epoxi(&[
        "serve".as_ref(),
        "--config".as_ref(),
        path.as_os_str(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--spool".as_ref(),
        spool.as_os_str(),
    ]);
    assert_refused(&ran, "`queue.retry_factor`");
    assert!(!ran.stderr.contains("listening on"), "{ran:?}");
}

#[test]
fn malformed_toml_names_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ran, path) = check(dir.path(), "[server\nlisten = \n");
    assert_refused(&ran, &path);
    let (ran, path) = check(dir.path(), "[queue]\nretry_base_ms = \"soon\"\n");
    assert_refused(&ran, &path);
    assert!(ran.stderr.contains("retry_base_ms"), "{ran:?}");
    let missing = dir.path().join("missing.toml");
    let ran = run_epoxi(&[
        "check-config".as_ref(),
        "--config".as_ref(),
        missing.as_os_str(),
    ]);
    assert_refused(&ran, missing.to_str().expect("utf-8 temp path"));
}

#[test]
fn bad_route_flag_is_named() {
    let ran = run_epoxi(&["check-config", "--route", "nonsense"]);
    assert_refused(&ran, "--route");
    let ran = run_epoxi(&["check-config", "--route", "*.test=not a host"]);
    assert_refused(&ran, "--route");
}

#[test]
fn unwritable_spool_fails_fast() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").expect("write file");
    let conf = Conf::default().write(&dir.path().join("epoxi.toml"));
    let spool = file.join("spool");
    let log = dir.path().join("log");
    let ran = run_epoxi(&[
        "serve".as_ref(),
        "--config".as_ref(),
        conf.as_os_str(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--shards".as_ref(),
        "2".as_ref(),
        "--spool".as_ref(),
        spool.as_os_str(),
        "--log-dir".as_ref(),
        log.as_os_str(),
    ]);
    assert_refused(&ran, "spool");
    assert!(!ran.stderr.contains("listening on"), "{ran:?}");
    assert!(!ran.stderr.contains("stopped cleanly"), "{ran:?}");
}

#[test]
fn listen_address_in_use_fails_fast() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Held without SO_REUSEPORT, so no shard can share it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let conf = Conf::default().write(&dir.path().join("epoxi.toml"));
    let spool = dir.path().join("spool");
    let log = dir.path().join("log");
    let ran = run_epoxi(&[
        "serve".as_ref(),
        "--config".as_ref(),
        conf.as_os_str(),
        "--listen".as_ref(),
        addr.as_ref(),
        "--shards".as_ref(),
        "2".as_ref(),
        "--spool".as_ref(),
        spool.as_os_str(),
        "--log-dir".as_ref(),
        log.as_os_str(),
    ]);
    assert_refused(&ran, "in use");
    assert!(!ran.stderr.contains("listening on"), "{ran:?}");
}

/// A `[[dkim]]` table that cannot be used stops epoxi with an error naming the table.
#[test]
fn bad_dkim_tables_name_the_table() {
    use rsa::pkcs8::EncodePrivateKey as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let table = |domain: &str, key: &Path, extra: &str| {
        format!(
            "[[dkim]]\ndomain = \"{domain}\"\nselector = \"s1\"\nkey_file = \"{}\"\n{extra}\n",
            key.display()
        )
    };
    let pkcs1 = dir.path().join("pkcs1.pem");
    std::fs::write(
        &pkcs1,
        "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----\n",
    )
    .expect("write");
    // A 768-bit key: below RFC 8301's floor of 1024.
    let small = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 768).expect("rsa 768");
    let small_pem = small.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF).expect("pem");
    let small_path = dir.path().join("small.pem");
    std::fs::write(&small_path, small_pem.as_bytes()).expect("write");
    let good = dir.path().join("good.pem");
    let ran = run_epoxi(&[
        "dkim".as_ref(),
        "keygen".as_ref(),
        "--domain".as_ref(),
        "example.com".as_ref(),
        "--selector".as_ref(),
        "s1".as_ref(),
        "--algorithm".as_ref(),
        "ed25519".as_ref(),
        "--out".as_ref(),
        good.as_os_str(),
    ]);
    assert!(ran.status.success(), "{ran:?}");
    let missing = dir.path().join("missing.pem");
    let two = format!(
        "{}{}",
        table("ok.example", &good, ""),
        table("example.com", &missing, "")
    );
    for (text, mention) in [
        (two, "dkim[1] (example.com/s1): key_file"),
        (
            table("example.com", &pkcs1, ""),
            "dkim[0] (example.com/s1): key_file",
        ),
        (table("example.com", &pkcs1, ""), "not a PKCS#8 private key"),
        (
            table("example.com", &small_path, ""),
            "below RFC 8301's minimum of 1024",
        ),
        (
            table("example.com", &good, "canonicalization = \"loose/relaxed\""),
            "canonicalization",
        ),
        (
            table("example.com", &good, "headers = [\"To\", \"Subject\"]"),
            "must include From",
        ),
        (table("exa mple.com", &good, ""), "not a domain name"),
    ] {
        let (ran, _) = check(dir.path(), &text);
        assert_refused(&ran, mention);
    }
    let (ran, _) = check(dir.path(), &table("example.com", &good, "always = true"));
    assert!(ran.status.success(), "{ran:?}");
}

/// Priority and stripping keys: a bad one names itself, and a DKIM table that signs a header
/// `egress.strip_headers` removes is refused (its signature could not verify downstream).
#[test]
fn priority_keys_and_a_signature_over_a_stripped_header_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dkim = "[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"\n\
                key_file = \"/nonexistent.pem\"\nheaders = [\"From\", \"X-Tenant\"]\n";
    for (text, mention) in [
        (
            "[queue]\npriority_weights = [16, 4, 0]\n".to_owned(),
            "queue.priority_weights",
        ),
        (
            "[[listener]]\naddress = \"127.0.0.1:2587\"\npriority = \"urgent\"\n".to_owned(),
            "listener.priority",
        ),
        (
            format!("[egress]\nstrip_headers = true\n{dkim}"),
            "dkim[0] (example.com/s1) signs `X-Tenant`",
        ),
    ] {
        let (ran, _) = check(dir.path(), &text);
        assert_refused(&ran, mention);
    }
    let (ran, _) = check(
        dir.path(),
        "[egress]\nstrip_headers = true\npriority_header = \"\"\n\
         [[listener]]\naddress = \"127.0.0.1:2587\"\npriority = \"bulk\"\n\
         [queue]\npriority_weights = [8, 2, 1]\n",
    );
    assert!(ran.status.success(), "{ran:?}");
    assert!(ran.stdout.contains("strip_headers"), "{}", ran.stdout);
}
