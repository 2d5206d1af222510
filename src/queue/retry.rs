//! Retry schedule: exponential backoff with a cap, bounded by the message's maximum age.

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    pub base_ms: u64,
    pub factor: f64,
    pub cap_ms: u64,
    pub max_age_ms: u64,
}

/// What to do after a transient failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// Try again at this Unix time (ms).
    At(u64),
    /// The message is older than the maximum age: give up.
    Expire,
}

impl Backoff {
    /// Delay before attempt `attempts + 1`, after `attempts` failures (attempts >= 1):
    /// `min(base * factor^(attempts-1), cap)`. No I/O, no allocation.
    pub fn delay_ms(&self, attempts: u32) -> u64 {
        let exp = attempts.saturating_sub(1).min(64) as i32;
        let delay = self.base_ms as f64 * self.factor.powi(exp);
        if !delay.is_finite() || delay >= self.cap_ms as f64 {
            self.cap_ms
        } else {
            delay as u64
        }
    }

    /// After the `attempts`-th failure at `now_ms` of a message received at `received_ms`.
    /// The last retry is moved up to the expiry time, so a message gets one attempt at its
    /// deadline instead of expiring early or lingering past it.
    pub fn after_failure(&self, attempts: u32, received_ms: u64, now_ms: u64) -> Retry {
        let deadline = received_ms.saturating_add(self.max_age_ms);
        if now_ms >= deadline {
            return Retry::Expire;
        }
        Retry::At(now_ms.saturating_add(self.delay_ms(attempts)).min(deadline))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff {
        base_ms: 1_000,
        factor: 2.0,
        cap_ms: 10_000,
        max_age_ms: 60_000,
    };

    #[test]
    fn grows_exponentially_then_caps() {
        let delays: Vec<u64> = (1..=6).map(|a| B.delay_ms(a)).collect();
        assert_eq!(delays, vec![1_000, 2_000, 4_000, 8_000, 10_000, 10_000]);
        assert_eq!(B.delay_ms(0), 1_000);
        assert_eq!(B.delay_ms(u32::MAX), 10_000);
    }

    #[test]
    fn factor_one_is_constant() {
        let b = Backoff { factor: 1.0, ..B };
        assert_eq!(b.delay_ms(1), b.delay_ms(20));
    }

    #[test]
    fn expiry_bounds_the_schedule() {
        assert_eq!(B.after_failure(1, 0, 100), Retry::At(1_100));
        assert_eq!(B.after_failure(5, 0, 55_000), Retry::At(60_000));
        assert_eq!(B.after_failure(6, 0, 60_000), Retry::Expire);
        assert_eq!(
            B.after_failure(1, u64::MAX - 5, u64::MAX - 1),
            Retry::At(u64::MAX)
        );
    }
}
