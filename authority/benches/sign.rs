//! Signing throughput of the authority's CAs: how many user certificates one core signs per
//! second. Run with `cargo bench -p edgeport-authority --bench sign`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use edgeport_authority::ca::{CaKeys, CertAuthority, SshUserCert};
use edgeport_authority::roles;
use edgeport_net::clock::now_secs;
use edgeport_proto::keys::KeyPair;

const RUN_FOR: Duration = Duration::from_secs(2);

type BoxError = Box<dyn std::error::Error>;

/// Runs `f` for about [`RUN_FOR`]; returns (iterations, elapsed).
fn measure(mut f: impl FnMut() -> Result<(), BoxError>) -> Result<(u64, Duration), BoxError> {
    for _ in 0..50 {
        f()?; // warm up
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < RUN_FOR {
        for _ in 0..64 {
            f()?;
        }
        n += 64;
    }
    Ok((n, start.elapsed()))
}

fn main() -> Result<(), BoxError> {
    let ca = CertAuthority::new("bench", CaKeys::generate("bench")?)?;
    let user = KeyPair::generate()?;
    let spki = user.spki_der();
    let role = roles::builtin(roles::DEFAULT_ROLE).ok_or("no default role")?;
    let grants = roles::combine(&[role]);
    let logins = vec!["root".to_string(), "pi".to_string()];
    let groups = vec!["devs".to_string(), "system:masters".to_string()];
    let now = now_secs();

    let ssh_user = || -> Result<(), BoxError> {
        let line = ca.sign_ssh_user(&SshUserCert {
            user: "alice",
            public_key: user.ssh_public(),
            principals: &logins,
            valid_after: now - 60,
            valid_before: now + 3600,
            permit_pty: grants.permit_pty,
            permit_port_forwarding: grants.permit_port_forwarding,
            permit_agent_forwarding: grants.permit_agent_forwarding,
            roles: &grants.extension,
        })?;
        black_box(line);
        Ok(())
    };
    let x509_user = || -> Result<(), BoxError> {
        black_box(ca.sign_x509_user("alice", &groups, &spki, now - 60, now + 3600)?);
        Ok(())
    };
    let ssh_host = || -> Result<(), BoxError> {
        black_box(ca.sign_ssh_host("van-1", user.ssh_public(), now - 60, now + 3600)?);
        Ok(())
    };

    let rows: Vec<(&str, (u64, Duration))> = vec![
        ("SSH user certificate (Ed25519 user CA)", measure(ssh_user)?),
        (
            "x509 user certificate (ECDSA P-256 CA)",
            measure(x509_user)?,
        ),
        ("SSH host certificate (Ed25519 host CA)", measure(ssh_host)?),
        (
            "SSH + x509 pair (one login / SignUser)",
            measure(|| {
                ssh_user()?;
                x509_user()
            })?,
        ),
    ];
    println!(
        "{:<42} {:>10} {:>12} {:>10}",
        "certificate", "signed", "certs/s", "µs each"
    );
    for (name, (n, t)) in rows {
        let per_sec = n as f64 / t.as_secs_f64();
        println!(
            "{:<42} {:>10} {:>12.0} {:>10.1}",
            name,
            n,
            per_sec,
            1e6 / per_sec
        );
    }
    Ok(())
}
