//! cargo-fuzz target `sso_callback`: runs `edgeport_authority::fuzz_entry::sso_callback` on each input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgeport_authority::fuzz_entry::sso_callback(data));
