//! `tsh ssh fleet=vans uptime`: one command on every online device whose labels match, a few
//! at a time, with a progress bar on a terminal and a summary at the end. Each device's output
//! is printed as a block prefixed with its id once its command ends, so lines of different
//! devices never interleave.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use edgeport_proto::rpc::DeviceInfo;
use futures::stream::{self, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use russh::ChannelMsg;

use super::cli::Transport;
use super::profile::Creds;
use super::{gateway, ssh, CliError};

/// Devices worked on at once.
pub const DEFAULT_PARALLEL: usize = 16;

/// A target is a selector when it names labels (`k=v[,k2=v2]`) rather than a device id.
pub fn is_selector(target: &str) -> bool {
    target.contains('=')
}

/// What one device did.
struct Outcome {
    device: String,
    /// Exit status, or why the command never ran.
    result: Result<i32, String>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// The online devices among `devices` whose labels include all of `want`, sorted by id.
pub fn matching(devices: Vec<DeviceInfo>, want: &BTreeMap<String, String>) -> Vec<String> {
    let mut ids: Vec<String> = devices
        .into_iter()
        .filter(|d| d.online && want.iter().all(|(k, v)| d.labels.get(k) == Some(v)))
        .map(|d| d.id)
        .collect();
    ids.sort();
    ids
}

/// Runs `command` as `login` on every online device matching `selector`. Returns 0 when every
/// device ran it with status 0, 1 otherwise.
pub async fn run(
    creds: &Creds,
    transport: Transport,
    login: &str,
    selector: &str,
    command: &str,
    parallel: usize,
) -> Result<i32, CliError> {
    let want =
        edgeport_proto::util::parse_labels(selector).map_err(|e| CliError::msg(e.to_string()))?;
    if command.trim().is_empty() {
        return Err(CliError::msg(
            "a label selector needs a command: tsh ssh fleet=vans uptime",
        ));
    }
    let devices = gateway::list_devices(creds, transport).await?;
    let ids = matching(devices, &want);
    if ids.is_empty() {
        return Err(CliError::msg(format!(
            "no online device matches {selector} (see tsh ls {selector})"
        )));
    }
    let bar = ProgressBar::new(ids.len() as u64);
    if let Ok(style) = ProgressStyle::with_template("{bar:30} {pos}/{len} devices {msg}") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    let creds = Arc::new(creds.clone());
    let mut outcomes = Vec::with_capacity(ids.len());
    let mut runs = stream::iter(ids.into_iter().map(|device| {
        let creds = creds.clone();
        async move { run_one(&creds, transport, login, device, command).await }
    }))
    .buffer_unordered(parallel.max(1));
    while let Some(o) = runs.next().await {
        bar.suspend(|| print_outcome(&o));
        bar.inc(1);
        bar.set_message(o.device.clone());
        outcomes.push(o);
    }
    bar.finish_and_clear();
    Ok(summarize(&outcomes))
}

async fn run_one(
    creds: &Creds,
    transport: Transport,
    login: &str,
    device: String,
    command: &str,
) -> Outcome {
    let mut o = Outcome {
        device: device.clone(),
        result: Ok(255),
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    o.result = async {
        let (stream, _) = gateway::dial_ssh(creds, transport, &device).await?;
        let conn = ssh::connect(stream, creds, &device, login, false, Default::default()).await?;
        let mut channel = conn
            .handle
            .channel_open_session()
            .await
            .map_err(|e| CliError::msg(format!("cannot open a session on {device}: {e}")))?;
        channel
            .exec(true, command.as_bytes())
            .await
            .map_err(|e| CliError::msg(format!("exec on {device}: {e}")))?;
        let _ = channel.eof().await;
        let mut status = None;
        while let Some(msg) = channel.wait().await {
            match msg {
                ChannelMsg::Data { data } => o.stdout.extend_from_slice(&data),
                ChannelMsg::ExtendedData { data, .. } => o.stderr.extend_from_slice(&data),
                ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status as i32),
                ChannelMsg::ExitSignal { signal_name, .. } => {
                    o.stderr.extend_from_slice(
                        format!("killed by signal {signal_name:?}\n").as_bytes(),
                    );
                    status = Some(255);
                }
                ChannelMsg::Failure => {
                    return Err(CliError::msg(format!(
                        "{device} refused to run the command"
                    )))
                }
                _ => {}
            }
        }
        Ok(status.unwrap_or(255))
    }
    .await
    .map_err(|e: CliError| e.to_string());
    o
}

fn print_outcome(o: &Outcome) {
    let mut out = std::io::stdout().lock();
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let _ = writeln!(out, "[{}] {line}", o.device);
    }
    let _ = out.flush();
    let mut err = std::io::stderr().lock();
    for line in String::from_utf8_lossy(&o.stderr).lines() {
        let _ = writeln!(err, "[{}] {line}", o.device);
    }
    if let Err(why) = &o.result {
        let _ = writeln!(err, "[{}] tsh: {why}", o.device);
    }
}

/// Prints the summary line(s) to stderr and returns the exit code.
fn summarize(outcomes: &[Outcome]) -> i32 {
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|o| match &o.result {
            Ok(0) => None,
            Ok(code) => Some(format!("{} (exit {code})", o.device)),
            Err(_) => Some(format!("{} (not run)", o.device)),
        })
        .collect();
    let ok = outcomes.len() - failed.len();
    if failed.is_empty() {
        eprintln!(
            "tsh: {}: all {ok} succeeded",
            crate::text::count(outcomes.len(), "device")
        );
        0
    } else {
        eprintln!(
            "tsh: {}: {ok} succeeded, {} failed: {}",
            crate::text::count(outcomes.len(), "device"),
            failed.len(),
            failed.join(", ")
        );
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(id: &str, online: bool, labels: &str) -> DeviceInfo {
        DeviceInfo {
            id: id.into(),
            labels: edgeport_proto::util::parse_labels(labels).unwrap(),
            online,
            transport: None,
            address: String::new(),
            version: String::new(),
            arch: String::new(),
            rtt_ms: None,
            last_seen: 0,
            last_disconnect_reason: None,
            gateway: None,
            joined_at: 0,
            kube_cluster: None,
            loss_permille: None,
            address_changes_24h: 0,
        }
    }

    #[test]
    fn selectors_pick_online_devices_with_every_label() {
        assert!(is_selector("fleet=vans") && !is_selector("van-1"));
        let want = edgeport_proto::util::parse_labels("fleet=vans,region=eu").unwrap();
        let got = matching(
            vec![
                dev("b", true, "fleet=vans,region=eu"),
                dev("a", true, "fleet=vans,region=eu,x=y"),
                dev("c", false, "fleet=vans,region=eu"),
                dev("d", true, "fleet=vans,region=us"),
            ],
            &want,
        );
        assert_eq!(got, ["a", "b"]);
    }

    #[test]
    fn summary_exit_code() {
        let o = |d: &str, r: Result<i32, String>| Outcome {
            device: d.into(),
            result: r,
            stdout: vec![],
            stderr: vec![],
        };
        assert_eq!(summarize(&[o("a", Ok(0)), o("b", Ok(0))]), 0);
        assert_eq!(summarize(&[o("a", Ok(0)), o("b", Ok(3))]), 1);
        assert_eq!(summarize(&[o("a", Err("x".into()))]), 1);
    }
}
