//! Reading and checking the agent's JSON Lines (schema v1).

use serde_json::Value;

/// The `type` of a record, or "" if it has none.
pub fn kind_of(rec: &Value) -> &str {
    rec.get("type").and_then(Value::as_str).unwrap_or("")
}

pub fn is_type(rec: &Value, ty: &str) -> bool {
    kind_of(rec) == ty
}

/// A string field; panics (showing the record) if absent or not a string.
pub fn str_field<'a>(rec: &'a Value, key: &str) -> &'a str {
    rec.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("field {key:?} is not a string in {rec}"))
}

/// An unsigned integer field; panics (showing the record) otherwise.
pub fn u64_field(rec: &Value, key: &str) -> u64 {
    rec.get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("field {key:?} is not an unsigned integer in {rec}"))
}

/// `u64_field` for fields holding a port.
pub fn port_field(rec: &Value, key: &str) -> u16 {
    u16::try_from(u64_field(rec, key)).unwrap_or_else(|_| panic!("{key:?} out of range in {rec}"))
}

/// The `pid` of a record if it is an integer (the contract allows null).
pub fn pid_of(rec: &Value) -> Option<u64> {
    rec.get("pid").and_then(Value::as_u64)
}

/// One class's `agent_stats` counters summed over a run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClassTotals {
    pub events: u64,
    pub dropped: u64,
    pub lost: u64,
    pub failed: u64,
    /// Events sent with socket fields missing (a failed read of the socket).
    pub partial: u64,
}

/// Sums `classes.<class>` over every `agent_stats` record: the counters are
/// per-interval deltas, so the sum covers the whole run. Panics if no
/// `agent_stats` names the class.
pub fn class_totals(recs: &[Value], class: &str) -> ClassTotals {
    let stats: Vec<&Value> = recs
        .iter()
        .filter(|r| is_type(r, "agent_stats"))
        .map(|r| {
            r.get("classes")
                .and_then(|c| c.get(class))
                .unwrap_or_else(|| panic!("no classes.{class} in {r}"))
        })
        .collect();
    assert!(!stats.is_empty(), "no agent_stats record");
    stats
        .into_iter()
        .fold(ClassTotals::default(), |t, c| ClassTotals {
            events: t.events + u64_field(c, "events"),
            dropped: t.dropped + u64_field(c, "dropped"),
            lost: t.lost + u64_field(c, "lost"),
            failed: t.failed + u64_field(c, "failed"),
            partial: t.partial + u64_field(c, "partial"),
        })
}

/// `decode_errors` summed over every `agent_stats` record: events the agent
/// received and could not decode. Panics if a record lacks the field.
pub fn decode_errors(recs: &[Value]) -> u64 {
    recs.iter()
        .filter(|r| is_type(r, "agent_stats"))
        .map(|r| u64_field(r, "decode_errors"))
        .sum()
}

/// `recursion_misses` of the named programs summed over every
/// `agent_stats` record (per-interval deltas, so the whole run). Panics if
/// one is missing or null: every kernel tested counts them (5.12+).
pub fn recursion_misses_reported(recs: &[Value], programs: &[&str]) -> u64 {
    recs.iter()
        .filter(|r| is_type(r, "agent_stats"))
        .flat_map(|r| {
            r.get("programs")
                .and_then(Value::as_array)
                .unwrap_or_else(|| panic!("no programs list in {r}"))
        })
        .filter(|p| {
            p.get("name")
                .and_then(Value::as_str)
                .is_some_and(|n| programs.contains(&n))
        })
        .map(|p| u64_field(p, "recursion_misses"))
        .sum()
}

/// The reason `agent_start` gives for degrading `what`, if it does.
pub fn degraded_why<'a>(start: &'a Value, what: &str) -> Option<&'a str> {
    start["degraded"]
        .as_array()?
        .iter()
        .find(|d| d["what"] == what)
        .map(|d| d["why"].as_str().unwrap_or_default())
}

/// Checks the envelope every line carries: `"v":1`, a `type`, `ts` in
/// RFC 3339 UTC with nanoseconds, and a non-empty `host`.
pub fn assert_envelope(rec: &Value) {
    assert_eq!(
        rec.get("v").and_then(Value::as_u64),
        Some(1),
        "\"v\" must be 1 in {rec}"
    );
    assert!(!kind_of(rec).is_empty(), "missing \"type\" in {rec}");
    let ts = str_field(rec, "ts");
    assert!(
        is_rfc3339_utc_nanos(ts),
        "\"ts\" {ts:?} is not RFC 3339 UTC with nanoseconds in {rec}"
    );
    assert!(
        !str_field(rec, "host").is_empty(),
        "empty \"host\" in {rec}"
    );
}

/// `YYYY-MM-DDTHH:MM:SS.fffZ` with 1 to 9 fraction digits: RFC 3339 writers
/// (e.g. `time`'s `Rfc3339`) drop trailing zeros of the nanoseconds, so the
/// digit count varies between records.
pub fn is_rfc3339_utc_nanos(ts: &str) -> bool {
    const SHAPE: &str = "dddd-dd-ddTdd:dd:dd.";
    let Some(frac) = ts
        .get(SHAPE.len()..)
        .and_then(|rest| rest.strip_suffix('Z'))
    else {
        return false;
    };
    ts.chars().zip(SHAPE.chars()).all(|(c, s)| match s {
        'd' => c.is_ascii_digit(),
        _ => c == s,
    }) && (1..=9).contains(&frac.len())
        && frac.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::is_rfc3339_utc_nanos;

    #[test]
    fn timestamp_shape() {
        assert!(is_rfc3339_utc_nanos("2025-01-02T03:04:05.123456789Z"));
        assert!(is_rfc3339_utc_nanos("2025-01-02T03:04:05.12345678Z"));
        assert!(!is_rfc3339_utc_nanos("2025-01-02T03:04:05Z"));
        assert!(!is_rfc3339_utc_nanos("2025-01-02T03:04:05.1234567890Z"));
        assert!(!is_rfc3339_utc_nanos("2025-01-02T03:04:05.123456789+00:00"));
    }
}
