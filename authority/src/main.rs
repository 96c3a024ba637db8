//! `authority start --data-dir DIR [--listen ADDR] [--cluster NAME] [--store sled|postgres://...]`

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use edgeport_authority::service::Limits;
use edgeport_authority::{Config, Server, StoreChoice, DEFAULT_CLUSTER, DEFAULT_LISTEN};

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
        /// The system of record: `sled` (embedded, in the data dir; one authority) or a
        /// PostgreSQL URL `postgres://USER:PASSWORD@HOST:PORT/DB` that several authorities of
        /// the cluster share (each with a copy of the first one's DATA/ca).
        #[arg(long, env = "EDGEPORT_STORE", default_value = "sled", value_parser = StoreChoice::parse, hide_env_values = true)]
        store: StoreChoice,
        /// Root certificates (PEM) that the PostgreSQL server's certificate must chain to
        /// (default: the system's). Add `?sslmode=require` to the URL to refuse plain text.
        #[arg(long, env = "EDGEPORT_STORE_CA")]
        store_ca: Option<PathBuf>,
        /// Serve Prometheus metrics at http://HOST:PORT/metrics (off by default; no
        /// authentication: bind it to an address only your monitoring reaches).
        #[arg(long, env = "EDGEPORT_METRICS_ADDR")]
        metrics_addr: Option<SocketAddr>,
    },
}

fn main() -> std::process::ExitCode {
    edgeport_net::daemon::init_logging();
    let Cmd::Start {
        data_dir,
        listen,
        cluster,
        max_session_ttl,
        store,
        store_ca,
        metrics_addr,
    } = Cli::parse().cmd;
    edgeport_net::daemon::run(|shutdown| async move {
        let server = Server::start(Config {
            data_dir,
            listen,
            cluster,
            limits: Limits {
                max_session_ttl: max_session_ttl.max(1),
                ..Limits::default()
            },
            store,
            store_ca,
        })
        .await?;
        if let Some(addr) = metrics_addr {
            let bound = server
                .serve_metrics(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
            tracing::info!("metrics on http://{bound}/metrics");
        }
        shutdown.cancelled().await;
        server.shutdown().await?;
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}
