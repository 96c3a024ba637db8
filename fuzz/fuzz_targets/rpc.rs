//! cargo-fuzz target `rpc`: runs `edgeport_proto::fuzz_entry::rpc_messages` on each input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgeport_proto::fuzz_entry::rpc_messages(data));
