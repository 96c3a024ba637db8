//! Entry points for fuzzing what the gateway parses of network input itself (the framed
//! protocols are fuzzed in `edgeport_proto::fuzz_entry`). The cargo-fuzz targets in `fuzz/`
//! and the proptest harness in `gateway/tests/fuzz_entries.rs` call these.

use crate::kube::{audit::verb, head_size, scrub_headers, split_path, MAX_HEAD};

/// The Kubernetes front door's handling of a request head, after TLS: parsed as hyper parses
/// HTTP/1 (httparse, the same crate), then what `kube::handle` and `kube::forward` do with
/// it before any IO: the size bound, the `/k8s/CLUSTER/...` split, the audit verb, and the
/// header scrub. What must hold: nothing panics, no impersonation or credentials header
/// survives the scrub, and the cluster name never contains a slash.
pub fn kube_request_head(data: &[u8]) {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = req.parse(data) else {
        return;
    };
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return;
    };
    let Ok(method) = http::Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let Ok(uri) = path.parse::<http::Uri>() else {
        return;
    };
    let mut map = http::HeaderMap::new();
    for h in req.headers.iter() {
        let (Ok(k), Ok(v)) = (
            http::header::HeaderName::from_bytes(h.name.as_bytes()),
            http::header::HeaderValue::from_bytes(h.value),
        ) else {
            return;
        };
        map.append(k, v);
    }
    if head_size(&uri, &map) > MAX_HEAD {
        return;
    }
    let Some((cluster, inner)) = split_path(uri.path()) else {
        return;
    };
    assert!(!cluster.contains('/'));
    let _ = verb(&method, inner, uri.query());
    let upgrade = edgeport_proto::proxy_headers::is_upgrade(&map);
    scrub_headers(&mut map, upgrade);
    assert!(!map.contains_key(http::header::AUTHORIZATION));
    assert!(!map.keys().any(|k| k.as_str().starts_with("impersonate-")));
    assert_eq!(
        map.get(http::header::HOST).map(|v| v.as_bytes()),
        Some(&b"kubernetes"[..])
    );
}

/// The fuzz targets of this crate, by name (as in `fuzz/fuzz_targets/`).
pub const TARGETS: &[edgeport_proto::fuzz_entry::Target] = &[("kube_head", kube_request_head)];
