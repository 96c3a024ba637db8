//! Hosts behind this device (issue 22): `--target NAME=HOST:PORT` and the `DATA/targets`
//! file, one `NAME=HOST:PORT [key=value ...]` per line (`#` comments), re-read on SIGHUP.
//! The agent checks each one with a TCP connect every 30 s and reports them (name, address,
//! labels, reachable, last check) in its signed, hash-chained audit log, the one channel the
//! authority receives authenticated by the device's own key. Reaching a target as
//! `DEVICE/NAME` through the tunnel (relay mode) is `crate::relay`.
//!
//! A line may pin the target's host key, `hostkey=ssh-ed25519 AAAA...` (as recorded at
//! enrolment): the check then reads the key the target presents (`crate::hostkey`) and
//! reports a mismatch, and the agent hands the pin, signed, to tsh on each relayed stream.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// One configured target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    /// `HOST:PORT` as configured (a literal address or a name the device resolves).
    pub addr: String,
    pub labels: BTreeMap<String, String>,
    /// The pinned host key, `ssh-ed25519 BASE64`.
    pub hostkey: Option<String>,
    /// `mode=record`: the agent terminates the user's SSH and logs in to the target itself
    /// with a per-session certificate, recording the session (`crate::ssh::record`).
    pub record: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    #[error("{0:?}: expected NAME=HOST:PORT [key=value ...]")]
    Syntax(String),
    #[error("target name {0:?}: use letters, digits, '-', '_' and '.' (at most 63)")]
    Name(String),
    #[error("{0:?}: the port must be a number from 1 to 65535")]
    Port(String),
    #[error("label {0:?}: expected key=value")]
    Label(String),
    #[error("target {0:?} is configured twice")]
    Duplicate(String),
    #[error("hostkey: expected hostkey=ssh-ed25519 AAAA... (the target's Ed25519 host key)")]
    HostKey,
    #[error("mode={0:?}: expected mode=relay or mode=record")]
    Mode(String),
}

/// Why the target list could not be loaded: the file, or which line or flag is wrong.
#[derive(Debug, thiserror::Error)]
pub enum TargetsError {
    #[error("{path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("{path}:{line}: {err}")]
    Line {
        path: String,
        line: usize,
        err: TargetError,
    },
    #[error("--target: {0}")]
    Flag(TargetError),
}

/// Whether `name` may name a target (and so appear after `DEVICE/`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Parses one `NAME=HOST:PORT [key=value ...] [hostkey=ssh-ed25519 AAAA...]` line.
pub fn parse_line(line: &str) -> Result<Target, TargetError> {
    let mut words = line.split_whitespace();
    let first = words
        .next()
        .ok_or_else(|| TargetError::Syntax(line.into()))?;
    let (name, addr) = first
        .split_once('=')
        .ok_or_else(|| TargetError::Syntax(line.into()))?;
    if !valid_name(name) {
        return Err(TargetError::Name(name.into()));
    }
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| TargetError::Syntax(line.into()))?;
    if host.is_empty() {
        return Err(TargetError::Syntax(line.into()));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(TargetError::Port(addr.into())),
    }
    let mut labels = BTreeMap::new();
    let mut hostkey = None;
    let mut record = false;
    while let Some(w) = words.next() {
        if let Some(mode) = w.strip_prefix("mode=") {
            record = match mode {
                "record" => true,
                "relay" => false,
                other => return Err(TargetError::Mode(other.into())),
            };
            continue;
        }
        if let Some(kind) = w.strip_prefix("hostkey=") {
            let line = format!("{kind} {}", words.next().unwrap_or_default());
            edgeport_proto::keys::parse_ed25519_public(&line).map_err(|_| TargetError::HostKey)?;
            hostkey = Some(line);
            continue;
        }
        let (k, v) = w
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| TargetError::Label(w.into()))?;
        labels.insert(k.to_string(), v.to_string());
    }
    Ok(Target {
        name: name.into(),
        addr: addr.into(),
        labels,
        hostkey,
        record,
    })
}

/// The targets of the command line followed by those of `DATA/targets` (absent: none).
pub fn load(data_dir: &Path, cli: &[String]) -> Result<Vec<Target>, TargetsError> {
    let mut out: Vec<Target> = Vec::new();
    let file = data_dir.join("targets");
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(err) => {
            return Err(TargetsError::Read {
                path: file.display().to_string(),
                err,
            })
        }
    };
    let lines = cli
        .iter()
        .map(|l| (None, l.as_str()))
        .chain(text.lines().enumerate().map(|(i, l)| (Some(i + 1), l)));
    for (lineno, line) in lines {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let where_ = |err: TargetError| match lineno {
            Some(line) => TargetsError::Line {
                path: file.display().to_string(),
                line,
                err,
            },
            None => TargetsError::Flag(err),
        };
        let t = parse_line(line).map_err(where_)?;
        if out.iter().any(|o| o.name == t.name) {
            return Err(where_(TargetError::Duplicate(t.name)));
        }
        out.push(t);
    }
    Ok(out)
}

/// How often the agent checks that each target accepts TCP connections.
const CHECK_INTERVAL: Duration = Duration::from_secs(30);
/// A connection to a target (check or session) that takes longer than this failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The target report goes into the audit log at least this often (its check times).
const REPORT_INTERVAL: Duration = Duration::from_secs(600);

/// The last check of one target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Check {
    reachable: bool,
    /// Unix milliseconds (0: not checked yet).
    at_ms: u64,
    /// A pinned target: whether it presented the pinned key (`None`: not read).
    key_ok: Option<bool>,
}

/// The targets of this agent as they are now, with their last checks.
pub struct TargetSet {
    data_dir: PathBuf,
    cli: Vec<String>,
    list: RwLock<Vec<Target>>,
    checks: Mutex<BTreeMap<String, Check>>,
    /// Wakes the checker after a reload.
    changed: tokio::sync::Notify,
}

impl TargetSet {
    /// Loads the targets of `--target` and `DATA/targets`.
    pub fn new(data_dir: &Path, cli: &[String]) -> Result<Arc<Self>, TargetsError> {
        let list = load(data_dir, cli)?;
        Ok(Arc::new(Self {
            data_dir: data_dir.to_path_buf(),
            cli: cli.to_vec(),
            list: RwLock::new(list),
            checks: Mutex::new(BTreeMap::new()),
            changed: tokio::sync::Notify::new(),
        }))
    }

    /// Reads the targets again (SIGHUP). A file that does not parse keeps the old set.
    pub fn reload(&self) -> Result<usize, TargetsError> {
        let list = load(&self.data_dir, &self.cli)?;
        let n = list.len();
        if let Ok(mut l) = self.list.write() {
            *l = list;
        }
        self.changed.notify_one();
        Ok(n)
    }

    fn snapshot(&self) -> Vec<Target> {
        self.list.read().map(|l| l.clone()).unwrap_or_default()
    }

    /// The configured target of that name.
    pub fn get(&self, name: &str) -> Option<Target> {
        self.snapshot().into_iter().find(|t| t.name == name)
    }

    /// The report of every target for the authority, as one audit event (signed and chained
    /// like every other, so the authority believes only what this device said): for each
    /// target `t.NAME` = `HOST:PORT [key=value ...]`, `up.NAME` = `yes|no|unknown` and
    /// `checked.NAME` = the last check, Unix milliseconds.
    fn report(&self) {
        let checks = self.checks.lock().map(|c| c.clone()).unwrap_or_default();
        let mut ev = crate::audit::event("targets").field("count", self.snapshot().len());
        for t in self.snapshot() {
            let mut line = t.addr.clone();
            for (k, v) in &t.labels {
                line.push_str(&format!(" {k}={v}"));
            }
            let c = checks.get(&t.name).copied().unwrap_or_default();
            if t.record {
                ev = ev.field(&format!("mode.{}", t.name), "record");
            }
            let up = match (c.at_ms, c.reachable) {
                (0, _) => "unknown",
                (_, true) => "yes",
                (_, false) => "no",
            };
            ev = ev
                .field(&format!("t.{}", t.name), line)
                .field(&format!("up.{}", t.name), up)
                .field(&format!("checked.{}", t.name), c.at_ms);
            if let Some(pin) = &t.hostkey {
                let key = match c.key_ok {
                    Some(true) => "ok",
                    Some(false) => "mismatch",
                    None => "unknown",
                };
                ev = ev
                    .field(&format!("pin.{}", t.name), pin)
                    .field(&format!("hostkey.{}", t.name), key);
            }
        }
        ev.emit();
    }

    /// Checks every target now; true when a target's reachability changed.
    async fn check_all(&self) -> bool {
        let mut changed = false;
        for t in self.snapshot() {
            let (reachable, key_ok, mismatch) = check_one(&t).await;
            let now = crate::audit::now_ms();
            let Ok(mut checks) = self.checks.lock() else {
                continue;
            };
            let new = Check {
                reachable,
                at_ms: now,
                key_ok,
            };
            let old = checks.insert(t.name.clone(), new);
            // A mismatch is logged and audited when it is first seen (and again after a
            // check that saw the pinned key).
            if let Some((want, got)) =
                mismatch.filter(|_| old.and_then(|o| o.key_ok) != Some(false))
            {
                tracing::warn!(target = %t.name, addr = %t.addr, %want, %got, "host key mismatch");
                crate::audit::event("target.hostkey_mismatch")
                    .field("target", &t.name)
                    .field("addr", &t.addr)
                    .field("pinned", want)
                    .field("presented", got)
                    .field("error", "host key mismatch")
                    .emit();
            }
            if old.map(|o| (o.reachable, o.key_ok)) != Some((reachable, key_ok)) {
                tracing::info!(target = %t.name, addr = %t.addr, reachable, "target check");
                changed = true;
            }
        }
        changed
    }

    /// Checks the targets every [`CHECK_INTERVAL`] and reports them to the audit log when
    /// something changed (or every [`REPORT_INTERVAL`]).
    pub async fn run_checks(self: Arc<Self>, shutdown: CancellationToken) {
        let mut last_report: Option<Instant> = None;
        let mut reload = true;
        loop {
            let changed = self.check_all().await;
            if changed || reload || last_report.is_none_or(|t| t.elapsed() >= REPORT_INTERVAL) {
                self.report();
                last_report = Some(Instant::now());
            }
            tokio::select! {
                _ = tokio::time::sleep(CHECK_INTERVAL) => reload = false,
                _ = self.changed.notified() => reload = true,
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// A pinned target presented another key: the pinned and the presented fingerprints.
type Mismatch = Option<(String, String)>;

/// Checks one target: reachable, and for a pinned one whether it presented the pinned key.
async fn check_one(t: &Target) -> (bool, Option<bool>, Mismatch) {
    let Ok(stream) = connect(&t.addr).await else {
        return (false, None, None);
    };
    let Some(pin) = t.hostkey.as_deref() else {
        return (true, None, None);
    };
    let read = tokio::time::timeout(CONNECT_TIMEOUT, crate::hostkey::read_host_key(stream)).await;
    let presented = match read {
        Ok(Ok(blob)) => blob,
        Ok(Err(e)) => {
            tracing::info!(target = %t.name, "cannot read the target's host key: {e}");
            return (true, None, None);
        }
        Err(_) => return (true, None, None),
    };
    let pinned = crate::hostkey::blob_of(pin).unwrap_or_default();
    if presented == pinned {
        return (true, Some(true), None);
    }
    let fps = (
        crate::hostkey::fingerprint(&pinned),
        crate::hostkey::fingerprint(&presented),
    );
    (true, Some(false), Some(fps))
}

/// Reads the targets again on every SIGHUP; a file that does not parse is logged and the
/// old set kept.
pub async fn reload_on_hangup(set: Arc<TargetSet>, shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!("cannot watch SIGHUP, targets are not reloaded: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            r = hup.recv() => if r.is_none() { return },
            _ = shutdown.cancelled() => return,
        }
        match set.reload() {
            Ok(n) => tracing::info!(targets = n, "targets reloaded"),
            Err(e) => tracing::error!("targets not reloaded, keeping the old ones: {e}"),
        }
    }
}

/// Connects to a configured target address: a literal address as it is, a name through
/// the system's resolver.
pub async fn connect(addr: &str) -> std::io::Result<TcpStream> {
    let go = async {
        match addr.parse::<SocketAddr>() {
            Ok(a) => TcpStream::connect(a).await,
            Err(_) => TcpStream::connect(addr).await,
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, go)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "timed out",
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let t = parse_line("ecu1=192.168.7.10:22 zone=engine fleet=vans").unwrap();
        assert_eq!(t.name, "ecu1");
        assert_eq!(t.addr, "192.168.7.10:22");
        assert_eq!(t.labels.get("zone").map(String::as_str), Some("engine"));
        assert!(parse_line("ecu1=[fd00::1]:22").is_ok());
        assert!(matches!(parse_line("ecu1"), Err(TargetError::Syntax(_))));
        assert!(matches!(parse_line("a/b=h:22"), Err(TargetError::Name(_))));
        assert!(matches!(parse_line("a=h:0"), Err(TargetError::Port(_))));
        assert!(matches!(parse_line("a=h:22 x"), Err(TargetError::Label(_))));
        let key = edgeport_proto::keys::KeyPair::generate()
            .unwrap()
            .public_openssh();
        let key = key.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        let t = parse_line(&format!("ecu1=10.0.0.1:22 hostkey={key} zone=engine")).unwrap();
        assert_eq!(t.hostkey.as_deref(), Some(key.as_str()));
        assert_eq!(t.labels.len(), 1);
        assert!(!t.record);
        assert!(parse_line("ecu1=10.0.0.1:22 mode=record").unwrap().record);
        assert_eq!(
            parse_line("ecu1=10.0.0.1:22 mode=x"),
            Err(TargetError::Mode("x".into()))
        );
        assert_eq!(
            parse_line("ecu1=10.0.0.1:22 hostkey=ssh-ed25519 AAAA"),
            Err(TargetError::HostKey)
        );
        assert_eq!(
            parse_line("ecu1=10.0.0.1:22 hostkey=ssh-ed25519"),
            Err(TargetError::HostKey)
        );
    }

    #[test]
    fn file_and_cli() {
        let dir = std::env::temp_dir().join(format!("edgeport-targets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("targets"),
            "# behind the van\n\ncam=10.0.0.2:22 kind=camera\n",
        )
        .unwrap();
        let ts = load(&dir, &["ecu1=10.0.0.1:22".into()]).unwrap();
        assert_eq!(ts.len(), 2);
        let e = load(&dir, &["cam=10.0.0.9:22".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains(":3:") && e.contains("twice"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn checks_and_reload() {
        let dir = std::env::temp_dir().join(format!("edgeport-tcheck-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let down = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let down_addr = down.local_addr().unwrap();
        drop(down);
        let cli = vec![
            format!("up={} zone=a", up.local_addr().unwrap()),
            format!("down={down_addr}"),
        ];
        let set = TargetSet::new(&dir, &cli).unwrap();
        assert!(set.check_all().await, "the first check is a change");
        let checks = set.checks.lock().unwrap().clone();
        assert!(checks["up"].reachable && checks["up"].at_ms > 0);
        assert!(!checks["down"].reachable);
        assert!(!set.check_all().await, "nothing changed");
        std::fs::write(dir.join("targets"), "cam=10.0.0.2:22\n").unwrap();
        assert_eq!(set.reload().unwrap(), 3);
        assert_eq!(set.get("cam").unwrap().addr, "10.0.0.2:22");
        std::fs::write(dir.join("targets"), "broken\n").unwrap();
        assert!(set.reload().is_err());
        assert!(set.get("cam").is_some(), "a bad file keeps the old set");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
