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
        .with_ansi(cfg!(feature = "ansi") && std::io::IsTerminal::is_terminal(&std::io::stderr()));
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
    run_on(Threads::PerCore, service)
}

/// How many threads a daemon's runtime runs tasks on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// One worker per core (tokio's multi-threaded scheduler).
    PerCore,
    /// Exactly this many. `1` is tokio's current-thread scheduler: every task on the main
    /// thread, so handing a buffer from one task to the next never wakes another thread.
    /// On loopback relays that is worth a fifth of the CPU per byte (docs/benchmarks.md).
    Exactly(usize),
}

impl Threads {
    /// `0` means one per core.
    pub fn from_count(n: usize) -> Self {
        if n == 0 {
            Threads::PerCore
        } else {
            Threads::Exactly(n)
        }
    }

    /// A runtime with this many workers, I/O and timers enabled.
    pub fn runtime(self) -> std::io::Result<tokio::runtime::Runtime> {
        match self {
            Threads::Exactly(1) => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build(),
            Threads::Exactly(n) => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(n)
                .enable_all()
                .build(),
            Threads::PerCore => tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build(),
        }
    }
}

/// [`run`] on a runtime with the given number of threads.
pub fn run_on<F, Fut, E>(threads: Threads, service: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    edgeport_proto::tls::install_crypto_provider();
    let rt = match threads.runtime() {
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

/// Lets glibc keep up to `bytes` of freed heap instead of returning it to the kernel.
///
/// A bulk transfer allocates and frees buffers at the top of the heap all the time (quinn's
/// send queue, stdin chunks, TLS records). glibc's default gives any free top-of-heap above
/// 128 KiB back at once, so every next allocation faults its pages in again: 100,000 page
/// faults per GiB in tsh and up to 100,000 in the gateway, about a fifth of their CPU
/// (docs/benchmarks.md). With a larger threshold the memory is reused; it is still
/// returned once more than `bytes` is free. Setting it switches off glibc's sliding mmap
/// threshold, so blocks up to 4 MiB are explicitly kept on the heap too (otherwise each
/// block over 128 KiB is a fresh mmap, faulted in page by page). Other C libraries (musl
/// on devices) are left alone.
pub fn keep_freed_memory(bytes: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MMAP_THRESHOLD: libc::c_int = 4 << 20;
        let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        #[allow(unsafe_code)]
        // SAFETY: mallopt only changes allocator parameters; it is called at the start of
        // main, and glibc accepts any value for these two.
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, v);
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = bytes;
}
