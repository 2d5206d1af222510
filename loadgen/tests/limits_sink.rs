//! `sink --limit-*` as an MTA sees it: the real binary on loopback refusing a client's
//! connection past its concurrent limit and its MAIL past its per-second or per-minute limit,
//! in a provider's words, and the report counting what it refused and, with
//! `--stats-per-ip`, the most messages it accepted from each client in one second.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{Running, DEADLINE};
use socket2::{Domain, Socket, Type};

/// Transactions a test sends before giving up on meeting a limit: a per-second limit of a few
/// is met within a handful on loopback, and the bound keeps a broken limit from looping.
const TRANSACTIONS_MAX: usize = 200;

/// How long to wait for the next whole second of the sink's clock: one second after the
/// refusal is always in a later window; the margin covers timer slack.
const NEXT_WINDOW_WAIT: Duration = Duration::from_millis(1100);

struct Client(BufReader<TcpStream>);

impl Client {
    /// A connection from `from` (port picked by the kernel), its greeting read.
    fn connect_from(from: &str, sink: &Running) -> (Client, String) {
        let from: IpAddr = from.parse().expect("client address");
        let socket =
            Socket::new(Domain::for_address(sink.addr), Type::STREAM, None).expect("socket");
        socket
            .bind(&SocketAddr::new(from, 0).into())
            .expect("bind the client address");
        socket
            .connect_timeout(&sink.addr.into(), DEADLINE)
            .expect("connect to the sink");
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
        let mut client = Client(BufReader::new(stream));
        let greeting = client.reply();
        (client, greeting)
    }

    /// A connection from `from` that was greeted with 220.
    fn greeted(from: &str, sink: &Running) -> Client {
        let (client, greeting) = Client::connect_from(from, sink);
        assert!(greeting.starts_with("220 "), "{greeting}");
        client
    }

    /// One whole reply, continuation lines included, CRLFs kept.
    fn reply(&mut self) -> String {
        let mut reply = String::new();
        loop {
            let mut line = String::new();
            let n = self.0.read_line(&mut line).expect("read a reply");
            assert!(n > 0, "connection closed mid-reply after {reply:?}");
            reply.push_str(&line);
            match line.as_bytes().get(3) {
                Some(b' ') => return reply,
                Some(b'-') => {}
                _ => panic!("not a reply line: {line:?}"),
            }
        }
    }

    fn send(&mut self, command: &str) -> String {
        self.0
            .get_mut()
            .write_all(format!("{command}\r\n").as_bytes())
            .expect("write");
        self.reply()
    }

    /// Sends one transaction; `Err` with the reply if MAIL was refused.
    fn transaction(&mut self, id: usize) -> Result<(), String> {
        let mail = self.send("MAIL FROM:<a@mta.test>");
        if !mail.starts_with("250 ") {
            return Err(mail);
        }
        assert!(self.send("RCPT TO:<u@d0.test>").starts_with("250 "));
        assert!(self.send("DATA").starts_with("354 "));
        let end = self.send(&format!("X-Loadgen-Id: limits-{id}\r\n\r\nhello\r\n."));
        assert!(end.starts_with("250 "), "{end}");
        Ok(())
    }

    /// Sends transactions until a MAIL is refused; returns how many were accepted and the
    /// refusal.
    fn until_refused(&mut self) -> (usize, String) {
        let deadline = Instant::now() + DEADLINE;
        for sent in 0..TRANSACTIONS_MAX {
            assert!(Instant::now() < deadline, "no refusal in {DEADLINE:?}");
            if let Err(refusal) = self.transaction(sent) {
                return (sent, refusal);
            }
        }
        panic!("{TRANSACTIONS_MAX} transactions and no refusal");
    }

    fn closed(mut self) -> bool {
        let mut rest = String::new();
        matches!(self.0.read_line(&mut rest), Ok(0))
    }

    fn quit(mut self) {
        assert!(self.send("QUIT").starts_with("221 "));
        assert!(self.closed(), "QUIT closes");
    }
}

#[test]
fn the_connection_past_the_per_ip_limit_is_greeted_421_and_closed() {
    let sink = Running::start(&[
        "sink",
        "--listen",
        "127.0.0.1:0",
        "--limit-conns-per-ip",
        "2",
        "--stats-per-ip",
    ]);
    let first = Client::greeted("127.0.0.1", &sink);
    let second = Client::greeted("127.0.0.1", &sink);
    let (third, greeting) = Client::connect_from("127.0.0.1", &sink);
    assert!(
        greeting
            .starts_with("421-4.7.0 [127.0.0.1] Our system has detected an unusual rate of\r\n"),
        "{greeting}"
    );
    assert!(
        greeting.ends_with(
            "421 4.7.0  https://support.google.com/mail/?p=UnsolicitedRateLimitError - gsmtp\r\n"
        ),
        "{greeting}"
    );
    assert!(third.closed(), "the refused connection is closed");
    // The limit is per client address.
    let other = Client::greeted("127.0.0.2", &sink);
    // Once one of the two is gone, the client may connect again.
    first.quit();
    let again = Client::greeted("127.0.0.1", &sink);
    for client in [second, other, again] {
        client.quit();
    }

    let report = sink.stop();
    assert_eq!(report["throttled_connections"], 1, "{report}");
    assert_eq!(report["throttled_messages"], 0, "{report}");
    assert_eq!(report["peers"]["127.0.0.1"], 4, "{report}");
    assert_eq!(report["per_ip"]["127.0.0.1"]["throttled_connections"], 1);
    assert_eq!(report["per_ip"]["127.0.0.2"]["throttled_connections"], 0);
}

#[test]
fn mail_past_the_per_second_limit_gets_451_and_the_next_second_is_accepted() {
    let sink = Running::start(&[
        "sink",
        "--listen",
        "127.0.0.1:0",
        "--limit-msgs-per-sec",
        "3",
        "--stats-per-ip",
    ]);
    let mut c = Client::greeted("127.0.0.1", &sink);
    assert!(c.send("EHLO mta.test").starts_with("250-"));
    let (accepted, refusal) = c.until_refused();
    assert!(accepted >= 3, "{accepted} accepted before the refusal");
    assert!(
        refusal.starts_with("451-4.7.1 [127.0.0.1] Our system has detected an unusual rate of\r\n"),
        "{refusal}"
    );
    assert!(
        refusal.contains("rate limited. Try again later."),
        "{refusal}"
    );
    // A 451 leaves the connection open and the client free to go on.
    assert!(c.send("RSET").starts_with("250 "));
    assert!(c.send("NOOP").starts_with("250 "));
    thread::sleep(NEXT_WINDOW_WAIT);
    c.transaction(accepted)
        .expect("accepted in the next second");
    c.quit();

    let report = sink.stop();
    assert_eq!(report["throttled_messages"], 1, "{report}");
    assert_eq!(report["throttled_connections"], 0, "{report}");
    assert_eq!(report["unique"], accepted as u64 + 1, "{report}");
    let client = &report["per_ip"]["127.0.0.1"];
    assert_eq!(client["accepted"], accepted as u64 + 1, "{report}");
    assert_eq!(client["throttled_messages"], 1, "{report}");
    // The second of the refusal saw three whole transactions. On one connection, a second can
    // also count one message whose MAIL came in the second before, but never more.
    let max = client["max_per_s"].as_u64().expect("max_per_s");
    assert!((3..=4).contains(&max), "{report}");
}

#[test]
fn limit_reply_421_closes_the_connection_at_the_per_minute_limit() {
    let sink = Running::start(&[
        "sink",
        "--listen",
        "127.0.0.1:0",
        "--limit-msgs-per-min",
        "2",
        "--limit-reply",
        "421",
        "--limit-style",
        "yahoo",
    ]);
    let mut c = Client::greeted("127.0.0.1", &sink);
    assert!(c.send("HELO mta.test").starts_with("250 "));
    c.transaction(0).expect("first of the minute");
    c.transaction(1).expect("second of the minute");
    let refusal = c.transaction(2).expect_err("third of the minute");
    assert_eq!(
        refusal,
        "421 4.7.0 [TSS04] Messages from 127.0.0.1 temporarily deferred due to unexpected \
volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes\r\n"
    );
    assert!(c.closed(), "421 closes the connection");
    let report = sink.stop();
    assert_eq!(report["throttled_messages"], 1, "{report}");
    assert_eq!(report["unique"], 2, "{report}");
    assert!(report.get("per_ip").is_none(), "only with --stats-per-ip");
}

#[test]
fn stats_per_ip_alone_counts_without_limiting() {
    let sink = Running::start(&["sink", "--listen", "127.0.0.1:0", "--stats-per-ip"]);
    let mut c = Client::greeted("127.0.0.2", &sink);
    assert!(c.send("HELO mta.test").starts_with("250 "));
    for id in 0..5 {
        c.transaction(id).expect("no limit");
    }
    c.quit();
    let report = sink.stop();
    assert!(report.get("throttled_messages").is_none(), "{report}");
    assert!(report.get("throttled_connections").is_none(), "{report}");
    let client = &report["per_ip"]["127.0.0.2"];
    assert_eq!(client["accepted"], 5, "{report}");
    let max = client["max_per_s"].as_u64().expect("max_per_s");
    assert!((1..=5).contains(&max), "{report}");
    assert_eq!(client["max_per_min"], 5, "{report}");
}

#[test]
fn without_limits_the_report_is_as_before() {
    let sink = Running::start(&["sink", "--listen", "127.0.0.1:0"]);
    let mut c = Client::greeted("127.0.0.1", &sink);
    assert!(c.send("HELO mta.test").starts_with("250 "));
    for id in 0..3 {
        c.transaction(id).expect("no limit");
    }
    c.quit();
    let report = sink.stop();
    for key in ["throttled_messages", "throttled_connections", "per_ip"] {
        assert!(report.get(key).is_none(), "{key} in {report}");
    }
}

/// Python's smtplib, a client not written for this sink, sees the 451 as a refused sender
/// with Microsoft's words, and goes on on the same connection.
#[test]
fn smtplib_sees_the_rate_limit_as_a_refused_sender() {
    if Command::new("python3")
        .arg("-c")
        .arg("import smtplib")
        .status()
        .map_or(true, |s| !s.success())
    {
        eprintln!("skipped: no python3 with smtplib");
        return;
    }
    let sink = Running::start(&[
        "sink",
        "--listen",
        "127.0.0.1:0",
        "--limit-msgs-per-sec",
        "1",
        "--limit-style",
        "outlook",
    ]);
    let script = r#"
import smtplib, sys
s = smtplib.SMTP(sys.argv[1], int(sys.argv[2]), timeout=30)
s.ehlo("mta.test")
for n in range(int(sys.argv[3])):
    try:
        s.sendmail("a@mta.test", ["u@d0.test"], "Subject: x\r\n\r\nhi\r\n")
    except smtplib.SMTPSenderRefused as e:
        print(e.smtp_code, e.smtp_error.decode())
        break
s.rset()
print(s.noop()[0])
s.quit()
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(sink.addr.ip().to_string())
        .arg(sink.addr.port().to_string())
        .arg(TRANSACTIONS_MAX.to_string())
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].starts_with(
            "451 4.7.650 The mail server [127.0.0.1] has been temporarily rate limited due to IP reputation."
        ),
        "{stdout}"
    );
    assert_eq!(lines[1], "250", "the connection stays usable: {stdout}");
    let report = sink.stop();
    assert_eq!(report["throttled_messages"], 1, "{report}");
}
