//! The cluster's three certificate authorities (DESIGN §2) and everything they sign:
//! the user SSH CA (users' SSH certificates), the host SSH CA (devices' host certificates)
//! and the x509 CA (tunnel, client and server certificates with SPIFFE URI SANs).
//!
//! The keys are made at the first start and kept in `DATA/ca/` with mode 0600; they never
//! appear in a log line, an error message or a `Debug` output.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use edgeport_net::clock::now_secs;
use edgeport_proto::identity::{CaBundle, Principal};
use edgeport_proto::keys::{self, KeyError, KeyPair};
use edgeport_proto::sshcert::{
    RolesExtension, EXT_PERMIT_AGENT_FORWARDING, EXT_PERMIT_PORT_FORWARDING, EXT_PERMIT_PTY,
    EXT_ROLES,
};
use edgeport_proto::tls::{CertKey, AUTHORITY_SERVER_NAME, GATEWAY_SERVER_NAME};
use edgeport_proto::util::{format_time, write_private, write_with_mode};
use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::PublicKey;

use crate::rotation::{RotateError, RotatingCa};
use crate::x509::{LeafSpec, X509Error, X509Issuer};
use edgeport_proto::rpc::{CaKind, CaRotation, RotateAction};

/// How long the x509 CA certificate is valid.
const X509_CA_VALIDITY_YEARS: i32 = 10;
/// Certificates start this long before "now", so a client whose clock is a little behind
/// does not see a certificate from the future.
pub const BACKDATE_SECS: u64 = 60;
/// Devices' host and tunnel certificates, and gateways' certificates.
pub const MACHINE_CERT_TTL_SECS: u64 = 30 * 86400;
/// The authority's own TLS server certificate (made afresh at each start).
const SERVER_CERT_TTL_SECS: u64 = 365 * 86400;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {err}")]
    Io { path: String, err: String },
    #[error("CA key {path} is not usable: {err}")]
    BadKeyFile { path: String, err: String },
    #[error("the CA files in {0} are incomplete (some are missing); restore them from a backup")]
    Incomplete(String),
    #[error("x509 CA: {0}")]
    Rcgen(String),
    #[error(transparent)]
    X509(#[from] X509Error),
    #[error("invalid public key: {0}")]
    Key(#[from] KeyError),
    #[error("cannot make SSH certificate: {0}")]
    Ssh(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |e| CaError::Io {
        path: path.display().to_string(),
        err: e.to_string(),
    }
}

/// The private material of the three CAs.
pub struct CaKeys {
    pub user: KeyPair,
    pub host: KeyPair,
    /// PKCS#8 DER of the x509 CA's ECDSA P-256 key.
    x509_key_pkcs8: Vec<u8>,
    pub x509_cert_pem: String,
}

impl std::fmt::Debug for CaKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaKeys").finish_non_exhaustive()
    }
}

/// File names under `DATA/ca/`.
struct CaPaths {
    user: PathBuf,
    user_pub: PathBuf,
    host: PathBuf,
    host_pub: PathBuf,
    x509_key: PathBuf,
    x509_cert: PathBuf,
}

impl CaPaths {
    fn new(dir: &Path) -> Self {
        Self {
            user: dir.join("user_ca"),
            user_pub: dir.join("user_ca.pub"),
            host: dir.join("host_ca"),
            host_pub: dir.join("host_ca.pub"),
            x509_key: dir.join("x509_ca.key"),
            x509_cert: dir.join("x509_ca.pem"),
        }
    }

    fn secrets(&self) -> [&PathBuf; 4] {
        [&self.user, &self.host, &self.x509_key, &self.x509_cert]
    }
}

impl CaKeys {
    /// Makes three new CAs for `cluster`.
    pub fn generate(cluster: &str) -> Result<Self, CaError> {
        let user = KeyPair::generate()?;
        let host = KeyPair::generate()?;
        let (x509_key_pkcs8, x509_cert_pem) = new_x509_ca(&format!("Edgeport CA {cluster}"))?;
        Ok(Self {
            user,
            host,
            x509_key_pkcs8,
            x509_cert_pem,
        })
    }

    /// Whether `dir` holds any CA file.
    pub fn exist_in(dir: &Path) -> bool {
        CaPaths::new(dir).secrets().iter().any(|p| p.exists())
    }

    /// Reads the CAs from `dir` (all files must be there).
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let p = CaPaths::new(dir);
        if p.secrets().iter().any(|f| !f.exists()) {
            return Err(CaError::Incomplete(dir.display().to_string()));
        }
        let read = |path: &Path| std::fs::read_to_string(path).map_err(io_err(path));
        let ssh_key = |path: &Path| {
            KeyPair::from_openssh(&read(path)?).map_err(|e| CaError::BadKeyFile {
                path: path.display().to_string(),
                err: e.to_string(),
            })
        };
        let x509_key_pem = read(&p.x509_key)?;
        let x509_key_pkcs8 = pem::parse(x509_key_pem.trim())
            .ok()
            .filter(|k| k.tag() == "PRIVATE KEY")
            .map(|k| k.into_contents())
            .ok_or_else(|| CaError::BadKeyFile {
                path: p.x509_key.display().to_string(),
                err: "expected a PKCS#8 PRIVATE KEY block".into(),
            })?;
        Ok(Self {
            user: ssh_key(&p.user)?,
            host: ssh_key(&p.host)?,
            x509_key_pkcs8,
            x509_cert_pem: read(&p.x509_cert)?,
        })
    }

    /// Writes the CAs to `dir`: private keys 0600, public halves 0644.
    pub fn save(&self, dir: &Path) -> Result<(), CaError> {
        edgeport_proto::util::create_private_dir(dir).map_err(io_err(dir))?;
        let p = CaPaths::new(dir);
        let private =
            |path: &Path, data: String| write_private(path, data.as_bytes()).map_err(io_err(path));
        let public = |path: &Path, data: String| {
            write_with_mode(path, data.as_bytes(), 0o644).map_err(io_err(path))
        };
        private(&p.user, self.user.to_openssh()?)?;
        public(&p.user_pub, format!("{}\n", self.user.public_openssh()))?;
        private(&p.host, self.host.to_openssh()?)?;
        public(&p.host_pub, format!("{}\n", self.host.public_openssh()))?;
        private(
            &p.x509_key,
            pem::encode(&pem::Pem::new("PRIVATE KEY", self.x509_key_pkcs8.clone())),
        )?;
        public(&p.x509_cert, self.x509_cert_pem.clone())?;
        Ok(())
    }
}

/// (year, month, day) of a Unix time.
fn ymd(unix: u64) -> (i32, u8, u8) {
    let t = format_time(unix); // YYYY-MM-DDTHH:MM:SSZ
    let year = t.get(0..4).and_then(|s| s.parse().ok()).unwrap_or(1970);
    let month = t.get(5..7).and_then(|s| s.parse().ok()).unwrap_or(1);
    let day = t.get(8..10).and_then(|s| s.parse().ok()).unwrap_or(1);
    (year, month, day)
}

/// A new self-signed x509 CA named `common_name`: (PKCS#8 DER key, certificate PEM).
fn new_x509_ca(common_name: &str) -> Result<(Vec<u8>, String), CaError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CaError::Rcgen(e.to_string()))?;
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::OrganizationName, "Edgeport");
    dn.push(rcgen::DnType::CommonName, common_name);
    params.distinguished_name = dn;
    // Path length 0: the CA signs leaves only, never another CA.
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let (y, m, d) = ymd(now_secs().saturating_sub(86400));
    params.not_before = rcgen::date_time_ymd(y, m, d);
    params.not_after = rcgen::date_time_ymd(y + X509_CA_VALIDITY_YEARS, m, d.min(28));
    let mut serial = keys::random_bytes(16)?;
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::Rcgen(e.to_string()))?;
    Ok((key.serialize_der(), cert.pem()))
}

/// The x509 CA: its key and certificate, rotated as a whole (`tctl auth rotate --type x509`).
#[derive(Clone)]
pub struct X509Ca {
    cluster: String,
    key_pkcs8: Vec<u8>,
    cert_pem: String,
    der: Vec<u8>,
}

impl X509Ca {
    fn new(cluster: &str, key_pkcs8: Vec<u8>, cert_pem: String) -> Result<Self, CaError> {
        let der = keys::first_cert_der(&cert_pem)
            .map_err(|e| CaError::X509(X509Error::BadCa(e.to_string())))?;
        // Fails early on a key that does not match the certificate's form.
        X509Issuer::new(&der, &key_pkcs8)?;
        Ok(Self {
            cluster: cluster.to_string(),
            key_pkcs8,
            cert_pem,
            der,
        })
    }

    fn issuer(&self) -> Result<X509Issuer, CaError> {
        Ok(X509Issuer::new(&self.der, &self.key_pkcs8)?)
    }
}

impl crate::rotation::CaKey for X509Ca {
    fn successor(&self) -> Result<Self, String> {
        // A distinct name, so that chains and logs tell the two CAs apart.
        let name = format!("Edgeport CA {} {}", self.cluster, format_time(now_secs()));
        let (key, pem) = new_x509_ca(&name).map_err(|e| e.to_string())?;
        X509Ca::new(&self.cluster, key, pem).map_err(|e| e.to_string())
    }
    fn fingerprint(&self) -> String {
        keys::ca_pin(&self.der).unwrap_or_default()
    }
    fn to_text(&self) -> Result<String, String> {
        let key = pem::encode(&pem::Pem::new("PRIVATE KEY", self.key_pkcs8.clone()));
        Ok(format!("{}\n{key}{}", self.cluster, self.cert_pem))
    }
    fn from_text(text: &str) -> Result<Self, String> {
        let (cluster, rest) = text.split_once('\n').ok_or("no cluster line")?;
        let blocks = pem::parse_many(rest).map_err(|e| e.to_string())?;
        let key = blocks
            .iter()
            .find(|b| b.tag() == "PRIVATE KEY")
            .ok_or("no private key")?;
        let cert = blocks
            .iter()
            .find(|b| b.tag() == "CERTIFICATE")
            .ok_or("no certificate")?;
        X509Ca::new(
            cluster,
            key.contents().to_vec(),
            keys::cert_pem(cert.contents()),
        )
        .map_err(|e| e.to_string())
    }
}

/// The x509 CA that issues servers' certificates (gateways, the authority's own): the old
/// one until `update_servers`, so that clients which have not taken the rotated bundle yet
/// (a device reconnecting during `init` or `update_clients`, a first `tsh login` with the
/// old pin) still recognise the servers and can fetch it; clients' certificates come from
/// the new CA from `update_clients` on.
fn server_ca(x509: &RotatingCa<X509Ca>) -> &X509Ca {
    use crate::rotation::Phase;
    match (x509.phase, &x509.other) {
        (Phase::UpdateClients, Some(old)) => old,
        _ => &x509.signing,
    }
}

/// The bundle of the trusted CAs, signed by every trusted x509 CA (the issuing one first).
fn signed_bundle(
    cluster: &str,
    x509: &RotatingCa<X509Ca>,
    user: &RotatingCa,
    host: &RotatingCa,
) -> Result<CaBundle, CaError> {
    let cas: Vec<&X509Ca> = std::iter::once(&x509.signing)
        .chain(x509.other.iter())
        .collect();
    let mut bundle = CaBundle {
        cluster: cluster.to_string(),
        user_ca: user.trusted_lines(),
        host_ca: host.trusted_lines(),
        x509_ca_pem: cas.iter().map(|c| keys::cert_pem(&c.der)).collect(),
        ca_pin: keys::ca_pin(&x509.signing.der)?,
        signature: String::new(),
    };
    // Clients that trust an x509 CA (by its pin) trust the SSH CAs, and during an x509 CA
    // rotation the other x509 CA, through this.
    let bytes = bundle.signed_bytes();
    let sigs = cas
        .iter()
        .map(|c| Ok(hex::encode(c.issuer()?.sign_bytes(&bytes)?)))
        .collect::<Result<Vec<_>, CaError>>()?;
    bundle.signature = sigs.join(" ");
    Ok(bundle)
}

/// Where each CA's rotation stands, from the CAs held.
fn rotations_of(ssh: &SshCas) -> Vec<CaRotation> {
    let x509 = (
        ssh.x509.fingerprints(),
        ssh.x509.phase,
        ssh.x509.grace_secs,
        ssh.x509.drop_at,
    );
    [(CaKind::User, &ssh.user), (CaKind::Host, &ssh.host)]
        .into_iter()
        .map(|(kind, ca)| (kind, ca.fingerprints(), ca.phase, ca.grace_secs, ca.drop_at))
        .chain([(CaKind::X509, x509.0, x509.1, x509.2, x509.3)])
        .map(|(kind, trusted, phase, grace_secs, drop_at)| CaRotation {
            kind,
            phase: phase.as_str().to_string(),
            signing: trusted.first().cloned().unwrap_or_default(),
            trusted,
            grace_secs,
            drop_at,
            gateways_current: 0,
            gateways_total: 0,
            devices_renewed: 0,
            devices_online: 0,
        })
        .collect()
}

/// Why a rotation step was not taken.
#[derive(Debug, thiserror::Error)]
pub enum RotationFailed {
    #[error(transparent)]
    Refused(#[from] RotateError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("cannot save the rotation: {0}")]
    Save(String),
}

/// An SSH user certificate to sign (DESIGN §2).
#[derive(Clone, Debug)]
pub struct SshUserCert<'a> {
    /// The user name (key id).
    pub user: &'a str,
    pub public_key: &'a PublicKey,
    pub principals: &'a [String],
    pub valid_after: u64,
    pub valid_before: u64,
    pub permit_pty: bool,
    pub permit_port_forwarding: bool,
    pub permit_agent_forwarding: bool,
    pub roles: &'a RolesExtension,
}

/// The three CAs, ready to sign.
pub struct CertAuthority {
    cluster: String,
    /// The CAs (rotated by `tctl auth rotate`) and the signed bundle that lists them.
    ssh: RwLock<SshCas>,
    /// Where rotations are saved (`None`: in memory only, tests).
    dir: Option<PathBuf>,
}

/// The SSH CAs and the bundle made from them; `generation` counts bundle changes.
struct SshCas {
    user: RotatingCa,
    host: RotatingCa,
    x509: RotatingCa<X509Ca>,
    /// The x509 CA that issues certificates now (`x509.signing`).
    issuer: X509Issuer,
    bundle: CaBundle,
    generation: u64,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuthority")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

impl CertAuthority {
    fn ssh(&self) -> std::sync::RwLockReadGuard<'_, SshCas> {
        self.ssh.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Signs an audit acknowledgement with the host CA key (the key devices already trust
    /// for the cluster; the payload's domain tag keeps it apart from SSH certificates).
    pub fn sign_audit_ack(&self, payload: &[u8]) -> Vec<u8> {
        self.ssh().host.signing.sign(payload)
    }

    /// Signs a dial ticket with the host CA key (gateways and devices trust it already; the
    /// ticket's context string keeps it apart from certificates and acknowledgements).
    pub fn sign_dial_ticket(&self, payload: &[u8]) -> Vec<u8> {
        self.ssh().host.signing.sign(payload)
    }

    pub fn new(cluster: &str, keys: CaKeys) -> Result<Self, CaError> {
        Self::with_rotations(cluster, keys, None)
    }

    /// [`Self::new`], with the rotations saved in `dir` (if any) in force.
    fn with_rotations(cluster: &str, keys: CaKeys, dir: Option<&Path>) -> Result<Self, CaError> {
        let mut x509 = RotatingCa::new(X509Ca::new(
            cluster,
            keys.x509_key_pkcs8,
            keys.x509_cert_pem,
        )?);
        let mut user = RotatingCa::new(keys.user);
        let mut host = RotatingCa::new(keys.host);
        if let Some(dir) = dir {
            crate::rotation::load(dir, &mut user, &mut host, &mut x509).map_err(|err| {
                CaError::Io {
                    path: dir.display().to_string(),
                    err,
                }
            })?;
        }
        let bundle = signed_bundle(cluster, &x509, &user, &host)?;
        let issuer = x509.signing.issuer()?;
        Ok(Self {
            cluster: cluster.to_string(),
            ssh: RwLock::new(SshCas {
                user,
                host,
                x509,
                issuer,
                bundle,
                generation: 0,
            }),
            dir: dir.map(Path::to_path_buf),
        })
    }

    /// Loads the CAs from `dir`, or makes and saves them there if there are none yet.
    pub fn load_or_create(dir: &Path, cluster: &str) -> Result<(Self, bool), CaError> {
        let created = !CaKeys::exist_in(dir);
        let keys = if created {
            let k = CaKeys::generate(cluster)?;
            k.save(dir)?;
            k
        } else {
            CaKeys::load(dir)?
        };
        Ok((Self::with_rotations(cluster, keys, Some(dir))?, created))
    }

    /// Applies a rotation step to one SSH CA (`Status` changes nothing), saves it and
    /// re-signs the bundle.
    pub fn rotate(
        &self,
        kind: CaKind,
        action: &RotateAction,
        now: u64,
    ) -> Result<(), RotationFailed> {
        if *action == RotateAction::Status {
            return Ok(());
        }
        let mut ssh = self.ssh.write().unwrap_or_else(|p| p.into_inner());
        let mut user = ssh.user.clone();
        let mut host = ssh.host.clone();
        let mut x509 = ssh.x509.clone();
        match kind {
            CaKind::User => user.apply(kind, action, now)?,
            CaKind::Host => host.apply(kind, action, now)?,
            CaKind::X509 => x509.apply(kind, action, now)?,
        }
        self.commit(&mut ssh, user, host, x509)
    }

    /// Drops CAs whose grace period ended. Cheap when nothing is due.
    pub fn expire_rotations(&self, now: u64) {
        let due = |at: Option<u64>| at.is_some_and(|at| now >= at);
        {
            let ssh = self.ssh();
            if !due(ssh.user.drop_at) && !due(ssh.host.drop_at) && !due(ssh.x509.drop_at) {
                return;
            }
        }
        let mut ssh = self.ssh.write().unwrap_or_else(|p| p.into_inner());
        let (mut user, mut host, mut x509) = (ssh.user.clone(), ssh.host.clone(), ssh.x509.clone());
        let (u, h, x) = (user.expire(now), host.expire(now), x509.expire(now));
        if !u && !h && !x {
            return;
        }
        match self.commit(&mut ssh, user, host, x509) {
            Ok(()) => tracing::info!(
                user = u, host = h, x509 = x,
                "CA rotation: the grace period ended; the CA that no longer signs was dropped (phase standby)"
            ),
            Err(e) => tracing::error!("CA rotation: cannot drop the old CA: {e}"),
        }
    }

    /// Saves the new state, then writes the signing keys, then takes it in memory.
    fn commit(
        &self,
        ssh: &mut SshCas,
        user: RotatingCa,
        host: RotatingCa,
        x509: RotatingCa<X509Ca>,
    ) -> Result<(), RotationFailed> {
        let bundle = signed_bundle(&self.cluster, &x509, &user, &host)?;
        let issuer = x509.signing.issuer()?;
        if let Some(dir) = &self.dir {
            crate::rotation::save(dir, &user, &host, &x509).map_err(RotationFailed::Save)?;
            let p = CaPaths::new(dir);
            for (ca, key, public) in [(&user, &p.user, &p.user_pub), (&host, &p.host, &p.host_pub)]
            {
                if ca.phase == crate::rotation::Phase::Standby {
                    let pem = ca
                        .signing
                        .to_openssh()
                        .map_err(|e| RotationFailed::Save(e.to_string()))?;
                    write_private(key, pem.as_bytes())
                        .map_err(|e| RotationFailed::Save(e.to_string()))?;
                    let line = format!("{}\n", ca.signing.public_openssh());
                    write_with_mode(public, line.as_bytes(), 0o644)
                        .map_err(|e| RotationFailed::Save(e.to_string()))?;
                }
            }
            if x509.phase == crate::rotation::Phase::Standby {
                let key = pem::encode(&pem::Pem::new(
                    "PRIVATE KEY",
                    x509.signing.key_pkcs8.clone(),
                ));
                write_private(&p.x509_key, key.as_bytes())
                    .map_err(|e| RotationFailed::Save(e.to_string()))?;
                write_with_mode(&p.x509_cert, x509.signing.cert_pem.as_bytes(), 0o644)
                    .map_err(|e| RotationFailed::Save(e.to_string()))?;
            }
        }
        ssh.user = user;
        ssh.host = host;
        ssh.x509 = x509;
        ssh.issuer = issuer;
        ssh.bundle = bundle;
        ssh.generation += 1;
        Ok(())
    }

    /// Reads `DATA/ca` again (another authority's copy, after a rotation step there) and
    /// takes it if `accept` likes its rotations; whether it did. The bundle's generation moves
    /// on, so the TLS configuration and the administrator identity follow.
    pub fn reload(&self, accept: impl Fn(&[CaRotation]) -> bool) -> Result<bool, CaError> {
        let Some(dir) = &self.dir else {
            return Ok(false);
        };
        let fresh = Self::with_rotations(&self.cluster, CaKeys::load(dir)?, Some(dir))?;
        let fresh = fresh.ssh.into_inner().unwrap_or_else(|p| p.into_inner());
        if !accept(&rotations_of(&fresh)) {
            return Ok(false);
        }
        let mut ssh = self.ssh.write().unwrap_or_else(|p| p.into_inner());
        let generation = ssh.generation + 1;
        *ssh = SshCas {
            generation,
            ..fresh
        };
        Ok(true)
    }

    /// Where each SSH CA's rotation stands (the progress counters are the caller's).
    pub fn rotations(&self) -> Vec<CaRotation> {
        rotations_of(&self.ssh())
    }

    /// How many times the bundle changed since this authority started.
    pub fn generation(&self) -> u64 {
        self.ssh().generation
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The public trust material (what `tctl auth export` prints): during a rotation, both
    /// CAs of the rotated kind.
    pub fn bundle(&self) -> CaBundle {
        self.ssh().bundle.clone()
    }

    /// DER of every trusted x509 CA, concatenated (two during an x509 CA rotation): what the
    /// root stores take (`tls::split_ders`).
    pub fn x509_ca_der(&self) -> Vec<u8> {
        let ssh = self.ssh();
        let mut der = ssh.x509.signing.der.clone();
        if let Some(o) = &ssh.x509.other {
            der.extend_from_slice(&o.der);
        }
        der
    }

    /// Signs an SSH user certificate; returns the OpenSSH certificate line.
    pub fn sign_ssh_user(&self, c: &SshUserCert<'_>) -> Result<String, CaError> {
        let mut b = self.ssh_builder(c.public_key, c.valid_after, c.valid_before)?;
        let ssh = |e: russh::keys::ssh_key::Error| CaError::Ssh(e.to_string());
        b.cert_type(CertType::User).map_err(ssh)?;
        b.key_id(c.user).map_err(ssh)?;
        for p in c.principals {
            b.valid_principal(p.as_str()).map_err(ssh)?;
        }
        if c.permit_pty {
            b.extension(EXT_PERMIT_PTY, "").map_err(ssh)?;
        }
        if c.permit_port_forwarding {
            b.extension(EXT_PERMIT_PORT_FORWARDING, "").map_err(ssh)?;
        }
        if c.permit_agent_forwarding {
            b.extension(EXT_PERMIT_AGENT_FORWARDING, "").map_err(ssh)?;
        }
        let roles = serde_json::to_string(c.roles).map_err(|e| CaError::Ssh(e.to_string()))?;
        b.extension(EXT_ROLES, roles).map_err(ssh)?;
        let cert = b.sign(self.ssh().user.signing.ssh_private()).map_err(ssh)?;
        cert.to_openssh().map_err(ssh)
    }

    /// Signs a device's SSH host certificate: key id = device id, principals = the id and
    /// `ID.CLUSTER`.
    pub fn sign_ssh_host(
        &self,
        device_id: &str,
        public_key: &PublicKey,
        valid_after: u64,
        valid_before: u64,
    ) -> Result<String, CaError> {
        let mut b = self.ssh_builder(public_key, valid_after, valid_before)?;
        let ssh = |e: russh::keys::ssh_key::Error| CaError::Ssh(e.to_string());
        b.cert_type(CertType::Host).map_err(ssh)?;
        b.key_id(device_id).map_err(ssh)?;
        b.valid_principal(device_id).map_err(ssh)?;
        b.valid_principal(format!("{device_id}.{}", self.cluster))
            .map_err(ssh)?;
        let cert = b.sign(self.ssh().host.signing.ssh_private()).map_err(ssh)?;
        cert.to_openssh().map_err(ssh)
    }

    fn ssh_builder(
        &self,
        public_key: &PublicKey,
        valid_after: u64,
        valid_before: u64,
    ) -> Result<Builder, CaError> {
        let nonce = keys::random_bytes(32)?;
        let serial = keys::random_bytes(8)?;
        let mut serial_bytes = [0u8; 8];
        serial_bytes.copy_from_slice(&serial);
        let mut b = Builder::new(
            nonce,
            public_key.key_data().clone(),
            valid_after,
            valid_before,
        )
        .map_err(|e| CaError::Ssh(e.to_string()))?;
        b.serial(u64::from_be_bytes(serial_bytes))
            .map_err(|e| CaError::Ssh(e.to_string()))?;
        Ok(b)
    }

    /// Signs an x509 leaf; returns it as PEM.
    pub fn sign_x509(&self, spec: &LeafSpec<'_>) -> Result<String, CaError> {
        Ok(keys::cert_pem(&self.ssh().issuer.sign(spec)?))
    }

    /// Signs a server's x509 leaf (gateways): from the CA that servers present in this
    /// phase of an x509 CA rotation (see [`server_ca`]).
    fn sign_x509_server(&self, spec: &LeafSpec<'_>) -> Result<String, CaError> {
        let ca = server_ca(&self.ssh().x509).clone();
        Ok(keys::cert_pem(&ca.issuer()?.sign(spec)?))
    }

    /// A user's x509 client certificate: CN = user, O = Kubernetes groups,
    /// URI SAN `spiffe://CLUSTER/user/NAME`.
    pub fn sign_x509_user(
        &self,
        user: &str,
        kube_groups: &[String],
        spki_der: &[u8],
        not_before: u64,
        not_after: u64,
    ) -> Result<String, CaError> {
        let uri = [Principal::User(user.to_string()).spiffe(&self.cluster)];
        self.sign_x509(&LeafSpec {
            common_name: user,
            organizations: kube_groups,
            spki_der,
            uris: &uri,
            client_auth: true,
            not_before,
            not_after,
            ..Default::default()
        })
    }

    /// A device's tunnel certificate (client authentication to gateways).
    pub fn sign_x509_device(
        &self,
        device_id: &str,
        spki_der: &[u8],
        not_before: u64,
        not_after: u64,
    ) -> Result<String, CaError> {
        let uri = [Principal::Device(device_id.to_string()).spiffe(&self.cluster)];
        self.sign_x509(&LeafSpec {
            common_name: device_id,
            spki_der,
            uris: &uri,
            client_auth: true,
            not_before,
            not_after,
            ..Default::default()
        })
    }

    /// A gateway's certificate: server (for agents and tsh, as `gateway.edgeport` plus the
    /// names it asked for) and client (for the authority's RPC).
    pub fn sign_x509_gateway(
        &self,
        gateway_id: &str,
        spki_der: &[u8],
        dns_names: &[String],
        ip_addrs: &[IpAddr],
        not_before: u64,
        not_after: u64,
    ) -> Result<String, CaError> {
        // Names under `.edgeport` are the cluster's own (the authority is
        // `authority.edgeport`): a gateway asking for one could pose as the authority.
        if let Some(bad) = dns_names.iter().find(|d| {
            let d = d.to_ascii_lowercase();
            d != GATEWAY_SERVER_NAME && (d == "edgeport" || d.ends_with(".edgeport"))
        }) {
            return Err(CaError::X509(X509Error::BadField(format!(
                "{bad:?} is reserved for the cluster's own names"
            ))));
        }
        let mut names = vec![GATEWAY_SERVER_NAME.to_string()];
        names.extend(
            dns_names
                .iter()
                .filter(|d| !d.eq_ignore_ascii_case(GATEWAY_SERVER_NAME))
                .cloned(),
        );
        let uri = [Principal::Gateway(gateway_id.to_string()).spiffe(&self.cluster)];
        self.sign_x509_server(&LeafSpec {
            common_name: gateway_id,
            spki_der,
            dns_names: &names,
            ip_addrs,
            uris: &uri,
            server_auth: true,
            client_auth: true,
            not_before,
            not_after,
            ..Default::default()
        })
    }

    /// An administrator's client certificate (tctl).
    pub fn sign_x509_admin(
        &self,
        name: &str,
        spki_der: &[u8],
        not_before: u64,
        not_after: u64,
    ) -> Result<String, CaError> {
        let uri = [Principal::Admin(name.to_string()).spiffe(&self.cluster)];
        self.sign_x509(&LeafSpec {
            common_name: name,
            spki_der,
            uris: &uri,
            client_auth: true,
            not_before,
            not_after,
            ..Default::default()
        })
    }

    /// The authority's own TLS server certificate, with a fresh key: `authority.edgeport`
    /// plus the listen IP. The chain carries the CA so that pinned-CA clients (joining
    /// gateways) find it.
    pub fn server_cert(&self, listen_ip: Option<IpAddr>) -> Result<CertKey, CaError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Rcgen(e.to_string()))?;
        use rcgen::PublicKeyData as _;
        let spki = key.subject_public_key_info();
        let ips: Vec<IpAddr> = listen_ip
            .into_iter()
            .filter(|ip| !ip.is_unspecified())
            .collect();
        let now = now_secs();
        let ca = server_ca(&self.ssh().x509).clone();
        let pem = keys::cert_pem(&ca.issuer()?.sign(&LeafSpec {
            common_name: AUTHORITY_SERVER_NAME,
            spki_der: &spki,
            dns_names: &[AUTHORITY_SERVER_NAME.to_string()],
            ip_addrs: &ips,
            server_auth: true,
            not_before: now.saturating_sub(BACKDATE_SECS),
            not_after: now + SERVER_CERT_TTL_SECS,
            ..Default::default()
        })?);
        CertKey::from_pem(&pem, Some(&ca.cert_pem), key.serialize_der())
            .map_err(|e| CaError::X509(X509Error::BadField(e.to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeport_proto::sshcert::{check_host_cert, check_user_cert};
    use russh::keys::ssh_key::Certificate;

    fn ca() -> CertAuthority {
        CertAuthority::new("edge", CaKeys::generate("edge").unwrap()).unwrap()
    }

    #[test]
    fn ssh_user_cert_passes_the_shared_checks() {
        let ca = ca();
        let user = KeyPair::generate().unwrap();
        let roles = RolesExtension::every_device(vec!["access".into()]);
        let now = now_secs();
        let line = ca
            .sign_ssh_user(&SshUserCert {
                user: "alice",
                public_key: user.ssh_public(),
                principals: &["root".into(), "pi".into()],
                valid_after: now - 60,
                valid_before: now + 3600,
                permit_pty: true,
                permit_port_forwarding: true,
                permit_agent_forwarding: false,
                roles: &roles,
            })
            .unwrap();
        let cert = Certificate::from_openssh(&line).unwrap();
        let user_ca = PublicKey::from_openssh(&ca.bundle().user_ca).unwrap();
        let g = check_user_cert(&cert, &user_ca, "pi", now).unwrap();
        assert_eq!(g.user, "alice");
        assert!(g.permit_pty && g.permit_port_forwarding && !g.permit_agent_forwarding);
        assert_eq!(g.roles, roles);
        assert!(check_user_cert(&cert, &user_ca, "admin", now).is_err());
        // The host CA did not sign it.
        let host_ca = PublicKey::from_openssh(&ca.bundle().host_ca).unwrap();
        assert!(check_user_cert(&cert, &host_ca, "pi", now).is_err());
    }

    #[test]
    fn ssh_host_cert_names_device_and_cluster() {
        let ca = ca();
        let dev = KeyPair::generate().unwrap();
        let now = now_secs();
        let line = ca
            .sign_ssh_host("van-1", dev.ssh_public(), now - 60, now + 60)
            .unwrap();
        let cert = Certificate::from_openssh(&line).unwrap();
        let host_ca = PublicKey::from_openssh(&ca.bundle().host_ca).unwrap();
        check_host_cert(&cert, &host_ca, "van-1", now).unwrap();
        check_host_cert(&cert, &host_ca, "van-1.edge", now).unwrap();
        assert!(check_host_cert(&cert, &host_ca, "van-2", now).is_err());
    }

    #[test]
    fn x509_user_cert_carries_spiffe_groups_and_verifies() {
        use x509_parser::prelude::*;
        let ca = ca();
        let user = KeyPair::generate().unwrap();
        let now = now_secs();
        let groups = vec!["devs".to_string(), "ops".into(), "system:masters".into()];
        let pem = ca
            .sign_x509_user("alice", &groups, &user.spki_der(), now - 60, now + 3600)
            .unwrap();
        let der = keys::first_cert_der(&pem).unwrap();
        let (cluster, p) = edgeport_proto::tls::spiffe_of(&der).unwrap();
        assert_eq!(
            (cluster.as_str(), p),
            ("edge", Principal::User("alice".into()))
        );
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let orgs: Vec<&str> = cert
            .subject()
            .iter_organization()
            .map(|o| o.as_str().unwrap())
            .collect();
        assert_eq!(orgs, ["devs", "ops", "system:masters"]);
        let cn: Vec<&str> = cert
            .subject()
            .iter_common_name()
            .map(|o| o.as_str().unwrap())
            .collect();
        assert_eq!(cn, ["alice"]);
        assert_eq!(cert.public_key().raw, &user.spki_der()[..]);
        assert!(cert.validity().not_after.timestamp() as u64 == now + 3600);
        // webpki accepts it (so the CA's signature verifies) as a client certificate chaining to the CA.
        let roots = {
            let mut r = rustls::RootCertStore::empty();
            r.add(rustls_pki_types::CertificateDer::from(ca.x509_ca_der()))
                .unwrap();
            std::sync::Arc::new(r)
        };
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots,
            edgeport_proto::tls::provider(),
        )
        .build()
        .unwrap();
        let leaf = rustls_pki_types::CertificateDer::from(der);
        verifier
            .verify_client_cert(&leaf, &[], rustls_pki_types::UnixTime::now())
            .unwrap();
    }

    #[test]
    fn gateway_and_server_certs_verify_as_servers() {
        use rustls::client::danger::ServerCertVerifier as _;
        let ca = ca();
        let gw = KeyPair::generate().unwrap();
        let now = now_secs();
        let pem = ca
            .sign_x509_gateway(
                "gw-1",
                &gw.spki_der(),
                &["localhost".into()],
                &["127.0.0.1".parse().unwrap()],
                now - 60,
                now + 3600,
            )
            .unwrap();
        let der = keys::first_cert_der(&pem).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls_pki_types::CertificateDer::from(ca.x509_ca_der()))
            .unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            edgeport_proto::tls::provider(),
        )
        .build()
        .unwrap();
        for name in [GATEWAY_SERVER_NAME, "localhost", "127.0.0.1"] {
            verifier
                .verify_server_cert(
                    &rustls_pki_types::CertificateDer::from(der.clone()),
                    &[],
                    &rustls_pki_types::ServerName::try_from(name).unwrap(),
                    &[],
                    rustls_pki_types::UnixTime::now(),
                )
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let server = ca.server_cert(Some("127.0.0.1".parse().unwrap())).unwrap();
        assert_eq!(server.chain.len(), 2);
        verifier
            .verify_server_cert(
                &server.chain[0],
                &[],
                &rustls_pki_types::ServerName::try_from(AUTHORITY_SERVER_NAME).unwrap(),
                &[],
                rustls_pki_types::UnixTime::now(),
            )
            .unwrap();
    }

    #[test]
    fn the_bundle_is_signed_by_the_x509_ca() {
        use edgeport_proto::ca_bundle::BundleError;
        let ca = ca();
        let b = ca.bundle().clone();
        b.verify().unwrap();
        b.verify_pinned(&b.ca_pin).unwrap();
        b.check_same_cas(&b).unwrap();
        // A gateway that swaps in its own SSH CA is caught.
        let mut forged = b.clone();
        forged.user_ca = KeyPair::generate().unwrap().public_openssh();
        assert_eq!(forged.verify(), Err(BundleError::BadSignature));
        assert!(b.check_same_cas(&forged).is_err());
        // ... and so is one that re-signs with its own x509 CA, by the pin.
        let other = ca_named("edge");
        let theirs = other.bundle().clone();
        theirs.verify().unwrap();
        assert!(matches!(
            theirs.verify_pinned(&b.ca_pin),
            Err(BundleError::PinMismatch { .. })
        ));
        assert!(matches!(
            b.check_same_cas(&theirs),
            Err(BundleError::X509Rotated(_))
        ));
        let mut unsigned = b.clone();
        unsigned.signature.clear();
        assert_eq!(unsigned.verify(), Err(BundleError::Unsigned));
    }

    #[test]
    fn gateways_cannot_take_the_authoritys_name() {
        let ca = ca();
        let k = KeyPair::generate().unwrap();
        for name in [
            "authority.edgeport",
            "*.edgeport",
            "AUTHORITY.EDGEPORT",
            "x.y.edgeport",
        ] {
            let r = ca.sign_x509_gateway("gw", &k.spki_der(), &[name.into()], &[], 0, 100);
            assert!(r.is_err(), "{name} was accepted");
        }
        ca.sign_x509_gateway("gw", &k.spki_der(), &["gw.example.com".into()], &[], 0, 100)
            .unwrap();
    }

    fn ca_named(cluster: &str) -> CertAuthority {
        CertAuthority::new(cluster, CaKeys::generate(cluster).unwrap()).unwrap()
    }

    #[test]
    fn cas_survive_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let (a, created) = CertAuthority::load_or_create(&ca_dir, "edge").unwrap();
        assert!(created);
        let (b, created) = CertAuthority::load_or_create(&ca_dir, "edge").unwrap();
        assert!(!created);
        assert_eq!(a.bundle(), b.bundle());
        use std::os::unix::fs::PermissionsExt;
        for f in ["user_ca", "host_ca", "x509_ca.key"] {
            let mode = std::fs::metadata(ca_dir.join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        std::fs::remove_file(ca_dir.join("host_ca")).unwrap();
        assert!(matches!(
            CertAuthority::load_or_create(&ca_dir, "edge"),
            Err(CaError::Incomplete(_))
        ));
        let text = format!("{a:?} {:?}", CaKeys::load(&ca_dir).err());
        assert!(!text.contains("PRIVATE"));
    }

    #[test]
    fn x509_rotation_issues_from_the_new_ca_and_survives_a_restart() {
        use edgeport_proto::tls::verify_client_cert;
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let (ca, _) = CertAuthority::load_or_create(&ca_dir, "edge").unwrap();
        let before = ca.bundle();
        let old_der = keys::first_cert_der(&before.x509_ca_pem).unwrap();
        let dev = KeyPair::generate().unwrap();
        let now = now_secs();
        let device = |ca: &CertAuthority| {
            let pem = ca
                .sign_x509_device("dev1", &dev.spki_der(), now - 60, now + 3600)
                .unwrap();
            keys::first_cert_der(&pem).unwrap()
        };
        let gateway = |ca: &CertAuthority| {
            let pem = ca
                .sign_x509_gateway("gw", &dev.spki_der(), &[], &[], now - 60, now + 3600)
                .unwrap();
            keys::first_cert_der(&pem).unwrap()
        };
        let act = |ca: &CertAuthority, a: RotateAction| ca.rotate(CaKind::X509, &a, now).unwrap();
        act(&ca, RotateAction::Start { grace_secs: 60 });
        let init = ca.bundle();
        assert_eq!(init.x509_ca_ders().unwrap().len(), 2);
        before.check_successor(&init).unwrap();
        // init: the old CA still issues.
        verify_client_cert(&device(&ca), &old_der, "edge", now).unwrap();
        act(&ca, RotateAction::Advance);
        let update = ca.bundle();
        assert_ne!(update.ca_pin, before.ca_pin);
        before.check_successor(&update).unwrap();
        let new_der = keys::first_cert_der(&update.x509_ca_pem).unwrap();
        // update_clients: clients from the new CA, servers still from the old one; both CAs
        // are trusted.
        verify_client_cert(&device(&ca), &new_der, "edge", now).unwrap();
        assert!(verify_client_cert(&device(&ca), &old_der, "edge", now).is_err());
        verify_client_cert(&device(&ca), &ca.x509_ca_der(), "edge", now).unwrap();
        let gw = gateway(&ca);
        assert!(edgeport_proto::tls::validity(&gw).is_ok());
        let (_, gw_cert) = x509_parser::parse_x509_certificate(&gw).unwrap();
        let (_, old_cert) = x509_parser::parse_x509_certificate(&old_der).unwrap();
        assert_eq!(gw_cert.issuer(), old_cert.subject());
        act(&ca, RotateAction::Advance);
        let gw2 = gateway(&ca);
        let (_, gw_cert) = x509_parser::parse_x509_certificate(&gw2).unwrap();
        assert_ne!(gw_cert.issuer(), old_cert.subject());
        // A restart in the middle keeps the rotation.
        let (again, _) = CertAuthority::load_or_create(&ca_dir, "edge").unwrap();
        assert_eq!(again.bundle().x509_ca_pem, ca.bundle().x509_ca_pem);
        act(&again, RotateAction::Complete);
        let after = again.bundle();
        assert_eq!(after.x509_ca_ders().unwrap(), vec![new_der.clone()]);
        update.check_successor(&after).unwrap();
        assert!(before.check_successor(&after).is_err());
        // The new CA is the one on disk now.
        let (later, _) = CertAuthority::load_or_create(&ca_dir, "edge").unwrap();
        assert_eq!(later.x509_ca_der(), new_der);
    }
}
