//! `tsh ssh -L`, `-R`, `-D` and `-A`: the forwards tsh sets up around a session.
//!
//! - `-L [BIND:]PORT:HOST:HOSTPORT` listens here and opens a `direct-tcpip` channel per
//!   connection; the device connects to HOST:HOSTPORT.
//! - `-D [BIND:]PORT` is a SOCKS5 proxy here (no authentication, CONNECT only): each
//!   request becomes a `direct-tcpip` channel, so the device connects wherever the
//!   application asked. Same role check as `-L` on the device.
//! - `-R [BIND:]PORT:HOST:HOSTPORT` asks the device to listen (on its loopback) and
//!   connects each `forwarded-tcpip` channel it opens to HOST:HOSTPORT here.
//! - `-A` hands each `auth-agent@openssh.com` channel the device opens to the local agent
//!   at `SSH_AUTH_SOCK`.
//!
//! Inbound channels (the last two) arrive at the russh client handler, which asks
//! [`Inbound`] where they go.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use russh::client::Msg;
use russh::Channel;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::ssh::Connection;
use super::CliError;

/// One `[BIND:]PORT:HOST:HOSTPORT` of `-L` or `-R`.
#[derive(Debug, Clone, PartialEq)]
pub struct PortForward {
    pub bind: String,
    pub port: u16,
    pub host: String,
    pub host_port: u16,
}

impl PortForward {
    /// Parses a spec given to `flag` ("-L" or "-R").
    pub fn parse(flag: &str, spec: &str) -> Result<Self, CliError> {
        let bad = || {
            CliError::msg(format!(
                "bad {flag} {spec:?}: expected [BIND:]PORT:HOST:HOSTPORT"
            ))
        };
        let parts: Vec<&str> = spec.split(':').collect();
        let (bind, port, host, host_port) = match parts.as_slice() {
            [p, h, hp] => ("", *p, *h, *hp),
            [b, p, h, hp] => (*b, *p, *h, *hp),
            _ => return Err(bad()),
        };
        if host.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            bind: bind.to_string(),
            port: port.parse().map_err(|_| bad())?,
            host: host.to_string(),
            host_port: host_port.parse().map_err(|_| bad())?,
        })
    }

    /// The local address a `-L` listens on: loopback unless a bind address is given.
    fn local_bind(&self) -> String {
        format!("{}:{}", local_host(&self.bind), self.port)
    }
}

/// One `-D [BIND:]PORT`: the local address of the SOCKS proxy.
pub fn parse_dynamic(spec: &str) -> Result<String, CliError> {
    let bad = || CliError::msg(format!("bad -D {spec:?}: expected [BIND:]PORT"));
    let (bind, port) = match spec.rsplit_once(':') {
        Some((b, p)) => (b, p),
        None => ("", spec),
    };
    let port: u16 = port.parse().map_err(|_| bad())?;
    Ok(format!("{}:{port}", local_host(bind)))
}

fn local_host(bind: &str) -> &str {
    if bind.is_empty() || bind == "localhost" {
        "127.0.0.1"
    } else {
        bind
    }
}

/// Where channels the device opens to tsh go: the `-R` targets by the port the device
/// listens on, and the local agent for `-A`.
#[derive(Default)]
pub struct Inbound {
    pub agent: Option<PathBuf>,
    remote: Mutex<HashMap<u32, (String, u16)>>,
}

impl Inbound {
    pub fn new(agent: Option<PathBuf>) -> Self {
        Self {
            agent,
            remote: Mutex::default(),
        }
    }

    /// Whether tsh asked the device to forward `port` (`-R`).
    pub fn has_remote(&self, port: u32) -> bool {
        self.remote.lock().is_ok_and(|m| m.contains_key(&port))
    }

    /// A `forwarded-tcpip` channel for the device's `port`: connects it to its target.
    pub fn remote_channel(&self, channel: Channel<Msg>, port: u32, originator: String) {
        let target = self.remote.lock().ok().and_then(|m| m.get(&port).cloned());
        tokio::spawn(async move {
            let Some((host, hport)) = target else {
                return;
            };
            match TcpStream::connect((host.as_str(), hport)).await {
                Ok(mut tcp) => {
                    let _ = tcp.set_nodelay(true);
                    let mut stream = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await;
                }
                Err(e) => {
                    eprintln!(
                        "tsh: -R connection from {originator} to {host}:{hport} failed: {e}\r"
                    );
                }
            }
        });
    }

    /// An `auth-agent@openssh.com` channel: connects it to the local agent.
    pub fn agent_channel(&self, channel: Channel<Msg>) {
        let Some(path) = self.agent.clone() else {
            return;
        };
        tokio::spawn(async move {
            match tokio::net::UnixStream::connect(&path).await {
                Ok(mut unix) => {
                    let mut stream = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut unix).await;
                }
                Err(e) => {
                    eprintln!(
                        "tsh: cannot reach the local ssh-agent at {}: {e}\r",
                        path.display()
                    );
                }
            }
        });
    }
}

/// The local agent for `-A`: `SSH_AUTH_SOCK`, which must be set.
pub fn local_agent() -> Result<PathBuf, CliError> {
    match std::env::var_os("SSH_AUTH_SOCK") {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => Err(CliError::msg(
            "-A forwards your ssh-agent, but SSH_AUTH_SOCK is not set: start one with `eval $(ssh-agent)` and add keys with ssh-add",
        )),
    }
}

/// Starts the `-L` listeners.
pub async fn start_local(conn: &Arc<Connection>, forwards: &[PortForward]) -> Result<(), CliError> {
    for f in forwards {
        let bind = f.local_bind();
        let listener = TcpListener::bind(&bind)
            .await
            .map_err(|e| CliError::msg(format!("cannot listen on {bind} for -L: {e}")))?;
        let (conn, host, port) = (conn.clone(), f.host.clone(), f.host_port);
        tokio::spawn(async move {
            while let Ok((mut tcp, peer)) = listener.accept().await {
                let (conn, host) = (conn.clone(), host.clone());
                tokio::spawn(async move {
                    let Ok(channel) = open_direct(&conn, &host, port, &peer).await else {
                        return;
                    };
                    let _ = tcp.set_nodelay(true);
                    let mut stream = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await;
                });
            }
        });
    }
    Ok(())
}

/// Asks the device for each `-R`; a refusal ends tsh with the reason.
pub async fn start_remote(
    conn: &Connection,
    inbound: &Inbound,
    forwards: &[PortForward],
) -> Result<(), CliError> {
    for f in forwards {
        let bound = conn
            .handle
            .tcpip_forward(f.bind.clone(), u32::from(f.port))
            .await
            .map_err(|e| {
                CliError::msg(format!(
                    "{} refused -R {}:{}:{}: {} (the certificate may not permit port forwarding, or the port is taken; see the device's log)",
                    conn.device,
                    f.port,
                    f.host,
                    f.host_port,
                    match e {
                        russh::Error::RequestDenied => "request denied".to_string(),
                        other => other.to_string(),
                    }
                ))
            })?;
        let bound = if f.port == 0 {
            bound
        } else {
            u32::from(f.port)
        };
        if f.port == 0 {
            eprintln!(
                "Allocated port {bound} on {} for remote forward to {}:{}",
                conn.device, f.host, f.host_port
            );
        }
        if let Ok(mut m) = inbound.remote.lock() {
            m.insert(bound, (f.host.clone(), f.host_port));
        }
    }
    Ok(())
}

/// Starts the `-D` SOCKS5 proxies.
pub async fn start_dynamic(conn: &Arc<Connection>, binds: &[String]) -> Result<(), CliError> {
    for bind in binds {
        let listener = TcpListener::bind(bind)
            .await
            .map_err(|e| CliError::msg(format!("cannot listen on {bind} for -D: {e}")))?;
        let conn = conn.clone();
        tokio::spawn(async move {
            while let Ok((tcp, peer)) = listener.accept().await {
                let conn = conn.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(SOCKS_HANDSHAKE, socks_session(&conn, tcp, peer))
                        .await;
                });
            }
        });
    }
    Ok(())
}

/// How long a SOCKS client has to say where it wants to go.
const SOCKS_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(30);

async fn open_direct(
    conn: &Connection,
    host: &str,
    port: u16,
    peer: &std::net::SocketAddr,
) -> Result<Channel<Msg>, russh::ChannelOpenFailure> {
    match conn
        .handle
        .channel_open_direct_tcpip(
            host.to_string(),
            u32::from(port),
            peer.ip().to_string(),
            u32::from(peer.port()),
        )
        .await
    {
        Ok(c) => Ok(c),
        Err(e) => {
            let (why, code) = match e {
                russh::Error::ChannelOpenFailure(r) => (r.description().to_lowercase(), r),
                other => (other.to_string(), russh::ChannelOpenFailure::ConnectFailed),
            };
            eprintln!("tsh: port forward to {host}:{port} failed: {why}\r");
            Err(code)
        }
    }
}

/// One SOCKS5 connection: greeting, CONNECT request, then the channel. Only the handshake
/// is under [`SOCKS_HANDSHAKE`]: the spliced connection runs in its own task.
async fn socks_session(
    conn: &Arc<Connection>,
    mut tcp: TcpStream,
    peer: std::net::SocketAddr,
) -> std::io::Result<()> {
    let (host, port) = match socks::handshake(&mut tcp).await? {
        Ok(target) => target,
        Err(reply) => {
            tcp.write_all(&socks::reply(reply)).await?;
            return Ok(());
        }
    };
    match open_direct(conn, &host, port, &peer).await {
        Ok(channel) => {
            tcp.write_all(&socks::reply(socks::SUCCEEDED)).await?;
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let mut stream = channel.into_stream();
                let _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await;
            });
        }
        Err(why) => {
            let code = match why {
                russh::ChannelOpenFailure::AdministrativelyProhibited => socks::NOT_ALLOWED,
                _ => socks::REFUSED,
            };
            tcp.write_all(&socks::reply(code)).await?;
        }
    }
    Ok(())
}

/// The SOCKS5 subset `-D` speaks (RFC 1928): no authentication, CONNECT, IPv4, IPv6 and
/// domain names.
mod socks {
    use super::*;

    pub const SUCCEEDED: u8 = 0;
    pub const NOT_ALLOWED: u8 = 2;
    pub const REFUSED: u8 = 5;
    const BAD_COMMAND: u8 = 7;
    const BAD_ADDRESS: u8 = 8;

    /// Reads the greeting and the request. `Ok(Err(code))`: a request to refuse with
    /// `code`; `Err`: a broken or non-SOCKS5 client (the connection is just dropped).
    pub async fn handshake<S: AsyncReadExt + AsyncWriteExt + Unpin>(
        s: &mut S,
    ) -> std::io::Result<Result<(String, u16), u8>> {
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
        let mut head = [0u8; 2];
        s.read_exact(&mut head).await?;
        if head[0] != 5 {
            return Err(bad("not a SOCKS5 client"));
        }
        let mut methods = vec![0u8; usize::from(head[1])];
        s.read_exact(&mut methods).await?;
        if !methods.contains(&0) {
            s.write_all(&[5, 0xff]).await?;
            return Err(bad("the client offers no method without authentication"));
        }
        s.write_all(&[5, 0]).await?;
        let mut req = [0u8; 4];
        s.read_exact(&mut req).await?;
        if req[0] != 5 {
            return Err(bad("not a SOCKS5 request"));
        }
        let host = match req[3] {
            1 => {
                let mut a = [0u8; 4];
                s.read_exact(&mut a).await?;
                std::net::Ipv4Addr::from(a).to_string()
            }
            4 => {
                let mut a = [0u8; 16];
                s.read_exact(&mut a).await?;
                std::net::Ipv6Addr::from(a).to_string()
            }
            3 => {
                let mut n = [0u8; 1];
                s.read_exact(&mut n).await?;
                let mut name = vec![0u8; usize::from(n[0])];
                s.read_exact(&mut name).await?;
                match String::from_utf8(name) {
                    Ok(n) if !n.is_empty() => n,
                    _ => {
                        let mut port = [0u8; 2];
                        s.read_exact(&mut port).await?;
                        return Ok(Err(BAD_ADDRESS));
                    }
                }
            }
            _ => return Ok(Err(BAD_ADDRESS)),
        };
        let mut port = [0u8; 2];
        s.read_exact(&mut port).await?;
        if req[1] != 1 {
            return Ok(Err(BAD_COMMAND));
        }
        Ok(Ok((host, u16::from_be_bytes(port))))
    }

    /// A reply with `code` and an unspecified bound address.
    pub fn reply(code: u8) -> [u8; 10] {
        [5, code, 0, 1, 0, 0, 0, 0, 0, 0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let f = PortForward::parse("-L", "8080:127.0.0.1:80").unwrap();
        assert_eq!(
            (f.local_bind(), f.host.as_str(), f.host_port),
            ("127.0.0.1:8080".into(), "127.0.0.1", 80)
        );
        let f = PortForward::parse("-R", "0.0.0.0:8080:db:5432").unwrap();
        assert_eq!(
            (f.bind.as_str(), f.port, f.host.as_str()),
            ("0.0.0.0", 8080, "db")
        );
        let f = PortForward::parse("-R", "0:localhost:22").unwrap();
        assert_eq!((f.bind.as_str(), f.port), ("", 0));
        for bad in ["8080", "x:h:1", "1::2", "1:h:99999"] {
            let e = PortForward::parse("-R", bad).unwrap_err().to_string();
            assert!(
                e.contains("bad -R") && e.contains("[BIND:]PORT:HOST:HOSTPORT"),
                "{e}"
            );
        }
        assert_eq!(parse_dynamic("1080").unwrap(), "127.0.0.1:1080");
        assert_eq!(parse_dynamic("0.0.0.0:1080").unwrap(), "0.0.0.0:1080");
        assert!(parse_dynamic("x")
            .unwrap_err()
            .to_string()
            .contains("bad -D"));
    }

    async fn socks_roundtrip(
        bytes: &[u8],
    ) -> (std::io::Result<Result<(String, u16), u8>>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(bytes).await.unwrap();
        client.shutdown().await.unwrap();
        let r = socks::handshake(&mut server).await;
        drop(server);
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        (r, out)
    }

    #[tokio::test]
    async fn socks5_requests() {
        // CONNECT to a name.
        let mut req = vec![5, 1, 0, 5, 1, 0, 3, 9];
        req.extend_from_slice(b"localhost");
        req.extend_from_slice(&8080u16.to_be_bytes());
        let (r, out) = socks_roundtrip(&req).await;
        assert_eq!(r.unwrap(), Ok(("localhost".into(), 8080)));
        assert_eq!(out, [5, 0]);
        // CONNECT to IPv4 and IPv6.
        let (r, _) = socks_roundtrip(&[5, 1, 0, 5, 1, 0, 1, 10, 0, 0, 1, 0, 22]).await;
        assert_eq!(r.unwrap(), Ok(("10.0.0.1".into(), 22)));
        let mut req = vec![5, 1, 0, 5, 1, 0, 4];
        req.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
        req.extend_from_slice(&[0, 80]);
        assert_eq!(
            socks_roundtrip(&req).await.0.unwrap(),
            Ok(("::1".into(), 80))
        );
        // BIND is refused with "command not supported".
        let (r, _) = socks_roundtrip(&[5, 1, 0, 5, 2, 0, 1, 10, 0, 0, 1, 0, 22]).await;
        assert_eq!(r.unwrap(), Err(7));
        // An unknown address type.
        assert_eq!(
            socks_roundtrip(&[5, 1, 0, 5, 1, 0, 9]).await.0.unwrap(),
            Err(8)
        );
        // SOCKS4, a client that insists on a password, a truncated request: dropped.
        assert!(socks_roundtrip(&[4, 1, 0, 80, 127, 0, 0, 1, 0])
            .await
            .0
            .is_err());
        let (r, out) = socks_roundtrip(&[5, 1, 2]).await;
        assert!(r.is_err());
        assert_eq!(out, [5, 0xff]);
        assert!(socks_roundtrip(&[5, 1, 0, 5, 1]).await.0.is_err());
    }
}
