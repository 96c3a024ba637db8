//! The stable-Rust side of fuzzing: runs a crate's fuzz entry points (`fuzz_entry::TARGETS`)
//! on every file of their committed corpus (`fuzz/corpus/TARGET/`), then on proptest inputs:
//! random bytes and mutations of the corpus files (bytes flipped, inserted, removed,
//! overwritten, the input cut or spliced with another). `FUZZ_CASES` sets the number of
//! proptest cases per target (default 2000; `scripts/fuzz-smoke` raises it without nightly).
//! Included by each crate's `tests/fuzz_entries.rs` (`#[path]`), so there is one copy.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// `fuzz/corpus/TARGET` from a crate's manifest directory.
pub fn corpus_dir(manifest_dir: &str, target: &str) -> PathBuf {
    Path::new(manifest_dir).join("../fuzz/corpus").join(target)
}

/// The committed corpus of `target`, sorted by file name.
pub fn corpus(manifest_dir: &str, target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(manifest_dir, target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

/// Writes `seeds` as `fuzz/corpus/TARGET/seed-NN` (the corpus generators call this).
pub fn write_corpus(manifest_dir: &str, target: &str, seeds: &[Vec<u8>]) {
    let dir = corpus_dir(manifest_dir, target);
    std::fs::create_dir_all(&dir).unwrap();
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:02}")), s).unwrap();
    }
}

pub fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// One mutation: (what, where, a byte).
type Op = (u8, u16, u8);

fn mutate(seed: &[u8], other: &[u8], ops: &[Op]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for &(what, at, byte) in ops {
        let at = if v.is_empty() {
            0
        } else {
            usize::from(at) % v.len()
        };
        match what % 7 {
            0 if !v.is_empty() => v[at] ^= 1 << (byte % 8),
            1 if !v.is_empty() => v[at] = byte,
            2 => v.insert(at, byte),
            3 if !v.is_empty() => {
                v.remove(at);
            }
            4 => v.truncate(at),
            5 => {
                let from = usize::from(byte) % (other.len() + 1);
                v.splice(at..at, other[from..].iter().copied());
            }
            // Interesting integers in length fields and varints.
            _ if !v.is_empty() => v[at] = [0x00, 0x7f, 0x80, 0xff][usize::from(byte) % 4],
            _ => {}
        }
    }
    v
}

/// Runs `entry` on the corpus of `target`, then on `cases()` proptest inputs.
pub fn run(manifest_dir: &str, target: &str, entry: fn(&[u8])) {
    let seeds = corpus(manifest_dir, target);
    assert!(
        !seeds.is_empty(),
        "no corpus for {target} in {}",
        corpus_dir(manifest_dir, target).display()
    );
    for s in &seeds {
        entry(s);
    }
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        any::<bool>(),
        proptest::collection::vec(any::<u8>(), 0..1024),
        any::<prop::sample::Index>(),
        any::<prop::sample::Index>(),
        proptest::collection::vec(any::<Op>(), 1..8),
    );
    let result = runner.run(&strategy, |(random, bytes, a, b, ops)| {
        let input = if random {
            bytes
        } else {
            mutate(
                &seeds[a.index(seeds.len())],
                &seeds[b.index(seeds.len())],
                &ops,
            )
        };
        std::panic::catch_unwind(|| entry(&input))
            .map_err(|_| TestCaseError::fail(format!("{target} panicked on {input:02x?}")))
    });
    if let Err(e) = result {
        panic!("{target}: {e}");
    }
}
