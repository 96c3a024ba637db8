//! `tsh login`: verify the gateway, make a key pair here, authenticate, store the
//! certificates, and load them into the ssh-agent if one runs.

use std::io::BufRead;
use std::path::Path;

use edgeport_net::clock::now_secs;
use edgeport_proto::identity::CaBundle;
use edgeport_proto::keys::random_bytes;
use edgeport_proto::keys::{ca_pin, first_cert_der, normalize_pin, KeyPair};
use edgeport_proto::rpc::{ErrorKind, LoginRequest, UserCerts};
use edgeport_proto::totp;
use edgeport_proto::tunnel::{ClientReply, ClientRequest};
use edgeport_proto::util::{format_time, parse_duration_secs};
use russh::keys::ssh_key::Certificate;

use super::cli::{Global, LoginArgs};
use super::gateway::{self, Trust};
use super::profile::{tsh_home, KeyFiles, Profile, ProxyProfile};
use super::{agent, term, CliError};

/// Local user name, the default for `--user`.
fn local_user() -> Option<String> {
    ["USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
}

/// One line of stdin: `what` names it in errors (the password, a one-time code).
fn read_stdin_line(what: &str) -> Result<String, CliError> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| CliError::msg(format!("cannot read {what} from stdin: {e}")))?;
    let line = line.trim_end_matches(['\n', '\r']).to_string();
    if line.is_empty() {
        return Err(CliError::msg(format!("no {what} on stdin")));
    }
    Ok(line)
}

fn read_password(args: &LoginArgs, prompt: &str, confirm: bool) -> Result<String, CliError> {
    if args.password_stdin {
        return read_stdin_line("the password");
    }
    let p = term::read_secret(prompt).map_err(|e| CliError::msg(e.to_string()))?;
    if confirm {
        let again = term::read_secret("Repeat the new password: ")
            .map_err(|e| CliError::msg(e.to_string()))?;
        if again != p {
            return Err(CliError::msg("the passwords do not match"));
        }
    }
    Ok(p)
}

pub async fn run(global: &Global, args: &LoginArgs) -> Result<i32, CliError> {
    let home = tsh_home()?;
    let mut profile = Profile::load(&home)?;
    let proxy = global
        .proxy
        .clone()
        .or_else(|| profile.current.clone())
        .ok_or_else(|| CliError::msg("tsh login needs --proxy HOST:PORT (the gateway)"))?;
    let entry = profile.get(&proxy).cloned();
    // With single sign-on the identity provider names the user; --user only picks the
    // stored CAs to verify the gateway with.
    let user = args
        .user
        .clone()
        .or_else(|| entry.as_ref().map(|e| e.user.clone()))
        .or_else(local_user)
        .or_else(|| (args.auth != "local").then(String::new))
        .ok_or_else(|| CliError::msg("tsh login needs --user NAME"))?;
    let ttl_secs = parse_duration_secs(&args.ttl).map_err(|e| CliError::msg(e.to_string()))?;

    // Verify the gateway before sending it anything.
    let stored_cas = read_cas(&KeyFiles::new(&home, &proxy, &user).cas).or_else(|| {
        entry
            .as_ref()
            .and_then(|e| read_cas(&KeyFiles::new(&home, &proxy, &e.user).cas))
    });
    let trust = if args.insecure {
        eprintln!(
            "WARNING: --insecure: the gateway at {proxy} is NOT verified. Anyone on the network path can \
             impersonate it and take your password. Use this only for local experiments."
        );
        Trust::Insecure
    } else if let Some(pin) = &args.ca_pin {
        Trust::Pin(normalize_pin(pin).ok_or_else(|| {
            CliError::msg(format!("--ca-pin {pin:?} is not sha256:<64 hex digits>"))
        })?)
    } else if let Some(cas) = &stored_cas {
        // Every x509 CA of the stored bundle (two during an x509 CA rotation): the stored
        // pin alone would miss a gateway that renewed under the new CA.
        Trust::Ca(
            cas.x509_ca_der()
                .map_err(|e| CliError::msg(e.to_string()))?,
        )
    } else if let Some(pin) = entry.as_ref().and_then(|e| e.ca_pin.clone()) {
        Trust::Pin(pin)
    } else {
        // No pin: only a gateway with a public certificate for its name can be verified.
        let host = proxy_host(&proxy);
        if host.parse::<std::net::IpAddr>().is_ok() || (!host.contains('.') && host != "localhost")
        {
            return Err(CliError::msg(format!(
                "first login to {proxy}: pass --ca-pin sha256:... (the cluster's CA pin, from your administrator) so tsh can verify the gateway"
            )));
        }
        Trust::System(host.to_string())
    };
    // The x509 CA the answer must come from; the SSH CAs are trusted through its signature.
    let pins = match &trust {
        Trust::Pin(p) => Some(vec![p.clone()]),
        Trust::Ca(der) => Some(
            edgeport_proto::tls::split_ders(der)
                .map_err(|e| CliError::msg(e.to_string()))?
                .into_iter()
                .map(ca_pin)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| CliError::msg(e.to_string()))?,
        ),
        Trust::System(_) | Trust::Insecure => None,
    };

    let key = KeyPair::generate().map_err(|e| CliError::msg(e.to_string()))?;
    let tls = gateway::tls_config(&trust, None)?;
    let certs = if args.auth != "local" {
        // The identity provider names the user; --user does not apply.
        let gw = super::sso::Gateway {
            proxy: &proxy,
            server_name: trust.server_name(),
            tls,
            transport: global.transport,
        };
        super::sso::login(
            gw,
            &args.auth,
            key.public_openssh(),
            ttl_secs,
            &args.browser,
        )
        .await?
    } else {
        password_login(global, args, &proxy, &user, &trust, tls, &key, ttl_secs).await?
    };
    let user = certs.user.clone();
    let cert = check_certs(&certs, &key, pins.as_deref())?;

    let files = KeyFiles::new(&home, &proxy, &user);
    save(&files, &key, &certs)?;
    profile.upsert(ProxyProfile {
        proxy: proxy.clone(),
        user: user.clone(),
        cluster: certs.cas.cluster.clone(),
        ca_pin: if args.insecure {
            None
        } else {
            // Verified by check_certs: the bundle's own CA has this pin.
            Some(certs.cas.ca_pin.clone())
        },
        insecure: args.insecure,
    });
    profile.save(&home)?;
    // kubectl contexts written by `tsh kube login` carry the certificate itself: renew it.
    let key_pem = key.pkcs8_pem();
    super::kube::refresh(
        &home,
        &proxy,
        &super::kube::KubeCreds {
            proxy: &proxy,
            cluster: "",
            ca_pem: &certs.cas.x509_ca_pem,
            cert_pem: &certs.x509_cert_pem,
            key_pem: &key_pem,
        },
    )?;

    let valid_before = cert.valid_before();
    let left = valid_before.saturating_sub(now_secs());
    if let Some(sock) = std::env::var_os("SSH_AUTH_SOCK").filter(|s| !s.is_empty()) {
        let comment = format!("edgeport:{proxy}:{user}");
        if let Err(e) = agent::add(
            Path::new(&sock),
            &key,
            &cert,
            left.min(u32::MAX as u64) as u32,
            &comment,
        )
        .await
        {
            eprintln!("tsh: could not add the key to the ssh-agent: {e}");
        }
    }
    let capped = crate::text::capped_note(ttl_secs, valid_before, now_secs())
        .map(|note| format!(", {note}"))
        .unwrap_or_default();
    crate::outln!(
        "Logged in as {user} to cluster {} via {proxy}\n  Logins:      {}\n  Valid until: {} ({} left{capped})",
        certs.cas.cluster,
        certs.logins.join(", "),
        format_time(valid_before),
        crate::text::duration(left)
    );
    Ok(0)
}

/// Added to a refused invite login: invite codes work once, for 24 hours.
const INVITE_HINT: &str = " (an invite code works once and expires after 24 hours: if it was \
     used already, log in with the password chosen then, without --invite; otherwise ask \
     for a new invite)";

/// Password (or invite code) login: the secret goes to the verified gateway.
#[allow(clippy::too_many_arguments)]
async fn password_login(
    global: &Global,
    args: &LoginArgs,
    proxy: &str,
    user: &str,
    trust: &Trust,
    tls: std::sync::Arc<rustls::ClientConfig>,
    key: &KeyPair,
    ttl_secs: u64,
) -> Result<UserCerts, CliError> {
    let (secret, new_password) = match &args.invite {
        Some(code) => (
            code.clone(),
            Some(read_password(args, "Choose a password: ", true)?),
        ),
        None => (
            read_password(args, &format!("Password for {user}@{proxy}: "), false)?,
            None,
        ),
    };
    let mut req = LoginRequest {
        user: user.to_string(),
        secret,
        new_password,
        ssh_public_key: key.public_openssh(),
        ttl_secs,
        client_addr: String::new(),
        otp: args.otp.clone(),
        ..Default::default()
    };
    let fail = |e: String| {
        if matches!(trust, Trust::System(_)) {
            CliError::msg(format!(
                "login failed: {e}\n(without --ca-pin the gateway must present a certificate for {} from a CA this system trusts; ask your administrator for the cluster's CA pin)",
                trust.server_name()
            ))
        } else {
            CliError::msg(format!("login failed: {e}"))
        }
    };
    // At most: the password, then a one-time code or an enrollment.
    for _ in 0..3 {
        let msg = ClientRequest::Login(req.clone());
        let reply = gateway::request_reply(
            proxy,
            trust.server_name(),
            tls.clone(),
            global.transport,
            &msg,
        )
        .await
        .map_err(|e| fail(e.to_string()))?;
        match reply.0 {
            ClientReply::LoggedIn(c) => return Ok(c),
            ClientReply::Refused(e)
                if e.kind == ErrorKind::SecondFactorRequired && req.otp.is_none() =>
            {
                req.otp = Some(read_code(
                    args,
                    "One-time code from your authenticator app: ",
                )?);
            }
            ClientReply::Refused(e)
                if e.kind == ErrorKind::SecondFactorEnroll && req.totp_enroll.is_none() =>
            {
                // Nothing was changed by the refused attempt (an invite is still unspent): the
                // same secret goes again, with the enrollment.
                let secret = totp::base32(
                    &random_bytes(totp::SECRET_LEN).map_err(|e| CliError::msg(e.to_string()))?,
                );
                eprintln!(
                    "This account needs a one-time password app (Google Authenticator, Aegis, 1Password, ...).\n\
                     Add this key to it:\n\n  {secret}\n\n\
                     or scan a QR code of: otpauth://totp/Edgeport:{user}?secret={secret}&issuer=Edgeport\n"
                );
                req.totp_enroll = Some(secret);
                req.otp = Some(read_code(args, "The app's current code: ")?);
            }
            ClientReply::Refused(e)
                if e.kind == ErrorKind::BadCredentials
                    && args.invite.is_some()
                    && !e.message.contains("already used") =>
            {
                // A wrong or expired code, or an authority from before it said when an
                // invite was spent: the likeliest reasons are the user's to read.
                return Err(fail(format!("{}{INVITE_HINT}", e.message)));
            }
            ClientReply::Refused(e) => return Err(fail(e.message)),
            other => return Err(gateway::unexpected(&other)),
        }
    }
    Err(fail("too many attempts".into()))
}

/// A one-time code: the next stdin line with --password-stdin, else asked on the terminal.
fn read_code(args: &LoginArgs, prompt: &str) -> Result<String, CliError> {
    let code = if args.password_stdin {
        eprintln!("{prompt}(reading it from stdin)");
        read_stdin_line("one-time code")?
    } else {
        term::read_secret(prompt).map_err(|e| CliError::msg(e.to_string()))?
    };
    Ok(code.trim().to_string())
}

fn read_cas(path: &Path) -> Option<CaBundle> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// Checks what the gateway returned: certificates for our key, and (when the gateway was
/// verified by pin) CAs that match that pin.
/// `host:port` or `[v6]:port` -> host.
fn proxy_host(proxy: &str) -> &str {
    if let Some(rest) = proxy.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    proxy.rsplit_once(':').map_or(proxy, |(h, _)| h)
}

fn check_certs(
    certs: &UserCerts,
    key: &KeyPair,
    pins: Option<&[String]>,
) -> Result<Certificate, CliError> {
    let cert = Certificate::from_openssh(certs.ssh_cert.trim()).map_err(|e| {
        CliError::msg(format!(
            "the gateway returned an unreadable SSH certificate: {e}"
        ))
    })?;
    if cert.public_key() != key.ssh_public().key_data() {
        return Err(CliError::msg(
            "the gateway returned a certificate for another key",
        ));
    }
    let ca_der = first_cert_der(&certs.cas.x509_ca_pem)
        .map_err(|e| CliError::msg(format!("the gateway returned an unreadable CA: {e}")))?;
    let bundle_pin = ca_pin(&ca_der).map_err(|e| CliError::msg(e.to_string()))?;
    // The SSH CAs (host CA for known_hosts, user CA) are only as good as the x509 CA's
    // signature over them: a gateway must not be able to substitute its own host CA.
    certs
        .cas
        .verify()
        .map_err(|e| CliError::msg(format!("the gateway returned CAs that do not verify: {e}")))?;
    // The bundle's x509 CA is the pinned one, or (x509 CA rotation) endorsed by it.
    if let Some(pins) = pins {
        if certs.cas.endorsed_by(pins).is_err() {
            return Err(CliError::msg(format!(
                "the cluster CA returned by the gateway ({bundle_pin}) does not match the pin {}",
                pins.join(" or ")
            )));
        }
    }
    first_cert_der(&certs.x509_cert_pem).map_err(|e| {
        CliError::msg(format!(
            "the gateway returned an unreadable x509 certificate: {e}"
        ))
    })?;
    Ok(cert)
}

fn save(files: &KeyFiles, key: &KeyPair, certs: &UserCerts) -> Result<(), CliError> {
    let io = |what: &Path, e: std::io::Error| {
        CliError::msg(format!("cannot write {}: {e}", what.display()))
    };
    if let Some(keys) = files.dir.parent() {
        edgeport_proto::util::create_private_dir(keys).map_err(|e| io(keys, e))?;
    }
    edgeport_proto::util::create_private_dir(&files.dir).map_err(|e| io(&files.dir, e))?;
    let pem = key.to_openssh().map_err(|e| CliError::msg(e.to_string()))?;
    let private =
        |p: &Path, d: &[u8]| edgeport_proto::util::write_private(p, d).map_err(|e| io(p, e));
    let public = |p: &Path, d: &[u8]| {
        edgeport_proto::util::write_with_mode(p, d, 0o644).map_err(|e| io(p, e))
    };
    private(&files.key, pem.as_bytes())?;
    public(
        &files.public,
        format!("{}\n", key.public_openssh()).as_bytes(),
    )?;
    public(
        &files.cert,
        format!("{}\n", certs.ssh_cert.trim()).as_bytes(),
    )?;
    public(&files.x509, certs.x509_cert_pem.as_bytes())?;
    let cas = serde_json::to_vec_pretty(&certs.cas).map_err(|e| CliError::msg(e.to_string()))?;
    public(&files.cas, &cas)?;
    public(
        &files.known_hosts,
        format!("{}\n", certs.cas.known_hosts_line("*")).as_bytes(),
    )?;
    Ok(())
}
