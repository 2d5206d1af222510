//! SMTP AUTH credentials: the users file, password hashing, and the per-client limit on failed
//! attempts.
//!
//! The users file has one user per line, `name:pbkdf2-sha256$ITERATIONS$SALT$HASH` (salt and hash
//! in unpadded base64), written by `epoxi passwd`. Passwords are never stored: PBKDF2-HMAC-SHA256
//! from ring, a random 16-byte salt per user, and a constant-time comparison on verification.
//! Blank lines and lines starting with `#` are ignored.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine;
use ring::rand::SecureRandom;

const SCHEME: &str = "pbkdf2-sha256";
/// Default work factor: OWASP's 2023 guidance for PBKDF2-HMAC-SHA256 is 600,000. Verification
/// runs once per AUTH attempt, and failed attempts are rate limited, so the cost is affordable.
pub const ITERATIONS_DEFAULT: u32 = 600_000;
/// Fewer iterations than this would make stolen hashes cheap to crack; refuse such files.
pub const ITERATIONS_MIN: u32 = 1_000;
const SALT_LEN: usize = 16;
const HASH_LEN: usize = 32;
/// Longest user name and password accepted (RFC 4616 allows 255 octets for each).
pub const NAME_LEN_MAX: usize = 255;
pub const PASSWORD_LEN_MAX: usize = 255;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthError {
    #[error("cannot read users file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("users file {path}, line {line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("cannot write users file {path}: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error("invalid user name: {0}")]
    Name(String),
    #[error("invalid password: {0}")]
    Password(String),
    #[error("no secure random numbers available")]
    Random,
}

/// One user's stored hash.
#[derive(Clone, Debug, PartialEq)]
struct Entry {
    iterations: NonZeroU32,
    salt: Vec<u8>,
    hash: Vec<u8>,
}

impl Entry {
    fn parse(text: &str) -> Result<Entry, String> {
        let mut parts = text.split('$');
        let scheme = parts.next().unwrap_or_default();
        if scheme != SCHEME {
            return Err(format!(
                "unknown hash scheme `{scheme}` (expected {SCHEME})"
            ));
        }
        let iterations: u32 = parts
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or("bad iteration count")?;
        if iterations < ITERATIONS_MIN {
            return Err(format!(
                "iteration count {iterations} is below {ITERATIONS_MIN}"
            ));
        }
        let iterations = NonZeroU32::new(iterations).ok_or("bad iteration count")?;
        let salt = parts
            .next()
            .and_then(|s| STANDARD_NO_PAD.decode(s).ok())
            .ok_or("bad salt")?;
        let hash = parts
            .next()
            .and_then(|s| STANDARD_NO_PAD.decode(s).ok())
            .ok_or("bad hash")?;
        if parts.next().is_some() || hash.len() != HASH_LEN || salt.len() < 8 {
            return Err("malformed hash".into());
        }
        Ok(Entry {
            iterations,
            salt,
            hash,
        })
    }

    fn format(&self) -> String {
        format!(
            "{SCHEME}${}${}${}",
            self.iterations,
            STANDARD_NO_PAD.encode(&self.salt),
            STANDARD_NO_PAD.encode(&self.hash)
        )
    }

    fn verify(&self, password: &[u8]) -> bool {
        ring::pbkdf2::verify(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            self.iterations,
            &self.salt,
            password,
            &self.hash,
        )
        .is_ok()
    }
}

/// Hash `password` for storage with a fresh random salt.
fn hash_password(password: &str, iterations: u32) -> Result<Entry, AuthError> {
    let iterations = NonZeroU32::new(iterations.max(ITERATIONS_MIN)).ok_or(AuthError::Random)?;
    let mut salt = vec![0u8; SALT_LEN];
    ring::rand::SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| AuthError::Random)?;
    let mut hash = vec![0u8; HASH_LEN];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        &salt,
        password.as_bytes(),
        &mut hash,
    );
    Ok(Entry {
        iterations,
        salt,
        hash,
    })
}

fn check_name(name: &str) -> Result<(), AuthError> {
    if name.is_empty() || name.len() > NAME_LEN_MAX {
        return Err(AuthError::Name(format!(
            "must be 1 to {NAME_LEN_MAX} bytes"
        )));
    }
    if name.contains(':') || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(AuthError::Name(
            "no `:`, spaces or control characters".into(),
        ));
    }
    Ok(())
}

/// The users allowed to AUTH, loaded from the users file.
#[derive(Clone, Debug, Default)]
pub struct Users {
    entries: HashMap<String, Entry>,
}

impl Users {
    /// Load a users file; a missing file is an error (AUTH was configured with it).
    pub fn load(path: &Path) -> Result<Users, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|e| AuthError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Users::parse(&text, path)
    }

    fn parse(text: &str, path: &Path) -> Result<Users, AuthError> {
        let mut entries = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: String| AuthError::Line {
                path: path.to_owned(),
                line: i + 1,
                reason,
            };
            let (name, hash) = line
                .split_once(':')
                .ok_or_else(|| bad("expected name:hash".into()))?;
            check_name(name).map_err(|e| bad(e.to_string()))?;
            let entry = Entry::parse(hash).map_err(bad)?;
            if entries.insert(name.to_owned(), entry).is_some() {
                return Err(bad(format!("user `{name}` appears twice")));
            }
        }
        Ok(Users { entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `name` exists and `password` is theirs. An unknown user costs the same work as
    /// a wrong password, so the time taken does not tell which names exist.
    pub fn verify(&self, name: &str, password: &str) -> bool {
        match self.entries.get(name) {
            Some(entry) => entry.verify(password.as_bytes()),
            None => {
                let decoy = Entry {
                    iterations: NonZeroU32::MIN.saturating_add(ITERATIONS_DEFAULT - 1),
                    salt: vec![0; SALT_LEN],
                    hash: vec![0; HASH_LEN],
                };
                let _ = decoy.verify(password.as_bytes());
                false
            }
        }
    }

    /// Add or replace a user.
    pub fn set(&mut self, name: &str, password: &str, iterations: u32) -> Result<(), AuthError> {
        check_name(name)?;
        if password.is_empty() || password.len() > PASSWORD_LEN_MAX {
            return Err(AuthError::Password(format!(
                "must be 1 to {PASSWORD_LEN_MAX} bytes"
            )));
        }
        self.entries
            .insert(name.to_owned(), hash_password(password, iterations)?);
        Ok(())
    }

    pub fn remove(&mut self, name: &str) -> bool {
        self.entries.remove(name).is_some()
    }

    /// Write the file atomically (temporary file, fsync, rename), readable by its owner only.
    pub fn save(&self, path: &Path) -> Result<(), AuthError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let err = |e: std::io::Error| AuthError::Write {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        let mut names: Vec<&String> = self.entries.keys().collect();
        names.sort();
        let mut text =
            String::from("# Epoxi AUTH users: name:pbkdf2-sha256$iterations$salt$hash\n");
        for name in names {
            text.push_str(&format!("{name}:{}\n", self.entries[name].format()));
        }
        let tmp = path.with_extension("tmp");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }
}

/// Failed AUTH attempts per client IP in a sliding window; past the limit AUTH is refused
/// (`454 4.7.0`) until the window passes. Kept by the owner shard of each client address (see
/// `clients`), so the limit holds per address, whichever shard the client lands on.
#[derive(Debug)]
pub struct AuthLimiter {
    failures_max: u32,
    window_ms: u64,
    clients: HashMap<IpAddr, (u32, u64)>,
}

/// Clients tracked at most; past it the stalest entries are dropped, so a flood of addresses
/// cannot grow the map without bound. Dropping an entry only forgets failures, never blocks.
const LIMITER_CLIENTS_MAX: usize = 65_536;

impl AuthLimiter {
    pub fn new(failures_max: u32, window_ms: u64) -> AuthLimiter {
        AuthLimiter {
            failures_max,
            window_ms,
            clients: HashMap::new(),
        }
    }

    /// May `ip` try to authenticate at `now_ms`?
    pub fn allowed(&self, ip: IpAddr, now_ms: u64) -> bool {
        match self.clients.get(&ip) {
            Some(&(failures, since)) => {
                failures < self.failures_max || now_ms.saturating_sub(since) >= self.window_ms
            }
            None => true,
        }
    }

    pub fn failed(&mut self, ip: IpAddr, now_ms: u64) {
        if self.clients.len() >= LIMITER_CLIENTS_MAX && !self.clients.contains_key(&ip) {
            let window = self.window_ms;
            self.clients
                .retain(|_, (_, since)| now_ms.saturating_sub(*since) < window);
            if self.clients.len() >= LIMITER_CLIENTS_MAX {
                self.clients.clear();
            }
        }
        let entry = self.clients.entry(ip).or_insert((0, now_ms));
        if now_ms.saturating_sub(entry.1) >= self.window_ms {
            *entry = (0, now_ms);
        }
        entry.0 += 1;
    }

    pub fn succeeded(&mut self, ip: IpAddr) {
        self.clients.remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_verify_and_file_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("users");
        let mut users = Users::default();
        users
            .set("alice", "correct horse", ITERATIONS_MIN)
            .expect("set");
        users
            .set("bob@example.test", "hunter2", ITERATIONS_MIN)
            .expect("set");
        users.save(&path).expect("save");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(
            !text.contains("correct horse") && !text.contains("hunter2"),
            "never plaintext"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = Users::load(&path).expect("load");
        assert_eq!(loaded.len(), 2);
        assert!(loaded.verify("alice", "correct horse"));
        assert!(!loaded.verify("alice", "correct horse "));
        assert!(loaded.verify("bob@example.test", "hunter2"));
        assert!(!loaded.verify("carol", "hunter2"));
    }

    #[test]
    fn same_password_gets_different_salts() {
        let a = hash_password("pw", ITERATIONS_MIN).expect("hash");
        let b = hash_password("pw", ITERATIONS_MIN).expect("hash");
        assert_ne!(a.salt, b.salt);
        assert_ne!(a.hash, b.hash);
    }

    #[test]
    fn bad_files_name_the_line() {
        let p = Path::new("users");
        let cases = [
            ("alice\n", "expected name:hash"),
            ("alice:md5$1$x$y\n", "unknown hash scheme"),
            ("alice:pbkdf2-sha256$10$AAAAAAAAAAA$AAAA\n", "below"),
            ("alice:pbkdf2-sha256$5000$!!$AAAA\n", "bad salt"),
        ];
        for (text, want) in cases {
            let err = Users::parse(text, p).expect_err(text).to_string();
            assert!(
                err.contains("line 1") && err.contains(want),
                "{text:?}: {err}"
            );
        }
        let mut users = Users::default();
        users.set("alice", "pw", ITERATIONS_MIN).expect("set");
        let line = format!(
            "# comment\n\nalice:{}\nalice:{}\n",
            users.entries["alice"].format(),
            users.entries["alice"].format()
        );
        let err = Users::parse(&line, p).expect_err("duplicate").to_string();
        assert!(err.contains("line 4") && err.contains("twice"), "{err}");
    }

    #[test]
    fn names_and_passwords_are_checked() {
        let mut users = Users::default();
        assert!(users.set("", "pw", ITERATIONS_MIN).is_err());
        assert!(users.set("a:b", "pw", ITERATIONS_MIN).is_err());
        assert!(users.set("a b", "pw", ITERATIONS_MIN).is_err());
        assert!(users.set("a", "", ITERATIONS_MIN).is_err());
        assert!(users.set("a", &"x".repeat(256), ITERATIONS_MIN).is_err());
    }

    #[test]
    fn limiter_blocks_after_failures_until_the_window_passes() {
        let ip: IpAddr = "192.0.2.7".parse().expect("ip");
        let other: IpAddr = "192.0.2.8".parse().expect("ip");
        let mut l = AuthLimiter::new(3, 60_000);
        for t in 0..3 {
            assert!(l.allowed(ip, t));
            l.failed(ip, t);
        }
        assert!(!l.allowed(ip, 10));
        assert!(l.allowed(other, 10), "per client");
        assert!(l.allowed(ip, 60_000), "window passed");
        l.failed(ip, 60_001);
        assert!(l.allowed(ip, 60_002), "counting starts over");
        l.succeeded(ip);
        assert!(l.allowed(ip, 60_003));
    }
}
