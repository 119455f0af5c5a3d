//! The alarm spool: every alarm is on disk before it is offered to the broker, and stays
//! there until the broker has acknowledged it (PUBACK). Broker outages and daemon
//! restarts, kill -9 included, lose nothing and keep order.
//!
//! One file per alarm, named by a spool-wide sequence number (`<20 digits>.alarm`),
//! written to a temporary name, fsynced and renamed, so a crash leaves either the whole
//! alarm or nothing. Delivery state (queued / in flight / acknowledged) is a plain data
//! structure tested without a broker; acknowledging deletes the file. After a restart
//! every file is queued again: an alarm whose acknowledgement was lost in the crash is
//! sent twice, with the same content (its own sequence number inside), so a subscriber
//! can drop the duplicate. The spool is bounded: when full, the oldest alarms are
//! evicted and counted.

use crate::daemon::config::{Invalid, resolve, within};
use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Folder for alarms not yet acknowledged by the broker.
    pub dir: PathBuf,
    /// Bytes at most; when full the oldest alarms are evicted (counted and reported).
    #[serde(default = "default_spool_bytes")]
    pub max_bytes: u64,
}

fn default_spool_bytes() -> u64 {
    100 * 1024 * 1024
}

impl SpoolConfig {
    /// Resolves the folder against `base`, creates it and proves it writable.
    pub fn validate(&mut self, base: &Path) -> Result<(), Invalid> {
        self.dir = resolve(base, &self.dir);
        std::fs::create_dir_all(&self.dir).map_err(|e| {
            Invalid::new(
                "spool.dir",
                format!("cannot create {}: {e}", self.dir.display()),
            )
        })?;
        let probe = self.dir.join(".write-test");
        std::fs::write(&probe, b"").map_err(|e| {
            Invalid::new(
                "spool.dir",
                format!("{} is not writable: {e}", self.dir.display()),
            )
        })?;
        let _ = std::fs::remove_file(&probe);
        within(
            "spool.max_bytes",
            self.max_bytes,
            64 * 1024,
            1 << 40,
            " bytes",
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("alarm spool {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("alarm of {size} bytes does not fit a spool of {max} bytes")]
    TooLarge { size: u64, max: u64 },
    /// The alarm could not be encoded; nothing was stored and no sequence was used.
    #[error("alarm {sequence} cannot be encoded: {reason}")]
    Encode { sequence: u64, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Counters for /metrics and the health message.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SpoolStats {
    pub queued: usize,
    pub in_flight: usize,
    pub bytes: u64,
    pub evicted_total: u64,
    pub acknowledged_total: u64,
}

pub struct AlarmSpool {
    dir: PathBuf,
    max_bytes: u64,
    /// Not yet sent (or sent before a reconnect), oldest first: (sequence, size).
    queued: VecDeque<(u64, u64)>,
    /// Sent, waiting for the broker's acknowledgement.
    in_flight: BTreeMap<u64, u64>,
    next_seq: u64,
    bytes: u64,
    evicted_total: u64,
    acknowledged_total: u64,
}

const SEQUENCE_FILE: &str = "next-sequence";

fn file_name(seq: u64) -> String {
    format!("{seq:020}.alarm")
}

impl AlarmSpool {
    /// Opens (creating) the spool folder and queues every alarm found there, oldest first.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<AlarmSpool, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut found = Vec::new();
        for e in std::fs::read_dir(dir).map_err(io(dir))? {
            let e = e.map_err(io(dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                // A write interrupted before its rename: it was never accepted.
                let _ = std::fs::remove_file(e.path());
                continue;
            }
            if let Some(seq) = name
                .strip_suffix(".alarm")
                .and_then(|s| s.parse::<u64>().ok())
            {
                let size = e.metadata().map_err(io(&e.path()))?.len();
                found.push((seq, size));
            }
        }
        found.sort();
        let bytes = found.iter().map(|f| f.1).sum();
        // Sequence numbers never repeat, even after the spool emptied and the daemon
        // restarted: subscribers use them to drop duplicates.
        let counter = std::fs::read_to_string(dir.join(SEQUENCE_FILE))
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let next_seq = found.last().map(|f| f.0 + 1).unwrap_or(0).max(counter);
        Ok(AlarmSpool {
            dir: dir.to_path_buf(),
            max_bytes,
            queued: found.into(),
            in_flight: BTreeMap::new(),
            next_seq,
            bytes,
            evicted_total: 0,
            acknowledged_total: 0,
        })
    }

    /// Stores an alarm durably; returns its spool sequence number. Evicts the oldest
    /// alarms if the spool would exceed its size.
    pub fn push(&mut self, payload: &[u8]) -> Result<u64, SpoolError> {
        self.push_with(|_| Ok(payload.to_vec()))
    }

    /// Like [`AlarmSpool::push`], with the payload built from the sequence number it gets
    /// (so that the alarm can carry it). A builder that fails stores nothing.
    pub fn push_with(
        &mut self,
        build: impl FnOnce(u64) -> Result<Vec<u8>, SpoolError>,
    ) -> Result<u64, SpoolError> {
        let payload = build(self.next_seq)?;
        let size = payload.len() as u64;
        if size > self.max_bytes {
            return Err(SpoolError::TooLarge {
                size,
                max: self.max_bytes,
            });
        }
        while self.bytes + size > self.max_bytes {
            if !self.evict_oldest()? {
                break;
            }
        }
        let seq = self.next_seq;
        let path = self.dir.join(file_name(seq));
        let tmp = self.dir.join(format!("{}.tmp", file_name(seq)));
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&payload).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        self.next_seq += 1;
        let counter = self.dir.join(SEQUENCE_FILE);
        let tmp = self.dir.join(format!("{SEQUENCE_FILE}.tmp"));
        std::fs::write(&tmp, self.next_seq.to_string()).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &counter).map_err(io(&counter))?;
        self.bytes += size;
        self.queued.push_back((seq, size));
        Ok(seq)
    }

    /// Evicts the oldest alarm, queued or in flight; false when the spool is empty.
    fn evict_oldest(&mut self) -> Result<bool, SpoolError> {
        let oldest_queued = self.queued.front().map(|x| x.0);
        let oldest_flight = self.in_flight.keys().next().copied();
        let seq = match (oldest_queued, oldest_flight) {
            (Some(q), Some(f)) => q.min(f),
            (Some(q), None) => q,
            (None, Some(f)) => f,
            (None, None) => return Ok(false),
        };
        let size = if oldest_queued == Some(seq) {
            self.queued.pop_front().map(|x| x.1).unwrap_or(0)
        } else {
            self.in_flight.remove(&seq).unwrap_or(0)
        };
        self.remove_file(seq)?;
        self.bytes -= size;
        self.evicted_total += 1;
        Ok(true)
    }

    fn remove_file(&self, seq: u64) -> Result<(), SpoolError> {
        let path = self.dir.join(file_name(seq));
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Takes the oldest queued alarm to send: it moves to in flight.
    pub fn next_to_send(&mut self) -> Result<Option<(u64, Vec<u8>)>, SpoolError> {
        let Some((seq, size)) = self.queued.pop_front() else {
            return Ok(None);
        };
        let path = self.dir.join(file_name(seq));
        let payload = std::fs::read(&path).map_err(io(&path))?;
        self.in_flight.insert(seq, size);
        Ok(Some((seq, payload)))
    }

    /// The broker acknowledged `seq`: forget it for good.
    pub fn acknowledge(&mut self, seq: u64) -> Result<(), SpoolError> {
        if let Some(size) = self.in_flight.remove(&seq) {
            self.remove_file(seq)?;
            self.bytes -= size;
            self.acknowledged_total += 1;
        }
        Ok(())
    }

    /// The connection dropped: everything in flight goes back to the front of the queue,
    /// in order, to be sent again.
    pub fn requeue_in_flight(&mut self) {
        let flight = std::mem::take(&mut self.in_flight);
        for (seq, size) in flight.into_iter().rev() {
            self.queued.push_front((seq, size));
        }
    }

    pub fn stats(&self) -> SpoolStats {
        SpoolStats {
            queued: self.queued.len(),
            in_flight: self.in_flight.len(),
            bytes: self.bytes,
            evicted_total: self.evicted_total,
            acknowledged_total: self.acknowledged_total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(s: &mut AlarmSpool) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some((seq, p)) = s.next_to_send().unwrap() {
            s.acknowledge(seq).unwrap();
            out.push(p);
        }
        out
    }

    #[test]
    fn order_is_kept_across_requeue_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = AlarmSpool::open(dir.path(), 1 << 20).unwrap();
        for i in 0..5 {
            s.push(format!("a{i}").as_bytes()).unwrap();
        }
        let (s0, p0) = s.next_to_send().unwrap().unwrap();
        let (_s1, _) = s.next_to_send().unwrap().unwrap();
        assert_eq!(p0, b"a0");
        s.acknowledge(s0).unwrap();
        // Broker gone: a1 was in flight and comes back first.
        s.requeue_in_flight();
        assert_eq!(s.stats().queued, 4);
        drop(s);
        // Restart (as after kill -9): the unacknowledged alarms are all there, in order.
        let mut s = AlarmSpool::open(dir.path(), 1 << 20).unwrap();
        let rest: Vec<Vec<u8>> = drain(&mut s);
        assert_eq!(
            rest,
            vec![
                b"a1".to_vec(),
                b"a2".to_vec(),
                b"a3".to_vec(),
                b"a4".to_vec()
            ]
        );
        assert_eq!(s.stats().bytes, 0);
        // Sequence numbers continue after a restart, even with an empty spool.
        let mut s = AlarmSpool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            s.push_with(|seq| Ok(format!("alarm {seq}").into_bytes()))
                .unwrap(),
            5
        );
        assert_eq!(s.next_to_send().unwrap().unwrap().1, b"alarm 5");
    }

    #[test]
    fn in_flight_alarms_survive_a_crash_and_are_resent() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = AlarmSpool::open(dir.path(), 1 << 20).unwrap();
        s.push(b"first").unwrap();
        s.push(b"second").unwrap();
        let _ = s.next_to_send().unwrap();
        // Crash before the PUBACK arrived: no acknowledge, no requeue.
        drop(s);
        let mut s = AlarmSpool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(drain(&mut s), vec![b"first".to_vec(), b"second".to_vec()]);
    }

    #[test]
    fn full_spool_evicts_oldest_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = AlarmSpool::open(dir.path(), 10).unwrap();
        for p in ["aaaa", "bbbb", "cccc", "dddd"] {
            s.push(p.as_bytes()).unwrap();
        }
        let st = s.stats();
        assert_eq!((st.queued, st.bytes, st.evicted_total), (2, 8, 2));
        assert_eq!(drain(&mut s), vec![b"cccc".to_vec(), b"dddd".to_vec()]);
        assert!(matches!(
            s.push(&[0u8; 11]),
            Err(SpoolError::TooLarge { .. })
        ));
    }

    #[test]
    fn interrupted_writes_are_discarded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(format!("{}.tmp", file_name(7))), b"half").unwrap();
        std::fs::write(dir.path().join(file_name(3)), b"whole").unwrap();
        let mut s = AlarmSpool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.push(b"next").unwrap(), 4);
        assert_eq!(drain(&mut s), vec![b"whole".to_vec(), b"next".to_vec()]);
        assert!(!dir.path().join(format!("{}.tmp", file_name(7))).exists());
    }
}
