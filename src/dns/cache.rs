//! A shard's DNS cache: answers kept for their TTL, clamped to `[ttl_min_s, ttl_max_s]`, and
//! negative answers (NXDOMAIN, NODATA) for their negative TTL. Transient failures are not
//! cached. Bounded: past `entries_max` the entries closest to expiry go first. Time is passed in.

use std::collections::HashMap;

use hickory_proto::rr::RecordType;

use super::message::Answer;

pub struct Cache {
    ttl_min_s: u32,
    ttl_max_s: u32,
    entries_max: usize,
    /// (answer, DNSSEC-secure per the resolver's AD bit, expiry).
    entries: HashMap<(String, RecordType), (Answer, bool, u64)>,
}

impl Cache {
    pub fn new(ttl_min_s: u32, ttl_max_s: u32, entries_max: usize) -> Cache {
        Cache {
            ttl_min_s,
            ttl_max_s: ttl_max_s.max(ttl_min_s),
            entries_max: entries_max.max(1),
            entries: HashMap::new(),
        }
    }

    pub fn get(&self, name: &str, rtype: RecordType, now_ms: u64) -> Option<&Answer> {
        self.get_until(name, rtype, now_ms)
            .map(|(answer, _)| answer)
    }

    /// The cached answer and when it expires (Unix ms).
    pub fn get_until(&self, name: &str, rtype: RecordType, now_ms: u64) -> Option<(&Answer, u64)> {
        let (answer, _, expires_ms) = self.entries.get(&(name.to_ascii_lowercase(), rtype))?;
        (now_ms < *expires_ms).then_some((answer, *expires_ms))
    }

    /// The answer and whether it was DNSSEC-secure (AD) when it was cached.
    pub fn get_secure(
        &self,
        name: &str,
        rtype: RecordType,
        now_ms: u64,
    ) -> Option<(&Answer, bool)> {
        let (answer, ad, expires_ms) = self.entries.get(&(name.to_ascii_lowercase(), rtype))?;
        (now_ms < *expires_ms).then_some((answer, *ad))
    }

    pub fn put(&mut self, name: &str, rtype: RecordType, answer: Answer, now_ms: u64) {
        self.put_secure(name, rtype, answer, false, now_ms)
    }

    /// Cache `answer`, remembering whether it was DNSSEC-secure.
    pub fn put_secure(
        &mut self,
        name: &str,
        rtype: RecordType,
        answer: Answer,
        ad: bool,
        now_ms: u64,
    ) {
        let ttl = match &answer {
            Answer::Mx(_, ttl)
            | Answer::Addrs(_, ttl)
            | Answer::Txt(_, ttl)
            | Answer::Tlsa(_, ttl)
            | Answer::NxDomain(ttl)
            | Answer::NoData(ttl) => *ttl,
            Answer::Transient(_) | Answer::Truncated => return,
        };
        let ttl = ttl.clamp(self.ttl_min_s, self.ttl_max_s);
        if self.entries.len() >= self.entries_max {
            self.entries.retain(|_, (_, _, expires)| *expires > now_ms);
            while self.entries.len() >= self.entries_max {
                let Some(oldest) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, _, e))| *e)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                self.entries.remove(&oldest);
            }
        }
        let expires = now_ms.saturating_add(u64::from(ttl) * 1000);
        self.entries
            .insert((name.to_ascii_lowercase(), rtype), (answer, ad, expires));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_are_clamped_and_negatives_cached() {
        let mut c = Cache::new(30, 3600, 100);
        c.put(
            "Example.TEST",
            RecordType::MX,
            Answer::Mx(vec![(10, "mx.test".into())], 5),
            0,
        );
        assert!(
            c.get("example.test", RecordType::MX, 29_999).is_some(),
            "5 s raised to 30 s"
        );
        assert!(c.get("example.test", RecordType::MX, 30_000).is_none());
        c.put("big.test", RecordType::MX, Answer::Mx(vec![], 86_400), 0);
        assert!(
            c.get("big.test", RecordType::MX, 3_600_000).is_none(),
            "a day capped to an hour"
        );
        c.put("gone.test", RecordType::MX, Answer::NxDomain(120), 0);
        assert_eq!(
            c.get("gone.test", RecordType::MX, 60_000),
            Some(&Answer::NxDomain(120))
        );
        c.put(
            "flaky.test",
            RecordType::MX,
            Answer::Transient("SERVFAIL".into()),
            0,
        );
        assert!(
            c.get("flaky.test", RecordType::MX, 1).is_none(),
            "failures are not cached"
        );
        assert!(
            c.get("gone.test", RecordType::A, 1).is_none(),
            "per record type"
        );
    }

    #[test]
    fn size_is_bounded() {
        let mut c = Cache::new(1, 3600, 3);
        for i in 0..10u32 {
            c.put(
                &format!("d{i}.test"),
                RecordType::MX,
                Answer::NoData(100 + i),
                0,
            );
        }
        assert_eq!(c.len(), 3);
        assert!(
            c.get("d9.test", RecordType::MX, 0).is_some(),
            "the longest-lived stay"
        );
    }
}
