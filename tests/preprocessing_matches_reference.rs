//! Pre-processing reproduces the reference's network inputs bit for bit (Pillow's
//! fixed-point resize, half-to-even crop offset, torchvision normalisation).

mod common;

use cras::preprocess::{self, IMAGENET_MEAN, IMAGENET_STD, InputSpec};

fn spec() -> InputSpec {
    InputSpec {
        height: 288,
        width: 288,
        resize: 329,
        mean: IMAGENET_MEAN,
        std: IMAGENET_STD,
    }
}

#[test]
fn pillow_resize_intermediate_is_identical() {
    let set = common::fixtures().join("lite0-d384");
    let img = preprocess::load_rgb(&set.join("images/alpha/test/good/000.png")).unwrap();
    let ours = preprocess::resize_bilinear_pillow(&img, 329, 329);
    let reference = preprocess::load_rgb(&set.join("img0_resized329.png")).unwrap();
    let differing = ours
        .as_raw()
        .iter()
        .zip(reference.as_raw())
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(
        differing, 0,
        "{differing} bytes differ from Pillow's 288->329 resize"
    );
}

#[test]
fn network_inputs_are_bit_identical() {
    let fx = common::fixtures();
    let mut checked = 0;
    for (set, images) in [
        ("lite0-d384", "lite0-d384/images"),
        ("wrn50-formula", "wrn50-formula/images"),
    ] {
        for r in common::results(&fx.join(set)) {
            let i = r["index"].as_u64().unwrap();
            let stored = fx.join(set).join(format!("img{i}_input.npy"));
            if !stored.is_file() {
                continue;
            }
            let (ours, _) = preprocess::prepare(
                &fx.join(images).join(r["source"].as_str().unwrap()),
                &spec(),
            )
            .unwrap();
            let reference = common::f32s(&stored);
            assert_eq!(ours.len(), reference.len());
            let bad = ours
                .iter()
                .zip(&reference)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(bad, 0, "{set} image {i}: {bad} values differ");
            checked += 1;
        }
    }
    assert_eq!(checked, 7, "expected 6 lite0 inputs and 1 wrn50 input");
}

#[test]
fn non_square_and_gray_images_are_resized_on_the_shorter_side() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.png");
    image::GrayImage::from_fn(400, 300, |x, y| image::Luma([((x + y) % 256) as u8]))
        .save(&p)
        .unwrap();
    let (t, crop) = preprocess::prepare(&p, &spec()).unwrap();
    assert_eq!(t.len(), 3 * 288 * 288);
    assert_eq!((crop.width(), crop.height()), (288, 288));
    // Gray replicated to three equal channels before normalisation.
    let px = crop.get_pixel(10, 10).0;
    assert!(px[0] == px[1] && px[1] == px[2]);
}
