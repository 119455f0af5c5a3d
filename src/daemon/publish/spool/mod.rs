//! The alarm spool: every alarm is on disk before it is offered to the broker, and stays
//! there until the broker has acknowledged it (PUBACK). Broker outages and daemon
//! restarts, kill -9 included, lose nothing and keep order.
//!
//! One file per alarm, named by a spool-wide sequence number (`<20 digits>.alarm`),
//! holding the alarm's payload (not its topic: the topic comes from the configuration at
//! send time). Delivery state (queued / in flight / acknowledged) is a plain data
//! structure tested without a broker; acknowledging deletes the file. After a restart
//! every file is queued again: an alarm whose acknowledgement was lost in the crash is
//! sent twice, with the same content (its own sequence number inside), so a subscriber
//! can drop the duplicate.
//!
//! Sequence numbers are never reused and never skipped silently. The next one is reserved
//! on disk ([`files`], fsynced) before the alarm is written, so an alarm on disk always
//! has a number below the counter; an alarm that cannot be written after that (the disk
//! is full even after evicting every older alarm) is counted as lost and leaves a gap a
//! subscriber can see. The spool is bounded: when full, the oldest alarms are evicted and
//! counted. It touches only its own files.

mod files;

use crate::daemon::config::{Invalid, within, writable_dir};
use std::collections::{BTreeMap, VecDeque};
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
        writable_dir("spool.dir", base, &mut self.dir)?;
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
    /// Sequence `sequence` was reserved but its alarm could not be written: a gap.
    #[error("alarm {sequence} lost (a gap in the sequence): {source}")]
    Lost {
        sequence: u64,
        source: std::io::Error,
    },
    #[error(
        "alarm spool {path}: the sequence counter is unreadable ({reason}) and no alarm in the \
         spool tells where it was; to restart numbering at 0 (subscribers that drop \
         duplicates by sequence must be reset too), delete the file"
    )]
    Counter { path: PathBuf, reason: String },
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
    /// Alarms that could not be stored or read back (each one logged).
    pub lost_total: u64,
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
    lost_total: u64,
    /// Test seam: the next this-many alarm writes fail as on a full disk.
    #[cfg(test)]
    full_disk_writes: usize,
}

impl AlarmSpool {
    /// Opens (creating) the spool folder and queues every alarm found there, oldest first.
    /// Only the spool's own files are looked at; its own interrupted writes are removed.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<AlarmSpool, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut found = Vec::new();
        for e in std::fs::read_dir(dir).map_err(io(dir))? {
            let e = e.map_err(io(dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            match files::classify(&name) {
                files::Entry::Alarm(seq) => {
                    let size = e.metadata().map_err(io(&e.path()))?.len();
                    found.push((seq, size));
                }
                // A write interrupted before its rename: it was never accepted.
                files::Entry::Interrupted => {
                    let _ = std::fs::remove_file(e.path());
                }
                files::Entry::Other => {}
            }
        }
        found.sort();
        let bytes = found.iter().map(|f| f.1).sum();
        let highest = found.last().map(|f| f.0 + 1);
        let next_seq = match files::read_counter(dir) {
            Ok(Some(counter)) => counter.max(highest.unwrap_or(0)),
            Ok(None) => highest.unwrap_or(0),
            Err(reason) => match highest {
                Some(h) => {
                    tracing::warn!(
                        "alarm spool {}: the sequence counter is unreadable ({reason}); continuing after the highest alarm in the spool, {}",
                        dir.display(),
                        h - 1
                    );
                    h
                }
                None => {
                    return Err(SpoolError::Counter {
                        path: files::counter_path(dir),
                        reason,
                    });
                }
            },
        };
        Ok(AlarmSpool {
            dir: dir.to_path_buf(),
            max_bytes,
            queued: found.into(),
            in_flight: BTreeMap::new(),
            next_seq,
            bytes,
            evicted_total: 0,
            acknowledged_total: 0,
            lost_total: 0,
            #[cfg(test)]
            full_disk_writes: 0,
        })
    }

    /// Stores an alarm durably; returns its spool sequence number. Evicts the oldest
    /// alarms if the spool would exceed its size.
    pub fn push(&mut self, payload: &[u8]) -> Result<u64, SpoolError> {
        self.push_with(|_| Ok(payload.to_vec()))
    }

    /// Like [`AlarmSpool::push`], with the payload built from the sequence number it gets
    /// (so that the alarm can carry it). A builder that fails stores nothing and uses no
    /// sequence number; any later failure uses one (a gap) and counts the alarm as lost.
    pub fn push_with(
        &mut self,
        build: impl FnOnce(u64) -> Result<Vec<u8>, SpoolError>,
    ) -> Result<u64, SpoolError> {
        let seq = self.next_seq;
        let payload = build(seq)?;
        let size = payload.len() as u64;
        // From here the number is used whatever happens: a failure below is a loss with
        // a gap, never a number given twice.
        self.next_seq = seq + 1;
        let lost = |s: &mut Self, source| {
            s.lost_total += 1;
            SpoolError::Lost {
                sequence: seq,
                source,
            }
        };
        // Reserve the number on disk first: an alarm on disk is always below the counter.
        let counter = (seq + 1).to_string();
        if let Err(source) = self.write_making_room(files::COUNTER, counter.as_bytes()) {
            return Err(lost(self, source));
        }
        if size > self.max_bytes {
            self.lost_total += 1;
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
        if let Err(source) = self.write_making_room(&files::alarm_name(seq), &payload) {
            return Err(lost(self, source));
        }
        self.bytes += size;
        self.queued.push_back((seq, size));
        Ok(seq)
    }

    /// Writes `name` durably; while the disk is full, the oldest alarm makes room (the
    /// newest alarm is worth more than the oldest).
    fn write_making_room(&mut self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        loop {
            match self.disk_write(name, bytes) {
                Err(e) if files::is_full(&e) && matches!(self.evict_oldest(), Ok(true)) => {
                    continue;
                }
                other => return other,
            }
        }
    }

    fn disk_write(&mut self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        #[cfg(test)]
        if self.full_disk_writes > 0 {
            self.full_disk_writes -= 1;
            return Err(std::io::ErrorKind::StorageFull.into());
        }
        files::write_durably(&self.dir, name, bytes)
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
        let path = self.dir.join(files::alarm_name(seq));
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
        let path = self.dir.join(files::alarm_name(seq));
        let payload = match std::fs::read(&path) {
            Ok(p) => p,
            Err(e) => {
                self.queued.push_front((seq, size));
                return Err(io(&path)(e));
            }
        };
        self.in_flight.insert(seq, size);
        Ok(Some((seq, payload)))
    }

    /// The alarm `seq` taken by [`AlarmSpool::next_to_send`] was not handed to the
    /// broker after all: it goes back to the front of the queue, in order.
    pub fn unsend(&mut self, seq: u64) {
        if let Some(size) = self.in_flight.remove(&seq) {
            let at = self.queued.partition_point(|(s, _)| *s < seq);
            self.queued.insert(at, (seq, size));
        }
    }

    /// An alarm that cannot be sent (its file is not an alarm): renamed to
    /// `<name>.unreadable` for inspection, out of the queue, counted as lost.
    pub fn set_aside(&mut self, seq: u64) -> Result<(), SpoolError> {
        if let Some(size) = self.in_flight.remove(&seq) {
            let path = self.dir.join(files::alarm_name(seq));
            let aside = self
                .dir
                .join(format!("{}.unreadable", files::alarm_name(seq)));
            std::fs::rename(&path, &aside).map_err(io(&path))?;
            self.bytes -= size;
            self.lost_total += 1;
        }
        Ok(())
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
            lost_total: self.lost_total,
        }
    }
}

#[cfg(test)]
mod tests;
