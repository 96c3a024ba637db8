//! `tctl audit search | verify`: the audit log the authority keeps (device events, its own,
//! the gateways' dials) and the integrity of the devices' hash chains.

use edgeport_net::clock::now_secs;
use edgeport_net::rpc_client::unexpected;
use edgeport_proto::audit::{AuditQuery, ChainReport, StoredEvent};
use edgeport_proto::rpc::{Request, Response};
use serde_json::json;

use super::cli::{AuditSearchArgs, AuditVerifyArgs, Format};
use super::connect::Session;
use super::output::{print_as, time_json, Table};

/// One event as JSON: the common keys first-class, the event's own fields too.
pub fn event_json(e: &StoredEvent) -> serde_json::Value {
    let ev = &e.event;
    let mut m = serde_json::Map::new();
    for (k, v) in &ev.fields {
        if k != "data" {
            let (k, v) = crate::schema::event_field(k, v);
            m.insert(k, v);
        }
    }
    m.insert("type".into(), json!(ev.kind));
    m.insert("time".into(), time_json(ev.time_ms / 1000));
    // Events of one second stay in order by this (the one millisecond figure kept).
    m.insert("time_ms".into(), json!(ev.time_ms));
    m.insert("source".into(), json!(e.source));
    m.insert("device".into(), json!(e.device));
    m.insert("user".into(), json!(ev.user));
    m.insert("login".into(), json!(ev.login));
    m.insert("session_id".into(), json!(ev.session_id));
    m.insert("seq".into(), json!(ev.seq));
    if !e.gateway.is_empty() {
        m.insert("gateway".into(), json!(e.gateway));
    }
    serde_json::Value::Object(m)
}

fn details(e: &StoredEvent) -> String {
    e.event
        .fields
        .iter()
        .filter(|(k, _)| k.as_str() != "data" && k.as_str() != "device")
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

pub async fn search(s: &mut Session, a: AuditSearchArgs) -> anyhow::Result<()> {
    let since_ms = match a.since {
        Some(secs) => now_secs().saturating_sub(secs) * 1000,
        None => 0,
    };
    let mut q = AuditQuery {
        since_ms,
        kind: a.kind,
        device: a.device,
        user: a.user,
        session_id: a.session,
        offset: 0,
    };
    let mut all = Vec::new();
    loop {
        let page = match s.call(Request::AuditSearch(q.clone())).await? {
            Response::AuditPage(p) => p,
            other => return Err(unexpected(other).into()),
        };
        all.extend(page.events);
        match page.next {
            Some(n) if n > q.offset => q.offset = n,
            _ => break,
        }
    }
    match a.format {
        Format::Json | Format::Yaml => print_as(
            a.format,
            &serde_json::Value::Array(all.iter().map(event_json).collect()),
        ),
        Format::Text => {
            let mut t = Table::new(&[
                "TIME", "TYPE", "DEVICE", "USER", "LOGIN", "SESSION", "DETAILS",
            ]);
            for e in &all {
                let time = time_json(e.event.time_ms / 1000);
                t.row(vec![
                    time.as_str().unwrap_or("-").to_string(),
                    e.event.kind.clone(),
                    dash(&e.device),
                    dash(&e.event.user),
                    dash(&e.event.login),
                    dash(&e.event.session_id),
                    details(e),
                ]);
            }
            t.print();
            Ok(())
        }
    }
}

fn report_json(r: &ChainReport) -> serde_json::Value {
    json!({
        "device": r.device,
        "events": r.events,
        "first_seq": r.first_seq,
        "last_seq": r.last_seq,
        "ok": r.problems.is_empty() && r.alerts.is_empty(),
        "problems": r.problems,
        "alerts": r.alerts.iter().map(|a| json!({
            "type": a.kind,
            "seq": a.seq,
            "time": time_json(a.time_ms / 1000),
            "detail": a.detail,
        })).collect::<Vec<_>>(),
    })
}

pub async fn verify(s: &mut Session, a: AuditVerifyArgs) -> anyhow::Result<()> {
    let reports = match s.call(Request::AuditVerify { device: a.device }).await? {
        Response::AuditReport(r) => r,
        other => return Err(unexpected(other).into()),
    };
    let bad = reports
        .iter()
        .filter(|r| !r.problems.is_empty() || !r.alerts.is_empty())
        .count();
    match a.format {
        Format::Json | Format::Yaml => print_as(
            a.format,
            &serde_json::Value::Array(reports.iter().map(report_json).collect()),
        )?,
        Format::Text => {
            for r in &reports {
                let ok = r.problems.is_empty() && r.alerts.is_empty();
                crate::outln!(
                    "{}: {}, seq {}..{}: {}",
                    r.device,
                    crate::text::count(r.events as usize, "event"),
                    r.first_seq,
                    r.last_seq,
                    if ok { "chain OK" } else { "INTEGRITY PROBLEMS" }
                );
                for p in &r.problems {
                    crate::outln!("  chain: {p}");
                }
                for al in &r.alerts {
                    let time = time_json(al.time_ms / 1000);
                    crate::outln!(
                        "  alert {} at {} (seq {}): {}",
                        al.kind,
                        time.as_str().unwrap_or("-"),
                        al.seq,
                        al.detail
                    );
                }
            }
            if reports.is_empty() {
                crate::outln!("no device has sent audit events yet");
            }
        }
    }
    if bad > 0 {
        anyhow::bail!(
            "integrity problems on {}",
            crate::text::count(bad, "device")
        );
    }
    Ok(())
}
