//! Real peers (OpenSSH sshd, PostgreSQL, kube-apiserver, network namespaces) started by the
//! scripts in `tests/peers/`, which install what they need and stop exactly what they started.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Directory of the peer scripts (override with EDGEPORT_PEERS).
pub fn peers_dir() -> PathBuf {
    std::env::var_os("EDGEPORT_PEERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers"))
}

static N: AtomicUsize = AtomicUsize::new(0);

/// A started peer; `X.sh stop DIR` runs on drop.
pub struct Peer {
    script: PathBuf,
    pub dir: PathBuf,
    pub env: HashMap<String, String>,
}

impl Peer {
    /// `X.sh start DIR args...` with extra environment variables.
    pub fn start(script: &str, args: &[&str], envs: &[(&str, &str)]) -> Peer {
        let script = peers_dir().join(script);
        let dir = std::env::temp_dir().join(format!(
            "edgeport-peer-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let mut cmd = Command::new("bash");
        cmd.arg(&script).arg("start").arg(&dir).args(args);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run peer script");
        assert!(
            out.status.success(),
            "{}: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let env = crate::parse_env(&String::from_utf8_lossy(&out.stdout));
        Peer { script, dir, env }
    }

    pub fn get(&self, k: &str) -> &str {
        self.env.get(k).map(String::as_str).unwrap_or("")
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(&self.script)
            .arg("stop")
            .arg(&self.dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
