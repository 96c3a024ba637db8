//! The `sso_callback` fuzz target (`edgeport_authority::fuzz_entry`) on stable Rust: its committed corpus
//! (`fuzz/corpus/sso_callback/`) and a few thousand proptest inputs, random and mutated seeds
//! (`FUZZ_CASES` to change how many; see proto's `tests/support/fuzz_harness.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../proto/tests/support/fuzz_harness.rs"]
mod harness;

#[test]
fn sso_callback() {
    for (name, entry) in edgeport_authority::fuzz_entry::TARGETS {
        harness::run(env!("CARGO_MANIFEST_DIR"), name, *entry);
    }
}
