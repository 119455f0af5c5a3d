//! What each path answers: a pure function of the request line and the telemetry.

use super::super::telemetry::Telemetry;

/// A response: status, content type, body.
#[derive(Debug, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

const TEXT: &str = "text/plain; charset=utf-8";
const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

fn text(status: u16, body: impl Into<String>) -> Reply {
    Reply {
        status,
        content_type: TEXT,
        body: body.into(),
    }
}

/// The reply to `method path` (the path without its query).
pub fn route(method: &str, path: &str, telemetry: &Telemetry) -> Reply {
    let known = matches!(path, "/metrics" | "/healthz");
    if known && method != "GET" && method != "HEAD" {
        return text(405, "only GET is served here\n");
    }
    match path {
        "/metrics" => Reply {
            status: 200,
            content_type: PROMETHEUS,
            body: super::super::prometheus::render(telemetry),
        },
        "/healthz" => {
            let why = telemetry.unhealthy_reasons();
            if why.is_empty() {
                text(200, "ok\n")
            } else {
                text(503, why.join("\n") + "\n")
            }
        }
        _ => text(404, "not found; try /metrics or /healthz\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_methods_and_health() {
        let t = Telemetry::new();
        assert_eq!(route("GET", "/nope", &t).status, 404);
        assert_eq!(route("POST", "/metrics", &t).status, 405);
        let m = route("GET", "/metrics", &t);
        assert_eq!((m.status, m.content_type), (200, PROMETHEUS));
        assert!(m.body.contains("cras_alarms_total 0"), "{}", m.body);
        // No model loaded yet: not healthy, and the body says so.
        let h = route("GET", "/healthz", &t);
        assert_eq!(h.status, 503);
        assert!(h.body.contains("model"), "{}", h.body);
        t.model_loaded
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(route("HEAD", "/healthz", &t), text(200, "ok\n"));
    }
}
