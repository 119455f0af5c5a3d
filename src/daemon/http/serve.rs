//! The accept loop and one connection, on the HTTP thread's tokio runtime.

use super::routes::{Reply, Sources, route};
use super::{CONNECTION_TIME, HEADER_TIMEOUT, MAX_CONNECTIONS, MAX_HEADER_BYTES};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, oneshot};

/// How long accepting pauses after an error such as running out of file descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one log line per this long about accept errors (they come in floods).
const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

pub async fn accept_loop(
    listener: std::net::TcpListener,
    sources: Arc<Sources>,
    mut stop: oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("http: cannot serve: {e}");
            return;
        }
    };
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut last_error_log: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut stop => return,
        };
        match accepted {
            Ok((socket, _)) => match permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    let sources = sources.clone();
                    tokio::spawn(async move {
                        connection(socket, sources).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    // Closing it at once is the cheapest answer; the limit is logged
                    // through the counter, not per connection.
                    sources
                        .telemetry
                        .http_refused
                        .fetch_add(1, Ordering::Relaxed);
                }
            },
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS and friends: the listener stays, we wait a little.
                sources
                    .telemetry
                    .http_accept_errors
                    .fetch_add(1, Ordering::Relaxed);
                if last_error_log.is_none_or(|at| at.elapsed() >= ERROR_LOG_EVERY) {
                    tracing::warn!("http: cannot accept a connection ({e}); retrying");
                    last_error_log = Some(Instant::now());
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

async fn connection(socket: tokio::net::TcpStream, sources: Arc<Sources>) {
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let (method, path) = (req.method().to_string(), req.uri().path().to_string());
        let head_only = req.method() == hyper::Method::HEAD;
        let sources = sources.clone();
        async move {
            let reply = tokio::task::spawn_blocking(move || route(&method, &path, &sources))
                .await
                .unwrap_or_else(|_| Reply {
                    status: 500,
                    content_type: "text/plain; charset=utf-8",
                    body: b"internal error\n".to_vec(),
                });
            Ok::<_, Infallible>(response(reply, head_only))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    let conn = builder.serve_connection(TokioIo::new(socket), service);
    // Errors (a client gone, a header too large, a timeout) end only this connection.
    let _ = tokio::time::timeout(CONNECTION_TIME, conn).await;
}

fn response(reply: Reply, head_only: bool) -> hyper::Response<Full<Bytes>> {
    let body = if head_only {
        Bytes::new()
    } else {
        Bytes::from(reply.body)
    };
    let mut response = hyper::Response::new(Full::new(body));
    *response.status_mut() = hyper::StatusCode::from_u16(reply.status)
        .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(reply.content_type),
    );
    response
}
