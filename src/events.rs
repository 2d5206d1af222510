//! Stage boundaries as typed events: where the JSON event log, metrics, policy hooks and the
//! HTTP API attach. A stage reports what happened at its boundary to the shard's
//! [`Observers`]; an observer must not block (it runs on the shard, inline).
//!
//! - [`Event::Received`]: reception → queue. This shard's part of a message is durable and
//!   queued (the `250` goes out once every part is).
//! - [`Event::Attempt`]: delivery → outcome. One recipient's attempt ended, with what the next
//!   hop said and what follows (delivered, deferred until, bounced, expired).
//! - [`Event::Notice`]: outcome → notices. The notice about some recipients' outcomes is
//!   spooled for the sender, or was not needed (NOTIFY asked for none); either way the
//!   failures it reports are recorded after this.
//! - [`Event::SourceHealth`]: an egress source left or rejoined rotation.
//! - [`Event::Shaping`]: an adaptive shaping rule acted on a (site, source), or its action ended.
//! - [`Event::SiteHealth`]: a (site, egress source) went into backoff after repeated failed
//!   connections, or came back (reported once, by the key's owner shard).
//! - [`Event::TlsSession`]: an outbound connection's TLS came to success or a failure under
//!   the recipient domain's policy (MTA-STS, DANE, or none): what TLS reporting counts.
//! - [`Event::Admin`]: an operator's operation that changes something (suspend, bounce, flush,
//!   rebind, reload...) was carried out, with its arguments and the merged result; emitted
//!   once, by the shard that serves the admin socket (shard 0).
//! - [`Event::Oob`], [`Event::Feedback`], [`Event::OobUnparsed`]: reception of the
//!   out-of-band domain (`src/oob/`) took a report: one `Oob` per recipient block of a DSN, one
//!   `Feedback` per ARF report, `OobUnparsed` for what could not be read as either.
//! - [`Event::Suppressed`]: a recipient on the suppression list was refused (at RCPT, or
//!   recorded as bounced at acceptance when only its tenant's list names it).
//! - [`Event::Suppression`]: an entry was added to or removed from a suppression list, on
//!   the shard that owns it.
//! - [`Event::Alert`]: an alert rule started or stopped firing (`metrics::alerts`; shard 0
//!   evaluates the rules).

use std::rc::Rc;

use serde::{Deserialize, Serialize};

use crate::envelope::{Envelope, ReceptionId};

/// How an out-of-band report was matched to the original message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchedBy {
    /// The envelope recipient was our VERP return path.
    Verp,
    /// Our `Received:` header, in the returned headers.
    Received,
}

/// Why an entry is on the list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SuppressionReason {
    /// A hard bounce (InvalidRecipient, BadDomain, InactiveMailbox), in band or out of band.
    Bounce,
    /// An ARF complaint (feedback type abuse or fraud).
    Complaint,
    /// Added by an operator.
    Admin,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListChange {
    Add,
    Remove,
}

/// A reply from the next hop (or our own reason, e.g. "connection refused"), as logged.
#[derive(Clone, Debug, Serialize, PartialEq, Eq, Default)]
pub struct Response {
    pub code: u16,
    pub enhanced: String,
    pub text: String,
}

/// What an attempt means for the recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptOutcome {
    Delivered,
    /// A transient failure: tried again at this Unix time (ms).
    Deferred {
        next_attempt_ms: u64,
    },
    Bounced,
    /// Too old to retry.
    Expired,
}

/// The message was spooled and queued on this shard.
#[derive(Clone, Copy, Debug)]
pub struct Received<'a> {
    pub ts_ms: u64,
    pub shard: usize,
    /// The queue id (this shard's copy).
    pub id: u64,
    pub envelope: &'a Envelope,
    /// TLS version and cipher of the client's session.
    pub tls: Option<&'a str>,
}

/// One recipient's attempt ended.
#[derive(Clone, Copy, Debug)]
pub struct Attempt<'a> {
    pub ts_ms: u64,
    pub shard: usize,
    pub id: u64,
    pub reception: ReceptionId,
    pub sender: &'a str,
    pub rcpt: &'a str,
    /// Attempts so far, this one included.
    pub attempts: u32,
    pub outcome: AttemptOutcome,
    pub response: &'a Response,
    /// `host[address]:port` for MX deliveries, the address for routes, "-" when no connection
    /// was made.
    pub peer: &'a str,
    /// The egress source of the connection.
    pub source: Option<&'a str>,
    /// The site key of the destination (None when the attempt had none: no route found).
    pub site: Option<&'a str>,
    pub received_ms: u64,
    pub size: u64,
    /// The TLS outcome of the connection, when one was attempted.
    pub tls: Option<&'a crate::tlspolicy::TlsOutcome>,
    /// What the failure means (None: delivered, or classification is off).
    pub bounce_category: Option<crate::bounce::Category>,
    /// The message's tenant (its tenant header, as the queue keeps it).
    pub tenant: Option<&'a str>,
}

/// The notice about some recipients of a message was spooled for its sender (or none was
/// needed).
#[derive(Clone, Copy, Debug)]
pub struct Notice<'a> {
    pub ts_ms: u64,
    pub shard: usize,
    /// The message the notice is about.
    pub id: u64,
    pub reception: ReceptionId,
    pub sender: &'a str,
    /// The recipients whose outcomes it was about.
    pub rcpts: &'a [&'a str],
    /// The notice's own reception id; None when no recipient asked for a notice.
    pub notice: Option<ReceptionId>,
    /// A delay notice (the recipients are still pending), not one of final outcomes.
    pub delay: bool,
}

/// An egress source left rotation (until a time) or came back.
#[derive(Clone, Copy, Debug)]
pub struct SourceHealth<'a> {
    pub ts_ms: u64,
    pub shard: usize,
    pub source: &'a str,
    pub down_until_ms: Option<u64>,
    pub why: &'a str,
}

/// A (site, source) went down (`down_until_ms` set) or came back up.
#[derive(Clone, Copy, Debug)]
pub struct SiteHealth<'a> {
    pub ts_ms: u64,
    pub shard: usize,
    pub site: &'a str,
    pub source: &'a str,
    pub down_until_ms: Option<u64>,
    /// Failed connections in a row.
    pub failures: u32,
    pub why: &'a str,
}

/// An adaptive shaping rule acted on a (site, source), or its action was lifted when its
/// duration ended (`shaping::adaptive`).
#[derive(Clone, Copy, Debug)]
pub struct Shaping<'a> {
    pub ts_ms: u64,
    pub shard: usize,
    /// The rule's name.
    pub rule: &'a str,
    /// suspend, throttle, suspend_tenant, suspend_campaign or bounce.
    pub action: &'a str,
    pub site: &'a str,
    pub source: &'a str,
    /// The tenant or campaign a suspension names.
    pub target: Option<&'a str>,
    /// Until when it lasts.
    pub until_ms: u64,
    /// The action ended (false: it starts).
    pub lifted: bool,
    /// What triggered it (the threshold) or what it sets (a throttle's rate).
    pub detail: &'a str,
}

/// One outbound TLS session (or the attempt at one) ended, for TLS reporting (RFC 8460).
#[derive(Clone, Copy, Debug)]
pub struct TlsSession<'a> {
    pub ts_ms: u64,
    pub shard: usize,
    pub session: &'a crate::tlsrpt::Session,
}

/// An operator's operation that changes something, and what came of it.
#[derive(Clone, Copy, Debug)]
pub struct Admin<'a> {
    pub ts_ms: u64,
    pub shard: usize,
    /// The operation's name (`suspend`, `reload`...).
    pub op: &'a str,
    /// The operation as it was asked for (its JSON request).
    pub args: &'a serde_json::Value,
    /// A summary of the answer: its counts and `error`, without its lists.
    pub result: &'a serde_json::Value,
    /// The uid of the process on the other end of the admin socket (SO_PEERCRED); None for a
    /// reload on SIGHUP or when the kernel did not say.
    pub peer_uid: Option<u32>,
}

/// One per-recipient block of a delivery status notification that came back out of band.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct OobBounce {
    pub ts_ms: u64,
    pub shard: usize,
    /// The client that sent the report, and the report's own envelope.
    pub peer: String,
    pub sender: String,
    pub recipient: String,
    /// The original message's reception id when it was matched (VERP or our Received
    /// header), else null.
    pub message_id: Option<String>,
    pub matched_by: Option<MatchedBy>,
    /// The returned Message-ID header, when there was one.
    pub original_message_id: Option<String>,
    /// The tenant of the original (its tenant header, as returned).
    pub tenant: Option<String>,
    /// `Original-Recipient` (without its address type), else `Final-Recipient`.
    pub original_recipient: Option<String>,
    pub final_recipient: Option<String>,
    /// `Action`, lower case: failed, delayed, delivered, relayed, expanded.
    pub action: Option<String>,
    /// `Status`: the enhanced code, e.g. `5.1.1`.
    pub status: Option<String>,
    /// `Diagnostic-Code` without its type (`smtp;`).
    pub diagnostic: Option<String>,
    pub reporting_mta: Option<String>,
    pub remote_mta: Option<String>,
    /// What the status and diagnostic mean (None: classification is off).
    pub bounce_category: Option<crate::bounce::Category>,
    /// The recipient went on the suppression list for it.
    pub suppressed: bool,
}

/// An ARF feedback report (RFC 5965), usually a complaint.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FeedbackReport {
    pub ts_ms: u64,
    pub shard: usize,
    pub peer: String,
    pub sender: String,
    pub recipient: String,
    pub message_id: Option<String>,
    pub matched_by: Option<MatchedBy>,
    pub original_message_id: Option<String>,
    pub tenant: Option<String>,
    /// `Feedback-Type`, lower case: abuse, fraud, virus, not-spam, other…
    pub feedback_type: String,
    /// `Original-Rcpt-To`, else the returned message's `To`.
    pub original_rcpt: Option<String>,
    /// `Original-Mail-From`, else the returned message's `Return-Path`.
    pub original_mail_from: Option<String>,
    pub user_agent: Option<String>,
    pub reported_domain: Option<String>,
    pub source_ip: Option<String>,
    pub arrival_date: Option<String>,
    pub suppressed: bool,
}

/// A message to the out-of-band domain that is neither a DSN nor an ARF report, or that
/// cannot be read: accepted (never bounced back) and logged for the operator.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct OobUnparsed {
    pub ts_ms: u64,
    pub shard: usize,
    pub peer: String,
    pub sender: String,
    pub recipient: String,
    /// The message the envelope recipient names (VERP), when it does.
    pub message_id: Option<String>,
    pub size: u64,
    pub reason: String,
}

/// Where a suppressed recipient was refused.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SuppressedAt {
    /// At RCPT, with the configured reply (the default list).
    Rcpt,
    /// After DATA: the tenant's list names it; recorded as bounced with the configured reply
    /// (or the whole message refused when every recipient is).
    Data,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Suppressed {
    pub ts_ms: u64,
    pub shard: usize,
    pub stage: SuppressedAt,
    pub peer: String,
    pub sender: String,
    pub recipient: String,
    pub tenant: Option<String>,
    /// The message, at the data stage when it was spooled for its other recipients.
    pub message_id: Option<String>,
    pub response: Response,
}

/// An entry added to or removed from a suppression list.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct SuppressionChange {
    pub ts_ms: u64,
    pub shard: usize,
    pub action: ListChange,
    pub recipient: String,
    pub tenant: Option<String>,
    pub reason: Option<SuppressionReason>,
}

/// An alert rule started firing for a subject, or stopped.
#[derive(Clone, Copy, Debug)]
pub struct Alert<'a> {
    pub ts_ms: u64,
    pub shard: usize,
    pub rule: &'a str,
    /// bounce_rate, deferral_rate, oldest_message, spool_disk or source_out_of_rotation.
    pub kind: &'a str,
    /// It started (false: it resolved).
    pub firing: bool,
    /// The site, source, `queue` or `spool` it is about.
    pub subject: &'a str,
    pub value: f64,
    pub threshold: f64,
    /// When it started firing.
    pub since_ms: u64,
    pub message: &'a str,
}

#[derive(Clone, Copy, Debug)]
pub enum Event<'a> {
    Received(Received<'a>),
    Attempt(Attempt<'a>),
    Notice(Notice<'a>),
    SourceHealth(SourceHealth<'a>),
    SiteHealth(SiteHealth<'a>),
    Shaping(Shaping<'a>),
    TlsSession(TlsSession<'a>),
    Admin(Admin<'a>),
    Oob(&'a OobBounce),
    Feedback(&'a FeedbackReport),
    OobUnparsed(&'a OobUnparsed),
    Suppressed(&'a Suppressed),
    Suppression(&'a SuppressionChange),
    Alert(Alert<'a>),
}

pub trait Observer {
    fn observe(&self, event: &Event<'_>);
}

/// The observers of one shard, called in order.
#[derive(Clone, Default)]
pub struct Observers(Vec<Rc<dyn Observer>>);

impl Observers {
    pub fn new(list: Vec<Rc<dyn Observer>>) -> Observers {
        Observers(list)
    }

    pub fn push(&mut self, observer: Rc<dyn Observer>) {
        self.0.push(observer);
    }

    pub fn emit(&self, event: &Event<'_>) {
        for o in &self.0 {
            o.observe(event);
        }
    }
}

/// An observer that keeps a few facts of every event, for tests and the simulation.
#[derive(Default)]
pub struct Recorder {
    pub seen: std::cell::RefCell<Vec<Recorded>>,
}

/// What [`Recorder`] keeps of an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    Received {
        id: u64,
        rcpts: usize,
    },
    Attempt {
        id: u64,
        rcpt: String,
        outcome: AttemptOutcome,
        code: u16,
    },
    Notice {
        id: u64,
        rcpts: usize,
        sent: bool,
    },
    SourceHealth {
        source: String,
        down: bool,
    },
    SiteHealth {
        site: String,
        down: bool,
    },
    Shaping {
        rule: String,
        lifted: bool,
    },
    TlsSession {
        domain: String,
        ok: bool,
    },
    Admin {
        op: String,
    },
    /// A report, a refusal or a list change (kept by its kind only).
    Other(&'static str),
}

impl Observer for Recorder {
    fn observe(&self, event: &Event<'_>) {
        let r = match event {
            Event::Received(e) => Recorded::Received {
                id: e.id,
                rcpts: e.envelope.rcpts.len(),
            },
            Event::Attempt(e) => Recorded::Attempt {
                id: e.id,
                rcpt: e.rcpt.to_owned(),
                outcome: e.outcome,
                code: e.response.code,
            },
            Event::Notice(e) => Recorded::Notice {
                id: e.id,
                rcpts: e.rcpts.len(),
                sent: e.notice.is_some(),
            },
            Event::SourceHealth(e) => Recorded::SourceHealth {
                source: e.source.to_owned(),
                down: e.down_until_ms.is_some(),
            },
            Event::SiteHealth(e) => Recorded::SiteHealth {
                site: e.site.to_owned(),
                down: e.down_until_ms.is_some(),
            },
            Event::Shaping(e) => Recorded::Shaping {
                rule: e.rule.to_owned(),
                lifted: e.lifted,
            },
            Event::TlsSession(e) => Recorded::TlsSession {
                domain: e.session.policy.domain.clone(),
                ok: e.session.outcome.is_ok(),
            },
            Event::Admin(e) => Recorded::Admin {
                op: e.op.to_owned(),
            },
            Event::Oob(_) => Recorded::Other("Oob"),
            Event::Feedback(_) => Recorded::Other("Feedback"),
            Event::OobUnparsed(_) => Recorded::Other("OobUnparsed"),
            Event::Suppressed(_) => Recorded::Other("Suppressed"),
            Event::Suppression(_) => Recorded::Other("Suppression"),
            Event::Alert(_) => Recorded::Other("Alert"),
        };
        self.seen.borrow_mut().push(r);
    }
}
