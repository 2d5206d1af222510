//! The dashboard's page, login form and static files as HTTP answers (`crate::dashboard`
//! holds them; this adds the headers). The JSON it polls is `/api/dashboard/v1`'s.

use crate::dashboard::{self, ASSET_HEADERS, HTML_HEADERS};
use crate::http::Response;

/// `GET /` for a viewer: the page.
pub fn page() -> Response {
    html(200, dashboard::INDEX_HTML)
}

/// The login form (`GET /` without a session, or after an unknown token). 401, so that
/// scripts see they are not signed in, with the form as its body for browsers.
pub fn login(failed: bool) -> Response {
    html(401, &dashboard::login_page(failed))
}

/// `GET /static/<name>`.
pub fn asset(name: &str) -> Response {
    match dashboard::asset(name) {
        Some(a) => ASSET_HEADERS
            .iter()
            .fold(Response::text(200, a.content_type, a.body), |r, (k, v)| {
                r.with_header(k, *v)
            }),
        None => Response::error(404, format!("no such file: /static/{name}")),
    }
}

fn html(status: u16, body: &str) -> Response {
    HTML_HEADERS.iter().fold(
        Response::text(status, "text/html; charset=utf-8", body),
        |r, (k, v)| r.with_header(k, *v),
    )
}
