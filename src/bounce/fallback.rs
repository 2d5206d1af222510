//! The fallback when no rule matches: the RFC 3463 enhanced status code's class and subject
//! (and the RFC 7372 / RFC 7505 additions), which most receivers set even when their text is
//! their own. No I/O, no allocation.

use super::Category;

/// The category the enhanced status code `enhanced` ("5.1.1") implies, if any.
pub fn by_enhanced(enhanced: &str) -> Option<Category> {
    let mut parts = enhanced.split('.');
    let class = parts.next()?;
    let subject: u16 = parts.next()?.parse().ok()?;
    let detail: u16 = parts.next()?.parse().ok()?;
    if parts.next().is_some() || !(class == "4" || class == "5") {
        return None;
    }
    let transient = class == "4";
    Some(match (subject, detail) {
        // Delivery time expired (X.4.7).
        (4, 7) => Category::MessageExpired,
        // Addressing: bad destination system (X.1.2), null MX (X.1.10, RFC 7505).
        (1, 2) | (1, 10) => Category::BadDomain,
        // Bad sender address syntax / system: the receiver refuses our sender, not the rcpt.
        (1, 7) | (1, 8) => Category::PolicyRelated,
        (1, _) => Category::InvalidRecipient,
        // Mailbox: disabled (X.2.1), full (X.2.2), message too long for it (X.2.3).
        (2, 2) => Category::QuotaIssues,
        (2, 3) => Category::PolicyRelated,
        (2, _) => Category::InactiveMailbox,
        // Mail system: full (X.3.1), message too big for the system (X.3.4).
        (3, 1) => Category::QuotaIssues,
        (3, 4) => Category::PolicyRelated,
        (3, _) => Category::RoutingErrors,
        // Network and routing.
        (4, _) => Category::RoutingErrors,
        // Protocol (X.5.x) and content conversion (X.6.x).
        (5, _) | (6, _) => Category::ProtocolErrors,
        // Security or policy: the authentication family (RFC 7372: X.7.20 to X.7.27, and
        // X.7.8 authentication credentials invalid, X.7.9 mechanism too weak, X.7.14 trust
        // relationship required).
        (7, 8) | (7, 9) | (7, 14) | (7, 20..=27) => Category::AuthenticationFailed,
        // A temporary policy refusal is nearly always volume or reputation throttling; X.7.1
        // stays a policy refusal (it is also what greylisting answers with).
        (7, 1) => Category::PolicyRelated,
        (7, _) if transient => Category::RateLimited,
        (7, _) => Category::PolicyRelated,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        let table = [
            ("5.1.1", Some(Category::InvalidRecipient)),
            ("5.1.2", Some(Category::BadDomain)),
            ("5.1.10", Some(Category::BadDomain)),
            ("5.2.1", Some(Category::InactiveMailbox)),
            ("5.2.2", Some(Category::QuotaIssues)),
            ("4.2.2", Some(Category::QuotaIssues)),
            ("5.7.1", Some(Category::PolicyRelated)),
            ("5.7.26", Some(Category::AuthenticationFailed)),
            ("5.7.8", Some(Category::AuthenticationFailed)),
            ("4.7.0", Some(Category::RateLimited)),
            ("5.5.2", Some(Category::ProtocolErrors)),
            ("4.4.7", Some(Category::MessageExpired)),
            ("4.4.1", Some(Category::RoutingErrors)),
            ("5.4.4", Some(Category::RoutingErrors)),
            ("2.0.0", None),
            ("", None),
            ("5.x.1", None),
            ("5.1.1.1", None),
        ];
        for (enhanced, want) in table {
            assert_eq!(by_enhanced(enhanced), want, "{enhanced}");
        }
    }
}
