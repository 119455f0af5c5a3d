//! The TensorRT engine cache: one directory per key under the state directory.
//!
//! A TensorRT engine is only valid for the graph, GPU, TensorRT build and precision it
//! was built with, and onnxruntime reuses whatever engine files it finds in the cache
//! path it is given. So every key gets its own directory, named by a digest of the whole
//! key, holding `key.json` (the key written out in full) and, once `cras engine prepare`
//! or the daemon has checked it, `check.json` (the GPU-against-CPU differences). A
//! directory is used only when its `key.json` equals the current key field for field:
//! a stale or foreign cache (another model, GPU, driver stack or precision) is never
//! loaded, whatever its directory is called.

use super::provider::CachePaths;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Everything a built engine depends on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheKey {
    /// sha256 of model.onnx.
    pub model_sha256: String,
    pub gpu_name: String,
    /// CUDA compute capability, "8.7" (Orin) or "9.0" (H100/H200).
    pub compute_capability: String,
    pub tensorrt_version: String,
    pub onnxruntime_version: String,
    /// "fp32" or "fp16".
    pub precision: String,
    /// The input profile: largest batch, height, width.
    pub max_batch: usize,
    pub input_hw: (usize, usize),
}

/// How far the GPU engine's outputs are from the CPU engine's on the same images.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CheckRecord {
    pub images: usize,
    pub max_score_diff: f32,
    pub max_map_diff: f32,
    pub score_tolerance: f32,
    pub map_tolerance: f32,
    pub passed: bool,
    /// Seconds the engine took to build.
    pub build_seconds: f64,
}

impl CheckRecord {
    /// The record of a check with differences `d` against `tolerance`.
    pub fn of(
        d: &super::upgrade::Differences,
        tolerance: super::upgrade::Tolerance,
        build_seconds: f64,
    ) -> CheckRecord {
        CheckRecord {
            images: d.images,
            max_score_diff: d.score,
            max_map_diff: d.map,
            score_tolerance: tolerance.score,
            map_tolerance: tolerance.map,
            passed: d.within(tolerance),
            build_seconds,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("engine cache {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("engine cache {path}: unreadable record: {reason}")]
    Record { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl CacheKey {
    /// The directory name: the first 16 hex digits of the key's sha256.
    pub fn digest(&self) -> String {
        let text = serde_json::to_string(self).unwrap_or_default();
        let hash = Sha256::digest(text.as_bytes());
        hash.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

/// The key of `onnx` built for GPU `device` at `precision`, with the GPU and library
/// facts read from the machine; the reason when they cannot be read (no driver, no
/// TensorRT, a build without the `gpu` feature).
pub fn key_for(
    onnx: &[u8],
    device: u32,
    fp16: bool,
    max_batch: usize,
    input_hw: (usize, usize),
) -> Result<CacheKey, String> {
    let gpu = super::gpu_info::gpu_identity(device)?;
    Ok(CacheKey {
        model_sha256: model_sha256(onnx),
        gpu_name: gpu.name,
        compute_capability: gpu.compute_capability,
        tensorrt_version: super::gpu_info::tensorrt_version()?,
        onnxruntime_version: super::onnxruntime::runtime_version(),
        precision: if fp16 { "fp16" } else { "fp32" }.into(),
        max_batch,
        input_hw,
    })
}

/// sha256 of a model graph, in hex.
pub fn model_sha256(onnx: &[u8]) -> String {
    Sha256::digest(onnx)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The cache root: engines per key, and the timing cache per GPU.
#[derive(Debug, Clone)]
pub struct EngineCache {
    pub root: PathBuf,
}

/// What the cache holds for a key.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// Nothing usable: build (into `paths`), check, then record.
    Missing,
    /// Built but not checked, or checked and refused: do not serve it.
    Unchecked,
    Failed(CheckRecord),
    /// Built, checked, passed: load it.
    Ready(CheckRecord),
}

impl EngineCache {
    /// Under the state directory (`$CRAS_HOME`, /var/lib/cras under systemd).
    pub fn in_state_dir() -> EngineCache {
        EngineCache {
            root: super::onnxruntime::data_dir().join("engine-cache"),
        }
    }

    fn dir(&self, key: &CacheKey) -> PathBuf {
        self.root.join(key.digest())
    }

    /// Where onnxruntime writes and reads this key's engine. The timing cache is per
    /// GPU and TensorRT version, shared by all models.
    pub fn paths(&self, key: &CacheKey) -> CachePaths {
        let timing = format!(
            "timing-{}-{}",
            key.compute_capability.replace('.', ""),
            key.tensorrt_version
        );
        CachePaths {
            engines: self.dir(key),
            timing: self.root.join(timing),
        }
    }

    /// Creates the key's directory and writes its `key.json`; a directory whose key
    /// differs (a digest collision, or a hand-copied cache) is emptied first.
    pub fn prepare(&self, key: &CacheKey) -> Result<CachePaths, CacheError> {
        let paths = self.paths(key);
        let dir = &paths.engines;
        let same = matches!(self.read_key(dir), Ok(Some(k)) if &k == key);
        if dir.exists() && !same {
            std::fs::remove_dir_all(dir).map_err(io(dir))?;
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        std::fs::create_dir_all(&paths.timing).map_err(io(&paths.timing))?;
        let text = serde_json::to_string_pretty(key).unwrap_or_default();
        write_atomic(&dir.join("key.json"), text.as_bytes())?;
        Ok(paths)
    }

    fn read_key(&self, dir: &Path) -> Result<Option<CacheKey>, CacheError> {
        read_json(&dir.join("key.json"))
    }

    /// What the cache holds for `key`; only a directory whose `key.json` equals `key`
    /// counts.
    pub fn lookup(&self, key: &CacheKey) -> Result<Lookup, CacheError> {
        let dir = self.dir(key);
        match self.read_key(&dir) {
            Ok(Some(k)) if &k == key => {}
            Ok(_) | Err(CacheError::Record { .. }) => return Ok(Lookup::Missing),
            Err(e) => return Err(e),
        }
        Ok(match read_json::<CheckRecord>(&dir.join("check.json")) {
            Ok(Some(c)) if c.passed => Lookup::Ready(c),
            Ok(Some(c)) => Lookup::Failed(c),
            Ok(None) | Err(CacheError::Record { .. }) => Lookup::Unchecked,
            Err(e) => return Err(e),
        })
    }

    /// Records the parity check of `key`'s engine.
    pub fn record(&self, key: &CacheKey, check: &CheckRecord) -> Result<(), CacheError> {
        let dir = self.dir(key);
        if self.read_key(&dir)?.as_ref() != Some(key) {
            return Err(CacheError::Record {
                path: dir,
                reason: "the key was not prepared here".into(),
            });
        }
        let text = serde_json::to_string_pretty(check).unwrap_or_default();
        write_atomic(&dir.join("check.json"), text.as_bytes())
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, CacheError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| CacheError::Record {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

/// Writes through a temporary file and a rename, so a power cut leaves the old record
/// or the new one, never half of one.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> CacheKey {
        CacheKey {
            model_sha256: model_sha256(b"graph"),
            gpu_name: "Orin (nvgpu)".into(),
            compute_capability: "8.7".into(),
            tensorrt_version: "10.3.0".into(),
            onnxruntime_version: "1.31.1".into(),
            precision: "fp32".into(),
            max_batch: 4,
            input_hw: (288, 288),
        }
    }

    fn passed(ok: bool) -> CheckRecord {
        CheckRecord {
            images: 8,
            max_score_diff: 2e-4,
            max_map_diff: 1e-2,
            score_tolerance: 1e-3,
            map_tolerance: 0.1,
            passed: ok,
            build_seconds: 400.0,
        }
    }

    #[test]
    fn every_field_of_the_key_changes_the_directory() {
        let base = key();
        let variants = [
            CacheKey {
                model_sha256: model_sha256(b"other graph"),
                ..base.clone()
            },
            CacheKey {
                gpu_name: "NVIDIA H200".into(),
                ..base.clone()
            },
            CacheKey {
                compute_capability: "9.0".into(),
                ..base.clone()
            },
            CacheKey {
                tensorrt_version: "10.16.1".into(),
                ..base.clone()
            },
            CacheKey {
                onnxruntime_version: "1.32.0".into(),
                ..base.clone()
            },
            CacheKey {
                precision: "fp16".into(),
                ..base.clone()
            },
            CacheKey {
                max_batch: 8,
                ..base.clone()
            },
            CacheKey {
                input_hw: (256, 256),
                ..base.clone()
            },
        ];
        let mut seen = vec![base.digest()];
        for v in variants {
            assert!(!seen.contains(&v.digest()), "{v:?}");
            seen.push(v.digest());
        }
        assert_eq!(base.digest(), key().digest());
        assert_eq!(base.digest().len(), 16);
    }

    #[test]
    fn an_engine_is_served_only_once_checked_and_passed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = EngineCache {
            root: dir.path().to_path_buf(),
        };
        assert_eq!(cache.lookup(&key()).unwrap(), Lookup::Missing);
        let paths = cache.prepare(&key()).unwrap();
        assert!(paths.engines.join("key.json").is_file());
        assert!(paths.timing.is_dir());
        assert_eq!(cache.lookup(&key()).unwrap(), Lookup::Unchecked);
        cache.record(&key(), &passed(false)).unwrap();
        assert_eq!(cache.lookup(&key()).unwrap(), Lookup::Failed(passed(false)));
        cache.record(&key(), &passed(true)).unwrap();
        assert_eq!(cache.lookup(&key()).unwrap(), Lookup::Ready(passed(true)));
    }

    #[test]
    fn a_foreign_or_damaged_cache_is_never_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let cache = EngineCache {
            root: dir.path().to_path_buf(),
        };
        let paths = cache.prepare(&key()).unwrap();
        cache.record(&key(), &passed(true)).unwrap();
        std::fs::write(paths.engines.join("engine.trt"), b"built").unwrap();
        // Another machine's cache copied in under this key's directory name.
        let foreign = CacheKey {
            gpu_name: "NVIDIA A2".into(),
            ..key()
        };
        std::fs::write(
            paths.engines.join("key.json"),
            serde_json::to_string(&foreign).unwrap(),
        )
        .unwrap();
        assert_eq!(cache.lookup(&key()).unwrap(), Lookup::Missing);
        assert!(cache.record(&key(), &passed(true)).is_err());
        // Preparing again empties it: the foreign engine file is gone.
        cache.prepare(&key()).unwrap();
        assert!(!paths.engines.join("engine.trt").exists());
        assert_eq!(cache.lookup(&key()).unwrap(), Lookup::Unchecked);
        // A torn key file reads as no cache, not as an error that stops the daemon.
        std::fs::write(paths.engines.join("key.json"), b"{\"model_sha").unwrap();
        assert_eq!(cache.lookup(&key()).unwrap(), Lookup::Missing);
        // The timing cache is per GPU and TensorRT version.
        let other = cache.paths(&CacheKey {
            compute_capability: "9.0".into(),
            ..key()
        });
        assert_ne!(other.timing, paths.timing);
        assert_eq!(
            cache
                .paths(&CacheKey {
                    precision: "fp16".into(),
                    ..key()
                })
                .timing,
            paths.timing
        );
    }
}
