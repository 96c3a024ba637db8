//! What every daemon's `--metrics-addr` shares (feature `metrics`): the metric types with one
//! label, the build info, and the small HTTP server that answers `GET /metrics` in the
//! Prometheus text format (0.0.4). Each daemon keeps its own metrics in a static and
//! registers them into a [`Registry`] from [`registry`] when it serves them.
//!
//! The endpoint takes no credentials, so it is built to be safe to anyone who can reach it:
//! it serves only `GET /metrics` (and `HEAD`), one request per connection, at most
//! [`MAX_CONNECTIONS`] at once (more are closed at once), a request must arrive within
//! [`READ_DEADLINE`] and the whole exchange end within [`CONNECTION_DEADLINE`]. The metrics
//! themselves name no user, device or secret: labels are fixed words (transports, results,
//! RPC methods).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::gauge::Gauge;
pub use prometheus_client::metrics::histogram::Histogram;
pub use prometheus_client::registry::Registry;

/// One label, its name and value both fixed words (`[("result", "ok")]`).
pub type Label = [(&'static str, &'static str); 1];
/// A counter per value of one label.
pub type CounterBy = Family<Label, Counter>;
/// A gauge per value of one label.
pub type GaugeBy = Family<Label, Gauge>;
/// A histogram per value of one label.
pub type HistogramBy = Family<Label, Histogram, fn() -> Histogram>;

/// Connections served at once; more are closed without a word.
pub const MAX_CONNECTIONS: usize = 4;
/// How long a client may take to send its request head.
pub const READ_DEADLINE: Duration = Duration::from_secs(5);
/// How long one connection may last, request and answer.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);

/// Seconds, from 1 ms to about 16 s (doubling): RPCs, stream opens.
pub fn latency() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 15,
    ))
}

/// A [`HistogramBy`] with [`latency`] buckets.
pub fn latency_by() -> HistogramBy {
    Family::new_with_constructor(latency as fn() -> Histogram)
}

/// The commit the binary was built from: `EDGEPORT_GIT_COMMIT` at build time (release
/// builds set it, `cross/build` does), `unknown` otherwise.
pub fn git_commit() -> &'static str {
    match option_env!("EDGEPORT_GIT_COMMIT") {
        Some(c) if !c.is_empty() => c,
        _ => "unknown",
    }
}

/// A registry holding `edgeport_build_info{component, version, commit} 1`.
pub fn registry(component: &'static str) -> Registry {
    let mut r = Registry::default();
    let info: Family<[(&'static str, &'static str); 3], Gauge> = Family::default();
    info.get_or_create(&[
        ("component", component),
        ("version", edgeport_proto::VERSION),
        ("commit", git_commit()),
    ])
    .set(1);
    r.register(
        "edgeport_build_info",
        "Always 1: the component, its version and the commit it was built from",
        info,
    );
    r
}

/// The registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        tracing::warn!("cannot encode the metrics: {e}");
    }
    out
}

/// Listens on `addr` and serves `registry` at `/metrics` until `shutdown`. Returns the bound
/// address (port 0 picks one) once listening; a busy address is an error here, at start.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(accept_loop(listener, Arc::new(registry), shutdown));
    Ok(local)
}

async fn accept_loop(listener: TcpListener, registry: Arc<Registry>, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => return,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::debug!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Closed at once past the cap: a scraper retries at its next interval.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = hyper::service::service_fn(move |req| {
                let registry = registry.clone();
                async move { Ok::<_, Infallible>(answer(&req, &registry)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(READ_DEADLINE)
                .keep_alive(false)
                .serve_connection(TokioIo::new(tcp), svc);
            match tokio::time::timeout(CONNECTION_DEADLINE, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!("metrics: connection ended: {e}"),
                Err(_) => tracing::debug!("metrics: connection took too long; closed"),
            }
        });
    }
}

fn answer(req: &Request<Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    let (status, content_type, body) = if req.uri().path() != "/metrics" {
        (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics\n".to_string(),
        )
    } else if req.method() != Method::GET && req.method() != Method::HEAD {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".to_string(),
        )
    } else {
        (
            StatusCode::OK,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            render(registry),
        )
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        // A connection closed past the cap may come back as a reset: what came is the answer.
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn serves_metrics_and_refuses_the_rest() {
        let mut r = registry("test");
        let dials = CounterBy::default();
        dials.get_or_create(&[("result", "ok")]).inc();
        r.register("edgeport_test_dials", "Dials", dials);
        let shutdown = CancellationToken::new();
        let addr = serve("127.0.0.1:0".parse().unwrap(), r, shutdown.clone())
            .await
            .unwrap();
        let ok = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(
            ok.contains("edgeport_test_dials_total{result=\"ok\"} 1"),
            "{ok}"
        );
        assert!(
            ok.contains("edgeport_build_info{component=\"test\""),
            "{ok}"
        );
        let other = get(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        let post = get(addr, "POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn silent_clients_are_capped_and_cut() {
        let shutdown = CancellationToken::new();
        let addr = serve(
            "127.0.0.1:0".parse().unwrap(),
            registry("test"),
            shutdown.clone(),
        )
        .await
        .unwrap();
        let mut silent = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /metr").await.unwrap();
            silent.push(s);
        }
        // Accepted in order: the connection past the cap is closed without an answer.
        let extra = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(extra.is_empty(), "{extra}");
        // The silent ones are cut at the read deadline, and the slots come back.
        for mut s in silent {
            let mut buf = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut buf));
            read.await.expect("cut by the server").ok();
            assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
        }
        let ok = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        shutdown.cancel();
    }
}
