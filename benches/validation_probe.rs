//! Which validation positives rank trained models the way their test split does?
//!
//! `cras train` chooses epochs (and its defaults were chosen) on a hold-out of good
//! images and the same images with a synthetic defect painted on. This probe rebuilds
//! that validation set for trained bundles, for other defect kinds and strengths, scores
//! it with each bundle (`cras eval`), and prints the validation image AUROC of every
//! design next to each model's test figure (from `report-<model>/metrics.json` beside
//! the bundle, as `benches/elpv.sh` writes it). A design that orders the models as the
//! test does can tell a better model from a worse one; one that does not cannot.
//!
//! Run: `cargo bench --bench validation_probe -- DATA MODEL...`, for example
//! `-- target/bench-elpv/mvtec target/bench-elpv/h0s0 target/bench-elpv/h0s1
//! target/bench-elpv/h0s2`. The models must share one hold-out (`--holdout-seed`).
//! PROBE_KINDS (default `crack;scratch;spot;missing`, sets separated by `;`) and
//! PROBE_STRENGTHS (default `0.05,0.1,0.2`) choose the designs; PROBE_POSITIVES=DIR adds
//! one with real defective images, the images in `DIR/<class>/` (PROBE_KINDS= leaves
//! the painted ones out). Images are painted as
//! `cras train` paints them (same seeds), at the models' input size, into a temporary
//! folder, or into PROBE_KEEP=DIR, which keeps them (for scoring rules on the same images).

use cras::model::bundle::Bundle;
use cras::synth::DefectKinds;
use cras::train::features::Source;
use std::path::{Path, PathBuf};
use std::process::Command;

fn cras_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cras"))
}

/// Mean image AUROC per class and over classes from `metrics.json`.
fn image_auroc(metrics: &Path) -> Option<f64> {
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(metrics).ok()?).ok()?;
    m["mean"]["image_auroc"].as_f64()
}

/// What a design takes as its defective images.
enum Positives<'a> {
    /// One painted copy of each hold-out image: these kinds at this strength.
    Painted(DefectKinds, f64),
    /// Real images: those in `<dir>/<class>/`, as `cras train --val-defect-images` reads them.
    Real(&'a Path),
}

/// Writes the hold-out (good) and the design's positives (defect), in MVTec layout under
/// `out`.
fn write_design(bundle: &Bundle, data: &Path, positives: &Positives, out: &Path) {
    let t = bundle
        .meta
        .provenance
        .training
        .as_ref()
        .expect("a bundle from `cras train`");
    let fraction: f64 = t.options["val_fraction"].parse().expect("val_fraction");
    let classes = cras::dataset::open(data, &bundle.meta.classes).expect("the dataset");
    let split = cras::dataset::holdout_split(&classes, t.holdout_seed(), fraction).unwrap();
    let spec = &bundle.meta.input;
    let real = match positives {
        Positives::Real(dir) => cras::dataset::defect_images(dir, &bundle.meta.classes).unwrap(),
        Positives::Painted(..) => vec![Vec::new(); bundle.meta.classes.len()],
    };
    // `cras train` seeds each painted copy by the image's index in the whole hold-out.
    let mut k = 0;
    for ((class, (_, held)), real) in bundle.meta.classes.iter().zip(split).zip(real) {
        let good = out.join(class).join("test/good");
        let defect = out.join(class).join("test/defect");
        std::fs::create_dir_all(&good).unwrap();
        std::fs::create_dir_all(&defect).unwrap();
        for p in held {
            let name = format!("{k:05}.png");
            Source::File(p.clone())
                .load(spec)
                .unwrap()
                .save(good.join(&name))
                .unwrap();
            if let Positives::Painted(kinds, strength) = *positives {
                Source::validation_positive(p, t.holdout_seed(), k, strength, kinds)
                    .load(spec)
                    .unwrap()
                    .save(defect.join(&name))
                    .unwrap();
            }
            k += 1;
        }
        // Real images are prepared as the hold-out is, so both go through the same steps.
        for f in real {
            let name = Path::new(f.file_name().unwrap()).with_extension("png");
            Source::File(f)
                .load(spec)
                .unwrap()
                .save(defect.join(name))
                .unwrap();
        }
    }
}

fn eval(model: &Path, data: &Path, report: &Path) -> f64 {
    let out = Command::new(cras_bin())
        .args(["eval", "--model"])
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--report")
        .arg(report)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cras eval: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    image_auroc(&report.join("metrics.json")).expect("metrics.json")
}

/// Pairs of models the design orders as the test does, out of all pairs.
fn agreement(val: &[f64], test: &[f64]) -> (usize, usize) {
    let mut same = 0;
    let mut pairs = 0;
    for i in 0..val.len() {
        for j in i + 1..val.len() {
            pairs += 1;
            if (val[i] - val[j]) * (test[i] - test[j]) > 0.0 {
                same += 1;
            }
        }
    }
    (same, pairs)
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let Some((data, models)) = args.split_first() else {
        eprintln!("usage: cargo bench --bench validation_probe -- DATA MODEL...");
        return;
    };
    let data = PathBuf::from(data);
    let models: Vec<PathBuf> = models.iter().map(PathBuf::from).collect();
    let bundles: Vec<Bundle> = models.iter().map(|m| Bundle::read(m).unwrap()).collect();
    let test: Vec<f64> = models
        .iter()
        .map(|m| {
            let name = m.file_name().unwrap().to_string_lossy();
            image_auroc(
                &m.with_file_name(format!("report-{name}"))
                    .join("metrics.json"),
            )
            .unwrap_or(f64::NAN)
        })
        .collect();
    let kinds = std::env::var("PROBE_KINDS").unwrap_or("crack;scratch;spot;missing".into());
    let strengths = std::env::var("PROBE_STRENGTHS").unwrap_or("0.05,0.1,0.2".into());
    let tmp = tempfile::tempdir().unwrap();
    let root =
        std::env::var_os("PROBE_KEEP").map_or_else(|| tmp.path().to_path_buf(), PathBuf::from);
    let names: Vec<String> = models
        .iter()
        .map(|m| m.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    println!(
        "| design | {} | pairs ordered as on test |",
        names.join(" | ")
    );
    println!("|---|{}---|", "---|".repeat(names.len()));
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.4}"))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    println!("| test (the models' reports) | {} | - |", fmt(&test));
    let real = std::env::var_os("PROBE_POSITIVES").map(PathBuf::from);
    let mut designs = Vec::new();
    if let Some(dir) = &real {
        let label = format!("real: {}", dir.display());
        designs.push((label, "real".to_string(), Positives::Real(dir)));
    }
    for set in kinds.split(';').filter(|s| !s.is_empty()) {
        let k = DefectKinds::parse(set).unwrap();
        for s in strengths.split(',') {
            let strength: f64 = s.trim().parse().unwrap();
            let dir = format!("{}-{s}", set.replace(',', "+"));
            designs.push((
                format!("{set} at {s}"),
                dir,
                Positives::Painted(k, strength),
            ));
        }
    }
    for (label, dir, positives) in designs {
        let design = root.join(dir);
        write_design(&bundles[0], &data, &positives, &design);
        let val: Vec<f64> = models
            .iter()
            .zip(&names)
            .map(|(m, n)| eval(m, &design, &design.with_extension(format!("{n}.report"))))
            .collect();
        let (same, pairs) = agreement(&val, &test);
        println!("| {label} | {} | {same} of {pairs} |", fmt(&val));
    }
}
