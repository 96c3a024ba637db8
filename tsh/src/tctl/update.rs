//! `tctl devices update`: uploads an agent binary to the authority (which signs a manifest
//! for it with the host CA), ships it to the matching online devices in waves (the canary
//! share first, when asked), waits until each device is back online on the new binary (its
//! reported hash) or rolled back, and prints one result per device (`--format json` too).

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use edgeport_net::rpc_client::{add_device_page, unexpected};
use edgeport_proto::rpc::{DeviceInfo, Request, Response};
use edgeport_proto::update::{UpdateInfo, UpdateSpec};
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

pub async fn run(s: &mut Session, a: UpdateArgs) -> anyhow::Result<()> {
    let bin = std::fs::read(&a.bundle).map_err(|e| anyhow!("{}: {e}", a.bundle.display()))?;
    let sha256 = edgeport_proto::keys::sha256_hex(&bin);
    let targets = matching(s, &a).await?;
    if targets.is_empty() {
        bail!(
            "no online device has the labels {}",
            edgeport_proto::util::format_labels(&a.labels)
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
    let waves = [&targets[..canaries], &targets[canaries..]];
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
        let info = ship(s, &a, &sha256, wave.to_vec(), canary, show).await?;
        let bad: Vec<String> = info
            .devices
            .iter()
            .filter(|d| d.state != "done")
            .map(|d| format!("{} {} ({})", d.device, d.state.replace('_', " "), d.detail))
            .collect();
        if canary && !bad.is_empty() {
            failed = Some(format!(
                "canary failed: {}; the other {} devices were not updated",
                bad.join(", "),
                targets.len() - canaries
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

/// The online devices with all the labels, sorted by id.
async fn matching(s: &mut Session, a: &UpdateArgs) -> anyhow::Result<Vec<String>> {
    let (mut devices, mut next): (Vec<DeviceInfo>, _) = (Vec::new(), Some(String::new()));
    while let Some(after) = next {
        next = add_device_page(&mut devices, s.call(Request::DevicePage { after }).await?)?;
    }
    let mut ids: Vec<String> = devices
        .into_iter()
        .filter(|d| d.online && a.labels.iter().all(|(k, v)| d.labels.get(k) == Some(v)))
        .map(|d| d.id)
        .collect();
    ids.sort();
    Ok(ids)
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

/// Starts one wave and waits until every device in it is settled.
async fn ship(
    s: &mut Session,
    a: &UpdateArgs,
    sha256: &str,
    devices: Vec<String>,
    canary: bool,
    show: bool,
) -> anyhow::Result<UpdateInfo> {
    let n = devices.len() as u64;
    let spec = UpdateSpec {
        sha256: sha256.to_string(),
        devices,
        labels: a.labels.clone(),
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
    loop {
        let settled = info
            .devices
            .iter()
            .filter(|d| matches!(d.state.as_str(), "done" | "refused" | "rolled_back"))
            .count();
        bar.set_position(settled as u64);
        if settled == info.devices.len() {
            break;
        }
        if Instant::now() > deadline {
            for d in info
                .devices
                .iter_mut()
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
