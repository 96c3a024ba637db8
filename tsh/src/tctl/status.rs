//! `tctl status`: the cluster at a glance, from what the authority already knows: its CAs
//! (fingerprints), the authority answering, the gateways (version, tunnels, last presence
//! report), devices online and offline, and the device offline longest (whose audit spool
//! has waited longest to be shipped).

use base64::Engine;
use edgeport_net::rpc_client::{add_device_page, unexpected};
use edgeport_proto::rpc::{
    AuthorityInfo, CaKind, CaRotateRequest, DeviceInfo, GatewayInfo, Request, Response,
    RotateAction,
};
use serde_json::{json, Value};

use super::cli::{Format, FormatArgs};
use super::connect::Session;
use super::output::{ago_text, print_as, Table};
use crate::schema::time;

/// OpenSSH's fingerprint of a public key line: `SHA256:` and the unpadded base64 of the
/// SHA-256 of the key blob (what `ssh-keygen -lf` prints).
pub fn ssh_fingerprint(line: &str) -> String {
    let blob = line
        .split_whitespace()
        .nth(1)
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
    match blob {
        Some(blob) => {
            let digest = ring::digest::digest(&ring::digest::SHA256, &blob);
            format!(
                "SHA256:{}",
                base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest.as_ref())
            )
        }
        None => "-".into(),
    }
}

/// The offline device seen longest ago: its events since then wait in its spool.
fn oldest_offline(devices: &[DeviceInfo]) -> Option<&DeviceInfo> {
    devices
        .iter()
        .filter(|d| !d.online && d.last_seen > 0)
        .min_by_key(|d| d.last_seen)
}

fn gateway_json(g: &GatewayInfo) -> Value {
    json!({
        "id": g.id,
        "status": super::gateways::standing(g),
        "version": g.version,
        "tunnels": g.tunnels,
        "last_report": time(g.last_report),
    })
}

/// Whether an authority holds every CA key the cluster's rotation needs.
fn keys_state(a: &AuthorityInfo) -> &'static str {
    if !a.missing.is_empty() {
        "missing"
    } else if !a.behind.is_empty() {
        "behind"
    } else {
        "ok"
    }
}

fn authority_json(a: &AuthorityInfo, answering: &str) -> Value {
    json!({
        "id": a.id,
        "address": a.address,
        "version": a.version,
        "up_since": time(a.started),
        "last_seen": time(a.last_seen),
        "stale": a.stale,
        "keys": keys_state(a),
        "missing": a.missing,
        "behind": a.behind,
        "remedy": (!a.remedy.is_empty()).then_some(&a.remedy),
        "answering": a.address == answering,
    })
}

pub async fn status(s: &mut Session, a: FormatArgs) -> anyhow::Result<()> {
    let (cluster, version) = match s.call(Request::Ping).await? {
        Response::Pong { cluster, version } => (cluster, version),
        other => return Err(unexpected(other).into()),
    };
    let cas = match s.call(Request::ExportCas).await? {
        Response::Cas(cas) => cas,
        other => return Err(unexpected(other).into()),
    };
    let gateways = match s.call(Request::GatewayList).await? {
        Response::Gateways(g) => g,
        other => return Err(unexpected(other).into()),
    };
    let (mut devices, mut next) = (Vec::new(), Some(String::new()));
    while let Some(after) = next {
        next = add_device_page(&mut devices, s.call(Request::DevicePage { after }).await?)?;
    }
    let online = devices.iter().filter(|d| d.online).count();
    let offline = devices.len() - online;
    let oldest = oldest_offline(&devices);
    // Every authority registered in the store (an older authority does not know the
    // request: only the one answering is listed then).
    let authorities = match s.call(Request::AuthorityList).await {
        Ok(Response::Authorities(a)) => Some(a),
        _ => None,
    };
    // Each CA's rotation phase (an authority without rotation answers an error: standby).
    let rotations = match s
        .call(Request::CaRotate(CaRotateRequest {
            kind: CaKind::User,
            action: RotateAction::Status,
        }))
        .await
    {
        Ok(Response::CaRotations(r)) => r,
        _ => Vec::new(),
    };
    let phase = |k: CaKind| {
        rotations
            .iter()
            .find(|r| r.kind == k)
            .map_or("standby".to_string(), |r| r.phase.clone())
    };
    let trusted = |field: &str| edgeport_proto::ca_bundle::key_lines(field).count();
    let ca_list = [
        (
            "user",
            ssh_fingerprint(&cas.user_ca),
            phase(CaKind::User),
            trusted(&cas.user_ca),
        ),
        (
            "host",
            ssh_fingerprint(&cas.host_ca),
            phase(CaKind::Host),
            trusted(&cas.host_ca),
        ),
        (
            "x509",
            cas.ca_pin.clone(),
            phase(CaKind::X509),
            cas.x509_ca_ders().map_or(1, |d| d.len()),
        ),
    ];
    match a.format {
        Format::Json | Format::Yaml => print_as(
            a.format,
            &json!({
                "cluster": cluster,
                "authority": s.auth_addr,
                "version": version,
                "ca_pin": cas.ca_pin,
                "cas": ca_list
                    .iter()
                    .map(|(t, f, p, n)| json!({"type": t, "fingerprint": f, "phase": p, "trusted": n}))
                    .collect::<Vec<_>>(),
                "authorities": match &authorities {
                    Some(list) => list.iter().map(|a| authority_json(a, &s.auth_addr)).collect::<Vec<_>>(),
                    None => vec![json!({"address": s.auth_addr, "version": version, "answering": true})],
                },
                "gateways": gateways.iter().map(gateway_json).collect::<Vec<_>>(),
                "devices": {"online": online, "offline": offline},
                "oldest_offline_spool": oldest.map(|d| json!({
                    "device": d.id,
                    "since": time(d.last_seen),
                })),
            }),
        ),
        Format::Text => {
            crate::outln!("cluster:   {cluster}");
            crate::outln!("authority: {} (version {version})", s.auth_addr);
            crate::outln!("CA pin:    {}", cas.ca_pin);
            crate::outln!();
            let mut t = Table::new(&["CA", "FINGERPRINT", "PHASE", "TRUSTED"]);
            for (kind, fp, phase, n) in &ca_list {
                t.row(vec![
                    kind.to_string(),
                    fp.clone(),
                    phase.clone(),
                    n.to_string(),
                ]);
            }
            t.print();
            if let Some(list) = authorities.as_ref().filter(|l| !l.is_empty()) {
                crate::outln!();
                print_authorities(list);
            }
            crate::outln!();
            if gateways.is_empty() {
                crate::outln!("gateways:  none joined");
            } else {
                let mut t = Table::new(&["GATEWAY", "STATUS", "VERSION", "TUNNELS", "LAST REPORT"]);
                for g in &gateways {
                    t.row(vec![
                        g.id.clone(),
                        super::gateways::standing(g).into(),
                        if g.version.is_empty() {
                            "-".into()
                        } else {
                            g.version.clone()
                        },
                        g.tunnels.to_string(),
                        if g.last_report == 0 {
                            "-".into()
                        } else {
                            ago_text(g.last_report)
                        },
                    ]);
                }
                t.print();
            }
            crate::outln!();
            crate::outln!("devices:   {online} online, {offline} offline");
            if let Some(d) = oldest {
                crate::outln!(
                    "oldest offline audit spool: {} (offline, last seen {}): its events since then wait on the device",
                    d.id,
                    ago_text(d.last_seen)
                );
            }
            Ok(())
        }
    }
}

/// The authorities table, then one line per authority with a remedy: what it lacks (a key
/// or a rotation step) or that its id is shared, and what to do.
fn print_authorities(list: &[AuthorityInfo]) {
    let mut t = Table::new(&["AUTHORITY", "VERSION", "UP SINCE", "LAST SEEN", "CA KEYS"]);
    for a in list {
        t.row(vec![
            a.address.clone(),
            if a.version.is_empty() {
                "-".into()
            } else {
                a.version.clone()
            },
            edgeport_proto::util::format_time(a.started),
            if a.stale {
                format!("STALE: {}", ago_text(a.last_seen))
            } else {
                ago_text(a.last_seen)
            },
            keys_state(a).into(),
        ]);
    }
    t.print();
    for a in list.iter().filter(|a| !a.remedy.is_empty()) {
        let lacks: Vec<&str> = a
            .missing
            .iter()
            .map(|m| m.as_str())
            .chain(a.behind.iter().map(|b| b.as_str()))
            .collect();
        if lacks.is_empty() {
            crate::outln!("{}: {}", a.address, a.remedy);
        } else {
            crate::outln!("{}: lacks {}: {}", a.address, lacks.join(", "), a.remedy);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_as_ssh_keygen_prints_them() {
        // A key made by ssh-keygen, and what `ssh-keygen -lf` printed for it.
        let line =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINjO2vPC8il1fMsUBoMA8s2vB/jLc1gtYo7sGMyRNbaj x";
        assert_eq!(
            ssh_fingerprint(line),
            "SHA256:QuLjNYzaLXmKQoe8ZPQVkTIEWJ/pXvlebbTLqMS3jWc"
        );
        assert_eq!(ssh_fingerprint("garbage"), "-");
    }
}
