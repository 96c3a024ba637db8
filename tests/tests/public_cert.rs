//! A gateway with a public certificate (`gateway start --cert --key`): users log in by name
//! without a CA pin, verified by the system's roots, while devices keep using the cluster
//! certificate. The "public" CA here is one the test makes and hands to tsh as the system
//! store through `SSL_CERT_FILE`, which is how rustls-native-certs is told where roots live.

// Test code, helpers included: failing loudly is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::Path;

use edgeport_e2e::ssh::{Cluster, Tsh};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

const PW: &str = "correct horse battery";

/// A CA and a leaf for `name` signed by it; writes `ca.pem`, `chain.pem`, `key.pem` in `dir`.
fn public_pki(dir: &Path, name: &str, tag: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, format!("Test Public Root {tag}"));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, &ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(
        dir.join("chain.pem"),
        format!("{}{}", leaf.pem(), ca_cert.pem()),
    )
    .unwrap();
    std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem()).unwrap();
}

#[test]
fn login_by_name_with_a_public_certificate() {
    let pki = tempfile::tempdir().unwrap();
    let good = pki.path().join("good");
    let other = pki.path().join("other");
    public_pki(&good, "localhost", "A");
    public_pki(&other, "localhost", "B");
    let chain = good.join("chain.pem");
    let key = good.join("key.pem");
    let c = Cluster::start_with_gateway_args(
        "edge",
        &[("dev1", "")],
        &[
            "--cert",
            chain.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
    );
    c.add_user("alice", "root", PW);
    let proxy = format!("localhost:{}", c.gw.port);
    let login = |tsh: &Tsh, roots: &Path| {
        let mut cmd = tsh.cmd(&[
            "login",
            "--proxy",
            &proxy,
            "--user",
            "alice",
            "--password-stdin",
        ]);
        cmd.env("SSL_CERT_FILE", roots).env_remove("SSL_CERT_DIR");
        edgeport_e2e::run(
            cmd,
            Some(format!("{PW}\n").as_bytes()),
            std::time::Duration::from_secs(60),
        )
    };

    // A system store that does not hold the gateway's CA: refused, with advice.
    let tsh = Tsh::new(c.dir.join("tsh-untrusted"), &proxy);
    let r = login(&tsh, &other.join("ca.pem"));
    assert_ne!(r.code(), Some(0));
    assert!(r.stderr().contains("--ca-pin"), "{}", r.stderr());
    assert!(!tsh.key_dir().join("alice-cert.pub").exists());

    // The right roots: logged in without a pin; afterwards tsh trusts the cluster CA it got,
    // and SSH through the gateway works as usual.
    let tsh = Tsh::new(c.dir.join("tsh"), &proxy);
    let r = login(&tsh, &good.join("ca.pem"));
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    let out = tsh.run(&["ssh", "root@dev1", "echo", "public-ok"], None);
    assert_eq!(out.stdout(), "public-ok\n", "{}", out.stderr());

    // An address without a name cannot be verified by public roots: the pin is required.
    let tsh_ip = Tsh::new(c.dir.join("tsh-ip"), c.proxy());
    let mut cmd = tsh_ip.cmd(&[
        "login",
        "--proxy",
        c.proxy(),
        "--user",
        "alice",
        "--password-stdin",
    ]);
    cmd.env("SSL_CERT_FILE", good.join("ca.pem"));
    let r = edgeport_e2e::run(
        cmd,
        Some(format!("{PW}\n").as_bytes()),
        std::time::Duration::from_secs(60),
    );
    assert_ne!(r.code(), Some(0));
    assert!(r.stderr().contains("pass --ca-pin"), "{}", r.stderr());
}
