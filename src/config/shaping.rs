//! The shaping tables of the configuration, as written: `[shaping]`, `[[provider]]`, and the
//! limit keys `[[site]]`, `[[domain]]` and `[[source]]` share. Rates stay text here; the
//! shaping module compiles them (`shaping::layers`), with errors naming the table and key.

use serde::Deserialize;

/// `[shaping]`: the defaults every site starts from (with `[delivery]`'s connection limits),
/// and whether the built-in providers apply.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ShapingSection {
    /// The built-in providers (Google, Microsoft, Yahoo, Apple, ...; see
    /// `shaping::providers`) with their limits; a `[[provider]]` of the same name replaces
    /// one.
    pub provider_defaults: bool,
    /// New connections per (site, source) per period, e.g. "10/s".
    pub connection_rate: Option<String>,
    /// Messages per (site, source), e.g. "100/s", "5000/h".
    pub message_rate: Option<String>,
    /// Messages to one site over all sources.
    pub site_message_rate: Option<String>,
}

impl Default for ShapingSection {
    fn default() -> Self {
        ShapingSection {
            provider_defaults: true,
            connection_rate: None,
            message_rate: None,
            site_message_rate: None,
        }
    }
}

/// Declares a config table with the limit keys every shaping layer may set, plus its own
/// keys; `limits()` gives the layer's values.
macro_rules! shape_table {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident : $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
            /// Connections per egress source to the site, across shards.
            #[serde(default)]
            pub connections_max: Option<usize>,
            /// New connections per source per period ("10/s").
            #[serde(default)]
            pub connection_rate: Option<String>,
            /// Messages per source per period ("100/s", "20000/h").
            #[serde(default)]
            pub message_rate: Option<String>,
            /// Messages over all sources per period.
            #[serde(default)]
            pub site_message_rate: Option<String>,
            /// Messages over one connection before it is closed and a fresh one opened.
            #[serde(default)]
            pub messages_per_connection_max: Option<usize>,
            /// Recipients of one message sent in one transaction.
            #[serde(default)]
            pub rcpts_per_transaction_max: Option<usize>,
            /// Keep an idle connection open this long for more mail.
            #[serde(default)]
            pub idle_timeout_ms: Option<u64>,
        }

        impl $name {
            pub fn limits(&self) -> LimitKeys<'_> {
                LimitKeys {
                    connections_max: self.connections_max,
                    connection_rate: self.connection_rate.as_deref(),
                    message_rate: self.message_rate.as_deref(),
                    site_message_rate: self.site_message_rate.as_deref(),
                    messages_per_connection_max: self.messages_per_connection_max,
                    rcpts_per_transaction_max: self.rcpts_per_transaction_max,
                    idle_timeout_ms: self.idle_timeout_ms,
                }
            }
        }
    };
}

/// The limit keys of one layer's table, borrowed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimitKeys<'a> {
    pub connections_max: Option<usize>,
    pub connection_rate: Option<&'a str>,
    pub message_rate: Option<&'a str>,
    pub site_message_rate: Option<&'a str>,
    pub messages_per_connection_max: Option<usize>,
    pub rcpts_per_transaction_max: Option<usize>,
    pub idle_timeout_ms: Option<u64>,
}

shape_table! {
    /// A mail provider: a named set of MX globs (all of Google, all of Microsoft) and the
    /// limits its sites start from.
    pub struct ProviderEntry {
        pub name: String,
        /// Globs on MX host names; a site is the provider's when one of its hosts matches.
        pub mx: Vec<String>,
    }
}

shape_table! {
    /// Limits for the sites whose MX hosts match `mx` (or a route's host), or for every site
    /// of `provider`; with `source`, only for that egress source (applied after the
    /// tables without one).
    pub struct SiteEntry {
        /// Glob on the site's MX host names (one matching host is enough), e.g.
        /// `*.google.com`; for a static route, on the route's host.
        #[serde(default)]
        pub mx: Option<String>,
        /// A provider's name: every site of that provider.
        #[serde(default)]
        pub provider: Option<String>,
        /// Only for this egress source.
        #[serde(default)]
        pub source: Option<String>,
    }
}

shape_table! {
    /// Per recipient domain: spreading a hot domain over shards, and limits of its own. A
    /// domain with limits is a site of its own (its mail does not share connections or
    /// rates with other domains on the same MX hosts).
    pub struct DomainEntry {
        /// The recipient domain, exactly (case-insensitive).
        pub name: String,
        /// Shards that share this domain's messages (by a hash of the recipient), from its
        /// owner shard on: a domain that carries a big share of the traffic would otherwise
        /// pin one core. 1 (the default) keeps it on its owner; capped at the shard count.
        #[serde(default = "one")]
        pub shards: usize,
        /// Only for this egress source.
        #[serde(default)]
        pub source: Option<String>,
    }
}

impl DomainEntry {
    /// Whether the table sets any limit (and so makes the domain a site of its own).
    pub fn has_limits(&self) -> bool {
        self.limits() != LimitKeys::default()
    }
}

fn one() -> usize {
    1
}

/// One `[[adaptive]]` table, as written.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveEntry {
    pub name: String,
    /// A regex on the reply line (`421 4.7.0 text`), case-insensitive.
    #[serde(default)]
    pub regex: Option<String>,
    /// Bounce categories (`RateLimited`, ...); a reply in any of them matches.
    #[serde(default)]
    pub category: Vec<String>,
    /// A glob on the site's MX hosts (one matching host is enough); every site without it.
    #[serde(default)]
    pub site: Option<String>,
    /// `N/period` or `N in period`: N matches within the period trigger the action.
    pub threshold: String,
    /// `suspend`, `throttle`, `suspend_tenant`, `suspend_campaign` or `bounce`.
    pub action: String,
    /// How long the action lasts: `30s`, `10m`, `2h`, `1d`.
    pub duration: String,
    /// Throttle only: the (site, source)'s message rate while it lasts.
    #[serde(default)]
    pub message_rate: Option<String>,
    /// Throttle only: the configured rate times this (0 < f < 1) while it lasts.
    #[serde(default)]
    pub rate_factor: Option<f64>,
    /// Throttle only: the connection cap while it lasts.
    #[serde(default)]
    pub connections_max: Option<u32>,
}

/// One `[[warmup]]` table, as written.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WarmupEntry {
    pub name: String,
    /// Length of a warmup day in seconds (an hour is `day_s / 24`).
    #[serde(default = "day_s_default")]
    pub day_s: u64,
    pub stage: Vec<StageEntry>,
}

fn day_s_default() -> u64 {
    86_400
}

/// One `[[warmup.stage]]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StageEntry {
    /// How many warmup days the stage lasts.
    pub days: u64,
    /// Messages per provider per day.
    pub daily: u64,
    /// Messages per provider per hour, if capped.
    #[serde(default)]
    pub hourly: Option<u64>,
    /// Per provider overrides (`[warmup.stage.provider.google]`), by provider name.
    #[serde(default)]
    pub provider: std::collections::BTreeMap<String, WarmupProviderEntry>,
}

/// `[warmup.stage.provider.NAME]`: what it does not set comes from the stage.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WarmupProviderEntry {
    #[serde(default)]
    pub daily: Option<u64>,
    #[serde(default)]
    pub hourly: Option<u64>,
}
