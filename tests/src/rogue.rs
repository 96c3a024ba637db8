//! A gateway identity in an attacker's hands: the key and certificate from a gateway's data
//! dir, as someone who took that machine would have them, for the tests that check what such
//! an identity can no longer do.

use std::path::Path;
use std::sync::Arc;

use edgeport_net::rpc_client::{RpcClient, RpcClientError};
use edgeport_proto::rpc::{Request, Response};
use edgeport_proto::tunnel::{ClientReply, ClientRequest, StreamHeader};

use crate::dial::{request, GatewayStream};

/// TLS client configurations with a gateway's own identity.
pub struct StolenGateway {
    /// To other gateways (`edgeport-dial/1`, where peers send `Forward`).
    pub to_gateway: Arc<rustls::ClientConfig>,
    /// To the authority's RPC.
    pub to_authority: Arc<rustls::ClientConfig>,
}

impl StolenGateway {
    pub fn from_data_dir(dir: &Path) -> Self {
        edgeport_proto::tls::install_crypto_provider();
        let ident = edgeport_gateway::identity::load(dir).expect("gateway identity");
        let me = ident.cert_key().expect("gateway key and certificate");
        let ca = ident.ca_der().expect("cluster CA");
        let dial =
            edgeport_proto::tls::client_config(&ca, Some(&me), &[edgeport_proto::alpn::DIAL]);
        Self {
            to_gateway: Arc::new(dial.expect("TLS client config")),
            to_authority: Arc::new(ident.rpc_client_config().expect("RPC client config")),
        }
    }

    /// One request to the authority at `addr`.
    pub fn ask(&self, addr: &str, req: Request) -> Result<Response, RpcClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut c = RpcClient::connect(addr, self.to_authority.clone()).await?;
            c.call(req).await
        })
    }

    /// `ClientRequest::Forward` to the gateway at `addr`: the reply, and the stream for what
    /// follows a `DialOk`.
    pub fn forward(
        &self,
        addr: &str,
        device: &str,
        header: StreamHeader,
    ) -> (ClientReply, GatewayStream) {
        let req = ClientRequest::Forward {
            device_id: device.into(),
            header,
        };
        request(&self.to_gateway, addr, &req)
    }
}
