//! `edge-agent start ...`: see `edge_agent` for what it does.

use std::process::ExitCode;
use std::time::Duration;

mod args;

use args::Command;
use edge_agent::AgentConfig;

fn main() -> ExitCode {
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
    let mut cfg = AgentConfig::new(a.data_dir, a.gateway);
    cfg.token = a.token.filter(|t| !t.is_empty());
    cfg.ca_pin = a.ca_pin.filter(|p| !p.is_empty() && p != "sha256:");
    cfg.requested_id = a.id.filter(|i| !i.is_empty());
    cfg.labels = a.labels;
    cfg.transport = a.transport;
    cfg.quic_timeout = a.quic_timeout.max(Duration::from_millis(100));
    cfg.keepalive = a.keepalive.max(Duration::from_secs(1));
    cfg.idle_timeout = a.idle_timeout.max(cfg.keepalive * 2);
    cfg.quic_probe_interval = a.quic_probe_interval.max(Duration::from_secs(1));
    cfg.audit_max_bytes = a.audit_spool_max.max(4096);
    cfg.targets = a.targets;
    #[cfg(feature = "test-hooks")]
    {
        cfg.test_echo = a.test.test_echo;
        cfg.test_renew = a.test.test_renew;
        cfg.test_audit_sign_key = a.test.test_audit_sign_key;
        cfg.test_audit_replay = a.test.test_audit_replay;
        cfg.test_audit_flood = a.test.test_audit_flood;
    }
    cfg.kube_cluster = a.kube_cluster.filter(|c| !c.is_empty());
    #[cfg(feature = "kube")]
    {
        cfg.kubeconfig = a.kubeconfig;
    }
    #[cfg(not(feature = "kube"))]
    if cfg.kube_cluster.is_some() || a.kubeconfig.is_some_and(|p| !p.as_os_str().is_empty()) {
        eprintln!(
            "error: --kube-cluster/--kubeconfig: {}",
            edge_agent::agent::AgentError::NoKube
        );
        return ExitCode::FAILURE;
    }
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
