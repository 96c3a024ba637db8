//! Byte accounting (issue 23): what a device's agent moved per service, as it reports it.
//!
//! The agent keeps counters since it started and sends the whole set now and then over its
//! control stream; the gateway passes the latest set on with the device's presence, and the
//! authority adds what grew since the set before to the device's daily totals. A report is a
//! snapshot, not a delta, so a report sent twice or lost changes nothing.

use serde::{Deserialize, Serialize};

/// The services an agent counts, in the order it reports them.
pub const SERVICES: [&str; 7] = [
    "ssh", "sftp", "forward", "kube", "control", "audit", "target",
];

/// Most services one report may carry, and the longest service name (longer ones are
/// dropped by the authority).
pub const MAX_SERVICES: usize = 16;
pub const MAX_SERVICE_NAME: usize = 16;

/// Bytes one service moved: `up` leaves the device, `down` reaches it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceBytes {
    pub service: String,
    pub up: u64,
    pub down: u64,
}

/// An agent's counters since it started (`since`, Unix seconds).
///
/// `ssh` is every byte of the SSH connections (encrypted, as they cross the tunnel); `sftp`
/// (SFTP and scp programs) and `forward` (port forwarding) are the part of it those channels
/// carried, counted as channel data. `control` is the tunnel's control stream without the
/// audit batches, which are `audit`; `target` the bytes relayed to hosts behind the device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    pub since: u64,
    pub services: Vec<ServiceBytes>,
}

/// A device's bytes over a period, as `tctl devices usage` shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceUsage {
    pub device: String,
    /// The first day (Unix seconds at 00:00 UTC) the totals cover.
    pub from: u64,
    pub services: Vec<ServiceBytes>,
}
