//! `authority start --data-dir DIR [--listen ADDR] [--cluster NAME]`

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edgeport_authority::service::Limits;
use edgeport_authority::{Config, Server, DEFAULT_CLUSTER, DEFAULT_LISTEN};

#[derive(Parser)]
#[command(
    name = "authority",
    version,
    about = "Edgeport authority: the cluster's CAs and system of record"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the authority (creates the CAs and the admin identity at the first start).
    Start {
        /// Where the CAs, the store and admin.identity live.
        #[arg(long, env = "EDGEPORT_DATA_DIR")]
        data_dir: PathBuf,
        /// Address of the mutual-TLS RPC port.
        #[arg(long, default_value = DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// Cluster name (recorded at the first start; it cannot change later).
        #[arg(long, default_value = DEFAULT_CLUSTER)]
        cluster: String,
        /// Longest user certificate lifetime, e.g. 12h or 30m.
        #[arg(long, default_value = "12h", value_parser = edgeport_proto::util::parse_duration_secs)]
        max_session_ttl: u64,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let Cmd::Start {
        data_dir,
        listen,
        cluster,
        max_session_ttl,
    } = cli.cmd;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let server = Server::start(Config {
            data_dir,
            listen,
            cluster,
            limits: Limits {
                max_session_ttl: max_session_ttl.max(1),
            },
        })
        .await?;
        let signal = wait_for_signal().await?;
        tracing::info!("{signal}: shutting down");
        server.shutdown().await?;
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}

async fn wait_for_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
