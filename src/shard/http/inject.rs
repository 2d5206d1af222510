//! `POST /api/inject/v1` (KumoMTA's injection API): the JSON in, reception's answer out.
//! Role `injector` (checked by the route). The work is `reception::inject`; the request's
//! shape is `inject`.
//!
//! Status: 400 for a request refused as a whole (bad JSON, a missing or mistyped field, a
//! bad sender, no recipients, a template that does not compile): nothing was spooled. Else
//! 200 with the counts, also when some or all recipients failed (as KumoMTA answers): the
//! body says which, and why.

use crate::http::{Request, Response};
use crate::inject::InjectV1Request;
use crate::reception::inject::{inject, Origin};

use super::Api;

pub async fn handle(api: &Api, req: &Request) -> Response {
    let request: InjectV1Request = match req.json() {
        Ok(r) => r,
        Err(bad) => return bad,
    };
    let origin = Origin {
        peer: req.peer,
        tls: api.settings.get().config.http.tls,
    };
    match inject(&api.reception, &request, origin).await {
        Ok(answer) => Response::json(200, &answer),
        Err(refused) => Response::error(400, refused),
    }
}
