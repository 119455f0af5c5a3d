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
pub mod http;
pub mod inference;
pub mod judging;
pub mod prometheus;
pub mod publish;
pub mod regions;
pub mod telemetry;

use crate::engine::{Engine, EngineOptions};
use crate::model::bundle::ClassThresholds;
use config::{Config, ValidConfig};
use crossbeam_channel::Sender;
use gstreamer as gst;
use judging::Judged;
use publish::{Publisher, PublisherSettings};
use sd_notify::NotifyState;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use telemetry::Telemetry;

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
    #[error("the {0} stage stopped unexpectedly; exiting so that the service is restarted")]
    StageStopped(&'static str),
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

/// A configuration checked and its model loaded: ready to replace the running one.
pub struct Prepared {
    pub valid: ValidConfig,
    pub engine: Box<dyn Engine>,
    pub thresholds: BTreeMap<String, ClassThresholds>,
    pub publisher: PublisherSettings,
}

/// Reads, validates and loads everything a configuration needs.
pub fn prepare(opts: &RunOptions) -> Result<Prepared> {
    let valid = Config::load(&opts.config)?.validate(&opts.config, &opts.pipelines)?;
    let c = &valid.config;
    let engine = c
        .model
        .engine
        .load(
            &valid.bundle.onnx,
            &EngineOptions {
                ort_lib: c.model.ort_lib.clone(),
                threads: c.model.threads,
                batch: c.batching.max_batch,
            },
        )
        .map_err(|source| DaemonError::Engine {
            model: c.model.bundle.clone(),
            engine: c.model.engine.name(),
            source,
        })?;
    let thresholds = c.model.thresholds(&valid.bundle);
    let publisher = PublisherSettings {
        mqtt: c.mqtt.clone(),
        password: valid.password.clone(),
        spool: c.spool.clone(),
        site: c.device.site.clone(),
        device: c.device.id.clone(),
    };
    Ok(Prepared {
        valid,
        engine,
        thresholds,
        publisher,
    })
}

/// The running stages from capture to judging.
pub struct Topology {
    stop: Arc<AtomicBool>,
    captures: Vec<JoinHandle<()>>,
    inference: Option<JoinHandle<()>>,
    judging: Option<JoinHandle<()>>,
}

impl Topology {
    pub fn start(p: Prepared, out: Sender<Judged>, telemetry: &Arc<Telemetry>) -> Result<Topology> {
        let c = &p.valid.config;
        let ids: Vec<String> = c.cameras.iter().map(|c| c.id.clone()).collect();
        let cams = telemetry.set_cameras(&ids);
        let spec = p.valid.bundle.meta.input.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let mut captures = Vec::new();
        let mut queues = Vec::new();
        for (i, cam) in c.cameras.iter().enumerate() {
            let Some(pipeline) = p.valid.pipelines.get(&cam.id) else {
                return Err(DaemonError::NoPipeline(cam.id.clone()));
            };
            let (tx, rx) = crossbeam_channel::bounded(capture::QUEUE_FRAMES);
            queues.push(rx.clone());
            let src = capture::CameraSource {
                index: i,
                pipeline: pipeline.text.clone(),
                max_fps: cam.max_fps,
                finite: pipeline.finite,
                stall_timeout: (cam.stall_timeout_s > 0.0)
                    .then(|| Duration::from_secs_f64(cam.stall_timeout_s)),
                telemetry: cams[i].clone(),
                queue: tx,
                queue_rx: rx,
            };
            let (all, stop) = (telemetry.clone(), stop.clone());
            captures.push(
                std::thread::Builder::new()
                    .name(format!("capture-{}", cam.id))
                    .spawn(move || capture::run_camera(src, all, stop))
                    .map_err(|e| DaemonError::Thread(format!("capture-{}", cam.id), e))?,
            );
        }
        let (inferred_tx, inferred_rx) = crossbeam_channel::bounded(8);
        let model_id = p.valid.bundle.model_id();
        let stage = inference::InferenceStage {
            engine: p.engine,
            input: spec.clone(),
            queues,
            cameras: cams.clone(),
            out: inferred_tx,
            max_batch: c.batching.max_batch,
            max_wait: Duration::from_millis(c.batching.max_wait_ms),
            telemetry: telemetry.clone(),
            stopping: stop.clone(),
            batch_input: Vec::new(),
        };
        let inference = std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || stage.run())
            .map_err(|e| DaemonError::Thread("inference".into(), e))?;
        let judge = judging::JudgingStage {
            input: inferred_rx,
            out,
            cameras: cams,
            pinned: c
                .cameras
                .iter()
                .map(|c| (c.class != "auto").then(|| c.class.clone()))
                .collect(),
            classes: p.valid.bundle.meta.classes.clone(),
            thresholds: p.thresholds,
            spec,
            model_id: model_id.clone(),
            telemetry: telemetry.clone(),
        };
        let judging = std::thread::Builder::new()
            .name("judging".into())
            .spawn(move || judge.run())
            .map_err(|e| DaemonError::Thread("judging".into(), e))?;
        if let Ok(mut m) = telemetry.model_id.lock() {
            *m = model_id;
        }
        telemetry.model_loaded.store(true, Ordering::Relaxed);
        Ok(Topology {
            stop,
            captures,
            inference: Some(inference),
            judging: Some(judging),
        })
    }

    /// The stage whose thread has ended, if any: while the daemon runs, inference and
    /// judging only end by panicking.
    pub fn stopped_stage(&self) -> Option<telemetry::Stage> {
        let ended = |t: &Option<JoinHandle<()>>| t.as_ref().is_none_or(|t| t.is_finished());
        if ended(&self.inference) {
            Some(telemetry::Stage::Inference)
        } else if ended(&self.judging) {
            Some(telemetry::Stage::Judging)
        } else {
            None
        }
    }

    /// Stops capture, then lets inference and judging finish the frames already taken.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // A source stuck in teardown (a dead network camera) must not hold up the stop:
        // its thread is left behind, and its frames are not waited for.
        let until = Instant::now() + Duration::from_secs(5);
        for t in self.captures.drain(..) {
            while !t.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::warn!("a camera pipeline did not stop within 5 s; left behind");
            }
        }
        for t in [self.inference.take(), self.judging.take()]
            .into_iter()
            .flatten()
        {
            let until = Instant::now() + Duration::from_secs(10);
            while !t.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
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
    format!(
        "{running}/{} cameras running, {} alarms spooled, broker {}",
        cams.len(),
        t.alarms_spooled.load(Ordering::Relaxed),
        if t.broker_connected.load(Ordering::Relaxed) {
            "connected"
        } else {
            "unreachable"
        }
    )
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(opts: &RunOptions) -> Result<()> {
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
    let listen = prepared.valid.config.http.listen.clone();
    let http = http::HttpServer::start(&listen, telemetry.clone())?;
    tracing::info!(
        "metrics on http://{}/metrics, health on http://{}/healthz",
        http.addr,
        http.addr
    );
    let mut publisher = Publisher::start(prepared.publisher.clone(), telemetry.clone())?;
    log_start(&prepared);
    let mut topology = Topology::start(prepared, publisher.sender(), &telemetry)?;
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
            apply_reload(opts, &mut topology, &mut publisher, &telemetry, &listen)?;
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
        if let Some(stage) = topology
            .stopped_stage()
            .or_else(|| publisher.has_stopped().then_some(telemetry::Stage::Publish))
        {
            telemetry.stage_stopped(stage);
            tracing::error!("the {} stage stopped unexpectedly", stage.name());
            died = Some(stage);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    tracing::info!("stopping: capture off, finishing frames in flight, flushing alarms");
    notify(&[NotifyState::Stopping]);
    topology.stop();
    publisher.stop(opts.flush);
    drop(http);
    tracing::info!("stopped");
    // A stage that died ends the process with an error, so that the service manager
    // restarts it (Restart=on-failure); the spool keeps every alarm across the restart.
    match died {
        Some(stage) => Err(DaemonError::StageStopped(stage.name())),
        None => Ok(()),
    }
}

/// SIGHUP: the new configuration and model are checked and loaded first; a rejected one
/// leaves the running one in place (the reason is logged and reported in `health`).
fn apply_reload(
    opts: &RunOptions,
    topology: &mut Topology,
    publisher: &mut Publisher,
    telemetry: &Arc<Telemetry>,
    listen: &str,
) -> Result<()> {
    let p = match prepare(opts) {
        Ok(p) => p,
        Err(e) => {
            let why = format!("{e:#}");
            tracing::error!("reload rejected, the running configuration stays: {why}");
            telemetry.reloads_failed.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut l) = telemetry.last_reload_error.lock() {
                *l = Some(why);
            }
            telemetry.changed.store(true, Ordering::Relaxed);
            return Ok(());
        }
    };
    topology.stop();
    if publisher.settings.differs(&p.publisher) {
        tracing::info!("MQTT or spool settings changed: reconnecting");
        publisher.stop(opts.flush);
        *publisher = Publisher::start(p.publisher.clone(), telemetry.clone())?;
    }
    if p.valid.config.http.listen != listen {
        tracing::warn!(
            "http.listen changed to {}; it takes effect at the next start",
            p.valid.config.http.listen
        );
    }
    log_start(&p);
    *topology = Topology::start(p, publisher.sender(), telemetry)?;
    telemetry.reloads_ok.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut l) = telemetry.last_reload_error.lock() {
        *l = None;
    }
    telemetry.changed.store(true, Ordering::Relaxed);
    tracing::info!("reload applied");
    Ok(())
}

fn log_start(p: &Prepared) {
    let c = &p.valid.config;
    tracing::info!(
        "device {}/{}: model {} ({}) on {}, {} camera(s), broker {}",
        c.device.site,
        c.device.id,
        p.valid.bundle.model_id(),
        p.valid.bundle.meta.classes.join(", "),
        p.engine.name(),
        c.cameras.len(),
        config::redact_credentials(&c.mqtt.url)
    );
    for (camera, pipeline) in &p.valid.pipelines {
        let text = config::redact_credentials(&pipeline.text);
        tracing::info!(camera = %camera, "pipeline: {text}");
    }
}
