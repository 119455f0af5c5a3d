//! Test-time views: a bundle that scores an image in several orientations gives the
//! map that the single-view model's maps of the turned and mirrored images give when
//! each is read back into the image's orientation and their logits are averaged; its
//! image score is the top 0.5 % of that map. `cras rebuild` changes the views of a
//! trained bundle without training, leaves the bundle it came from untouched, drops the
//! thresholds that no longer apply, and refuses what it cannot do.

mod common;

use common::*;
use image::imageops;
use std::path::{Path, PathBuf};

/// A one-class model from the synthetic line that scores the image and the image turned
/// by 180 degrees, one epoch at 128 px.
fn trained(dir: &Path, data: &Path) -> PathBuf {
    let model = dir.join("model");
    let extra = [
        "--embed-dim",
        "64",
        "--epochs",
        "1",
        "--views",
        "original,rotate180",
    ];
    train_128(data, "checker", &model, &extra);
    model
}

fn rebuild(model: &Path, out: &Path, views: &str) -> (i32, String) {
    let (code, _, err) = cras(&[
        "rebuild",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--views",
        views,
    ]);
    (code, err)
}

/// The anomaly map (128 x 128) and image score `cras infer` gives for each image.
fn maps(model: &Path, imgs: &[PathBuf], out: &Path) -> Vec<(Vec<f32>, f64)> {
    let mut args = vec![
        "infer".to_string(),
        "--model".into(),
        model.display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    args.extend(imgs.iter().map(|p| p.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, stdout, err) = cras(&args);
    assert_eq!(code, 0, "infer: {err}");
    stdout
        .lines()
        .zip(imgs)
        .map(|(line, img)| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let stem = img.file_stem().unwrap().to_string_lossy();
            let map = walk(out)
                .into_iter()
                .find(|p| p.file_name().unwrap().to_string_lossy() == format!("{stem}.map.npy"))
                .unwrap_or_else(|| panic!("no map for {stem}"));
            (f32s(&map), v["score"].as_f64().unwrap())
        })
        .collect()
}

/// The map read back from view `v` ("h": mirrored left-right, "v": top-bottom, "hv": both).
fn unview(map: &[f32], v: &str, n: usize) -> Vec<f64> {
    (0..n * n)
        .map(|i| {
            let (mut y, mut x) = (i / n, i % n);
            if v.contains('h') {
                x = n - 1 - x;
            }
            if v.contains('v') {
                y = n - 1 - y;
            }
            map[y * n + x] as f64
        })
        .collect()
}

fn logit(p: f64) -> f64 {
    let p = p.clamp(f32::EPSILON as f64, 1.0 - f32::EPSILON as f64);
    (p / (1.0 - p)).ln()
}

fn top_mean(map: &[f64], k: usize) -> f64 {
    let mut m = map.to_vec();
    m.sort_by(|a, b| b.total_cmp(a));
    m[..k].iter().sum::<f64>() / k as f64
}

#[test]
fn views_combine_the_single_view_maps_and_rebuild_switches_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synth_line(&data);
    let model = trained(dir.path(), &data);
    let meta = cras::model::bundle::Bundle::read(&model).unwrap().meta;
    assert_eq!(
        meta.views.label(),
        "original,rotate180",
        "the default views"
    );
    let yaml = std::fs::read_to_string(model.join("model.yaml")).unwrap();
    assert!(yaml.contains("views:\n- original\n- rotate180"), "{yaml}");

    // The single-view model, rebuilt from the same head: its graph is the one a model
    // trained with `--views original` has, and the trained bundle is not touched.
    let before = std::fs::read(model.join("model.onnx")).unwrap();
    let single = dir.path().join("single");
    let (code, err) = rebuild(&model, &single, "original");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("no thresholds"), "{err}");
    assert_eq!(std::fs::read(model.join("model.onnx")).unwrap(), before);
    let single_meta = cras::model::bundle::Bundle::read(&single).unwrap().meta;
    assert!(single_meta.views.is_original() && single_meta.thresholds.is_empty());
    assert_ne!(single_meta.onnx_sha256, meta.onnx_sha256);
    // The trained head and centers are carried over unchanged.
    assert_eq!(single_meta.head_sha256, meta.head_sha256);
    let yaml = std::fs::read_to_string(single.join("model.yaml")).unwrap();
    assert!(
        !yaml.contains("views:"),
        "the original alone is not written: {yaml}"
    );

    // Two defective images and their turned and mirrored copies.
    let views = dir.path().join("views");
    std::fs::create_dir_all(&views).unwrap();
    let mut sources = Vec::new();
    for (k, name) in ["scratch/000.png", "spot/001.png"].iter().enumerate() {
        let img = image::open(data.join("checker/test").join(name)).unwrap();
        for (v, turned) in [
            ("o", img.clone()),
            ("h", img.fliph()),
            ("v", img.flipv()),
            (
                "hv",
                image::DynamicImage::ImageRgba8(imageops::rotate180(&img)),
            ),
        ] {
            let p = views.join(format!("{k}{v}.png"));
            turned.save(&p).unwrap();
            sources.push(p);
        }
    }
    let one = maps(&single, &sources, &dir.path().join("maps-single"));
    let n = 128;
    // Averaging logits of the maps read back, then the sigmoid, as the graph does.
    let expected = |k: usize, which: &[&str]| -> Vec<f64> {
        let per: Vec<Vec<f64>> = which
            .iter()
            .map(|v| {
                let i = k * 4 + ["o", "h", "v", "hv"].iter().position(|x| x == v).unwrap();
                unview(&one[i].0, v, n)
            })
            .collect();
        (0..n * n)
            .map(|p| {
                let l = per.iter().map(|m| logit(m[p])).sum::<f64>() / per.len() as f64;
                1.0 / (1.0 + (-l).exp())
            })
            .collect()
    };
    let four = dir.path().join("four");
    let (code, err) = rebuild(&model, &four, "original,flip_h,flip_v,rotate180");
    assert_eq!(code, 0, "{err}");
    for (bundle, which) in [
        (&model, &["o", "hv"][..]),
        (&four, &["o", "h", "v", "hv"][..]),
    ] {
        let originals: Vec<PathBuf> = vec![sources[0].clone(), sources[4].clone()];
        let got = maps(
            bundle,
            &originals,
            &dir.path().join(format!("maps-{}", which.len())),
        );
        for (k, (map, score)) in got.iter().enumerate() {
            let want = expected(k, which);
            let worst = map
                .iter()
                .zip(&want)
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0.0, f64::max);
            assert!(worst < 1e-4, "{which:?} image {k}: map off by {worst}");
            // The image score is the top 81 pixels (0.5 % of 128 x 128) of that map.
            let top = top_mean(&want, 81);
            assert!((score - top).abs() < 1e-4, "{which:?}: {score} vs {top}");
            // And it is not the single view's score.
            assert!(
                (score - one[k * 4].1).abs() > 1e-6,
                "{which:?}: same as one view"
            );
        }
    }

    // Another image score, the views kept: the top 1 % (163 pixels) of the same map.
    let top1 = dir.path().join("top1");
    let (code, _, err) = cras(&[
        "rebuild",
        "--model",
        model.to_str().unwrap(),
        "--out",
        top1.to_str().unwrap(),
        "--image-score",
        "map-top:0.01",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("views original,rotate180, image score map-top:0.01"),
        "{err}"
    );
    let got = maps(&top1, &[sources[0].clone()], &dir.path().join("maps-top1"));
    let top = top_mean(&expected(0, &["o", "hv"]), 163);
    assert!((got[0].1 - top).abs() < 1e-4, "{} vs {top}", got[0].1);

    // Calibrating the rebuilt bundle sets its thresholds again.
    let (code, _, err) = cras(&[
        "calibrate",
        "--model",
        four.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "calibrate: {err}");
    assert_eq!(
        cras::model::bundle::Bundle::read(&four)
            .unwrap()
            .meta
            .thresholds
            .len(),
        1
    );

    // Refused: an output that holds a bundle, views without the original first, a view
    // named twice, and a rebuild that changes nothing.
    let (code, err) = rebuild(&model, &four, "original");
    assert_ne!(code, 0);
    assert!(err.contains("a bundle is already there"), "{err}");
    let fresh = dir.path().join("fresh");
    let (code, err) = rebuild(&model, &fresh, "rotate180,original");
    assert_ne!(code, 0);
    assert!(err.contains("first view must be `original`"), "{err}");
    let (code, err) = rebuild(&model, &fresh, "original,flip_h,flip-h");
    assert_ne!(code, 0);
    assert!(err.contains("named twice"), "{err}");
    let (code, _, err) = cras(&[
        "rebuild",
        "--model",
        model.to_str().unwrap(),
        "--out",
        fresh.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("give --views or --image-score"), "{err}");
    assert!(!fresh.exists(), "nothing written on a refusal");
}
