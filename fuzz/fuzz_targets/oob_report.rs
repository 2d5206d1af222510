//! `oob::parse` and `oob::decide` on arbitrary bytes: what comes back to the report domain is
//! written by strangers.
//!
//! Checks: no panic; a DSN has between one and `REPORT_RCPTS_MAX` recipient blocks, every
//! field within `FIELD_LEN_MAX`; `decide` gives one line per block and suppresses only
//! addresses.
#![no_main]

use epoxi::oob::{decide, parse, Arrival, Ours, Report, FIELD_LEN_MAX, REPORT_RCPTS_MAX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let names = vec!["mx.example".to_owned()];
    let ours = Ours {
        hostnames: &names,
        tenant_header: Some("X-Tenant"),
    };
    let Ok(report) = parse(data, &ours) else {
        return;
    };
    if let Report::Dsn(d) = &report {
        assert!(!d.recipients.is_empty() && d.recipients.len() <= REPORT_RCPTS_MAX);
        for r in &d.recipients {
            for f in [&r.final_recipient, &r.action, &r.status, &r.diagnostic] {
                assert!(f.as_ref().is_none_or(|v| v.len() <= FIELD_LEN_MAX), "{f:?}");
            }
        }
    }
    let arrival = Arrival {
        ts_ms: 0,
        shard: 0,
        peer: "-",
        sender: "",
        recipient: "b@bounces.example",
        verp: None,
    };
    let d = decide(&report, &arrival, None);
    if let Report::Dsn(dsn) = &report {
        assert_eq!(d.bounces.len(), dsn.recipients.len());
    }
    assert!(d.suppress.iter().all(|(_, rcpt, _)| rcpt.contains('@')));
});
