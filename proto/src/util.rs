//! Small helpers every component needs: private files, names, label parsing, durations and
//! times (formatting only: the clock is `edgeport_net::clock`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// Equal, in a time that does not depend on where they differ (secrets, codes, hashes).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Implements `Debug` for a struct that holds secrets: the listed plain fields are shown, the
/// secret ones print as `<redacted>`, so a `{:?}` in a log line can never leak them.
#[macro_export]
macro_rules! debug_redacted {
    ($ty:ident { $($field:ident),* $(,)? } secret { $($secret:ident),* $(,)? }) => {
        impl std::fmt::Debug for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($ty))
                    $(.field(stringify!($field), &self.$field))*
                    $(.field(stringify!($secret), &"<redacted>"))*
                    .finish()
            }
        }
    };
}

/// Writes `data` to `path` with mode 0600, atomically (temporary file, fsync, rename).
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_with_mode(path, data, 0o600)
}

/// Writes `data` to `path` with the given mode, atomically.
pub fn write_with_mode(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp{}", std::process::id()));
    // A leftover temporary (a crash) or a planted one (a symlink, a file with a looser mode)
    // must not be reused: remove it and create the file afresh, refusing to follow links.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    // The umask may have narrowed the mode; make it exactly `mode`.
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Makes `dir` (and parents) with mode 0700.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// A name of a user, device, gateway, login or cluster: 1 to 63 characters, ASCII letters,
/// digits, `.`, `_` and `-`, starting with a letter or digit.
pub fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

#[derive(Debug, thiserror::Error)]
#[error("invalid label {0:?}: expected key=value with names of letters, digits, '.', '_' or '-'")]
pub struct LabelError(pub String);

/// Parses `k=v,k2=v2` (empty input gives no labels).
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, LabelError> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| LabelError(part.to_string()))?;
        if !valid_name(k) || !(v.is_empty() || valid_name(v)) {
            return Err(LabelError(part.to_string()));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// Formats labels as `k=v,k2=v2`.
pub fn format_labels(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("invalid duration {0:?} (examples: 90s, 30m, 12h, 7d)")]
    Invalid(String),
    #[error("duration {0:?} is too large")]
    TooLarge(String),
}

/// Parses durations such as `90s`, `30m`, `12h`, `7d` or a bare number of seconds.
pub fn parse_duration_secs(s: &str) -> Result<u64, DurationError> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86400),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| DurationError::Invalid(s.to_string()))?;
    n.checked_mul(mult)
        .ok_or_else(|| DurationError::TooLarge(s.to_string()))
}

/// Formats a number of seconds as `1h2m3s`.
pub fn format_duration(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m"),
    }
}

/// Formats Unix seconds as an RFC 3339 UTC timestamp.
pub fn format_time(unix: u64) -> String {
    let days = unix / 86400;
    let rem = unix % 86400;
    let (y, mo, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Why a gateway's peer address is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("peer address {addr:?}: {why}")]
pub struct PeerAddrError {
    pub addr: String,
    pub why: &'static str,
}

/// Checks a gateway's peer address (`HOST:PORT` or `[V6]:PORT`, where other gateways of the
/// cluster reach it): a sane length, a port that parses and is not 0, a host of name or
/// address characters that is not a wildcard address (which no peer could dial).
pub fn check_peer_addr(addr: &str) -> Result<(), PeerAddrError> {
    let bad = |why: &'static str| {
        Err(PeerAddrError {
            addr: addr.to_string(),
            why,
        })
    };
    let Some((host, port)) = addr.rsplit_once(':') else {
        return bad("not HOST:PORT");
    };
    if addr.len() > 261 {
        return bad("too long");
    }
    if host.is_empty() || !port.parse::<u16>().is_ok_and(|p| p != 0) {
        return bad("not HOST:PORT");
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-.[]:_".contains(c))
    {
        return bad("the host has characters no name or address has");
    }
    let ip = host.trim_start_matches('[').trim_end_matches(']');
    if ip
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_unspecified())
    {
        return bad("a wildcard address; give the address other gateways dial");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ct_eq_compares_whole_slices() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abcd"));
        assert!(ct_eq(b"", b""));
    }

    #[test]
    fn names_and_labels() {
        assert!(valid_name("van-42"));
        assert!(!valid_name("-x"));
        assert!(!valid_name("a b"));
        assert!(!valid_name(""));
        let l = parse_labels("fleet=vans, region=eu").unwrap();
        assert_eq!(format_labels(&l), "fleet=vans,region=eu");
        assert!(parse_labels("novalue").is_err());
    }

    #[test]
    fn durations_and_times() {
        assert_eq!(parse_duration_secs("30m").unwrap(), 1800);
        assert_eq!(parse_duration_secs("12h").unwrap(), 43200);
        assert_eq!(parse_duration_secs("45").unwrap(), 45);
        assert!(parse_duration_secs("x").is_err());
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn peer_addresses() {
        for ok in ["10.0.0.7:4080", "gw-b.example.com:443", "[::1]:4080"] {
            assert!(check_peer_addr(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "gw-b",
            ":4080",
            "gw:0",
            "gw:99999",
            "gw b:1",
            "gw:x",
            "0.0.0.0:4080",
            "[::]:4080",
        ] {
            assert!(check_peer_addr(bad).is_err(), "{bad}");
        }
    }
}

/// `1.5 MB`: decimal units, as data plans count them.
pub fn bytes_text(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A size as a data plan writes it: `200MB`, `1.5GB`, `500kB`, `1048576` (bytes); decimal
/// units (k = 1000), and KiB/MiB/GiB for binary ones.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 200MB, 1.5GB)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (B, kB, MB, GB, TB, KiB, MiB, GiB)"
            ))
        }
    };
    let v = n * mult;
    if !v.is_finite() || !(1.0..=1e18).contains(&v) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(v as u64)
}

#[cfg(test)]
mod size_tests {
    use super::{bytes_text, parse_bytes};

    #[test]
    fn sizes_read_and_print_as_data_plans_count() {
        assert_eq!(parse_bytes("200MB"), Ok(200_000_000));
        assert_eq!(parse_bytes("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_bytes("512KiB"), Ok(524_288));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5XB").is_err());
        assert!(parse_bytes("0").is_err());
        assert_eq!(bytes_text(200_000_000), "200.0 MB");
        assert_eq!(bytes_text(999), "999 B");
    }
}
