//! A client for the authority's RPC, used by tctl and gateways: one TLS connection,
//! request/response frames in order.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::frame_io::{read_frame, write_frame};
use edgeport_proto::frame::FrameError;
use edgeport_proto::rpc::{DeviceInfo, Request, Response, RpcError};
use edgeport_proto::tls::AUTHORITY_SERVER_NAME;

#[derive(Debug, thiserror::Error)]
pub enum RpcClientError {
    #[error("cannot reach the authority at {addr}: {err}")]
    Connect { addr: String, err: String },
    #[error("TLS handshake with the authority at {addr} failed: {err}")]
    Handshake { addr: String, err: String },
    #[error("authority connection: {0}")]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Remote(#[from] RpcError),
    #[error("the authority answered {0} to a request that expects something else")]
    Unexpected(String),
    #[error("the authority did not answer within {0:?}")]
    Timeout(Duration),
}

pub struct RpcClient {
    stream: TlsStream<TcpStream>,
    timeout: Duration,
}

impl RpcClient {
    /// Connects to `addr` with a TLS config from [`edgeport_proto::tls`] (ALPN must include RPC).
    pub async fn connect(
        addr: &str,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<Self, RpcClientError> {
        let timeout = Duration::from_secs(15);
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| RpcClientError::Timeout(timeout))?
            .map_err(|e| RpcClientError::Connect {
                addr: addr.to_string(),
                err: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from(AUTHORITY_SERVER_NAME)
            .map_err(|e| RpcClientError::Unexpected(e.to_string()))?;
        let stream = tokio::time::timeout(timeout, TlsConnector::from(config).connect(name, tcp))
            .await
            .map_err(|_| RpcClientError::Timeout(timeout))?
            .map_err(|e| RpcClientError::Handshake {
                addr: addr.to_string(),
                err: e.to_string(),
            })?;
        // TLS 1.3 servers reject a bad client certificate after the client thinks the
        // handshake is done; a ping surfaces that as a clear error here rather than later.
        let mut me = Self { stream, timeout };
        match me.call_raw(&Request::Ping).await {
            Ok(_) => Ok(me),
            Err(RpcClientError::Frame(e)) => Err(RpcClientError::Handshake {
                addr: addr.to_string(),
                err: format!(
                    "the authority closed the connection ({e}); is the identity from this cluster?"
                ),
            }),
            Err(e) => Err(e),
        }
    }

    async fn call_raw(&mut self, req: &Request) -> Result<Response, RpcClientError> {
        let fut = async {
            write_frame(&mut self.stream, req).await?;
            read_frame::<Response, _>(&mut self.stream).await
        };
        let resp = tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| RpcClientError::Timeout(self.timeout))??;
        match resp {
            Response::Error(e) => Err(RpcClientError::Remote(e)),
            other => Ok(other),
        }
    }

    /// Sends `req` and returns the response; `Response::Error` becomes `Err(Remote)`.
    pub async fn call(&mut self, req: Request) -> Result<Response, RpcClientError> {
        self.call_raw(&req).await
    }

    /// Ends the connection cleanly (TLS close_notify), so the authority sees an orderly close
    /// rather than an unexpected end of stream. Dropping the client without it is also safe.
    pub async fn close(mut self) {
        use tokio::io::AsyncWriteExt;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.stream.shutdown()).await;
    }
}

/// Paging through the inventory (large fleets do not fit in one frame): ask for the page
/// after `""`, feed each `DevicePage` response here, and ask again after the id this returns
/// until it returns `None`.
///
/// ```ignore
/// let (mut devices, mut next) = (Vec::new(), Some(String::new()));
/// while let Some(after) = next {
///     next = add_device_page(&mut devices, client.call(Request::DevicePage { after }).await?)?;
/// }
/// ```
pub fn add_device_page(
    out: &mut Vec<DeviceInfo>,
    resp: Response,
) -> Result<Option<String>, RpcClientError> {
    match resp {
        Response::DevicePage { devices, more } => {
            let progressed = !devices.is_empty();
            out.extend(devices);
            Ok((more && progressed).then(|| out.last().map(|d| d.id.clone()).unwrap_or_default()))
        }
        other => Err(unexpected(other)),
    }
}

/// Turns an unexpected response into an error naming it.
pub fn unexpected(resp: Response) -> RpcClientError {
    let name = format!("{resp:?}");
    RpcClientError::Unexpected(
        name.split(['(', ' ', '{'])
            .next()
            .unwrap_or("?")
            .to_string(),
    )
}
