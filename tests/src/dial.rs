//! Raw `edgeport-dial/1` clients for tests that speak the protocol themselves: a user's TLS
//! client configuration from `tctl auth sign --format tls`, and the cluster's x509 CA.

use std::path::Path;
use std::sync::Arc;

use edgeport_proto::alpn;
use edgeport_proto::keys::first_cert_der;
use edgeport_proto::tls::{client_config, CertKey};

use crate::fabric::Tctl;
use crate::Authority;

/// The cluster's x509 CA certificate (DER).
pub fn cluster_ca_der(tctl: &Tctl) -> Vec<u8> {
    let pem = tctl.ok(&["auth", "export", "--type", "tls"]).stdout();
    first_cert_der(&pem).expect("cluster CA certificate")
}

/// Adds user `name` (default role, login root) and returns a TLS client configuration for
/// `edgeport-dial/1` with a one-hour certificate for them.
pub fn user_tls(auth: &Authority, dir: &Path, name: &str) -> Arc<rustls::ClientConfig> {
    auth.tctl_ok(&["users", "add", name, "--logins", "root"]);
    let out = dir.join(name);
    let out_s = out.display().to_string();
    auth.tctl_ok(&[
        "auth", "sign", "--user", name, "--out", &out_s, "--format", "tls", "--ttl", "1h",
    ]);
    let read = |ext: &str| std::fs::read_to_string(format!("{out_s}{ext}")).expect("identity");
    let key = pem::parse(read(".key")).expect("key PEM").into_contents();
    let me = CertKey::from_pem(&read(".crt"), None, key).expect("user certificate");
    let ca = first_cert_der(&read(".cas")).expect("CA certificate");
    Arc::new(client_config(&ca, Some(&me), &[alpn::DIAL]).expect("TLS client config"))
}

/// A TLS stream to a gateway's TCP port, blocking.
pub type GatewayStream = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// Opens `edgeport-dial/1` to the gateway at `addr` with `cfg`, sends one request frame and
/// reads one reply frame (blocking). The stream is returned for what follows a `DialOk`.
pub fn request(
    cfg: &Arc<rustls::ClientConfig>,
    addr: &str,
    req: &edgeport_proto::tunnel::ClientRequest,
) -> (edgeport_proto::tunnel::ClientReply, GatewayStream) {
    use std::io::{Read, Write};
    edgeport_proto::tls::install_crypto_provider();
    let name =
        rustls::pki_types::ServerName::try_from(edgeport_proto::tls::GATEWAY_SERVER_NAME).unwrap();
    let conn = rustls::ClientConnection::new(cfg.clone(), name).expect("TLS client");
    let tcp = std::net::TcpStream::connect(addr).expect("connect to the gateway");
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    s.write_all(&edgeport_proto::frame::encode(req).unwrap())
        .unwrap();
    s.flush().unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).expect("the gateway answers");
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).expect("the whole answer");
    (edgeport_proto::frame::decode(&body).unwrap(), s)
}
