//! The MTA-STS policy cache of one shard (RFC 8461 §5.1), and the file that keeps a policy
//! across a restart. What to do next is decided here with the time passed in; the adapter
//! ([`super::lookup`]) does the DNS, HTTPS and file I/O.
//!
//! Invariants: an entry belongs to one policy domain; a policy is used until `fetched_ms +
//! max_age`, even when a refresh fails (that is what protects against an attacker who blocks
//! the fetch); a changed TXT id triggers a fetch, never a silent reuse.

use std::collections::HashMap;
use std::sync::Arc;

use super::sts::Policy;

/// Policy domains remembered per shard: one entry is a few hundred bytes; beyond this the
/// expired entries go first, then the oldest.
pub const ENTRIES_MAX: usize = 100_000;

/// First line of a policy file: what it is and its format version.
const FILE_MAGIC: &str = "epoxi-mta-sts 1";

/// A fetched policy, with the TXT id it was fetched under and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cached {
    pub id: String,
    pub policy: Policy,
    pub fetched_ms: u64,
}

impl Cached {
    pub fn expires_ms(&self) -> u64 {
        self.fetched_ms
            .saturating_add(self.policy.max_age_s.saturating_mul(1000))
    }

    pub fn fresh(&self, now_ms: u64) -> bool {
        now_ms < self.expires_ms()
    }

    /// The file form: magic, id, fetch time, then the policy in its own syntax.
    pub fn to_file(&self) -> String {
        format!(
            "{FILE_MAGIC}\nid: {}\nfetched_ms: {}\n{}",
            self.id,
            self.fetched_ms,
            self.policy.to_text()
        )
    }

    /// Read [`Cached::to_file`]'s text back; None if it is not such a file.
    pub fn from_file(text: &str) -> Option<Cached> {
        let mut lines = text.splitn(4, '\n');
        if lines.next()? != FILE_MAGIC {
            return None;
        }
        let id = lines.next()?.strip_prefix("id: ")?.to_owned();
        let fetched_ms = lines.next()?.strip_prefix("fetched_ms: ")?.parse().ok()?;
        let policy = Policy::parse(lines.next()?.as_bytes()).ok()?;
        Some(Cached {
            id,
            policy,
            fetched_ms,
        })
    }
}

/// What the `_mta-sts` TXT lookup said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Txt {
    /// One valid record with this id.
    Id(String),
    /// No record (NXDOMAIN, NODATA, or no `v=STSv1` record).
    Absent,
    /// A record that does not parse, or several.
    Invalid(String),
    /// The lookup failed for now.
    Failed(String),
}

/// What to do for a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Apply this policy (fresh, and the TXT record agrees or could not be read).
    Use(Arc<Cached>),
    /// Fetch the policy for this id; `fallback` is what to apply if the fetch fails.
    Fetch {
        id: String,
        fallback: Option<Arc<Cached>>,
    },
    /// The domain has no policy we know of.
    None,
}

/// Policies by domain (lower case, A-labels).
#[derive(Default)]
pub struct Store {
    entries: HashMap<String, Arc<Cached>>,
}

impl Store {
    pub fn new() -> Store {
        Store::default()
    }

    pub fn get(&self, domain: &str) -> Option<&Arc<Cached>> {
        self.entries.get(domain)
    }

    /// RFC 8461 §5.1 and §3.3: with a fresh policy and the same id (or no usable TXT answer),
    /// use it; a new id fetches, falling back to the fresh policy; no record and no policy
    /// means no policy.
    pub fn decide(&self, domain: &str, txt: &Txt, now_ms: u64) -> Step {
        let fresh = self
            .entries
            .get(domain)
            .filter(|c| c.fresh(now_ms))
            .cloned();
        match (txt, fresh) {
            (Txt::Id(id), Some(c)) if *id == c.id => Step::Use(c),
            (Txt::Id(id), fallback) => Step::Fetch {
                id: id.clone(),
                fallback,
            },
            (Txt::Absent | Txt::Invalid(_) | Txt::Failed(_), Some(c)) => Step::Use(c),
            (Txt::Absent | Txt::Invalid(_) | Txt::Failed(_), None) => Step::None,
        }
    }

    /// Keep `cached` for `domain`, replacing what was there.
    pub fn put(&mut self, domain: &str, cached: Arc<Cached>, now_ms: u64) {
        if self.entries.len() >= ENTRIES_MAX && !self.entries.contains_key(domain) {
            self.entries.retain(|_, c| c.fresh(now_ms));
            while self.entries.len() >= ENTRIES_MAX {
                let Some(oldest) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, c)| c.expires_ms())
                    .map(|(d, _)| d.clone())
                else {
                    break;
                };
                self.entries.remove(&oldest);
            }
        }
        self.entries.insert(domain.to_owned(), cached);
    }
}

/// The file name for `domain`'s policy, or None for a name that should not become a path
/// (only letters, digits, `-`, `_` and inner dots).
pub fn file_name(domain: &str) -> Option<String> {
    let ok = !domain.is_empty()
        && domain.len() <= 253
        && !domain.starts_with('.')
        && !domain.contains("..")
        && domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    ok.then(|| format!("{domain}.policy"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tlspolicy::sts::Mode;

    fn cached(id: &str, fetched_ms: u64, max_age_s: u64) -> Arc<Cached> {
        Arc::new(Cached {
            id: id.into(),
            policy: Policy {
                mode: Mode::Enforce,
                mx: vec!["mx.a.test".into()],
                max_age_s,
            },
            fetched_ms,
        })
    }

    #[test]
    fn decisions_follow_rfc_8461() {
        let mut s = Store::new();
        let id = |v: &str| Txt::Id(v.into());
        assert_eq!(
            s.decide("a.test", &id("1"), 0),
            Step::Fetch {
                id: "1".into(),
                fallback: None
            }
        );
        assert_eq!(s.decide("a.test", &Txt::Absent, 0), Step::None);
        let c = cached("1", 1_000, 60);
        s.put("a.test", c.clone(), 1_000);
        assert_eq!(s.decide("a.test", &id("1"), 2_000), Step::Use(c.clone()));
        // A DNS failure, a vanished or broken record: the fresh policy stays in force.
        for txt in [
            Txt::Absent,
            Txt::Failed("SERVFAIL".into()),
            Txt::Invalid("x".into()),
        ] {
            assert_eq!(s.decide("a.test", &txt, 2_000), Step::Use(c.clone()));
        }
        // A new id refreshes, keeping the old policy if the fetch fails.
        assert_eq!(
            s.decide("a.test", &id("2"), 2_000),
            Step::Fetch {
                id: "2".into(),
                fallback: Some(c.clone())
            }
        );
        // Expired: fetched again even with the same id; gone without a record.
        assert_eq!(
            s.decide("a.test", &id("1"), 61_000),
            Step::Fetch {
                id: "1".into(),
                fallback: None
            }
        );
        assert_eq!(s.decide("a.test", &Txt::Absent, 61_000), Step::None);
        // Per domain: another domain never sees a.test's policy.
        assert_eq!(s.decide("b.test", &Txt::Absent, 2_000), Step::None);
    }

    #[test]
    fn files_round_trip_and_names_are_safe() {
        let c = cached("abc1", 1_700_000_000_000, 86_400);
        let text = c.to_file();
        assert_eq!(Cached::from_file(&text).as_ref(), Some(c.as_ref()));
        assert_eq!(Cached::from_file("garbage"), None);
        assert_eq!(Cached::from_file(&text.replace("STSv1", "STSv2")), None);
        assert_eq!(file_name("a.test").as_deref(), Some("a.test.policy"));
        assert_eq!(file_name("../etc"), None);
        assert_eq!(file_name("a/b"), None);
        assert_eq!(file_name("A.test"), None);
        assert_eq!(file_name(""), None);
    }

    #[test]
    fn the_store_is_bounded() {
        let mut s = Store::new();
        for i in 0..ENTRIES_MAX + 5 {
            s.put(&format!("d{i}.test"), cached("1", i as u64, 1), 0);
        }
        assert!(s.entries.len() <= ENTRIES_MAX);
        assert!(s.get(&format!("d{}.test", ENTRIES_MAX + 4)).is_some());
    }
}
