//! Dial tickets: the authority's proof that it authorised one dial.
//!
//! A gateway faces the internet and may be compromised, so nothing it says about a user counts
//! on its own. When a gateway asks to dial a device (`Request::AuthorizeDial`), it hands the
//! authority the x509 certificate the user presented; the authority checks that certificate
//! itself, decides, and signs a [`DialTicket`] with the cluster's host CA key (the key every
//! gateway and device already trusts; the context string keeps these signatures apart from SSH
//! certificates and audit acknowledgements). The ticket names the user from that certificate,
//! the device, the service, what the user may be there (logins, Kubernetes groups and users),
//! the gateway that asked and the gateway that holds the device's tunnel. It lives at most
//! [`TICKET_TTL_SECS`] and is taken once ([`ReplayGuard`]).
//!
//! Who checks it: the holding gateway before it accepts a forwarded dial (instead of trusting
//! the forwarder's header), and the agent before it impersonates anyone in Kubernetes.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::tunnel::Service;

/// The longest a ticket lives.
pub const TICKET_TTL_SECS: u64 = 60;
/// Clock difference tolerated between the authority and whoever checks a ticket.
pub const CLOCK_SKEW_SECS: u64 = 30;
/// Ticket ids a [`ReplayGuard`] remembers at most (a minute of dials at any sane rate).
const REPLAY_CAPACITY: usize = 100_000;

/// Domain separation for the signed bytes.
const CONTEXT: &[u8] = b"edgeport-dial-ticket/1\0";

/// What the authority vouches for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketClaims {
    /// Random, hex: what single use is keyed on.
    pub id: String,
    pub cluster: String,
    /// The user named by the certificate the user presented (never by a gateway).
    pub user: String,
    /// The device's id.
    pub device: String,
    pub service: Service,
    pub logins: Vec<String>,
    pub kube_groups: Vec<String>,
    pub kube_users: Vec<String>,
    /// The gateway whose certificate asked for the ticket (the one the user reached).
    pub requester: String,
    /// The gateway that holds the device's tunnel, as the authority knows it.
    pub holder: Option<String>,
    pub issued_at: u64,
    pub expires_at: u64,
}

/// Signed claims, as they travel (postcard bytes, so the signature covers exactly them).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DialTicket {
    pub claims: Vec<u8>,
    /// Ed25519 signature of the host CA over [`signed_bytes`].
    pub signature: Vec<u8>,
}

impl std::fmt::Debug for DialTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match postcard::from_bytes::<TicketClaims>(&self.claims) {
            Ok(c) => write!(
                f,
                "DialTicket({} for {} on {} via {})",
                c.id, c.user, c.device, c.requester
            ),
            Err(_) => write!(f, "DialTicket(unreadable)"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("no dial ticket from the authority")]
    Missing,
    #[error("the dial ticket's signature does not verify with the cluster's host CA")]
    BadSignature,
    #[error("the dial ticket is unreadable")]
    Malformed,
    #[error("the dial ticket is for cluster {0:?}")]
    WrongCluster(String),
    #[error("the dial ticket expired {0} s ago")]
    Expired(u64),
    #[error("the dial ticket is not valid yet (issued {0} s in the future)")]
    NotYetValid(u64),
    #[error("the dial ticket was already used")]
    Replayed,
    #[error("the dial ticket is for {what} {got:?}, not {want:?}")]
    Mismatch {
        what: &'static str,
        got: String,
        want: String,
    },
    #[error("too many dial tickets in flight")]
    Full,
}

/// The bytes the host CA signs.
pub fn signed_bytes(claims: &[u8]) -> Vec<u8> {
    let mut out = CONTEXT.to_vec();
    out.extend_from_slice(claims);
    out
}

impl DialTicket {
    /// Encodes `claims` and signs them with `sign` (the host CA's Ed25519 signer).
    pub fn issue(claims: &TicketClaims, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> Self {
        let claims = postcard::to_stdvec(claims).unwrap_or_default();
        let signature = sign(&signed_bytes(&claims));
        Self { claims, signature }
    }

    /// The claims, once the signature verifies with `host_ca_raw` (a raw Ed25519 key).
    pub fn verify(&self, host_ca_raw: &[u8]) -> Result<TicketClaims, TicketError> {
        let key = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, host_ca_raw);
        key.verify(&signed_bytes(&self.claims), &self.signature)
            .map_err(|_| TicketError::BadSignature)?;
        postcard::from_bytes(&self.claims).map_err(|_| TicketError::Malformed)
    }
}

/// What the checker expects a ticket to say.
#[derive(Clone, Debug)]
pub struct Expected<'a> {
    pub cluster: &'a str,
    pub device: &'a str,
    pub service: Service,
    /// The gateway that must have asked (the forwarding peer's certificate), if checked.
    pub requester: Option<&'a str>,
    /// The gateway that must hold the tunnel (the checker itself), if checked.
    pub holder: Option<&'a str>,
}

fn mismatch(what: &'static str, got: impl Into<String>, want: &str) -> TicketError {
    TicketError::Mismatch {
        what,
        got: got.into(),
        want: want.to_string(),
    }
}

impl TicketClaims {
    /// Checks cluster, device, service, gateways and the validity window at `now`.
    pub fn check(&self, want: &Expected<'_>, now: u64) -> Result<(), TicketError> {
        if self.cluster != want.cluster {
            return Err(TicketError::WrongCluster(self.cluster.clone()));
        }
        if self.device != want.device {
            return Err(mismatch("device", &self.device, want.device));
        }
        if self.service != want.service {
            return Err(mismatch(
                "service",
                format!("{:?}", self.service),
                &format!("{:?}", want.service),
            ));
        }
        if let Some(r) = want.requester {
            if self.requester != r {
                return Err(mismatch("requesting gateway", &self.requester, r));
            }
        }
        if let Some(h) = want.holder {
            if self.holder.as_deref() != Some(h) {
                return Err(mismatch(
                    "holding gateway",
                    self.holder.clone().unwrap_or_default(),
                    h,
                ));
            }
        }
        if self.issued_at > now + CLOCK_SKEW_SECS {
            return Err(TicketError::NotYetValid(self.issued_at - now));
        }
        // A ticket claiming a longer life than any the authority gives is not believed.
        let expires = self
            .expires_at
            .min(self.issued_at.saturating_add(TICKET_TTL_SECS));
        if now > expires + CLOCK_SKEW_SECS {
            return Err(TicketError::Expired(now - expires));
        }
        Ok(())
    }
}

/// Remembers the tickets taken until they expire, so each is taken once.
#[derive(Default)]
pub struct ReplayGuard {
    seen: Mutex<HashMap<String, u64>>,
}

impl ReplayGuard {
    /// Takes the ticket `claims` (already checked) at `now`; a second take is refused.
    pub fn take(&self, claims: &TicketClaims, now: u64) -> Result<(), TicketError> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let forget_after = |c_exp: u64| c_exp.saturating_add(CLOCK_SKEW_SECS);
        if seen.len() >= REPLAY_CAPACITY {
            seen.retain(|_, exp| forget_after(*exp) >= now);
            if seen.len() >= REPLAY_CAPACITY {
                return Err(TicketError::Full);
            }
        }
        let expires = claims
            .expires_at
            .min(claims.issued_at.saturating_add(TICKET_TTL_SECS));
        match seen.entry(claims.id.clone()) {
            std::collections::hash_map::Entry::Occupied(_) => Err(TicketError::Replayed),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(expires);
                Ok(())
            }
        }
    }

    /// Verifies, checks and takes a ticket: the one call a checker makes.
    /// [`Self::admit`] with any of the trusted host CAs (two during a CA rotation).
    pub fn admit_any(
        &self,
        ticket: Option<&DialTicket>,
        host_cas_raw: &[Vec<u8>],
        want: &Expected<'_>,
        now: u64,
    ) -> Result<TicketClaims, TicketError> {
        let t = ticket.ok_or(TicketError::Missing)?;
        let ca = host_cas_raw
            .iter()
            .find(|k| t.verify(k).is_ok())
            .or_else(|| host_cas_raw.first())
            .map(Vec::as_slice)
            .unwrap_or_default();
        self.admit(Some(t), ca, want, now)
    }

    pub fn admit(
        &self,
        ticket: Option<&DialTicket>,
        host_ca_raw: &[u8],
        want: &Expected<'_>,
        now: u64,
    ) -> Result<TicketClaims, TicketError> {
        let claims = ticket.ok_or(TicketError::Missing)?.verify(host_ca_raw)?;
        claims.check(want, now)?;
        self.take(&claims, now)?;
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    fn key() -> Ed25519KeyPair {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap()
    }

    fn claims(id: &str) -> TicketClaims {
        TicketClaims {
            id: id.into(),
            cluster: "edge".into(),
            user: "alice".into(),
            device: "van-1".into(),
            service: Service::Kube,
            logins: vec!["root".into()],
            kube_groups: vec!["devs".into()],
            kube_users: vec![],
            requester: "gw-a".into(),
            holder: Some("gw-b".into()),
            issued_at: 1000,
            expires_at: 1060,
        }
    }

    fn want() -> Expected<'static> {
        Expected {
            cluster: "edge",
            device: "van-1",
            service: Service::Kube,
            requester: Some("gw-a"),
            holder: Some("gw-b"),
        }
    }

    #[test]
    fn a_ticket_is_taken_once_and_only_as_issued() {
        let k = key();
        let pubkey = k.public_key().as_ref().to_vec();
        let t = DialTicket::issue(&claims("t1"), |m| k.sign(m).as_ref().to_vec());
        let guard = ReplayGuard::default();
        let c = guard.admit(Some(&t), &pubkey, &want(), 1010).unwrap();
        assert_eq!(c.user, "alice");
        assert_eq!(
            guard.admit(Some(&t), &pubkey, &want(), 1011),
            Err(TicketError::Replayed)
        );
        assert_eq!(
            guard.admit(None, &pubkey, &want(), 1011),
            Err(TicketError::Missing)
        );
        // Another device, service, requester or holder: refused before it is taken.
        let t2 = DialTicket::issue(&claims("t2"), |m| k.sign(m).as_ref().to_vec());
        for w in [
            Expected {
                device: "van-2",
                ..want()
            },
            Expected {
                service: Service::Ssh,
                ..want()
            },
            Expected {
                requester: Some("gw-x"),
                ..want()
            },
            Expected {
                holder: Some("gw-x"),
                ..want()
            },
            Expected {
                cluster: "other",
                ..want()
            },
        ] {
            assert!(guard.admit(Some(&t2), &pubkey, &w, 1010).is_err(), "{w:?}");
        }
        // Expired, and too early.
        assert!(matches!(
            guard.admit(Some(&t2), &pubkey, &want(), 1060 + CLOCK_SKEW_SECS + 1),
            Err(TicketError::Expired(_))
        ));
        assert!(matches!(
            guard.admit(Some(&t2), &pubkey, &want(), 1000 - CLOCK_SKEW_SECS - 1),
            Err(TicketError::NotYetValid(_))
        ));
        guard.admit(Some(&t2), &pubkey, &want(), 1010).unwrap();
    }

    #[test]
    fn altered_or_foreign_tickets_are_refused() {
        let (k, other) = (key(), key());
        let pubkey = k.public_key().as_ref().to_vec();
        let mut t = DialTicket::issue(&claims("t1"), |m| k.sign(m).as_ref().to_vec());
        let forged = DialTicket::issue(&claims("t1"), |m| other.sign(m).as_ref().to_vec());
        assert_eq!(forged.verify(&pubkey), Err(TicketError::BadSignature));
        let mut c = claims("t1");
        c.user = "root".into();
        t.claims = postcard::to_stdvec(&c).unwrap();
        assert_eq!(t.verify(&pubkey), Err(TicketError::BadSignature));
        // A long life claimed by the signer is capped at the ticket lifetime.
        let mut long = claims("t3");
        long.expires_at = long.issued_at + 3600;
        let t = DialTicket::issue(&long, |m| k.sign(m).as_ref().to_vec());
        let guard = ReplayGuard::default();
        assert!(matches!(
            guard.admit(Some(&t), &pubkey, &want(), 1000 + 600),
            Err(TicketError::Expired(_))
        ));
    }

    #[test]
    fn during_a_rotation_either_host_ca_admits_a_ticket_once() {
        let (old, new, other) = (key(), key(), key());
        let raw = |k: &Ed25519KeyPair| k.public_key().as_ref().to_vec();
        let both = [raw(&old), raw(&new)];
        let guard = ReplayGuard::default();
        let by_new = DialTicket::issue(&claims("r1"), |m| new.sign(m).as_ref().to_vec());
        let by_old = DialTicket::issue(&claims("r2"), |m| old.sign(m).as_ref().to_vec());
        guard
            .admit_any(Some(&by_new), &both, &want(), 1000)
            .unwrap();
        guard
            .admit_any(Some(&by_old), &both, &want(), 1000)
            .unwrap();
        assert_eq!(
            guard.admit_any(Some(&by_new), &both, &want(), 1000),
            Err(TicketError::Replayed)
        );
        let foreign = DialTicket::issue(&claims("r3"), |m| other.sign(m).as_ref().to_vec());
        assert_eq!(
            guard.admit_any(Some(&foreign), &both, &want(), 1000),
            Err(TicketError::BadSignature)
        );
        // After standby only the new CA is trusted.
        let by_old = DialTicket::issue(&claims("r4"), |m| old.sign(m).as_ref().to_vec());
        assert_eq!(
            guard.admit_any(Some(&by_old), &[raw(&new)], &want(), 1000),
            Err(TicketError::BadSignature)
        );
    }
}
