//! Audit of Kubernetes requests through the front door.
//!
//! [`audit_kube_event`] is the one hook every Kubernetes event goes through: it logs the
//! event and queues it for the authority's audit log (`crate::audit::emit`).

/// One event: a request (with its response status) or the start/end of an upgraded
/// session (exec, attach, port-forward).
#[derive(Clone, Debug)]
pub struct KubeAuditEvent {
    pub kind: KubeEventKind,
    pub user: String,
    /// The Kubernetes identity the device impersonates.
    pub kube_user: String,
    pub groups: Vec<String>,
    pub cluster: String,
    pub device: String,
    pub verb: String,
    /// Path inside the cluster (without `/k8s/CLUSTER`), no query string.
    pub path: String,
    /// HTTP status (0 when the request never got an answer).
    pub status: u16,
    pub client_addr: String,
    pub session_id: String,
    /// Bytes in each direction (session end only).
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Why the gateway refused the request (`kube.refused` only).
    pub error: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KubeEventKind {
    Request,
    /// A request from a user whose certificate the front door accepted, refused before it
    /// reached a device: a lock, an unknown cluster, or the authority's refusal.
    Refused,
    SessionStart,
    SessionEnd,
}

impl KubeEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KubeEventKind::Request => "kube.request",
            KubeEventKind::Refused => "kube.refused",
            KubeEventKind::SessionStart => "kube.session.start",
            KubeEventKind::SessionEnd => "kube.session.end",
        }
    }
}

/// THE audit hook for Kubernetes events: a log line, and an event in the audit log.
pub fn audit_kube_event(ev: &KubeAuditEvent) {
    let mut a = edgeport_proto::audit::AuditEvent::new(ev.kind.as_str(), now_ms());
    a.user = ev.user.clone();
    a.session_id = ev.session_id.clone();
    let f = &mut a.fields;
    f.insert("kube_user".into(), ev.kube_user.clone());
    f.insert("groups".into(), ev.groups.join(","));
    f.insert("cluster".into(), ev.cluster.clone());
    f.insert("device".into(), ev.device.clone());
    f.insert("verb".into(), ev.verb.clone());
    f.insert("path".into(), ev.path.clone());
    f.insert("status".into(), ev.status.to_string());
    f.insert("client_addr".into(), ev.client_addr.clone());
    if ev.kind == KubeEventKind::SessionEnd {
        f.insert("bytes_up".into(), ev.bytes_up.to_string());
        f.insert("bytes_down".into(), ev.bytes_down.to_string());
    }
    if !ev.error.is_empty() {
        f.insert("error".into(), ev.error.clone());
    }
    crate::audit::emit(a);
    tracing::info!(
        event = ev.kind.as_str(),
        user = %ev.user,
        kube_user = %ev.kube_user,
        groups = %ev.groups.join(","),
        cluster = %ev.cluster,
        device = %ev.device,
        verb = %ev.verb,
        path = %ev.path,
        status = ev.status,
        client = %ev.client_addr,
        session = %ev.session_id,
        bytes_up = ev.bytes_up,
        bytes_down = ev.bytes_down,
        error = %ev.error,
        "kubernetes"
    );
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A request path as the API server reads it (percent-decoded, as Go's `URL.Path`): what
/// the audit log names, so that `kube%2Dsystem` is logged as the `kube-system` it reaches.
pub fn api_path(path: &str) -> String {
    edgeport_proto::percent::decode(path, false)
}

/// Whether the API server takes the request as a watch: its first `watch` parameter, read
/// as the API server converts a query parameter to a bool (anything but `0` and `false`,
/// in any case, is true; `watch` alone too).
fn watch_param(query: Option<&str>) -> bool {
    let Some(q) = query else { return false };
    q.split('&')
        .find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (edgeport_proto::percent::decode(k, true) == "watch")
                .then(|| edgeport_proto::percent::decode(v, true))
        })
        .is_some_and(|v| v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// The Kubernetes verb of a request, as the API server's audit log names it. `path` is the
/// decoded path ([`api_path`]).
pub fn verb(method: &http::Method, path: &str, query: Option<&str>) -> String {
    let watch = watch_param(query) || path.contains("/watch/");
    // /api/v1/namespaces/NS/pods -> collection; .../pods/NAME -> one object.
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let after_version = match segs.first() {
        Some(&"api") => 2,
        Some(&"apis") => 3,
        _ => usize::MAX,
    };
    let rest = segs.len().saturating_sub(after_version);
    let rest = if segs.get(after_version) == Some(&"namespaces") && rest > 2 {
        rest - 2
    } else {
        rest
    };
    // Deeper paths (pods/NAME/log, pods/NAME/exec) are subresources of one object.
    let collection = after_version != usize::MAX && rest == 1;
    match *method {
        http::Method::GET | http::Method::HEAD if watch => "watch".into(),
        http::Method::GET | http::Method::HEAD if collection => "list".into(),
        http::Method::GET | http::Method::HEAD => "get".into(),
        http::Method::POST => "create".into(),
        http::Method::PUT => "update".into(),
        http::Method::PATCH => "patch".into(),
        http::Method::DELETE if collection => "deletecollection".into(),
        http::Method::DELETE => "delete".into(),
        ref m => m.as_str().to_ascii_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs() {
        let g = http::Method::GET;
        assert_eq!(verb(&g, "/api/v1/namespaces/default/pods", None), "list");
        assert_eq!(verb(&g, "/api/v1/namespaces/default/pods/p1", None), "get");
        assert_eq!(
            verb(&g, "/api/v1/namespaces/default/pods", Some("watch=true")),
            "watch"
        );
        assert_eq!(verb(&g, "/api/v1/namespaces", None), "list");
        assert_eq!(verb(&g, "/api/v1/namespaces/default", None), "get");
        assert_eq!(verb(&g, "/apis/apps/v1/deployments", None), "list");
        assert_eq!(
            verb(&http::Method::POST, "/api/v1/namespaces/default/pods", None),
            "create"
        );
        assert_eq!(verb(&g, "/version", None), "get");
        assert_eq!(
            verb(
                &g,
                "/api/v1/namespaces/default/pods/p/exec",
                Some("command=sh")
            ),
            "get"
        );
        // As the API server parses the parameter (first one wins; only 0 and false are no).
        for q in [
            "watch=True",
            "watch=t",
            "watch",
            "watch=",
            "w%61tch=1",
            "watch=1&watch=0",
        ] {
            assert_eq!(verb(&g, "/api/v1/pods", Some(q)), "watch", "{q}");
        }
        for q in [
            "watch=false",
            "watch=FALSE",
            "watch=0",
            "watchx=1",
            "x=watch",
        ] {
            assert_eq!(verb(&g, "/api/v1/pods", Some(q)), "list", "{q}");
        }
        assert_eq!(
            api_path("/api/v1/namespaces/kube%2Dsystem/pods/p/%65xec"),
            "/api/v1/namespaces/kube-system/pods/p/exec"
        );
    }
}
