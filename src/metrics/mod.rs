//! Metrics: what each shard counts of its own stages, and what a scrape makes of it.
//!
//! Each shard owns a [`Recorder`]: plain `Cell`/`RefCell` counters and hdrhistograms, fed by
//! the stage events (it is an [`Observer`]) and by three adapters (reception's replies and
//! its time to `250`, delivery's transaction time). Nothing is shared between shards on the
//! hot path: a message costs a counter increment, a histogram record, and for attempts one
//! hash lookup in a map capped at [`SITES_TRACKED_MAX`]. The work happens at scrape: the shard
//! that serves `/metrics` gathers every shard's [`ShardMetrics`] (a copy of its counters,
//! histograms and gauges read from their owning stages) over the mesh and [`merge`]s them;
//! [`prometheus`] renders the text exposition, [`dashboard`] the dashboard's JSON, and
//! [`alerts`] decides on shard 0 which alert rules fire.
//!
//! No I/O in this module; gauges are read by the shard adapter (`shard::metrics`).

pub mod alerts;
pub mod dashboard;
pub mod prometheus;
pub mod replies;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};

use hdrhistogram::Histogram;

use crate::events::{AttemptOutcome, Event, Observer};

/// Sites a shard counts attempts for, each with its own row; attempts to sites past it are
/// counted in one `other` row. A thousand rows are ~100 KiB per shard and more than any
/// dashboard shows (it lists the top 20), while a run mailing a long tail of domains cannot
/// grow the map without bound.
pub const SITES_TRACKED_MAX: usize = 1000;
/// Egress sources a shard counts attempts for (configs have a handful; past it, `other`).
pub const SOURCES_TRACKED_MAX: usize = 256;
/// Distinct (code, enhanced code) pairs of rejections a shard counts; past it, they are
/// counted under their code class (`4xx`, `5xx`) alone. Replies are our own, so a few dozen
/// are all there are; the cap guards against a future reply that embeds a variable code.
pub const REJECTION_KINDS_MAX: usize = 128;
/// The row that takes what the caps above leave out.
pub const OTHER: &str = "other";
/// The longest latency a histogram tells apart, in µs (an hour); longer ones count as an
/// hour. Reception and delivery transactions are bounded by timeouts far shorter than that.
pub const LATENCY_US_MAX: u64 = 3_600_000_000;
/// The longest time in queue a histogram tells apart, in ms (30 days, past any max age).
pub const QUEUE_MS_MAX: u64 = 30 * 86_400_000;
/// Significant figures the histograms keep: 1% resolution is plenty for quantiles on a
/// dashboard and keeps each histogram a few KiB (they are copied at every scrape).
const SIGFIG: u8 = 2;

/// Attempts by what came of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcomes {
    pub delivered: u64,
    pub deferred: u64,
    pub bounced: u64,
    pub expired: u64,
}

impl Outcomes {
    fn count(&mut self, outcome: AttemptOutcome) {
        match outcome {
            AttemptOutcome::Delivered => self.delivered += 1,
            AttemptOutcome::Deferred { .. } => self.deferred += 1,
            AttemptOutcome::Bounced => self.bounced += 1,
            AttemptOutcome::Expired => self.expired += 1,
        }
    }

    pub fn add(&mut self, o: &Outcomes) {
        self.delivered += o.delivered;
        self.deferred += o.deferred;
        self.bounced += o.bounced;
        self.expired += o.expired;
    }

    /// Every attempt that ended (the denominator of a bounce or deferral rate).
    pub fn attempts(&self) -> u64 {
        self.delivered + self.deferred + self.bounced + self.expired
    }
}

/// A latency histogram and the exact sum of what it recorded (a summary's `_sum`), in one
/// unit: µs for [`Latency::micros`], ms for [`Latency::millis`].
#[derive(Clone, Debug)]
pub struct Latency {
    pub hist: Histogram<u64>,
    pub sum: u64,
    /// Units per second (1e6 for µs), for rendering in seconds.
    pub per_s: f64,
}

impl Latency {
    fn with(high: u64, per_s: f64) -> Latency {
        Latency {
            // The bounds are constants that hdrhistogram accepts (low ≥ 1, high ≥ 2 low,
            // sigfig ≤ 5): checked by the tests below, so this cannot fail at run time.
            hist: Histogram::new_with_bounds(1, high, SIGFIG)
                .unwrap_or_else(|_| Histogram::new(SIGFIG).unwrap_or_else(|_| unreachable!())),
            sum: 0,
            per_s,
        }
    }

    pub fn micros() -> Latency {
        Latency::with(LATENCY_US_MAX, 1e6)
    }

    pub fn millis() -> Latency {
        Latency::with(QUEUE_MS_MAX, 1e3)
    }

    /// No allocation: the histogram's buckets are sized at creation.
    pub fn record(&mut self, v: u64) {
        self.hist.saturating_record(v);
        self.sum = self.sum.saturating_add(v);
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// The value at quantile `q`, in seconds (0 when empty).
    pub fn quantile_s(&self, q: f64) -> f64 {
        match self.hist.is_empty() {
            true => 0.0,
            false => self.hist.value_at_quantile(q) as f64 / self.per_s,
        }
    }

    pub fn sum_s(&self) -> f64 {
        self.sum as f64 / self.per_s
    }

    /// Add `other`'s records. Both have the same bounds (made by the same constructor), so
    /// hdrhistogram's `add` cannot fail; were it to, the records left out are lost for this
    /// scrape only.
    pub fn merge(&mut self, other: &Latency) {
        let _ = self.hist.add(&other.hist);
        self.sum = self.sum.saturating_add(other.sum);
    }
}

/// Message counts of one shard (or of all, merged).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Messages received and queued here (a message whose recipients live on several shards
    /// counts once on each: as many as the event log's Reception lines).
    pub received: u64,
    /// Recipients delivered, deferred (transient failures), bounced and expired: the event
    /// log's Delivery, TransientFailure, Bounce and Expiration lines.
    pub attempts: Outcomes,
    /// Notice lines (a notice spooled, or found not needed).
    pub notices: u64,
    /// Recipients refused for the suppression list.
    pub suppressed: u64,
    /// 4xx and 5xx replies sent to SMTP clients.
    pub rejected: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.received += o.received;
        self.attempts.add(&o.attempts);
        self.notices += o.notices;
        self.suppressed += o.suppressed;
        self.rejected += o.rejected;
    }
}

/// What a site is doing now, as the dashboard shows it; when shards disagree the higher
/// one wins (a site suspended on one shard is suspended).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum SiteState {
    #[default]
    Active,
    Warming,
    Throttled,
    Backoff,
    Suspended,
}

impl SiteState {
    pub fn as_str(self) -> &'static str {
        match self {
            SiteState::Active => "active",
            SiteState::Warming => "warming",
            SiteState::Throttled => "throttled",
            SiteState::Backoff => "backoff",
            SiteState::Suspended => "suspended",
        }
    }
}

/// One site's recipients in a shard's queue, and its state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SiteGauge {
    pub site: String,
    pub ready: u64,
    pub scheduled: u64,
    pub in_flight: u64,
    /// The oldest message with a recipient pending for the site (Unix ms).
    pub oldest_ms: Option<u64>,
    pub state: SiteState,
}

impl SiteGauge {
    pub fn depth(&self) -> u64 {
        self.ready + self.scheduled + self.in_flight
    }
}

/// What the queue holds now, read from the core at scrape time (`Core::gauges`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueGauges {
    pub messages: u64,
    /// Recipients pending, by where they wait.
    pub ready: u64,
    pub scheduled: u64,
    pub in_flight: u64,
    /// The oldest queued message's reception time (Unix ms).
    pub oldest_ms: Option<u64>,
    /// Sites with recipients pending, busiest first, at most `SITE_GAUGES_MAX` (see
    /// `Core::gauges`).
    pub sites: Vec<SiteGauge>,
    /// Operators' suspensions in force, site backoffs and adaptive actions.
    pub suspensions: u64,
    /// Egress sources out of rotation on this shard (by name).
    pub sources_down: Vec<String>,
    /// Egress sources under a warmup schedule on this shard (by name).
    pub sources_warming: Vec<String>,
    /// Delivery connections open or opening.
    pub connections_out: u64,
}

/// The rest of the gauges, read by the shard adapter from reception and the spool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageGauges {
    /// Inbound SMTP sessions open.
    pub connections_in: u64,
    /// Bytes of the spool's segment files, and how many there are.
    pub spool_bytes: u64,
    pub spool_segments: u64,
}

/// One shard's metrics at a scrape: a copy, sent over the mesh to the shard that merges.
#[derive(Clone, Debug)]
pub struct ShardMetrics {
    pub shard: usize,
    pub counts: Counts,
    /// Recipients bounced or expired, by bounce category.
    pub bounce_categories: BTreeMap<&'static str, u64>,
    /// Rejections sent to clients, by reply code and enhanced code.
    pub rejections: BTreeMap<replies::Rejection, u64>,
    pub sites: BTreeMap<String, Outcomes>,
    pub sources: BTreeMap<String, Outcomes>,
    /// Reception: from the end of a message's data to its `250` (µs).
    pub reception: Latency,
    /// Time in queue: reception to delivery, per delivered recipient (ms).
    pub queue: Latency,
    /// Delivery: one transaction, from MAIL FROM sent to the reply to its data (µs).
    pub delivery: Latency,
    pub queue_gauges: QueueGauges,
    pub stage_gauges: StageGauges,
    /// Alerts firing: shard 0 evaluates the rules and sends them with its part.
    pub alerts: Vec<alerts::Active>,
}

impl ShardMetrics {
    pub fn empty(shard: usize) -> ShardMetrics {
        ShardMetrics {
            shard,
            counts: Counts::default(),
            bounce_categories: BTreeMap::new(),
            rejections: BTreeMap::new(),
            sites: BTreeMap::new(),
            sources: BTreeMap::new(),
            reception: Latency::micros(),
            queue: Latency::millis(),
            delivery: Latency::micros(),
            queue_gauges: QueueGauges::default(),
            stage_gauges: StageGauges::default(),
            alerts: Vec::new(),
        }
    }
}

/// What a scrape adds of the process itself.
#[derive(Clone, Debug, Default)]
pub struct Process {
    pub ts_ms: u64,
    /// Every shard recovered and listens.
    pub ready: bool,
    pub hostname: String,
    pub uptime_s: u64,
    /// The spool filesystem's used percentage (None: statvfs failed).
    pub disk_used_pct: Option<f64>,
    /// Alerts firing (kept by shard 0, which evaluates them).
    pub alerts: Vec<alerts::Active>,
}

/// Every shard's metrics and their total.
#[derive(Clone, Debug)]
pub struct Merged {
    /// In shard order.
    pub shards: Vec<ShardMetrics>,
    /// Counters and histograms summed; site gauges summed per site (busiest first), the
    /// oldest message the oldest of all, source lists joined.
    pub total: ShardMetrics,
}

/// Merge the shards' parts (in any order). Histograms are merged with hdrhistogram's add.
pub fn merge(mut parts: Vec<ShardMetrics>) -> Merged {
    parts.sort_by_key(|p| p.shard);
    let mut total = ShardMetrics::empty(usize::MAX);
    let mut sites: BTreeMap<String, SiteGauge> = BTreeMap::new();
    for p in &parts {
        total.counts.add(&p.counts);
        for (k, v) in &p.bounce_categories {
            *total.bounce_categories.entry(k).or_default() += v;
        }
        for (k, v) in &p.rejections {
            *total.rejections.entry(*k).or_default() += v;
        }
        for (k, v) in &p.sites {
            total.sites.entry(k.clone()).or_default().add(v);
        }
        for (k, v) in &p.sources {
            total.sources.entry(k.clone()).or_default().add(v);
        }
        total.reception.merge(&p.reception);
        total.queue.merge(&p.queue);
        total.delivery.merge(&p.delivery);
        let (q, t) = (&p.queue_gauges, &mut total.queue_gauges);
        t.messages += q.messages;
        t.ready += q.ready;
        t.scheduled += q.scheduled;
        t.in_flight += q.in_flight;
        t.oldest_ms = older(t.oldest_ms, q.oldest_ms);
        t.suspensions += q.suspensions;
        t.connections_out += q.connections_out;
        t.sources_down.extend(q.sources_down.iter().cloned());
        t.sources_warming.extend(q.sources_warming.iter().cloned());
        for s in &q.sites {
            let row = sites.entry(s.site.clone()).or_insert_with(|| SiteGauge {
                site: s.site.clone(),
                ..SiteGauge::default()
            });
            row.ready += s.ready;
            row.scheduled += s.scheduled;
            row.in_flight += s.in_flight;
            row.oldest_ms = older(row.oldest_ms, s.oldest_ms);
            row.state = row.state.max(s.state);
        }
        let (g, t) = (&p.stage_gauges, &mut total.stage_gauges);
        t.connections_in += g.connections_in;
        t.spool_bytes += g.spool_bytes;
        t.spool_segments += g.spool_segments;
        total.alerts.extend(p.alerts.iter().cloned());
    }
    for list in [
        &mut total.queue_gauges.sources_down,
        &mut total.queue_gauges.sources_warming,
    ] {
        list.sort();
        list.dedup();
    }
    let mut sites: Vec<SiteGauge> = sites.into_values().collect();
    sites.sort_by_key(|s| std::cmp::Reverse(s.depth()));
    total.queue_gauges.sites = sites;
    Merged {
        shards: parts,
        total,
    }
}

fn older(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Count `outcome` under `key` in `map`, capped at `max` rows (the rest under [`OTHER`]).
/// Allocates only when a row is added.
fn count_capped(
    map: &mut HashMap<Box<str>, Outcomes>,
    key: &str,
    max: usize,
    outcome: AttemptOutcome,
) {
    if let Some(row) = map.get_mut(key) {
        return row.count(outcome);
    }
    let key = if map.len() < max { key } else { OTHER };
    map.entry(key.into()).or_default().count(outcome);
}

/// One shard's live counters and histograms. Single-threaded: the shard's stages call it
/// inline; every method is O(1) with no I/O (a scrape's [`Recorder::snapshot`] copies).
pub struct Recorder {
    received: Cell<u64>,
    attempts: Cell<Outcomes>,
    notices: Cell<u64>,
    suppressed: Cell<u64>,
    rejected: Cell<u64>,
    categories: RefCell<HashMap<&'static str, u64>>,
    rejections: RefCell<HashMap<replies::Rejection, u64>>,
    sites: RefCell<HashMap<Box<str>, Outcomes>>,
    sources: RefCell<HashMap<Box<str>, Outcomes>>,
    reception: RefCell<Latency>,
    queue: RefCell<Latency>,
    delivery: RefCell<Latency>,
}

impl Default for Recorder {
    fn default() -> Recorder {
        Recorder {
            received: Cell::new(0),
            attempts: Cell::new(Outcomes::default()),
            notices: Cell::new(0),
            suppressed: Cell::new(0),
            rejected: Cell::new(0),
            categories: RefCell::default(),
            rejections: RefCell::default(),
            sites: RefCell::default(),
            sources: RefCell::default(),
            reception: RefCell::new(Latency::micros()),
            queue: RefCell::new(Latency::millis()),
            delivery: RefCell::new(Latency::micros()),
        }
    }
}

impl Recorder {
    /// A message's data was taken and its `250` is going out, `us` after its data ended.
    pub fn reception_done(&self, us: u64) {
        self.reception.borrow_mut().record(us);
    }

    /// A delivery transaction ended with the reply to its data, `us` after its MAIL FROM.
    pub fn transaction_done(&self, us: u64) {
        self.delivery.borrow_mut().record(us);
    }

    /// Count the rejections among the replies in `out` (what a session is about to send).
    /// One pass over the bytes, no allocation unless a new kind of rejection is seen.
    pub fn replies_sent(&self, out: &[u8]) {
        replies::rejections(out, |kind| {
            self.rejected.set(self.rejected.get() + 1);
            let mut map = self.rejections.borrow_mut();
            let kind = match map.len() < REJECTION_KINDS_MAX || map.contains_key(&kind) {
                true => kind,
                false => kind.class(),
            };
            *map.entry(kind).or_default() += 1;
        });
    }

    /// Copy the counters and histograms, with the gauges the adapter read.
    pub fn snapshot(&self, shard: usize, queue: QueueGauges, stage: StageGauges) -> ShardMetrics {
        ShardMetrics {
            shard,
            counts: Counts {
                received: self.received.get(),
                attempts: self.attempts.get(),
                notices: self.notices.get(),
                suppressed: self.suppressed.get(),
                rejected: self.rejected.get(),
            },
            bounce_categories: self
                .categories
                .borrow()
                .iter()
                .map(|(k, v)| (*k, *v))
                .collect(),
            rejections: self
                .rejections
                .borrow()
                .iter()
                .map(|(k, n)| (*k, *n))
                .collect(),
            sites: copy_rows(&self.sites.borrow()),
            sources: copy_rows(&self.sources.borrow()),
            reception: self.reception.borrow().clone(),
            queue: self.queue.borrow().clone(),
            delivery: self.delivery.borrow().clone(),
            queue_gauges: queue,
            stage_gauges: stage,
            alerts: Vec::new(),
        }
    }
}

fn copy_rows(map: &HashMap<Box<str>, Outcomes>) -> BTreeMap<String, Outcomes> {
    map.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

impl Observer for Recorder {
    fn observe(&self, event: &Event<'_>) {
        match event {
            Event::Received(_) => self.received.set(self.received.get() + 1),
            Event::Attempt(e) => {
                let mut a = self.attempts.get();
                a.count(e.outcome);
                self.attempts.set(a);
                let fin = matches!(e.outcome, AttemptOutcome::Bounced | AttemptOutcome::Expired);
                if let Some(c) = e.bounce_category.filter(|_| fin) {
                    *self.categories.borrow_mut().entry(c.as_str()).or_default() += 1;
                }
                if e.outcome == AttemptOutcome::Delivered {
                    self.queue
                        .borrow_mut()
                        .record(e.ts_ms.saturating_sub(e.received_ms));
                }
                if let Some(site) = e.site {
                    count_capped(
                        &mut self.sites.borrow_mut(),
                        site,
                        SITES_TRACKED_MAX,
                        e.outcome,
                    );
                }
                if let Some(source) = e.source {
                    count_capped(
                        &mut self.sources.borrow_mut(),
                        source,
                        SOURCES_TRACKED_MAX,
                        e.outcome,
                    );
                }
            }
            Event::Notice(_) => self.notices.set(self.notices.get() + 1),
            Event::Suppressed(_) => self.suppressed.set(self.suppressed.get() + 1),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
