//! What shards say to each other: a message part to spool, lease messages, per-client
//! counts, suppression list questions for the owner of an entry. Carried by the `shards` crate's mesh (request/reply and one-way casts).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::IpAddr;
use std::rc::Rc;

use shards::{CallError, Mesh, Notify};

use crate::clients::{Clients, IpLimits};
use crate::clock::Clock;
use crate::core::CoreCell;
use crate::egress::lease::LeaseMsg;
use crate::reception::{AcceptError, LocalFuture, Peers, Reception, Submission};

pub enum Request {
    /// Spool this part; answered with `Submitted` once durable.
    Submit(Box<Submission>),
    /// A lease message (cast).
    Lease(LeaseMsg),
    /// Count a connection from `ip`; answered with `Allowed`.
    ClientConnect { ip: IpAddr, limits: IpLimits },
    /// A counted connection closed (cast).
    ClientDisconnect { ip: IpAddr, listener: u16 },
    /// May `ip` try AUTH? Answered with `Allowed`.
    AuthAllowed { ip: IpAddr },
    /// An AUTH attempt's result (cast).
    AuthResult { ip: IpAddr, ok: bool },
    /// Hand over the TLS report counts of every period before `before`; answered with
    /// `TlsRpt`.
    TlsRptTake { before: u64 },
    /// An operator's operation on this shard's queue; answered with `Admin`.
    Admin(crate::admin::Op),
    /// An operator's operation from the HTTP admin API, for shard 0's admin server (the
    /// admin socket's handler, so both take one path); answered with `Admin`.
    AdminServe(Box<(crate::admin::Op, super::admin::Caller)>),
    /// One message by id, with its body when `body` (read from the spool on demand);
    /// answered with `Admin` (`{"found": false}` when it is not queued here).
    InspectMessage { id: String, body: bool },
    /// Swap in reloaded settings (already checked and planned by shard 0); answered with
    /// `Admin`.
    Reload(std::sync::Arc<crate::settings::Settings>),
    /// A suppression list question for the shard that owns the entries; answered with
    /// `Suppression`.
    Suppression(crate::suppression::Request),
    /// This shard's metrics for a scrape; answered with `Metrics`.
    Metrics,
}

pub enum Answer {
    Submitted(Result<(), AcceptError>),
    Allowed(bool),
    TlsRpt(Vec<crate::tlsrpt::DayTally>),
    /// This shard's answer to an operation (a JSON object, merged by shard 0).
    Admin(serde_json::Value),
    Suppression(Result<crate::suppression::Response, crate::suppression::SuppressionError>),
    Done,
    Metrics(Box<crate::metrics::ShardMetrics>),
}

pub type ShardMesh = Mesh<Request, Answer>;

/// Lease messages to each peer, in order: one sender task per peer drains its queue, so a
/// full channel delays them but never reorders or drops them.
pub struct LeaseOutbox {
    queues: RefCell<Vec<VecDeque<LeaseMsg>>>,
    queued: Notify,
}

impl LeaseOutbox {
    pub fn new(shards: usize) -> Rc<LeaseOutbox> {
        Rc::new(LeaseOutbox {
            queues: RefCell::new(vec![VecDeque::new(); shards]),
            queued: Notify::new(),
        })
    }

    pub fn push(&self, to: usize, msg: LeaseMsg) {
        if let Some(q) = self.queues.borrow_mut().get_mut(to) {
            q.push_back(msg);
        }
        self.queued.notify_all();
    }

    /// Send the queue of shard `to` until the mesh closes.
    pub async fn run(self: Rc<Self>, mesh: Rc<ShardMesh>, to: usize) {
        loop {
            let next = self
                .queues
                .borrow_mut()
                .get_mut(to)
                .and_then(|q| q.pop_front());
            match next {
                Some(msg) => {
                    if mesh.cast(to, Request::Lease(msg)).await.is_err() {
                        // The peer is gone (shutting down): nothing waits for its answers.
                        return;
                    }
                }
                None => self.queued.notified().await,
            }
        }
    }
}

/// Reception's view of the other shards, over the mesh.
pub struct MeshPeers {
    pub mesh: Rc<ShardMesh>,
    pub clients: Rc<RefCell<Clients>>,
    pub clock: Rc<dyn Clock>,
}

impl MeshPeers {
    fn owner(&self, ip: IpAddr) -> usize {
        crate::clients::owner_of(ip, self.mesh.count())
    }

    fn cast_later(&self, to: usize, q: Request) {
        let mesh = self.mesh.clone();
        glommio::spawn_local(async move {
            // Waits for room; fails only when the mesh is closing, when nobody counts any more.
            let _ = mesh.cast(to, q).await;
        })
        .detach();
    }
}

impl Peers for MeshPeers {
    fn submit(&self, to: usize, sub: Submission) -> LocalFuture<'_, Result<(), AcceptError>> {
        Box::pin(async move {
            match self.mesh.call(to, Request::Submit(Box::new(sub))).await {
                Ok(Answer::Submitted(result)) => result,
                Ok(_) => Err(AcceptError::PeerGone(to)),
                // The part came back to us: the client is told to try again.
                Err(CallError::Full(_)) => Err(AcceptError::PeerBusy(to)),
                Err(CallError::Closed(_)) | Err(CallError::NoShard(_)) => {
                    Err(AcceptError::ShuttingDown)
                }
                Err(CallError::Dropped) => Err(AcceptError::PeerGone(to)),
            }
        })
    }

    fn client_connect(&self, ip: IpAddr, limits: IpLimits) -> LocalFuture<'_, bool> {
        Box::pin(async move {
            let owner = self.owner(ip);
            if owner == self.mesh.id() {
                return self.clients.borrow_mut().connect(ip, limits);
            }
            matches!(
                self.mesh
                    .call_wait(owner, Request::ClientConnect { ip, limits })
                    .await,
                Ok(Answer::Allowed(true))
            )
        })
    }

    fn client_disconnect(&self, ip: IpAddr, listener: u16) {
        let owner = self.owner(ip);
        if owner == self.mesh.id() {
            self.clients.borrow_mut().disconnect(ip, listener);
        } else {
            self.cast_later(owner, Request::ClientDisconnect { ip, listener });
        }
    }

    fn auth_allowed(&self, ip: IpAddr) -> LocalFuture<'_, bool> {
        Box::pin(async move {
            let owner = self.owner(ip);
            if owner == self.mesh.id() {
                let now = self.clock.now_ms();
                return self.clients.borrow().auth_allowed(ip, now);
            }
            // A shard that cannot be asked does not get to lock the client out.
            !matches!(
                self.mesh
                    .call_wait(owner, Request::AuthAllowed { ip })
                    .await,
                Ok(Answer::Allowed(false))
            )
        })
    }

    fn auth_result(&self, ip: IpAddr, ok: bool) {
        let owner = self.owner(ip);
        if owner == self.mesh.id() {
            let now = self.clock.now_ms();
            self.clients.borrow_mut().auth_result(ip, ok, now);
        } else {
            self.cast_later(owner, Request::AuthResult { ip, ok });
        }
    }
}

/// The suppression list's way to the other shards.
pub struct SuppressionRemote {
    pub mesh: Rc<ShardMesh>,
}

impl crate::suppression::Remote for SuppressionRemote {
    fn ask(
        &self,
        to: usize,
        q: crate::suppression::Request,
    ) -> LocalFuture<'_, Result<crate::suppression::Response, crate::suppression::SuppressionError>>
    {
        Box::pin(async move {
            match self.mesh.call_wait(to, Request::Suppression(q)).await {
                Ok(Answer::Suppression(result)) => result,
                _ => Err(crate::suppression::SuppressionError::Peer(to)),
            }
        })
    }
}

/// Serves what other shards ask of this one.
pub struct Handler {
    pub reception: Rc<Reception>,
    pub core: Rc<CoreCell>,
    pub clients: Rc<RefCell<Clients>>,
    pub clock: Rc<dyn Clock>,
    /// This shard's TLS report counts, when reporting is on.
    pub tlsrpt: Option<Rc<super::tlsrpt::Counter>>,
    /// The settings sessions and connections start with (a reload swaps them).
    pub settings: Rc<crate::settings::Live>,
    /// This shard's listeners, with their specs in the settings' order (see
    /// `super::listener_specs`), filled once they are bound.
    pub listeners: Rc<RefCell<Vec<Rc<crate::reception::Listener>>>>,
    /// Operations the core does not carry out.
    pub hooks: Rc<dyn crate::admin::Hooks>,
    /// This shard's suppression entries, when the list is on.
    pub suppression: Option<Rc<crate::suppression::Suppression>>,
    /// Shard 0's admin server (None on the others).
    pub admin: Option<Rc<super::admin::Server>>,
    /// This shard's spool, for reading a message on demand (inspect-message).
    pub spool: Rc<crate::spool::Spool>,
    /// This shard's metrics.
    pub metrics: Rc<super::metrics::Local>,
}

/// The body of an inspected message is cut to this many bytes: enough to see any header
/// and the start of the content; the whole message is in the spool.
const INSPECT_BODY_MAX: usize = 1 << 20;

/// `InspectMessage` on this shard.
async fn inspect_message(
    core: Rc<CoreCell>,
    spool: Rc<crate::spool::Spool>,
    id: String,
    body: bool,
    now: u64,
) -> serde_json::Value {
    let Some((loc, mut row)) = core.read(|c| c.locate(&id, now)) else {
        return serde_json::json!({ "found": false });
    };
    row["found"] = true.into();
    if body {
        match spool.read_message(loc).await {
            Ok(stored) => match stored.view() {
                Ok(view) => {
                    let whole = view.body();
                    let truncated = whole.len() > INSPECT_BODY_MAX;
                    let data = &whole[..whole.len().min(INSPECT_BODY_MAX)];
                    row["data"] = String::from_utf8_lossy(data).into_owned().into();
                    row["data_truncated"] = truncated.into();
                }
                Err(e) => row["error"] = format!("the spooled record is unreadable: {e}").into(),
            },
            Err(e) => row["error"] = format!("cannot read the spool: {e}").into(),
        }
    }
    row
}

impl Handler {
    /// Operation `op` on this shard.
    fn admin(&self, op: &crate::admin::Op, now: u64) -> serde_json::Value {
        use crate::admin::Op;
        match op {
            Op::Suppression(s) => self.hooks.suppression(s, now),
            Op::Reinject { id } => self.hooks.reinject(id.as_deref(), now),
            // Shard 0 reads the files and sends `Request::Reload`.
            Op::Reload => crate::admin::error("`reload` goes to the admin socket, not a shard"),
            _ => self.core.with(|c| c.admin(op, now)),
        }
    }

    /// Swap in `settings`: new sessions, connections and notices use them, and the core its
    /// routes, backoff, rules and limits. What is running keeps what it started with.
    fn reload(&self, settings: &crate::settings::Settings, now: u64) -> serde_json::Value {
        let settings = Rc::new(settings.clone());
        let specs = super::listener_specs(&settings);
        let mut failed = Vec::new();
        for (listener, spec) in self.listeners.borrow().iter().zip(&specs) {
            // Checked by shard 0 before sending; a failure keeps that listener's old policy.
            if let Err(why) = listener.update(&settings, spec) {
                failed.push(format!("listener {}: {why}", spec.address));
            }
        }
        self.settings.set(settings.clone());
        let shard = self.core.with(|c| {
            c.reload(settings, now);
            c.shard()
        });
        match failed.is_empty() {
            true => serde_json::json!({ "shard": shard, "reloaded": 1 }),
            false => serde_json::json!({ "shard": shard, "error": failed.join("; ") }),
        }
    }
}

impl shards::Handler<Request, Answer> for Handler {
    fn handle(&self, from: usize, q: Request) -> shards::Reply<Answer> {
        use crate::admin::Op;
        let now = self.clock.now_ms();
        // Everything but a submission is answered here, synchronously, in arrival order (the
        // lease protocol relies on it).
        let answer = match q {
            Request::Submit(sub) => {
                let reception = self.reception.clone();
                return Box::pin(async move {
                    let Submission {
                        envelope,
                        body,
                        tls,
                        intake,
                        refused,
                    } = *sub;
                    Answer::Submitted(
                        reception
                            .spool_part(envelope, &body, tls.as_deref(), intake, &refused)
                            .await,
                    )
                });
            }
            Request::Suppression(q) => {
                let suppression = self.suppression.clone();
                return Box::pin(async move {
                    Answer::Suppression(match suppression {
                        Some(s) => s.serve(q).await,
                        None => Err(crate::suppression::SuppressionError::Disabled),
                    })
                });
            }
            Request::Lease(msg) => {
                self.core.with(|c| c.lease_in(from, msg, now));
                Answer::Done
            }
            Request::ClientConnect { ip, limits } => {
                Answer::Allowed(self.clients.borrow_mut().connect(ip, limits))
            }
            Request::ClientDisconnect { ip, listener } => {
                self.clients.borrow_mut().disconnect(ip, listener);
                Answer::Done
            }
            Request::AuthAllowed { ip } => {
                Answer::Allowed(self.clients.borrow().auth_allowed(ip, now))
            }
            Request::AuthResult { ip, ok } => {
                self.clients.borrow_mut().auth_result(ip, ok, now);
                Answer::Done
            }
            // Mass operations (bounce, flush, resume) walk the queue a bounded step at a time,
            // their actions performed between steps, so memory stays flat; other shard work
            // runs in between.
            Request::Admin(op @ (Op::Bounce { .. } | Op::Flush { .. } | Op::Resume { .. })) => {
                let core = self.core.clone();
                let clock = self.clock.clone();
                return Box::pin(async move {
                    let mut total = serde_json::Value::Null;
                    let mut cursor = 0;
                    loop {
                        let now = clock.now_ms();
                        let step = core.with(|c| c.admin_step(&op, cursor, now));
                        total = crate::core::merge_counts(total, step.answer);
                        match step.next {
                            Some(next) => cursor = next,
                            None => break,
                        }
                        // Let the committer write what the step appended.
                        glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
                    }
                    Answer::Admin(total)
                });
            }
            // Dead letters are read from every shard's directory by one shard (0), each
            // re-injected through reception (durable in its owner shards) before its files go.
            Request::Admin(Op::Reinject { id }) => {
                let reception = self.reception.clone();
                let settings = self.settings.get();
                let clock = self.clock.clone();
                let shard = self.core.read(|c| c.shard());
                return Box::pin(async move {
                    if shard != 0 {
                        return Answer::Admin(
                            serde_json::json!({ "reinjected": [], "failed": [] }),
                        );
                    }
                    if !settings.config.dead_letter.enabled {
                        return Answer::Admin(crate::admin::error(
                            "dead letters are off (`dead_letter.enabled = false`)",
                        ));
                    }
                    let root = settings.dead_letter_dir();
                    let done =
                        crate::deadletter::reinject(&reception, &root, id.as_deref(), &*clock)
                            .await;
                    Answer::Admin(match done {
                        Ok(report) => serde_json::to_value(&report)
                            .unwrap_or_else(|e| crate::admin::error(e.to_string())),
                        Err(e) => crate::admin::error(e.to_string()),
                    })
                });
            }
            Request::Admin(op) => Answer::Admin(self.admin(&op, now)),
            Request::InspectMessage { id, body } => {
                let (core, spool) = (self.core.clone(), self.spool.clone());
                return Box::pin(async move {
                    Answer::Admin(inspect_message(core, spool, id, body, now).await)
                });
            }
            Request::AdminServe(call) => {
                let Some(server) = self.admin.clone() else {
                    return Box::pin(std::future::ready(Answer::Admin(crate::admin::error(
                        "admin operations go to shard 0",
                    ))));
                };
                return Box::pin(async move {
                    let (op, caller) = *call;
                    Answer::Admin(server.answer(op, caller).await)
                });
            }
            Request::Reload(settings) => Answer::Admin(self.reload(&settings, now)),
            Request::Metrics => Answer::Metrics(Box::new(self.metrics.part(
                &self.core,
                &self.reception,
                now,
            ))),
            Request::TlsRptTake { before } => Answer::TlsRpt(
                self.tlsrpt
                    .as_ref()
                    .map(|c| c.take_before(before))
                    .unwrap_or_default(),
            ),
        };
        Box::pin(std::future::ready(answer))
    }
}
