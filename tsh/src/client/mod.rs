//! tsh: the user client (login, ssh, scp, ls, status, logout, proxy ssh, config).
//!
//! Every failure ends as one line on stderr, `error: ...`, never a backtrace. `tsh ssh`
//! exits with the remote command's status (255 when tsh itself fails, as OpenSSH's ssh
//! does); other commands exit 1 on failure. Missing or expired credentials always give
//! `error: no valid credentials for PROXY: run tsh login`.

mod agent;
mod bridge;
mod cli;
mod commands;
mod config;
mod forwarding;
mod gateway;
pub mod kube;
mod login;
mod multi;
mod play;
mod profile;
mod requests;
mod scp;
mod session_mfa;
mod sessions;
mod ssh;
mod sso;
mod term;

use clap::Parser;

pub use cli::Cli;

/// An error for the user: one line, and the exit code it implies.
#[derive(Debug)]
pub struct CliError {
    message: String,
    code: Option<i32>,
}

impl CliError {
    pub fn msg(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: None,
        }
    }

    /// Fixes the exit code (otherwise the command's default applies).
    pub fn with_code(mut self, code: i32) -> Self {
        self.code = Some(code);
        self
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

fn init_logging(debug: bool) {
    let filter = if debug {
        tracing_subscriber::EnvFilter::new("debug")
    } else {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"))
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The whole program. Never returns: it exits with the command's status (a thread may be
/// blocked reading stdin, and exiting is the only clean way to end it).
pub fn main() -> ! {
    edgeport_proto::tls::install_crypto_provider();
    let cli = Cli::parse();
    init_logging(cli.global.debug);
    let default_code = match cli.command {
        cli::Command::Ssh(_) | cli::Command::Proxy { .. } => 255,
        _ => 1,
    };
    // One thread for every command: a session is a chain of hand-offs (stdin, SSH, TLS,
    // socket), and keeping them on one thread saves a cross-thread wake-up per chunk (a fifth
    // of the CPU per byte on a 2-core machine; docs/benchmarks.md). Blocking stdin reads run
    // on their own plain thread.
    edgeport_net::daemon::keep_freed_memory(64 << 20);
    let rt = edgeport_net::daemon::Threads::Exactly(1).runtime();
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match rt.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            e.code.unwrap_or(default_code)
        }
    };
    use std::io::Write;
    let _ = std::io::stdout().flush();
    rt.shutdown_background();
    std::process::exit(code)
}
