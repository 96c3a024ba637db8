//! Harness for gateway and agent processes: start a gateway joined to an authority, start
//! agents joined through it, and read the inventory with `tctl devices ls --format json`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::{bin, free_port, run, wait_until, Authority, Proc, Run};

/// How to reach an authority with tctl (copied out of [`Authority`] so that gateways and
/// agents can make tokens without borrowing it).
#[derive(Clone, Debug)]
pub struct Tctl {
    pub addr: String,
    pub identity: PathBuf,
}

impl Tctl {
    pub fn of(auth: &Authority) -> Self {
        Self {
            addr: auth.addr.clone(),
            identity: auth.identity(),
        }
    }

    pub fn run(&self, args: &[&str]) -> Run {
        let mut c = Command::new(bin("tctl"));
        c.env("EDGEPORT_AUTH", &self.addr)
            .env("EDGEPORT_IDENTITY", &self.identity)
            .args(args);
        run(c, None, Duration::from_secs(30))
    }

    pub fn ok(&self, args: &[&str]) -> Run {
        self.run(args)
            .expect_ok(&format!("tctl {}", args.join(" ")))
    }

    /// A fresh join token: (token, ca_pin).
    pub fn token(&self, kind: &str, labels: &str, ttl: &str) -> (String, String) {
        let mut args = vec![
            "tokens", "add", "--type", kind, "--ttl", ttl, "--format", "json",
        ];
        if !labels.is_empty() {
            args.extend(["--labels", labels]);
        }
        let j = self.ok(&args).json();
        (
            j["token"].as_str().expect("token").to_string(),
            j["ca_pin"].as_str().expect("ca_pin").to_string(),
        )
    }

    /// The inventory.
    pub fn devices(&self) -> Vec<Value> {
        self.ok(&["devices", "ls", "--format", "json"])
            .json()
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn device(&self, id: &str) -> Option<Value> {
        self.devices().into_iter().find(|d| d["id"] == id)
    }
}

impl From<&Authority> for Tctl {
    fn from(a: &Authority) -> Self {
        Tctl::of(a)
    }
}

impl From<&Tctl> for Tctl {
    fn from(t: &Tctl) -> Self {
        t.clone()
    }
}

/// A running gateway.
pub struct Gateway {
    pub proc: Proc,
    pub data_dir: PathBuf,
    pub port: u16,
    /// `127.0.0.1:PORT` (TCP and UDP), or the host given to [`Gateway::start_on`].
    pub addr: String,
    pub ca_pin: String,
    pub tctl: Tctl,
    extra: Vec<String>,
}

impl Gateway {
    /// Makes a gateway token with tctl, starts `gateway start` on a free port and waits until
    /// it listens.
    pub fn start(data_dir: &Path, auth: &Authority) -> Self {
        Self::start_with(data_dir, auth, &[])
    }

    pub fn start_with(data_dir: &Path, auth: &Authority, extra: &[&str]) -> Self {
        Self::start_on(data_dir, auth, "127.0.0.1", extra)
    }

    /// As [`Gateway::start_with`], listening on `host` (an address of this machine, e.g. one
    /// that devices in a network namespace reach) instead of 127.0.0.1.
    pub fn start_on(data_dir: &Path, auth: &Authority, host: &str, extra: &[&str]) -> Self {
        let tctl = Tctl::of(auth);
        let (token, ca_pin) = tctl.token("gateway", "", "10m");
        let port = free_port();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let addr = format!("{host}:{port}");
        let proc = spawn_gateway(data_dir, &tctl.addr, &addr, Some((&token, &ca_pin)), &extra);
        let mut gw = Self {
            proc,
            data_dir: data_dir.to_path_buf(),
            port,
            addr,
            ca_pin,
            tctl,
            extra,
        };
        gw.wait_up();
        gw
    }

    fn wait_up(&mut self) {
        let up = wait_until(Duration::from_secs(30), || {
            self.proc.log_text().contains("gateway listening on")
        });
        assert!(
            up && self.proc.alive(),
            "gateway did not come up:\n{}",
            self.proc.log_text()
        );
    }

    /// Starts the gateway again from its data dir (no token) on the same port, after it was
    /// stopped or killed.
    pub fn restart(&mut self) {
        self.proc.kill9();
        self.proc = spawn_gateway(
            &self.data_dir,
            &self.tctl.addr,
            &self.addr,
            None,
            &self.extra,
        );
        self.wait_up();
    }

    /// A device join token for this gateway's cluster: (token, ca_pin).
    pub fn device_token(&self, labels: &str) -> (String, String) {
        self.tctl.token("device", labels, "10m")
    }
}

fn spawn_gateway(
    data_dir: &Path,
    auth_addr: &str,
    listen: &str,
    join: Option<(&str, &str)>,
    extra: &[String],
) -> Proc {
    let mut cmd = Command::new(bin("gateway"));
    cmd.args(["start", "--data-dir"])
        .arg(data_dir)
        .args(["--auth", auth_addr, "--listen", listen]);
    if let Some((token, pin)) = join {
        cmd.args(["--token", token, "--ca-pin", pin]);
    }
    cmd.args(extra);
    let log_dir = data_dir.parent().unwrap_or(data_dir);
    Proc::spawn("gateway", cmd, log_dir)
}

/// A running edge agent.
pub struct Agent {
    pub proc: Proc,
    pub id: String,
    pub data_dir: PathBuf,
    pub gateway: String,
    extra: Vec<String>,
}

impl Agent {
    /// Makes a device token, starts `edge-agent start` with `--id ID --labels LABELS` and
    /// `extra_args` (e.g. `--test-echo`). Does not wait: see [`wait_online`].
    pub fn start(
        data_dir: &Path,
        gw: &Gateway,
        id: &str,
        labels: &str,
        extra_args: &[&str],
    ) -> Self {
        let (token, pin) = gw.device_token("");
        let mut args: Vec<String> = vec![
            "--token".into(),
            token,
            "--ca-pin".into(),
            pin,
            "--id".into(),
            id.into(),
        ];
        if !labels.is_empty() {
            args.extend(["--labels".into(), labels.into()]);
        }
        let extra: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        args.extend(extra.iter().cloned());
        let proc = spawn_agent(data_dir, &gw.addr, &args);
        Self {
            proc,
            id: id.to_string(),
            data_dir: data_dir.to_path_buf(),
            gateway: gw.addr.clone(),
            extra,
        }
    }

    /// Starts an agent from an existing data dir (no token) against `gateway`.
    pub fn start_joined(data_dir: &Path, gateway: &str, id: &str, extra_args: &[&str]) -> Self {
        let extra: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        let proc = spawn_agent(data_dir, gateway, &extra);
        Self {
            proc,
            id: id.to_string(),
            data_dir: data_dir.to_path_buf(),
            gateway: gateway.to_string(),
            extra,
        }
    }

    /// Kills the agent (SIGKILL) and starts it again without a token.
    pub fn restart(&mut self) {
        self.proc.kill9();
        self.proc = spawn_agent(&self.data_dir, &self.gateway, &self.extra);
    }

    /// How many tunnels this agent process has brought up so far.
    pub fn tunnels_up(&self) -> usize {
        self.proc.log_text().matches("tunnel up").count()
    }
}

/// Runs `edge-agent start` to completion (for joins that must fail): args after `start`.
pub fn agent_once(data_dir: &Path, gateway: &str, args: &[&str]) -> Run {
    let mut cmd = Command::new(bin("edge-agent"));
    cmd.args(["start", "--data-dir"])
        .arg(data_dir)
        .args(["--gateway", gateway])
        .args(args)
        .env("RUST_LOG", "info");
    run(cmd, None, Duration::from_secs(60))
}

fn spawn_agent(data_dir: &Path, gateway: &str, args: &[String]) -> Proc {
    let mut cmd = Command::new(bin("edge-agent"));
    cmd.args(["start", "--data-dir"])
        .arg(data_dir)
        .args(["--gateway", gateway])
        .args(args);
    let log_dir = data_dir.parent().unwrap_or(data_dir);
    Proc::spawn("edge-agent", cmd, log_dir)
}

/// Waits until `id` is online (over `transport` if given) and returns its inventory entry.
/// `tctl` is an [`Authority`] or a [`Tctl`] (e.g. `&gateway.tctl`).
pub fn wait_online(
    tctl: impl Into<Tctl>,
    id: &str,
    transport: Option<&str>,
    timeout: Duration,
) -> Value {
    let tctl: Tctl = tctl.into();
    let mut last = None;
    let ok = wait_until(timeout, || {
        let d = tctl.device(id);
        let hit = d
            .as_ref()
            .is_some_and(|d| d["online"] == true && transport.is_none_or(|t| d["transport"] == t));
        last = d;
        hit
    });
    assert!(
        ok,
        "device {id} not online (transport {transport:?}) within {timeout:?}; last entry: {last:?}\ninventory: {:#?}",
        tctl.devices()
    );
    last.expect("entry")
}

/// Waits until `id` is offline or gone; returns its entry if it is still listed.
pub fn wait_offline(tctl: impl Into<Tctl>, id: &str, timeout: Duration) -> Option<Value> {
    let tctl: Tctl = tctl.into();
    let mut last = None;
    let ok = wait_until(timeout, || {
        let d = tctl.device(id);
        let off = d.as_ref().is_none_or(|d| d["online"] == false);
        last = d;
        off
    });
    assert!(ok, "device {id} still online after {timeout:?}: {last:?}");
    last
}
