//! Every `--format json` command of tsh and tctl, run against a real cluster, and each object
//! it prints checked against the JSON Schema of its resource in docs/schemas/ (one shape per
//! resource, docs/cli.md "JSON output"). `--format yaml` is checked to carry the same data.
//!
//! The checker implements the part of JSON Schema those files use: `type` (one or a list),
//! `properties`, `required`, `additionalProperties` (`false` or a schema), a property schema
//! of `false` (the key must not appear), `items`, `enum`, `minimum`, and `format: date-time`
//! (RFC 3339 in UTC, as Edgeport prints times).

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use edgeport_e2e::ssh::{Cluster, Tmux, Tsh};
use edgeport_e2e::{bin, wait_until};
use serde_json::Value;

const PW: &str = "correct horse battery staple";

fn schema(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/schemas")
        .join(format!("{name}.schema.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `2026-12-04T16:03:52Z`.
fn is_rfc3339_utc(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 20
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

/// The problems of `v` against `schema`, each as `path: what`.
fn check(v: &Value, schema: &Value, path: &str, problems: &mut Vec<String>) {
    if schema == &Value::Bool(false) {
        problems.push(format!("{path}: must not appear"));
        return;
    }
    if let Some(t) = schema.get("type") {
        let allowed: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => panic!("bad type in schema at {path}"),
        };
        let actual = type_name(v);
        let ok = allowed.contains(&actual) || (actual == "integer" && allowed.contains(&"number"));
        if !ok {
            problems.push(format!("{path}: {actual} {v}, expected {allowed:?}"));
            return;
        }
    }
    if let Some(Value::Array(options)) = schema.get("enum") {
        if !options.contains(v) {
            problems.push(format!("{path}: {v} is not one of {options:?}"));
        }
    }
    if let (Some(min), Some(n)) = (schema.get("minimum").and_then(Value::as_f64), v.as_f64()) {
        if n < min {
            problems.push(format!("{path}: {n} is below {min}"));
        }
    }
    if schema.get("format").and_then(Value::as_str) == Some("date-time") {
        if let Some(s) = v.as_str() {
            if !is_rfc3339_utc(s) {
                problems.push(format!("{path}: {s:?} is not an RFC 3339 UTC time"));
            }
        }
    }
    if let (Some(items), Value::Array(a)) = (schema.get("items"), v) {
        for (i, item) in a.iter().enumerate() {
            check(item, items, &format!("{path}[{i}]"), problems);
        }
    }
    if let Value::Object(o) = v {
        let props = schema.get("properties").and_then(Value::as_object);
        if let Some(Value::Array(req)) = schema.get("required") {
            for k in req.iter().filter_map(Value::as_str) {
                if !o.contains_key(k) {
                    problems.push(format!("{path}: missing {k}"));
                }
            }
        }
        for (k, val) in o {
            let sub = format!("{path}.{k}");
            match props.and_then(|p| p.get(k)) {
                Some(s) => check(val, s, &sub, problems),
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => problems.push(format!("{sub}: not in the schema")),
                    Some(s @ Value::Object(_)) => check(val, s, &sub, problems),
                    _ => {}
                },
            }
        }
    }
}

/// Checks one printed document: a list of `resource` (at least `min` of them) or one.
fn validate(what: &str, out: &str, resource: &str, min: usize) -> Value {
    let v: Value =
        serde_json::from_str(out).unwrap_or_else(|e| panic!("{what}: not JSON ({e}):\n{out}"));
    let schema = schema(resource);
    let items: Vec<&Value> = match &v {
        Value::Array(a) => a.iter().collect(),
        one => vec![one],
    };
    assert!(
        items.len() >= min,
        "{what}: expected at least {min} {resource}, got:\n{out}"
    );
    let mut problems = Vec::new();
    for (i, item) in items.iter().enumerate() {
        check(item, &schema, &format!("{what}[{i}]"), &mut problems);
    }
    assert!(
        problems.is_empty(),
        "{what} does not match docs/schemas/{resource}.schema.json:\n  {}\n{out}",
        problems.join("\n  ")
    );
    v
}

/// The YAML of the same command has every string of the JSON, in order (a cheap check that
/// `--format yaml` exists and carries the data; the emitter's exact shape has unit tests).
fn same_data_in_yaml(what: &str, json: &Value, yaml: &str) {
    fn scalars(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Array(a) => a.iter().for_each(|x| scalars(x, out)),
            Value::Object(o) => o.values().for_each(|x| scalars(x, out)),
            // Times and numbers (last seen, round-trip times) may move between the two runs.
            Value::String(s) if !is_rfc3339_utc(s) => out.push(s.clone()),
            _ => {}
        }
    }
    let mut all = Vec::new();
    scalars(json, &mut all);
    let mut rest = yaml;
    for s in all.iter().filter(|s| s.len() > 2) {
        let plain = rest.find(s.as_str());
        let quoted = rest.find(&Value::String(s.clone()).to_string());
        match plain.or(quoted) {
            Some(at) => rest = &rest[at..],
            None => panic!("{what}: --format yaml lacks {s:?}:\n{yaml}"),
        }
    }
}

#[test]
fn every_json_output_matches_its_schema() {
    let c = Cluster::start("json-schema", &[("dev1", "fleet=vans")]);
    c.add_user("alice", "root", PW);
    let tctl = |args: &[&str]| c.tctl.ok(args).stdout();
    tctl(&[
        "roles",
        "add",
        "field",
        "--allow",
        "fleet=vans",
        "--max-session-ttl",
        "8h",
    ]);
    tctl(&[
        "sso",
        "map",
        "devs",
        "--logins",
        "root",
        "--kube-groups",
        "viewers",
    ]);
    tctl(&[
        "lock",
        "--user",
        "mallory",
        "--message",
        "on leave",
        "--ttl",
        "1h",
    ]);
    let secret = c.dir.join("client-secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    tctl(&[
        "sso",
        "connectors",
        "add",
        "github",
        "--client-id",
        "edgeport-ci",
        "--client-secret-file",
        secret.to_str().unwrap(),
        "--web-origin",
        "https://gw.example:3443",
    ]);
    let token = tctl(&[
        "tokens",
        "add",
        "--type",
        "device",
        "--labels",
        "fleet=vans",
        "--format",
        "json",
    ]);
    let token = validate("tctl tokens add", &token, "token", 1);
    assert!(
        token["token"].is_string(),
        "the secret is in the answer to add"
    );

    // A recorded interactive session and an exec, so the audit log and the recordings
    // have real entries.
    let tsh = Tsh::new(c.dir.join("tsh-alice"), c.proxy());
    tsh.login("alice", PW, &c.gw.ca_pin, &[])
        .expect_ok("tsh login");
    let r = tsh.run(&["ssh", "root@dev1", "echo hi; exit 3"], None);
    assert_eq!(r.code(), Some(3), "{}", r.stderr());
    let tmux = Tmux::start(
        "json-schema",
        100,
        30,
        &format!(
            "env TSH_HOME='{}' '{}' ssh root@dev1; echo TSH-EXIT=$?; sleep 60",
            tsh.home.display(),
            bin("tsh").display()
        ),
    );
    tmux.send(&["echo marker-42", "Enter"]);
    assert!(tmux.wait_for("marker-42\n", Duration::from_secs(30)).0);
    tmux.send(&["exit", "Enter"]);
    assert!(tmux.wait_for("TSH-EXIT=0", Duration::from_secs(30)).0);
    drop(tmux);
    let recorded = wait_until(Duration::from_secs(30), || {
        tsh.run(&["recordings", "ls", "--format", "json"], None)
            .json()
            .as_array()
            .is_some_and(|a| !a.is_empty())
    });
    assert!(recorded, "the interactive session was not recorded");
    let ended = wait_until(Duration::from_secs(30), || {
        let j = c.tctl.run(&[
            "audit",
            "search",
            "--type",
            "session.end",
            "--format",
            "json",
        ]);
        j.json().as_array().is_some_and(|a| a.len() >= 2)
    });
    assert!(ended, "no session.end events");

    let tctl_lists: &[(&[&str], &str, usize)] = &[
        (&["status"], "tctl_status", 1),
        (&["version"], "version", 1),
        (&["users", "ls"], "user", 1),
        (&["roles", "ls"], "role", 2),
        (&["tokens", "ls"], "token", 1),
        (&["devices", "ls"], "device", 1),
        (&["devices", "usage"], "usage", 0),
        (&["nodes", "ls"], "device", 1),
        // Teleport's `tctl get KIND`: the same records (YAML unless --format says).
        (&["get", "users"], "user", 1),
        (&["get", "roles"], "role", 2),
        (&["get", "nodes"], "device", 1),
        (&["get", "locks"], "lock", 1),
        (&["gateways", "ls"], "gateway", 1),
        (&["locks", "ls"], "lock", 1),
        (&["sso", "ls"], "sso_mapping", 1),
        (&["sso", "connectors", "ls"], "sso_connector", 1),
        (&["audit", "search"], "event", 6),
        (&["audit", "verify"], "chain_report", 1),
        (&["devices", "update", "--status"], "agent_rollout", 0),
    ];
    for (args, resource, min) in tctl_lists {
        let what = format!("tctl {}", args.join(" "));
        let mut json_args = args.to_vec();
        json_args.extend(["--format", "json"]);
        let json = validate(&what, &tctl(&json_args), resource, *min);
        if *resource != "version" {
            let mut yaml_args = args.to_vec();
            yaml_args.extend(["--format", "yaml"]);
            same_data_in_yaml(&what, &json, &tctl(&yaml_args));
        }
    }

    let tsh_lists: &[(&[&str], &str, usize)] = &[
        (&["status"], "tsh_status", 1),
        (&["version"], "version", 1),
        (&["ls"], "device", 1),
        (&["recordings", "ls"], "recording", 1),
        (&["kube", "ls"], "kube_cluster", 0),
    ];
    for (args, resource, min) in tsh_lists {
        let what = format!("tsh {}", args.join(" "));
        let mut json_args = args.to_vec();
        json_args.extend(["--format", "json"]);
        let out = tsh.run(&json_args, None).expect_ok(&what).stdout();
        let json = validate(&what, &out, resource, *min);
        if *resource != "version" {
            let mut yaml_args = args.to_vec();
            yaml_args.extend(["--format", "yaml"]);
            let yaml = tsh.run(&yaml_args, None).expect_ok(&what).stdout();
            same_data_in_yaml(&what, &json, &yaml);
        }
    }

    // Access requests: tsh's answer to create, its list and tctl's, pending and approved.
    tctl(&["roles", "add", "prod", "--allow", "env=prod"]);
    tctl(&["roles", "update", "field", "--request-roles", "prod"]);
    tctl(&["users", "update", "alice", "--set-roles", "field"]);
    let made = tsh
        .run(
            &[
                "request",
                "create",
                "--roles",
                "prod",
                "--reason",
                "schema check",
                "--format",
                "json",
            ],
            None,
        )
        .expect_ok("tsh request create");
    let made = validate("tsh request create", &made.stdout(), "access_request", 1);
    let id = made[0]["id"].as_str().unwrap().to_string();
    let mine = tsh
        .run(&["request", "ls", "--format", "json"], None)
        .expect_ok("tsh request ls");
    validate("tsh request ls", &mine.stdout(), "access_request", 1);
    tctl(&["requests", "approve", &id, "--ttl", "10m"]);
    let json = validate(
        "tctl requests ls",
        &tctl(&["requests", "ls", "--format", "json"]),
        "access_request",
        1,
    );
    assert_eq!(json[0]["state"], "approved", "{json}");
    same_data_in_yaml(
        "tctl requests ls",
        &json,
        &tctl(&["requests", "ls", "--format", "yaml"]),
    );

    // The same device is the same object from both tools.
    let from_tsh = tsh.run(&["ls", "--format", "json"], None).json();
    let from_tctl = c.tctl.ok(&["devices", "ls", "--format", "json"]).json();
    for key in ["id", "labels", "online", "transport", "arch", "joined_at"] {
        assert_eq!(from_tsh[0][key], from_tctl[0][key], "{key}");
    }
    assert_eq!(from_tsh[0]["transport"], "quic");

    // The typed audit fields: booleans, numbers, seconds.
    let events = c
        .tctl
        .ok(&[
            "audit",
            "search",
            "--type",
            "session.end",
            "--format",
            "json",
        ])
        .json();
    let exec_end = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["exit_code"] == 3)
        .unwrap_or_else(|| panic!("no session.end with exit code 3: {events:#}"));
    assert!(exec_end["bytes_out"].is_u64(), "{exec_end}");
    assert!(exec_end["duration_secs"].is_number(), "{exec_end}");
}

#[test]
fn the_checker_finds_what_is_wrong() {
    let device = schema("device");
    let good = serde_json::json!({
        "id": "van-1", "labels": {"fleet": "vans"}, "online": true, "transport": "quic",
        "address": "10.0.0.1:5000", "version": "0.1.0", "arch": "aarch64", "rtt_ms": 12,
        "last_seen": "2026-12-04T16:03:52Z", "last_disconnect_reason": null,
        "last_disconnect_kind": null, "gateway": "gw-1",
        "joined_at": "2026-12-04T16:00:00Z", "kube_cluster": null, "loss_permille": 4,
        "address_changes_24h": 0, "binary_sha256": null,
        "targets": [{
            "name": "ecu1", "address": "van-1/ecu1", "addr": "192.168.7.10:22",
            "labels": {"fleet": "vans"}, "status": "reachable", "mode": "record",
            "checked": "2026-12-04T16:03:52Z", "hostkey": null
        }]
    });
    let mut problems = Vec::new();
    check(&good, &device, "d", &mut problems);
    assert!(problems.is_empty(), "{problems:?}");

    let mut bad = good.clone();
    bad["transport"] = "Quic".into();
    bad["last_seen"] = 1796400232.into();
    bad["online"] = "true".into();
    bad["extra"] = 1.into();
    bad["targets"][0]["mode"] = "proxy".into();
    bad.as_object_mut().unwrap().remove("id");
    let mut problems = Vec::new();
    check(&bad, &device, "d", &mut problems);
    let text = problems.join("\n");
    for expect in [
        "d.transport",
        "d.last_seen",
        "d.online",
        "d.extra",
        "d.targets[0].mode",
        "missing id",
    ] {
        assert!(text.contains(expect), "{expect} not found in:\n{text}");
    }
    assert!(!is_rfc3339_utc("2026-12-04 16:03:52"));
}
