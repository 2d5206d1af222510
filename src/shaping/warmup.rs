//! IP warmup: a new source sends a little to each mailbox provider at first, and more stage
//! by stage, so that providers learn its reputation before it carries full traffic.
//!
//! A [`Schedule`] is a list of stages, each lasting some warmup days with a daily cap (and
//! an optional hourly one) per provider, with overrides for particular providers. A source
//! names a schedule and its start ([`SourceWarmup`]); [`Schedule::caps`] says what applies at
//! a time, and the owner of a (source, provider) key counts what was sent in the current day
//! and hour windows with a [`WarmupCounter`]. Days are counted from the start (`day_s` long,
//! shortened in tests), an hour is a 24th of a day; before the start the first stage
//! applies, after the last one the source is warmed and has no caps.
//!
//! No I/O; time comes in as a parameter (`now_ms`, Unix ms).

use crate::config::WarmupEntry;

use crate::config::ConfigError;

mod counter;

pub use counter::WarmupCounter;

/// `[[warmup]]` schedules. Sources name them and names are looked up linearly, once, when
/// the configuration is read; a schedule per source is already more than anyone needs.
pub const SCHEDULES_MAX: usize = 256;
/// Stages in a schedule: warmups go up in a dozen or so steps.
pub const STAGES_MAX: usize = 64;
/// Provider overrides in one stage, searched linearly each time caps are asked for.
pub const PROVIDERS_MAX: usize = 32;
/// A schedule's length in warmup days: more than a year is a typo.
pub const WARMUP_DAYS_MAX: u64 = 366;
/// A cap above this (a thousand messages a second all day) caps nothing.
pub const DAILY_MAX: u64 = 100_000_000;
/// `day_s` bounds: an hour (a 24th of a day) of at least a second, and a day of at most a
/// day. A multiple of 24 keeps hours whole seconds, so that 24 of them make the day exactly.
pub const DAY_S_MIN: u64 = 24;
pub const DAY_S_MAX: u64 = 86_400;
const HOURS_PER_DAY: u64 = 24;
const MS_PER_S: u64 = 1_000;
const MS_PER_CALENDAR_DAY: u64 = 86_400_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Limits {
    daily: u64,
    hourly: Option<u64>,
}

#[derive(Clone, Debug)]
struct Stage {
    /// The day (from the start, exclusive) this stage ends on.
    end_day: u64,
    limits: Limits,
    /// Lower-case provider names and their limits, the stage's merged in.
    providers: Vec<(String, Limits)>,
}

/// One schedule, validated.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub name: String,
    day_ms: u64,
    stages: Vec<Stage>,
}

/// What a warmup allows a (source, provider) at a time, and the windows it counts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// The stage in force (from 0) and how many the schedule has.
    pub stage: usize,
    pub stages: usize,
    /// Warmup days since the start (0 before it).
    pub day: u64,
    pub daily: u64,
    pub hourly: Option<u64>,
    pub day_start_ms: u64,
    pub day_end_ms: u64,
    pub hour_start_ms: u64,
    pub hour_end_ms: u64,
}

impl Schedule {
    /// The caps for `provider` (any case) at `now_ms` for a source that started at
    /// `start_ms`; `None` once the last stage is over. Before the start the first stage
    /// applies, in day windows that end at the start. No allocation.
    pub fn caps(&self, provider: &str, start_ms: u64, now_ms: u64) -> Option<Caps> {
        let day_ms = self.day_ms;
        let (day, day_start_ms) = match now_ms.checked_sub(start_ms) {
            Some(since) => (since / day_ms, start_ms + since / day_ms * day_ms),
            None => {
                let back = (start_ms - now_ms).div_ceil(day_ms);
                (0, start_ms.saturating_sub(back * day_ms))
            }
        };
        let stage = self.stages.iter().position(|s| day < s.end_day)?;
        let s = &self.stages[stage];
        let limits = s
            .providers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(provider))
            .map_or(s.limits, |&(_, l)| l);
        let hour_ms = day_ms / HOURS_PER_DAY;
        let hour_start_ms = day_start_ms + (now_ms - day_start_ms) / hour_ms * hour_ms;
        Some(Caps {
            stage,
            stages: self.stages.len(),
            day,
            daily: limits.daily,
            hourly: limits.hourly,
            day_start_ms,
            day_end_ms: day_start_ms + day_ms,
            hour_start_ms,
            hour_end_ms: hour_start_ms + hour_ms,
        })
    }

    /// When a source that started at `start_ms` is warmed (the last stage ends).
    pub fn warmed_at_ms(&self, start_ms: u64) -> u64 {
        let days = self.stages.last().map_or(0, |s| s.end_day);
        start_ms.saturating_add(days * self.day_ms)
    }

    pub fn day_ms(&self) -> u64 {
        self.day_ms
    }
}

/// Every `[[warmup]]` schedule; sources refer to them by index.
#[derive(Clone, Debug, Default)]
pub struct Schedules {
    schedules: Vec<Schedule>,
}

impl Schedules {
    pub fn from_entries(entries: &[WarmupEntry]) -> Result<Schedules, ConfigError> {
        if entries.len() > SCHEDULES_MAX {
            let reason = format!("{} schedules, at most {SCHEDULES_MAX}", entries.len());
            return Err(crate::config::invalid("warmup", reason));
        }
        let mut schedules = Vec::with_capacity(entries.len());
        for (index, e) in entries.iter().enumerate() {
            let err = |key: &'static str, reason: String| ConfigError::InTable {
                table: "warmup",
                index,
                key,
                reason,
            };
            if e.name.trim().is_empty() {
                return Err(err("name", "must not be empty".into()));
            }
            if entries[..index].iter().any(|o| o.name == e.name) {
                return Err(err("name", format!("`{}` names two schedules", e.name)));
            }
            if !(DAY_S_MIN..=DAY_S_MAX).contains(&e.day_s) || e.day_s % HOURS_PER_DAY != 0 {
                let reason = format!("must be a multiple of 24 from {DAY_S_MIN} to {DAY_S_MAX}");
                return Err(err("day_s", reason));
            }
            if e.stage.is_empty() || e.stage.len() > STAGES_MAX {
                let reason = format!("a schedule needs 1 to {STAGES_MAX} [[warmup.stage]]");
                return Err(err("stage", reason));
            }
            let mut stages = Vec::with_capacity(e.stage.len());
            let mut end_day = 0;
            for (i, st) in e.stage.iter().enumerate() {
                // Keys are static: the stage's number goes first in the reason.
                let bad = |key, reason: &str| err(key, format!("stage[{i}]: {reason}"));
                if st.days == 0 {
                    return Err(bad("stage.days", "must be at least 1"));
                }
                end_day += st.days;
                if end_day > WARMUP_DAYS_MAX {
                    let reason = format!("the stages add up to more than {WARMUP_DAYS_MAX} days");
                    return Err(bad("stage.days", &reason));
                }
                let limits = check_limits(st.daily, st.hourly, st.daily)
                    .map_err(|(key, reason)| bad(key, &reason))?;
                if st.provider.len() > PROVIDERS_MAX {
                    let reason = format!("at most {PROVIDERS_MAX} providers");
                    return Err(bad("stage.provider", &reason));
                }
                let mut providers: Vec<(String, Limits)> = Vec::with_capacity(st.provider.len());
                for (name, p) in &st.provider {
                    let bad = |key, reason: &str| bad(key, &format!("provider `{name}`: {reason}"));
                    let twice = providers.iter().any(|(n, _)| name.eq_ignore_ascii_case(n));
                    if name.trim().is_empty() || twice || (p.daily, p.hourly) == (None, None) {
                        let reason = "needs a name of its own, and daily or hourly";
                        return Err(bad("stage.provider", reason));
                    }
                    let daily = p.daily.unwrap_or(st.daily);
                    let hourly = p.hourly.or(st.hourly);
                    let limits = check_limits(daily, hourly, p.hourly.map_or(u64::MAX, |_| daily))
                        .map_err(|(key, reason)| bad(provider_key(key), &reason))?;
                    providers.push((name.to_ascii_lowercase(), limits));
                }
                stages.push(Stage {
                    end_day,
                    limits,
                    providers,
                });
            }
            schedules.push(Schedule {
                name: e.name.clone(),
                day_ms: e.day_s * MS_PER_S,
                stages,
            });
        }
        Ok(Schedules { schedules })
    }

    pub fn index(&self, name: &str) -> Option<usize> {
        self.schedules.iter().position(|s| s.name == name)
    }

    /// Schedule `i` (from [`Schedules::index`]). Panics when out of range.
    pub fn get(&self, i: usize) -> &Schedule {
        &self.schedules[i]
    }

    pub fn len(&self) -> usize {
        self.schedules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.schedules.is_empty()
    }

    /// The warmup of the `index`-th `[[source]]`, from its `warmup`, `warmup_start` and
    /// `warmup_start_ms` keys; errors name those keys.
    pub fn source_warmup(
        &self,
        index: usize,
        warmup: Option<&str>,
        start: Option<&str>,
        start_ms: Option<u64>,
    ) -> Result<Option<SourceWarmup>, ConfigError> {
        let err = |key: &'static str, reason: &str| ConfigError::InTable {
            table: "source",
            index,
            key,
            reason: reason.to_owned(),
        };
        let Some(name) = warmup else {
            return match (start, start_ms) {
                (None, None) => Ok(None),
                (Some(_), _) => Err(err("warmup_start", "needs `warmup` (a schedule's name)")),
                (None, Some(_)) => Err(err("warmup_start_ms", "needs `warmup`")),
            };
        };
        let schedule = self
            .index(name)
            .ok_or_else(|| err("warmup", &format!("no [[warmup]] is named `{name}`")))?;
        let start_ms = match (start, start_ms) {
            (Some(date), None) => parse_start(date).map_err(|r| err("warmup_start", &r))?,
            (None, Some(ms)) => ms,
            (Some(_), Some(_)) => {
                let reason = "give warmup_start or warmup_start_ms, not both";
                return Err(err("warmup_start_ms", reason));
            }
            (None, None) => {
                let reason =
                    "a source with a warmup needs its start (warmup_start = \"2026-12-01\")";
                return Err(err("warmup_start", reason));
            }
        };
        Ok(Some(SourceWarmup { schedule, start_ms }))
    }
}

/// Checked limits; `hourly_max` is what an explicit hourly cap may be at most.
fn check_limits(
    daily: u64,
    hourly: Option<u64>,
    hourly_max: u64,
) -> Result<Limits, (&'static str, String)> {
    if !(1..=DAILY_MAX).contains(&daily) {
        let reason = format!("must be 1 to {DAILY_MAX} (to stop sending, suspend the source)");
        return Err(("stage.daily", reason));
    }
    if let Some(h) = hourly {
        if h == 0 || h > hourly_max {
            let reason = format!("{h} must be at least 1 and at most daily ({daily})");
            return Err(("stage.hourly", reason));
        }
    }
    Ok(Limits { daily, hourly })
}

fn provider_key(key: &'static str) -> &'static str {
    match key {
        "stage.daily" => "stage.provider.daily",
        _ => "stage.provider.hourly",
    }
}

/// A source's warmup: which schedule, from when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceWarmup {
    pub schedule: usize,
    pub start_ms: u64,
}

/// A UTC date (`2026-12-01`) as Unix ms at its midnight.
pub fn parse_start(text: &str) -> Result<u64, String> {
    let bad = || format!("`{text}` is not a UTC date like 2026-12-01 (year 1970 to 9999)");
    let t = text.trim();
    let b = t.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return Err(bad());
    }
    let num = |range: std::ops::Range<usize>| -> Option<u64> {
        let s = &t[range];
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let (Some(y), Some(m), Some(d)) = (num(0..4), num(5..7), num(8..10)) else {
        return Err(bad());
    };
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let month_days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return Err(bad()),
    };
    if y < 1970 || d == 0 || d > month_days {
        return Err(bad());
    }
    Ok(days_from_civil(y, m, d) * MS_PER_CALENDAR_DAY)
}

/// Days from 1970-01-01 to a proleptic Gregorian date from 1970 on (H. Hinnant's algorithm:
/// years counted from March, so that the leap day ends the year).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400_000;
    const START: u64 = 1_796_083_200_000;

    const CONFIG: &str = r#"
        [[warmup]]
        name = "new-ip"
        [[warmup.stage]]
        days = 3
        daily = 500
        hourly = 50
        [warmup.stage.provider.google]
        daily = 200
        [[warmup.stage]]
        days = 4
        daily = 2000

        [[warmup]]
        name = "fast"
        day_s = 24
        stage = [{ days = 2, daily = 120, hourly = 50 }]
    "#;

    #[derive(serde::Deserialize)]
    pub(super) struct File {
        pub(super) warmup: Vec<WarmupEntry>,
    }

    pub(super) fn schedules() -> Schedules {
        let file: File = toml::from_str(CONFIG).expect("toml");
        Schedules::from_entries(&file.warmup).expect("schedules")
    }

    #[test]
    fn caps_grow_stage_by_stage_with_provider_overrides() {
        let all = schedules();
        let s = all.get(all.index("new-ip").expect("index"));
        let at = |provider, now| s.caps(provider, START, now).expect("caps");
        let first = at("yahoo", START);
        assert_eq!((first.stage, first.stages, first.day), (0, 2, 0));
        assert_eq!((first.daily, first.hourly), (500, Some(50)));
        assert_eq!((first.day_start_ms, first.day_end_ms), (START, START + DAY));
        assert_eq!(first.hour_end_ms, START + 3_600_000);
        let g = at("Google", START + 2 * DAY + 5_400_000);
        assert_eq!((g.day, g.daily, g.hourly), (2, 200, Some(50)));
        assert_eq!(g.hour_start_ms, START + 2 * DAY + 3_600_000);
        let g = at("google", START + 3 * DAY);
        assert_eq!((g.stage, g.day, g.daily, g.hourly), (1, 3, 2000, None));
        assert_eq!(at("yahoo", START + 7 * DAY - 1).day, 6);
        assert_eq!(s.caps("yahoo", START, START + 7 * DAY), None, "warmed");
        assert_eq!(s.warmed_at_ms(START), START + 7 * DAY);
        // Before the start: the first stage, in day windows that end at the start.
        let e = at("yahoo", START - DAY - 1);
        assert_eq!((e.stage, e.day, e.daily), (0, 0, 500));
        assert_eq!(
            (e.day_start_ms, e.day_end_ms),
            (START - 2 * DAY, START - DAY)
        );
        assert_eq!(all.index("nope"), None);
    }

    #[test]
    fn start_dates_parse() {
        assert_eq!(parse_start("2026-12-01"), Ok(1_796_083_200_000));
        assert_eq!(parse_start("1970-01-01"), Ok(0));
        assert_eq!(parse_start(" 2000-03-01 "), Ok(951_868_800_000));
        assert_eq!(parse_start("2024-02-29"), Ok(1_709_164_800_000));
        let bad = " 2026-12 2026/12/01 2026-13-01 2026-00-10 2026-02-29 2100-02-29 2026-04-31 \
                   2026-12-00 1969-12-31 +026-12-01 2026-1-011 20261201";
        for bad in bad.split(' ') {
            assert!(parse_start(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sources_name_a_schedule_and_a_start() {
        let all = schedules();
        let w = all.source_warmup(3, Some("fast"), Some("2026-12-01"), None);
        assert_eq!(
            w.expect("warmup").map(|w| (w.schedule, w.start_ms)),
            Some((1, START))
        );
        assert_eq!(all.source_warmup(0, None, None, None).expect("none"), None);
        let w = all.source_warmup(0, Some("new-ip"), None, Some(5));
        assert_eq!(w.expect("ms").map(|w| w.start_ms), Some(5));
        for (key, warmup, start, ms) in [
            ("warmup", Some("slow"), Some("2026-12-01"), None),
            ("warmup_start", Some("fast"), None, None),
            ("warmup_start", Some("fast"), Some("soon"), None),
            ("warmup_start_ms", Some("fast"), Some("2026-12-01"), Some(1)),
            ("warmup_start", None, Some("2026-12-01"), None),
            ("warmup_start_ms", None, None, Some(1)),
        ] {
            let err = all
                .source_warmup(3, warmup, start, ms)
                .expect_err(key)
                .to_string();
            let want = format!("invalid value for `source[3].{key}`");
            assert!(err.starts_with(&want), "{err}");
        }
    }

    #[test]
    fn config_errors_name_their_key() {
        let load = |second: &str| {
            let text = format!(
                "warmup = [{{ name = \"a\", stage = [{{ days = 1, daily = 10 }}] }}, \
                 {{ {second} }}]"
            );
            let file: File = toml::from_str(&text).expect(second);
            Schedules::from_entries(&file.warmup)
        };
        let one = "stage = [{ days = 1, daily = 1 }]";
        let provider = |p: &str| {
            format!(
                "name = \"b\", stage = [{{ days = 1, daily = 10 }}, \
                 {{ days = 1, daily = 100, hourly = 10, provider = {{ google = {{ {p} }} }} }}]"
            )
        };
        let cases = [
            ("name", format!("name = \"a\", {one}")),
            ("name", format!("name = \"\", {one}")),
            ("day_s", format!("name = \"b\", day_s = 100, {one}")),
            ("day_s", format!("name = \"b\", day_s = 0, {one}")),
            ("stage", "name = \"b\", stage = []".into()),
            (
                "stage.days",
                "name = \"b\", stage = [{ days = 0, daily = 1 }]".into(),
            ),
            (
                "stage.days",
                "name = \"b\", stage = [{ days = 200, daily = 1 }, { days = 200, daily = 1 }]"
                    .into(),
            ),
            (
                "stage.daily",
                "name = \"b\", stage = [{ days = 1, daily = 0 }]".into(),
            ),
            (
                "stage.hourly",
                "name = \"b\", stage = [{ days = 1, daily = 10, hourly = 11 }]".into(),
            ),
            (
                "stage.hourly",
                "name = \"b\", stage = [{ days = 1, daily = 10, hourly = 0 }]".into(),
            ),
            ("stage.provider", provider("")),
            (
                "stage.provider",
                "name = \"b\", stage = [{ days = 1, daily = 9, \
                 provider = { g = { daily = 1 }, G = { daily = 2 } } }]"
                    .into(),
            ),
            ("stage.provider.daily", provider("daily = 0")),
            ("stage.provider.hourly", provider("daily = 5, hourly = 6")),
        ];
        for (key, second) in &cases {
            let err = load(second).expect_err(second).to_string();
            let want = format!("invalid value for `warmup[1].{key}`");
            assert!(err.starts_with(&want), "{second}: {err}");
        }
        let err = load(&provider("daily = 0"))
            .expect_err("provider")
            .to_string();
        assert!(err.contains("stage[1]: provider `google`"), "{err}");
        // A provider's daily cap under the stage's hourly one is fine: the day caps.
        assert!(load(&provider("daily = 5")).is_ok());
    }
}
