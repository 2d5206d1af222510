//! The admin API's requests, as [`Op`]s: KumoMTA's paths and bodies where it has the same
//! operation, so its tooling keeps working, and ours for the rest. No I/O: the adapter hands
//! the `Op` to the same handler the admin socket uses (shard 0's `admin::Server`).
//!
//! | path | method | body / query | op | role |
//! |---|---|---|---|---|
//! | `/api/admin/summary/v1` | GET | | summary | viewer |
//! | `/api/admin/inspect/v1` | GET | `domain`/`site`/`tenant`/`campaign`/`id`, `limit` | inspect | viewer |
//! | `/api/admin/suspend/v1` | POST | `domain`/`site`/`tenant`/`campaign`, `reason`, `duration` | suspend | operator |
//! | `/api/admin/suspend/v1` | GET | | the summary's suspensions | viewer |
//! | `/api/admin/suspend/v1` | DELETE | `id` (as POST answered) | resume | operator |
//! | `/api/admin/resume/v1` | POST | a selector | resume | operator |
//! | `/api/admin/bounce/v1` | POST | a selector, `reason`, `duration`, `notify` | bounce | operator |
//! | `/api/admin/flush/v1` | POST | a selector or none | flush | operator |
//! | `/api/admin/rebind/v1` | POST | `domain`, `pool` | rebind | operator |
//! | `/api/admin/reinject/v1` | POST | `id` or none | reinject | operator |
//! | `/api/admin/suppression/v1` | GET / POST / DELETE | `tenant`, `limit` / `rcpt`, `reason` | suppression | viewer / operator |
//! | `/api/admin/reload/v1` | POST | | reload | admin |
//! | `/api/admin/op/v1` | POST | an admin socket request line (`{"op": ...}`) | any | by op |
//!
//! A selector is exactly one of `domain`, `site`, `tenant`, `campaign`, `id`; KumoMTA's
//! combinations (domain *and* tenant) are refused with a 400 that says so. A duration is
//! seconds (`600`), or a number with a unit (`30s`, `10m`, `2h`, `1d`, `10 minutes`).

use serde::Deserialize;
use serde_json::Value;

use super::access::Role;
use super::{Request, Response};
use crate::admin::{Op, Selector, SuppressionOp};

/// The role an operation needs.
pub fn role_for(op: &Op) -> Role {
    match op {
        Op::Summary | Op::Inspect { .. } | Op::Suppression(SuppressionOp::List { .. }) => {
            Role::Viewer
        }
        Op::Reload => Role::Admin,
        _ => Role::Operator,
    }
}

/// The selector fields of a request body or query, KumoMTA's names and ours.
#[derive(Debug, Default, Deserialize)]
pub struct SelectorFields {
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default)]
    pub site: Option<String>,
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub campaign: Option<String>,
    #[serde(default)]
    pub id: Option<String>,
}

impl SelectorFields {
    fn from_query(req: &Request) -> SelectorFields {
        let get = |n: &str| req.param(n).map(str::to_owned);
        SelectorFields {
            domain: get("domain"),
            site: get("site"),
            tenant: get("tenant"),
            campaign: get("campaign"),
            id: get("id"),
        }
    }

    /// Exactly one selector; `None` when none is given (some operations allow that).
    pub fn selector(&self) -> Result<Option<Selector>, String> {
        let given: Vec<Selector> = [
            self.domain.clone().map(Selector::Domain),
            self.site.clone().map(Selector::Site),
            self.tenant.clone().map(Selector::Tenant),
            self.campaign.clone().map(Selector::Campaign),
            self.id.clone().map(Selector::Id),
        ]
        .into_iter()
        .flatten()
        .collect();
        match given.len() {
            0 => Ok(None),
            1 => Ok(given.into_iter().next()),
            _ => Err(
                "give one of domain, site, tenant, campaign or id, not several \
                 (combined selectors are not supported)"
                    .into(),
            ),
        }
    }

    fn required(&self) -> Result<Selector, String> {
        self.selector()?
            .ok_or_else(|| "say which messages: domain, site, tenant, campaign or id".into())
    }
}

/// A KumoMTA-style suspension or bounce id: the selector it was made for, so a DELETE with
/// it undoes the same thing (`domain:example.com`).
pub fn selector_id(sel: &Selector) -> String {
    match sel {
        Selector::Domain(v) => format!("domain:{v}"),
        Selector::Site(v) => format!("site:{v}"),
        Selector::Tenant(v) => format!("tenant:{v}"),
        Selector::Campaign(v) => format!("campaign:{v}"),
        Selector::Id(v) => format!("id:{v}"),
    }
}

fn parse_selector_id(id: &str) -> Result<Selector, String> {
    let (kind, value) = id
        .split_once(':')
        .ok_or_else(|| format!("`{id}` is not an id this server gave (KIND:VALUE)"))?;
    let value = value.to_owned();
    Ok(match kind {
        "domain" => Selector::Domain(value),
        "site" => Selector::Site(value),
        "tenant" => Selector::Tenant(value),
        "campaign" => Selector::Campaign(value),
        "id" => Selector::Id(value),
        _ => return Err(format!("`{id}` is not an id this server gave (KIND:VALUE)")),
    })
}

/// `600`, `30s`, `10m`, `2h`, `1d`, `10 minutes`, as seconds.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("duration `{text}`: use seconds or N s|m|h|d"))?;
    let factor = match unit.trim() {
        "" | "s" | "sec" | "secs" | "second" | "seconds" => 1,
        "m" | "min" | "mins" | "minute" | "minutes" => 60,
        "h" | "hr" | "hour" | "hours" => 3600,
        "d" | "day" | "days" => 86_400,
        _ => return Err(format!("duration `{text}`: unknown unit (s, m, h, d)")),
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("duration `{text}` is too long"))
}

/// A duration field: a string (`"10m"`) or a number of seconds.
fn duration_field(v: &Option<Value>) -> Result<Option<u64>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| "duration: a whole number of seconds".to_owned()),
        Some(Value::String(s)) => parse_duration(s).map(Some),
        Some(_) => Err("duration: a string such as \"10m\" or seconds".into()),
    }
}

#[derive(Debug, Default, Deserialize)]
struct DirectiveBody {
    #[serde(flatten)]
    sel: SelectorFields,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    duration: Option<Value>,
    /// Ours: seconds, as the admin socket says it.
    #[serde(default)]
    duration_s: Option<u64>,
    #[serde(default)]
    notify: bool,
    #[serde(default)]
    pool: Option<String>,
    #[serde(default)]
    rcpt: Option<String>,
}

impl DirectiveBody {
    fn duration_s(&self) -> Result<Option<u64>, String> {
        Ok(duration_field(&self.duration)?.or(self.duration_s))
    }
}

/// What an admin path asks for.
#[derive(Debug, PartialEq)]
pub enum AdminCall {
    Op(Op),
    /// GET of the suspensions: the summary's, reshaped for KumoMTA's list.
    ListSuspensions,
}

fn bad(why: impl std::fmt::Display) -> Response {
    Response::error(400, why)
}

fn body<T: for<'de> Deserialize<'de> + Default>(req: &Request) -> Result<T, Response> {
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    req.json()
}

/// The call for an `/api/admin/...` request; 404/405/400 when there is none.
pub fn parse(req: &Request) -> Result<AdminCall, Response> {
    let path = req.path.trim_end_matches('/');
    let method = req.method.as_str();
    let op = match (method, path) {
        ("GET", "/api/admin/summary/v1") => Op::Summary,
        ("GET", "/api/admin/inspect/v1") => {
            let sel = SelectorFields::from_query(req).required().map_err(bad)?;
            let limit = match req.param("limit") {
                None => None,
                Some(l) => Some(l.parse().map_err(|_| bad("limit: a number"))?),
            };
            Op::Inspect {
                selector: sel,
                limit,
            }
        }
        ("GET", "/api/admin/suspend/v1") => return Ok(AdminCall::ListSuspensions),
        ("POST", "/api/admin/suspend/v1") => {
            let b: DirectiveBody = body(req)?;
            Op::Suspend {
                selector: b.sel.required().map_err(bad)?,
                duration_s: b.duration_s().map_err(bad)?,
                reason: b.reason,
            }
        }
        ("DELETE", "/api/admin/suspend/v1") => {
            let b: DirectiveBody = body(req)?;
            let selector = match &b.sel.id {
                Some(id) if id.contains(':') => parse_selector_id(id).map_err(bad)?,
                _ => b.sel.required().map_err(bad)?,
            };
            Op::Resume { selector }
        }
        ("POST", "/api/admin/resume/v1") => {
            let b: DirectiveBody = body(req)?;
            Op::Resume {
                selector: b.sel.required().map_err(bad)?,
            }
        }
        ("POST", "/api/admin/bounce/v1") => {
            let b: DirectiveBody = body(req)?;
            Op::Bounce {
                selector: b.sel.required().map_err(bad)?,
                duration_s: b.duration_s().map_err(bad)?,
                reason: b.reason.clone(),
                notify: b.notify,
            }
        }
        ("POST", "/api/admin/flush/v1") => {
            let b: DirectiveBody = body(req)?;
            Op::Flush {
                selector: b.sel.selector().map_err(bad)?,
            }
        }
        ("POST", "/api/admin/rebind/v1") => {
            let b: DirectiveBody = body(req)?;
            let (Some(domain), Some(pool)) = (b.sel.domain, b.pool) else {
                return Err(bad("rebind needs `domain` and `pool`"));
            };
            Op::Rebind { domain, pool }
        }
        ("POST", "/api/admin/reinject/v1") => {
            let b: DirectiveBody = body(req)?;
            Op::Reinject { id: b.sel.id }
        }
        ("GET", "/api/admin/suppression/v1") => Op::Suppression(SuppressionOp::List {
            tenant: req.param("tenant").map(str::to_owned),
            limit: match req.param("limit") {
                None => None,
                Some(l) => Some(l.parse().map_err(|_| bad("limit: a number"))?),
            },
        }),
        ("POST", "/api/admin/suppression/v1") => {
            let b: DirectiveBody = body(req)?;
            Op::Suppression(SuppressionOp::Add {
                tenant: b.sel.tenant,
                rcpt: b.rcpt.ok_or_else(|| bad("suppression needs `rcpt`"))?,
                reason: b.reason,
            })
        }
        ("DELETE", "/api/admin/suppression/v1") => {
            let b: DirectiveBody = body(req)?;
            Op::Suppression(SuppressionOp::Remove {
                tenant: b.sel.tenant,
                rcpt: b.rcpt.ok_or_else(|| bad("suppression needs `rcpt`"))?,
            })
        }
        ("POST", "/api/admin/reload/v1") => Op::Reload,
        ("POST", "/api/admin/op/v1") => crate::admin::parse_request(&req.body).map_err(bad)?,
        (
            _,
            "/api/admin/summary/v1"
            | "/api/admin/inspect/v1"
            | "/api/admin/suspend/v1"
            | "/api/admin/resume/v1"
            | "/api/admin/bounce/v1"
            | "/api/admin/flush/v1"
            | "/api/admin/rebind/v1"
            | "/api/admin/reinject/v1"
            | "/api/admin/suppression/v1"
            | "/api/admin/reload/v1"
            | "/api/admin/op/v1",
        ) => {
            return Err(Response::error(
                405,
                format!("{method} is not allowed on {path}"),
            ))
        }
        _ => return Err(Response::error(404, format!("no such endpoint: {path}"))),
    };
    Ok(AdminCall::Op(op))
}

/// The answer as KumoMTA's clients expect it, where they do: a suspension or bounce gets
/// an `id` (to DELETE it with later), the bounce's `total_bounced`.
pub fn shape_answer(op: &Op, mut answer: Value) -> Value {
    if answer.get("error").is_some() {
        return answer;
    }
    match op {
        Op::Suspend { selector, .. } | Op::Bounce { selector, .. } => {
            answer["id"] = Value::String(selector_id(selector));
            if let Op::Bounce { .. } = op {
                let n = answer.get("bounced").and_then(Value::as_u64).unwrap_or(0);
                answer["total_bounced"] = Value::from(n);
            }
        }
        _ => {}
    }
    answer
}

/// The summary's operator suspensions as KumoMTA's suspension list.
pub fn suspensions(summary: &Value) -> Value {
    let list = summary
        .get("suspensions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    Value::Array(list)
}

/// The HTTP status for an admin answer: 200, or 400 when it says `error`.
pub fn status(answer: &Value) -> u16 {
    if answer.get("error").is_some() {
        400
    } else {
        200
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, target: &str, body: &str) -> Request {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        Request {
            method: method.into(),
            path: path.into(),
            query: super::super::parse_form(query),
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
            peer: "127.0.0.1:1".parse().expect("peer"),
            keep_alive: true,
        }
    }

    #[test]
    fn kumomta_bodies_become_ops() {
        let call = parse(&req(
            "POST",
            "/api/admin/suspend/v1",
            r#"{"domain":"example.com","reason":"deliverability","duration":"10m"}"#,
        ))
        .expect("suspend");
        let op = Op::Suspend {
            selector: Selector::Domain("example.com".into()),
            duration_s: Some(600),
            reason: Some("deliverability".into()),
        };
        assert_eq!(call, AdminCall::Op(op.clone()));
        let answer = shape_answer(&op, serde_json::json!({"matched": 3}));
        assert_eq!(answer["id"], "domain:example.com");
        let undo = parse(&req(
            "DELETE",
            "/api/admin/suspend/v1",
            r#"{"id":"domain:example.com"}"#,
        ))
        .expect("delete");
        assert_eq!(
            undo,
            AdminCall::Op(Op::Resume {
                selector: Selector::Domain("example.com".into())
            })
        );
        let bounce = parse(&req(
            "POST",
            "/api/admin/bounce/v1",
            r#"{"campaign":"spring","reason":"bad list","duration":3600}"#,
        ))
        .expect("bounce");
        assert!(matches!(
            bounce,
            AdminCall::Op(Op::Bounce { duration_s: Some(3600), ref selector, .. })
                if *selector == Selector::Campaign("spring".into())
        ));
    }

    #[test]
    fn bad_requests_say_why() {
        let both = parse(&req(
            "POST",
            "/api/admin/suspend/v1",
            r#"{"domain":"a","tenant":"b","reason":"x"}"#,
        ))
        .expect_err("two selectors");
        assert_eq!(both.status, 400);
        assert!(String::from_utf8_lossy(&both.body).contains("not several"));
        let none = parse(&req("POST", "/api/admin/suspend/v1", "{}")).expect_err("none");
        assert_eq!(none.status, 400);
        let json = parse(&req("POST", "/api/admin/suspend/v1", "{nope")).expect_err("json");
        assert_eq!(json.status, 400);
        let unit = parse(&req(
            "POST",
            "/api/admin/suspend/v1",
            r#"{"domain":"a","duration":"5 fortnights"}"#,
        ))
        .expect_err("unit");
        assert_eq!(unit.status, 400);
        assert_eq!(
            parse(&req("PUT", "/api/admin/suspend/v1", ""))
                .expect_err("405")
                .status,
            405
        );
        assert_eq!(
            parse(&req("GET", "/api/admin/nothing/v1", ""))
                .expect_err("404")
                .status,
            404
        );
    }

    #[test]
    fn durations_and_roles() {
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("2h"), Ok(7200));
        assert_eq!(parse_duration("10 minutes"), Ok(600));
        assert!(parse_duration("h").is_err());
        assert_eq!(role_for(&Op::Summary), Role::Viewer);
        assert_eq!(role_for(&Op::Reload), Role::Admin);
        assert_eq!(role_for(&Op::Flush { selector: None }), Role::Operator);
        let raw = parse(&req("POST", "/api/admin/op/v1", r#"{"op":"summary"}"#)).expect("op");
        assert_eq!(raw, AdminCall::Op(Op::Summary));
    }
}
