//! The HTTP endpoint on a shard: every shard accepts on `http.listen` (SO_REUSEPORT, as
//! glommio binds), reads requests with `http::Reader`, answers them, keeps connections alive.
//! The protocol and the access rules live in `crate::http` (no I/O); this is the adapter.
//!
//! The listener is bound before the spool is recovered, so liveness answers while a big
//! spool is read back and readiness says it is not ready yet; every other path answers 503
//! until the shard is up ([`Endpoint::attach`]).
//!
//! Requests a shard cannot answer alone go over the mesh: admin operations to shard 0's
//! admin server (the admin socket's handler), metrics and summaries to every shard.

mod dashboard;
mod inject;

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{AsyncReadExt as _, AsyncWriteExt as _};
use glommio::net::{TcpListener, TcpStream};

mod metrics;

use super::admin::Caller;
use super::mesh::{Answer, Request as MeshRequest, ShardMesh};
use crate::clock::Clock;
use crate::core::CoreCell;
use crate::events::Observers;
use crate::http::access::{Access, Principal, Role, SESSION_COOKIE};
use crate::http::admin::AdminCall;
use crate::http::{Reader, Request, Response, Step};
use crate::reception::Reception;
use crate::settings::{Live, Settings};
use crate::tls::TlsLayer;

/// Bytes read from a connection at a time.
const READ_CHUNK_BYTES: usize = 16 << 10;
/// Pause after a failed accept (out of descriptors, say) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What a shard's handlers work with, once the shard is up.
pub struct Api {
    pub shard: usize,
    pub shards: usize,
    pub mesh: Rc<ShardMesh>,
    pub reception: Rc<Reception>,
    pub core: Rc<CoreCell>,
    pub settings: Rc<Live>,
    pub clock: Rc<dyn Clock>,
    pub observers: Observers,
    /// When this process started (Unix ms).
    pub started_ms: u64,
    /// Every shard listens (set by the process).
    pub ready: Arc<AtomicBool>,
}

/// One shard's HTTP endpoint: bound early, handlers attached once the shard is up.
pub struct Endpoint {
    shard: usize,
    settings: Arc<Settings>,
    access: Access,
    /// Every shard listens (set by the process): readiness.
    ready: Arc<AtomicBool>,
    api: RefCell<Option<Rc<Api>>>,
    tls: Option<Arc<rustls::ServerConfig>>,
    connections: Cell<usize>,
    stop: Rc<shards::LocalStop>,
}

/// A started endpoint and its accepting task (awaited at shutdown).
pub type Started = (Rc<Endpoint>, glommio::Task<()>);

/// The address HTTP is served on, if any.
pub fn address(settings: &Settings) -> Option<SocketAddr> {
    settings.config.http.listen
}

/// Where the audit log goes.
pub fn audit_path(settings: &Settings) -> std::path::PathBuf {
    let cfg = &settings.config;
    cfg.http
        .audit_log
        .clone()
        .unwrap_or_else(|| cfg.log.dir.join("audit.jsonl"))
}

impl Endpoint {
    /// Bind `http.listen` on this shard and start accepting; None when HTTP is off.
    pub fn start(
        shard: usize,
        settings: Arc<Settings>,
        ready: Arc<AtomicBool>,
        stop: Rc<shards::LocalStop>,
    ) -> Result<Option<Started>, String> {
        let Some(addr) = address(&settings) else {
            return Ok(None);
        };
        let socket =
            TcpListener::bind(addr).map_err(|e| format!("http: cannot listen on {addr}: {e}"))?;
        let http = &settings.config.http;
        let endpoint = Rc::new(Endpoint {
            shard,
            access: Access::new(http.tokens_file.clone(), http.role_networks()),
            tls: http.tls.then(|| settings.tls.clone()),
            settings,
            ready,
            api: RefCell::new(None),
            connections: Cell::new(0),
            stop,
        });
        let task = glommio::spawn_local(endpoint.clone().accept_loop(socket));
        Ok(Some((endpoint, task)))
    }

    /// The shard is up: serve every path from now on.
    pub fn attach(&self, api: Rc<Api>) {
        *self.api.borrow_mut() = Some(api);
    }

    async fn accept_loop(self: Rc<Self>, socket: TcpListener) {
        loop {
            let accepted = futures_lite::future::or(async { Some(socket.accept().await) }, async {
                self.stop.wait().await;
                None
            })
            .await;
            let Some(accepted) = accepted else { break };
            let stream = match accepted {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!(shard = self.shard, "http: accept failed: {e}");
                    glommio::timer::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let me = self.clone();
            glommio::spawn_local(async move {
                me.connections.set(me.connections.get() + 1);
                if let Err(e) = me.clone().connection(stream).await {
                    use std::io::ErrorKind;
                    if !matches!(
                        e.kind(),
                        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::TimedOut
                    ) {
                        tracing::debug!(shard = me.shard, "http connection: {e}");
                    }
                }
                me.connections.set(me.connections.get() - 1);
            })
            .detach();
        }
    }

    /// One connection: requests in, responses out, until it closes, times out, or the
    /// server stops.
    async fn connection(self: Rc<Self>, mut stream: TcpStream) -> std::io::Result<()> {
        let _ = stream.set_nodelay(true);
        let peer = stream.peer_addr()?;
        let http = &self.settings.config.http;
        let mut conn = Conn {
            tls: match &self.tls {
                Some(config) => Some(
                    TlsLayer::new(config.clone())
                        .map_err(|e| std::io::Error::other(e.to_string()))?,
                ),
                None => None,
            },
            wire: Vec::new(),
        };
        if self.connections.get() > http.connections_max {
            let busy = Response::error(503, "too many HTTP connections; try again");
            conn.send(&mut stream, &busy.to_bytes(false, false)).await?;
            return Ok(());
        }
        let mut reader = Reader::new(http.head_max, http.body_max);
        let mut buf = vec![0u8; READ_CHUNK_BYTES];
        let mut request_started: Option<std::time::Instant> = None;
        loop {
            match reader.step(peer) {
                Step::Request(req) => {
                    request_started = None;
                    let head = req.method == "HEAD";
                    let keep_alive = req.keep_alive && !self.stop.is_triggered();
                    let response = self.answer(&req).await;
                    conn.send(&mut stream, &response.to_bytes(keep_alive, head))
                        .await?;
                    if !keep_alive {
                        return Ok(());
                    }
                    continue;
                }
                Step::Continue => {
                    conn.send(&mut stream, b"HTTP/1.1 100 Continue\r\n\r\n")
                        .await?;
                    continue;
                }
                Step::Fail(response) => {
                    conn.send(&mut stream, &response.to_bytes(false, false))
                        .await?;
                    return Ok(());
                }
                Step::Need => {}
            }
            // Waiting for (more of) a request: a started one has its deadline, an idle
            // connection its keep-alive timeout.
            let wait = match (reader.in_request(), request_started) {
                (true, Some(at)) => {
                    Duration::from_millis(http.request_timeout_ms).saturating_sub(at.elapsed())
                }
                (true, None) => {
                    request_started = Some(std::time::Instant::now());
                    Duration::from_millis(http.request_timeout_ms)
                }
                (false, _) => Duration::from_millis(http.idle_timeout_ms),
            };
            let read = futures_lite::future::or(
                async {
                    Some(
                        glommio::timer::timeout(wait, async { Ok(stream.read(&mut buf).await) })
                            .await,
                    )
                },
                async {
                    self.stop.wait().await;
                    None
                },
            )
            .await;
            let n = match read {
                None => return Ok(()),
                Some(Err(_)) if reader.in_request() => {
                    let late = Response::error(408, "the request did not arrive in time");
                    conn.send(&mut stream, &late.to_bytes(false, false)).await?;
                    return Ok(());
                }
                Some(Err(_)) => return Ok(()),
                Some(Ok(Err(e))) => return Err(e),
                Some(Ok(Ok(0))) => return Ok(()),
                Some(Ok(Ok(n))) => n,
            };
            if request_started.is_none() {
                request_started = Some(std::time::Instant::now());
            }
            match &mut conn.tls {
                Some(tls) => {
                    let mut plain = Vec::new();
                    let mut out = Vec::new();
                    let received = tls.receive(&buf[..n], &mut plain, &mut out);
                    if !out.is_empty() {
                        stream.write_all(&out).await?;
                    }
                    received.map_err(|e| std::io::Error::other(e.to_string()))?;
                    reader.feed(&plain);
                }
                None => reader.feed(&buf[..n]),
            }
        }
    }

    /// The response to one request.
    async fn answer(&self, req: &Request) -> Response {
        let now = crate::clock::SystemClock.now_ms();
        let path = req.path.as_str();
        // Public: probes, the login, and the page's static assets.
        match (req.method.as_str(), path) {
            ("GET" | "HEAD", "/api/check-liveness/v1") => {
                return Response::json(200, &serde_json::json!({ "status": "alive" }))
            }
            ("GET" | "HEAD", "/api/check-readiness/v1") => return self.readiness(),
            ("POST", "/login") => return self.login(req, now),
            _ => {}
        }
        if let Some(asset) = path.strip_prefix("/static/") {
            return dashboard::asset(asset);
        }
        let who = match self.access.authorize(req, now) {
            Ok(who) => who,
            Err(denied) if path == "/" && req.method == "GET" => {
                // A browser: the token in the address logs in; else the login form.
                if let Some(token) = req.param("token") {
                    return self.login_with(token, req, now);
                }
                if denied.status == 401 {
                    return dashboard::login(false);
                }
                return denied;
            }
            Err(denied) => {
                if path.starts_with("/api/admin/") {
                    audit_refused(&self.settings, req, "-", "-", &denied).await;
                }
                return denied;
            }
        };
        if path == "/" && req.method == "GET" {
            if let Some(token) = req.param("token") {
                // Logged in already (or loopback): still set the cookie, and clean the URL.
                return self.login_with(token, req, now);
            }
        }
        let Some(api) = self.api.borrow().clone() else {
            return Response::error(503, "starting: the spool is being recovered");
        };
        api.route(req, &who).await
    }

    fn readiness(&self) -> Response {
        let up = self.api.borrow().is_some() && self.ready.load(Ordering::Acquire);
        match up {
            true => Response::json(200, &serde_json::json!({ "ready": true })),
            false => Response::json(
                503,
                &serde_json::json!({ "ready": false, "why": "recovering the spool or starting" }),
            ),
        }
    }

    /// `POST /login` with form field `token` (the dashboard's login form).
    fn login(&self, req: &Request, now: u64) -> Response {
        let form = crate::http::parse_form(&String::from_utf8_lossy(&req.body));
        let token = form
            .iter()
            .find(|(n, _)| n == "token")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        self.login_with(&token, req, now)
    }

    /// A valid token becomes the session cookie, and the browser goes to the page.
    fn login_with(&self, token: &str, req: &Request, now: u64) -> Response {
        if !self.access.has_tokens(now) {
            // Nothing to log in with (loopback only): just show the page.
            return Response::text(303, "text/plain", "").with_header("Location", "/");
        }
        if !self.access.knows(token, now) {
            tracing::info!(peer = %req.peer, "http: login with an unknown token");
            return dashboard::login(true);
        }
        let secure = if self.tls.is_some() { "; Secure" } else { "" };
        Response::text(303, "text/plain", "")
            .with_header("Location", "/")
            .with_header(
                "Set-Cookie",
                format!(
                    "{SESSION_COOKIE}={}; HttpOnly; SameSite=Strict; Path=/{secure}",
                    token.trim()
                ),
            )
    }
}

/// A connection's TLS layer, if any, and its outgoing record buffer.
struct Conn {
    tls: Option<TlsLayer>,
    wire: Vec<u8>,
}

impl Conn {
    async fn send(&mut self, stream: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
        match &mut self.tls {
            Some(tls) => {
                self.wire.clear();
                tls.send(bytes, &mut self.wire)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                stream.write_all(&self.wire).await
            }
            None => stream.write_all(bytes).await,
        }
    }
}

impl Api {
    /// Every authorized path.
    pub async fn route(&self, req: &Request, who: &Principal) -> Response {
        let path = req.path.as_str();
        match (req.method.as_str(), path) {
            ("GET", "/api/whoami/v1") => Response::json(
                200,
                &serde_json::json!({ "name": who.name, "role": who.role.name() }),
            ),
            ("GET", "/") => {
                if !who.may(Role::Viewer) {
                    return who.forbidden(Role::Viewer);
                }
                dashboard::page()
            }
            ("POST", "/api/inject/v1") => {
                if !who.may(Role::Injector) {
                    return who.forbidden(Role::Injector);
                }
                inject::handle(self, req).await
            }
            ("GET" | "HEAD", "/metrics") | ("GET" | "HEAD", "/api/dashboard/v1") => {
                if !who.may(Role::Viewer) {
                    return who.forbidden(Role::Viewer);
                }
                metrics::handle(self, path).await
            }
            (_, "/api/admin/tokens/v1") => self.tokens(req, who).await,
            ("GET", "/api/admin/inspect-message/v1" | "/api/admin/inspect-message") => {
                self.inspect_message(req, who).await
            }
            _ if path.starts_with("/api/admin/") => self.admin(req, who).await,
            _ => Response::error(404, format!("no such endpoint: {} {path}", req.method)),
        }
    }

    /// An admin API call: checked here, carried out by shard 0's admin server.
    async fn admin(&self, req: &Request, who: &Principal) -> Response {
        let settings = self.settings.get();
        let call = match crate::http::admin::parse(req) {
            Ok(call) => call,
            Err(bad) => {
                audit_refused(&settings, req, &who.name, who.role.name(), &bad).await;
                return bad;
            }
        };
        let (op, list) = match call {
            AdminCall::Op(op) => (op, false),
            AdminCall::ListSuspensions => (crate::admin::Op::Summary, true),
        };
        let needed = crate::http::admin::role_for(&op);
        if !who.may(needed) {
            let denied = who.forbidden(needed);
            audit_refused(&settings, req, &who.name, who.role.name(), &denied).await;
            return denied;
        }
        let caller = Caller {
            who: who.name.clone(),
            role: who.role.name().into(),
            from: who.peer.to_string(),
            what: format!("{} {}", req.method, req.path),
            peer_uid: None,
        };
        let answer = self.admin_op(op.clone(), caller).await;
        if list {
            return Response::json(200, &crate::http::admin::suspensions(&answer));
        }
        let answer = crate::http::admin::shape_answer(&op, answer);
        Response::json(crate::http::admin::status(&answer), &answer)
    }

    /// KumoMTA's `inspect-message`: one message by id (`id`), its body too with
    /// `want_body=true`, read from the owning shard's spool on demand (nothing is kept or
    /// computed for it otherwise). Role viewer; audited (it can show a message's content).
    async fn inspect_message(&self, req: &Request, who: &Principal) -> Response {
        let settings = self.settings.get();
        if !who.may(Role::Viewer) {
            let denied = who.forbidden(Role::Viewer);
            audit_refused(&settings, req, &who.name, who.role.name(), &denied).await;
            return denied;
        }
        let Some(id) = req.param("id").map(str::to_owned) else {
            return Response::error(400, "inspect-message needs ?id=RECEPTION_OR_QUEUE_ID");
        };
        let body = req
            .param("want_body")
            .is_some_and(|v| v == "true" || v == "1");
        let answers = self
            .mesh
            .gather(|_| MeshRequest::InspectMessage {
                id: id.clone(),
                body,
            })
            .await;
        let found = answers.into_iter().find_map(|(_, a)| match a {
            Ok(Answer::Admin(v)) if v["found"] == true => Some(v),
            _ => None,
        });
        let response = match found {
            None => Response::error(404, format!("no queued message with id {id}")),
            Some(mut row) => {
                let data = row.as_object_mut().and_then(|o| {
                    o.remove("found");
                    o.remove("data")
                });
                let recipients: Vec<serde_json::Value> = row["recipients"]
                    .as_array()
                    .map(|a| a.iter().map(|r| r["rcpt"].clone()).collect())
                    .unwrap_or_default();
                Response::json(
                    200,
                    &serde_json::json!({
                        "id": id,
                        "message": {
                            "sender": row["sender"],
                            "recipient": recipients,
                            "meta": row,
                            "data": data,
                        }
                    }),
                )
            }
        };
        let result = serde_json::json!({ "status": response.status, "want_body": body });
        let line = crate::http::audit::Entry {
            ts_ms: self.clock.now_ms(),
            who: &who.name,
            role: who.role.name(),
            from: &who.peer.to_string(),
            what: &format!("{} {}", req.method, req.path),
            args: &serde_json::json!({ "id": id }),
            status: response.status,
            result: &result,
        }
        .line();
        append_audit(&settings, line).await;
        response
    }

    /// `op` through shard 0's admin server.
    pub async fn admin_op(&self, op: crate::admin::Op, caller: Caller) -> serde_json::Value {
        match self
            .mesh
            .call_wait(0, MeshRequest::AdminServe(Box::new((op, caller))))
            .await
        {
            Ok(Answer::Admin(value)) => value,
            Ok(_) => crate::admin::error("shard 0 answered something else"),
            Err(e) => crate::admin::error(format!("shard 0 did not answer: {e}")),
        }
    }

    /// `/api/admin/tokens/v1`: list (GET), add (POST `name`, `role`; the token is in the
    /// answer, once), remove (DELETE `name`). Role admin; each call is audited.
    async fn tokens(&self, req: &Request, who: &Principal) -> Response {
        if !who.may(Role::Admin) {
            return who.forbidden(Role::Admin);
        }
        let settings = self.settings.get();
        let Some(file) = settings.config.http.tokens_file.clone() else {
            return Response::error(
                409,
                "no http.tokens_file is configured: set it, then add tokens",
            );
        };
        #[derive(serde::Deserialize, Default)]
        struct Body {
            #[serde(default)]
            name: String,
            #[serde(default)]
            role: String,
        }
        let body: Body = match req.method.as_str() {
            "GET" => Body::default(),
            _ => match req.json() {
                Ok(b) => b,
                Err(bad) => return bad,
            },
        };
        let now = self.clock.now_ms();
        let method = req.method.clone();
        let result = glommio::executor()
            .spawn_blocking(move || -> Result<serde_json::Value, (u16, String)> {
                use crate::http::access;
                match method.as_str() {
                    "GET" => {
                        let list = access::read_tokens(&file).map_err(|e| (500, e.to_string()))?;
                        let rows: Vec<_> = list
                            .iter()
                            .map(|t| {
                                serde_json::json!({
                                    "name": t.name, "role": t.role.name(), "created_ms": t.created_ms
                                })
                            })
                            .collect();
                        Ok(serde_json::json!({ "tokens": rows }))
                    }
                    "POST" => {
                        let role = Role::parse(&body.role).ok_or((
                            400,
                            "role: one of viewer, injector, operator, admin".to_owned(),
                        ))?;
                        let token = access::add_token(&file, &body.name, role, now)
                            .map_err(|e| (400, e.to_string()))?;
                        Ok(serde_json::json!({ "name": body.name, "role": role.name(), "token": token }))
                    }
                    "DELETE" => {
                        access::remove_token(&file, &body.name)
                            .map_err(|e| (404, e.to_string()))?;
                        Ok(serde_json::json!({ "removed": body.name }))
                    }
                    other => Err((405, format!("{other} is not allowed on /api/admin/tokens/v1"))),
                }
            })
            .await;
        let (status, answer) = match result {
            Ok(value) => (200, value),
            Err((status, why)) => (status, serde_json::json!({ "error": why })),
        };
        if req.method != "GET" {
            // The new token itself never goes into the audit log.
            let mut logged = answer.clone();
            if let Some(o) = logged.as_object_mut() {
                o.remove("token");
            }
            let line = crate::http::audit::Entry {
                ts_ms: now,
                who: &who.name,
                role: who.role.name(),
                from: &who.peer.to_string(),
                what: &format!("{} {}", req.method, req.path),
                args: &serde_json::json!({}),
                status,
                result: &logged,
            }
            .line();
            append_audit(&settings, line).await;
        }
        Response::json(status, &answer)
    }
}

/// Append an audit line (on the blocking pool: it syncs a file).
async fn append_audit(settings: &Settings, line: Vec<u8>) {
    let path = audit_path(settings);
    let written = glommio::executor()
        .spawn_blocking(move || crate::http::audit::append(&path, &line))
        .await;
    if let Err(e) = written {
        tracing::error!("audit log {}: {e}", audit_path(settings).display());
    }
}

/// An admin call refused before it ran (no or a bad token, a role short of it, a bad body)
/// is on record too.
async fn audit_refused(
    settings: &Settings,
    req: &Request,
    who: &str,
    role: &str,
    refusal: &Response,
) {
    let result: serde_json::Value = serde_json::from_slice(&refusal.body).unwrap_or_default();
    let line = crate::http::audit::Entry {
        ts_ms: crate::clock::SystemClock.now_ms(),
        who,
        role,
        from: &req.peer.ip().to_string(),
        what: &format!("{} {}", req.method, req.path),
        args: &serde_json::Value::Null,
        status: refusal.status,
        result: &result,
    }
    .line();
    append_audit(settings, line).await;
}
