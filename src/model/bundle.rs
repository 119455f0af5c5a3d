//! Model bundles: a directory with `model.onnx` and `model.yaml`, and from `cras train`
//! `head.safetensors` (the trained adaptor and scorer before folding, and the centers),
//! which `cras add-class` builds on.
//!
//! `model.yaml` says what the graph expects (input size, normalisation), what it knows
//! (class names), how to judge its scores (thresholds per class, may be empty until
//! calibration), where it came from (provenance) and the sha256 of `model.onnx`.
//! Reading a bundle validates all of it; a changed `model.onnx` is rejected.

use super::score::ImageScore;
use super::views::Views;
use crate::preprocess::InputSpec;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const FORMAT_VERSION: u32 = 1;
pub const ONNX_FILE: &str = "model.onnx";
pub const YAML_FILE: &str = "model.yaml";
pub const HEAD_FILE: &str = "head.safetensors";

/// Alarm thresholds of one class.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassThresholds {
    /// Image score at or above which an image is anomalous.
    pub image: f32,
    /// Anomaly-map value at or above which a pixel belongs to a defect region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pixel: Option<f32>,
}

pub use super::provenance::{
    AddedClass, EpochRecord, Provenance, RestartRecord, SourceFile, TrainingRecord,
};

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleMeta {
    pub format_version: u32,
    /// Product classes, in the order of the graph's class ids.
    pub classes: Vec<String>,
    pub input: InputSpec,
    /// Backbone architecture name.
    pub backbone: String,
    pub embed_dim: usize,
    /// Patch grid (rows, columns) of `patch_scores`.
    pub patch_grid: [usize; 2],
    /// How the graph takes `image_score` (the paper's largest patch score in bundles
    /// written before it was recorded).
    #[serde(default, skip_serializing_if = "ImageScore::is_patch_max")]
    pub image_score: ImageScore,
    /// The orientations the graph scores each image in (the original alone in bundles
    /// written before views existed).
    #[serde(default, skip_serializing_if = "Views::is_original")]
    pub views: Views,
    /// Per-class thresholds; empty until `cras calibrate` (or an import) sets them.
    #[serde(default)]
    pub thresholds: BTreeMap<String, ClassThresholds>,
    pub provenance: Provenance,
    /// sha256 of model.onnx, hex.
    pub onnx_sha256: String,
    /// sha256 over the fields that define the model (format, classes, input, backbone,
    /// embedding width, patch grid, the graph's hash), hex: an edit of any of them is
    /// refused at load. Thresholds and provenance are not covered (`cras calibrate`
    /// changes thresholds). Empty in bundles written before it existed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model_sha256: String,
    /// sha256 of head.safetensors, hex; empty when the bundle has none (imported, or
    /// written before it existed).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub head_sha256: String,
}

/// What `model_sha256` covers, in a fixed serialisation.
#[derive(serde::Serialize)]
struct ModelFields<'a> {
    format_version: u32,
    classes: &'a [String],
    input: &'a InputSpec,
    backbone: &'a str,
    embed_dim: usize,
    patch_grid: [usize; 2],
    onnx_sha256: &'a str,
    /// Skipped when empty, so bundles without a head keep the hash they were written with.
    #[serde(skip_serializing_if = "str::is_empty")]
    head_sha256: &'a str,
    /// Skipped for the paper's rule, so bundles written before it keep their hash.
    #[serde(skip_serializing_if = "ImageScore::is_patch_max")]
    image_score: &'a ImageScore,
    /// Skipped for the original alone, so bundles written before views keep their hash.
    #[serde(skip_serializing_if = "Views::is_original")]
    views: &'a Views,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid model.yaml: {reason}")]
    Yaml { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "{path}: model.yaml's model fields (classes, input, backbone, sizes) were changed \
         after the bundle was written; restore them or rebuild the bundle"
    )]
    FieldsEdited { path: PathBuf },
    #[error(
        "{path}: model.onnx does not match model.yaml (sha256 {found}, expected {expected}); \
         the bundle was changed or copied incompletely"
    )]
    HashMismatch {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("{path}: the graph does not match model.yaml: {reason}")]
    GraphMismatch { path: PathBuf, reason: String },
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    Ok(sha256_hex(&std::fs::read(path)?))
}

/// A validated bundle, with its graph loaded in memory.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub meta: BundleMeta,
    pub onnx: Vec<u8>,
}

impl BundleMeta {
    /// The hash `model_sha256` holds for these fields.
    pub fn fields_sha256(&self) -> String {
        let fields = ModelFields {
            format_version: self.format_version,
            classes: &self.classes,
            input: &self.input,
            backbone: &self.backbone,
            embed_dim: self.embed_dim,
            patch_grid: self.patch_grid,
            onnx_sha256: &self.onnx_sha256,
            head_sha256: &self.head_sha256,
            image_score: &self.image_score,
            views: &self.views,
        };
        // Serialising plain numbers, strings and arrays cannot fail.
        sha256_hex(
            serde_json::to_string(&fields)
                .unwrap_or_default()
                .as_bytes(),
        )
    }

    fn check(&self, path: &Path) -> Result<(), BundleError> {
        let bad = |reason: String| {
            Err(BundleError::Invalid {
                path: path.to_path_buf(),
                reason,
            })
        };
        if self.format_version != FORMAT_VERSION {
            return bad(format!(
                "format_version {} is not supported by this cras (it reads {FORMAT_VERSION})",
                self.format_version
            ));
        }
        if self.classes.is_empty() {
            return bad("classes: at least one class is needed".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for c in &self.classes {
            if c.trim().is_empty() {
                return bad("classes: empty class name".into());
            }
            if !seen.insert(c) {
                return bad(format!("classes: `{c}` appears twice"));
            }
        }
        let i = &self.input;
        let max_input = crate::preprocess::MAX_INPUT_SIDE;
        if !(16..=max_input).contains(&i.height) || !(16..=max_input).contains(&i.width) {
            return bad(format!("input.height/width must be from 16 to {max_input}"));
        }
        if i.resize < i.height.min(i.width) {
            return bad(format!(
                "input.resize ({}) must be at least the crop size ({}x{})",
                i.resize, i.height, i.width
            ));
        }
        let max_resize = 4 * i.height.max(i.width);
        if i.resize > max_resize {
            return bad(format!(
                "input.resize ({}) must be at most 4 times the crop size ({max_resize})",
                i.resize
            ));
        }
        if i.std.iter().any(|s| !(*s > 0.0 && s.is_finite()))
            || i.mean.iter().any(|m| !m.is_finite())
        {
            return bad("input.std must be positive and input.mean finite".into());
        }
        if let Err(e) = self.image_score.check() {
            return bad(format!("image_score: {e}"));
        }
        for (c, t) in &self.thresholds {
            if !self.classes.contains(c) {
                return bad(format!(
                    "thresholds: `{c}` is not one of the classes {:?}",
                    self.classes
                ));
            }
            if !t.image.is_finite() || t.pixel.is_some_and(|p| !p.is_finite()) {
                return bad(format!("thresholds.{c}: thresholds must be finite numbers"));
            }
        }
        if self.onnx_sha256.len() != 64 {
            return bad("onnx_sha256: expected 64 hex digits".into());
        }
        if !self.head_sha256.is_empty() && self.head_sha256.len() != 64 {
            return bad("head_sha256: expected 64 hex digits".into());
        }
        Ok(())
    }
}

impl BundleMeta {
    /// Parses and checks model.yaml's text (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<BundleMeta, BundleError> {
        let meta: BundleMeta = serde_saphyr::from_str(text).map_err(|e| BundleError::Yaml {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        meta.check(path)?;
        Ok(meta)
    }

    /// Checks the graph's declared sizes against these fields: the `image` input is
    /// [N, 3, height, width], `anomaly_map` [N, 1, height, width] and `patch_scores`
    /// [N, rows, columns]. Every frame is prepared from these fields, so a mismatch would
    /// otherwise surface as an engine error on the first frame.
    pub fn check_graph(&self, onnx: &[u8]) -> Result<(), String> {
        let sig = crate::onnx::signature::read(onnx).map_err(|e| e.to_string())?;
        let (h, w) = (self.input.height as i64, self.input.width as i64);
        let [rows, cols] = self.patch_grid.map(|v| v as i64);
        let fits = |port: Option<&crate::onnx::signature::Port>, name: &str, want: &[i64]| {
            let port = port.ok_or_else(|| format!("it has no `{name}`"))?;
            let found = &port.dims;
            let same = found.len() == want.len() + 1
                && found[1..].iter().zip(want).all(|(f, w)| *f == Some(*w));
            if same {
                Ok(())
            } else {
                let shown: Vec<String> = found
                    .iter()
                    .map(|d| d.map_or("N".to_string(), |v| v.to_string()))
                    .collect();
                Err(format!(
                    "`{name}` is [{}], model.yaml says [N, {}]",
                    shown.join(", "),
                    want.iter()
                        .map(i64::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }
        };
        fits(sig.input("image"), "image", &[3, h, w])?;
        fits(sig.output("anomaly_map"), "anomaly_map", &[1, h, w])?;
        fits(sig.output("patch_scores"), "patch_scores", &[rows, cols])
    }
}

impl Bundle {
    /// Reads and validates a bundle directory.
    pub fn read(dir: &Path) -> Result<Bundle, BundleError> {
        let ypath = dir.join(YAML_FILE);
        let text = crate::path_error::read_text_limited(&ypath, crate::path_error::limits::TEXT)
            .map_err(|source| BundleError::Io {
                path: ypath.clone(),
                source,
            })?;
        let meta = BundleMeta::parse(&text, &ypath)?;
        let opath = dir.join(ONNX_FILE);
        let onnx = std::fs::read(&opath).map_err(|source| BundleError::Io {
            path: opath.clone(),
            source,
        })?;
        if meta.model_sha256.is_empty() {
            tracing::warn!(
                "{}: written before model.yaml's model fields were hashed; rewrite it (cras calibrate) to protect them",
                ypath.display()
            );
        } else if meta.model_sha256 != meta.fields_sha256() {
            return Err(BundleError::FieldsEdited { path: ypath });
        }
        let found = sha256_hex(&onnx);
        if found != meta.onnx_sha256 {
            return Err(BundleError::HashMismatch {
                path: opath,
                found,
                expected: meta.onnx_sha256.clone(),
            });
        }
        meta.check_graph(&onnx)
            .map_err(|reason| BundleError::GraphMismatch {
                path: opath,
                reason,
            })?;
        Ok(Bundle {
            dir: dir.to_path_buf(),
            meta,
            onnx,
        })
    }

    /// Writes `model.onnx`, `head.safetensors` when given, and `model.yaml` into `dir`
    /// (created if needed). Files are written to temporary names and renamed, model.yaml
    /// last, so a crash never leaves a half bundle under the final names.
    pub fn write(
        dir: &Path,
        mut meta: BundleMeta,
        onnx: &[u8],
        head: Option<&[u8]>,
    ) -> Result<Bundle, BundleError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| BundleError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        meta.onnx_sha256 = sha256_hex(onnx);
        meta.head_sha256 = head.map(sha256_hex).unwrap_or_default();
        meta.model_sha256 = meta.fields_sha256();
        meta.check(&dir.join(YAML_FILE))?;
        let yaml = serde_saphyr::to_string(&meta).map_err(|e| BundleError::Yaml {
            path: dir.join(YAML_FILE),
            reason: e.to_string(),
        })?;
        let mut files = vec![(ONNX_FILE, onnx)];
        match head {
            Some(h) => files.push((HEAD_FILE, h)),
            None => match std::fs::remove_file(dir.join(HEAD_FILE)) {
                // A head left from an earlier bundle in this folder must not pair with
                // this graph.
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io(&dir.join(HEAD_FILE))(e));
                }
                _ => {}
            },
        }
        files.push((YAML_FILE, yaml.as_bytes()));
        for (name, bytes) in files {
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
            std::fs::rename(&tmp, dir.join(name)).map_err(io(&dir.join(name)))?;
        }
        Ok(Bundle {
            dir: dir.to_path_buf(),
            meta,
            onnx: onnx.to_vec(),
        })
    }

    /// Rewrites `model.yaml` (after calibration); `model.onnx` is left untouched.
    pub fn write_meta(&mut self) -> Result<(), BundleError> {
        let path = self.dir.join(YAML_FILE);
        self.meta.check(&path)?;
        self.meta.model_sha256 = self.meta.fields_sha256();
        let yaml = serde_saphyr::to_string(&self.meta).map_err(|e| BundleError::Yaml {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let tmp = self.dir.join(format!(".{YAML_FILE}.tmp"));
        std::fs::write(&tmp, yaml).map_err(|source| BundleError::Io {
            path: tmp.clone(),
            source,
        })?;
        std::fs::rename(&tmp, &path).map_err(|source| BundleError::Io { path, source })
    }

    /// The trained head and centers in `head.safetensors`, checked against model.yaml.
    pub fn read_head(&self) -> Result<crate::weights::StateDict, BundleError> {
        let path = self.dir.join(HEAD_FILE);
        if self.meta.head_sha256.is_empty() {
            return Err(BundleError::Invalid {
                path: self.dir.join(YAML_FILE),
                reason:
                    "this bundle has no head.safetensors (made by `cras train` or `cras import-reference` \
                         before they wrote one); train or import it again"
                        .into(),
            });
        }
        let bytes = std::fs::read(&path).map_err(|source| BundleError::Io {
            path: path.clone(),
            source,
        })?;
        let found = sha256_hex(&bytes);
        if found != self.meta.head_sha256 {
            return Err(BundleError::HashMismatch {
                path,
                found,
                expected: self.meta.head_sha256.clone(),
            });
        }
        let tensors = crate::weights::parse(&bytes, "head").map_err(|e| BundleError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(crate::weights::StateDict {
            tensors,
            source: path,
        })
    }

    /// Short model id for logs and alarms: backbone and the first 12 hex digits of the
    /// graph's hash.
    pub fn model_id(&self) -> String {
        format!("{}-{}", self.meta.backbone, &self.meta.onnx_sha256[..12])
    }
}
