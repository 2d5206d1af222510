//! From an MX answer to the hosts to try, in order (RFC 5321 §5.1, RFC 7505).

use super::message::Answer;

/// Where to deliver a domain's mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// MX hosts and their preferences, most preferred first (A/AAAA lookups follow). Ties
    /// are shuffled per connection by [`order`].
    Hosts(Vec<(u16, String)>),
    /// The domain does not accept mail (null MX, or NXDOMAIN): bounce.
    Refuse(&'static str),
    /// Resolution failed for now: retry later.
    Retry(String),
}

/// The plan for `domain` from its MX answer.
pub fn plan(domain: &str, answer: &Answer) -> Plan {
    match answer {
        Answer::Mx(records, _) => {
            // RFC 7505: a single MX of preference 0 and host "." means "no mail here".
            if records
                .iter()
                .any(|(_, host)| host.is_empty() || host == ".")
            {
                return Plan::Refuse("the domain does not accept mail (null MX)");
            }
            let mut records = records.clone();
            records.sort();
            // A host listed twice keeps its best preference.
            let mut hosts: Vec<(u16, String)> = Vec::with_capacity(records.len());
            for (pref, host) in records {
                if !hosts.iter().any(|(_, h)| *h == host) {
                    hosts.push((pref, host));
                }
            }
            Plan::Hosts(hosts)
        }
        // RFC 5321 §5.1: no MX records: the domain itself is the mail host (implicit MX).
        Answer::NoData(_) => Plan::Hosts(vec![(0, domain.trim_end_matches('.').to_owned())]),
        Answer::NxDomain(_) => Plan::Refuse("the domain does not exist (NXDOMAIN)"),
        Answer::Transient(why) => Plan::Retry(why.clone()),
        Answer::Truncated => Plan::Retry("truncated answer".into()),
        Answer::Addrs(..) | Answer::Txt(..) | Answer::Tlsa(..) => {
            Plan::Retry("unexpected answer to an MX query".into())
        }
    }
}

/// The hosts in the order to try them: by preference, equal preferences in a `seed`-dependent
/// order (RFC 5321 §5.1: spread load among them). Callers pass a random seed per connection,
/// tests a fixed one.
pub fn order(hosts: &[(u16, String)], seed: u64) -> Vec<&str> {
    let mut ordered: Vec<&(u16, String)> = hosts.iter().collect();
    ordered.sort_by_key(|(pref, host)| (*pref, mix(seed, host)));
    ordered.into_iter().map(|(_, h)| h.as_str()).collect()
}

/// A cheap, seed-dependent order key for equal-preference hosts (FNV-1a of seed and host).
fn mix(seed: u64, host: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in host.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mx(records: &[(u16, &str)]) -> Answer {
        Answer::Mx(
            records.iter().map(|(p, h)| (*p, (*h).to_owned())).collect(),
            300,
        )
    }

    #[test]
    fn preference_order_and_shuffled_ties() {
        let a = mx(&[
            (20, "c.test"),
            (10, "a.test"),
            (10, "b.test"),
            (30, "d.test"),
        ]);
        let Plan::Hosts(planned) = plan("x.test", &a) else {
            panic!()
        };
        let mut seen_first = std::collections::BTreeSet::new();
        for seed in 0..64 {
            let hosts = order(&planned, seed);
            assert_eq!(hosts.len(), 4);
            assert!(hosts[..2].contains(&"a.test") && hosts[..2].contains(&"b.test"));
            assert_eq!(&hosts[2..], ["c.test", "d.test"]);
            seen_first.insert(hosts[0]);
        }
        assert_eq!(seen_first.len(), 2, "equal preferences are shuffled");
    }

    #[test]
    fn null_mx_implicit_mx_nxdomain_and_servfail() {
        assert!(matches!(plan("x.test", &mx(&[(0, "")])), Plan::Refuse(_)));
        assert_eq!(
            plan("x.test.", &Answer::NoData(60)),
            Plan::Hosts(vec![(0, "x.test".into())])
        );
        assert!(matches!(
            plan("x.test", &Answer::NxDomain(60)),
            Plan::Refuse(_)
        ));
        assert!(matches!(
            plan("x.test", &Answer::Transient("SERVFAIL".into())),
            Plan::Retry(_)
        ));
        assert_eq!(
            plan("x.test", &mx(&[(20, "a.test"), (10, "a.test")])),
            Plan::Hosts(vec![(10, "a.test".into())])
        );
    }
}
