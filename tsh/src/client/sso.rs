//! `tsh login --auth oidc|github`: single sign-on in the browser.
//!
//! tsh listens on a loopback port, asks the gateway for the identity provider's login URL
//! (returning to that port), opens the browser there (or prints the URL), and waits for the
//! provider to send the browser back with a code. It hands the code to the gateway with the
//! public key it made; the gateway redeems it (only it holds the client secret and the
//! PKCE verifier), verifies the ID token, and returns certificates signed by the authority.

use std::sync::Arc;
use std::time::Duration;

use edgeport_proto::keys::{random_secret, sha256_hex};
use edgeport_proto::rpc::UserCerts;
use edgeport_proto::tunnel::{ClientReply, ClientRequest, SsoFinish};
use edgeport_proto::util::ct_eq;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::cli::Transport;
use super::gateway;
use super::CliError;

/// The most tsh reads of one request to its loopback listener.
const MAX_REQUEST: u64 = 16 * 1024;
/// How long tsh waits for the browser to come back.
const WAIT: Duration = Duration::from_secs(300);
/// The path tsh's listener answers: `/v1/webapi/CONNECTOR/callback` (the redirect URI
/// registered at the provider, any port).
fn callback_path(connector: &str) -> String {
    format!("/v1/webapi/{connector}/callback")
}

/// What the provider sent back to the loopback listener.
enum Callback {
    Code { code: String, state: String },
    Error(String),
}

/// The gateway to log in through, verified as `server_name` with `tls`.
pub struct Gateway<'a> {
    pub proxy: &'a str,
    pub server_name: &'a str,
    pub tls: Arc<rustls::ClientConfig>,
    pub transport: Transport,
}

pub async fn login(
    gw: Gateway<'_>,
    connector: &str,
    ssh_public_key: String,
    ttl_secs: u64,
    browser: &str,
) -> Result<UserCerts, CliError> {
    let Gateway {
        proxy,
        server_name,
        tls,
        transport,
    } = gw;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| CliError::msg(format!("cannot listen on a loopback port: {e}")))?;
    let port = listener
        .local_addr()
        .map_err(|e| CliError::msg(e.to_string()))?
        .port();
    let path = callback_path(connector);
    let redirect_uri = format!("http://127.0.0.1:{port}{path}");
    let own_redirect = redirect_uri.clone();
    // Only this tsh knows the secret; the gateway finishes the login only for whoever shows it.
    let proof = random_secret().map_err(|e| CliError::msg(e.to_string()))?;
    let start = ClientRequest::SsoStart {
        connector: connector.to_string(),
        redirect_uri,
        proof_hash: sha256_hex(proof.as_bytes()),
    };
    let auth_url = match gateway::request(proxy, server_name, tls.clone(), transport, &start).await
    {
        Ok((ClientReply::SsoRedirect { auth_url }, _)) => auth_url,
        Ok((ClientReply::Refused(e), _)) => {
            return Err(CliError::msg(format!("single sign-on: {}", e.message)))
        }
        Ok((other, _)) => return Err(gateway::unexpected(&other)),
        Err(e) => return Err(CliError::msg(format!("login failed: {e}"))),
    };
    // The gateway is not trusted with where the browser goes: a provider's https page
    // (http only on loopback, as a local test provider) that returns to this tsh.
    let auth_url = check_auth_url(&auth_url, &own_redirect).map_err(|e| {
        CliError::msg(format!(
            "single sign-on: the gateway's login address is refused: {e}"
        ))
    })?;
    eprintln!("To log in, open this address in a browser:\n\n  {auth_url}\n");
    if browser != "none" {
        open_browser(&auth_url);
    }
    // The browser must come back with the state of this login: a callback with another one (a
    // login someone else started, delivered to this port) is turned away.
    let expected = state_of(&auth_url)
        .ok_or_else(|| CliError::msg("the gateway's login address carries no state"))?;
    let (code, state) =
        match tokio::time::timeout(WAIT, wait_for_callback(&listener, &path, &expected)).await {
            Err(_) => {
                return Err(CliError::msg(format!(
                    "no answer from the browser within {} minutes; run tsh login again",
                    WAIT.as_secs() / 60
                )))
            }
            Ok(Err(e)) => return Err(CliError::msg(format!("single sign-on: {e}"))),
            Ok(Ok(Callback::Error(e))) => {
                return Err(CliError::msg(format!("the identity provider refused: {e}")))
            }
            Ok(Ok(Callback::Code { code, state })) => (code, state),
        };
    let finish = ClientRequest::SsoFinish(SsoFinish {
        state,
        code,
        ssh_public_key,
        ttl_secs,
        proof,
    });
    match gateway::request(proxy, server_name, tls, transport, &finish).await {
        Ok((ClientReply::LoggedIn(c), _)) => Ok(c),
        Ok((other, _)) => Err(gateway::unexpected(&other)),
        Err(e) => Err(CliError::msg(format!("login failed: {e}"))),
    }
}

/// Best effort: the URL is printed either way.
fn open_browser(url: &str) {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    };
    let spawned = std::process::Command::new(opener)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    if spawned.is_err() {
        eprintln!("(could not start {opener}; open the address yourself)");
    }
}

/// Serves the loopback port until a request for the callback path arrives; other requests
/// (a browser's favicon) get a 404.
async fn wait_for_callback(
    listener: &TcpListener,
    path: &str,
    state: &str,
) -> Result<Callback, String> {
    loop {
        let (sock, _) = listener.accept().await.map_err(|e| e.to_string())?;
        match answer(sock, path, state).await {
            Ok(Some(cb)) => return Ok(cb),
            Ok(None) => continue,
            Err(e) => tracing::debug!("callback connection: {e}"),
        }
    }
}

async fn answer(
    sock: TcpStream,
    callback: &str,
    expected_state: &str,
) -> std::io::Result<Option<Callback>> {
    let mut reader = BufReader::new(sock);
    let mut line = String::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        // A browser's request is a few KiB; whatever connects to this port gets no more.
        let mut limited = (&mut reader).take(MAX_REQUEST);
        limited.read_line(&mut line).await?;
        // Skip the headers: nothing in them matters.
        let mut h = String::new();
        loop {
            h.clear();
            if limited.read_line(&mut h).await? == 0 || h == "\r\n" || h == "\n" {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    });
    if read.await.is_err() {
        return Ok(None);
    }
    let target = line.split_whitespace().nth(1).unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut sock = reader.into_inner();
    if path != callback {
        respond(&mut sock, "404 Not Found", "Not found.").await?;
        return Ok(None);
    }
    let param = |k: &str| edgeport_proto::percent::query_param(query, k);
    if !ct_eq(
        param("state").unwrap_or_default().as_bytes(),
        expected_state.as_bytes(),
    ) {
        respond(
            &mut sock,
            "400 Bad Request",
            "This sign-in belongs to another login attempt; it was ignored.",
        )
        .await?;
        return Ok(None);
    }
    let cb = match (param("code"), param("state"), param("error")) {
        (_, _, Some(err)) => {
            let desc = param("error_description").unwrap_or_default();
            Callback::Error(if desc.is_empty() {
                err
            } else {
                format!("{err}: {desc}")
            })
        }
        (Some(code), Some(state), None) => Callback::Code { code, state },
        _ => Callback::Error("the callback carried no code".into()),
    };
    let page = match &cb {
        Callback::Code { .. } => "Signed in. You can close this window and return to the terminal.",
        Callback::Error(_) => "Sign-in failed; the terminal says why.",
    };
    respond(&mut sock, "200 OK", page).await?;
    Ok(Some(cb))
}

async fn respond(sock: &mut TcpStream, status: &str, text: &str) -> std::io::Result<()> {
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Edgeport</title></head>\
         <body><p>{text}</p></body></html>"
    );
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\n\
         cache-control: no-store\r\nconnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    sock.shutdown().await
}

/// The `state` parameter of the provider's authorization URL.
/// The gateway's login address, if it is one tsh may open: `https` (or `http` to a loopback
/// host), no credentials, and exactly one `redirect_uri`, equal to tsh's own callback
/// `own_redirect`. Answered in its normalized form (nothing unprintable reaches the
/// terminal or the browser opener).
fn check_auth_url(auth_url: &str, own_redirect: &str) -> Result<String, String> {
    let u = url::Url::parse(auth_url).map_err(|e| format!("not a URL ({e})"))?;
    let loopback = match u.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => return Err("it has no host".into()),
    };
    match u.scheme() {
        "https" => {}
        "http" if loopback => {}
        other => return Err(format!("{other}: only https identity providers")),
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err("it carries credentials".into());
    }
    let redirects: Vec<_> = u
        .query_pairs()
        .filter(|(k, _)| k == "redirect_uri")
        .map(|(_, v)| v.into_owned())
        .collect();
    if redirects.as_slice() != [own_redirect] {
        return Err(format!(
            "it does not return to this tsh ({own_redirect}) but to {:?}",
            redirects
        ));
    }
    Ok(u.to_string())
}

fn state_of(url: &str) -> Option<String> {
    edgeport_proto::percent::query_param(url.split_once('?')?.1, "state")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_providers_address_back_to_this_tsh_is_opened() {
        let own = "http://127.0.0.1:4242/v1/webapi/oidc/callback";
        let enc = "http%3A%2F%2F127.0.0.1%3A4242%2Fv1%2Fwebapi%2Foidc%2Fcallback";
        for ok in [
            format!("https://idp.example/auth?client_id=x&redirect_uri={enc}&state=s"),
            format!("http://127.0.0.1:9000/auth?redirect_uri={enc}&state=s"),
            format!("http://localhost:9000/auth?redirect_uri={enc}"),
        ] {
            assert!(check_auth_url(&ok, own).is_ok(), "{ok}");
        }
        for bad in [
            // Elsewhere: a rogue gateway's own callback, or a web console's.
            "https://idp.example/auth?redirect_uri=https%3A%2F%2Frogue.example%2Fcb".to_string(),
            "https://idp.example/auth?redirect_uri=http%3A%2F%2F127.0.0.1%3A4243%2Fv1%2Fwebapi%2Foidc%2Fcallback".to_string(),
            "https://idp.example/auth?state=s".to_string(),
            format!("https://idp.example/auth?redirect_uri={enc}&redirect_uri=https%3A%2F%2Fx"),
            // Not https (outside loopback), credentials, not a URL.
            format!("http://idp.example/auth?redirect_uri={enc}"),
            format!("javascript:alert(1)//?redirect_uri={enc}"),
            format!("file:///etc/passwd?redirect_uri={enc}"),
            format!("https://user:pw@idp.example/auth?redirect_uri={enc}"),
            "not a url".to_string(),
        ] {
            assert!(check_auth_url(&bad, own).is_err(), "{bad}");
        }
    }

    #[test]
    fn finds_the_state() {
        let url = "https://idp.example/auth?client_id=x&state=ab%2Bc&nonce=n";
        assert_eq!(state_of(url).as_deref(), Some("ab+c"));
        assert_eq!(state_of("https://idp.example/auth?x=1"), None);
    }
}
