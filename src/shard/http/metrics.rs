//! `GET /metrics` (Prometheus text) and `GET /api/dashboard/v1` (the dashboard's JSON): one
//! gather of every shard's metrics over the mesh (`shard::metrics::gather`), merged and
//! rendered on the shard that got the request. Role viewer (checked by the route).

use std::sync::atomic::Ordering;

use super::Api;
use crate::http::Response;
use crate::metrics::{dashboard, prometheus, Process};

/// Answer `path`: `/metrics` or `/api/dashboard/v1`.
pub async fn handle(api: &Api, path: &str) -> Response {
    let merged = crate::shard::metrics::gather(&api.mesh).await;
    let now = api.clock.now_ms();
    let settings = api.settings.get();
    let process = Process {
        ts_ms: now,
        ready: api.ready.load(Ordering::Acquire),
        hostname: settings.hostname.clone(),
        uptime_s: now.saturating_sub(api.started_ms) / 1000,
        disk_used_pct: crate::shard::metrics::disk_used_pct(&settings.config.spool.dir),
        alerts: merged.total.alerts.clone(),
    };
    match path {
        "/metrics" => Response::text(
            200,
            prometheus::CONTENT_TYPE,
            prometheus::render(&merged, &process),
        ),
        _ => Response::json(200, &dashboard::document(&merged, &process)),
    }
}
