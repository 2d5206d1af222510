//! The core's side of queue operations (see `admin`): what one shard answers about its own
//! queue, and the holds, directives and rebinds operations leave behind.
//!
//! - **Directives** (suspend, bounce) apply to queued messages at once and to new ones until
//!   they end (`duration_s`; a suspension without one lasts until resumed). A suspended
//!   message waits in the schedule, untried, until the suspension ends or its deadline comes:
//!   a suspension never keeps a message past its max age.
//! - **Mass operations** (bounce, flush, resume) walk the queue [`MASS_STEP_SLOTS`] slots per
//!   [`Core::admin_step`], so the actions they cause (outcome records, releases) are performed
//!   a bounded batch at a time: memory stays flat however big the queue.
//!
//! No I/O; answers are JSON objects the admin server merges across shards.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::Core;
use crate::admin::{Op, Selector};
use crate::outcome::RcptResult;
use crate::queue::{Job, JobRcpts, Message, Names};
use crate::route::Hop;
use crate::smtp::reply::Reply;

/// Slots a mass operation walks per step: a step's actions (an outcome record and a release
/// per message, ~150 bytes) stay under a megabyte.
pub const MASS_STEP_SLOTS: usize = 4096;
/// A bounce directive without a duration holds this long for new messages.
pub const BOUNCE_DIRECTIVE_S_DEFAULT: u64 = 300;
/// Messages `inspect` lists at most (its `limit` is capped here).
pub const INSPECT_LIMIT_MAX: usize = 10_000;
/// Sites and tenants a summary lists per shard, busiest first.
pub const SUMMARY_ROWS_MAX: usize = 1_000;
/// Directives a shard keeps: operators do not need more, and each new message is checked
/// against all of them.
pub const DIRECTIVES_MAX: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum DirectiveKind {
    Suspend,
    Bounce { notify: bool },
}

/// A suspension or bounce in force.
#[derive(Clone, Debug)]
pub(super) struct Directive {
    pub(super) kind: DirectiveKind,
    pub(super) selector: Selector,
    /// None: until resumed (suspensions only).
    until_ms: Option<u64>,
    reason: String,
}

impl Directive {
    pub(super) fn live(&self, now_ms: u64) -> bool {
        self.until_ms.is_none_or(|u| now_ms < u)
    }
}

/// One step of an operation: its answer so far and where to go on (None: done).
pub struct Step {
    pub answer: Value,
    pub next: Option<usize>,
}

/// What a selector says about one message's recipient (`hop`: where it goes, when known).
fn selects(sel: &Selector, m: &Message, names: Names<'_>, rcpt: u16, site: Option<&str>) -> bool {
    match sel {
        Selector::Domain(d) => crate::envelope::domain_of(m.rcpt(rcpt)).eq_ignore_ascii_case(d),
        Selector::Tenant(t) => names.tenant == Some(t.as_str()),
        Selector::Campaign(c) => names.campaign == Some(c.as_str()),
        Selector::Id(id) => {
            m.reception().to_string() == *id
                || format!("{:#x}", m.id()) == *id
                || m.id().to_string() == *id
        }
        Selector::Site(s) => site.is_some_and(|k| site_matches(k, s)),
    }
}

/// A site selector names the site key (`mx1.example,mx2.example`, `[127.0.0.1:25]`) or one of
/// its hosts.
pub(super) fn site_matches(key: &str, sel: &str) -> bool {
    // A domain's own site is `hosts#domain`: its hosts still select it.
    let hosts = key.split_once('#').map_or(key, |(h, _)| h);
    key.eq_ignore_ascii_case(sel) || hosts.split(',').any(|h| h.eq_ignore_ascii_case(sel))
}

fn selector_text(sel: &Selector) -> String {
    match sel {
        Selector::Domain(d) => format!("domain {d}"),
        Selector::Site(s) => format!("site {s}"),
        Selector::Tenant(t) => format!("tenant {t}"),
        Selector::Campaign(c) => format!("campaign {c}"),
        Selector::Id(i) => format!("id {i}"),
    }
}

fn normalize(sel: &Selector) -> Selector {
    match sel {
        Selector::Domain(d) => Selector::Domain(d.trim().to_ascii_lowercase()),
        Selector::Site(s) => Selector::Site(s.trim().to_ascii_lowercase()),
        other => other.clone(),
    }
}

#[derive(Default)]
struct Row {
    ready: u64,
    scheduled: u64,
    in_flight: u64,
    oldest_ms: u64,
}

impl Row {
    fn add(&mut self, scheduled: bool, received_ms: u64) {
        match scheduled {
            true => self.scheduled += 1,
            false => self.ready += 1,
        }
        self.oldest_ms = match self.oldest_ms {
            0 => received_ms,
            o => o.min(received_ms),
        };
    }
}

impl Core {
    /// Perform operation `op` on this shard's queue (in one step; see [`Core::admin_step`]
    /// for mass operations) and answer with a JSON object.
    pub fn admin(&mut self, op: &Op, now_ms: u64) -> Value {
        let mut total = Value::Null;
        let mut cursor = 0;
        loop {
            let step = self.admin_step(op, cursor, now_ms);
            total = merge_counts(total, step.answer);
            match step.next {
                Some(next) => cursor = next,
                None => return total,
            }
        }
    }

    /// One step of `op` from slot `cursor` (0 to start). The caller performs the actions the
    /// step decided before the next one.
    pub fn admin_step(&mut self, op: &Op, cursor: usize, now_ms: u64) -> Step {
        let done = |answer: Value| Step { answer, next: None };
        match op {
            Op::Summary => done(self.summary(now_ms)),
            Op::Inspect { selector, limit } => done(self.inspect(
                &normalize(selector),
                limit.unwrap_or(100).min(INSPECT_LIMIT_MAX),
                now_ms,
            )),
            Op::Suspend {
                selector,
                duration_s,
                reason,
            } => {
                if cursor == 0 {
                    if let Err(e) = self.add_directive(
                        now_ms,
                        Directive {
                            kind: DirectiveKind::Suspend,
                            selector: normalize(selector),
                            until_ms: duration_s.map(|d| now_ms.saturating_add(d * 1000)),
                            reason: reason.clone().unwrap_or_default(),
                        },
                    ) {
                        return done(e);
                    }
                }
                self.mass(op, &normalize(selector), cursor, now_ms)
            }
            Op::Resume { selector } => {
                let sel = normalize(selector);
                let mut lifted = 0u64;
                if cursor == 0 {
                    let before = self.directives.len();
                    self.directives
                        .retain(|d| !(d.kind == DirectiveKind::Suspend && d.selector == sel));
                    lifted = (before - self.directives.len()) as u64;
                }
                let mut step = self.mass(op, &sel, cursor, now_ms);
                if cursor == 0 {
                    step.answer["lifted"] = json!(lifted);
                }
                step
            }
            Op::Bounce {
                selector,
                duration_s,
                reason,
                notify,
            } => {
                if matches!(selector, Selector::Id(_)) && duration_s.is_some() {
                    return done(json!({"error": "a bounce by id has no duration"}));
                }
                if cursor == 0 && !matches!(selector, Selector::Id(_)) {
                    let d = duration_s.unwrap_or(BOUNCE_DIRECTIVE_S_DEFAULT);
                    if let Err(e) = self.add_directive(
                        now_ms,
                        Directive {
                            kind: DirectiveKind::Bounce { notify: *notify },
                            selector: normalize(selector),
                            until_ms: Some(now_ms.saturating_add(d * 1000)),
                            reason: reason.clone().unwrap_or_default(),
                        },
                    ) {
                        return done(e);
                    }
                }
                self.mass(op, &normalize(selector), cursor, now_ms)
            }
            Op::Flush { selector } => {
                if cursor == 0 {
                    // Site backoffs end: this shard's holds, and the keys it owns.
                    let site = match selector {
                        Some(Selector::Site(s)) => Some(s.to_ascii_lowercase()),
                        _ => None,
                    };
                    self.holds
                        .retain(|k, _| site.as_deref().is_some_and(|s| !site_matches(&k.site, s)));
                    let mut out = Vec::new();
                    self.budgets.lift(site.as_deref(), now_ms, &mut out);
                    for (to, msg) in out {
                        self.send_lease(to, msg, now_ms);
                    }
                    self.site_changes(now_ms);
                }
                let sel = selector.as_ref().map(normalize);
                self.mass(
                    op,
                    &sel.unwrap_or(Selector::Domain(String::new())),
                    cursor,
                    now_ms,
                )
            }
            Op::Rebind { domain, pool } => done(self.rebind(domain, pool, now_ms)),
            Op::Reinject { .. } | Op::Suppression(_) | Op::Reload => done(json!({
                "error": format!("`{}` is not a queue operation", op.name())
            })),
        }
    }

    /// An adaptive rule's suspension (tenant, campaign) or bounce (a site), until `until_ms`:
    /// in force for new work as an operator's is, and applied to what waits in the ready
    /// queues now (held, or bounced without notices being skipped).
    pub(super) fn adaptive_directive(
        &mut self,
        bounce: bool,
        selector: Selector,
        until_ms: u64,
        reason: String,
        now_ms: u64,
    ) {
        let kind = match bounce {
            true => DirectiveKind::Bounce { notify: true },
            false => DirectiveKind::Suspend,
        };
        let d = Directive {
            kind,
            selector: normalize(&selector),
            until_ms: Some(until_ms),
            reason,
        };
        let sel = d.selector.clone();
        if self.add_directive(now_ms, d).is_err() {
            tracing::warn!(
                "shard {}: too many directives; an adaptive rule's was dropped",
                self.shard
            );
            return;
        }
        if !bounce {
            self.hold_ready_selected(&sel, now_ms);
            return;
        }
        let dests: Vec<crate::queue::Dest> = self.queue.ready_dests().cloned().collect();
        for dest in dests {
            let site = dest.hop.site_key();
            if !matches!(&sel, Selector::Site(s) if site_matches(&site, s)) {
                continue;
            }
            for job in self.queue.drain_ready(&dest) {
                let rest = self.apply_directives(job.id, job.rcpts, Some(&dest.hop), now_ms);
                if !rest.is_empty() {
                    self.queue.push_ready(
                        &dest,
                        Job {
                            id: job.id,
                            rcpts: rest,
                        },
                    );
                }
            }
        }
    }

    fn add_directive(&mut self, now_ms: u64, d: Directive) -> Result<(), Value> {
        self.directives.retain(|x| x.live(now_ms));
        // The same selector and kind: the new one replaces it.
        self.directives
            .retain(|x| !(x.selector == d.selector && x.kind == d.kind));
        if self.directives.len() >= DIRECTIVES_MAX {
            return Err(
                json!({"error": format!("at most {DIRECTIVES_MAX} suspensions and bounces at once")}),
            );
        }
        self.directives.push(d);
        Ok(())
    }

    /// The site key a recipient domain goes to now, when known without a lookup.
    pub(super) fn site_of(&self, domain: &str, now_ms: u64) -> Option<std::sync::Arc<str>> {
        match self.router.lookup(domain) {
            Ok(route) => Some(Hop::Route(route).site_key()),
            Err(_) => self.sites.get(domain, now_ms).map(|s| s.key.clone()),
        }
    }

    /// Walk slots `cursor..cursor + MASS_STEP_SLOTS` applying `op` to what `sel` selects.
    fn mass(&mut self, op: &Op, sel: &Selector, cursor: usize, now_ms: u64) -> Step {
        let all = matches!(op, Op::Flush { selector: None });
        let wants_site = matches!(sel, Selector::Site(_));
        // Candidates: messages with a recipient the selector picks (sites looked up once per
        // domain in the step).
        let mut site_cache: BTreeMap<String, Option<std::sync::Arc<str>>> = BTreeMap::new();
        let mut picks: Vec<(u64, JobRcpts)> = Vec::new();
        {
            let queue = &self.queue;
            let ids = queue.messages_from(cursor, MASS_STEP_SLOTS, |_| true);
            for id in ids {
                let Some(m) = queue.get(id) else { continue };
                let names = queue.names(m);
                let mut rcpts = JobRcpts::new();
                for r in 0..m.rcpt_count() as u16 {
                    if m.is_done(r) {
                        continue;
                    }
                    let site = if wants_site {
                        let domain = crate::envelope::domain_of(m.rcpt(r)).to_ascii_lowercase();
                        site_cache
                            .entry(domain.clone())
                            .or_insert_with(|| self.site_of(&domain, now_ms))
                            .clone()
                    } else {
                        None
                    };
                    if all || selects(sel, m, names, r, site.as_deref()) {
                        rcpts.push(r);
                    }
                }
                if !rcpts.is_empty() {
                    picks.push((id, rcpts));
                }
            }
        }
        let next = cursor + MASS_STEP_SLOTS;
        let next = (next < self.queue.slots_len()).then_some(next);
        let mut count = 0u64;
        match op {
            Op::Bounce { reason, notify, .. } => {
                let text = match reason.as_deref() {
                    Some(r) if !r.is_empty() => format!("Bounced by the operator: {r}"),
                    _ => "Bounced by the operator".to_owned(),
                };
                let reply = RcptResult::Reply(Reply::new(550, Some((5, 7, 1)), text));
                self.notices_off = !notify;
                for (id, rcpts) in picks {
                    count += rcpts.len() as u64;
                    let results: Vec<(u16, RcptResult)> =
                        rcpts.iter().map(|&r| (r, reply.clone())).collect();
                    self.record_results(id, &results, &super::Via::NONE, None, now_ms);
                }
                // Ready jobs of messages gone meanwhile are skipped when popped.
                self.notices_off = false;
                Step {
                    answer: json!({ "bounced": count }),
                    next,
                }
            }
            Op::Suspend { .. } => {
                // Ready jobs of the selection move to the schedule; scheduled ones are held
                // when they come due (dispatch checks the directives).
                let held = self.hold_ready_selected(sel, now_ms);
                Step {
                    answer: json!({ "held": held }),
                    next: None,
                }
            }
            Op::Resume { .. } | Op::Flush { .. } => {
                for (id, rcpts) in picks {
                    let scheduled = self.queue.scheduled_rcpts(id);
                    for r in rcpts.iter().filter(|r| scheduled.contains(r)) {
                        self.queue.schedule(id, *r, now_ms);
                        count += 1;
                    }
                }
                self.rearm();
                let key = match op {
                    Op::Flush { .. } => "flushed",
                    _ => "released",
                };
                Step {
                    answer: json!({ key: count }),
                    next,
                }
            }
            _ => Step {
                answer: Value::Null,
                next: None,
            },
        }
    }

    /// Ready jobs whose message the selector picks go to the schedule (held by the
    /// directive when they come due).
    fn hold_ready_selected(&mut self, sel: &Selector, now_ms: u64) -> u64 {
        let dests: Vec<crate::queue::Dest> = self.queue.ready_dests().cloned().collect();
        let mut held = 0u64;
        for dest in dests {
            let site = dest.hop.site_key();
            let hold = self.queue.retain_ready(&dest, |job, queued| {
                let picked = queued.is_some_and(|(m, names)| {
                    job.rcpts
                        .iter()
                        .any(|&r| selects(sel, m, names, r, Some(&site)))
                });
                !picked
            });
            held += hold.iter().map(|j| j.rcpts.len() as u64).sum::<u64>();
            let until = self.directive_until(sel, now_ms);
            self.hold_jobs(hold, Some(&dest.hop), until, HOLD_SUSPENDED, now_ms);
        }
        held
    }

    /// When a suspension of `sel` ends (its deadline if never).
    fn directive_until(&self, sel: &Selector, now_ms: u64) -> u64 {
        self.directives
            .iter()
            .find(|d| d.kind == DirectiveKind::Suspend && d.selector == *sel && d.live(now_ms))
            .and_then(|d| d.until_ms)
            .unwrap_or(u64::MAX)
    }

    /// New work meets the directives: the part of `rcpts` (all to `domain`) a bounce directive
    /// picks is bounced, the part a suspension picks is held; the rest is returned.
    pub(super) fn apply_directives(
        &mut self,
        id: u64,
        rcpts: JobRcpts,
        hop: Option<&Hop>,
        now_ms: u64,
    ) -> JobRcpts {
        if self.directives.is_empty() {
            return rcpts;
        }
        self.directives.retain(|d| d.live(now_ms));
        let site = hop.map(|h| h.site_key());
        let mut bounce: Vec<(u16, bool, String)> = Vec::new();
        let mut hold: Vec<(u16, u64)> = Vec::new();
        let mut rest = JobRcpts::new();
        {
            let Some(m) = self.queue.get(id) else {
                return rcpts;
            };
            let names = self.queue.names(m);
            for &r in &rcpts {
                let hit = self
                    .directives
                    .iter()
                    .find(|d| selects(&d.selector, m, names, r, site.as_deref()));
                match hit.map(|d| (&d.kind, d)) {
                    Some((DirectiveKind::Bounce { notify }, d)) => {
                        bounce.push((r, *notify, d.reason.clone()))
                    }
                    Some((DirectiveKind::Suspend, d)) => {
                        hold.push((r, d.until_ms.unwrap_or(u64::MAX)))
                    }
                    None => rest.push(r),
                }
            }
        }
        for (r, notify, reason) in bounce {
            let text = match reason.is_empty() {
                true => "Bounced by the operator".to_owned(),
                false => format!("Bounced by the operator: {reason}"),
            };
            let result = RcptResult::Reply(Reply::new(550, Some((5, 7, 1)), text));
            self.notices_off = !notify;
            self.record_results(id, &[(r, result)], &super::Via::NONE, hop, now_ms);
            self.notices_off = false;
        }
        if !hold.is_empty() {
            for (r, until) in hold {
                let job = Job {
                    id,
                    rcpts: smallvec::smallvec![r],
                };
                self.hold_jobs(vec![job], hop, until, HOLD_SUSPENDED, now_ms);
            }
        }
        rest
    }

    fn rebind(&mut self, domain: &str, pool: &str, now_ms: u64) -> Value {
        let domain = domain.trim().to_ascii_lowercase();
        let Some(index) = self
            .settings
            .egress
            .pools
            .iter()
            .position(|p| p.name == pool)
        else {
            return json!({"error": format!("no egress pool `{pool}`")});
        };
        self.rebinds.insert(domain.clone(), index);
        // Ready jobs for the domain through another pool are routed again.
        let dests: Vec<crate::queue::Dest> = self
            .queue
            .ready_dests()
            .filter(|d| d.pool != index)
            .cloned()
            .collect();
        let mut moved = Vec::new();
        for dest in dests {
            moved.extend(self.queue.retain_ready(&dest, |job, queued| {
                let mine = queued.is_some_and(|(m, _)| {
                    job.rcpts.first().is_some_and(|&r| {
                        crate::envelope::domain_of(m.rcpt(r)).eq_ignore_ascii_case(&domain)
                    })
                });
                !mine
            }));
        }
        let n = moved.len();
        for job in moved {
            self.dispatch(job.id, &job.rcpts, now_ms);
        }
        json!({ "rebound": n })
    }

    fn summary(&self, now_ms: u64) -> Value {
        let mut sites: BTreeMap<String, Row> = BTreeMap::new();
        let mut tenants: BTreeMap<String, Row> = BTreeMap::new();
        // Only mail with a campaign: a `-` row would be most of the queue again.
        let mut campaigns: BTreeMap<String, Row> = BTreeMap::new();
        let mut messages = 0u64;
        let mut site_cache: BTreeMap<String, String> = BTreeMap::new();
        for m in self.queue.messages() {
            messages += 1;
            let names = self.queue.names(m);
            let tenant = names.tenant.unwrap_or("-").to_owned();
            for r in 0..m.rcpt_count() as u16 {
                if m.is_done(r) {
                    continue;
                }
                let domain = crate::envelope::domain_of(m.rcpt(r)).to_ascii_lowercase();
                let site = site_cache
                    .entry(domain.clone())
                    .or_insert_with(|| match self.site_of(&domain, now_ms) {
                        Some(k) => k.to_string(),
                        None => format!("({domain})"),
                    })
                    .clone();
                let scheduled = m.due_ms(r).is_some();
                sites
                    .entry(site)
                    .or_default()
                    .add(scheduled, m.received_ms());
                tenants
                    .entry(tenant.clone())
                    .or_default()
                    .add(scheduled, m.received_ms());
                if let Some(c) = names.campaign {
                    // Looked up before allocating: one key per campaign, not per recipient.
                    match campaigns.get_mut(c) {
                        Some(row) => row.add(scheduled, m.received_ms()),
                        None => campaigns
                            .entry(c.to_owned())
                            .or_default()
                            .add(scheduled, m.received_ms()),
                    }
                }
            }
        }
        // Of the unscheduled, what is not in a ready queue is in flight.
        let mut ready_by_site: BTreeMap<String, u64> = BTreeMap::new();
        for dest in self.queue.ready_dests() {
            *ready_by_site
                .entry(dest.hop.site_key().to_string())
                .or_default() += self.queue.ready_rcpts(dest) as u64;
        }
        for (site, row) in sites.iter_mut() {
            let ready = ready_by_site.get(site).copied().unwrap_or(0).min(row.ready);
            row.in_flight = row.ready - ready;
            row.ready = ready;
        }
        let rows = |map: BTreeMap<String, Row>, key: &str| -> Vec<Value> {
            let mut v: Vec<(String, Row)> = map.into_iter().collect();
            v.sort_by_key(|(_, r)| std::cmp::Reverse(r.ready + r.scheduled + r.in_flight));
            v.truncate(SUMMARY_ROWS_MAX);
            v.into_iter()
                .map(|(name, r)| {
                    json!({
                        key: name,
                        "ready": r.ready,
                        "scheduled": r.scheduled,
                        "in_flight": r.in_flight,
                        "oldest_age_s": now_ms.saturating_sub(r.oldest_ms) / 1000,
                    })
                })
                .collect()
        };
        let mut suspensions: Vec<Value> = self
            .directives
            .iter()
            .filter(|d| d.live(now_ms))
            .map(|d| {
                json!({
                    "kind": match d.kind { DirectiveKind::Suspend => "suspend", DirectiveKind::Bounce { .. } => "bounce" },
                    "selector": selector_text(&d.selector),
                    "remaining_s": d.until_ms.map(|u| u.saturating_sub(now_ms) / 1000),
                    "reason": d.reason,
                })
            })
            .collect();
        for (key, until, failures, why) in self.budgets.down() {
            suspensions.push(json!({
                "kind": "backoff",
                "selector": format!("site {} source {}", key.site, self.settings.egress.sources.get(usize::from(key.source)).map_or("?", |s| s.name.as_str())),
                "remaining_s": until.saturating_sub(now_ms) / 1000,
                "failures": failures,
                "reason": why,
            }));
        }
        let (adaptive, warmup) = self.shaping_summary(now_ms);
        suspensions.extend(adaptive);
        let mut answer = json!({
            "shard": self.shard,
            "messages": messages,
            "sites": rows(sites, "site"),
            "tenants": rows(tenants, "tenant"),
            "campaigns": rows(campaigns, "campaign"),
            "suspensions": suspensions,
        });
        if !warmup.is_empty() {
            answer["warmup"] = Value::Array(warmup);
        }
        answer
    }

    /// One message by reception or queue id: its inspect row and where its record is (for
    /// `inspect-message`, which reads the body on demand). None: not queued on this shard.
    pub fn locate(&self, id: &str, now_ms: u64) -> Option<(crate::spool::Location, Value)> {
        let sel = Selector::Id(id.trim().to_owned());
        let row = self.inspect(&sel, 1, now_ms);
        let row = row["messages"].as_array()?.first()?.clone();
        let m = self
            .queue
            .messages()
            .find(|m| selects(&sel, m, self.queue.names(m), 0, None))?;
        Some((m.loc(), row))
    }

    fn inspect(&self, sel: &Selector, limit: usize, now_ms: u64) -> Value {
        let mut out: Vec<Value> = Vec::new();
        let wants_site = matches!(sel, Selector::Site(_));
        for m in self.queue.messages() {
            if out.len() >= limit {
                break;
            }
            let names = self.queue.names(m);
            let hit = (0..m.rcpt_count() as u16).any(|r| {
                let site = wants_site
                    .then(|| self.site_of(crate::envelope::domain_of(m.rcpt(r)), now_ms))
                    .flatten();
                selects(sel, m, names, r, site.as_deref())
            });
            if !hit {
                continue;
            }
            let rcpts: Vec<Value> = (0..m.rcpt_count() as u16)
                .map(|r| {
                    let state = if m.is_done(r) {
                        "done"
                    } else if m.due_ms(r).is_some() {
                        "scheduled"
                    } else {
                        "ready"
                    };
                    json!({
                        "rcpt": m.rcpt(r),
                        "state": state,
                        "attempts": m.attempts(r),
                        "next_attempt_ms": m.due_ms(r),
                    })
                })
                .collect();
            out.push(json!({
                "id": m.reception().to_string(),
                "queue_id": format!("{:#x}", m.id()),
                "shard": self.shard,
                "sender": m.sender(),
                "tenant": names.tenant,
                "campaign": names.campaign,
                "priority": m.priority().name(),
                "size": m.size(),
                "age_s": now_ms.saturating_sub(m.received_ms()) / 1000,
                "recipients": rcpts,
            }));
        }
        json!({ "shard": self.shard, "messages": out })
    }
}

/// Why a suspended message that reached its deadline expired.
const HOLD_SUSPENDED: &str = "Suspended by the operator until past the maximum age";

/// Sum the numbers of two step answers (objects of counts); the first non-object wins.
pub fn merge_counts(a: Value, b: Value) -> Value {
    match (a, b) {
        (Value::Null, b) => b,
        (Value::Object(mut a), Value::Object(b)) => {
            for (k, v) in b {
                match (a.get(&k).and_then(Value::as_u64), v.as_u64()) {
                    (Some(x), Some(y)) => {
                        a.insert(k, json!(x + y));
                    }
                    _ => {
                        a.entry(k).or_insert(v);
                    }
                }
            }
            Value::Object(a)
        }
        (a, _) => a,
    }
}
