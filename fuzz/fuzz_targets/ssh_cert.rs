//! cargo-fuzz target `ssh_cert`: runs `edgeport_proto::fuzz_entry::ssh_cert` on each input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgeport_proto::fuzz_entry::ssh_cert(data));
