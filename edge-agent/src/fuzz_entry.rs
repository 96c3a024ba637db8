//! Entry points for fuzzing what the agent parses of network input itself (the framed
//! protocols are fuzzed in `edgeport_proto::fuzz_entry`). The cargo-fuzz targets in `fuzz/`
//! and the proptest harness in `edge-agent/tests/fuzz_entries.rs` call these.

/// The SFTP tracker of the audit log, fed the bytes of one session in both directions.
/// Input: chunks, each one byte `D` then up to `D & 0x7f` bytes (both fuzzer-chosen); the
/// chunk goes to the server side when `D`'s top bit is set, else to the client side. So the
/// fuzzer chooses how the streams are cut as well as what they carry.
pub fn sftp(data: &[u8]) {
    let mut t = crate::audit::sftp::SftpTracker::new("s-1", "alice", "root");
    let mut rest = data;
    while let Some((&d, tail)) = rest.split_first() {
        let n = usize::from(d & 0x7f).min(tail.len());
        let (chunk, tail) = tail.split_at(n);
        if d & 0x80 != 0 {
            t.server(chunk);
        } else {
            t.client(chunk);
        }
        rest = tail;
    }
    t.finish();
}

/// The fuzz targets of this crate, by name (as in `fuzz/fuzz_targets/`).
pub const TARGETS: &[edgeport_proto::fuzz_entry::Target] = &[("sftp", sftp)];
