//! When to try a failed batch again, and when to say so: exponential backoff with jitter,
//! and warnings limited to one per [`WARN_INTERVAL_MS`] while a receiver keeps failing.
//! Both run on a clock passed in (Unix ms), with a seed for the jitter: no I/O, no wall clock.

/// While failures go on, one warning per this long (with the count since the last), not one
/// per retry: an outage of hours is a few hundred lines, not tens of thousands.
pub const WARN_INTERVAL_MS: u64 = 30_000;

/// Exponential backoff: the n-th failure in a row waits `base * 2^(n-1)`, capped at `max`,
/// then jittered into its upper half so webhooks that failed together spread out.
#[derive(Clone, Debug)]
pub struct Backoff {
    base_ms: u64,
    max_ms: u64,
    failures: u32,
    rng: u64,
}

impl Backoff {
    pub fn new(base_ms: u64, max_ms: u64, seed: u64) -> Backoff {
        Backoff {
            base_ms: base_ms.max(1),
            max_ms: max_ms.max(base_ms),
            failures: 0,
            // xorshift must not start at zero.
            rng: seed | 1,
        }
    }

    /// One more failure: how long to wait before the next try.
    pub fn failed(&mut self) -> u64 {
        let doublings = self.failures.min(40);
        self.failures = self.failures.saturating_add(1);
        let delay = self
            .base_ms
            .saturating_mul(1u64 << doublings)
            .min(self.max_ms);
        let half = delay / 2;
        delay - half + self.next_rand() % (half + 1)
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A success: the next failure waits `base` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    fn next_rand(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
}

/// A run of failures, for the log: when it began and what has been said about it.
#[derive(Clone, Debug, Default)]
pub struct Failing {
    since_ms: Option<u64>,
    last_warn_ms: u64,
    /// Failures since the last warning.
    unreported: u64,
    total: u64,
}

/// A warning to log now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Warn {
    /// When the run of failures began.
    pub since_ms: u64,
    /// Failures in the run so far, this one included.
    pub failures: u64,
    /// Failures not logged before this one (0 for the first).
    pub quiet: u64,
}

impl Failing {
    /// A failure at `now_ms`: a warning when one is due.
    pub fn failed(&mut self, now_ms: u64) -> Option<Warn> {
        self.total += 1;
        let since_ms = *self.since_ms.get_or_insert(now_ms);
        if self.total > 1 && now_ms.saturating_sub(self.last_warn_ms) < WARN_INTERVAL_MS {
            self.unreported += 1;
            return None;
        }
        self.last_warn_ms = now_ms;
        let quiet = std::mem::take(&mut self.unreported);
        Some(Warn {
            since_ms,
            failures: self.total,
            quiet,
        })
    }

    /// A success: when a run of failures ends, its start and length.
    pub fn recovered(&mut self) -> Option<(u64, u64)> {
        let since = self.since_ms.take()?;
        let total = std::mem::take(&mut self.total);
        self.unreported = 0;
        Some((since, total))
    }

    pub fn since_ms(&self) -> Option<u64> {
        self.since_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_to_the_cap_with_jitter_in_the_upper_half() {
        let mut b = Backoff::new(100, 1_000, 7);
        let bounds = [100, 200, 400, 800, 1_000, 1_000, 1_000];
        for max in bounds {
            let d = b.failed();
            assert!(d >= max / 2 && d <= max, "{d} not in [{}, {max}]", max / 2);
        }
        for _ in 0..100 {
            assert!(b.failed() <= 1_000, "never past the cap");
        }
        b.reset();
        let d = b.failed();
        assert!((50..=100).contains(&d), "base again after a success: {d}");
        // The same seed, the same schedule (a failing case replays).
        let run = |seed| {
            let mut b = Backoff::new(10, 10_000, seed);
            (0..20).map(|_| b.failed()).collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn huge_failure_counts_do_not_overflow() {
        let mut b = Backoff::new(u64::MAX / 4, u64::MAX / 2, 1);
        for _ in 0..100 {
            assert!(b.failed() <= u64::MAX / 2);
        }
    }

    #[test]
    fn warnings_are_one_per_interval_with_the_quiet_count() {
        let mut f = Failing::default();
        let first = f.failed(1_000).expect("the first failure is logged");
        assert_eq!((first.since_ms, first.failures, first.quiet), (1_000, 1, 0));
        // Retries every second for a while: quiet until the interval passes.
        let mut said = Vec::new();
        for s in 2..=70u64 {
            if let Some(w) = f.failed(s * 1_000) {
                said.push(w);
            }
        }
        assert_eq!(said.len(), 2, "{said:?}");
        assert_eq!(said[0].quiet, 29);
        assert_eq!(said[0].since_ms, 1_000);
        assert_eq!(said[1].failures, 61);
        assert_eq!(f.since_ms(), Some(1_000));
        assert_eq!(f.recovered(), Some((1_000, 70)));
        assert_eq!(f.recovered(), None, "said once");
        // A new run starts fresh, and is logged at once.
        assert_eq!(f.failed(100_000).map(|w| w.failures), Some(1));
    }
}
