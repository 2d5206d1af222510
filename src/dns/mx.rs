//! From an MX answer to the hosts to try, in order (RFC 5321 §5.1, RFC 7505).

use super::message::Answer;

/// Where to deliver a domain's mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Hosts to try in this order within one attempt (A/AAAA lookups follow).
    Hosts(Vec<String>),
    /// The domain does not accept mail (null MX, or NXDOMAIN): bounce.
    Refuse(&'static str),
    /// Resolution failed for now: retry later.
    Retry(String),
}

/// The plan for `domain` from its MX answer. `shuffle_seed` orders equal preferences (RFC 5321
/// §5.1: spread load among them); callers pass a random value, tests a fixed one.
pub fn plan(domain: &str, answer: &Answer, shuffle_seed: u64) -> Plan {
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
            records.sort_by_key(|(pref, host)| (*pref, mix(shuffle_seed, host)));
            let mut hosts: Vec<String> = Vec::with_capacity(records.len());
            for (_, host) in records {
                if !hosts.contains(&host) {
                    hosts.push(host);
                }
            }
            Plan::Hosts(hosts)
        }
        // RFC 5321 §5.1: no MX records: the domain itself is the mail host (implicit MX).
        Answer::NoData(_) => Plan::Hosts(vec![domain.trim_end_matches('.').to_owned()]),
        Answer::NxDomain(_) => Plan::Refuse("the domain does not exist (NXDOMAIN)"),
        Answer::Transient(why) => Plan::Retry(why.clone()),
        Answer::Truncated => Plan::Retry("truncated answer".into()),
        Answer::Addrs(..) => Plan::Retry("unexpected address answer to an MX query".into()),
    }
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
        let mut seen_first = std::collections::BTreeSet::new();
        for seed in 0..64 {
            let Plan::Hosts(hosts) = plan("x.test", &a, seed) else {
                panic!()
            };
            assert_eq!(hosts.len(), 4);
            assert!(
                hosts[..2].contains(&"a.test".to_owned())
                    && hosts[..2].contains(&"b.test".to_owned())
            );
            assert_eq!(&hosts[2..], ["c.test", "d.test"]);
            seen_first.insert(hosts[0].clone());
        }
        assert_eq!(seen_first.len(), 2, "equal preferences are shuffled");
    }

    #[test]
    fn null_mx_implicit_mx_nxdomain_and_servfail() {
        assert!(matches!(
            plan("x.test", &mx(&[(0, "")]), 1),
            Plan::Refuse(_)
        ));
        assert_eq!(
            plan("x.test.", &Answer::NoData(60), 1),
            Plan::Hosts(vec!["x.test".into()])
        );
        assert!(matches!(
            plan("x.test", &Answer::NxDomain(60), 1),
            Plan::Refuse(_)
        ));
        assert!(matches!(
            plan("x.test", &Answer::Transient("SERVFAIL".into()), 1),
            Plan::Retry(_)
        ));
        assert_eq!(
            plan("x.test", &mx(&[(10, "a.test"), (20, "a.test")]), 1),
            Plan::Hosts(vec!["a.test".into()])
        );
    }
}
