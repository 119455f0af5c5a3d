//! The evidence store's files: names, writing a set so that a crash leaves no torn file,
//! the start-up sweep of what a crash left, and the mapping of a request path to a file
//! (nothing outside the store, no listing).
//!
//! One alarm's set lives in `<root>/<UTC date>/<camera>/` as `<sequence>.jpg` (the frame
//! as captured), `<sequence>.map.png` (the anomaly map, 16-bit grey), `<sequence>.overlay.jpg`
//! (what the operator saw) and `<sequence>.json` (the alarm payload). Each is written to
//! `.<name>.tmp`, synced and renamed; the JSON goes last, so a set with its JSON is
//! complete.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The files of one set, in the order they are renamed into place (JSON last).
pub const KINDS: [Kind; 4] = [Kind::Frame, Kind::Map, Kind::Overlay, Kind::Payload];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Frame,
    Map,
    Overlay,
    Payload,
}

impl Kind {
    pub fn suffix(self) -> &'static str {
        match self {
            Kind::Frame => ".jpg",
            Kind::Map => ".map.png",
            Kind::Overlay => ".overlay.jpg",
            Kind::Payload => ".json",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Kind::Frame | Kind::Overlay => "image/jpeg",
            Kind::Map => "image/png",
            Kind::Payload => "application/json",
        }
    }
}

/// The file names of alarm `sequence`'s set, in [`KINDS`] order.
pub fn names(sequence: u64) -> Vec<String> {
    KINDS
        .iter()
        .map(|k| format!("{sequence}{}", k.suffix()))
        .collect()
}

/// `<sequence><suffix>` -> (sequence, kind); anything else is not a file of the store.
pub fn parse_name(name: &str) -> Option<(u64, Kind)> {
    let digits = name.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || digits > 20 {
        return None;
    }
    let (seq, suffix) = name.split_at(digits);
    let kind = KINDS.into_iter().find(|k| k.suffix() == suffix)?;
    Some((seq.parse().ok()?, kind))
}

/// `YYYY-MM-DD`, digits where digits belong.
pub fn is_day(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10
        && b.iter().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }
        })
}

/// The file a request for `/evidence/<rest>` names, or None: exactly
/// `<day>/<camera>/<sequence><suffix>`, each part checked, so `..`, encoded separators,
/// folders (no listing) and anything the store did not write are refused. Returns the
/// set's JSON too: a file is served only once its set is complete.
pub fn request(root: &Path, rest: &str) -> Option<(PathBuf, Kind, PathBuf)> {
    let mut parts = rest.split('/');
    let (day, camera, name) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !is_day(day) || !crate::daemon::config::topic_safe(camera) {
        return None;
    }
    let (sequence, kind) = parse_name(name)?;
    let dir = root.join(day).join(camera);
    let json = dir.join(format!("{sequence}{}", Kind::Payload.suffix()));
    Some((dir.join(name), kind, json))
}

/// Writes `bytes` as `dir/name` through `.name.tmp`, synced before the rename.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let r = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
        std::fs::rename(&tmp, dir.join(name))
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Removes what a crash left in `root`: temporary files and sets without their JSON.
/// Returns how many files went.
pub fn sweep(root: &Path) -> usize {
    let mut removed = 0;
    for camera_dir in camera_dirs(root) {
        let Ok(entries) = std::fs::read_dir(&camera_dir) else {
            continue;
        };
        let names: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        let complete: std::collections::BTreeSet<u64> = names
            .iter()
            .filter_map(|n| parse_name(n))
            .filter(|(_, k)| *k == Kind::Payload)
            .map(|(s, _)| s)
            .collect();
        for name in &names {
            let stale = match parse_name(name) {
                Some((seq, _)) => !complete.contains(&seq),
                None => is_temporary(name),
            };
            if stale && std::fs::remove_file(camera_dir.join(name)).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

/// `.<sequence><suffix>.tmp`, as [`write_atomic`] names its temporary files.
fn is_temporary(name: &str) -> bool {
    name.strip_prefix('.')
        .and_then(|n| n.strip_suffix(".tmp"))
        .is_some_and(|n| parse_name(n).is_some())
}

/// Every `<root>/<day>/<camera>` folder, days in order.
pub fn camera_dirs(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for day in sorted_names(root).into_iter().filter(|d| is_day(d)) {
        let day_dir = root.join(&day);
        for camera in sorted_names(&day_dir) {
            if crate::daemon::config::topic_safe(&camera) && day_dir.join(&camera).is_dir() {
                out.push(day_dir.join(camera));
            }
        }
    }
    out
}

fn sorted_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Reads a file the store serves: a regular file, not a link, at most `limit` bytes.
pub fn read_served(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() || meta.len() > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a file of the store",
        ));
    }
    let mut out = Vec::with_capacity(meta.len() as usize);
    f.take(limit).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_requests() {
        assert_eq!(parse_name("42.jpg"), Some((42, Kind::Frame)));
        assert_eq!(parse_name("7.overlay.jpg"), Some((7, Kind::Overlay)));
        assert_eq!(parse_name("7.map.png"), Some((7, Kind::Map)));
        assert_eq!(parse_name("7.json"), Some((7, Kind::Payload)));
        for bad in [
            "x.jpg",
            "7.png",
            ".7.json.tmp",
            "7",
            "",
            "7.json/",
            "-1.jpg",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
        let root = Path::new("/r");
        assert_eq!(
            request(root, "2026-11-30/cam1/3.map.png"),
            Some((
                PathBuf::from("/r/2026-11-30/cam1/3.map.png"),
                Kind::Map,
                PathBuf::from("/r/2026-11-30/cam1/3.json")
            ))
        );
        assert_eq!(names(7), ["7.jpg", "7.map.png", "7.overlay.jpg", "7.json"]);
        for bad in [
            "../config.yaml",
            "2026-11-30/../../etc/3.json",
            "2026-11-30/cam1/",
            "2026-11-30/cam1",
            "2026-11-30",
            "",
            "2026-11-30/cam1/3.json/x",
            "2026-11-30/..%2f/3.json",
            "2026-11-30/cam 1/3.json",
            "20261130xx/cam1/3.json",
            "2026-11-30//3.json",
        ] {
            assert_eq!(request(root, bad), None, "{bad}");
        }
    }

    #[test]
    fn the_sweep_removes_temporaries_and_sets_without_their_json() {
        let dir = tempfile::tempdir().unwrap();
        let cam = dir.path().join("2026-11-30/cam1");
        std::fs::create_dir_all(&cam).unwrap();
        for name in [
            "1.jpg",
            "1.map.png",
            "1.overlay.jpg",
            "1.json",
            "2.jpg",
            "2.map.png",
        ] {
            write_atomic(&cam, name, b"x").unwrap();
        }
        std::fs::write(cam.join(".3.jpg.tmp"), b"half").unwrap();
        std::fs::write(cam.join("notes.txt"), b"someone's").unwrap();
        assert_eq!(sweep(dir.path()), 3);
        let mut left = sorted_names(&cam);
        left.sort();
        assert_eq!(
            left,
            ["1.jpg", "1.json", "1.map.png", "1.overlay.jpg", "notes.txt"]
        );
    }
}
