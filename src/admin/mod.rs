//! Queue operations on a running server: the requests an operator sends (over the admin
//! socket, later over HTTP) and what the shards answer.
//!
//! The wire is JSON lines: one [`Op`] per line in, one JSON object per line out. Every shard
//! answers an operation about its own queue ([`crate::core::Core::admin`]); the server merges
//! the answers. Nothing here does I/O.

use serde::{Deserialize, Serialize};

/// Which messages or destinations an operation is about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selector {
    /// A recipient domain (lower case).
    Domain(String),
    /// A site: the rolled-up MX host set as `epoxi queue summary` prints it, or a route.
    Site(String),
    /// A tenant (from `X-Tenant`).
    Tenant(String),
    /// A campaign (arrives with campaigns; matches nothing until then).
    Campaign(String),
    /// One message, by reception id or queue id.
    Id(String),
}

/// Suppression list operations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum SuppressionOp {
    List {
        tenant: Option<String>,
        #[serde(default)]
        limit: Option<usize>,
    },
    Add {
        tenant: Option<String>,
        rcpt: String,
        #[serde(default)]
        reason: Option<String>,
    },
    Remove {
        tenant: Option<String>,
        rcpt: String,
    },
}

/// One operation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Per site and per tenant: ready, scheduled, in flight, oldest age, suspensions.
    Summary,
    Inspect {
        selector: Selector,
        #[serde(default)]
        limit: Option<usize>,
    },
    /// Hold matching messages (no delivery attempts) until resumed or `duration_s` passes.
    /// Max age still applies.
    Suspend {
        selector: Selector,
        #[serde(default)]
        duration_s: Option<u64>,
        #[serde(default)]
        reason: Option<String>,
    },
    Resume {
        selector: Selector,
    },
    /// Bounce matching queued messages, and new matching ones while the directive lasts
    /// (`duration_s`, default 5 min); `notify`: send RFC 3464 notices as for any bounce.
    Bounce {
        selector: Selector,
        #[serde(default)]
        duration_s: Option<u64>,
        #[serde(default)]
        reason: Option<String>,
        #[serde(default)]
        notify: bool,
    },
    /// Retry now: scheduled messages (all, or matching) become due, site backoffs end.
    Flush {
        #[serde(default)]
        selector: Option<Selector>,
    },
    /// Send mail for `domain` through egress pool `pool` from now on (until reload/restart).
    Rebind {
        domain: String,
        pool: String,
    },
    /// Re-inject dead letters (all, or one by id).
    Reinject {
        #[serde(default)]
        id: Option<String>,
    },
    Suppression(SuppressionOp),
    Reload,
}

impl Op {
    /// The name of the operation, for the event log.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Summary => "summary",
            Op::Inspect { .. } => "inspect",
            Op::Suspend { .. } => "suspend",
            Op::Resume { .. } => "resume",
            Op::Bounce { .. } => "bounce",
            Op::Flush { .. } => "flush",
            Op::Rebind { .. } => "rebind",
            Op::Reinject { .. } => "reinject",
            Op::Suppression(_) => "suppression",
            Op::Reload => "reload",
        }
    }

    /// Whether the operation changes anything (and is logged as an event).
    pub fn mutates(&self) -> bool {
        !matches!(
            self,
            Op::Summary | Op::Inspect { .. } | Op::Suppression(SuppressionOp::List { .. })
        )
    }
}
