//! `bench all --only fleet`: a fleet of idle QUIC tunnels on one gateway (issue 26; 100,000
//! by default, `BENCH_FLEET_TUNNELS`), from several load-generator processes
//! (`BENCH_FLEET_PER_PROC` agents each, default 25,000) that share UDP sockets (1,000 agents
//! per socket, each socket its own 127.1.x.y). It measures how long the fleet takes to come
//! up (joins included), the gateway's memory per idle tunnel and idle CPU, whether the
//! authority counts every device online, and how long all of them take to come back after
//! `kill -9` and a restart of the gateway, with the authority's and the gateway's CPU time
//! over that storm. The tunnels start at `BENCH_FLEET_RATE` a second over all load
//! generators (default 1,000, after every join): started all at once, 100,000 handshakes
//! outrun the gateway's and time out again and again. Never part of a plain `all`: it takes
//! half an hour and most of the machine's memory at 100,000.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

use crate::harness::{
    cpu_secs, free_port, loadgen_command, rss_anon_kib, rss_kib, Fabric, OnlineCounter, Proc,
};
use crate::report::Results;
use crate::Opts;

/// Waits until `want` devices are online in `counter`'s log, printing progress every 30 s.
/// Returns (reached, on QUIC, seconds) when done or at `timeout`.
fn wait_online(
    counter: &mut OnlineCounter,
    want: usize,
    timeout: Duration,
    what: &str,
    each_poll: &mut dyn FnMut(),
) -> (usize, usize, f64) {
    let start = Instant::now();
    let mut shown = Instant::now();
    loop {
        each_poll();
        let (n, quic) = counter.poll();
        let secs = start.elapsed().as_secs_f64();
        if n >= want || start.elapsed() > timeout {
            return (n, quic, secs);
        }
        if shown.elapsed() >= Duration::from_secs(30) {
            println!("fleet: {what}: {n} of {want} online after {secs:.0} s");
            shown = Instant::now();
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A number from the environment, if set and valid.
fn env_num<T: std::str::FromStr>(key: &str) -> Option<T> {
    std::env::var(key).ok().and_then(|v| v.parse().ok())
}

/// The authority's count of online devices (`tctl status`).
fn authority_online(fab: &Fabric) -> Result<u64> {
    let j: serde_json::Value = serde_json::from_str(&fab.tctl(&["status", "--format", "json"])?)?;
    j["devices"]["online"]
        .as_u64()
        .ok_or_else(|| anyhow!("no devices.online in tctl status: {j}"))
}

pub fn fleet(o: &Opts, fab: &Fabric, work: &Path, r: &mut Results) -> Result<()> {
    let n: usize = env_num("BENCH_FLEET_TUNNELS").unwrap_or(o.pick3(40, 100_000, 100_000));
    let per_proc: usize = env_num("BENCH_FLEET_PER_PROC").unwrap_or(25_000).max(1);
    let timeout = Duration::from_secs(env_num("BENCH_FLEET_TIMEOUT_S").unwrap_or(1800));
    let rate: usize = env_num("BENCH_FLEET_RATE").unwrap_or(1000).max(1);
    crate::scenarios::raise_nofile();
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let data = fab.dir.join("gateway-fleet");
    let max = (n + 1000).to_string();
    let flags = ["--max-connections", max.as_str()];
    let (gw_token, gw_pin) = fab.token("gateway", false)?;
    let mut gw = fab.spawn_gateway_with(
        "gateway-fleet",
        &data,
        &addr,
        Some((&gw_token, &gw_pin)),
        &flags,
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let rss0 = rss_kib(gw.pid())?;
    let anon0 = rss_anon_kib(gw.pid())?;
    let (token, pin) = fab.token("device", true)?;

    let procs = n.div_ceil(per_proc);
    let started = Instant::now();
    let mut loadgens = Vec::with_capacity(procs);
    for k in 0..procs {
        let first = k * per_proc;
        let count = per_proc.min(n - first);
        let mut c = loadgen_command(None, &addr, &token, &pin, count, &work.join("fleet"))?;
        let per_proc_rate = (rate / procs).max(1).to_string();
        // The agents' own lines (tunnel up, lost, why a QUIC attempt failed) at info, for
        // the post-mortem of a run that does not come up; the rest at warn.
        c.args(["--first", &first.to_string(), "--rate", &per_proc_rate])
            .env("RUST_LOG", "warn,edge_agent=info");
        loadgens.push(Proc::spawn(&format!("fleet-loadgen-{k}"), c, &fab.dir)?);
    }
    println!("fleet: {n} agents from {procs} load generators against {addr}, {rate} tunnels/s");
    let mut counter = OnlineCounter::new(&gw.log);
    // When every load generator has finished its joins (their logs are short: RUST_LOG=warn).
    let mut joined_s: Option<f64> = None;
    let mut joins_done = || {
        if joined_s.is_none()
            && loadgens
                .iter()
                .all(|l| l.log_text().contains("loadgen: joined"))
        {
            joined_s = Some(started.elapsed().as_secs_f64());
        }
    };
    let (up, quic, up_s) = wait_online(&mut counter, n, timeout, "coming up", &mut joins_done);
    r.add(
        "fleet_up_s",
        "s",
        vec![if up >= n { up_s } else { f64::NAN }],
        &format!(
            "{up} of {n} online ({quic} on QUIC), joins included; {procs} load generators \
             starting {rate} tunnels/s{}",
            joined_s.map_or(String::new(), |s| format!(", all joined by {s:.0} s"))
        ),
    );
    if up < n {
        let alive = loadgens.iter_mut().map(Proc::alive).filter(|a| *a).count();
        r.note(format!(
            "fleet: only {up} of {n} came up within {timeout:?}; {alive} of {procs} load generators alive; last line: {}",
            loadgens
                .first()
                .map(|l| l.log_text().lines().last().unwrap_or("").to_string())
                .unwrap_or_default()
        ));
    }

    // Idle: memory and CPU once every tunnel is up.
    std::thread::sleep(Duration::from_secs(10));
    let rss1 = rss_kib(gw.pid())?;
    let anon1 = rss_anon_kib(gw.pid())?;
    // Over two presence intervals (10 s each): the gateway's snapshot of the whole fleet and
    // the authority's work on it are part of what an idle fleet costs.
    let cpu0 = cpu_secs(gw.pid())?;
    let auth0 = cpu_secs(fab.auth_pid())?;
    std::thread::sleep(Duration::from_secs(20));
    let idle_cpu = (cpu_secs(gw.pid())? - cpu0) / 20.0 * 100.0;
    let auth_idle_cpu = (cpu_secs(fab.auth_pid())? - auth0) / 20.0 * 100.0;
    let auth_rss = rss_kib(fab.auth_pid())?;
    let per = rss1.saturating_sub(rss0) as f64 / up.max(1) as f64;
    r.add(
        "fleet_rss_kib_per_tunnel",
        "KiB",
        vec![per],
        &format!("N = {up}; gateway RSS {rss0} -> {rss1} KiB (anonymous {anon0} -> {anon1})"),
    );
    r.add(
        "fleet_gateway_idle_cpu_percent",
        "% of a core",
        vec![idle_cpu],
        &format!("gateway with {up} idle tunnels, 10-30 s after they were up"),
    );
    r.add(
        "fleet_authority_idle_cpu_percent",
        "% of a core",
        vec![auth_idle_cpu],
        &format!(
            "the authority over the same 20 s: the gateway's presence snapshots of {up} devices \
             (every 10 s); its RSS {auth_rss} KiB"
        ),
    );
    let lg_rss: u64 = loadgens.iter().filter_map(|l| rss_kib(l.pid()).ok()).sum();
    r.add(
        "fleet_loadgen_rss_kib_per_agent",
        "KiB",
        vec![lg_rss as f64 / up.max(1) as f64],
        "the load generators' RSS per simulated agent (real agent code), for information",
    );
    // The authority's view: presence from one gateway carrying the whole fleet.
    let mut seen = 0;
    let counted = crate::harness::wait_until(Duration::from_secs(60), || {
        seen = authority_online(fab).unwrap_or(0);
        seen as usize >= up
    });
    r.add(
        "fleet_authority_online",
        "devices",
        vec![seen as f64],
        &format!(
            "the authority's count of online devices (tctl status){}",
            if counted {
                ""
            } else {
                ", short of the gateway's after 60 s"
            }
        ),
    );

    // kill -9 and restart on the same port and data dir: the restart wake and the agents'
    // backoff bring them back.
    gw.kill9();
    let auth_cpu0 = cpu_secs(fab.auth_pid())?;
    let mut gw = fab.spawn_gateway_with("gateway-fleet-2", &data, &addr, None, &flags)?;
    let mut counter = OnlineCounter::new(&gw.log);
    let (back, quic, back_s) =
        wait_online(&mut counter, up, timeout, "after the restart", &mut || {});
    let auth_cpu = cpu_secs(fab.auth_pid())? - auth_cpu0;
    let gw_cpu = cpu_secs(gw.pid())?;
    r.add(
        "fleet_reconnect_s",
        "s",
        vec![if back >= up { back_s } else { f64::NAN }],
        &format!(
            "{back} of {up} back ({quic} on QUIC) after kill -9 + restart; over that time the \
             restarted gateway used {gw_cpu:.0} CPU-s and the authority {auth_cpu:.0}"
        ),
    );
    drop(loadgens);
    gw.kill9();
    Ok(())
}
