//! cargo-fuzz target `audit_batch`: runs `edgeport_proto::fuzz_entry::audit_batch` on each input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgeport_proto::fuzz_entry::audit_batch(data));
