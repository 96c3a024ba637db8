//! Taking a rotated CA bundle (`tctl auth rotate`), pushed by the gateway over the tunnel
//! (`GatewayControl::Cas`) or carried by a renewal. The gateway is only the messenger: the
//! bundle must be signed by the x509 CA this device joined with (same pin, same cluster),
//! and it may never trust again a CA this device has seen dropped (`DATA/cas.retired`), so
//! a gateway replaying an older bundle cannot bring back a retired (perhaps stolen) key.

use std::path::Path;

use edgeport_proto::ca_bundle::key_lines;
use edgeport_proto::identity::CaBundle;

/// The CAs this device trusted once and saw dropped, one `algo base64` (SSH) or `x509 PIN`
/// a line.
pub const RETIRED_FILE: &str = "cas.retired";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TakeError {
    #[error("the CA bundle is not a valid successor of ours: {0}")]
    Bundle(#[from] edgeport_proto::ca_bundle::BundleError),
    #[error("the CA bundle trusts again a CA this device saw dropped ({0}); a replayed bundle is refused")]
    Retired(String),
    #[error("cannot store the CA bundle: {0}")]
    Store(String),
}

/// Every CA of a bundle: SSH key lines (user and host) and `x509 PIN` per x509 CA.
fn all_keys(b: &CaBundle) -> Vec<String> {
    key_lines(&b.user_ca)
        .chain(key_lines(&b.host_ca))
        .chain(b.x509_pins().into_iter().map(|p| format!("x509 {p}")))
        .collect()
}

fn read_retired(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join(RETIRED_FILE))
        .map(|s| s.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Checks `fresh` against the bundle we hold; `Ok(false)` when it changes nothing.
pub fn check(dir: &Path, current: &CaBundle, fresh: &CaBundle) -> Result<bool, TakeError> {
    current.check_successor(fresh)?;
    if fresh == current {
        return Ok(false);
    }
    refuse_retired(dir, fresh)?;
    Ok(true)
}

/// Refuses a bundle that trusts a CA this device saw dropped.
fn refuse_retired(dir: &Path, fresh: &CaBundle) -> Result<(), TakeError> {
    let retired = read_retired(dir);
    match all_keys(fresh).into_iter().find(|k| retired.contains(k)) {
        Some(k) => Err(TakeError::Retired(short(&k))),
        None => Ok(()),
    }
}

/// Records the CA keys `current` trusted and `fresh` drops (before `fresh` is stored).
pub fn retire_dropped(dir: &Path, current: &CaBundle, fresh: &CaBundle) -> Result<(), TakeError> {
    let kept = all_keys(fresh);
    let mut retired = read_retired(dir);
    let before = retired.len();
    for k in all_keys(current) {
        if !kept.contains(&k) && !retired.contains(&k) {
            retired.push(k);
        }
    }
    if retired.len() == before {
        return Ok(());
    }
    let mut text = retired.join("\n");
    text.push('\n');
    edgeport_proto::util::write_private(&dir.join(RETIRED_FILE), text.as_bytes())
        .map_err(|e| TakeError::Store(e.to_string()))
}

/// The last characters of a key's base64, enough to tell keys apart in a log line.
fn short(key_line: &str) -> String {
    let b64 = key_line.split_whitespace().nth(1).unwrap_or(key_line);
    let tail: String = b64
        .chars()
        .rev()
        .take(12)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("...{tail}")
}

/// Whether our host certificate was signed by a CA other than the one that signs now
/// (the first host CA of `cas`): then the device renews under the new CA.
pub fn host_cert_outdated(host_cert: &str, cas: &CaBundle) -> bool {
    use russh::keys::ssh_key::Certificate;
    let Ok(cert) = Certificate::from_openssh(host_cert.trim()) else {
        return true;
    };
    cas.host_cas()
        .first()
        .is_some_and(|signing| cert.signature_key() != signing.key_data())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(user: &str, host: &str) -> CaBundle {
        CaBundle {
            cluster: "edge".into(),
            user_ca: user.into(),
            host_ca: host.into(),
            x509_ca_pem: String::new(),
            ca_pin: String::new(),
            signature: String::new(),
        }
    }

    #[test]
    fn dropped_keys_are_remembered_once() {
        let dir = std::env::temp_dir().join(format!("agent-rot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let old = bundle("ssh-ed25519 AAAAold", "ssh-ed25519 AAAAhost");
        let both = bundle(
            "ssh-ed25519 AAAAnew\nssh-ed25519 AAAAold",
            "ssh-ed25519 AAAAhost",
        );
        let new = bundle("ssh-ed25519 AAAAnew", "ssh-ed25519 AAAAhost");
        retire_dropped(&dir, &old, &both).unwrap();
        assert!(read_retired(&dir).is_empty());
        retire_dropped(&dir, &both, &new).unwrap();
        retire_dropped(&dir, &both, &new).unwrap();
        assert_eq!(read_retired(&dir), vec!["ssh-ed25519 AAAAold".to_string()]);
        // A replay of the rotation's bundle (or the one before it) is refused by name.
        assert!(matches!(
            refuse_retired(&dir, &both),
            Err(TakeError::Retired(k)) if k.ends_with("AAAAold")
        ));
        assert!(refuse_retired(&dir, &old).is_err());
        refuse_retired(&dir, &new).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
