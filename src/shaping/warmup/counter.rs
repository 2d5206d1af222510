//! The warmup counter: what one (source, provider) sent in the current day and hour windows
//! of its schedule. Kept by the owner of the key. No I/O; time comes in as a parameter.

use super::Caps;
use crate::shaping::rate::Allowance;

/// What a (source, provider) sent in the current day and hour windows. Kept by the owner of
/// the key; 32 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WarmupCounter {
    day_end_ms: u64,
    hour_end_ms: u64,
    day_sent: u64,
    hour_sent: u64,
}

impl WarmupCounter {
    /// Take up to `want` messages under `caps` (from [`super::Schedule::caps`] at `now_ms`); when
    /// capped, `retry_at_ms` is the end of the window that is full. No allocation.
    pub fn take(&mut self, caps: &Caps, want: u32, now_ms: u64) -> Allowance {
        if self.day_end_ms != caps.day_end_ms {
            self.day_end_ms = caps.day_end_ms;
            self.day_sent = 0;
        }
        if self.hour_end_ms != caps.hour_end_ms {
            self.hour_end_ms = caps.hour_end_ms;
            self.hour_sent = 0;
        }
        let day_room = caps.daily.saturating_sub(self.day_sent);
        let hour_room = caps
            .hourly
            .map_or(u64::MAX, |h| h.saturating_sub(self.hour_sent));
        let granted = u64::from(want).min(day_room).min(hour_room);
        self.day_sent += granted;
        self.hour_sent += granted;
        let retry_at_ms = (granted < u64::from(want)).then(|| {
            let end = match day_room == granted {
                true => caps.day_end_ms,
                false => caps.hour_end_ms,
            };
            end.max(now_ms + 1)
        });
        Allowance {
            granted: granted as u32,
            retry_at_ms,
        }
    }

    /// Give back `n` messages taken but not sent, to the windows they were taken in if those
    /// have not ended.
    pub fn refund(&mut self, n: u32, now_ms: u64) {
        if now_ms < self.day_end_ms {
            self.day_sent = self.day_sent.saturating_sub(u64::from(n));
        }
        if now_ms < self.hour_end_ms {
            self.hour_sent = self.hour_sent.saturating_sub(u64::from(n));
        }
    }

    /// Sent in the day window of `now_ms` (progress reports).
    pub fn sent_today(&self, now_ms: u64) -> u64 {
        Some(self.day_sent)
            .filter(|_| now_ms < self.day_end_ms)
            .unwrap_or(0)
    }

    /// Sent in the hour window of `now_ms`.
    pub fn sent_this_hour(&self, now_ms: u64) -> u64 {
        Some(self.hour_sent)
            .filter(|_| now_ms < self.hour_end_ms)
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shaping::warmup::tests::schedules;

    #[test]
    fn hourly_caps_reset_each_hour_and_daily_caps_each_day() {
        let all = schedules();
        let s = all.get(1);
        let hour = 1_000;
        let mut c = WarmupCounter::default();
        let take = |c: &mut WarmupCounter, want, now| {
            let caps = s.caps("any", 0, now).expect("caps");
            c.take(&caps, want, now)
        };
        let a = take(&mut c, 60, 10);
        assert_eq!((a.granted, a.retry_at_ms), (50, Some(hour)));
        assert_eq!(take(&mut c, 1, 999).granted, 0);
        assert_eq!((c.sent_today(999), c.sent_this_hour(999)), (50, 50));
        assert_eq!(take(&mut c, 60, hour).granted, 50);
        c.refund(10, hour + 1);
        assert_eq!(c.sent_this_hour(hour + 1), 40);
        assert_eq!(take(&mut c, 10, hour + 2).granted, 10);
        // The third hour: 20 left of the daily 120, then wait for the next day.
        let a = take(&mut c, 60, 2 * hour);
        assert_eq!((a.granted, a.retry_at_ms), (20, Some(24 * hour)));
        assert_eq!(take(&mut c, 5, 23 * hour).granted, 0);
        assert_eq!(c.sent_this_hour(24 * hour), 0);
        assert_eq!(c.sent_today(24 * hour), 0);
        assert_eq!(take(&mut c, 5, 24 * hour).granted, 5);
        assert_eq!(c.sent_today(24 * hour), 5);
        assert_eq!(s.caps("any", 0, 48 * hour), None);
    }
}
