//! Serving an axum [`Router`] over TCP (or TLS) with every connection bounded: cloudcore's
//! API and edgecore's MetaServer use it instead of `axum::serve`, which sets no timeout.
//!
//! - **Headers**: a client has [`HttpLimits::header_read_timeout`] to send a request's
//!   headers (hyper's HTTP/1 `header_read_timeout`; the connection is closed after it), and
//!   [`HttpLimits::tls_handshake_timeout`] for a TLS handshake.
//! - **Bodies**: a request whose `Content-Length` is over [`HttpLimits::max_body_bytes`] is
//!   answered `413 Request Entity Too Large` (a Kubernetes `Status`, reason
//!   `RequestEntityTooLarge`) without reading it; bodies without a length are bounded by the
//!   handlers that read them (`replication::api::MAX_BODY_BYTES`, ServiceBus's limit). A body
//!   that sends nothing for [`HttpLimits::body_idle_timeout`] fails (tower-http's
//!   `TimeoutBody`, reset at every frame) and the request is answered `408 Request Timeout`
//!   (a `Status`, reason `Timeout`), whatever the handler made of the failed body.
//! - **Connections**: at most [`HttpLimits::max_connections`] at once; beyond it new ones wait
//!   in the listener's backlog (a warning once per minute) until one closes. Dead peers are
//!   found by TCP keepalive (60 s idle, then 3 probes 10 s apart) and, on HTTP/2, by pings
//!   (every 30 s, 20 s to answer).
//!
//! Handlers see the client's address as axum's `ConnectInfo<SocketAddr>`. Upgrades (exec, attach, port-forward over SPDY or WebSocket) work as with `axum::serve`;
//! long requests (watches, `logs -f`) have no overall deadline.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Request, Response, StatusCode};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tower::ServiceExt;
use tower_http::timeout::{TimeoutBody, TimeoutError};

/// The bounds of one HTTP server.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Time to send a request's headers, from the connection's start or the previous
    /// response (default 30 s, hyper's own default when a timer is set).
    pub header_read_timeout: Duration,
    /// Longest silence within a request body (default 30 s).
    pub body_idle_timeout: Duration,
    /// Time to complete a TLS handshake (default 10 s).
    pub tls_handshake_timeout: Duration,
    /// Connections served at once (default 4096).
    pub max_connections: usize,
    /// Largest `Content-Length` let through to the router (default 4 MiB).
    pub max_body_bytes: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_read_timeout: Duration::from_secs(30),
            body_idle_timeout: Duration::from_secs(30),
            tls_handshake_timeout: Duration::from_secs(10),
            max_connections: 4096,
            max_body_bytes: 4 << 20,
        }
    }
}

/// The 413 of a body over `max` bytes: a Kubernetes `Status` (kubectl prints its message).
pub fn too_large(max: usize) -> Response<Body> {
    status_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        "RequestEntityTooLarge",
        &format!("the request body is larger than {max} bytes"),
    )
}

/// A Kubernetes `Status` (`v1`, `status: Failure`) with `code`, `reason` and `message`.
fn status_response(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let status = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    let mut response = Response::new(Body::from(status.to_string()));
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Serves `router` on `listener` until `shutdown` completes; then stops accepting and drops
/// the connections still open. With `tls`, each connection is a TLS handshake first.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut connections = JoinSet::new();
    let mut warned: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        if permits.available_permits() == 0
            && warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60))
        {
            tracing::warn!(
                max = limits.max_connections,
                local = ?listener.local_addr().ok(),
                "HTTP connection limit reached: new connections wait until one closes"
            );
            warned = Some(Instant::now());
        }
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            () = &mut shutdown => return,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let _ = tcp.set_nodelay(true);
        // A peer that vanished (a node powered off mid-watch) is found by TCP keepalive
        // rather than by a write failing a quarter of an hour later.
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(60))
            .with_interval(Duration::from_secs(10))
            .with_retries(3);
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
        let router = router.clone();
        let limits = limits.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            let _permit = permit;
            let for_requests = limits.clone();
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let router = router.clone();
                let limits = for_requests.clone();
                async move { Ok::<_, Infallible>(handle(router, &limits, peer, request).await) }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            // HTTP/2 (kubectl over TLS) has no header timeout in hyper: pings find dead peers.
            builder
                .http2()
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(20));
            let served = match tls {
                Some(acceptor) => {
                    let stream = match tokio::time::timeout(
                        limits.tls_handshake_timeout,
                        acceptor.accept(tcp),
                    )
                    .await
                    {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await
                }
                None => {
                    builder
                        .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                        .await
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "HTTP connection ended");
            }
        });
    }
}

async fn handle(
    router: Router,
    limits: &HttpLimits,
    peer: SocketAddr,
    mut request: Request<Incoming>,
) -> Response<Body> {
    let length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if length.is_some_and(|n| n > limits.max_body_bytes as u64) {
        tracing::info!(method = %request.method(), path = %request.uri().path(), length = ?length, "request body too large: 413");
        return too_large(limits.max_body_bytes);
    }
    // As `axum::serve(...).into_make_service_with_connect_info()` does.
    request.extensions_mut().insert(ConnectInfo(peer));
    let timed_out = Arc::new(AtomicBool::new(false));
    let request = request.map(|body| {
        Body::new(IdleBody {
            inner: Box::pin(TimeoutBody::new(limits.body_idle_timeout, body)),
            timed_out: timed_out.clone(),
        })
    });
    let response = match router.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    if timed_out.load(Ordering::Relaxed) {
        return status_response(
            StatusCode::REQUEST_TIMEOUT,
            "Timeout",
            &format!(
                "the request body sent nothing for {:?}",
                limits.body_idle_timeout
            ),
        );
    }
    response
}

/// A request body that notes whether it failed by its idle timeout.
struct IdleBody {
    inner: Pin<Box<TimeoutBody<Incoming>>>,
    timed_out: Arc<AtomicBool>,
}

impl http_body::Body for IdleBody {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = self.inner.as_mut().poll_frame(cx);
        if let Poll::Ready(Some(Err(e))) = &polled {
            if e.is::<TimeoutError>() {
                self.timed_out.store(true, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
