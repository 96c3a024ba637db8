//! The embedded store: one sled database in `DATA/store`, one sled tree per [`Table`].

use std::collections::HashMap;
use std::path::Path;

use super::{Store, StoreError, Table};

pub struct SledStore {
    db: sled::Db,
    trees: HashMap<Table, sled::Tree>,
}

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl SledStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        // sled releases its file lock from a background thread after the last handle is
        // dropped, so a store closed a moment ago (a restart in the same process) may still
        // be locked: wait briefly. Another process holding it stays an error.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let db = loop {
            match sled::Config::new().path(path).open() {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if (e.kind() == std::io::ErrorKind::WouldBlock
                        || e.to_string().contains("could not acquire lock"))
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(StoreError::Backend(format!(
                        "cannot open {}: {e}",
                        path.display()
                    )))
                }
            }
        };
        let trees = Table::ALL
            .iter()
            .map(|t| Ok((*t, db.open_tree(t.name()).map_err(backend)?)))
            .collect::<Result<_, StoreError>>()?;
        Ok(Self { db, trees })
    }

    fn tree(&self, table: Table) -> Result<&sled::Tree, StoreError> {
        self.trees
            .get(&table)
            .ok_or_else(|| StoreError::Backend(format!("table {} is not open", table.name())))
    }
}

impl Store for SledStore {
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tree(table)?
            .get(key.as_bytes())
            .map_err(backend)?
            .map(|v| v.to_vec()))
    }

    fn put(&self, table: Table, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.tree(table)?
            .insert(key.as_bytes(), value)
            .map_err(backend)?;
        Ok(())
    }

    fn delete(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tree(table)?
            .remove(key.as_bytes())
            .map_err(backend)?
            .map(|v| v.to_vec()))
    }

    fn scan_prefix(
        &self,
        table: Table,
        prefix: &str,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.tree(table)?
            .scan_prefix(prefix.as_bytes())
            .map(|r| {
                let (k, v) = r.map_err(backend)?;
                Ok((String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
            })
            .collect()
    }

    fn scan_from(
        &self,
        table: Table,
        prefix: &str,
        from: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let start = if from > prefix { from } else { prefix };
        let mut out = Vec::new();
        for r in self.tree(table)?.range(start.as_bytes()..) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = r.map_err(backend)?;
            if !k.starts_with(prefix.as_bytes()) {
                break;
            }
            out.push((String::from_utf8_lossy(&k).into_owned(), v.to_vec()));
        }
        Ok(out)
    }

    fn compare_and_swap(
        &self,
        table: Table,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        Ok(self
            .tree(table)?
            .compare_and_swap(key.as_bytes(), expected, new)
            .map_err(backend)?
            .is_ok())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(backend)?;
        Ok(())
    }
}
