//! Serving on one engine while a better one is built: build, check, swap.
//!
//! A TensorRT engine takes minutes to build the first time (6-12 on an Orin). Rather
//! than start blind, the daemon serves on the engine it has (CUDA or the CPU) and an
//! [`Upgrade`] builds the new one on its own thread. The serving side offers it a few
//! of the batches it has just run, inputs and outputs ([`Sample`]); the new engine runs
//! the same inputs and must agree within [`Tolerance`]. Only then is it handed over, and
//! the serving side swaps engines between two batches, so no frame is lost or judged
//! twice. An engine that disagrees is refused with the figures and never served.

use super::{CrasOutputs, Engine, EngineError, PixelLayout};
use crossbeam_channel::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How far the new engine may be from the serving one on the same input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Largest image-score difference.
    pub score: f32,
    /// Largest anomaly-map difference (maps move more: a near-tie in the nearest-center
    /// search may flip one patch).
    pub map: f32,
}

impl Default for Tolerance {
    /// The tolerance the frames stage is held to against the Rust pre-processing.
    fn default() -> Self {
        Tolerance {
            score: 1e-3,
            map: 0.1,
        }
    }
}

/// An engine input as the serving side ran it.
#[derive(Debug, Clone)]
pub enum SampleInput {
    Prepared {
        data: Vec<f32>,
        shape: [usize; 4],
    },
    Frames {
        data: Vec<u8>,
        shape: [usize; 4],
        layout: PixelLayout,
    },
}

/// One batch the serving engine ran, and what it answered for its first `n` images.
#[derive(Debug, Clone)]
pub struct Sample {
    pub input: SampleInput,
    pub n: usize,
    pub outputs: CrasOutputs,
}

/// The largest differences seen, over every image checked.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Differences {
    pub images: usize,
    pub score: f32,
    pub map: f32,
    /// Images whose predicted class differs.
    pub class: usize,
}

impl Differences {
    pub fn within(&self, t: Tolerance) -> bool {
        self.score <= t.score && self.map <= t.map && self.class == 0
    }

    /// Adds the images of one run: `got` against `want`, first `n` images.
    pub fn add(&mut self, want: &CrasOutputs, got: &CrasOutputs, n: usize) -> Result<(), String> {
        if got.map_hw != want.map_hw || got.batch < n || want.batch < n {
            return Err(format!(
                "outputs differ in shape: maps {:?} against {:?}",
                got.map_hw, want.map_hw
            ));
        }
        let max_diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| if x == y { 0.0 } else { (x - y).abs() })
                .fold(
                    0.0f32,
                    |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
                )
        };
        for i in 0..n {
            self.score = self.score.max(max_diff(
                &want.image_scores[i..i + 1],
                &got.image_scores[i..i + 1],
            ));
            self.map = self.map.max(max_diff(want.map(i), got.map(i)));
            self.class += usize::from(want.class_ids[i] != got.class_ids[i]);
            self.images += 1;
        }
        Ok(())
    }
}

/// Where an upgrade is.
#[derive(Debug, Clone, PartialEq)]
pub enum UpgradeState {
    Building {
        since: Instant,
    },
    Checking {
        checked: usize,
        of: usize,
    },
    /// Checked and handed over (or waiting to be taken between two batches).
    Ready(Differences),
    /// The new engine disagrees: it is not served.
    Refused(Differences),
    Failed(String),
}

impl UpgradeState {
    /// One line for `health` and the service status: "building (3 min)", ...
    pub fn describe(&self) -> String {
        match self {
            UpgradeState::Building { since } => {
                format!("building ({} min)", since.elapsed().as_secs() / 60)
            }
            UpgradeState::Checking { checked, of } => format!("checking ({checked}/{of})"),
            UpgradeState::Ready(d) => format!(
                "ready (max differences on {} images: score {:.1e}, map {:.1e})",
                d.images, d.score, d.map
            ),
            UpgradeState::Refused(d) => format!(
                "refused (on {} images: score differs by {:.1e}, map by {:.1e}, class on {})",
                d.images, d.score, d.map, d.class
            ),
            UpgradeState::Failed(why) => format!("failed: {why}"),
        }
    }
}

/// Builds and checks a new engine on its own thread ([module docs](self)).
pub struct Upgrade {
    samples: Sender<Sample>,
    ready: Receiver<Box<dyn Engine>>,
    state: Arc<Mutex<UpgradeState>>,
    last_log: Instant,
}

/// What the builder thread gets.
struct Job {
    samples: Receiver<Sample>,
    ready: Sender<Box<dyn Engine>>,
    state: Arc<Mutex<UpgradeState>>,
    images: usize,
    tolerance: Tolerance,
}

impl Upgrade {
    /// Starts `build` on a thread named `name`; its engine is checked on `images`
    /// images of the samples offered, then `checked` gets the differences and the tolerance
    /// they are judged by (to record both), and when they are within it, the engine is
    /// handed over.
    pub fn start(
        name: &str,
        build: impl FnOnce() -> Result<Box<dyn Engine>, EngineError> + Send + 'static,
        images: usize,
        tolerance: Tolerance,
        checked: impl FnOnce(&Differences, Tolerance) + Send + 'static,
    ) -> std::io::Result<Upgrade> {
        // Room for one sample per image: the serving side stops copying when it is full.
        let (samples_tx, samples_rx) = crossbeam_channel::bounded(images.max(1));
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let state = Arc::new(Mutex::new(UpgradeState::Building {
            since: Instant::now(),
        }));
        let job = Job {
            samples: samples_rx,
            ready: ready_tx,
            state: state.clone(),
            images: images.max(1),
            tolerance,
        };
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || job.run(build, checked))?;
        Ok(Upgrade {
            samples: samples_tx,
            ready: ready_rx,
            state,
            last_log: Instant::now(),
        })
    }

    pub fn state(&self) -> UpgradeState {
        match self.state.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Whether a sample would be taken now (so the caller copies a batch only then).
    pub fn wants_sample(&self) -> bool {
        !self.samples.is_full()
            && matches!(
                self.state(),
                UpgradeState::Building { .. } | UpgradeState::Checking { .. }
            )
    }

    pub fn offer(&self, sample: Sample) {
        let _ = self.samples.try_send(sample);
    }

    /// The new engine, once checked; the caller swaps it in between two batches.
    pub fn take(&self) -> Option<Box<dyn Engine>> {
        self.ready.try_recv().ok()
    }

    /// A log line per minute while building, so a long first build does not look like
    /// a hung service.
    pub fn log_progress(&mut self) {
        if self.last_log.elapsed() < Duration::from_secs(60) {
            return;
        }
        self.last_log = Instant::now();
        if let UpgradeState::Building { .. } = self.state() {
            tracing::info!("engine: {}", self.state().describe());
        }
    }
}

impl Job {
    fn set(&self, s: UpgradeState) {
        match self.state.lock() {
            Ok(mut g) => *g = s,
            Err(p) => *p.into_inner() = s,
        }
    }

    fn run(
        self,
        build: impl FnOnce() -> Result<Box<dyn Engine>, EngineError>,
        checked: impl FnOnce(&Differences, Tolerance),
    ) {
        let started = Instant::now();
        let mut engine = match build() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("engine: building the new engine failed: {e}");
                return self.set(UpgradeState::Failed(e.to_string()));
            }
        };
        tracing::info!(
            "engine: built in {:.0} s; checking it on {} images",
            started.elapsed().as_secs_f64(),
            self.images
        );
        let mut d = Differences::default();
        while d.images < self.images {
            self.set(UpgradeState::Checking {
                checked: d.images,
                of: self.images,
            });
            // The serving side is gone (stopped or reloaded): nothing to hand over.
            let Ok(sample) = self.samples.recv() else {
                return;
            };
            if let Err(why) = check_one(engine.as_mut(), &sample, &mut d) {
                tracing::error!("engine: the new engine failed its check: {why}");
                return self.set(UpgradeState::Failed(why));
            }
        }
        checked(&d, self.tolerance);
        let passed = d.within(self.tolerance);
        if passed {
            tracing::info!("engine: new engine {}", UpgradeState::Ready(d).describe());
            self.set(UpgradeState::Ready(d));
            let _ = self.ready.send(engine);
        } else {
            tracing::error!(
                "engine: new engine {} (tolerance: score {:.1e}, map {:.1e}); serving on the old one",
                UpgradeState::Refused(d).describe(),
                self.tolerance.score,
                self.tolerance.map
            );
            self.set(UpgradeState::Refused(d));
        }
    }
}

/// Runs `sample`'s input on `engine` and adds the differences to `d`.
pub fn check_one(
    engine: &mut dyn Engine,
    sample: &Sample,
    d: &mut Differences,
) -> Result<(), String> {
    let outs = match &sample.input {
        SampleInput::Prepared { data, shape } => engine.run(data, *shape),
        SampleInput::Frames {
            data,
            shape,
            layout,
        } => engine.run_frames(data, *shape, *layout),
    };
    let got = outs
        .and_then(|o| CrasOutputs::for_batch(o, sample.n))
        .map_err(|e| e.to_string())?;
    d.add(&sample.outputs, &got, sample.n)
}
