//! The stages from capture to judging, built from one prepared configuration: started
//! together, watched for a thread that dies, and stopped together, handing back what
//! they were built from so that a failed reload can start the old ones again.

use super::capture;
use super::config::{Config, ValidConfig};
use super::evidence::EvidenceStore;
use super::inference;
use super::judging::{self, Judged};
use super::operator::gallery::Gallery;
use super::operator::{self, OperatorView};
use super::publish::PublisherSettings;
use super::telemetry::{self, CameraState, CameraTelemetry, Telemetry};
use super::{DaemonError, Result, RunOptions};
use crate::model::bundle::ClassThresholds;
use crossbeam_channel::Sender;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A configuration checked and its model loaded: ready to replace the running one.
pub struct Prepared {
    pub valid: ValidConfig,
    pub engines: inference::engines::Engines,
    pub thresholds: BTreeMap<String, ClassThresholds>,
    pub publisher: PublisherSettings,
}

/// Reads, validates and loads everything a configuration needs.
pub fn prepare(opts: &RunOptions) -> Result<Prepared> {
    let valid = Config::load(&opts.config)?.validate(&opts.config, &opts.pipelines)?;
    let c = &valid.config;
    let engines = inference::engines::load(&c.model, &valid.bundle, c.batching.max_batch).map_err(
        |source| DaemonError::Engine {
            model: c.model.bundle.clone(),
            engine: c.model.engine.name(),
            source,
        },
    )?;
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
        engines,
        thresholds,
        publisher,
    })
}

/// A stage thread that ended while the daemon runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Dead {
    Stage(telemetry::Stage),
    /// A camera's capture thread ended without the camera ending, failing or stopping.
    Camera(String),
}

impl Dead {
    pub fn name(&self) -> String {
        match self {
            Dead::Stage(stage) => stage.name().to_string(),
            Dead::Camera(id) => format!("capture-{id}"),
        }
    }
}

/// The running stages from capture to judging.
pub struct Topology {
    stop: Arc<AtomicBool>,
    captures: Vec<(JoinHandle<()>, Arc<CameraTelemetry>)>,
    inference: Option<JoinHandle<inference::engines::Engines>>,
    judging: Option<JoinHandle<()>>,
    /// What the topology was built from, less the engine (which the inference thread
    /// hands back when it ends).
    built_from: Option<(
        ValidConfig,
        BTreeMap<String, ClassThresholds>,
        PublisherSettings,
    )>,
}

impl Topology {
    pub fn start(
        p: Prepared,
        out: Sender<Judged>,
        views: judging::Views,
        telemetry: &Arc<Telemetry>,
    ) -> Result<Topology> {
        let built_from = (p.valid.clone(), p.thresholds.clone(), p.publisher.clone());
        let c = &p.valid.config;
        let ids: Vec<String> = c.cameras.iter().map(|c| c.id.clone()).collect();
        let cams = telemetry.set_cameras(&ids);
        views.gallery.keep_only(&ids);
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
                memory: pipeline.memory,
                host: pipeline.host.clone(),
                device_frames: inference::engines::device_frames(
                    p.engines.serving.as_ref(),
                    pipeline.memory,
                ),
                max_fps: cam.max_fps,
                finite: pipeline.finite,
                stall_timeout: (cam.stall_timeout_s > 0.0)
                    .then(|| Duration::from_secs_f64(cam.stall_timeout_s)),
                telemetry: cams[i].clone(),
                queue: tx,
                queue_rx: rx,
            };
            let (all, stop) = (telemetry.clone(), stop.clone());
            let thread = std::thread::Builder::new()
                .name(format!("capture-{}", cam.id))
                .spawn(move || capture::run_camera(src, all, stop))
                .map_err(|e| DaemonError::Thread(format!("capture-{}", cam.id), e))?;
            captures.push((thread, cams[i].clone()));
        }
        // Before the first status line goes out (READY).
        let report = inference::status::EngineReport::new(
            &p.engines.serving.placement(),
            p.engines.wanted,
            p.engines.note.clone(),
        );
        telemetry.engine.update(|r| *r = report);
        let (inferred_tx, inferred_rx) = crossbeam_channel::bounded(8);
        let model_id = p.valid.bundle.model_id();
        let stage = inference::InferenceStage {
            engine: p.engines.serving,
            wanted: p.engines.wanted,
            upgrade: p.engines.upgrade,
            note: p.engines.note,
            input: spec.clone(),
            batcher: inference::Batcher::new(
                queues,
                cams.clone(),
                c.batching.max_batch,
                Duration::from_millis(c.batching.max_wait_ms),
            ),
            cameras: cams.clone(),
            out: inferred_tx,
            telemetry: telemetry.clone(),
            stopping: stop.clone(),
            batch_input: Vec::new(),
            batch_bytes: Vec::new(),
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
            views,
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
            built_from: Some(built_from),
        })
    }

    /// The stage whose thread has ended, if any: while the daemon runs, inference and
    /// judging only end by panicking, and a capture thread only after setting its camera
    /// ended, failed or stopped. A dead camera is marked failed, so health names it.
    pub fn dead(&self, telemetry: &Telemetry) -> Option<Dead> {
        let ended = |t: Option<bool>| t.is_none_or(|finished| finished);
        if ended(self.inference.as_ref().map(JoinHandle::is_finished)) {
            return Some(Dead::Stage(telemetry::Stage::Inference));
        }
        if ended(self.judging.as_ref().map(JoinHandle::is_finished)) {
            return Some(Dead::Stage(telemetry::Stage::Judging));
        }
        let (_, cam) = self.captures.iter().find(|(thread, cam)| {
            thread.is_finished()
                && !matches!(
                    cam.state(),
                    CameraState::Ended | CameraState::Failed { .. } | CameraState::Stopped
                )
        })?;
        telemetry.set_state(
            cam,
            CameraState::Failed {
                reason: "its capture thread ended unexpectedly (a panic)".into(),
            },
        );
        Some(Dead::Camera(cam.id.clone()))
    }

    /// Stops capture, then lets inference and judging finish the frames already taken.
    /// Returns what the topology was built from, engine included, when the inference
    /// thread handed its engine back (it did not die).
    pub fn stop(&mut self) -> Option<Prepared> {
        self.stop.store(true, Ordering::Relaxed);
        // A source stuck in teardown (a dead network camera) must not hold up the stop:
        // its thread is left behind, and its frames are not waited for.
        let until = Instant::now() + Duration::from_secs(5);
        for (t, _) in self.captures.drain(..) {
            if wait_finished(&t, until) {
                let _ = t.join();
            } else {
                tracing::warn!("a camera pipeline did not stop within 5 s; left behind");
            }
        }
        let engines = self.inference.take().and_then(|t| {
            wait_finished(&t, Instant::now() + Duration::from_secs(10))
                .then(|| t.join().ok())
                .flatten()
        });
        if let Some(t) = self.judging.take()
            && wait_finished(&t, Instant::now() + Duration::from_secs(10))
        {
            let _ = t.join();
        }
        let (valid, thresholds, publisher) = self.built_from.take()?;
        Some(Prepared {
            valid,
            engines: engines?,
            thresholds,
            publisher,
        })
    }
}

/// Starts, restarts or stops the operator view to match `p`'s configuration; a view
/// already showing the same cameras with the same settings is kept (its viewers stay).
pub fn match_view(
    view: &mut Option<OperatorView>,
    p: &Prepared,
    telemetry: &Arc<Telemetry>,
) -> Result<()> {
    let c = &p.valid.config;
    if !c.rtsp.enabled {
        *view = None;
        return Ok(());
    }
    let cameras: Vec<operator::ViewedCamera> = c
        .cameras
        .iter()
        .map(|c| operator::ViewedCamera {
            id: c.id.clone(),
            fps: c.max_fps,
            shown: c.rtsp,
        })
        .collect();
    let wanted = (c.rtsp.clone(), cameras);
    if view.as_ref().is_some_and(|v| v.started_with == wanted) {
        return Ok(());
    }
    // The old one releases its port before the new one binds it.
    *view = None;
    *view = Some(OperatorView::start(
        &wanted.0,
        &p.valid.rtsp_credentials,
        &wanted.1,
        telemetry.clone(),
    )?);
    Ok(())
}

/// Starts, restarts or stops the evidence store to match `p`'s configuration (a store
/// with unchanged settings keeps running), and tells `gallery` where it is.
pub fn match_evidence(
    store: &mut Option<EvidenceStore>,
    p: &Prepared,
    telemetry: &Telemetry,
    gallery: &Gallery,
) -> Result<()> {
    let c = &p.valid.config.evidence;
    if !c.enabled {
        *store = None;
        gallery.set_evidence_root(None);
        return Ok(());
    }
    if store.as_ref().is_none_or(|s| s.config != *c) {
        // The old writer finishes what it has queued first.
        *store = None;
        *store = Some(
            EvidenceStore::start(c, telemetry.evidence.clone())
                .map_err(|e| DaemonError::Thread("evidence".into(), e))?,
        );
    }
    gallery.set_evidence_root(Some(c.dir.clone()));
    Ok(())
}

/// Waits until `t` has finished or `until` has passed; true if it finished.
fn wait_finished<T>(t: &JoinHandle<T>, until: Instant) -> bool {
    while !t.is_finished() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    t.is_finished()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A topology whose inference and judging threads idle forever and whose one capture
    /// thread runs `capture`.
    fn with_capture(t: &Telemetry, capture: impl FnOnce() + Send + 'static) -> Topology {
        let cams = t.set_cameras(&["cam1".to_string()]);
        let inference: JoinHandle<inference::engines::Engines> = std::thread::spawn(|| {
            loop {
                std::thread::park();
            }
        });
        let judging: JoinHandle<()> = std::thread::spawn(|| {
            loop {
                std::thread::park();
            }
        });
        Topology {
            stop: Arc::new(AtomicBool::new(false)),
            captures: vec![(std::thread::spawn(capture), cams[0].clone())],
            inference: Some(inference),
            judging: Some(judging),
            built_from: None,
        }
    }

    fn wait_captures(t: &Topology) {
        while !t.captures.iter().all(|(h, _)| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_capture_thread_that_panics_is_a_dead_stage_and_a_failed_camera() {
        let t = Telemetry::new();
        let topology = with_capture(&t, || panic!("a binding bug"));
        wait_captures(&topology);
        assert_eq!(topology.dead(&t), Some(Dead::Camera("cam1".into())));
        assert_eq!(Dead::Camera("cam1".into()).name(), "capture-cam1");
        let state = t.cameras()[0].state();
        assert!(
            matches!(&state, CameraState::Failed { reason } if reason.contains("ended unexpectedly")),
            "{state:?}"
        );
    }

    #[test]
    fn a_camera_that_ended_is_not_dead() {
        let t = Arc::new(Telemetry::new());
        let all = t.clone();
        let topology = with_capture(&t, move || {
            let cam = all.cameras()[0].clone();
            all.set_state(&cam, CameraState::Ended);
        });
        wait_captures(&topology);
        assert_eq!(topology.dead(&t), None);
    }
}
