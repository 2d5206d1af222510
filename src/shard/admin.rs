//! The admin socket's server, on shard 0: reads operations from the connections the accept
//! thread hands over (`admin::socket`), sends each to every shard over the mesh, merges the
//! answers, writes one answer line per request, and logs every operation that changes
//! something as an Admin event. A reload is read and checked here (on the blocking pool: it
//! reads files) and handed to every shard only when it is valid.

use std::os::fd::FromRawFd as _;
use std::rc::Rc;
use std::sync::Arc;

use futures_lite::{AsyncReadExt as _, AsyncWriteExt as _};
use glommio::net::UnixStream;
use serde_json::Value;

use super::mesh::{Answer, Request, ShardMesh};
use crate::admin::{self, merge, Line, Lines, Op};
use crate::clock::Clock;
use crate::events::{Event, Observers};
use crate::settings::{Live, Settings};

/// Reads the configuration again as `serve` did at start (file and flags), checked the same
/// way. Runs on a blocking thread.
pub type Reloader = Arc<dyn Fn() -> Result<Settings, String> + Send + Sync>;

/// Bytes read from a connection at a time.
const READ_CHUNK_BYTES: usize = 4096;

/// Who asked for an operation, for the event log and the audit log.
#[derive(Clone, Debug)]
pub struct Caller {
    /// A token's name, `loopback`, or `uid:N` on the admin socket.
    pub who: String,
    /// The token's role, or `socket`.
    pub role: String,
    /// The client's address, or `admin.sock`.
    pub from: String,
    /// What was called: `POST /api/admin/suspend/v1`, or the operation's name.
    pub what: String,
    /// The admin socket's peer, as SO_PEERCRED said.
    pub peer_uid: Option<u32>,
}

impl Caller {
    fn socket(uid: Option<u32>, op: &Op) -> Caller {
        Caller {
            who: uid.map_or_else(|| "uid:unknown".to_owned(), |u| format!("uid:{u}")),
            role: "socket".into(),
            from: admin::socket::SOCKET_NAME.into(),
            what: op.name().into(),
            peer_uid: uid,
        }
    }
}

pub struct Server {
    pub mesh: Rc<ShardMesh>,
    /// The audit log (`http.audit_log`, or `LOG_DIR/audit.jsonl`).
    pub audit: std::path::PathBuf,
    pub settings: Rc<Live>,
    pub observers: Observers,
    pub clock: Rc<dyn Clock>,
    pub reloader: Option<Reloader>,
    pub stop: Rc<shards::LocalStop>,
    /// One reload at a time: two planned against the same old settings, or reaching the
    /// shards in different orders, would leave shards with different settings.
    pub reloading: glommio::sync::Semaphore,
}

impl Server {
    /// Serve the connections handed over on `handover` until the stop signal.
    pub async fn run(self: Rc<Self>, mut handover: UnixStream) {
        loop {
            let mut record = [0u8; admin::socket::HANDOVER_LEN];
            let read = futures_lite::future::or(
                async { Some(handover.read_exact(&mut record).await) },
                async {
                    self.stop.wait().await;
                    None
                },
            )
            .await;
            match read {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    tracing::error!("admin socket: the accept thread is gone: {e}");
                    return;
                }
                None => return,
            }
            let (fd, uid) = admin::socket::read_handover(&record);
            // SAFETY: the accept thread gave up this descriptor to us (`into_raw_fd`) and
            // never touches it again.
            let stream = unsafe { UnixStream::from_raw_fd(fd) };
            glommio::spawn_local(self.clone().connection(stream, uid)).detach();
        }
    }

    /// One client: requests in, answers out, until it closes or the server stops.
    async fn connection(self: Rc<Self>, mut stream: UnixStream, uid: Option<u32>) {
        let mut lines = Lines::default();
        let mut buf = vec![0u8; READ_CHUNK_BYTES];
        loop {
            let read =
                futures_lite::future::or(async { Some(stream.read(&mut buf).await) }, async {
                    self.stop.wait().await;
                    None
                })
                .await;
            let n = match read {
                Some(Ok(0)) | Some(Err(_)) | None => return,
                Some(Ok(n)) => n,
            };
            for line in lines.push(&buf[..n]) {
                let answer = match line {
                    Line::TooLong => admin::error(format!(
                        "bad request: line longer than {} bytes",
                        admin::REQUEST_LINE_MAX
                    )),
                    Line::Request(bytes) => match admin::parse_request(&bytes) {
                        Ok(op) => {
                            let caller = Caller::socket(uid, &op);
                            self.answer(op, caller).await
                        }
                        Err(why) => admin::error(why),
                    },
                };
                let mut out = serde_json::to_vec(&answer).unwrap_or_else(|e| {
                    format!("{{\"error\":\"cannot serialize the answer: {e}\"}}").into_bytes()
                });
                out.push(b'\n');
                if stream.write_all(&out).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Carry out `op` for `caller`: log it as an event when it changes something, and in
    /// the audit log always (synced before the answer goes out). The admin socket and the
    /// HTTP admin API (from any shard, over the mesh) both come here.
    pub async fn answer(&self, op: Op, caller: Caller) -> Value {
        let answer = match &op {
            Op::Reload => self.reload().await,
            _ => {
                let answers = self.mesh.gather(|_| Request::Admin(op.clone())).await;
                merge::merge(answers.into_iter().map(shard_answer).collect())
            }
        };
        if op.mutates() {
            let args = serde_json::to_value(&op).unwrap_or(Value::Null);
            let result = admin::summary(&answer);
            self.observers.emit(&Event::Admin(crate::events::Admin {
                ts_ms: self.clock.now_ms(),
                shard: self.mesh.id(),
                op: op.name(),
                args: &args,
                result: &result,
                peer_uid: caller.peer_uid,
            }));
        }
        self.audit(&op, &caller, &answer).await;
        answer
    }

    /// One audit line for `op`, synced (on the blocking pool: it is a file).
    async fn audit(&self, op: &Op, caller: &Caller, answer: &Value) {
        let args = serde_json::to_value(op).unwrap_or(Value::Null);
        let result = admin::summary(answer);
        let status = match answer.get("error") {
            Some(_) => 400,
            None => 200,
        };
        let line = crate::http::audit::Entry {
            ts_ms: self.clock.now_ms(),
            who: &caller.who,
            role: &caller.role,
            from: &caller.from,
            what: &caller.what,
            args: &args,
            status,
            result: &result,
        }
        .line();
        let path = self.audit.clone();
        let written = glommio::executor()
            .spawn_blocking(move || crate::http::audit::append(&path, &line))
            .await;
        if let Err(e) = written {
            tracing::error!("audit log {}: {e}", self.audit.display());
        }
    }

    /// Read the configuration again; if it is valid, hand what a running server can take to
    /// every shard, and say what needs a restart. If not, the running settings stay.
    async fn reload(&self) -> Value {
        let Some(reloader) = self.reloader.clone() else {
            return admin::error("reload: this server was not started from a configuration");
        };
        let Ok(_turn) = self.reloading.acquire_permit(1).await else {
            return admin::error("reload: the server is stopping");
        };
        let loaded = glommio::executor().spawn_blocking(move || reloader()).await;
        let refused = |why: String| {
            tracing::error!("reload refused, the running configuration stays: {why}");
            admin::error(format!(
                "reload refused, the running configuration stays: {why}"
            ))
        };
        let new = match loaded {
            Ok(new) => new,
            Err(why) => return refused(why),
        };
        let plan = admin::reload::plan(&self.settings.get(), new);
        // What each shard's start checks of its listeners, checked before any shard swaps.
        for spec in super::listener_specs(&plan.settings) {
            if let Err(why) = crate::reception::listener::server_config(&plan.settings, &spec) {
                return refused(format!(
                    "invalid settings for listener {}: {why}",
                    spec.address
                ));
            }
        }
        let settings = Arc::new(plan.settings);
        let answers = self
            .mesh
            .gather(|_| Request::Reload(settings.clone()))
            .await;
        let mut answer = merge::merge(answers.into_iter().map(shard_answer).collect());
        if let Some(object) = answer.as_object_mut() {
            object.insert("applied".into(), plan.applied.clone().into());
            object.insert("restart_needed".into(), plan.restart_needed.clone().into());
        }
        match answer.get("error") {
            Some(e) => tracing::error!("reload: {e}"),
            None => tracing::info!(
                applied = ?plan.applied,
                restart_needed = ?plan.restart_needed,
                "configuration reloaded"
            ),
        }
        answer
    }
}

/// A shard's answer as the merge takes it.
fn shard_answer(
    (shard, answer): (usize, Result<Answer, shards::CallError<Request>>),
) -> merge::ShardAnswer {
    let answer = match answer {
        Ok(Answer::Admin(value)) => Ok(value),
        Ok(_) => Err("answered something else".to_owned()),
        Err(e) => Err(format!("did not answer: {e}")),
    };
    (shard, answer)
}
