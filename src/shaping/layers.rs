//! Layered limits: what one (site, source) may do, resolved from the configuration's layers.
//!
//! Each delivery path is a site (an MX host set, a static route, or a recipient domain with
//! limits of its own) and an egress source. Its [`Shape`] starts from the defaults
//! (`[delivery]` and `[shaping]`), then takes, in this order, the values of:
//!
//! 1. its **provider** (`[[provider]]`, or a built-in one: the first whose MX globs match one
//!    of the site's hosts),
//! 2. the first **site** table (`[[site]]` without `source`) whose `mx` glob matches one of its
//!    hosts or whose `provider` is its provider,
//! 3. its **domain**'s table (`[[domain]]` without `source`), when the site is a domain's own,
//! 4. then the **source overrides**: the first `[[site]]` with this `source` that matches, and
//!    the domain's table with this `source`.
//!
//! A later layer replaces the keys it sets and keeps the others. Rates per source (across
//! sites) sit on `[[source]]`, rates per tenant on `[[tenant]]`. [`Layers::explain`] says
//! where each effective value came from (`epoxi check-config --site`).
//!
//! Resolution scans the tables; the core memoises one [`SiteShape`] per site, so it runs
//! once per site and reload, not per message.

use std::collections::HashMap;

use super::rate::Rate;
use crate::config::{Config, ConfigError, LimitKeys, ProviderEntry};
use crate::route::{DomainGlob, Hop};

/// The built-in providers (`providers.toml`).
const PROVIDERS_TOML: &str = include_str!("providers.toml");
/// The most providers: their index is kept in 16 bits, and each site is matched against all.
pub const PROVIDERS_MAX: usize = 1024;

/// What one (site, source) may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Connections open at once, across shards.
    pub connections_max: u32,
    /// New connections per period.
    pub connection_rate: Option<Rate>,
    /// Messages (transactions) per period from this source.
    pub message_rate: Option<Rate>,
    /// Messages per period to the whole site, over every source.
    pub site_message_rate: Option<Rate>,
    pub messages_per_connection_max: u32,
    pub rcpts_per_transaction_max: u32,
    pub idle_timeout_ms: u64,
}

/// One layer's values: the keys it sets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Partial {
    connections_max: Option<u32>,
    connection_rate: Option<Rate>,
    message_rate: Option<Rate>,
    site_message_rate: Option<Rate>,
    messages_per_connection_max: Option<u32>,
    rcpts_per_transaction_max: Option<u32>,
    idle_timeout_ms: Option<u64>,
}

/// One effective value and the layer it came from, for `check-config`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explained {
    pub key: &'static str,
    pub value: String,
    pub origin: String,
}

impl Partial {
    fn apply(
        &self,
        s: &mut Shape,
        origin: &str,
        mut why: Option<&mut HashMap<&'static str, String>>,
    ) {
        let mut note = |key: &'static str, set: bool| {
            if let (true, Some(w)) = (set, why.as_deref_mut()) {
                w.insert(key, origin.to_owned());
            }
        };
        if let Some(v) = self.connections_max {
            s.connections_max = v;
        }
        note("connections_max", self.connections_max.is_some());
        if self.connection_rate.is_some() {
            s.connection_rate = self.connection_rate;
        }
        note("connection_rate", self.connection_rate.is_some());
        if self.message_rate.is_some() {
            s.message_rate = self.message_rate;
        }
        note("message_rate", self.message_rate.is_some());
        if self.site_message_rate.is_some() {
            s.site_message_rate = self.site_message_rate;
        }
        note("site_message_rate", self.site_message_rate.is_some());
        if let Some(v) = self.messages_per_connection_max {
            s.messages_per_connection_max = v;
        }
        note(
            "messages_per_connection_max",
            self.messages_per_connection_max.is_some(),
        );
        if let Some(v) = self.rcpts_per_transaction_max {
            s.rcpts_per_transaction_max = v;
        }
        note(
            "rcpts_per_transaction_max",
            self.rcpts_per_transaction_max.is_some(),
        );
        if let Some(v) = self.idle_timeout_ms {
            s.idle_timeout_ms = v;
        }
        note("idle_timeout_ms", self.idle_timeout_ms.is_some());
    }
}

struct Provider {
    name: String,
    globs: Vec<DomainGlob>,
    values: Partial,
    origin: String,
}

enum SiteMatch {
    Mx(DomainGlob),
    Provider(u16),
}

struct SiteLayer {
    matcher: SiteMatch,
    source: Option<u16>,
    values: Partial,
    origin: String,
}

struct DomainLayer {
    source: Option<u16>,
    values: Partial,
    origin: String,
}

/// The compiled layers; the same on every shard.
pub struct Layers {
    default: Shape,
    providers: Vec<Provider>,
    sites: Vec<SiteLayer>,
    /// Lower-case domain → its tables (with and without `source`).
    domains: HashMap<String, Vec<DomainLayer>>,
    /// Per source index: its message rate over all sites.
    source_rates: Vec<Option<Rate>>,
    /// Lower-case tenant → its message rate over all sites.
    tenant_rates: HashMap<String, Rate>,
    /// Whether any layer sets a message rate.
    any_rates: bool,
}

impl std::fmt::Debug for Layers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layers")
            .field("default", &self.default)
            .field(
                "providers",
                &self.providers.iter().map(|p| &p.name).collect::<Vec<_>>(),
            )
            .field("sites", &self.sites.len())
            .field("domains", &self.domains.len())
            .finish()
    }
}

/// What the core memoises per site: its provider, and the shape from each source.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteShape {
    pub provider: Option<u16>,
    /// Without source overrides (for what does not depend on the source: transaction size).
    pub base: Shape,
    /// Indexed by source.
    pub per_source: Vec<Shape>,
}

impl SiteShape {
    pub fn of(&self, source: usize) -> &Shape {
        self.per_source.get(source).unwrap_or(&self.base)
    }
}

/// Collects every error of the shaping tables, so `check-config` can report them all.
#[derive(Default)]
struct Errors(Vec<ConfigError>);

impl Errors {
    fn push(&mut self, table: &'static str, index: usize, key: &'static str, reason: String) {
        self.0.push(ConfigError::InTable {
            table,
            index,
            key,
            reason,
        });
    }
}

fn rate(
    errors: &mut Errors,
    table: &'static str,
    index: usize,
    key: &'static str,
    text: Option<&str>,
) -> Option<Rate> {
    match text.map(Rate::parse) {
        Some(Ok(r)) => Some(r),
        Some(Err(e)) => {
            errors.push(table, index, key, e);
            None
        }
        None => None,
    }
}

fn partial(errors: &mut Errors, table: &'static str, index: usize, k: &LimitKeys<'_>) -> Partial {
    let mut count = |key: &'static str, v: Option<usize>| -> Option<u32> {
        match v {
            Some(0) => {
                errors.push(table, index, key, "must be at least 1".into());
                None
            }
            Some(n) => Some(n.min(u32::MAX as usize) as u32),
            None => None,
        }
    };
    let connections_max = count("connections_max", k.connections_max);
    let messages_per_connection_max =
        count("messages_per_connection_max", k.messages_per_connection_max);
    let rcpts_per_transaction_max = count("rcpts_per_transaction_max", k.rcpts_per_transaction_max);
    if k.idle_timeout_ms == Some(0) {
        errors.push(table, index, "idle_timeout_ms", "must be at least 1".into());
    }
    Partial {
        connections_max,
        connection_rate: rate(errors, table, index, "connection_rate", k.connection_rate),
        message_rate: rate(errors, table, index, "message_rate", k.message_rate),
        site_message_rate: rate(
            errors,
            table,
            index,
            "site_message_rate",
            k.site_message_rate,
        ),
        messages_per_connection_max,
        rcpts_per_transaction_max,
        idle_timeout_ms: k.idle_timeout_ms.filter(|&v| v > 0),
    }
}

/// The built-in providers, parsed.
pub fn builtin_providers() -> Vec<ProviderEntry> {
    #[derive(serde::Deserialize)]
    struct File {
        provider: Vec<ProviderEntry>,
    }
    match toml::from_str::<File>(PROVIDERS_TOML) {
        Ok(f) => f.provider,
        Err(e) => {
            // A unit test parses the file: this cannot happen in a release.
            tracing::error!("built-in providers.toml does not parse: {e}");
            Vec::new()
        }
    }
}

impl Layers {
    /// Compile the shaping tables of `cfg`; `sources` are the egress sources' names, by index.
    /// Every error is reported (as [`ConfigError::Several`] when there are more than one).
    pub fn from_config(cfg: &Config, sources: &[String]) -> Result<Layers, ConfigError> {
        let mut errors = Errors::default();
        let d = &cfg.delivery;
        let sh = &cfg.shaping;
        let default = Shape {
            connections_max: d
                .connections_per_destination_max
                .clamp(1, u32::MAX as usize) as u32,
            connection_rate: rate(
                &mut errors,
                "shaping",
                0,
                "connection_rate",
                sh.connection_rate.as_deref(),
            ),
            message_rate: rate(
                &mut errors,
                "shaping",
                0,
                "message_rate",
                sh.message_rate.as_deref(),
            ),
            site_message_rate: rate(
                &mut errors,
                "shaping",
                0,
                "site_message_rate",
                sh.site_message_rate.as_deref(),
            ),
            messages_per_connection_max: d.messages_per_connection_max.clamp(1, u32::MAX as usize)
                as u32,
            rcpts_per_transaction_max: d.rcpts_per_transaction_max.clamp(1, u32::MAX as usize)
                as u32,
            idle_timeout_ms: d.idle_timeout_ms,
        };
        let builtin = if sh.provider_defaults {
            builtin_providers()
        } else {
            Vec::new()
        };
        let mut providers: Vec<Provider> = Vec::new();
        for e in &builtin {
            add_provider(
                &mut providers,
                &mut errors,
                e,
                0,
                format!("built-in provider {}", e.name),
            );
        }
        let builtin_count = providers.len();
        for (i, e) in cfg.provider.iter().enumerate() {
            let name = e.name.trim().to_ascii_lowercase();
            if cfg.provider[..i]
                .iter()
                .any(|o| o.name.trim().eq_ignore_ascii_case(&name))
            {
                errors.push(
                    "provider",
                    i,
                    "name",
                    format!("provider `{name}` is defined twice"),
                );
            }
            add_provider(
                &mut providers,
                &mut errors,
                e,
                i,
                format!("provider[{i}] {name}"),
            );
        }
        if providers.len() > PROVIDERS_MAX {
            errors.push(
                "provider",
                builtin_count,
                "name",
                format!("at most {PROVIDERS_MAX} providers"),
            );
        }
        let source_index =
            |errors: &mut Errors, table: &'static str, i: usize, name: &Option<String>| {
                let name = name.as_deref()?;
                let found = sources.iter().position(|s| s == name);
                if found.is_none() {
                    errors.push(table, i, "source", format!("no source named `{name}`"));
                }
                found.map(|s| s as u16)
            };
        let mut sites = Vec::new();
        for (i, e) in cfg.site.iter().enumerate() {
            let matcher = match (&e.mx, &e.provider) {
                (Some(mx), None) if !mx.trim().is_empty() => match DomainGlob::new(mx) {
                    Ok(g) => Some(SiteMatch::Mx(g)),
                    Err(err) => {
                        errors.push("site", i, "mx", format!("`{mx}`: {err}"));
                        None
                    }
                },
                (None, Some(p)) => {
                    let p = p.trim().to_ascii_lowercase();
                    match providers.iter().position(|o| o.name == p) {
                        Some(idx) => Some(SiteMatch::Provider(idx as u16)),
                        None => {
                            errors.push("site", i, "provider", format!("no provider named `{p}`"));
                            None
                        }
                    }
                }
                _ => {
                    errors.push(
                        "site",
                        i,
                        "mx",
                        "a site table needs either `mx` (a glob on MX host names) or `provider`"
                            .into(),
                    );
                    None
                }
            };
            let source = source_index(&mut errors, "site", i, &e.source);
            let values = partial(&mut errors, "site", i, &e.limits());
            if let Some(matcher) = matcher {
                let what =
                    e.mx.clone()
                        .or_else(|| e.provider.as_ref().map(|p| format!("provider {p}")))
                        .unwrap_or_default();
                let origin = match &e.source {
                    Some(s) => format!("site[{i}] {what} source {s}"),
                    None => format!("site[{i}] {what}"),
                };
                sites.push(SiteLayer {
                    matcher,
                    source,
                    values,
                    origin,
                });
            }
        }
        let mut domains: HashMap<String, Vec<DomainLayer>> = HashMap::new();
        for (i, e) in cfg.domain.iter().enumerate() {
            if !e.has_limits() {
                continue;
            }
            let name = e.name.trim().to_ascii_lowercase();
            let source = source_index(&mut errors, "domain", i, &e.source);
            let values = partial(&mut errors, "domain", i, &e.limits());
            let origin = match &e.source {
                Some(s) => format!("domain[{i}] {name} source {s}"),
                None => format!("domain[{i}] {name}"),
            };
            domains.entry(name).or_default().push(DomainLayer {
                source,
                values,
                origin,
            });
        }
        let source_rates = cfg
            .source
            .iter()
            .enumerate()
            .map(|(i, s)| {
                rate(
                    &mut errors,
                    "source",
                    i,
                    "message_rate",
                    s.message_rate.as_deref(),
                )
            })
            .collect::<Vec<_>>();
        let mut tenant_rates = HashMap::new();
        for (i, t) in cfg.tenant.iter().enumerate() {
            if let Some(r) = rate(
                &mut errors,
                "tenant",
                i,
                "message_rate",
                t.message_rate.as_deref(),
            ) {
                tenant_rates.insert(t.name.trim().to_ascii_lowercase(), r);
            }
        }
        let has = |p: &Partial| p.message_rate.is_some() || p.site_message_rate.is_some();
        let any_rates = default.message_rate.is_some()
            || default.site_message_rate.is_some()
            || providers.iter().any(|p| has(&p.values))
            || sites.iter().any(|l| has(&l.values))
            || domains.values().flatten().any(|l| has(&l.values))
            || source_rates.iter().any(Option::is_some)
            || !tenant_rates.is_empty();
        match errors.0.len() {
            0 => Ok(Layers {
                any_rates,
                default,
                providers,
                sites,
                domains,
                source_rates,
                tenant_rates,
            }),
            1 => Err(errors.0.remove(0)),
            _ => Err(ConfigError::Several(errors.0)),
        }
    }

    /// The provider whose MX globs match one of `hosts`, first in order.
    pub fn provider_of<'a>(&self, hosts: impl Iterator<Item = &'a str> + Clone) -> Option<u16> {
        self.providers
            .iter()
            .position(|p| hosts.clone().any(|h| p.globs.iter().any(|g| g.matches(h))))
            .map(|i| i as u16)
    }

    pub fn provider_name(&self, provider: Option<u16>) -> &str {
        provider
            .and_then(|p| self.providers.get(usize::from(p)))
            .map_or("other", |p| p.name.as_str())
    }

    /// Whether any message rate is configured anywhere (else the core skips every rate check).
    pub fn any_rates(&self) -> bool {
        self.any_rates
    }

    /// Whether `domain` (lower case) has limits of its own, and so a site of its own.
    pub fn has_domain(&self, domain: &str) -> bool {
        !self.domains.is_empty() && self.domains.contains_key(domain)
    }

    /// The message rate of egress source `source` over all sites.
    pub fn source_rate(&self, source: usize) -> Option<Rate> {
        self.source_rates.get(source).copied().flatten()
    }

    /// The message rate of `tenant` over all sites.
    pub fn tenant_rate(&self, tenant: &str) -> Option<Rate> {
        if self.tenant_rates.is_empty() {
            return None;
        }
        self.tenant_rates.get(&tenant.to_ascii_lowercase()).copied()
    }

    /// Whether any tenant has a rate (so per-tenant checks can be skipped when none does).
    pub fn has_tenant_rates(&self) -> bool {
        !self.tenant_rates.is_empty()
    }

    /// The shapes of `hop` from each of `sources` sources.
    pub fn site(&self, hop: &Hop, sources: usize) -> SiteShape {
        let (hosts, domain) = hop_hosts(hop);
        let provider = self.provider_of(hosts.iter().copied());
        let base = self.resolve(&hosts, provider, domain, None, None);
        let per_source = (0..sources)
            .map(|s| self.resolve(&hosts, provider, domain, Some(s as u16), None))
            .collect();
        SiteShape {
            provider,
            base,
            per_source,
        }
    }

    fn resolve(
        &self,
        hosts: &[&str],
        provider: Option<u16>,
        domain: Option<&str>,
        source: Option<u16>,
        mut why: Option<&mut HashMap<&'static str, String>>,
    ) -> Shape {
        let mut s = self.default;
        if let Some(p) = provider.and_then(|p| self.providers.get(usize::from(p))) {
            p.values.apply(&mut s, &p.origin, why.as_deref_mut());
        }
        let site_matches = |l: &&SiteLayer| match &l.matcher {
            SiteMatch::Mx(g) => hosts.iter().any(|h| g.matches(h)),
            SiteMatch::Provider(p) => provider == Some(*p),
        };
        if let Some(l) = self
            .sites
            .iter()
            .filter(|l| l.source.is_none())
            .find(site_matches)
        {
            l.values.apply(&mut s, &l.origin, why.as_deref_mut());
        }
        let domain_layers = domain.and_then(|d| self.domains.get(d));
        if let Some(l) = domain_layers.and_then(|ls| ls.iter().find(|l| l.source.is_none())) {
            l.values.apply(&mut s, &l.origin, why.as_deref_mut());
        }
        if let Some(src) = source {
            if let Some(l) = self
                .sites
                .iter()
                .filter(|l| l.source == Some(src))
                .find(site_matches)
            {
                l.values.apply(&mut s, &l.origin, why.as_deref_mut());
            }
            if let Some(l) = domain_layers.and_then(|ls| ls.iter().find(|l| l.source == Some(src)))
            {
                l.values.apply(&mut s, &l.origin, why);
            }
        }
        s
    }

    /// The effective limits of a site with MX `hosts` (and, when it is a domain's own site,
    /// `domain`), from `source`, each with the layer it came from.
    pub fn explain(
        &self,
        hosts: &[&str],
        domain: Option<&str>,
        source: Option<u16>,
    ) -> (String, Vec<Explained>) {
        let provider = self.provider_of(hosts.iter().copied());
        let domain = domain.filter(|d| self.has_domain(d));
        let mut why = HashMap::new();
        let s = self.resolve(hosts, provider, domain, source, Some(&mut why));
        let rate = |r: Option<Rate>| r.map_or("unlimited".to_owned(), |r| r.to_string());
        let rows: [(&'static str, String); 7] = [
            ("connections_max", s.connections_max.to_string()),
            ("connection_rate", rate(s.connection_rate)),
            ("message_rate", rate(s.message_rate)),
            ("site_message_rate", rate(s.site_message_rate)),
            (
                "messages_per_connection_max",
                s.messages_per_connection_max.to_string(),
            ),
            (
                "rcpts_per_transaction_max",
                s.rcpts_per_transaction_max.to_string(),
            ),
            ("idle_timeout_ms", s.idle_timeout_ms.to_string()),
        ];
        let explained = rows
            .into_iter()
            .map(|(key, value)| Explained {
                key,
                value,
                origin: why.remove(key).unwrap_or_else(|| "default".to_owned()),
            })
            .collect();
        (self.provider_name(provider).to_owned(), explained)
    }
}

fn add_provider(
    providers: &mut Vec<Provider>,
    errors: &mut Errors,
    e: &ProviderEntry,
    index: usize,
    origin: String,
) {
    let name = e.name.trim().to_ascii_lowercase();
    if name.is_empty() {
        errors.push("provider", index, "name", "a provider needs a name".into());
        return;
    }
    if e.mx.is_empty() {
        errors.push(
            "provider",
            index,
            "mx",
            format!("provider `{name}` has no MX globs"),
        );
    }
    let mut globs = Vec::new();
    for g in &e.mx {
        match DomainGlob::new(g) {
            Ok(g) => globs.push(g),
            Err(err) => errors.push("provider", index, "mx", format!("`{g}`: {err}")),
        }
    }
    let values = partial(errors, "provider", index, &e.limits());
    let p = Provider {
        name: name.clone(),
        globs,
        values,
        origin,
    };
    match providers.iter_mut().find(|o| o.name == name) {
        Some(old) => *old = p,
        None => providers.push(p),
    }
}

/// A hop's host names, and its own domain when it is a domain's site.
fn hop_hosts(hop: &Hop) -> (Vec<&str>, Option<&str>) {
    match hop {
        Hop::Route(dest) => (vec![dest.host.as_str()], None),
        Hop::Mx(site) => (
            site.hosts.iter().map(|(_, h)| h.as_str()).collect(),
            site.shaped_domain.as_deref(),
        ),
    }
}

#[cfg(test)]
mod tests;
