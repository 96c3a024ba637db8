//! Loading the login's key and certificate into a running ssh-agent (and taking them out
//! again at logout), so stock OpenSSH tools work without `-i`.
//!
//! russh's agent client adds plain keys only, so the few messages needed here
//! (draft-miller-ssh-agent: ADD_ID_CONSTRAINED with a certificate, REMOVE_IDENTITY) are
//! written directly. The key is added as a certificate identity whose lifetime equals the
//! certificate's, so the agent forgets it when it stops being useful.

use std::path::Path;
use std::time::Duration;

use edgeport_proto::keys::KeyPair;
use russh::keys::ssh_key::Certificate;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const ADD_ID_CONSTRAINED: u8 = 25;
const REMOVE_IDENTITY: u8 = 18;
const SUCCESS: u8 = 6;
const CONSTRAIN_LIFETIME: u8 = 1;
const TIMEOUT: Duration = Duration::from_secs(5);

fn put_string(buf: &mut Vec<u8>, s: &[u8]) {
    buf.extend_from_slice(&(s.len() as u32).to_be_bytes());
    buf.extend_from_slice(s);
}

/// The raw 32-byte Ed25519 secret ("seed") and public key of a key pair.
fn ed25519_parts(key: &KeyPair) -> Option<([u8; 32], [u8; 32])> {
    use russh::keys::ssh_key::private::KeypairData;
    match key.ssh_private().key_data() {
        KeypairData::Ed25519(kp) => Some((kp.private.to_bytes(), kp.public.0)),
        _ => None,
    }
}

async fn call(sock: &Path, msg: Vec<u8>) -> std::io::Result<u8> {
    let fut = async {
        let mut s = UnixStream::connect(sock).await?;
        let mut framed = (msg.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&msg);
        s.write_all(&framed).await?;
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await?;
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 || len > 256 * 1024 {
            return Err(std::io::Error::other("bad ssh-agent reply"));
        }
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await?;
        Ok(body[0])
    };
    tokio::time::timeout(TIMEOUT, fut)
        .await
        .map_err(|_| std::io::Error::other("the ssh-agent did not answer"))?
}

/// Adds `key` with `cert` to the agent at `sock` for `lifetime_secs` seconds.
pub async fn add(
    sock: &Path,
    key: &KeyPair,
    cert: &Certificate,
    lifetime_secs: u32,
    comment: &str,
) -> Result<(), String> {
    let (seed, public) = ed25519_parts(key).ok_or("only Ed25519 keys can be added")?;
    let blob = cert_blob(cert)?;
    let mut msg = vec![ADD_ID_CONSTRAINED];
    put_string(&mut msg, b"ssh-ed25519-cert-v01@openssh.com");
    put_string(&mut msg, &blob);
    put_string(&mut msg, &public);
    let mut secret = seed.to_vec();
    secret.extend_from_slice(&public);
    put_string(&mut msg, &secret);
    put_string(&mut msg, comment.as_bytes());
    msg.push(CONSTRAIN_LIFETIME);
    msg.extend_from_slice(&lifetime_secs.max(1).to_be_bytes());
    match call(sock, msg).await {
        Ok(SUCCESS) => Ok(()),
        Ok(code) => Err(format!("the ssh-agent refused the key (reply {code})")),
        Err(e) => Err(e.to_string()),
    }
}

/// Removes the certificate identity (and the plain key, if someone added it too).
pub async fn remove(sock: &Path, cert: &Certificate) -> Result<(), String> {
    let blob = cert_blob(cert)?;
    let mut msg = vec![REMOVE_IDENTITY];
    put_string(&mut msg, &blob);
    let res = call(sock, msg).await;
    // The plain public key blob: string "ssh-ed25519", string key.
    if let russh::keys::ssh_key::public::KeyData::Ed25519(k) = cert.public_key() {
        let mut plain = Vec::new();
        put_string(&mut plain, b"ssh-ed25519");
        put_string(&mut plain, &k.0);
        let mut msg = vec![REMOVE_IDENTITY];
        put_string(&mut msg, &plain);
        let _ = call(sock, msg).await;
    }
    match res {
        Ok(_) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// The certificate in SSH wire encoding (what the `-cert.pub` file holds in base64).
fn cert_blob(cert: &Certificate) -> Result<Vec<u8>, String> {
    use russh::keys::ssh_key::encoding::Encode;
    let mut out = Vec::new();
    cert.encode(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}
