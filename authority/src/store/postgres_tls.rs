//! TLS to PostgreSQL with rustls (tokio-postgres's own TLS adapters use OpenSSL or
//! native-tls, which the static builds keep out). The server's certificate is always
//! verified, against `--store-ca` if given, else the system's roots. Over TCP, TLS is
//! required unless the URL sets `sslmode` itself (`disable` for a private test database).

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_postgres::Socket;

use super::StoreError;

/// Makes a TLS connection per database connection, with one shared client configuration.
#[derive(Clone)]
pub struct Rustls(Arc<rustls::ClientConfig>);

impl Rustls {
    /// Roots from `ca_file` (PEM) if given, else the system's.
    pub fn new(ca_file: Option<&Path>) -> Result<Self, StoreError> {
        let config = edgeport_proto::tls::external_client_config(ca_file, || {
            rustls_native_certs::load_native_certs().certs
        })
        .map_err(|e| StoreError::Backend(format!("TLS to PostgreSQL: {e}")))?;
        Ok(Self(Arc::new(config)))
    }
}

impl MakeTlsConnect<Socket> for Rustls {
    type Stream = Stream;
    type TlsConnect = Connect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Connect, Self::Error> {
        Ok(Connect {
            config: self.0.clone(),
            name: ServerName::try_from(domain.to_string())?,
        })
    }
}

pub struct Connect {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl TlsConnect<Socket> for Connect {
    type Stream = Stream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Stream>> + Send>>;

    fn connect(self, socket: Socket) -> Self::Future {
        Box::pin(async move {
            let tls = tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, socket)
                .await?;
            Ok(Stream(tls))
        })
    }
}

/// A TLS connection to the database.
pub struct Stream(tokio_rustls::client::TlsStream<Socket>);

impl tokio_postgres::tls::TlsStream for Stream {
    /// No channel binding: SCRAM without `-PLUS`, as most servers are configured.
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
