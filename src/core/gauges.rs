//! The core's gauges for a metrics scrape: what its queue holds now, per site, and which
//! sites and sources are held back. Read-only; no I/O.
//!
//! Cost: one walk of the queue (every pending recipient of every message) and one site
//! lookup per distinct domain, at each scrape (not per message). That is the same walk as
//! `epoxi queue summary`; it keeps the hot path free of per-site gauge upkeep at the price of
//! O(queue) per scrape on this shard (measured in bench/metrics.sh; a deep queue makes a
//! scrape cost milliseconds of this shard's time, not the other shards').

use std::collections::HashMap;
use std::sync::Arc;

use super::ops::DirectiveKind;
use super::Core;
use crate::admin::Selector;
use crate::metrics::{QueueGauges, SiteGauge, SiteState};

/// Site rows a shard sends with its gauges, busiest first: the merge keeps the top of
/// each shard, and a dashboard shows 20; a long tail of sites would only fill the mesh.
pub const SITE_GAUGES_MAX: usize = 200;

impl Core {
    /// What the queue holds at `now_ms`.
    pub fn gauges(&self, now_ms: u64) -> QueueGauges {
        let mut g = QueueGauges {
            messages: self.queue.len() as u64,
            connections_out: self.conns.len() as u64,
            ..QueueGauges::default()
        };
        let suspends: Vec<&Selector> = self
            .directives
            .iter()
            .filter(|d| d.kind == DirectiveKind::Suspend && d.live(now_ms))
            .map(|d| &d.selector)
            .collect();
        // Pending recipients per site, unscheduled ones counted as ready for now.
        let mut sites: HashMap<Arc<str>, SiteGauge> = HashMap::new();
        let mut site_of: HashMap<String, Option<Arc<str>>> = HashMap::new();
        for m in self.queue.messages() {
            g.oldest_ms = Some(
                g.oldest_ms
                    .map_or(m.received_ms(), |o| o.min(m.received_ms())),
            );
            for r in 0..m.rcpt_count() as u16 {
                if m.is_done(r) {
                    continue;
                }
                let scheduled = m.due_ms(r).is_some();
                match scheduled {
                    true => g.scheduled += 1,
                    false => g.ready += 1,
                }
                let domain = crate::envelope::domain_of(m.rcpt(r));
                let site = match site_of.get(domain) {
                    Some(s) => s.clone(),
                    None => {
                        let s = self.site_of(&domain.to_ascii_lowercase(), now_ms);
                        site_of.insert(domain.to_owned(), s.clone());
                        s
                    }
                };
                let Some(site) = site else { continue };
                let row = sites.entry(site.clone()).or_insert_with(|| SiteGauge {
                    site: site.to_string(),
                    ..SiteGauge::default()
                });
                match scheduled {
                    true => row.scheduled += 1,
                    false => row.ready += 1,
                }
                row.oldest_ms = Some(
                    row.oldest_ms
                        .map_or(m.received_ms(), |o| o.min(m.received_ms())),
                );
                let suspended = suspends.iter().any(|s| match s {
                    Selector::Site(sel) => super::ops::site_matches(&site, sel),
                    Selector::Domain(d) => domain.eq_ignore_ascii_case(d),
                    _ => false,
                });
                if suspended {
                    row.state = SiteState::Suspended;
                }
            }
        }
        // Of the unscheduled, what is not in a ready queue is on a connection.
        let mut ready_by_site: HashMap<Arc<str>, u64> = HashMap::new();
        for dest in self.queue.ready_dests() {
            *ready_by_site.entry(dest.hop.site_key()).or_default() +=
                self.queue.ready_rcpts(dest) as u64;
        }
        let ready_all: u64 = ready_by_site.values().sum();
        g.in_flight = g.ready.saturating_sub(ready_all);
        g.ready -= g.in_flight;
        for (site, row) in sites.iter_mut() {
            let ready = ready_by_site.get(site).copied().unwrap_or(0).min(row.ready);
            row.in_flight = row.ready - ready;
            row.ready = ready;
        }
        // Held back: backoff (this shard owns the budget, or its owner said so), adaptive
        // throttles and suspensions.
        let mut raise = |site: &Arc<str>, state: SiteState| {
            if let Some(row) = sites.get_mut(site) {
                row.state = row.state.max(state);
            }
        };
        for (key, _, _, _) in self.budgets.down() {
            raise(&key.site, SiteState::Backoff);
        }
        for (key, (until, why)) in &self.holds {
            if *until > now_ms {
                // A warmup cap that ran out holds the key until its window ends: warming,
                // not a failing site.
                let state = match *why == super::shape::HOLD_WARMUP {
                    true => SiteState::Warming,
                    false => SiteState::Backoff,
                };
                raise(&key.site, state);
            }
        }
        for (key, (_, until)) in &self.throttles {
            if *until > now_ms {
                raise(&key.site, SiteState::Throttled);
            }
        }
        for (key, rule, until, _) in &self.adaptive_active {
            let action = self
                .settings
                .adaptive
                .rules()
                .get(usize::from(*rule))
                .map(|r| r.action.name());
            if *until > now_ms && action == Some("suspend") {
                raise(&key.site, SiteState::Suspended);
            }
        }
        // Warming: a source with a warmup schedule still in force for the site's provider
        // (from the settings and the site's memoised shape: no owner shard needed).
        let warming_sources: Vec<&crate::shaping::SourceWarmup> =
            self.settings.source_warmups.iter().flatten().collect();
        if !warming_sources.is_empty() {
            for (hop, shape) in &self.shapes {
                let provider = self.settings.shaping.provider_name(shape.provider);
                let warming = warming_sources.iter().any(|w| {
                    self.settings
                        .warmups
                        .get(w.schedule)
                        .caps(provider, w.start_ms, now_ms)
                        .is_some()
                });
                if warming {
                    raise(&hop.site_key(), SiteState::Warming);
                }
            }
        }
        let mut rows: Vec<SiteGauge> = sites.into_values().collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.depth()));
        rows.truncate(SITE_GAUGES_MAX);
        g.sites = rows;
        g.suspensions = (suspends.len()
            + self.budgets.down().count()
            + self.adaptive_active.iter().filter(|a| a.2 > now_ms).count())
            as u64;
        let name = |s: usize| self.settings.egress.sources.get(s).map(|s| s.name.clone());
        g.sources_down = self.health.down_sources(now_ms).filter_map(name).collect();
        g.sources_warming = self
            .meters
            .warmups(now_ms)
            .filter_map(|(source, ..)| name(usize::from(source)))
            .collect();
        g.sources_warming.sort();
        g.sources_warming.dedup();
        g
    }
}
