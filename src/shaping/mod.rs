//! Traffic shaping: how fast, and through which source, mail goes to each destination.
//!
//! - [`rate`]: `N/period` rates and the GCRA that holds them.
//! - [`layers`]: the limits of each (site, source), from defaults, providers, sites, domains
//!   and source overrides.
//! - [`credits`]: rates shared by shards, as batches of send credits from each key's owner.
//! - [`adaptive`]: `[[adaptive]]` rules that suspend or throttle a (site, source) when its
//!   failed replies keep saying the same thing.
//! - [`warmup`]: `[[warmup]]` schedules that cap a new source's daily and hourly volume per
//!   provider, stage by stage.
//!
//! No I/O here: the core asks and the owners of the shaping keys answer over the mesh.

pub mod adaptive;
pub mod credits;
pub mod layers;
pub mod rate;
pub mod warmup;

pub use adaptive::{Action, AdaptiveRule, AdaptiveRules, Threshold, Tracker, Trigger};
pub use rate::{Allowance, Gcra, Rate};
pub use warmup::{Caps, Schedule, Schedules, SourceWarmup, WarmupCounter};
