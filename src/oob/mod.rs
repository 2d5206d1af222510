//! Out-of-band reports: what comes back to the configured report domain (`oob.domain`) after
//! a message left us. Delivery status notifications (`multipart/report;
//! report-type=delivery-status`, RFC 3464) and ARF feedback reports (`multipart/report;
//! report-type=feedback-report`, RFC 5965) are read, matched to the message they are about,
//! classified, and turned into event lines; they are never relayed.
//!
//! - Parsing is I/O-free and done by the `mail-parser` crate (MIME structure, transfer
//!   encodings, header folding); this module only picks the report's fields out of the parts
//!   it finds. The delivery-status and feedback-report bodies are blocks of header fields
//!   (RFC 3464 §2.1, RFC 5965 §3.1), each block read with `mail-parser`'s header parser.
//! - Matching, in order: the envelope recipient when it is our VERP return path
//!   (`b+<reception id>@<oob domain>`, see [`verp_address`]); else the `Received:` header we
//!   added at reception (`by <our name> ... id <reception id>`) in the returned headers
//!   (`text/rfc822-headers` or `message/rfc822`); else none, and the returned `Message-ID`
//!   and `Original-Recipient` are logged as found.
//! - Anything that is not a report, or is broken, is [`ParseError`]: the caller still answers
//!   `250` (one never bounces a bounce) and logs it as unparsed. Nothing here panics on any
//!   input (a unit test feeds it garbage).
//!
//! [`decide`] turns a parsed report into the event lines to log and the recipients to
//! suppress; the reception adapter (`reception/session.rs`) performs that.

use crate::bounce::{Category, Classifier};
use crate::envelope::ReceptionId;
use crate::events::{FeedbackReport, OobBounce};

/// Most per-recipient blocks read from one DSN. A real DSN has one per failed recipient of
/// one transaction (at most `server.rcpts_max`, 100 by default, in practice a handful); a
/// report claiming thousands is garbage or an attack on the event log.
pub const REPORT_RCPTS_MAX: usize = 1000;
/// Longest field value kept (a diagnostic, a user agent): a real one is a line or two; longer
/// ones are cut so one report cannot bloat the event log.
pub const FIELD_LEN_MAX: usize = 1000;
/// The local part prefix of a VERP return path: `b+<reception id>@<oob domain>`.
pub const VERP_PREFIX: &str = "b+";

/// How the report was matched to the original message (defined with the events that carry
/// it, so the event types need nothing from here).
pub use crate::events::MatchedBy;

/// Why a message to the report domain could not be read as a report.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not a MIME message")]
    NotMime,
    #[error("not a multipart/report (Content-Type {0})")]
    NotReport(String),
    #[error("multipart/report with report-type {0}, neither delivery-status nor feedback-report")]
    OtherReport(String),
    #[error("no {0} part")]
    NoReportPart(&'static str),
    #[error("delivery-status part without a per-recipient block")]
    NoRecipients,
    #[error("feedback-report part without Feedback-Type")]
    NoFeedbackType,
}

/// One per-recipient block of a DSN.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DsnRecipient {
    pub original_recipient: Option<String>,
    pub final_recipient: Option<String>,
    pub action: Option<String>,
    pub status: Option<String>,
    pub diagnostic: Option<String>,
    pub remote_mta: Option<String>,
}

/// A delivery status notification.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dsn {
    pub reporting_mta: Option<String>,
    pub recipients: Vec<DsnRecipient>,
    pub original: Original,
}

/// An ARF feedback report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Feedback {
    pub feedback_type: String,
    pub user_agent: Option<String>,
    pub original_mail_from: Option<String>,
    pub original_rcpt_to: Option<String>,
    pub reported_domain: Option<String>,
    pub source_ip: Option<String>,
    pub arrival_date: Option<String>,
    pub original: Original,
}

/// What a report returned of the original message: the facts matching needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Original {
    /// From our `Received:` header.
    pub reception: Option<ReceptionId>,
    pub message_id: Option<String>,
    pub tenant: Option<String>,
    /// The first `To` address, and the `Return-Path`, for ARF reports that lack the
    /// Original-* fields.
    pub to: Option<String>,
    pub return_path: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Report {
    Dsn(Dsn),
    Feedback(Feedback),
}

/// What reading needs to know of us.
pub struct Ours<'a> {
    /// Our names in `Received: ... by NAME`: the server's and every listener's hostname.
    pub hostnames: &'a [String],
    /// The tenant header (`egress.tenant_header`), when there is one.
    pub tenant_header: Option<&'a str>,
}

/// The VERP return path of the message received as `id`. No I/O.
pub fn verp_address(id: ReceptionId, domain: &str) -> String {
    format!("{VERP_PREFIX}{id}@{domain}")
}

/// The reception id a VERP return path names, when `rcpt` is one at `domain`. No I/O.
pub fn verp_id(rcpt: &str, domain: &str) -> Option<ReceptionId> {
    let (local, at) = rcpt.rsplit_once('@')?;
    if !at.eq_ignore_ascii_case(domain) {
        return None;
    }
    let id = local.get(..VERP_PREFIX.len()).and_then(|p| {
        p.eq_ignore_ascii_case(VERP_PREFIX)
            .then(|| &local[VERP_PREFIX.len()..])
    })?;
    // Some MTAs lower-case the address; the id is hex and digits, so that changes nothing.
    ReceptionId::parse(&id.to_ascii_lowercase())
}

/// Read a message sent to the report domain. No I/O; never panics.
pub fn parse(body: &[u8], ours: &Ours<'_>) -> Result<Report, ParseError> {
    let parser = mail_parser::MessageParser::default();
    let message = parser.parse(body).ok_or(ParseError::NotMime)?;
    let root = message.parts.first().ok_or(ParseError::NotMime)?;
    let ctype = content_type_of(root.headers()).ok_or(ParseError::NotMime)?;
    if !(ctype.ctype().eq_ignore_ascii_case("multipart")
        && ctype
            .subtype()
            .is_some_and(|s| s.eq_ignore_ascii_case("report")))
    {
        return Err(ParseError::NotReport(describe(ctype)));
    }
    let report_type = ctype
        .attribute("report-type")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let original = original_of(&message, ours);
    match report_type.as_str() {
        "delivery-status" => {
            let part = find_part(&message, &["delivery-status", "global-delivery-status"])
                .ok_or(ParseError::NoReportPart("message/delivery-status"))?;
            let blocks = field_blocks(&parser, part.contents());
            let mut blocks = blocks.into_iter();
            let per_message = blocks.next().unwrap_or_default();
            let recipients: Vec<DsnRecipient> = blocks
                .filter(|b| !b.is_empty())
                .take(REPORT_RCPTS_MAX)
                .map(|b| DsnRecipient {
                    original_recipient: field(&b, "original-recipient").map(address_of),
                    final_recipient: field(&b, "final-recipient").map(address_of),
                    action: field(&b, "action").map(|a| a.to_ascii_lowercase()),
                    status: field(&b, "status").map(status_of),
                    diagnostic: field(&b, "diagnostic-code").map(address_of),
                    remote_mta: field(&b, "remote-mta").map(address_of),
                })
                .collect();
            if recipients.is_empty() {
                return Err(ParseError::NoRecipients);
            }
            Ok(Report::Dsn(Dsn {
                reporting_mta: field(&per_message, "reporting-mta").map(address_of),
                recipients,
                original,
            }))
        }
        "feedback-report" => {
            let part = find_part(&message, &["feedback-report"])
                .ok_or(ParseError::NoReportPart("message/feedback-report"))?;
            let blocks = field_blocks(&parser, part.contents());
            let fields: Vec<(String, String)> = blocks.into_iter().flatten().collect();
            let feedback_type = field(&fields, "feedback-type")
                .map(|t| t.to_ascii_lowercase())
                .ok_or(ParseError::NoFeedbackType)?;
            Ok(Report::Feedback(Feedback {
                feedback_type,
                user_agent: field(&fields, "user-agent"),
                original_mail_from: field(&fields, "original-mail-from").map(angle_free),
                original_rcpt_to: field(&fields, "original-rcpt-to").map(angle_free),
                reported_domain: field(&fields, "reported-domain"),
                source_ip: field(&fields, "source-ip"),
                arrival_date: field(&fields, "arrival-date")
                    .or_else(|| field(&fields, "received-date")),
                original,
            }))
        }
        other => Err(ParseError::OtherReport(other.to_owned())),
    }
}

/// What to do about one report: the lines to log, and the recipients to suppress.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    pub bounces: Vec<OobBounce>,
    pub feedback: Option<FeedbackReport>,
    /// (tenant, recipient, why) for the suppression list.
    pub suppress: Vec<(Option<String>, String, crate::suppression::Reason)>,
}

/// The envelope and origin of a report, for its event lines.
pub struct Arrival<'a> {
    pub ts_ms: u64,
    pub shard: usize,
    pub peer: &'a str,
    pub sender: &'a str,
    pub recipient: &'a str,
    /// The reception id the envelope recipient names (VERP), if it does.
    pub verp: Option<ReceptionId>,
}

/// Decide what a report means: match it, classify each failed recipient, and say what to
/// suppress (hard bounces: a failed action whose category is InvalidRecipient, BadDomain or
/// InactiveMailbox; complaints: every feedback report of type abuse or fraud). No I/O.
pub fn decide(report: &Report, at: &Arrival<'_>, classifier: Option<&Classifier>) -> Decision {
    let original = match report {
        Report::Dsn(d) => &d.original,
        Report::Feedback(f) => &f.original,
    };
    let (reception, matched_by) = match (at.verp, original.reception) {
        (Some(id), _) => (Some(id), Some(MatchedBy::Verp)),
        (None, Some(id)) => (Some(id), Some(MatchedBy::Received)),
        (None, None) => (None, None),
    };
    let message_id = reception.map(|r| r.to_string());
    let mut decision = Decision::default();
    match report {
        Report::Dsn(dsn) => {
            for r in &dsn.recipients {
                let category = classifier.map(|c| classify(c, r));
                let rcpt = r
                    .final_recipient
                    .clone()
                    .or_else(|| r.original_recipient.clone());
                let failed = r.action.as_deref() == Some("failed")
                    || (r.action.is_none()
                        && r.status.as_deref().is_some_and(|s| s.starts_with('5')));
                let hard = failed && category.is_some_and(Category::is_hard_bounce);
                let suppressed = match (&rcpt, hard) {
                    (Some(rcpt), true) if rcpt.contains('@') => {
                        decision.suppress.push((
                            original.tenant.clone(),
                            rcpt.clone(),
                            crate::suppression::Reason::Bounce,
                        ));
                        true
                    }
                    _ => false,
                };
                decision.bounces.push(OobBounce {
                    ts_ms: at.ts_ms,
                    shard: at.shard,
                    peer: at.peer.to_owned(),
                    sender: at.sender.to_owned(),
                    recipient: at.recipient.to_owned(),
                    message_id: message_id.clone(),
                    matched_by,
                    original_message_id: original.message_id.clone(),
                    tenant: original.tenant.clone(),
                    original_recipient: r
                        .original_recipient
                        .clone()
                        .or_else(|| r.final_recipient.clone()),
                    final_recipient: r.final_recipient.clone(),
                    action: r.action.clone(),
                    status: r.status.clone(),
                    diagnostic: r.diagnostic.clone(),
                    reporting_mta: dsn.reporting_mta.clone(),
                    remote_mta: r.remote_mta.clone(),
                    bounce_category: category,
                    suppressed,
                });
            }
        }
        Report::Feedback(f) => {
            let rcpt = f.original_rcpt_to.clone().or_else(|| original.to.clone());
            let complaint = matches!(f.feedback_type.as_str(), "abuse" | "fraud");
            let suppressed = match (&rcpt, complaint) {
                (Some(rcpt), true) if rcpt.contains('@') => {
                    decision.suppress.push((
                        original.tenant.clone(),
                        rcpt.clone(),
                        crate::suppression::Reason::Complaint,
                    ));
                    true
                }
                _ => false,
            };
            decision.feedback = Some(FeedbackReport {
                ts_ms: at.ts_ms,
                shard: at.shard,
                peer: at.peer.to_owned(),
                sender: at.sender.to_owned(),
                recipient: at.recipient.to_owned(),
                message_id,
                matched_by,
                original_message_id: original.message_id.clone(),
                tenant: original.tenant.clone(),
                feedback_type: f.feedback_type.clone(),
                original_rcpt: rcpt,
                original_mail_from: f
                    .original_mail_from
                    .clone()
                    .or_else(|| original.return_path.clone()),
                user_agent: f.user_agent.clone(),
                reported_domain: f.reported_domain.clone(),
                source_ip: f.source_ip.clone(),
                arrival_date: f.arrival_date.clone(),
                suppressed,
            });
        }
    }
    decision
}

/// The category of a DSN recipient block: its Status as the enhanced code, the reply code
/// and text from its Diagnostic-Code when that is an SMTP reply (`550 5.1.1 ...`), else a
/// code of the status's class.
fn classify(c: &Classifier, r: &DsnRecipient) -> Category {
    let status = r.status.as_deref().unwrap_or_default();
    let diagnostic = r.diagnostic.as_deref().unwrap_or_default();
    let reply_code = diagnostic
        .get(..3)
        .and_then(|d| d.parse::<u16>().ok())
        .filter(|c| (200..600).contains(c));
    let code = reply_code.unwrap_or(match status.as_bytes().first() {
        Some(b'2') => 250,
        Some(b'4') => 450,
        _ => 550,
    });
    c.classify(code, status, diagnostic)
}

type Fields = Vec<(String, String)>;

/// The value of the first field called `name` (case-insensitive).
fn field(fields: &[(String, String)], name: &str) -> Option<String> {
    fields
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
        .filter(|v| !v.is_empty())
}

/// The blocks of header fields in a delivery-status or feedback-report body, separated by
/// blank lines (RFC 3464 §2.1), each read by `mail-parser`'s header parser (folding, raw
/// values), as (name, value with its whitespace runs collapsed) pairs.
fn field_blocks(parser: &mail_parser::MessageParser, body: &[u8]) -> Vec<Fields> {
    let mut blocks = Vec::new();
    let mut rest = body;
    // Each turn consumes at least one byte, and blocks are bounded beyond the per-recipient
    // limit (a per-message block, then the recipients).
    while !rest.is_empty() && blocks.len() <= REPORT_RCPTS_MAX {
        let skip = rest
            .iter()
            .position(|&b| b != b'\r' && b != b'\n')
            .unwrap_or(rest.len());
        rest = &rest[skip..];
        if rest.is_empty() {
            break;
        }
        let end = block_end(rest);
        let (block, next) = rest.split_at(end);
        rest = next;
        let Some(parsed) = parser.parse_headers(block) else {
            continue;
        };
        let fields: Fields = parsed
            .headers_raw()
            .map(|(name, value)| (name.to_owned(), clean(value)))
            .collect();
        blocks.push(fields);
    }
    blocks
}

/// Where the block at the start of `text` ends: at its first blank line (LF, optional CR, LF),
/// or at the end.
fn block_end(text: &[u8]) -> usize {
    let mut at = 0;
    while let Some(nl) = memchr::memchr(b'\n', &text[at..]) {
        let after = at + nl + 1;
        match text.get(after) {
            Some(b'\n') => return after,
            Some(b'\r') if text.get(after + 1) == Some(&b'\n') => return after,
            None => return text.len(),
            _ => at = after,
        }
    }
    text.len()
}

/// A field value on one line: whitespace runs (folding included) made one space, trimmed, cut
/// at [`FIELD_LEN_MAX`] bytes (on a character boundary).
fn clean(value: &str) -> String {
    let mut out = String::with_capacity(value.len().min(FIELD_LEN_MAX));
    for word in value.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
        if out.len() >= FIELD_LEN_MAX {
            break;
        }
    }
    let mut cut = out.len().min(FIELD_LEN_MAX);
    while !out.is_char_boundary(cut) {
        cut -= 1;
    }
    out.truncate(cut);
    out
}

/// `rfc822; bob@example.com` → `bob@example.com`; `smtp; 550 5.1.1 ...` → `550 5.1.1 ...`: the
/// value after its type (RFC 3464 §2.3.2), angle brackets dropped.
fn address_of(value: String) -> String {
    match value.split_once(';') {
        Some((kind, rest)) if !kind.trim().contains(' ') => angle_free(rest.trim().to_owned()),
        _ => angle_free(value),
    }
}

fn angle_free(value: String) -> String {
    let v = value.trim();
    v.strip_prefix('<')
        .and_then(|v| v.strip_suffix('>'))
        .unwrap_or(v)
        .to_owned()
}

/// `5.1.1 (unknown user)` → `5.1.1`: the code, without a comment after it.
fn status_of(value: String) -> String {
    value
        .split(|c: char| c.is_whitespace() || c == '(')
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn content_type_of<'x>(
    headers: &'x [mail_parser::Header<'x>],
) -> Option<&'x mail_parser::ContentType<'x>> {
    headers
        .iter()
        .find(|h| matches!(h.name, mail_parser::HeaderName::ContentType))
        .and_then(|h| h.value.as_content_type())
}

fn describe(ctype: &mail_parser::ContentType<'_>) -> String {
    match ctype.subtype() {
        Some(sub) => format!("{}/{}", ctype.ctype(), sub),
        None => ctype.ctype().to_owned(),
    }
}

/// The first part of type `message/<one of subtypes>` (or text/…, as some reporters label
/// them).
fn find_part<'m, 'x>(
    message: &'m mail_parser::Message<'x>,
    subtypes: &[&str],
) -> Option<&'m mail_parser::MessagePart<'x>> {
    message.parts.iter().skip(1).find(|p| {
        content_type_of(p.headers()).is_some_and(|c| {
            c.subtype()
                .is_some_and(|s| subtypes.iter().any(|w| s.eq_ignore_ascii_case(w)))
        })
    })
}

/// The returned original: a `message/rfc822` part (parsed as a message by mail-parser), or a
/// `text/rfc822-headers` part (its headers parsed here).
fn original_of(message: &mail_parser::Message<'_>, ours: &Ours<'_>) -> Original {
    let parser = mail_parser::MessageParser::default();
    for part in message.parts.iter().skip(1) {
        let Some(ctype) = content_type_of(part.headers()) else {
            continue;
        };
        let sub = ctype.subtype().unwrap_or_default().to_ascii_lowercase();
        if let Some(nested) = part.message() {
            return original_from_headers(nested, ours);
        }
        if sub == "rfc822-headers" || sub == "global-headers" {
            if let Some(headers) = parser.parse_headers(part.contents()) {
                return original_from_headers(&headers, ours);
            }
        }
    }
    Original::default()
}

fn original_from_headers(m: &mail_parser::Message<'_>, ours: &Ours<'_>) -> Original {
    let reception = m
        .received_all()
        .filter(|r| {
            r.by.as_ref().is_some_and(|by| match by {
                mail_parser::Host::Name(name) => {
                    ours.hostnames.iter().any(|h| h.eq_ignore_ascii_case(name))
                }
                mail_parser::Host::IpAddr(_) => false,
            })
        })
        .find_map(|r| r.id.as_deref().and_then(ReceptionId::parse));
    let tenant = ours.tenant_header.and_then(|name| {
        m.headers_raw()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| clean(v))
            .filter(|v| !v.is_empty())
    });
    let to = m
        .to()
        .and_then(|a| a.first())
        .and_then(|a| a.address.as_deref().map(str::to_owned));
    let return_path = m
        .headers_raw()
        .find(|(n, _)| n.eq_ignore_ascii_case("return-path"))
        .map(|(_, v)| angle_free(clean(v)))
        .filter(|v| !v.is_empty());
    Original {
        reception,
        message_id: m.message_id().map(str::to_owned),
        tenant,
        to,
        return_path,
    }
}

#[cfg(test)]
mod tests;
