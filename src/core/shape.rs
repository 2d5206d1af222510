//! The core's shaping side: the rates, warmup caps and adaptive rules a connection's next
//! message meets (see `shaping`), and the owner's side of each.
//!
//! - **Rates and caps**: before a connection takes a message, [`Core::rate_gate`] checks a
//!   credit of every key that applies (the (site, source)'s rate, the site's, the source's,
//!   a warming source's caps for the site's provider) and asks the owners for the missing
//!   ones. A warmup cap that ran out holds the (site, source) until its window ends: other
//!   sources of the pool take the site's mail meanwhile, or it waits.
//! - **Adaptive rules**: a failed reply that matches a rule is reported to the (site,
//!   source)'s owner ([`LeaseMsg::Matched`]), which counts it; at the rule's threshold the
//!   owner logs the action and tells every shard ([`LeaseMsg::Shaped`]), which applies it
//!   until it ends: a suspension holds the key, a throttle lowers its rate (and the owner
//!   caps its connections), a tenant's or campaign's suspension or a site's bounce becomes a
//!   directive as an operator's does. The owner logs it lifted when its duration ends.
//!
//! No I/O.

use std::sync::Arc;

use serde_json::{json, Value};
use smallvec::SmallVec;

use super::{Action, Core};
use crate::admin::Selector;
use crate::egress::lease::{owner_of, LeaseKey, LeaseMsg, Outgoing};
use crate::events::{Event, Shaping};
use crate::queue::Dest;
use crate::route::Hop;
use crate::shaping::credits::{Check, Limit, MeterKey};
use crate::shaping::Action as Adaptive;

/// Why held messages expire when an adaptive suspension outlasts their max age.
const HOLD_ADAPTIVE: &str = "Destination suspended by an adaptive shaping rule";
/// ... when a warming source's cap keeps them past it (and no other source can take them).
pub(super) const HOLD_WARMUP: &str = "Warmup volume cap reached for this destination";
/// The provider index of sites of no provider, in warmup keys.
const NO_PROVIDER: u16 = u16::MAX;

impl Core {
    /// A request for something this shard owns: a connection budget, a rate's credits, or
    /// an adaptive rule's count.
    pub(super) fn owner_handle(
        &mut self,
        from: usize,
        msg: LeaseMsg,
        now_ms: u64,
    ) -> Vec<Outgoing> {
        match msg {
            LeaseMsg::Want { key, limit, want } => {
                let a = self.meters.ask(&key, limit, want, now_ms);
                vec![(
                    from,
                    LeaseMsg::Credit {
                        key,
                        granted: a.granted,
                        retry_at_ms: a.retry_at_ms,
                    },
                )]
            }
            LeaseMsg::Matched {
                key,
                rule,
                tenant,
                campaign,
            } => {
                self.adaptive_matched(key, rule, tenant, campaign, now_ms);
                Vec::new()
            }
            msg => {
                let out = self.budgets.handle(from, msg, now_ms);
                // A request may wait for its connection rate: the timer must know when.
                if self.budgets.next_due_ms().is_some() {
                    self.rearm();
                }
                out
            }
        }
    }

    /// Whether `key` is held now (a backoff, an adaptive suspension, a warmup cap).
    pub(super) fn held(&self, key: &LeaseKey, now_ms: u64) -> bool {
        !self.holds.is_empty() && self.holds.get(key).is_some_and(|&(u, _)| u > now_ms)
    }

    /// Whether a connection of `dest` from `source` may take a message now under the rates
    /// and caps that apply; asks the owners for credits that are missing. Err: not now; wait
    /// until then at most (None: until woken by an answer). Free when nothing applies.
    pub(super) fn rate_gate(
        &mut self,
        dest: &Dest,
        lkey: &LeaseKey,
        now_ms: u64,
    ) -> Result<(), Option<u64>> {
        let source = usize::from(lkey.source);
        let warm = self.settings.source_warmups.get(source).copied().flatten();
        if !self.settings.shaping.any_rates() && self.throttles.is_empty() && warm.is_none() {
            return Ok(());
        }
        let site_shape = self.shape_of(&dest.hop);
        let shape = *site_shape.of(source);
        // The connection's key has the site key already: no formatting per message.
        let site = &lkey.site;
        let mut message_rate = shape.message_rate;
        if let Some(&(rule, until)) = self.throttles.get(lkey) {
            match (
                until > now_ms,
                self.settings.adaptive.rules().get(usize::from(rule)),
            ) {
                (
                    true,
                    Some(crate::shaping::AdaptiveRule {
                        action:
                            Adaptive::Throttle {
                                message_rate: fixed,
                                rate_factor,
                                ..
                            },
                        ..
                    }),
                ) => {
                    message_rate = fixed
                        .or_else(|| rate_factor.and_then(|f| message_rate.map(|r| r.scaled(f))))
                        .or(message_rate);
                }
                _ => {
                    self.throttles.remove(lkey);
                }
            }
        }
        let mut keys: SmallVec<[(MeterKey, Limit); 4]> = SmallVec::new();
        if let Some(r) = message_rate {
            keys.push((
                MeterKey::SiteSource {
                    site: site.clone(),
                    source: source as u16,
                },
                Limit::Rate(r),
            ));
        }
        if let Some(r) = shape.site_message_rate {
            keys.push((MeterKey::Site(site.clone()), Limit::Rate(r)));
        }
        if let Some(r) = self.settings.shaping.source_rate(source) {
            keys.push((MeterKey::Source(source as u16), Limit::Rate(r)));
        }
        if let Some(w) = warm {
            let provider = self.settings.shaping.provider_name(site_shape.provider);
            let schedule = self.settings.warmups.get(w.schedule);
            if let Some(caps) = schedule.caps(provider, w.start_ms, now_ms) {
                keys.push((
                    MeterKey::Warmup {
                        source: source as u16,
                        provider: site_shape.provider.unwrap_or(NO_PROVIDER),
                    },
                    Limit::Caps(caps),
                ));
            }
        }
        if keys.is_empty() {
            return Ok(());
        }
        let backlog = self.queue.ready_for(dest);
        let mut result: Result<(), Option<u64>> = Ok(());
        let later = |result: &mut Result<(), Option<u64>>, at: Option<u64>| {
            *result = match (*result, at) {
                (Err(Some(t)), Some(at)) => Err(Some(t.min(at))),
                (Err(None), _) | (_, None) => Err(None),
                (Ok(()), at) => Err(at),
            }
        };
        for (key, limit) in &keys {
            let batch = limit.batch_max();
            let check = match self.credits.check(key, batch, backlog, now_ms) {
                Check::Ask(want) => {
                    self.want_credits(key, *limit, want, now_ms);
                    // A local owner has answered already.
                    self.credits.check(key, batch, backlog, now_ms)
                }
                other => other,
            };
            match check {
                Check::Ready => {}
                Check::Ask(_) | Check::Asking => later(&mut result, None),
                Check::Wait(at) => {
                    if let (MeterKey::Warmup { .. }, Limit::Caps(_)) = (key, limit) {
                        // The cap ran out until its window ends: the pool's other sources
                        // take this site's mail meanwhile (or it waits).
                        self.holds.insert(lkey.clone(), (at, HOLD_WARMUP));
                        self.actions.push(Action::WakeIdle);
                    }
                    later(&mut result, Some(at));
                }
            }
        }
        if result.is_ok() {
            for (key, limit) in &keys {
                // Under half a batch left with more waiting: the next batch is asked now.
                if let Some(want) = self.credits.spend(key, limit.batch_max(), backlog, now_ms) {
                    self.want_credits(key, *limit, want, now_ms);
                }
            }
        }
        result
    }

    /// Whether a message of tenant `tenant` (its queue id) may go now under its tenant's
    /// rate: a credit is spent if so; if not, the tenant is blocked until its next credit.
    pub(super) fn tenant_credit(&mut self, tenant: u16, now_ms: u64) -> bool {
        let Some(name) = self.queue.tenant_name(tenant) else {
            return true;
        };
        let Some(rate) = self.settings.shaping.tenant_rate(name) else {
            return true;
        };
        let key = MeterKey::Tenant(Arc::from(name.to_ascii_lowercase()));
        let batch = rate.burst.max(1);
        let mut check = self.credits.check(&key, batch, usize::MAX, now_ms);
        if let Check::Ask(want) = check {
            self.want_credits(&key, Limit::Rate(rate), want, now_ms);
            check = self.credits.check(&key, batch, usize::MAX, now_ms);
        }
        match check {
            Check::Ready => {
                if let Some(want) = self.credits.spend(&key, batch, usize::MAX, now_ms) {
                    self.want_credits(&key, Limit::Rate(rate), want, now_ms);
                }
                true
            }
            Check::Wait(at) => {
                self.tenant_blocked.insert(tenant, Some(at));
                self.rearm();
                false
            }
            Check::Ask(_) | Check::Asking => {
                self.tenant_blocked.insert(tenant, None);
                false
            }
        }
    }

    /// Failed replies of one attempt (`hop` from `source`) that matched adaptive rules
    /// `rules`: reported to the key's owner.
    pub(super) fn adaptive_report(
        &mut self,
        hop: &Hop,
        source: usize,
        rules: &[u16],
        tenant: Option<&str>,
        campaign: Option<&str>,
        now_ms: u64,
    ) {
        let key = LeaseKey {
            site: hop.site_key(),
            source: source as u16,
        };
        let to = owner_of(&key, self.shards);
        for &rule in rules {
            self.send_lease(
                to,
                LeaseMsg::Matched {
                    key: key.clone(),
                    rule,
                    tenant: tenant.map(Arc::from),
                    campaign: campaign.map(Arc::from),
                },
                now_ms,
            );
        }
    }

    /// The rule sites of `hop` are matched on: its MX hosts (a domain's own site: its hosts),
    /// a route's host.
    pub(super) fn adaptive_hosts(hop: &Hop) -> Arc<str> {
        match hop {
            Hop::Route(d) => Arc::from(d.host.as_str()),
            Hop::Mx(site) => match site.key.split_once('#') {
                Some((hosts, _)) => Arc::from(hosts),
                None => site.key.clone(),
            },
        }
    }

    /// As owner of `key`: count a match of `rule`; at its threshold, act.
    fn adaptive_matched(
        &mut self,
        key: LeaseKey,
        rule: u16,
        tenant: Option<Arc<str>>,
        campaign: Option<Arc<str>>,
        now_ms: u64,
    ) {
        let Some(trigger) = self.tracker.record(rule, &key, now_ms) else {
            return;
        };
        let Some(r) = self.adaptive_rule(rule) else {
            return;
        };
        let target = match r.action {
            Adaptive::SuspendTenant => tenant,
            Adaptive::SuspendCampaign => campaign,
            _ => None,
        };
        if matches!(
            r.action,
            Adaptive::SuspendTenant | Adaptive::SuspendCampaign
        ) && target.is_none()
        {
            tracing::info!(
                "shard {}: adaptive rule `{}` reached its threshold for a message without a {}",
                self.shard,
                r.name,
                if matches!(r.action, Adaptive::SuspendTenant) {
                    "tenant"
                } else {
                    "campaign"
                }
            );
            return;
        }
        let until = trigger.until_ms;
        if let Adaptive::Throttle {
            connections_max: Some(cap),
            ..
        } = r.action
        {
            self.budgets.cap(&key, cap, until, now_ms);
        }
        self.adaptive_active
            .push((key.clone(), rule, until, target.clone()));
        let source = self.source_name(key.source);
        tracing::warn!(
            "shard {}: adaptive rule `{}` ({}): {} site {} from source `{source}` for {} s",
            self.shard,
            r.name,
            r.threshold,
            r.action.name(),
            key.site,
            until.saturating_sub(now_ms).div_ceil(1000)
        );
        self.emit_shaping(&key, &r, target.as_deref(), until, false, now_ms);
        for to in 0..self.shards {
            let msg = LeaseMsg::Shaped {
                key: key.clone(),
                rule,
                until_ms: until,
                target: target.clone(),
            };
            match to == self.shard {
                true => self.shaped(key.clone(), rule, until, target.clone(), now_ms),
                false => self.actions.push(Action::Lease { to, msg }),
            }
        }
        self.rearm();
    }

    /// Apply adaptive rule `rule`'s action on `key` until `until_ms` (every shard).
    pub(super) fn shaped(
        &mut self,
        key: LeaseKey,
        rule: u16,
        until_ms: u64,
        target: Option<Arc<str>>,
        now_ms: u64,
    ) {
        let Some(r) = self.adaptive_rule(rule) else {
            return;
        };
        let reason = format!("adaptive rule {}", r.name);
        match r.action {
            Adaptive::Suspend => {
                let held = self.holds.entry(key).or_insert((until_ms, HOLD_ADAPTIVE));
                *held = (held.0.max(until_ms), HOLD_ADAPTIVE);
                // Its connections close after the message they carry.
                self.actions.push(Action::WakeIdle);
            }
            Adaptive::Throttle { .. } => {
                self.throttles.insert(key, (rule, until_ms));
            }
            Adaptive::SuspendTenant => {
                if let Some(t) = target {
                    self.adaptive_directive(
                        false,
                        Selector::Tenant(t.to_string()),
                        until_ms,
                        reason,
                        now_ms,
                    );
                }
            }
            Adaptive::SuspendCampaign => {
                if let Some(c) = target {
                    self.adaptive_directive(
                        false,
                        Selector::Campaign(c.to_string()),
                        until_ms,
                        reason,
                        now_ms,
                    );
                }
            }
            Adaptive::Bounce => {
                self.adaptive_directive(
                    true,
                    Selector::Site(key.site.to_string()),
                    until_ms,
                    reason,
                    now_ms,
                );
            }
        }
        self.rearm();
    }

    /// The `ShapingAction` / `ShapingLifted` event of rule `r` on `key`.
    fn emit_shaping(
        &self,
        key: &LeaseKey,
        r: &crate::shaping::AdaptiveRule,
        target: Option<&str>,
        until_ms: u64,
        lifted: bool,
        now_ms: u64,
    ) {
        let source = self.source_name(key.source);
        let detail = adaptive_detail(r);
        self.observers.emit(&Event::Shaping(Shaping {
            ts_ms: now_ms,
            shard: self.shard,
            rule: &r.name,
            action: r.action.name(),
            site: &key.site,
            source: &source,
            target,
            until_ms,
            lifted,
            detail: &detail,
        }));
    }

    /// Ask `key`'s owner for `want` credits under `limit`.
    fn want_credits(&mut self, key: &MeterKey, limit: Limit, want: u32, now_ms: u64) {
        let to = crate::shaping::credits::owner_of(key, self.shards);
        let msg = LeaseMsg::Want {
            key: key.clone(),
            limit,
            want,
        };
        self.send_lease(to, msg, now_ms);
    }

    /// Adaptive rule `rule` of the settings in force (None after a reload took it away).
    fn adaptive_rule(&self, rule: u16) -> Option<crate::shaping::AdaptiveRule> {
        self.settings
            .adaptive
            .rules()
            .get(usize::from(rule))
            .cloned()
    }

    fn source_name(&self, source: u16) -> String {
        self.settings
            .egress
            .sources
            .get(usize::from(source))
            .map_or_else(|| "?".to_owned(), |s| s.name.clone())
    }

    /// The owner's adaptive actions whose time is up are lifted (and logged so).
    pub(super) fn shaping_tick(&mut self, now_ms: u64) {
        if self.adaptive_active.iter().any(|a| a.2 <= now_ms) {
            let (ended, active): (Vec<_>, Vec<_>) = std::mem::take(&mut self.adaptive_active)
                .into_iter()
                .partition(|a| a.2 <= now_ms);
            self.adaptive_active = active;
            for (key, rule, until, target) in ended {
                let Some(r) = self.adaptive_rule(rule) else {
                    continue;
                };
                let source = self.source_name(key.source);
                tracing::info!(
                    "shard {}: adaptive rule `{}`: {} of site {} from source `{source}` lifted",
                    self.shard,
                    r.name,
                    r.action.name(),
                    key.site
                );
                self.emit_shaping(&key, &r, target.as_deref(), until, true, now_ms);
            }
        }
        if self.tracker.next_expiry_ms().is_some_and(|t| t <= now_ms) {
            let _ = self.tracker.expire(now_ms);
        }
        if !self.throttles.is_empty() {
            self.throttles.retain(|_, (_, until)| *until > now_ms);
        }
        if self
            .tenant_blocked
            .values()
            .any(|u| u.is_some_and(|u| u <= now_ms))
        {
            // Their next credit may be asked for: connections waiting for work look again.
            self.tenant_blocked
                .retain(|_, u| u.is_none_or(|u| u > now_ms));
            self.actions.push(Action::WakeIdle);
        }
    }

    /// When an owner's adaptive action ends next.
    pub(super) fn shaping_next_ms(&self) -> Option<u64> {
        let ends = self.adaptive_active.iter().map(|a| a.2).min();
        // A tenant's next credit may be asked for then.
        let tenants = self.tenant_blocked.values().flatten().copied().min();
        [ends, self.tracker.next_expiry_ms(), tenants]
            .into_iter()
            .flatten()
            .min()
    }

    /// What shaping is doing, as owner: adaptive actions in force (as suspensions rows) and
    /// the warmup progress of the sources' keys this shard owns.
    pub(super) fn shaping_summary(&self, now_ms: u64) -> (Vec<Value>, Vec<Value>) {
        let adaptive = self
            .adaptive_active
            .iter()
            .filter(|a| a.2 > now_ms)
            .filter_map(|(key, rule, until, target)| {
                let r = self.settings.adaptive.rules().get(usize::from(*rule))?;
                Some(json!({
                    "kind": format!("adaptive {}", r.action.name()),
                    "selector": match target {
                        Some(t) => format!("site {} source {} ({t})", key.site, self.source_name(key.source)),
                        None => format!("site {} source {}", key.site, self.source_name(key.source)),
                    },
                    "remaining_s": until.saturating_sub(now_ms) / 1000,
                    "reason": format!("rule {} ({}): {}", r.name, r.threshold, adaptive_detail(r)),
                }))
            })
            .collect();
        let warmup = self
            .meters
            .warmups(now_ms)
            .map(|(source, provider, caps, today, hour)| {
                let provider = match provider {
                    NO_PROVIDER => "other",
                    p => self.settings.shaping.provider_name(Some(p)),
                };
                json!({
                    "source": self.source_name(source),
                    "provider": provider,
                    "stage": format!("{}/{}", caps.stage + 1, caps.stages),
                    "day": caps.day + 1,
                    "today": format!("{today}/{}", caps.daily),
                    "this_hour": match caps.hourly {
                        Some(h) => format!("{hour}/{h}"),
                        None => format!("{hour}"),
                    },
                })
            })
            .collect();
        (adaptive, warmup)
    }
}

/// What a rule does, in words, for its events and summaries.
fn adaptive_detail(r: &crate::shaping::AdaptiveRule) -> String {
    match r.action {
        Adaptive::Throttle {
            message_rate,
            rate_factor,
            connections_max,
        } => {
            let mut parts = Vec::new();
            if let Some(rate) = message_rate {
                parts.push(format!("message_rate {rate}"));
            }
            if let Some(f) = rate_factor {
                parts.push(format!("rate x{f}"));
            }
            if let Some(c) = connections_max {
                parts.push(format!("connections_max {c}"));
            }
            format!("{} after {}", parts.join(", "), r.threshold)
        }
        _ => format!("after {}", r.threshold),
    }
}
