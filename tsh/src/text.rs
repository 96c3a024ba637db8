//! Words and numbers in tsh's and tctl's text output, one style for both: durations in the
//! units the flags take (`45s`, `5m30s`, `8h`, `12h30m`, `3d4h`: at most two units, no
//! zero padding, a zero second unit left out), counts with the noun in the right number, and
//! tables: UPPER CASE headers over a dashed rule, columns two spaces apart.

/// A duration for people: the largest unit and the next one, `8h`, `12h30m`, `5m30s`.
pub fn duration(secs: u64) -> String {
    let (d, h, m, s) = (
        secs / 86_400,
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    let two = |a: u64, ua: &str, b: u64, ub: &str| {
        if b == 0 {
            format!("{a}{ua}")
        } else {
            format!("{a}{ua}{b}{ub}")
        }
    };
    if d > 0 {
        two(d, "d", h, "h")
    } else if h > 0 {
        two(h, "h", m, "m")
    } else if m > 0 {
        two(m, "m", s, "s")
    } else {
        format!("{s}s")
    }
}

/// Said beside a certificate's expiry when it ends well before the lifetime asked for
/// (a role's `max_session_ttl` capped it): `capped by your roles (asked for 24h)`. `None`
/// when the certificate got what was asked, give or take two minutes of clock and rounding.
pub fn capped_note(asked_secs: u64, valid_before: u64, now: u64) -> Option<String> {
    let wanted = now.saturating_add(asked_secs);
    (valid_before.saturating_add(120) < wanted)
        .then(|| format!("capped by the roles (asked for {})", duration(asked_secs)))
}

/// `1 device`, `2 devices`, `0 devices` (nouns that take an `s`).
pub fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

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
        crate::out!("{}", self.render());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capped_lifetime_is_noticed_and_a_granted_one_is_not() {
        let now = 1_000_000;
        assert_eq!(
            capped_note(24 * 3600, now + 8 * 3600, now).as_deref(),
            Some("capped by the roles (asked for 1d)")
        );
        assert_eq!(capped_note(8 * 3600, now + 8 * 3600, now), None);
        // Granted a few seconds short (the request took time): not capped.
        assert_eq!(capped_note(3600, now + 3600 - 5, now), None);
        assert!(capped_note(u64::MAX, now + 60, now).is_some());
    }

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

    #[test]
    fn durations_use_two_units_at_most() {
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(45), "45s");
        assert_eq!(duration(60), "1m");
        assert_eq!(duration(330), "5m30s");
        assert_eq!(duration(8 * 3600), "8h");
        assert_eq!(duration(12 * 3600 + 5 * 60 + 7), "12h5m");
        assert_eq!(duration(86_400), "1d");
        assert_eq!(duration(3 * 86_400 + 4 * 3600 + 59), "3d4h");
    }

    #[test]
    fn counts_agree_in_number() {
        assert_eq!(count(1, "device"), "1 device");
        assert_eq!(count(0, "device"), "0 devices");
        assert_eq!(count(3, "event"), "3 events");
    }
}
