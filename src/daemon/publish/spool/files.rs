//! The spool's files on disk: which names are the spool's own, durable writes (temporary
//! name, fsync, rename, fsync of the folder) that leave no partial or empty file behind,
//! and the sequence counter.

use std::io::Write;
use std::path::{Path, PathBuf};

pub const COUNTER: &str = "next-sequence";
const ALARM_SUFFIX: &str = ".alarm";
const DIGITS: usize = 20;

/// The file of alarm `seq`: `<20 digits>.alarm`.
pub fn alarm_name(seq: u64) -> String {
    format!("{seq:0width$}{ALARM_SUFFIX}", width = DIGITS)
}

pub fn counter_path(dir: &Path) -> PathBuf {
    dir.join(COUNTER)
}

/// What a name in the spool folder is.
#[derive(Debug, PartialEq)]
pub enum Entry {
    Alarm(u64),
    /// The spool's own write that stopped before its rename.
    Interrupted,
    /// Not the spool's: left alone, not counted.
    Other,
}

fn alarm_sequence(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(ALARM_SUFFIX)?;
    if digits.len() != DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub fn classify(name: &str) -> Entry {
    if let Some(seq) = alarm_sequence(name) {
        return Entry::Alarm(seq);
    }
    match name.strip_suffix(".tmp") {
        Some(inner) if inner == COUNTER || alarm_sequence(inner).is_some() => Entry::Interrupted,
        _ => Entry::Other,
    }
}

/// Whether a write failed because the disk (or the quota) is full.
pub fn is_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `dir/name` so that a crash leaves the old file or the whole new one, and a
/// failed write leaves nothing.
pub fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, dir.join(name))) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// The next sequence number as last reserved: None if there is no counter (a new spool),
/// Err with the reason if the file is there but unreadable.
pub fn read_counter(dir: &Path) -> Result<Option<u64>, String> {
    match std::fs::read_to_string(counter_path(dir)) {
        Ok(text) => text
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| "not a number".to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_spools_own_names_count() {
        assert_eq!(classify(&alarm_name(42)), Entry::Alarm(42));
        assert_eq!(classify("00001.alarm"), Entry::Other, "not 20 digits");
        assert_eq!(classify("+0000000000000000001.alarm"), Entry::Other);
        assert_eq!(
            classify(&format!("{}.tmp", alarm_name(7))),
            Entry::Interrupted
        );
        assert_eq!(classify("next-sequence.tmp"), Entry::Interrupted);
        assert_eq!(classify("notes.tmp"), Entry::Other);
        assert_eq!(
            classify(&format!("{}.unreadable", alarm_name(7))),
            Entry::Other
        );
    }

    #[test]
    fn a_failed_durable_write_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        // A folder where the file should go makes the rename fail after the write.
        std::fs::create_dir(dir.path().join("x")).unwrap();
        std::fs::write(dir.path().join("x").join("inside"), b"").unwrap();
        assert!(write_durably(dir.path(), "x", b"data").is_err());
        assert!(!dir.path().join("x.tmp").exists());
        write_durably(dir.path(), "y", b"data").unwrap();
        assert_eq!(std::fs::read(dir.path().join("y")).unwrap(), b"data");
        assert!(!dir.path().join("y.tmp").exists());
    }

    #[test]
    fn the_counter_is_missing_readable_or_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_counter(dir.path()), Ok(None));
        write_durably(dir.path(), COUNTER, b"17").unwrap();
        assert_eq!(read_counter(dir.path()), Ok(Some(17)));
        std::fs::write(counter_path(dir.path()), b"\0\0garbage").unwrap();
        assert!(read_counter(dir.path()).is_err());
    }
}
