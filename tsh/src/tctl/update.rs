//! `tctl devices update`: uploads an agent binary to the authority (which signs a manifest
//! for it with the host CA), ships it to the matching online devices in waves (the canary
//! share first, when asked), waits until each device is back online on the new binary (its
//! reported hash) or rolled back, and prints one result per device (`--format json` too).
//! Matching devices that are offline go into the last wave without being waited for: the
//! authority keeps the order and they get it when they come online (`pending` until then).
//! `--status [ID]` shows the updates the authority keeps.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use edgeport_net::rpc_client::{add_device_page, unexpected};
use edgeport_proto::rpc::{DeviceInfo, Request, Response};
use edgeport_proto::update::{UpdateInfo, UpdateSpec, UpdateSummary};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::cli::{Format, UpdateArgs};
use super::connect::Session;
use super::output::print_as;

/// A piece of the binary per upload request (a frame holds 64 KiB).
const PIECE: usize = 60_000;
/// How long after the rollback deadline a wave may still be unsettled.
const SETTLE: Duration = Duration::from_secs(90);

/// One device's outcome.
struct Outcome {
    device: String,
    canary: bool,
    state: String,
    detail: String,
}

/// What a device that was offline when its wave started says until it comes online.
const OFFLINE: &str = "offline: it gets the update when it comes online, until the deadline";

pub async fn run(s: &mut Session, a: UpdateArgs) -> anyhow::Result<()> {
    if let Some(id) = &a.status {
        return status(s, id, a.format).await;
    }
    let (Some(labels), Some(bundle)) = (&a.labels, &a.bundle) else {
        bail!("--labels and --bundle say which devices get which binary");
    };
    let bin = std::fs::read(bundle).map_err(|e| anyhow!("{}: {e}", bundle.display()))?;
    let sha256 = edgeport_proto::keys::sha256_hex(&bin);
    let (targets, offline) = matching(s, labels).await?;
    if targets.is_empty() && offline.is_empty() {
        bail!(
            "no device has the labels {}",
            edgeport_proto::util::format_labels(labels)
        );
    }
    let show = a.format == Format::Text && std::io::IsTerminal::is_terminal(&std::io::stderr());
    upload(s, &bin, &sha256, show).await?;
    let canaries = match a.canary {
        Some(p) if targets.len() > 1 => (targets.len() * p as usize)
            .div_ceil(100)
            .clamp(1, targets.len()),
        _ => targets.len(),
    };
    let mut results: Vec<Outcome> = Vec::new();
    // Offline devices go with the last wave (all at once without a canary share).
    let (first, rest) = targets.split_at(canaries);
    let rest: Vec<String> = rest.iter().chain(&offline).cloned().collect();
    let waves = if first.len() == targets.len() {
        [
            targets.iter().chain(&offline).cloned().collect(),
            Vec::new(),
        ]
    } else {
        [first.to_vec(), rest]
    };
    let mut failed = None;
    for (i, wave) in waves.iter().enumerate().filter(|(_, w)| !w.is_empty()) {
        let canary = i == 0 && canaries < targets.len();
        if failed.is_some() {
            results.extend(wave.iter().map(|d| Outcome {
                device: d.clone(),
                canary,
                state: "skipped".into(),
                detail: "not updated: the canary failed".into(),
            }));
            continue;
        }
        let info = ship(
            s,
            &a,
            labels,
            &sha256,
            wave.to_vec(),
            &offline,
            canary,
            show,
        )
        .await?;
        let bad: Vec<String> = info
            .devices
            .iter()
            .filter(|d| d.state != "done" && !(d.state == "pending" && d.detail == OFFLINE))
            .map(|d| format!("{} {} ({})", d.device, d.state.replace('_', " "), d.detail))
            .collect();
        if canary && !bad.is_empty() {
            failed = Some(format!(
                "canary failed: {}; the other {} devices were not updated",
                bad.join(", "),
                targets.len() + offline.len() - canaries
            ));
        } else if !bad.is_empty() {
            failed = Some(format!("update failed on {}", bad.join(", ")));
        }
        results.extend(info.devices.into_iter().map(|d| Outcome {
            device: d.device,
            canary,
            state: d.state,
            detail: d.detail,
        }));
    }
    print(&a, &sha256, &results)?;
    match failed {
        Some(why) => Err(anyhow!(why)),
        None => Ok(()),
    }
}

/// The devices with all the labels, online and offline, each sorted by id.
async fn matching(
    s: &mut Session,
    labels: &std::collections::BTreeMap<String, String>,
) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let (mut devices, mut next): (Vec<DeviceInfo>, _) = (Vec::new(), Some(String::new()));
    while let Some(after) = next {
        next = add_device_page(&mut devices, s.call(Request::DevicePage { after }).await?)?;
    }
    devices.retain(|d| labels.iter().all(|(k, v)| d.labels.get(k) == Some(v)));
    devices.sort_by(|a, b| a.id.cmp(&b.id));
    let (online, offline): (Vec<DeviceInfo>, Vec<DeviceInfo>) =
        devices.into_iter().partition(|d| d.online);
    Ok((
        online.into_iter().map(|d| d.id).collect(),
        offline.into_iter().map(|d| d.id).collect(),
    ))
}

/// `--status [ID]`: the kept updates (newest first) and their devices.
async fn status(s: &mut Session, id: &str, format: Format) -> anyhow::Result<()> {
    let mut list = match s.call(Request::UpdateList).await? {
        Response::UpdateList(l) => l,
        other => return Err(unexpected(other).into()),
    };
    if !id.is_empty() {
        list.retain(|u| u.info.id == id);
        if list.is_empty() {
            bail!("no update {id}");
        }
    }
    match format {
        Format::Json | Format::Yaml => print_as(
            format,
            &serde_json::Value::Array(list.iter().map(rollout_json).collect()),
        ),
        Format::Text => {
            for u in &list {
                crate::outln!(
                    "{}  sha256 {}  labels {}  issued {}  deadline {}",
                    u.info.id,
                    u.info.sha256.chars().take(16).collect::<String>(),
                    edgeport_proto::util::format_labels(&u.labels),
                    edgeport_proto::util::format_time(u.issued_at),
                    edgeport_proto::util::format_time(u.expires_at),
                );
                for d in &u.info.devices {
                    crate::outln!("  {}: {} {}", d.device, d.state.replace('_', " "), d.detail);
                }
            }
            Ok(())
        }
    }
}

/// One kept update as `--status --format json` prints it (docs/schemas/agent_rollout).
fn rollout_json(u: &UpdateSummary) -> serde_json::Value {
    json!({
        "id": u.info.id,
        "sha256": u.info.sha256,
        "size": u.info.size,
        "labels": u.labels,
        "rollback_after_secs": u.rollback_secs,
        "issued": crate::schema::time(u.issued_at),
        "deadline": crate::schema::time(u.expires_at),
        "devices": u.info.devices.iter().map(|d| json!({
            "device": d.device,
            "state": d.state,
            "detail": d.detail,
        })).collect::<Vec<_>>(),
    })
}

async fn upload(s: &mut Session, bin: &[u8], sha256: &str, show: bool) -> anyhow::Result<()> {
    let bar = if show {
        let b = ProgressBar::new(bin.len() as u64);
        if let Ok(style) =
            ProgressStyle::with_template("uploading {bytes:>10}/{total_bytes:<10} {bar:25}")
        {
            b.set_style(style);
        }
        b
    } else {
        ProgressBar::hidden()
    };
    let mut offset = 0usize;
    loop {
        let piece = &bin[offset..(offset + PIECE).min(bin.len())];
        let req = Request::UpdateUpload {
            sha256: sha256.to_string(),
            offset: offset as u64,
            data: piece.to_vec(),
        };
        match s.call(req).await? {
            Response::Ok => {}
            other => return Err(unexpected(other).into()),
        }
        offset += piece.len();
        bar.set_position(offset as u64);
        if offset >= bin.len() {
            break;
        }
    }
    bar.finish_and_clear();
    Ok(())
}

/// Starts one wave and waits until every device in it that is not `offline` is settled.
#[allow(clippy::too_many_arguments)]
async fn ship(
    s: &mut Session,
    a: &UpdateArgs,
    labels: &std::collections::BTreeMap<String, String>,
    sha256: &str,
    devices: Vec<String>,
    offline: &[String],
    canary: bool,
    show: bool,
) -> anyhow::Result<UpdateInfo> {
    let n = devices.iter().filter(|d| !offline.contains(d)).count() as u64;
    let spec = UpdateSpec {
        sha256: sha256.to_string(),
        devices,
        labels: labels.clone(),
        rollback_secs: a.rollback_after,
    };
    let mut info = match s.call(Request::UpdateStart(spec)).await? {
        Response::Update(i) => i,
        other => return Err(unexpected(other).into()),
    };
    let bar = if show {
        let b = ProgressBar::new(n);
        if let Ok(style) = ProgressStyle::with_template("{bar:30} {pos}/{len} devices {msg}") {
            b.set_style(style);
        }
        b.set_message(if canary { "(canary)" } else { "" });
        b.enable_steady_tick(Duration::from_millis(200));
        b
    } else {
        ProgressBar::hidden()
    };
    let deadline = Instant::now() + Duration::from_secs(a.rollback_after) + SETTLE;
    let waited = |d: &&mut edgeport_proto::update::DeviceUpdate| !offline.contains(&d.device);
    loop {
        let settled = info
            .devices
            .iter_mut()
            .filter(waited)
            .filter(|d| !matches!(d.state.as_str(), "pending" | "installed"))
            .count();
        bar.set_position(settled as u64);
        if settled as u64 == n {
            break;
        }
        if Instant::now() > deadline {
            for d in info
                .devices
                .iter_mut()
                .filter(waited)
                .filter(|d| d.state == "pending" || d.state == "installed")
            {
                d.detail = format!("not settled in time (last: {})", d.state);
                d.state = "timed_out".into();
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        info = match s
            .call(Request::UpdateStatus {
                id: info.id.clone(),
            })
            .await?
        {
            Response::Update(i) => i,
            other => return Err(unexpected(other).into()),
        };
    }
    bar.finish_and_clear();
    for d in info.devices.iter_mut() {
        if offline.contains(&d.device) && d.state == "pending" {
            d.detail = OFFLINE.into();
        }
    }
    Ok(info)
}

fn print(a: &UpdateArgs, sha256: &str, results: &[Outcome]) -> anyhow::Result<()> {
    match a.format {
        Format::Json | Format::Yaml => print_as(
            a.format,
            &serde_json::Value::Array(
                results
                    .iter()
                    .map(|r| {
                        json!({
                            "device": r.device,
                            "canary": r.canary,
                            "state": r.state,
                            "detail": r.detail,
                            "sha256": sha256,
                        })
                    })
                    .collect(),
            ),
        ),
        Format::Text => {
            for r in results {
                let canary = if r.canary { " (canary)" } else { "" };
                crate::outln!(
                    "{}{canary}: {} {}",
                    r.device,
                    r.state.replace('_', " "),
                    r.detail
                );
            }
            Ok(())
        }
    }
}
