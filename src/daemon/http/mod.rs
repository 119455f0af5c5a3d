//! The integrator's HTTP endpoints: `/metrics` (Prometheus text), `/healthz` (200
//! only when every camera is running and a model is loaded; the body says why not),
//! `/cameras/<id>/latest.jpg` (the last judged frame, drawn) and `/evidence/...` (the
//! evidence store's files, read-only, no listing).
//!
//! Served by hyper on a single-threaded tokio runtime in its own thread, with bounds a
//! misbehaving or hostile local client cannot get past: [`MAX_CONNECTIONS`] at once
//! (more are closed at once and counted), request headers within [`MAX_HEADER_BYTES`]
//! and [`HEADER_TIMEOUT`], every connection closed after [`CONNECTION_TIME`]. Running
//! out of file descriptors pauses accepting; it never ends the server.

mod routes;
mod serve;

use super::config::Invalid;
use super::operator::gallery::Gallery;
use super::telemetry::Telemetry;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Connections served at once; the rest are closed on accept.
pub const MAX_CONNECTIONS: usize = 128;
/// Request line and headers together (hyper's smallest buffer is 8 KiB).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Time for a client to send a request's headers, the first or the next on a kept-alive
/// connection.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Threads answering requests (a JPEG encode or a file read may take milliseconds);
/// requests beyond them wait their turn.
pub const BLOCKING_THREADS: usize = 2;
/// The longest a connection lives, however slowly its client reads.
pub const CONNECTION_TIME: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of /metrics and /healthz.
    #[serde(default = "default_listen")]
    pub listen: String,
}

fn default_listen() -> String {
    "127.0.0.1:9464".into()
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_listen(),
        }
    }
}

impl HttpConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        self.listen.parse::<std::net::SocketAddr>().map_err(|_| {
            Invalid::new(
                "http.listen",
                format!("`{}` is not an address like 127.0.0.1:9464", self.listen),
            )
        })?;
        Ok(())
    }
}

/// Why the HTTP endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("http.listen {listen}: cannot listen: {reason}")]
    Listen { listen: String, reason: String },
    #[error("cannot start the http thread: {0}")]
    Thread(std::io::Error),
}

pub struct HttpServer {
    pub addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Binds `listen` (errors are the caller's, at start) and serves in a thread.
    pub fn start(
        listen: &str,
        telemetry: Arc<Telemetry>,
        gallery: Arc<Gallery>,
    ) -> Result<HttpServer, HttpError> {
        let refused = |e: std::io::Error| HttpError::Listen {
            listen: listen.to_string(),
            reason: e.to_string(),
        };
        let listener = std::net::TcpListener::bind(listen).map_err(refused)?;
        listener.set_nonblocking(true).map_err(refused)?;
        let addr = listener.local_addr().map_err(refused)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .max_blocking_threads(BLOCKING_THREADS)
            .build()
            .map_err(HttpError::Thread)?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("http".into())
            .spawn(move || {
                let sources = Arc::new(routes::Sources { telemetry, gallery });
                runtime.block_on(serve::accept_loop(listener, sources, stopped))
            })
            .map_err(HttpError::Thread)?;
        Ok(HttpServer {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        // Ends the accept loop; the runtime, dropped with the thread, closes every
        // connection still open.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
