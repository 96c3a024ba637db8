//! The scenarios. Each one starts what it needs, measures a few runs and adds figures.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;

use crate::harness::{
    children_cpu_secs, command, cpu_secs, free_port, loadgen_command, parse_env, repo_root,
    rss_anon_kib, rss_kib, run, run_ok, tree_cpu_secs, udp_counters, wait_until, Fabric,
    OnlineCounter, Proc, Sshd,
};
use crate::report::{percentile, rewrite_region, Results};
use crate::{Mode, Opts};

const AES: &str = "aes128-gcm@openssh.com";
const CHACHA: &str = "chacha20-poly1305@openssh.com";
const MIB: f64 = 1024.0 * 1024.0;

/// Every key results.json carries (a missing one is an error in the smoke test).
pub const KEYS: &[&str] = &[
    "ssh_true_ratio",
    "ssh_throughput_ratio",
    "ssh_throughput_ratio_chacha20",
    "ssh_throughput_ratio_tcp_leg",
    "openssh_proxy_throughput_ratio",
    "ssh_relay_ratio",
    "openssh_proxy_relay_ratio",
    "cpu_s_per_gib_gateway_quic",
    "cpu_s_per_gib_gateway_tcp",
    "cpu_s_per_gib_agent",
    "cpu_s_per_gib_agent_tcp",
    "cpu_s_per_gib_tsh",
    "cpu_s_per_gib_openssh_jump",
    "cpu_s_per_gib_openssh_device",
    "cpu_s_per_gib_openssh_client",
    "stream_open_us",
    "stream_open_p99_us",
    "tunnels_rss_kib_per_tunnel",
    "tunnels_reconnect_s",
    "idle_bytes_per_device_hour",
    "nat_keepalive_learned_s",
    "nat_idle_bytes_per_device_hour",
    "agent_idle_disk_bytes_per_day",
    "agent_disk_bytes_per_session",
    "sign_ssh_per_s",
    "sign_x509_per_s",
    "agent_aarch64_bytes",
    "agent_idle_rss_kib",
    "agent_idle_rss_anon_kib",
    "lossy_throughput_ratio",
    "lossy_rtt50_throughput_ratio",
    "flood_join_s",
    "flood_dial_p99_ms_tcp",
    "flood_dial_p99_ms_quic",
    "reconnect_after_link_p95_s",
    "reconnect_after_blackhole_p95_s",
    "usage_counting_overhead_percent",
];

pub fn run_all(o: &Opts) -> Result<()> {
    let root = repo_root()?;
    let out_dir = root.join("target/bench");
    let work = out_dir.join(format!("run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let started = Instant::now();
    let mut r = Results::default();

    if o.wants("sign") {
        sign(o, &mut r)?;
    }
    if o.wants("counting") {
        counting(o, &mut r)?;
    }
    if o.wants("size") {
        size(o, &root, &mut r)?;
    }
    let needs_fabric = ["ssh", "stream", "idle", "tunnels", "flood"]
        .iter()
        .any(|s| o.wants(s))
        || o.named("fleet");
    if needs_fabric {
        let fab = Fabric::start(&work.join("fabric"), None, "127.0.0.1", 0)?;
        // The idle device runs against its own gateway while everything else goes on.
        let idle = if o.wants("idle") {
            Some(Idle::start(o, &fab)?)
        } else {
            None
        };
        if o.wants("ssh") || o.wants("stream") {
            ssh_and_stream(o, &fab, &work, &mut r)?;
        }
        if o.wants("tunnels") {
            tunnels(o, &fab, &work, &mut r)?;
        }
        if o.named("fleet") {
            if let Err(e) = crate::fleet::fleet(o, &fab, &work, &mut r) {
                r.note(format!("fleet scenario failed: {e:#}"));
            }
        }
        if let Some(idle) = idle {
            idle.finish(&fab, &mut r)?;
        }
        // Last on this fabric: its gateway sheds the anonymous connections, nothing else
        // measured here should share the port with them.
        if o.wants("flood") {
            if let Err(e) = flood(o, &fab, &mut r) {
                r.note(format!("flood scenario failed: {e:#}"));
            }
        }
    }
    if o.wants("nat") {
        if let Err(e) = nat(o, &work, &mut r) {
            r.note(format!("nat scenario failed: {e:#}"));
        }
    }
    if o.wants("deadzone") {
        if let Err(e) = deadzone(o, &work, &mut r) {
            r.note(format!("dead zone scenario failed: {e:#}"));
        }
    }
    if o.wants("lossy") {
        match lossy(o, &work, &mut r) {
            Ok(()) => {}
            Err(e) => r.note(format!("lossy link scenario failed: {e:#}")),
        }
    }

    let elapsed = started.elapsed().as_secs_f64();
    let missing: Vec<&str> = KEYS
        .iter()
        .copied()
        .filter(|k| !r.figures.iter().any(|f| f.key == *k))
        .collect();
    if o.only.is_none() && !missing.is_empty() {
        r.note(format!("no figure for: {}", missing.join(", ")));
    }
    let meta = json!({
        "mode": format!("{:?}", o.mode).to_lowercase(),
        "commit": commit(&root),
        "machine": machine(),
        "seconds": elapsed.round(),
        "date_utc": date(),
    });
    let table = r.table();
    println!("\n{table}");
    for n in &r.notes {
        println!("- {n}");
    }
    println!("({:.0} s)", elapsed);
    let json = r.json(meta.clone());
    let path = out_dir.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", path.display());
    if o.write_doc && o.only.is_none() && o.mode != Mode::Smoke {
        let region = doc_region(&table, &r.notes, &meta);
        rewrite_region(&root.join("docs/benchmarks.md"), &region)?;
        println!("rewrote the generated region of docs/benchmarks.md");
    }
    if std::env::var_os("BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        println!("kept {}", work.display());
    }
    Ok(())
}

fn doc_region(table: &str, notes: &[String], meta: &serde_json::Value) -> String {
    let mut s = String::new();
    s.push_str("## Latest run (generated by `cargo run --release -p bench -- all|quick`)\n\n");
    s.push_str(&format!(
        "Mode `{}`, commit `{}`, {} UTC, {} s.\nMachine: {}.\n\n",
        meta["mode"].as_str().unwrap_or("?"),
        meta["commit"].as_str().unwrap_or("?"),
        meta["date_utc"].as_str().unwrap_or("?"),
        meta["seconds"],
        meta["machine"].as_str().unwrap_or("?"),
    ));
    s.push_str(table);
    if !notes.is_empty() {
        s.push('\n');
        for n in notes {
            s.push_str(&format!("- {n}\n"));
        }
    }
    s.push_str(MEANINGS);
    s
}

const MEANINGS: &str = "
What each figure is (ratios are Edgeport divided by the OpenSSH baseline measured in the same
run; for times lower is better, for throughput higher is better):

- `ssh_true_ratio`: wall time of a cold `tsh ssh dev true` (new process, TLS to the gateway,
  relay over the device's QUIC tunnel, SSH handshake with the agent's russh server) divided by
  a cold `ssh -c aes128-gcm@openssh.com root@127.0.0.1 true` against stock sshd on loopback.
  Target at most 0.25.
- `ssh_throughput_ratio`: bytes/s of `tsh ssh dev 'cat > /dev/null'` fed from a pipe divided by
  the same through direct OpenSSH, both AES-128-GCM (1 GiB in `all`, 128 MiB in `quick`; each
  path's median cold-`true` time is subtracted so that handshakes do not count). `_chacha20`: both ChaCha20-Poly1305
  (tsh with `EDGEPORT_SSH_CIPHER=chacha20-poly1305@openssh.com`). `_tcp_leg`: the same
  AES-128-GCM transfer to a second agent held on the TCP+TLS+yamux fallback
  (`edge-agent --transport tcp`). Target at least 0.8 (the QUIC figure).
- `openssh_proxy_throughput_ratio`: stock `ssh -c aes128-gcm@openssh.com` through
  `ProxyCommand tsh proxy ssh` (the `tsh config` block) divided by direct OpenSSH. Target 0.8.
- `ssh_relay_ratio`: `tsh ssh` AES-128-GCM throughput divided by OpenSSH's own reverse-tunnel
  path measured in the same run, the fair anchor: a second stock sshd on loopback as jump
  host, the device's `ssh -N -R` to it (forwarding to the device's sshd), and the user's
  `ssh -o ProxyCommand=ssh -W` through the jump host to the device's sshd; three
  encrypted legs, each path's cold `true` subtracted. `openssh_proxy_relay_ratio`: stock ssh
  via `tsh proxy ssh` divided by the same relay. Target at least 1.5 in `all`.
- `cpu_s_per_gib_*`: CPU seconds (utime + stime from /proc, and getrusage of reaped children)
  per GiB moved, per process, during the AES transfers above, each process's median CPU
  for three cold `true`s on the same path subtracted (connection setup, as for the MiB/s):
  `gateway_quic` / `agent` with the device leg on QUIC, `gateway_tcp` / `agent_tcp` on the
  TCP+TLS+yamux fallback, `tsh` the `tsh ssh` process, `openssh_jump` every sshd of the jump
  host (listener plus per-connection processes, live and reaped), `openssh_device` the
  device's `ssh -R` plus its sshd tree, `openssh_client` the user's ssh plus its
  `ssh -W`. Agent and device sshd both include the session's `cat` sink. Targets: gateway
  at most 1.0, agent 1.2, tsh 1.0.
- `stream_open_us` / `stream_open_p99_us`: p50 / p99 over many opens of a dial over an
  existing QUIC connection to the gateway until the first echoed byte comes back from the
  device (gateway authorises with one authority round trip, about 200 µs here, opens a
  stream in the device's tunnel, agent answers); the client runs on one thread, as tsh does.
  Target p50 under 500.
- `tunnels_rss_kib_per_tunnel`: growth of a dedicated gateway's RSS with N idle QUIC tunnels
  from the load generator (`bench loadgen`: the real agent code, many agents per process,
  sharing UDP sockets, each socket from its own 127.1.x.y so that the gateway's per-source
  handshake budget sees several sources), divided by N. `tunnels_reconnect_s`: after
  `kill -9` of that gateway and a restart on the same port, until every tunnel logged
  `tunnel up` again (the restarted gateway resets the connections its predecessor booked,
  others notice at their next keep-alive; then they back off with jitter).
  Targets: 64 KiB per tunnel, 60 s for 10,000.
- `idle_bytes_per_device_hour`: IP bytes both ways between one idle agent and its own
  gateway, counted by nftables on the gateway's port during the window, scaled to an hour,
  with the default keep-alive (`auto`: QUIC's PING every 55 s unless the NAT needs shorter;
  25 s before). Target under 10 KB.
- `nat_keepalive_learned_s`: the keep-alive an idle agent learns behind a NAT that forgets
  UDP bindings after 30 s (the device namespace of `tests/peers/link.sh` masquerades with
  random ports and a 30 s conntrack timeout; smoke: 4 s and a 1-8 s test range).
  `nat_idle_bytes_per_device_hour`: the IP bytes of that idle device once learned, over the
  second half of the window. The learned interval must stay under the NAT's timeout.
- `agent_idle_disk_bytes_per_day`: what the same idle agent caused to be written to storage
  (`write_bytes` in /proc/PID/io: dirtied pages, as flash sees them) over the window,
  scaled to a day; its log file counts. Target under 100 KB.
  `agent_disk_bytes_per_session`: the same for one audited `tsh ssh DEVICE echo` (three
  fsynced spool appends, the open-sessions file, the acknowledgement), averaged over 10.
- `sign_ssh_per_s`, `sign_x509_per_s`: user certificates the authority's CA code signs per
  second of one thread's CPU time (Ed25519 SSH CA, ECDSA P-256 x509 CA); CPU time, not wall
  time, so other load on the shared machine does not count. Target 20,000 SSH/s.
- `agent_aarch64_bytes`: size of the stripped static `cross/build aarch64` binary (budget
  4,000,000 bytes). `agent_aarch64_nokube_bytes`: the same built without the Kubernetes
  forwarder (`cross/build aarch64 --no-kube`, cargo feature `kube` off). `agent_idle_rss_kib`: VmRSS of a native release agent with one idle
  tunnel. Target under 10 MB. `agent_idle_rss_anon_kib`: its `RssAnon` (heap and stacks);
  the rest of VmRSS is the unstripped x86 binary's text mapped from the page cache, which a
  device's 3.7 MB stripped build cannot exceed.
- `lossy_throughput_ratio`: `tsh ssh` throughput (device leg over QUIC) divided by direct
  OpenSSH over TCP to the device, across a veth link between two network namespaces with
  2% random loss each way (nftables numgen) and a tbf rate limit of 20 mbit/s.
  `lossy_rtt50_throughput_ratio`: the same with 25 ms added each way (`link.sh` delay, a
  50 ms round trip like a cellular link's), where loss-based congestion control suffers
  most; the device leg runs BBR (`EDGEPORT_QUIC_CC=cubic` for quinn's default).
- `flood_*`: the same gateway while anonymous clients hold its port: 1,000 idle TCP
  connections from 127.0.0.2 and 4 from each of 50 addresses in 127.0.1.0/24 (each one
  reconnects as soon as the gateway drops it at its handshake deadline, as a slow-loris
  does), plus junk QUIC Initials from 127.0.0.3. `flood_join_s`: a new agent from its token
  to online in the inventory. `flood_dial_p50_ms_*` / `flood_dial_p99_ms_*`: cold
  `tsh ssh dev true` over TCP+TLS and over QUIC (30 runs each in `all`, spread over 20 s of
  flood); `flood_base_dial_p99_ms_*` the same dials just before the flood, and
  `flood_dial_p99_ratio_*` the quotient. `flood_dial_failures`: dials that failed under the
  flood (target 0).
- `usage_counting_overhead_percent`: the extra CPU per byte that byte accounting costs the
  agent (every read of a tunnel stream adds to per-service atomic counters), measured on
  one thread moving data through an in-memory pipe with and without `CountedStream`, runs
  alternated; near zero, and it can come out negative in the noise.
- `reconnect_after_link_p95_s`: 1,000 agents of the load generator in the device namespace
  of `tests/peers/link.sh` lose their link (the veth goes down: no route to the gateway, as
  when a modem loses its bearer) for 2 minutes, past the tunnels' 90 s idle timeout; p95
  over the devices of the time from the link's return to the gateway logging the device
  online again (note: p50, max, and the most tunnels back in one second, the storm).
  `reconnect_after_link_600s_p95_s` the same for 10 minutes (`all`); a 30 s zone drops no
  tunnel (noted). `reconnect_after_blackhole_p95_s`: 10 minutes (5 in `quick`) with the
  link up and every packet dropped (nothing says the path is gone; the agents probe the
  gateway, see `edge-agent/src/gateway_probe.rs`). Target 5 s.
";

fn commit(root: &Path) -> String {
    let mut c = Command::new("git");
    c.arg("-C").arg(root).args(["rev-parse", "--short", "HEAD"]);
    let head = run_ok(c, None, Duration::from_secs(10)).unwrap_or_default();
    let mut c = Command::new("git");
    c.arg("-C")
        .arg(root)
        .args(["status", "--porcelain", "--untracked-files=no"]);
    let dirty = run_ok(c, None, Duration::from_secs(10))
        .map(|s| !s.trim().is_empty())
        .unwrap_or(false);
    format!("{}{}", head.trim(), if dirty { "+dirty" } else { "" })
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut c = Command::new("ssh");
    c.arg("-V");
    let ssh = run(c, None, Duration::from_secs(10))
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_default();
    format!(
        "{cores} cores, {cpu}, Linux {}, {ssh}; load average at the end {load} (the machine is shared)",
        kernel.trim()
    )
}

fn date() -> String {
    run_ok(
        {
            let mut c = Command::new("date");
            c.args(["-u", "+%Y-%m-%d %H:%M"]);
            c
        },
        None,
        Duration::from_secs(5),
    )
    .map(|s| s.trim().to_string())
    .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Byte accounting: what counting every byte per service costs the agent

/// CPU seconds of this thread to move `size` bytes in 32 KiB writes through an in-memory
/// pipe, read through `CountedStream` (as the agent reads a tunnel stream) or directly.
fn pump_counted(size: u64, counted: bool) -> Result<f64> {
    use edge_agent::usage::{Counted, CountedStream};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    rt.block_on(async move {
        let (mut w, r) = tokio::io::duplex(256 * 1024);
        let writer = async move {
            let chunk = vec![0u8; 32 * 1024];
            let mut left = size;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                w.write_all(&chunk[..n]).await?;
                left -= n as u64;
            }
            w.shutdown().await
        };
        let reader = async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = 0u64;
            if counted {
                let mut r = CountedStream::tunnel(r, Counted::Ssh);
                loop {
                    match r.read(&mut buf).await? {
                        0 => break,
                        n => got += n as u64,
                    }
                }
            } else {
                let mut r = r;
                loop {
                    match r.read(&mut buf).await? {
                        0 => break,
                        n => got += n as u64,
                    }
                }
            }
            Ok::<u64, std::io::Error>(got)
        };
        let cpu0 = thread_cpu_secs();
        let (wr, got) = tokio::join!(writer, reader);
        wr?;
        if got? != size {
            bail!("the pipe lost bytes");
        }
        Ok(thread_cpu_secs() - cpu0)
    })
}

fn counting(o: &Opts, r: &mut Results) -> Result<()> {
    let size: u64 = o.pick3(64 << 20, 1 << 30, 4 << 30);
    let gib = size as f64 / (1u64 << 30) as f64;
    let (mut plain, mut counted, mut overhead) = (Vec::new(), Vec::new(), Vec::new());
    // Alternate, so that drift in the machine's load hits both alike.
    for _ in 0..o.pick(3, 5) {
        let a = pump_counted(size, false)? / gib;
        let b = pump_counted(size, true)? / gib;
        plain.push(a);
        counted.push(b);
        overhead.push((b - a) / a * 100.0);
    }
    r.add(
        "usage_counting_overhead_percent",
        "%",
        overhead,
        &format!(
            "extra CPU per byte of counting (per-service atomic counters on every read), \
             {:.0} MiB in 32 KiB writes through an in-memory pipe per run; plain {:.3}, \
             counted {:.3} CPU-s/GiB (medians)",
            size as f64 / MIB,
            crate::report::median(&sorted(plain)),
            crate::report::median(&sorted(counted)),
        ),
    );
    Ok(())
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

// ---------------------------------------------------------------------------------------
// Signing

fn sign(o: &Opts, r: &mut Results) -> Result<()> {
    use edgeport_authority::ca::{CaKeys, CertAuthority, SshUserCert};
    use edgeport_proto::keys::KeyPair;
    let ca = CertAuthority::new("bench", CaKeys::generate("bench")?)?;
    let user = KeyPair::generate()?;
    let spki = user.spki_der();
    let role = edgeport_authority::roles::builtin(edgeport_authority::roles::DEFAULT_ROLE)
        .ok_or_else(|| anyhow!("no default role"))?;
    let grants = edgeport_authority::roles::combine(&[role]);
    let logins = vec!["root".to_string(), "pi".to_string()];
    let groups = vec!["devs".to_string()];
    let now = edgeport_net::clock::now_secs();
    let per_run = Duration::from_millis(o.pick(700, 2000));
    let runs = o.pick(3, 5);
    let measure = |f: &mut dyn FnMut() -> Result<()>| -> Result<Vec<f64>> {
        let mut out = Vec::new();
        for _ in 0..runs {
            let start = Instant::now();
            let cpu0 = thread_cpu_secs();
            let mut n = 0u64;
            while start.elapsed() < per_run {
                for _ in 0..32 {
                    f()?;
                }
                n += 32;
            }
            // Per second of this thread's CPU time: other load on the machine does not
            // count against the authority.
            out.push(n as f64 / (thread_cpu_secs() - cpu0).max(1e-6));
        }
        Ok(out)
    };
    let ssh = measure(&mut || {
        std::hint::black_box(ca.sign_ssh_user(&SshUserCert {
            user: "alice",
            public_key: user.ssh_public(),
            principals: &logins,
            valid_after: now - 60,
            valid_before: now + 3600,
            permit_pty: grants.permit_pty,
            permit_port_forwarding: grants.permit_port_forwarding,
            permit_agent_forwarding: grants.permit_agent_forwarding,
            roles: &grants.extension,
        })?);
        Ok(())
    })?;
    let x509 = measure(&mut || {
        std::hint::black_box(ca.sign_x509_user("alice", &groups, &spki, now - 60, now + 3600)?);
        Ok(())
    })?;
    r.add(
        "sign_ssh_per_s",
        "certs/s",
        ssh,
        "per CPU-second of one thread, Ed25519 user CA; target >= 20,000",
    );
    r.add(
        "sign_x509_per_s",
        "certs/s",
        x509,
        "per CPU-second of one thread, ECDSA P-256 CA",
    );
    Ok(())
}

/// CPU time of the calling thread.
#[allow(unsafe_code)]
fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

// ---------------------------------------------------------------------------------------
// Size

fn size(o: &Opts, root: &Path, r: &mut Results) -> Result<()> {
    let dir = root.join("target/aarch64-unknown-linux-musl/device");
    let (path, nokube) = (dir.join("edge-agent"), dir.join("edge-agent-nokube"));
    let cross_build = |extra: &[&str], r: &mut Results| {
        let mut c = Command::new(root.join("cross/build"));
        c.arg("aarch64").args(extra);
        let what = format!("cross/build aarch64 {}", extra.join(" "));
        match run(c, None, Duration::from_secs(1800)) {
            Ok(out) if out.status.success() => {}
            Ok(out) => r.note(format!(
                "{} failed: {}",
                what.trim_end(),
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            )),
            Err(e) => r.note(format!("{} failed: {e:#}", what.trim_end())),
        }
    };
    // The no-kube build goes first: it passes through target/.../edge-agent, which the
    // default build then puts back.
    let rebuild_nokube = o.mode == Mode::All || !nokube.exists();
    if rebuild_nokube {
        cross_build(&["--no-kube"], r);
    }
    if rebuild_nokube || !path.exists() {
        cross_build(&[], r);
    }
    match std::fs::metadata(&path) {
        Ok(m) => r.add(
            "agent_aarch64_bytes",
            "bytes",
            vec![m.len() as f64],
            "static musl, profile device; budget 4,000,000",
        ),
        Err(_) => r.note("no aarch64 agent build: agent_aarch64_bytes not measured".into()),
    }
    match std::fs::metadata(&nokube) {
        Ok(m) => r.add(
            "agent_aarch64_nokube_bytes",
            "bytes",
            vec![m.len() as f64],
            "the same without the Kubernetes forwarder (cargo feature `kube` off)",
        ),
        Err(_) => {
            r.note("no aarch64 no-kube agent build: agent_aarch64_nokube_bytes not measured".into())
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Idle device: bytes on the wire, RSS and CPU

struct Idle {
    _gw: Proc,
    agent: Proc,
    port: u16,
    started: Instant,
    cpu0: f64,
    written0: u64,
    window: Duration,
}

const NFT_TABLE: &str = "edgeport_bench";

impl Idle {
    fn start(o: &Opts, fab: &Fabric) -> Result<Self> {
        let port = crate::harness::free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let (gw, _) = fab.start_gateway("gateway-idle", &fab.dir.join("gateway-idle"), &addr)?;
        let agent = fab.agent("idle", &addr, None, &[])?;
        fab.wait_online("idle", Duration::from_secs(60))?;
        std::thread::sleep(Duration::from_secs(2));
        // Counters on the gateway's port, input hook only (on loopback every packet passes
        // input once).
        let _ = nft(&format!("delete table inet {NFT_TABLE}"));
        nft(&format!(
            "add table inet {NFT_TABLE}\n\
             add chain inet {NFT_TABLE} input {{ type filter hook input priority -30; }}\n\
             add rule inet {NFT_TABLE} input udp dport {port} counter\n\
             add rule inet {NFT_TABLE} input udp sport {port} counter\n\
             add rule inet {NFT_TABLE} input tcp dport {port} counter\n\
             add rule inet {NFT_TABLE} input tcp sport {port} counter\n"
        ))?;
        let cpu0 = cpu_secs(agent.pid())?;
        let written0 = crate::harness::write_bytes(agent.pid())?;
        Ok(Self {
            _gw: gw,
            port,
            started: Instant::now(),
            cpu0,
            written0,
            agent,
            window: Duration::from_secs(o.pick3(30, 75, 300)),
        })
    }

    fn finish(mut self, fab: &Fabric, r: &mut Results) -> Result<()> {
        let left = self.window.saturating_sub(self.started.elapsed());
        if !left.is_zero() {
            eprintln!("bench: idle window: {} s to go", left.as_secs());
            std::thread::sleep(left);
        }
        let secs = self.started.elapsed().as_secs_f64();
        let out = nft(&format!("list table inet {NFT_TABLE}"));
        let _ = nft(&format!("delete table inet {NFT_TABLE}"));
        let out = out?;
        let bytes: u64 = out
            .lines()
            .filter(|l| l.contains(&self.port.to_string()))
            .filter_map(|l| l.split("bytes").nth(1))
            .filter_map(|v| v.split_whitespace().next())
            .filter_map(|v| v.parse::<u64>().ok())
            .sum();
        let cpu = cpu_secs(self.agent.pid())? - self.cpu0;
        let rss = rss_kib(self.agent.pid())?;
        if !self.agent.alive() {
            bail!("the idle agent died");
        }
        r.add(
            "idle_bytes_per_device_hour",
            "bytes",
            vec![bytes as f64 * 3600.0 / secs],
            &format!("keep-alive auto (55 s on an idle path without NAT), QUIC, {secs:.0} s window scaled, IP bytes"),
        );
        r.add(
            "agent_idle_cpu_percent",
            "% of a core",
            vec![100.0 * cpu / secs],
            "native agent, one idle tunnel",
        );
        let written = crate::harness::write_bytes(self.agent.pid())?.saturating_sub(self.written0);
        r.add(
            "agent_idle_disk_bytes_per_day",
            "bytes",
            vec![written as f64 * 86400.0 / secs],
            "pages the idle agent dirtied (spool, state files, its log), window scaled to a day",
        );
        r.note(format!(
            "idle agent after {secs:.0} s: RSS {rss} KiB, CPU {cpu:.3} s, {written} bytes to disk"
        ));
        // Then audited sessions on the same agent: what each costs the device's storage.
        let home = fab.tsh_login("disk", &format!("127.0.0.1:{}", self.port))?;
        let before = crate::harness::write_bytes(self.agent.pid())?;
        const SESSIONS: u32 = 10;
        for _ in 0..SESSIONS {
            let mut c = fab.tsh(&home)?;
            c.args(["ssh", "idle", "echo", "audited"]);
            run_ok(c, None, Duration::from_secs(60))?;
        }
        // The audit shipper acknowledges (and trims) after the sessions.
        std::thread::sleep(Duration::from_secs(3));
        let per = crate::harness::write_bytes(self.agent.pid())?.saturating_sub(before) as f64
            / f64::from(SESSIONS);
        r.add(
            "agent_disk_bytes_per_session",
            "bytes",
            vec![per],
            "one `tsh ssh DEVICE echo` (session.start, exec, session.end, each fsynced; \
             open-sessions file; acknowledgement), pages dirtied",
        );
        Ok(())
    }
}

fn nft(script: &str) -> Result<String> {
    let mut c = Command::new("nft");
    c.args(["-f", "-"]);
    if script.starts_with("list") {
        let mut c = Command::new("nft");
        c.args(script.split_whitespace());
        return run_ok(c, None, Duration::from_secs(10));
    }
    run_ok(c, Some(script.as_bytes()), Duration::from_secs(10))
}

// ---------------------------------------------------------------------------------------
// SSH: cold `true`, bulk throughput, OpenSSH via tsh proxy ssh; stream opens

/// Runs `cmd` with `size` zero bytes on stdin; returns the wall time in seconds.
fn pump(mut cmd: Command, size: u64) -> Result<f64> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let buf = vec![0u8; 1 << 20];
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            stdin.write_all(&buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    });
    let out = child.wait_with_output()?;
    let secs = start.elapsed().as_secs_f64();
    let w = writer.join().map_err(|_| anyhow!("writer thread"))?;
    if !out.status.success() || w.is_err() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(secs)
}

/// A CPU-time reading of some processes (a process, a process tree), in seconds.
type Probe<'a> = Box<dyn Fn() -> Result<f64> + 'a>;

/// [`pump`], and the CPU seconds each probe's processes used meanwhile, and the CPU seconds
/// of `cmd` itself with its descendants (the children this process reaped meanwhile).
fn pump_cpu(cmd: Command, size: u64, probes: &[&Probe]) -> Result<(f64, Vec<f64>, f64)> {
    let before = probes.iter().map(|p| p()).collect::<Result<Vec<f64>>>()?;
    let c0 = children_cpu_secs();
    let secs = pump(cmd, size)?;
    let client = children_cpu_secs() - c0;
    // Let the far ends finish closing the session, so its last CPU time is in.
    std::thread::sleep(Duration::from_millis(300));
    let after = probes.iter().map(|p| p()).collect::<Result<Vec<f64>>>()?;
    Ok((
        secs,
        after.iter().zip(&before).map(|(a, b)| a - b).collect(),
        client,
    ))
}

/// OpenSSH's own reverse-tunnel path, the fair anchor for Edgeport's: the device (sshd at
/// `device`) holds `ssh -R` to a jump host's sshd, and the user's ssh reaches the device's
/// sshd through the jump host with `ProxyCommand ssh -W`. Three encrypted legs, like
/// Edgeport's two tunnel legs plus the end-to-end SSH session.
struct Relay {
    jump: Sshd,
    /// The device's `ssh -N -R`.
    fwd: Proc,
    /// The port the jump host listens on for the device (its `-R` forward).
    port: u16,
}

impl Relay {
    fn start(work: &Path, device: &Sshd) -> Result<Self> {
        let jump = Sshd::start(&work.join("openssh-jump"))?;
        let port = free_port()?;
        let mut c = Command::new("ssh");
        c.args(jump.ssh_opts(AES))
            .args(["-o", "ExitOnForwardFailure=yes", "-N", "-R"])
            .arg(format!("127.0.0.1:{port}:127.0.0.1:{}", device.port))
            .args(["-p", &jump.port.to_string(), "root@127.0.0.1"]);
        let mut fwd = Proc::spawn("openssh-device-fwd", c, work)?;
        let up = wait_until(Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        if !up || !fwd.alive() {
            bail!(
                "ssh -R to the jump host did not come up:\n{}",
                fwd.log_text()
            );
        }
        Ok(Self { jump, fwd, port })
    }

    /// The user's ssh to the device's sshd through the jump host, running `remote`.
    fn ssh(&self, device: &Sshd, cipher: &str, remote: &str) -> Command {
        let proxy = format!(
            "ProxyCommand=ssh {} -W 127.0.0.1:{} -p {} root@127.0.0.1",
            self.jump.ssh_opts(cipher).join(" "),
            self.port,
            self.jump.port
        );
        let mut c = Command::new("ssh");
        c.args(device.ssh_opts(cipher))
            .args(["-o", &proxy, "-p", &self.port.to_string(), "root@127.0.0.1"])
            .arg(remote);
        c
    }
}

fn timed(cmd: Command) -> Result<f64> {
    let what = format!("{cmd:?}");
    let start = Instant::now();
    let out = run(cmd, None, Duration::from_secs(60))?;
    let secs = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(secs)
}

fn ssh_and_stream(o: &Opts, fab: &Fabric, work: &Path, r: &mut Results) -> Result<()> {
    let agent = fab.agent("dev", &fab.gw_addr, None, &["--test-echo"])?;
    fab.wait_online("dev", Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_secs(2));
    let rss = rss_kib(agent.pid())?;
    r.add(
        "agent_idle_rss_kib",
        "KiB",
        vec![rss as f64],
        "native release agent, one idle QUIC tunnel",
    );
    r.add(
        "agent_idle_rss_anon_kib",
        "KiB",
        vec![rss_anon_kib(agent.pid())? as f64],
        "the same agent's anonymous memory (RSS without its binary's page-cache pages)",
    );
    let home = fab.tsh_login("bench", &fab.gw_addr)?;
    // The same path with the device leg on the TCP+TLS+yamux fallback.
    let agent_tcp = if o.wants("ssh") {
        let a = fab.agent("devtcp", &fab.gw_addr, None, &["--transport", "tcp"])?;
        fab.wait_online("devtcp", Duration::from_secs(60))?;
        Some(a)
    } else {
        None
    };
    if o.wants("stream") {
        stream_open(o, fab, r)?;
    }
    if !o.wants("ssh") {
        return Ok(());
    }
    let sshd = Sshd::start(&work.join("openssh"))?;
    let relay = Relay::start(work, &sshd)?;
    let direct = |cipher: &str, remote: &str| -> Command {
        let mut c = Command::new("ssh");
        c.args(sshd.ssh_args("127.0.0.1", cipher)).arg(remote);
        c
    };
    let tsh_to = |device: &str, remote: &str, cipher: Option<&str>| -> Result<Command> {
        let mut c = fab.tsh(&home)?;
        c.args(["ssh", &format!("root@{device}"), remote]);
        if let Some(ci) = cipher {
            c.env("EDGEPORT_SSH_CIPHER", ci);
        }
        Ok(c)
    };
    let tsh = |remote: &str, cipher: Option<&str>| tsh_to("dev", remote, cipher);
    // ssh_config from `tsh config` for stock ssh through `tsh proxy ssh`.
    let cfg_text = run_ok(
        {
            let mut c = fab.tsh(&home)?;
            c.arg("config");
            c
        },
        None,
        Duration::from_secs(30),
    )?;
    let cfg = work.join("ssh_config");
    std::fs::write(&cfg, cfg_text)?;
    let proxied = |cipher: &str, remote: &str| -> Command {
        let mut c = Command::new("ssh");
        c.arg("-F")
            .arg(&cfg)
            .args(["-o", "BatchMode=yes", "-c", cipher, "root@dev", remote]);
        c
    };

    // Warm-up (page cache, first-connection costs), not counted.
    timed(direct(AES, "true"))?;
    timed(tsh("true", None)?)?;
    timed(proxied(AES, "true"))?;
    timed(relay.ssh(&sshd, AES, "true"))?;

    let size: u64 = o.pick3(32 << 20, 128 << 20, 1 << 30);
    let mib = size as f64 / MIB;
    let runs = o.pick3(3, 5, 11);
    let (mut ratio, mut t_ssh, mut t_tsh, mut t_proxy, mut t_relay) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let a = timed(direct(AES, "true"))?;
        let b = timed(tsh("true", None)?)?;
        let c = timed(proxied(AES, "true"))?;
        let d = timed(relay.ssh(&sshd, AES, "true"))?;
        ratio.push(b / a);
        t_ssh.push(a * 1000.0);
        t_tsh.push(b * 1000.0);
        t_proxy.push(c * 1000.0);
        t_relay.push(d * 1000.0);
    }
    // Connection setup (the median cold `true` of each path) is taken out of the transfer
    // times below, so that the throughput figures compare the data paths, not handshakes.
    let med = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        percentile(&s, 50.0) / 1000.0
    };
    let (setup_ssh, setup_tsh, setup_proxy, setup_relay) =
        (med(&t_ssh), med(&t_tsh), med(&t_proxy), med(&t_relay));
    let rate = |secs: f64, setup: f64| mib / (secs - setup).max(secs / 10.0);
    r.add("ssh_true_ratio", "ratio", ratio, "target <= 0.25");
    r.add("ssh_true_openssh_ms", "ms", t_ssh, "direct OpenSSH, cold");
    r.add("ssh_true_tsh_ms", "ms", t_tsh, "tsh ssh, cold");
    r.add(
        "ssh_true_proxy_ms",
        "ms",
        t_proxy,
        "stock ssh via tsh proxy ssh, cold",
    );
    r.add(
        "ssh_true_relay_ms",
        "ms",
        t_relay,
        "stock ssh through OpenSSH's relay (ssh -R + ProxyCommand ssh -W), cold",
    );
    let mut rows: Vec<(&str, Vec<f64>)> = vec![
        ("openssh_aes", vec![]),
        ("tsh_aes", vec![]),
        ("openssh_chacha", vec![]),
        ("tsh_chacha", vec![]),
        ("proxy_aes", vec![]),
        ("tsh_tcp_aes", vec![]),
        ("openssh_relay_aes", vec![]),
    ];
    // CPU seconds per GiB of each process on the paths, measured during the AES transfers,
    // each process's CPU for a cold `true` on the same path subtracted (like the MiB/s).
    let gib = size as f64 / (1u64 << 30) as f64;
    let per_gib = |v: f64| v / gib;
    let mut cpu: Vec<(&str, Vec<f64>, &str)> = vec![
        (
            "gateway_quic",
            vec![],
            "gateway process, tsh ssh with the device leg on QUIC",
        ),
        (
            "agent",
            vec![],
            "agent and its session's children (the `cat` sink), QUIC leg",
        ),
        ("tsh", vec![], "tsh ssh process"),
        (
            "gateway_tcp",
            vec![],
            "gateway process, device leg on TCP+TLS+yamux",
        ),
        (
            "agent_tcp",
            vec![],
            "agent and its session's children, TCP+TLS+yamux leg",
        ),
        (
            "openssh_jump",
            vec![],
            "the jump host's sshd: listener and every per-connection sshd, live and reaped",
        ),
        (
            "openssh_device",
            vec![],
            "the device's ssh -R plus its sshd tree (session, the `cat` sink)",
        ),
        (
            "openssh_client",
            vec![],
            "the user's ssh plus its ProxyCommand ssh -W",
        ),
    ];
    // Host-wide UDP counters across the QUIC transfer (the machine is shared: other UDP
    // traffic counts too): about 900,000 datagrams per GiB means one 1,200-byte packet per
    // send/receive, far fewer means GSO/GRO batches.
    let mut udp: Vec<(&str, Vec<f64>)> = vec![
        ("udp_in_datagrams_per_gib_quic", vec![]),
        ("udp_out_datagrams_per_gib_quic", vec![]),
        ("udp_rcvbuf_errors_per_gib_quic", vec![]),
    ];
    let gw_pid = fab.gw.pid();
    let p_gw: Probe = Box::new(move || cpu_secs(gw_pid));
    let agent_pid = agent.pid();
    let p_agent: Probe = Box::new(move || tree_cpu_secs(agent_pid));
    let agent_tcp_pid = agent_tcp.as_ref().map(Proc::pid).unwrap_or(0);
    let p_agent_tcp: Probe = Box::new(move || tree_cpu_secs(agent_tcp_pid));
    let (jump_pid, fwd_pid, dev_pid) = (relay.jump.pid, relay.fwd.pid(), sshd.pid);
    let p_jump: Probe = Box::new(move || tree_cpu_secs(jump_pid));
    let p_device: Probe = Box::new(move || Ok(tree_cpu_secs(fwd_pid)? + tree_cpu_secs(dev_pid)?));
    // Connection setup: each probe's and the client's median CPU over three cold `true`s.
    let cold_cpu = |cmd: &dyn Fn() -> Result<Command>, probes: &[&Probe]| -> Result<Vec<f64>> {
        let mut runs: Vec<Vec<f64>> = Vec::new();
        for _ in 0..3 {
            let (_, mut used, client) = pump_cpu(cmd()?, 0, probes)?;
            used.push(client);
            runs.push(used);
        }
        Ok((0..=probes.len())
            .map(|i| {
                let mut v: Vec<f64> = runs.iter().map(|r| r[i]).collect();
                v.sort_by(f64::total_cmp);
                v[1]
            })
            .collect())
    };
    let s_quic = cold_cpu(&|| tsh("true", None), &[&p_gw, &p_agent])?;
    let s_tcp = cold_cpu(&|| tsh_to("devtcp", "true", None), &[&p_gw, &p_agent_tcp])?;
    let s_relay = cold_cpu(&|| Ok(relay.ssh(&sshd, AES, "true")), &[&p_jump, &p_device])?;
    let sink = "cat > /dev/null";
    let runs = o.pick3(1, 3, 5);
    for _ in 0..runs {
        rows[0]
            .1
            .push(rate(pump(direct(AES, sink), size)?, setup_ssh));
        let u0 = udp_counters()?;
        let (secs, used, client) = pump_cpu(tsh(sink, None)?, size, &[&p_gw, &p_agent])?;
        let u1 = udp_counters()?;
        udp[0].1.push(per_gib((u1.0 - u0.0) as f64));
        udp[1].1.push(per_gib((u1.1 - u0.1) as f64));
        udp[2].1.push(per_gib((u1.2 - u0.2) as f64));
        rows[1].1.push(rate(secs, setup_tsh));
        cpu[0].1.push(per_gib(used[0] - s_quic[0]));
        cpu[1].1.push(per_gib(used[1] - s_quic[1]));
        cpu[2].1.push(per_gib(client - s_quic[2]));
        rows[2]
            .1
            .push(rate(pump(direct(CHACHA, sink), size)?, setup_ssh));
        rows[3]
            .1
            .push(rate(pump(tsh(sink, Some(CHACHA))?, size)?, setup_tsh));
        rows[4]
            .1
            .push(rate(pump(proxied(AES, sink), size)?, setup_proxy));
        let (secs, used, _) =
            pump_cpu(tsh_to("devtcp", sink, None)?, size, &[&p_gw, &p_agent_tcp])?;
        rows[5].1.push(rate(secs, setup_tsh));
        cpu[3].1.push(per_gib(used[0] - s_tcp[0]));
        cpu[4].1.push(per_gib(used[1] - s_tcp[1]));
        let (secs, used, client) =
            pump_cpu(relay.ssh(&sshd, AES, sink), size, &[&p_jump, &p_device])?;
        rows[6].1.push(rate(secs, setup_relay));
        cpu[5].1.push(per_gib(used[0] - s_relay[0]));
        cpu[6].1.push(per_gib(used[1] - s_relay[1]));
        cpu[7].1.push(per_gib(client - s_relay[2]));
    }
    let ratio = |a: usize, b: usize| -> Vec<f64> {
        rows[a]
            .1
            .iter()
            .zip(&rows[b].1)
            .map(|(x, y)| x / y)
            .collect()
    };
    let (r_aes, r_cha, r_proxy, r_tcp) = (ratio(1, 0), ratio(3, 2), ratio(4, 0), ratio(5, 0));
    let (r_relay, r_proxy_relay) = (ratio(1, 6), ratio(4, 6));
    let note = format!("{mib:.0} MiB per run");
    r.add(
        "ssh_throughput_ratio",
        "ratio",
        r_aes,
        &format!("aes128-gcm, {note}, target >= 0.8"),
    );
    r.add(
        "ssh_throughput_ratio_chacha20",
        "ratio",
        r_cha,
        &format!("chacha20-poly1305, {note}"),
    );
    r.add(
        "ssh_throughput_ratio_tcp_leg",
        "ratio",
        r_tcp,
        &format!("aes128-gcm, device leg on the TCP+TLS fallback, {note}"),
    );
    r.add(
        "openssh_proxy_throughput_ratio",
        "ratio",
        r_proxy,
        &format!("aes128-gcm, {note}, target >= 0.8"),
    );
    r.add(
        "ssh_relay_ratio",
        "ratio",
        r_relay,
        &format!("aes128-gcm, tsh ssh / OpenSSH relay (ssh -R + ssh -W), {note}"),
    );
    r.add(
        "openssh_proxy_relay_ratio",
        "ratio",
        r_proxy_relay,
        &format!("aes128-gcm, stock ssh via tsh proxy ssh / OpenSSH relay, {note}"),
    );
    for (name, v) in udp {
        r.add(
            name,
            "datagrams/GiB",
            v,
            "host /proc/net/snmp Udp counters during tsh ssh over the QUIC leg",
        );
    }
    for (name, v, what) in cpu {
        r.add(&format!("cpu_s_per_gib_{name}"), "CPU-s/GiB", v, what);
    }
    for (name, v) in rows {
        r.add(
            &format!("throughput_{name}_mib_s"),
            "MiB/s",
            v,
            "connection setup excluded",
        );
    }
    drop(agent);
    drop(agent_tcp);
    Ok(())
}

fn stream_open(o: &Opts, fab: &Fabric, r: &mut Results) -> Result<()> {
    use edgeport_net::{read_frame, write_frame};
    use edgeport_proto::alpn;
    use edgeport_proto::tunnel::{ClientReply, ClientRequest, Service};

    edgeport_proto::tls::install_crypto_provider();
    let out = fab.dir.join("stream-user");
    let out_s = out.display().to_string();
    fab.tctl(&[
        "auth", "sign", "--user", "bench", "--out", &out_s, "--format", "tls", "--ttl", "1h",
    ])?;
    let read = |ext: &str| std::fs::read_to_string(format!("{out_s}{ext}"));
    let key = pem::parse(read(".key")?)?.into_contents();
    let me = edgeport_proto::tls::CertKey::from_pem(&read(".crt")?, None, key)?;
    let ca = edgeport_proto::keys::first_cert_der(&read(".cas")?)?;
    let tls = edgeport_proto::tls::client_config(&ca, Some(&me), &[alpn::DIAL])?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let n = o.pick3(100, 300, 2000);
    let gw: std::net::SocketAddr = fab.gw_addr.parse()?;
    // One thread, as tsh runs.
    let rt = edgeport_net::daemon::Threads::Exactly(1).runtime()?;
    let samples = rt.block_on(async move {
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let conn = ep
            .connect(gw, edgeport_proto::tls::GATEWAY_SERVER_NAME)?
            .await?;
        let mut samples = Vec::with_capacity(n);
        for i in 0..n + 20 {
            let start = Instant::now();
            let (mut send, mut recv) = conn.open_bi().await?;
            let req = ClientRequest::Dial {
                target: "dev".into(),
                service: Service::Echo,
            };
            write_frame(&mut send, &req).await?;
            match read_frame::<ClientReply, _>(&mut recv).await? {
                ClientReply::DialOk { .. } => {}
                other => bail!("dial refused: {other:?}"),
            }
            send.write_all(b"x").await?;
            let mut b = [0u8; 1];
            recv.read_exact(&mut b).await?;
            let us = start.elapsed().as_secs_f64() * 1e6;
            let _ = send.finish();
            if i >= 20 {
                samples.push(us);
            }
        }
        conn.close(0u32.into(), b"done");
        Ok::<_, anyhow::Error>(samples)
    })?;
    let mut sorted = samples.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let p99 = percentile(&sorted, 99.0);
    r.add(
        "stream_open_us",
        "us",
        samples,
        &format!("p50 of {n} opens (min/max are single opens), QUIC, target < 500"),
    );
    r.add(
        "stream_open_p99_us",
        "us",
        vec![p99],
        &format!("p99 of {n} opens"),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Many idle tunnels

fn tunnels(o: &Opts, fab: &Fabric, work: &Path, r: &mut Results) -> Result<()> {
    let n: usize = std::env::var("BENCH_TUNNELS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(o.pick3(100, 1000, 10_000));
    let port = crate::harness::free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let data = fab.dir.join("gateway-many");
    let (mut gw, _) = fab.start_gateway("gateway-many", &data, &addr)?;
    std::thread::sleep(Duration::from_secs(1));
    let rss0 = rss_kib(gw.pid())?;
    let (token, pin) = fab.token("device", true)?;
    let c = loadgen_command(None, &addr, &token, &pin, n, &work.join("loadgen"))?;
    let mut lg = Proc::spawn("loadgen", c, &fab.dir)?;
    let timeout = Duration::from_secs(o.pick(150, 300) as u64);
    let start = Instant::now();
    let mut online = OnlineCounter::new(&gw.log);
    let up = wait_until(timeout, || online.poll().0 >= n || !lg.alive());
    let (reached, quic) = online.poll();
    if !up || reached < n {
        r.note(format!(
            "tunnels: only {reached} of {n} came up within {timeout:?} (loadgen alive: {}); tail: {}",
            lg.alive(),
            lg.log_text().lines().last().unwrap_or("")
        ));
    }
    r.note(format!(
        "tunnels: {reached} of {n} devices online after {:.1} s (joins included), {quic} of them \
         last on QUIC, the rest on the TCP fallback",
        start.elapsed().as_secs_f64()
    ));
    std::thread::sleep(Duration::from_secs(5));
    let rss1 = rss_kib(gw.pid())?;
    let cpu0 = cpu_secs(gw.pid())?;
    std::thread::sleep(Duration::from_secs(5));
    let cpu_idle = (cpu_secs(gw.pid())? - cpu0) / 5.0 * 100.0;
    let per = (rss1.saturating_sub(rss0)) as f64 / reached.max(1) as f64;
    r.add(
        "tunnels_rss_kib_per_tunnel",
        "KiB",
        vec![per],
        &format!("N = {reached} ({quic} QUIC); gateway RSS {rss0} -> {rss1} KiB; target <= 64"),
    );
    r.add(
        "tunnels_gateway_idle_cpu_percent",
        "% of a core",
        vec![cpu_idle],
        &format!("gateway with {reached} tunnels, 10-15 s after they were up"),
    );
    // kill -9 and restart on the same port; count devices in the new gateway's log.
    gw.kill9();
    let mut gw = fab.spawn_gateway("gateway-many-2", &data, &addr, None)?;
    let start = Instant::now();
    let timeout = Duration::from_secs(o.pick(120, 240) as u64);
    let mut online = OnlineCounter::new(&gw.log);
    let back = wait_until(timeout, || online.poll().0 >= reached);
    let secs = start.elapsed().as_secs_f64();
    let (again, quic) = online.poll();
    if back {
        r.add(
            "tunnels_reconnect_s",
            "s",
            vec![secs],
            &format!("all {reached} back ({quic} on QUIC) after kill -9 + restart; target <= 60"),
        );
    } else {
        r.add(
            "tunnels_reconnect_s",
            "s",
            vec![f64::NAN],
            &format!("only {again} of {reached} back within {timeout:?}"),
        );
    }
    drop(lg);
    gw.kill9();
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Lossy link

fn lossy(o: &Opts, work: &Path, r: &mut Results) -> Result<()> {
    let root = repo_root()?;
    let link = root.join("tests/peers/link.sh");
    let name = "bench";
    let sh = |args: &[&str]| -> Result<String> {
        let mut c = Command::new(&link);
        c.args(args);
        run_ok(c, None, Duration::from_secs(300))
    };
    let _ = sh(&["down", name]);
    let env = parse_env(&sh(&["up", name])?);
    let _guard = LinkDown(link.clone(), name.to_string());
    let gw_ns = env.get("GW_NS").context("GW_NS")?.clone();
    let dev_ns = env.get("DEV_NS").context("DEV_NS")?.clone();
    let gw_ip = env.get("GW_ADDR").context("GW_ADDR")?.clone();
    let dev_ip = env.get("DEV_ADDR").context("DEV_ADDR")?.clone();
    let rate = "20mbit";
    sh(&["set", name, "loss=2%", &format!("rate={rate}")])?;

    let fab = Fabric::start(&work.join("lossy"), Some(&gw_ns), &gw_ip, 3080)?;
    let home = fab.tsh_login("bench", &fab.gw_addr)?;

    // OpenSSH sshd on the device end: sshd.sh's config, listening on the device address.
    let sshd = Sshd::start(&work.join("lossy-openssh"))?;
    let cfg = std::fs::read_to_string(&sshd.config)?
        .lines()
        .map(|l| {
            if l.starts_with("ListenAddress") {
                format!("ListenAddress {dev_ip}")
            } else if l.starts_with("PidFile") {
                format!("PidFile {}", work.join("lossy-sshd.pid").display())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let cfg_path = work.join("lossy_sshd_config");
    std::fs::write(&cfg_path, cfg + "\n")?;
    let mut c = command(Some(&dev_ns), Path::new("/usr/sbin/sshd"));
    c.arg("-D")
        .arg("-f")
        .arg(&cfg_path)
        .arg("-E")
        .arg(work.join("lossy-sshd.log"));
    let _sshd_dev = Proc::spawn("lossy-sshd", c, work)?;
    std::thread::sleep(Duration::from_millis(500));

    let size: u64 = o.pick3(2 << 20, 8 << 20, 24 << 20);
    let mib = size as f64 / MIB;
    let runs = o.pick(1, 3);
    // The same link, then with 50 ms of round trip added (25 ms each way): a cellular
    // link's RTT, where loss-based congestion control suffers most.
    // A device of its own for each, which connects over the link as it is (congestion
    // control learns the path's round trip when the connection starts).
    for (delay, id, prefix, what) in [
        ("0", "lossy", "lossy", ""),
        ("25ms", "lossy-rtt50", "lossy_rtt50", ", RTT +50 ms"),
    ] {
        sh(&["set", name, &format!("delay={delay}")])?;
        let _agent = fab.agent(id, &fab.gw_addr, Some(&dev_ns), &[])?;
        fab.wait_online(id, Duration::from_secs(90))?;
        let (mut ratios, mut a_v, mut b_v) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            let mut d = command(Some(&gw_ns), Path::new("/usr/bin/ssh"));
            d.args(sshd.ssh_args(&dev_ip, AES)).arg("cat > /dev/null");
            let a = mib / pump(d, size)?;
            let mut t = fab.tsh(&home)?;
            t.args(["ssh", &format!("root@{id}"), "cat > /dev/null"]);
            let b = mib / pump(t, size)?;
            ratios.push(b / a);
            a_v.push(a);
            b_v.push(b);
        }
        r.add(
            &format!("{prefix}_throughput_ratio"),
            "ratio",
            ratios,
            &format!("2% loss each way, tbf {rate}{what}, {mib:.0} MiB per run"),
        );
        r.add(
            &format!("{prefix}_openssh_mib_s"),
            "MiB/s",
            a_v,
            "direct OpenSSH over TCP",
        );
        r.add(
            &format!("{prefix}_tsh_mib_s"),
            "MiB/s",
            b_v,
            &format!(
                "tsh ssh, device leg QUIC ({})",
                edgeport_net::quic::congestion_name()
            ),
        );
    }
    drop(sshd);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// NAT: an idle device behind a carrier NAT that forgets UDP bindings after 30 s

/// The agent in a device namespace that masquerades its UDP with random ports and a short
/// conntrack timeout (what a carrier-grade NAT does), against a gateway in its own
/// namespace: the keep-alive it learns, and the bytes it then costs per hour.
fn nat(o: &Opts, work: &Path, r: &mut Results) -> Result<()> {
    let root = repo_root()?;
    let link = root.join("tests/peers/link.sh");
    let name = "nat";
    let sh = |args: &[&str]| -> Result<String> {
        let mut c = Command::new(&link);
        c.args(args);
        run_ok(c, None, Duration::from_secs(300))
    };
    let _ = sh(&["down", name]);
    let env = parse_env(&sh(&["up", name])?);
    let _guard = LinkDown(link.clone(), name.to_string());
    let gw_ns = env.get("GW_NS").context("GW_NS")?.clone();
    let dev_ns = env.get("DEV_NS").context("DEV_NS")?.clone();
    let gw_ip = env.get("GW_ADDR").context("GW_ADDR")?.clone();
    // Smoke: a 4 s NAT and a 1-8 s range (a test flag) so that it fits in seconds; else
    // the real range (10-55 s) against a 30 s NAT.
    let (timeout, range, window) = o.pick3(
        (4u32, Some("1s-8s"), Duration::from_secs(40)),
        (30, None, Duration::from_secs(200)),
        (30, None, Duration::from_secs(400)),
    );
    let ns_nft = |ns: &str, script: &str| -> Result<String> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, "nft", "-f", "-"]);
        run_ok(c, Some(script.as_bytes()), Duration::from_secs(10))
    };
    ns_nft(
        &dev_ns,
        &format!(
            "table ip epnat {{\n\
               ct timeout short {{ protocol udp; l3proto ip; policy = {{ unreplied: {timeout}, replied: {timeout} }}; }}\n\
               chain out {{ type filter hook output priority filter; meta l4proto udp ct timeout set \"short\"; }}\n\
               chain post {{ type nat hook postrouting priority srcnat; oifname \"veth0\" meta l4proto udp masquerade random; }}\n\
             }}\n"
        ),
    )?;
    let fab = Fabric::start(&work.join("nat"), Some(&gw_ns), &gw_ip, 3080)?;
    let extra: Vec<&str> = match range {
        Some(r) => vec!["--transport", "quic", "--test-keepalive-range", r],
        None => vec!["--transport", "quic"],
    };
    let agent = fab.agent("nat", &fab.gw_addr, Some(&dev_ns), &extra)?;
    fab.wait_online("nat", Duration::from_secs(90))?;
    let learned = |log: &str| -> Option<f64> {
        log.lines()
            .rev()
            .filter(|l| l.contains("keep-alive now every"))
            .filter_map(|l| l.split("keep-alive now every ").nth(1))
            .filter_map(|v| v.split(" s").next())
            .find_map(|v| v.trim().parse::<f64>().ok())
    };
    // Learning, then the bytes of the learned interval over the rest of the window.
    let half = window / 2;
    std::thread::sleep(half);
    ns_nft(
        &gw_ns,
        "table inet epnatcount {\n\
           chain input { type filter hook input priority -30; udp dport 3080 counter; udp sport 3080 counter; }\n\
           chain output { type filter hook output priority -30; udp dport 3080 counter; udp sport 3080 counter; }\n\
         }\n",
    )?;
    let t0 = Instant::now();
    std::thread::sleep(window - half);
    let secs = t0.elapsed().as_secs_f64();
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        &gw_ns,
        "nft",
        "list",
        "table",
        "inet",
        "epnatcount",
    ]);
    let out = run_ok(c, None, Duration::from_secs(10))?;
    let bytes: u64 = out
        .lines()
        .filter_map(|l| l.split("bytes").nth(1))
        .filter_map(|v| v.split_whitespace().next())
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    let log = agent.log_text();
    let got = learned(&log).context("the agent learned no keep-alive (no NAT rebinding seen)")?;
    let rebinds = log.matches("forgot its UDP binding").count();
    r.add(
        "nat_keepalive_learned_s",
        "s",
        vec![got],
        &format!("NAT forgets idle UDP after {timeout} s; {rebinds} rebindings to learn it"),
    );
    // In the gateway's namespace a packet to it passes input once, one from it output once.
    r.add(
        "nat_idle_bytes_per_device_hour",
        "bytes",
        vec![bytes as f64 * 3600.0 / secs],
        &format!("IP bytes both ways at the learned keep-alive, {secs:.0} s scaled"),
    );
    Ok(())
}

struct LinkDown(PathBuf, String);

impl Drop for LinkDown {
    fn drop(&mut self) {
        let mut c = Command::new(&self.0);
        c.args(["down", &self.1]);
        let _ = run(c, None, Duration::from_secs(60));
    }
}

// ---------------------------------------------------------------------------------------
// Flood: dials and joins while anonymous clients hold the gateway's port

/// Anonymous load on the gateway's port from several loopback sources (all of 127/8 is
/// local): idle TCP connections that never speak (a slow-loris; each one reconnects when
/// the gateway drops it, as an attacker would) and junk QUIC-looking UDP datagrams.
struct Flood {
    stop: tokio_util::sync::CancellationToken,
    held: Arc<std::sync::atomic::AtomicUsize>,
    dropped: Arc<std::sync::atomic::AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flood {
    /// `(source, connections)` pairs against `gw`; `udp` junk senders at 20 datagrams/s each.
    fn start(
        gw: std::net::SocketAddr,
        sources: Vec<(std::net::Ipv4Addr, usize)>,
        udp: usize,
    ) -> Result<Self> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let stop = tokio_util::sync::CancellationToken::new();
        let held = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicUsize::new(0));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (s, h, d) = (stop.clone(), held.clone(), dropped.clone());
        let thread = std::thread::spawn(move || {
            rt.block_on(async move {
                let mut tasks = tokio::task::JoinSet::new();
                for (ip, n) in sources {
                    for _ in 0..n {
                        let (s, h, d) = (s.clone(), h.clone(), d.clone());
                        tasks.spawn(async move {
                            while !s.is_cancelled() {
                                let conn = async {
                                    let sock = tokio::net::TcpSocket::new_v4()?;
                                    sock.bind((ip, 0).into())?;
                                    sock.connect(gw).await
                                };
                                let mut c = match conn.await {
                                    Ok(c) => c,
                                    Err(_) => {
                                        tokio::select! {
                                            _ = s.cancelled() => return,
                                            _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                                        }
                                    }
                                };
                                h.fetch_add(1, Ordering::Relaxed);
                                let mut buf = [0u8; 256];
                                let gone = tokio::select! {
                                    _ = s.cancelled() => false,
                                    _ = tokio::io::AsyncReadExt::read(&mut c, &mut buf) => true,
                                };
                                h.fetch_sub(1, Ordering::Relaxed);
                                if gone {
                                    d.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        });
                    }
                }
                for i in 0..udp {
                    let s = s.clone();
                    tasks.spawn(async move {
                        let Ok(sock) = tokio::net::UdpSocket::bind(("127.0.0.3", 0)).await else {
                            return;
                        };
                        let mut pkt = vec![0u8; 1200];
                        let mut n = i as u64;
                        while !s.is_cancelled() {
                            // A long-header Initial (version 1) with a random-ish body.
                            for b in pkt.iter_mut() {
                                n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                                *b = (n >> 33) as u8;
                            }
                            pkt[0] = 0xc3;
                            pkt[1..5].copy_from_slice(&1u32.to_be_bytes());
                            pkt[5] = 8;
                            let _ = sock.send_to(&pkt, gw).await;
                            tokio::select! {
                                _ = s.cancelled() => return,
                                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                            }
                        }
                    });
                }
                while tasks.join_next().await.is_some() {}
            });
        });
        Ok(Self {
            stop,
            held,
            dropped,
            thread: Some(thread),
        })
    }

    fn held(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn dropped(&self) -> usize {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Raises the soft open-file limit to the hard one (the flood holds over a thousand
/// sockets, and the gateway started from here inherits the limit).
#[allow(unsafe_code)]
pub(crate) fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// `runs` cold `tsh ssh root@DEVICE true` over each transport: (tcp ms, quic ms, failures).
/// Runs are `pause` apart, so that they spread over the gateway's handshake deadlines.
fn dial_times(
    fab: &Fabric,
    home: &Path,
    device: &str,
    runs: usize,
    pause: Duration,
) -> Result<(Vec<f64>, Vec<f64>, Vec<String>)> {
    let (mut tcp, mut quic, mut failed) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        std::thread::sleep(pause);
        for (transport, out) in [("tcp", &mut tcp), ("quic", &mut quic)] {
            let mut c = fab.tsh(home)?;
            c.args([
                "--transport",
                transport,
                "ssh",
                &format!("root@{device}"),
                "true",
            ]);
            match timed(c) {
                Ok(s) => out.push(s * 1000.0),
                Err(e) => failed.push(format!(
                    "{transport}: {}",
                    format!("{e:#}").lines().last().unwrap_or("")
                )),
            }
        }
    }
    Ok((tcp, quic, failed))
}

fn flood(o: &Opts, fab: &Fabric, r: &mut Results) -> Result<()> {
    let nofile = raise_nofile();
    let per_one: usize = o.pick3(100, 300, 1000);
    let (n_sources, per_source) = o.pick3((10, 4), (25, 4), (50, 4));
    if nofile < (per_one + n_sources * per_source + 1000) as u64 {
        r.note(format!(
            "flood: open-file limit {nofile} is low for the flood"
        ));
    }
    let runs = o.pick3(5, 10, 30);
    // The gateway drops a silent connection at its handshake deadline (10 s) and the flood
    // reconnects at once: the join starts after one such cycle and the dials spread over
    // the next ones.
    let settle = Duration::from_secs(o.pick3(2, 6, 12));
    let pause = Duration::from_millis(o.pick3(0, 200, 500));
    let _agent = fab.agent("flood", &fab.gw_addr, None, &[])?;
    fab.wait_online("flood", Duration::from_secs(60))?;
    let home = fab.tsh_login("flooder", &fab.gw_addr)?;
    // Warm-up, then the same dials without the flood, for the ratio.
    let _ = dial_times(fab, &home, "flood", 1, Duration::ZERO)?;
    let (base_tcp, base_quic, base_failed) = dial_times(fab, &home, "flood", runs, pause)?;
    if !base_failed.is_empty() {
        r.note(format!(
            "flood: {} dials failed without the flood: {}",
            base_failed.len(),
            base_failed[0]
        ));
    }

    let gw: std::net::SocketAddr = fab.gw_addr.parse()?;
    let mut sources = vec![(std::net::Ipv4Addr::new(127, 0, 0, 2), per_one)];
    sources
        .extend((1..=n_sources as u8).map(|i| (std::net::Ipv4Addr::new(127, 0, 1, i), per_source)));
    let total = per_one + n_sources * per_source;
    let flood = Flood::start(gw, sources, o.pick3(4, 8, 16))?;
    // Let the connections pile up (the gateway drops each at its handshake deadline, and
    // each comes back at once).
    wait_until(Duration::from_secs(20), || flood.held() >= total * 9 / 10);
    std::thread::sleep(settle);
    let held_before = flood.held();

    let start = Instant::now();
    let joined = fab
        .agent("flood-join", &fab.gw_addr, None, &[])
        .and_then(|a| {
            fab.wait_online("flood-join", Duration::from_secs(120))
                .map(|()| a)
        });
    let join_s = start.elapsed().as_secs_f64();
    let _joined = match joined {
        Ok(a) => {
            r.add(
                "flood_join_s",
                "s",
                vec![join_s],
                &format!(
                    "new agent: token, join, tunnel, online; {total} idle TCP connections held"
                ),
            );
            Some(a)
        }
        Err(e) => {
            r.add(
                "flood_join_s",
                "s",
                vec![f64::NAN],
                &format!("did not join: {e:#}"),
            );
            None
        }
    };
    let (tcp, quic, failed) = dial_times(fab, &home, "flood", runs, pause)?;
    let held_after = flood.held();
    let dropped = flood.dropped();
    drop(flood);

    let p = |v: &[f64], q: f64| {
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        percentile(&s, q)
    };
    let note = format!("cold `tsh ssh dev true`, {runs} runs");
    r.add(
        "flood_dial_p50_ms_tcp",
        "ms",
        vec![p(&tcp, 50.0)],
        &format!("{note}, TCP+TLS, under the flood"),
    );
    r.add(
        "flood_dial_p99_ms_tcp",
        "ms",
        vec![p(&tcp, 99.0)],
        &format!("{note}, TCP+TLS, under the flood"),
    );
    r.add(
        "flood_dial_p50_ms_quic",
        "ms",
        vec![p(&quic, 50.0)],
        &format!("{note}, QUIC, under the flood"),
    );
    r.add(
        "flood_dial_p99_ms_quic",
        "ms",
        vec![p(&quic, 99.0)],
        &format!("{note}, QUIC, under the flood"),
    );
    r.add(
        "flood_base_dial_p99_ms_tcp",
        "ms",
        vec![p(&base_tcp, 99.0)],
        &format!("{note}, TCP+TLS, no flood"),
    );
    r.add(
        "flood_base_dial_p99_ms_quic",
        "ms",
        vec![p(&base_quic, 99.0)],
        &format!("{note}, QUIC, no flood"),
    );
    r.add(
        "flood_dial_p99_ratio_tcp",
        "ratio",
        vec![p(&tcp, 99.0) / p(&base_tcp, 99.0)],
        "p99 under the flood / p99 without",
    );
    r.add(
        "flood_dial_p99_ratio_quic",
        "ratio",
        vec![p(&quic, 99.0) / p(&base_quic, 99.0)],
        "p99 under the flood / p99 without",
    );
    r.add(
        "flood_dial_failures",
        "dials",
        vec![failed.len() as f64],
        &format!("of {} under the flood", 2 * runs),
    );
    r.note(format!(
        "flood: {per_one} idle TCP connections from 127.0.0.2 and {per_source} from each of \
         {n_sources} sources in 127.0.1.0/24 (each reconnects when dropped) plus junk QUIC \
         Initials; {held_before} held when the join started, {held_after} at the end, \
         {dropped} dropped by the gateway in all{}",
        failed
            .first()
            .map(|f| format!("; first failed dial: {f}"))
            .unwrap_or_default()
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Dead zones: a fleet's link goes away for a while, then comes back

/// Seconds since the epoch of a tracing line's leading RFC 3339 UTC timestamp
/// (`2026-12-06T10:31:11.201079Z  INFO ...`).
fn log_epoch(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|v| v.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.splitn(3, ':').map(|v| v.parse::<f64>().ok());
    let (h, mi, s) = (t.next()??, t.next()??, t.next()??);
    // Days from the civil date (the proleptic Gregorian calendar), March-based years.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some(days as f64 * 86_400.0 + h * 3_600.0 + mi * 60.0 + s)
}

fn now_epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Each device's first `device online` in the gateway log at or after `since`, as seconds
/// after `since`.
fn online_after(log: &Path, since: f64) -> std::collections::HashMap<String, f64> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut first = std::collections::HashMap::new();
    for line in text.lines().filter(|l| l.contains("device online")) {
        let (Some(t), Some(id)) = (
            log_epoch(line),
            line.split(" device=")
                .nth(1)
                .and_then(|v| v.split_whitespace().next()),
        ) else {
            continue;
        };
        if t >= since {
            first.entry(id.to_string()).or_insert(t - since);
        }
    }
    first
}

/// The most tunnels that came back within any one second (the storm a fleet makes).
fn peak_per_second(delays: &[f64]) -> usize {
    let mut buckets = std::collections::BTreeMap::new();
    for d in delays {
        *buckets.entry(d.floor() as i64).or_insert(0usize) += 1;
    }
    buckets.values().copied().max().unwrap_or(0)
}

/// N agents of the load generator (the real agent code) in the device namespace of
/// `tests/peers/link.sh`, the fabric in the gateway's. The link goes away for a while, in
/// two ways: `link` (the veth goes down: the device has no route, as when a modem loses its
/// bearer) and `blackhole` (the link stays up and drops everything, as when a cell stops
/// forwarding). Then it comes back, and the gateway's log says when each tunnel was back.
fn deadzone(o: &Opts, work: &Path, r: &mut Results) -> Result<()> {
    let root = repo_root()?;
    let link = root.join("tests/peers/link.sh");
    let name = "deadzone";
    let sh = |args: &[&str]| -> Result<String> {
        let mut c = Command::new(&link);
        c.args(args);
        run_ok(c, None, Duration::from_secs(300))
    };
    let _ = sh(&["down", name]);
    let env = parse_env(&sh(&["up", name])?);
    let _guard = LinkDown(link.clone(), name.to_string());
    let gw_ns = env.get("GW_NS").context("GW_NS")?.clone();
    let dev_ns = env.get("DEV_NS").context("DEV_NS")?.clone();
    let gw_ip = env.get("GW_ADDR").context("GW_ADDR")?.clone();
    let fab = Fabric::start(&work.join("deadzone"), Some(&gw_ns), &gw_ip, 3090)?;

    let n: usize = std::env::var("BENCH_DEADZONE_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(o.pick3(20, 1000, 1000));
    // The smoke test shortens the tunnels' idle timeout so that its zones fit in seconds.
    let idle_s: u64 = o.pick3(3, 90, 90);
    let zones: Vec<u64> = std::env::var("BENCH_DEADZONE_SECS")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or(o.pick3(vec![8], vec![30, 120], vec![30, 120, 600]));
    let (token, pin) = fab.token("device", true)?;
    let mut c = loadgen_command(
        Some(&dev_ns),
        &fab.gw_addr,
        &token,
        &pin,
        n,
        &work.join("deadzone-loadgen"),
    )?;
    c.args(["--idle-timeout", &idle_s.to_string()]);
    // BENCH_DEADZONE_PROBE=off: without the agents' gateway probe, for a before/after.
    if let Ok(v) = std::env::var("BENCH_DEADZONE_PROBE") {
        c.args(["--gateway-probe", &v]);
    }
    let mut lg = Proc::spawn("deadzone-loadgen", c, work)?;
    let mut online = OnlineCounter::new(&fab.gw.log);
    let up = wait_until(Duration::from_secs(o.pick(150, 300)), || {
        online.poll().0 >= n || !lg.alive()
    });
    if !up || !lg.alive() {
        bail!(
            "only {} of {n} agents came online; loadgen: {}",
            online.poll().0,
            lg.log_text().lines().last().unwrap_or("")
        );
    }
    // The link figure's zone: the first past the idle timeout (2 min).
    let headline = zones.iter().copied().find(|z| *z > idle_s);
    // A blackhole long enough for the reconnect backoff to reach its 30 s cap: a short one
    // ends while the first attempts are still retransmitting their handshakes.
    let blackhole: u64 = std::env::var("BENCH_DEADZONE_BLACKHOLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(o.pick3(8, 300, 600));
    let mut runs: Vec<(&str, u64)> = zones.iter().map(|z| ("link", *z)).collect();
    if blackhole > 0 {
        runs.push(("blackhole", blackhole));
    }
    for (kind, secs) in runs {
        let ns_link = |state: &str| -> Result<String> {
            let mut c = Command::new("ip");
            c.args(["-n", &dev_ns, "link", "set", "veth0", state]);
            run_ok(c, None, Duration::from_secs(10))
        };
        match kind {
            "link" => ns_link("down")?,
            _ => sh(&["set", name, "loss=100%"])?,
        };
        std::thread::sleep(Duration::from_secs(secs));
        // Before the commands that restore it: they take a moment, and the first tunnels
        // are back before they return.
        let back_at = now_epoch();
        match kind {
            "link" => ns_link("up")?,
            _ => sh(&["set", name, "loss=0"])?,
        };
        let dropped = secs > idle_s;
        // A zone shorter than the idle timeout drops no tunnel: QUIC retransmits and goes
        // on, so there is nothing to wait for beyond a short look at the log.
        let limit = Duration::from_secs(if dropped { o.pick(90, 180) } else { 15 });
        wait_until(limit, || online_after(&fab.gw.log, back_at).len() >= n);
        let mut delays: Vec<f64> = online_after(&fab.gw.log, back_at).into_values().collect();
        delays.sort_by(|a, b| a.total_cmp(b));
        let what =
            format!("{n} agents, {kind} dead zone of {secs} s (tunnel idle timeout {idle_s} s)");
        if !dropped {
            r.note(format!(
                "deadzone: {what}: {} of {n} tunnels reconnected; the rest never dropped",
                delays.len()
            ));
            continue;
        }
        let p95 = if delays.len() >= n {
            percentile(&delays, 95.0)
        } else {
            f64::NAN
        };
        let detail = format!(
            "{what}: {} of {n} back; p50 {:.1} s, max {:.1} s after the link returned, at \
             most {} in one second",
            delays.len(),
            percentile(&delays, 50.0),
            delays.last().copied().unwrap_or(f64::NAN),
            peak_per_second(&delays)
        );
        // The first zone past the idle timeout gives the headline figure (2 min in `all`).
        let key = match (kind, Some(secs) == headline) {
            ("link", true) => "reconnect_after_link_p95_s".to_string(),
            ("link", false) => format!("reconnect_after_link_{secs}s_p95_s"),
            _ => "reconnect_after_blackhole_p95_s".to_string(),
        };
        r.add(&key, "s", vec![p95], &detail);
    }
    drop(lg);
    Ok(())
}
