//! torchvision ResNets (resnet18, resnet50, wide_resnet50_2) with their state-dict key
//! names. Stage A is `layer2`'s output (stride 8), stage B `layer3`'s (stride 16);
//! layer4 and fc are validated but never computed.

use super::{BackboneKind, BuildCtx, conv_out};
use crate::weights::WeightsError;

struct Arch {
    bottleneck: bool,
    blocks: [usize; 4],
    /// Bottleneck inner width multiplier (wide_resnet50_2: 2).
    width_mult: usize,
}

fn arch(kind: BackboneKind) -> Arch {
    match kind {
        BackboneKind::Resnet18 => Arch {
            bottleneck: false,
            blocks: [2, 2, 2, 2],
            width_mult: 1,
        },
        BackboneKind::Resnet50 => Arch {
            bottleneck: true,
            blocks: [3, 4, 6, 3],
            width_mult: 1,
        },
        _ => Arch {
            bottleneck: true,
            blocks: [3, 4, 6, 3],
            width_mult: 2,
        },
    }
}

/// One residual block's convolutions: (name, [out, in, k, k], stride).
struct BlockPlan {
    prefix: String,
    convs: Vec<(String, [usize; 4], usize)>,
    downsample: Option<[usize; 4]>,
    stride: usize,
    out: usize,
}

fn plan(kind: BackboneKind) -> Vec<Vec<BlockPlan>> {
    let a = arch(kind);
    let expansion = if a.bottleneck { 4 } else { 1 };
    let mut inplanes = 64;
    let mut layers = Vec::new();
    for (li, (&n, planes)) in a.blocks.iter().zip([64, 128, 256, 512]).enumerate() {
        let layer_stride = if li == 0 { 1 } else { 2 };
        let mut blocks = Vec::new();
        for bi in 0..n {
            let stride = if bi == 0 { layer_stride } else { 1 };
            let out = planes * expansion;
            let prefix = format!("layer{}.{bi}", li + 1);
            let convs = if a.bottleneck {
                let width = planes * a.width_mult;
                vec![
                    ("conv1".to_string(), [width, inplanes, 1, 1], 1),
                    ("conv2".to_string(), [width, width, 3, 3], stride),
                    ("conv3".to_string(), [out, width, 1, 1], 1),
                ]
            } else {
                vec![
                    ("conv1".to_string(), [planes, inplanes, 3, 3], stride),
                    ("conv2".to_string(), [planes, planes, 3, 3], 1),
                ]
            };
            let downsample = (stride != 1 || inplanes != out).then_some([out, inplanes, 1, 1]);
            blocks.push(BlockPlan {
                prefix,
                convs,
                downsample,
                stride,
                out,
            });
            inplanes = out;
        }
        layers.push(blocks);
    }
    layers
}

fn bn_keys(out: &mut Vec<(String, Vec<usize>)>, prefix: &str, c: usize) {
    for s in ["weight", "bias", "running_mean", "running_var"] {
        out.push((format!("{prefix}.{s}"), vec![c]));
    }
}

pub fn expected_keys(kind: BackboneKind) -> Vec<(String, Vec<usize>)> {
    let mut keys = vec![("conv1.weight".to_string(), vec![64, 3, 7, 7])];
    bn_keys(&mut keys, "bn1", 64);
    let mut last = 64;
    for layer in plan(kind) {
        for b in layer {
            for (i, (name, shape, _)) in b.convs.iter().enumerate() {
                keys.push((format!("{}.{name}.weight", b.prefix), shape.to_vec()));
                bn_keys(&mut keys, &format!("{}.bn{}", b.prefix, i + 1), shape[0]);
            }
            if let Some(ds) = b.downsample {
                keys.push((format!("{}.downsample.0.weight", b.prefix), ds.to_vec()));
                bn_keys(&mut keys, &format!("{}.downsample.1", b.prefix), ds[0]);
            }
            last = b.out;
        }
    }
    keys.push(("fc.weight".to_string(), vec![1000, last]));
    keys.push(("fc.bias".to_string(), vec![1000]));
    keys
}

pub fn stage_sizes(h: usize, w: usize) -> ((usize, usize), (usize, usize)) {
    let down = |s: usize| conv_out(s, 3, 2, 2);
    let stem = |s: usize| down(conv_out(s, 7, 2, 6));
    let a = (down(stem(h)), down(stem(w)));
    let b = (down(a.0), down(a.1));
    (a, b)
}

pub fn build(
    ctx: &mut BuildCtx,
    x: &str,
    h: usize,
    w: usize,
) -> Result<(String, String), WeightsError> {
    let mut hw = (conv_out(h, 7, 2, 6), conv_out(w, 7, 2, 6));
    let mut y = ctx.conv(x, "conv1", [64, 3, 7, 7], 2, [3, 3, 3, 3], 1)?;
    y = ctx.bn(&y, "bn1", 64, hw)?;
    y = ctx.g.relu(&y);
    y = ctx.g.node(
        "MaxPool",
        &[&y],
        vec![
            ("kernel_shape", crate::onnx::Attr::Ints(vec![3, 3])),
            ("strides", crate::onnx::Attr::Ints(vec![2, 2])),
            ("pads", crate::onnx::Attr::Ints(vec![1, 1, 1, 1])),
        ],
    );
    hw = (conv_out(hw.0, 3, 2, 2), conv_out(hw.1, 3, 2, 2));
    let mut stage_a = String::new();
    for (li, layer) in plan(ctx.backbone.kind).into_iter().take(3).enumerate() {
        for b in layer {
            let identity = y.clone();
            let out_hw = (
                conv_out(hw.0, 1, b.stride, 0),
                conv_out(hw.1, 1, b.stride, 0),
            );
            let n = b.convs.len();
            for (i, (name, shape, stride)) in b.convs.iter().enumerate() {
                let pad = shape[2] / 2;
                y = ctx.conv(
                    &y,
                    &format!("{}.{name}", b.prefix),
                    *shape,
                    *stride,
                    [pad; 4],
                    1,
                )?;
                // The strided conv sits at conv2 (bottleneck) or conv1 (basic block).
                hw = if *stride != 1 { out_hw } else { hw };
                y = ctx.bn(&y, &format!("{}.bn{}", b.prefix, i + 1), shape[0], hw)?;
                if i + 1 < n {
                    y = ctx.g.relu(&y);
                }
            }
            let shortcut = match b.downsample {
                Some(ds) => {
                    let s = ctx.conv(
                        &identity,
                        &format!("{}.downsample.0", b.prefix),
                        ds,
                        b.stride,
                        [0; 4],
                        1,
                    )?;
                    ctx.bn(&s, &format!("{}.downsample.1", b.prefix), ds[0], out_hw)?
                }
                None => identity,
            };
            y = ctx.g.add(&y, &shortcut);
            y = ctx.g.relu(&y);
            hw = out_hw;
        }
        if li == 1 {
            stage_a = y.clone();
        }
    }
    Ok((stage_a, y))
}
