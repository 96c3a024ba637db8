//! The host key a target's sshd presents (issue 22, pinned host keys): the agent's periodic
//! check runs the start of an SSH key exchange (banner, KEXINIT, curve25519 ECDH_INIT) and
//! reads the host key from the server's ECDH_REPLY, then hangs up. No signature is checked
//! and no session is made: this only tells the inventory whether the target still presents
//! the key pinned at enrolment. The user's own SSH client checks the key for real (tsh gets
//! the pin from this device, signed: `crate::relay`). A few hundred bytes of code instead of
//! an SSH client in the armv7 build.

use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const MSG_KEXINIT: u8 = 20;
const MSG_KEX_ECDH_INIT: u8 = 30;
const MSG_KEX_ECDH_REPLY: u8 = 31;
const MSG_DISCONNECT: u8 = 1;
/// The largest packet the check reads (RFC 4253 asks for at least 35000).
const MAX_PACKET: usize = 35_000;

#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not an SSH server: {0}")]
    Protocol(&'static str),
    #[error("the server ended the key exchange: {0}")]
    Disconnected(String),
}

/// The base64 of an OpenSSH `TYPE BASE64` key line, decoded: the key's wire blob.
pub fn blob_of(line: &str) -> Option<Vec<u8>> {
    let b64 = line.split_whitespace().nth(1)?;
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

/// `SHA256:...`, as OpenSSH prints a key's fingerprint.
pub fn fingerprint(blob: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, blob);
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(d.as_ref())
    )
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// One unencrypted binary packet (RFC 4253 section 6) around `payload`.
fn packet(payload: &[u8]) -> Vec<u8> {
    let mut pad = 8 - (5 + payload.len()) % 8;
    if pad < 4 {
        pad += 8;
    }
    let mut out = Vec::with_capacity(5 + payload.len() + pad);
    out.extend_from_slice(&((1 + payload.len() + pad) as u32).to_be_bytes());
    out.push(pad as u8);
    out.extend_from_slice(payload);
    out.resize(out.len() + pad, 0);
    out
}

fn kexinit() -> Result<Vec<u8>, HostKeyError> {
    let mut p = vec![MSG_KEXINIT];
    p.extend(random(16)?);
    let ciphers: &[u8] =
        b"aes128-ctr,aes256-ctr,aes128-gcm@openssh.com,chacha20-poly1305@openssh.com";
    let macs: &[u8] = b"hmac-sha2-256,hmac-sha2-512,hmac-sha2-256-etm@openssh.com";
    for list in [
        &b"curve25519-sha256,curve25519-sha256@libssh.org"[..],
        b"ssh-ed25519",
        ciphers,
        ciphers,
        macs,
        macs,
        b"none",
        b"none",
        b"",
        b"",
    ] {
        put_str(&mut p, list);
    }
    p.push(0); // first_kex_packet_follows
    p.extend_from_slice(&[0; 4]);
    Ok(packet(&p))
}

fn random(n: usize) -> Result<Vec<u8>, HostKeyError> {
    edgeport_proto::keys::random_bytes(n).map_err(|_| HostKeyError::Protocol("no random numbers"))
}

/// Reads one packet's payload.
async fn read_packet<R: AsyncReadExt + Unpin>(r: &mut R) -> Result<Vec<u8>, HostKeyError> {
    let len = r.read_u32().await? as usize;
    if !(5..=MAX_PACKET).contains(&len) {
        return Err(HostKeyError::Protocol("bad packet length"));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    let pad = body[0] as usize;
    let end = len
        .checked_sub(pad)
        .filter(|e| *e > 1)
        .ok_or(HostKeyError::Protocol("bad padding"))?;
    Ok(body[1..end].to_vec())
}

/// The first SSH string of `data`.
fn first_str(data: &[u8]) -> Option<&[u8]> {
    let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    data.get(4..4usize.checked_add(len)?)
}

/// The host key blob that the sshd on `stream` presents (Ed25519 asked for).
pub async fn read_host_key(stream: TcpStream) -> Result<Vec<u8>, HostKeyError> {
    let mut r = BufReader::new(stream);
    r.get_mut()
        .write_all(format!("SSH-2.0-EdgeportCheck_{}\r\n", edgeport_proto::VERSION).as_bytes())
        .await?;
    // The server's version line, after any lines it sends first (RFC 4253 section 4.2).
    let mut line = Vec::new();
    for _ in 0..32 {
        line.clear();
        let n = (&mut r).take(256).read_until(b'\n', &mut line).await?;
        if n == 0 {
            return Err(HostKeyError::Protocol("closed before its version line"));
        }
        if line.starts_with(b"SSH-") {
            break;
        }
    }
    if !line.starts_with(b"SSH-2.0-") && !line.starts_with(b"SSH-1.99-") {
        return Err(HostKeyError::Protocol("no SSH-2.0 version line"));
    }
    r.get_mut().write_all(&kexinit()?).await?;
    let mut sent_init = false;
    for _ in 0..16 {
        let p = read_packet(&mut r).await?;
        match p.first() {
            Some(&MSG_KEXINIT) if !sent_init => {
                let mut init = vec![MSG_KEX_ECDH_INIT];
                put_str(&mut init, &random(32)?);
                r.get_mut().write_all(&packet(&init)).await?;
                sent_init = true;
            }
            Some(&MSG_KEX_ECDH_REPLY) if sent_init => {
                return first_str(&p[1..])
                    .map(<[u8]>::to_vec)
                    .ok_or(HostKeyError::Protocol("a key exchange reply without a key"));
            }
            Some(&MSG_DISCONNECT) => {
                let why = p.get(5..).and_then(first_str).unwrap_or_default();
                return Err(HostKeyError::Disconnected(
                    String::from_utf8_lossy(why).into_owned(),
                ));
            }
            _ => {}
        }
    }
    Err(HostKeyError::Protocol("no key exchange reply"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_are_padded_to_eight() {
        for n in 0..40 {
            let p = packet(&vec![1u8; n]);
            assert_eq!(p.len() % 8, 0);
            assert!(p[4] >= 4);
            assert_eq!(
                u32::from_be_bytes(p[..4].try_into().unwrap()) as usize,
                p.len() - 4
            );
        }
    }

    #[test]
    fn blobs_and_fingerprints() {
        let k = edgeport_proto::keys::KeyPair::generate().unwrap();
        let blob = blob_of(&k.public_openssh()).unwrap();
        assert_eq!(first_str(&blob), Some(&b"ssh-ed25519"[..]));
        assert!(fingerprint(&blob).starts_with("SHA256:"));
        assert!(blob_of("ssh-ed25519").is_none());
    }
}
