//! Merging the shards' answers to one operation into the one answer the operator sees.
//!
//! Each shard answers about its own queue with a JSON object whose shape the core decides; the
//! merge knows only a few conventions, so the core can add fields without touching this:
//! - numbers are summed (`ready`, `matched`, ...), except fields whose name says they are an
//!   age or the oldest of something (`oldest_age_s`, `age_ms`...): the largest wins;
//! - an array of objects named after its rows (`sites` of rows with a `site`, `tenants` with a
//!   `tenant`, `domains` with a `domain`) or whose rows have a `key`, is merged row by row:
//!   rows with the same key merge as objects do;
//! - other arrays are concatenated, rows every shard reports alike (a suspension made on all
//!   of them) once, up to [`LIST_MAX`] items (then `truncated` is set);
//! - objects merge key by key; strings and booleans: the first shard's value;
//! - an answer with an `error` is not merged: its error is kept with its shard in `errors`, and
//!   the merged answer gets a top-level `error` naming them, so the client can fail.
//!
//! No I/O; the answers are small (a summary is a row per site and tenant).

use serde_json::{Map, Value};

/// Most items of a concatenated list in one answer: enough for any `inspect` an operator reads,
/// small enough that an answer stays a line of a few MiB at most.
pub const LIST_MAX: usize = 10_000;

/// Most shard errors named in the top-level `error` text (all are in `errors`).
const ERRORS_NAMED_MAX: usize = 4;

/// What one shard answered, or why it did not.
pub type ShardAnswer = (usize, Result<Value, String>);

/// The merged answer of `answers` (one per shard).
pub fn merge(answers: Vec<ShardAnswer>) -> Value {
    let mut merged = Map::new();
    let mut errors: Vec<(usize, String)> = Vec::new();
    let mut answered = 0usize;
    let mut truncated = false;
    for (shard, answer) in answers {
        let object = match answer {
            Ok(Value::Object(object)) => object,
            Ok(other) => {
                errors.push((shard, format!("not a JSON object: {other}")));
                continue;
            }
            Err(why) => {
                errors.push((shard, why));
                continue;
            }
        };
        if let Some(error) = object.get("error") {
            let text = error
                .as_str()
                .map_or_else(|| error.to_string(), str::to_owned);
            errors.push((shard, text));
            continue;
        }
        answered += 1;
        for (key, value) in object {
            // Each shard says who it is; the merged answer is everybody's.
            if key == "shard" {
                continue;
            }
            match merged.get_mut(&key) {
                Some(into) => merge_value(&key, into, value, &mut truncated),
                None => {
                    merged.insert(key, value);
                }
            }
        }
    }
    merged.insert("shards".into(), Value::from(answered));
    if truncated {
        merged.insert("truncated".into(), Value::Bool(true));
    }
    if !errors.is_empty() {
        errors.sort_by_key(|(shard, _)| *shard);
        let mut text: Vec<String> = errors
            .iter()
            .take(ERRORS_NAMED_MAX)
            .map(|(shard, why)| format!("shard {shard}: {why}"))
            .collect();
        if errors.len() > ERRORS_NAMED_MAX {
            text.push(format!("{} more", errors.len() - ERRORS_NAMED_MAX));
        }
        // The same error from every shard (an operation not available) is said once.
        let first = &errors[0].1;
        let error = if errors.len() > 1 && errors.iter().all(|(_, why)| why == first) {
            first.clone()
        } else {
            text.join("; ")
        };
        merged.insert("error".into(), Value::String(error));
        let list = errors
            .into_iter()
            .map(|(shard, why)| serde_json::json!({ "shard": shard, "error": why }))
            .collect();
        merged.insert("errors".into(), Value::Array(list));
    }
    Value::Object(merged)
}

/// Whether field `key` is an age or an oldest time, where the largest value wins.
fn is_max_field(key: &str) -> bool {
    key.contains("oldest") || key == "age" || key.starts_with("age_") || key.contains("_age")
}

/// The field that keys the rows of array `key`: `sites` → `site`, else `key` when rows have it.
fn row_key(key: &str, rows: &[Value]) -> Option<String> {
    let singular = key.strip_suffix('s').filter(|s| !s.is_empty());
    let has = |field: &str| {
        !rows.is_empty()
            && rows
                .iter()
                .all(|r| r.get(field).is_some_and(|v| v.is_string() || v.is_number()))
    };
    match singular {
        Some(s) if has(s) => Some(s.to_owned()),
        _ if has("key") => Some("key".to_owned()),
        _ => None,
    }
}

fn merge_value(key: &str, into: &mut Value, from: Value, truncated: &mut bool) {
    match (into, from) {
        (Value::Number(a), Value::Number(b)) => {
            *a = if is_max_field(key) {
                max_number(a, &b)
            } else {
                add_numbers(a, &b)
            };
        }
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(into) => merge_value(&k, into, v, truncated),
                    None => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => merge_arrays(key, a, b, truncated),
        // A field one shard left out (null) takes the other's value.
        (into @ Value::Null, from) => *into = from,
        // Strings, booleans, or shapes that disagree: the first shard's value stands.
        _ => {}
    }
}

fn merge_arrays(key: &str, into: &mut Vec<Value>, from: Vec<Value>, truncated: &mut bool) {
    let keyed = row_key(key, into).filter(|k| {
        from.iter()
            .all(|r| r.get(k).is_some_and(|v| v.is_string() || v.is_number()))
    });
    for row in from {
        if let Some(field) = &keyed {
            let same = into.iter_mut().find(|r| r.get(field) == row.get(field));
            if let Some(existing) = same {
                merge_value(key, existing, row, truncated);
                continue;
            }
        } else if into.contains(&row) {
            continue;
        }
        if into.len() >= LIST_MAX {
            *truncated = true;
            continue;
        }
        into.push(row);
    }
}

fn add_numbers(a: &serde_json::Number, b: &serde_json::Number) -> serde_json::Number {
    if let (Some(x), Some(y)) = (a.as_u64(), b.as_u64()) {
        return x.saturating_add(y).into();
    }
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        return x.saturating_add(y).into();
    }
    let sum = a.as_f64().unwrap_or(0.0) + b.as_f64().unwrap_or(0.0);
    serde_json::Number::from_f64(sum).unwrap_or_else(|| a.clone())
}

fn max_number(a: &serde_json::Number, b: &serde_json::Number) -> serde_json::Number {
    if let (Some(x), Some(y)) = (a.as_u64(), b.as_u64()) {
        return x.max(y).into();
    }
    let (x, y) = (a.as_f64().unwrap_or(0.0), b.as_f64().unwrap_or(0.0));
    if y > x {
        b.clone()
    } else {
        a.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sums_rows_by_key_and_takes_the_oldest_age() {
        let a = json!({
            "shard": 0,
            "ready": 3,
            "sites": [
                {"site": "mx.a.test", "ready": 2, "scheduled": 1, "in_flight": 0, "oldest_age_s": 10},
                {"site": "mx.b.test", "ready": 1, "scheduled": 0, "in_flight": 1, "oldest_age_s": 5}
            ],
            "tenants": [{"tenant": "acme", "ready": 3, "oldest_age_s": 10}],
            "suspensions": [{"selector": {"domain": "a.test"}, "until_ms": 99}]
        });
        let b = json!({
            "shard": 1,
            "ready": 4,
            "sites": [
                {"site": "mx.a.test", "ready": 4, "scheduled": 2, "in_flight": 1, "oldest_age_s": 30}
            ],
            "tenants": [{"tenant": "beta", "ready": 4, "oldest_age_s": 30}],
            "suspensions": [{"selector": {"domain": "a.test"}, "until_ms": 99}]
        });
        let m = merge(vec![(0, Ok(a)), (1, Ok(b))]);
        assert_eq!(m["shards"], 2);
        assert_eq!(m["ready"], 7);
        assert!(m.get("shard").is_none());
        assert!(m.get("error").is_none(), "{m}");
        let sites = m["sites"].as_array().expect("sites");
        assert_eq!(sites.len(), 2);
        assert_eq!(
            sites[0],
            json!({"site": "mx.a.test", "ready": 6, "scheduled": 3, "in_flight": 1, "oldest_age_s": 30})
        );
        assert_eq!(sites[1]["site"], "mx.b.test");
        assert_eq!(m["tenants"].as_array().map(Vec::len), Some(2));
        // The same suspension on every shard is one suspension.
        assert_eq!(m["suspensions"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn concatenates_lists_up_to_the_limit() {
        let rows = |from: usize, n: usize| -> Value {
            Value::Array((from..from + n).map(|i| json!({ "id": i })).collect())
        };
        let a = json!({ "messages": rows(0, LIST_MAX - 1), "matched": LIST_MAX - 1 });
        let b = json!({ "messages": rows(LIST_MAX, 5), "matched": 5 });
        let m = merge(vec![(0, Ok(a)), (1, Ok(b))]);
        assert_eq!(m["messages"].as_array().map(Vec::len), Some(LIST_MAX));
        assert_eq!(m["matched"], LIST_MAX + 4);
        assert_eq!(m["truncated"], true);
    }

    #[test]
    fn collects_errors_per_shard() {
        let m = merge(vec![
            (0, Ok(json!({"shard": 0, "matched": 2}))),
            (1, Ok(json!({"shard": 1, "error": "no such pool"}))),
            (2, Err("did not answer".into())),
        ]);
        assert_eq!(m["matched"], 2);
        assert_eq!(m["shards"], 1);
        assert_eq!(
            m["error"], "shard 1: no such pool; shard 2: did not answer",
            "{m}"
        );
        assert_eq!(
            m["errors"][1],
            json!({"shard": 2, "error": "did not answer"})
        );
        // Every shard saying the same thing says it once.
        let m = merge(vec![
            (0, Ok(json!({"error": "not available"}))),
            (1, Ok(json!({"error": "not available"}))),
        ]);
        assert_eq!(m["error"], "not available");
        assert_eq!(m["shards"], 0);
    }

    #[test]
    fn nested_objects_and_mixed_numbers() {
        let a = json!({"totals": {"ready": 1, "bytes": 1.5}, "note": "first"});
        let b = json!({"totals": {"ready": 2, "bytes": 2.0, "new": 1}, "note": "second"});
        let m = merge(vec![(0, Ok(a)), (1, Ok(b))]);
        assert_eq!(m["totals"]["ready"], 3);
        assert_eq!(m["totals"]["bytes"], 3.5);
        assert_eq!(m["totals"]["new"], 1);
        assert_eq!(m["note"], "first");
    }
}
