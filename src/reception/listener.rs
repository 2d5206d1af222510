//! Listeners: the accept loop of each listening address on a shard, its policy (host name,
//! relay networks, TLS, AUTH, limits) and its connection counts.
//!
//! Every shard listens on every address (SO_REUSEPORT), so the kernel spreads clients over the
//! shards. Connections per listener (`connections_max`) are counted per shard, as the
//! configuration says; connections per client address are counted by the address's owner shard
//! (see `clients`), so they hold per client, as an operator reads them. The loop ends when the
//! stop signal comes (the pending accept is cancelled).

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use futures_lite::AsyncWriteExt;
use glommio::net::{TcpListener, TcpStream};

use super::Reception;
use crate::clients::IpLimits;
use crate::config::{ListenerEntry, Network};
use crate::smtp::server::ServerConfig;

/// After a failed accept (EMFILE and friends), wait this long before the next, instead of
/// spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

pub(super) const TOO_MANY_FROM_IP: &[u8] =
    b"421 4.7.0 Too many connections from your address, try again later\r\n";
const TOO_MANY_CONNECTIONS: &[u8] = b"421 4.7.0 Too many connections, try again later\r\n";

pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .map_err(|e| std::io::Error::other(format!("cannot listen on {addr}: {e}")))
}

/// One listener on this shard: its socket's fixed traits, its policy (swapped by a reload),
/// and its connection count.
pub struct Listener {
    /// Index among the shard's listeners (the same on every shard).
    pub index: u16,
    /// How the socket starts (TLS first): fixed while it is bound.
    pub implicit_tls: bool,
    policy: RefCell<Rc<Policy>>,
    sessions: Cell<usize>,
}

/// What a listener's new sessions get: their SMTP settings, relay networks and limits.
pub struct Policy {
    pub cfg: Rc<ServerConfig>,
    pub relay_networks: Vec<Network>,
    /// The notices its mail may cause, spooled with each message it receives.
    pub notices: crate::envelope::NoticeSwitches,
    /// The class of its mail without a (known) priority header.
    pub priority: crate::envelope::Priority,
    connections_max: usize,
    connections_per_ip_max: usize,
    /// `server.connections_per_ip_max`, counted over every listener.
    ip_max: usize,
}

impl Policy {
    fn of(settings: &crate::settings::Settings, spec: &ListenerEntry) -> Result<Policy, String> {
        let server = &settings.config.server;
        let cfg = server_config(settings, spec).map_err(|e| e.to_string())?;
        let relay_networks = match &spec.relay_networks {
            Some(nets) => nets
                .iter()
                .map(|n| Network::parse(n).ok_or_else(|| format!("bad network `{n}`")))
                .collect::<Result<Vec<_>, _>>()?,
            None => settings.relay_networks.clone(),
        };
        Ok(Policy {
            cfg: Rc::new(cfg),
            relay_networks,
            notices: settings.listener_notices(spec.notices.as_deref()),
            priority: crate::settings::listener_priority(spec)?,
            connections_max: spec.connections_max.unwrap_or(server.connections_max),
            connections_per_ip_max: spec
                .connections_per_ip_max
                .unwrap_or(server.connections_per_ip_max),
            ip_max: server.connections_per_ip_max,
        })
    }

    pub(super) fn ip_limits(&self, listener: u16) -> IpLimits {
        IpLimits {
            listener,
            ip_max: self.ip_max as u32,
            listener_ip_max: self.connections_per_ip_max as u32,
        }
    }
}

impl Listener {
    pub fn new(
        reception: &Reception,
        index: u16,
        spec: &ListenerEntry,
    ) -> Result<Listener, String> {
        let policy = Policy::of(&reception.settings(), spec)?;
        Ok(Listener {
            index,
            implicit_tls: spec.implicit_tls,
            policy: RefCell::new(Rc::new(policy)),
            sessions: Cell::new(0),
        })
    }

    /// The policy new sessions get now.
    pub fn policy(&self) -> Rc<Policy> {
        self.policy.borrow().clone()
    }

    /// Swap in the policy of `spec` under `settings` (a reload); sessions open now keep
    /// theirs. On an error the old policy stays.
    pub fn update(
        &self,
        settings: &crate::settings::Settings,
        spec: &ListenerEntry,
    ) -> Result<(), String> {
        let policy = Policy::of(settings, spec)?;
        *self.policy.borrow_mut() = Rc::new(policy);
        Ok(())
    }
}

/// The session settings of a listener: `[server]`'s, with the listener's own values on top.
pub fn server_config(
    settings: &crate::settings::Settings,
    spec: &ListenerEntry,
) -> Result<ServerConfig, crate::smtp::server::ConfigError> {
    use crate::smtp::server::{BareLf, NulByte};
    let server = &settings.config.server;
    let cfg = ServerConfig {
        hostname: spec
            .hostname
            .clone()
            .unwrap_or_else(|| settings.hostname.clone()),
        size_max: spec.size_max.unwrap_or(server.size_max),
        rcpts_max: spec.rcpts_max.unwrap_or(server.rcpts_max),
        errors_max: server.errors_max,
        line_len_max: server.line_len_max,
        data_line_len_max: server.data_line_len_max,
        messages_per_session_max: spec
            .messages_per_connection_max
            .unwrap_or(server.messages_per_connection_max),
        smtputf8: server.smtputf8,
        chunking: server.chunking,
        binarymime: server.binarymime,
        dsn: server.dsn,
        bare_lf: if server.bare_lf == "reject" {
            BareLf::Reject
        } else {
            BareLf::Accept
        },
        nul: if server.nul == "reject" {
            NulByte::Reject
        } else {
            NulByte::Accept
        },
        starttls: true,
        auth: settings.auth_users.is_some(),
        auth_required: spec.auth_required,
        tls_required: spec.tls_required && !spec.implicit_tls,
        oob_domain: settings.oob_domain.clone(),
        rcpt_check: settings.suppression_reply.is_some(),
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Tell a client why it is turned away (one 421 line) and close. Best effort: it may be gone.
pub(super) async fn refuse(mut stream: TcpStream, reply: &[u8]) {
    let _ = stream.write_all(reply).await;
    let _ = stream.close().await;
}

/// Accept on `socket` until the stop signal, with `listener`'s policy: implicit TLS (a TLS
/// handshake before the greeting, port 465 style), AUTH or TLS required, its own host name,
/// relay networks and limits.
pub async fn accept_loop(reception: Rc<Reception>, socket: TcpListener, listener: Rc<Listener>) {
    loop {
        let accepted = futures_lite::future::or(async { Some(socket.accept().await) }, async {
            reception.stop.wait().await;
            None
        })
        .await;
        let Some(accepted) = accepted else { break };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(shard = reception.shard(), "accept failed: {e}");
                glommio::timer::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if reception.sessions.open() >= reception.settings().config.server.connections_max
            || listener.sessions.get() >= listener.policy().connections_max
        {
            reception.metrics.replies_sent(TOO_MANY_CONNECTIONS);
            glommio::spawn_local(refuse(stream, TOO_MANY_CONNECTIONS)).detach();
            continue;
        }
        reception.sessions.started();
        listener.sessions.set(listener.sessions.get() + 1);
        let (reception, listener) = (reception.clone(), listener.clone());
        glommio::spawn_local(async move {
            if let Err(e) = super::session::session(&reception, &listener, stream).await {
                use std::io::ErrorKind;
                if e.kind() != ErrorKind::ConnectionReset && e.kind() != ErrorKind::BrokenPipe {
                    tracing::info!(shard = reception.shard(), "session error: {e}");
                }
            }
            listener.sessions.set(listener.sessions.get() - 1);
            reception.sessions.ended();
        })
        .detach();
    }
}
