//! What the CLI prints: a merged summary as tables (one per list of rows), and durations as
//! operators write them (`30s`, `10m`, `1h`, `2d`). No I/O.

use serde_json::Value;

/// Longest duration taken: `queue.max_age_s` is at most 49 days, and a hold longer than a
/// year is a typo.
pub const DURATION_MAX_S: u64 = 366 * 86_400;

/// `30s`, `10m`, `1h`, `2d` (or plain seconds) in seconds.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (30s, 10m, 1h, 2d)"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(format!("`{text}`: the unit must be s, m, h or d")),
    };
    let seconds = n
        .checked_mul(scale)
        .filter(|&s| s <= DURATION_MAX_S)
        .ok_or_else(|| format!("`{text}` is longer than {} days", DURATION_MAX_S / 86_400))?;
    Ok(seconds)
}

/// Columns shown first, in this order, when a row has them; other fields follow by name.
const COLUMNS_FIRST: &[&str] = &[
    "ready",
    "scheduled",
    "in_flight",
    "oldest_age_s",
    "suspended",
    "throttled",
];

/// A merged summary as text: a table for each of `sites`, `tenants`, `campaigns` and
/// `suspensions` the answer has, then its other plain fields.
pub fn summary(answer: &Value) -> String {
    let mut out = String::new();
    for (list, key) in [
        ("sites", "site"),
        ("tenants", "tenant"),
        ("campaigns", "campaign"),
        ("suspensions", ""),
        ("warmup", "source"),
    ] {
        let Some(rows) = answer.get(list).and_then(Value::as_array) else {
            continue;
        };
        out.push_str(&format!("{list}: {}\n", rows.len()));
        if !rows.is_empty() {
            out.push_str(&table(rows, key));
        }
        out.push('\n');
    }
    if let Some(object) = answer.as_object() {
        for (k, v) in object {
            if matches!(
                k.as_str(),
                "sites" | "tenants" | "campaigns" | "suspensions" | "warmup"
            ) {
                continue;
            }
            out.push_str(&format!("{k}: {}\n", cell(v)));
        }
    }
    out
}

fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Rows of objects as aligned columns: `key` first (when given), then [`COLUMNS_FIRST`], then
/// the rest.
fn table(rows: &[Value], key: &str) -> String {
    let mut columns: Vec<String> = Vec::new();
    if !key.is_empty() {
        columns.push(key.to_owned());
    }
    for c in COLUMNS_FIRST {
        if rows.iter().any(|r| r.get(*c).is_some()) {
            columns.push((*c).to_owned());
        }
    }
    let mut rest: Vec<String> = rows
        .iter()
        .filter_map(Value::as_object)
        .flat_map(|o| o.keys().cloned())
        .filter(|k| !columns.contains(k))
        .collect();
    rest.sort();
    rest.dedup();
    columns.extend(rest);
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            columns
                .iter()
                .map(|c| r.get(c).map_or_else(|| "-".to_owned(), cell))
                .collect()
        })
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|row| row[i].chars().count())
                .chain([c.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let mut line = |values: &[String]| {
        let text: Vec<String> = values
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(&columns);
    for row in &cells {
        line(row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(30));
        assert_eq!(parse_duration("10m"), Ok(600));
        assert_eq!(parse_duration("1h"), Ok(3600));
        assert_eq!(parse_duration("2d"), Ok(172_800));
        assert_eq!(parse_duration("45"), Ok(45));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("999999999999d").is_err());
    }

    #[test]
    fn summary_tables() {
        let answer = serde_json::json!({
            "sites": [
                {"site": "mx.a.test", "ready": 6, "in_flight": 1, "oldest_age_s": 30},
                {"site": "mx.longer-name.test", "ready": 1, "scheduled": 2}
            ],
            "tenants": [],
            "campaigns": [{"campaign": "spring", "scheduled": 3}],
            "shards": 2
        });
        let text = summary(&answer);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "sites: 2");
        assert_eq!(
            lines[1],
            "site                 ready  scheduled  in_flight  oldest_age_s"
        );
        assert_eq!(
            lines[2],
            "mx.a.test            6      -          1          30"
        );
        assert!(text.contains("tenants: 0\n"), "{text}");
        assert!(text.contains("campaigns: 1\ncampaign"), "{text}");
        assert!(
            !text.contains("campaigns: ["),
            "a table, not a field: {text}"
        );
        assert!(text.contains("shards: 2\n"), "{text}");
    }
}
