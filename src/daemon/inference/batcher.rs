//! Batches for latency: a batch takes at most one frame per camera, and waits for more
//! only while a live camera has not yet contributed, at most `max_wait` after the first.
//!
//! A one-camera line therefore never waits (it used to pay `max_wait` on every frame),
//! and a second frame of a camera goes into the next batch instead of making this one
//! later. A camera counts as live while its queue is open and it is running; one that is
//! reconnecting, ended or failed is not waited for.

use super::super::capture::Frame;
use super::super::telemetry::{CameraState, CameraTelemetry};
use crossbeam_channel::{Receiver, Select, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Batcher {
    pub queues: Vec<Receiver<Frame>>,
    pub cameras: Vec<Arc<CameraTelemetry>>,
    pub max_batch: usize,
    pub max_wait: Duration,
    /// Queues still connected to their camera thread.
    open: Vec<bool>,
    /// Where the next round-robin pass starts, so a busy camera cannot starve a quiet one.
    next_camera: usize,
}

impl Batcher {
    pub fn new(
        queues: Vec<Receiver<Frame>>,
        cameras: Vec<Arc<CameraTelemetry>>,
        max_batch: usize,
        max_wait: Duration,
    ) -> Batcher {
        let open = vec![true; queues.len()];
        Batcher {
            queues,
            cameras,
            max_batch,
            max_wait,
            open,
            next_camera: 0,
        }
    }

    /// Whether any camera queue is still connected.
    pub fn any_open(&self) -> bool {
        self.open.iter().any(|o| *o)
    }

    /// The next batch: empty when no frame arrived within `idle` (the caller beats the
    /// watchdog and asks again).
    pub fn next(&mut self, idle: Duration) -> Vec<Frame> {
        let n = self.queues.len();
        let mut taken = vec![false; n];
        let Some(first) = self.wait(&taken, idle) else {
            return Vec::new();
        };
        mark(&mut taken, &first);
        let mut batch = vec![first];
        let deadline = Instant::now() + self.max_wait;
        while batch.len() < self.max_batch {
            // What is already waiting, round-robin from after the last camera served.
            for k in 0..n {
                let i = (self.next_camera + k) % n;
                if batch.len() >= self.max_batch {
                    break;
                }
                if !taken[i]
                    && let Ok(f) = self.queues[i].try_recv()
                {
                    taken[i] = true;
                    batch.push(f);
                }
            }
            self.next_camera = (self.next_camera + 1) % n.max(1);
            if batch.len() >= self.max_batch || !self.someone_missing(&taken) {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match self.wait(&taken, deadline - now) {
                Some(f) => {
                    mark(&mut taken, &f);
                    batch.push(f);
                }
                None => break,
            }
        }
        batch
    }

    /// Whether a live camera has not contributed to the batch yet.
    fn someone_missing(&self, taken: &[bool]) -> bool {
        (0..self.queues.len()).any(|i| !taken[i] && self.live(i))
    }

    fn live(&self, i: usize) -> bool {
        self.open[i] && matches!(self.cameras[i].state(), CameraState::Running)
    }

    /// The first frame to arrive within `timeout` on an open queue not yet `taken`; a
    /// queue found closed on the way is marked so and the wait goes on.
    fn wait(&mut self, taken: &[bool], timeout: Duration) -> Option<Frame> {
        let deadline = Instant::now() + timeout;
        loop {
            let waiting: Vec<usize> = (0..self.queues.len())
                .filter(|i| self.open[*i] && !taken[*i])
                .collect();
            if waiting.is_empty() {
                return None;
            }
            let mut sel = Select::new();
            for i in &waiting {
                sel.recv(&self.queues[*i]);
            }
            let op = sel
                .select_timeout(deadline.saturating_duration_since(Instant::now()))
                .ok()?;
            let i = waiting[op.index()];
            match op.recv(&self.queues[i]) {
                Ok(f) => return Some(f),
                // Its camera thread ended; drain nothing more from it.
                Err(_) => {
                    if matches!(self.queues[i].try_recv(), Err(TryRecvError::Disconnected)) {
                        self.open[i] = false;
                    }
                }
            }
        }
    }
}

/// Notes that `f`'s camera is in the batch.
fn mark(taken: &mut [bool], f: &Frame) {
    if let Some(t) = taken.get_mut(f.camera) {
        *t = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::{Sender, bounded};

    fn frame(camera: usize, number: u64) -> Frame {
        Frame {
            camera,
            number,
            captured_ms: 0,
            captured: Instant::now(),
            pixels: crate::daemon::capture::Pixels::Host(image::RgbImage::new(4, 4)),
        }
    }

    fn line(cameras: usize, max_batch: usize, max_wait: Duration) -> (Batcher, Vec<Sender<Frame>>) {
        let mut txs = Vec::new();
        let mut rxs = Vec::new();
        let mut tels = Vec::new();
        for i in 0..cameras {
            let (tx, rx) = bounded(4);
            txs.push(tx);
            rxs.push(rx);
            let t = Arc::new(CameraTelemetry::new(&format!("cam{i}")));
            t.force_state(CameraState::Running);
            tels.push(t);
        }
        (Batcher::new(rxs, tels, max_batch, max_wait), txs)
    }

    fn cameras_of(batch: &[Frame]) -> Vec<usize> {
        let mut c: Vec<usize> = batch.iter().map(|f| f.camera).collect();
        c.sort();
        c
    }

    // An hour of max_wait: a batch that came back did not wait for its deadline.
    const FOREVER: Duration = Duration::from_secs(3600);

    #[test]
    fn one_camera_does_not_wait_for_more() {
        let (mut b, txs) = line(1, 4, FOREVER);
        txs[0].send(frame(0, 1)).unwrap();
        let batch = b.next(FOREVER);
        assert_eq!(cameras_of(&batch), [0]);
    }

    #[test]
    fn a_batch_takes_one_frame_per_camera() {
        let (mut b, txs) = line(2, 4, FOREVER);
        txs[0].send(frame(0, 1)).unwrap();
        txs[0].send(frame(0, 2)).unwrap();
        txs[1].send(frame(1, 1)).unwrap();
        let first = b.next(FOREVER);
        assert_eq!(cameras_of(&first), [0, 1]);
        assert_eq!(first.iter().find(|f| f.camera == 0).unwrap().number, 1);
        txs[1].send(frame(1, 2)).unwrap();
        let second = b.next(FOREVER);
        assert_eq!(cameras_of(&second), [0, 1]);
        assert_eq!(second.iter().find(|f| f.camera == 0).unwrap().number, 2);
    }

    #[test]
    fn it_stops_waiting_once_every_live_camera_has_a_frame_in() {
        let (mut b, txs) = line(3, 8, FOREVER);
        // cam2 is reconnecting: nothing to wait for.
        b.cameras[2].force_state(CameraState::Reconnecting {
            reason: "gone".into(),
            attempt: 1,
            retry_in_s: 1.0,
        });
        txs[0].send(frame(0, 1)).unwrap();
        let late = txs[1].clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            late.send(frame(1, 1)).unwrap();
        });
        let batch = b.next(FOREVER);
        t.join().unwrap();
        assert_eq!(cameras_of(&batch), [0, 1], "waited for cam1, not for cam2");
    }

    #[test]
    fn a_silent_live_camera_costs_at_most_max_wait() {
        let (mut b, txs) = line(2, 4, Duration::from_millis(30));
        txs[0].send(frame(0, 1)).unwrap();
        let batch = b.next(FOREVER);
        assert_eq!(cameras_of(&batch), [0]);
    }

    #[test]
    fn max_batch_caps_a_batch_of_many_cameras() {
        // The second batch waits max_wait for the four cameras just served.
        let (mut b, txs) = line(6, 4, Duration::from_millis(30));
        for (i, tx) in txs.iter().enumerate() {
            tx.send(frame(i, 1)).unwrap();
        }
        assert_eq!(b.next(FOREVER).len(), 4);
        assert_eq!(b.next(FOREVER).len(), 2);
    }

    #[test]
    fn a_closed_queue_is_noticed_and_not_waited_for() {
        let (mut b, mut txs) = line(2, 4, FOREVER);
        txs.remove(1); // cam1's thread ended
        txs[0].send(frame(0, 1)).unwrap();
        let batch = b.next(FOREVER);
        assert_eq!(cameras_of(&batch), [0]);
        assert!(b.any_open());
        drop(txs);
        assert!(b.next(Duration::from_millis(10)).is_empty());
        assert!(!b.any_open());
    }
}
