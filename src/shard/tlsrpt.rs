//! TLS reporting on a shard: every shard counts its outbound TLS sessions (an observer of
//! [`Event::TlsSession`]); shard 0 sends the reports once a period has ended, gathering every
//! shard's counts over the mesh. The counts are kept across a graceful restart in
//! `spool/shard-N/tlsrpt.json`; a crash loses the current period's counts (a report is
//! statistics, not mail).

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use crate::clock::Clock;
use crate::config::TlsReportSection;
use crate::envelope::{Body, Envelope, Recipient, Ret};
use crate::events::{Event, Observer};
use crate::reception::{BodyParts, Intake, Reception};
use crate::settings::Settings;
use crate::tlsrpt::report::{Report, Submitter};
use crate::tlsrpt::rua::Rua;
use crate::tlsrpt::{merge_days, DayTally, Tally};

use super::mesh::{Answer, Request, ShardMesh};

/// One shard's counts.
pub struct Counter {
    tally: RefCell<Tally>,
    path: PathBuf,
}

impl Counter {
    /// The counts saved at the last graceful stop, if any (a file that cannot be read is
    /// reported and started over: counts are statistics).
    pub async fn open(shard_dir: PathBuf, period_ms: u64) -> Rc<Counter> {
        let path = shard_dir.join("tlsrpt.json");
        let read = {
            let path = path.clone();
            glommio::executor()
                .spawn_blocking(move || std::fs::read(&path))
                .await
        };
        let tally = match read {
            Ok(bytes) => Tally::load(&bytes, period_ms).unwrap_or_else(|e| {
                tracing::warn!(
                    "{}: unreadable TLS report counts, starting over: {e}",
                    path.display()
                );
                Tally::new(period_ms)
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Tally::new(period_ms),
            Err(e) => {
                tracing::warn!("{}: {e}; TLS report counts start over", path.display());
                Tally::new(period_ms)
            }
        };
        Rc::new(Counter {
            tally: RefCell::new(tally),
            path,
        })
    }

    /// Every ended period before `period`, taken out.
    pub fn take_before(&self, period: u64) -> Vec<DayTally> {
        self.tally.borrow_mut().take_before(period)
    }

    /// Keep the counts for the next start (atomically: a new file renamed over the old).
    pub async fn save(&self) {
        let (bytes, empty) = {
            let t = self.tally.borrow();
            (t.save(), t.is_empty())
        };
        let path = self.path.clone();
        let result = match bytes {
            Ok(bytes) => {
                glommio::executor()
                    .spawn_blocking(move || {
                        if empty {
                            return match std::fs::remove_file(&path) {
                                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                                _ => Ok(()),
                            };
                        }
                        let tmp = path.with_extension("json.tmp");
                        std::fs::write(&tmp, &bytes)?;
                        std::fs::rename(&tmp, &path)
                    })
                    .await
            }
            Err(e) => Err(std::io::Error::other(e)),
        };
        if let Err(e) = result {
            tracing::warn!(
                "{}: cannot keep TLS report counts: {e}",
                self.path.display()
            );
        }
    }
}

impl Observer for Counter {
    fn observe(&self, event: &Event<'_>) {
        if let Event::TlsSession(e) = event {
            self.tally.borrow_mut().record(e.ts_ms, e.session.clone());
        }
    }
}

/// Where a policy domain wants its reports: its `_smtp._tls` TXT record, parsed.
pub type RuaLookup =
    Rc<dyn Fn(String) -> crate::reception::LocalFuture<'static, Result<Vec<Rua>, String>>>;

/// Sends a gzip'd report to an `https:` address.
pub type Poster =
    Rc<dyn Fn(String, Vec<u8>) -> crate::reception::LocalFuture<'static, Result<(), String>>>;

/// The reporting side, on shard 0.
pub struct Reporter {
    pub settings: Rc<Settings>,
    pub mesh: Rc<ShardMesh>,
    pub reception: Rc<Reception>,
    pub clock: Rc<dyn Clock>,
    pub lookup: RuaLookup,
    pub post: Poster,
}

impl Reporter {
    fn section(&self) -> &TlsReportSection {
        &self.settings.config.tls_report
    }

    fn submitter(&self) -> Submitter {
        let c = self.section();
        let host = self.settings.hostname.clone();
        Submitter {
            organization: if c.organization.is_empty() {
                host.clone()
            } else {
                c.organization.clone()
            },
            contact: if c.contact.is_empty() {
                format!("postmaster@{host}")
            } else {
                c.contact.clone()
            },
            host,
        }
    }

    fn from(&self) -> String {
        let c = self.section();
        if c.from.is_empty() {
            format!("noreply-smtp-tls-reporting@{}", self.settings.hostname)
        } else {
            c.from.clone()
        }
    }

    /// Until the stop signal: at the end of each period (plus the send delay), gather the
    /// counts of the periods that ended and send their reports.
    pub async fn run(self: Rc<Self>, stop: Rc<shards::LocalStop>) {
        let period_ms = self.section().period_s * 1000;
        let delay_ms = self.section().send_delay_s * 1000;
        loop {
            let now = self.clock.now_ms();
            let due = (now / period_ms + 1) * period_ms + delay_ms;
            let sleep = glommio::timer::sleep(Duration::from_millis(due.saturating_sub(now)));
            let stopped = futures_lite::future::or(
                async {
                    sleep.await;
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
            let before = self.clock.now_ms().saturating_sub(delay_ms) / period_ms;
            self.report_before(before).await;
        }
    }

    /// Gather every shard's counts of periods before `before` and send their reports.
    pub async fn report_before(&self, before: u64) {
        let answers = self.mesh.gather(|_| Request::TlsRptTake { before }).await;
        let mut parts = Vec::new();
        for (shard, answer) in answers {
            match answer {
                Ok(Answer::TlsRpt(days)) => parts.push(days),
                Ok(_) => {}
                Err(_) => tracing::warn!(
                    "TLS report: shard {shard} did not answer; its counts are left out"
                ),
            }
        }
        let period_ms = self.section().period_s * 1000;
        let submitter = self.submitter();
        for day in merge_days(parts) {
            for (domain, policies) in &day.domains {
                let report = match Report::build(&submitter, day.day, period_ms, domain, policies) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!("TLS report for {domain}: {e}");
                        continue;
                    }
                };
                self.send(&submitter, domain, &report).await;
            }
        }
    }

    async fn send(&self, submitter: &Submitter, domain: &str, report: &Report) {
        let ruas = match (self.lookup)(domain.to_string()).await {
            Ok(r) => r,
            Err(why) => {
                tracing::debug!("no TLS report for {domain}: {why}");
                return;
            }
        };
        for rua in ruas {
            let result = match &rua {
                Rua::Mailto(to) => self.mail(submitter, domain, report, to).await,
                Rua::Https(url) => match report.gzip() {
                    Ok(gz) => (self.post)(url.clone(), gz).await,
                    Err(e) => Err(e.to_string()),
                },
            };
            match result {
                Ok(()) => tracing::info!(
                    domain,
                    to = ?rua,
                    report = %report.report_id,
                    "TLS report sent"
                ),
                Err(why) => tracing::warn!(domain, to = ?rua, "TLS report not sent: {why}"),
            }
        }
    }

    /// Queue the report as a message to `to`, like our own notices (past the queue limit).
    async fn mail(
        &self,
        submitter: &Submitter,
        domain: &str,
        report: &Report,
        to: &str,
    ) -> Result<(), String> {
        let now = self.clock.now_ms();
        let from = self.from();
        let body = report
            .message(submitter, domain, &from, to, now / 1000)
            .map_err(|e| e.to_string())?;
        // Signed like any mail from its From domain, when a `[[dkim]]` table matches it.
        let head = crate::reception::signing::sign_message(
            &self.settings.dkim,
            &self.settings.egress,
            &body,
            now / 1000,
        )
        .await
        .map_err(|e| format!("cannot sign the report: {e}"))?;
        let envelope = Envelope {
            reception: self.reception.next_id(now),
            sender: from,
            rcpts: vec![Recipient::new(to.to_string())],
            ret: Ret::Unspecified,
            envid: None,
            tenant: None,
            smtputf8: false,
            body: Body::SevenBit,
            size: body.len() as u64,
            peer: "local".into(),
            notices: crate::envelope::NoticeSwitches::ALL,
            priority: Default::default(),
            campaign: None,
        };
        let envelope = Envelope {
            size: (head.len() + body.len()) as u64,
            ..envelope
        };
        let parts = BodyParts { head, body };
        self.reception
            .accept(envelope, parts, None, Intake::Notice)
            .await
            .map_err(|e| e.to_string())
    }
}

/// `_smtp._tls.<domain>` through the shard's resolver (RFC 8460 §3: exactly one record that
/// starts with `v=TLSRPTv1`, or the domain does not take reports).
pub fn rua_lookup(resolver: Option<Rc<crate::dns::resolver::Resolver>>) -> RuaLookup {
    use crate::dns::message::Answer as Dns;
    use hickory_proto::rr::RecordType;
    Rc::new(move |domain: String| {
        let resolver = resolver.clone();
        Box::pin(async move {
            let Some(resolver) = resolver else {
                return Err("no resolver configured".to_string());
            };
            let name = format!("_smtp._tls.{domain}");
            match resolver.lookup(&name, RecordType::TXT).await {
                Dns::Txt(texts, _) => {
                    let ours: Vec<&String> = texts
                        .iter()
                        .filter(|t| t.trim_start().starts_with("v=TLSRPTv1"))
                        .collect();
                    match ours.as_slice() {
                        [one] => crate::tlsrpt::rua::parse(one).map_err(|e| format!("{name}: {e}")),
                        [] => Err(format!("{name}: no TLSRPT record")),
                        _ => Err(format!(
                            "{name}: several TLSRPT records (RFC 8460 §3: none)"
                        )),
                    }
                }
                Dns::NxDomain(_) | Dns::NoData(_) => Err(format!("{name}: no TLSRPT record")),
                other => Err(format!("{name}: {other:?}")),
            }
        })
    })
}

/// POST to `https:` report addresses, the host's addresses from the shard's resolver.
pub fn https_poster(
    resolver: Option<Rc<crate::dns::resolver::Resolver>>,
    trust: Option<crate::tlspolicy::verify::Trust>,
) -> Poster {
    use crate::dns::message::Answer as Dns;
    use hickory_proto::rr::RecordType;
    use std::net::{IpAddr, SocketAddr};
    Rc::new(move |url: String, gz: Vec<u8>| {
        let resolver = resolver.clone();
        let trust = trust.clone();
        Box::pin(async move {
            let Some((host, port)) = crate::tlsrpt::post::host_port(&url) else {
                return Err(format!("{url}: not an https URL"));
            };
            let mut addrs: Vec<SocketAddr> = Vec::new();
            if let Ok(ip) = host.parse::<IpAddr>() {
                addrs.push(SocketAddr::new(ip, port));
            } else if let Some(resolver) = &resolver {
                for rtype in [RecordType::A, RecordType::AAAA] {
                    if let Dns::Addrs(ips, _) = resolver.lookup(&host, rtype).await {
                        addrs.extend(ips.into_iter().map(|ip| SocketAddr::new(ip, port)));
                    }
                }
            }
            let trust = match trust {
                Some(t) => t,
                None => crate::tlspolicy::verify::trust(None).map_err(|e| e.to_string())?,
            };
            glommio::executor()
                .spawn_blocking(move || crate::tlsrpt::post::post(&url, addrs, &trust, &gz))
                .await
        })
    })
}
