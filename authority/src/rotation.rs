//! CA rotation (`tctl auth rotate --type user|host|x509`), one phase at a time:
//!
//! | phase | signs with | trusted (in the signed CA bundle) |
//! |---|---|---|
//! | `standby` | the CA | the CA |
//! | `init` | old | old, new: gateways fetch the bundle and push it to their agents |
//! | `update_clients` | new | new, old: users get new certificates at their next login, devices renew |
//! | `update_servers` | new | new, old until `drop_at` (the grace period) |
//! | `standby` (again) | new | new: the old CA is dropped |
//!
//! `rollback` (from any phase but `standby`) signs with the old CA again and keeps the new
//! one trusted for the grace period, then drops it. The state lives in `DATA/ca/rotation.json`
//! (0600, both private keys); `DATA/ca/user_ca`, `host_ca` and `x509_ca.key`/`.pem` hold the
//! signing key once a rotation ends. For the x509 CA "signs with" means issues the x509
//! certificates; the CA bundle is signed by every trusted x509 CA (`proto/src/ca_bundle.rs`).

use std::path::{Path, PathBuf};

use edgeport_proto::keys::KeyPair;
use edgeport_proto::rpc::{CaKind, RotateAction};
use serde::{Deserialize, Serialize};

/// Where a rotation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Standby,
    Init,
    UpdateClients,
    UpdateServers,
    Rollback,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Standby => "standby",
            Phase::Init => "init",
            Phase::UpdateClients => "update_clients",
            Phase::UpdateServers => "update_servers",
            Phase::Rollback => "rollback",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RotateError {
    #[error("the {0} CA is already being rotated (phase {1}); advance it, complete it or roll it back first")]
    InProgress(&'static str, &'static str),
    #[error("the {0} CA is not being rotated (phase standby)")]
    NotRotating(&'static str),
    #[error("the {0} CA is in phase {1}: {2}")]
    WrongPhase(&'static str, &'static str, &'static str),
    #[error("cannot make a new CA key: {0}")]
    Key(String),
}

/// A CA key that can be rotated: an SSH CA key or the x509 CA (key and certificate).
pub trait CaKey: Clone + Sized {
    /// A new CA of the same kind.
    fn successor(&self) -> Result<Self, String>;
    /// How `tctl` names it (`SHA256:...` or the x509 pin).
    fn fingerprint(&self) -> String;
    /// The private key (and certificate) as saved in `rotation.json`.
    fn to_text(&self) -> Result<String, String>;
    fn from_text(text: &str) -> Result<Self, String>;
}

impl CaKey for KeyPair {
    fn successor(&self) -> Result<Self, String> {
        KeyPair::generate().map_err(|e| e.to_string())
    }
    fn fingerprint(&self) -> String {
        fingerprint(self)
    }
    fn to_text(&self) -> Result<String, String> {
        self.to_openssh().map_err(|e| e.to_string())
    }
    fn from_text(text: &str) -> Result<Self, String> {
        KeyPair::from_openssh(text).map_err(|e| e.to_string())
    }
}

/// One CA and, during a rotation, the other CA trusted beside it.
#[derive(Clone)]
pub struct RotatingCa<K: CaKey = KeyPair> {
    /// The key that signs now.
    pub signing: K,
    /// The other trusted key (old or new), during a rotation.
    pub other: Option<K>,
    pub phase: Phase,
    pub grace_secs: u64,
    /// When `other` is dropped (Unix seconds), once it no longer signs.
    pub drop_at: Option<u64>,
}

impl RotatingCa<KeyPair> {
    /// The bundle field: one OpenSSH line per trusted CA, the signing one first.
    pub fn trusted_lines(&self) -> String {
        let mut lines = vec![self.signing.public_openssh()];
        lines.extend(self.other.iter().map(KeyPair::public_openssh));
        lines.join("\n")
    }
}

impl<K: CaKey> RotatingCa<K> {
    pub fn new(signing: K) -> Self {
        Self {
            signing,
            other: None,
            phase: Phase::Standby,
            grace_secs: 0,
            drop_at: None,
        }
    }

    /// Fingerprints of the trusted CAs, the signing one first.
    pub fn fingerprints(&self) -> Vec<String> {
        std::iter::once(&self.signing)
            .chain(self.other.iter())
            .map(K::fingerprint)
            .collect()
    }

    /// Applies `action` at `now`; `kind` names the CA in errors. `Status` changes nothing.
    pub fn apply(
        &mut self,
        kind: CaKind,
        action: &RotateAction,
        now: u64,
    ) -> Result<(), RotateError> {
        let name = kind.as_str();
        let wrong = |p: Phase, why| RotateError::WrongPhase(name, p.as_str(), why);
        match (action, self.phase) {
            (RotateAction::Status, _) => {}
            (RotateAction::Start { grace_secs }, Phase::Standby) => {
                let new = self.signing.successor().map_err(RotateError::Key)?;
                self.other = Some(new);
                self.grace_secs = *grace_secs;
                self.drop_at = None;
                self.phase = Phase::Init;
            }
            (RotateAction::Start { .. }, p) => {
                return Err(RotateError::InProgress(name, p.as_str()))
            }
            (_, Phase::Standby) => return Err(RotateError::NotRotating(name)),
            (RotateAction::Advance, Phase::Init) => {
                self.swap();
                self.phase = Phase::UpdateClients;
            }
            (RotateAction::Advance, Phase::UpdateClients) => {
                self.phase = Phase::UpdateServers;
                self.drop_at = Some(now.saturating_add(self.grace_secs));
            }
            (RotateAction::Advance, p @ (Phase::UpdateServers | Phase::Rollback)) => {
                return Err(wrong(
                    p,
                    "the next step is standby, after the grace period (or --complete)",
                ))
            }
            (RotateAction::Complete, p @ (Phase::Init | Phase::UpdateClients)) => {
                return Err(wrong(p, "advance to update_servers first"))
            }
            (RotateAction::Complete, Phase::UpdateServers | Phase::Rollback) => self.finish(),
            (RotateAction::Rollback, Phase::Rollback) => {
                return Err(wrong(Phase::Rollback, "already rolling back"))
            }
            (RotateAction::Rollback, p) => {
                // In `init` the old CA still signs; later the new one does.
                if p != Phase::Init {
                    self.swap();
                }
                self.phase = Phase::Rollback;
                self.drop_at = Some(now.saturating_add(self.grace_secs));
            }
        }
        Ok(())
    }

    /// Drops the CA that no longer signs once the grace period is over. Whether it did.
    pub fn expire(&mut self, now: u64) -> bool {
        match self.drop_at {
            Some(at)
                if now >= at && matches!(self.phase, Phase::UpdateServers | Phase::Rollback) =>
            {
                self.finish();
                true
            }
            _ => false,
        }
    }

    fn swap(&mut self) {
        if let Some(other) = self.other.take() {
            self.other = Some(std::mem::replace(&mut self.signing, other));
        }
    }

    fn finish(&mut self) {
        self.other = None;
        self.drop_at = None;
        self.phase = Phase::Standby;
    }
}

/// `SHA256:...` of an SSH public key, as `ssh-keygen -l` prints it.
pub fn fingerprint(k: &KeyPair) -> String {
    k.ssh_public()
        .fingerprint(russh::keys::HashAlg::Sha256)
        .to_string()
}

/// One CA's rotation as saved.
#[derive(Serialize, Deserialize)]
struct Saved {
    phase: Phase,
    signing: String,
    other: Option<String>,
    grace_secs: u64,
    drop_at: Option<u64>,
}

#[derive(Default, Serialize, Deserialize)]
struct SavedFile {
    user: Option<Saved>,
    host: Option<Saved>,
    #[serde(default)]
    x509: Option<Saved>,
}

fn file(dir: &Path) -> PathBuf {
    dir.join("rotation.json")
}

fn save_one<K: CaKey>(ca: &RotatingCa<K>) -> Result<Option<Saved>, String> {
    if ca.phase == Phase::Standby {
        return Ok(None);
    }
    let key = |k: &K| k.to_text();
    Ok(Some(Saved {
        phase: ca.phase,
        signing: key(&ca.signing)?,
        other: ca.other.as_ref().map(key).transpose()?,
        grace_secs: ca.grace_secs,
        drop_at: ca.drop_at,
    }))
}

/// Writes the rotation state (0600). Called before the key files change.
pub fn save<X: CaKey>(
    dir: &Path,
    user: &RotatingCa,
    host: &RotatingCa,
    x509: &RotatingCa<X>,
) -> Result<(), String> {
    let f = SavedFile {
        user: save_one(user)?,
        host: save_one(host)?,
        x509: save_one(x509)?,
    };
    let path = file(dir);
    if f.user.is_none() && f.host.is_none() && f.x509.is_none() {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.to_string()),
            _ => Ok(()),
        };
    }
    let data = serde_json::to_vec_pretty(&f).map_err(|e| e.to_string())?;
    edgeport_proto::util::write_private(&path, &data)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The saved rotations, if any, over the CAs read from the key files.
pub fn load<X: CaKey>(
    dir: &Path,
    user: &mut RotatingCa,
    host: &mut RotatingCa,
    x509: &mut RotatingCa<X>,
) -> Result<(), String> {
    let path = file(dir);
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let f: SavedFile =
        serde_json::from_slice(&data).map_err(|e| format!("{}: {e}", path.display()))?;
    for (saved, ca) in [(f.user, user), (f.host, host)] {
        load_one(&path, saved, ca)?;
    }
    load_one(&path, f.x509, x509)
}

fn load_one<K: CaKey>(
    path: &Path,
    saved: Option<Saved>,
    ca: &mut RotatingCa<K>,
) -> Result<(), String> {
    let key = |text: &str| K::from_text(text).map_err(|e| format!("{}: {e}", path.display()));
    if let Some(s) = saved {
        *ca = RotatingCa {
            signing: key(&s.signing)?,
            other: s.other.as_deref().map(key).transpose()?,
            phase: s.phase,
            grace_secs: s.grace_secs,
            drop_at: s.drop_at,
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_rotation_trusts_both_until_the_grace_ends() {
        let old = KeyPair::generate().unwrap();
        let mut ca = RotatingCa::new(old.clone());
        let act = |ca: &mut RotatingCa, a: RotateAction, now| ca.apply(CaKind::User, &a, now);
        assert_eq!(
            act(&mut ca, RotateAction::Advance, 0),
            Err(RotateError::NotRotating("user"))
        );
        act(&mut ca, RotateAction::Start { grace_secs: 100 }, 0).unwrap();
        assert_eq!(ca.signing.public_openssh(), old.public_openssh());
        assert_eq!(ca.trusted_lines().lines().count(), 2);
        act(&mut ca, RotateAction::Advance, 10).unwrap();
        assert_ne!(ca.signing.public_openssh(), old.public_openssh());
        assert!(act(&mut ca, RotateAction::Complete, 10).is_err());
        act(&mut ca, RotateAction::Advance, 20).unwrap();
        assert_eq!(ca.drop_at, Some(120));
        assert!(!ca.expire(119));
        assert_eq!(ca.trusted_lines().lines().count(), 2);
        assert!(ca.expire(120));
        assert_eq!(ca.phase, Phase::Standby);
        assert_eq!(ca.trusted_lines().lines().count(), 1);
        assert!(!ca.trusted_lines().contains(&old.public_openssh()));
    }

    #[test]
    fn rollback_signs_with_the_old_ca_again() {
        let old = KeyPair::generate().unwrap();
        let mut ca = RotatingCa::new(old.clone());
        ca.apply(CaKind::Host, &RotateAction::Start { grace_secs: 0 }, 0)
            .unwrap();
        ca.apply(CaKind::Host, &RotateAction::Advance, 0).unwrap();
        ca.apply(CaKind::Host, &RotateAction::Rollback, 5).unwrap();
        assert_eq!(ca.signing.public_openssh(), old.public_openssh());
        assert_eq!(ca.phase, Phase::Rollback);
        assert!(ca.expire(5));
        assert_eq!(ca.trusted_lines(), old.public_openssh());
    }

    #[test]
    fn state_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("rot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut user = RotatingCa::new(KeyPair::generate().unwrap());
        let host = RotatingCa::new(KeyPair::generate().unwrap());
        user.apply(CaKind::User, &RotateAction::Start { grace_secs: 7 }, 0)
            .unwrap();
        let x509 = RotatingCa::new(KeyPair::generate().unwrap());
        save(&dir, &user, &host, &x509).unwrap();
        let mut u2 = RotatingCa::new(KeyPair::generate().unwrap());
        let mut h2 = host.clone();
        let mut x2 = x509.clone();
        load(&dir, &mut u2, &mut h2, &mut x2).unwrap();
        assert_eq!(u2.trusted_lines(), user.trusted_lines());
        assert_eq!(u2.phase, Phase::Init);
        assert_eq!(h2.trusted_lines(), host.trusted_lines());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
