//! cargo-fuzz target `frame_dial`: runs `edgeport_proto::fuzz_entry::dial_frames` on each input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgeport_proto::fuzz_entry::dial_frames(data));
