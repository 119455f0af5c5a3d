//! Cached patch embeddings: the frozen backbone + aggregation run once over a set of
//! images, stored as raw float32 in a file and memory-mapped, so training epochs never
//! recompute them and memory stays bounded however large the dataset is.

use super::TrainError;
use crate::engine::Engine;
use crate::path_error::PathError;
use crate::preprocess::{self, InputSpec};
use crate::rng::Rng;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    File(PathBuf),
    /// The file with a synthetic defect of one of the kinds painted on (seed, strength
    /// in percent, kinds): validation positives.
    WithDefect(PathBuf, u64, u8, crate::synth::DefectKinds),
}

impl Source {
    /// The `k`-th validation positive of a hold-out drawn with `holdout_seed`: the image
    /// with a defect painted on, seeded as `cras train` seeds it (the same defect at every
    /// strength).
    pub fn validation_positive(
        path: PathBuf,
        holdout_seed: u64,
        k: usize,
        strength: f64,
        kinds: crate::synth::DefectKinds,
    ) -> Source {
        let seed = holdout_seed.wrapping_mul(1_000_003).wrapping_add(k as u64);
        let percent = (strength.clamp(0.0, 1.0) * 100.0).round() as u8;
        Source::WithDefect(path, seed, percent, kinds)
    }

    pub fn path(&self) -> &Path {
        match self {
            Source::File(p) | Source::WithDefect(p, _, _, _) => p,
        }
    }

    /// The cropped RGB image the network sees.
    pub fn load(&self, spec: &InputSpec) -> Result<image::RgbImage, preprocess::ImageError> {
        let img = preprocess::load_rgb(self.path())?;
        let mut crop = preprocess::resize_and_crop(&img, spec).map_err(|source| {
            preprocess::ImageError::Size {
                path: self.path().to_path_buf(),
                source,
            }
        })?;
        if let Source::WithDefect(_, seed, strength, kinds) = self {
            crate::synth::paint_random_defect(
                &mut crop,
                &mut Rng::new(*seed),
                *strength as f64 / 100.0,
                *kinds,
            );
        }
        Ok(crop)
    }
}

const MAGIC: &[u8; 8] = b"CRASFEAT";
const HEADER: usize = 8 + 8 * 3 + 32;

/// Memory-mapped embeddings of `count` images, each [patches, dim].
pub struct FeatureCache {
    map: memmap2::Mmap,
    pub count: usize,
    pub patches: usize,
    pub dim: usize,
}

impl FeatureCache {
    /// Embedding of image `i`, [patches * dim].
    pub fn image(&self, i: usize) -> &[f32] {
        let n = self.patches * self.dim;
        let bytes = &self.map[HEADER + i * n * 4..HEADER + (i + 1) * n * 4];
        // The header is 64 bytes and the map page-aligned, so f32 alignment holds.
        let (pre, floats, _) = unsafe { bytes.align_to::<f32>() };
        debug_assert!(pre.is_empty());
        floats
    }

    fn open(path: &Path, key: &[u8; 32]) -> Option<FeatureCache> {
        let f = std::fs::File::open(path).ok()?;
        // SAFETY: the file is ours, written completely before being renamed into place.
        let map = unsafe { memmap2::Mmap::map(&f) }.ok()?;
        if map.len() < HEADER || &map[..8] != MAGIC || &map[32..64] != key {
            return None;
        }
        let word = |i: usize| {
            u64::from_le_bytes(map[8 + i * 8..16 + i * 8].try_into().unwrap_or_default()) as usize
        };
        let (count, patches, dim) = (word(0), word(1), word(2));
        if map.len() != HEADER + count * patches * dim * 4 {
            return None;
        }
        Some(FeatureCache {
            map,
            count,
            patches,
            dim,
        })
    }
}

/// What a cache was made from: the key its header must carry to be reused.
pub fn cache_key(model_id: &str, spec: &InputSpec, sources: &[Source]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(model_id.as_bytes());
    h.update(format!("{spec:?}").as_bytes());
    for s in sources {
        h.update(format!("{s:?}\n").as_bytes());
    }
    if sources.iter().any(|s| matches!(s, Source::WithDefect(..))) {
        h.update(crate::synth::PAINTER_VERSION.to_le_bytes());
    }
    h.finalize().into()
}

/// Embeds `sources` with `engine` (an embedding graph) into `path`, or reuses the file if
/// it was made from the same inputs. Unreadable images are skipped with a warning; the
/// indices of the kept sources are returned alongside the cache.
#[allow(clippy::too_many_arguments)]
pub fn extract(
    engine: &mut dyn Engine,
    sources: &[Source],
    spec: &InputSpec,
    patches: usize,
    dim: usize,
    batch: usize,
    path: &Path,
    key: [u8; 32],
    label: &str,
) -> Result<(FeatureCache, Vec<usize>), TrainError> {
    let kept_path = path.with_extension("kept");
    if let Some(c) = FeatureCache::open(path, &key)
        && let Ok(text) = std::fs::read_to_string(&kept_path)
    {
        let kept: Vec<usize> = text
            .split_whitespace()
            .filter_map(|s| s.parse().ok())
            .collect();
        if kept.len() == c.count {
            tracing::info!("{label}: reusing cached embeddings {}", path.display());
            return Ok((c, kept));
        }
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(PathError::on("create", parent))?;
    }
    let tmp = path.with_extension("part");
    let write_err = PathError::on("write", &tmp);
    let mut file =
        std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(PathError::on("write", &tmp))?);
    file.write_all(&[0u8; HEADER])
        .map_err(PathError::on("write", &tmp))?;
    let bar = ProgressBar::new(sources.len() as u64).with_message(label.to_string());
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{bar:30}] {pos}/{len} images, {per_sec}, eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut kept = Vec::new();
    for (ci, chunk) in sources.chunks(batch.max(1)).enumerate() {
        let mut input = Vec::new();
        let mut n = 0;
        for (k, s) in chunk.iter().enumerate() {
            match s.load(spec) {
                Ok(crop) => {
                    preprocess::normalise_into(&crop, spec, &mut input);
                    kept.push(ci * batch + k);
                    n += 1;
                }
                Err(e) => {
                    bar.suspend(|| tracing::warn!("skipping {}: {e:#}", s.path().display()));
                }
            }
        }
        bar.inc(chunk.len() as u64);
        if n == 0 {
            continue;
        }
        let run_n = engine.fixed_batch().unwrap_or(n).max(n);
        input.resize(run_n * 3 * spec.height * spec.width, 0.0);
        let outs = engine.run(&input, [run_n, 3, spec.height, spec.width])?;
        let emb = outs
            .iter()
            .find(|t| t.name == "embedding")
            .and_then(|t| t.f32())
            .ok_or_else(|| TrainError::Cache("embedding graph output missing".into()))?;
        if emb.len() != run_n * patches * dim {
            return Err(TrainError::Cache(format!(
                "embedding has {} values, expected {}",
                emb.len(),
                run_n * patches * dim
            )));
        }
        for v in &emb[..n * patches * dim] {
            file.write_all(&v.to_le_bytes())
                .map_err(PathError::on("write", &tmp))?;
        }
    }
    bar.finish_and_clear();
    let mut header = Vec::with_capacity(HEADER);
    header.extend_from_slice(MAGIC);
    for v in [kept.len(), patches, dim] {
        header.extend_from_slice(&(v as u64).to_le_bytes());
    }
    header.extend_from_slice(&key);
    finish(file, &header).map_err(write_err)?;
    std::fs::rename(&tmp, path).map_err(PathError::on("write", path))?;
    let kept_list: Vec<String> = kept.iter().map(|k| k.to_string()).collect();
    std::fs::write(&kept_path, kept_list.join(" ")).map_err(PathError::on("write", &kept_path))?;
    let cache = FeatureCache::open(path, &key)
        .ok_or_else(|| TrainError::Cache(format!("cannot reopen {}", path.display())))?;
    Ok((cache, kept))
}

/// Writes the header over the placeholder at the start and makes the file durable.
fn finish(file: std::io::BufWriter<std::fs::File>, header: &[u8]) -> std::io::Result<()> {
    use std::io::Seek;
    let mut file = file.into_inner().map_err(|e| e.into_error())?;
    file.seek(std::io::SeekFrom::Start(0))?;
    file.write_all(header)?;
    file.sync_all()
}
