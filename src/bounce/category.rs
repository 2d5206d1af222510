//! The bounce categories: what a failed delivery's reply means, in the terms an operator acts
//! on (suppress the address, slow down, fix authentication, ...).

use serde::{Deserialize, Serialize};

/// Why a recipient's attempt failed. Serialized (event log, rules files) with the variant's
/// name, e.g. `InvalidRecipient`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Category {
    /// The mailbox does not exist (user unknown, no such user).
    InvalidRecipient,
    /// The recipient's domain does not exist or accepts no mail.
    BadDomain,
    /// The mailbox exists but is disabled, suspended or inactive.
    InactiveMailbox,
    /// The mailbox or the receiving system is full.
    QuotaIssues,
    /// The sending IP or domain is on a blocklist or has a poor reputation.
    SpamBlock,
    /// The message itself looked like spam or carried a virus.
    SpamContent,
    /// Refused by the receiver's policy (not spam as such): size, sender, content rules.
    PolicyRelated,
    /// SPF, DKIM, DMARC, reverse DNS or SMTP AUTH failed.
    AuthenticationFailed,
    /// Too many concurrent connections to the receiver.
    TooManyConnections,
    /// Too many messages for the receiver's rate limits (deferred for volume, greylisted).
    RateLimited,
    /// The next hop could not be reached or would not relay (DNS, connection, relay denied).
    RoutingErrors,
    /// An SMTP protocol or syntax error.
    ProtocolErrors,
    /// The message reached its maximum age in the queue.
    MessageExpired,
    /// No rule and no status code class said anything more.
    Uncategorized,
}

impl Category {
    /// Every category, in declaration order.
    pub const ALL: [Category; 14] = [
        Category::InvalidRecipient,
        Category::BadDomain,
        Category::InactiveMailbox,
        Category::QuotaIssues,
        Category::SpamBlock,
        Category::SpamContent,
        Category::PolicyRelated,
        Category::AuthenticationFailed,
        Category::TooManyConnections,
        Category::RateLimited,
        Category::RoutingErrors,
        Category::ProtocolErrors,
        Category::MessageExpired,
        Category::Uncategorized,
    ];

    /// A failure that says the address will never take mail (the mailbox or the domain does
    /// not exist, or the mailbox is disabled): what puts a recipient on the suppression list.
    /// Full mailboxes, blocks and policy refusals are not: they say nothing lasting about the
    /// address.
    pub fn is_hard_bounce(self) -> bool {
        matches!(
            self,
            Category::InvalidRecipient | Category::BadDomain | Category::InactiveMailbox
        )
    }

    /// The name used in event lines and rules files.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::InvalidRecipient => "InvalidRecipient",
            Category::BadDomain => "BadDomain",
            Category::InactiveMailbox => "InactiveMailbox",
            Category::QuotaIssues => "QuotaIssues",
            Category::SpamBlock => "SpamBlock",
            Category::SpamContent => "SpamContent",
            Category::PolicyRelated => "PolicyRelated",
            Category::AuthenticationFailed => "AuthenticationFailed",
            Category::TooManyConnections => "TooManyConnections",
            Category::RateLimited => "RateLimited",
            Category::RoutingErrors => "RoutingErrors",
            Category::ProtocolErrors => "ProtocolErrors",
            Category::MessageExpired => "MessageExpired",
            Category::Uncategorized => "Uncategorized",
        }
    }

    /// The category named `name` (as [`Category::as_str`] writes it).
    pub fn parse(name: &str) -> Option<Category> {
        Category::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// A hard bounce: the address itself is bad, so retrying or resending is pointless.
    pub fn is_hard(self) -> bool {
        matches!(
            self,
            Category::InvalidRecipient | Category::BadDomain | Category::InactiveMailbox
        )
    }
}

impl std::fmt::Display for Category {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_serde() {
        for c in Category::ALL {
            assert_eq!(Category::parse(c.as_str()), Some(c));
            let json = serde_json::to_string(&c).expect("json");
            assert_eq!(json, format!("\"{}\"", c.as_str()));
        }
        assert_eq!(Category::parse("invalid-recipient"), None);
    }
}
