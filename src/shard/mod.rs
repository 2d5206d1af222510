//! What one core runs: the stages of one shard wired together on the `shards` runtime.
//!
//! Start: recover the spool (envelopes from the records alone), rebuild the queue, start the
//! spool's committer, collector and compactor, the core's timer, the mesh, the listeners.
//! Run: everything is event-driven — sockets, the spool's notifications, the mesh, and one
//! timer that sleeps until the core's next due time (or the event log's next flush); with
//! nothing to do a shard sleeps. Stop (the process-wide stop signal): stop accepting, let
//! sessions and deliveries finish within `server.shutdown_grace_s`, end the mesh with every
//! other shard (parts they hand us are still spooled until they are done), commit the spool,
//! flush the log.
//!
//! Shard 0 also serves the admin socket ([`admin`]): operators' operations go from there to
//! every shard over the mesh, and a reload hands every shard the new settings the same way.
//!
//! Invariant: a shard only ever touches its own spool and queues. Other shards reach them over
//! the mesh ([`mesh`]).

pub mod admin;
pub mod http;
pub mod mesh;
pub mod metrics;
mod perform;
mod tlsrpt;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use glommio::{Latency, Shares};

use crate::clients::Clients;
use crate::clock::{Clock, SystemClock};
use crate::config::ListenerEntry;
use crate::core::{Core, CoreCell, CoreConfig};
use crate::delivery::DeliveryCtx;
use crate::dns::resolver::{Resolver, ResolverConfig};
use crate::eventlog::EventLog;
use crate::events::Observers;
use crate::reception::{Listener, Reception};
use crate::settings::Settings;
use crate::spool::{Spool, SpoolConfig};

pub use mesh::{Answer, Request};

/// Requests a shard may have in flight over the mesh at once (see `shards::MeshConfig`): a
/// part per inbound session in DATA, plus lease and client messages; past it a submission
/// gets `451 4.3.0` and the client retries.
const MESH_PENDING_MAX: usize = 8192;
/// Compaction's share of the CPU against the default queue's 1000: it only ever trades its
/// own latency.
const COMPACTION_SHARES: usize = 50;

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("shard {shard}: cannot open spool: {source}")]
    Spool {
        shard: usize,
        source: crate::spool::SpoolError,
    },
    #[error("shard {shard}: {source}")]
    Log {
        shard: usize,
        source: crate::eventlog::LogError,
    },
    #[error("shard {shard}: {why}")]
    Listen { shard: usize, why: String },
    #[error("shard {shard}: {why}")]
    Mesh { shard: usize, why: String },
    #[error("shard {shard}: {why}")]
    Suppression { shard: usize, why: String },
    #[error("shard {shard}: {source}")]
    DeadLetter {
        shard: usize,
        source: crate::deadletter::DeadLetterError,
    },
}

/// What the process gives each shard.
#[derive(Clone)]
pub struct Shared {
    pub settings: Arc<Settings>,
    pub stop: shards::Stop,
    /// Told once this shard listens (the process announces readiness when all have).
    pub listening: crossbeam::channel::Sender<usize>,
    /// Shard 0's end of the admin socket's hand-over pair (see `admin::socket`), taken by
    /// shard 0; None: no admin socket.
    pub admin: Option<Arc<std::sync::Mutex<Option<std::os::unix::net::UnixStream>>>>,
    /// Reads the configuration again for a reload.
    pub reloader: Option<admin::Reloader>,
    /// Set by the process once every shard listens: HTTP readiness.
    pub ready: Arc<std::sync::atomic::AtomicBool>,
}

/// Every listener a shard binds, in order: `server.listen`, `server.implicit_tls_listen`, then
/// `[[listener]]`. A reload keeps the addresses (see `admin::reload`), so the order matches
/// the listeners bound at start.
pub fn listener_specs(settings: &Settings) -> Vec<ListenerEntry> {
    let cfg = &settings.config;
    let mut listeners = vec![ListenerEntry::plain(cfg.server.listen, false)];
    listeners.extend(
        settings
            .implicit_tls_listen
            .map(|address| ListenerEntry::plain(address, true)),
    );
    listeners.extend(cfg.listener.iter().cloned());
    listeners
}

/// Run shard `shard`: recover, listen, deliver, until the stop signal.
pub async fn run(
    shard: shards::Shard<shards::Wire<Request, Answer>>,
    shared: Shared,
) -> Result<(), ShardError> {
    let (id, count) = (shard.id, shard.count);
    let settings = Rc::new((*shared.settings).clone());
    let live = Rc::new(crate::settings::Live::new(settings.clone()));
    let cfg = &settings.config;
    let clock: Rc<dyn Clock> = Rc::new(SystemClock);
    let stop = shards::LocalStop::new(shared.stop.clone());
    // HTTP first: liveness answers (and readiness says "not yet") while the spool recovers.
    let http_endpoint = http::Endpoint::start(
        id,
        shared.settings.clone(),
        shared.ready.clone(),
        stop.clone(),
    )
    .map_err(|why| ShardError::Listen { shard: id, why })?;

    let spool_cfg = SpoolConfig {
        dir: cfg.spool.dir.join(format!("shard-{id}")),
        shard: id as u32,
        segment_size_max: cfg.spool.segment_size_max,
        commit_window_us: cfg.spool.commit_window_us,
        commit_batch_max: cfg.spool.commit_batch_max,
        compact_live_ratio: cfg.spool.compact_live_ratio,
        compaction_bytes_per_s: cfg.spool.compaction_bytes_per_s,
    };
    let log = Rc::new(
        EventLog::open(&cfg.log.dir, id, cfg.log.file_size_max)
            .map_err(|source| ShardError::Log { shard: id, source })?,
    );
    // Counted by every stage of this shard; read at scrapes (see `metrics`).
    let recorder = Rc::new(crate::metrics::Recorder::default());
    let mut observers = Observers::new(vec![log.clone(), recorder.clone()]);
    // Reception's and the suppression list's own events go to the log only.
    let log_only = Observers::new(vec![log.clone()]);
    // The suppression list: this shard's entries, loaded before the core so its hard
    // bounces feed the list from the first attempt on.
    let suppression = if cfg.suppression.enabled {
        let store = crate::suppression::Store::open(&cfg.spool.dir.join(format!("shard-{id}")))
            .map_err(|e| ShardError::Suppression {
                shard: id,
                why: e.to_string(),
            })?;
        tracing::info!("shard {id}: suppression list of {} entries", store.len());
        let s = Rc::new(crate::suppression::Suppression::new(
            id,
            count,
            Rc::new(store),
            log_only.clone(),
            clock.clone(),
        ));
        observers.push(Rc::new(crate::suppression::BounceFeed {
            suppression: s.clone(),
        }));
        Some(s)
    } else {
        None
    };
    let tlsrpt = if cfg.tls_report.enabled {
        let counter = tlsrpt::Counter::open(
            cfg.spool.dir.join(format!("shard-{id}")),
            cfg.tls_report.period_s * 1000,
        )
        .await;
        observers.push(counter.clone());
        Some(counter)
    } else {
        None
    };
    // Shard 0 logs the operators' operations through the same observers.
    let admin_observers = observers.clone();
    let mut core = Core::new(
        CoreConfig {
            shard: id,
            shards: count,
            settings: settings.clone(),
            has_resolver: !settings.resolvers.is_empty(),
        },
        observers,
    );
    // Recovery replays the spool straight into the core's queue, one segment in memory at a
    // time; the envelopes come from the records, no body is read back.
    let started = std::time::Instant::now();
    let (spool, opened) = Spool::open(spool_cfg, &mut core)
        .await
        .map_err(|source| ShardError::Spool { shard: id, source })?;
    let report = &opened.report;
    tracing::info!(
        "shard {id} recovered {} segments, {} messages pending, {} corrupt records, {} torn tails in {} ms",
        report.segments,
        report.pending_messages,
        report.corrupt_records,
        report.torn_tails,
        started.elapsed().as_millis()
    );
    if !report.unreadable.is_empty() {
        tracing::error!(
            "shard {id}: {} unreadable records set aside in {}/quarantine: {}",
            report.unreadable.len(),
            cfg.spool.dir.join(format!("shard-{id}")).display(),
            report
                .unreadable
                .iter()
                .map(|u| format!("segment {} offset {} ({})", u.seq, u.offset, u.why))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    let resolver = (!settings.resolvers.is_empty()).then(|| {
        Rc::new(Resolver::new(
            ResolverConfig {
                servers: settings.resolvers.clone(),
                timeout: Duration::from_millis(cfg.dns.timeout_ms),
                attempts: cfg.dns.attempts,
            },
            crate::dns::cache::Cache::new(
                cfg.dns.ttl_min_s,
                cfg.dns.ttl_max_s,
                cfg.dns.cache_entries_max,
            ),
        ))
    });
    let core = Rc::new(CoreCell::new(core));
    let mesh = shards::Mesh::new(
        shard,
        &shards::MeshConfig {
            pending_max: MESH_PENDING_MAX,
        },
    )
    .map_err(|e| ShardError::Mesh {
        shard: id,
        why: e.to_string(),
    })?;
    let clients = Rc::new(RefCell::new(Clients::new(
        cfg.server.auth_failures_max,
        cfg.server.auth_failure_window_s.saturating_mul(1000),
    )));
    let peers = Rc::new(mesh::MeshPeers {
        mesh: mesh.clone(),
        clients: clients.clone(),
        clock: clock.clone(),
    });
    let reception = Rc::new(Reception::new(
        id,
        count,
        live.clone(),
        spool.clone(),
        core.clone(),
        peers,
        clock.clone(),
        stop.clone(),
        suppression.clone(),
        log_only,
        recorder.clone(),
    ));
    if let Some(s) = &suppression {
        s.set_remote(Rc::new(mesh::SuppressionRemote { mesh: mesh.clone() }));
    }
    let work = Rc::new(shards::Notify::new());
    // MTA-STS and DANE need a resolver; their trust roots are loaded once, in the settings.
    let tlspolicy = match (&resolver, &settings.tls_trust) {
        (Some(resolver), Some(trust)) => Some(Rc::new(crate::tlspolicy::lookup::Agent::new(
            crate::tlspolicy::lookup::AgentConfig {
                mta_sts: cfg.delivery.mta_sts,
                dane: cfg.delivery.dane,
                dir: cfg.spool.dir.join("mta-sts"),
                https_port: cfg.delivery.mta_sts_https_port,
                trust: trust.clone(),
                smtp_port: cfg.delivery.port,
            },
            resolver.clone(),
            clock.clone(),
        ))),
        _ => None,
    };
    let delivery = Rc::new(DeliveryCtx {
        settings: live.clone(),
        core: core.clone(),
        spool: spool.clone(),
        resolver: resolver.clone(),
        tlspolicy,
        clock: clock.clone(),
        work: work.clone(),
        metrics: recorder.clone(),
    });
    let outbox = mesh::LeaseOutbox::new(count);
    // Counting what is there reads the directory once, at start.
    let dead_letters = match cfg.dead_letter.enabled {
        true => Some(Rc::new(
            crate::deadletter::Store::open(
                &settings.dead_letter_dir(),
                id,
                cfg.dead_letter.messages_max,
                cfg.dead_letter.bytes_max,
            )
            .map_err(|source| ShardError::DeadLetter { shard: id, source })?,
        )),
        false => None,
    };
    let driver = Rc::new(perform::Driver::new(perform::Parts {
        dead_letters,
        shard: id,
        settings: live.clone(),
        core: core.clone(),
        spool: spool.clone(),
        reception: reception.clone(),
        delivery,
        resolver: resolver.clone(),
        clock: clock.clone(),
        work,
        outbox: outbox.clone(),
        log: log.clone(),
    }));
    {
        let driver = driver.clone();
        core.set_performer(Box::new(move |actions| driver.perform(actions)));
    }
    {
        let core = core.clone();
        spool.on_moved(Box::new(move |moves| core.with(|c| c.relocated(moves))));
    }
    let bound: Rc<RefCell<Vec<Rc<Listener>>>> = Rc::default();
    // Shard 0's admin server: the admin socket's connections and the HTTP admin API (from
    // every shard, over the mesh) both go to it.
    let admin_server = (id == 0).then(|| {
        Rc::new(admin::Server {
            mesh: mesh.clone(),
            audit: http::audit_path(&settings),
            settings: live.clone(),
            observers: admin_observers.clone(),
            clock: clock.clone(),
            reloader: shared.reloader.clone(),
            stop: stop.clone(),
            reloading: glommio::sync::Semaphore::new(1),
        })
    });
    let metrics_local = Rc::new(metrics::Local {
        recorder: recorder.clone(),
        spool: spool.clone(),
        alerts: Default::default(),
    });
    mesh.serve(Rc::new(mesh::Handler {
        admin: admin_server.clone(),
        spool: spool.clone(),
        reception: reception.clone(),
        core: core.clone(),
        clients,
        clock: clock.clone(),
        tlsrpt: tlsrpt.clone(),
        settings: live.clone(),
        listeners: bound.clone(),
        hooks: Rc::new(crate::suppression::AdminHooks {
            suppression: suppression.clone(),
        }),
        suppression: suppression.clone(),
        metrics: metrics_local.clone(),
    }));
    let mut outboxes = Vec::new();
    for to in (0..count).filter(|&to| to != id) {
        outboxes.push(glommio::spawn_local(outbox.clone().run(mesh.clone(), to)));
    }

    let committer = glommio::spawn_local(spool.clone().run_committer());
    let collector = glommio::spawn_local(spool.clone().run_collector());
    let compaction_queue = glommio::executor().create_task_queue(
        Shares::Static(COMPACTION_SHARES),
        Latency::NotImportant,
        "compaction",
    );
    let compactor = if cfg.spool.compact_live_ratio > 0.0 {
        let index: Rc<dyn crate::spool::LiveIndex> = core.clone();
        glommio::spawn_local_into(
            spool.clone().run_compactor(index, clock.clone()),
            compaction_queue,
        )
        .ok()
    } else {
        None
    };

    // Recovery's segment buffers are freed; hand the memory back to the system now rather than
    // whenever this thread next allocates a lot (mimalloc is the process's allocator).
    crate::alloc::collect();
    // Route what recovery found (the performer is in place: connections can open).
    let now = clock.now_ms();
    core.with(|c| c.replayed(opened.id_max, now));
    let timer = glommio::spawn_local(driver.clone().run_timer(stop.clone()));
    // Shard 0 sends the TLS reports, with every shard's counts.
    // Shard 0 evaluates the alert rules, over every shard's metrics.
    let alerter = (id == 0).then(|| {
        glommio::spawn_local(metrics::run_alerts(
            mesh.clone(),
            metrics_local.clone(),
            live.clone(),
            admin_observers.clone(),
            clock.clone(),
            stop.clone(),
        ))
    });
    let reporter = (id == 0 && tlsrpt.is_some()).then(|| {
        let trust = settings.tls_trust.clone().or_else(|| {
            let ca = &cfg.delivery.tls_ca_file;
            let file = ca.exists().then_some(ca.as_path());
            crate::tlspolicy::verify::trust(file).ok()
        });
        let reporter = Rc::new(tlsrpt::Reporter {
            settings: settings.clone(),
            mesh: mesh.clone(),
            reception: reception.clone(),
            clock: clock.clone(),
            lookup: tlsrpt::rua_lookup(resolver.clone()),
            post: tlsrpt::https_poster(resolver.clone(), trust),
        });
        glommio::spawn_local(reporter.run(stop.clone()))
    });

    let mut acceptors = Vec::new();
    let listeners = listener_specs(&settings);
    for (index, spec) in listeners.iter().enumerate() {
        let policy =
            Listener::new(&reception, index as u16, spec).map_err(|why| ShardError::Listen {
                shard: id,
                why: format!("invalid settings for listener {}: {why}", spec.address),
            })?;
        let socket = crate::reception::listen(spec.address).map_err(|e| ShardError::Listen {
            shard: id,
            why: e.to_string(),
        })?;
        let policy = Rc::new(policy);
        bound.borrow_mut().push(policy.clone());
        acceptors.push(glommio::spawn_local(crate::reception::accept_loop(
            reception.clone(),
            socket,
            policy,
        )));
    }
    // Shard 0 serves the admin socket.
    let handover = (id == 0)
        .then(|| shared.admin.as_ref()?.lock().ok()?.take())
        .flatten();
    let admin_socket = handover.zip(admin_server).map(|(end, server)| {
        use std::os::fd::{FromRawFd as _, IntoRawFd as _};
        // SAFETY: the descriptor comes out of a std stream we own (`into_raw_fd`), and only
        // this glommio stream owns it from here on.
        let end = unsafe { glommio::net::UnixStream::from_raw_fd(end.into_raw_fd()) };
        glommio::spawn_local(server.run(end))
    });
    if let Some((endpoint, _)) = &http_endpoint {
        endpoint.attach(Rc::new(http::Api {
            shard: id,
            shards: count,
            mesh: mesh.clone(),
            reception: reception.clone(),
            core: core.clone(),
            settings: live.clone(),
            clock: clock.clone(),
            observers: admin_observers.clone(),
            started_ms: now,
            ready: shared.ready.clone(),
        }));
    }
    let _ = shared.listening.send(id);

    // Until the stop signal (SIGTERM/SIGINT, or another shard failing to start), then in order.
    stop.wait().await;
    for acceptor in acceptors {
        acceptor.await;
    }
    if let Some(admin_socket) = admin_socket {
        admin_socket.await;
    }
    if let Some((_, accepting)) = http_endpoint {
        accepting.await;
    }
    core.with(|c| c.stop());
    let grace = Duration::from_secs(cfg.server.shutdown_grace_s);
    let drained = glommio::timer::timeout(grace, async {
        reception.sessions.drained().await;
        driver.deliveries_drained().await;
        Ok(())
    })
    .await;
    if drained.is_err() {
        tracing::warn!("shard {id}: grace period over with sessions or deliveries still open");
    }
    // Other shards' sessions may still hand parts to this shard: the mesh ends for all shards
    // together, and until then this shard still spools what they send.
    let ended = glommio::timer::timeout(grace, async {
        mesh.shutdown().await;
        Ok(())
    })
    .await;
    if ended.is_err() {
        mesh.abort();
    }
    timer.await;
    if let Some(alerter) = alerter {
        alerter.await;
    }
    if let Some(reporter) = reporter {
        reporter.await;
    }
    if let Some(counter) = &tlsrpt {
        counter.save().await;
    }
    drop(outboxes);
    spool.close();
    committer.await;
    collector.await;
    if let Some(compactor) = compactor {
        compactor.await;
    }
    log.close();
    Ok(())
}
