//! The sink's `--smart` replies: realistic refusals chosen by the recipient's local part, in
//! the words of the provider its domain belongs to (KumoMTA's "smart sink" is the model).
//!
//! `tempfail@`, `permfail@`, `quota@`, `blocked@`, `ratelimit@` and `greylist@` are refused at
//! RCPT; `spam@` is accepted at RCPT and its message refused after the final dot. A `+tag`
//! after the local part is ignored, so `permfail+17@gmail.com` is a `permfail`. Any other
//! recipient is accepted as without `--smart`. The provider comes from the first domain glob
//! that matches (see `providers.toml`, built in and the format of `--providers FILE`), else
//! `generic`.
//!
//! No I/O: the table is parsed from text once, and replies are rendered into bytes for the
//! session to send. Invariants: every provider answers every kind (missing kinds are taken
//! from `generic`); every reply is 4xx or 5xx with at least one line and no CR or LF inside.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Deserialize;

/// The built-in table, also the documented format of a `--providers` file.
pub const BUILTIN: &str = include_str!("providers.toml");

/// The provider a domain no rule matches belongs to.
pub const GENERIC: &str = "generic";

/// A reply line longer than RFC 5321's 512-octet limit (4.5.3.1.5) is a typo in the table.
const REPLY_LINE_LEN_MAX: usize = 512;

/// Past this a reply is not something a provider sends.
const REPLY_LINES_MAX: usize = 32;

/// What a refusal says about the recipient or the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Tempfail,
    Permfail,
    Quota,
    Spam,
    Blocked,
    Ratelimit,
    Greylist,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Tempfail,
        Kind::Permfail,
        Kind::Quota,
        Kind::Spam,
        Kind::Blocked,
        Kind::Ratelimit,
        Kind::Greylist,
    ];

    /// The local part that asks for this kind, and its name in the table and the report.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Tempfail => "tempfail",
            Kind::Permfail => "permfail",
            Kind::Quota => "quota",
            Kind::Spam => "spam",
            Kind::Blocked => "blocked",
            Kind::Ratelimit => "ratelimit",
            Kind::Greylist => "greylist",
        }
    }

    fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(name))
    }

    /// Index into per-kind arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether the refusal comes after the final dot rather than at RCPT.
    pub fn at_data(self) -> bool {
        self == Kind::Spam
    }
}

/// One reply as the table gives it; rendered per use, since it may name the client or the
/// recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmartReply {
    pub code: u16,
    /// Each line's text after `code` and the separator, enhanced code included.
    lines: Vec<String>,
}

impl SmartReply {
    /// The reply as sent: `code-` on every line but the last, `code ` on the last, CRLF
    /// after each; `{ip}` and `{rcpt}` replaced.
    pub fn render(&self, ip: &str, rcpt: &str) -> Vec<u8> {
        let mut out = String::new();
        let last = self.lines.len().saturating_sub(1);
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            let text = line.replace("{ip}", ip).replace("{rcpt}", rcpt);
            let _ = write!(out, "{}{sep}{text}\r\n", self.code);
        }
        out.into_bytes()
    }

    /// 421 tells the client the connection is closing (RFC 5321 3.8), so the sink closes it.
    pub fn closes_connection(&self) -> bool {
        self.code == 421
    }
}

/// The table: domain rules and each provider's reply per kind.
#[derive(Debug, Clone)]
pub struct Providers {
    /// Lower-case glob and the index of its provider, in the order they are tried.
    rules: Vec<(String, usize)>,
    /// Provider names, by index; `generic` is one of them.
    names: Vec<String>,
    /// Replies by provider index, then `Kind::index`.
    replies: Vec<Vec<SmartReply>>,
    generic: usize,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    #[serde(default)]
    domains: Vec<Rule>,
    #[serde(default)]
    providers: BTreeMap<String, BTreeMap<String, ReplySpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    glob: String,
    provider: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplySpec {
    code: u16,
    enhanced: Option<String>,
    text: Vec<String>,
}

impl ReplySpec {
    fn build(&self, what: &str) -> Result<SmartReply, String> {
        if !matches!(self.code, 400..=599) {
            return Err(format!("{what}: code {} is not 4xx or 5xx", self.code));
        }
        if self.text.is_empty() || self.text.len() > REPLY_LINES_MAX {
            return Err(format!("{what}: text needs 1 to {REPLY_LINES_MAX} lines"));
        }
        let mut lines = Vec::with_capacity(self.text.len());
        for text in &self.text {
            let line = match &self.enhanced {
                Some(enhanced) => format!("{enhanced} {text}"),
                None => text.clone(),
            };
            if line.contains(['\r', '\n']) {
                return Err(format!("{what}: a line holds CR or LF"));
            }
            if line.len() + 6 > REPLY_LINE_LEN_MAX {
                return Err(format!(
                    "{what}: a line is over {REPLY_LINE_LEN_MAX} octets"
                ));
            }
            lines.push(line);
        }
        if let Some(enhanced) = &self.enhanced {
            let class = enhanced.split('.').next().unwrap_or_default();
            if class != (self.code / 100).to_string() || enhanced.split('.').count() != 3 {
                return Err(format!(
                    "{what}: enhanced code {enhanced:?} does not fit {}",
                    self.code
                ));
            }
        }
        Ok(SmartReply {
            code: self.code,
            lines,
        })
    }
}

impl Providers {
    /// The built-in table.
    #[cfg(test)]
    pub fn builtin() -> Result<Self, String> {
        Self::parse(None)
    }

    /// The built-in table with `overlay` (a --providers file's text) laid over it: its rules
    /// are tried first, and its replies replace the built-in ones kind by kind.
    pub fn parse(overlay: Option<&str>) -> Result<Self, String> {
        let builtin: Table =
            toml::from_str(BUILTIN).map_err(|e| format!("built-in providers: {e}"))?;
        let mut table = match overlay {
            Some(text) => toml::from_str::<Table>(text).map_err(|e| e.to_string())?,
            None => Table::default(),
        };
        table.domains.extend(builtin.domains);
        for (name, kinds) in builtin.providers {
            let entry = table.providers.entry(name).or_default();
            for (kind, spec) in kinds {
                entry.entry(kind).or_insert(spec);
            }
        }
        Self::from_table(&table)
    }

    fn from_table(table: &Table) -> Result<Self, String> {
        let names: Vec<String> = table.providers.keys().cloned().collect();
        let generic = names
            .iter()
            .position(|n| n == GENERIC)
            .ok_or("no generic provider")?;
        let mut specs: Vec<Vec<Option<SmartReply>>> = Vec::with_capacity(names.len());
        for (name, kinds) in &table.providers {
            let mut row = vec![None; Kind::ALL.len()];
            for (kind_name, spec) in kinds {
                let kind = Kind::from_name(kind_name)
                    .ok_or_else(|| format!("providers.{name}: unknown kind {kind_name:?}"))?;
                row[kind.index()] = Some(spec.build(&format!("providers.{name}.{kind_name}"))?);
            }
            specs.push(row);
        }
        let generic_row = specs[generic].clone();
        let mut replies = Vec::with_capacity(specs.len());
        for row in specs {
            let mut full = Vec::with_capacity(Kind::ALL.len());
            for kind in Kind::ALL {
                let reply = row[kind.index()]
                    .clone()
                    .or_else(|| generic_row[kind.index()].clone())
                    .ok_or_else(|| format!("providers.generic: no {} reply", kind.name()))?;
                full.push(reply);
            }
            replies.push(full);
        }
        let mut rules = Vec::with_capacity(table.domains.len());
        for rule in &table.domains {
            let index = names
                .iter()
                .position(|n| *n == rule.provider)
                .ok_or_else(|| {
                    format!("domain {:?}: no provider {:?}", rule.glob, rule.provider)
                })?;
            rules.push((rule.glob.to_ascii_lowercase(), index));
        }
        Ok(Self {
            rules,
            names,
            replies,
            generic,
        })
    }

    /// One line for the log: the providers and how many domain rules lead to them.
    pub fn describe(&self) -> String {
        format!(
            "providers {}; {} domain rules",
            self.names.join(", "),
            self.rules.len()
        )
    }

    /// The provider of `domain`: the first rule whose glob matches, else `generic`.
    fn provider_index(&self, domain: &str) -> usize {
        let domain = domain.to_ascii_lowercase();
        let domain = domain.trim_end_matches('.');
        self.rules
            .iter()
            .find(|(glob, _)| glob_match(glob.as_bytes(), domain.as_bytes()))
            .map_or(self.generic, |&(_, index)| index)
    }

    /// The provider's name for `domain`.
    #[cfg(test)]
    pub fn provider(&self, domain: &str) -> &str {
        &self.names[self.provider_index(domain)]
    }

    /// The reply of `domain`'s provider for `kind`.
    pub fn reply(&self, domain: &str, kind: Kind) -> &SmartReply {
        &self.replies[self.provider_index(domain)][kind.index()]
    }

    /// The refusal `rcpt` (a path without brackets) asks for, if its local part names one.
    pub fn for_rcpt(&self, rcpt: &str) -> Option<(Kind, &SmartReply)> {
        let (local, domain) = rcpt.rsplit_once('@')?;
        let kind = kind_of_local_part(local)?;
        Some((kind, self.reply(domain, kind)))
    }
}

/// The kind a local part asks for: its name, case ignored, with any `+tag` dropped.
pub fn kind_of_local_part(local: &str) -> Option<Kind> {
    let base = local.split_once('+').map_or(local, |(base, _)| base);
    Kind::from_name(base)
}

/// Whether `text` matches `glob`, where `*` matches any run of bytes (empty included) and
/// every other byte itself. Iterative with one backtrack point, so linear in practice.
fn glob_match(glob: &[u8], text: &[u8]) -> bool {
    let (mut g, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if g < glob.len() && glob[g] == b'*' {
            star = Some((g, t));
            g += 1;
        } else if g < glob.len() && glob[g] == text[t] {
            g += 1;
            t += 1;
        } else if let Some((sg, st)) = star {
            g = sg + 1;
            t = st + 1;
            star = Some((sg, st + 1));
        } else {
            return false;
        }
    }
    glob[g..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(reply: &SmartReply) -> String {
        String::from_utf8(reply.render("192.0.2.7", "u@d.test")).unwrap()
    }

    #[test]
    fn globs_match_whole_names() {
        assert!(glob_match(b"gmail.com", b"gmail.com"));
        assert!(!glob_match(b"gmail.com", b"xgmail.com"));
        assert!(!glob_match(b"gmail.com", b"gmail.com.evil"));
        assert!(glob_match(b"*.gmail.com", b"eu.gmail.com"));
        assert!(!glob_match(b"*.gmail.com", b"gmail.com"));
        assert!(glob_match(b"hotmail.*", b"hotmail.co.uk"));
        assert!(glob_match(b"*", b""));
        assert!(glob_match(b"a*b*c", b"aXbYbZc"));
        assert!(!glob_match(b"a*b*c", b"aXbYbZ"));
    }

    #[test]
    fn provider_by_domain_glob() {
        let p = Providers::builtin().unwrap();
        assert_eq!(p.provider("gmail.com"), "gmail");
        assert_eq!(p.provider("GMail.COM."), "gmail");
        assert_eq!(p.provider("googlemail.com"), "gmail");
        assert_eq!(p.provider("hotmail.co.uk"), "outlook");
        assert_eq!(p.provider("outlook.com"), "outlook");
        assert_eq!(p.provider("yahoo.fr"), "yahoo");
        assert_eq!(p.provider("example.test"), "generic");
    }

    #[test]
    fn kind_by_local_part() {
        assert_eq!(kind_of_local_part("permfail"), Some(Kind::Permfail));
        assert_eq!(kind_of_local_part("Quota+12"), Some(Kind::Quota));
        assert_eq!(kind_of_local_part("spam"), Some(Kind::Spam));
        assert_eq!(kind_of_local_part("greylist"), Some(Kind::Greylist));
        assert_eq!(kind_of_local_part("user1"), None);
        assert_eq!(kind_of_local_part("permfailx"), None);
        let p = Providers::builtin().unwrap();
        assert!(p.for_rcpt("user1@gmail.com").is_none());
        assert!(p.for_rcpt("permfail").is_none(), "no domain, no kind");
        let (kind, reply) = p.for_rcpt("blocked@outlook.com").unwrap();
        assert_eq!(kind, Kind::Blocked);
        assert_eq!(
            text(reply),
            "550 5.7.1 Service unavailable, Client host [192.0.2.7] blocked using Spamhaus. \
To request removal from this list see https://www.spamhaus.org/query/ip/192.0.2.7 (AS3130). \
[BN8NAM12FT003.eop-nam12.prod.protection.outlook.com]\r\n"
        );
        assert!(Kind::Spam.at_data() && !Kind::Permfail.at_data());
    }

    #[test]
    fn multi_line_replies_continue_with_code_dash() {
        let p = Providers::builtin().unwrap();
        let out = text(p.reply("gmail.com", Kind::Permfail));
        assert_eq!(
            out,
            "550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n\
550-5.1.1 double-checking the recipient's email address for typos or\r\n\
550-5.1.1 unnecessary spaces. For more information, go to\r\n\
550 5.1.1  https://support.google.com/mail/?p=NoSuchUser - gsmtp\r\n"
        );
        assert!(text(p.reply("gmail.com", Kind::Quota))
            .starts_with("452-4.2.2 The email account that you tried to reach is over quota."));
        assert!(text(p.reply("gmail.com", Kind::Spam)).contains("likely unsolicited mail"));
        assert!(text(p.reply("gmail.com", Kind::Tempfail))
            .starts_with("421-4.7.0 Try again later, closing connection."));
        assert!(p.reply("gmail.com", Kind::Tempfail).closes_connection());
        assert_eq!(
            text(p.reply("yahoo.com", Kind::Quota)),
            "552 1 Requested mail action aborted, mailbox not found\r\n"
        );
        assert!(text(p.reply("yahoo.com", Kind::Permfail))
            .starts_with("554 delivery error: dd This user doesn't have a yahoo.com account"));
        assert_eq!(
            text(p.reply("hotmail.com", Kind::Quota)),
            "452 4.3.1 Insufficient system resources\r\n"
        );
        assert_eq!(
            text(p.reply("x.test", Kind::Permfail)),
            "550 5.1.1 <u@d.test>: Recipient address rejected: User unknown in local recipient table\r\n"
        );
    }

    #[test]
    fn every_builtin_reply_is_well_formed() {
        let p = Providers::builtin().unwrap();
        for row in &p.replies {
            for reply in row {
                let out = text(reply);
                let lines: Vec<&str> = out.split_terminator("\r\n").collect();
                let code = reply.code.to_string();
                for (i, line) in lines.iter().enumerate() {
                    let sep = if i + 1 == lines.len() { " " } else { "-" };
                    assert!(line.starts_with(&format!("{code}{sep}")), "{out}");
                    assert!(line.len() <= REPLY_LINE_LEN_MAX, "{line}");
                }
            }
        }
        // Every named provider answers every kind itself.
        let table: Table = toml::from_str(BUILTIN).unwrap();
        for (name, kinds) in &table.providers {
            assert_eq!(kinds.len(), Kind::ALL.len(), "{name}");
        }
    }

    #[test]
    fn overlay_comes_first_and_falls_back_per_kind() {
        let overlay = r#"
[[domains]]
glob = "*.corp.test"
provider = "acme"
[[domains]]
glob = "gmail.com"
provider = "yahoo"
[providers.acme.permfail]
code = 551
enhanced = "5.1.6"
text = ["first", "second"]
[providers.gmail.quota]
code = 552
enhanced = "5.2.2"
text = ["full"]
"#;
        let p = Providers::parse(Some(overlay)).unwrap();
        assert_eq!(p.provider("mx.corp.test"), "acme");
        assert_eq!(p.provider("gmail.com"), "yahoo");
        assert_eq!(p.provider("googlemail.com"), "gmail");
        assert_eq!(
            text(p.reply("a.corp.test", Kind::Permfail)),
            "551-5.1.6 first\r\n551 5.1.6 second\r\n"
        );
        // acme has no quota reply: generic's.
        assert_eq!(
            text(p.reply("a.corp.test", Kind::Quota)),
            text(p.reply("x.test", Kind::Quota))
        );
        assert_eq!(
            text(p.reply("googlemail.com", Kind::Quota)),
            "552 5.2.2 full\r\n"
        );
        // Other gmail kinds are still the built-in ones.
        assert!(text(p.reply("googlemail.com", Kind::Permfail)).starts_with("550-5.1.1"));
    }

    #[test]
    fn bad_tables_are_refused() {
        for bad in [
            "[[domains]]\nglob = \"x\"\nprovider = \"nobody\"\n",
            "[providers.a.permfailz]\ncode = 550\ntext = [\"x\"]\n",
            "[providers.a.permfail]\ncode = 250\ntext = [\"x\"]\n",
            "[providers.a.permfail]\ncode = 550\ntext = []\n",
            "[providers.a.permfail]\ncode = 550\nenhanced = \"4.1.1\"\ntext = [\"x\"]\n",
            "[providers.a.permfail]\ncode = 550\ntext = [\"a\\r\\nb\"]\n",
            "bogus = 1\n",
        ] {
            assert!(Providers::parse(Some(bad)).is_err(), "{bad}");
        }
    }
}
