//! Handlers of the requests that do more than one store call: certificate issuance, joins,
//! presence and dial authorisation. Simple CRUD requests are answered in
//! [`crate::service`] straight from the domain modules.

pub mod dial;
pub mod join;
pub mod presence;
pub mod rotate;
pub mod sso;
pub mod targets;
pub mod user_action;
pub mod user_certs;
pub mod web;
