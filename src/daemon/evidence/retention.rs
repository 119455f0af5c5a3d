//! Retention: the store keeps at most `max_bytes` and nothing older than `max_age_days`
//! days; the oldest day goes first, and within a day the oldest alarm (lowest sequence).
//! The index is built from the folder at start and kept as sets are written.

use super::files::{self, KINDS};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

struct Set {
    camera: String,
    bytes: u64,
}

#[derive(Default)]
pub struct Index {
    /// (UTC day, sequence) -> the set.
    sets: BTreeMap<(String, u64), Set>,
    pub bytes: u64,
}

impl Index {
    /// The complete sets under `root` (run [`files::sweep`] first).
    pub fn scan(root: &Path) -> Index {
        let mut index = Index::default();
        for dir in files::camera_dirs(root) {
            let (Some(day), Some(camera)) = (
                dir.parent()
                    .and_then(|d| d.file_name())
                    .and_then(|d| d.to_str()),
                dir.file_name().and_then(|c| c.to_str()),
            ) else {
                continue;
            };
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut sizes: BTreeMap<u64, u64> = BTreeMap::new();
            for e in entries.flatten() {
                let name = e.file_name();
                let Some((seq, _)) = name.to_str().and_then(files::parse_name) else {
                    continue;
                };
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                *sizes.entry(seq).or_default() += len;
            }
            for (seq, bytes) in sizes {
                index.add(day, seq, camera, bytes);
            }
        }
        index
    }

    pub fn add(&mut self, day: &str, sequence: u64, camera: &str, bytes: u64) {
        let old = self.sets.insert(
            (day.to_string(), sequence),
            Set {
                camera: camera.to_string(),
                bytes,
            },
        );
        self.bytes = self.bytes + bytes - old.map_or(0, |s| s.bytes);
    }

    pub fn len(&self) -> usize {
        self.sets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    /// Removes sets from `root` until at most `max_bytes` remain and none is from a day
    /// before `oldest_day`; returns how many sets went.
    pub fn enforce(&mut self, root: &Path, max_bytes: u64, oldest_day: &str) -> u64 {
        let mut removed = 0;
        while let Some(entry) = self.sets.first_entry() {
            let too_old = entry.key().0.as_str() < oldest_day;
            if !too_old && self.bytes <= max_bytes {
                break;
            }
            let ((day, seq), set) = entry.remove_entry();
            self.bytes -= set.bytes;
            remove_set(&root.join(&day).join(&set.camera), seq);
            removed += 1;
        }
        removed
    }
}

/// Deletes one set, then its camera and day folders if they are left empty.
///
/// The files go in the reverse of the order they were written, so the JSON, which marks
/// a set complete, goes first: a kill part-way leaves files without their JSON, which the
/// start-up sweep removes, never a JSON whose images are gone.
fn remove_set(dir: &PathBuf, sequence: u64) {
    for kind in KINDS.into_iter().rev() {
        let _ = std::fs::remove_file(dir.join(format!("{sequence}{}", kind.suffix())));
    }
    // remove_dir fails on a folder that is not empty, which is what we want.
    if std::fs::remove_dir(dir).is_ok()
        && let Some(day) = dir.parent()
    {
        let _ = std::fs::remove_dir(day);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(root: &Path, day: &str, camera: &str, seq: u64, bytes: usize) {
        let dir = root.join(day).join(camera);
        std::fs::create_dir_all(&dir).unwrap();
        for kind in KINDS {
            let name = format!("{seq}{}", kind.suffix());
            std::fs::write(dir.join(name), vec![0u8; bytes]).unwrap();
        }
    }

    #[test]
    fn oldest_day_first_then_lowest_sequence_and_old_days_whatever_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        set(root, "2026-11-28", "cam1", 1, 100);
        set(root, "2026-11-29", "cam2", 2, 100);
        set(root, "2026-11-29", "cam1", 3, 100);
        set(root, "2026-11-30", "cam1", 4, 100);
        let mut index = Index::scan(root);
        assert_eq!((index.len(), index.bytes), (4, 1600));
        // Nothing to do.
        assert_eq!(index.enforce(root, 1600, "2026-11-01"), 0);
        // Over by one set: the 28th goes, with its folders.
        assert_eq!(index.enforce(root, 1200, "2026-11-01"), 1);
        assert!(!root.join("2026-11-28").exists());
        // Within the 29th, sequence 2 (cam2) before 3 (cam1).
        assert_eq!(index.enforce(root, 800, "2026-11-01"), 1);
        assert!(!root.join("2026-11-29/cam2").exists());
        assert!(root.join("2026-11-29/cam1/3.json").exists());
        // Age: the 29th is before the oldest day kept, though the size is fine.
        assert_eq!(index.enforce(root, 1 << 30, "2026-11-30"), 1);
        assert!(!root.join("2026-11-29").exists());
        assert!(root.join("2026-11-30/cam1/4.overlay.jpg").exists());
        assert_eq!((index.len(), index.bytes), (1, 400));
        // A rescan agrees with what the index kept.
        assert_eq!(Index::scan(root).bytes, 400);
    }
}
