//! Agent updates (`tctl devices update`), delivered by the gateway on a `Service::Update`
//! stream: the authority's signed manifest, then the binary. The gateway is only the
//! messenger: the manifest must verify with a host CA this device trusts, name this cluster
//! and device and not be expired, and the bytes must have the manifest's size and SHA-256.
//! Then the binary is written beside the running one (fsync), the running one is kept as
//! `edge-agent.prev` (a hard link), and an atomic rename puts the new one in place. Before the
//! agent re-executes itself (same PID, so systemd or the init script keep supervising it), it
//! starts a watchdog from the previous binary (`edge-agent update-watchdog`): if the new
//! agent has not brought its tunnel up (it removes `DATA/update.pending`) by the deadline,
//! the watchdog puts the previous binary back, kills the new agent and starts the previous
//! one in its place (or leaves that to the supervisor: systemd, the BusyBox run script);
//! that agent audits the rollback (`agent.update_rollback`).

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use edgeport_net::{read_frame, write_frame, BoxedStream};
use edgeport_proto::update::{ManifestError, SignedManifest, UpdateReply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Present while an update waits for the new agent's tunnel (holds the new binary's hash).
pub const PENDING: &str = "update.pending";
/// Left by the watchdog after a rollback (holds the refused binary's hash).
pub const ROLLED_BACK: &str = "update.rolledback";

static DATA_DIR: OnceLock<PathBuf> = OnceLock::new();
static VERSION: OnceLock<String> = OnceLock::new();

/// This agent's version with the short SHA-256 of its binary, as presence reports it.
pub fn version() -> &'static str {
    VERSION.get_or_init(|| {
        let hash = std::env::current_exe()
            .and_then(std::fs::read)
            .map(|b| edgeport_proto::keys::sha256_hex(&b))
            .unwrap_or_default();
        edgeport_proto::update::version_with_hash(edgeport_proto::VERSION, &hash)
    })
}

/// At start: remembers the data dir, and audits a rollback the watchdog left a note of.
pub fn started(data_dir: &Path) {
    let _ = DATA_DIR.set(data_dir.to_path_buf());
    let note = data_dir.join(ROLLED_BACK);
    if let Ok(hash) = std::fs::read_to_string(&note) {
        tracing::warn!(refused = %hash.trim(), "an agent update did not come online in time; rolled back to this binary");
        crate::audit::event("agent.update_rollback")
            .field("refused_sha256", hash.trim())
            .field("running", version())
            .emit();
        let _ = std::fs::remove_file(note);
    }
}

/// The tunnel is up: an update in progress succeeded (the watchdog stands down).
pub fn online() {
    if let Some(dir) = DATA_DIR.get() {
        if std::fs::remove_file(dir.join(PENDING)).is_ok() {
            tracing::info!(
                version = version(),
                "agent update complete: the tunnel is up on the new binary"
            );
            crate::audit::event("agent.update_done")
                .field("running", version())
                .emit();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{0}")]
    Io(String),
}

fn io(what: &str, e: impl std::fmt::Display) -> UpdateError {
    UpdateError::Io(format!("{what}: {e}"))
}

/// Who this device is, for checking a manifest.
pub struct Me {
    pub cluster: String,
    pub device: String,
    pub host_cas: Vec<Vec<u8>>,
}

/// Serves one update stream: checks, installs, answers, then re-executes the new binary.
pub async fn serve(mut stream: BoxedStream, me: Me) {
    let result = receive(&mut stream, &me).await;
    let reply = match &result {
        Ok(_) => UpdateReply {
            accepted: true,
            message: "installed; restarting on the new binary".into(),
        },
        Err(e) => UpdateReply {
            accepted: false,
            message: e.to_string(),
        },
    };
    match &result {
        Ok(_) => tracing::info!("agent update installed; restarting"),
        Err(e) => tracing::error!("agent update refused: {e}"),
    }
    crate::audit::event("agent.update_received")
        .field("accepted", reply.accepted.to_string())
        .field("message", &reply.message)
        .emit();
    let _ = write_frame(&mut stream, &reply).await;
    let _ = stream.shutdown().await;
    let Ok((exe, rollback_secs)) = result else {
        return;
    };
    // Let the answer reach the gateway (it closes the stream once read), then flush audit.
    let mut end = [0u8; 1];
    let _ = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut end)).await;
    let _ = tokio::task::spawn_blocking(|| crate::audit::flush(Duration::from_secs(2))).await;
    let e = restart(&exe, rollback_secs);
    tracing::error!("cannot restart on the new binary: {e}");
}

/// Reads and checks the manifest and the bytes, and puts the binary in place; returns the
/// path of the (new) executable and the rollback deadline.
async fn receive(stream: &mut BoxedStream, me: &Me) -> Result<(PathBuf, u64), UpdateError> {
    let signed: SignedManifest = read_frame(stream)
        .await
        .map_err(|e| io("reading the manifest", e))?;
    let now = edgeport_net::clock::now_secs();
    let m = signed.verify(&me.host_cas, &me.cluster, &me.device, now)?;
    let exe = std::env::current_exe().map_err(|e| io("the running binary", e))?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let name = exe
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let new = dir.join(format!(".{name}.new"));
    // A short read, a full disk or a wrong hash must not leave a partial binary behind.
    let file = match write_checked(stream, &new, m.size, &m.sha256).await {
        Ok(file) => file,
        Err(e) => {
            let _ = std::fs::remove_file(&new);
            return Err(e);
        }
    };
    install(&exe, &new, file)?;
    if let Some(data) = DATA_DIR.get() {
        edgeport_proto::util::write_private(&data.join(PENDING), m.sha256.as_bytes())
            .map_err(|e| io("the update marker", e))?;
    }
    Ok((exe, m.rollback_secs))
}

/// Receives `size` bytes into a new file at `path`, which must hash to `sha256` (hex).
async fn write_checked(
    stream: &mut BoxedStream,
    path: &Path,
    size: u64,
    sha256: &str,
) -> Result<std::fs::File, UpdateError> {
    let mut file = std::fs::File::create(path).map_err(|e| io("writing the new binary", e))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let (mut left, mut buf) = (size, vec![0u8; 64 * 1024]);
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(buf.len()));
        let n = stream
            .read(&mut buf[..want])
            .await
            .map_err(|e| io("receiving the binary", e))?;
        if n == 0 {
            return Err(UpdateError::Io(format!(
                "the binary ended {left} bytes short"
            )));
        }
        ctx.update(&buf[..n]);
        file.write_all(&buf[..n])
            .map_err(|e| io("writing the new binary", e))?;
        left -= n as u64;
    }
    let got = hex::encode(ctx.finish());
    if got != sha256 {
        return Err(ManifestError::HashMismatch {
            got,
            want: sha256.to_string(),
        }
        .into());
    }
    Ok(file)
}

/// Makes `new` executable and durable, keeps the running binary as `NAME.prev`, and renames
/// `new` over the running binary (atomic: the path always holds a whole binary).
fn install(exe: &Path, new: &Path, file: std::fs::File) -> Result<(), UpdateError> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(0o755))
        .map_err(|e| io("the new binary's mode", e))?;
    file.sync_all()
        .map_err(|e| io("syncing the new binary", e))?;
    let prev = prev_path(exe);
    let _ = std::fs::remove_file(&prev);
    std::fs::hard_link(exe, &prev)
        .or_else(|_| std::fs::copy(exe, &prev).map(|_| ()))
        .map_err(|e| io("keeping the previous binary", e))?;
    std::fs::rename(new, exe).map_err(|e| io("switching binaries", e))?;
    if let Some(dir) = exe.parent() {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

fn prev_path(exe: &Path) -> PathBuf {
    let mut p = exe.as_os_str().to_owned();
    p.push(".prev");
    PathBuf::from(p)
}

/// Starts the watchdog from the previous binary, then executes the new one in this process.
/// Returns only on failure.
fn restart(exe: &Path, rollback_secs: u64) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let data = DATA_DIR.get().cloned().unwrap_or_default();
    let deadline = edgeport_net::clock::now_secs() + rollback_secs;
    let watchdog = std::process::Command::new(prev_path(exe))
        .arg("update-watchdog")
        .arg(std::process::id().to_string())
        .arg(&data)
        .arg(deadline.to_string())
        .arg(exe)
        .args(&args)
        .status();
    if let Err(e) = watchdog {
        return e;
    }
    std::process::Command::new(exe).args(&args).exec()
}

/// `edge-agent update-watchdog PID DATA_DIR DEADLINE EXE ARGS...` (hidden): first detaches
/// (runs itself again and exits, so the agent does not keep a child), then waits for the new
/// agent's tunnel and rolls back if it does not come up by DEADLINE (Unix seconds).
pub fn watchdog(args: Vec<OsString>) -> i32 {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("EDGEPORT_WATCHDOG_DETACHED").is_none() {
        let me = std::env::current_exe().unwrap_or_default();
        let spawned = std::process::Command::new(me)
            .arg("update-watchdog")
            .args(&args)
            .env("EDGEPORT_WATCHDOG_DETACHED", "1")
            .process_group(0)
            .spawn();
        return i32::from(spawned.is_err());
    }
    std::env::remove_var("EDGEPORT_WATCHDOG_DETACHED");
    let [pid, data, deadline, exe, rest @ ..] = args.as_slice() else {
        eprintln!("error: update-watchdog PID DATA_DIR DEADLINE EXE ARGS...");
        return 2;
    };
    let pid: i32 = pid.to_string_lossy().parse().unwrap_or(0);
    let deadline: u64 = deadline.to_string_lossy().parse().unwrap_or(0);
    let (data, exe) = (Path::new(data), Path::new(exe));
    let pending = data.join(PENDING);
    let start = Instant::now();
    while edgeport_net::clock::now_secs() < deadline && start.elapsed() < Duration::from_secs(3600)
    {
        if !pending.exists() {
            return 0;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if !pending.exists() || pid <= 1 {
        return 0;
    }
    let refused = std::fs::read_to_string(&pending).unwrap_or_default();
    eprintln!("edge-agent update-watchdog: the new agent did not come online by the deadline; rolling back");
    if let Err(e) = std::fs::rename(prev_path(exe), exe) {
        eprintln!("edge-agent update-watchdog: cannot put the previous binary back: {e}");
        return 1;
    }
    let _ = edgeport_proto::util::write_private(&data.join(ROLLED_BACK), refused.as_bytes());
    let _ = std::fs::remove_file(&pending);
    // The new agent never brought its tunnel up: it holds nothing worth a clean stop.
    kill(pid);
    // A supervisor starts the agent again by itself (systemd sets INVOCATION_ID; the BusyBox
    // run script sets EDGEPORT_SUPERVISED): a second agent would fight it for the tunnel.
    if std::env::var_os("INVOCATION_ID").is_some()
        || std::env::var_os("EDGEPORT_SUPERVISED").is_some()
    {
        return 0;
    }
    let e = std::process::Command::new(exe).args(rest).exec();
    eprintln!("edge-agent update-watchdog: cannot start the previous binary: {e}");
    1
}

#[allow(unsafe_code)]
fn kill(pid: i32) {
    // SAFETY: kill(2) with a plain PID and signal number touches no memory of ours.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeport_proto::update::Manifest;
    use ring::signature::KeyPair;

    fn me(ca: &ring::signature::Ed25519KeyPair) -> Me {
        Me {
            cluster: "edge".into(),
            device: "van-1".into(),
            host_cas: vec![ca.public_key().as_ref().to_vec()],
        }
    }

    fn key() -> ring::signature::Ed25519KeyPair {
        let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .unwrap();
        ring::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap()
    }

    /// Sends a manifest for `signed_for` (signed by `signer`) and then `sent` as the bytes;
    /// returns what `receive` made of it.
    async fn offer(
        signer: &ring::signature::Ed25519KeyPair,
        ca: &ring::signature::Ed25519KeyPair,
        signed_for: &[u8],
        sent: &[u8],
    ) -> Result<(PathBuf, u64), UpdateError> {
        let now = edgeport_net::clock::now_secs();
        let m = Manifest {
            id: "u".into(),
            cluster: "edge".into(),
            sha256: edgeport_proto::keys::sha256_hex(signed_for),
            size: signed_for.len() as u64,
            devices: vec!["van-1".into()],
            labels: Default::default(),
            rollback_secs: 60,
            issued_at: now,
            expires_at: now + 60,
        };
        let signed = SignedManifest::issue(&m, |b| signer.sign(b).as_ref().to_vec());
        let (a, mut g) = tokio::io::duplex(1 << 20);
        write_frame(&mut g, &signed).await.unwrap();
        g.write_all(sent).await.unwrap();
        let mut s: BoxedStream = Box::new(a);
        receive(&mut s, &me(ca)).await
    }

    /// What a gateway can do to an update in transit: replace the bytes (the hash no longer
    /// matches) or sign its own manifest (no host CA key): both refused in one line, and
    /// nothing is installed. (A good update is exercised end to end in tests/tests/agent_update.rs,
    /// because it replaces the running binary.)
    #[tokio::test]
    async fn tampered_updates_are_refused() {
        let (ca, rogue) = (key(), key());
        let good = b"\x7fELF new agent".to_vec();
        let mut evil = good.clone();
        evil[5] ^= 1;
        let e = offer(&ca, &ca, &good, &evil).await.unwrap_err();
        assert!(
            matches!(e, UpdateError::Manifest(ManifestError::HashMismatch { .. })),
            "{e}"
        );
        assert!(
            e.to_string()
                .starts_with("the received binary's SHA-256 is "),
            "{e}"
        );
        let e = offer(&rogue, &ca, &evil, &evil).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "the update's signature does not verify with the cluster's host CA"
        );
        let exe = std::env::current_exe().unwrap();
        let name = exe.file_name().unwrap().to_string_lossy().into_owned();
        assert!(!exe.with_file_name(format!(".{name}.new")).exists());
        assert!(!prev_path(&exe).exists());
    }
}
