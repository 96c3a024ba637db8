//! Hosts behind a device (issue 22): how a target is addressed (`DEVICE/TARGET`) and what the
//! authority tells about one (`tsh ls`, `tctl devices ls`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One target behind a device, as its device last reported it in its signed audit log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetInfo {
    pub device: String,
    pub name: String,
    /// `HOST:PORT` on the device's side, as configured on the agent.
    pub addr: String,
    /// The device's labels with the target's own on top (what roles match).
    pub labels: BTreeMap<String, String>,
    /// The agent's last TCP check: `None` when it has not checked yet.
    pub reachable: Option<bool>,
    /// Unix milliseconds of the last check (0: none).
    pub checked_ms: u64,
}

impl TargetInfo {
    /// `DEVICE/TARGET`, the name users give and the principal of its host certificate.
    pub fn address(&self) -> String {
        format!("{}/{}", self.device, self.name)
    }

    /// The last check as a word: `reachable`, `unreachable` or `unchecked`.
    pub fn status(&self) -> &'static str {
        match self.reachable {
            Some(true) => "reachable",
            Some(false) => "unreachable",
            None => "unchecked",
        }
    }
}

/// Splits `DEVICE/TARGET` into its two parts; `None` for a plain device name.
pub fn split(addr: &str) -> Option<(&str, &str)> {
    addr.split_once('/')
        .filter(|(d, t)| !d.is_empty() && !t.is_empty() && !t.contains('/'))
}

#[cfg(test)]
mod tests {
    #[test]
    fn addresses() {
        assert_eq!(super::split("van-42/ecu1"), Some(("van-42", "ecu1")));
        assert_eq!(super::split("van-42"), None);
        assert_eq!(super::split("/ecu1"), None);
        assert_eq!(super::split("a/b/c"), None);
    }
}
