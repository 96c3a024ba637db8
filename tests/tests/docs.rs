//! docs/architecture.md ends with a table of every Rust file of the workspace, crate by
//! crate. This checks it against the tree, both ways: a file added, moved or removed without
//! its row fails here, as does a row for a file that no longer exists.

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const SECTION: &str = "## Files, crate by crate";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the repository")
        .to_path_buf()
}

/// The workspace members, read from the root Cargo.toml's `members = [...]`.
fn members(root: &Path) -> Vec<String> {
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let start = manifest.find("members").expect("a members list");
    let open = start + manifest[start..].find('[').unwrap();
    let close = open + manifest[open..].find(']').unwrap();
    manifest[open + 1..close]
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_string())
        .filter(|m| !m.is_empty())
        .collect()
}

fn rust_files(dir: &Path, root: &Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            rust_files(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(root).unwrap();
            out.insert(rel.to_string_lossy().into_owned());
        }
    }
}

/// The rows of the table: (file, what it does).
fn table_rows(doc: &str) -> Vec<(String, String)> {
    let section = doc
        .find(SECTION)
        .unwrap_or_else(|| panic!("docs/architecture.md has no section {SECTION:?}"));
    doc[section..]
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("| `")?;
            let (file, rest) = rest.split_once("` |")?;
            let what = rest.trim().trim_end_matches('|').trim();
            Some((file.to_string(), what.to_string()))
        })
        .collect()
}

#[test]
fn the_file_table_matches_the_tree() {
    let root = repo_root();
    let mut tree = BTreeSet::new();
    for member in members(&root) {
        rust_files(&root.join(&member), &root, &mut tree);
    }
    assert!(
        tree.len() > 50,
        "found only {} files: wrong root?",
        tree.len()
    );

    let doc = std::fs::read_to_string(root.join("docs/architecture.md")).unwrap();
    let rows = table_rows(&doc);
    let mut table = BTreeSet::new();
    for (file, what) in &rows {
        assert!(
            table.insert(file.clone()),
            "{file} has two rows in the table"
        );
        assert!(
            what.len() > 10,
            "{file}: say what the file does, not {what:?}"
        );
    }

    let missing: Vec<_> = tree.difference(&table).collect();
    let stale: Vec<_> = table.difference(&tree).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "docs/architecture.md's file table is out of date.\n  files without a row: {missing:?}\n  rows without a file: {stale:?}"
    );
}
