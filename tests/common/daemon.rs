//! Real parts for the daemon tests: the `cras run` process and a small inspection line
//! (numbered frames from `cras synth`, the Lite0 fixture model, thresholds placed
//! between the scores `cras infer` gives the good and the defective frames). The broker
//! and subscriber are in `mqtt.rs`, re-exported here.

pub use super::mqtt::*;
use super::*;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running `cras run`; its stderr goes to `log`.
pub struct Daemon {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `cras run`; the templates are `pipelines/` beside the config when the test
    /// made one, else the shipped ones.
    pub fn start(config: &Path, log: &Path, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_under(&[], config, log, env)
    }

    /// `cras run` as the last arguments of `wrapper` (a sandbox, a tracer); with an empty
    /// wrapper, as `start`.
    pub fn start_under(
        wrapper: &[&str],
        config: &Path,
        log: &Path,
        env: &[(&str, &str)],
    ) -> Daemon {
        let beside = config.parent().unwrap().join("pipelines");
        let pipelines = if beside.is_dir() {
            beside
        } else {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines")
        };
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = std::process::Command::new(first);
                c.args(rest).arg(cras_bin());
                c
            }
            None => std::process::Command::new(cras_bin()),
        };
        cmd.args(["run", "--config"])
            .arg(config)
            .arg("--pipelines")
            .arg(&pipelines)
            .env("CRAS_LOG", "info,ort=warn")
            .stdout(Stdio::null())
            .stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Daemon {
            child: Some(cmd.spawn().unwrap()),
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `sig` and waits up to `secs` for the exit; returns the exit code and the
    /// time it took.
    pub fn stop_with(&mut self, sig: &str, secs: f64) -> (Option<i32>, Duration) {
        let mut c = self.child.take().unwrap();
        let t0 = Instant::now();
        signal(c.id(), sig);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return (status.code(), t0.elapsed());
            }
            if t0.elapsed().as_secs_f64() > secs {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "cras run did not exit within {secs} s of SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        let mut c = self.child.take().unwrap();
        signal(c.id(), "KILL");
        let _ = c.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- cras run log ({}):\n{}",
                self.log.display(),
                self.log_text()
            );
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// GET on the daemon's HTTP endpoint: (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let (status, _, body) = http_get_bytes(port, path)?;
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// GET on the daemon's HTTP endpoint, the path sent as it is: (status, content type, body).
pub fn http_get_bytes(port: u16, path: &str) -> Option<(u16, String, Vec<u8>)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    Some((status, content_type, raw[split + 4..].to_vec()))
}

/// The value of an unlabelled or labelled sample in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A small inspection line: numbered frames (good and defective interleaved), the model,
/// and the image threshold that separates them.
pub struct Line {
    pub frames: PathBuf,
    pub model: PathBuf,
    /// Per frame file (in playing order): is its score at or above the threshold?
    pub defective: Vec<bool>,
    pub threshold: f32,
    pub pixel_threshold: f32,
}

/// Builds the line in `dir`: `cras synth` frames, the Lite0 fixture model, and a
/// threshold in the widest gap of the scores `cras infer` gives (so that the expected
/// verdict of every frame is known from an independent path).
pub fn line(dir: &Path) -> Line {
    let syn = dir.join("syn");
    let (code, _, err) = cras(&[
        "synth",
        "--out",
        syn.to_str().unwrap(),
        "--classes",
        "1",
        "--train",
        "1",
        "--test-good",
        "4",
        "--test-defect",
        "2",
        "--size",
        "128",
        "--seed",
        "1",
    ]);
    assert_eq!(code, 0, "{err}");
    let model = lite0_bundle(dir, "model");
    let t = syn.join("stripes/test");
    let order = [
        "good/000",
        "missing/000",
        "good/001",
        "scratch/000",
        "good/002",
        "spot/001",
        "good/003",
        "missing/001",
    ];
    let frames = dir.join("frames");
    std::fs::create_dir_all(&frames).unwrap();
    let mut files = Vec::new();
    for (i, name) in order.iter().enumerate() {
        let dst = frames.join(format!("{i:05}.png"));
        std::fs::copy(t.join(format!("{name}.png")), &dst).unwrap();
        files.push(dst);
    }
    let mut args = vec![
        "infer".to_string(),
        "--model".into(),
        model.display().to_string(),
        "--out".into(),
        dir.join("infer").display().to_string(),
    ];
    args.extend(files.iter().map(|f| f.display().to_string()));
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let (code, out, err) = cras(&args);
    assert_eq!(code, 0, "{err}");
    let scores: Vec<f32> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["score"]
                .as_f64()
                .unwrap() as f32
        })
        .collect();
    assert_eq!(scores.len(), files.len());
    let mut sorted = scores.clone();
    sorted.sort_by(f32::total_cmp);
    // The widest gap leaving at least two frames on each side.
    let (gap, i) = (2..sorted.len() - 1)
        .map(|i| (sorted[i] - sorted[i - 1], i))
        .fold((0.0f32, 0), |a, b| if b.0 > a.0 { b } else { a });
    assert!(
        gap > 1e-3,
        "scores too close to place a threshold: {sorted:?}"
    );
    let threshold = (sorted[i] + sorted[i - 1]) / 2.0;
    // The pixel threshold: just above the highest map value of the frames below it, so
    // only frames judged anomalous show regions.
    let mut pixel = f32::MIN;
    for (f, s) in files.iter().zip(&scores) {
        if *s < threshold {
            let stem = f.file_stem().unwrap().to_str().unwrap();
            let map = f32s(&dir.join("infer").join(format!("{stem}.map.npy")));
            pixel = pixel.max(map.iter().copied().fold(f32::MIN, f32::max));
        }
    }
    Line {
        frames,
        model,
        defective: scores.iter().map(|s| *s >= threshold).collect(),
        threshold,
        pixel_threshold: pixel + 1e-4,
    }
}

/// A config.yaml for `line` with one folder camera per entry of `cameras`
/// (`(id, pipeline, params)`), written to `dir/config.yaml`.
pub fn write_config(
    dir: &Path,
    line: &Line,
    broker_url: &str,
    http_port: u16,
    cameras: &[(&str, &str, &str)],
    extra_mqtt: &str,
) -> PathBuf {
    let mut cams = String::new();
    for (id, pipeline, params) in cameras {
        cams.push_str(&format!(
            "  - id: {id}\n    pipeline: {pipeline}\n    params: {params}\n    max_fps: 30\n"
        ));
    }
    let yaml = format!(
        "device: {{site: plant1, id: box1}}\n\
         model:\n  bundle: {model}\n  threads: 1\n  thresholds: {{alpha: {{image: {t}, pixel: {p}}}, beta: {{image: {t}, pixel: {p}}}}}\n\
         cameras:\n{cams}\
         batching: {{max_batch: 2, max_wait_ms: 10}}\n\
         mqtt:\n  url: {broker_url}\n  client_id: cras-test\n  health_interval_s: 1\n{extra_mqtt}\
         spool:\n  dir: {spool}\n\
         http: {{listen: \"127.0.0.1:{http_port}\"}}\n",
        model = line.model.display(),
        t = line.threshold,
        p = line.pixel_threshold,
        spool = dir.join("spool").display(),
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// The folder camera's params for `line`.
pub fn folder_params(line: &Line, fps: u32, looping: bool) -> String {
    format!(
        "{{location: \"{}/%05d.png\", fps: {fps}, loop: {looping}}}",
        line.frames.display()
    )
}

/// A NOTIFY_SOCKET for the daemon: its path, and the messages received on it.
pub fn notify_socket(dir: &Path) -> (PathBuf, Arc<Mutex<Vec<String>>>) {
    let path = dir.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let notes = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = notes.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(n) = sock.recv(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    });
    (path, notes)
}

/// Frames judged so far by `camera`, read from /metrics (0 while unreachable).
pub fn frames_processed(http: u16, camera: &str) -> f64 {
    http_get(http, "/metrics")
        .and_then(|(_, m)| {
            metric(
                &m,
                &format!("cras_frames_processed_total{{camera=\"{camera}\"}}"),
            )
        })
        .unwrap_or(0.0)
}

/// The usual set-up: the line, a broker, a subscriber on `cras/#`, and `config.yaml` with
/// one folder camera `cam1` playing the line's frames at `fps`.
pub struct Rig {
    pub line: Line,
    pub broker: Broker,
    pub sub: Subscriber,
    pub http: u16,
    pub config: PathBuf,
}

pub fn folder_rig(dir: &Path, fps: u32, looping: bool, extra_mqtt: &str) -> Rig {
    let line = line(dir);
    let params = folder_params(&line, fps, looping);
    rig_with(
        dir,
        line,
        &[("cam1", "image-sequence", &params)],
        extra_mqtt,
    )
}

/// The line, a broker, a subscriber on `cras/#`, and `config.yaml` with `cameras`
/// (`(id, pipeline, params)`).
pub fn rig_with(dir: &Path, line: Line, cameras: &[(&str, &str, &str)], extra_mqtt: &str) -> Rig {
    let broker = Broker::start(&dir.join("broker"));
    let sub = Subscriber::start(broker.port, "cras/#");
    let http = free_port();
    let config = write_config(dir, &line, &broker.url(), http, cameras, extra_mqtt);
    Rig {
        line,
        broker,
        sub,
        http,
        config,
    }
}

/// Resident memory of process `pid` in KiB (0 once it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
