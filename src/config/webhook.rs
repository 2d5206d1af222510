//! `[[webhook]]` tables as written: where event-log lines are POSTed. Values stay text here;
//! `webhook::Spec::from_entries` checks them (URL, event types, bounds), with errors naming
//! the table and key.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WebhookEntry {
    /// Names the webhook's cursor files (`LOG/webhooks/NAME.shard-N.json`) and its log lines;
    /// default `webhook-INDEX` (from 0, in file order).
    #[serde(default)]
    pub name: Option<String>,
    /// `http://` or `https://` URL the batches are POSTed to.
    pub url: String,
    /// Event-log line types to send ("Delivery", "Bounce", ...); default every type.
    #[serde(default)]
    pub events: Option<Vec<String>>,
    /// Lines per POST (`array`) or per batch of POSTs (`object`).
    #[serde(default = "batch_max_default")]
    pub batch_max: usize,
    /// `array`: one POST with a JSON array of up to `batch_max` lines; `object`: one POST per
    /// line, its JSON object.
    #[serde(default = "format_default")]
    pub format: String,
    /// Extra request headers, e.g. `Authorization = "Bearer ..."`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Each POST gets this long, connection and answer included.
    #[serde(default = "timeout_ms_default")]
    pub timeout_ms: u64,
    /// A failed POST is retried after this long, doubling (with jitter) up to `retry_max_ms`.
    #[serde(default = "retry_base_ms_default")]
    pub retry_base_ms: u64,
    #[serde(default = "retry_max_ms_default")]
    pub retry_max_ms: u64,
}

fn batch_max_default() -> usize {
    100
}

fn format_default() -> String {
    "array".into()
}

fn timeout_ms_default() -> u64 {
    10_000
}

fn retry_base_ms_default() -> u64 {
    1_000
}

fn retry_max_ms_default() -> u64 {
    60_000
}
