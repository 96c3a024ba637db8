//! Signed user actions relayed by a gateway (`Request::AccessRequestUser`). A gateway faces the
//! internet and may be compromised, so what it says about a user counts for nothing: the
//! action must be signed by the private key of the user's own certificate. The authority
//! checks the certificate (this cluster's CA, its validity, a user principal, a user record no
//! younger than it), the Ed25519 signature by the certificate's key, the cluster the action
//! names, its age, and takes its nonce once (in the store, so several authorities share it).

use edgeport_proto::rpc::{user_action_message, RpcError, SignedUserAction, UserAction};

use crate::errors::{denied, invalid};
use crate::service::Service;
use crate::store::{Store, Table};
use crate::users::Subject;

/// How far a signed action's time may be from the authority's clock, either way.
pub const MAX_SKEW_SECS: u64 = 120;
/// Nonces are kept this long: anything older is refused as stale anyway.
const NONCE_KEEP_SECS: u64 = 2 * MAX_SKEW_SECS + 60;
/// Largest signed body taken (roles and a reason; a frame is 64 KiB anyway).
const MAX_BODY: usize = 8 * 1024;

/// The user who signed `signed`, with what they signed, once every check has passed.
pub fn verify(
    svc: &Service,
    signed: &SignedUserAction,
    now: u64,
) -> Result<(Subject, UserAction), RpcError> {
    let subject = super::dial::certified_user(svc, &signed.user_cert_der, now)?;
    if signed.body.len() > MAX_BODY {
        return Err(invalid("the signed action is too large"));
    }
    let key = edgeport_proto::tls::ed25519_key_of(&signed.user_cert_der)
        .map_err(|e| denied(format!("the user's certificate does not count: {e}")))?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
        .verify(&user_action_message(&signed.body), &signed.signature)
        .map_err(|_| {
            denied(format!(
                "the action is not signed by the key of {}'s certificate",
                subject.name
            ))
        })?;
    let action: UserAction = postcard::from_bytes(&signed.body)
        .map_err(|e| invalid(format!("the signed action cannot be read: {e}")))?;
    if action.cluster != svc.cluster() {
        return Err(denied(format!(
            "the action was signed for cluster {:?}, this is {:?}",
            action.cluster,
            svc.cluster()
        )));
    }
    if action.issued_at.abs_diff(now) > MAX_SKEW_SECS {
        return Err(denied(format!(
            "the signed action is stale or from the future (signed at {}, now {now}; \
             check this computer's clock)",
            action.issued_at
        )));
    }
    let nonce_ok = (32..=128).contains(&action.nonce.len())
        && action.nonce.bytes().all(|b| b.is_ascii_hexdigit());
    if !nonce_ok {
        return Err(invalid(
            "the signed action's nonce is not 16 to 64 hex bytes",
        ));
    }
    take_nonce(svc.store(), &action.nonce, now)?;
    Ok((subject, action))
}

/// Records `nonce` as used; refuses one seen before. Old nonces are dropped on the way.
fn take_nonce(store: &dyn Store, nonce: &str, now: u64) -> Result<(), RpcError> {
    let key = format!("n/{}", nonce.to_ascii_lowercase());
    let stamp = now.to_string().into_bytes();
    if !store.compare_and_swap(Table::AccessRequests, &key, None, Some(stamp))? {
        return Err(denied("this signed action was already used (a replay)"));
    }
    for (k, v) in store.scan_prefix(Table::AccessRequests, "n/")? {
        let at = std::str::from_utf8(&v)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        if at.saturating_add(NONCE_KEEP_SECS) < now {
            // Another authority may drop it at the same time: either way it is gone.
            let _ = store.compare_and_swap(Table::AccessRequests, &k, Some(&v), None)?;
        }
    }
    Ok(())
}
