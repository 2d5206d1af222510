//! One message per recipient, from a validated request: templates compiled once (minijinja),
//! MIME built with mail-builder. No I/O, no clock: the Message-ID and Date come in a
//! [`Stamp`].
//!
//! - The template context of a recipient is its own `substitutions`, over `email`, `name`
//!   and `to_header`, over the request's `substitutions` (KumoMTA's precedence). The merge is
//!   lazy: the request's variables are converted once, never copied per recipient.
//! - HTML and AMP bodies are compiled under names ending in `.html`, so minijinja escapes
//!   what is substituted into them (as KumoMTA does); text, subject and headers are not.
//! - Structure: the bodies in `multipart/alternative` (text, AMP, HTML: HTML last, AMP's
//!   rule); inline attachments (with a `content_id`) with the HTML part in
//!   `multipart/related`; other attachments with all that in `multipart/mixed`.
//! - Output is CRLF throughout (a raw message's bare LFs are made CRLF, as KumoMTA does),
//!   every line within `data_line_len_max` and the whole within `size_max`, checked as the
//!   SMTP server checks DATA.

use std::borrow::Cow;
use std::collections::BTreeMap;

use base64::Engine as _;
use mail_builder::headers::address::Address;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::date::Date;
use mail_builder::headers::raw::Raw;
use mail_builder::headers::text::Text;
use mail_builder::headers::HeaderType;
use mail_builder::mime::MimePart;
use mail_builder::MessageBuilder;
use minijinja::{Environment, Value};

use super::{
    valid_address, Attachment, Builder, Content, InjectV1Request, Recipient, RecipientError,
    RequestError, TemplateDialect, TEMPLATE_FUEL_MAX,
};

/// What a generated message must fit (the SMTP server's limits for DATA).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// `server.size_max`.
    pub size_max: usize,
    /// `server.data_line_len_max`, CRLF included.
    pub line_len_max: usize,
}

/// What reception names a message by, for a built message's `Message-ID:` and `Date:` (a raw
/// message gets them from reception when it lacks them, as an SMTP submission does).
#[derive(Clone, Copy, Debug)]
pub struct Stamp<'s> {
    /// Without angle brackets: `id@host`.
    pub message_id: &'s str,
    pub unix_s: u64,
}

/// One recipient's message.
#[derive(Debug)]
pub struct Generated {
    pub message: Vec<u8>,
    /// A byte outside ASCII: the message is 8BITMIME.
    pub eight_bit: bool,
}

/// A decoded attachment, ready to be a MIME part for every recipient.
struct Decoded<'a> {
    content_type: String,
    attributes: Vec<(String, String)>,
    data: Vec<u8>,
    file_name: Option<&'a str>,
    content_id: Option<&'a str>,
}

/// The request's templates, compiled, and its attachments, decoded: shared by every
/// recipient's message.
pub struct Generator<'a> {
    request: &'a InjectV1Request,
    /// None for `template_dialect: "Static"`: every text is used as given.
    env: Option<Environment<'a>>,
    globals: Value,
    attachments: Vec<Decoded<'a>>,
    limits: Limits,
}

/// Template names: errors name the part of the request they come from.
const RAW: &str = "content";
const SUBJECT: &str = "subject";
const TEXT: &str = "text_body";
const HTML: &str = "html_body.html";
const AMP: &str = "amp_html_body.html";
const FROM_NAME: &str = "from.name";
const FROM_EMAIL: &str = "from.email";
const REPLY_NAME: &str = "reply_to.name";
const REPLY_EMAIL: &str = "reply_to.email";

fn header_template(name: &str) -> String {
    format!("headers.{name}")
}

impl<'a> Generator<'a> {
    /// Validates `request`, compiles its templates and decodes its attachments: the errors
    /// that refuse the whole request.
    pub fn new(
        request: &'a InjectV1Request,
        limits: Limits,
    ) -> Result<Generator<'a>, RequestError> {
        request.validate()?;
        let env = match request.template_dialect {
            TemplateDialect::Static => None,
            _ => Some(compile(request)?),
        };
        let attachments = match &request.content {
            Content::Raw(_) => Vec::new(),
            Content::Builder(b) => decode_attachments(&b.attachments)?,
        };
        Ok(Generator {
            request,
            env,
            globals: Value::from_serialize(&request.substitutions),
            attachments,
            limits,
        })
    }

    /// The message for `rcpt` (one of the request's recipients). No I/O.
    pub fn message_for(
        &self,
        rcpt: &Recipient,
        stamp: Stamp<'_>,
    ) -> Result<Generated, RecipientError> {
        if !valid_address(&rcpt.email) {
            return Err(RecipientError::Address(rcpt.email.clone()));
        }
        let ctx = self.context(rcpt);
        let message = match &self.request.content {
            Content::Raw(source) => crlf(self.render(RAW, source, &ctx)?.as_bytes()),
            Content::Builder(b) => self.build(b, rcpt, &ctx, stamp)?,
        };
        check_lines(&message, self.limits)?;
        Ok(Generated {
            eight_bit: !message.is_ascii(),
            message,
        })
    }

    /// The recipient's template context (see the module doc for the precedence).
    fn context(&self, rcpt: &Recipient) -> Value {
        let mut own: BTreeMap<&str, Value> = BTreeMap::new();
        own.insert("email", Value::from(rcpt.email.as_str()));
        let to_header = match rcpt.name.as_deref() {
            Some(name) => {
                own.insert("name", Value::from(name));
                format!("\"{}\" <{}>", quoted(name), rcpt.email)
            }
            None => rcpt.email.clone(),
        };
        own.insert("to_header", Value::from(to_header));
        minijinja::context! {
            ..Value::from_serialize(&rcpt.substitutions),
            ..Value::from(own),
            ..self.globals.clone()
        }
    }

    fn render(
        &self,
        name: &str,
        source: &'a str,
        ctx: &Value,
    ) -> Result<Cow<'a, str>, RecipientError> {
        let Some(env) = &self.env else {
            return Ok(Cow::Borrowed(source));
        };
        let error = |e: minijinja::Error| RecipientError::Template {
            part: name.to_owned(),
            why: e.to_string(),
        };
        let template = env.get_template(name).map_err(error)?;
        template.render(ctx).map(Cow::Owned).map_err(error)
    }

    /// A header value rendered: one line (a line break in it would start another header).
    fn render_header(
        &self,
        name: &str,
        template: &str,
        source: &'a str,
        ctx: &Value,
    ) -> Result<Cow<'a, str>, RecipientError> {
        let value = self.render(template, source, ctx)?;
        if value.contains(['\r', '\n']) {
            return Err(RecipientError::HeaderBreak(name.to_owned()));
        }
        Ok(value)
    }

    fn mailbox(
        &self,
        field: &str,
        names: (&str, &str),
        m: &'a super::Mailbox,
        ctx: &Value,
    ) -> Result<Address<'a>, RecipientError> {
        let email = self.render_header(field, names.1, &m.email, ctx)?;
        if !valid_address(&email) {
            return Err(RecipientError::Address(email.into_owned()));
        }
        let name = match &m.name {
            Some(n) => Some(self.render_header(field, names.0, n, ctx)?),
            None => None,
        };
        Ok(Address::new_address(name, email))
    }

    fn build(
        &self,
        b: &'a Builder,
        rcpt: &Recipient,
        ctx: &Value,
        stamp: Stamp<'_>,
    ) -> Result<Vec<u8>, RecipientError> {
        // The fields win over the same headers in `headers` (KumoMTA writes them over).
        let fields = [
            ("From", b.from.is_some()),
            ("Reply-To", b.reply_to.is_some()),
            ("Subject", b.subject.is_some()),
        ];
        let overridden = |n: &str| {
            fields
                .iter()
                .any(|(f, set)| *set && f.eq_ignore_ascii_case(n))
        };
        let has = |n: &str| b.headers.keys().any(|k| k.eq_ignore_ascii_case(n)) || overridden(n);
        let mut m = MessageBuilder::new();
        if let Some(from) = &b.from {
            m = m.from(self.mailbox("From", (FROM_NAME, FROM_EMAIL), from, ctx)?);
        }
        if let Some(reply_to) = &b.reply_to {
            m = m.reply_to(self.mailbox("Reply-To", (REPLY_NAME, REPLY_EMAIL), reply_to, ctx)?);
        }
        if !has("To") {
            let to = Address::new_address(rcpt.name.clone(), rcpt.email.clone());
            m = m.to(to);
        }
        if let Some(subject) = &b.subject {
            let value = self.render_header("Subject", SUBJECT, subject, ctx)?;
            m = m.header("Subject", header_value(value));
        }
        for (name, source) in &b.headers {
            if overridden(name) {
                continue;
            }
            let value = self.render_header(name, &header_template(name), source, ctx)?;
            // mail-builder adds its own Message-ID, Date and MIME-Version unless it sees
            // these exact spellings: a client's lower-case one must not end up doubled.
            let name = ["Message-ID", "Date", "MIME-Version"]
                .into_iter()
                .find(|n| n.eq_ignore_ascii_case(name))
                .unwrap_or(name);
            m = m.header(name, header_value(value));
        }
        if !has("Message-ID") {
            m = m.message_id(stamp.message_id.to_owned());
        }
        if !has("Date") {
            m = m.date(Date::new(i64::try_from(stamp.unix_s).unwrap_or(i64::MAX)));
        }
        let body = self.body(b, ctx)?;
        m.body(body)
            .write_to_vec()
            .map_err(|e| RecipientError::Mime(e.to_string()))
    }

    fn body(&self, b: &'a Builder, ctx: &Value) -> Result<MimePart<'a>, RecipientError> {
        let mut alternatives = Vec::with_capacity(3);
        if let Some(text) = &b.text_body {
            alternatives.push(MimePart::new("text/plain", self.render(TEXT, text, ctx)?));
        }
        if let Some(amp) = &b.amp_html_body {
            alternatives.push(MimePart::new(
                "text/x-amp-html",
                self.render(AMP, amp, ctx)?,
            ));
        }
        let inline: Vec<MimePart<'a>> = self
            .attachments
            .iter()
            .filter(|a| a.content_id.is_some())
            .map(Decoded::part)
            .collect();
        let mut inline = Some(inline).filter(|i| !i.is_empty());
        if let Some(html) = &b.html_body {
            let html = MimePart::new("text/html", self.render(HTML, html, ctx)?);
            // Inline parts are for the HTML to show: they go with it.
            alternatives.push(match inline.take() {
                Some(mut parts) => {
                    parts.insert(0, html);
                    MimePart::new("multipart/related", parts)
                }
                None => html,
            });
        }
        let mut core = if alternatives.len() == 1 {
            alternatives.remove(0)
        } else {
            MimePart::new("multipart/alternative", alternatives)
        };
        if let Some(mut parts) = inline {
            parts.insert(0, core);
            core = MimePart::new("multipart/related", parts);
        }
        let attached: Vec<MimePart<'a>> = self
            .attachments
            .iter()
            .filter(|a| a.content_id.is_none())
            .map(Decoded::part)
            .collect();
        if attached.is_empty() {
            return Ok(core);
        }
        let mut parts = attached;
        parts.insert(0, core);
        Ok(MimePart::new("multipart/mixed", parts))
    }
}

impl<'a> Decoded<'a> {
    fn part(&self) -> MimePart<'a> {
        let mut ct = ContentType::new(self.content_type.clone());
        for (k, v) in &self.attributes {
            ct = ct.attribute(k.clone(), v.clone());
        }
        let part = MimePart::new(ct, self.data.clone());
        match (self.content_id, self.file_name) {
            (Some(cid), _) => part.inline().cid(cid),
            (None, Some(file)) => part.attachment(file),
            (None, None) => part.header("Content-Disposition", Raw::new("attachment")),
        }
    }
}

/// A header value as mail-builder should write it: ASCII as it is (folded at spaces), other
/// text RFC 2047-encoded.
fn header_value(value: Cow<'_, str>) -> HeaderType<'_> {
    if value.is_ascii() {
        Raw::new(value).into()
    } else {
        Text::new(value).into()
    }
}

/// `s` fit for a quoted-string (RFC 5322 3.2.4).
fn quoted(s: &str) -> Cow<'_, str> {
    if !s.contains(['"', '\\']) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 2);
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    Cow::Owned(out)
}

/// Compiles every template of `request`: a syntax error refuses the request.
fn compile(request: &InjectV1Request) -> Result<Environment<'_>, RequestError> {
    let mut env = Environment::new();
    env.set_fuel(Some(TEMPLATE_FUEL_MAX));
    // A message is text to the last byte: its final line break is the client's, not ours to drop.
    env.set_keep_trailing_newline(true);
    let mut add = |name: Cow<'static, str>, source: &str| {
        env.add_template_owned(name.clone(), source.to_owned())
            .map_err(|e| RequestError::Template {
                part: name.into_owned(),
                why: e.to_string(),
            })
    };
    match &request.content {
        Content::Raw(source) => add(RAW.into(), source)?,
        Content::Builder(b) => {
            let texts = [
                (SUBJECT, &b.subject),
                (TEXT, &b.text_body),
                (HTML, &b.html_body),
                (AMP, &b.amp_html_body),
            ];
            for (name, source) in texts {
                if let Some(s) = source {
                    add(name.into(), s)?;
                }
            }
            for (names, mailbox) in [
                ((FROM_NAME, FROM_EMAIL), &b.from),
                ((REPLY_NAME, REPLY_EMAIL), &b.reply_to),
            ] {
                if let Some(m) = mailbox {
                    add(names.1.into(), &m.email)?;
                    if let Some(n) = &m.name {
                        add(names.0.into(), n)?;
                    }
                }
            }
            for (name, source) in &b.headers {
                add(header_template(name).into(), source)?;
            }
        }
    }
    Ok(env)
}

fn decode_attachments(list: &[Attachment]) -> Result<Vec<Decoded<'_>>, RequestError> {
    let mut out = Vec::with_capacity(list.len());
    for (i, a) in list.iter().enumerate() {
        let bad = |why: String| RequestError::Attachment(i, why);
        let (content_type, attributes) = parse_content_type(&a.content_type).ok_or_else(|| {
            bad(format!(
                "content_type `{}` is not type/subtype",
                a.content_type
            ))
        })?;
        let data = if a.base64 {
            base64::engine::general_purpose::STANDARD
                .decode(a.data.trim())
                .map_err(|e| bad(format!("data is not base64: {e}")))?
        } else {
            a.data.as_bytes().to_vec()
        };
        for (field, value) in [("content_id", &a.content_id), ("file_name", &a.file_name)] {
            if value
                .as_deref()
                .is_some_and(|v| v.contains(['\r', '\n', '"']))
            {
                return Err(bad(format!("{field} has a line break or a quote")));
            }
        }
        out.push(Decoded {
            content_type,
            attributes,
            data,
            file_name: a.file_name.as_deref(),
            content_id: a.content_id.as_deref().map(|c| c.trim_matches(['<', '>'])),
        });
    }
    Ok(out)
}

/// `type/subtype; k=v; ...` into the type (lower case) and its parameters, or None when it is
/// not one.
fn parse_content_type(text: &str) -> Option<(String, Vec<(String, String)>)> {
    let mut pieces = text.split(';');
    let kind = pieces.next()?.trim().to_ascii_lowercase();
    let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && b != b'/');
    let (t, sub) = kind.split_once('/')?;
    if !token(t) || !token(sub) {
        return None;
    }
    let mut attributes = Vec::new();
    for p in pieces.filter(|p| !p.trim().is_empty()) {
        let (k, v) = p.split_once('=')?;
        let (k, v) = (k.trim(), v.trim().trim_matches('"'));
        if !token(k) || v.contains(['\r', '\n', '"']) {
            return None;
        }
        attributes.push((k.to_ascii_lowercase(), v.to_owned()));
    }
    Some((kind, attributes))
}

/// `text` with every line ending CRLF (a lone CR or LF becomes CRLF).
fn crlf(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + text.len() / 32);
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                if text.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// The SMTP server's checks of DATA, on a generated (CRLF) message.
fn check_lines(message: &[u8], limits: Limits) -> Result<(), RecipientError> {
    if message.len() > limits.size_max {
        return Err(RecipientError::TooBig {
            size: message.len(),
            max: limits.size_max,
        });
    }
    let too_long = |len: usize| RecipientError::LineTooLong {
        len,
        max: limits.line_len_max,
    };
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', message) {
        let len = end + 1 - start;
        if len > limits.line_len_max {
            return Err(too_long(len));
        }
        start = end + 1;
    }
    // A last line without its CRLF counts as if it had one (delivery adds it).
    let tail = message.len() - start;
    if tail > 0 && tail + 2 > limits.line_len_max {
        return Err(too_long(tail + 2));
    }
    Ok(())
}

#[cfg(test)]
pub(super) fn crlf_for_tests(text: &[u8]) -> Vec<u8> {
    crlf(text)
}
