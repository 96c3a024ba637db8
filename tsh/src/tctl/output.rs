//! Printing: aligned text tables for people, JSON for scripts.

use edgeport_proto::util::{format_duration, format_time, now_secs};

/// A text table whose columns are padded to their widest cell.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, one line per row, no trailing spaces.
    pub fn render(&self) -> String {
        let cols = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(cols) {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        let mut line = |cells: &[String]| {
            let mut l = String::new();
            for (i, c) in cells.iter().enumerate().take(cols) {
                l.push_str(c);
                if i + 1 < cols {
                    let pad = widths[i] - c.chars().count() + 2;
                    l.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(l.trim_end());
            out.push('\n');
        };
        line(&self.header);
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        line(&rule);
        for r in &self.rows {
            line(r);
        }
        out
    }

    pub fn print(&self) {
        print!("{}", self.render());
    }
}

/// Prints a JSON value, pretty.
pub fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
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

/// RFC 3339, or `null` for 0 (never).
pub fn time_json(unix: u64) -> serde_json::Value {
    if unix == 0 {
        serde_json::Value::Null
    } else {
        format_time(unix).into()
    }
}

/// `2024-01-01T00:00:00Z (in 1h0m0s)` style expiry for text output.
pub fn expiry_text(unix: u64) -> String {
    if unix == 0 {
        return "never".into();
    }
    let now = now_secs();
    if unix > now {
        format!("{} (in {})", format_time(unix), format_duration(unix - now))
    } else {
        format!("{} (expired)", format_time(unix))
    }
}

/// `5m30s ago` style for text output.
pub fn ago_text(unix: u64) -> String {
    if unix == 0 {
        return "never".into();
    }
    format!("{} ago", format_duration(now_secs().saturating_sub(unix)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let mut t = Table::new(&["NAME", "LOGINS"]);
        t.row(vec!["alice".into(), "root,pi".into()]);
        t.row(vec!["b".into(), "-".into()]);
        assert_eq!(
            t.render(),
            "NAME   LOGINS\n-----  -------\nalice  root,pi\nb      -\n"
        );
    }
}
