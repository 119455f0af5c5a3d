//! How many per-frame results a camera may publish: a token bucket per camera.
//!
//! Results are judged in batches, so several frames of one camera reach the publisher
//! within a millisecond. A plain "one per 1/rate seconds" gate dropped all but the first
//! of each batch even when the camera ran far below the rate. The bucket holds up to one
//! second's worth of results (at least one): a batch passes whole, the long-run rate
//! stays at `rate_hz`.

use std::collections::BTreeMap;
use std::time::Instant;

pub struct ResultRate {
    rate_hz: f64,
    buckets: BTreeMap<String, (f64, Instant)>,
}

impl ResultRate {
    /// `rate_hz` 0 publishes nothing.
    pub fn new(rate_hz: f64) -> Self {
        Self {
            rate_hz,
            buckets: BTreeMap::new(),
        }
    }

    fn capacity(&self) -> f64 {
        self.rate_hz.max(1.0)
    }

    /// Whether a result of `camera` may go out at `now`; takes its token if so.
    pub fn admit(&mut self, camera: &str, now: Instant) -> bool {
        if self.rate_hz <= 0.0 {
            return false;
        }
        let capacity = self.capacity();
        let rate = self.rate_hz;
        let (tokens, last) = self
            .buckets
            .entry(camera.to_string())
            .or_insert((capacity, now));
        let refill = now.saturating_duration_since(*last).as_secs_f64() * rate;
        *tokens = (*tokens + refill).min(capacity);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn admitted(r: &mut ResultRate, cam: &str, at: Instant, n: usize) -> usize {
        (0..n).filter(|_| r.admit(cam, at)).count()
    }

    #[test]
    fn a_batch_passes_whole_and_the_long_run_rate_holds() {
        let t0 = Instant::now();
        let mut r = ResultRate::new(10.0);
        // A batch of 8 frames at once: all pass (the bucket holds 10).
        assert_eq!(admitted(&mut r, "cam1", t0, 8), 8);
        // Two left, then empty.
        assert_eq!(admitted(&mut r, "cam1", t0, 8), 2);
        // 100 frames per second for 10 s: about 10 per second get through.
        let mut passed = 0;
        for i in 1..=1000u64 {
            let at = t0 + Duration::from_millis(10 * i);
            passed += admitted(&mut r, "cam1", at, 1);
        }
        assert!((99..=101).contains(&passed), "{passed}");
        // Cameras do not share a bucket.
        assert_eq!(admitted(&mut r, "cam2", t0, 10), 10);
    }

    #[test]
    fn slow_rates_allow_one_at_a_time_and_zero_allows_none() {
        let t0 = Instant::now();
        let mut r = ResultRate::new(0.5);
        assert_eq!(admitted(&mut r, "cam1", t0, 3), 1);
        assert_eq!(admitted(&mut r, "cam1", t0 + Duration::from_secs(1), 1), 0);
        assert_eq!(admitted(&mut r, "cam1", t0 + Duration::from_secs(2), 1), 1);
        let mut off = ResultRate::new(0.0);
        assert_eq!(admitted(&mut off, "cam1", t0, 5), 0);
    }
}
