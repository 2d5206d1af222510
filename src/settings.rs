//! Settings: the configuration checked and turned into ready-to-use values (networks, routes,
//! TLS configurations, egress pools, compiled globs). Built once at start by
//! [`Config::settle`]; every shard gets a copy.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::{invalid, Config, ConfigError, Network, Overrides};
use crate::route::{DomainGlob, Route, RouteError};

/// The checked, ready-to-use configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    pub config: Config,
    pub hostname: String,
    pub helo_name: String,
    pub relay_networks: Vec<Network>,
    /// Proxies trusted to send PROXY protocol headers.
    pub proxy_trusted: Vec<Network>,
    pub routes: Vec<Route>,
    pub shard_count: usize,
    /// The implicit-TLS listen address, when configured.
    pub implicit_tls_listen: Option<SocketAddr>,
    /// TLS server configuration (configured or self-signed certificate).
    pub tls: Arc<rustls::ServerConfig>,
    /// Outbound TLS: unverified (opportunistic) and verified (required, when a route needs it).
    pub tls_client_unverified: Arc<rustls::ClientConfig>,
    pub tls_client_verified: Option<Arc<rustls::ClientConfig>>,
    /// Roots for MTA-STS (MX hosts and policy servers), when MTA-STS or DANE is on.
    pub tls_trust: Option<crate::tlspolicy::verify::Trust>,
    /// AUTH users, when `server.auth_users` is set.
    pub auth_users: Option<Arc<crate::auth::Users>>,
    /// DNS resolvers, in failover order (empty: no MX lookups; unrouted mail waits).
    pub resolvers: Vec<SocketAddr>,
    pub address_order: crate::egress::AddressOrder,
    pub egress: Arc<crate::egress::Egress>,
    /// DKIM signers, keys loaded, in `[[dkim]]` order.
    pub dkim: Arc<crate::dkim::Signers>,
    /// Bounce classification rules, compiled (None: `bounce.enabled = false`).
    pub bounce: Option<Arc<crate::bounce::Classifier>>,
    /// The retry policy: `[queue]`'s backoff and the `[[retry]]` rules, compiled.
    pub retry: Arc<crate::queue::retry::RetryPolicy>,
    /// The out-of-band report domain, lower case (None: `oob.domain` empty).
    pub oob_domain: Option<String>,
    /// The reply to a suppressed recipient (None: `suppression.enabled = false`).
    pub suppression_reply: Option<crate::smtp::reply::Reply>,
    /// The shaping layers (providers, sites, domains, sources, tenants), compiled.
    pub shaping: Arc<crate::shaping::layers::Layers>,
    /// The `[[adaptive]]` rules, compiled (cloned with the settings: each shard's copy has
    /// regex caches of its own).
    pub adaptive: crate::shaping::AdaptiveRules,
    /// The `[[warmup]]` schedules, and each source's (by source index).
    pub warmups: Arc<crate::shaping::Schedules>,
    pub source_warmups: Vec<Option<crate::shaping::SourceWarmup>>,
    /// The `[[webhook]]` tables, checked (started by `serve`, see `webhook`).
    pub webhooks: Arc<Vec<crate::webhook::Spec>>,
}

/// The settings in force on one shard: every session, connection and notice reads them when it
/// starts, and a reload swaps them (see `admin::reload`). What started with the old settings
/// finishes with them: a session keeps the `Rc` it took.
#[derive(Debug)]
pub struct Live(std::cell::RefCell<std::rc::Rc<Settings>>);

impl Live {
    pub fn new(settings: std::rc::Rc<Settings>) -> Live {
        Live(std::cell::RefCell::new(settings))
    }

    /// The settings in force now.
    pub fn get(&self) -> std::rc::Rc<Settings> {
        self.0.borrow().clone()
    }

    pub fn set(&self, settings: std::rc::Rc<Settings>) {
        *self.0.borrow_mut() = settings;
    }
}

impl Settings {
    /// The notices a listener allows: its own list, or `notices.enabled`.
    pub fn listener_notices(
        &self,
        list: Option<&[crate::config::NoticeKind]>,
    ) -> crate::envelope::NoticeSwitches {
        crate::config::notice_switches(list.unwrap_or(&self.config.notices.enabled))
    }

    /// The notices `tenant` allows (every kind for no tenant, or one without a `[[tenant]]`
    /// table or without a `notices` list). A scan of the tables: it runs when a notice is due,
    /// not per delivery, and tenants are few.
    pub fn tenant_notices(&self, tenant: Option<&str>) -> crate::envelope::NoticeSwitches {
        let Some(name) = tenant else {
            return crate::envelope::NoticeSwitches::ALL;
        };
        self.config
            .tenant
            .iter()
            .find(|t| t.name.eq_ignore_ascii_case(name))
            .and_then(|t| t.notices.as_deref())
            .map_or(
                crate::envelope::NoticeSwitches::ALL,
                crate::config::notice_switches,
            )
    }

    /// The dead-letter directory (`dead_letter.dir`, else `SPOOL/deadletter`).
    pub fn dead_letter_dir(&self) -> std::path::PathBuf {
        let d = &self.config.dead_letter;
        if d.dir.as_os_str().is_empty() {
            self.config.spool.dir.join("deadletter")
        } else {
            d.dir.clone()
        }
    }

    /// The limits of `hop` from each egress source (a scan of the shaping tables: the core
    /// memoises it per site).
    pub fn site_shape(&self, hop: &crate::route::Hop) -> crate::shaping::layers::SiteShape {
        self.shaping.site(hop, self.egress.sources.len())
    }
}

impl Config {
    /// Apply command-line overrides, then check every value.
    pub fn settle(mut self, overrides: Overrides) -> Result<Settings, ConfigError> {
        if let Some(listen) = overrides.listen {
            self.server.listen = listen;
        }
        if let Some(spool) = overrides.spool {
            self.spool.dir = spool;
        }
        if let Some(log_dir) = overrides.log_dir {
            self.log.dir = log_dir;
        }
        if let Some(shards) = overrides.shards {
            self.shards.count = shards;
        }
        if !overrides.resolvers.is_empty() {
            self.dns.resolvers = overrides.resolvers.clone();
        }
        if let Some(port) = overrides.delivery_port {
            self.delivery.port = port;
        }
        if let Some(http) = overrides.http {
            self.http.listen = Some(http);
        }
        let starttls = crate::route::parse_tls_policy(&self.delivery.starttls)
            .map_err(|e| invalid("delivery.starttls", e.to_string()))?;
        let mut routes = Vec::new();
        for text in &overrides.routes {
            let route = Route::parse_flag(text).map_err(|e| route_error("--route", e))?;
            routes.push(route.with_tls(starttls));
        }
        for entry in &self.route {
            let route =
                Route::new(&entry.domain, &entry.target).map_err(|e| route_error("route", e))?;
            let tls = match &entry.tls {
                Some(text) => {
                    crate::route::parse_tls_policy(text).map_err(|e| route_error("route.tls", e))?
                }
                None => starttls,
            };
            routes.push(route.with_tls(tls));
        }
        self.validate()?;
        let relay_networks = parse_networks("server.relay_networks", &self.server.relay_networks)?;
        let hostname = if self.server.hostname.is_empty() {
            system_hostname()
        } else {
            self.server.hostname.clone()
        };
        let helo_name = if self.delivery.helo_name.is_empty() {
            hostname.clone()
        } else {
            self.delivery.helo_name.clone()
        };
        let shard_count = match self.shards.count {
            0 => shards::runtime::online_cpus(),
            n => n,
        };
        let implicit_tls_listen = match self.server.implicit_tls_listen.trim() {
            "" => None,
            text => Some(text.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "server.implicit_tls_listen",
                    format!("`{text}` is not an address:port"),
                )
            })?),
        };
        let identity = match (
            self.server.tls_cert.as_os_str().is_empty(),
            self.server.tls_key.as_os_str().is_empty(),
        ) {
            (true, true) => crate::tls::self_signed(&hostname),
            (false, false) => {
                crate::tls::load_identity(&self.server.tls_cert, &self.server.tls_key)
            }
            (false, true) => {
                return Err(invalid(
                    "server.tls_key",
                    "set it together with server.tls_cert",
                ))
            }
            (true, false) => {
                return Err(invalid(
                    "server.tls_cert",
                    "set it together with server.tls_key",
                ))
            }
        };
        let tls = identity
            .and_then(crate::tls::server_config)
            .map_err(|e| invalid("server.tls_cert", e.to_string()))?;
        let tls_client_unverified = crate::tls::client_config_unverified()
            .map_err(|e| invalid("delivery.starttls", e.to_string()))?;
        // Load the CA bundle only when some route requires verified TLS.
        let required = crate::smtp::client::TlsPolicy::Required;
        let tls_client_verified = if routes.iter().any(|r| r.tls() == required) {
            let ca = &self.delivery.tls_ca_file;
            Some(
                crate::tls::client_config_verified(ca)
                    .map_err(|e| invalid("delivery.tls_ca_file", e.to_string()))?,
            )
        } else {
            None
        };
        let tls_trust = if self.delivery.mta_sts || self.delivery.dane {
            let ca = &self.delivery.tls_ca_file;
            // The default bundle may be missing (a minimal container): the web roots then.
            let default = ca.as_os_str() == crate::config::TLS_CA_FILE_DEFAULT && !ca.exists();
            let file = (!default).then_some(ca.as_path());
            Some(
                crate::tlspolicy::verify::trust(file)
                    .map_err(|e| invalid("delivery.tls_ca_file", e.to_string()))?,
            )
        } else {
            None
        };
        let auth_users = if self.server.auth_users.as_os_str().is_empty() {
            None
        } else {
            let users = crate::auth::Users::load(&self.server.auth_users)
                .map_err(|e| invalid("server.auth_users", e.to_string()))?;
            Some(Arc::new(users))
        };
        if self.server.auth_failures_max == 0 {
            return Err(invalid("server.auth_failures_max", "must be at least 1"));
        }
        let proxy_trusted = parse_networks("server.proxy_trusted", &self.server.proxy_trusted)?;
        for (i, l) in self.listener.iter().enumerate() {
            if l.auth_required && self.server.auth_users.as_os_str().is_empty() {
                return Err(invalid("listener.auth_required", "needs server.auth_users"));
            }
            if let Some(h) = &l.hostname {
                if h.trim().is_empty() || h.contains(char::is_whitespace) {
                    return Err(invalid(
                        "listener.hostname",
                        format!("`{h}` is not a host name"),
                    ));
                }
            }
            if let Some(nets) = &l.relay_networks {
                parse_networks("listener.relay_networks", nets)?;
            }
            if l.connections_max == Some(0) || l.connections_per_ip_max == Some(0) {
                return Err(invalid(
                    "listener.connections_max",
                    format!("listener {}: limits must be at least 1", l.address),
                ));
            }
            if l.size_max.is_some_and(|n| n < 1024) {
                return Err(invalid("listener.size_max", "must be at least 1024 bytes"));
            }
            listener_priority(l).map_err(|e| invalid("listener.priority", e))?;
            if l.rcpts_max.is_some_and(|n| n < 100) {
                return Err(invalid(
                    "listener.rcpts_max",
                    "RFC 5321 requires at least 100",
                ));
            }
            let clash = l.address == self.server.listen
                || Some(l.address) == implicit_tls_listen
                || self.listener[..i].iter().any(|o| o.address == l.address);
            if clash {
                return Err(invalid(
                    "listener.address",
                    format!("{} is used twice", l.address),
                ));
            }
        }
        let resolvers = if self.dns.resolvers.is_empty() {
            crate::dns::resolv_conf(&self.dns.resolv_conf)
                .map_err(|e| invalid("dns.resolv_conf", e))?
        } else {
            self.dns
                .resolvers
                .iter()
                .map(|text| {
                    crate::dns::parse_resolver(text).ok_or_else(|| {
                        invalid("dns.resolvers", format!("`{text}` is not IP or IP:PORT"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let address_order = crate::egress::AddressOrder::parse(&self.delivery.address_order)
            .ok_or_else(|| {
                invalid(
                    "delivery.address_order",
                    "must be ipv4-first, ipv6-first, ipv4-only or ipv6-only",
                )
            })?;
        let egress = crate::egress::Egress::from_config(&self, &helo_name)?;
        // Before the keys load: the clash is the config's, whatever the key files hold.
        unbroken_by_stripping(&self.dkim, &egress)?;
        let source_names: Vec<String> = egress.sources.iter().map(|s| s.name.clone()).collect();
        let shaping = crate::shaping::layers::Layers::from_config(&self, &source_names)?;
        let adaptive = crate::shaping::AdaptiveRules::from_entries(&self.adaptive)?;
        let warmups = crate::shaping::Schedules::from_entries(&self.warmup)?;
        // Sources are indexed as egress has them: the configured ones, in order (or the one
        // default source, which has no warmup).
        let mut source_warmups = Vec::with_capacity(egress.sources.len());
        for i in 0..egress.sources.len() {
            source_warmups.push(match self.source.get(i) {
                Some(s) => warmups.source_warmup(
                    i,
                    s.warmup.as_deref(),
                    s.warmup_start.as_deref(),
                    s.warmup_start_ms,
                )?,
                None => None,
            });
        }
        let dkim = dkim_signers(&self.dkim)?;
        let bounce = bounce_classifier(&self.bounce)?;
        let retry = retry_policy(&self)?;
        let oob_domain = oob_domain(&self.oob)?;
        let webhooks = crate::webhook::Spec::from_entries(&self.webhook)?;
        let suppression_reply = if self.suppression.enabled {
            Some(suppression_reply(&self.suppression.reply)?)
        } else {
            None
        };
        Ok(Settings {
            bounce,
            retry: Arc::new(retry),
            oob_domain,
            suppression_reply,
            dkim: Arc::new(dkim),
            resolvers,
            address_order,
            egress: Arc::new(egress),
            config: self,
            hostname,
            helo_name,
            relay_networks,
            proxy_trusted,
            routes,
            shard_count,
            implicit_tls_listen,
            tls,
            tls_client_unverified,
            tls_client_verified,
            tls_trust,
            auth_users,
            shaping: Arc::new(shaping),
            adaptive,
            warmups: Arc::new(warmups),
            source_warmups,
            webhooks: Arc::new(webhooks),
        })
    }
}

/// `[queue]`'s backoff and the `[[retry]]` rules, each checked with its key named.
fn retry_policy(config: &Config) -> Result<crate::queue::retry::RetryPolicy, ConfigError> {
    use crate::queue::retry::{Backoff, RetryPolicy, Rule};
    let q = &config.queue;
    let default = Backoff {
        first_ms: q.retry_first_ms.unwrap_or(q.retry_base_ms),
        base_ms: q.retry_base_ms,
        factor: q.retry_factor,
        cap_ms: q.retry_cap_ms,
        jitter: q.retry_jitter,
        max_age_ms: q.max_age_s.saturating_mul(1000),
    };
    let mut policy = RetryPolicy::new(default);
    for (i, e) in config.retry.iter().enumerate() {
        let key = |field: &'static str| field;
        let invalid = |key: &'static str, reason: String| ConfigError::InTable {
            table: "retry",
            index: i,
            key,
            reason,
        };
        let mut categories = Vec::new();
        for name in &e.category {
            let c = crate::bounce::Category::parse(name).ok_or_else(|| {
                invalid(
                    key("category"),
                    format!("unknown category `{name}` (see README: bounce categories)"),
                )
            })?;
            categories.push(c);
        }
        let glob = |field: &'static str,
                    text: &Option<String>|
         -> Result<Option<DomainGlob>, ConfigError> {
            text.as_deref()
                .map(|g| DomainGlob::new(g).map_err(|err| invalid(key(field), err.to_string())))
                .transpose()
        };
        let domain = glob("domain", &e.domain)?;
        let site = glob("site", &e.site)?;
        let base_ms = e.base_ms.unwrap_or(default.base_ms);
        let backoff = Backoff {
            first_ms: e.first_ms.or(e.base_ms).unwrap_or(default.first_ms),
            base_ms,
            factor: e.factor.unwrap_or(default.factor),
            cap_ms: e.cap_ms.unwrap_or(default.cap_ms.max(base_ms)),
            jitter: e.jitter.unwrap_or(default.jitter),
            max_age_ms: e
                .max_age_s
                .map_or(default.max_age_ms, |s| s.saturating_mul(1000)),
        };
        if backoff.base_ms == 0 {
            return Err(invalid(key("base_ms"), "must be at least 1".into()));
        }
        if !(backoff.factor.is_finite() && backoff.factor >= 1.0) {
            return Err(invalid(key("factor"), "must be a number >= 1.0".into()));
        }
        if backoff.cap_ms < backoff.base_ms {
            return Err(invalid(
                key("cap_ms"),
                "must be >= the rule's base_ms".into(),
            ));
        }
        if !(0.0..=0.5).contains(&backoff.jitter) {
            return Err(invalid(key("jitter"), "must be between 0 and 0.5".into()));
        }
        if backoff.max_age_ms == 0 || backoff.max_age_ms > crate::queue::AGE_MAX_MS {
            return Err(invalid(
                key("max_age_s"),
                format!("must be between 1 and {}", crate::queue::AGE_MAX_MS / 1000),
            ));
        }
        if e.bounce && categories.is_empty() {
            return Err(invalid(
                key("bounce"),
                "an early bounce needs `category` (which failures bounce at once)".into(),
            ));
        }
        if e.bounce && !config.bounce.enabled {
            return Err(invalid(
                key("bounce"),
                "needs bounce classification (`bounce.enabled = true`)".into(),
            ));
        }
        policy.rules.push(Rule {
            categories,
            domain,
            site,
            backoff,
            bounce: e.bounce,
        });
    }
    Ok(policy)
}

/// The compiled classification rules: the operator's file first, then the built-in ones. An
/// unreadable file, bad TOML or a bad rule (its index named) is an error on `bounce.rules_file`.
fn bounce_classifier(
    section: &crate::config::BounceSection,
) -> Result<Option<Arc<crate::bounce::Classifier>>, ConfigError> {
    if !section.enabled {
        return Ok(None);
    }
    let mut files = Vec::new();
    if !section.rules_file.as_os_str().is_empty() {
        let path = &section.rules_file;
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid("bounce.rules_file", format!("{}: {e}", path.display())))?;
        files.push((path.display().to_string(), text));
    }
    let classifier = crate::bounce::Classifier::new(&files)
        .map_err(|e| invalid("bounce.rules_file", e.to_string()))?;
    Ok(Some(Arc::new(classifier)))
}

/// `oob.domain`, checked and lower-cased: a plain DNS name (letters, digits, hyphens, dots).
fn oob_domain(section: &crate::config::OobSection) -> Result<Option<String>, ConfigError> {
    let name = section.domain.trim();
    if name.is_empty() {
        if section.verp {
            return Err(invalid("oob.verp", "needs oob.domain"));
        }
        return Ok(None);
    }
    let plain = name.len() <= DKIM_NAME_LEN_MAX
        && name.contains('.')
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !plain {
        return Err(invalid(
            "oob.domain",
            format!("`{name}` is not a domain name"),
        ));
    }
    Ok(Some(name.to_ascii_lowercase()))
}

/// `suppression.reply` as a reply: `5XX X.Y.Z text`, the enhanced code of the same class. A
/// 4xx is refused: a recipient recorded as failed with a transient reply would be retried,
/// and delivered, which is what suppression is there to prevent.
pub fn suppression_reply(text: &str) -> Result<crate::smtp::reply::Reply, ConfigError> {
    let bad = |why: &str| invalid("suppression.reply", format!("`{text}`: {why}"));
    let mut words = text.trim().splitn(3, ' ');
    let code: u16 = words
        .next()
        .and_then(|c| c.parse().ok())
        .filter(|c| (500..600).contains(c))
        .ok_or_else(|| bad("must start with a 5xx reply code"))?;
    let enhanced: Vec<u16> = words
        .next()
        .map(|e| {
            e.split('.')
                .map(|n| n.parse::<u16>())
                .collect::<Result<_, _>>()
        })
        .and_then(Result::ok)
        .filter(|e: &Vec<u16>| e.len() == 3 && e[0] == 5 && e[1] < 1000 && e[2] < 1000)
        .ok_or_else(|| bad("the second word must be an enhanced code 5.X.Y"))?;
    let reply_text = words.next().unwrap_or("").trim();
    if reply_text.is_empty() || !reply_text.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(bad("needs a text of printable ASCII after the codes"));
    }
    Ok(crate::smtp::reply::Reply::new(
        code,
        Some((5, enhanced[1], enhanced[2])),
        reply_text,
    ))
}

/// A list of CIDR networks from the config; an error names `key` and the bad entry.
fn parse_networks(key: &'static str, list: &[String]) -> Result<Vec<Network>, ConfigError> {
    list.iter()
        .map(|n| {
            Network::parse(n).ok_or_else(|| invalid(key, format!("`{n}` is not a CIDR network")))
        })
        .collect()
}

fn route_error(key: &'static str, e: RouteError) -> ConfigError {
    invalid(key, e.to_string())
}

fn system_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for buf.len() bytes; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = memchr::memchr(0, &buf).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(name) if !name.is_empty() => name.to_owned(),
        _ => "localhost".into(),
    }
}

/// Longest DKIM selector or domain label list we take: a DNS name is at most 253 octets.
const DKIM_NAME_LEN_MAX: usize = 253;

/// Is `name` a plain DNS name (letters, digits, hyphens, dots, underscores)? Anything else
/// could end a tag early in the DKIM-Signature header (a `;`) or be no name at all.
fn dkim_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= DKIM_NAME_LEN_MAX
        && !name.starts_with('.')
        && !name.ends_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

/// A listener's `priority` (checked with the config: `settle` refuses a bad one).
pub fn listener_priority(
    spec: &crate::config::ListenerEntry,
) -> Result<crate::envelope::Priority, String> {
    match spec.priority.as_deref() {
        None => Ok(crate::envelope::Priority::Normal),
        Some(text) => crate::envelope::Priority::parse(text).ok_or_else(|| {
            format!(
                "listener {}: priority `{text}` is not transactional, normal or bulk",
                spec.address
            )
        }),
    }
}

/// With `egress.strip_headers`, delivery removes the tenant, priority and campaign headers: a
/// signature over one of them would not verify downstream, so such a config is refused.
fn unbroken_by_stripping(
    entries: &[crate::config::DkimEntry],
    egress: &crate::egress::Egress,
) -> Result<(), ConfigError> {
    let stripped = egress.stripped_headers();
    for (i, e) in entries.iter().enumerate() {
        let signed: Vec<&str> = match &e.headers {
            Some(list) => list.iter().map(|h| h.trim()).collect(),
            None => crate::dkim::sign::HEADERS_DEFAULT.to_vec(),
        };
        let clash = signed.iter().find(|h| {
            stripped.iter().any(|s| {
                s.strip_suffix(':')
                    .is_some_and(|s| s.eq_ignore_ascii_case(h))
            })
        });
        if let Some(h) = clash {
            return Err(invalid(
                "dkim.headers",
                format!(
                    "dkim[{i}] ({}/{}) signs `{h}`, which egress.strip_headers removes before \
                     delivery: the signature would not verify",
                    e.domain, e.selector
                ),
            ));
        }
    }
    Ok(())
}

/// The `[[dkim]]` tables, checked and their keys loaded. Errors name the table.
pub fn dkim_signers(
    entries: &[crate::config::DkimEntry],
) -> Result<crate::dkim::Signers, ConfigError> {
    use crate::dkim::{sign::HEADERS_DEFAULT, Canonicalization, Signer, SigningKey};
    let mut list = Vec::with_capacity(entries.len());
    for (index, e) in entries.iter().enumerate() {
        let fail = |reason: String| ConfigError::Dkim {
            index,
            domain: e.domain.clone(),
            selector: e.selector.clone(),
            reason,
        };
        if !dkim_name_ok(&e.domain) {
            return Err(fail(format!("domain `{}` is not a domain name", e.domain)));
        }
        if !dkim_name_ok(&e.selector) {
            return Err(fail(format!(
                "selector `{}` is not a DNS label",
                e.selector
            )));
        }
        let canonicalization = Canonicalization::parse(&e.canonicalization)
            .filter(|_| e.canonicalization.contains('/'))
            .ok_or_else(|| {
                fail(format!(
                    "canonicalization `{}`: want relaxed/relaxed, simple/simple, \
                     relaxed/simple or simple/relaxed",
                    e.canonicalization
                ))
            })?;
        let headers: Vec<String> = match &e.headers {
            Some(list) => list.iter().map(|h| h.trim().to_owned()).collect(),
            None => HEADERS_DEFAULT.iter().map(|h| h.to_string()).collect(),
        };
        if let Some(bad) = headers
            .iter()
            .find(|h| h.is_empty() || !h.bytes().all(|b| b.is_ascii_graphic() && b != b':'))
        {
            return Err(fail(format!("headers: `{bad}` is not a header name")));
        }
        if !headers.iter().any(|h| h.eq_ignore_ascii_case("from")) {
            return Err(fail("headers must include From (RFC 6376 5.4)".to_owned()));
        }
        if e.tenant.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(fail("tenant is empty".to_owned()));
        }
        let text = std::fs::read_to_string(&e.key_file)
            .map_err(|err| fail(format!("key_file {}: {err}", e.key_file.display())))?;
        let key = SigningKey::from_pem(&text)
            .map_err(|err| fail(format!("key_file {}: {err}", e.key_file.display())))?;
        if key.algorithm() == crate::dkim::Algorithm::RsaSha256 && key.bits() < 2048 {
            tracing::warn!(
                "dkim[{index}] ({}/{}): a {}-bit RSA key is weak; RFC 8301 recommends 2048 bits",
                e.domain,
                e.selector,
                key.bits()
            );
        }
        list.push(Signer {
            domain: e.domain.to_ascii_lowercase(),
            selector: e.selector.clone(),
            key: Arc::new(key),
            headers,
            canonicalization,
            tenant: e.tenant.clone(),
            always: e.always,
        });
    }
    Ok(crate::dkim::Signers { list })
}
