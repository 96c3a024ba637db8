//! Talking to the gateway on `edgeport-dial/1`: one stream per request, over TCP+TLS (the
//! default: cheaper on the user's leg) or QUIC. Every stream starts with one
//! [`ClientRequest`] frame and gets one [`ClientReply`] frame; after `DialOk` it carries the
//! raw SSH session.

use std::sync::Arc;
use std::time::Duration;

use edgeport_net::BoxedStream;
use edgeport_net::{read_frame, write_frame};
use edgeport_proto::alpn;
use edgeport_proto::frame::FrameError;
use edgeport_proto::tls::{CertKey, GATEWAY_SERVER_NAME};
use edgeport_proto::tunnel::{ClientReply, ClientRequest, Service};
use rustls::pki_types::ServerName;

use super::cli::Transport;
use super::profile::Creds;
use super::CliError;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// How to verify the gateway before we have the cluster's CA certificate.
pub enum Trust {
    /// The CA certificate itself (after a login).
    Ca(Vec<u8>),
    /// First contact: the server's chain must hold a CA with this pin.
    Pin(String),
    /// First contact with a gateway that has a public certificate (`gateway --cert`): the
    /// system's roots, for this host name.
    System(String),
    /// No verification (`--insecure`).
    Insecure,
}

impl Trust {
    /// The TLS server name to ask for: the cluster's gateway name, or the public host name.
    pub fn server_name(&self) -> &str {
        match self {
            Trust::System(host) => host,
            _ => GATEWAY_SERVER_NAME,
        }
    }
}

/// The system's trusted roots (the OS store; `SSL_CERT_FILE` and `SSL_CERT_DIR` override).
fn system_roots() -> Result<rustls::RootCertStore, CliError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        return Err(CliError::msg(format!(
            "no trusted root certificates found on this system{why}; pass --ca-pin instead"
        )));
    }
    Ok(roots)
}

/// A TLS client config for the dial ALPN.
pub fn tls_config(
    trust: &Trust,
    me: Option<&CertKey>,
) -> Result<Arc<rustls::ClientConfig>, CliError> {
    let alpn = [alpn::DIAL];
    let cfg = match trust {
        Trust::Ca(der) => edgeport_proto::tls::client_config(der, me, &alpn),
        Trust::Pin(pin) => edgeport_proto::tls::pinned_client_config(pin, me, &alpn),
        Trust::System(_) => {
            let builder =
                rustls::ClientConfig::builder_with_provider(edgeport_proto::tls::provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(|e| CliError::msg(e.to_string()))?
                    .with_root_certificates(system_roots()?);
            let mut cfg = match me {
                Some(me) => builder
                    .with_client_auth_cert(me.chain.clone(), me.key())
                    .map_err(|e| CliError::msg(e.to_string()))?,
                None => builder.with_no_client_auth(),
            };
            cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
            return Ok(Arc::new(cfg));
        }
        Trust::Insecure => return insecure_config(me),
    }
    .map_err(|e| CliError::msg(format!("TLS setup: {e}")))?;
    Ok(Arc::new(cfg))
}

/// The gateway connection settings of a logged-in user.
pub fn creds_config(creds: &Creds) -> Result<Arc<rustls::ClientConfig>, CliError> {
    let ca_der = creds
        .cas
        .x509_ca_der()
        .map_err(|e| CliError::msg(format!("the stored cluster CA is unreadable: {e}")))?;
    let me = CertKey::from_pem(&creds.x509_pem, None, creds.key.pkcs8_der())
        .map_err(|e| CliError::msg(format!("the stored x509 certificate is unreadable: {e}")))?;
    tls_config(&Trust::Ca(ca_der), Some(&me))
}

/// Opens one stream to the gateway at `proxy`.
pub async fn open(
    proxy: &str,
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
    transport: Transport,
) -> Result<BoxedStream, CliError> {
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| CliError::msg(format!("{server_name:?}: {e}")))?;
    match transport {
        Transport::Tcp => {
            let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(proxy))
                .await
                .map_err(|_| {
                    CliError::msg(format!("cannot reach the gateway at {proxy}: timed out"))
                })?
                .map_err(|e| CliError::msg(format!("cannot reach the gateway at {proxy}: {e}")))?;
            let _ = tcp.set_nodelay(true);
            let tls = tokio::time::timeout(
                CONNECT_TIMEOUT,
                tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
            )
            .await
            .map_err(|_| {
                CliError::msg(format!(
                    "TLS handshake with the gateway at {proxy} timed out"
                ))
            })?
            .map_err(|e| tls_handshake_error(proxy, &e))?;
            Ok(Box::new(tls))
        }
        Transport::Quic => quic::open(proxy, server_name, tls).await,
    }
}

/// What a failed TLS handshake with the gateway means, told as it happened: only a
/// certificate that does not verify says "cannot verify the gateway" (which
/// [`user_request`] turns into the other-cluster hint); a connection the gateway dropped or
/// reset mid-handshake (its pre-auth budget, an overloaded listener) says so.
pub(crate) fn tls_handshake_error(proxy: &str, e: &std::io::Error) -> CliError {
    use std::io::ErrorKind;
    // tokio-rustls reports TLS errors as InvalidData with the rustls error inside.
    if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return match tls {
            // Our verifier refused the gateway's certificate (unknown issuer, bad pin, ...).
            rustls::Error::InvalidCertificate(_) | rustls::Error::General(_) => {
                CliError::msg(format!("cannot verify the gateway at {proxy}: {e}"))
            }
            rustls::Error::AlertReceived(alert) => CliError::msg(format!(
                "the gateway at {proxy} ended the TLS handshake with alert {alert:?}"
            )),
            other => CliError::msg(format!(
                "TLS handshake with the gateway at {proxy} failed: {other}"
            )),
        };
    }
    match e.kind() {
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe => CliError::msg(format!(
            "the gateway at {proxy} closed the connection during the TLS handshake ({e}); \
             it may be overloaded: try again"
        )),
        _ => CliError::msg(format!(
            "TLS handshake with the gateway at {proxy} failed: {e}"
        )),
    }
}

/// Sends `req` on a fresh stream and reads the reply; the stream is returned for dials.
pub async fn request(
    proxy: &str,
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
    transport: Transport,
    req: &ClientRequest,
) -> Result<(ClientReply, BoxedStream), CliError> {
    let (reply, stream) = request_reply(proxy, server_name, tls, transport, req).await?;
    if let ClientReply::Refused(e) = &reply {
        return Err(CliError::msg(format!("the gateway refused: {}", e.message)));
    }
    Ok((reply, stream))
}

/// As [`request`], with a refusal returned as the reply (its kind tells what to do next).
pub async fn request_reply(
    proxy: &str,
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
    transport: Transport,
    req: &ClientRequest,
) -> Result<(ClientReply, BoxedStream), CliError> {
    let mut stream = open(proxy, server_name, tls, transport).await?;
    let exchange = async {
        write_frame(&mut stream, req).await?;
        read_frame::<ClientReply, _>(&mut stream).await
    };
    let reply = tokio::time::timeout(REPLY_TIMEOUT, exchange)
        .await
        .map_err(|_| CliError::msg(format!("the gateway at {proxy} did not answer within {REPLY_TIMEOUT:?}")))?
        .map_err(|e| match e {
            // TLS 1.3 reports a refused client certificate only on the first read.
            FrameError::Closed | FrameError::Io(_) | FrameError::Truncated => CliError::msg(format!(
                "the gateway at {proxy} closed the connection ({e}); are the credentials from this cluster and still valid? try tsh login"
            )),
            other => CliError::msg(format!("bad answer from the gateway at {proxy}: {other}")),
        })?;
    Ok((reply, stream))
}

/// Dials `target`'s SSH service: returns the raw stream and the session id.
pub async fn dial_ssh(
    creds: &Creds,
    transport: Transport,
    target: &str,
) -> Result<(BoxedStream, String), CliError> {
    let tls = creds_config(creds)?;
    // `DEVICE/TARGET`: a host behind the device, relayed by its agent (issue 22).
    let (device, service) = match edgeport_proto::targets::split(target) {
        Some((device, name)) => (device, Service::Target(name.to_string())),
        None => (target, Service::Ssh),
    };
    let req = ClientRequest::Dial {
        target: device.to_string(),
        service: service.clone(),
    };
    match user_request(creds, tls, transport, &req).await? {
        (ClientReply::DialOk { session_id, .. }, mut stream) => {
            if let Service::Target(name) = &service {
                let pin = relay_status(&mut stream, target).await?;
                remember_pin(creds, device, name, target, pin)?;
            }
            Ok((stream, session_id))
        }
        (other, _) => Err(unexpected(&other)),
    }
}

/// Host keys pinned for targets (`DEVICE/TARGET`), as their devices vouched for them on this
/// run's dials: what [`super::ssh::Verifier`] and `tsh proxy ssh` trust for those targets.
static PINNED: std::sync::Mutex<Vec<(String, russh::keys::ssh_key::PublicKey)>> =
    std::sync::Mutex::new(Vec::new());

/// The host key pinned for `target`, if its device said so on a dial of this run.
pub fn pinned_key(target: &str) -> Option<russh::keys::ssh_key::PublicKey> {
    let pins = PINNED.lock().ok()?;
    pins.iter()
        .find(|(t, _)| t == target)
        .map(|(_, k)| k.clone())
}

/// Checks the device's statement of a pinned key (its host certificate from the cluster's host
/// CA, its signature, the target's name, a fresh time) and remembers the key for `target`. A
/// statement that does not check is refused: a gateway may drop one but never make one.
fn remember_pin(
    creds: &Creds,
    device: &str,
    name: &str,
    target: &str,
    pin: Option<edgeport_proto::targets::PinnedKey>,
) -> Result<(), CliError> {
    let key = match pin {
        None => None,
        Some(p) => Some(
            p.verify(
                &creds.cas.host_cas(),
                device,
                name,
                edgeport_net::clock::now_secs(),
            )
            .map_err(|e| {
                CliError::msg(format!(
                    "the pinned host key sent for {target} does not count: {e}; refusing to connect"
                ))
            })?,
        ),
    };
    if let Ok(mut pins) = PINNED.lock() {
        pins.retain(|(t, _)| t != target);
        if let Some(k) = key {
            pins.push((target.to_string(), k));
        }
    }
    Ok(())
}

/// The agent's first byte on a relayed stream (edge-agent/src/relay.rs): `0`, connected to the
/// target; `2`, connected, with the device's signed pin of the target's host key; `1` and one
/// line saying why not (unknown target, unreachable).
async fn relay_status(
    stream: &mut BoxedStream,
    target: &str,
) -> Result<Option<edgeport_proto::targets::PinnedKey>, CliError> {
    use tokio::io::AsyncReadExt;
    let lost = |e: std::io::Error| {
        CliError::msg(format!(
            "the device behind {target} closed the stream before connecting to the target: {e}"
        ))
    };
    let first = tokio::time::timeout(REPLY_TIMEOUT, stream.read_u8())
        .await
        .map_err(|_| {
            CliError::msg(format!(
                "the device did not connect to {target} within {REPLY_TIMEOUT:?}"
            ))
        })?
        .map_err(lost)?;
    if first == 0 {
        return Ok(None);
    }
    if first == 2 {
        let read = read_frame(stream);
        return match tokio::time::timeout(REPLY_TIMEOUT, read).await {
            Ok(Ok(p)) => Ok(Some(p)),
            Ok(Err(e)) => Err(CliError::msg(format!(
                "the device behind {target} sent an unreadable pinned host key: {e}"
            ))),
            Err(_) => Err(CliError::msg(format!(
                "the device behind {target} did not send its pinned host key within {REPLY_TIMEOUT:?}"
            ))),
        };
    }
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 1024 {
        match stream.read(&mut byte).await {
            Ok(1) if byte[0] != b'\n' => line.push(byte[0]),
            _ => break,
        }
    }
    Err(CliError::msg(String::from_utf8_lossy(&line).into_owned()))
}

/// The targets behind devices that the user's roles reach (`tsh ls`, `tsh config`).
pub async fn list_targets(
    creds: &Creds,
    transport: Transport,
) -> Result<Vec<edgeport_proto::targets::TargetInfo>, CliError> {
    let tls = creds_config(creds)?;
    match user_request(creds, tls, transport, &ClientRequest::ListTargets).await? {
        (ClientReply::Targets(t), _) => Ok(t),
        (other, _) => Err(unexpected(&other)),
    }
}

/// [`request`] with the user's credentials: a gateway that does not chain to the
/// credentials' cluster CA gets a hint that the credentials are another cluster's.
pub async fn user_request(
    creds: &Creds,
    tls: Arc<rustls::ClientConfig>,
    transport: Transport,
    req: &ClientRequest,
) -> Result<(ClientReply, BoxedStream), CliError> {
    request(&creds.proxy, GATEWAY_SERVER_NAME, tls, transport, req)
        .await
        .map_err(|e| {
            if e.message.starts_with("cannot verify the gateway") {
                CliError::msg(format!(
                    "{e}: the credentials are for cluster {:?}, and this gateway is not part of it",
                    creds.cas.cluster
                ))
            } else {
                e
            }
        })
}

/// The device list (every device the gateway's authority knows), read in parts when the fleet
/// is too large for one frame.
pub async fn list_devices(
    creds: &Creds,
    transport: Transport,
) -> Result<Vec<edgeport_proto::rpc::DeviceInfo>, CliError> {
    let tls = creds_config(creds)?;
    let (mut reply, mut stream) =
        user_request(creds, tls, transport, &ClientRequest::ListDevices).await?;
    let mut devices = Vec::new();
    loop {
        match reply {
            ClientReply::DevicesPart(part) => devices.extend(part),
            ClientReply::Devices(last) => {
                devices.extend(last);
                return Ok(devices);
            }
            other => return Err(unexpected(&other)),
        }
        reply = tokio::time::timeout(
            Duration::from_secs(30),
            edgeport_net::read_frame::<ClientReply, _>(&mut stream),
        )
        .await
        .map_err(|_| CliError::msg("the gateway stopped sending the device list"))?
        .map_err(|e| CliError::msg(format!("reading the device list: {e}")))?;
    }
}

pub fn unexpected(reply: &ClientReply) -> CliError {
    let name = format!("{reply:?}");
    let name = name
        .split(['(', ' ', '{'])
        .next()
        .unwrap_or("?")
        .to_string();
    CliError::msg(format!(
        "the gateway answered {name}, which tsh did not expect"
    ))
}

fn insecure_config(me: Option<&CertKey>) -> Result<Arc<rustls::ClientConfig>, CliError> {
    let provider = edgeport_proto::tls::provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CliError::msg(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(insecure::AcceptAnything(provider)));
    let mut cfg = match me {
        Some(me) => builder
            .with_client_auth_cert(
                me.chain.clone(),
                rustls::pki_types::PrivateKeyDer::Pkcs8(me.key_pkcs8.clone().into()),
            )
            .map_err(|e| CliError::msg(e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![alpn::DIAL.to_vec()];
    Ok(Arc::new(cfg))
}

mod insecure {
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    /// Accepts any server certificate (signatures are still checked, so the handshake is
    /// sound; only the identity is not). `--insecure` only.
    #[derive(Debug)]
    pub struct AcceptAnything(pub Arc<CryptoProvider>);

    impl ServerCertVerifier for AcceptAnything {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}

mod quic {
    use std::sync::Arc;

    use edgeport_net::BoxedStream;

    use super::{CliError, CONNECT_TIMEOUT};

    /// One stream on a fresh QUIC connection, through the same [`edgeport_net::Tunnel`] the
    /// agent and the gateway use. The stream keeps the connection alive (quinn streams hold
    /// it, and the endpoint runs while it has connections); dropping the stream closes it.
    pub async fn open(
        proxy: &str,
        server_name: &str,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<BoxedStream, CliError> {
        let addr = tokio::net::lookup_host(proxy)
            .await
            .map_err(|e| CliError::msg(format!("cannot resolve {proxy}: {e}")))?
            .next()
            .ok_or_else(|| CliError::msg(format!("cannot resolve {proxy}")))?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| CliError::msg(format!("QUIC setup: {e}")))?;
        let mut transport = edgeport_net::quic::bulk_transport();
        transport.keep_alive_interval(Some(std::time::Duration::from_secs(15)));
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        cfg.transport_config(Arc::new(transport));
        let bind: std::net::SocketAddr = if addr.is_ipv6() {
            "[::]:0".parse()
        } else {
            "0.0.0.0:0".parse()
        }
        .map_err(|e: std::net::AddrParseError| CliError::msg(e.to_string()))?;
        let udp_err = |e: std::io::Error| CliError::msg(format!("cannot open a UDP socket: {e}"));
        let mut endpoint = edgeport_net::quic::client_endpoint(bind).map_err(udp_err)?;
        endpoint.set_default_client_config(cfg);
        let connecting = endpoint
            .connect(addr, server_name)
            .map_err(|e| CliError::msg(format!("QUIC connect to {proxy}: {e}")))?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| {
                CliError::msg(format!(
                    "QUIC handshake with {proxy} timed out (is UDP blocked? try --transport tcp)"
                ))
            })?
            .map_err(|e| handshake_error(proxy, &e))?;
        edgeport_net::tunnel::quic(conn)
            .open()
            .await
            .map_err(|e| CliError::msg(format!("QUIC stream to {proxy}: {e}")))
    }

    /// A failed QUIC handshake, told as it happened (see [`super::tls_handshake_error`]).
    pub(super) fn handshake_error(proxy: &str, e: &quinn::ConnectionError) -> CliError {
        use quinn::{ConnectionError as E, TransportErrorCode as Code};
        let is_crypto = |c: Code| (0x100..0x200).contains(&u64::from(c));
        match e {
            // Our own TLS stack refused the gateway's certificate.
            E::TransportError(t) if is_crypto(t.code) => CliError::msg(format!(
                "cannot verify the gateway at {proxy}: {}",
                t.reason
            )),
            E::ConnectionClosed(c) if c.error_code == Code::CONNECTION_REFUSED => {
                CliError::msg(format!(
                    "the gateway at {proxy} refused the connection during the QUIC handshake; \
                     it may be overloaded: try again"
                ))
            }
            E::ConnectionClosed(c) if is_crypto(c.error_code) => CliError::msg(format!(
                "the gateway at {proxy} ended the QUIC handshake with a TLS alert ({e})"
            )),
            E::ConnectionClosed(_) | E::ApplicationClosed(_) | E::Reset => CliError::msg(format!(
                "the gateway at {proxy} closed the connection during the QUIC handshake \
                     ({e}); it may be overloaded: try again"
            )),
            _ => CliError::msg(format!("QUIC handshake with {proxy}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener that accepts one connection, reads the ClientHello, then closes it (or
    /// resets it with `SO_LINGER` 0), as an overloaded gateway shedding handshakes does.
    async fn dropping_gateway(reset: bool) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 512];
            let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
            if reset {
                s.set_zero_linger().unwrap();
            }
            drop(s);
        });
        addr
    }

    async fn open_err(addr: &str) -> String {
        edgeport_proto::tls::install_crypto_provider();
        let tls = tls_config(&Trust::Insecure, None).unwrap();
        match open(addr, GATEWAY_SERVER_NAME, tls, Transport::Tcp).await {
            Ok(_) => panic!("the handshake succeeded"),
            Err(e) => e.to_string(),
        }
    }

    #[tokio::test]
    async fn closed_handshake_says_overloaded() {
        let addr = dropping_gateway(false).await;
        let m = open_err(&addr).await;
        assert!(
            m.contains("closed the connection during the TLS handshake")
                && m.contains("overloaded"),
            "{m}"
        );
        assert!(!m.contains("cannot verify"), "{m}");
    }

    #[tokio::test]
    async fn reset_handshake_says_overloaded() {
        let addr = dropping_gateway(true).await;
        let m = open_err(&addr).await;
        assert!(
            m.contains("closed the connection during the TLS handshake"),
            "{m}"
        );
    }

    #[test]
    fn certificate_errors_still_say_cannot_verify() {
        let e = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let m = tls_handshake_error("gw:3080", &e).to_string();
        assert!(m.starts_with("cannot verify the gateway at gw:3080"), "{m}");
        let e = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure),
        );
        let m = tls_handshake_error("gw:3080", &e).to_string();
        assert!(!m.starts_with("cannot verify"), "{m}");
    }
}
