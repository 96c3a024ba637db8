//! `tctl gateways ls | rm`: the gateways that joined, and revoking one.

use edgeport_net::rpc_client::unexpected;
use edgeport_proto::rpc::{GatewayInfo, Request, Response};
use serde_json::json;

use super::cli::{Format, FormatArgs};
use super::connect::Session;
use super::output::{ago_text, json_list, print_as, time_json, Table};

pub(super) fn standing(g: &GatewayInfo) -> &'static str {
    if g.revoked {
        "revoked"
    } else if g.locked {
        "locked"
    } else {
        "active"
    }
}

fn gateway_json(g: &GatewayInfo) -> serde_json::Value {
    json!({
        "id": g.id,
        "status": standing(g),
        "peer_addr": g.peer_addr,
        "dns_names": g.dns_names,
        "ip_addrs": g.ip_addrs,
        "version": g.version,
        "tunnels": g.tunnels,
        "joined_at": time_json(g.joined_at),
        "renewed_at": time_json(g.renewed_at),
        "last_report": time_json(g.last_report),
    })
}

pub async fn list(s: &mut Session, a: FormatArgs) -> anyhow::Result<()> {
    let gateways = match s.call(Request::GatewayList).await? {
        Response::Gateways(g) => g,
        other => return Err(unexpected(other).into()),
    };
    match a.format {
        Format::Json | Format::Yaml => print_as(a.format, &json_list(&gateways, gateway_json)),
        Format::Text => {
            let mut t = Table::new(&[
                "ID",
                "STATUS",
                "ADDRESS",
                "VERSION",
                "TUNNELS",
                "RENEWED",
                "LAST REPORT",
            ]);
            for g in &gateways {
                t.row(vec![
                    g.id.clone(),
                    standing(g).into(),
                    g.peer_addr.clone().unwrap_or_else(|| "-".into()),
                    if g.version.is_empty() {
                        "-".into()
                    } else {
                        g.version.clone()
                    },
                    g.tunnels.to_string(),
                    ago_text(g.renewed_at),
                    if g.last_report == 0 {
                        "-".into()
                    } else {
                        ago_text(g.last_report)
                    },
                ]);
            }
            t.print();
            Ok(())
        }
    }
}

pub async fn remove(s: &mut Session, id: String) -> anyhow::Result<()> {
    match s.call(Request::GatewayRemove { id: id.clone() }).await? {
        Response::Ok => {
            crate::outln!(
                "gateway {id} revoked: the authority refuses it from now on, other gateways \
                 refuse its forwarded dials, and it stops at its next presence report"
            );
            Ok(())
        }
        other => Err(unexpected(other).into()),
    }
}
