//! `parse_command` on arbitrary bytes.
//!
//! Checks: no panic on any line; an `Ok` command's borrowed fields are usable (formatted,
//! measured) and obey the parser's own limits, and every mailbox is `local@domain` as received.
#![no_main]

use epoxi::smtp::parser::{self, Command, Mailbox};
use epoxi::smtp::parse_command;
use libfuzzer_sys::fuzz_target;

fn check_mailbox(line: &[u8], m: &Mailbox<'_>) {
    assert!(m.local.len() <= parser::LOCAL_PART_LEN_MAX, "{m:?}");
    assert!(m.domain.len() <= parser::DOMAIN_LEN_MAX, "{m:?}");
    assert!(m.address.len() <= parser::PATH_LEN_MAX, "{m:?}");
    assert!(!m.domain.is_empty(), "{m:?}");
    assert_eq!(m.address, format!("{}@{}", m.local, m.domain), "{m:?}");
    // Not asserted ASCII: since SMTPUTF8 (e4aa1bc) the parser accepts UTF-8 mailboxes and the
    // session decides whether they are allowed.
    // The mailbox borrows from the line, so it must appear in it.
    let found = line
        .windows(m.address.len())
        .any(|w| w == m.address.as_bytes());
    assert!(found, "{m:?} not in line");
}

fn check_word(line: &[u8], s: &str) {
    // Usable: format it and walk its characters.
    let _ = format!("{s:?}").len();
    assert!(!s.contains('\0'), "{s:?}");
    // The server hands over lines without their LF; then no argument may contain one.
    if !line.contains(&b'\n') {
        assert!(!s.contains('\n'), "{s:?}");
    }
}

fuzz_target!(|line: &[u8]| {
    let Ok(cmd) = parse_command(line) else {
        return;
    };
    let _ = format!("{cmd:?}");
    assert!(!line.contains(&0), "NUL accepted: {cmd:?}");
    match cmd {
        Command::Ehlo(name) | Command::Helo(name) => {
            assert!(!name.is_empty(), "{cmd:?}");
            check_word(line, name);
        }
        Command::Mail { from, params } => {
            if let Some(m) = from {
                check_mailbox(line, &m);
            }
            let _ = params.size.map(|s| s.saturating_add(1));
            let _ = format!("{:?}", params.body);
        }
        Command::Rcpt { to, params } => {
            check_mailbox(line, &to);
            let _ = format!("{params:?}");
        }
        Command::Vrfy(s) | Command::Expn(s) => check_word(line, s),
        Command::Help(topic) => {
            if let Some(t) = topic {
                check_word(line, t);
            }
        }
        Command::Data | Command::Rset | Command::Noop | Command::Quit => {}
        // Commands added later (BDAT, STARTTLS, AUTH) are at least formatted above.
        #[allow(unreachable_patterns)]
        _ => {}
    }
});
