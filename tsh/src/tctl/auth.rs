//! `tctl auth export` and `tctl auth sign`.
//!
//! `auth sign` makes the key pair here and sends only its public key: the private key never
//! leaves this machine, as for every other Edgeport party.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use edgeport_net::clock::now_secs;
use edgeport_net::rpc_client::unexpected;
use edgeport_proto::identity::{IdentityFile, Principal};
use edgeport_proto::keys::KeyPair;
use edgeport_proto::rpc::{Request, Response, SignUserRequest, UserCerts};
use edgeport_proto::util::{valid_name, write_private, write_with_mode};

use super::cli::{CaType, ExportArgs, SignArgs, SignFormat};
use super::connect::Session;
use super::output::{csv, expiry_text};

pub async fn export(s: &mut Session, a: ExportArgs) -> anyhow::Result<()> {
    let cas = match s.call(Request::ExportCas).await? {
        Response::Cas(cas) => cas,
        other => return Err(unexpected(other).into()),
    };
    match a.ca_type {
        CaType::User => crate::outln!("{}", cas.user_ca.trim()),
        CaType::Host => crate::outln!("{}", cas.known_hosts_line("*")),
        CaType::Tls => crate::out!("{}", with_newline(&cas.x509_ca_pem)),
    }
    Ok(())
}

/// A user certificate's default validity.
const USER_TTL: u64 = 12 * 3600;
/// A host certificate's default validity (`--host`).
const HOST_TTL: u64 = 365 * 86_400;

pub async fn sign(s: &mut Session, a: SignArgs) -> anyhow::Result<()> {
    if let (Some(host), Some(pubkey)) = (&a.host, &a.pubkey) {
        return sign_host(s, host, pubkey, a.ttl.unwrap_or(HOST_TTL), a.out.as_deref()).await;
    }
    let (Some(user), Some(out)) = (a.user.clone(), a.out.clone()) else {
        bail!("give --user NAME --out PATH, or --host NAME --pubkey FILE");
    };
    let ttl = a.ttl.unwrap_or(USER_TTL);
    if !valid_name(&user) {
        bail!("invalid user name {user:?}");
    }
    let kube = match (a.format, &a.kube_cluster, &a.proxy) {
        (SignFormat::Kubernetes, Some(c), Some(p)) => Some((c.clone(), p.clone())),
        (SignFormat::Kubernetes, _, _) => {
            bail!("--format kubernetes needs --kube-cluster CLUSTER and --proxy GATEWAY:PORT")
        }
        _ => None,
    };
    if ttl == 0 {
        bail!("--ttl must be more than 0");
    }
    let key = KeyPair::generate()?;
    let req = SignUserRequest {
        user,
        ssh_public_key: key.public_openssh(),
        ttl_secs: ttl,
        logins: a.logins.clone(),
    };
    let certs = match s.call(Request::SignUser(req)).await? {
        Response::UserCerts(c) => c,
        other => return Err(unexpected(other).into()),
    };
    let written = match a.format {
        SignFormat::Openssh => write_openssh(&out, &key, &certs)?,
        SignFormat::Tls => write_tls(&out, &key, &certs)?,
        SignFormat::File => write_identity(&out, &key, &certs, &s.auth_addr, a.proxy.as_deref())?,
        SignFormat::Kubernetes => {
            let (cluster, proxy) = kube.unwrap_or_default();
            let creds = crate::client::kube::KubeCreds {
                proxy: &proxy,
                cluster: &cluster,
                ca_pem: &certs.cas.x509_ca_pem,
                cert_pem: &certs.x509_cert_pem,
                key_pem: &key.pkcs8_pem(),
            };
            crate::client::kube::write_kubeconfig_file(&out, &creds)
                .with_context(|| format!("cannot write {}", out.display()))?;
            vec![out.clone()]
        }
    };
    for p in &written {
        crate::outln!("wrote {}", p.display());
    }
    let capped = crate::text::capped_note(ttl, certs.valid_before, now_secs())
        .map(|note| format!(", {note}"))
        .unwrap_or_default();
    crate::outln!(
        "user {}, logins {}, valid until {}{capped}",
        certs.user,
        csv(&certs.logins),
        expiry_text(certs.valid_before)
    );
    Ok(())
}

/// `tctl auth sign --host NAME --pubkey FILE`: a host certificate for a legacy host's own
/// key (its sshd's `HostCertificate`), written to `out` or standard output.
async fn sign_host(
    s: &mut Session,
    name: &str,
    pubkey: &Path,
    ttl: u64,
    out: Option<&Path>,
) -> anyhow::Result<()> {
    let key = std::fs::read_to_string(pubkey)
        .with_context(|| format!("cannot read {}", pubkey.display()))?;
    let req = Request::SignHost {
        name: name.to_string(),
        ssh_public_key: key.trim().to_string(),
        ttl_secs: ttl,
    };
    let (cert, valid_before) = match s.call(req).await? {
        Response::HostCert { cert, valid_before } => (cert, valid_before),
        other => return Err(unexpected(other).into()),
    };
    match out {
        Some(path) => {
            write_public(path, &cert)?;
            crate::outln!("wrote {}", path.display());
            crate::outln!("host {name}, valid until {}", expiry_text(valid_before));
        }
        None => crate::out!("{}", with_newline(cert.trim_end())),
    }
    Ok(())
}

fn with_newline(s: &str) -> String {
    if s.ends_with('\n') {
        s.to_string()
    } else {
        format!("{s}\n")
    }
}

/// `PATH` (private key, 0600) and `PATH-cert.pub`, the names `ssh -i PATH` looks for.
fn write_openssh(out: &Path, key: &KeyPair, certs: &UserCerts) -> anyhow::Result<Vec<PathBuf>> {
    let cert_path = suffixed(out, "-cert.pub");
    write_private(out, key.to_openssh()?.as_bytes())
        .with_context(|| format!("cannot write {}", out.display()))?;
    write_public(&cert_path, &certs.ssh_cert)?;
    Ok(vec![out.to_path_buf(), cert_path])
}

/// `PATH.key` (PKCS#8, 0600), `PATH.crt` and `PATH.cas`.
fn write_tls(out: &Path, key: &KeyPair, certs: &UserCerts) -> anyhow::Result<Vec<PathBuf>> {
    let (k, c, ca) = (
        suffixed(out, ".key"),
        suffixed(out, ".crt"),
        suffixed(out, ".cas"),
    );
    write_private(&k, key.pkcs8_pem().as_bytes())
        .with_context(|| format!("cannot write {}", k.display()))?;
    write_public(&c, &certs.x509_cert_pem)?;
    write_public(&ca, &certs.cas.x509_ca_pem)?;
    Ok(vec![k, c, ca])
}

/// One identity file (0600) for `tsh -i PATH`.
fn write_identity(
    out: &Path,
    key: &KeyPair,
    certs: &UserCerts,
    auth_addr: &str,
    proxy: Option<&str>,
) -> anyhow::Result<Vec<PathBuf>> {
    let ident = IdentityFile {
        version: IdentityFile::VERSION,
        principal: Principal::User(certs.user.clone()),
        ssh_private_key: key.to_openssh()?,
        ssh_cert: Some(certs.ssh_cert.trim().to_string()),
        x509_cert_pem: certs.x509_cert_pem.clone(),
        cas: certs.cas.clone(),
        auth_addr: Some(auth_addr.to_string()),
        // `tsh -i FILE` then needs no --proxy.
        proxy_addr: proxy.map(str::to_string),
    };
    ident
        .save(out)
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(vec![out.to_path_buf()])
}

fn write_public(path: &Path, text: &str) -> anyhow::Result<()> {
    write_with_mode(path, with_newline(text.trim_end()).as_bytes(), 0o644)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// `dir/name` + suffix (`jenkins` -> `jenkins-cert.pub`).
fn suffixed(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}
