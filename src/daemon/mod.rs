//! `cras run`: the inspection daemon.
//!
//! ```text
//! camera --GStreamer--> capture (1 thread / camera) --bounded, oldest dropped-->
//!   inference (batches across cameras) --> judging (thresholds, regions, verdict)
//!   --> publisher (alarm spool + MQTT)
//! service: signals, sd_notify + watchdog, reload, /metrics and /healthz
//! ```
//!
//! The stages between capture and judging form a [`Topology`], built from one validated
//! configuration and one loaded engine; a reload (SIGHUP) prepares the new one completely
//! (configuration checked, model loaded) before the old one is stopped, so a bad new
//! configuration or model leaves the old one running. The publisher and its spool
//! outlive reloads unless the MQTT or spool settings change.

pub mod capture;
pub mod config;
pub mod evidence;
pub mod http;
pub mod inference;
pub mod judging;
mod malloc;
pub mod operator;
pub mod prometheus;
pub mod publish;
pub mod regions;
pub mod telemetry;
mod topology;

use gstreamer as gst;
use publish::Publisher;
use sd_notify::NotifyState;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use telemetry::Telemetry;
pub use topology::{Dead, Prepared, Topology, match_evidence, match_view, prepare};

/// Why the daemon could not start, or could not apply a reload.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("model.bundle {model}: loading with the {engine} engine: {source}")]
    Engine {
        model: PathBuf,
        engine: &'static str,
        source: crate::engine::EngineError,
    },
    #[error("camera {0}: no rendered pipeline")]
    NoPipeline(String),
    #[error("cannot start the {0} thread: {1}")]
    Thread(String, std::io::Error),
    #[error("cannot initialise GStreamer: {0}")]
    Gstreamer(gst::glib::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error(transparent)]
    Publish(#[from] publish::PublishError),
    #[error(transparent)]
    Operator(#[from] operator::OperatorError),
    #[error("the {0} stage stopped unexpectedly; exiting so that the service is restarted")]
    StageStopped(String),
}

type Result<T> = std::result::Result<T, DaemonError>;

pub struct RunOptions {
    pub config: PathBuf,
    pub pipelines: PathBuf,
    /// How long a stop may spend delivering spooled alarms before it exits anyway.
    pub flush: Duration,
}

/// `--flush-timeout`: seconds a stop may spend delivering the spool, from 0 to 3600.
pub fn flush_timeout(s: &str) -> std::result::Result<Duration, config::Invalid> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| config::Invalid::new("--flush-timeout", "must be a number of seconds"))?;
    config::within("--flush-timeout", secs, 0.0, 3600.0, " seconds")?;
    Ok(Duration::from_secs_f64(secs))
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify: {e}");
    }
}

fn status_line(t: &Telemetry) -> String {
    let cams = t.cameras();
    let running = cams
        .iter()
        .filter(|c| c.state() == telemetry::CameraState::Running)
        .count();
    let line = format!(
        "{running}/{} cameras running, {} alarms spooled, broker {}",
        cams.len(),
        t.alarms_spooled.load(Ordering::Relaxed),
        if t.broker_connected.load(Ordering::Relaxed) {
            "connected"
        } else {
            "unreachable"
        }
    );
    match t.engine.get().status() {
        e if e.is_empty() => line,
        e => format!("{line}, {e}"),
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(opts: &RunOptions) -> Result<()> {
    malloc::limit_arenas();
    gst::init().map_err(DaemonError::Gstreamer)?;
    let prepared = prepare(opts)?;
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])
    .map_err(DaemonError::Signals)?;
    let mut signals = signals;
    let telemetry = Arc::new(Telemetry::new());
    let gallery = Arc::new(operator::gallery::Gallery::default());
    let listen = prepared.valid.config.http.listen.clone();
    let http = http::HttpServer::start(&listen, telemetry.clone(), gallery.clone())?;
    tracing::info!(
        "metrics on http://{}/metrics, health on http://{}/healthz",
        http.addr,
        http.addr
    );
    let publisher = Publisher::start(prepared.publisher.clone(), telemetry.clone())?;
    log_start(&prepared);
    let mut view = None;
    let mut evidence = None;
    match_view(&mut view, &prepared, &telemetry)?;
    match_evidence(&mut evidence, &prepared, &telemetry, &gallery)?;
    let mut outputs = Outputs {
        publisher,
        view,
        evidence,
        gallery,
    };
    let mut topology = Topology::start(
        prepared,
        outputs.publisher.sender(),
        outputs.views(),
        &telemetry,
    )?;
    notify(&[
        NotifyState::Ready,
        NotifyState::Status(&status_line(&telemetry)),
    ]);
    let watchdog = sd_notify::watchdog_enabled();
    // Pet the watchdog at a third of its period, and only while every stage thread
    // keeps going round its loop: a stalled stage lets systemd restart us.
    let pet_every = watchdog.map(|w| w / 3).unwrap_or(Duration::from_secs(5));
    let stall_after = watchdog.map(|w| w.as_secs_f64() / 2.0).unwrap_or(30.0);
    let mut next_pet = Instant::now();
    let mut stalled_logged = false;
    let mut died = None;
    loop {
        let mut stop = false;
        let mut reload = false;
        for s in signals.pending() {
            match s {
                signal_hook::consts::SIGHUP => reload = true,
                _ => stop = true,
            }
        }
        if stop {
            break;
        }
        if reload {
            notify(&[
                NotifyState::Reloading,
                NotifyState::monotonic_usec_now().unwrap_or(NotifyState::Status("reloading")),
            ]);
            tracing::info!("SIGHUP: reloading {}", opts.config.display());
            apply_reload(opts, &mut topology, &mut outputs, &telemetry, &listen)?;
            malloc::give_back();
            notify(&[
                NotifyState::Ready,
                NotifyState::Status(&status_line(&telemetry)),
            ]);
        }
        if Instant::now() >= next_pet {
            next_pet = Instant::now() + pet_every;
            let (stage, age) = telemetry.stalest();
            if age <= stall_after {
                stalled_logged = false;
                let status = status_line(&telemetry);
                notify(&[NotifyState::Watchdog, NotifyState::Status(&status)]);
            } else if !stalled_logged {
                stalled_logged = true;
                tracing::error!(
                    "the {} stage has not moved for {age:.0} s; not petting the watchdog",
                    stage.name()
                );
            }
        }
        if let Some(dead) = topology.dead(&telemetry).or_else(|| {
            outputs
                .publisher
                .has_stopped()
                .then_some(Dead::Stage(telemetry::Stage::Publish))
        }) {
            if let Dead::Stage(stage) = dead {
                telemetry.stage_stopped(stage);
            }
            tracing::error!("the {} stage stopped unexpectedly", dead.name());
            died = Some(dead);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    tracing::info!("stopping: capture off, finishing frames in flight, flushing alarms");
    notify(&[NotifyState::Stopping]);
    topology.stop();
    outputs.publisher.stop(opts.flush);
    // The evidence writer finishes the sets it has queued.
    drop(outputs);
    drop(http);
    tracing::info!("stopped");
    // A stage that died ends the process with an error, so that the service manager
    // restarts it (Restart=on-failure); the spool keeps every alarm across the restart.
    match died {
        Some(dead) => Err(DaemonError::StageStopped(dead.name())),
        None => Ok(()),
    }
}

/// What the stages feed: the publisher and, when on, the operator view and the evidence
/// store; the gallery behind `latest.jpg`.
struct Outputs {
    publisher: Publisher,
    view: Option<operator::OperatorView>,
    evidence: Option<evidence::EvidenceStore>,
    gallery: Arc<operator::gallery::Gallery>,
}

impl Outputs {
    fn views(&self) -> judging::Views {
        judging::Views {
            live: self.view.as_ref().map(|v| v.feed()),
            gallery: self.gallery.clone(),
            evidence: self.evidence.as_ref().map(|e| e.sink()),
        }
    }

    /// Starts the publisher (when its settings changed), the operator view and the
    /// evidence store (when theirs did) for `p`.
    fn match_config(
        &mut self,
        p: &Prepared,
        flush: Duration,
        telemetry: &Arc<Telemetry>,
    ) -> Result<()> {
        if self.publisher.has_stopped() || self.publisher.settings.differs(&p.publisher) {
            self.publisher.stop(flush);
            self.publisher = Publisher::start(p.publisher.clone(), telemetry.clone())?;
        }
        match_view(&mut self.view, p, telemetry)?;
        match_evidence(&mut self.evidence, p, telemetry, &self.gallery)
    }
}

/// SIGHUP: the new configuration and model are checked and loaded first; a rejected one
/// leaves the running one in place (the reason is logged and reported in `health`). If
/// the new one passes the checks but cannot start (its spool cannot be opened, its RTSP
/// port is taken, a thread cannot be started), the old one is started again.
fn apply_reload(
    opts: &RunOptions,
    topology: &mut Topology,
    out: &mut Outputs,
    telemetry: &Arc<Telemetry>,
    listen: &str,
) -> Result<()> {
    let p = match prepare(opts) {
        Ok(p) => p,
        Err(e) => {
            reload_rejected(telemetry, &e, "the running configuration stays");
            return Ok(());
        }
    };
    let old = topology.stop();
    if let Err(e) = switch_to(p, opts, topology, out, telemetry, listen) {
        reload_rejected(telemetry, &e, "starting the previous configuration again");
        // Without the previous configuration (its engine died with its thread) the
        // daemon ends with the error and the service manager restarts it.
        let old = old.ok_or(e)?;
        out.match_config(&old, opts.flush, telemetry)?;
        *topology = Topology::start(old, out.publisher.sender(), out.views(), telemetry)?;
        return Ok(());
    }
    telemetry.reloads_ok.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut l) = telemetry.last_reload_error.lock() {
        *l = None;
    }
    telemetry.changed.store(true, Ordering::Relaxed);
    tracing::info!("reload applied");
    Ok(())
}

/// Starts what `p` changed among the outputs, then the stages of `p`.
fn switch_to(
    p: Prepared,
    opts: &RunOptions,
    topology: &mut Topology,
    out: &mut Outputs,
    telemetry: &Arc<Telemetry>,
    listen: &str,
) -> Result<()> {
    if out.publisher.settings.differs(&p.publisher) {
        tracing::info!("MQTT or spool settings changed: reconnecting");
    }
    out.match_config(&p, opts.flush, telemetry)?;
    if p.valid.config.http.listen != listen {
        tracing::warn!(
            "http.listen changed to {}; it takes effect at the next start",
            p.valid.config.http.listen
        );
    }
    log_start(&p);
    *topology = Topology::start(p, out.publisher.sender(), out.views(), telemetry)?;
    Ok(())
}

fn reload_rejected(telemetry: &Telemetry, e: &DaemonError, then: &str) {
    let why = format!("{e:#}");
    tracing::error!("reload rejected, {then}: {why}");
    telemetry.reloads_failed.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut l) = telemetry.last_reload_error.lock() {
        *l = Some(why);
    }
    telemetry.changed.store(true, Ordering::Relaxed);
}

fn log_start(p: &Prepared) {
    let c = &p.valid.config;
    tracing::info!(
        "device {}/{}: model {} ({}) on {} ({}, library {}), {} camera(s), broker {}",
        c.device.site,
        c.device.id,
        p.valid.bundle.model_id(),
        p.valid.bundle.meta.classes.join(", "),
        p.engines.serving.name(),
        p.engines.serving.placement().serving.name(),
        crate::engine::onnxruntime::loaded_library()
            .map(|l| l.display().to_string())
            .unwrap_or_else(|| "none".into()),
        c.cameras.len(),
        config::redact_credentials(&c.mqtt.url)
    );
    for (camera, pipeline) in &p.valid.pipelines {
        let text = config::redact_credentials(&pipeline.text);
        tracing::info!(camera = %camera, "pipeline: {text}");
    }
}
