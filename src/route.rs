//! Destination lookup: which host a recipient domain's mail goes to.
//!
//! Static routes (`--route GLOB=HOST:PORT`, first match wins) are tried first; a domain no
//! route matches goes to its MX hosts ([`Site`], resolved by the shard). Either way the result
//! is a [`Hop`], which the queue and the connection limits key on.
//!
//! Domain and host globs ([`DomainGlob`]: routes, `[[pool_rule]]` and `[[site]]`) are compiled
//! once, when the configuration is read; matching a message does no parsing and no allocation.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use globset::{GlobBuilder, GlobMatcher};

use crate::smtp::client::TlsPolicy;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RouteError {
    #[error("`{0}` is not GLOB=HOST:PORT")]
    Syntax(String),
    #[error("bad domain glob `{0}`")]
    Glob(String),
    #[error(transparent)]
    GlobSyntax(#[from] GlobError),
    #[error("cannot resolve target `{0}` to HOST:PORT")]
    Target(String),
    #[error("unknown TLS policy `{0}` (opportunistic, required or disabled)")]
    Tls(String),
}

/// A glob that does not compile.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad domain glob `{glob}`: {reason}")]
pub struct GlobError {
    pub glob: String,
    pub reason: String,
}

/// A glob on domain or host names, compiled once at configuration time.
///
/// The syntax is globset's, matched case-insensitively (ASCII) against the whole name:
/// - `*` matches any run of characters, dots included (`*.example.com` matches
///   `a.b.example.com`, but not `example.com`: the dot is literal); `**` is the same as `*`.
/// - `?` matches exactly one character (one byte: non-ASCII names are compared as UTF-8).
/// - `{a,b}` matches either alternative (`{gmail,googlemail}.com`), `[ab]` / `[a-z]` / `[!a]`
///   one character of a class, and `\` escapes the next character.
///
/// Alternation and classes are kept rather than escaped because they are useful
/// (`mx[12].example`) and no domain name contains `{}[]\`. The one name that may is an
/// address literal (`[192.0.2.1]`), which a glob matches by escaping: `\[192.0.2.1\]`.
/// `/` is not a separator here (`literal_separator(false)`): names are not paths.
#[derive(Clone, Debug)]
pub struct DomainGlob {
    matcher: GlobMatcher,
}

impl DomainGlob {
    pub fn new(glob: &str) -> Result<DomainGlob, GlobError> {
        let matcher = GlobBuilder::new(glob)
            .case_insensitive(true)
            .literal_separator(false)
            .backslash_escape(true)
            .build()
            .map_err(|e| GlobError {
                glob: glob.to_owned(),
                reason: e.kind().to_string(),
            })?
            .compile_matcher();
        Ok(DomainGlob { matcher })
    }

    /// Whether `name` (any case) matches. Hot path: no parsing, no allocation (globset borrows
    /// `name` as its candidate path).
    pub fn matches(&self, name: &str) -> bool {
        self.matcher.is_match(name)
    }

    /// The glob as configured.
    pub fn as_str(&self) -> &str {
        self.matcher.glob().glob()
    }
}

impl fmt::Display for DomainGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where mail for a domain goes, and how. The queue keys on it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Destination {
    pub addr: SocketAddr,
    /// The host as configured: the TLS server name when TLS is required.
    pub host: String,
    pub tls: TlsPolicy,
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.addr.fmt(f)
    }
}

/// A set of MX hosts. Domains whose MX records name the same hosts (gmail.com and
/// googlemail.com, or every domain hosted by one provider) are one site: they share a queue,
/// connections and connection limits. Equal by the set of host names, whatever their order.
///
/// A domain with a transport-security policy of its own (MTA-STS, or a DNSSEC-signed MX for
/// DANE) gets a site of its own: `security` is its policy, and the site is equal only to the
/// same domain's under the same policy. One domain's policy so never applies to another
/// domain's mail on a shared connection (KumoMTA's rollup bug). Connection limits still count
/// by the host set (`key`).
#[derive(Clone, Debug)]
pub struct Site {
    /// The host names, sorted, lower case, comma-separated.
    pub key: Arc<str>,
    /// The hosts (A-labels) and their MX preferences; `dns::mx::order` orders them per
    /// connection.
    pub hosts: Arc<[(u16, String)]>,
    /// The recipient domain's transport security, when it has one.
    pub security: Option<Arc<crate::tlspolicy::plan::DomainSecurity>>,
    /// Identity of `security` (domain, policy id and fetch time, DNSSEC): empty without one.
    policy_key: Arc<str>,
    /// The recipient domain whose own limits make this its own site (`[[domain]]` with
    /// limits): its key is `hosts#domain`, so its connections and rates are its own.
    pub shaped_domain: Option<Arc<str>>,
}

impl Site {
    pub fn new(hosts: Vec<(u16, String)>) -> Site {
        let hosts: Vec<(u16, String)> = hosts
            .iter()
            .map(|(pref, h)| (*pref, crate::dns::message::ascii_host(h)))
            .collect();
        let mut sorted: Vec<&str> = hosts.iter().map(|(_, h)| h.as_str()).collect();
        sorted.sort();
        sorted.dedup();
        Site {
            key: sorted.join(",").into(),
            hosts: hosts.into(),
            security: None,
            policy_key: "".into(),
            shaped_domain: None,
        }
    }

    /// This site as `domain`'s own (see `shaped_domain`).
    pub fn shaped_for(mut self, domain: &str) -> Site {
        if self.shaped_domain.is_none() {
            self.key = format!("{}#{domain}", self.key).into();
            self.shaped_domain = Some(domain.into());
        }
        self
    }

    /// The site of one domain with its own transport security.
    pub fn with_security(
        mut self,
        security: Option<crate::tlspolicy::plan::DomainSecurity>,
    ) -> Site {
        use crate::tlspolicy::plan::Sts;
        let Some(sec) = security else {
            return self;
        };
        let sts = match &sec.sts {
            Sts::None => String::new(),
            Sts::Policy(c) => format!("sts={}@{}", c.id, c.fetched_ms),
            Sts::Failed { result, .. } => format!("sts-failed={}", result.as_str()),
        };
        self.policy_key = format!("{};{sts};dnssec={}", sec.domain, sec.mx_secure).into();
        self.security = Some(Arc::new(sec));
        self
    }
}

impl PartialEq for Site {
    fn eq(&self, other: &Site) -> bool {
        self.key == other.key && self.policy_key == other.policy_key
    }
}

impl Eq for Site {}

impl Hash for Site {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key.hash(state);
        self.policy_key.hash(state);
    }
}

/// Where a job's connections go: a static route's one address, or a site's MX hosts.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Hop {
    Route(Destination),
    Mx(Site),
}

impl Hop {
    /// The name connection limits are counted under.
    pub fn site_key(&self) -> Arc<str> {
        match self {
            Hop::Route(dest) => format!("[{}]", dest.addr).into(),
            Hop::Mx(site) => site.key.clone(),
        }
    }
}

impl fmt::Display for Hop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hop::Route(dest) => dest.fmt(f),
            Hop::Mx(site) => f.write_str(&site.key),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Route {
    glob: DomainGlob,
    dest: Destination,
}

impl Route {
    /// `GLOB=HOST:PORT`, as given to `--route`.
    pub fn parse_flag(text: &str) -> Result<Route, RouteError> {
        let (glob, target) = text
            .split_once('=')
            .ok_or_else(|| RouteError::Syntax(text.to_owned()))?;
        Route::new(glob, target)
    }

    pub fn new(glob: &str, target: &str) -> Result<Route, RouteError> {
        let glob = glob.trim();
        if glob.is_empty() || glob.contains(char::is_whitespace) {
            return Err(RouteError::Glob(glob.to_owned()));
        }
        let glob = DomainGlob::new(glob)?;
        // Targets resolve once, at start: a route is configuration, not a lookup per message.
        let target = target.trim();
        let addr = target
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| RouteError::Target(target.to_owned()))?;
        let host = target
            .rsplit_once(':')
            .map_or(target, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tls = TlsPolicy::default();
        Ok(Route {
            glob,
            dest: Destination { addr, host, tls },
        })
    }

    /// The same route with its own STARTTLS policy.
    pub fn with_tls(mut self, tls: TlsPolicy) -> Route {
        self.dest.tls = tls;
        self
    }

    pub fn tls(&self) -> TlsPolicy {
        self.dest.tls
    }

    pub fn matches(&self, domain: &str) -> bool {
        self.glob.matches(domain)
    }
}

/// `opportunistic`, `required` or `disabled`.
pub fn parse_tls_policy(text: &str) -> Result<TlsPolicy, RouteError> {
    match text.trim().to_ascii_lowercase().as_str() {
        "opportunistic" => Ok(TlsPolicy::Opportunistic),
        "required" => Ok(TlsPolicy::Required),
        "disabled" => Ok(TlsPolicy::Disabled),
        _ => Err(RouteError::Tls(text.to_owned())),
    }
}

/// Why a domain has no destination.
#[derive(Clone, Debug, PartialEq)]
pub enum LookupError {
    /// Nothing matched: the domain's MX hosts decide.
    NoRoute,
}

#[derive(Clone, Debug, Default)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    pub fn new(routes: Vec<Route>) -> Router {
        Router { routes }
    }

    pub fn lookup(&self, domain: &str) -> Result<Destination, LookupError> {
        self.routes
            .iter()
            .find(|r| r.matches(domain))
            .map(|r| r.dest.clone())
            .ok_or(LookupError::NoRoute)
    }
}

/// Sites of recently resolved domains, until their MX answer's TTL runs out: what the
/// resolver's cache holds, already turned into a site, so a message costs one hash lookup and
/// no DNS parsing. Bounded: at `entries_max` the expired entries go, then all.
#[derive(Debug)]
pub struct SiteMemo {
    sites: std::collections::HashMap<String, (Site, u64)>,
    ttl_min_s: u32,
    ttl_max_s: u32,
    entries_max: usize,
}

impl SiteMemo {
    pub fn new(ttl_min_s: u32, ttl_max_s: u32, entries_max: usize) -> SiteMemo {
        SiteMemo {
            sites: std::collections::HashMap::new(),
            ttl_min_s,
            ttl_max_s,
            entries_max,
        }
    }

    /// `domain`'s site (lower case) if its answer is still fresh at `now_ms`.
    pub fn get(&self, domain: &str, now_ms: u64) -> Option<Site> {
        self.sites
            .get(domain)
            .filter(|(_, until)| now_ms < *until)
            .map(|(site, _)| site.clone())
    }

    /// `domain`'s site from its MX answer (remembered until `cached_until`, or the answer's
    /// clamped TTL), or the reply its recipients get: bounce when the domain does not exist or
    /// takes no mail (RFC 7505), retry when DNS failed.
    pub fn resolved(
        &mut self,
        domain: &str,
        answer: &crate::dns::message::Answer,
        security: Option<crate::tlspolicy::plan::DomainSecurity>,
        cached_until: Option<u64>,
        now_ms: u64,
    ) -> Result<Site, crate::smtp::reply::Reply> {
        use crate::dns::message::Answer;
        use crate::dns::mx::Plan;
        use crate::smtp::reply::Reply;
        let site = match crate::dns::mx::plan(domain, answer) {
            Plan::Hosts(hosts) => Site::new(hosts).with_security(security),
            Plan::Refuse(_) if matches!(answer, Answer::NxDomain(_)) => {
                return Err(Reply::new(
                    550,
                    Some((5, 1, 2)),
                    format!("Domain {domain} does not exist (NXDOMAIN)"),
                ))
            }
            Plan::Refuse(_) => {
                return Err(Reply::new(
                    556,
                    Some((5, 1, 10)),
                    format!("Domain {domain} does not accept mail (null MX)"),
                ))
            }
            Plan::Retry(why) => {
                return Err(Reply::new(
                    451,
                    Some((4, 4, 3)),
                    format!("MX lookup for {domain} failed: {why}"),
                ))
            }
        };
        let ttl_s = match answer {
            Answer::Mx(_, ttl) | Answer::NoData(ttl) => *ttl,
            _ => return Ok(site),
        };
        let until = cached_until.unwrap_or_else(|| {
            now_ms + u64::from(ttl_s.clamp(self.ttl_min_s, self.ttl_max_s)) * 1000
        });
        if self.sites.len() >= self.entries_max {
            self.sites.retain(|_, (_, expires)| *expires > now_ms);
            if self.sites.len() >= self.entries_max {
                self.sites.clear();
            }
        }
        self.sites.insert(domain.to_owned(), (site.clone(), until));
        Ok(site)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob_match(glob: &str, name: &str) -> bool {
        DomainGlob::new(glob).expect("glob compiles").matches(name)
    }

    #[test]
    fn globs() {
        assert!(glob_match("*.test", "d0.test"));
        assert!(glob_match("*", "anything.example"));
        assert!(glob_match("example.com", "example.com"));
        assert!(!glob_match("example.com", "sub.example.com"));
        assert!(glob_match("*.example.com", "a.b.example.com"));
        assert!(!glob_match("*.test", "test"));
        assert!(glob_match("d?.test", "d7.test"));
    }

    #[test]
    fn glob_edge_cases() {
        // `*` crosses dots, and matches the empty run too.
        assert!(glob_match("*", "a.b.c"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a.*.c", "a.b.x.c"));
        assert!(glob_match("*example.com", "example.com"));
        assert!(!glob_match("*.example.com", "example.com"));
        assert!(!glob_match("*.test", "test"));
        assert!(
            !glob_match("*.test", "a.test.example"),
            "anchored at both ends"
        );
        assert!(glob_match("**.test", "a.b.test"), "`**` is `*`");
        // `?` is exactly one character.
        assert!(!glob_match("d?.test", "d.test"));
        assert!(!glob_match("d?.test", "d10.test"));
        assert!(glob_match("d??.test", "d10.test"));
        // Case folds on both sides.
        assert!(glob_match("*.Google.COM", "ASPMX.l.google.com"));
        assert!(glob_match("example.com", "EXAMPLE.Com"));
        // globset's classes and alternation; escapes for literal brackets.
        assert!(glob_match("{gmail,googlemail}.com", "googlemail.com"));
        assert!(!glob_match("{gmail,googlemail}.com", "mail.com"));
        assert!(glob_match("mx[12].example", "mx2.example"));
        assert!(!glob_match("mx[12].example", "mx3.example"));
        assert!(glob_match("\\[192.0.2.1\\]", "[192.0.2.1]"));
        // A dot is literal.
        assert!(!glob_match("a.b", "axb"));
    }

    #[test]
    fn bad_globs_are_errors() {
        for bad in ["mx[12.example", "{a,b.example", "a]b["] {
            let err = DomainGlob::new(bad).expect_err(bad);
            assert_eq!(err.glob, bad);
            assert!(err.to_string().contains(bad), "{err}");
        }
        assert!(matches!(
            Route::parse_flag("mx[1.test=127.0.0.1:25"),
            Err(RouteError::GlobSyntax(_))
        ));
        assert_eq!(
            DomainGlob::new("*.Example").expect("glob").to_string(),
            "*.Example"
        );
    }

    #[test]
    fn first_match_wins_and_case_folds() {
        let r = Router::new(vec![
            Route::parse_flag("special.test=127.0.0.1:26").expect("route"),
            Route::parse_flag("*.test=127.0.0.1:25").expect("route"),
        ]);
        assert_eq!(r.lookup("Special.TEST").expect("dest").addr.port(), 26);
        assert_eq!(r.lookup("other.test").expect("dest").addr.port(), 25);
        assert_eq!(r.lookup("example.com"), Err(LookupError::NoRoute));
    }

    #[test]
    fn sites_are_equal_by_host_set() {
        let a = Site::new(vec![
            (10, "MX2.example.".into()),
            (20, "mx1.example".into()),
        ]);
        let b = Site::new(vec![(10, "mx1.example".into()), (10, "mx2.example".into())]);
        assert_eq!(a, b, "the same hosts, whatever their preferences");
        assert_eq!(&*a.key, "mx1.example,mx2.example");
        assert_eq!(a.hosts[0], (10, "mx2.example".to_owned()));
        assert_ne!(a, Site::new(vec![(10, "mx1.example".into())]));
        // An internationalised implicit MX is kept as A-labels (DNS and TLS want them).
        assert_eq!(
            &*Site::new(vec![(0, "bücher.example".into())]).key,
            "xn--bcher-kva.example"
        );
        let route = Hop::Route(Route::parse_flag("*=127.0.0.1:25").expect("r").dest);
        assert_eq!(&*route.site_key(), "[127.0.0.1:25]");
    }

    #[test]
    fn bad_routes_are_refused() {
        assert!(matches!(
            Route::parse_flag("nodest"),
            Err(RouteError::Syntax(_))
        ));
        assert!(matches!(
            Route::parse_flag("*.test=nohostport"),
            Err(RouteError::Target(_))
        ));
        assert_eq!(parse_tls_policy("Required"), Ok(TlsPolicy::Required));
        assert!(matches!(parse_tls_policy("maybe"), Err(RouteError::Tls(_))));
        let r = Route::new("*", "localhost:25")
            .expect("route")
            .with_tls(TlsPolicy::Disabled);
        assert_eq!(
            (r.dest.host.as_str(), r.tls()),
            ("localhost", TlsPolicy::Disabled)
        );
    }
}
