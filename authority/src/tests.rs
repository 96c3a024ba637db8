//! The authority over its real RPC: a server on a loopback port, clients with the
//! administrator identity, a joined gateway's certificate, or none.

use std::collections::BTreeMap;
use std::sync::Arc;

use edgeport_net::rpc_client::{RpcClient, RpcClientError};
use edgeport_proto::identity::{IdentityFile, Principal};
use edgeport_proto::keys::{first_cert_der, KeyPair};
use edgeport_proto::rpc::*;
use edgeport_proto::sshcert::check_user_cert;
use edgeport_proto::tls::{client_config, pinned_client_config, CertKey};
use edgeport_proto::{alpn, frame};
use russh::keys::ssh_key::{Certificate, PublicKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::service::{Caller, Limits, Service};
use crate::{Config, Server};

async fn start(dir: &std::path::Path, cluster: &str) -> Result<Server, crate::StartError> {
    Server::start(Config {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        cluster: cluster.into(),
        limits: Limits::default(),
        store: Default::default(),
        store_ca: None,
    })
    .await
}

fn mtls(cert_pem: &str, key: &KeyPair, ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let me = CertKey::from_pem(cert_pem, None, key.pkcs8_der()).unwrap();
    let ca = first_cert_der(ca_pem).unwrap();
    Arc::new(client_config(&ca, Some(&me), &[alpn::RPC]).unwrap())
}

async fn admin(server: &Server) -> (RpcClient, IdentityFile) {
    let ident = IdentityFile::load(server.admin_identity()).unwrap();
    let key = KeyPair::from_openssh(&ident.ssh_private_key).unwrap();
    let cfg = mtls(&ident.x509_cert_pem, &key, &ident.cas.x509_ca_pem);
    let c = RpcClient::connect(&server.addr().to_string(), cfg)
        .await
        .unwrap();
    (c, ident)
}

/// The x509 certificate the authority signs for `user` (with `logins`), DER.
async fn user_cert_der(
    a: &mut RpcClient,
    user: &str,
    key: &KeyPair,
    logins: Option<Vec<String>>,
) -> Vec<u8> {
    match a
        .call(Request::SignUser(SignUserRequest {
            user: user.into(),
            ssh_public_key: key.public_openssh(),
            ttl_secs: 600,
            logins,
        }))
        .await
        .unwrap()
    {
        Response::UserCerts(c) => first_cert_der(&c.x509_cert_pem).unwrap(),
        other => panic!("{other:?}"),
    }
}

/// A service on a fresh sled store, for cluster `edge`.
pub(crate) fn service() -> (tempfile::TempDir, Service) {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(crate::store::SledStore::open(&tmp.path().join("s")).unwrap());
    let ca = crate::ca::CertAuthority::new("edge", crate::ca::CaKeys::generate("edge").unwrap())
        .unwrap();
    (tmp, Service::new(store, Arc::new(ca), Limits::default()))
}

/// Device `id` joins through gateway `gw-1` at `now` with a fresh single-use token: its key
/// and certificates.
pub(crate) fn join_device(svc: &Service, id: &str, now: u64) -> (KeyPair, DeviceCerts) {
    let token = match svc.handle_at(
        &Caller::Admin("admin".into()),
        Request::TokenAdd(TokenSpec {
            kind: TokenKind::Device,
            labels: BTreeMap::new(),
            ttl_secs: 60,
            reusable: false,
        }),
        now,
    ) {
        Response::Token(t) => t.token.unwrap(),
        other => panic!("{other:?}"),
    };
    let key = KeyPair::generate().unwrap();
    let req = JoinDeviceRequest {
        token,
        requested_id: Some(id.into()),
        labels: BTreeMap::new(),
        ssh_public_key: key.public_openssh(),
        version: "1".into(),
        arch: "x86_64".into(),
        remote_addr: "192.0.2.1:1".into(),
    };
    match svc.handle_at(
        &Caller::Gateway("gw-1".into()),
        Request::JoinDevice(req),
        now,
    ) {
        Response::DeviceCerts(d) => (key, d),
        other => panic!("{other:?}"),
    }
}

fn err_of<T: std::fmt::Debug>(r: Result<T, RpcClientError>) -> RpcError {
    match r {
        Err(RpcClientError::Remote(e)) => e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn token(c: &mut RpcClient, kind: TokenKind, labels: &[(&str, &str)]) -> String {
    let spec = TokenSpec {
        kind,
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ttl_secs: 600,
        reusable: false,
    };
    match c.call(Request::TokenAdd(spec)).await.unwrap() {
        Response::Token(t) => t.token.unwrap(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_flow_over_rpc() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let server = start(&dir, "edge").await.unwrap();
    let addr = server.addr().to_string();
    let (mut a, ident) = admin(&server).await;
    assert_eq!(ident.principal, Principal::Admin("admin".into()));
    assert_eq!(ident.auth_addr.as_deref(), Some(addr.as_str()));
    match a.call(Request::Ping).await.unwrap() {
        Response::Pong { cluster, .. } => assert_eq!(cluster, "edge"),
        other => panic!("{other:?}"),
    }

    // Users: alice with a password, bob with an invite.
    let alice = UserSpec {
        name: "alice".into(),
        logins: vec!["root".into(), "pi".into()],
        kube_groups: vec!["devs".into()],
        password: Some("s3cret".into()),
        ..Default::default()
    };
    a.call(Request::UserAdd(alice)).await.unwrap();
    // alice's x509 certificate, as a gateway sees it when she dials.
    let alice_key = KeyPair::generate().unwrap();
    let alice_der = user_cert_der(&mut a, "alice", &alice_key, None).await;
    let invite = match a
        .call(Request::UserAdd(UserSpec {
            name: "bob".into(),
            logins: vec!["pi".into()],
            ..Default::default()
        }))
        .await
        .unwrap()
    {
        Response::UserAdded {
            invite: Some(code), ..
        } => code,
        other => panic!("{other:?}"),
    };

    // Anonymous callers get Ping/ExportCas/JoinGateway only.
    let pin = ident.cas.ca_pin.clone();
    let anon_cfg = Arc::new(pinned_client_config(&pin, None, &[alpn::RPC]).unwrap());
    let mut anon = RpcClient::connect(&addr, anon_cfg.clone()).await.unwrap();
    match anon.call(Request::ExportCas).await.unwrap() {
        Response::Cas(b) => assert_eq!(b, ident.cas),
        other => panic!("{other:?}"),
    }
    let e = err_of(anon.call(Request::UserList).await);
    assert_eq!(e.kind, ErrorKind::Denied);
    assert!(
        e.message.contains("requires an administrator identity"),
        "{e}"
    );

    // A gateway joins with its token and gets a server + client certificate.
    let gw_token = token(&mut a, TokenKind::Gateway, &[]).await;
    let dev_token_for_gw = token(&mut a, TokenKind::Device, &[]).await;
    let gw_key = KeyPair::generate().unwrap();
    let join = JoinGatewayRequest {
        token: dev_token_for_gw.clone(),
        gateway_id: Some("gw-1".into()),
        public_key_spki_der: gw_key.spki_der(),
        dns_names: vec!["localhost".into()],
        ip_addrs: vec!["127.0.0.1".into()],
    };
    let e = err_of(anon.call(Request::JoinGateway(join.clone())).await);
    assert_eq!(e.message, "token is for devices, not gateways");
    let gw = match anon
        .call(Request::JoinGateway(JoinGatewayRequest {
            token: gw_token,
            ..join
        }))
        .await
        .unwrap()
    {
        Response::GatewayCerts(g) => g,
        other => panic!("{other:?}"),
    };
    assert_eq!(gw.gateway_id, "gw-1");
    let gw_der = first_cert_der(&gw.x509_cert_pem).unwrap();
    assert_eq!(
        edgeport_proto::tls::peer_principal(&gw_der, "edge").unwrap(),
        Principal::Gateway("gw-1".into())
    );
    let mut g = RpcClient::connect(&addr, mtls(&gw.x509_cert_pem, &gw_key, &gw.cas.x509_ca_pem))
        .await
        .unwrap();
    assert_eq!(
        err_of(g.call(Request::UserList).await).kind,
        ErrorKind::Denied
    );
    assert_eq!(
        err_of(g.call(Request::TokenList).await).kind,
        ErrorKind::Denied
    );

    // The gateway relays a device join; labels: the token's win over the device's.
    let dev_token = token(&mut a, TokenKind::Device, &[("fleet", "vans")]).await;
    let dev_key = KeyPair::generate().unwrap();
    let join = JoinDeviceRequest {
        token: dev_token.clone(),
        requested_id: Some("van-1".into()),
        labels: [
            ("fleet".to_string(), "cars".to_string()),
            ("hw".into(), "pi4".into()),
        ]
        .into(),
        ssh_public_key: dev_key.public_openssh(),
        version: "0.1.0".into(),
        arch: "aarch64".into(),
        remote_addr: "192.0.2.1:5000".into(),
    };
    let certs = match g.call(Request::JoinDevice(join.clone())).await.unwrap() {
        Response::DeviceCerts(d) => d,
        other => panic!("{other:?}"),
    };
    assert_eq!(certs.device_id, "van-1");
    assert_eq!(certs.labels["fleet"], "vans");
    assert_eq!(certs.labels["hw"], "pi4");
    let host = Certificate::from_openssh(&certs.host_cert).unwrap();
    let host_ca = PublicKey::from_openssh(&certs.cas.host_ca).unwrap();
    edgeport_proto::sshcert::check_host_cert(
        &host,
        &host_ca,
        "van-1.edge",
        edgeport_net::clock::now_secs(),
    )
    .unwrap();
    let e = err_of(g.call(Request::JoinDevice(join.clone())).await);
    assert_eq!(e.message, "join token already used");
    // Another key cannot take the id, even with a fresh token.
    let other_key = KeyPair::generate().unwrap();
    let e = err_of(
        g.call(Request::JoinDevice(JoinDeviceRequest {
            token: token(&mut a, TokenKind::Device, &[]).await,
            ssh_public_key: other_key.public_openssh(),
            ..join.clone()
        }))
        .await,
    );
    assert_eq!(e.kind, ErrorKind::AlreadyExists);
    // The same key joining again (what a gateway with any token and the device's public key
    // can send): it keeps its labels, whatever the request says; a token's still override.
    let again = |labels: &[(&str, &str)], token: String| JoinDeviceRequest {
        token,
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..join.clone()
    };
    let relabelled = match g
        .call(Request::JoinDevice(again(
            &[("hw", "rogue"), ("tier", "dev")],
            token(&mut a, TokenKind::Device, &[]).await,
        )))
        .await
        .unwrap()
    {
        Response::DeviceCerts(d) => d,
        other => panic!("{other:?}"),
    };
    assert_eq!(relabelled.labels, certs.labels);
    let retokened = match g
        .call(Request::JoinDevice(again(
            &[],
            token(&mut a, TokenKind::Device, &[("fleet", "trucks")]).await,
        )))
        .await
        .unwrap()
    {
        Response::DeviceCerts(d) => d,
        other => panic!("{other:?}"),
    };
    assert_eq!(retokened.labels["fleet"], "trucks");
    assert_eq!(retokened.labels["hw"], "pi4");
    // Renewal: same key only.
    let renew = RenewDeviceRequest {
        device_id: "van-1".into(),
        ssh_public_key: dev_key.public_openssh(),
        proof: None,
    };
    assert!(matches!(
        g.call(Request::RenewDevice(renew.clone())).await.unwrap(),
        Response::DeviceCerts(_)
    ));
    let e = err_of(
        g.call(Request::RenewDevice(RenewDeviceRequest {
            ssh_public_key: other_key.public_openssh(),
            ..renew.clone()
        }))
        .await,
    );
    assert_eq!(e.kind, ErrorKind::Denied);
    assert!(matches!(
        g.call(Request::RenewGateway(RenewGatewayRequest {
            public_key_spki_der: gw_key.spki_der(),
            dns_names: vec![],
            ip_addrs: vec![],
        }))
        .await
        .unwrap(),
        Response::GatewayCerts(_)
    ));

    // Offline until reported; then dials are authorised.
    let e = err_of(
        g.call(Request::AuthorizeDial {
            user_cert_der: alice_der.clone(),
            device: "van-1".into(),
            service: edgeport_proto::tunnel::Service::Ssh,
        })
        .await,
    );
    assert_eq!(e.message, "device van-1 is offline");
    let report = PresenceReport {
        lease_secs: 60,
        online: vec![DevicePresence {
            id: "van-1".into(),
            labels: BTreeMap::new(),
            version: "0.1.0".into(),
            arch: "aarch64".into(),
            transport: Transport::Quic,
            address: "192.0.2.1:5000".into(),
            rtt_ms: 7,
            connected_at: 1,
            kube_cluster: None,
            loss_permille: None,
            usage: None,
            proof: None,
        }],
        disconnected: vec![],
        ..Default::default()
    };
    match g.call(Request::Presence(report)).await.unwrap() {
        Response::PresenceAck(ack) => assert!(ack.revoked_devices.is_empty()),
        other => panic!("{other:?}"),
    }
    match g
        .call(Request::AuthorizeDial {
            user_cert_der: alice_der.clone(),
            device: "van-1".into(),
            service: edgeport_proto::tunnel::Service::Ssh,
        })
        .await
        .unwrap()
    {
        Response::DialAllowed(grant) => {
            assert!(grant.device.online);
            assert_eq!(grant.logins, ["root", "pi"]);
            assert_eq!(grant.kube_groups, ["devs"]);
        }
        other => panic!("{other:?}"),
    }
    match a.call(Request::DeviceList).await.unwrap() {
        Response::Devices(d) => {
            assert_eq!(d.len(), 1);
            assert!(d[0].online);
            assert_eq!(d[0].gateway.as_deref(), Some("gw-1"));
        }
        other => panic!("{other:?}"),
    }

    // Logins through the gateway: password, then bob's invite with a new password.
    let user_key = KeyPair::generate().unwrap();
    let login = LoginRequest {
        user: "alice".into(),
        secret: "wrong".into(),
        new_password: None,
        ssh_public_key: user_key.public_openssh(),
        ttl_secs: 7 * 86400,
        client_addr: "203.0.113.9:1".into(),
        ..Default::default()
    };
    let e = err_of(g.call(Request::Login(login.clone())).await);
    assert_eq!(
        (e.kind, e.message.as_str()),
        (ErrorKind::BadCredentials, "invalid user or password")
    );
    let certs = match g
        .call(Request::Login(LoginRequest {
            secret: "s3cret".into(),
            ..login.clone()
        }))
        .await
        .unwrap()
    {
        Response::UserCerts(c) => c,
        other => panic!("{other:?}"),
    };
    let now = edgeport_net::clock::now_secs();
    assert!(certs.valid_before <= now + 12 * 3600 + 5, "ttl not capped");
    let cert = Certificate::from_openssh(&certs.ssh_cert).unwrap();
    let user_ca = PublicKey::from_openssh(&certs.cas.user_ca).unwrap();
    let grant = check_user_cert(&cert, &user_ca, "root", now).unwrap();
    assert!(grant.permit_pty && grant.permit_port_forwarding);
    assert_eq!(grant.roles.roles, ["access"]);
    let x = first_cert_der(&certs.x509_cert_pem).unwrap();
    assert_eq!(
        edgeport_proto::tls::spiffe_of(&x).unwrap(),
        ("edge".to_string(), Principal::User("alice".into()))
    );
    assert_eq!(
        edgeport_proto::tls::not_after(&x).unwrap(),
        certs.valid_before
    );
    let bob_login = LoginRequest {
        user: "bob".into(),
        secret: invite.clone(),
        new_password: Some("bobs-pw".into()),
        ..login.clone()
    };
    assert!(matches!(
        g.call(Request::Login(bob_login.clone())).await.unwrap(),
        Response::UserCerts(_)
    ));
    assert_eq!(
        err_of(g.call(Request::Login(bob_login)).await).kind,
        ErrorKind::BadCredentials
    );

    // Locks take effect at once and reach the gateway in the presence acknowledgement.
    a.call(Request::LockAdd(LockSpec {
        target: LockTarget::User("alice".into()),
        message: "incident 42".into(),
        expires: 0,
    }))
    .await
    .unwrap();
    let e = err_of(
        g.call(Request::AuthorizeDial {
            user_cert_der: alice_der.clone(),
            device: "van-1".into(),
            service: edgeport_proto::tunnel::Service::Ssh,
        })
        .await,
    );
    assert_eq!(e.kind, ErrorKind::Locked);
    assert_eq!(e.message, "user alice is locked: incident 42");
    let e = err_of(
        g.call(Request::Login(LoginRequest {
            secret: "s3cret".into(),
            ..login.clone()
        }))
        .await,
    );
    assert_eq!(e.kind, ErrorKind::Locked);
    match a.call(Request::UserList).await.unwrap() {
        Response::Users(u) => assert!(u.iter().any(|u| u.name == "alice" && u.locked)),
        other => panic!("{other:?}"),
    }
    a.call(Request::LockRemove {
        target: LockTarget::User("alice".into()),
    })
    .await
    .unwrap();

    // Bots: an administrator signs for a name with no user record, given logins.
    let bot_key = KeyPair::generate().unwrap();
    let sign = SignUserRequest {
        user: "jenkins".into(),
        ssh_public_key: bot_key.public_openssh(),
        ttl_secs: 600,
        logins: None,
    };
    assert_eq!(
        err_of(a.call(Request::SignUser(sign.clone())).await).kind,
        ErrorKind::NotFound
    );
    let jenkins_der = match a
        .call(Request::SignUser(SignUserRequest {
            logins: Some(vec!["ci".into()]),
            ..sign
        }))
        .await
        .unwrap()
    {
        Response::UserCerts(c) => {
            assert_eq!(c.logins, ["ci"]);
            first_cert_der(&c.x509_cert_pem).unwrap()
        }
        other => panic!("{other:?}"),
    };
    assert!(matches!(
        g.call(Request::AuthorizeDial {
            user_cert_der: jenkins_der,
            device: "van-1".into(),
            service: edgeport_proto::tunnel::Service::Ssh,
        })
        .await
        .unwrap(),
        Response::DialAllowed(_)
    ));
    // Admins may not ask for logins the user lacks.
    let e = err_of(
        a.call(Request::SignUser(SignUserRequest {
            user: "alice".into(),
            ssh_public_key: bot_key.public_openssh(),
            ttl_secs: 600,
            logins: Some(vec!["admin".into()]),
        }))
        .await,
    );
    assert_eq!(e.kind, ErrorKind::Denied);

    // Removing a device revokes it.
    a.call(Request::DeviceRemove { id: "van-1".into() })
        .await
        .unwrap();
    match g
        .call(Request::Presence(PresenceReport {
            lease_secs: 60,
            online: vec![],
            disconnected: vec![],
            ..Default::default()
        }))
        .await
        .unwrap()
    {
        Response::PresenceAck(ack) => assert_eq!(ack.revoked_devices, ["van-1"]),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        err_of(g.call(Request::RenewDevice(renew)).await).kind,
        ErrorKind::Denied
    );
    match a.call(Request::DeviceList).await.unwrap() {
        Response::Devices(d) => assert!(d.is_empty()),
        other => panic!("{other:?}"),
    }

    // The policy watch: gateways only; a lock moves the epoch and returns after the watching
    // gateway asked for the next one; a watcher that disconnects is not waited for.
    assert_eq!(
        err_of(a.call(Request::WatchPolicy { seen: 0 }).await).kind,
        ErrorKind::Denied
    );
    let gw_tls = mtls(&gw.x509_cert_pem, &gw_key, &gw.cas.x509_ca_pem);
    let mut w = RpcClient::connect(&addr, gw_tls.clone()).await.unwrap();
    let Response::Policy { epoch, exclusive } =
        w.call(Request::WatchPolicy { seen: 0 }).await.unwrap()
    else {
        panic!("no policy answer")
    };
    assert!(exclusive, "an embedded store sees every change");
    let watcher = tokio::spawn(async move {
        let Response::Policy { epoch: next, .. } =
            w.call(Request::WatchPolicy { seen: epoch }).await.unwrap()
        else {
            panic!("no policy answer")
        };
        // Acknowledge by asking for the change after it (answered later or at the limit).
        let ack = tokio::spawn(async move { w.call(Request::WatchPolicy { seen: next }).await });
        (next, ack)
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let lock = LockSpec {
        target: LockTarget::User("nobody".into()),
        message: "policy test".into(),
        expires: 0,
    };
    assert!(matches!(
        a.call(Request::LockAdd(lock.clone())).await.unwrap(),
        Response::Ok
    ));
    let (next, ack) = watcher.await.unwrap();
    assert_eq!(next, epoch + 1);
    ack.abort();
    // The watcher's connection is gone: the next change does not hang on it.
    let mut w2 = RpcClient::connect(&addr, gw_tls).await.unwrap();
    let waiting = tokio::spawn(async move { w2.call(Request::WatchPolicy { seen: next }).await });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    waiting.abort();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    a.call(Request::LockRemove {
        target: lock.target.clone(),
    })
    .await
    .unwrap();
    assert!(matches!(
        a.call(Request::LockAdd(lock)).await.unwrap(),
        Response::Ok
    ));

    // Restart: same CAs, same admin identity, state kept; another cluster name is refused.
    drop((a, g, anon));
    server.shutdown().await.unwrap();
    let server = start(&dir, "edge").await.unwrap();
    let (mut a, ident2) = admin(&server).await;
    assert_eq!(ident2.cas, ident.cas);
    assert_eq!(ident2.x509_cert_pem, ident.x509_cert_pem);
    match a.call(Request::UserList).await.unwrap() {
        Response::Users(u) => assert_eq!(u.len(), 2),
        other => panic!("{other:?}"),
    }
    drop(a);
    server.shutdown().await.unwrap();
    let e = start(&dir, "other").await.err().unwrap().to_string();
    assert!(e.contains("belongs to cluster \"edge\""), "{e}");

    let admin_key = KeyPair::from_openssh(&ident.ssh_private_key).unwrap();
    no_private_key_in_store(
        &dir,
        &[
            ("administrator", &admin_key),
            ("alice", &alice_key),
            ("gateway", &gw_key),
            ("device", &dev_key),
            ("bot", &bot_key),
        ],
    );
}

/// The private scalar of a PKCS#8 Ed25519 or EC key: the first 32-byte OCTET STRING.
fn private_scalar(pkcs8: &[u8]) -> Vec<u8> {
    let at = pkcs8
        .windows(2)
        .position(|w| w == [0x04, 0x20])
        .expect("a 32-byte private key in the PKCS#8 document");
    pkcs8[at + 2..at + 34].to_vec()
}

/// Security.md S4: nothing the authority stored (the store several authorities share)
/// holds a private key: not its CAs' (files under `ca/`, mode 0600), not the administrator
/// identity's, not one of a client's, whose keys never leave them.
fn no_private_key_in_store(dir: &std::path::Path, clients: &[(&str, &KeyPair)]) {
    let mut secrets: Vec<(String, Vec<u8>)> = Vec::new();
    for f in std::fs::read_dir(dir.join("ca")).unwrap() {
        let path = f.unwrap().path();
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let name = path.display().to_string();
        if text.contains("OPENSSH PRIVATE KEY") {
            let der = KeyPair::from_openssh(&text).unwrap().pkcs8_der();
            secrets.push((name.clone(), private_scalar(&der)));
        }
        for block in pem::parse_many(&text).unwrap() {
            if block.tag() == "PRIVATE KEY" {
                secrets.push((name.clone(), private_scalar(block.contents())));
                secrets.push((name.clone(), block.contents().to_vec()));
            }
        }
    }
    for ca in ["user_ca", "host_ca", "x509_ca.key"] {
        let found: Vec<&str> = secrets.iter().map(|(n, _)| n.as_str()).collect();
        assert!(
            found.iter().any(|n| n.ends_with(&format!("/{ca}"))),
            "{ca} was not found among {found:?}"
        );
    }
    for (who, key) in clients {
        secrets.push((who.to_string(), private_scalar(&key.pkcs8_der())));
    }
    let forms: Vec<(&str, Vec<Vec<u8>>)> = secrets
        .iter()
        .map(|(who, secret)| (who.as_str(), encodings(secret)))
        .collect();
    let store = crate::store::SledStore::open(&dir.join("store")).unwrap();
    let mut values = 0;
    for table in crate::store::Table::ALL {
        for (key, value) in crate::store::Store::scan_prefix(&store, table, "").unwrap() {
            values += 1;
            let text = String::from_utf8_lossy(&value);
            assert!(
                !text.contains("PRIVATE KEY"),
                "a private key block (PKCS#8 or OpenSSH) in {}/{key}",
                table.name()
            );
            for (who, forms) in &forms {
                for form in forms {
                    assert!(
                        !value.windows(form.len()).any(|w| w == form.as_slice()),
                        "{who}'s private key is in {}/{key}",
                        table.name()
                    );
                }
            }
        }
    }
    assert!(values > 10, "the store holds only {values} values");
}

/// The ways `secret` could appear in a stored value: raw, hex, a JSON array of numbers
/// (serde's form of a byte vector), and base64 (standard or URL-safe) inside a longer
/// encoded text at any of the three alignments: the part of the encoding that depends
/// only on the secret's own bytes.
fn encodings(secret: &[u8]) -> Vec<Vec<u8>> {
    use base64::Engine;
    let numbers: Vec<String> = secret.iter().map(u8::to_string).collect();
    let mut forms = vec![
        secret.to_vec(),
        hex::encode(secret).into_bytes(),
        numbers.join(",").into_bytes(),
    ];
    for pad in 0..3usize {
        let mut shifted = vec![0u8; pad];
        shifted.extend_from_slice(secret);
        // Whole 3-byte groups that lie inside the secret.
        let first = pad.div_ceil(3);
        let last = shifted.len() / 3;
        for engine in [
            &base64::engine::general_purpose::STANDARD,
            &base64::engine::general_purpose::URL_SAFE,
        ] {
            let text = engine.encode(&shifted);
            forms.push(text.as_bytes()[first * 4..last * 4].to_vec());
        }
    }
    forms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_only_their_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(&tmp.path().join("data"), "edge").await.unwrap();
    let (mut a, ident) = admin(&server).await;
    let key = KeyPair::from_openssh(&ident.ssh_private_key).unwrap();
    let cfg = mtls(&ident.x509_cert_pem, &key, &ident.cas.x509_ca_pem);
    let mut oversized = ((frame::MAX_FRAME_LEN + 1) as u32).to_be_bytes().to_vec();
    oversized.extend_from_slice(&[0; 8]);
    // (bytes, half-close after sending: a truncated frame is only known as such at EOF)
    for (bad, half_close) in [
        (oversized, false),
        (vec![0, 0, 0, 1, 0x7f], false),
        (vec![0, 0, 0, 9, 1, 2], true),
        (vec![0xff; 300], false),
    ] {
        let tcp = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("authority.edgeport").unwrap();
        let mut s = tokio_rustls::TlsConnector::from(cfg.clone())
            .connect(name, tcp)
            .await
            .unwrap();
        s.write_all(&bad).await.unwrap();
        s.flush().await.unwrap();
        if half_close {
            s.shutdown().await.unwrap();
        }
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(15), s.read_to_end(&mut buf))
            .await
            .expect("the authority did not close the connection");
        if let Ok(Some((body, _))) = frame::split_frame(&buf) {
            assert!(matches!(
                frame::decode::<Response>(body).unwrap(),
                Response::Error(_)
            ));
        }
        // The other connection is undisturbed.
        assert!(matches!(
            a.call(Request::Ping).await.unwrap(),
            Response::Pong { .. }
        ));
    }
    drop(a);
    server.shutdown().await.unwrap();
}

/// Presence leases against the service directly, with a controlled clock.
#[test]
fn presence_lease_expiry_through_the_service() {
    let (_tmp, svc) = service();
    let admin = Caller::Admin("admin".into());
    let gw = Caller::Gateway("gw-1".into());
    let t0 = 1_000_000;
    let tok = match svc.handle_at(
        &admin,
        Request::TokenAdd(TokenSpec {
            kind: TokenKind::Device,
            labels: BTreeMap::new(),
            ttl_secs: 60,
            reusable: true,
        }),
        t0,
    ) {
        Response::Token(t) => t.token.unwrap(),
        other => panic!("{other:?}"),
    };
    let key = KeyPair::generate().unwrap();
    let join = JoinDeviceRequest {
        token: tok,
        requested_id: Some("d1".into()),
        labels: BTreeMap::new(),
        ssh_public_key: key.public_openssh(),
        version: "1".into(),
        arch: "x86_64".into(),
        remote_addr: "192.0.2.1:1".into(),
    };
    assert!(matches!(
        svc.handle_at(&gw, Request::JoinDevice(join.clone()), t0),
        Response::DeviceCerts(_)
    ));
    // A reusable token lets the same key rejoin.
    assert!(matches!(
        svc.handle_at(&gw, Request::JoinDevice(join.clone()), t0 + 1),
        Response::DeviceCerts(_)
    ));
    match svc.handle_at(&gw, Request::JoinDevice(join), t0 + 60) {
        Response::Error(e) => assert_eq!(e.message, "join token expired"),
        other => panic!("{other:?}"),
    }
    let report = PresenceReport {
        lease_secs: 30,
        online: vec![DevicePresence {
            id: "d1".into(),
            labels: BTreeMap::new(),
            version: "1".into(),
            arch: "x86_64".into(),
            transport: Transport::Tcp,
            address: "192.0.2.1:1".into(),
            rtt_ms: 1,
            connected_at: t0,
            kube_cluster: Some("k1".into()),
            loss_permille: None,
            usage: None,
            proof: None,
        }],
        disconnected: vec![],
        ..Default::default()
    };
    assert!(matches!(
        svc.handle_at(&gw, Request::Presence(report), t0 + 100),
        Response::PresenceAck(_)
    ));
    let online_at = |t| match svc.handle_at(&admin, Request::DeviceList, t) {
        Response::Devices(d) => d[0].online,
        other => panic!("{other:?}"),
    };
    assert!(online_at(t0 + 129));
    assert!(!online_at(t0 + 130), "the gateway's lease expired");
}

/// Dial grants against the service: the user comes from a certificate the authority checks
/// (its CA, validity, principal, a user record no younger than it), and the answer carries a
/// ticket signed by the host CA for that user, device, service and gateway.
#[test]
fn dial_grants_need_the_users_own_certificate_and_carry_a_ticket() {
    use edgeport_proto::ticket::Expected;
    use edgeport_proto::tunnel::Service as Svc;
    let (_tmp, svc) = service();
    let host_ca = edgeport_proto::audit::raw_ed25519(&svc.ca().bundle().host_ca).unwrap();
    let admin = Caller::Admin("admin".into());
    let gw = Caller::Gateway("gw-1".into());
    let t0 = edgeport_net::clock::now_secs();
    let ok = |r: Response| match r {
        Response::Error(e) => panic!("{e}"),
        other => other,
    };
    let user = |name: &str| UserSpec {
        name: name.into(),
        logins: vec!["root".into()],
        kube_groups: vec!["devs".into()],
        password: Some("s3cret-pass".into()),
        ..Default::default()
    };
    ok(svc.handle_at(&admin, Request::UserAdd(user("alice")), t0));
    let (_, dev) = join_device(&svc, "d1", t0);
    ok(svc.handle_at(
        &gw,
        Request::Presence(PresenceReport {
            lease_secs: 3600,
            online: vec![DevicePresence {
                id: "d1".into(),
                labels: BTreeMap::new(),
                version: "1".into(),
                arch: "x86_64".into(),
                transport: Transport::Quic,
                address: "192.0.2.1:1".into(),
                rtt_ms: 1,
                connected_at: t0,
                kube_cluster: None,
                loss_permille: None,
                usage: None,
                proof: None,
            }],
            ..Default::default()
        }),
        t0,
    ));
    let sign = |name: &str, at: u64| {
        let key = KeyPair::generate().unwrap();
        match svc.handle_at(
            &admin,
            Request::SignUser(SignUserRequest {
                user: name.into(),
                ssh_public_key: key.public_openssh(),
                ttl_secs: 3600,
                logins: None,
            }),
            at,
        ) {
            Response::UserCerts(c) => first_cert_der(&c.x509_cert_pem).unwrap(),
            other => panic!("{other:?}"),
        }
    };
    let dial = |der: &[u8], device: &str, at: u64| {
        svc.handle_at(
            &gw,
            Request::AuthorizeDial {
                user_cert_der: der.to_vec(),
                device: device.into(),
                service: Svc::Kube,
            },
            at,
        )
    };
    let refused = |r: Response| match r {
        Response::Error(e) => e.message,
        other => panic!("expected a refusal, got {other:?}"),
    };

    let alice = sign("alice", t0);
    let grant = match dial(&alice, "d1", t0) {
        Response::DialAllowed(g) => g,
        other => panic!("{other:?}"),
    };
    assert_eq!(grant.user, "alice");
    let claims = grant.ticket.as_ref().unwrap().verify(&host_ca).unwrap();
    assert_eq!(
        (
            claims.user.as_str(),
            claims.device.as_str(),
            claims.service.clone()
        ),
        ("alice", "d1", Svc::Kube)
    );
    assert_eq!(claims.requester, "gw-1");
    assert_eq!(claims.holder.as_deref(), Some("gw-1"));
    assert_eq!(claims.kube_groups, ["devs"]);
    assert!(claims.expires_at - claims.issued_at <= edgeport_proto::ticket::TICKET_TTL_SECS);
    let want = Expected {
        cluster: "edge",
        device: "d1",
        service: Svc::Kube,
        requester: Some("gw-1"),
        holder: Some("gw-1"),
    };
    claims.check(&want, t0).unwrap();
    // A grant for one device or service is useless for another.
    assert!(claims
        .check(
            &Expected {
                device: "d2",
                ..want.clone()
            },
            t0
        )
        .is_err());
    assert!(claims
        .check(
            &Expected {
                service: Svc::Ssh,
                ..want.clone()
            },
            t0
        )
        .is_err());

    // Whatever the gateway hands over must be a user certificate of this cluster, valid now.
    let foreign =
        crate::ca::CertAuthority::new("edge", crate::ca::CaKeys::generate("edge").unwrap())
            .unwrap();
    let k = KeyPair::generate().unwrap();
    let forged = first_cert_der(
        &foreign
            .sign_x509_user("alice", &[], &k.spki_der(), t0 - 60, t0 + 3600)
            .unwrap(),
    )
    .unwrap();
    let m = refused(dial(&forged, "d1", t0));
    assert!(m.contains("not signed by this cluster's CA"), "{m}");
    let device_cert = first_cert_der(&dev.x509_cert_pem).unwrap();
    let m = refused(dial(&device_cert, "d1", t0));
    assert!(m.contains("not a user"), "{m}");
    let m = refused(dial(&alice, "d1", t0 + 7200));
    assert!(m.contains("expired"), "{m}");
    assert!(refused(dial(b"garbage", "d1", t0)).contains("does not count"));

    // A removed user's certificate does not pass for a later user of the same name.
    ok(svc.handle_at(
        &admin,
        Request::UserRemove {
            name: "alice".into(),
        },
        t0 + 1,
    ));
    ok(svc.handle_at(&admin, Request::UserAdd(user("alice")), t0 + 600));
    let m = refused(dial(&alice, "d1", t0 + 601));
    assert!(
        m.contains("issued before this user alice was created"),
        "{m}"
    );
    assert!(matches!(
        dial(&sign("alice", t0 + 601), "d1", t0 + 602),
        Response::DialAllowed(_)
    ));
}

/// A revoked or locked gateway's certificate buys nothing: every request is refused, a
/// re-join under its name too, and the other gateways learn it with their acknowledgements.
#[test]
fn revoked_and_locked_gateways_are_refused() {
    let (_tmp, svc) = service();
    let admin = Caller::Admin("admin".into());
    let now = edgeport_net::clock::now_secs();
    for id in ["gw-1", "gw-2"] {
        crate::gateways::record_join(
            svc.store(),
            &crate::gateways::GatewayRecord {
                id: id.into(),
                joined_at: now,
                renewed_at: now,
                token_id: "t".into(),
                dns_names: vec![],
                ip_addrs: vec![],
                revoked: false,
                peer_addr: None,
                revoked_at: 0,
                version: String::new(),
            },
        )
        .unwrap();
    }
    let (g1, g2) = (
        Caller::Gateway("gw-1".into()),
        Caller::Gateway("gw-2".into()),
    );
    let report = || {
        Request::Presence(PresenceReport {
            lease_secs: 30,
            version: "9.9.9".into(),
            ..Default::default()
        })
    };
    let ack = |r: Response| match r {
        Response::PresenceAck(a) => a,
        other => panic!("{other:?}"),
    };
    let revoked = |r: Response| match r {
        Response::Error(e) => assert_eq!(e.kind, ErrorKind::GatewayRevoked, "{e}"),
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert!(ack(svc.handle_at(&g1, report(), now))
        .revoked_gateways
        .is_empty());
    assert!(matches!(
        svc.handle_at(&admin, Request::GatewayRemove { id: "gw-1".into() }, now),
        Response::Ok
    ));
    revoked(svc.handle_at(&g1, report(), now));
    revoked(svc.handle_at(&g1, Request::DeviceList, now));
    assert_eq!(
        ack(svc.handle_at(&g2, report(), now)).revoked_gateways,
        ["gw-1"]
    );
    match svc.handle_at(&admin, Request::GatewayList, now) {
        Response::Gateways(g) => {
            assert!(g[0].revoked && g[0].id == "gw-1");
            assert!(!g[1].revoked && !g[1].locked);
            assert_eq!(g[1].version, "9.9.9");
            assert_eq!(g[1].last_report, now);
        }
        other => panic!("{other:?}"),
    }
    // A join token does not bring the name back.
    let token = match svc.handle_at(
        &admin,
        Request::TokenAdd(TokenSpec {
            kind: TokenKind::Gateway,
            labels: BTreeMap::new(),
            ttl_secs: 600,
            reusable: false,
        }),
        now,
    ) {
        Response::Token(t) => t.token.unwrap(),
        other => panic!("{other:?}"),
    };
    let key = KeyPair::generate().unwrap();
    let join_as = |id: &str| {
        svc.handle_at(
            &Caller::Anonymous,
            Request::JoinGateway(JoinGatewayRequest {
                token: token.clone(),
                gateway_id: Some(id.into()),
                public_key_spki_der: key.spki_der(),
                dns_names: vec![],
                ip_addrs: vec![],
            }),
            now,
        )
    };
    match join_as("gw-1") {
        Response::Error(e) => assert!(e.message.contains("gw-1 was revoked"), "{e}"),
        other => panic!("{other:?}"),
    }
    // Nor does it take over a live gateway's name.
    match join_as("gw-2") {
        Response::Error(e) => {
            assert_eq!(e.kind, ErrorKind::AlreadyExists, "{e}");
            assert!(e.message.contains("already joined"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    // A lock bars a gateway while it lasts.
    let lock = LockSpec {
        target: LockTarget::Gateway("gw-2".into()),
        message: "investigating".into(),
        expires: 0,
    };
    assert!(matches!(
        svc.handle_at(&admin, Request::LockAdd(lock), now),
        Response::Ok
    ));
    revoked(svc.handle_at(&g2, report(), now));
    assert!(matches!(
        svc.handle_at(
            &admin,
            Request::LockRemove {
                target: LockTarget::Gateway("gw-2".into())
            },
            now
        ),
        Response::Ok
    ));
    assert_eq!(
        ack(svc.handle_at(&g2, report(), now)).revoked_gateways,
        ["gw-1"]
    );
}

/// Single sign-on through the service: a gateway can relay a finish but not name a user,
/// administrators configure connectors, and neither can do the other's part.
#[test]
fn single_sign_on_needs_the_authoritys_own_verification() {
    use edgeport_proto::rpc::{SsoConnectorKind, SsoConnectorSpec, SsoFinishRequest};
    let (_tmp, svc) = service();
    let admin = Caller::Admin("admin".into());
    let gw = Caller::Gateway("gw-1".into());
    let spec = SsoConnectorSpec {
        name: "github".into(),
        client_id: "id".into(),
        client_secret: "very-secret".into(),
        ca_pem: None,
        kind: SsoConnectorKind::GitHub {
            url: "https://github.example".into(),
            api_url: "https://github.example/api/v3".into(),
        },
        web_origins: Vec::new(),
    };
    let refused = |r: Response| match r {
        Response::Error(e) => e,
        other => panic!("not refused: {other:?}"),
    };
    let e = refused(svc.handle(&gw, Request::SsoConnectorAdd(spec.clone())));
    assert!(e.message.contains("administrator"), "{e}");
    assert!(matches!(
        svc.handle(&admin, Request::SsoConnectorAdd(spec)),
        Response::Ok
    ));
    let finish = SsoFinishRequest {
        state: "made-up".into(),
        code: "made-up".into(),
        proof: "x".into(),
        ssh_public_key: KeyPair::generate().unwrap().public_openssh(),
        ttl_secs: 60,
        client_addr: "192.0.2.1:1".into(),
    };
    let e = refused(svc.handle(&admin, Request::SsoFinish(finish.clone())));
    assert!(e.message.contains("requires a gateway identity"), "{e}");
    let e = refused(svc.handle(&gw, Request::SsoFinish(finish)));
    assert_eq!(e.kind, ErrorKind::Denied);
    assert!(e.message.contains("unknown or expired"), "{e}");
    match svc.handle(&admin, Request::SsoConnectorList) {
        Response::SsoConnectors(l) => {
            assert_eq!(l.len(), 1);
            assert!(!format!("{l:?}").contains("very-secret"));
        }
        other => panic!("{other:?}"),
    }
    // The refused finish is in the audit log, with the gateway that sent it.
    match svc.handle(
        &admin,
        Request::AuditSearch(edgeport_proto::audit::AuditQuery {
            kind: Some("user.login".into()),
            ..Default::default()
        }),
    ) {
        Response::AuditPage(p) => {
            let e = p
                .events
                .iter()
                .map(|s| &s.event)
                .find(|e| e.fields.get("success").map(String::as_str) == Some("false"))
                .expect("a refused login event");
            assert_eq!(
                e.fields.get("caller").map(String::as_str),
                Some("gateway gw-1")
            );
        }
        other => panic!("{other:?}"),
    }
}

async fn start_limited(
    dir: &std::path::Path,
    connections: crate::rpc_server::ConnectionLimits,
) -> (Server, Arc<rustls::ClientConfig>, Arc<rustls::ClientConfig>) {
    let server = Server::start(Config {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        cluster: "edge".into(),
        limits: Limits {
            connections,
            ..Limits::default()
        },
        store: Default::default(),
        store_ca: None,
    })
    .await
    .unwrap();
    let ident = IdentityFile::load(server.admin_identity()).unwrap();
    let ca = first_cert_der(&ident.cas.x509_ca_pem).unwrap();
    let anonymous = Arc::new(client_config(&ca, None, &[alpn::RPC]).unwrap());
    let key = KeyPair::from_openssh(&ident.ssh_private_key).unwrap();
    let admin = mtls(&ident.x509_cert_pem, &key, &ident.cas.x509_ca_pem);
    (server, anonymous, admin)
}

type RawConn = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A raw RPC connection from `from` (a loopback address of its own: its own source).
async fn try_connect_from(
    from: &str,
    to: std::net::SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<RawConn> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(format!("{from}:0").parse().unwrap())?;
    let tcp = sock.connect(to).await?;
    let name = rustls::pki_types::ServerName::try_from("authority.edgeport").unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
}

async fn connect_from(
    from: &str,
    to: std::net::SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> RawConn {
    try_connect_from(from, to, cfg).await.unwrap()
}

/// Sends a Ping on `s` and reads the answer (`Err` when the connection closed instead).
async fn ping_on(s: &mut RawConn) -> Result<Response, edgeport_proto::FrameError> {
    s.write_all(&frame::encode(&Request::Ping).unwrap())
        .await
        .unwrap();
    s.flush().await.unwrap();
    edgeport_net::read_frame::<Response, _>(s).await
}

async fn pong(s: &mut RawConn) -> bool {
    matches!(ping_on(s).await, Ok(Response::Pong { .. }))
}

fn refused_with(r: Result<Response, edgeport_proto::FrameError>, words: &str) {
    match r {
        Ok(Response::Error(e)) => {
            assert_eq!(e.kind, ErrorKind::Denied);
            assert!(e.message.contains(words), "{}", e.message);
        }
        other => panic!("expected a refusal with {words:?}, got {other:?}"),
    }
}

/// Shares per source and per identity, and the half kept for gateways and administrators:
/// with every unproven slot taken, an administrator whose source is known still gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_budgeted_per_source_and_per_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let limits = crate::rpc_server::ConnectionLimits {
        handshakes_per_source: 16,
        unproven_per_source: 3,
        per_gateway: 512,
        per_admin: 3,
        unproven_total: 4,
        ..Default::default()
    };
    let (server, anonymous, admin) = start_limited(&tmp.path().join("data"), limits).await;
    let addr = server.addr();

    // Two administrator connections: their source becomes known.
    let mut admins = Vec::new();
    for _ in 0..2 {
        let mut s = connect_from("127.0.0.2", addr, admin.clone()).await;
        assert!(pong(&mut s).await);
        admins.push(s);
    }
    // Anonymous: three from one source are served, the fourth is told why; another source
    // has its own share, until the unproven slots are all taken.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = connect_from("127.0.0.2", addr, anonymous.clone()).await;
        assert!(pong(&mut s).await);
        held.push(s);
    }
    let mut fourth = connect_from("127.0.0.2", addr, anonymous.clone()).await;
    refused_with(
        ping_on(&mut fourth).await,
        "too many connections to the authority from this source",
    );
    let mut other = connect_from("127.0.0.3", addr, anonymous.clone()).await;
    assert!(pong(&mut other).await);
    // All four unproven slots are taken: a new source is not even handshaken.
    let closed = match try_connect_from("127.0.0.6", addr, anonymous.clone()).await {
        Err(_) => true,
        Ok(mut s) => ping_on(&mut s).await.is_err(),
    };
    assert!(closed, "an anonymous client got in past the unproven slots");
    // An administrator from the known source still gets in; its own share is bounded.
    let mut third = connect_from("127.0.0.2", addr, admin.clone()).await;
    assert!(pong(&mut third).await);
    let mut fourth_admin = connect_from("127.0.0.2", addr, admin.clone()).await;
    refused_with(
        ping_on(&mut fourth_admin).await,
        "too many connections to the authority from this administrator",
    );
    drop((held, admins, other, third));
    server.shutdown().await.unwrap();
}

/// Handshakes in progress: two idle TCP connections hold a source's budget; its next client
/// waits for one of them, and another source does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_in_progress_are_budgeted_per_source() {
    let tmp = tempfile::tempdir().unwrap();
    let limits = crate::rpc_server::ConnectionLimits {
        handshakes_per_source: 2,
        per_source: 3,
        ..Default::default()
    };
    let (server, anonymous, _) = start_limited(&tmp.path().join("data"), limits).await;
    let addr = server.addr();
    let idle = || async move {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.4:0".parse().unwrap()).unwrap();
        sock.connect(addr).await.unwrap()
    };
    let first_idle = idle().await;
    let _second_idle = idle().await;
    let waiting = tokio::spawn(connect_from("127.0.0.4", addr, anonymous.clone()));
    let mut elsewhere = connect_from("127.0.0.5", addr, anonymous.clone()).await;
    assert!(pong(&mut elsewhere).await);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "a third handshake from a source with two in progress was not held back"
    );
    // Waiting counts too: with three connections in any phase, the source's fourth is
    // closed at once instead of queueing.
    let fourth = try_connect_from("127.0.0.4", addr, anonymous.clone()).await;
    assert!(fourth.is_err(), "a source past its connections was queued");
    drop(first_idle);
    let mut s = tokio::time::timeout(std::time::Duration::from_secs(30), waiting)
        .await
        .expect("the waiting handshake never went ahead")
        .unwrap();
    assert!(pong(&mut s).await);
    server.shutdown().await.unwrap();
}
