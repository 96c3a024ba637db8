//! `tctl devices ls | rm | usage`: the inventory as the authority knows it from joins and from the
//! gateways' presence reports.

use edgeport_net::rpc_client::{add_device_page, unexpected};
use edgeport_proto::rpc::{Request, Response};
use edgeport_proto::util::format_labels;

use super::cli::{DeviceSetArgs, Format, FormatArgs, UsageArgs};
use super::connect::Session;
use super::output::{ago_text, json_list, print_as, Table};

pub async fn list(s: &mut Session, a: FormatArgs) -> anyhow::Result<()> {
    let (mut devices, mut next) = (Vec::new(), Some(String::new()));
    while let Some(after) = next {
        next = add_device_page(&mut devices, s.call(Request::DevicePage { after }).await?)?;
    }
    // Hosts behind the devices, as each device last reported them (an authority older than
    // targets has none to list).
    let targets = match s
        .call(Request::TargetList {
            user_cert_der: None,
        })
        .await
    {
        Ok(Response::Targets(t)) => t,
        _ => Vec::new(),
    };
    match a.format {
        Format::Json | Format::Yaml => print_as(
            a.format,
            &json_list(&devices, |d| crate::schema::device(d, &targets)),
        ),
        Format::Text => {
            let mut t = Table::new(&[
                "ID",
                "STATUS",
                "TRANSPORT",
                "ADDRESS",
                "VERSION",
                "BINARY",
                "ARCH",
                "RTT",
                "LOSS",
                "ADDR CHANGES 24H",
                "LAST SEEN",
                "LABELS",
                "KUBE CLUSTER",
                "LAST DISCONNECT",
            ]);
            for d in &devices {
                let labels = format_labels(&d.labels);
                t.row(vec![
                    d.id.clone(),
                    if d.online { "online" } else { "offline" }.into(),
                    d.transport.map(|t| t.as_str()).unwrap_or("-").into(),
                    dash(&d.address),
                    dash(edgeport_proto::update::split_version(&d.version).0),
                    dash(
                        edgeport_proto::update::split_version(&d.version)
                            .1
                            .unwrap_or(""),
                    ),
                    dash(&d.arch),
                    d.rtt_ms.map(|r| format!("{r}ms")).unwrap_or("-".into()),
                    d.loss_permille
                        .map(|l| format!("{}.{}%", l / 10, l % 10))
                        .unwrap_or("-".into()),
                    d.address_changes_24h.to_string(),
                    ago_text(d.last_seen),
                    dash(&labels),
                    dash(d.kube_cluster.as_deref().unwrap_or("")),
                    d.last_disconnect_kind()
                        .map(|k| match k {
                            "other" => d.last_disconnect_reason.clone().unwrap_or_default(),
                            k => k.to_string(),
                        })
                        .unwrap_or("-".into()),
                ]);
            }
            for tg in &targets {
                // One cell per column of the devices' header: a target has no tunnel of
                // its own, so transport says how it is reached and LAST SEEN its last check.
                t.row(vec![
                    tg.address(),
                    tg.status().into(),
                    tg.mode().into(),
                    tg.addr.clone(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    if tg.checked_ms == 0 {
                        "-".into()
                    } else {
                        format!("checked {}", ago_text(tg.checked_ms / 1000))
                    },
                    dash(&format_labels(&tg.labels)),
                    "-".into(),
                    "-".into(),
                ]);
            }
            t.print();
            Ok(())
        }
    }
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

pub async fn remove(s: &mut Session, id: String) -> anyhow::Result<()> {
    match s.call(Request::DeviceRemove { id: id.clone() }).await? {
        Response::Ok => {
            crate::outln!("device {id} removed; it must join again with a new token");
            Ok(())
        }
        other => Err(unexpected(other).into()),
    }
}

pub async fn usage(s: &mut Session, a: UsageArgs) -> anyhow::Result<()> {
    let days = u32::try_from(a.since.div_ceil(86_400).max(1)).unwrap_or(u32::MAX);
    let req = Request::DeviceUsage {
        days,
        device: a.device.clone(),
    };
    let list = match s.call(req).await? {
        Response::DeviceUsage(list) => list,
        other => return Err(unexpected(other).into()),
    };
    match a.format {
        Format::Json | Format::Yaml => print_as(a.format, &json_list(&list, crate::schema::usage)),
        Format::Text => {
            if list.is_empty() {
                crate::outln!("no usage reported in the last {days} days");
                return Ok(());
            }
            let mut t = Table::new(&["DEVICE", "SERVICE", "UP", "DOWN", "TOTAL"]);
            for u in &list {
                for sv in &u.services {
                    t.row(vec![
                        u.device.clone(),
                        sv.service.clone(),
                        edgeport_proto::util::bytes_text(sv.up),
                        edgeport_proto::util::bytes_text(sv.down),
                        edgeport_proto::util::bytes_text(sv.up.saturating_add(sv.down)),
                    ]);
                }
            }
            t.print();
            Ok(())
        }
    }
}

pub async fn set(s: &mut Session, a: DeviceSetArgs) -> anyhow::Result<()> {
    let req = Request::DeviceSetBudget {
        id: a.id.clone(),
        data_budget: a.data_budget.0,
    };
    match s.call(req).await? {
        Response::Ok => {
            match a.data_budget.0 {
                Some(b) => crate::outln!(
                    "device {}: monthly data budget {} (bulk transfers are refused past it)",
                    a.id,
                    edgeport_proto::util::bytes_text(b)
                ),
                None => crate::outln!("device {}: no data budget", a.id),
            }
            Ok(())
        }
        other => Err(unexpected(other).into()),
    }
}
