//! The dashboard page served at `/`: its static files, embedded in the binary, and the login
//! form. No I/O: `shard::http::dashboard` serves these (the login itself and the session
//! cookie are `shard::http`'s and `http::access`'s).
//!
//! The page is one HTML file, one script and one stylesheet (in `static/`), plus uPlot
//! (vendored, see `static/README.md`). It reads `GET /api/dashboard/v1` every second and
//! `GET /api/whoami/v1` once; operators get Suspend/Resume buttons that call the admin API.
//!
//! Invariants: every file served is one compiled in here (a request cannot name a path on
//! disk); the static files carry no data, so they are served to anyone the listener lets in,
//! the page itself only to a principal with the viewer role.

/// The version of the vendored uPlot (`static/README.md` says where it comes from).
pub const UPLOT_VERSION: &str = "1.6.32";

/// One file compiled into the binary.
#[derive(Debug)]
pub struct Asset {
    /// Its name under `/static/`.
    pub name: &'static str,
    pub content_type: &'static str,
    pub body: &'static [u8],
}

/// The files under `/static/`. A short list scanned in order: a dozen string compares is less
/// than a hash map's setup, and the list is fixed at compile time.
pub const ASSETS: &[Asset] = &[
    Asset {
        name: "dashboard.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("static/dashboard.js"),
    },
    Asset {
        name: "dashboard.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("static/dashboard.css"),
    },
    Asset {
        name: "uPlot.iife.min.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("static/uPlot.iife.min.js"),
    },
    Asset {
        name: "uPlot.min.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("static/uPlot.min.css"),
    },
];

/// The page itself (`GET /`).
pub const INDEX_HTML: &str = include_str!("static/index.html");

/// The login form, with `<!--error-->` where a message goes.
const LOGIN_HTML: &str = include_str!("static/login.html");

/// Headers every HTML answer carries: scripts and styles only from this server (uPlot sets
/// element styles from script, which `style-src 'self'` allows; its inline `style` attributes
/// need `'unsafe-inline'` for styles, never for scripts), no framing, no MIME sniffing, and no
/// caching of a page that shows live data.
pub const HTML_HEADERS: &[(&str, &str)] = &[
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
         img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
         base-uri 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
];

/// Headers of a static file. They change only with the binary; an hour of caching saves the
/// 50 KiB of uPlot on every reload while a new release shows within the hour.
pub const ASSET_HEADERS: &[(&str, &str)] = &[
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "public, max-age=3600"),
];

/// The static file `/static/<name>`, if there is one.
pub fn asset(name: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.name == name)
}

/// The login form; `failed`: after an unknown token, saying so. The message is fixed text,
/// never anything the client sent.
pub fn login_page(failed: bool) -> String {
    let note = if failed {
        "<p class=\"error\" id=\"login-error\">Unknown token.</p>"
    } else {
        ""
    };
    LOGIN_HTML.replacen("<!--error-->", note, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_the_pages_name_is_served() {
        for page in [INDEX_HTML, LOGIN_HTML] {
            for part in page.split("/static/").skip(1) {
                let name = part.split('"').next().unwrap_or_default();
                assert!(asset(name).is_some(), "{name} is named but not served");
            }
        }
        assert!(asset("../Cargo.toml").is_none());
        assert!(asset("").is_none());
    }

    #[test]
    fn vendored_uplot_is_the_version_noted() {
        let js =
            std::str::from_utf8(asset("uPlot.iife.min.js").expect("uPlot").body).expect("utf-8");
        assert!(
            js.starts_with(&format!(
                "/*! https://github.com/leeoniya/uPlot (v{UPLOT_VERSION})"
            )),
            "{}",
            &js[..80]
        );
        let readme = include_str!("static/README.md");
        assert!(readme.contains(&format!("uPlot {UPLOT_VERSION}")));
    }

    #[test]
    fn login_page_shows_fixed_messages_only() {
        assert!(!login_page(false).contains("login-error"));
        let page = login_page(true);
        assert!(page.contains("<p class=\"error\" id=\"login-error\">Unknown token.</p>"));
        assert!(page.contains("action=\"/login\""));
        assert!(page.contains("name=\"token\""));
    }
}
