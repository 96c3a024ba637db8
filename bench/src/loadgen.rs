//! `bench loadgen`: many agents in one process, each running the real agent code
//! (`edge_agent::agent::run_with`: join, QUIC tunnel, Hello, keep-alive, reconnect with
//! backoff), sharing a few UDP sockets so that thousands of tunnels fit under the process's
//! open-file limit. It logs `tunnel up` once per tunnel, which the bench counts.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use edge_agent::agent::{ensure_joined, run_with};
use edge_agent::transport::QuicClient;
use edge_agent::AgentConfig;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

struct Args {
    gateway: String,
    token: String,
    ca_pin: String,
    n: usize,
    dir: PathBuf,
    per_socket: usize,
    /// `--idle-timeout SECS`: the agents' tunnel idle timeout (default: the agent's 90 s).
    idle_timeout: Option<Duration>,
    /// `--gateway-probe on|off`: whether agents probe a silent gateway while they wait.
    probe: bool,
    /// `--rate N`: tunnels started per second (default 10,000: in bursts of 200 every
    /// 20 ms). A whole fleet started faster than the gateway can shake hands times out and
    /// retries, which is a bench artefact, not what a fleet does.
    rate: usize,
    /// `--first K`: this process runs agents K..K+N (ids `lg-K`..., their own UDP sockets'
    /// source addresses), so that several load generators share one gateway without clashing.
    first: usize,
}

fn parse(args: &[String]) -> Result<Args> {
    let mut a = Args {
        gateway: String::new(),
        token: String::new(),
        ca_pin: String::new(),
        n: 0,
        dir: PathBuf::new(),
        per_socket: 1000,
        rate: 10_000,
        idle_timeout: None,
        probe: true,
        first: 0,
    };
    let mut it = args.iter();
    while let Some(k) = it.next() {
        let v = it.next().ok_or_else(|| anyhow!("{k} needs a value"))?;
        match k.as_str() {
            "--gateway" => a.gateway = v.clone(),
            "--token" => a.token = v.clone(),
            "--ca-pin" => a.ca_pin = v.clone(),
            "--n" => a.n = v.parse()?,
            "--dir" => a.dir = PathBuf::from(v),
            "--first" => a.first = v.parse()?,
            "--rate" => a.rate = v.parse::<usize>()?.max(1),
            "--per-socket" => a.per_socket = v.parse::<usize>()?.max(1),
            "--gateway-probe" => a.probe = v != "off",
            "--idle-timeout" => {
                a.idle_timeout = Some(Duration::from_secs(v.parse::<u64>()?.max(1)))
            }
            other => bail!("loadgen: unknown argument {other}"),
        }
    }
    if a.gateway.is_empty() || a.n == 0 {
        bail!("loadgen needs --gateway and --n");
    }
    Ok(a)
}

pub fn main(args: &[String]) -> Result<()> {
    let a = parse(args)?;
    edgeport_proto::tls::install_crypto_provider();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(run(a))
}

fn config(a: &Args, i: usize) -> AgentConfig {
    let i = a.first + i;
    let mut cfg = AgentConfig::new(a.dir.join(format!("d{i}")), a.gateway.clone());
    cfg.token = Some(a.token.clone());
    cfg.ca_pin = Some(a.ca_pin.clone());
    cfg.requested_id = Some(format!("lg-{i}"));
    // Thousands of handshakes land on the gateway at once: give QUIC time instead of falling
    // back to TCP (which would cost one file per tunnel).
    cfg.quic_timeout = Duration::from_secs(20);
    cfg.probe_silent_gateway = a.probe;
    if let Some(t) = a.idle_timeout {
        // A short idle timeout needs keep-alives well inside it (as the agent's flags do).
        cfg.idle_timeout = t;
        cfg.keepalive = (t / 3).max(Duration::from_secs(1));
        cfg.keepalive_auto = None;
    }
    cfg
}

/// The local address of UDP socket `k`. The gateway budgets unauthenticated handshakes per
/// source address (16 at once, `gateway/src/budget.rs`), and a real fleet comes from many
/// addresses (one per device, or per carrier NAT). Against a gateway on loopback, each socket
/// therefore binds its own 127.1.x.y, so the budget sees one source per socket instead of
/// one for the whole load generator, which queued 10,000 handshakes behind 16 slots and
/// refused most of them on a busy machine.
fn local_addr(gateway: &str, k: usize) -> std::net::SocketAddr {
    let loopback = gateway
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|g| g.ip().is_loopback() && g.is_ipv4());
    let ip = if loopback {
        let k = k % (250 * 250);
        std::net::Ipv4Addr::new(127, 1, (k / 250) as u8, (1 + k % 250) as u8)
    } else {
        std::net::Ipv4Addr::UNSPECIFIED
    };
    std::net::SocketAddr::from((ip, 0))
}

async fn run(a: Args) -> Result<()> {
    let shutdown = CancellationToken::new();
    // Join everyone first, a few at a time (one TLS connection and one signature each).
    let joined: Vec<Result<(), String>> = futures::stream::iter(0..a.n)
        .map(|i| {
            let cfg = config(&a, i);
            let sd = shutdown.clone();
            async move {
                ensure_joined(&cfg, &sd)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let failed: Vec<&String> = joined.iter().filter_map(|r| r.as_ref().err()).collect();
    if let Some(first) = failed.first() {
        bail!("{} of {} joins failed; first: {first}", failed.len(), a.n);
    }
    eprintln!("loadgen: joined {}", a.n);
    let sockets = a.n.div_ceil(a.per_socket);
    let first_socket = a.first.div_ceil(a.per_socket);
    let mut endpoints = Vec::with_capacity(sockets);
    for k in 0..sockets {
        let ep = edgeport_net::quic::client_endpoint(local_addr(&a.gateway, first_socket + k))?;
        endpoints.push(ep);
    }
    eprintln!(
        "loadgen: {} tunnels over {sockets} UDP sockets, from {}",
        a.n,
        endpoints
            .first()
            .and_then(|e| e.local_addr().ok())
            .map_or_else(|| "?".to_string(), |l| l.ip().to_string())
    );
    // In bursts every 20 ms (or of one, below 50 a second), `a.rate` a second.
    let burst = (a.rate / 50).max(1);
    let gap = Duration::from_secs_f64(burst as f64 / a.rate as f64);
    for i in 0..a.n {
        let quic = QuicClient::with_endpoint(endpoints[i / a.per_socket].clone());
        tokio::spawn(run_with(config(&a, i), shutdown.clone(), quic));
        if i % burst == burst - 1 {
            tokio::time::sleep(gap).await;
        }
    }
    eprintln!("loadgen: all started");
    std::future::pending::<()>().await;
    Ok(())
}
