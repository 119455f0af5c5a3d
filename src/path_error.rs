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
