//! Printing: aligned text tables for people, JSON for scripts.

use edgeport_proto::util::format_time;

use edgeport_net::clock::now_secs;

pub use crate::text::Table;

/// Prints a value as `--format json` or `--format yaml` asked (text output is the
/// caller's own table).
pub fn print_as(format: super::cli::Format, v: &serde_json::Value) -> anyhow::Result<()> {
    let yaml = format == super::cli::Format::Yaml;
    crate::out!("{}", crate::schema::render(v, yaml));
    Ok(())
}

/// A JSON array of `items` mapped by `f`.
pub fn json_list<T>(items: &[T], f: impl Fn(&T) -> serde_json::Value) -> serde_json::Value {
    serde_json::Value::Array(items.iter().map(f).collect())
}

/// A comma-separated list, or `-` when empty.
pub fn csv(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(",")
    }
}

pub use crate::schema::time as time_json;

/// `2024-01-01T00:00:00Z (in 1h30m)` style expiry for text output.
pub fn expiry_text(unix: u64) -> String {
    if unix == 0 {
        return "never".into();
    }
    let now = now_secs();
    if unix > now {
        format!(
            "{} (in {})",
            format_time(unix),
            crate::text::duration(unix - now)
        )
    } else {
        format!("{} (expired)", format_time(unix))
    }
}

/// A duration in the style of every table (`8h`, `12h30m`, `5m30s`).
pub fn duration_text(secs: u64) -> String {
    crate::text::duration(secs)
}

/// `5m30s ago` style for text output.
pub fn ago_text(unix: u64) -> String {
    if unix == 0 {
        return "never".into();
    }
    format!(
        "{} ago",
        crate::text::duration(now_secs().saturating_sub(unix))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_use_the_one_duration_style() {
        // A second passing during the test does not show: hours drop the seconds.
        assert_eq!(ago_text(now_secs() - 8 * 3600), "8h ago");
        assert!(expiry_text(now_secs() + 12 * 3600 + 1).ends_with("(in 12h)"));
        assert_eq!(ago_text(0), "never");
        assert_eq!(duration_text(12 * 3600 + 30 * 60), "12h30m");
    }
}
