//! `cras train --val-defect-images DIR`: real defective images, not painted ones, are
//! the validation positives that choose the epoch. The recorded validation figure is
//! the image AUROC of the exported model on exactly the held-out good images against
//! those defect images, and folders or flags that cannot be meant are refused before
//! any work.

mod common;

use common::*;
use std::path::{Path, PathBuf};

fn lite0_arg() -> String {
    format!("efficientnet_lite0={}", lite0_weights().display())
}

/// Every defective test image of `class`, copied flat into `dest/<class>/`.
fn copy_defects(data: &Path, class: &str, dest: &Path) -> Vec<PathBuf> {
    let to = dest.join(class);
    std::fs::create_dir_all(&to).unwrap();
    let mut copied = Vec::new();
    for kind in std::fs::read_dir(data.join(class).join("test"))
        .unwrap()
        .flatten()
    {
        if kind.file_name() == "good" {
            continue;
        }
        for f in std::fs::read_dir(kind.path()).unwrap().flatten() {
            let name = format!(
                "{}-{}",
                kind.file_name().to_string_lossy(),
                f.file_name().to_string_lossy()
            );
            std::fs::copy(f.path(), to.join(&name)).unwrap();
            copied.push(to.join(name));
        }
    }
    copied.sort();
    copied
}

fn train(data: &Path, dir: &Path, name: &str, extra: &[&str]) -> (i32, String) {
    let bb = lite0_arg();
    let (out, work) = (dir.join(name), dir.join(format!("{name}.work")));
    let mut args = vec![
        "train",
        "--data",
        data.to_str().unwrap(),
        "--backbone",
        &bb,
        "--out",
        out.to_str().unwrap(),
        "--work",
        work.to_str().unwrap(),
        "--image-size",
        "128",
        "--embed-dim",
        "128",
        "--epochs",
        "2",
    ];
    args.extend_from_slice(extra);
    let (code, _, err) = cras(&args);
    (code, err)
}

/// The synthetic line in a fresh folder: (the folder, the dataset, its classes).
fn synthetic_line() -> (tempfile::TempDir, PathBuf, Vec<String>) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    synth_line(&data);
    let classes = cras::dataset::discover_classes(&data).unwrap();
    (tmp, data, classes)
}

/// `cras train` with `extra` fails; its error output.
fn refused(data: &Path, dir: &Path, name: &str, extra: &[&str]) -> String {
    let (code, err) = train(data, dir, name, extra);
    assert_ne!(code, 0, "accepted: {extra:?}");
    err
}

/// Image scores of `images` under the bundle in `model`, as `cras infer` gives them.
fn scores(model: &Path, images: &[PathBuf]) -> Vec<f32> {
    let mut args = vec![
        "infer".to_string(),
        "--model".into(),
        model.to_str().unwrap().into(),
    ];
    args.extend(images.iter().map(|p| p.to_str().unwrap().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = cras(&args);
    assert_eq!(code, 0, "{err}");
    out.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["score"].as_f64().unwrap() as f32
        })
        .collect()
}

#[test]
fn real_defect_images_are_the_validation_positives() {
    let (tmp, data, classes) = synthetic_line();
    let dir = tmp.path();
    // Two of the three classes have defect images; the third simply has none.
    let defects = dir.join("defects");
    let mut positives = Vec::new();
    for class in &classes[..2] {
        positives.extend(copy_defects(&data, class, &defects));
    }
    let (code, err) = train(
        &data,
        dir,
        "m",
        &["--val-defect-images", defects.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!("+{} real defect images from", positives.len())),
        "{err}"
    );
    let meta = cras::model::bundle::Bundle::read(&dir.join("m"))
        .unwrap()
        .meta;
    let t = meta.provenance.training.unwrap();
    assert_eq!(
        t.options["val_defect_images"],
        defects.display().to_string()
    );
    assert!(
        !t.options.contains_key("val_defects"),
        "painted-defect settings recorded for a run that painted none: {:?}",
        t.options
    );
    // The recorded figure of the selected epoch is the exported model's AUROC on the
    // hold-out's good images against the real defect images.
    let best = t
        .epochs
        .iter()
        .filter_map(|e| e.validation_auroc)
        .fold(f64::MIN, f64::max);
    let opened = cras::dataset::open(&data, &classes).unwrap();
    let held: Vec<PathBuf> = cras::dataset::holdout_split(&opened, 0, 0.1)
        .unwrap()
        .into_iter()
        .flat_map(|(_, v)| v)
        .collect();
    let mut images = held.clone();
    images.extend(positives.iter().cloned());
    let labels: Vec<bool> = (0..images.len()).map(|i| i >= held.len()).collect();
    let auroc = cras::metrics::roc_auc(&scores(&dir.join("m"), &images), &labels).unwrap();
    // The graph and the training loop compute the head apart: one pair may swap.
    let pair = 1.0 / (held.len() * positives.len()) as f64;
    assert!(
        (auroc - best).abs() <= pair + 1e-9,
        "recorded validation AUROC {best}, the model's on those images {auroc}"
    );
}

#[test]
fn defect_folders_and_flags_that_cannot_be_meant_are_refused() {
    let (tmp, data, classes) = synthetic_line();
    let dir = tmp.path();
    // A folder that names no class (a typo would drop its images silently).
    let typo = dir.join("typo");
    copy_defects(&data, &classes[0], &typo);
    std::fs::rename(typo.join(&classes[0]), typo.join("scews")).unwrap();
    let err = refused(
        &data,
        dir,
        "a",
        &["--val-defect-images", typo.to_str().unwrap()],
    );
    assert!(
        err.contains("`scews` is not a class of this model"),
        "{err}"
    );
    assert!(!dir.join("a.work").join("train.features").exists());
    // No image at all.
    let empty = dir.join("empty");
    std::fs::create_dir_all(empty.join(&classes[0])).unwrap();
    let err = refused(
        &data,
        dir,
        "b",
        &["--val-defect-images", empty.to_str().unwrap()],
    );
    assert!(err.contains("holds no defect images"), "{err}");
    // Nothing held out to tell them from.
    let real = dir.join("real");
    copy_defects(&data, &classes[0], &real);
    let real = real.to_str().unwrap();
    let err = refused(
        &data,
        dir,
        "c",
        &["--val-defect-images", real, "--val-fraction", "0"],
    );
    assert!(err.contains("--val-fraction must be above 0"), "{err}");
    // Painted-defect settings beside real images.
    let err = refused(
        &data,
        dir,
        "d",
        &["--val-defect-images", real, "--val-defects", "crack"],
    );
    assert!(err.contains("cannot be used with"), "{err}");
    // No run to keep.
    let err = refused(
        &data,
        dir,
        "e",
        &["--val-defect-images", real, "--restarts", "0"],
    );
    assert!(err.contains("--restarts 0: give at least 1"), "{err}");
}

#[test]
fn restarts_keep_the_best_run_and_it_is_that_seeds_run() {
    let (tmp, data, classes) = synthetic_line();
    let dir = tmp.path();
    let defects = dir.join("defects");
    for class in &classes {
        copy_defects(&data, class, &defects);
    }
    let defects = defects.to_str().unwrap();
    let (code, err) = train(
        &data,
        dir,
        "best",
        &["--val-defect-images", defects, "--restarts", "3"],
    );
    assert_eq!(code, 0, "{err}");
    let best = cras::model::bundle::Bundle::read(&dir.join("best"))
        .unwrap()
        .meta;
    let t = best.provenance.training.clone().unwrap();
    let seeds: Vec<u64> = t.restarts.iter().map(|r| r.seed).collect();
    assert_eq!(seeds, [0, 1, 2]);
    // The kept run is the first with the highest validation figure.
    let top = t
        .restarts
        .iter()
        .map(|r| r.validation_auroc.unwrap())
        .fold(f64::MIN, f64::max);
    let kept = t
        .restarts
        .iter()
        .find(|r| r.validation_auroc == Some(top))
        .unwrap();
    assert_eq!(t.seed, kept.seed, "{:?}", t.restarts);
    assert_eq!(t.holdout_seed(), 0);
    assert_eq!(t.selected_epoch, kept.selected_epoch);
    assert!(err.contains(&format!("kept seed {}", kept.seed)), "{err}");
    // It is exactly the model a single run with that seed on the same hold-out trains.
    let seed = kept.seed.to_string();
    let (code, err) = train(
        &data,
        dir,
        "single",
        &[
            "--val-defect-images",
            defects,
            "--seed",
            &seed,
            "--holdout-seed",
            "0",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let single = cras::model::bundle::Bundle::read(&dir.join("single"))
        .unwrap()
        .meta;
    assert_eq!(best.onnx_sha256, single.onnx_sha256);

    // --resume after the third run was lost (interrupted before its first epoch): the
    // first two continue from their finished checkpoints, the third trains afresh, and
    // the kept model and the runs' records are the same as without the interruption.
    std::fs::remove_dir_all(dir.join("best.work").join("restart-2")).unwrap();
    std::fs::remove_dir_all(dir.join("best")).unwrap();
    let (code, err) = train(
        &data,
        dir,
        "best",
        &[
            "--val-defect-images",
            defects,
            "--restarts",
            "3",
            "--resume",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(err.matches("resuming at epoch 3").count(), 2, "{err}");
    assert!(err.contains("restart-2; starting afresh"), "{err}");
    let resumed = cras::model::bundle::Bundle::read(&dir.join("best"))
        .unwrap()
        .meta;
    assert_eq!(resumed.onnx_sha256, best.onnx_sha256);
    let records = |m: &cras::model::bundle::BundleMeta| {
        serde_json::to_string(&m.provenance.training.as_ref().unwrap().restarts).unwrap()
    };
    assert_eq!(records(&resumed), records(&best));
}
