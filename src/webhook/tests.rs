//! `[[webhook]]` validation: every bad value is refused with its table and key named.

use super::*;
use crate::config::Config;

fn specs(toml: &str) -> Result<Vec<Spec>, String> {
    let config = Config::parse(toml)?;
    Spec::from_entries(&config.webhook).map_err(|e| e.to_string())
}

#[test]
fn defaults_and_every_key() {
    let s = specs("[[webhook]]\nurl = \"http://127.0.0.1:9/hook\"\n").expect("minimal");
    assert_eq!(s.len(), 1);
    let s = &s[0];
    assert_eq!(s.name, "webhook-0");
    assert_eq!(
        (s.batch_max, s.format, s.events.clone()),
        (100, Format::Array, None)
    );
    assert!(s.wants("Delivery") && s.wants("Admin"));
    let s = specs(
        "[[webhook]]\nurl = \"https://hooks.example.com/epoxi\"\nname = \"crm\"\n\
         events = [\"Delivery\", \"Bounce\"]\nbatch_max = 10000\nformat = \"object\"\n\
         timeout_ms = 500\nretry_base_ms = 10\nretry_max_ms = 10\n\
         headers = { Authorization = \"Bearer x\", X-Tenant = \"t\" }\n",
    )
    .expect("every key");
    let s = &s[0];
    assert_eq!(s.name, "crm");
    assert_eq!(s.format, Format::Object);
    assert!(s.wants("Bounce") && !s.wants("Reception"));
    assert_eq!(s.headers.len(), 2);
}

#[test]
fn bad_values_name_their_key() {
    let cases = [
        ("url = \"ftp://x/\"", "webhook[0].url"),
        ("url = \"http:///nohost\"", "webhook[0].url"),
        ("url = \"not a url\"", "webhook[0].url"),
        (
            "url = \"http://h/\"\nevents = [\"Delivered\"]",
            "webhook[0].events",
        ),
        ("url = \"http://h/\"\nevents = []", "webhook[0].events"),
        ("url = \"http://h/\"\nbatch_max = 0", "webhook[0].batch_max"),
        (
            "url = \"http://h/\"\nbatch_max = 10001",
            "webhook[0].batch_max",
        ),
        (
            "url = \"http://h/\"\nformat = \"ndjson\"",
            "webhook[0].format",
        ),
        (
            "url = \"http://h/\"\nheaders = { \"Bad Name\" = \"x\" }",
            "webhook[0].headers",
        ),
        (
            "url = \"http://h/\"\nheaders = { Content-Type = \"x\" }",
            "webhook[0].headers",
        ),
        (
            "url = \"http://h/\"\nheaders = { X = \"a\\nb\" }",
            "webhook[0].headers",
        ),
        (
            "url = \"http://h/\"\ntimeout_ms = 0",
            "webhook[0].timeout_ms",
        ),
        (
            "url = \"http://h/\"\nretry_base_ms = 0",
            "webhook[0].retry_base_ms",
        ),
        (
            "url = \"http://h/\"\nretry_base_ms = 100\nretry_max_ms = 50",
            "webhook[0].retry_max_ms",
        ),
        ("url = \"http://h/\"\nname = \"../x\"", "webhook[0].name"),
        ("url = \"http://h/\"\nname = \"\"", "webhook[0].name"),
    ];
    for (body, key) in cases {
        let err = specs(&format!("[[webhook]]\n{body}\n")).expect_err(body);
        assert!(err.contains(key), "{body}: {err}");
    }
    let err = specs(
        "[[webhook]]\nurl = \"http://a/\"\nname = \"x\"\n[[webhook]]\nurl = \"http://b/\"\nname = \"x\"\n",
    )
    .expect_err("two of a name");
    assert!(err.contains("webhook[1].name"), "{err}");
    // Unknown keys are refused by the parser, as everywhere in the file.
    assert!(specs("[[webhook]]\nurl = \"http://h/\"\nbatch = 1\n").is_err());
    // The error names the known types.
    let err = specs("[[webhook]]\nurl = \"http://h/\"\nevents = [\"Nope\"]\n").expect_err("type");
    assert!(err.contains("TransientFailure"), "{err}");
}
