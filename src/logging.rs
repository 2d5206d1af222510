//! Operational logging through `tracing`: human-readable lines on stderr by default, one JSON
//! object per line with `--log-format json`. The level comes from `EPOXI_LOG` (a
//! `tracing_subscriber` filter such as `info` or `epoxi=debug`), default `info`.
//!
//! Message events (receptions, deliveries, bounces) are not here: they go to the event log.

use tracing_subscriber::EnvFilter;

/// How log lines look.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// `2026-12-01T07:45:01.123456Z  INFO epoxi::shard: shard 0 recovered ...`
    #[default]
    Human,
    /// `{"timestamp":"...","level":"INFO","fields":{"message":"..."},"target":"..."}`
    Json,
}

/// Install the process's subscriber. Call once, first thing in `main`.
pub fn init(format: Format) {
    let filter = EnvFilter::try_from_env("EPOXI_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    // A second init (tests) keeps the first subscriber; logging is never worth a crash.
    let _ = match format {
        Format::Human => builder.try_init(),
        Format::Json => builder.json().try_init(),
    };
}
