//! What every long-running Edgeport process (authority, gateway, agent) does around its
//! service: logs to stderr (`RUST_LOG`, default `info`), the ring crypto provider, a tokio
//! runtime, and a clean stop on SIGINT or SIGTERM through a cancellation token.

use std::future::Future;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), coloured only on a terminal.
/// `RUST_LOG` takes `LEVEL` and `target=LEVEL` directives separated by commas
/// (`info,edge_agent::ssh=debug`): tracing-subscriber's `Targets`, which needs no regex engine
/// (the device agent's size budget cannot carry one).
pub fn init_logging() {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let default = || Targets::new().with_default(tracing::Level::INFO);
    let filter = match std::env::var("RUST_LOG") {
        Ok(s) if !s.trim().is_empty() => s.parse::<Targets>().unwrap_or_else(|e| {
            eprintln!("warning: RUST_LOG={s:?} is not understood ({e}); logging at info");
            default()
        }),
        _ => default(),
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(filter)
        .try_init();
}

/// Runs `service` on a fresh runtime until it returns; SIGINT or SIGTERM cancel the token it
/// gets, which it must honour by shutting down. Errors are printed as one `error:` line.
pub fn run<F, Fut, E>(service: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    crate::tls::install_crypto_provider();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        service(shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` shows an anyhow error's whole chain of causes.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Cancels `shutdown` at the first SIGINT or SIGTERM.
pub async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let ctrl_c = tokio::signal::ctrl_c();
    let name = match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = ctrl_c => "SIGINT",
        },
        Err(_) => {
            let _ = ctrl_c.await;
            "SIGINT"
        }
    };
    tracing::info!("{name}: shutting down");
    shutdown.cancel();
}
