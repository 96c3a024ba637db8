//! A small HTTP/1.1 client for talking to the identity provider (discovery, keys, token
//! exchange): hyper over TCP, or over tokio-rustls for `https`. The openidconnect crate's own
//! clients bring reqwest and, through it, TLS stacks the builds keep out.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Each request (connect, TLS, answer) must finish within this time.
const TIMEOUT: Duration = Duration::from_secs(15);
/// Discovery documents, key sets and token answers are small.
const MAX_BODY: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0}")]
    Url(String),
    #[error("cannot reach {host}: {err}")]
    Connect { host: String, err: String },
    #[error("HTTP: {0}")]
    Protocol(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Makes one connection per request (the provider is asked a few times per login).
#[derive(Clone)]
pub struct HttpClient {
    tls: Arc<rustls::ClientConfig>,
}

impl HttpClient {
    pub fn new(tls: rustls::ClientConfig) -> Self {
        Self { tls: Arc::new(tls) }
    }

    pub async fn send(
        &self,
        req: http::Request<Vec<u8>>,
    ) -> Result<http::Response<Vec<u8>>, HttpError> {
        tokio::time::timeout(TIMEOUT, self.send_now(req))
            .await
            .unwrap_or(Err(HttpError::Timeout(TIMEOUT)))
    }

    async fn send_now(
        &self,
        req: http::Request<Vec<u8>>,
    ) -> Result<http::Response<Vec<u8>>, HttpError> {
        let uri = req.uri().clone();
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            other => return Err(HttpError::Url(format!("unsupported URL scheme {other:?}"))),
        };
        let host = uri
            .host()
            .ok_or_else(|| HttpError::Url(format!("no host in {uri}")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| HttpError::Connect {
                host: format!("{host}:{port}"),
                err: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);

        // Origin-form request line plus a Host header, as HTTP/1.1 servers expect.
        let (mut parts, body) = req.into_parts();
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        parts.uri = uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .parse()
            .map_err(|e| HttpError::Url(format!("{e}")))?;
        if let Ok(v) = http::HeaderValue::from_str(&authority) {
            parts.headers.insert(http::header::HOST, v);
        }
        let req = http::Request::from_parts(parts, Full::new(Bytes::from(body)));

        if https {
            let name = ServerName::try_from(host.clone())
                .map_err(|e| HttpError::Url(format!("{host}: {e}")))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| HttpError::Connect {
                    host: format!("{host}:{port}"),
                    err: e.to_string(),
                })?;
            exchange(tls, req).await
        } else {
            exchange(tcp, req).await
        }
    }
}

async fn exchange<I>(
    io: I,
    req: http::Request<Full<Bytes>>,
) -> Result<http::Response<Vec<u8>>, HttpError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let proto = |e: hyper::Error| HttpError::Protocol(e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(proto)?;
    let driver = tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(proto)?;
    let (parts, body) = resp.into_parts();
    let bytes = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| HttpError::Protocol(format!("reading the answer: {e}")))?
        .to_bytes();
    driver.abort();
    Ok(http::Response::from_parts(parts, bytes.to_vec()))
}
