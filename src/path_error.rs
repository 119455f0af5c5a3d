//! An I/O error with the file or folder it happened on and what was being done, so that
//! every module's error says "cannot read /the/path: why" the same way.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}: {source}", path.display())]
pub struct PathError {
    /// What was being done: `read`, `write`, `create`, ...
    pub action: &'static str,
    pub path: PathBuf,
    pub source: std::io::Error,
}

impl PathError {
    /// For `map_err`: the error of doing `action` on `path`.
    pub fn on<'a>(
        action: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(std::io::Error) -> PathError + 'a {
        move |source| PathError {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Reads a whole file of at most `max` bytes: a larger one (or a device such as
/// /dev/zero named by mistake) is an error instead of a read that never ends.
pub fn read_limited(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::other(format!(
            "larger than {max} bytes; is this the right file?"
        )));
    }
    Ok(bytes)
}

/// [`read_limited`] for text files.
pub fn read_text_limited(path: &Path, max: u64) -> std::io::Result<String> {
    String::from_utf8(read_limited(path, max)?)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// Sizes of the small files a configuration names.
pub mod limits {
    /// A configuration, a pipeline template or model.yaml.
    pub const TEXT: u64 = 1 << 20;
    /// A password file.
    pub const SECRET: u64 = 4 << 10;
    /// A PEM certificate chain or key.
    pub const PEM: u64 = 1 << 20;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_large_files_are_refused() {
        let e = read_limited(Path::new("/dev/zero"), 4096).unwrap_err();
        assert!(e.to_string().contains("larger than 4096 bytes"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(read_limited(&p, 3).unwrap(), b"abc");
        assert!(read_limited(&p, 2).is_err());
        std::fs::write(&p, [0xff, 0xfe]).unwrap();
        assert!(read_text_limited(&p, 10).is_err());
    }
}
