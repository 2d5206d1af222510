//! HTTP injection (`POST /api/inject/v1`) without I/O: the request and the response as
//! KumoMTA shapes them, their validation, and the generator that turns one request into one
//! RFC 5322 message per recipient (`generate`). The glommio side, which stamps each message
//! as a submission and spools it, is `shard::http::inject`.
//!
//! Compatibility with KumoMTA (a sender switching over changes no code):
//! - The same fields, with the same meaning: `envelope_sender`, `recipients` (`email`,
//!   `name`, `substitutions`), `content` (a whole RFC 5322 message as a string, or an object
//!   with `subject`, `text_body`, `html_body`, `amp_html_body`, `headers`, `from`,
//!   `reply_to`, `attachments`), the request's `substitutions` and `template_dialect`; the
//!   same response (`success_count`, `fail_count`, `failed_recipients`, `errors`, each
//!   error `"<email>: <why>"`), 200 also when recipients failed, as KumoMTA answers.
//! - Fields we do not act on are accepted and ignored, as KumoMTA ignores fields it does not
//!   know: `deferred_generation` (we always generate before answering, so the counts are
//!   real where KumoMTA would say 0), `deferred_spool` and `trace_headers` (every message is
//!   spooled durably before the answer and always gets our `Received:`), a recipient's
//!   `metadata` (we keep no per-message metadata). `template_dialect: "Handlebars"` is
//!   refused with a 400: we only have Jinja (minijinja, KumoMTA's default) and `Static`.
//!
//! Invariants:
//! - Every template is compiled once per request, before the first message is generated: a
//!   syntax error refuses the whole request (400) and spools nothing.
//! - A template error at render time, a bad recipient address or a message over
//!   `server.size_max` fails that recipient only; the others go on.
//! - Messages are generated one recipient at a time, on demand: the request holds its JSON,
//!   never its generated messages.

pub mod generate;

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

pub use generate::{Generated, Generator, Limits, Stamp};

/// Recipients in one request. The response names every failed recipient with its reason, so
/// this bounds the response as much as the work; 100,000 is ten times the bulk request the
/// API is made for (10,000), and a bigger list is split into requests as easily.
pub const RECIPIENTS_MAX: usize = 100_000;

/// Template instructions one render may run (minijinja's fuel). A mail merge with a loop over
/// a few hundred items takes a few thousand; this stops a template that loops over
/// `range(10**9)` from holding a shard's core, while leaving room for any real message.
pub const TEMPLATE_FUEL_MAX: u64 = 1_000_000;

/// `POST /api/inject/v1`'s body.
#[derive(Debug, Deserialize)]
pub struct InjectV1Request {
    /// MAIL FROM; "" is the null reverse-path.
    pub envelope_sender: String,
    pub recipients: Vec<Recipient>,
    pub content: Content,
    /// Template variables for every recipient; a recipient's own take precedence.
    #[serde(default)]
    pub substitutions: Map<String, Value>,
    #[serde(default)]
    pub template_dialect: TemplateDialect,
    /// KumoMTA generates such requests later; we generate now (see the module doc).
    #[serde(default)]
    pub deferred_generation: bool,
}

#[derive(Debug, Deserialize)]
pub struct Recipient {
    pub email: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub substitutions: Map<String, Value>,
}

/// The message: a whole RFC 5322 message (itself a template), or what to build one from.
#[derive(Debug)]
pub enum Content {
    Raw(String),
    Builder(Box<Builder>),
}

impl<'de> Deserialize<'de> for Content {
    /// By the JSON type, so that a wrong one gets a message naming both shapes rather than
    /// serde's "did not match any variant".
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Content, D::Error> {
        use serde::de::Error;
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Content::Raw(s)),
            v @ Value::Object(_) => serde_json::from_value(v)
                .map(|b| Content::Builder(Box::new(b)))
                .map_err(|e| D::Error::custom(format!("content: {e}"))),
            _ => Err(D::Error::custom(
                "content: expected a string (an RFC 5322 message) or an object (text_body, html_body, ...)",
            )),
        }
    }
}

/// What a message is built from; every text field is a template.
#[derive(Debug, Default, Deserialize)]
pub struct Builder {
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub text_body: Option<String>,
    #[serde(default)]
    pub html_body: Option<String>,
    /// A `text/x-amp-html` part, between the text and the HTML one (AMP's rule: HTML last).
    #[serde(default)]
    pub amp_html_body: Option<String>,
    /// Header name to value; values are templates.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub from: Option<Mailbox>,
    #[serde(default)]
    pub reply_to: Option<Mailbox>,
    /// Not templates (as in KumoMTA).
    #[serde(default)]
    pub attachments: Vec<Attachment>,
}

#[derive(Debug, Deserialize)]
pub struct Mailbox {
    pub email: String,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Attachment {
    /// UTF-8 text, or base64 when `base64` is true.
    pub data: String,
    pub content_type: String,
    /// Makes the attachment inline, in a `multipart/related` with the HTML part.
    #[serde(default)]
    pub content_id: Option<String>,
    #[serde(default)]
    pub file_name: Option<String>,
    #[serde(default)]
    pub base64: bool,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub enum TemplateDialect {
    #[default]
    Jinja,
    /// No templating: every text is used as given.
    Static,
    /// KumoMTA's other dialect; refused here (see the module doc).
    Handlebars,
}

/// The answer, as KumoMTA gives it.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct InjectV1Response {
    pub success_count: usize,
    pub fail_count: usize,
    pub failed_recipients: Vec<String>,
    pub errors: Vec<String>,
}

impl InjectV1Response {
    pub fn succeeded(&mut self) {
        self.success_count += 1;
    }

    /// `email` failed for `why`, written as KumoMTA writes it: `"<email>: <why>"`.
    pub fn failed(&mut self, email: &str, why: impl std::fmt::Display) {
        self.fail_count += 1;
        self.failed_recipients.push(email.to_owned());
        self.errors.push(format!("{email}: {why}"));
    }
}

/// Why a whole request is refused (HTTP 400): nothing of it was spooled.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("envelope_sender: `{0}` is not an email address")]
    Sender(String),
    #[error("recipients: none given")]
    NoRecipients,
    #[error("recipients: {0} given, at most {RECIPIENTS_MAX} per request")]
    TooManyRecipients(usize),
    #[error("content: at least one of text_body and html_body must be given")]
    NoBody,
    #[error("content.headers: `{0}` is not a header name")]
    HeaderName(String),
    #[error("content.{0}: `{1}` is not an email address")]
    Address(&'static str, String),
    #[error("content.attachments[{0}]: {1}")]
    Attachment(usize, String),
    #[error("template_dialect: {0:?} is not supported (Jinja or Static)")]
    Dialect(TemplateDialect),
    #[error("template in {part}: {why}")]
    Template { part: String, why: String },
}

/// Why one recipient's message was not generated; the others go on.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecipientError {
    #[error("`{0}` is not an email address")]
    Address(String),
    #[error("template in {part}: {why}")]
    Template { part: String, why: String },
    #[error("header {0}: a line break in the value")]
    HeaderBreak(String),
    #[error("message of {size} bytes is over the limit of {max} (server.size_max)")]
    TooBig { size: usize, max: usize },
    #[error("a line of {len} bytes is over the limit of {max} (server.data_line_len_max)")]
    LineTooLong { len: usize, max: usize },
    #[error("building the MIME message: {0}")]
    Mime(String),
}

/// Is `address` a mailbox we can send to (RFC 5321 syntax, UTF-8 allowed)? The same check
/// the SMTP server makes of RCPT TO.
pub fn valid_address(address: &str) -> bool {
    crate::smtp::parser::parse_mailbox_utf8(address).is_ok()
}

/// Is `name` a header field name (RFC 5322 2.2: printable ASCII but the colon)?
pub fn valid_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

impl InjectV1Request {
    /// What refuses the whole request before any template is compiled. No I/O.
    pub fn validate(&self) -> Result<(), RequestError> {
        if !self.envelope_sender.is_empty() && !valid_address(&self.envelope_sender) {
            return Err(RequestError::Sender(self.envelope_sender.clone()));
        }
        if self.recipients.is_empty() {
            return Err(RequestError::NoRecipients);
        }
        if self.recipients.len() > RECIPIENTS_MAX {
            return Err(RequestError::TooManyRecipients(self.recipients.len()));
        }
        if self.template_dialect == TemplateDialect::Handlebars {
            return Err(RequestError::Dialect(self.template_dialect));
        }
        let Content::Builder(b) = &self.content else {
            return Ok(());
        };
        if b.text_body.is_none() && b.html_body.is_none() {
            return Err(RequestError::NoBody);
        }
        if let Some(name) = b.headers.keys().find(|n| !valid_header_name(n)) {
            return Err(RequestError::HeaderName(name.clone()));
        }
        // Templated addresses are checked once rendered, per recipient.
        for (field, mailbox) in [("from", &b.from), ("reply_to", &b.reply_to)] {
            if let Some(m) = mailbox {
                let templated =
                    self.template_dialect == TemplateDialect::Jinja && m.email.contains("{{");
                if !templated && !valid_address(&m.email) {
                    return Err(RequestError::Address(field, m.email.clone()));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
