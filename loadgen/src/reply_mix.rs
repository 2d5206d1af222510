//! The sink's answer to the final dot: a weighted mix of reply codes, such as
//! `250:90,451:5,550:5`, picked per message.
//!
//! The pick is a hash of the message's arrival number, so a run is reproducible for a given
//! arrival order and no random state is shared between connections. Every reply line is
//! formatted once, at parse time, with its enhanced status code (RFC 3463).
//!
//! Invariants: every code is 2xx, 4xx or 5xx; the weights add up to more than zero.

use std::str::FromStr;

/// A mix is a handful of codes; a longer list is a typo, not a test plan.
pub const REPLY_MIX_ENTRIES_MAX: usize = 32;

/// One possible reply to the final dot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalReply {
    pub code: u16,
    /// The whole reply line, CRLF included.
    pub line: Box<[u8]>,
}

impl FinalReply {
    pub fn new(code: u16) -> Self {
        let line = format!("{code} {}\r\n", reply_text(code));
        Self {
            code,
            line: line.into_bytes().into_boxed_slice(),
        }
    }

    /// 421 tells the client the connection is closing (RFC 5321 3.8), so the sink closes it.
    pub fn closes_connection(&self) -> bool {
        self.code == 421
    }
}

/// Enhanced status code and text for the codes a test is likely to ask for; others get a
/// generic text in their class.
fn reply_text(code: u16) -> String {
    let known = match code {
        250 => "2.0.0 Ok: queued",
        251 => "2.1.5 Ok: will forward",
        421 => "4.3.2 Service shutting down",
        450 => "4.2.1 Mailbox busy, try again later",
        451 => "4.3.0 Try again later",
        452 => "4.3.1 Insufficient system storage",
        550 => "5.1.1 Mailbox unavailable",
        552 => "5.3.4 Message too big",
        553 => "5.1.3 Bad destination address syntax",
        554 => "5.6.0 Transaction failed",
        _ => "",
    };
    if known.is_empty() {
        format!("{}.0.0 Loadgen sink reply", code / 100)
    } else {
        known.to_owned()
    }
}

/// A weighted set of final replies.
#[derive(Debug, Clone)]
pub struct ReplyMix {
    entries: Vec<(FinalReply, u64)>,
    weight_total: u64,
}

impl ReplyMix {
    /// The reply for the message that arrived `arrival`-th. Hot path: no allocation.
    pub fn pick(&self, arrival: u64) -> &FinalReply {
        let mut point = splitmix64(arrival) % self.weight_total;
        for (reply, weight) in &self.entries {
            if point < *weight {
                return reply;
            }
            point -= weight;
        }
        // Unreachable while the weights add up to `weight_total`; answering with the last
        // entry keeps the function total without a panic.
        &self.entries[self.entries.len() - 1].0
    }
}

impl FromStr for ReplyMix {
    type Err = String;

    /// Parses `CODE[:WEIGHT],...`; a missing weight counts as 1.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        let mut weight_total = 0u64;
        for item in s.split(',').map(str::trim) {
            if entries.len() == REPLY_MIX_ENTRIES_MAX {
                return Err(format!("more than {REPLY_MIX_ENTRIES_MAX} entries"));
            }
            let (code, weight) = item.split_once(':').unwrap_or((item, "1"));
            let code: u16 = code
                .trim()
                .parse()
                .map_err(|_| format!("bad code {code:?} in {item:?}"))?;
            if !matches!(code, 200..=299 | 400..=599) {
                return Err(format!("code {code} is not 2xx, 4xx or 5xx"));
            }
            let weight: u32 = weight
                .trim()
                .parse()
                .map_err(|_| format!("bad weight {weight:?} in {item:?}"))?;
            weight_total += u64::from(weight);
            if weight > 0 {
                entries.push((FinalReply::new(code), u64::from(weight)));
            }
        }
        if weight_total == 0 {
            return Err("the weights add up to zero".to_owned());
        }
        Ok(Self {
            entries,
            weight_total,
        })
    }
}

/// Sebastiano Vigna's SplitMix64 finaliser: consecutive inputs give well-spread outputs.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mixes() {
        let mix: ReplyMix = "250:90, 451:5,550:5".parse().unwrap();
        assert_eq!(mix.weight_total, 100);
        assert_eq!(mix.entries.len(), 3);
        let plain: ReplyMix = "550".parse().unwrap();
        assert_eq!(plain.pick(7).code, 550);
        let zero_dropped: ReplyMix = "250:1,451:0".parse().unwrap();
        assert_eq!(zero_dropped.entries.len(), 1);
        for bad in ["", "250:x", "354:1", "99", "250:0", "250:-1", "2500", "abc"] {
            assert!(bad.parse::<ReplyMix>().is_err(), "{bad:?}");
        }
        let many = vec!["250"; REPLY_MIX_ENTRIES_MAX + 1].join(",");
        assert!(many.parse::<ReplyMix>().is_err());
    }

    #[test]
    fn picks_follow_the_weights() {
        let mix: ReplyMix = "250:90,451:5,550:5".parse().unwrap();
        let mut counts = std::collections::HashMap::new();
        for arrival in 0..100_000 {
            *counts.entry(mix.pick(arrival).code).or_insert(0u32) += 1;
        }
        assert!((89_000..91_000).contains(&counts[&250]), "{counts:?}");
        assert!((4_500..5_500).contains(&counts[&451]), "{counts:?}");
        assert!((4_500..5_500).contains(&counts[&550]), "{counts:?}");
        assert_eq!(mix.pick(42), mix.pick(42), "picks are deterministic");
    }

    #[test]
    fn replies_carry_enhanced_codes() {
        assert_eq!(&*FinalReply::new(250).line, b"250 2.0.0 Ok: queued\r\n");
        assert_eq!(
            &*FinalReply::new(451).line,
            b"451 4.3.0 Try again later\r\n"
        );
        assert_eq!(
            &*FinalReply::new(550).line,
            b"550 5.1.1 Mailbox unavailable\r\n"
        );
        assert_eq!(
            &*FinalReply::new(599).line,
            b"599 5.0.0 Loadgen sink reply\r\n"
        );
        assert!(FinalReply::new(421).closes_connection());
    }
}
