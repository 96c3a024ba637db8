//! Figures: samples per key, the printed table, results.json and the generated region of
//! docs/benchmarks.md.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};

/// One figure with all its samples.
pub struct Figure {
    pub key: String,
    pub unit: String,
    pub samples: Vec<f64>,
    pub note: String,
}

impl Figure {
    fn sorted(&self) -> Vec<f64> {
        let mut s = self.samples.clone();
        s.sort_by(|a, b| a.total_cmp(b));
        s
    }
    pub fn median(&self) -> f64 {
        median(&self.sorted())
    }
    pub fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }
    pub fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }
}

/// The median of sorted samples (the mean of the middle two for an even count).
pub fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[derive(Default)]
pub struct Results {
    pub figures: Vec<Figure>,
    /// Free-form facts printed under the table (keep-alive, N reached, ...).
    pub notes: Vec<String>,
}

impl Results {
    pub fn add(&mut self, key: &str, unit: &str, samples: Vec<f64>, note: &str) {
        eprintln!(
            "bench: {key} = {:.3} {unit} ({} runs) {note}",
            {
                let mut s = samples.clone();
                s.sort_by(|a, b| a.total_cmp(b));
                median(&s)
            },
            samples.len()
        );
        self.figures.push(Figure {
            key: key.to_string(),
            unit: unit.to_string(),
            samples,
            note: note.to_string(),
        });
    }

    pub fn note(&mut self, n: String) {
        eprintln!("bench: note: {n}");
        self.notes.push(n);
    }

    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(t, "| figure | median | min | max | unit | runs | note |");
        let _ = writeln!(t, "|---|---:|---:|---:|---|---:|---|");
        for f in &self.figures {
            let _ = writeln!(
                t,
                "| `{}` | {} | {} | {} | {} | {} | {} |",
                f.key,
                fmt(f.median()),
                fmt(f.min()),
                fmt(f.max()),
                f.unit,
                f.samples.len(),
                f.note
            );
        }
        t
    }

    pub fn json(&self, meta: Value) -> Value {
        let mut top = Map::new();
        let mut details = Map::new();
        for f in &self.figures {
            let m = f.median();
            top.insert(f.key.clone(), num(m));
            details.insert(
                f.key.clone(),
                json!({
                    "runs": f.samples.len(),
                    "min": num(f.min()),
                    "max": num(f.max()),
                    "unit": f.unit,
                    "note": f.note,
                }),
            );
        }
        // Not figures: kept inside `details` so the top level stays key -> number.
        details.insert("_notes".into(), json!(self.notes));
        details.insert("_meta".into(), meta);
        top.insert("details".into(), Value::Object(details));
        Value::Object(top)
    }
}

fn num(v: f64) -> Value {
    serde_json::Number::from_f64((v * 1000.0).round() / 1000.0)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

pub fn fmt(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

pub const BEGIN: &str = "<!-- bench:begin -->";
pub const END: &str = "<!-- bench:end -->";

/// Replaces the text between the markers (appends the region when the markers are missing);
/// everything else in the file stays as written by hand.
pub fn rewrite_region(doc: &Path, region: &str) -> Result<()> {
    let text =
        std::fs::read_to_string(doc).with_context(|| format!("reading {}", doc.display()))?;
    let block = format!("{BEGIN}\n{region}\n{END}");
    let new = match (text.find(BEGIN), text.find(END)) {
        (Some(b), Some(e)) if e > b => {
            format!("{}{}{}", &text[..b], block, &text[e + END.len()..])
        }
        _ => format!("{}\n{}\n", text.trim_end(), block),
    };
    std::fs::write(doc, new)?;
    Ok(())
}
