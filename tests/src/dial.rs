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
