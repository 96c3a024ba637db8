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
        let mut roots = rustls::RootCertStore::empty();
        match ca_file {
            Some(path) => {
                let text = std::fs::read(path).map_err(|e| {
                    StoreError::Backend(format!("cannot read {}: {e}", path.display()))
                })?;
                let certs = pem::parse_many(&text).map_err(|e| {
                    StoreError::Backend(format!("{} is not PEM: {e}", path.display()))
                })?;
                for c in certs.iter().filter(|c| c.tag() == "CERTIFICATE") {
                    roots
                        .add(c.contents().to_vec().into())
                        .map_err(|e| StoreError::Backend(format!("{}: {e}", path.display())))?;
                }
                if roots.is_empty() {
                    return Err(StoreError::Backend(format!(
                        "{} holds no certificate",
                        path.display()
                    )));
                }
            }
            None => {
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(edgeport_proto::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| StoreError::Backend(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
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
