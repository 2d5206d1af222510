//! Who may do what over HTTP: roles, bearer tokens, the session cookie, trusted networks.
//!
//! - With no tokens (no `http.tokens_file`, or an empty one) only loopback clients are
//!   served, with every role: the embedded default is usable out of the box and reachable
//!   from nowhere else.
//! - With tokens, every request but the liveness and readiness checks needs one, as
//!   `Authorization: Bearer TOKEN` or the `epoxi_session` cookie the dashboard's login sets.
//!   An unknown token is a 401; a token used for more than its role allows is a 403, and so
//!   is one used from outside its role's `http.networks`.
//! - The tokens file holds one JSON object per line: `name`, `role`, `sha256` (of the token,
//!   hex), `created_ms`. The token itself is printed once by `epoxi token add` and stored
//!   nowhere. The file is read again when it changes (checked at most once a second), so a
//!   token added or removed takes effect without a restart.
//!
//! Roles: `viewer` (metrics, summaries, the dashboard), `injector` (injection only),
//! `operator` (a viewer that may also suspend, resume, bounce, flush, rebind),
//! `admin` (everything: reload, tokens, and injection too).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Request, Response};
use crate::config::Network;

/// The dashboard's session cookie.
pub const SESSION_COOKIE: &str = "epoxi_session";
/// How often a shard looks at the tokens file's modification time.
const TOKENS_CHECK_MS: u64 = 1000;
/// Random bytes in a new token (256 bits).
const TOKEN_BYTES: usize = 32;
/// What every token starts with, so one is recognisable in a leaked config or log.
pub const TOKEN_PREFIX: &str = "epx_";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Injector,
    Operator,
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Injector => "injector",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        Some(match text {
            "viewer" => Role::Viewer,
            "injector" => Role::Injector,
            "operator" => Role::Operator,
            "admin" => Role::Admin,
            _ => return None,
        })
    }

    /// Whether this role may do what `needed` may.
    pub fn includes(self, needed: Role) -> bool {
        match self {
            Role::Admin => true,
            Role::Operator => matches!(needed, Role::Viewer | Role::Operator),
            Role::Injector => needed == Role::Injector,
            Role::Viewer => needed == Role::Viewer,
        }
    }
}

/// How a client proved who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// No tokens configured: a loopback client.
    Loopback,
    Bearer,
    Cookie,
}

/// The client of a request, once authorized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The token's name, or `loopback`.
    pub name: String,
    pub role: Role,
    pub via: Via,
    pub peer: IpAddr,
}

impl Principal {
    pub fn may(&self, needed: Role) -> bool {
        self.role.includes(needed)
    }

    /// A 403 for a request this principal may not make.
    pub fn forbidden(&self, needed: Role) -> Response {
        Response::error(
            403,
            format!(
                "token `{}` has role {}; this needs role {}",
                self.name,
                self.role.name(),
                needed.name()
            ),
        )
    }
}

/// One line of the tokens file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenEntry {
    pub name: String,
    pub role: Role,
    /// SHA-256 of the token, lower-case hex.
    pub sha256: String,
    #[serde(default)]
    pub created_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("tokens file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tokens file {path} line {line}: {why}")]
    Bad {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error("a token named `{0}` exists already (remove it first)")]
    Exists(String),
    #[error("no token named `{0}`")]
    Unknown(String),
    #[error("token name `{0}`: use 1 to 64 letters, digits, '-', '_' or '.'")]
    BadName(String),
    #[error("cannot make a random token: the system's random source failed")]
    Random,
}

/// SHA-256 of `token`, hex.
pub fn token_hash(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The tokens in `path` (a missing file has none).
pub fn read_tokens(path: &Path) -> Result<Vec<TokenEntry>, TokenError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(TokenError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let entry: TokenEntry = serde_json::from_str(line).map_err(|e| TokenError::Bad {
            path: path.to_owned(),
            line: i + 1,
            why: e.to_string(),
        })?;
        out.push(entry);
    }
    Ok(out)
}

/// Write `entries` to `path` atomically (a temporary file renamed over it), mode 0600.
fn write_tokens(path: &Path, entries: &[TokenEntry]) -> Result<(), TokenError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| TokenError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    let mut text = String::new();
    for entry in entries {
        text.push_str(&serde_json::to_string(entry).unwrap_or_default());
        text.push('\n');
    }
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Add a token named `name` with `role` to `path`; the new token (shown once).
pub fn add_token(path: &Path, name: &str, role: Role, now_ms: u64) -> Result<String, TokenError> {
    if !valid_name(name) {
        return Err(TokenError::BadName(name.to_owned()));
    }
    let mut entries = read_tokens(path)?;
    if entries.iter().any(|e| e.name == name) {
        return Err(TokenError::Exists(name.to_owned()));
    }
    let mut bytes = [0u8; TOKEN_BYTES];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| TokenError::Random)?;
    use base64::Engine as _;
    let token = format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    entries.push(TokenEntry {
        name: name.to_owned(),
        role,
        sha256: token_hash(&token),
        created_ms: now_ms,
    });
    write_tokens(path, &entries)?;
    Ok(token)
}

/// Remove the token named `name` from `path`.
pub fn remove_token(path: &Path, name: &str) -> Result<(), TokenError> {
    let mut entries = read_tokens(path)?;
    let before = entries.len();
    entries.retain(|e| e.name != name);
    if entries.len() == before {
        return Err(TokenError::Unknown(name.to_owned()));
    }
    write_tokens(path, &entries)
}

/// The tokens a shard knows: by hash.
#[derive(Debug, Default)]
struct Known {
    by_hash: HashMap<String, (String, Role)>,
    modified: Option<std::time::SystemTime>,
    checked_ms: Option<u64>,
}

/// One shard's view of who may do what.
#[derive(Debug)]
pub struct Access {
    tokens_file: Option<PathBuf>,
    networks: BTreeMap<String, Vec<Network>>,
    known: RefCell<Known>,
}

impl Access {
    pub fn new(tokens_file: Option<PathBuf>, networks: BTreeMap<String, Vec<Network>>) -> Access {
        Access {
            tokens_file,
            networks,
            known: RefCell::new(Known::default()),
        }
    }

    /// Read the tokens file again if it changed (at most once per [`TOKENS_CHECK_MS`]). A
    /// file that cannot be read keeps the tokens known before (and says why).
    fn refresh(&self, now_ms: u64) {
        let Some(path) = &self.tokens_file else {
            return;
        };
        let mut known = self.known.borrow_mut();
        if known
            .checked_ms
            .is_some_and(|at| now_ms < at + TOKENS_CHECK_MS)
        {
            return;
        }
        known.checked_ms = Some(now_ms);
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if modified == known.modified && modified.is_some() {
            return;
        }
        match read_tokens(path) {
            Ok(entries) => {
                known.by_hash = entries
                    .into_iter()
                    .map(|e| (e.sha256, (e.name, e.role)))
                    .collect();
                known.modified = modified;
            }
            Err(e) => tracing::error!("http: keeping the tokens known before: {e}"),
        }
    }

    /// Whether any token is configured (else: loopback clients only).
    pub fn has_tokens(&self, now_ms: u64) -> bool {
        self.refresh(now_ms);
        !self.known.borrow().by_hash.is_empty()
    }

    /// Who sent `req`, or the 401/403 to answer.
    pub fn authorize(&self, req: &Request, now_ms: u64) -> Result<Principal, Response> {
        let peer = canonical(req.peer.ip());
        if !self.has_tokens(now_ms) {
            if peer.is_loopback() {
                return Ok(Principal {
                    name: "loopback".into(),
                    role: Role::Admin,
                    via: Via::Loopback,
                    peer,
                });
            }
            return Err(Response::error(
                403,
                "only loopback clients are served until http.tokens_file has tokens",
            ));
        }
        let bearer = req
            .header("authorization")
            .and_then(|v| v.strip_prefix("Bearer ").or(v.strip_prefix("bearer ")))
            .map(|t| (t.trim(), Via::Bearer));
        let cookie = req.cookie(SESSION_COOKIE).map(|t| (t, Via::Cookie));
        let Some((token, via)) = bearer.or(cookie) else {
            return Err(Response::error(
                401,
                "a token is needed: Authorization: Bearer TOKEN (see `epoxi token add`)",
            )
            .with_header("WWW-Authenticate", "Bearer"));
        };
        let known = self.known.borrow();
        let Some((name, role)) = known.by_hash.get(&token_hash(token)) else {
            return Err(Response::error(401, "unknown token")
                .with_header("WWW-Authenticate", "Bearer error=\"invalid_token\""));
        };
        if let Some(nets) = self.networks.get(role.name()) {
            if !nets.iter().any(|n| n.contains(peer)) {
                return Err(Response::error(
                    403,
                    format!(
                        "role {} is not allowed from {peer} (http.networks)",
                        role.name()
                    ),
                ));
            }
        }
        Ok(Principal {
            name: name.clone(),
            role: *role,
            via,
            peer,
        })
    }

    /// Whether `token` is a known token (for the dashboard's login).
    pub fn knows(&self, token: &str, now_ms: u64) -> bool {
        self.refresh(now_ms);
        self.known
            .borrow()
            .by_hash
            .contains_key(&token_hash(token.trim()))
    }
}

/// An IPv4-mapped IPv6 peer as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(peer: &str, headers: &[(&str, &str)]) -> Request {
        Request {
            method: "GET".into(),
            path: "/".into(),
            query: Vec::new(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body: Vec::new(),
            peer: format!("{peer}:1234").parse().expect("peer"),
            keep_alive: true,
        }
    }

    #[test]
    fn roles_include_what_they_should() {
        assert!(Role::Admin.includes(Role::Injector));
        assert!(Role::Operator.includes(Role::Viewer));
        assert!(!Role::Operator.includes(Role::Admin));
        assert!(!Role::Operator.includes(Role::Injector));
        assert!(!Role::Viewer.includes(Role::Operator));
        assert!(!Role::Injector.includes(Role::Viewer));
    }

    #[test]
    fn without_tokens_only_loopback_is_served() {
        let access = Access::new(None, BTreeMap::new());
        let who = access
            .authorize(&req("127.0.0.1", &[]), 0)
            .expect("loopback");
        assert_eq!(who.role, Role::Admin);
        assert!(access.authorize(&req("[::1]", &[]), 0).is_ok());
        let denied = access
            .authorize(&req("10.0.0.1", &[]), 0)
            .expect_err("remote");
        assert_eq!(denied.status, 403);
    }

    #[test]
    fn tokens_are_checked_by_hash_with_roles_and_networks() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("tokens");
        let viewer = add_token(&file, "grafana", Role::Viewer, 1).expect("add");
        let admin = add_token(&file, "ops", Role::Admin, 1).expect("add");
        assert!(viewer.starts_with(TOKEN_PREFIX));
        assert!(matches!(
            add_token(&file, "ops", Role::Admin, 1),
            Err(TokenError::Exists(_))
        ));
        let stored = std::fs::read_to_string(&file).expect("read");
        assert!(
            !stored.contains(&viewer),
            "the token itself is never stored"
        );
        let mut nets = BTreeMap::new();
        nets.insert(
            "admin".to_owned(),
            vec![Network::parse("127.0.0.0/8").expect("net")],
        );
        let access = Access::new(Some(file.clone()), nets);
        let none = access
            .authorize(&req("127.0.0.1", &[]), 0)
            .expect_err("none");
        assert_eq!(none.status, 401);
        let bad = access
            .authorize(&req("127.0.0.1", &[("Authorization", "Bearer nope")]), 0)
            .expect_err("unknown");
        assert_eq!(bad.status, 401);
        let auth = format!("Bearer {viewer}");
        let who = access
            .authorize(&req("10.0.0.1", &[("Authorization", &auth)]), 0)
            .expect("viewer");
        assert_eq!((who.name.as_str(), who.role), ("grafana", Role::Viewer));
        let cookie = format!("a=b; {SESSION_COOKIE}={admin}");
        let who = access
            .authorize(&req("127.0.0.1", &[("Cookie", &cookie)]), 0)
            .expect("admin by cookie");
        assert_eq!((who.role, who.via), (Role::Admin, Via::Cookie));
        let far = access
            .authorize(&req("10.0.0.1", &[("Cookie", &cookie)]), 0)
            .expect_err("admin from outside its networks");
        assert_eq!(far.status, 403);
        // Removal takes effect once the file is looked at again.
        remove_token(&file, "grafana").expect("remove");
        let gone = access
            .authorize(&req("10.0.0.1", &[("Authorization", &auth)]), 5_000)
            .expect_err("removed");
        assert_eq!(gone.status, 401);
        assert!(matches!(
            remove_token(&file, "grafana"),
            Err(TokenError::Unknown(_))
        ));
    }
}
