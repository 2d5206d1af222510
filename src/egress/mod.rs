//! Egress: where outbound connections come from, and how many go to one place.
//!
//! - A **source** is a local address to bind (IPv4 or IPv6, or the kernel's choice) and the
//!   EHLO name used from it.
//! - A **pool** is a weighted set of sources. Each message is routed to a pool by the first
//!   `[[pool_rule]]` matching its sender domain, recipient domain and tenant header, else the
//!   default pool. Within a pool, sources take turns by smooth weighted round robin.
//! - **Health**, per shard ([`health`]): sources that fail leave rotation for a while.
//! - **Leases** ([`lease`]): connections per (site, source) are counted by the key's owner
//!   shard, so a site's limit holds however its domains are spread over shards.

use std::net::{IpAddr, SocketAddr};

use crate::config::{invalid, Config, ConfigError};
use crate::route::DomainGlob;

pub mod health;
pub mod lease;

pub use health::{Down, EgressState, HealthChange};

/// Largest weight of a source in a pool.
const WEIGHT_MAX: u32 = 1000;

/// Which addresses of an MX host to try, and in what order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressOrder {
    Ipv4First,
    Ipv6First,
    Ipv4Only,
    Ipv6Only,
}

impl AddressOrder {
    pub fn parse(text: &str) -> Option<AddressOrder> {
        match text.trim().to_ascii_lowercase().as_str() {
            "ipv4-first" => Some(AddressOrder::Ipv4First),
            "ipv6-first" => Some(AddressOrder::Ipv6First),
            "ipv4-only" => Some(AddressOrder::Ipv4Only),
            "ipv6-only" => Some(AddressOrder::Ipv6Only),
            _ => None,
        }
    }

    /// `addrs` filtered and ordered (stable within a family).
    pub fn arrange(self, addrs: &mut Vec<IpAddr>) {
        match self {
            AddressOrder::Ipv4Only => addrs.retain(IpAddr::is_ipv4),
            AddressOrder::Ipv6Only => addrs.retain(IpAddr::is_ipv6),
            AddressOrder::Ipv4First => addrs.sort_by_key(IpAddr::is_ipv6),
            AddressOrder::Ipv6First => addrs.sort_by_key(IpAddr::is_ipv4),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub name: String,
    pub address: Option<IpAddr>,
    pub ehlo: String,
}

impl Source {
    /// Whether this source can reach `addr` (a bound IPv4 source cannot reach IPv6).
    pub fn reaches(&self, addr: &SocketAddr) -> bool {
        self.address.is_none_or(|ip| ip.is_ipv4() == addr.is_ipv4())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    /// (source index, weight).
    pub members: Vec<(usize, u32)>,
}

#[derive(Clone, Debug)]
struct Rule {
    sender_domain: Option<DomainGlob>,
    recipient_domain: Option<DomainGlob>,
    /// Compared case-insensitively (ASCII).
    tenant: Option<String>,
    pool: usize,
}

/// Sources, pools and the rules that pick a pool; the same on every shard.
#[derive(Clone, Debug)]
pub struct Egress {
    pub sources: Vec<Source>,
    pub pools: Vec<Pool>,
    rules: Vec<Rule>,
    default_pool: usize,
    /// Lower-case header name, with the colon: `x-tenant:`.
    tenant_header: Option<String>,
    /// The same for `egress.priority_header` and `egress.campaign_header`.
    priority_header: Option<String>,
    campaign_header: Option<String>,
    /// `egress.strip_headers`: the three headers above go from messages as they are delivered.
    strip_headers: bool,
    pub failures_max: u32,
    pub quarantine_ms: u64,
}

impl Egress {
    pub fn from_config(cfg: &Config, helo_name: &str) -> Result<Egress, ConfigError> {
        let mut sources = Vec::new();
        for s in &cfg.source {
            if s.name.trim().is_empty() || sources.iter().any(|o: &Source| o.name == s.name) {
                return Err(invalid(
                    "source.name",
                    format!("`{}` is empty or used twice", s.name),
                ));
            }
            let ehlo = s.ehlo.clone().unwrap_or_else(|| helo_name.to_owned());
            if ehlo.is_empty() || ehlo.contains(char::is_whitespace) {
                return Err(invalid(
                    "source.ehlo",
                    format!("`{ehlo}` is not a host name"),
                ));
            }
            sources.push(Source {
                name: s.name.clone(),
                address: s.address,
                ehlo,
            });
        }
        if sources.is_empty() {
            sources.push(Source {
                name: "default".into(),
                address: None,
                ehlo: helo_name.to_owned(),
            });
        }
        let mut pools = Vec::new();
        for p in &cfg.pool {
            if p.name.trim().is_empty() || pools.iter().any(|o: &Pool| o.name == p.name) {
                return Err(invalid(
                    "pool.name",
                    format!("`{}` is empty or used twice", p.name),
                ));
            }
            if p.sources.is_empty() {
                return Err(invalid(
                    "pool.sources",
                    format!("pool `{}` has no sources", p.name),
                ));
            }
            let members = p
                .sources
                .iter()
                .map(|text| member(&sources, text))
                .collect::<Result<Vec<_>, _>>()?;
            pools.push(Pool {
                name: p.name.clone(),
                members,
            });
        }
        if cfg.egress.default_pool.trim().is_empty() && !pools.iter().any(|p| p.name == "default") {
            pools.push(Pool {
                name: "default".into(),
                members: (0..sources.len()).map(|i| (i, 1)).collect(),
            });
        }
        let pool_index = |key: &'static str, name: &str| {
            pools
                .iter()
                .position(|p| p.name == name)
                .ok_or_else(|| invalid(key, format!("no pool named `{name}`")))
        };
        let default_pool = match cfg.egress.default_pool.trim() {
            "" => pool_index("egress.default_pool", "default")?,
            name => pool_index("egress.default_pool", name)?,
        };
        let rules = cfg
            .pool_rule
            .iter()
            .map(|r| {
                if r.sender_domain.is_none() && r.recipient_domain.is_none() && r.tenant.is_none() {
                    return Err(invalid(
                        "pool_rule",
                        "a rule needs sender_domain, recipient_domain or tenant",
                    ));
                }
                let glob = |key: &'static str, text: &Option<String>| {
                    text.as_deref()
                        .map(DomainGlob::new)
                        .transpose()
                        .map_err(|e| invalid(key, e.to_string()))
                };
                Ok(Rule {
                    sender_domain: glob("pool_rule.sender_domain", &r.sender_domain)?,
                    recipient_domain: glob("pool_rule.recipient_domain", &r.recipient_domain)?,
                    tenant: r.tenant.clone(),
                    pool: pool_index("pool_rule.pool", &r.pool)?,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let e = &cfg.egress;
        Ok(Egress {
            sources,
            pools,
            rules,
            default_pool,
            tenant_header: header_key("egress.tenant_header", &e.tenant_header)?,
            priority_header: header_key("egress.priority_header", &e.priority_header)?,
            campaign_header: header_key("egress.campaign_header", &e.campaign_header)?,
            strip_headers: e.strip_headers,
            failures_max: cfg.egress.source_failures_max,
            quarantine_ms: cfg.egress.source_quarantine_s.saturating_mul(1000),
        })
    }

    /// The pool for mail from `sender` (an address) to `rcpt_domain` with `tenant`.
    ///
    /// Per message: the globs were compiled with the config and fold case themselves, so this
    /// allocates nothing.
    pub fn pool_for(&self, sender: &str, rcpt_domain: &str, tenant: Option<&str>) -> usize {
        let sender_domain = sender.rsplit_once('@').map_or("", |(_, d)| d);
        self.rules
            .iter()
            .find(|r| {
                r.sender_domain
                    .as_ref()
                    .is_none_or(|g| g.matches(sender_domain))
                    && r.recipient_domain
                        .as_ref()
                        .is_none_or(|g| g.matches(rcpt_domain))
                    && r.tenant
                        .as_ref()
                        .is_none_or(|t| tenant.is_some_and(|v| v.eq_ignore_ascii_case(t)))
            })
            .map_or(self.default_pool, |r| r.pool)
    }

    /// The tenant named by the message's tenant header, if it has one.
    /// The tenant header's name (`egress.tenant_header`), when there is one.
    pub fn tenant_header(&self) -> Option<&str> {
        self.tenant_header.as_deref()
    }

    pub fn tenant_of(&self, body: &[u8]) -> Option<String> {
        header_value(body, self.tenant_header.as_deref()?)
    }

    /// The tenant, priority class and campaign the message's headers name, in one pass over
    /// its header block. An unknown priority value is no priority (the listener's applies).
    pub fn tags_of(&self, body: &[u8]) -> Tags {
        let [tenant, priority, campaign] = header_values(
            body,
            [
                self.tenant_header.as_deref(),
                self.priority_header.as_deref(),
                self.campaign_header.as_deref(),
            ],
        );
        Tags {
            tenant,
            priority: priority
                .as_deref()
                .and_then(crate::envelope::Priority::parse),
            campaign,
        }
    }

    /// The campaign the message's header names (recovery reads it from the spooled body).
    pub fn campaign_of(&self, body: &[u8]) -> Option<String> {
        header_value(body, self.campaign_header.as_deref()?)
    }

    /// The headers delivery removes (`egress.strip_headers`), lower case with their colon;
    /// empty when it removes none.
    pub fn stripped_headers(&self) -> Vec<&str> {
        if !self.strip_headers {
            return Vec::new();
        }
        [
            &self.tenant_header,
            &self.priority_header,
            &self.campaign_header,
        ]
        .into_iter()
        .filter_map(|h| h.as_deref())
        .collect()
    }
}

/// What a message's headers say about it (see [`Egress::tags_of`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tags {
    pub tenant: Option<String>,
    pub priority: Option<crate::envelope::Priority>,
    pub campaign: Option<String>,
}

/// A configured header name as the header scans want it: lower case, with its colon (None when
/// empty: that header is not read).
fn header_key(key: &'static str, text: &str) -> Result<Option<String>, ConfigError> {
    let header = text.trim();
    if header.contains(|c: char| c == ':' || !c.is_ascii_graphic()) {
        return Err(invalid(key, format!("`{header}` is not a header name")));
    }
    Ok((!header.is_empty()).then(|| format!("{}:", header.to_ascii_lowercase())))
}

/// `NAME` or `NAME:WEIGHT` of a pool member.
fn member(sources: &[Source], text: &str) -> Result<(usize, u32), ConfigError> {
    let (name, weight) = match text.rsplit_once(':') {
        Some((name, w)) => {
            let weight = w
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|w| (1..=WEIGHT_MAX).contains(w));
            let weight = weight.ok_or_else(|| {
                invalid(
                    "pool.sources",
                    format!("`{text}`: weight must be 1 to {WEIGHT_MAX}"),
                )
            })?;
            (name.trim(), weight)
        }
        None => (text.trim(), 1),
    };
    let index = sources
        .iter()
        .position(|s| s.name == name)
        .ok_or_else(|| invalid("pool.sources", format!("no source named `{name}`")))?;
    Ok((index, weight))
}

/// The first value of header `name` (lower-case, with its colon) in the message's header
/// block, unfolded and trimmed.
pub fn header_value(body: &[u8], name: &str) -> Option<String> {
    let [value] = header_values(body, [Some(name)]);
    value
}

/// The first value of each header of `names` (lower-case, with their colon; None: not looked
/// for) in the message's header block, unfolded and trimmed: one pass, which stops at the end
/// of the header block or once every header was found.
pub fn header_values<const N: usize>(body: &[u8], names: [Option<&str>; N]) -> [Option<String>; N] {
    let mut found: [Option<String>; N] = std::array::from_fn(|_| None);
    let mut wanted = names.iter().filter(|n| n.is_some()).count();
    let mut lines = crate::smtp::split_lf(body).peekable();
    while wanted > 0 {
        let Some(line) = lines.next() else { break };
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let Some(i) = (0..N).find(|&i| {
            found[i].is_none() && names[i].is_some_and(|name| starts_with_name(line, name))
        }) else {
            continue;
        };
        let name_len = names[i].map_or(0, str::len);
        let mut value = String::from_utf8_lossy(&line[name_len..]).into_owned();
        while let Some(next) = lines.peek() {
            if !next.starts_with(b" ") && !next.starts_with(b"\t") {
                break;
            }
            let next = lines.next().unwrap_or_default();
            value.push_str(&String::from_utf8_lossy(
                next.strip_suffix(b"\r").unwrap_or(next),
            ));
        }
        let value = value.trim();
        // An empty first instance is the header's answer too: later ones are not looked at.
        found[i] = Some(value.to_owned());
        wanted -= 1;
    }
    found.map(|v| v.filter(|v| !v.is_empty()))
}

fn starts_with_name(line: &[u8], name: &str) -> bool {
    line.len() >= name.len() && line[..name.len()].eq_ignore_ascii_case(name.as_bytes())
}

/// What [`without_headers`] hands out: a few slices, inline (a removed field or two).
pub type BodyPieces<'a> = smallvec::SmallVec<[&'a [u8]; 4]>;

/// The pieces of `body` to send without the header fields of `names` (lower-case, with their
/// colon), continuation lines included: slices of the header block around each removed field,
/// then the rest of the message in one slice. Nothing is copied; a message without those
/// fields is one piece. Only the header block is looked at (up to its empty line).
pub fn without_headers<'a>(body: &'a [u8], names: &[&str]) -> BodyPieces<'a> {
    let mut pieces = BodyPieces::new();
    if names.is_empty() {
        pieces.push(body);
        return pieces;
    }
    // `kept`: start of the bytes not yet handed out; `at`: start of the line being looked at.
    let (mut kept, mut at) = (0usize, 0usize);
    let mut removing = false;
    while at < body.len() {
        let end = memchr::memchr(b'\n', &body[at..]).map_or(body.len(), |k| at + k + 1);
        let line = &body[at..end];
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        if text.is_empty() {
            break;
        }
        let folded = text.starts_with(b" ") || text.starts_with(b"\t");
        let remove = match folded {
            true => removing,
            false => names.iter().any(|n| starts_with_name(text, n)),
        };
        if remove && !removing && kept < at {
            pieces.push(&body[kept..at]);
        }
        if remove {
            kept = end;
        }
        removing = remove;
        at = end;
    }
    if kept < body.len() || pieces.is_empty() {
        pieces.push(&body[kept..]);
    }
    pieces
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn egress(toml: &str) -> Result<Egress, ConfigError> {
        let cfg = Config::parse(toml).expect("toml");
        Egress::from_config(&cfg, "mta.example")
    }

    pub(crate) const THREE: &str = r#"
        [egress]
        default_pool = "main"
        [[source]]
        name = "a"
        address = "127.0.0.2"
        ehlo = "a.example"
        [[source]]
        name = "b"
        address = "127.0.0.3"
        [[source]]
        name = "v6"
        address = "::1"
        [[pool]]
        name = "main"
        sources = ["a:3", "b:1"]
        [[pool]]
        name = "bulk"
        sources = ["b", "v6"]
        [[pool_rule]]
        sender_domain = "*.bulk.example"
        pool = "bulk"
        [[pool_rule]]
        tenant = "Acme"
        recipient_domain = "gmail.com"
        pool = "bulk"
    "#;

    #[test]
    fn default_egress_is_one_unbound_source() {
        let e = egress("").expect("egress");
        assert_eq!(e.sources.len(), 1);
        assert_eq!(e.sources[0].address, None);
        assert_eq!(e.sources[0].ehlo, "mta.example");
        assert_eq!(e.pool_for("a@b.example", "c.example", None), 0);
        assert_eq!(e.pools[0].members, vec![(0, 1)]);
    }

    #[test]
    fn rules_pick_pools_first_match_wins() {
        let e = egress(THREE).expect("egress");
        let (main, bulk) = (0, 1);
        assert_eq!(e.sources[1].ehlo, "mta.example");
        assert_eq!(e.pool_for("x@news.bulk.example", "y.test", None), bulk);
        assert_eq!(
            e.pool_for("x@shop.example", "gmail.com", Some("acme")),
            bulk
        );
        assert_eq!(
            e.pool_for("x@shop.example", "gmail.com", Some("other")),
            main
        );
        assert_eq!(
            e.pool_for("x@shop.example", "yahoo.com", Some("acme")),
            main
        );
        assert_eq!(e.pool_for("", "gmail.com", None), main);
        // Domains and tenants fold case; the globs were compiled with the config.
        assert_eq!(e.pool_for("x@News.BULK.example", "y.test", None), bulk);
        assert_eq!(
            e.pool_for("x@shop.example", "GMail.COM", Some("ACME")),
            bulk
        );
    }

    #[test]
    fn bad_egress_config_names_the_key() {
        let cases = [
            (
                "[[pool]]\nname = \"p\"\nsources = [\"nope\"]",
                "pool.sources",
            ),
            (
                "[[source]]\nname = \"a\"\n[[pool]]\nname = \"p\"\nsources = [\"a:0\"]",
                "pool.sources",
            ),
            (
                "[[source]]\nname = \"a\"\n[[source]]\nname = \"a\"",
                "source.name",
            ),
            ("[egress]\ndefault_pool = \"x\"", "egress.default_pool"),
            ("[[pool_rule]]\npool = \"default\"", "pool_rule"),
            (
                "[[pool_rule]]\ntenant = \"t\"\npool = \"x\"",
                "pool_rule.pool",
            ),
            (
                "[egress]\ntenant_header = \"X-T: y\"",
                "egress.tenant_header",
            ),
            (
                "[[pool_rule]]\nsender_domain = \"[a.example\"\npool = \"default\"",
                "pool_rule.sender_domain",
            ),
            (
                "[[pool_rule]]\nrecipient_domain = \"{a,b\"\npool = \"default\"",
                "pool_rule.recipient_domain",
            ),
        ];
        for (toml, key) in cases {
            let err = egress(toml).expect_err(toml).to_string();
            assert!(err.contains(&format!("`{key}`")), "{toml}: {err}");
        }
    }

    #[test]
    fn sources_reach_their_own_family() {
        let e = egress(THREE).expect("egress");
        let v4: SocketAddr = "192.0.2.1:25".parse().expect("addr");
        let v6: SocketAddr = "[2001:db8::1]:25".parse().expect("addr");
        assert!(e.sources[0].reaches(&v4) && !e.sources[0].reaches(&v6));
        assert!(e.sources[2].reaches(&v6) && !e.sources[2].reaches(&v4));
        let mut addrs: Vec<IpAddr> = vec![v6.ip(), v4.ip()];
        AddressOrder::Ipv4First.arrange(&mut addrs);
        assert_eq!(addrs, vec![v4.ip(), v6.ip()]);
        AddressOrder::Ipv6Only.arrange(&mut addrs);
        assert_eq!(addrs, vec![v6.ip()]);
    }

    #[test]
    fn tenant_header_is_read_from_the_header_block_only() {
        let e = egress("[egress]\ntenant_header = \"X-Tenant\"").expect("egress");
        let body = b"Subject: hi\r\nx-tenant:  Acme\r\n  Corp\r\n\r\nX-Tenant: body\r\n";
        assert_eq!(e.tenant_of(body).as_deref(), Some("Acme  Corp"));
        assert_eq!(e.tenant_of(b"Subject: x\r\n\r\nX-Tenant: no\r\n"), None);
        assert_eq!(e.tenant_of(b"X-Tenantish: no\r\n\r\n"), None);
    }

    #[test]
    fn tags_are_read_in_one_pass_and_an_unknown_class_is_none() {
        use crate::envelope::Priority;
        let e = egress("").expect("egress");
        let body = b"X-Campaign: spring\r\n sale\r\nX-Priority-Class: BULK\r\n\
            X-Tenant: acme\r\nX-Tenant: second\r\n\r\nX-Campaign: body\r\n";
        let tags = e.tags_of(body);
        assert_eq!(tags.tenant.as_deref(), Some("acme"));
        assert_eq!(tags.campaign.as_deref(), Some("spring sale"));
        assert_eq!(tags.priority, Some(Priority::Bulk));
        assert_eq!(e.campaign_of(body).as_deref(), Some("spring sale"));
        let odd = e.tags_of(b"X-Priority-Class: urgent\r\n\r\n");
        assert_eq!(odd, Tags::default());
        assert_eq!(
            e.tags_of(b"x-priority-class: high\r\n\r\n").priority,
            Some(Priority::Transactional)
        );
        // Empty names read nothing.
        let off =
            egress("[egress]\npriority_header = \"\"\ncampaign_header = \"\"").expect("egress");
        assert_eq!(off.tags_of(body).campaign, None);
        assert_eq!(off.tags_of(body).priority, None);
        assert!(off.stripped_headers().is_empty(), "strip_headers is off");
        let strip =
            egress("[egress]\nstrip_headers = true\ncampaign_header = \"\"").expect("egress");
        assert_eq!(
            strip.stripped_headers(),
            vec!["x-tenant:", "x-priority-class:"]
        );
    }

    #[test]
    fn stripping_removes_fields_and_their_folds_from_the_header_block_only() {
        let names = ["x-tenant:", "x-campaign:"];
        let body: &[u8] = b"Received: by x\r\nX-Tenant: acme\r\n corp\r\nSubject: hi\r\n\
            x-campaign: c1\r\nX-Campaign: c2\r\n\tmore\r\nTo: a@b\r\n\r\nX-Tenant: body\r\n";
        let pieces = without_headers(body, &names);
        let sent: Vec<u8> = pieces.concat();
        assert_eq!(
            sent,
            b"Received: by x\r\nSubject: hi\r\nTo: a@b\r\n\r\nX-Tenant: body\r\n".to_vec()
        );
        // Slices of the body, not copies: the rest of the message is one piece.
        assert_eq!(pieces.len(), 3);
        assert!(pieces
            .iter()
            .all(|p| body.as_ptr_range().contains(&p.as_ptr())));
        // Nothing to remove: the body as it is, one piece.
        let plain: &[u8] = b"Subject: x\r\n\r\nbody\r\n";
        assert_eq!(without_headers(plain, &names).as_slice(), &[plain]);
        assert_eq!(without_headers(plain, &[]).as_slice(), &[plain]);
        // The first line, the last line before the body, and a message of headers only.
        assert_eq!(
            without_headers(
                b"X-Tenant: a\r\nSubject: x\r\nX-Campaign: b\r\n\r\nhi\r\n",
                &names
            )
            .concat(),
            b"Subject: x\r\n\r\nhi\r\n".to_vec()
        );
        assert_eq!(
            without_headers(b"Subject: x\r\nX-Tenant: a\r\n", &names).concat(),
            b"Subject: x\r\n".to_vec()
        );
        assert_eq!(
            without_headers(b"X-Tenant: a\n", &names).concat(),
            b"".to_vec()
        );
    }
}
