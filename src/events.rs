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
//! - [`Event::SiteHealth`]: a (site, egress source) went into backoff after repeated failed
//!   connections, or came back (reported once, by the key's owner shard).
//! - [`Event::TlsSession`]: an outbound connection's TLS came to success or a failure under
//!   the recipient domain's policy (MTA-STS, DANE, or none): what TLS reporting counts.

use std::rc::Rc;

use serde::Serialize;

use crate::envelope::{Envelope, ReceptionId};

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
    pub received_ms: u64,
    pub size: u64,
    /// The TLS outcome of the connection, when one was attempted.
    pub tls: Option<&'a crate::tlspolicy::TlsOutcome>,
    /// What the failure means (None: delivered, or classification is off).
    pub bounce_category: Option<crate::bounce::Category>,
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

/// One outbound TLS session (or the attempt at one) ended, for TLS reporting (RFC 8460).
#[derive(Clone, Copy, Debug)]
pub struct TlsSession<'a> {
    pub ts_ms: u64,
    pub shard: usize,
    pub session: &'a crate::tlsrpt::Session,
}

#[derive(Clone, Copy, Debug)]
pub enum Event<'a> {
    Received(Received<'a>),
    Attempt(Attempt<'a>),
    Notice(Notice<'a>),
    SourceHealth(SourceHealth<'a>),
    SiteHealth(SiteHealth<'a>),
    TlsSession(TlsSession<'a>),
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
    TlsSession {
        domain: String,
        ok: bool,
    },
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
            Event::TlsSession(e) => Recorded::TlsSession {
                domain: e.session.policy.domain.clone(),
                ok: e.session.outcome.is_ok(),
            },
        };
        self.seen.borrow_mut().push(r);
    }
}
