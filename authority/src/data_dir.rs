//! The authority's data directory:
//!
//! ```text
//! DATA/cluster          the cluster name, written at the first start
//! DATA/ca/              the three CAs (private keys 0600)
//! DATA/store/           the sled store
//! DATA/admin.identity   the administrator identity for tctl (0600)
//! ```
//!
//! A restart with another `--cluster` than the recorded one is refused: every certificate
//! names the cluster, so silently renaming it would break them all.

use std::path::{Path, PathBuf};

use edgeport_proto::util::{create_private_dir, valid_name, write_with_mode};

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("invalid cluster name {0:?}: 1 to 63 letters, digits, '.', '_' or '-'")]
    BadCluster(String),
    #[error(
        "{dir} belongs to cluster {recorded:?}, not {requested:?}; start with --cluster {recorded} or use another --data-dir"
    )]
    ClusterMismatch {
        dir: String,
        recorded: String,
        requested: String,
    },
    #[error("{path}: {err}")]
    Io { path: String, err: String },
}

#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.root.join("ca")
    }

    pub fn store_dir(&self) -> PathBuf {
        self.root.join("store")
    }

    pub fn admin_identity(&self) -> PathBuf {
        self.root.join("admin.identity")
    }

    fn cluster_file(&self) -> PathBuf {
        self.root.join("cluster")
    }

    fn io(&self, path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError + '_ {
        let path = path.display().to_string();
        move |e| DataDirError::Io {
            path,
            err: e.to_string(),
        }
    }

    /// Makes the directory (0700) and checks the cluster name against the recorded one.
    /// Returns whether this is the first start (no cluster recorded yet).
    pub fn prepare(&self, cluster: &str) -> Result<bool, DataDirError> {
        if !valid_name(cluster) {
            return Err(DataDirError::BadCluster(cluster.to_string()));
        }
        create_private_dir(&self.root).map_err(self.io(&self.root))?;
        let file = self.cluster_file();
        match std::fs::read_to_string(&file) {
            Ok(recorded) => {
                let recorded = recorded.trim();
                if recorded != cluster {
                    return Err(DataDirError::ClusterMismatch {
                        dir: self.root.display().to_string(),
                        recorded: recorded.to_string(),
                        requested: cluster.to_string(),
                    });
                }
                Ok(false)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(self.io(&file)(e)),
        }
    }

    /// This authority's id in the store's registry (`authorities`): made at the first start
    /// of this release and kept in `DATA/authority.id`, so a restart is the same authority.
    pub fn authority_id(&self) -> Result<String, DataDirError> {
        let file = self.root.join("authority.id");
        match std::fs::read_to_string(&file) {
            Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.io(&file)(e)),
        }
        let id = edgeport_proto::keys::random_bytes(8)
            .map(hex::encode)
            .map_err(|e| DataDirError::Io {
                path: file.display().to_string(),
                err: e.to_string(),
            })?;
        write_with_mode(&file, format!("{id}\n").as_bytes(), 0o644).map_err(self.io(&file))?;
        Ok(id)
    }

    /// Records the cluster name; done last at the first start, once the CAs exist.
    pub fn record_cluster(&self, cluster: &str) -> Result<(), DataDirError> {
        let file = self.cluster_file();
        write_with_mode(&file, format!("{cluster}\n").as_bytes(), 0o644).map_err(self.io(&file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_is_recorded_and_enforced() {
        let d = tempfile::tempdir().unwrap();
        let dir = DataDir::new(&d.path().join("data"));
        assert!(matches!(
            dir.prepare("bad name"),
            Err(DataDirError::BadCluster(_))
        ));
        assert!(dir.prepare("alpha").unwrap());
        dir.record_cluster("alpha").unwrap();
        assert!(!dir.prepare("alpha").unwrap());
        let e = dir.prepare("beta").unwrap_err().to_string();
        assert!(
            e.contains("belongs to cluster \"alpha\", not \"beta\""),
            "{e}"
        );
    }
}
