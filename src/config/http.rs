//! `[http]`: the HTTP endpoint (injection, admin API, metrics, dashboard). Off unless
//! `http.listen` (or `--http ADDR`) is set.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::{invalid, ConfigError, Network};

/// A request body larger than this is refused with 413 before it is read: the largest
/// legitimate body is a bulk injection (10,000 recipients with substitutions, a few MiB).
pub const HTTP_BODY_MAX_DEFAULT: usize = 32 << 20;
/// The request line and headers together: browsers send a few KiB (cookies included).
pub const HTTP_HEAD_MAX_DEFAULT: usize = 64 << 10;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// Where to listen (every shard accepts on it). None: no HTTP endpoint.
    pub listen: Option<SocketAddr>,
    /// Serve HTTPS with the SMTP server's certificate (`server.tls_cert`/`tls_key`, or the
    /// self-signed one).
    pub tls: bool,
    /// Bearer tokens (`epoxi token add`). Unset or empty: only loopback clients are served,
    /// with every role.
    pub tokens_file: Option<PathBuf>,
    /// The append-only audit log of admin calls. Default: `LOG_DIR/audit.jsonl`.
    pub audit_log: Option<PathBuf>,
    /// Largest request body, in bytes (413 beyond).
    pub body_max: usize,
    /// Largest request line plus headers, in bytes (431 beyond).
    pub head_max: usize,
    /// A request must arrive whole within this long once it starts (408 otherwise).
    pub request_timeout_ms: u64,
    /// A kept-alive connection with no request for this long is closed.
    pub idle_timeout_ms: u64,
    /// Open HTTP connections per shard; past it new ones get 503 and are closed.
    pub connections_max: usize,
    /// Networks each role's tokens may be used from (`viewer`, `injector`, `operator`,
    /// `admin`), e.g. `admin = ["127.0.0.0/8", "10.1.0.0/16"]`. A role not named: anywhere.
    pub networks: BTreeMap<String, Vec<String>>,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            listen: None,
            tls: false,
            tokens_file: None,
            audit_log: None,
            body_max: HTTP_BODY_MAX_DEFAULT,
            head_max: HTTP_HEAD_MAX_DEFAULT,
            request_timeout_ms: 30_000,
            idle_timeout_ms: 60_000,
            connections_max: 1024,
            networks: BTreeMap::new(),
        }
    }
}

/// The roles `http.networks` may name.
pub const HTTP_ROLES: [&str; 4] = ["viewer", "injector", "operator", "admin"];

impl HttpSection {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.body_max == 0 || self.body_max > 1 << 30 {
            return Err(invalid("http.body_max", "must be between 1 and 1 GiB"));
        }
        if self.head_max < 1024 || self.head_max > 1 << 20 {
            return Err(invalid("http.head_max", "must be between 1 KiB and 1 MiB"));
        }
        if self.request_timeout_ms == 0 {
            return Err(invalid("http.request_timeout_ms", "must be above 0"));
        }
        if self.idle_timeout_ms == 0 {
            return Err(invalid("http.idle_timeout_ms", "must be above 0"));
        }
        if self.connections_max == 0 {
            return Err(invalid("http.connections_max", "must be above 0"));
        }
        for (role, nets) in &self.networks {
            if !HTTP_ROLES.contains(&role.as_str()) {
                return Err(invalid(
                    "http.networks",
                    format!("`{role}` is not a role (viewer, injector, operator, admin)"),
                ));
            }
            for net in nets {
                if Network::parse(net).is_none() {
                    return Err(invalid(
                        "http.networks",
                        format!("{role}: `{net}` is not a network (ADDR/PREFIX)"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// `http.networks`, parsed (validated at load).
    pub fn role_networks(&self) -> BTreeMap<String, Vec<Network>> {
        self.networks
            .iter()
            .map(|(role, nets)| {
                (
                    role.clone(),
                    nets.iter().filter_map(|n| Network::parse(n)).collect(),
                )
            })
            .collect()
    }
}
