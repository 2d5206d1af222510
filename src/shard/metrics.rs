//! The shard's side of metrics: its part of a scrape (counters copied from its
//! [`Recorder`], gauges read from the core, reception and the spool), the gather of every
//! shard's part over the mesh, and the alert loop on shard 0.
//!
//! A scrape is one mesh gather (`Request::Metrics` to every shard, this one included); each
//! shard answers synchronously from what it owns, so a scrape costs each shard one copy of
//! its counters and histograms and one walk of its queue (see `core::gauges`), and nothing
//! per message.

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use super::mesh::{Answer, Request, ShardMesh};
use crate::clock::Clock;
use crate::core::CoreCell;
use crate::events::{Event, Observers};
use crate::metrics::alerts::{Active, Engine, Sample, Transition};
use crate::metrics::{merge, Merged, Recorder, ShardMetrics, StageGauges};
use crate::reception::Reception;
use crate::settings::Live;
use crate::spool::Spool;

/// What a shard answers a metrics request from.
pub struct Local {
    pub recorder: Rc<Recorder>,
    pub spool: Rc<Spool>,
    /// Shard 0: the alerts firing, as its alert loop last decided.
    pub alerts: RefCell<Vec<Active>>,
}

impl Local {
    /// This shard's part of a scrape at `now_ms`.
    pub fn part(&self, core: &CoreCell, reception: &Reception, now_ms: u64) -> ShardMetrics {
        let (shard, queue) = core.read(|c| (c.shard(), c.gauges(now_ms)));
        let (spool_bytes, spool_segments) = self.spool.footprint();
        let stage = StageGauges {
            connections_in: reception.sessions.open() as u64,
            spool_bytes,
            spool_segments,
        };
        let mut part = self.recorder.snapshot(shard, queue, stage);
        part.alerts = self.alerts.borrow().clone();
        part
    }
}

/// Every shard's part, merged. A shard that does not answer (shutting down) is left out
/// of this scrape.
pub async fn gather(mesh: &ShardMesh) -> Merged {
    let answers = mesh.gather(|_| Request::Metrics).await;
    let parts = answers
        .into_iter()
        .filter_map(|(shard, a)| match a {
            Ok(Answer::Metrics(part)) => Some(*part),
            _ => {
                tracing::debug!("metrics: shard {shard} did not answer");
                None
            }
        })
        .collect();
    merge(parts)
}

/// The used percentage of the filesystem holding `dir` (statvfs), None if it cannot be
/// read. One syscall on a path that exists, answered from the kernel's superblock: cheap
/// enough to make inline at a scrape.
pub fn disk_used_pct(dir: &Path) -> Option<f64> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid NUL-terminated string and `st` a writable statvfs.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let total = st.f_blocks as f64 * st.f_frsize as f64;
    // Used as df counts it: what is not free at all (f_bfree), over what users can get
    // (used + available to unprivileged users).
    let used = (st.f_blocks.saturating_sub(st.f_bfree)) as f64 * st.f_frsize as f64;
    let avail = st.f_bavail as f64 * st.f_frsize as f64;
    (total > 0.0 && used + avail > 0.0).then(|| used * 100.0 / (used + avail))
}

/// Shard 0's alert loop: every `alerts.interval_s`, gather the metrics, decide, log each
/// transition as an `Alert` event, and keep the alerts firing for scrapes. Alerting is
/// sampled: a rule sees the state at each interval, not every change in between (rates are
/// windowed over many samples, so they lose only timing). The rules are read from the live
/// settings each time, so a reload that changes them starts them afresh.
pub async fn run_alerts(
    mesh: Rc<ShardMesh>,
    local: Rc<Local>,
    settings: Rc<Live>,
    observers: Observers,
    clock: Rc<dyn Clock>,
    stop: Rc<shards::LocalStop>,
) {
    let mut engine: Option<Engine> = None;
    loop {
        let s = settings.get();
        let cfg = &s.config;
        let interval = Duration::from_secs(cfg.alerts.interval_s.max(1));
        let stopped = futures_lite::future::or(
            async {
                glommio::timer::sleep(interval).await;
                false
            },
            async {
                stop.wait().await;
                true
            },
        )
        .await;
        if stopped {
            return;
        }
        if cfg.alert.is_empty() {
            engine = None;
            local.alerts.borrow_mut().clear();
            continue;
        }
        if !engine.as_ref().is_some_and(|e| e.runs(&cfg.alert)) {
            engine = Some(Engine::new(&cfg.alert));
        }
        let Some(e) = engine.as_mut() else { continue };
        let merged = gather(&mesh).await;
        let now = clock.now_ms();
        let t = &merged.total;
        let transitions = e.evaluate(&Sample {
            now_ms: now,
            sites: &t.sites,
            oldest_ms: t.queue_gauges.oldest_ms,
            disk_used_pct: disk_used_pct(&cfg.spool.dir),
            sources_down: &t.queue_gauges.sources_down,
        });
        for tr in &transitions {
            let (a, firing) = match tr {
                Transition::Fire(a) => (a, true),
                Transition::Resolve(a) => (a, false),
            };
            match firing {
                true => {
                    tracing::warn!(rule = %a.rule, subject = %a.subject, "alert: {}", a.message)
                }
                false => {
                    tracing::info!(rule = %a.rule, subject = %a.subject, "alert: {}", a.message)
                }
            }
            observers.emit(&Event::Alert(crate::events::Alert {
                ts_ms: now,
                shard: 0,
                rule: &a.rule,
                kind: a.kind.as_str(),
                firing,
                subject: &a.subject,
                value: a.value,
                threshold: a.threshold,
                since_ms: a.since_ms,
                message: &a.message,
            }));
        }
        *local.alerts.borrow_mut() = e.active();
    }
}
