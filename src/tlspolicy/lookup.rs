//! The adapter behind a recipient domain's transport security: the `_mta-sts` TXT lookup, the
//! policy cache and its files, the HTTPS fetch; and per MX host, the DNSSEC-checked TLSA
//! lookup. Decisions are [`super::store`]'s and [`super::plan`]'s; this does the I/O.
//!
//! One agent per shard; a domain is looked up by the shard that owns it, so each policy file
//! (`SPOOL/mta-sts/<domain>.policy`) has one writer. A file is written to a temporary name and
//! renamed, so a crash leaves the old policy or the new one, never half of one.

use std::cell::RefCell;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::rr::RecordType;

use super::fetch::{self, FetchError};
use super::plan::{DomainSecurity, Sts, TlsaFinding};
use super::store::{self, Cached, Step, Store, Txt};
use super::sts::{self, Mode, Policy, StsError};
use super::verify::Trust;
use super::ResultType;
use crate::clock::Clock;
use crate::dns::message::Answer;
use crate::dns::resolver::Resolver;

/// The whole policy fetch, connect to last byte (RFC 8461 §3.3 suggests a minute at most; a
/// policy server that slow is broken, and the domain's mail waits for the answer).
pub const FETCH_TIMEOUT_MS: u64 = 20_000;
/// Policy-server addresses tried: a handful is plenty for a static web host.
const FETCH_ADDRS_MAX: usize = 4;

/// What the agent needs.
pub struct AgentConfig {
    pub mta_sts: bool,
    pub dane: bool,
    /// `SPOOL/mta-sts`.
    pub dir: PathBuf,
    pub https_port: u16,
    pub trust: Trust,
    /// The delivery port: TLSA records are looked up at `_<port>._tcp.<host>`.
    pub smtp_port: u16,
}

pub struct Agent {
    cfg: AgentConfig,
    resolver: Rc<Resolver>,
    clock: Rc<dyn Clock>,
    store: RefCell<Store>,
    /// Domains whose policy file was read (or found missing) since start.
    loaded: RefCell<HashSet<String>>,
}

impl Agent {
    pub fn new(cfg: AgentConfig, resolver: Rc<Resolver>, clock: Rc<dyn Clock>) -> Agent {
        Agent {
            cfg,
            resolver,
            clock,
            store: RefCell::new(Store::new()),
            loaded: RefCell::new(HashSet::new()),
        }
    }

    pub fn dane(&self) -> bool {
        self.cfg.dane
    }

    /// `domain`'s transport security, given whether its MX answer was DNSSEC-secure. None:
    /// nothing domain-specific applies (the site may be shared with other domains).
    pub async fn security(&self, domain: &str, mx_secure: bool) -> Option<DomainSecurity> {
        let domain = crate::dns::message::ascii_host(domain);
        let sts = match self.cfg.mta_sts {
            true => self.sts(&domain).await,
            false => Sts::None,
        };
        let mx_secure = mx_secure && self.cfg.dane;
        (sts != Sts::None || mx_secure).then_some(DomainSecurity {
            domain,
            sts,
            mx_secure,
        })
    }

    async fn sts(&self, domain: &str) -> Sts {
        let txt = match self
            .resolver
            .lookup(&format!("_mta-sts.{domain}"), RecordType::TXT)
            .await
        {
            Answer::Txt(records, _) => match sts::parse_txt(&records) {
                Ok(id) => Txt::Id(id),
                Err(StsError::NoRecord) => Txt::Absent,
                Err(e) => Txt::Invalid(e.to_string()),
            },
            Answer::NxDomain(_) | Answer::NoData(_) => Txt::Absent,
            other => Txt::Failed(format!("{other:?}")),
        };
        if txt == Txt::Absent && self.store.borrow().get(domain).is_none() {
            // The common case: no MTA-STS at all. No file to read unless one was written.
            if !self.loaded.borrow().contains(domain)
                && !self.file(domain).is_some_and(|p| p.exists())
            {
                return Sts::None;
            }
        }
        self.load(domain).await;
        let now = self.clock.now_ms();
        let step = self.store.borrow().decide(domain, &txt, now);
        let got = match step {
            Step::Use(c) => return usable(c),
            Step::None => return Sts::None,
            Step::Fetch { id, fallback } => match self.fetch(domain).await {
                Ok(policy) => Ok(Arc::new(Cached {
                    id,
                    policy,
                    fetched_ms: self.clock.now_ms(),
                })),
                Err(failure) => Err((failure, fallback)),
            },
        };
        match got {
            Ok(cached) => {
                self.store
                    .borrow_mut()
                    .put(domain, cached.clone(), self.clock.now_ms());
                self.save(domain, &cached).await;
                usable(cached)
            }
            Err((_, Some(fallback))) => usable(fallback),
            Err(((result, why), None)) => Sts::Failed { result, why },
        }
    }

    /// Fetch and parse the policy.
    async fn fetch(&self, domain: &str) -> Result<Policy, (ResultType, String)> {
        let host = format!("mta-sts.{domain}");
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for rtype in [RecordType::A, RecordType::AAAA] {
            if let Answer::Addrs(ips, _) = self.resolver.lookup(&host, rtype).await {
                addrs.extend(
                    ips.into_iter()
                        .map(|ip| SocketAddr::new(ip, self.cfg.https_port)),
                );
            }
        }
        addrs.truncate(FETCH_ADDRS_MAX);
        let req = fetch::Request {
            domain: domain.to_owned(),
            addrs,
            port: self.cfg.https_port,
            trust: self.cfg.trust.clone(),
            timeout: Duration::from_millis(FETCH_TIMEOUT_MS),
        };
        let body = glommio::executor()
            .spawn_blocking(move || fetch::fetch(&req))
            .await
            .map_err(|e: FetchError| (e.result_type(), e.to_string()))?;
        Policy::parse(&body).map_err(|e| (ResultType::StsPolicyInvalid, e.to_string()))
    }

    fn file(&self, domain: &str) -> Option<PathBuf> {
        store::file_name(domain).map(|name| self.cfg.dir.join(name))
    }

    /// Read `domain`'s policy file into the store, once per start.
    async fn load(&self, domain: &str) {
        if !self.loaded.borrow_mut().insert(domain.to_owned()) {
            return;
        }
        if self.store.borrow().get(domain).is_some() {
            return;
        }
        let Some(path) = self.file(domain) else {
            return;
        };
        let text = glommio::executor()
            .spawn_blocking(move || std::fs::read_to_string(path).ok())
            .await;
        if let Some(cached) = text.as_deref().and_then(Cached::from_file) {
            let now = self.clock.now_ms();
            if cached.fresh(now) {
                self.store.borrow_mut().put(domain, Arc::new(cached), now);
            }
        }
    }

    /// Write `domain`'s policy file: to a temporary name, then renamed over the old one.
    async fn save(&self, domain: &str, cached: &Cached) {
        let Some(path) = self.file(domain) else {
            return;
        };
        let text = cached.to_file();
        let dir = self.cfg.dir.clone();
        let written = glommio::executor()
            .spawn_blocking(move || write_atomic(&dir, &path, text.as_bytes()))
            .await;
        if let Err(e) = written {
            tracing::warn!(domain, "cannot keep the MTA-STS policy on disk: {e}");
        }
    }

    /// The TLSA records of MX host `host` when DANE applies (`mx_secure`): only a secure
    /// address answer and a secure TLSA answer count (RFC 7672 §2.2.2).
    pub async fn tlsa(&self, host: &str, mx_secure: bool) -> TlsaFinding {
        if !self.cfg.dane || !mx_secure {
            return TlsaFinding::NotApplicable;
        }
        let (_, addr_secure) = self.resolver.lookup_secure(host, RecordType::A).await;
        if !addr_secure {
            return TlsaFinding::NotApplicable;
        }
        let name = format!("_{}._tcp.{host}", self.cfg.smtp_port);
        match self.resolver.lookup_secure(&name, RecordType::TLSA).await {
            (Answer::Tlsa(records, _), true) => TlsaFinding::Records(records),
            (Answer::Transient(why), _) => TlsaFinding::Failed(why),
            _ => TlsaFinding::None,
        }
    }
}

/// A fetched policy in mode none counts as no policy (RFC 8461 §5).
fn usable(c: Arc<Cached>) -> Sts {
    match c.policy.mode {
        Mode::None => Sts::None,
        Mode::Enforce | Mode::Testing => Sts::Policy(c),
    }
}

fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    // The rename is durable once the directory is.
    std::fs::File::open(dir)?.sync_all()
}
