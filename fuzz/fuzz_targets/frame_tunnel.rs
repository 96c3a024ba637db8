//! cargo-fuzz target `frame_tunnel`: runs `edgeport_proto::fuzz_entry::tunnel_frames` on each input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgeport_proto::fuzz_entry::tunnel_frames(data));
