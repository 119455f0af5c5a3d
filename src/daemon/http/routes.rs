//! What each path answers: a function of the request line, the telemetry and the
//! gallery. Run on the HTTP runtime's blocking threads (it may encode a JPEG or read a
//! file).

use super::super::evidence::files;
use super::super::operator::gallery::{Gallery, Latest};
use super::super::telemetry::Telemetry;

/// A response: status, content type, body.
#[derive(Debug, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

/// What the routes read.
pub struct Sources {
    pub telemetry: std::sync::Arc<Telemetry>,
    pub gallery: std::sync::Arc<Gallery>,
}

const TEXT: &str = "text/plain; charset=utf-8";
const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The largest evidence file served (a 16-bit map or a JPEG of an 8K frame is smaller).
const MAX_EVIDENCE_FILE: u64 = 64 << 20;

fn text(status: u16, body: impl Into<String>) -> Reply {
    Reply {
        status,
        content_type: TEXT,
        body: body.into().into_bytes(),
    }
}

const NOT_FOUND: &str =
    "not found; try /metrics, /healthz, /cameras/<id>/latest.jpg or /evidence/<path>\n";

/// The reply to `method path` (the path without its query).
pub fn route(method: &str, path: &str, s: &Sources) -> Reply {
    if method != "GET" && method != "HEAD" {
        return text(405, "only GET is served here\n");
    }
    match path {
        "/metrics" => Reply {
            status: 200,
            content_type: PROMETHEUS,
            body: super::super::prometheus::render(&s.telemetry).into_bytes(),
        },
        "/healthz" => {
            let why = s.telemetry.unhealthy_reasons();
            let engine = s.telemetry.engine.get().status();
            if why.is_empty() && engine.is_empty() {
                text(200, "ok\n")
            } else if why.is_empty() {
                // Healthy, on another engine than configured or building one.
                text(200, format!("ok\n{engine}\n"))
            } else {
                text(503, why.join("\n") + "\n")
            }
        }
        _ => {
            if let Some(camera) = path
                .strip_prefix("/cameras/")
                .and_then(|p| p.strip_suffix("/latest.jpg"))
            {
                latest(camera, s)
            } else if let Some(rest) = path.strip_prefix("/evidence/") {
                evidence(rest, s)
            } else {
                text(404, NOT_FOUND)
            }
        }
    }
}

fn latest(camera: &str, s: &Sources) -> Reply {
    // Only configured cameras; the id is not echoed back.
    if !s.telemetry.cameras().iter().any(|c| c.id == camera) {
        return text(404, "no such camera\n");
    }
    match s.gallery.latest_jpeg(camera) {
        Latest::Jpeg(jpeg) => Reply {
            status: 200,
            content_type: "image/jpeg",
            body: jpeg.as_ref().clone(),
        },
        Latest::NotYet => text(503, "no frame of this camera judged yet\n"),
        Latest::Failed(e) => {
            tracing::warn!(camera, "latest.jpg: {e}");
            text(
                500,
                "the picture could not be encoded; see the daemon's log\n",
            )
        }
    }
}

fn evidence(rest: &str, s: &Sources) -> Reply {
    let Some(root) = s.gallery.evidence_root() else {
        return text(404, "the evidence store is off (evidence.enabled)\n");
    };
    let Some((path, kind, json)) = files::request(&root, rest) else {
        return text(404, "not a file of the evidence store\n");
    };
    // A set without its JSON is being written, or was cut short by a crash.
    if !json.is_file() {
        return text(
            404,
            "no such evidence (removed by retention, or not complete)\n",
        );
    }
    match files::read_served(&path, MAX_EVIDENCE_FILE) {
        Ok(body) => Reply {
            status: 200,
            content_type: kind.content_type(),
            body,
        },
        Err(_) => text(
            404,
            "no such evidence (removed by retention, or never written)\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn sources() -> Sources {
        Sources {
            telemetry: Arc::new(Telemetry::new()),
            gallery: Arc::new(Gallery::default()),
        }
    }

    #[test]
    fn paths_methods_and_health() {
        let s = sources();
        assert_eq!(route("GET", "/nope", &s).status, 404);
        assert_eq!(route("POST", "/metrics", &s).status, 405);
        let m = route("GET", "/metrics", &s);
        assert_eq!((m.status, m.content_type), (200, PROMETHEUS));
        let body = String::from_utf8(m.body).unwrap();
        assert!(body.contains("cras_alarms_total 0"), "{body}");
        // No model loaded yet: not healthy, and the body says so.
        let h = route("GET", "/healthz", &s);
        assert_eq!(h.status, 503);
        assert!(String::from_utf8(h.body).unwrap().contains("model"));
        s.telemetry
            .model_loaded
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(route("HEAD", "/healthz", &s), text(200, "ok\n"));
    }

    #[test]
    fn latest_and_evidence_refuse_what_is_not_theirs() {
        let s = sources();
        s.telemetry.set_cameras(&["cam1".to_string()]);
        assert_eq!(route("GET", "/cameras/cam2/latest.jpg", &s).status, 404);
        assert_eq!(route("GET", "/cameras/cam1/latest.jpg", &s).status, 503);
        assert_eq!(
            route("GET", "/evidence/2026-11-30/cam1/1.json", &s).status,
            404
        );
        let dir = tempfile::tempdir().unwrap();
        let cam = dir.path().join("2026-11-30/cam1");
        std::fs::create_dir_all(&cam).unwrap();
        std::fs::write(cam.join("1.json"), b"{}").unwrap();
        // A set still being written: its frame is there, its JSON is not.
        std::fs::write(cam.join("3.jpg"), b"jpeg").unwrap();
        std::fs::write(dir.path().join("secret.yaml"), b"x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret.yaml"), cam.join("2.json")).unwrap();
        s.gallery.set_evidence_root(Some(dir.path().to_path_buf()));
        let ok = route("GET", "/evidence/2026-11-30/cam1/1.json", &s);
        assert_eq!(
            (ok.status, ok.content_type, ok.body),
            (200, "application/json", b"{}".to_vec())
        );
        for bad in [
            "/evidence/../secret.yaml",
            "/evidence/2026-11-30/cam1/../../secret.yaml",
            "/evidence/2026-11-30/cam1/",
            "/evidence/2026-11-30/",
            "/evidence/",
            "/evidence/2026-11-30/cam1/2.json",
            "/evidence/2026-11-30/cam1/%2e%2e/1.json",
            "/evidence/2026-11-30/cam1/3.jpg",
        ] {
            assert_eq!(route("GET", bad, &s).status, 404, "{bad}");
        }
    }
}
