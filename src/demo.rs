//! `cras demo`: the daemon on a synthetic line, from nothing. Installs the run-time
//! assets (`cras setup`), writes a synthetic dataset (`cras synth`), trains and
//! calibrates a small model on it, lays its test images out as a camera folder (good and
//! defective parts in turn, looping), writes a config.yaml pointing at all of it, and
//! runs `cras run` in the foreground. Every step is skipped when its output exists, so
//! a second start is immediate. Works without a broker: alarms wait in the spool.

use crate::path_error::PathError;
use crate::tool_error::{Result, ToolError};
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct DemoOptions {
    pub dir: PathBuf,
    pub broker: String,
    pub http: String,
    pub epochs: usize,
    pub fps: u32,
    /// Port of the operator's live view (0: off).
    pub rtsp_port: u16,
}

/// The shipped capture templates, so the demo folder is self-contained.
pub const TEMPLATES: [(&str, &str); 7] = [
    (
        "test-pattern",
        include_str!("../pipelines/test-pattern.pipeline"),
    ),
    (
        "image-sequence",
        include_str!("../pipelines/image-sequence.pipeline"),
    ),
    (
        "video-file",
        include_str!("../pipelines/video-file.pipeline"),
    ),
    ("v4l2", include_str!("../pipelines/v4l2.pipeline")),
    ("rtsp", include_str!("../pipelines/rtsp.pipeline")),
    (
        "jetson-csi",
        include_str!("../pipelines/jetson-csi.pipeline"),
    ),
    ("gige", include_str!("../pipelines/gige.pipeline")),
];

fn step(cmd: &mut Command, what: &str) -> Result<()> {
    eprintln!("cras demo: {what}");
    let status = cmd.status().map_err(|source| ToolError::Spawn {
        what: what.to_string(),
        source,
    })?;
    if !status.success() {
        return Err(ToolError::Step {
            what: what.to_string(),
            status,
        });
    }
    Ok(())
}

/// Prepares the demo line in `opts.dir`; returns the config file to run.
pub fn prepare(opts: &DemoOptions) -> Result<PathBuf> {
    let me =
        std::env::current_exe().map_err(PathError::on("find", Path::new("the cras executable")))?;
    let dir = &opts.dir;
    std::fs::create_dir_all(dir).map_err(PathError::on("create", dir))?;
    let dir = dir.canonicalize().map_err(PathError::on("resolve", dir))?;
    step(
        Command::new(&me).args(["setup", "--backbone", "efficientnet_lite0"]),
        "installing the onnxruntime library and EfficientNet-Lite0 weights (once)",
    )?;
    let data = dir.join("data");
    if !data.join("stripes").is_dir() {
        step(
            Command::new(&me)
                .args(["synth", "--classes", "2", "--train", "40"])
                .args(["--test-good", "6", "--test-defect", "2", "--size", "128"])
                .arg("--out")
                .arg(&data),
            "writing a synthetic line (2 product classes, 128 px)",
        )?;
    }
    let model = dir.join("model");
    if !model.join("model.yaml").is_file() {
        step(
            Command::new(&me)
                .args(["train", "--backbone", "efficientnet_lite0"])
                .args(["--image-size", "128", "--embed-dim", "128", "--batch", "8"])
                // The small demo line keeps the settings it was tuned with (its operator
                // view's heat is judged against them), not `train`'s default recipe.
                .args(["--normalization", "imagenet", "--val-defect-strength", "1"])
                .args(["--val-defects", "scratch,spot,missing,crack"])
                .args([
                    "--noise-relative",
                    "0.2",
                    "--val-fraction",
                    "0.25",
                    "--seed",
                    "0",
                ])
                .args(["--epochs", &opts.epochs.to_string()])
                .arg("--data")
                .arg(&data)
                .arg("--out")
                .arg(&model)
                .arg("--work")
                .arg(dir.join("train-work")),
            "training a small model on the good images (seconds to a minute)",
        )?;
        step(
            Command::new(&me)
                .args(["calibrate", "--model"])
                .arg(&model)
                .arg("--data")
                .arg(&data),
            "calibrating alarm thresholds on held-out good images",
        )?;
    }
    let frames = dir.join("frames");
    if !frames.join("00000.png").is_file() {
        lay_out_frames(&data, &frames)?;
    }
    let pipelines = dir.join("pipelines");
    std::fs::create_dir_all(&pipelines).map_err(PathError::on("create", &pipelines))?;
    for (name, text) in TEMPLATES {
        let file = pipelines.join(format!("{name}.pipeline"));
        std::fs::write(&file, text).map_err(PathError::on("write", &file))?;
    }
    let config = dir.join("config.yaml");
    let outputs = outputs(opts.rtsp_port);
    std::fs::write(
        &config,
        format!(
            "# The demo line (written by `cras demo`; see the documented config.yaml).\n\
             device: {{site: demo, id: station1}}\n\
             model: {{bundle: model}}\n\
             cameras:\n  - id: cam1\n    pipeline: image-sequence\n    \
             params: {{location: \"{frames}/%05d.png\", fps: {fps}, loop: true}}\n    \
             max_fps: {fps}\n\
             mqtt: {{url: \"{broker}\", client_id: cras-demo, result_rate_hz: 1, health_interval_s: 10}}\n\
             spool: {{dir: spool}}\n\
             http: {{listen: \"{http}\"}}\n\
             {outputs}\
             logging: {{level: info}}\n",
            frames = frames.display(),
            fps = opts.fps,
            broker = opts.broker,
            http = opts.http,
        ),
    )
    .map_err(PathError::on("write", &config))?;
    Ok(config)
}

/// The config lines of the live view and the evidence store: on when this machine has
/// their GStreamer plugins, else off with a line saying which package is missing.
fn outputs(rtsp_port: u16) -> String {
    use crate::daemon::operator::{config::Encoder, still};
    let mut lines = String::new();
    let _ = gstreamer::init();
    match (rtsp_port, Encoder::X264.missing_elements()) {
        (0, _) => {}
        (port, None) => lines.push_str(&format!("rtsp: {{enabled: true, port: {port}}}\n")),
        (_, Some(why)) => eprintln!("cras demo: the live view stays off: {why}"),
    }
    match still::missing_elements() {
        None => lines.push_str("evidence: {enabled: true, dir: evidence}\n"),
        Some(why) => eprintln!("cras demo: the evidence store stays off: {why}"),
    }
    lines
}

/// Numbered frames from the test split: a good part, then a defective one, in turn.
fn lay_out_frames(data: &Path, frames: &Path) -> Result<()> {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for class in crate::dataset::discover_classes(data)? {
        let test = data.join(&class).join("test");
        for e in std::fs::read_dir(&test).map_err(PathError::on("read", &test))? {
            let kind = e.map_err(PathError::on("read", &test))?.path();
            let mut files: Vec<PathBuf> = std::fs::read_dir(&kind)
                .map_err(PathError::on("read", &kind))?
                .filter_map(|f| f.ok().map(|f| f.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "png"))
                .collect();
            files.sort();
            if kind.file_name().is_some_and(|n| n == "good") {
                good.extend(files);
            } else {
                bad.extend(files);
            }
        }
    }
    std::fs::create_dir_all(frames).map_err(PathError::on("create", frames))?;
    let n = good.len().max(bad.len());
    let mut i = 0;
    for k in 0..n {
        for src in [good.get(k), bad.get(k)].into_iter().flatten() {
            std::fs::copy(src, frames.join(format!("{i:05}.png")))
                .map_err(PathError::on("copy", src))?;
            i += 1;
        }
    }
    Ok(())
}

/// What to look at while the demo runs.
pub fn guide(opts: &DemoOptions, config: &Path) -> String {
    let topic = "cras/demo/station1/#";
    let text = std::fs::read_to_string(config).unwrap_or_default();
    let mut out = format!(
        "\ncras demo: the daemon runs on {config} (Ctrl-C stops it; run again to restart at once).\n\
         \x20 verdicts:   the log lines below (ANOMALOUS ... for defective parts)\n\
         \x20 metrics:    curl http://{http}/metrics    health: curl -i http://{http}/healthz\n\
         \x20 MQTT:       mosquitto_sub -h HOST -t '{topic}' -v   (broker {broker})\n\
         \x20             without a broker alarms wait in {spool} and are sent once one is there\n\
         \x20 last frame: http://{http}/cameras/cam1/latest.jpg\n",
        config = config.display(),
        http = opts.http,
        broker = opts.broker,
        spool = opts.dir.join("spool").display(),
    );
    if text.contains("rtsp: {enabled: true") {
        out.push_str(&format!(
            "  live view:  ffplay -rtsp_transport tcp rtsp://127.0.0.1:{}/cam1   (or VLC)\n",
            opts.rtsp_port
        ));
    }
    if text.contains("evidence: {enabled: true") {
        out.push_str(&format!(
            "  evidence:   {}/<UTC date>/cam1/<alarm>.{{jpg,overlay.jpg,map.png,json}}\n",
            opts.dir.join("evidence").display()
        ));
    }
    out
}
