//! `sink --smart` as a client sees it: the real binary on loopback refusing recipients by
//! local part at RCPT and spam after the final dot, in the words of the domain's provider,
//! and counting the refusals by kind in its report.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::Command;

use common::{Running, DEADLINE};
use serde_json::json;

struct Client(BufReader<TcpStream>);

impl Client {
    fn connect(sink: &Running) -> Client {
        let stream = TcpStream::connect_timeout(&sink.addr, DEADLINE).expect("connect");
        stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
        let mut client = Client(BufReader::new(stream));
        assert!(client.reply().starts_with("220 "), "greeting");
        client
    }

    /// One whole reply, continuation lines included, CRLFs kept.
    fn reply(&mut self) -> String {
        let mut reply = String::new();
        loop {
            let mut line = String::new();
            let n = self.0.read_line(&mut line).expect("read a reply");
            assert!(n > 0, "connection closed mid-reply after {reply:?}");
            assert!(line.ends_with("\r\n"), "{line:?}");
            let last = line.as_bytes().get(3) == Some(&b' ');
            reply.push_str(&line);
            if last {
                return reply;
            }
            assert_eq!(line.as_bytes().get(3), Some(&b'-'), "{line:?}");
            assert_eq!(line[..3], reply[..3], "continuation lines repeat the code");
        }
    }

    fn send(&mut self, command: &str) -> String {
        self.0
            .get_mut()
            .write_all(format!("{command}\r\n").as_bytes())
            .expect("write");
        self.reply()
    }

    fn closed(mut self) -> bool {
        let mut rest = String::new();
        matches!(self.0.read_line(&mut rest), Ok(0))
    }
}

#[test]
fn smart_sink_refuses_at_rcpt_and_after_data_and_counts_by_kind() {
    let sink = Running::start(&["sink", "--listen", "127.0.0.1:0", "--smart"]);
    let mut c = Client::connect(&sink);
    assert!(c.send("EHLO mta.test").starts_with("250-"));
    assert!(c.send("MAIL FROM:<a@mta.test>").starts_with("250 "));
    assert_eq!(
        c.send("RCPT TO:<permfail@gmail.com>"),
        "550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n\
550-5.1.1 double-checking the recipient's email address for typos or\r\n\
550-5.1.1 unnecessary spaces. For more information, go to\r\n\
550 5.1.1  https://support.google.com/mail/?p=NoSuchUser - gsmtp\r\n"
    );
    assert_eq!(
        c.send("RCPT TO:<quota@yahoo.com>"),
        "552 1 Requested mail action aborted, mailbox not found\r\n"
    );
    let blocked = c.send("RCPT TO:<blocked@hotmail.com>");
    assert!(
        blocked.starts_with(
            "550 5.7.1 Service unavailable, Client host [127.0.0.1] blocked using Spamhaus."
        ),
        "{blocked}"
    );
    assert_eq!(
        c.send("RCPT TO:<greylist+1@example.test>"),
        "450 4.7.1 <greylist+1@example.test>: Recipient address rejected: Greylisted, \
see http://postgrey.schweikert.ch/help/loadgen.test.html\r\n"
    );
    assert!(c.send("RCPT TO:<someone@gmail.com>").starts_with("250 "));
    assert!(c.send("DATA").starts_with("354 "));
    assert!(c
        .send("X-Loadgen-Id: ok-1\r\n\r\nhello\r\n.")
        .starts_with("250 "));

    // spam@ is accepted at RCPT and refused after the final dot.
    assert!(c.send("MAIL FROM:<a@mta.test>").starts_with("250 "));
    assert!(c.send("RCPT TO:<spam@gmail.com>").starts_with("250 "));
    assert!(c.send("DATA").starts_with("354 "));
    let spam = c.send("X-Loadgen-Id: spam-1\r\n\r\nbuy now\r\n.");
    assert!(
        spam.starts_with("550-5.7.1 [127.0.0.1] Gmail has detected that this message is\r\n"),
        "{spam}"
    );
    assert!(
        spam.contains("550-5.7.1 likely unsolicited mail."),
        "{spam}"
    );

    // Gmail's tempfail is a 421: the sink closes the connection after it.
    assert!(c.send("MAIL FROM:<a@mta.test>").starts_with("250 "));
    let tempfail = c.send("RCPT TO:<tempfail@gmail.com>");
    assert!(
        tempfail.starts_with("421-4.7.0 Try again later, closing connection."),
        "{tempfail}"
    );
    assert!(c.closed(), "421 closes the connection");

    let report = sink.stop();
    assert_eq!(
        report["refused_by_kind"],
        json!({"tempfail": 1, "permfail": 1, "quota": 1, "spam": 1, "blocked": 1,
               "ratelimit": 0, "greylist": 1})
    );
    assert_eq!(report["received"], 2);
    assert_eq!(report["unique"], 1);
    assert_eq!(report["rejected"], 1, "spam is a refused message");
    assert_eq!(report["rcpts"], 1);
}

#[test]
fn without_smart_the_report_and_replies_are_as_before() {
    let sink = Running::start(&["sink", "--listen", "127.0.0.1:0"]);
    let mut c = Client::connect(&sink);
    assert!(c.send("HELO mta.test").starts_with("250 "));
    assert!(c.send("MAIL FROM:<a@mta.test>").starts_with("250 "));
    assert_eq!(
        c.send("RCPT TO:<permfail@gmail.com>"),
        "250 2.1.5 Recipient ok\r\n"
    );
    assert!(c.send("QUIT").starts_with("221 "));
    let report = sink.stop();
    assert!(report.get("refused_by_kind").is_none(), "{report}");
}

#[test]
fn providers_file_is_laid_over_the_builtin_table() {
    let path = std::env::temp_dir().join(format!("smart-sink-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        r#"
[[domains]]
glob = "*.corp.test"
provider = "corp"
[providers.corp.permfail]
code = 551
enhanced = "5.1.6"
text = ["User has moved", "to {rcpt}"]
"#,
    )
    .expect("write the providers file");
    let path_arg = path.to_str().expect("utf-8 temp path").to_owned();
    let sink = Running::start(&[
        "sink",
        "--listen",
        "127.0.0.1:0",
        "--smart",
        "--providers",
        &path_arg,
    ]);
    let mut c = Client::connect(&sink);
    assert!(c.send("HELO mta.test").starts_with("250 "));
    assert!(c.send("MAIL FROM:<a@mta.test>").starts_with("250 "));
    assert_eq!(
        c.send("RCPT TO:<permfail@mx.corp.test>"),
        "551-5.1.6 User has moved\r\n551 5.1.6 to permfail@mx.corp.test\r\n"
    );
    // Kinds the file does not give come from generic.
    assert!(c
        .send("RCPT TO:<quota@mx.corp.test>")
        .starts_with("452 4.2.2 <quota@mx.corp.test>: Recipient address rejected: Mailbox full"));
    // The built-in rules still apply after the file's.
    assert!(c
        .send("RCPT TO:<permfail@gmail.com>")
        .starts_with("550-5.1.1 "));
    assert!(c.send("QUIT").starts_with("221 "));
    let report = sink.stop();
    assert_eq!(report["refused_by_kind"]["permfail"], 2);
    let _ = std::fs::remove_file(&path);
}

/// Python's smtplib, a client that was not written for this sink, reads the multi-line
/// replies as one reply each, with the code and the whole text.
#[test]
fn smtplib_reads_the_smart_replies() {
    if Command::new("python3")
        .arg("-c")
        .arg("import smtplib")
        .status()
        .map_or(true, |s| !s.success())
    {
        eprintln!("skipped: no python3 with smtplib");
        return;
    }
    let sink = Running::start(&["sink", "--listen", "127.0.0.1:0", "--smart"]);
    let script = r#"
import smtplib, sys
def show(reply):
    print(reply[0], reply[1].decode().replace("\n", "|"))
s = smtplib.SMTP(sys.argv[1], int(sys.argv[2]), timeout=30)
s.ehlo("mta.test")
s.mail("a@mta.test")
show(s.rcpt("permfail@gmail.com"))
show(s.rcpt("quota@gmail.com"))
show(s.rcpt("someone@outlook.com"))
s.rset()
try:
    s.sendmail("a@mta.test", ["spam@outlook.com"], "Subject: x\r\n\r\nbuy\r\n")
    print("accepted")
except smtplib.SMTPDataError as e:
    show((e.smtp_code, e.smtp_error))
s.quit()
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(sink.addr.ip().to_string())
        .arg(sink.addr.port().to_string())
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert_eq!(
        lines[0],
        "550 5.1.1 The email account that you tried to reach does not exist. Please try|\
5.1.1 double-checking the recipient's email address for typos or|\
5.1.1 unnecessary spaces. For more information, go to|\
5.1.1  https://support.google.com/mail/?p=NoSuchUser - gsmtp",
        "{stdout}"
    );
    assert!(
        lines[1].starts_with("452 4.2.2 The email account that you tried to reach is over quota."),
        "{stdout}"
    );
    assert_eq!(lines[2], "250 2.1.5 Recipient ok", "{stdout}");
    assert_eq!(
        lines[3],
        "550 5.7.520 Message blocked because it contains content identified as spam. AS(4810)",
        "{stdout}"
    );
    let report = sink.stop();
    assert_eq!(report["refused_by_kind"]["permfail"], 1);
    assert_eq!(report["refused_by_kind"]["quota"], 1);
    assert_eq!(report["refused_by_kind"]["spam"], 1);
}
