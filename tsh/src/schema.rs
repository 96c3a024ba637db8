//! One JSON shape per resource, shared by tsh and tctl, so a device is the same object in
//! `tsh ls` and `tctl devices ls`. The rules (docs/cli.md, "JSON output"; a JSON Schema per
//! resource in docs/schemas/, checked by tests/tests/json_schema.rs):
//!
//! - times are RFC 3339 strings in UTC (`2026-12-04T16:03:52Z`), `null` for never;
//! - durations are whole seconds in keys ending `_secs`;
//! - enumerations are lower-case strings (`quic`, `device`);
//! - booleans are booleans and counts are numbers, never strings;
//! - keys are `snake_case`; `type` names the kind of a thing.

use edgeport_proto::audit::RecordingInfo;
use edgeport_proto::rpc::DeviceInfo;
use edgeport_proto::targets::TargetInfo;
use edgeport_proto::util::format_time;
use serde_json::{json, Value};

/// RFC 3339, or `null` for 0 (never).
pub fn time(unix: u64) -> Value {
    if unix == 0 {
        Value::Null
    } else {
        format_time(unix).into()
    }
}

/// A device, as `tsh ls` and `tctl devices ls` print it, with those of `targets` that sit
/// behind it (hosts reached through the device, issue 22).
pub fn device(d: &DeviceInfo, targets: &[TargetInfo]) -> Value {
    json!({
        "id": d.id,
        "labels": d.labels,
        "online": d.online,
        "transport": d.transport.map(|t| t.as_str()),
        "address": d.address,
        "version": edgeport_proto::update::split_version(&d.version).0,
        "binary_sha256": edgeport_proto::update::split_version(&d.version).1,
        "arch": d.arch,
        "rtt_ms": d.rtt_ms,
        "loss_permille": d.loss_permille,
        "address_changes_24h": d.address_changes_24h,
        "last_seen": time(d.last_seen),
        "last_disconnect_reason": d.last_disconnect_reason,
        "last_disconnect_kind": d.last_disconnect_kind(),
        "gateway": d.gateway,
        "joined_at": time(d.joined_at),
        "kube_cluster": d.kube_cluster,
        "targets": targets
            .iter()
            .filter(|t| t.device == d.id)
            .map(target)
            .collect::<Vec<_>>(),
    })
}

/// A host behind a device, as its device last reported it.
pub fn target(t: &TargetInfo) -> Value {
    json!({
        "name": t.name,
        "address": t.address(),
        "addr": t.addr,
        "labels": t.labels,
        "status": t.status(),
        "mode": t.mode(),
        "checked": time(t.checked_ms / 1000),
        "hostkey": t.hostkey,
    })
}

/// A device's bytes per service, as `tctl devices usage` prints them.
pub fn usage(u: &edgeport_proto::usage::DeviceUsage) -> Value {
    json!({
        "device": u.device,
        "from": time(u.from),
        "services": u.services.iter().map(|s| json!({
            "service": s.service,
            "up": s.up,
            "down": s.down,
        })).collect::<Vec<_>>(),
    })
}

/// A recorded session, as `tsh recordings ls` prints it.
pub fn recording(r: &RecordingInfo) -> Value {
    json!({
        "session_id": r.session_id,
        "device": r.device,
        "user": r.user,
        "login": r.login,
        "started": time(r.started_ms / 1000),
        "bytes": r.bytes,
    })
}

/// An access request, as `tsh request ls` and `tctl requests ls` print it.
pub fn access_request(r: &edgeport_proto::rpc::AccessRequestInfo) -> Value {
    let text = |s: &str| if s.is_empty() { Value::Null } else { s.into() };
    json!({
        "id": r.id,
        "user": r.user,
        "roles": r.roles,
        "reason": r.reason,
        "state": r.state.as_str(),
        "created": time(r.created),
        "reviewer": text(&r.reviewer),
        "review_reason": text(&r.review_reason),
        "reviewed_at": time(r.reviewed_at),
        "expires": time(r.expires),
    })
}

/// Access requests as a text table: the approval's remaining time while it lasts.
pub fn access_request_table(
    all: &[edgeport_proto::rpc::AccessRequestInfo],
    now: u64,
) -> crate::text::Table {
    use edgeport_proto::rpc::AccessState;
    let mut t = crate::text::Table::new(&[
        "ID", "USER", "ROLES", "STATE", "CREATED", "REVIEWER", "EXPIRES", "REASON",
    ]);
    for r in all {
        let expires = match r.state {
            AccessState::Approved => format!(
                "{} (in {})",
                format_time(r.expires),
                crate::text::duration(r.expires.saturating_sub(now))
            ),
            AccessState::Expired => format_time(r.expires),
            _ => String::new(),
        };
        t.row(vec![
            r.id.clone(),
            r.user.clone(),
            r.roles.join(","),
            r.state.as_str().to_string(),
            format_time(r.created),
            r.reviewer.clone(),
            expires,
            r.reason.clone(),
        ]);
    }
    t
}

/// Audit event fields travel as strings; printed, they take their type: `true`/`false`
/// become booleans, byte counts, exit codes and HTTP statuses numbers, and the
/// millisecond figures the schema's units (`duration_ms` -> `duration_secs`,
/// `last_known_ms` -> `last_known`, a time).
pub fn event_field(key: &str, value: &str) -> (String, Value) {
    let number = |v: &str| v.parse::<i64>().map(Value::from);
    match key {
        "duration_ms" => match value.parse::<u64>() {
            Ok(ms) => ("duration_secs".into(), json!(ms as f64 / 1000.0)),
            Err(_) => (key.into(), json!(value)),
        },
        "last_known_ms" => match value.parse::<u64>() {
            Ok(ms) => ("last_known".into(), time(ms / 1000)),
            Err(_) => (key.into(), json!(value)),
        },
        "started_ms" => match value.parse::<u64>() {
            Ok(ms) => ("started".into(), time(ms / 1000)),
            Err(_) => (key.into(), json!(value)),
        },
        // Unix seconds on the wire; 0 when unknown.
        "cert_expires" => match value.parse::<u64>() {
            Ok(secs) if secs > 0 => (key.into(), time(secs)),
            _ => (key.into(), json!(value)),
        },
        _ if value == "true" || value == "false" => (key.into(), json!(value == "true")),
        "exit_code" | "status" | "port" | "bytes" => {
            (key.into(), number(value).unwrap_or_else(|_| json!(value)))
        }
        k if k.starts_with("bytes_") => {
            (key.into(), number(value).unwrap_or_else(|_| json!(value)))
        }
        _ => (key.into(), json!(value)),
    }
}

/// The value as `--format json` (pretty) or `--format yaml` prints it, with a final newline.
pub fn render(v: &Value, yaml: bool) -> String {
    if yaml {
        to_yaml(v)
    } else {
        // Serialising a `Value` cannot fail.
        format!("{v:#}\n")
    }
}

/// The value printed as YAML (`--format yaml`): block style, strings quoted only where
/// YAML would read them as something else.
pub fn to_yaml(v: &Value) -> String {
    let mut out = String::new();
    yaml_into(v, 0, &mut out);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

fn yaml_scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => yaml_string(s),
        Value::Array(a) if a.is_empty() => "[]".into(),
        Value::Object(o) if o.is_empty() => "{}".into(),
        _ => String::new(),
    }
}

fn yaml_string(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/@+".contains(c))
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "yes" | "no" | "on" | "off" | "null" | "~"
        )
        && s.parse::<f64>().is_err()
        && !s.starts_with(['-', '.', '@']);
    if plain {
        s.to_string()
    } else {
        // A JSON string is a valid YAML double-quoted scalar.
        Value::String(s.to_string()).to_string()
    }
}

fn is_block(v: &Value) -> bool {
    matches!(v, Value::Array(a) if !a.is_empty()) || matches!(v, Value::Object(o) if !o.is_empty())
}

fn yaml_into(v: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(o) if !o.is_empty() => {
            for (k, val) in o {
                if is_block(val) {
                    out.push_str(&format!("{pad}{}:\n", yaml_string(k)));
                    let child = if val.is_array() { indent } else { indent + 2 };
                    yaml_into(val, child, out);
                } else {
                    out.push_str(&format!("{pad}{}: {}\n", yaml_string(k), yaml_scalar(val)));
                }
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for item in a {
                if is_block(item) {
                    // The first line of the item goes after the dash.
                    let mut inner = String::new();
                    yaml_into(item, indent + 2, &mut inner);
                    let trimmed = inner.trim_start_matches(' ');
                    out.push_str(&format!("{pad}- {trimmed}"));
                } else {
                    out.push_str(&format!("{pad}- {}\n", yaml_scalar(item)));
                }
            }
        }
        other => out.push_str(&format!("{pad}{}\n", yaml_scalar(other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_fields_take_their_types() {
        assert_eq!(
            event_field("success", "false"),
            ("success".into(), json!(false))
        );
        assert_eq!(
            event_field("exit_code", "3"),
            ("exit_code".into(), json!(3))
        );
        assert_eq!(
            event_field("bytes_in", "1024"),
            ("bytes_in".into(), json!(1024))
        );
        assert_eq!(
            event_field("duration_ms", "1500"),
            ("duration_secs".into(), json!(1.5))
        );
        assert_eq!(
            event_field("last_known_ms", "0"),
            ("last_known".into(), Value::Null)
        );
        assert_eq!(
            event_field("command", "true"),
            ("command".into(), json!(true))
        );
        assert_eq!(
            event_field("command", "ls -l"),
            ("command".into(), json!("ls -l"))
        );
        assert_eq!(
            event_field("status", "n/a"),
            ("status".into(), json!("n/a"))
        );
    }

    #[test]
    fn yaml_is_block_style_and_quotes_what_would_change_meaning() {
        let v = json!([
            {"id": "van-1", "online": true, "labels": {"fleet": "vans"}, "rtt_ms": null,
             "tags": ["a", "true"], "empty": [], "note": "a: b", "when": "2026-12-04T16:03:52Z"},
            "x"
        ]);
        let y = to_yaml(&v);
        assert_eq!(
            y,
            "- empty: []\n  id: van-1\n  labels:\n    fleet: vans\n  note: \"a: b\"\n  online: true\n  rtt_ms: null\n  tags:\n  - a\n  - \"true\"\n  when: \"2026-12-04T16:03:52Z\"\n- x\n"
        );
        assert_eq!(to_yaml(&json!([])), "[]\n");
        assert_eq!(to_yaml(&json!({"n": 5, "s": "5"})), "n: 5\ns: \"5\"\n");
    }
}
