//! The synthetic line: seeded, reproducible, defects where the masks say.

use super::*;

#[test]
fn defect_strength_blends_only_inside_the_mask() {
    let base = good_image(0, 64, &mut Rng::new(3));
    let mut full = base.clone();
    let mask = paint_random_defect(&mut full, &mut Rng::new(9), 1.0, DefectKinds::ALL);
    let mut none = base.clone();
    assert_eq!(
        paint_random_defect(&mut none, &mut Rng::new(9), 0.0, DefectKinds::ALL),
        mask
    );
    assert_eq!(none, base, "strength 0 paints nothing");
    let mut half = base.clone();
    paint_random_defect(&mut half, &mut Rng::new(9), 0.5, DefectKinds::ALL);
    let mut inside = 0;
    for ((h, (b, f)), m) in half
        .pixels()
        .zip(base.pixels().zip(full.pixels()))
        .zip(mask.pixels())
    {
        for c in 0..3 {
            let want = (b.0[c] as f64 + (f.0[c] as f64 - b.0[c] as f64) * 0.5).round();
            if m.0[0] > 0 {
                assert!((h.0[c] as f64 - want).abs() <= 0.5);
                inside += 1;
            } else {
                assert_eq!(h.0[c], b.0[c]);
            }
        }
    }
    assert!(inside > 0);
}

#[test]
fn cracks_are_thin_dark_and_only_where_asked() {
    let kinds = DefectKinds::parse("crack").unwrap();
    assert_eq!(kinds.names(), "crack");
    for seed in 0..20 {
        let base = RgbImage::from_pixel(128, 128, Rgb([200, 200, 200]));
        let mut img = base.clone();
        let mask = paint_random_defect(&mut img, &mut Rng::new(seed), 1.0, kinds);
        let on = mask.pixels().filter(|p| p.0[0] == 255).count();
        // 20-50% of the side long (plus a fork), 1-2.4 px wide: thin, never a blob.
        assert!(
            (15..128 * 128 / 20).contains(&on),
            "seed {seed}: {on} mask pixels"
        );
        for ((p, b), m) in img.pixels().zip(base.pixels()).zip(mask.pixels()) {
            if m.0[0] == 255 {
                assert_eq!(p.0, [90, 90, 90], "darkened to 45%");
            } else {
                assert_eq!(p, b, "nothing painted outside the mask");
            }
        }
    }
    let err = DefectKinds::parse("scratch,dent").unwrap_err().to_string();
    assert!(err.contains("`dent`") && err.contains("crack"), "{err}");
    assert!(DefectKinds::parse(" , ").is_err());
}

#[test]
fn same_seed_gives_identical_files_and_masks_cover_defects() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    for dir in [&a, &b] {
        generate(&SynthOptions {
            out: dir.path().to_path_buf(),
            classes: 2,
            train: 2,
            test_good: 1,
            test_defect: 1,
            size: 64,
            seed: 3,
        })
        .unwrap();
    }
    for rel in [
        "stripes/train/good/001.png",
        "checker/test/spot/000.png",
        "checker/ground_truth/missing/000_mask.png",
    ] {
        assert_eq!(
            std::fs::read(a.path().join(rel)).unwrap(),
            std::fs::read(b.path().join(rel)).unwrap(),
            "{rel}"
        );
    }
    for d in DEFECTS {
        let m = image::open(
            a.path()
                .join(format!("stripes/ground_truth/{d}/000_mask.png")),
        )
        .unwrap()
        .to_luma8();
        let on = m.pixels().filter(|p| p.0[0] == 255).count();
        assert!(on > 20 && on < 64 * 64 / 4, "{d}: {on} mask pixels");
    }
}
