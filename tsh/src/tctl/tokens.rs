//! `tctl tokens add | ls | rm`. The token secret is shown once, in the answer to `add`; the
//! authority keeps only its hash and lists tokens by a short id.

use edgeport_net::rpc_client::unexpected;
use edgeport_proto::rpc::{Request, Response, TokenInfo, TokenKind, TokenSpec};
use edgeport_proto::util::format_labels;
use serde_json::json;

use super::cli::{Format, FormatArgs, TokenAddArgs, TokenType};
use super::connect::Session;
use super::output::{expiry_text, json_list, print_as, time_json, Table};

pub async fn add(s: &mut Session, a: TokenAddArgs) -> anyhow::Result<()> {
    if a.ttl == 0 {
        anyhow::bail!("--ttl must be more than 0");
    }
    if a.agent_env && a.kind != TokenType::Device {
        anyhow::bail!("--agent-env is for device tokens");
    }
    let spec = TokenSpec {
        kind: match a.kind {
            TokenType::Device => TokenKind::Device,
            TokenType::Gateway => TokenKind::Gateway,
        },
        labels: a.labels,
        ttl_secs: a.ttl,
        reusable: a.reusable,
    };
    let t = match s.call(Request::TokenAdd(spec)).await? {
        Response::Token(t) => t,
        other => return Err(unexpected(other).into()),
    };
    let secret = t.token.clone().unwrap_or_default();
    if secret.is_empty() {
        anyhow::bail!(
            "the authority made token {} but did not return its secret",
            t.id
        );
    }
    if a.agent_env {
        crate::out!(
            "{}",
            agent_env(&t, &secret, a.gateway.as_deref(), a.device_id.as_deref())
        );
        return Ok(());
    }
    match a.format {
        Format::Json | Format::Yaml => print_as(a.format, &token_json(&t)),
        Format::Text => {
            crate::outln!("token:    {secret}");
            crate::outln!("id:       {}", t.id);
            crate::outln!("type:     {}", t.kind.as_str());
            if !t.labels.is_empty() {
                crate::outln!("labels:   {}", format_labels(&t.labels));
            }
            crate::outln!("expires:  {}", expiry_text(t.expires));
            crate::outln!(
                "uses:     {}",
                if t.reusable { "any number" } else { "one" }
            );
            crate::outln!("CA pin:   {}", t.ca_pin);
            crate::outln!();
            crate::outln!("{}", example(&t, &secret, &s.auth_addr));
            Ok(())
        }
    }
}

/// A device's `/etc/edgeport/agent.env` (the variables `edge-agent start` reads), for the
/// install bundle. It holds the token: keep it 0600 until the first start has used it.
fn agent_env(t: &TokenInfo, secret: &str, gateway: Option<&str>, id: Option<&str>) -> String {
    let mut out = String::from(
        "# Edgeport agent configuration: install as /etc/edgeport/agent.env, mode 0600.\n",
    );
    out += &format!("# Token {} expires {}.\n", t.id, expiry_text(t.expires));
    out += &format!(
        "EDGEPORT_GATEWAY={}\n",
        gateway.unwrap_or("gateway.example.com:3080")
    );
    out += &format!("EDGEPORT_TOKEN={secret}\n");
    out += &format!("EDGEPORT_CA_PIN={}\n", t.ca_pin);
    out += "EDGEPORT_DATA_DIR=/var/lib/edgeport\n";
    match id {
        Some(id) => out += &format!("EDGEPORT_DEVICE_ID={id}\n"),
        None => out += "# EDGEPORT_DEVICE_ID=van-42   (default: the authority picks dev-...)\n",
    }
    if !t.labels.is_empty() {
        out += &format!("EDGEPORT_LABELS={}\n", format_labels(&t.labels));
    }
    out
}

/// The command line that uses the token.
fn example(t: &TokenInfo, secret: &str, auth_addr: &str) -> String {
    match t.kind {
        TokenKind::Device => format!(
            "Join a device with:\n  edge-agent start --data-dir /var/lib/edgeport \
             --gateway GATEWAY:3080 --token {secret} --ca-pin {}",
            t.ca_pin
        ),
        TokenKind::Gateway => format!(
            "Join a gateway with:\n  gateway start --data-dir /var/lib/edgeport-gw \
             --auth {auth_addr} --token {secret} --ca-pin {}",
            t.ca_pin
        ),
    }
}

fn token_json(t: &TokenInfo) -> serde_json::Value {
    json!({
        "token": t.token,
        "id": t.id,
        "type": t.kind.as_str(),
        "labels": t.labels,
        "expires": time_json(t.expires),
        "reusable": t.reusable,
        "uses": t.uses,
        "ca_pin": t.ca_pin,
    })
}

pub async fn list(s: &mut Session, a: FormatArgs) -> anyhow::Result<()> {
    let tokens = match s.call(Request::TokenList).await? {
        Response::Tokens(t) => t,
        other => return Err(unexpected(other).into()),
    };
    match a.format {
        Format::Json | Format::Yaml => print_as(a.format, &json_list(&tokens, token_json)),
        Format::Text => {
            let mut table = Table::new(&["ID", "TYPE", "LABELS", "EXPIRES", "REUSABLE", "USES"]);
            for t in &tokens {
                let labels = format_labels(&t.labels);
                table.row(vec![
                    t.id.clone(),
                    t.kind.as_str().into(),
                    if labels.is_empty() {
                        "-".into()
                    } else {
                        labels
                    },
                    expiry_text(t.expires),
                    if t.reusable { "yes" } else { "no" }.into(),
                    t.uses.to_string(),
                ]);
            }
            table.print();
            Ok(())
        }
    }
}

pub async fn remove(s: &mut Session, id: String) -> anyhow::Result<()> {
    match s.call(Request::TokenRemove { id: id.clone() }).await? {
        Response::Ok => {
            crate::outln!("token {id} removed");
            Ok(())
        }
        other => Err(unexpected(other).into()),
    }
}
