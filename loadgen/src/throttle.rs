//! The sink's per-client limits, enforced the way a throttling mail provider does, and the
//! per-client counts that show what rate an MTA held.
//!
//! `--limit-conns-per-ip N` greets a client's N+1-th concurrent connection with a 421 and
//! closes it. `--limit-msgs-per-sec N` and `--limit-msgs-per-min N` admit at most N MAIL FROM
//! commands per client IP in each fixed window (a whole second, a whole minute, counted from
//! the sink's start); a MAIL beyond that gets a 451 and the connection stays open, or with
//! `--limit-reply 421` a 421 and the connection is closed. The words are Gmail's, Yahoo's or
//! Microsoft's (`--limit-style`).
//!
//! No I/O and no clock: `Clients` is fed the time since the sink started and answers with a
//! refusal to send, or none. Invariants: a MAIL is admitted only if every message window it
//! falls in is below its limit, and an admitted MAIL is counted in all of them; a connection is
//! admitted only below the connection limit and is counted until `close`; at most
//! `CLIENTS_MAX` clients are kept by address, further ones sharing the `other` entry.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use serde::Serialize;

/// Clients tracked by address. Tests and benchmarks connect from a few loopback or egress
/// addresses; past this, further clients share one entry (and so one set of limits), which
/// keeps the table bounded at the cost of throttling a crowd as one client.
pub const CLIENTS_MAX: usize = 1024;

/// The report key of the entry shared by clients past `CLIENTS_MAX`.
const CLIENTS_OTHER: &str = "other";

/// Seconds in the per-minute window.
const MINUTE_S: u64 = 60;

/// What a MAIL beyond a message limit gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LimitReply {
    /// Temporary refusal of this transaction; the connection stays open.
    #[default]
    #[value(name = "451")]
    Defer,
    /// Refusal and close, as a provider that drops a client it thinks is flooding.
    #[value(name = "421")]
    Close,
}

/// Whose words the refusals use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LimitStyle {
    #[default]
    Gmail,
    Yahoo,
    Outlook,
}

/// One refusal text: the code, then each line's text after the code and separator, enhanced
/// code first; `{ip}` is the client's address.
struct Text {
    code: u16,
    lines: &'static [&'static str],
}

// Gmail documents "421 4.7.0 Our system has detected an unusual rate of unsolicited mail
// originating from your IP address..." and wraps it over several lines; the 451 carries the
// same words with a per-transaction code, the deferral a limit that keeps the connection open
// gives.
const GMAIL_421: Text = Text {
    code: 421,
    lines: &[
        "4.7.0 [{ip}] Our system has detected an unusual rate of",
        "4.7.0 unsolicited mail originating from your IP address. To protect our",
        "4.7.0 users from spam, mail sent from your IP address has been temporarily",
        "4.7.0 rate limited. For more information, go to",
        "4.7.0  https://support.google.com/mail/?p=UnsolicitedRateLimitError - gsmtp",
    ],
};
const GMAIL_451: Text = Text {
    code: 451,
    lines: &[
        "4.7.1 [{ip}] Our system has detected an unusual rate of",
        "4.7.1 unsolicited mail originating from your IP address. To protect our",
        "4.7.1 users from spam, mail sent from your IP address has been temporarily",
        "4.7.1 rate limited. Try again later. For more information, go to",
        "4.7.1  https://support.google.com/mail/?p=UnsolicitedRateLimitError - gsmtp",
    ],
};
const YAHOO_421: Text = Text {
    code: 421,
    lines: &["4.7.0 [TSS04] Messages from {ip} temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes"],
};
const YAHOO_451: Text = Text {
    code: 451,
    lines: &["4.7.1 [TSS04] Messages from {ip} temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes"],
};
const OUTLOOK_421: Text = Text {
    code: 421,
    lines: &["4.7.500 Server busy. Please try again later from [{ip}]. (AS843) [BN8NAM12FT003.eop-nam12.prod.protection.outlook.com]"],
};
const OUTLOOK_451: Text = Text {
    code: 451,
    lines: &["4.7.650 The mail server [{ip}] has been temporarily rate limited due to IP reputation. For e-mail delivery information, see https://aka.ms/postmaster (S775) [BN8NAM12FT003.eop-nam12.prod.protection.outlook.com]"],
};
// Exchange's own words for a client over its concurrent-connection limit.
const OUTLOOK_CONNS: Text = Text {
    code: 421,
    lines: &["4.3.2 The maximum number of concurrent server connections has exceeded a limit, closing transmission channel"],
};

impl LimitStyle {
    fn connection_text(self) -> &'static Text {
        match self {
            LimitStyle::Gmail => &GMAIL_421,
            LimitStyle::Yahoo => &YAHOO_421,
            LimitStyle::Outlook => &OUTLOOK_CONNS,
        }
    }

    fn message_text(self, reply: LimitReply) -> &'static Text {
        match (self, reply) {
            (LimitStyle::Gmail, LimitReply::Defer) => &GMAIL_451,
            (LimitStyle::Gmail, LimitReply::Close) => &GMAIL_421,
            (LimitStyle::Yahoo, LimitReply::Defer) => &YAHOO_451,
            (LimitStyle::Yahoo, LimitReply::Close) => &YAHOO_421,
            (LimitStyle::Outlook, LimitReply::Defer) => &OUTLOOK_451,
            (LimitStyle::Outlook, LimitReply::Close) => &OUTLOOK_421,
        }
    }
}

/// A refusal as sent, and whether the connection closes after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The whole reply, every line with its CRLF.
    pub line: Vec<u8>,
    pub closes: bool,
}

impl Refusal {
    fn render(text: &Text, ip: &str) -> Self {
        let mut line = Vec::new();
        let last = text.lines.len().saturating_sub(1);
        for (i, words) in text.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            line.extend_from_slice(format!("{}{sep}", text.code).as_bytes());
            line.extend_from_slice(words.replace("{ip}", ip).as_bytes());
            line.extend_from_slice(b"\r\n");
        }
        Refusal {
            line,
            // RFC 5321 3.8: a 421 says the server is closing the channel.
            closes: text.code == 421,
        }
    }
}

/// The limits in force; `None` is no limit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub conns_per_ip: Option<u32>,
    pub msgs_per_s: Option<u32>,
    pub msgs_per_min: Option<u32>,
    pub reply: LimitReply,
    pub style: LimitStyle,
}

impl Limits {
    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        self.conns_per_ip.is_some() || self.limits_messages()
    }

    /// Whether MAIL FROM must be checked.
    pub fn limits_messages(&self) -> bool {
        self.msgs_per_s.is_some() || self.msgs_per_min.is_some()
    }
}

/// A count in fixed windows of one length, the window being the time's index (whole seconds
/// or whole minutes since the start); `max` is the highest count any window reached.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Window {
    index: u64,
    count: u64,
    max: u64,
}

impl Window {
    /// The count so far in window `index`, starting it afresh if the time moved on.
    fn count_at(&mut self, index: u64) -> u64 {
        if index != self.index {
            self.index = index;
            self.count = 0;
        }
        self.count
    }

    fn add(&mut self, index: u64) {
        self.count = self.count_at(index) + 1;
        self.max = self.max.max(self.count);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ClientKey {
    Ip(IpAddr),
    /// Clients past `CLIENTS_MAX`, and any whose address could not be read.
    Other,
}

#[derive(Debug, Default)]
struct Client {
    conns: u32,
    /// MAIL FROM commands admitted, for the limits.
    mail_s: Window,
    mail_min: Window,
    /// Messages accepted (2xx after the final dot), for the report.
    accepted: u64,
    accepted_s: Window,
    accepted_min: Window,
    throttled_connections: u64,
    throttled_messages: u64,
}

/// One client's line in the `per_ip` report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ClientReport {
    /// Messages answered 2xx after the final dot.
    pub accepted: u64,
    /// The most accepted in one fixed second (whole seconds since the sink started).
    pub max_per_s: u64,
    /// The most accepted in one fixed minute (whole minutes since the sink started).
    pub max_per_min: u64,
    pub throttled_connections: u64,
    pub throttled_messages: u64,
}

/// Every client's limits state and counts.
#[derive(Debug, Default)]
pub struct Clients {
    limits: Limits,
    by_key: HashMap<ClientKey, Client>,
    throttled_connections: u64,
    throttled_messages: u64,
}

impl Clients {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    fn client(&mut self, ip: Option<IpAddr>) -> &mut Client {
        let mut key = match ip {
            // A client reaching an IPv6 socket over IPv4 is the IPv4 client it is.
            Some(ip) => ClientKey::Ip(ip.to_canonical()),
            None => ClientKey::Other,
        };
        if key != ClientKey::Other && !self.by_key.contains_key(&key) {
            let named =
                self.by_key.len() - usize::from(self.by_key.contains_key(&ClientKey::Other));
            if named >= CLIENTS_MAX {
                key = ClientKey::Other;
            }
        }
        self.by_key.entry(key).or_default()
    }

    /// A new connection from `ip`: `Err` with the greeting to send instead of 220 if the
    /// client is at its connection limit. An admitted connection must be `close`d.
    pub fn open(&mut self, ip: Option<IpAddr>) -> Result<(), Refusal> {
        let limit = self.limits.conns_per_ip;
        let style = self.limits.style;
        let client = self.client(ip);
        if limit.is_some_and(|n| client.conns >= n) {
            client.throttled_connections += 1;
            self.throttled_connections += 1;
            return Err(Refusal::render(style.connection_text(), &ip_text(ip)));
        }
        client.conns += 1;
        Ok(())
    }

    /// An admitted connection from `ip` ended.
    pub fn close(&mut self, ip: Option<IpAddr>) {
        let client = self.client(ip);
        debug_assert!(client.conns > 0, "close without open");
        client.conns = client.conns.saturating_sub(1);
    }

    /// A MAIL FROM from `ip`, `now` after the sink started: `Some` refusal if the client
    /// is at a message limit in the current second or minute, else it is counted and admitted.
    pub fn admit_mail(&mut self, ip: Option<IpAddr>, now: Duration) -> Option<Refusal> {
        let limits = self.limits;
        let (second, minute) = windows(now);
        let client = self.client(ip);
        let over_s = limits
            .msgs_per_s
            .is_some_and(|n| client.mail_s.count_at(second) >= u64::from(n));
        let over_min = limits
            .msgs_per_min
            .is_some_and(|n| client.mail_min.count_at(minute) >= u64::from(n));
        if over_s || over_min {
            client.throttled_messages += 1;
            self.throttled_messages += 1;
            return Some(Refusal::render(
                limits.style.message_text(limits.reply),
                &ip_text(ip),
            ));
        }
        client.mail_s.add(second);
        client.mail_min.add(minute);
        None
    }

    /// A message from `ip` was accepted after its final dot, `now` after the sink started.
    pub fn accepted(&mut self, ip: Option<IpAddr>, now: Duration) {
        let (second, minute) = windows(now);
        let client = self.client(ip);
        client.accepted += 1;
        client.accepted_s.add(second);
        client.accepted_min.add(minute);
    }

    /// Connections refused at the connection limit, and MAILs refused at a message limit.
    pub fn throttled(&self) -> (u64, u64) {
        (self.throttled_connections, self.throttled_messages)
    }

    /// Every client's counts, by address (IPv4-mapped IPv6 shown as IPv4).
    pub fn report(&self) -> BTreeMap<String, ClientReport> {
        self.by_key
            .iter()
            .map(|(key, c)| {
                let name = match key {
                    ClientKey::Ip(ip) => ip.to_string(),
                    ClientKey::Other => CLIENTS_OTHER.to_owned(),
                };
                let line = ClientReport {
                    accepted: c.accepted,
                    max_per_s: c.accepted_s.max,
                    max_per_min: c.accepted_min.max,
                    throttled_connections: c.throttled_connections,
                    throttled_messages: c.throttled_messages,
                };
                (name, line)
            })
            .collect()
    }
}

/// The second and the minute `now` falls in.
fn windows(now: Duration) -> (u64, u64) {
    let secs = now.as_secs();
    (secs, secs / MINUTE_S)
}

fn ip_text(ip: Option<IpAddr>) -> String {
    ip.map(|ip| ip.to_canonical().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1)));
    const TWO: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2)));

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn limits(conns: Option<u32>, per_s: Option<u32>, per_min: Option<u32>) -> Limits {
        Limits {
            conns_per_ip: conns,
            msgs_per_s: per_s,
            msgs_per_min: per_min,
            ..Limits::default()
        }
    }

    #[test]
    fn connections_past_the_limit_are_refused_per_client_until_one_closes() {
        let mut clients = Clients::new(limits(Some(2), None, None));
        assert_eq!(clients.open(ONE), Ok(()));
        assert_eq!(clients.open(ONE), Ok(()));
        let refusal = clients.open(ONE).unwrap_err();
        assert!(refusal.closes);
        assert!(refusal
            .line
            .starts_with(b"421-4.7.0 [127.0.0.1] Our system has detected an unusual rate of\r\n"));
        assert_eq!(
            clients.open(TWO),
            Ok(()),
            "another client has its own limit"
        );
        clients.close(ONE);
        assert_eq!(clients.open(ONE), Ok(()));
        assert_eq!(clients.throttled(), (1, 0));
        assert_eq!(clients.report()["127.0.0.1"].throttled_connections, 1);
        assert_eq!(clients.report()["127.0.0.2"].throttled_connections, 0);
    }

    #[test]
    fn mail_past_the_per_second_limit_is_deferred_until_the_next_second() {
        let mut clients = Clients::new(limits(None, Some(3), None));
        for t in [0, 10, 999] {
            assert_eq!(clients.admit_mail(ONE, ms(t)), None, "at {t} ms");
        }
        let refusal = clients.admit_mail(ONE, ms(999)).unwrap();
        assert!(!refusal.closes);
        assert!(refusal.line.starts_with(b"451-4.7.1 [127.0.0.1] "));
        assert!(refusal.line.ends_with(
            b"451 4.7.1  https://support.google.com/mail/?p=UnsolicitedRateLimitError - gsmtp\r\n"
        ));
        assert_eq!(clients.admit_mail(TWO, ms(999)), None, "per client");
        // A refused MAIL takes no slot: the next second admits three again.
        for t in [1000, 1500, 1999] {
            assert_eq!(clients.admit_mail(ONE, ms(t)), None, "at {t} ms");
        }
        assert!(clients.admit_mail(ONE, ms(1999)).is_some());
        assert_eq!(clients.throttled(), (0, 2));
        assert_eq!(clients.report()["127.0.0.1"].throttled_messages, 2);
    }

    #[test]
    fn mail_past_the_per_minute_limit_is_deferred_until_the_next_minute() {
        let mut clients = Clients::new(limits(None, Some(10), Some(4)));
        for t in [0, 1_000, 2_000, 59_000] {
            assert_eq!(clients.admit_mail(ONE, ms(t)), None, "at {t} ms");
        }
        assert!(clients.admit_mail(ONE, ms(59_999)).is_some());
        assert_eq!(clients.admit_mail(ONE, ms(60_000)), None);
        // Both windows must have room: the second's limit still holds within the minute.
        let mut clients = Clients::new(limits(None, Some(1), Some(4)));
        assert_eq!(clients.admit_mail(ONE, ms(0)), None);
        assert!(clients.admit_mail(ONE, ms(500)).is_some());
        assert_eq!(clients.admit_mail(ONE, ms(1_000)), None);
    }

    #[test]
    fn limit_reply_421_closes_and_styles_use_their_providers_words() {
        let with = |style, reply| {
            let mut clients = Clients::new(Limits {
                msgs_per_s: Some(1),
                conns_per_ip: Some(1),
                reply,
                style,
                ..Limits::default()
            });
            assert_eq!(clients.admit_mail(ONE, ms(0)), None);
            let message = clients.admit_mail(ONE, ms(0)).unwrap();
            assert_eq!(clients.open(ONE), Ok(()));
            let conn = clients.open(ONE).unwrap_err();
            (
                String::from_utf8(message.line).unwrap(),
                message.closes,
                String::from_utf8(conn.line).unwrap(),
            )
        };
        let (line, closes, _) = with(LimitStyle::Gmail, LimitReply::Close);
        assert!(
            line.starts_with("421-4.7.0 [127.0.0.1] Our system"),
            "{line}"
        );
        assert!(closes);
        let (line, closes, conn) = with(LimitStyle::Yahoo, LimitReply::Defer);
        assert_eq!(
            line,
            "451 4.7.1 [TSS04] Messages from 127.0.0.1 temporarily deferred due to unexpected \
volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes\r\n"
        );
        assert!(!closes);
        assert!(
            conn.starts_with("421 4.7.0 [TSS04] Messages from 127.0.0.1 "),
            "{conn}"
        );
        let (line, closes, conn) = with(LimitStyle::Outlook, LimitReply::Defer);
        assert!(line.starts_with("451 4.7.650 The mail server [127.0.0.1] has been temporarily rate limited due to IP reputation."), "{line}");
        assert!(!closes);
        assert!(
            conn.starts_with("421 4.3.2 The maximum number of concurrent"),
            "{conn}"
        );
        let (line, closes, _) = with(LimitStyle::Outlook, LimitReply::Close);
        assert!(line.starts_with("421 4.7.500 Server busy."), "{line}");
        assert!(closes);
    }

    #[test]
    fn every_text_is_a_well_formed_reply() {
        for text in [
            &GMAIL_421,
            &GMAIL_451,
            &YAHOO_421,
            &YAHOO_451,
            &OUTLOOK_421,
            &OUTLOOK_451,
            &OUTLOOK_CONNS,
        ] {
            let class = (text.code / 100).to_string();
            for words in text.lines {
                let enhanced = words.split(' ').next().unwrap();
                assert_eq!(enhanced.split('.').count(), 3, "{words}");
                assert!(enhanced.starts_with(&class), "{words}");
                // RFC 5321 4.5.3.1.5, with the widest address the client can have.
                let ip = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
                assert!(words.replace("{ip}", ip).len() + 6 <= 512, "{words}");
            }
        }
    }

    #[test]
    fn accepted_messages_give_the_most_in_one_second_and_one_minute() {
        let mut clients = Clients::new(Limits::default());
        for t in [0, 100, 900, 1_000, 1_001, 1_002, 1_999, 2_000, 61_000] {
            clients.accepted(ONE, ms(t));
        }
        clients.accepted(TWO, ms(5));
        let report = clients.report();
        assert_eq!(
            report["127.0.0.1"],
            ClientReport {
                accepted: 9,
                max_per_s: 4,
                max_per_min: 8,
                throttled_connections: 0,
                throttled_messages: 0,
            }
        );
        assert_eq!(report["127.0.0.2"].max_per_s, 1);
        let line = serde_json::to_string(&report["127.0.0.2"]).unwrap();
        assert_eq!(
            line,
            r#"{"accepted":1,"max_per_s":1,"max_per_min":1,"throttled_connections":0,"throttled_messages":0}"#
        );
    }

    #[test]
    fn clients_past_the_limit_share_one_entry() {
        let mut clients = Clients::new(limits(None, Some(1), None));
        for i in 0..CLIENTS_MAX as u32 + 5 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            clients.accepted(Some(ip), ms(0));
        }
        clients.accepted(None, ms(0));
        let report = clients.report();
        assert_eq!(report.len(), CLIENTS_MAX + 1);
        assert_eq!(report[CLIENTS_OTHER].accepted, 6);
        // An IPv4-mapped client is the IPv4 client.
        let mut clients = Clients::new(limits(None, Some(1), None));
        assert_eq!(clients.admit_mail(ONE, ms(0)), None);
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(clients.admit_mail(Some(mapped), ms(0)).is_some());
    }
}
