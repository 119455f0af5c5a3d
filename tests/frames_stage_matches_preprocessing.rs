//! The frames stage (camera bytes in, network input out, inside onnxruntime) against the
//! Rust pre-processing that matches the reference bit for bit: the network input itself
//! on many frame sizes and pixel layouts, then scores and maps of the real lite0 model.

mod common;

use common::*;
use cras::engine::{CrasOutputs, EngineKind, EngineOptions, PixelLayout};
use cras::model::bundle::Bundle;
use cras::preprocess::{InputSpec, Normalization, load_rgb, normalise_into, resize_and_crop};
use image::RgbImage;

/// The frame's bytes as a camera in `layout` would deliver them.
fn as_layout(img: &RgbImage, layout: PixelLayout) -> Vec<u8> {
    let mut out = Vec::with_capacity(img.as_raw().len() / 3 * layout.channels());
    for p in img.pixels() {
        let [r, g, b] = p.0;
        match layout {
            PixelLayout::Rgb => out.extend([r, g, b]),
            PixelLayout::Bgr => out.extend([b, g, r]),
            PixelLayout::Rgbx => out.extend([r, g, b, 255]),
            PixelLayout::Bgrx => out.extend([b, g, r, 0]),
        }
    }
    out
}

/// Smooth gradients with hard edges and pixel noise: what a resize gets wrong first.
fn test_frame(w: u32, h: u32, seed: u32) -> RgbImage {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    RgbImage::from_fn(w, h, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let noise = (state % 23) as i32 - 11;
        let edge = if (x / 37 + y / 29) % 2 == 0 { 60 } else { 0 };
        let c = |v: u32| (v as i32 + edge + noise).clamp(0, 255) as u8;
        image::Rgb([c(x * 255 / w), c(y * 255 / h), c((x + y) * 127 / (w + h))])
    })
}

fn rust_input(img: &RgbImage, spec: &InputSpec) -> Vec<f32> {
    let mut v = Vec::new();
    normalise_into(&resize_and_crop(img, spec).unwrap(), spec, &mut v);
    v
}

#[test]
fn frames_stage_gives_the_rust_network_input() {
    let mut frames: Vec<RgbImage> = [
        (640, 480),
        (480, 640),
        (1920, 1080),
        (1280, 720),
        (333, 517),
        (329, 329),
        (300, 200),
        (288, 288),
        (120, 90),
    ]
    .iter()
    .enumerate()
    .map(|(i, (w, h))| test_frame(*w, *h, i as u32))
    .collect();
    let fixture_images = fixtures().join("lite0-d384/images/alpha/test");
    for p in walk(&fixture_images).iter().take(2) {
        frames.push(load_rgb(p).unwrap());
    }
    let specs = [
        InputSpec::square(288, 329, Normalization::Imagenet),
        InputSpec::square(224, 224, Normalization::Tflite),
        InputSpec {
            height: 160,
            width: 256,
            resize: 256,
            mean: [0.5, 0.4, 0.3],
            std: [0.2, 0.25, 0.3],
        },
    ];
    let mut worst = 0f32;
    let (mut differing, mut total) = (0usize, 0usize);
    for spec in &specs {
        let mut engine = EngineKind::Onnxruntime
            .load(
                &identity_model(spec),
                &EngineOptions {
                    frames: Some(spec.clone()),
                    threads: Some(2),
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(engine.takes_frames());
        for (i, img) in frames.iter().enumerate() {
            if spec.width > spec.resize && img.width() <= img.height() {
                continue; // the crop is wider than the resized frame: refused by both
            }
            let expected = rust_input(img, spec);
            for layout in [
                PixelLayout::Rgb,
                PixelLayout::Bgr,
                PixelLayout::Rgbx,
                PixelLayout::Bgrx,
            ] {
                let bytes = as_layout(img, layout);
                let shape = [
                    1,
                    img.height() as usize,
                    img.width() as usize,
                    layout.channels(),
                ];
                let outs = engine.run_frames(&bytes, shape, layout).unwrap();
                let got = outs[0].f32().unwrap();
                assert_eq!(outs[0].shape, [1, 3, spec.height, spec.width], "frame {i}");
                let d = got
                    .iter()
                    .zip(&expected)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                differing += got.iter().zip(&expected).filter(|(a, b)| a != b).count();
                total += got.len();
                worst = worst.max(d);
                // One grey level is 1/255/std in the network's units. onnxruntime's
                // resampler rounds a few pixels differently from Pillow's: measured at
                // most 2 levels, on at most 3.2% of the values (288 -> 224 shrinks).
                let level = 1.0 / 255.0 / spec.std.iter().cloned().fold(1.0, f32::min);
                assert!(
                    d <= 2.0 * level * 1.0001,
                    "frame {i} ({}x{}) {layout:?} {spec:?}: differs by {d} (one level {level})",
                    img.width(),
                    img.height()
                );
            }
        }
    }
    eprintln!(
        "frames stage vs Rust: max abs difference {worst:e}, {differing} of {total} values differ"
    );
    assert!(
        differing * 100 <= total,
        "{differing} of {total} values differ"
    );
}

#[test]
fn a_batch_of_frames_is_prepared_frame_by_frame() {
    let spec = InputSpec::square(288, 329, Normalization::Imagenet);
    let mut engine = EngineKind::Onnxruntime
        .load(
            &identity_model(&spec),
            &EngineOptions {
                frames: Some(spec.clone()),
                threads: Some(2),
                ..Default::default()
            },
        )
        .unwrap();
    let a = test_frame(640, 480, 1);
    let b = test_frame(640, 480, 2);
    let mut bytes = as_layout(&a, PixelLayout::Bgrx);
    bytes.extend(as_layout(&b, PixelLayout::Bgrx));
    let outs = engine
        .run_frames(&bytes, [2, 480, 640, 4], PixelLayout::Bgrx)
        .unwrap();
    let got = outs[0].f32().unwrap();
    let per = 3 * 288 * 288;
    let mut single = |img: &RgbImage| {
        let outs = engine
            .run_frames(
                &as_layout(img, PixelLayout::Bgrx),
                [1, 480, 640, 4],
                PixelLayout::Bgrx,
            )
            .unwrap();
        outs[0].f32().unwrap().to_vec()
    };
    assert_eq!(&got[..per], &single(&a)[..]);
    assert_eq!(&got[per..], &single(&b)[..]);
    // A buffer that does not hold the shape is an error, not a crash.
    let err = engine
        .run_frames(&bytes[1..], [2, 480, 640, 4], PixelLayout::Bgrx)
        .unwrap_err();
    assert!(err.to_string().contains("do not make"), "{err}");
}

#[test]
fn frames_stage_scores_match_on_the_lite0_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = Bundle::read(&lite0_bundle(dir.path(), "m")).unwrap();
    let spec = bundle.meta.input.clone();
    let mut engine = EngineKind::Onnxruntime
        .load(
            &bundle.onnx,
            &EngineOptions {
                frames: Some(spec.clone()),
                threads: Some(2),
                ..Default::default()
            },
        )
        .unwrap();
    let mut images = Vec::new();
    for class in ["alpha", "beta"] {
        let test = fixtures().join(format!("lite0-d384/images/{class}/test"));
        for e in walk(&test) {
            images.push(load_rgb(&e).unwrap());
        }
    }
    assert!(images.len() >= 4, "{} fixture images", images.len());
    let (mut score_d, mut map_d) = (0f32, 0f32);
    for img in &images {
        let input = rust_input(img, &spec);
        let rust =
            CrasOutputs::from_named(engine.run(&input, [1, 3, spec.height, spec.width]).unwrap())
                .unwrap();
        let bytes = as_layout(img, PixelLayout::Rgb);
        let shape = [1, img.height() as usize, img.width() as usize, 3];
        let frames =
            CrasOutputs::from_named(engine.run_frames(&bytes, shape, PixelLayout::Rgb).unwrap())
                .unwrap();
        assert_eq!(rust.class_ids, frames.class_ids);
        score_d = score_d.max((rust.image_scores[0] - frames.image_scores[0]).abs());
        map_d = map_d.max(
            rust.map(0)
                .iter()
                .zip(frames.map(0))
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max),
        );
    }
    eprintln!(
        "lite0 fixture, {} images: max score difference {score_d:e}, max map difference {map_d:e}",
        images.len()
    );
    // The stated tolerance. This head is seeded, not trained: its nearest-center choice
    // has patches within 1e-5 of a tie, so a grey level flips some; measured 4.2e-4 on
    // scores and 5.6e-2 on maps (the Rust path against the reference: 1e-5, 2e-2).
    assert!(score_d <= 1e-3, "scores differ by {score_d}");
    assert!(map_d <= 0.1, "maps differ by {map_d}");
}
