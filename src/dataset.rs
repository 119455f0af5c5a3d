//! Datasets in MVTec AD layout (also used by VisA, MPDD, ITDD):
//! `<class>/train/good/*`, `<class>/test/<good|defect type>/*`,
//! `<class>/ground_truth/<defect type>/<name>_mask.png`.

use crate::path_error::PathError;
use crate::rng::Rng;
use std::path::{Path, PathBuf};

/// Why a dataset cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error(transparent)]
    Read(#[from] PathError),
    #[error("no classes given")]
    NoClasses,
    #[error("class `{class}`: {path} is not a folder (expected MVTec layout <class>/train/good)")]
    NotAClass { class: String, path: PathBuf },
    #[error("{0} holds no class folders in MVTec layout (<class>/train/good)")]
    Empty(PathBuf),
    #[error("cannot read mask {path}: {reason}")]
    Mask { path: PathBuf, reason: String },
    #[error("class `{class}` has {images} training images; at least 2 are needed")]
    TooFewImages { class: String, images: usize },
    #[error(
        "{path}: `{folder}` is not a class of this model ({classes}); defect images go in <dir>/<class>/"
    )]
    UnknownDefectClass {
        path: PathBuf,
        folder: String,
        classes: String,
    },
    #[error("{0} holds no defect images: put them in <dir>/<class>/ (png, jpg, bmp, tiff)")]
    NoDefectImages(PathBuf),
}

type Result<T> = std::result::Result<T, DatasetError>;
const IMAGE_EXTENSIONS: [&str; 7] = ["png", "jpg", "jpeg", "bmp", "tif", "tiff", "PNG"];

#[derive(Debug, Clone)]
pub struct TestImage {
    pub path: PathBuf,
    /// `good` or the defect type (folder name).
    pub kind: String,
    pub mask: Option<PathBuf>,
}

impl TestImage {
    pub fn is_defect(&self) -> bool {
        self.kind != "good"
    }
}

#[derive(Debug, Clone)]
pub struct ClassData {
    pub name: String,
    pub train_good: Vec<PathBuf>,
    pub test: Vec<TestImage>,
}

fn images_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(PathError::on("read", dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// Reads the listing of `classes` under `root`. Training images are required; the test
/// split may be absent (training only).
pub fn open(root: &Path, classes: &[String]) -> Result<Vec<ClassData>> {
    if classes.is_empty() {
        return Err(DatasetError::NoClasses);
    }
    let mut out = Vec::new();
    for name in classes {
        let dir = root.join(name);
        if !dir.is_dir() {
            return Err(DatasetError::NotAClass {
                class: name.clone(),
                path: dir,
            });
        }
        let train_dir = dir.join("train/good");
        let train_good = if train_dir.is_dir() {
            images_in(&train_dir)?
        } else {
            Vec::new()
        };
        let mut test = Vec::new();
        let test_dir = dir.join("test");
        if test_dir.is_dir() {
            let mut kinds: Vec<PathBuf> = std::fs::read_dir(&test_dir)
                .map_err(PathError::on("read", &test_dir))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect();
            kinds.sort();
            for kd in kinds {
                let kind = kd
                    .file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                for path in images_in(&kd)? {
                    let mask = if kind == "good" {
                        None
                    } else {
                        let stem = path
                            .file_stem()
                            .map(|s| s.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        let m = dir
                            .join("ground_truth")
                            .join(&kind)
                            .join(format!("{stem}_mask.png"));
                        m.is_file().then_some(m)
                    };
                    test.push(TestImage {
                        path,
                        kind: kind.clone(),
                        mask,
                    });
                }
            }
        }
        out.push(ClassData {
            name: name.clone(),
            train_good,
            test,
        });
    }
    Ok(out)
}

/// The class names under `root` that have a `train/good` folder, sorted.
pub fn discover_classes(root: &Path) -> Result<Vec<String>> {
    let mut v: Vec<String> = std::fs::read_dir(root)
        .map_err(PathError::on("read", root))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("train/good").is_dir() || p.join("test").is_dir())
        .filter_map(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    v.sort();
    if v.is_empty() {
        return Err(DatasetError::Empty(root.to_path_buf()));
    }
    Ok(v)
}

/// A ground-truth mask through the images' resize and crop, as booleans (> 127).
pub fn load_mask(path: &Path, spec: &crate::preprocess::InputSpec) -> Result<Vec<bool>> {
    let m = image::open(path)
        .map_err(|e| DatasetError::Mask {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?
        .to_rgb8();
    let crop = crate::preprocess::resize_and_crop(&m, spec).map_err(|e| DatasetError::Mask {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(crop.pixels().map(|p| p.0[0] > 127).collect())
}

/// The hold-out of one class on its own: a draw seeded by `seed` and the class name, so
/// it does not depend on the other classes (a class `cras add-class` added is split the
/// same way by every later `cras calibrate`). Returns (rest, held out).
pub fn holdout_class(
    c: &ClassData,
    seed: u64,
    fraction: f64,
) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    use sha2::Digest;
    let name: [u8; 8] = sha2::Sha256::digest(c.name.as_bytes())[..8]
        .try_into()
        .unwrap_or_default();
    let class_seed = seed ^ u64::from_le_bytes(name);
    let mut split = holdout_split(std::slice::from_ref(c), class_seed, fraction)?;
    Ok(split.pop().unwrap_or_default())
}

/// The seeded per-class hold-out of good training images: (training, validation) paths
/// per class. `cras calibrate` calls it with the bundle's recorded seed and fraction to
/// find the same validation images.
pub fn holdout_split(
    classes: &[ClassData],
    seed: u64,
    fraction: f64,
) -> Result<Vec<(Vec<PathBuf>, Vec<PathBuf>)>> {
    let mut rng = Rng::new(seed ^ 0x484f_4c44_4f55_5421);
    let mut out = Vec::new();
    for c in classes {
        if c.train_good.len() < 2 {
            return Err(DatasetError::TooFewImages {
                class: c.name.clone(),
                images: c.train_good.len(),
            });
        }
        let mut imgs = c.train_good.clone();
        rng.shuffle(&mut imgs);
        let n_val = if fraction > 0.0 {
            ((imgs.len() as f64 * fraction).round() as usize).clamp(1, imgs.len() - 1)
        } else {
            0
        };
        let train = imgs.split_off(n_val);
        out.push((train, imgs));
    }
    Ok(out)
}

/// Real defective images per class from `dir/<class>/` (validation positives): one list
/// per class of `classes`, empty for a class without a folder. A folder that names no
/// class is refused (a typo would otherwise drop its images silently), and so is a
/// `dir` with no image at all.
pub fn defect_images(dir: &Path, classes: &[String]) -> Result<Vec<Vec<PathBuf>>> {
    let mut out = vec![Vec::new(); classes.len()];
    for entry in std::fs::read_dir(dir).map_err(PathError::on("read", dir))? {
        let path = entry.map_err(PathError::on("read", dir))?.path();
        if !path.is_dir() {
            continue;
        }
        let folder = path
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some(ci) = classes.iter().position(|c| *c == folder) else {
            return Err(DatasetError::UnknownDefectClass {
                path,
                folder,
                classes: classes.join(", "),
            });
        };
        out[ci] = images_in(&path)?;
    }
    if out.iter().all(Vec::is_empty) {
        return Err(DatasetError::NoDefectImages(dir.to_path_buf()));
    }
    Ok(out)
}
