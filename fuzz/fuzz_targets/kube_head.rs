//! cargo-fuzz target `kube_head`: runs `edgeport_gateway::fuzz_entry::kube_request_head` on each input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgeport_gateway::fuzz_entry::kube_request_head(data));
