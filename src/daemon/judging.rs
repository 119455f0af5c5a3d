//! The judging stage: the verdict of each frame against its class's thresholds
//! (configuration overrides, else the bundle's calibrated ones), defect regions in frame
//! pixels, a log line per anomalous frame, and the hand-over to the publisher.

use super::inference::Inferred;
use super::telemetry::{CameraTelemetry, Latency, Stage, Telemetry};
use crate::daemon::evidence::{Pending, Sink};
use crate::daemon::operator::gallery::Gallery;
use crate::daemon::operator::{Feed, Scene, Shot};
use crate::daemon::publish::payload::StageLatencies;
use crate::daemon::regions::{CropGeometry, Verdict, judge};
use crate::model::bundle::ClassThresholds;
use crate::preprocess::InputSpec;
use crossbeam_channel::{Receiver, Sender};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A judged frame, ready to publish.
#[derive(Debug, Clone)]
pub struct Judged {
    pub camera: String,
    pub frame: u64,
    pub captured_ms: i64,
    /// The class judged against: the camera's pinned class, else the detected one.
    pub class: String,
    pub detected_class: String,
    pub verdict: Verdict,
    pub model_id: String,
    pub latency: StageLatencies,
    /// The pictures of an anomalous frame, for the evidence store when it is on.
    pub evidence: Option<Pending>,
}

/// Where judged frames are shown besides the publisher.
#[derive(Clone)]
pub struct Views {
    /// The operator's live view, when it is on.
    pub live: Option<Feed>,
    /// The last frame of each camera, for `latest.jpg`.
    pub gallery: Arc<Gallery>,
    /// The evidence store, when it is on.
    pub evidence: Option<Sink>,
}

pub struct JudgingStage {
    pub input: Receiver<Inferred>,
    pub out: Sender<Judged>,
    pub cameras: Vec<Arc<CameraTelemetry>>,
    /// Pinned class per camera (None: `auto`).
    pub pinned: Vec<Option<String>>,
    pub classes: Vec<String>,
    pub thresholds: BTreeMap<String, ClassThresholds>,
    pub spec: InputSpec,
    pub model_id: String,
    pub telemetry: Arc<Telemetry>,
    pub views: Views,
}

/// How often each camera's frame counts are logged.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);

impl JudgingStage {
    /// Runs until the inference stage is gone and its queue is empty.
    pub fn run(self) {
        let mut last_summary = Instant::now();
        loop {
            self.telemetry.beat(Stage::Judging);
            if last_summary.elapsed() >= SUMMARY_EVERY {
                last_summary = Instant::now();
                for c in &self.cameras {
                    tracing::info!(
                        camera = %c.id,
                        "frames: {} in, {} judged, {} anomalous, {} dropped, {} failed; state {}",
                        c.frames_in.load(Ordering::Relaxed),
                        c.frames_processed.load(Ordering::Relaxed),
                        c.frames_anomalous.load(Ordering::Relaxed),
                        c.frames_dropped.load(Ordering::Relaxed),
                        c.frames_failed.load(Ordering::Relaxed),
                        c.state().name()
                    );
                }
            }
            let r = match self.input.recv_timeout(Duration::from_millis(250)) {
                Ok(r) => r,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            };
            let t0 = Instant::now();
            let cam = &self.cameras[r.camera];
            let detected = self
                .classes
                .get(r.class_id as usize)
                .cloned()
                .unwrap_or_else(|| format!("#{}", r.class_id));
            let class = match &self.pinned[r.camera] {
                Some(p) => {
                    if *p != detected {
                        cam.class_mismatches.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            camera = %cam.id,
                            frame = r.number,
                            "the model sees class `{detected}` on a camera pinned to `{p}`"
                        );
                    }
                    p.clone()
                }
                None => detected.clone(),
            };
            // Validation guarantees a threshold for every class of the model.
            let Some(t) = self.thresholds.get(&class) else {
                tracing::error!(camera = %cam.id, "no threshold for class `{class}`");
                cam.frames_failed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let geometry = CropGeometry::for_frame(r.width, r.height, &self.spec);
            let verdict = judge(r.score, &r.map, r.map_hw, t, &geometry);
            let judging_ms = t0.elapsed().as_secs_f64() * 1e3;
            let end_to_end_ms = r.captured.elapsed().as_secs_f64() * 1e3;
            self.telemetry.observe(Latency::Judging, judging_ms);
            self.telemetry.observe(Latency::EndToEnd, end_to_end_ms);
            cam.frames_processed.fetch_add(1, Ordering::Relaxed);
            if verdict.anomalous {
                cam.frames_anomalous.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    camera = %cam.id,
                    frame = r.number,
                    "ANOMALOUS {class}: score {:.4} >= {:.4}, {} region(s)",
                    verdict.score,
                    verdict.threshold,
                    verdict.regions.len()
                );
            } else {
                tracing::debug!(
                    camera = %cam.id,
                    frame = r.number,
                    "normal {class}: score {:.4} < {:.4}",
                    verdict.score,
                    verdict.threshold
                );
            }
            let shot = Arc::new(Shot {
                camera: cam.id.clone(),
                frame_number: r.number,
                captured_ms: r.captured_ms,
                frame: r.image,
                map: r.map,
                map_hw: r.map_hw,
                geometry,
                pixel_threshold: t.pixel.unwrap_or(t.image),
                class: class.clone(),
                verdict: verdict.clone(),
            });
            if let Some(feed) = self.views.live.as_ref().filter(|f| f.wants(r.camera)) {
                feed.offer(Scene {
                    camera: r.camera,
                    shot: shot.clone(),
                });
            }
            let evidence = match &self.views.evidence {
                Some(sink) if verdict.anomalous => Some(Pending {
                    shot: shot.clone(),
                    sink: sink.clone(),
                }),
                _ => None,
            };
            self.views.gallery.show(shot);
            let judged = Judged {
                camera: cam.id.clone(),
                frame: r.number,
                captured_ms: r.captured_ms,
                class,
                detected_class: detected,
                verdict,
                model_id: self.model_id.clone(),
                latency: StageLatencies {
                    queue_ms: round3(r.queue_ms),
                    preprocess_ms: round3(r.preprocess_ms),
                    inference_ms: round3(r.inference_ms),
                    judging_ms: round3(judging_ms),
                },
                evidence,
            };
            if self.out.send(judged).is_err() {
                break;
            }
            self.telemetry
                .publish_queue_depth
                .store(self.out.len(), Ordering::Relaxed);
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
