//! The integrator's HTTP endpoints: `/metrics` (Prometheus text) and `/healthz` (200
//! only when every camera is running and a model is loaded; the body says why not).

use super::config::Invalid;
use super::telemetry::Telemetry;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

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
    #[error("http.listen {0}: not an IP address")]
    NotIp(String),
    #[error("cannot start the http thread: {0}")]
    Thread(std::io::Error),
}

pub struct HttpServer {
    pub addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    pub fn start(listen: &str, telemetry: Arc<Telemetry>) -> Result<HttpServer, HttpError> {
        let server = tiny_http::Server::http(listen).map_err(|e| HttpError::Listen {
            listen: listen.to_string(),
            reason: e.to_string(),
        })?;
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| HttpError::NotIp(listen.to_string()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("http".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    match server.recv_timeout(Duration::from_millis(200)) {
                        Ok(Some(req)) => respond(req, &telemetry),
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!("http: {e}");
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    }
                }
            })
            .map_err(HttpError::Thread)?;
        Ok(HttpServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn respond(req: tiny_http::Request, telemetry: &Telemetry) {
    let path = req.url().split('?').next().unwrap_or("").to_string();
    let text = |body: String, code: u16, kind: &str| {
        let response = tiny_http::Response::from_string(body).with_status_code(code);
        match tiny_http::Header::from_bytes(&b"Content-Type"[..], kind.as_bytes()) {
            Ok(header) => response.with_header(header),
            Err(()) => response,
        }
    };
    let resp = match (req.method(), path.as_str()) {
        (tiny_http::Method::Get, "/metrics") => text(
            super::prometheus::render(telemetry),
            200,
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        (tiny_http::Method::Get, "/healthz") => {
            let why = telemetry.unhealthy_reasons();
            if why.is_empty() {
                text("ok\n".into(), 200, "text/plain; charset=utf-8")
            } else {
                text(why.join("\n") + "\n", 503, "text/plain; charset=utf-8")
            }
        }
        _ => text(
            "not found; try /metrics or /healthz\n".into(),
            404,
            "text/plain; charset=utf-8",
        ),
    };
    let _ = req.respond(resp);
}
