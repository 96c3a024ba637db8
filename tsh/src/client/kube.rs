//! `tsh kube ls`, `tsh kube login CLUSTER`, the kube part of `tsh logout`, and the
//! kubeconfig writer `tctl auth sign --format kubernetes` shares.
//!
//! `tsh kube login` adds a cluster, a user and a context, all named `edgeport-CLUSTER`, to
//! `$KUBECONFIG` (its first file) or `~/.kube/config`, and selects the context. The server is
//! `https://PROXY/k8s/CLUSTER`, verified as `gateway.edgeport` against the cluster's CA; the
//! user's x509 certificate and key are embedded. What was written is recorded in
//! `~/.tsh/kube.json`, so `tsh logout` removes exactly those entries and nothing else.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use edgeport_proto::tls::GATEWAY_SERVER_NAME;
use edgeport_proto::tunnel::{ClientReply, ClientRequest};
use edgeport_proto::util::write_private;
use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

use super::cli::{Format, Global, KubeCmd};
use super::profile::{load_creds, tsh_home};
use super::{gateway, CliError};

/// What a kubeconfig entry needs.
pub struct KubeCreds<'a> {
    pub proxy: &'a str,
    pub cluster: &'a str,
    pub ca_pem: &'a str,
    pub cert_pem: &'a str,
    pub key_pem: &'a str,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeConfigError {
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("{path} is not a kubeconfig: {err}")]
    Parse { path: String, err: String },
}

fn io(path: &Path, err: std::io::Error) -> KubeConfigError {
    KubeConfigError::Io {
        path: path.display().to_string(),
        err,
    }
}

/// The context (and cluster and user) name for CLUSTER.
pub fn context_name(cluster: &str) -> String {
    format!("edgeport-{cluster}")
}

/// `$KUBECONFIG`'s first file, else `~/.kube/config`.
pub fn kubeconfig_path() -> Result<PathBuf, CliError> {
    if let Some(k) = std::env::var_os("KUBECONFIG").filter(|k| !k.is_empty()) {
        if let Some(first) = std::env::split_paths(&k).next() {
            return Ok(first);
        }
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| CliError::msg("HOME is not set"))?;
    Ok(PathBuf::from(home).join(".kube").join("config"))
}

fn b64(s: &str) -> Value {
    Value::String(base64::engine::general_purpose::STANDARD.encode(s.as_bytes()))
}

fn map(pairs: Vec<(&str, Value)>) -> Value {
    let mut m = Mapping::new();
    for (k, v) in pairs {
        m.insert(Value::String(k.into()), v);
    }
    Value::Mapping(m)
}

fn s(v: &str) -> Value {
    Value::String(v.into())
}

fn load(path: &Path) -> Result<Mapping, KubeConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io(path, e)),
    };
    if text.trim().is_empty() {
        let mut m = Mapping::new();
        m.insert(s("apiVersion"), s("v1"));
        m.insert(s("kind"), s("Config"));
        m.insert(s("preferences"), Value::Mapping(Mapping::new()));
        return Ok(m);
    }
    match serde_yaml::from_str::<Value>(&text) {
        Ok(Value::Mapping(m)) => Ok(m),
        Ok(_) => Err(KubeConfigError::Parse {
            path: path.display().to_string(),
            err: "not a mapping".into(),
        }),
        Err(e) => Err(KubeConfigError::Parse {
            path: path.display().to_string(),
            err: e.to_string(),
        }),
    }
}

fn save(path: &Path, doc: &Mapping) -> Result<(), KubeConfigError> {
    let text = serde_yaml::to_string(doc).map_err(|e| KubeConfigError::Parse {
        path: path.display().to_string(),
        err: e.to_string(),
    })?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    // It holds a private key: 0600.
    write_private(path, text.as_bytes()).map_err(|e| io(path, e))
}

/// Replaces (or adds) the entry called `name` in the list `list`.
fn upsert_named(doc: &mut Mapping, list: &str, name: &str, field: &str, body: Value) {
    let entry = map(vec![("name", s(name)), (field, body)]);
    let slot = doc
        .entry(s(list))
        .or_insert_with(|| Value::Sequence(Vec::new()));
    if !slot.is_sequence() {
        *slot = Value::Sequence(Vec::new());
    }
    if let Value::Sequence(seq) = slot {
        seq.retain(|e| e.get("name").and_then(Value::as_str) != Some(name));
        seq.push(entry);
    }
}

fn remove_named(doc: &mut Mapping, list: &str, name: &str) {
    if let Some(Value::Sequence(seq)) = doc.get_mut(s(list)) {
        seq.retain(|e| e.get("name").and_then(Value::as_str) != Some(name));
    }
}

/// Adds the `edgeport-CLUSTER` cluster, user and context to `doc`.
fn add_entries(doc: &mut Mapping, c: &KubeCreds<'_>, select: bool) {
    let name = context_name(c.cluster);
    upsert_named(
        doc,
        "clusters",
        &name,
        "cluster",
        map(vec![
            (
                "server",
                s(&format!("https://{}/k8s/{}", c.proxy, c.cluster)),
            ),
            ("certificate-authority-data", b64(c.ca_pem)),
            ("tls-server-name", s(GATEWAY_SERVER_NAME)),
        ]),
    );
    upsert_named(
        doc,
        "users",
        &name,
        "user",
        map(vec![
            ("client-certificate-data", b64(c.cert_pem)),
            ("client-key-data", b64(c.key_pem)),
        ]),
    );
    upsert_named(
        doc,
        "contexts",
        &name,
        "context",
        map(vec![("cluster", s(&name)), ("user", s(&name))]),
    );
    if select {
        doc.insert(s("current-context"), s(&name));
    }
}

/// A kubeconfig holding only CLUSTER's context (`tctl auth sign --format kubernetes`).
pub fn write_kubeconfig_file(path: &Path, c: &KubeCreds<'_>) -> Result<(), KubeConfigError> {
    let mut doc = Mapping::new();
    doc.insert(s("apiVersion"), s("v1"));
    doc.insert(s("kind"), s("Config"));
    add_entries(&mut doc, c, true);
    save(path, &doc)
}

/// What tsh wrote where, per proxy: `~/.tsh/kube.json`.
#[derive(Default, Serialize, Deserialize)]
struct Written {
    /// proxy -> list of (kubeconfig path, context name).
    entries: BTreeMap<String, Vec<(PathBuf, String)>>,
}

fn written_path(home: &Path) -> PathBuf {
    home.join("kube.json")
}

fn load_written(home: &Path) -> Written {
    std::fs::read_to_string(written_path(home))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

fn save_written(home: &Path, w: &Written) -> Result<(), CliError> {
    let path = written_path(home);
    if w.entries.is_empty() {
        let _ = std::fs::remove_file(&path);
        return Ok(());
    }
    let text = serde_json::to_string_pretty(w).map_err(|e| CliError::msg(e.to_string()))?;
    write_private(&path, text.as_bytes())
        .map_err(|e| CliError::msg(format!("cannot write {}: {e}", path.display())))
}

/// `tsh login` to a proxy that tsh wrote kubectl contexts for: puts the new certificate, key
/// and CA into each of them (where they are, selected or not), so kubectl goes on working
/// without another `tsh kube login`.
pub fn refresh(home: &Path, proxy: &str, c: &KubeCreds<'_>) -> Result<(), CliError> {
    let w = load_written(home);
    let Some(list) = w.entries.get(proxy) else {
        return Ok(());
    };
    for (path, name) in list {
        let Some(cluster) = name.strip_prefix("edgeport-") else {
            continue;
        };
        let mut doc = match load(path) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("tsh: cannot update {}: {e}", path.display());
                continue;
            }
        };
        add_entries(
            &mut doc,
            &KubeCreds {
                proxy,
                cluster,
                ..*c
            },
            false,
        );
        save(path, &doc).map_err(|e| CliError::msg(e.to_string()))?;
        crate::outln!("Updated kubectl context {name} in {}.", path.display());
    }
    Ok(())
}

/// `tsh logout` for one proxy: removes the contexts, clusters and users tsh wrote for it.
pub fn forget(home: &Path, proxy: &str) -> Result<(), CliError> {
    let mut w = load_written(home);
    let Some(list) = w.entries.remove(proxy) else {
        return Ok(());
    };
    for (path, name) in &list {
        let mut doc = match load(path) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("tsh: cannot clean {}: {e}", path.display());
                continue;
            }
        };
        for l in ["clusters", "users", "contexts"] {
            remove_named(&mut doc, l, name);
        }
        if doc.get("current-context").and_then(Value::as_str) == Some(name.as_str()) {
            doc.insert(s("current-context"), s(""));
        }
        save(path, &doc).map_err(|e| CliError::msg(e.to_string()))?;
        crate::outln!("Removed kubectl context {name} from {}.", path.display());
    }
    save_written(home, &w)
}

pub async fn run(g: &Global, cmd: &KubeCmd) -> Result<i32, CliError> {
    let creds = load_creds(g.proxy.as_deref(), g.identity.as_deref())?;
    let tls = gateway::creds_config(&creds)?;
    let devices =
        match gateway::user_request(&creds, tls, g.transport, &ClientRequest::ListDevices).await? {
            (ClientReply::Devices(d), _) => d,
            (other, _) => return Err(gateway::unexpected(&other)),
        };
    let mut clusters: BTreeMap<String, (String, bool)> = BTreeMap::new();
    for d in &devices {
        if let Some(c) = &d.kube_cluster {
            let e = clusters
                .entry(c.clone())
                .or_insert((d.id.clone(), d.online));
            if d.online && !e.1 {
                *e = (d.id.clone(), true);
            }
        }
    }
    match cmd {
        KubeCmd::Ls { format } => {
            match format {
                Format::Json | Format::Yaml => {
                    let list: Vec<_> = clusters
                        .iter()
                        .map(|(c, (d, on))| {
                            serde_json::json!({"cluster": c, "device": d, "online": on})
                        })
                        .collect();
                    format.print(&serde_json::Value::Array(list));
                }
                Format::Text => {
                    let mut t = crate::text::Table::new(&["CLUSTER", "DEVICE", "STATUS"]);
                    for (c, (d, on)) in &clusters {
                        let st = if *on { "online" } else { "offline" };
                        t.row(vec![c.clone(), d.clone(), st.into()]);
                    }
                    t.print();
                }
            }
            Ok(0)
        }
        KubeCmd::Login { cluster } => {
            if !clusters.contains_key(cluster) {
                return Err(CliError::msg(format!(
                    "unknown Kubernetes cluster {cluster:?} (see `tsh kube ls`)"
                ))
                .with_code(1));
            }
            let path = kubeconfig_path()?;
            let mut doc = load(&path).map_err(|e| CliError::msg(e.to_string()))?;
            let key_pem = creds.key.pkcs8_pem();
            add_entries(
                &mut doc,
                &KubeCreds {
                    proxy: &creds.proxy,
                    cluster,
                    ca_pem: &creds.cas.x509_ca_pem,
                    cert_pem: &creds.x509_pem,
                    key_pem: &key_pem,
                },
                true,
            );
            save(&path, &doc).map_err(|e| CliError::msg(e.to_string()))?;
            let home = tsh_home()?;
            let mut w = load_written(&home);
            let name = context_name(cluster);
            let list = w.entries.entry(creds.proxy.clone()).or_default();
            if !list.iter().any(|(p, n)| p == &path && n == &name) {
                list.push((path.clone(), name.clone()));
            }
            save_written(&home, &w)?;
            crate::outln!(
                "Logged into Kubernetes cluster {cluster}; kubectl context {name} selected in {}.",
                path.display()
            );
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn add_and_remove_leave_other_contexts() {
        let mut doc: Mapping = serde_yaml::from_str(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: other\n  cluster: {server: https://x}\ncontexts:\n- name: other\n  context: {cluster: other}\ncurrent-context: other\n",
        )
        .unwrap();
        let c = KubeCreds {
            proxy: "127.0.0.1:3080",
            cluster: "edge1",
            ca_pem: "CA",
            cert_pem: "CERT",
            key_pem: "KEY",
        };
        add_entries(&mut doc, &c, true);
        add_entries(&mut doc, &c, true);
        assert_eq!(doc["clusters"].as_sequence().unwrap().len(), 2);
        assert_eq!(doc["current-context"], "edgeport-edge1");
        assert_eq!(
            doc["clusters"][1]["cluster"]["server"],
            "https://127.0.0.1:3080/k8s/edge1"
        );
        for l in ["clusters", "users", "contexts"] {
            remove_named(&mut doc, l, "edgeport-edge1");
        }
        assert_eq!(doc["clusters"].as_sequence().unwrap().len(), 1);
        assert_eq!(doc["contexts"][0]["name"], "other");
    }
}
