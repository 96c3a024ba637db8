//! What tsh and tctl share on the command line: `version` and `completion SHELL`.

use clap::{Args, CommandFactory, ValueEnum};

/// `completion SHELL`.
#[derive(Debug, Args)]
pub struct CompletionArgs {
    #[arg(value_enum)]
    pub shell: Shell,
}

/// The shells completion scripts are made for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

impl From<Shell> for clap_complete::Shell {
    fn from(s: Shell) -> Self {
        match s {
            Shell::Bash => clap_complete::Shell::Bash,
            Shell::Zsh => clap_complete::Shell::Zsh,
            Shell::Fish => clap_complete::Shell::Fish,
        }
    }
}

/// `PROGRAM version`: `tsh version 0.1.0`, or `{"version": "0.1.0"}` with `--format json`.
pub fn print_version(program: &str, json: bool) {
    crate::outln!("{}", version_text(program, json));
}

fn version_text(program: &str, json: bool) -> String {
    if json {
        serde_json::json!({ "version": edgeport_proto::VERSION }).to_string()
    } else {
        format!("{program} version {}", edgeport_proto::VERSION)
    }
}

/// Prints the completion script of the command line `C` for `shell`.
pub fn print_completion<C: CommandFactory>(bin: &str, shell: Shell) {
    crate::out::write_stdout_bytes(&completion_script::<C>(bin, shell));
}

fn completion_script<C: CommandFactory>(bin: &str, shell: Shell) -> Vec<u8> {
    let mut cmd = C::command();
    let mut buf = Vec::new();
    clap_complete::generate(clap_complete::Shell::from(shell), &mut cmd, bin, &mut buf);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_text_and_json() {
        assert_eq!(
            version_text("tsh", false),
            format!("tsh version {}", edgeport_proto::VERSION)
        );
        let v: serde_json::Value = serde_json::from_str(&version_text("tctl", true)).unwrap();
        assert_eq!(v["version"], edgeport_proto::VERSION);
    }

    #[test]
    fn completion_scripts_name_the_subcommands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let tctl =
                String::from_utf8(completion_script::<crate::tctl::Cli>("tctl", shell)).unwrap();
            assert!(
                tctl.contains("devices") && tctl.contains("roles"),
                "{shell:?}"
            );
            let tsh =
                String::from_utf8(completion_script::<crate::client::Cli>("tsh", shell)).unwrap();
            assert!(
                tsh.contains("login") && tsh.contains("recordings"),
                "{shell:?}"
            );
        }
    }
}
