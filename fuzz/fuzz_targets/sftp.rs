//! cargo-fuzz target `sftp`: runs `edge_agent::fuzz_entry::sftp` on each input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edge_agent::fuzz_entry::sftp(data));
