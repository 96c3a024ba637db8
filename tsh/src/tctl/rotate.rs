//! `tctl auth rotate`: rotates the user or host SSH CA in phases (see the authority's
//! `rotation.rs`), printing each phase as it is reached and how far it has spread
//! (gateways holding the new bundle, online devices renewed under the new host CA).

use std::time::Duration;

use anyhow::bail;
use edgeport_net::rpc_client::unexpected;
use edgeport_proto::rpc::{CaKind, CaRotateRequest, CaRotation, Request, Response, RotateAction};
use serde_json::{json, Value};

use super::cli::{Format, RotateArgs, RotatePhase, RotateType};
use super::connect::Session;
use super::output::{print_as, Table};

/// How often a phase's spread is polled.
const POLL: Duration = Duration::from_secs(1);

fn kind(t: RotateType) -> CaKind {
    match t {
        RotateType::User => CaKind::User,
        RotateType::Host => CaKind::Host,
        RotateType::X509 => CaKind::X509,
    }
}

async fn call(
    s: &mut Session,
    kind: CaKind,
    action: RotateAction,
) -> anyhow::Result<Vec<CaRotation>> {
    match s
        .call(Request::CaRotate(CaRotateRequest { kind, action }))
        .await?
    {
        Response::CaRotations(r) => Ok(r),
        other => Err(unexpected(other).into()),
    }
}

fn of(all: &[CaRotation], kind: CaKind) -> Option<&CaRotation> {
    all.iter().find(|r| r.kind == kind)
}

/// Whether a phase has reached everyone it can: every recently seen gateway holds the
/// bundle, and (host or x509 CA, once the new one signs) every online device renewed under
/// it.
fn spread(r: &CaRotation) -> bool {
    let gateways = r.gateways_current >= r.gateways_total;
    let devices = r.kind == CaKind::User
        || !matches!(
            r.phase.as_str(),
            "update_clients" | "update_servers" | "rollback"
        )
        || r.devices_renewed >= r.devices_online;
    gateways && devices
}

fn progress_text(r: &CaRotation) -> String {
    let mut t = format!(
        "gateways with the new bundle {}/{}",
        r.gateways_current, r.gateways_total
    );
    if r.kind != CaKind::User && r.phase != "init" {
        t.push_str(&format!(
            ", online devices renewed {}/{}",
            r.devices_renewed, r.devices_online
        ));
    }
    t
}

pub fn rotation_json(r: &CaRotation) -> Value {
    json!({
        "type": r.kind.as_str(),
        "phase": r.phase,
        "signing": r.signing,
        "trusted": r.trusted,
        "grace_secs": r.grace_secs,
        "drop_at": r.drop_at.map(crate::schema::time),
        "gateways_current": r.gateways_current,
        "gateways_total": r.gateways_total,
        "devices_renewed": r.devices_renewed,
        "devices_online": r.devices_online,
    })
}

/// Waits (up to `wait`) for the phase to spread; returns the last status.
async fn settle(s: &mut Session, k: CaKind, wait: u64, text: bool) -> anyhow::Result<CaRotation> {
    let deadline = std::time::Instant::now() + Duration::from_secs(wait);
    loop {
        let all = call(s, k, RotateAction::Status).await?;
        let Some(r) = of(&all, k).cloned() else {
            bail!("the authority does not report the {} CA", k.as_str());
        };
        if spread(&r) || std::time::Instant::now() >= deadline {
            if text {
                let note = if spread(&r) {
                    ""
                } else {
                    " (not everyone yet: going on after --wait)"
                };
                crate::outln!("  {}{note}", progress_text(&r));
            }
            return Ok(r);
        }
        tokio::time::sleep(POLL).await;
    }
}

pub async fn rotate(s: &mut Session, a: RotateArgs) -> anyhow::Result<()> {
    let text = a.format == Format::Text;
    if a.status {
        let all = call(s, CaKind::User, RotateAction::Status).await?;
        return print_status(&all, a.format);
    }
    let Some(t) = a.ca_type else {
        bail!("give --type user|host (or --status)");
    };
    let k = kind(t);
    let mut steps: Vec<(RotateAction, &str)> = Vec::new();
    if a.rollback {
        steps.push((RotateAction::Rollback, "rollback"));
    } else if a.complete || a.phase == Some(RotatePhase::Standby) {
        steps.push((RotateAction::Complete, "standby"));
    } else {
        match a.phase {
            Some(RotatePhase::Init) => steps.push((
                RotateAction::Start {
                    grace_secs: a.grace,
                },
                "init",
            )),
            Some(RotatePhase::UpdateClients) => {
                steps.push((RotateAction::Advance, "update_clients"))
            }
            Some(RotatePhase::UpdateServers) => {
                steps.push((RotateAction::Advance, "update_servers"))
            }
            _ => {
                steps.push((
                    RotateAction::Start {
                        grace_secs: a.grace,
                    },
                    "init",
                ));
                steps.push((RotateAction::Advance, "update_clients"));
                steps.push((RotateAction::Advance, "update_servers"));
            }
        }
    }
    let mut phases = Vec::new();
    for (action, name) in steps {
        let all = call(s, k, action).await?;
        let Some(r) = of(&all, k) else {
            bail!("the authority does not report the {} CA", k.as_str());
        };
        if r.phase != name {
            bail!("the {} CA is in phase {}, not {name}", k.as_str(), r.phase);
        }
        if text {
            crate::outln!("{} CA: phase {name}: {}", k.as_str(), describe(r));
        }
        let settled = if matches!(name, "standby") {
            r.clone()
        } else {
            settle(s, k, a.wait, text).await?
        };
        phases.push(rotation_json(&settled));
    }
    match a.format {
        Format::Text => {
            let all = call(s, k, RotateAction::Status).await?;
            if let Some(r) = of(&all, k) {
                if let Some(at) = r.drop_at {
                    crate::outln!(
                        "the old {} CA stays trusted until {}, then it is dropped \
                         (tctl auth rotate --type {} --complete ends the grace period now)",
                        k.as_str(),
                        edgeport_proto::util::format_time(at),
                        k.as_str()
                    );
                }
            }
            Ok(())
        }
        f => print_as(f, &json!({"type": k.as_str(), "phases": phases})),
    }
}

fn describe(r: &CaRotation) -> String {
    let new = r.trusted.get(1).cloned().unwrap_or_default();
    match r.phase.as_str() {
        "init" => format!(
            "new CA {new} trusted beside the old one {}, which still signs",
            r.signing
        ),
        "update_clients" => format!(
            "the new CA {} signs; users get certificates from it at their next login, devices renew",
            r.signing
        ),
        "update_servers" => format!(
            "the new CA {} signs; the old one {new} is still trusted for the grace period",
            r.signing
        ),
        "rollback" => format!(
            "the old CA {} signs again; the new one {new} stays trusted for the grace period",
            r.signing
        ),
        _ => format!("only {} is trusted", r.signing),
    }
}

fn print_status(all: &[CaRotation], format: Format) -> anyhow::Result<()> {
    match format {
        Format::Text => {
            let mut t = Table::new(&["CA", "PHASE", "SIGNING", "TRUSTED", "SPREAD"]);
            for r in all {
                t.row(vec![
                    r.kind.as_str().into(),
                    r.phase.clone(),
                    r.signing.clone(),
                    r.trusted.len().to_string(),
                    if r.phase == "standby" {
                        "-".into()
                    } else {
                        progress_text(r)
                    },
                ]);
            }
            t.print();
            Ok(())
        }
        f => print_as(f, &Value::Array(all.iter().map(rotation_json).collect())),
    }
}
