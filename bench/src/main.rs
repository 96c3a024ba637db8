//! `cargo run --release -p bench -- all|quick [--only NAME,..] [--no-doc]`
//!
//! Measures Edgeport side by side with its baselines in the same run (OpenSSH on loopback),
//! prints a table (median, min, max), writes `target/bench/results.json` and rewrites the
//! marked region of docs/benchmarks.md. See docs/benchmarks.md for what each number means.

mod fleet;
mod harness;
mod loadgen;
mod report;
mod scenarios;

use std::collections::BTreeSet;
use std::process::ExitCode;

use anyhow::{bail, Result};

/// How much to do: `quick` (CI smoke test and a first look, under 3 minutes) or `all`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// CI smoke test of the harness (scripts/bench-smoke): quick with the smallest sizes.
    Smoke,
    Quick,
    All,
}

pub struct Opts {
    pub mode: Mode,
    pub only: Option<BTreeSet<String>>,
    pub write_doc: bool,
}

impl Opts {
    pub fn wants(&self, scenario: &str) -> bool {
        self.only.as_ref().is_none_or(|o| o.contains(scenario))
    }
    /// A scenario that runs only when `--only` names it (too long for `all`).
    pub fn named(&self, scenario: &str) -> bool {
        self.only.as_ref().is_some_and(|o| o.contains(scenario))
    }
    pub fn pick<T>(&self, quick: T, all: T) -> T {
        match self.mode {
            Mode::Smoke | Mode::Quick => quick,
            Mode::All => all,
        }
    }
    /// Like [`Opts::pick`], with a smaller value for the smoke test.
    pub fn pick3<T>(&self, smoke: T, quick: T, all: T) -> T {
        match self.mode {
            Mode::Smoke => smoke,
            Mode::Quick => quick,
            Mode::All => all,
        }
    }
}

fn usage() -> &'static str {
    "usage: bench all|quick|smoke [--only ssh,stream,sign,idle,nat,tunnels,lossy,size,flood,deadzone,counting] [--no-doc]\n       \
     bench all --only fleet   (100,000 tunnels on one gateway; never part of a plain `all`)\n       \
     bench loadgen --gateway ADDR --token T --ca-pin P --n N --dir DIR [--first K]"
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("loadgen") => loadgen::main(&args[1..]),
        Some("all") | Some("quick") | Some("smoke") => {
            parse(&args).and_then(|o| scenarios::run_all(&o))
        }
        _ => {
            eprintln!("{}", usage());
            return ExitCode::from(2);
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse(args: &[String]) -> Result<Opts> {
    let mode = match args[0].as_str() {
        "all" => Mode::All,
        "smoke" => Mode::Smoke,
        _ => Mode::Quick,
    };
    let mut o = Opts {
        mode,
        only: None,
        write_doc: true,
    };
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--only" => {
                let Some(v) = it.next() else {
                    bail!("--only needs a list\n{}", usage())
                };
                o.only = Some(v.split(',').map(str::to_string).collect());
            }
            "--no-doc" => o.write_doc = false,
            other => bail!("unknown argument {other}\n{}", usage()),
        }
    }
    Ok(o)
}
