//! The outcome stage's decisions: what a recipient's attempt result means (delivered, bounced,
//! retried when, expired) and which results call for a notice. Pure functions; the core applies
//! them to its queue, the spool and the events.

use crate::events::{AttemptOutcome, Response};
use crate::queue::retry::{AttemptKey, Choice, Retry};
use crate::smtp::reply::Reply;
use crate::spool::record::OutcomeKind;

/// The outcome of one recipient in one attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RcptResult {
    Reply(Reply),
    /// No SMTP reply: connection refused, reset, timed out, protocol garbage.
    Failure(String),
}

/// A reply as logged: code, enhanced code as text, lines joined.
pub fn response_of(reply: &Reply) -> Response {
    Response {
        code: reply.code,
        enhanced: reply
            .enhanced
            .map(|(a, b, c)| format!("{a}.{b}.{c}"))
            .unwrap_or_default(),
        text: reply.lines().collect::<Vec<_>>().join(" "),
    }
}

/// The response a result is logged with; a failure without a reply counts as `451 4.4.1`.
pub fn response_of_result(result: &RcptResult) -> Response {
    match result {
        RcptResult::Reply(reply) => response_of(reply),
        RcptResult::Failure(why) => Response {
            code: 451,
            enhanced: "4.4.1".into(),
            text: why.clone(),
        },
    }
}

/// The category of a failed attempt for its event: an expiry is MessageExpired whatever the
/// last reply, a deferral or bounce is what its reply was classified as (`category`, None
/// when classification is off); a delivery has none. No I/O.
pub fn bounce_category(
    category: Option<crate::bounce::Category>,
    decision: AttemptOutcome,
) -> Option<crate::bounce::Category> {
    match decision {
        AttemptOutcome::Delivered => None,
        AttemptOutcome::Expired => category.map(|_| crate::bounce::Category::MessageExpired),
        AttemptOutcome::Deferred { .. } | AttemptOutcome::Bounced => category,
    }
}

/// What a recipient's result leads to after `attempts` attempts of a message received at
/// `received_ms`: 2xx delivered, 5xx bounced, anything else retried by the chosen backoff
/// until the message's maximum age, then expired; or bounced at once when the retry rule
/// says so for its category. No I/O.
pub fn decide(
    code: u16,
    choice: Choice<'_>,
    attempts: u32,
    key: AttemptKey,
    received_ms: u64,
    now_ms: u64,
) -> AttemptOutcome {
    if (200..300).contains(&code) {
        AttemptOutcome::Delivered
    } else if (500..600).contains(&code) || choice.bounce {
        AttemptOutcome::Bounced
    } else {
        match choice
            .backoff
            .after_failure(attempts, key, received_ms, now_ms)
        {
            Retry::At(at) => AttemptOutcome::Deferred {
                next_attempt_ms: at,
            },
            Retry::Expire => AttemptOutcome::Expired,
        }
    }
}

/// The spool's record kind for an outcome.
pub fn record_kind(outcome: AttemptOutcome) -> OutcomeKind {
    match outcome {
        AttemptOutcome::Delivered => OutcomeKind::Delivered,
        AttemptOutcome::Deferred { .. } => OutcomeKind::Deferred,
        AttemptOutcome::Bounced => OutcomeKind::Bounced,
        AttemptOutcome::Expired => OutcomeKind::Expired,
    }
}

/// Whether an outcome may call for a notice to the sender (NOTIFY decides per recipient when
/// the notice is built): failures always, deliveries when a recipient asked for success
/// notices; never for the null sender (a notice never causes another).
pub fn wants_notice(outcome: AttemptOutcome, success_notices: bool, sender: &str) -> bool {
    !sender.is_empty()
        && match outcome {
            AttemptOutcome::Bounced | AttemptOutcome::Expired => true,
            AttemptOutcome::Delivered => success_notices,
            AttemptOutcome::Deferred { .. } => false,
        }
}

/// Whether an outcome is a failure whose record must wait until its notice is spooled (so a
/// crash in between bounces, and notifies, again: at least once).
pub fn notice_first(outcome: AttemptOutcome) -> bool {
    matches!(outcome, AttemptOutcome::Bounced | AttemptOutcome::Expired)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::queue::retry::Backoff;

    const B: Backoff = Backoff {
        first_ms: 1_000,
        base_ms: 1_000,
        factor: 2.0,
        cap_ms: 10_000,
        jitter: 0.0,
        max_age_ms: 60_000,
    };
    const C: Choice<'static> = Choice {
        backoff: &B,
        bounce: false,
    };
    const K: AttemptKey = AttemptKey { id: 1, rcpt: 0 };

    #[test]
    fn classes_decide_and_age_expires() {
        assert_eq!(decide(250, C, 1, K, 0, 10), AttemptOutcome::Delivered);
        assert_eq!(decide(550, C, 1, K, 0, 10), AttemptOutcome::Bounced);
        assert_eq!(
            decide(451, C, 1, K, 0, 10),
            AttemptOutcome::Deferred {
                next_attempt_ms: 1_010
            }
        );
        assert_eq!(decide(421, C, 9, K, 0, 60_000), AttemptOutcome::Expired);
        let early = Choice {
            backoff: &B,
            bounce: true,
        };
        assert_eq!(decide(450, early, 1, K, 0, 10), AttemptOutcome::Bounced);
        assert_eq!(decide(250, early, 1, K, 0, 10), AttemptOutcome::Delivered);
    }

    #[test]
    fn notices_for_failures_and_asked_successes_never_for_notices() {
        assert!(wants_notice(AttemptOutcome::Bounced, false, "s@x"));
        assert!(!wants_notice(AttemptOutcome::Bounced, false, ""));
        assert!(!wants_notice(AttemptOutcome::Delivered, false, "s@x"));
        assert!(wants_notice(AttemptOutcome::Delivered, true, "s@x"));
        assert!(!wants_notice(
            AttemptOutcome::Deferred { next_attempt_ms: 1 },
            true,
            "s@x"
        ));
        assert!(notice_first(AttemptOutcome::Expired) && !notice_first(AttemptOutcome::Delivered));
    }

    #[test]
    fn failures_without_a_reply_are_451_4_4_1() {
        let r = response_of_result(&RcptResult::Failure("connection refused".into()));
        assert_eq!((r.code, r.enhanced.as_str()), (451, "4.4.1"));
        let r = response_of(&Reply::new(550, Some((5, 1, 1)), "no such user"));
        assert_eq!(r.enhanced, "5.1.1");
    }
}
