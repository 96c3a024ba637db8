//! Shorthands for the RPC errors handlers return. Their messages reach tctl, tsh and agents
//! verbatim, so they name the thing and the reason, and never carry a secret.

use edgeport_proto::rpc::{ErrorKind, RpcError};

use crate::store::StoreError;

pub fn denied(msg: impl Into<String>) -> RpcError {
    RpcError::new(ErrorKind::Denied, msg)
}

pub fn invalid(msg: impl Into<String>) -> RpcError {
    RpcError::new(ErrorKind::Invalid, msg)
}

pub fn not_found(msg: impl Into<String>) -> RpcError {
    RpcError::new(ErrorKind::NotFound, msg)
}

pub fn exists(msg: impl Into<String>) -> RpcError {
    RpcError::new(ErrorKind::AlreadyExists, msg)
}

pub fn bad_credentials(msg: impl Into<String>) -> RpcError {
    RpcError::new(ErrorKind::BadCredentials, msg)
}

pub fn expired(msg: impl Into<String>) -> RpcError {
    RpcError::new(ErrorKind::Expired, msg)
}

pub fn locked(msg: impl Into<String>) -> RpcError {
    RpcError::new(ErrorKind::Locked, msg)
}

/// Something on our side failed. The details go to the log; the caller gets a short note.
pub fn internal(what: &str, err: impl std::fmt::Display) -> RpcError {
    tracing::error!("{what}: {err}");
    RpcError::new(ErrorKind::Internal, format!("internal error: {what}"))
}

/// Lets `?` turn a store failure into an internal RPC error (and `store::update` use
/// [`RpcError`] as its error type).
impl From<StoreError> for RpcError {
    fn from(e: StoreError) -> Self {
        internal("store", e)
    }
}
