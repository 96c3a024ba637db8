//! HTTP proxy header rules shared by the two Kubernetes hops (the gateway's front door and
//! the agent's forwarder): which headers are hop-by-hop and when a request upgrades.

use http::header::{self, HeaderName};
use http::HeaderMap;

/// Hop-by-hop headers (RFC 9110 7.6.1): never forwarded, except `Connection`/`Upgrade` on
/// an upgrade request.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers (and the ones `Connection` names); keeps `Connection` and
/// `Upgrade` when `upgrade` is set.
pub fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::try_from(n.trim()).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        if upgrade && (*n == "connection" || *n == "upgrade") {
            continue;
        }
        h.remove(*n);
    }
}

/// Whether headers ask to upgrade the connection: an `Upgrade` header and `upgrade` among
/// the `Connection` tokens.
pub fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use http::HeaderValue;

    #[test]
    fn hop_by_hop_kept_only_for_upgrades() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade, X-Foo"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-foo", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        let mut h2 = h.clone();
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert!(h.contains_key("upgrade") && h.contains_key("connection"));
        assert!(!h.contains_key("x-foo") && !h.contains_key("te"));
        strip_hop_by_hop(&mut h2, false);
        assert!(h2.is_empty());
    }

    #[test]
    fn upgrade_needs_both_headers() {
        let mut h = HeaderMap::new();
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(!is_upgrade(&h));
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, UPGRADE"),
        );
        assert!(is_upgrade(&h));
        h.remove("upgrade");
        assert!(!is_upgrade(&h));
    }
}
