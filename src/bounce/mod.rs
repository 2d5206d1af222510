//! Bounce classification: what a failed delivery's reply means, as a [`Category`].
//!
//! Rules map a reply's code, enhanced status code and text to a category; they come from the
//! operator's rules files (tried first, in the order given) and then from the built-in set
//! (`default_rules.toml`, built from the reply conventions of the big mailbox providers).
//! The first rule that matches wins. When none does, the RFC 3463 class of the enhanced
//! code decides ([`fallback`]), else the reply is [`Category::Uncategorized`].
//!
//! The rules file format (TOML):
//!
//! ```toml
//! defaults = true            # false: only this file's rules (and the fallback)
//! [[rule]]
//! category = "QuotaIssues"   # a Category name
//! code = 452                 # optional: a code, a pattern ("5xx", "55x") or a list of them
//! enhanced = "4.2."          # optional: exact ("4.2.2"), or a prefix when it ends with '.'
//! text = ["over quota"]      # optional: regexes on the reply text, case-insensitive, any
//! ```
//!
//! A rule needs at least one condition, and all of its conditions must hold. Every rule's
//! regexes are compiled once into one `RegexSet`, so a reply's text is scanned once whatever
//! the number of rules. Classification is I/O-free and runs per failed recipient (a criterion
//! bench keeps it under 2 µs per reply).

mod category;
pub mod fallback;

pub use category::Category;

use regex::{RegexSet, RegexSetBuilder};
use serde::Deserialize;

/// The built-in rules, tried after the operator's.
pub const DEFAULT_RULES: &str = include_str!("default_rules.toml");

/// Rules in one set, all files together. A sanity bound so a generated file cannot make the
/// set's compilation take minutes; the built-in set has about a hundred.
pub const RULES_MAX: usize = 10_000;
/// Compiled size bound of the regex set. The regex crate's default (10 MiB) is per regex;
/// a set of some hundred case-insensitive patterns needs more than that.
const REGEX_SIZE_MAX: usize = 64 << 20;

/// A rules file that cannot be used. `index` numbers the file's `[[rule]]` tables from 0.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("{origin}: {reason}")]
    Parse { origin: String, reason: String },
    #[error("{origin}: rule[{index}]: {reason}")]
    Rule {
        origin: String,
        index: usize,
        reason: String,
    },
    #[error("too many rules: {count} (at most {RULES_MAX})")]
    TooMany { count: usize },
    #[error("the rules' regexes do not compile together: {0}")]
    Set(String),
}

/// A rules file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    /// Whether the built-in rules follow this file's. Only a user file can turn them off.
    #[serde(default = "yes")]
    defaults: bool,
    #[serde(default)]
    rule: Vec<RuleEntry>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleEntry {
    category: String,
    #[serde(default)]
    code: Option<CodeSpec>,
    #[serde(default)]
    enhanced: Option<String>,
    #[serde(default)]
    text: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum CodeSpec {
    One(CodeItem),
    Many(Vec<CodeItem>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum CodeItem {
    Number(u16),
    Pattern(String),
}

/// A reply code pattern: each digit fixed or any ("5xx").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CodePattern([Option<u8>; 3]);

impl CodePattern {
    fn parse(item: &CodeItem) -> Result<CodePattern, String> {
        let text = match item {
            CodeItem::Number(n) => n.to_string(),
            CodeItem::Pattern(p) => p.to_ascii_lowercase(),
        };
        let bytes = text.as_bytes();
        if bytes.len() != 3 || !matches!(bytes[0], b'2'..=b'5') {
            return Err(format!(
                "code `{text}` is not a reply code like 550 or \"5xx\""
            ));
        }
        let mut digits = [None; 3];
        for (d, &b) in digits.iter_mut().zip(bytes) {
            *d = match b {
                b'0'..=b'9' => Some(b - b'0'),
                b'x' => None,
                _ => return Err(format!("code `{text}`: digits or x only")),
            };
        }
        Ok(CodePattern(digits))
    }

    fn matches(self, code: u16) -> bool {
        let digits = [
            (code / 100 % 10) as u8,
            (code / 10 % 10) as u8,
            (code % 10) as u8,
        ];
        code < 1000
            && self
                .0
                .iter()
                .zip(digits)
                .all(|(want, got)| want.is_none_or(|w| w == got))
    }
}

/// A compiled rule; its regexes are `patterns` in the classifier's set.
#[derive(Debug)]
struct Rule {
    category: Category,
    /// Empty: any code.
    codes: Vec<CodePattern>,
    /// Exact, or a prefix when `enhanced_prefix`.
    enhanced: Option<String>,
    enhanced_prefix: bool,
    /// This rule's regexes, as indices into the set (empty: no text condition).
    patterns: std::ops::Range<usize>,
}

impl Rule {
    fn matches_status(&self, code: u16, enhanced: &str) -> bool {
        let code_ok = self.codes.is_empty() || self.codes.iter().any(|p| p.matches(code));
        let enhanced_ok = match &self.enhanced {
            None => true,
            Some(want) if self.enhanced_prefix => enhanced.starts_with(want.as_str()),
            Some(want) => enhanced == want,
        };
        code_ok && enhanced_ok
    }
}

/// The compiled rules. Built once at start; shared read-only by every shard.
#[derive(Debug)]
pub struct Classifier {
    rules: Vec<Rule>,
    set: RegexSet,
}

impl Classifier {
    /// The built-in rules only.
    pub fn defaults() -> Result<Classifier, RulesError> {
        Classifier::new(&[])
    }

    /// `files` (origin for errors, TOML text) in order, then the built-in rules unless a file
    /// says `defaults = false`.
    pub fn new(files: &[(String, String)]) -> Result<Classifier, RulesError> {
        let mut parsed = Vec::with_capacity(files.len() + 1);
        let mut defaults = true;
        for (origin, text) in files {
            let file: RulesFile = toml::from_str(text).map_err(|e| RulesError::Parse {
                origin: origin.clone(),
                reason: e.to_string(),
            })?;
            defaults &= file.defaults;
            parsed.push((origin.clone(), file));
        }
        if defaults {
            let origin = "built-in rules".to_owned();
            let file: RulesFile = toml::from_str(DEFAULT_RULES).map_err(|e| RulesError::Parse {
                origin: origin.clone(),
                reason: e.to_string(),
            })?;
            parsed.push((origin, file));
        }
        let count: usize = parsed.iter().map(|(_, f)| f.rule.len()).sum();
        if count > RULES_MAX {
            return Err(RulesError::TooMany { count });
        }
        let mut rules = Vec::with_capacity(count);
        let mut regexes: Vec<String> = Vec::new();
        for (origin, file) in parsed {
            for (index, entry) in file.rule.into_iter().enumerate() {
                let fail = |reason: String| RulesError::Rule {
                    origin: origin.clone(),
                    index,
                    reason,
                };
                let category = Category::parse(&entry.category)
                    .ok_or_else(|| fail(format!("unknown category `{}`", entry.category)))?;
                let codes = match &entry.code {
                    None => Vec::new(),
                    Some(CodeSpec::One(item)) => vec![CodePattern::parse(item).map_err(fail)?],
                    Some(CodeSpec::Many(items)) => items
                        .iter()
                        .map(CodePattern::parse)
                        .collect::<Result<_, _>>()
                        .map_err(fail)?,
                };
                if entry.code.is_none() && entry.enhanced.is_none() && entry.text.is_empty() {
                    return Err(fail("a rule needs code, enhanced or text".into()));
                }
                let start = regexes.len();
                for re in &entry.text {
                    // Checked one by one so the error names the rule, not the whole set.
                    regex::RegexBuilder::new(re)
                        .case_insensitive(true)
                        .size_limit(REGEX_SIZE_MAX)
                        .build()
                        .map_err(|e| fail(format!("text regex `{re}`: {e}")))?;
                    regexes.push(re.clone());
                }
                let enhanced_prefix = entry.enhanced.as_deref().is_some_and(|e| e.ends_with('.'));
                rules.push(Rule {
                    category,
                    codes,
                    enhanced: entry.enhanced,
                    enhanced_prefix,
                    patterns: start..regexes.len(),
                });
            }
        }
        let set = RegexSetBuilder::new(&regexes)
            .case_insensitive(true)
            .size_limit(REGEX_SIZE_MAX)
            .build()
            .map_err(|e| RulesError::Set(e.to_string()))?;
        Ok(Classifier { rules, set })
    }

    /// Rules in the set, the built-in ones included.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The category of a failed attempt's reply: the first rule that matches, else the
    /// enhanced code's class, else Uncategorized. No I/O; the text is scanned once.
    pub fn classify(&self, code: u16, enhanced: &str, text: &str) -> Category {
        // Only scan when some rule with a text condition could still match.
        let matched = (!text.is_empty() && !self.set.is_empty()).then(|| self.set.matches(text));
        for rule in &self.rules {
            if !rule.matches_status(code, enhanced) {
                continue;
            }
            let text_ok = rule.patterns.is_empty()
                || matched
                    .as_ref()
                    .is_some_and(|m| rule.patterns.clone().any(|i| m.matched(i)));
            if text_ok {
                return rule.category;
            }
        }
        fallback::by_enhanced(enhanced).unwrap_or(Category::Uncategorized)
    }
}

#[cfg(test)]
mod tests;
