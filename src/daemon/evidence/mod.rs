//! The evidence of every alarm: the frame as captured, the anomaly map, the overlay the
//! operator saw and the alarm payload, under `<dir>/<UTC date>/<camera>/<sequence>.*`
//! (names in [`files`]). The alarm's `evidence` field holds that path without suffix.
//!
//! The publisher hands each spooled alarm's set to the writer thread through a bounded
//! queue it never waits on: a writer that falls behind drops sets (counted,
//! `cras_evidence_dropped_total`, and the alarm then carries no `evidence`), never an
//! alarm. Retention by size and age is in [`retention`].

pub mod files;
pub mod retention;

use super::config::{Invalid, within, writable_dir};
use super::operator::Shot;
use super::operator::still::StillEncoder;
use super::publish::payload::AlarmPayload;
use crate::clock::{rfc3339_utc, unix_ms};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvidenceConfig {
    /// Keep the evidence of every alarm (off unless set).
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "default_dir")]
    pub dir: PathBuf,
    /// JPEG quality of the frame and the overlay.
    #[serde(default = "default_quality")]
    pub jpeg_quality: u8,
    /// Bytes at most; the oldest sets go first.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Days kept besides today (UTC).
    #[serde(default = "default_max_age")]
    pub max_age_days: u32,
}

fn default_dir() -> PathBuf {
    "/var/lib/cras/evidence".into()
}
fn default_quality() -> u8 {
    90
}
fn default_max_bytes() -> u64 {
    2 << 30
}
fn default_max_age() -> u32 {
    30
}

impl Default for EvidenceConfig {
    fn default() -> Self {
        EvidenceConfig {
            enabled: false,
            dir: default_dir(),
            jpeg_quality: default_quality(),
            max_bytes: default_max_bytes(),
            max_age_days: default_max_age(),
        }
    }
}

impl EvidenceConfig {
    /// Resolves and creates the folder, proves it writable, checks the ranges and the
    /// GStreamer plugins the overlay's text needs.
    pub fn validate(&mut self, base: &Path) -> Result<(), Invalid> {
        if !self.enabled {
            return Ok(());
        }
        within("evidence.jpeg_quality", self.jpeg_quality, 1, 100, "")?;
        within(
            "evidence.max_bytes",
            self.max_bytes,
            1 << 20,
            1 << 40,
            " bytes",
        )?;
        within(
            "evidence.max_age_days",
            self.max_age_days,
            1,
            36_500,
            " days",
        )?;
        writable_dir("evidence.dir", base, &mut self.dir)?;
        gstreamer::init()
            .map_err(|e| Invalid::new("evidence", format!("cannot initialise GStreamer: {e}")))?;
        match super::operator::still::missing_elements() {
            Some(why) => Err(Invalid::new("evidence.enabled", why)),
            None => Ok(()),
        }
    }
}

/// The store's counters, in `/metrics`.
#[derive(Debug, Default)]
pub struct EvidenceCounters {
    pub written: AtomicU64,
    pub dropped: AtomicU64,
    pub failed: AtomicU64,
    pub removed: AtomicU64,
    pub bytes: AtomicU64,
}

/// Sets waiting to be written.
const QUEUE: usize = 16;

struct Job {
    relative: String,
    shot: Arc<Shot>,
    payload: Vec<u8>,
}

/// The publisher's handle to the writer.
#[derive(Clone)]
pub struct Sink {
    tx: Sender<Job>,
    counters: Arc<EvidenceCounters>,
}

/// What an anomalous frame carries to the publisher when the store is on.
#[derive(Clone)]
pub struct Pending {
    pub shot: Arc<Shot>,
    pub sink: Sink,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "evidence::Pending(frame {})", self.shot.frame_number)
    }
}

/// `<UTC date>/<camera>/<sequence>`: where an alarm's set goes, relative to the store.
pub fn relative(captured_ms: i64, camera: &str, sequence: u64) -> String {
    format!("{}/{camera}/{sequence}", &rfc3339_utc(captured_ms)[..10])
}

impl Pending {
    /// Queues the set of alarm `relative` (see [`relative`]) with its `payload`; false
    /// when the writer is behind or gone (the set is dropped and counted).
    pub fn submit(&self, relative: String, payload: Vec<u8>) -> bool {
        let job = Job {
            relative,
            shot: self.shot.clone(),
            payload,
        };
        match self.sink.tx.try_send(job) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.sink.counters.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}

/// The body of `alarm` as spooled. With `pending` its set is queued first (before the
/// alarm is written, so the alarm names its evidence only when the writer took it):
/// `evidence` and `evidence_files` are set, or left out when the writer is behind.
pub fn encode_alarm(
    mut alarm: AlarmPayload,
    pending: Option<&Pending>,
) -> serde_json::Result<Vec<u8>> {
    if let Some(pending) = pending {
        let path = relative(pending.shot.captured_ms, &alarm.camera, alarm.sequence);
        alarm.evidence = Some(path.clone());
        alarm.evidence_files = files::names(alarm.sequence);
        let body = serde_json::to_vec(&alarm)?;
        if pending.submit(path, body.clone()) {
            return Ok(body);
        }
        alarm.evidence = None;
        alarm.evidence_files.clear();
    }
    serde_json::to_vec(&alarm)
}

/// The running writer.
pub struct EvidenceStore {
    pub config: EvidenceConfig,
    sink: Sink,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EvidenceStore {
    /// Sweeps what a crash left, applies retention, and starts the writer thread.
    pub fn start(
        config: &EvidenceConfig,
        counters: Arc<EvidenceCounters>,
    ) -> std::io::Result<EvidenceStore> {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        let stop = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            config: config.clone(),
            counters: counters.clone(),
            encoder: StillEncoder::default(),
            index: retention::Index::default(),
            last_error_log: None,
        };
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("evidence".into())
            .spawn(move || writer.run(rx, flag))?;
        Ok(EvidenceStore {
            config: config.clone(),
            sink: Sink { tx, counters },
            stop,
            thread: Some(thread),
        })
    }

    pub fn sink(&self) -> Sink {
        self.sink.clone()
    }
}

impl Drop for EvidenceStore {
    /// Writes what is queued, then ends the thread.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Writer {
    config: EvidenceConfig,
    counters: Arc<EvidenceCounters>,
    encoder: StillEncoder,
    index: retention::Index,
    last_error_log: Option<Instant>,
}

/// How often retention by age runs when no set is written.
const AGE_CHECK_EVERY: Duration = Duration::from_secs(600);

impl Writer {
    fn run(mut self, rx: Receiver<Job>, stop: Arc<AtomicBool>) {
        let root = self.config.dir.clone();
        let swept = files::sweep(&root);
        if swept > 0 {
            tracing::warn!(
                "evidence: removed {swept} file(s) of sets a crash left incomplete in {}",
                root.display()
            );
        }
        self.index = retention::Index::scan(&root);
        tracing::info!(
            "evidence in {}: {} set(s), {} MiB",
            root.display(),
            self.index.len(),
            self.index.bytes >> 20
        );
        self.retain();
        let mut last_age_check = Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(job) => self.write(job),
                // Queued sets are written before the thread ends.
                Err(_) if stop.load(Ordering::Relaxed) => break,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
            if last_age_check.elapsed() >= AGE_CHECK_EVERY {
                last_age_check = Instant::now();
                self.retain();
            }
        }
    }

    fn write(&mut self, job: Job) {
        match self.write_set(&job) {
            Ok(bytes) => {
                let mut parts = job.relative.split('/');
                if let (Some(day), Some(camera), Some(seq)) = (
                    parts.next(),
                    parts.next(),
                    parts.next().and_then(|s| s.parse().ok()),
                ) {
                    self.index.add(day, seq, camera, bytes);
                }
                self.counters.written.fetch_add(1, Ordering::Relaxed);
                self.retain();
            }
            Err(e) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                let log_now = self
                    .last_error_log
                    .is_none_or(|at| at.elapsed() >= Duration::from_secs(60));
                if log_now {
                    self.last_error_log = Some(Instant::now());
                    tracing::error!(
                        "evidence {}: not written: {e} (more failures are counted in \
                         cras_evidence_failed_total)",
                        job.relative
                    );
                }
            }
        }
    }

    /// Writes the four files of a set; returns their size.
    fn write_set(&mut self, job: &Job) -> Result<u64, String> {
        let root = &self.config.dir;
        let (dir, seq) = job
            .relative
            .rsplit_once('/')
            .ok_or_else(|| "no sequence in the path".to_string())?;
        let dir = root.join(dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let shot = &job.shot;
        let q = self.config.jpeg_quality;
        let frame = self
            .encoder
            .encode(&shot.frame, "", q)
            .map_err(|e| e.to_string())?;
        let map = map_png(&shot.map, shot.map_hw)?;
        let text = shot.banner(&rfc3339_utc(shot.captured_ms));
        let overlay = self
            .encoder
            .encode(&shot.overlay(), &text, q)
            .map_err(|e| e.to_string())?;
        let mut total = 0;
        for (kind, bytes) in files::KINDS.into_iter().zip([
            frame.as_slice(),
            map.as_slice(),
            overlay.as_slice(),
            job.payload.as_slice(),
        ]) {
            let name = format!("{seq}{}", kind.suffix());
            files::write_atomic(&dir, &name, bytes)
                .map_err(|e| format!("{}: {e}", dir.join(&name).display()))?;
            total += bytes.len() as u64;
        }
        Ok(total)
    }

    fn retain(&mut self) {
        let oldest_ms = unix_ms() - i64::from(self.config.max_age_days) * 86_400_000;
        let oldest_day = &rfc3339_utc(oldest_ms)[..10];
        let removed = self
            .index
            .enforce(&self.config.dir, self.config.max_bytes, oldest_day);
        if removed > 0 {
            self.counters.removed.fetch_add(removed, Ordering::Relaxed);
            tracing::debug!("evidence: retention removed {removed} set(s)");
        }
        self.counters
            .bytes
            .store(self.index.bytes, Ordering::Relaxed);
    }
}

/// The map as a 16-bit grey PNG: 0 is 0.0, 65535 is 1.0 (values clamped).
fn map_png(map: &[f32], (rows, cols): (usize, usize)) -> Result<Vec<u8>, String> {
    let pixels: Vec<u16> = map
        .iter()
        .take(rows * cols)
        .map(|v| (v.clamp(0.0, 1.0) * 65535.0).round() as u16)
        .collect();
    let img = image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_raw(
        cols as u32,
        rows as u32,
        pixels,
    )
    .ok_or_else(|| "the map is smaller than its size".to_string())?;
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| format!("cannot encode the map: {e}"))?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests;
