//! Rates: `N/period` limits and the generic cell rate algorithm (GCRA) that holds them.
//!
//! A [`Rate`] of N per period lets cells (messages, connections) through one every
//! period / N on average, and at most `burst` at once after a quiet spell; over any window of
//! the period at most N + burst - 1 pass. [`Gcra`] keeps one theoretical arrival time per key
//! (16 bytes) and answers how many of a batch may go now and when the next may: the owner of a
//! key grants batches of credits with it, so a rate shared by shards costs one mesh message per
//! batch, not per message.
//!
//! No I/O; time comes in as a parameter.

use std::fmt;

/// The longest period a rate may have: a day (warmup caps count calendar windows of their
/// own, see `warmup`).
pub const PERIOD_MS_MAX: u64 = 86_400_000;
/// The most cells per period: beyond it the interval would round to nothing.
pub const COUNT_MAX: u32 = 100_000_000;

/// N cells per period, at most `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: u32,
    pub per_ms: u64,
    pub burst: u32,
}

impl Rate {
    /// `N/s`, `N/sec`, `N/m`, `N/min`, `N/h`, `N/hour`, `N/d`, `N/day`, or `N/30s`
    /// (`N/<k><unit>`), then optionally `burst B`; without one, a burst of N/10 (at least 1).
    pub fn parse(text: &str) -> Result<Rate, String> {
        if let Some((rate, burst)) = text.split_once("burst") {
            let b: u32 = burst
                .trim()
                .parse()
                .ok()
                .filter(|&b| b >= 1)
                .ok_or_else(|| format!("`{text}`: the burst must be a number from 1"))?;
            let r = Rate::parse(rate)?;
            if b > r.count {
                return Err(format!("`{text}`: the burst is more than the count"));
            }
            return Ok(r.with_burst(b));
        }
        let bad =
            || format!("`{text}` is not a rate like `100/s`, `20/min`, `5000/h` or `50000/day`");
        let (n, per) = text.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().replace('_', "").parse().map_err(|_| bad())?;
        let per = per.trim().to_ascii_lowercase();
        let digits = per.chars().take_while(char::is_ascii_digit).count();
        let k: u64 = match digits {
            0 => 1,
            _ => per[..digits].parse().map_err(|_| bad())?,
        };
        let unit_ms = match per[digits..].trim() {
            "ms" => 1,
            "s" | "sec" | "second" => 1_000,
            "m" | "min" | "minute" => 60_000,
            "h" | "hr" | "hour" => 3_600_000,
            "d" | "day" => 86_400_000,
            _ => return Err(bad()),
        };
        let per_ms = k.saturating_mul(unit_ms);
        if count == 0 || count > COUNT_MAX {
            return Err(format!("`{text}`: the count must be 1 to {COUNT_MAX}"));
        }
        if per_ms == 0 || per_ms > PERIOD_MS_MAX {
            return Err(format!("`{text}`: the period must be 1 ms to a day"));
        }
        Ok(Rate {
            count,
            per_ms,
            burst: (count / 10).max(1),
        })
    }

    pub fn with_burst(self, burst: u32) -> Rate {
        Rate {
            burst: burst.clamp(1, self.count),
            ..self
        }
    }

    /// This rate times `factor` (an adaptive rule halving it), at least one per period.
    pub fn scaled(self, factor: f64) -> Rate {
        let count = ((f64::from(self.count) * factor).round() as u32).clamp(1, COUNT_MAX);
        Rate {
            count,
            per_ms: self.per_ms,
            burst: ((f64::from(self.burst) * factor).round() as u32).clamp(1, count),
        }
    }

    /// Microseconds between two cells.
    pub fn interval_us(&self) -> u64 {
        (self.per_ms.saturating_mul(1000) / u64::from(self.count)).max(1)
    }

    /// Cells per second (for summaries).
    pub fn per_second(&self) -> f64 {
        f64::from(self.count) * 1000.0 / self.per_ms as f64
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per_ms {
            1_000 => "s".to_owned(),
            60_000 => "min".to_owned(),
            3_600_000 => "h".to_owned(),
            86_400_000 => "day".to_owned(),
            ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
            ms => format!("{ms}ms"),
        };
        write!(f, "{}/{unit}", self.count)?;
        if self.burst != (self.count / 10).max(1) {
            write!(f, " burst {}", self.burst)?;
        }
        Ok(())
    }
}

/// What a rate allows of a batch now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allowance {
    /// Cells that may go now (0 to the batch asked for).
    pub granted: u32,
    /// When the next cell may go, if not all of the batch could.
    pub retry_at_ms: Option<u64>,
}

/// One key's GCRA state: its theoretical arrival time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gcra {
    tat_us: u64,
}

impl Gcra {
    /// Take up to `want` cells at `now_ms` under `rate`. No allocation.
    pub fn take(&mut self, rate: &Rate, want: u32, now_ms: u64) -> Allowance {
        let now = now_ms.saturating_mul(1000);
        let t = rate.interval_us();
        let tau = t.saturating_mul(u64::from(rate.burst.max(1) - 1));
        let tat = self.tat_us.max(now);
        // A cell may go while the arrival time it would push is within the tolerance.
        let room = match (now + tau).checked_sub(tat) {
            Some(slack) => slack / t + 1,
            None => 0,
        };
        let granted = u64::from(want).min(room) as u32;
        self.tat_us = tat + t * u64::from(granted);
        let retry_at_ms = (granted < want).then(|| {
            let next = self.tat_us.saturating_sub(tau);
            next.div_ceil(1000).max(now_ms + 1)
        });
        Allowance {
            granted,
            retry_at_ms,
        }
    }

    /// When a cell may next go (now or later).
    pub fn next_ms(&self, rate: &Rate, now_ms: u64) -> u64 {
        let tau = rate.interval_us() * u64::from(rate.burst.max(1) - 1);
        self.tat_us.saturating_sub(tau).div_ceil(1000).max(now_ms)
    }

    /// Give back `n` cells taken but not used (credits that expired unspent).
    pub fn refund(&mut self, rate: &Rate, n: u32, now_ms: u64) {
        let back = rate.interval_us().saturating_mul(u64::from(n));
        self.tat_us = self.tat_us.saturating_sub(back).max(now_ms * 1000);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_units_and_bursts() {
        let r = Rate::parse("100/s").expect("rate");
        assert_eq!((r.count, r.per_ms, r.burst), (100, 1000, 10));
        assert_eq!(Rate::parse("20/min").expect("rate").per_ms, 60_000);
        assert_eq!(Rate::parse("5_000/h").expect("rate").count, 5000);
        assert_eq!(Rate::parse(" 3 / 10s ").expect("rate").per_ms, 10_000);
        assert_eq!(Rate::parse("50000/day").expect("rate").per_ms, 86_400_000);
        assert_eq!(Rate::parse("5/s").expect("rate").burst, 1);
        let r = Rate::parse("100/s burst 3").expect("rate");
        assert_eq!((r.count, r.burst), (100, 3));
        assert_eq!(Rate::parse(&r.to_string()), Ok(r));
        assert!(Rate::parse("10/s burst 0").is_err());
        assert!(Rate::parse("10/s burst 11").is_err());
        for bad in [
            "",
            "10",
            "x/s",
            "10/fortnight",
            "0/s",
            "10/0s",
            "10/2day",
            "-1/s",
        ] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Rate::parse("100/s").expect("rate").to_string(), "100/s");
        assert_eq!(
            Rate::parse("100/s")
                .expect("rate")
                .with_burst(1)
                .to_string(),
            "100/s burst 1"
        );
        let half = Rate::parse("100/s").expect("rate").scaled(0.5);
        assert_eq!((half.count, half.burst), (50, 5));
        assert_eq!(Rate::parse("1/h").expect("rate").scaled(0.1).count, 1);
    }

    /// Over a simulated minute of greedy takers, every window of a second holds at most
    /// count + burst - 1 cells, and the long-run rate is the configured one.
    #[test]
    fn gcra_holds_the_rate_in_every_window() {
        for (text, burst) in [("10/s", 1), ("100/s", 10), ("7/s", 7), ("600/min", 5)] {
            let rate = Rate::parse(text).expect("rate").with_burst(burst);
            let mut g = Gcra::default();
            let mut sent: Vec<u64> = Vec::new();
            let mut now = 5_000;
            while now < 65_000 {
                let a = g.take(&rate, 64, now);
                sent.extend(std::iter::repeat_n(now, a.granted as usize));
                now = a.retry_at_ms.unwrap_or(now + 1).max(now + 1);
            }
            let window = rate.per_ms;
            let most = sent
                .iter()
                .map(|&t| sent.iter().filter(|&&u| u >= t && u < t + window).count())
                .max()
                .unwrap_or(0);
            assert!(
                (most as u32) < rate.count + rate.burst,
                "{text}: {most} in one window"
            );
            let expected = 60_000 * u64::from(rate.count) / rate.per_ms;
            let got = sent.len() as u64;
            assert!(
                got >= expected && got <= expected + u64::from(rate.burst),
                "{text}: {got} in a minute, expected {expected}"
            );
        }
    }

    #[test]
    fn gcra_grants_a_burst_then_paces_and_refunds() {
        let rate = Rate::parse("10/s").expect("rate").with_burst(5);
        let mut g = Gcra::default();
        let a = g.take(&rate, 8, 1000);
        assert_eq!(a.granted, 5);
        assert_eq!(a.retry_at_ms, Some(1100));
        assert_eq!(g.take(&rate, 1, 1050).granted, 0);
        assert_eq!(g.take(&rate, 3, 1100).granted, 1);
        g.refund(&rate, 6, 1100);
        assert_eq!(g.take(&rate, 10, 1100).granted, 5);
        assert_eq!(g.next_ms(&rate, 1100), 1200);
    }
}
