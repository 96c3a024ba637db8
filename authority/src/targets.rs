//! Hosts behind devices (issue 22): the latest `targets` report of each device, taken from the
//! device's own signed, hash-chained audit log (never from a gateway's word), so that roles can
//! match a target's labels at the dial check and `tsh ls` / `tctl devices ls` can show them.
//!
//! The agent's report (edge-agent/src/targets.rs) has, for each target NAME, the fields
//! `t.NAME` = `HOST:PORT [key=value ...]`, `up.NAME` = `yes|no|unknown` and `checked.NAME` =
//! the last check in Unix milliseconds; a target with a pinned host key also has `pin.NAME` =
//! `ssh-ed25519 AAAA...` and `hostkey.NAME` = `ok|mismatch|unknown`; a record-mode target has
//! `mode.NAME` = `record`.

use std::collections::BTreeMap;

use edgeport_proto::audit::AuditEvent;
use edgeport_proto::rpc::{DeviceInfo, RpcError};
use edgeport_proto::targets::{labels_of, TargetInfo};
use serde::{Deserialize, Serialize};

use crate::store::{self, Store, Table};

/// The audit event type of a device's target report.
pub const REPORT: &str = "targets";

/// One target as its device reported it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reported {
    pub name: String,
    pub addr: String,
    /// The target's own labels (the device's are added when it is shown or matched).
    pub labels: BTreeMap<String, String>,
    pub reachable: Option<bool>,
    pub checked_ms: u64,
    /// The host key pinned on the device, if any.
    #[serde(default)]
    pub hostkey: Option<String>,
    /// The device's last check saw another host key than the pinned one.
    #[serde(default)]
    pub hostkey_mismatch: bool,
    /// `mode=record` on the device's targets line (`mode.NAME` = `record` in the report).
    #[serde(default)]
    pub record: bool,
}

/// The latest report of one device (`Table::Targets`, by device id).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// The audit sequence number of the event it came from (an older one never replaces it).
    pub seq: u64,
    pub time_ms: u64,
    pub targets: Vec<Reported>,
}

/// Parses a `targets` event; targets whose line does not parse are left out.
pub fn parse(ev: &AuditEvent) -> Report {
    let mut targets = Vec::new();
    for (key, line) in &ev.fields {
        let Some(name) = key.strip_prefix("t.") else {
            continue;
        };
        let mut words = line.split_whitespace();
        let Some(addr) = words.next() else {
            continue;
        };
        let labels = words
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let reachable = match ev.fields.get(&format!("up.{name}")).map(String::as_str) {
            Some("yes") => Some(true),
            Some("no") => Some(false),
            _ => None,
        };
        let checked_ms = ev
            .fields
            .get(&format!("checked.{name}"))
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let hostkey = ev.fields.get(&format!("pin.{name}")).cloned();
        let hostkey_mismatch = ev
            .fields
            .get(&format!("hostkey.{name}"))
            .map(String::as_str)
            == Some("mismatch");
        let record = ev.fields.get(&format!("mode.{name}")).map(String::as_str) == Some("record");
        targets.push(Reported {
            name: name.to_string(),
            addr: addr.to_string(),
            labels,
            reachable,
            checked_ms,
            hostkey,
            hostkey_mismatch,
            record,
        });
    }
    Report {
        seq: ev.seq,
        time_ms: ev.time_ms,
        targets,
    }
}

/// Records a device's audit event if it is a (newer) target report.
pub fn observe(st: &dyn Store, device_id: &str, ev: &AuditEvent) -> Result<(), RpcError> {
    if ev.kind != REPORT {
        return Ok(());
    }
    let report = parse(ev);
    store::update::<Report, RpcError, _>(st, Table::Targets, device_id, |old| {
        Ok(match old {
            Some(o) if o.seq > report.seq => Some(o),
            _ => Some(report.clone()),
        })
    })?;
    Ok(())
}

/// The latest report of `device_id` (none yet: empty).
pub fn report(st: &dyn Store, device_id: &str) -> Result<Report, RpcError> {
    Ok(store::get(st, Table::Targets, device_id)?.unwrap_or_default())
}

/// Target `name` of `device`, as shown and matched: the device's labels and the target's own
/// keys (see [`info`]).
pub fn find(
    st: &dyn Store,
    device: &DeviceInfo,
    name: &str,
) -> Result<Option<TargetInfo>, RpcError> {
    Ok(report(st, &device.id)?
        .targets
        .into_iter()
        .find(|t| t.name == name)
        .map(|t| info(device, t)))
}

/// Every target behind `devices`.
pub fn list(st: &dyn Store, devices: &[DeviceInfo]) -> Result<Vec<TargetInfo>, RpcError> {
    let mut out = Vec::new();
    for d in devices {
        out.extend(report(st, &d.id)?.targets.into_iter().map(|t| info(d, t)));
    }
    Ok(out)
}

/// A target as shown and matched, with [`labels_of`] its device's and its own.
fn info(device: &DeviceInfo, t: Reported) -> TargetInfo {
    let labels = labels_of(&device.labels, &t.labels);
    TargetInfo {
        device: device.id.clone(),
        name: t.name,
        addr: t.addr,
        labels,
        reachable: t.reachable,
        checked_ms: t.checked_ms,
        hostkey: t.hostkey,
        hostkey_mismatch: t.hostkey_mismatch,
        record: t.record,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_report() {
        let mut ev = AuditEvent::new(REPORT, 5);
        ev.seq = 7;
        for (k, v) in [
            ("count", "2"),
            ("t.ecu1", "10.0.0.1:22 zone=engine"),
            ("up.ecu1", "yes"),
            ("checked.ecu1", "1234"),
            ("t.cam", "10.0.0.2:22"),
            ("up.cam", "unknown"),
            ("pin.cam", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA"),
            ("hostkey.cam", "mismatch"),
            ("mode.cam", "record"),
        ] {
            ev.fields.insert(k.into(), v.into());
        }
        let r = parse(&ev);
        assert_eq!(r.seq, 7);
        let ecu = r.targets.iter().find(|t| t.name == "ecu1").unwrap();
        assert_eq!(ecu.addr, "10.0.0.1:22");
        assert_eq!(ecu.labels["zone"], "engine");
        assert_eq!((ecu.reachable, ecu.checked_ms), (Some(true), 1234));
        let cam = r.targets.iter().find(|t| t.name == "cam").unwrap();
        assert_eq!((cam.reachable, cam.checked_ms), (None, 0));
        assert!(cam.hostkey_mismatch && cam.hostkey.is_some());
        assert!(
            cam.record && !ecu.record,
            "mode.NAME=record marks a record-mode target"
        );
        assert!(!ecu.hostkey_mismatch && ecu.hostkey.is_none());
    }

    #[test]
    fn a_target_adds_labels_but_never_overrides_the_devices() {
        let device = DeviceInfo {
            id: "van".into(),
            labels: [("env", "prod"), ("fleet", "vans")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            online: true,
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
        };
        let mut ev = AuditEvent::new(REPORT, 5);
        ev.fields
            .insert("t.ecu1".into(), "10.0.0.1:22 env=dev zone=engine".into());
        let t = parse(&ev).targets.remove(0);
        let shown = info(&device, t);
        assert_eq!(shown.labels["env"], "prod", "the device's value stands");
        assert_eq!(
            shown.labels["zone"], "engine",
            "the target's own key is added"
        );
        assert_eq!(shown.labels["fleet"], "vans");
    }
}
