//! `edge-agent start ...`: see `edge_agent` for what it does.

use std::process::ExitCode;

mod args;

use args::Command;

fn main() -> ExitCode {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "update-watchdog")
    {
        let rest = std::env::args_os().skip(2).collect();
        return ExitCode::from(edge_agent::update::watchdog(rest).clamp(0, 255) as u8);
    }
    let a = match args::parse(std::env::args().skip(1), |k| std::env::var(k).ok()) {
        Ok(Command::Start(a)) => a,
        Ok(Command::Print(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        #[cfg(feature = "sftp")]
        Ok(Command::SftpServer) => return ExitCode::from(edge_agent::sftp_server::run() as u8),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    edgeport_net::daemon::init_logging();
    // Read where the SSH server is built (ssh::process::choose_sftp_server), possibly again
    // after each renewal; set here, before any other thread exists.
    std::env::set_var("EDGEPORT_SFTP_SERVER", &a.sftp_server);
    #[cfg(not(feature = "kube"))]
    if a.kube_requested {
        eprintln!(
            "error: --kube-cluster/--kubeconfig: {}",
            edge_agent::agent::AgentError::NoKube
        );
        return ExitCode::FAILURE;
    }
    let cfg = a.cfg;
    let threads = edgeport_net::daemon::Threads::from_count(a.threads);
    #[cfg(feature = "metrics")]
    let metrics_addr = a.metrics_addr;
    edgeport_net::daemon::run_on(threads, |shutdown| async move {
        #[cfg(feature = "metrics")]
        if let Some(addr) = metrics_addr {
            let registry = edge_agent::metrics::registry();
            let bound = edgeport_net::metrics::serve(addr, registry, shutdown.clone())
                .await
                .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
            tracing::info!("metrics on http://{bound}/metrics");
        }
        edge_agent::run(cfg, shutdown)
            .await
            .map_err(|e| e.to_string())
    })
}
