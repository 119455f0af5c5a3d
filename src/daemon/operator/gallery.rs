//! What the HTTP server shows besides numbers: the last judged frame of each camera as a
//! JPEG (`/cameras/<id>/latest.jpg`, for HMIs) and where the evidence store is.
//!
//! The judging stage hands every judged frame over (a pointer swap, no copy); the JPEG
//! is drawn and encoded only when asked for, at most once per camera per
//! [`LATEST_EVERY`], and served from the cache in between, so any number of polling
//! clients costs at most two encodes per camera and second.

use super::Shot;
use super::still::{StillEncoder, StillError};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A cached `latest.jpg` is served for at least this long before a newer frame is drawn.
pub const LATEST_EVERY: Duration = Duration::from_millis(500);
/// JPEG quality of `latest.jpg`.
pub const LATEST_QUALITY: u8 = 80;

struct Cached {
    frame_number: u64,
    at: Instant,
    jpeg: Arc<Vec<u8>>,
}

#[derive(Default)]
struct Slot {
    shot: Option<Arc<Shot>>,
    cached: Option<Cached>,
}

/// The answer to a `latest.jpg` request.
pub enum Latest {
    /// No frame of this camera judged yet.
    NotYet,
    Jpeg(Arc<Vec<u8>>),
    Failed(StillError),
}

#[derive(Default)]
pub struct Gallery {
    slots: Mutex<BTreeMap<String, Slot>>,
    encoder: Mutex<StillEncoder>,
    evidence_root: Mutex<Option<PathBuf>>,
}

impl Gallery {
    /// The judging stage's hand-over of a judged frame.
    pub fn show(&self, shot: Arc<Shot>) {
        if let Ok(mut slots) = self.slots.lock() {
            let camera = shot.camera.clone();
            slots.entry(camera).or_default().shot = Some(shot);
        }
    }

    /// Forgets cameras no longer configured (after a reload).
    pub fn keep_only(&self, cameras: &[String]) {
        if let Ok(mut slots) = self.slots.lock() {
            slots.retain(|id, _| cameras.contains(id));
        }
    }

    /// The last judged frame of `camera` as a JPEG, drawn anew when the cached one is
    /// older than [`LATEST_EVERY`] and a newer frame exists.
    pub fn latest_jpeg(&self, camera: &str) -> Latest {
        let (shot, cached) = {
            let Ok(slots) = self.slots.lock() else {
                return Latest::NotYet;
            };
            let Some(slot) = slots.get(camera) else {
                return Latest::NotYet;
            };
            let Some(shot) = slot.shot.clone() else {
                return Latest::NotYet;
            };
            let cached = slot.cached.as_ref().map(|c| c.jpeg.clone());
            let fresh = slot.cached.as_ref().is_some_and(|c| {
                c.frame_number == shot.frame_number || c.at.elapsed() < LATEST_EVERY
            });
            if let (true, Some(jpeg)) = (fresh, &cached) {
                return Latest::Jpeg(jpeg.clone());
            }
            (shot, cached)
        };
        // One encode at a time; a request arriving meanwhile gets the cached picture.
        let mut encoder = match (self.encoder.try_lock(), cached) {
            (Ok(e), _) => e,
            (Err(_), Some(jpeg)) => return Latest::Jpeg(jpeg),
            (Err(_), None) => match self.encoder.lock() {
                Ok(e) => e,
                Err(_) => return Latest::NotYet,
            },
        };
        let text = shot.banner(&crate::clock::rfc3339_utc(shot.captured_ms));
        let jpeg = match encoder.encode(&shot.overlay(), &text, LATEST_QUALITY) {
            Ok(j) => Arc::new(j),
            Err(e) => return Latest::Failed(e),
        };
        if let Ok(mut slots) = self.slots.lock()
            && let Some(slot) = slots.get_mut(camera)
        {
            slot.cached = Some(Cached {
                frame_number: shot.frame_number,
                at: Instant::now(),
                jpeg: jpeg.clone(),
            });
        }
        Latest::Jpeg(jpeg)
    }

    pub fn set_evidence_root(&self, root: Option<PathBuf>) {
        if let Ok(mut r) = self.evidence_root.lock() {
            *r = root;
        }
    }

    /// The evidence store's folder, when the store is on.
    pub fn evidence_root(&self) -> Option<PathBuf> {
        self.evidence_root.lock().ok().and_then(|r| r.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shot(camera: &str, n: u64) -> Arc<Shot> {
        Arc::new(Shot {
            camera: camera.into(),
            frame_number: n,
            ..Shot::example(64, 48, false)
        })
    }

    #[test]
    fn encodes_once_per_interval_and_forgets_removed_cameras() {
        gstreamer::init().unwrap();
        let g = Gallery::default();
        assert!(matches!(g.latest_jpeg("cam1"), Latest::NotYet));
        g.show(shot("cam1", 1));
        let Latest::Jpeg(first) = g.latest_jpeg("cam1") else {
            panic!("no picture")
        };
        assert_eq!(
            image::load_from_memory(&first)
                .unwrap()
                .to_rgb8()
                .dimensions(),
            (64, 48)
        );
        // A newer frame within the interval: the cached picture (the same allocation).
        g.show(shot("cam1", 2));
        let Latest::Jpeg(second) = g.latest_jpeg("cam1") else {
            panic!("no picture")
        };
        assert!(Arc::ptr_eq(&first, &second));
        std::thread::sleep(LATEST_EVERY);
        let Latest::Jpeg(third) = g.latest_jpeg("cam1") else {
            panic!("no picture")
        };
        assert!(!Arc::ptr_eq(&first, &third));
        g.keep_only(&["cam2".to_string()]);
        assert!(matches!(g.latest_jpeg("cam1"), Latest::NotYet));
    }
}
