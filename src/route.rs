//! Destination lookup: which host a recipient domain's mail goes to.
//!
//! Today only static routes (`--route GLOB=HOST:PORT`, first match wins). MX resolution fills the
//! same seam later: [`Router::lookup`] returns a [`Destination`], and the queue keys on it.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RouteError {
    #[error("`{0}` is not GLOB=HOST:PORT")]
    Syntax(String),
    #[error("bad domain glob `{0}`")]
    Glob(String),
    #[error("cannot resolve target `{0}` to HOST:PORT")]
    Target(String),
}

/// Where mail for a domain goes. Its text form is the queue key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Destination {
    pub addr: SocketAddr,
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.addr.fmt(f)
    }
}

#[derive(Clone, Debug)]
pub struct Route {
    glob: String,
    dest: Destination,
}

impl Route {
    /// `GLOB=HOST:PORT`, as given to `--route`.
    pub fn parse_flag(text: &str) -> Result<Route, RouteError> {
        let (glob, target) = text
            .split_once('=')
            .ok_or_else(|| RouteError::Syntax(text.to_owned()))?;
        Route::new(glob, target)
    }

    pub fn new(glob: &str, target: &str) -> Result<Route, RouteError> {
        let glob = glob.trim().to_ascii_lowercase();
        if glob.is_empty() || glob.contains(char::is_whitespace) {
            return Err(RouteError::Glob(glob));
        }
        // Targets resolve once, at start: a route is configuration, not a lookup per message.
        let addr = target
            .trim()
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| RouteError::Target(target.to_owned()))?;
        Ok(Route {
            glob,
            dest: Destination { addr },
        })
    }

    pub fn matches(&self, domain: &str) -> bool {
        glob_match(self.glob.as_bytes(), domain.to_ascii_lowercase().as_bytes())
    }
}

/// Why a domain has no destination.
#[derive(Clone, Debug, PartialEq)]
pub enum LookupError {
    /// Nothing matched; MX resolution is the later fallback. Transient: routes can be added.
    NoRoute,
}

#[derive(Clone, Debug, Default)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    pub fn new(routes: Vec<Route>) -> Router {
        Router { routes }
    }

    pub fn lookup(&self, domain: &str) -> Result<Destination, LookupError> {
        self.routes
            .iter()
            .find(|r| r.matches(domain))
            .map(|r| r.dest.clone())
            .ok_or(LookupError::NoRoute)
    }
}

/// `*` matches any run of characters (including dots), `?` one character; case-folded by caller.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match(b"*.test", b"d0.test"));
        assert!(glob_match(b"*", b"anything.example"));
        assert!(glob_match(b"example.com", b"example.com"));
        assert!(!glob_match(b"example.com", b"sub.example.com"));
        assert!(glob_match(b"*.example.com", b"a.b.example.com"));
        assert!(!glob_match(b"*.test", b"test"));
        assert!(glob_match(b"d?.test", b"d7.test"));
    }

    #[test]
    fn first_match_wins_and_case_folds() {
        let r = Router::new(vec![
            Route::parse_flag("special.test=127.0.0.1:26").expect("route"),
            Route::parse_flag("*.test=127.0.0.1:25").expect("route"),
        ]);
        assert_eq!(r.lookup("Special.TEST").expect("dest").addr.port(), 26);
        assert_eq!(r.lookup("other.test").expect("dest").addr.port(), 25);
        assert_eq!(r.lookup("example.com"), Err(LookupError::NoRoute));
    }

    #[test]
    fn bad_routes_are_refused() {
        assert!(matches!(
            Route::parse_flag("nodest"),
            Err(RouteError::Syntax(_))
        ));
        assert!(matches!(
            Route::parse_flag("*.test=nohostport"),
            Err(RouteError::Target(_))
        ));
    }
}
