//! Configuration: the TOML file, command-line overrides and validation.
//!
//! Every key has a default, so `epoxi serve` runs with no file at all. Unknown keys are refused
//! (a typo must not silently fall back to a default), and every validation error names the key
//! it is about, as `section.key`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod http;
mod shaping;
pub use http::{HttpSection, HTTP_BODY_MAX_DEFAULT, HTTP_HEAD_MAX_DEFAULT, HTTP_ROLES};
pub mod alerts;
mod webhook;
pub use alerts::{AlertEntry, AlertKind, AlertsSection};
pub use shaping::{
    AdaptiveEntry, DomainEntry, LimitKeys, ProviderEntry, ShapingSection, SiteEntry, StageEntry,
    WarmupEntry, WarmupProviderEntry,
};
pub use webhook::WebhookEntry;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
    /// Every error found in one part of the configuration (e.g. the shaping tables), one per
    /// line.
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Several(Vec<ConfigError>),
    /// A value in the `index`-th table (from 0, in file order) of an array of tables.
    #[error("invalid value for `{table}[{index}].{key}`: {reason}")]
    InTable {
        table: &'static str,
        index: usize,
        key: &'static str,
        reason: String,
    },
    /// A `[[dkim]]` table (numbered from 0, in file order) that cannot be used.
    #[error("dkim[{index}] ({domain}/{selector}): {reason}")]
    Dkim {
        index: usize,
        domain: String,
        selector: String,
        reason: String,
    },
}

/// Bounds of `delivery.bdat_chunk_size_max`. Below 64 KiB a big message becomes hundreds of
/// chunks, each a command and a reply to wait for; above 1 GiB a chunk is bigger than any
/// message the spool can hold.
const BDAT_CHUNK_SIZE_MIN: usize = 64 << 10;
const BDAT_CHUNK_SIZE_CEILING: usize = 1 << 30;
const _: () = assert!(
    BDAT_CHUNK_SIZE_MIN <= crate::smtp::client::BDAT_CHUNK_SIZE_MAX_DEFAULT
        && crate::smtp::client::BDAT_CHUNK_SIZE_MAX_DEFAULT <= BDAT_CHUNK_SIZE_CEILING,
    "the default BDAT chunk size must pass validation"
);

pub(crate) fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerSection,
    pub spool: SpoolSection,
    pub queue: QueueSection,
    pub delivery: DeliverySection,
    pub log: LogSection,
    pub shards: ShardsSection,
    /// Static routes, tried in order after the ones given with `--route`.
    pub route: Vec<RouteEntry>,
    /// Listeners beyond `server.listen` (and `server.implicit_tls_listen`), each with its own
    /// policy, e.g. a submission port where AUTH is required.
    pub listener: Vec<ListenerEntry>,
    pub dns: DnsSection,
    pub egress: EgressSection,
    /// Egress sources: a local address to send from and the EHLO name to use there.
    pub source: Vec<SourceEntry>,
    /// Egress pools: weighted sets of sources.
    pub pool: Vec<PoolEntry>,
    /// Which pool a message goes out through, first match wins; else `egress.default_pool`.
    pub pool_rule: Vec<PoolRuleEntry>,
    /// Shaping defaults (rates) and the built-in providers (see `shaping`).
    pub shaping: ShapingSection,
    /// Mail providers: named sets of MX globs with limits of their own.
    pub provider: Vec<ProviderEntry>,
    /// Limits for particular sites (or providers, or sources to them); layered over
    /// `[delivery]`, `[shaping]` and `[[provider]]` (see `shaping::layers`).
    pub site: Vec<SiteEntry>,
    /// Per recipient domain settings, e.g. spreading a hot domain over several shards.
    pub domain: Vec<DomainEntry>,
    /// DKIM signatures; every table that matches a message adds one (see `dkim`).
    pub dkim: Vec<DkimEntry>,
    pub tls_report: TlsReportSection,
    pub bounce: BounceSection,
    /// Retry policy overrides by bounce category, recipient domain and site, first match
    /// wins; else `[queue]`'s backoff.
    pub retry: Vec<RetryEntry>,
    pub oob: OobSection,
    pub suppression: SuppressionSection,
    pub notices: NoticesSection,
    /// Per tenant (the `egress.tenant_header` value) settings: which notices its senders get.
    pub tenant: Vec<TenantEntry>,
    pub dead_letter: DeadLetterSection,
    /// Adaptive shaping rules: replies that, N times in a period, suspend or throttle a
    /// (site, source) for a while (see `shaping::adaptive`).
    pub adaptive: Vec<AdaptiveEntry>,
    /// IP warmup schedules, named by `[[source]] warmup`.
    pub warmup: Vec<WarmupEntry>,
    /// The HTTP endpoint (off unless `listen` is set).
    pub http: HttpSection,
    /// Event webhooks: event-log lines POSTed to HTTP receivers (see `webhook`).
    pub webhook: Vec<WebhookEntry>,
    /// How often alert rules are evaluated (see `metrics::alerts`).
    pub alerts: AlertsSection,
    /// Alert rules: a site's bounce or deferral rate, the oldest message, the spool's disk,
    /// a source out of rotation.
    pub alert: Vec<AlertEntry>,
}

/// A kind of delivery status notification, as the `notices` lists name it.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NoticeKind {
    Bounce,
    Expiry,
    Delay,
    Success,
}

/// The switches a `notices = [...]` list turns on (the others are off).
pub fn notice_switches(kinds: &[NoticeKind]) -> crate::envelope::NoticeSwitches {
    crate::envelope::NoticeSwitches {
        bounce: kinds.contains(&NoticeKind::Bounce),
        expiry: kinds.contains(&NoticeKind::Expiry),
        delay: kinds.contains(&NoticeKind::Delay),
        success: kinds.contains(&NoticeKind::Success),
    }
}

/// Delivery status notifications (RFC 3464) to senders: which are sent, and delay notices.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NoticesSection {
    /// The notices sent for mail of listeners without their own `notices` list.
    pub enabled: Vec<NoticeKind>,
    /// A recipient still pending this long after reception gets one delay notice, in
    /// seconds; 0: none (Postfix's `delay_warning_time` is off by default too; 14400, 4 h,
    /// is the usual choice when on).
    pub delay_after_s: u64,
    /// Delay notices for recipients given without NOTIFY (RFC 3461 leaves it to the MTA);
    /// NOTIFY=DELAY always asks for them, any other NOTIFY excludes them.
    pub delay_without_notify: bool,
}

impl Default for NoticesSection {
    fn default() -> Self {
        NoticesSection {
            enabled: vec![
                NoticeKind::Bounce,
                NoticeKind::Expiry,
                NoticeKind::Delay,
                NoticeKind::Success,
            ],
            delay_after_s: 0,
            delay_without_notify: true,
        }
    }
}

/// One tenant's settings.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TenantEntry {
    /// The tenant header's value (compared case-insensitively).
    pub name: String,
    /// Notices its senders may get (on top of the listener's); every kind if unset.
    #[serde(default)]
    pub notices: Option<Vec<NoticeKind>>,
    /// Messages of this tenant per period over all sites, e.g. "100/s".
    #[serde(default)]
    pub message_rate: Option<String>,
}

/// Dead letters: messages that failed for good, kept for inspection and re-injection.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterSection {
    pub enabled: bool,
    /// Where they go (shard i in `DIR/shard-i/`). Empty: `SPOOL/deadletter`.
    pub dir: PathBuf,
    /// Dead letters kept per shard; beyond it a failed message is let go without one (and
    /// logged), so a bounce storm cannot fill the disk.
    pub messages_max: usize,
    /// Bytes of dead letters kept per shard, bodies included; the same.
    pub bytes_max: u64,
}

impl Default for DeadLetterSection {
    fn default() -> Self {
        DeadLetterSection {
            enabled: false,
            dir: PathBuf::new(),
            messages_max: 10_000,
            bytes_max: 1 << 30,
        }
    }
}

/// One `[[retry]]` rule: which failures it matches, and the backoff (or early bounce) for
/// them. Unset values are `[queue]`'s.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryEntry {
    /// Bounce categories (e.g. `["RateLimited"]`); empty or absent: any.
    #[serde(default)]
    pub category: Vec<String>,
    /// Glob on the recipient domain.
    #[serde(default)]
    pub domain: Option<String>,
    /// Glob on the site's MX host names (or a route's host), as in `[[site]]`.
    #[serde(default)]
    pub site: Option<String>,
    #[serde(default)]
    pub first_ms: Option<u64>,
    #[serde(default)]
    pub base_ms: Option<u64>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub cap_ms: Option<u64>,
    #[serde(default)]
    pub jitter: Option<f64>,
    #[serde(default)]
    pub max_age_s: Option<u64>,
    /// A transient (4xx) failure this rule matches bounces at once, e.g. the 4xx some
    /// providers give unknown users (`category = ["InvalidRecipient"]`).
    #[serde(default)]
    pub bounce: bool,
}

/// Out-of-band bounces and feedback reports (`src/oob/`): a domain whose every address takes
/// DSNs (RFC 3464) and ARF reports (RFC 5965) instead of relaying them.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OobSection {
    /// The inbound report domain, e.g. `bounces.example.com`. Empty: no OOB processing.
    pub domain: String,
    /// Send with the return path `b+<reception id>@<domain>` (VERP), so a DSN's envelope
    /// recipient names the message it is about. The null sender stays null.
    pub verp: bool,
}

/// The suppression list (`src/suppression/`): recipients that hard-bounced or complained are
/// refused at RCPT.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SuppressionSection {
    pub enabled: bool,
    /// The reply to a suppressed recipient: `CODE X.Y.Z text`, a 5xx.
    pub reply: String,
}

impl Default for SuppressionSection {
    fn default() -> Self {
        SuppressionSection {
            enabled: false,
            reply: "550 5.7.1 Recipient suppressed".into(),
        }
    }
}

/// Bounce classification (`src/bounce/`): the category of every failed attempt, in its
/// event line as `bounce_category`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BounceSection {
    /// Classify failures at all.
    pub enabled: bool,
    /// A rules file (TOML, `[[rule]]` tables) tried before the built-in rules. Empty: the
    /// built-in rules only.
    pub rules_file: PathBuf,
}

impl Default for BounceSection {
    fn default() -> Self {
        BounceSection {
            enabled: true,
            rules_file: PathBuf::new(),
        }
    }
}

/// SMTP TLS reporting (RFC 8460): the daily report of our outbound TLS sessions, sent to each
/// recipient domain that asks for one in its `_smtp._tls` record.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsReportSection {
    /// Count sessions and send reports.
    pub enabled: bool,
    /// The reporting period, in seconds: a UTC day (RFC 8460 §4.4); shorter only for tests.
    pub period_s: u64,
    /// Wait this long after a period ends before sending its reports (so the sessions in
    /// flight at midnight are counted), in seconds.
    pub send_delay_s: u64,
    /// `organization-name` in the reports. Empty means `server.hostname`.
    pub organization: String,
    /// `contact-info` in the reports. Empty means `postmaster@` `server.hostname`.
    pub contact: String,
    /// Sender of the report messages (`mailto:` report addresses). Empty means
    /// `noreply-smtp-tls-reporting@` `server.hostname`.
    pub from: String,
}

impl Default for TlsReportSection {
    fn default() -> Self {
        TlsReportSection {
            enabled: true,
            period_s: 86_400,
            send_delay_s: 300,
            organization: String::new(),
            contact: String::new(),
            from: String::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DkimEntry {
    /// `d=`: signs mail whose From domain is this one, exactly (case-insensitive).
    pub domain: String,
    /// `s=`: the key is published at `selector._domainkey.domain`.
    pub selector: String,
    /// PKCS#8 PEM private key, RSA (1024 to 4096 bits; 2048 and up recommended) or Ed25519;
    /// loaded at start.
    pub key_file: PathBuf,
    /// Header fields to sign when present; default `dkim::sign::HEADERS_DEFAULT`. Must
    /// include From, which is always oversigned.
    #[serde(default)]
    pub headers: Option<Vec<String>>,
    /// `header/body`: "relaxed/relaxed" (default), "simple/simple", "relaxed/simple" or
    /// "simple/relaxed".
    #[serde(default = "relaxed_relaxed")]
    pub canonicalization: String,
    /// Sign only messages of this tenant (the `egress.tenant_header` header's value).
    #[serde(default)]
    pub tenant: Option<String>,
    /// Sign every message whatever its From (an ESP's own signature), with `domain` as `d=`.
    #[serde(default)]
    pub always: bool,
}

fn relaxed_relaxed() -> String {
    "relaxed/relaxed".into()
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DnsSection {
    /// Resolvers, `IP` or `IP:PORT` (`[IPv6]:PORT`); empty means the nameservers of
    /// `resolv_conf`. `--resolver` replaces this list.
    pub resolvers: Vec<String>,
    pub resolv_conf: PathBuf,
    /// Wait for one answer from one resolver.
    pub timeout_ms: u64,
    /// Rounds over all resolvers before a lookup fails (transiently).
    pub attempts: u32,
    /// Answers are cached at least this long, whatever their TTL says.
    pub ttl_min_s: u32,
    /// ... and at most this long.
    pub ttl_max_s: u32,
    /// Cached answers per shard.
    pub cache_entries_max: usize,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EgressSection {
    /// Pool for messages no `[[pool_rule]]` matches. Empty: every source, weight 1.
    pub default_pool: String,
    /// Header naming a message's tenant, for `pool_rule.tenant`.
    pub tenant_header: String,
    /// Header naming a message's priority class (`transactional`, `normal`, `bulk`); empty:
    /// none, every message has its listener's class.
    pub priority_header: String,
    /// Header naming a message's campaign, for operations (`--campaign`); empty: none.
    pub campaign_header: String,
    /// Remove the tenant, priority and campaign headers from messages as they are delivered
    /// (the spooled copy keeps them).
    pub strip_headers: bool,
    /// Consecutive failed connections that take a source out of rotation.
    pub source_failures_max: u32,
    /// How long a failed source stays out of rotation, in seconds.
    pub source_quarantine_s: u64,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SourceEntry {
    pub name: String,
    /// Local IP address to send from; absent: the kernel's choice.
    #[serde(default)]
    pub address: Option<IpAddr>,
    /// EHLO name from this source; absent: `delivery.helo_name`.
    #[serde(default)]
    pub ehlo: Option<String>,
    /// Messages from this source per period over all sites, e.g. "50000/h".
    #[serde(default)]
    pub message_rate: Option<String>,
    /// The `[[warmup]]` schedule this source follows.
    #[serde(default)]
    pub warmup: Option<String>,
    /// When its warmup started: a UTC date, `2026-12-01`.
    #[serde(default)]
    pub warmup_start: Option<String>,
    /// ... or a Unix time in milliseconds (for tests).
    #[serde(default)]
    pub warmup_start_ms: Option<u64>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PoolEntry {
    pub name: String,
    /// `SOURCE` or `SOURCE:WEIGHT` (weight 1 to 1000, default 1).
    pub sources: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PoolRuleEntry {
    /// Glob on the sender's domain.
    #[serde(default)]
    pub sender_domain: Option<String>,
    /// Glob on the recipient's domain.
    #[serde(default)]
    pub recipient_domain: Option<String>,
    /// The value of the `egress.tenant_header` header, exactly (case-insensitive).
    #[serde(default)]
    pub tenant: Option<String>,
    pub pool: String,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ListenerEntry {
    pub address: SocketAddr,
    /// Connections start with TLS (port 465 style); otherwise STARTTLS is offered.
    #[serde(default)]
    pub implicit_tls: bool,
    /// Submission (RFC 6409): MAIL only after AUTH. Needs `server.auth_users`.
    #[serde(default)]
    pub auth_required: bool,
    /// MAIL only after STARTTLS (`530 5.7.0`); implicit-TLS listeners are encrypted anyway.
    #[serde(default)]
    pub tls_required: bool,
    /// Name in the greeting, the EHLO reply and Received headers; `server.hostname` if unset.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Clients that may relay without AUTH; `server.relay_networks` if unset.
    #[serde(default)]
    pub relay_networks: Option<Vec<String>>,
    /// Connections to this listener per shard; `server.connections_max` if unset (the
    /// shard-wide `server.connections_max` applies as well).
    #[serde(default)]
    pub connections_max: Option<usize>,
    /// Connections to this listener per client IP, per shard; `server.connections_per_ip_max`
    /// if unset (the shard-wide per-IP limit applies as well).
    #[serde(default)]
    pub connections_per_ip_max: Option<usize>,
    #[serde(default)]
    pub messages_per_connection_max: Option<usize>,
    #[serde(default)]
    pub size_max: Option<usize>,
    #[serde(default)]
    pub rcpts_max: Option<usize>,
    /// Notices sent for mail received here; `notices.enabled` if unset.
    #[serde(default)]
    pub notices: Option<Vec<NoticeKind>>,
    /// The priority class of mail received here without a (known) priority header:
    /// `transactional`, `normal` (if unset) or `bulk`.
    #[serde(default)]
    pub priority: Option<String>,
}

impl ListenerEntry {
    /// A listener with the server-wide policy at `address`.
    pub fn plain(address: SocketAddr, implicit_tls: bool) -> ListenerEntry {
        ListenerEntry {
            address,
            implicit_tls,
            auth_required: false,
            tls_required: false,
            hostname: None,
            relay_networks: None,
            connections_max: None,
            connections_per_ip_max: None,
            messages_per_connection_max: None,
            size_max: None,
            rcpts_max: None,
            notices: None,
            priority: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Address every shard listens on (SO_REUSEPORT spreads connections over the shards).
    pub listen: SocketAddr,
    /// Name in the greeting and in EHLO replies. Empty means the machine's hostname.
    pub hostname: String,
    /// Client networks allowed to relay, in CIDR notation.
    pub relay_networks: Vec<String>,
    /// Largest message accepted, in bytes (advertised in EHLO SIZE).
    pub size_max: usize,
    /// Recipients per transaction; RFC 5321 §4.5.3.1.8 asks for at least 100.
    pub rcpts_max: usize,
    /// Bad commands tolerated per session before `421` and disconnect.
    pub errors_max: usize,
    /// Wait for the next command line, in seconds (RFC 5321 §4.5.3.2.7 says at least 5 minutes).
    pub command_timeout_s: u64,
    /// Wait for the next chunk of DATA, in seconds.
    pub data_timeout_s: u64,
    /// Longest a transaction (MAIL to the end of the message) may take in all, in seconds, so a
    /// client trickling bytes (slowloris) cannot hold a session forever.
    pub transaction_timeout_s: u64,
    /// Concurrent inbound connections per shard; beyond it new clients get `421 4.7.0`.
    pub connections_max: usize,
    /// Concurrent connections from one client IP, per shard; beyond it `421 4.7.0`.
    pub connections_per_ip_max: usize,
    /// Messages per connection before MAIL gets `421 4.7.0` (0: no limit).
    pub messages_per_connection_max: usize,
    /// Longest command line, CRLF included (RFC 5321: at least 512).
    pub line_len_max: usize,
    /// Longest line of message text, CRLF included (RFC 5321: 1000).
    pub data_line_len_max: usize,
    /// Offer SMTPUTF8, CHUNKING (BDAT) and DSN.
    pub smtputf8: bool,
    pub chunking: bool,
    pub dsn: bool,
    /// Offer BINARYMIME (RFC 3030): binary bodies by BDAT. Needs `chunking`. Such a message is
    /// relayed only to a next hop offering CHUNKING and BINARYMIME, else bounced `554 5.6.3`.
    pub binarymime: bool,
    /// Bare CR or LF in message text (RFC 5321 §2.3.8): "accept" or "reject" (554 5.6.0).
    pub bare_lf: String,
    /// NUL bytes in message text: "accept" or "reject" (554 5.6.0).
    pub nul: String,
    /// On SIGTERM/SIGINT, how long in-flight transactions may take to finish, in seconds.
    pub shutdown_grace_s: u64,
    /// PEM certificate chain for TLS. Empty (with `tls_key` empty): a self-signed certificate
    /// for `hostname` is generated at start.
    pub tls_cert: PathBuf,
    /// PEM private key for `tls_cert`.
    pub tls_key: PathBuf,
    /// A second address where every connection starts with TLS (implicit TLS, as on port 465).
    /// Empty: none.
    pub implicit_tls_listen: String,
    /// Users file for SMTP AUTH (written by `epoxi passwd`). Empty: AUTH is not offered.
    pub auth_users: PathBuf,
    /// Expect a PROXY protocol (v1 or v2) header on every connection, from `proxy_trusted`.
    pub proxy_protocol: bool,
    /// Proxies whose PROXY headers are believed (CIDR); other peers are refused when
    /// `proxy_protocol` is on.
    pub proxy_trusted: Vec<String>,
    /// Offer AUTH without TLS to loopback clients (never to others: passwords in clear).
    pub auth_plaintext_loopback: bool,
    /// Failed AUTH attempts allowed per client IP within `auth_failure_window_s`.
    pub auth_failures_max: u32,
    pub auth_failure_window_s: u64,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolSection {
    /// Spool root; shard i keeps its segments in `DIR/shard-i/`.
    pub dir: PathBuf,
    /// A segment is rotated once it grows past this many bytes.
    pub segment_size_max: u64,
    /// Extra time the committer waits for more records before each fdatasync, in microseconds.
    /// 0 commits as soon as the previous commit finishes, which already batches under load.
    pub commit_window_us: u64,
    /// Largest batch written by one commit, in bytes; more waits for the next commit.
    pub commit_batch_max: usize,
    /// A closed segment whose live messages take less than this share of it is compacted:
    /// they are copied forward and the segment deleted. 0 turns compaction off.
    pub compact_live_ratio: f64,
    /// Bytes per second compaction may read from a segment (its copies ride the group
    /// commit), so it never crowds out the hot path.
    pub compaction_bytes_per_s: u64,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSection {
    /// Delay after the first transient failure, in milliseconds; absent: `retry_base_ms`.
    pub retry_first_ms: Option<u64>,
    /// Retry delay base: the n-th retry waits `retry_base_ms * retry_factor^(n-1)`.
    pub retry_base_ms: u64,
    /// Each further retry waits this many times longer than the previous one.
    pub retry_factor: f64,
    /// Longest retry delay, in milliseconds.
    pub retry_cap_ms: u64,
    /// Each retry delay is spread by up to this share of itself either way (0 to 0.5), so
    /// a burst of failures does not come back as a burst.
    pub retry_jitter: f64,
    /// A message still undelivered this long after reception expires, in seconds.
    pub max_age_s: u64,
    /// Messages one shard may hold (queued or being spooled); beyond it reception answers
    /// `452 4.3.1` (try again later) instead of growing without bound.
    pub messages_max: usize,
    /// Shares of a busy destination's deliveries for transactional, normal and bulk mail
    /// (smooth weighted round robin among the classes with mail waiting).
    pub priority_weights: Vec<u32>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySection {
    /// Name sent in EHLO. Empty means `server.hostname`.
    pub helo_name: String,
    /// Concurrent connections per destination site (MX host set or static route) and egress
    /// source, across all shards.
    pub connections_per_destination_max: usize,
    /// Port of MX hosts (25; other values for tests and smart hosts).
    pub port: u16,
    /// Which addresses of an MX host to try: ipv4-first, ipv6-first, ipv4-only, ipv6-only.
    pub address_order: String,
    /// Messages sent over one connection before it is closed and a fresh one opened.
    pub messages_per_connection_max: usize,
    /// Failed connections in a row (refused, timed out, 421 at the greeting) that put a
    /// (site, source) into a backoff of its own: its messages wait without a connection
    /// attempt each until a probe connection succeeds. 0 turns site backoff off.
    pub site_failures_max: u32,
    /// First site backoff, in milliseconds; each failed probe doubles it.
    pub site_backoff_ms: u64,
    /// Longest site backoff, in milliseconds.
    pub site_backoff_cap_ms: u64,
    /// Recipients of one message sent in one transaction.
    pub rcpts_per_transaction_max: usize,
    pub connect_timeout_ms: u64,
    /// Wait for each reply (greeting, EHLO, MAIL, RCPT, DATA, final dot), in milliseconds.
    pub reply_timeout_ms: u64,
    /// Wait for the reply to DATA (RFC 5321 §4.5.3.2.4: 2 minutes).
    pub data_init_timeout_ms: u64,
    /// Wait for each write of message data to make progress (§4.5.3.2.5: 3 minutes).
    pub data_block_timeout_ms: u64,
    /// Wait for the reply to the final dot (§4.5.3.2.6: 10 minutes), or to `BDAT ... LAST`.
    pub final_dot_timeout_ms: u64,
    /// Keep an idle connection open this long for more mail to the same destination.
    pub idle_timeout_ms: u64,
    /// STARTTLS policy for routes that do not set their own: opportunistic, required, disabled.
    pub starttls: String,
    /// CA bundle (PEM) that certificates must chain to when TLS is required: routes with
    /// `tls = "required"`, MX hosts under an MTA-STS policy, and MTA-STS policy servers. The
    /// system bundle by default; when that file is missing, the bundled Mozilla roots.
    pub tls_ca_file: PathBuf,
    /// MTA-STS (RFC 8461): honour recipient domains' policies.
    pub mta_sts: bool,
    /// DANE (RFC 7672): honour MX hosts' TLSA records when the resolver validates (AD bit).
    pub dane: bool,
    /// Port of the MTA-STS policy fetch (HTTPS): 443; other values for tests.
    pub mta_sts_https_port: u16,
    /// Largest BDAT chunk sent to a server offering CHUNKING, in bytes; bigger messages go in
    /// several chunks.
    pub bdat_chunk_size_max: usize,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// Event logs go to `DIR/shard-i.jsonl`.
    pub dir: PathBuf,
    /// A log file is rotated once it grows past this many bytes.
    pub file_size_max: u64,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ShardsSection {
    /// Number of shards; 0 means one per online CPU.
    pub count: usize,
    /// Pin each shard's thread to its own CPU.
    pub pin: bool,
    /// io_uring locked buffer memory per shard, in bytes.
    pub io_memory_bytes: usize,
    /// io_uring submission queue depth per shard.
    pub ring_depth: usize,
    /// Busy-poll before parking an idle shard, in microseconds.
    pub spin_before_park_us: u64,
    /// Capacity of each cross-shard channel, in messages.
    pub mesh_capacity: usize,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteEntry {
    /// Glob on the recipient domain, e.g. `*.test` or `example.com`.
    pub domain: String,
    /// `HOST:PORT` to deliver to.
    pub target: String,
    /// STARTTLS policy for this route; `delivery.starttls` when absent.
    #[serde(default)]
    pub tls: Option<String>,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 2525)),
            hostname: String::new(),
            relay_networks: vec!["127.0.0.0/8".into(), "::1/128".into()],
            size_max: 36 << 20,
            rcpts_max: 100,
            errors_max: 10,
            command_timeout_s: 300,
            data_timeout_s: 300,
            transaction_timeout_s: 1800,
            connections_max: 10_000,
            connections_per_ip_max: 100,
            messages_per_connection_max: 0,
            line_len_max: 1024,
            data_line_len_max: 1000,
            smtputf8: true,
            chunking: true,
            dsn: true,
            binarymime: true,
            bare_lf: "accept".into(),
            nul: "accept".into(),
            shutdown_grace_s: 30,
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            implicit_tls_listen: String::new(),
            auth_users: PathBuf::new(),
            auth_plaintext_loopback: false,
            proxy_protocol: false,
            proxy_trusted: vec!["127.0.0.0/8".into(), "::1/128".into()],
            auth_failures_max: 5,
            auth_failure_window_s: 300,
        }
    }
}

impl Default for SpoolSection {
    fn default() -> Self {
        SpoolSection {
            dir: PathBuf::from("./spool"),
            segment_size_max: 64 << 20,
            commit_window_us: 0,
            commit_batch_max: 8 << 20,
            compact_live_ratio: crate::spool::engine::COMPACT_LIVE_RATIO_DEFAULT,
            compaction_bytes_per_s: 32 << 20,
        }
    }
}

impl Default for QueueSection {
    fn default() -> Self {
        QueueSection {
            retry_first_ms: None,
            retry_base_ms: 60_000,
            retry_factor: 2.0,
            retry_cap_ms: 4 * 3_600_000,
            retry_jitter: 0.1,
            max_age_s: 5 * 24 * 3600,
            messages_max: 1_000_000,
            priority_weights: crate::queue::PRIORITY_WEIGHTS_DEFAULT.to_vec(),
        }
    }
}

/// The system CA bundle (Debian's path).
pub const TLS_CA_FILE_DEFAULT: &str = "/etc/ssl/certs/ca-certificates.crt";

impl Default for DeliverySection {
    fn default() -> Self {
        DeliverySection {
            helo_name: String::new(),
            connections_per_destination_max: 16,
            messages_per_connection_max: 1_000,
            site_failures_max: 5,
            site_backoff_ms: 30_000,
            site_backoff_cap_ms: 600_000,
            rcpts_per_transaction_max: 100,
            connect_timeout_ms: 30_000,
            reply_timeout_ms: 300_000,
            data_init_timeout_ms: 120_000,
            data_block_timeout_ms: 180_000,
            final_dot_timeout_ms: 600_000,
            idle_timeout_ms: 5_000,
            port: 25,
            address_order: "ipv4-first".into(),
            starttls: "opportunistic".into(),
            tls_ca_file: PathBuf::from(TLS_CA_FILE_DEFAULT),
            mta_sts: true,
            dane: true,
            mta_sts_https_port: 443,
            bdat_chunk_size_max: crate::smtp::client::BDAT_CHUNK_SIZE_MAX_DEFAULT,
        }
    }
}

impl Default for DnsSection {
    fn default() -> Self {
        DnsSection {
            resolvers: Vec::new(),
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            timeout_ms: 2_000,
            attempts: 2,
            ttl_min_s: 5,
            ttl_max_s: 86_400,
            cache_entries_max: 100_000,
        }
    }
}

impl Default for EgressSection {
    fn default() -> Self {
        EgressSection {
            default_pool: String::new(),
            tenant_header: "X-Tenant".into(),
            priority_header: "X-Priority-Class".into(),
            campaign_header: "X-Campaign".into(),
            strip_headers: false,
            source_failures_max: 3,
            source_quarantine_s: 60,
        }
    }
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            dir: PathBuf::from("./log"),
            file_size_max: 256 << 20,
        }
    }
}

impl Default for ShardsSection {
    fn default() -> Self {
        ShardsSection {
            count: 0,
            pin: true,
            io_memory_bytes: 2 << 20,
            ring_depth: 256,
            spin_before_park_us: 0,
            mesh_capacity: 1024,
        }
    }
}

/// Values given on the command line; each one set replaces the file's.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub spool: Option<PathBuf>,
    pub log_dir: Option<PathBuf>,
    pub shards: Option<usize>,
    /// `GLOB=HOST:PORT`, tried before the file's routes.
    pub routes: Vec<String>,
    /// `--resolver IP:PORT`: replace the configured resolvers.
    pub resolvers: Vec<String>,
    /// `--delivery-port PORT`.
    pub delivery_port: Option<u16>,
    /// `--http ADDR`: serve the HTTP endpoint there.
    pub http: Option<SocketAddr>,
}

/// A CIDR network, e.g. 127.0.0.0/8: a thin wrapper over [`ipnet::IpNet`] that keeps the
/// address as written (host bits included, as in `10.1.2.3/8`) and adds the two rules the
/// relay and proxy checks need: a bare address is a single host (/32 or /128), and an
/// IPv4-mapped IPv6 client (`::ffff:a.b.c.d`, a dual-stack socket's view of an IPv4 peer) is
/// compared as the IPv4 address it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network(ipnet::IpNet);

impl Network {
    /// `ADDR/PREFIX` or a bare `ADDR`; `None` for anything else, including a prefix longer
    /// than the address (`10.0.0.0/33`).
    pub fn parse(text: &str) -> Option<Network> {
        let net = match text.parse::<ipnet::IpNet>() {
            Ok(net) => net,
            Err(_) => ipnet::IpNet::from(text.parse::<IpAddr>().ok()?),
        };
        Some(Network(net))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        // A network of the other family contains nothing: `IpNet::contains` says false.
        self.0.contains(&ip)
    }
}

impl Config {
    /// Read `path`, or the embedded defaults when there is no file.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        self.http.validate()?;
        alerts::validate(&self.alerts, &self.alert)?;
        let r = &self.tls_report;
        if r.period_s == 0 || r.period_s > 86_400 {
            return Err(invalid(
                "tls_report.period_s",
                "must be between 1 and 86400 (a day, as RFC 8460 reports)",
            ));
        }
        if r.send_delay_s >= r.period_s.max(3_600) {
            return Err(invalid(
                "tls_report.send_delay_s",
                "must be shorter than the period (or an hour, for short periods)",
            ));
        }
        if !r.from.is_empty() && !r.from.contains('@') {
            return Err(invalid(
                "tls_report.from",
                "must be an address (local@domain)",
            ));
        }
        let delay_after_s = self.notices.delay_after_s;
        if delay_after_s > 0 && delay_after_s >= self.queue.max_age_s {
            return Err(invalid(
                "notices.delay_after_s",
                "must be shorter than queue.max_age_s (0 turns delay notices off)",
            ));
        }
        for (i, t) in self.tenant.iter().enumerate() {
            if t.name.is_empty() {
                return Err(invalid("tenant.name", format!("tenant[{i}] has no name")));
            }
            if self.tenant[..i]
                .iter()
                .any(|o| o.name.eq_ignore_ascii_case(&t.name))
            {
                return Err(invalid(
                    "tenant.name",
                    format!("tenant `{}` is given twice", t.name),
                ));
            }
        }
        if self.dead_letter.messages_max == 0 || self.dead_letter.bytes_max == 0 {
            return Err(invalid(
                "dead_letter.messages_max",
                "dead_letter.messages_max and bytes_max must be at least 1",
            ));
        }
        if self.delivery.mta_sts_https_port == 0 {
            return Err(invalid(
                "delivery.mta_sts_https_port",
                "must be a port, 1 to 65535",
            ));
        }
        let s = &self.server;
        if s.size_max < 1024 {
            return Err(invalid("server.size_max", "must be at least 1024 bytes"));
        }
        if s.rcpts_max < 100 {
            return Err(invalid(
                "server.rcpts_max",
                "RFC 5321 requires at least 100",
            ));
        }
        if s.errors_max == 0 {
            return Err(invalid("server.errors_max", "must be at least 1"));
        }
        if s.transaction_timeout_s == 0 {
            return Err(invalid(
                "server.transaction_timeout_s",
                "must be at least 1 s",
            ));
        }
        if s.command_timeout_s == 0 || s.data_timeout_s == 0 {
            return Err(invalid(
                "server.command_timeout_s",
                "timeouts must be at least 1 s",
            ));
        }
        if s.connections_max == 0 {
            return Err(invalid("server.connections_max", "must be at least 1"));
        }
        if s.line_len_max < 512 || s.line_len_max > 64 << 10 {
            return Err(invalid(
                "server.line_len_max",
                "must be between 512 and 65536",
            ));
        }
        if s.data_line_len_max < 1000 || s.data_line_len_max > 64 << 10 {
            return Err(invalid(
                "server.data_line_len_max",
                "must be between 1000 and 65536",
            ));
        }
        if s.connections_per_ip_max == 0 {
            return Err(invalid(
                "server.connections_per_ip_max",
                "must be at least 1",
            ));
        }
        if !["accept", "reject"].contains(&s.bare_lf.as_str()) {
            return Err(invalid(
                "server.bare_lf",
                "must be \"accept\" or \"reject\"",
            ));
        }
        if !["accept", "reject"].contains(&s.nul.as_str()) {
            return Err(invalid("server.nul", "must be \"accept\" or \"reject\""));
        }
        if s.binarymime && !s.chunking {
            return Err(invalid(
                "server.binarymime",
                "needs server.chunking (binary bodies only arrive by BDAT); \
                 set server.binarymime = false too",
            ));
        }
        let sp = &self.spool;
        if sp.segment_size_max < 1 << 20 {
            return Err(invalid("spool.segment_size_max", "must be at least 1 MiB"));
        }
        if sp.commit_window_us > 1_000_000 {
            return Err(invalid("spool.commit_window_us", "must be at most 1 s"));
        }
        if sp.segment_size_max > 1 << 30 {
            // Record offsets are 32-bit in the queue: a segment (its size, one batch and one
            // record past it) must stay below 4 GiB.
            return Err(invalid("spool.segment_size_max", "must be at most 1 GiB"));
        }
        if sp.commit_batch_max > 1 << 30 {
            return Err(invalid("spool.commit_batch_max", "must be at most 1 GiB"));
        }
        if !(0.0..=1.0).contains(&sp.compact_live_ratio) {
            return Err(invalid(
                "spool.compact_live_ratio",
                "must be between 0 (off) and 1",
            ));
        }
        if sp.compaction_bytes_per_s < 64 << 10 {
            return Err(invalid(
                "spool.compaction_bytes_per_s",
                "must be at least 64 KiB/s",
            ));
        }
        if sp.commit_batch_max < 64 << 10 {
            return Err(invalid("spool.commit_batch_max", "must be at least 64 KiB"));
        }
        let q = &self.queue;
        if q.retry_base_ms == 0 {
            return Err(invalid("queue.retry_base_ms", "must be at least 1"));
        }
        if !(q.retry_factor.is_finite() && q.retry_factor >= 1.0) {
            return Err(invalid("queue.retry_factor", "must be a number >= 1.0"));
        }
        if q.retry_cap_ms < q.retry_base_ms {
            return Err(invalid(
                "queue.retry_cap_ms",
                "must be >= queue.retry_base_ms",
            ));
        }
        if !(0.0..=0.5).contains(&q.retry_jitter) {
            return Err(invalid("queue.retry_jitter", "must be between 0 and 0.5"));
        }
        if q.max_age_s == 0 {
            return Err(invalid("queue.max_age_s", "must be at least 1"));
        }
        if q.max_age_s.saturating_mul(1000) > crate::queue::AGE_MAX_MS {
            return Err(invalid(
                "queue.max_age_s",
                format!(
                    "must be at most {} (49 days)",
                    crate::queue::AGE_MAX_MS / 1000
                ),
            ));
        }
        if q.messages_max == 0 || q.messages_max > crate::queue::MESSAGES_CEILING {
            return Err(invalid(
                "queue.messages_max",
                format!("must be between 1 and {}", crate::queue::MESSAGES_CEILING),
            ));
        }
        let weights_max = crate::queue::PRIORITY_WEIGHT_MAX;
        if q.priority_weights.len() != 3
            || q.priority_weights
                .iter()
                .any(|w| !(1..=weights_max).contains(w))
        {
            return Err(invalid(
                "queue.priority_weights",
                format!("must be three weights (transactional, normal, bulk), 1 to {weights_max}"),
            ));
        }
        let d = &self.delivery;
        if d.site_backoff_ms == 0 || d.site_backoff_cap_ms < d.site_backoff_ms {
            return Err(invalid(
                "delivery.site_backoff_cap_ms",
                "site_backoff_ms must be at least 1 and site_backoff_cap_ms at least that",
            ));
        }
        if d.connections_per_destination_max == 0 {
            return Err(invalid(
                "delivery.connections_per_destination_max",
                "must be at least 1",
            ));
        }
        if d.messages_per_connection_max == 0 {
            return Err(invalid(
                "delivery.messages_per_connection_max",
                "must be at least 1",
            ));
        }
        if d.rcpts_per_transaction_max == 0 {
            return Err(invalid(
                "delivery.rcpts_per_transaction_max",
                "must be at least 1",
            ));
        }
        if d.data_init_timeout_ms == 0
            || d.data_block_timeout_ms == 0
            || d.final_dot_timeout_ms == 0
        {
            return Err(invalid(
                "delivery.final_dot_timeout_ms",
                "timeouts must be at least 1 ms",
            ));
        }
        if d.connect_timeout_ms == 0 || d.reply_timeout_ms == 0 {
            return Err(invalid(
                "delivery.reply_timeout_ms",
                "timeouts must be at least 1 ms",
            ));
        }
        if d.port == 0 {
            return Err(invalid("delivery.port", "must be a port from 1 to 65535"));
        }
        for (i, d) in self.domain.iter().enumerate() {
            let name = d.name.trim();
            if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == '@') {
                return Err(invalid(
                    "domain.name",
                    format!("`{}` is not a domain", d.name),
                ));
            }
            if d.shards == 0 || d.shards > shards::runtime::SHARDS_MAX {
                return Err(invalid(
                    "domain.shards",
                    format!(
                        "domain {name}: must be between 1 and {}",
                        shards::runtime::SHARDS_MAX
                    ),
                ));
            }
            if self.domain[..i]
                .iter()
                .any(|o| o.name.trim().eq_ignore_ascii_case(name) && o.source == d.source)
            {
                return Err(invalid("domain.name", format!("{name} is listed twice")));
            }
        }
        let dns = &self.dns;
        if dns.timeout_ms == 0 || dns.attempts == 0 {
            return Err(invalid(
                "dns.timeout_ms",
                "timeout and attempts must be at least 1",
            ));
        }
        if dns.ttl_max_s < dns.ttl_min_s {
            return Err(invalid("dns.ttl_max_s", "must be >= dns.ttl_min_s"));
        }
        if dns.cache_entries_max == 0 {
            return Err(invalid("dns.cache_entries_max", "must be at least 1"));
        }
        let eg = &self.egress;
        if eg.source_failures_max == 0 {
            return Err(invalid("egress.source_failures_max", "must be at least 1"));
        }
        if !(BDAT_CHUNK_SIZE_MIN..=BDAT_CHUNK_SIZE_CEILING).contains(&d.bdat_chunk_size_max) {
            return Err(invalid(
                "delivery.bdat_chunk_size_max",
                format!("must be between {BDAT_CHUNK_SIZE_MIN} and {BDAT_CHUNK_SIZE_CEILING}"),
            ));
        }
        if self.log.file_size_max < 64 << 10 {
            return Err(invalid("log.file_size_max", "must be at least 64 KiB"));
        }
        let sh = &self.shards;
        if sh.count > shards::runtime::SHARDS_MAX {
            return Err(invalid(
                "shards.count",
                format!("at most {}", shards::runtime::SHARDS_MAX),
            ));
        }
        if !(64 << 10..=1 << 30).contains(&sh.io_memory_bytes) {
            return Err(invalid(
                "shards.io_memory_bytes",
                "must be between 64 KiB and 1 GiB",
            ));
        }
        if !sh.ring_depth.is_power_of_two() || !(8..=32_768).contains(&sh.ring_depth) {
            return Err(invalid(
                "shards.ring_depth",
                "must be a power of two from 8 to 32768",
            ));
        }
        if sh.mesh_capacity == 0 {
            return Err(invalid("shards.mesh_capacity", "must be at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let cfg = Config::parse("").expect("empty config parses");
        assert_eq!(cfg.server.listen, SocketAddr::from(([127, 0, 0, 1], 2525)));
        assert!(cfg.settle(Overrides::default()).is_ok());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("[server]\nlisten_addr = \"1.2.3.4:25\"\n").expect_err("typo");
        assert!(err.contains("listen_addr"), "{err}");
    }

    #[test]
    fn bad_value_names_the_key() {
        let cfg = Config::parse("[queue]\nretry_factor = 0.5\n").expect("parses");
        let err = cfg.settle(Overrides::default()).expect_err("factor < 1");
        assert!(err.to_string().contains("queue.retry_factor"), "{err}");
    }

    #[test]
    fn priority_and_stripping_keys_are_checked() {
        let settle = |text: &str| {
            Config::parse(text)
                .expect("parses")
                .settle(Overrides::default())
        };
        let s = settle("[egress]\nstrip_headers = true\n").expect("ok");
        assert_eq!(s.config.queue.priority_weights, vec![16, 4, 1]);
        assert_eq!(
            s.egress.stripped_headers(),
            vec!["x-tenant:", "x-priority-class:", "x-campaign:"]
        );
        let listener = "[[listener]]\naddress = \"127.0.0.1:2587\"\npriority = ";
        assert!(settle(&format!("{listener}\"BULK\"\n")).is_ok());
        let dkim = "[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"\n\
                    key_file = \"/nonexistent.pem\"\n";
        for (text, key) in [
            (
                "[queue]\npriority_weights = [16, 4]\n",
                "queue.priority_weights",
            ),
            (
                "[queue]\npriority_weights = [16, 0, 1]\n",
                "queue.priority_weights",
            ),
            (
                "[queue]\npriority_weights = [1, 1, 1001]\n",
                "queue.priority_weights",
            ),
            (&format!("{listener}\"urgent\"\n"), "listener.priority"),
            (
                "[egress]\npriority_header = \"X-P: y\"\n",
                "egress.priority_header",
            ),
            (
                "[egress]\ncampaign_header = \"X C\"\n",
                "egress.campaign_header",
            ),
            (
                &format!(
                    "[egress]\nstrip_headers = true\n{dkim}headers = [\"From\", \"x-campaign\"]\n"
                ),
                "dkim.headers",
            ),
            (
                &format!("[egress]\nstrip_headers = true\ntenant_header = \"List-Id\"\n{dkim}"),
                "dkim[0] (example.com/s1) signs `List-Id`",
            ),
        ] {
            let err = settle(text).expect_err(text);
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
        // Without stripping, signing the campaign header is the operator's business.
        let err = settle(&format!("{dkim}headers = [\"From\", \"X-Campaign\"]\n"))
            .expect_err("the key file is missing");
        assert!(err.to_string().contains("key_file"), "{err}");
    }

    #[test]
    fn oob_and_suppression_keys_are_checked() {
        let settle = |text: &str| {
            Config::parse(text)
                .expect("parses")
                .settle(Overrides::default())
        };
        let s = settle("[oob]\ndomain = \"Bounces.Example.COM\"\nverp = true\n").expect("ok");
        assert_eq!(s.oob_domain.as_deref(), Some("bounces.example.com"));
        assert!(s.suppression_reply.is_none(), "off by default");
        for (text, key) in [
            ("[oob]\nverp = true\n", "oob.verp"),
            ("[oob]\ndomain = \"not a domain\"\n", "oob.domain"),
            ("[oob]\ndomain = \"user@example.com\"\n", "oob.domain"),
            (
                "[suppression]\nenabled = true\nreply = \"450 4.7.1 later\"\n",
                "suppression.reply",
            ),
            (
                "[suppression]\nenabled = true\nreply = \"550 4.7.1 mixed\"\n",
                "suppression.reply",
            ),
            (
                "[suppression]\nenabled = true\nreply = \"550 5.7.1\"\n",
                "suppression.reply",
            ),
        ] {
            let err = settle(text).expect_err(text);
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
        let s = settle("[suppression]\nenabled = true\n").expect("default reply");
        let reply = s.suppression_reply.expect("a reply");
        assert_eq!(reply.to_string(), "550 5.7.1 Recipient suppressed\r\n");
        let s = settle("[suppression]\nenabled = true\nreply = \"554 5.7.9 Not wanted here\"\n")
            .expect("own reply");
        assert_eq!(
            s.suppression_reply.map(|r| r.to_string()).as_deref(),
            Some("554 5.7.9 Not wanted here\r\n")
        );
    }

    #[test]
    fn binarymime_and_bdat_chunk_limits_name_their_key() {
        let cfg = Config::parse("[server]\nchunking = false\n").expect("parses");
        let err = cfg
            .settle(Overrides::default())
            .expect_err("BINARYMIME without BDAT");
        assert!(err.to_string().contains("server.binarymime"), "{err}");
        let cfg =
            Config::parse("[server]\nchunking = false\nbinarymime = false\n").expect("parses");
        assert!(cfg.settle(Overrides::default()).is_ok());
        for bad in [0, 65535, (1 << 30) + 1] {
            let cfg = Config::parse(&format!("[delivery]\nbdat_chunk_size_max = {bad}\n"))
                .expect("parses");
            let err = cfg.settle(Overrides::default()).expect_err("out of range");
            assert!(
                err.to_string().contains("delivery.bdat_chunk_size_max"),
                "{err}"
            );
        }
    }

    #[test]
    fn flags_override_the_file() {
        let cfg = Config::parse("[server]\nlisten = \"127.0.0.1:25\"\n").expect("parses");
        let o = Overrides {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 2626))),
            shards: Some(3),
            ..Overrides::default()
        };
        let s = cfg.settle(o).expect("valid");
        assert_eq!(s.config.server.listen.port(), 2626);
        assert_eq!(s.shard_count, 3);
    }

    #[test]
    fn resolvers_and_delivery_port_from_flags_file_or_resolv_conf() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("resolv.conf");
        std::fs::write(&conf, "nameserver 10.9.8.7\n").expect("write");
        let text = format!("[dns]\nresolv_conf = {:?}\n", conf.display().to_string());
        let s = Config::parse(&text)
            .expect("parses")
            .settle(Overrides::default())
            .expect("valid");
        assert_eq!(
            s.resolvers,
            vec!["10.9.8.7:53".parse::<SocketAddr>().expect("addr")]
        );
        assert_eq!(s.config.delivery.port, 25);
        let o = Overrides {
            resolvers: vec!["127.0.0.1:5353".into(), "::1".into()],
            delivery_port: Some(2526),
            ..Overrides::default()
        };
        let s = Config::parse(&text)
            .expect("parses")
            .settle(o)
            .expect("valid");
        assert_eq!(s.resolvers.len(), 2);
        assert_eq!(s.resolvers[0].port(), 5353);
        assert_eq!(s.config.delivery.port, 2526);
        let bad = Overrides {
            resolvers: vec!["dns.example".into()],
            ..Overrides::default()
        };
        let err = Config::parse("")
            .expect("parses")
            .settle(bad)
            .expect_err("bad");
        assert!(err.to_string().contains("dns.resolvers"), "{err}");
    }

    #[test]
    fn site_entries_override_delivery_limits() {
        let text = "[delivery]\nconnections_per_destination_max = 8\n\
                    [[site]]\nmx = \"*.Google.com\"\nconnections_max = 40\n\
                    [[site]]\nmx = \"*\"\nidle_timeout_ms = 100\n";
        let s = Config::parse(text)
            .expect("parses")
            .settle(Overrides::default())
            .expect("valid");
        let google = crate::route::Hop::Mx(crate::route::Site::new(vec![
            (5, "alt1.aspmx.l.google.com".into()),
            (1, "aspmx.l.google.com".into()),
        ]));
        let other = crate::route::Hop::Mx(crate::route::Site::new(vec![(10, "mx.example".into())]));
        let g = s.site_shape(&google).base;
        assert_eq!((g.connections_max, g.idle_timeout_ms), (40, 5000));
        let o = s.site_shape(&other).base;
        assert_eq!((o.connections_max, o.idle_timeout_ms), (8, 100));
        let err = Config::parse("[[site]]\nmx = \"x\"\nconnections_max = 0\n")
            .expect("parses")
            .settle(Overrides::default())
            .expect_err("zero");
        assert!(err.to_string().contains("site[0].connections_max"), "{err}");
        let err = Config::parse("[[site]]\nmx = \"mx[1.example\"\n")
            .expect("parses")
            .settle(Overrides::default())
            .expect_err("bad glob");
        assert!(err.to_string().contains("site[0].mx"), "{err}");
        let err = Config::parse("[[route]]\ndomain = \"{a.test\"\ntarget = \"127.0.0.1:25\"\n")
            .expect("parses")
            .settle(Overrides::default())
            .expect_err("bad glob");
        assert!(err.to_string().contains("`route`"), "{err}");
    }

    #[test]
    fn site_globs_match_static_route_hosts() {
        let text = "[[site]]\nmx = \"relay.*\"\nconnections_max = 3\n";
        let s = Config::parse(text)
            .expect("parses")
            .settle(Overrides::default())
            .expect("valid");
        let hop = |host: &str| {
            crate::route::Hop::Route(crate::route::Destination {
                addr: SocketAddr::from(([127, 0, 0, 1], 25)),
                host: host.into(),
                tls: crate::smtp::client::TlsPolicy::default(),
            })
        };
        assert_eq!(s.site_shape(&hop("Relay.Example")).base.connections_max, 3);
        assert_eq!(
            s.site_shape(&hop("mx.relay.example")).base.connections_max,
            s.config.delivery.connections_per_destination_max as u32
        );
    }

    #[test]
    fn bad_listener_entries_name_the_key() {
        let cases = [
            ("hostname = \"two words\"", "listener.hostname"),
            (
                "relay_networks = [\"10.0.0.0/99\"]",
                "listener.relay_networks",
            ),
            ("connections_per_ip_max = 0", "listener.connections_max"),
            ("size_max = 10", "listener.size_max"),
            ("rcpts_max = 5", "listener.rcpts_max"),
        ];
        for (line, key) in cases {
            let text = format!("[[listener]]\naddress = \"127.0.0.1:2600\"\n{line}\n");
            let err = Config::parse(&text)
                .expect("parses")
                .settle(Overrides::default())
                .expect_err(line);
            assert!(err.to_string().contains(key), "{line}: {err}");
        }
    }

    #[test]
    fn networks_match() {
        let n = Network::parse("127.0.0.0/8").expect("cidr");
        assert!(n.contains("127.1.2.3".parse().expect("ip")));
        assert!(n.contains("::ffff:127.0.0.1".parse().expect("ip")));
        assert!(!n.contains("10.0.0.1".parse().expect("ip")));
        let n6 = Network::parse("::1/128").expect("cidr");
        assert!(n6.contains("::1".parse().expect("ip")));
        assert!(Network::parse("10.0.0.0/33").is_none());
        assert!(Network::parse("0.0.0.0/0")
            .expect("any")
            .contains("8.8.8.8".parse().expect("ip")));
    }

    #[test]
    fn network_edge_cases() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        // A bare address is one host.
        let host = Network::parse("192.0.2.7").expect("bare v4");
        assert!(host.contains(ip("192.0.2.7")));
        assert!(host.contains(ip("::ffff:192.0.2.7")));
        assert!(!host.contains(ip("192.0.2.8")));
        let host6 = Network::parse("2001:db8::1").expect("bare v6");
        assert!(host6.contains(ip("2001:db8::1")));
        assert!(!host6.contains(ip("2001:db8::2")));
        // Host bits in the written address do not matter.
        let n = Network::parse("10.1.2.3/8").expect("cidr");
        assert!(n.contains(ip("10.200.0.1")));
        assert!(!n.contains(ip("11.0.0.1")));
        // Prefix bounds per family.
        assert!(Network::parse("10.0.0.0/32").is_some());
        assert!(Network::parse("::/128").is_some());
        assert!(Network::parse("::/129").is_none());
        assert!(Network::parse("10.0.0.0/").is_none());
        assert!(Network::parse("10.0.0.0/x").is_none());
        assert!(Network::parse("example.com").is_none());
        assert!(Network::parse("").is_none());
        // Families do not mix: an IPv4 network never holds a (non-mapped) IPv6 client, and an
        // IPv6 network is not consulted for IPv4-mapped clients.
        assert!(!Network::parse("0.0.0.0/0")
            .expect("any4")
            .contains(ip("2001:db8::1")));
        assert!(!Network::parse("::/0")
            .expect("any6")
            .contains(ip("127.0.0.1")));
        assert!(!Network::parse("::/0")
            .expect("any6")
            .contains(ip("::ffff:127.0.0.1")));
        let n6 = Network::parse("2001:db8::/32").expect("cidr6");
        assert!(n6.contains(ip("2001:db8:ffff::1")));
        assert!(!n6.contains(ip("2001:db9::1")));
    }
}
