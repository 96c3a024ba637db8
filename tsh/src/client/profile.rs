//! What tsh keeps on disk, and loading it back as credentials.
//!
//! ```text
//! $TSH_HOME (default ~/.tsh)/
//!   profile                      which proxy is current; per proxy: user, CA pin, cluster
//!   keys/PROXY/USER              Ed25519 private key (OpenSSH format, 0600)
//!   keys/PROXY/USER.pub          its public key
//!   keys/PROXY/USER-cert.pub     SSH user certificate (OpenSSH's naming, so ssh-add finds it)
//!   keys/PROXY/USER-x509.pem     x509 client certificate for the gateway
//!   keys/PROXY/cas.json          the cluster's CA bundle
//!   keys/PROXY/known_hosts       `@cert-authority * HOST-CA` for OpenSSH
//! ```

use std::path::{Path, PathBuf};

use edgeport_net::clock::now_secs;
use edgeport_proto::identity::{CaBundle, IdentityFile, Principal};
use edgeport_proto::keys::KeyPair;
use russh::keys::ssh_key::Certificate;
use serde::{Deserialize, Serialize};

use super::CliError;

/// The tsh home directory: `$TSH_HOME`, else `$HOME/.tsh`.
pub fn tsh_home() -> Result<PathBuf, CliError> {
    if let Some(h) = std::env::var_os("TSH_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| {
            CliError::msg("HOME is not set; set TSH_HOME to choose where tsh keeps its files")
        })?;
    Ok(PathBuf::from(home).join(".tsh"))
}

/// One proxy's entry in the profile.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProxyProfile {
    pub proxy: String,
    pub user: String,
    pub cluster: String,
    /// The CA pin verified at the first login; later logins check the gateway against it.
    pub ca_pin: Option<String>,
    /// Whether the gateway was trusted without verification (`--insecure`).
    #[serde(default)]
    pub insecure: bool,
}

/// `~/.tsh/profile`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Profile {
    pub current: Option<String>,
    #[serde(default)]
    pub proxies: Vec<ProxyProfile>,
}

impl Profile {
    pub fn path(home: &Path) -> PathBuf {
        home.join("profile")
    }

    /// Reads the profile; a missing file is an empty profile.
    pub fn load(home: &Path) -> Result<Self, CliError> {
        let path = Self::path(home);
        match std::fs::read_to_string(&path) {
            Ok(s) => serde_json::from_str(&s).map_err(|e| {
                CliError::msg(format!(
                    "{} is damaged ({e}); delete it and run tsh login",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(CliError::msg(format!(
                "cannot read {}: {e}",
                path.display()
            ))),
        }
    }

    pub fn save(&self, home: &Path) -> Result<(), CliError> {
        edgeport_proto::util::create_private_dir(home)
            .map_err(|e| CliError::msg(format!("cannot create {}: {e}", home.display())))?;
        let data = serde_json::to_vec_pretty(self).map_err(|e| CliError::msg(e.to_string()))?;
        edgeport_proto::util::write_private(&Self::path(home), &data)
            .map_err(|e| CliError::msg(format!("cannot write the profile: {e}")))
    }

    pub fn get(&self, proxy: &str) -> Option<&ProxyProfile> {
        self.proxies.iter().find(|p| p.proxy == proxy)
    }

    pub fn upsert(&mut self, p: ProxyProfile) {
        self.proxies.retain(|x| x.proxy != p.proxy);
        self.current = Some(p.proxy.clone());
        self.proxies.push(p);
    }

    pub fn remove(&mut self, proxy: &str) {
        self.proxies.retain(|x| x.proxy != proxy);
        if self.current.as_deref() == Some(proxy) {
            self.current = self.proxies.first().map(|p| p.proxy.clone());
        }
    }
}

/// The key directory of a proxy.
pub fn key_dir(home: &Path, proxy: &str) -> PathBuf {
    home.join("keys").join(proxy)
}

/// The files of one login.
pub struct KeyFiles {
    pub dir: PathBuf,
    pub key: PathBuf,
    pub public: PathBuf,
    pub cert: PathBuf,
    pub x509: PathBuf,
    pub cas: PathBuf,
    pub known_hosts: PathBuf,
    /// Host keys pinned for hosts behind devices, one `DEVICE/TARGET KEY` line each, written
    /// by `tsh proxy ssh` once the device's signed statement checks (OpenSSH reads it).
    pub pinned_hosts: PathBuf,
}

impl KeyFiles {
    pub fn new(home: &Path, proxy: &str, user: &str) -> Self {
        let dir = key_dir(home, proxy);
        Self {
            key: dir.join(user),
            public: dir.join(format!("{user}.pub")),
            cert: dir.join(format!("{user}-cert.pub")),
            x509: dir.join(format!("{user}-x509.pem")),
            cas: dir.join("cas.json"),
            known_hosts: dir.join("known_hosts"),
            pinned_hosts: dir.join("known_hosts_pinned"),
            dir,
        }
    }
}

/// Where the credentials came from.
#[derive(Clone, Debug)]
pub enum Source {
    Profile,
    IdentityFile(PathBuf),
}

/// Everything a command needs to talk to the gateway and to devices.
#[derive(Clone)]
pub struct Creds {
    pub proxy: String,
    pub user: String,
    pub key: KeyPair,
    pub ssh_cert: Certificate,
    pub x509_pem: String,
    pub cas: CaBundle,
    pub source: Source,
}

impl Creds {
    /// When the first of the two certificates expires.
    pub fn valid_before(&self) -> u64 {
        let x509 = edgeport_proto::keys::first_cert_der(&self.x509_pem)
            .ok()
            .and_then(|der| edgeport_proto::tls::not_after(&der).ok())
            .unwrap_or(0);
        self.ssh_cert.valid_before().min(x509)
    }

    pub fn expired(&self) -> bool {
        now_secs() >= self.valid_before()
    }

    /// The logins the SSH certificate allows.
    pub fn logins(&self) -> Vec<String> {
        self.ssh_cert.valid_principals().to_vec()
    }
}

/// The one line every command prints when it has nothing valid to work with.
pub fn no_creds(proxy: &str) -> CliError {
    CliError::msg(format!("no valid credentials for {proxy}: run tsh login")).with_code(1)
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// Loads the credentials for a command: from `-i IDENTITY` if given, else from the
/// profile (`--proxy` or the current one). Missing or expired credentials give the
/// "run tsh login" line.
pub fn load_creds(proxy: Option<&str>, identity: Option<&Path>) -> Result<Creds, CliError> {
    if let Some(path) = identity {
        return load_identity(path, proxy);
    }
    let home = tsh_home()?;
    let profile = Profile::load(&home)?;
    let proxy =
        match proxy.map(str::to_string).or(profile.current.clone()) {
            Some(p) => p,
            None => return Err(CliError::msg(
                "no valid credentials (not logged in): run tsh login --proxy HOST:PORT --user NAME",
            )
            .with_code(1)),
        };
    let Some(entry) = profile.get(&proxy) else {
        return Err(no_creds(&proxy));
    };
    let files = KeyFiles::new(&home, &proxy, &entry.user);
    let (Some(key), Some(cert), Some(x509), Some(cas)) = (
        read(&files.key),
        read(&files.cert),
        read(&files.x509),
        read(&files.cas),
    ) else {
        return Err(no_creds(&proxy));
    };
    let key = KeyPair::from_openssh(&key).map_err(|_| no_creds(&proxy))?;
    let ssh_cert = Certificate::from_openssh(cert.trim()).map_err(|_| no_creds(&proxy))?;
    let cas: CaBundle = serde_json::from_str(&cas).map_err(|_| no_creds(&proxy))?;
    let creds = Creds {
        proxy: proxy.clone(),
        user: entry.user.clone(),
        key,
        ssh_cert,
        x509_pem: x509,
        cas,
        source: Source::Profile,
    };
    if creds.expired() {
        return Err(no_creds(&proxy));
    }
    Ok(creds)
}

fn load_identity(path: &Path, proxy: Option<&str>) -> Result<Creds, CliError> {
    let id = IdentityFile::load(path).map_err(|e| CliError::msg(e.to_string()))?;
    let proxy = proxy
        .map(str::to_string)
        .or(id.proxy_addr.clone())
        .ok_or_else(|| {
            CliError::msg(format!(
                "{} does not name a gateway: pass --proxy HOST:PORT",
                path.display()
            ))
        })?;
    let bad = |what: &str| CliError::msg(format!("identity file {}: {what}", path.display()));
    let key = KeyPair::from_openssh(&id.ssh_private_key).map_err(|e| bad(&e.to_string()))?;
    let cert_line = id.ssh_cert.as_deref().ok_or_else(|| {
        bad("it holds no SSH certificate (an admin identity cannot log in to devices)")
    })?;
    let ssh_cert = Certificate::from_openssh(cert_line.trim()).map_err(|e| bad(&e.to_string()))?;
    let user = match &id.principal {
        Principal::User(u) | Principal::Admin(u) => u.clone(),
        other => return Err(bad(&format!("it belongs to {other}, not a user"))),
    };
    let creds = Creds {
        proxy: proxy.clone(),
        user,
        key,
        ssh_cert,
        x509_pem: id.x509_cert_pem,
        cas: id.cas,
        source: Source::IdentityFile(path.to_path_buf()),
    };
    if creds.expired() {
        return Err(CliError::msg(format!(
            "the identity file {} has expired: sign a new one with tctl auth sign",
            path.display()
        ))
        .with_code(1));
    }
    Ok(creds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(proxy: &str) -> ProxyProfile {
        ProxyProfile {
            proxy: proxy.into(),
            user: "alice".into(),
            cluster: "edge".into(),
            ca_pin: None,
            insecure: false,
        }
    }

    #[test]
    fn profile_keeps_one_entry_per_proxy() {
        let dir = std::env::temp_dir().join(format!("tsh-profile-{}", std::process::id()));
        let mut p = Profile::default();
        p.upsert(entry("a:1"));
        p.upsert(entry("b:2"));
        p.upsert(entry("a:1"));
        assert_eq!(p.proxies.len(), 2);
        assert_eq!(p.current.as_deref(), Some("a:1"));
        p.save(&dir).unwrap();
        let back = Profile::load(&dir).unwrap();
        assert_eq!(back.proxies, p.proxies);
        p.remove("a:1");
        assert_eq!(p.current.as_deref(), Some("b:2"));
        assert!(Profile::load(&dir.join("missing"))
            .unwrap()
            .proxies
            .is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_credentials_say_run_tsh_login() {
        let e = no_creds("gw:3080");
        assert_eq!(
            e.to_string(),
            "no valid credentials for gw:3080: run tsh login"
        );
        assert_eq!(e.code, Some(1));
    }
}
