//! The frames stage: a small ONNX graph that takes camera frames as GStreamer hands them
//! over (uint8, NHWC, RGB / RGBA / BGRx / BGR at the camera's size) and does the
//! pre-processing of [`crate::preprocess`] itself: channel pick, the shorter side resized
//! to `resize` with an antialiased bilinear filter, the centre crop, the scaling and
//! normalisation, NCHW float32. Its output feeds the model graph's `image` input.
//!
//! Why a second graph and not a second input of `model.onnx`: Resize's `antialias` needs
//! opset 18, and the model graph is opset 17 (its ReduceMean/ReduceMax carry `axes` as an
//! attribute, which opset 18 moved to an input). The stage is generated from the bundle's
//! `input` section at load time, so every bundle has it, and it can run on a different
//! execution provider than the model (TensorRT has no antialiased resize; onnxruntime's
//! CPU and CUDA kernels do).
//!
//! onnxruntime's uint8 antialiased resize is Pillow's fixed-point resampler (22-bit
//! weights, uint8 between the horizontal and the vertical pass), so on CPU the network
//! input is the same as the Rust path's up to the last bit of a few pixels; the test
//! `frames_stage_matches_the_rust_preprocessing` states the measured figures.

use crate::onnx::{Attr, Dim, ElemType, GraphBuilder};
use crate::preprocess::InputSpec;

/// The opset the frames stage needs (Resize `antialias` and `axes`).
pub const FRAMES_OPSET: i64 = 18;

/// Where a capture pipeline delivers its frames (a template's `# memory` line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Memory {
    /// System memory (`video/x-raw,format=RGB` or encoded images).
    #[default]
    Host,
    /// GStreamer CUDA memory (x86 with an NVIDIA GPU).
    Cuda,
    /// Jetson NVMM surfaces.
    Nvmm,
}

impl Memory {
    pub fn name(self) -> &'static str {
        match self {
            Memory::Host => "host",
            Memory::Cuda => "cuda",
            Memory::Nvmm => "nvmm",
        }
    }
}

/// The byte layout of one camera pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PixelLayout {
    Rgb,
    Bgr,
    /// RGBA or RGBx: the fourth byte is ignored.
    Rgbx,
    /// BGRA or BGRx: the fourth byte is ignored.
    Bgrx,
}

impl PixelLayout {
    /// Bytes per pixel.
    pub fn channels(self) -> usize {
        match self {
            PixelLayout::Rgb | PixelLayout::Bgr => 3,
            PixelLayout::Rgbx | PixelLayout::Bgrx => 4,
        }
    }

    /// Which byte of a pixel is red, green and blue: the stage's `channels` input.
    pub fn rgb_indices(self) -> [i64; 3] {
        match self {
            PixelLayout::Rgb | PixelLayout::Rgbx => [0, 1, 2],
            PixelLayout::Bgr | PixelLayout::Bgrx => [2, 1, 0],
        }
    }

    /// The layout of a GStreamer raw video format name, if the stage takes it.
    pub fn from_gst_format(format: &str) -> Option<PixelLayout> {
        match format {
            "RGB" => Some(PixelLayout::Rgb),
            "BGR" => Some(PixelLayout::Bgr),
            "RGBA" | "RGBx" => Some(PixelLayout::Rgbx),
            "BGRA" | "BGRx" => Some(PixelLayout::Bgrx),
            _ => None,
        }
    }
}

/// The frames stage for a model's input: inputs `frames` uint8 [N,H,W,C] (C 3 or 4,
/// any H and W) and `channels` int64 [3]; output `image` float32 [N,3,h,w].
pub fn frames_graph(spec: &InputSpec) -> Vec<u8> {
    let mut g = GraphBuilder::with_opset(FRAMES_OPSET);
    let frames = g.input(
        "frames",
        ElemType::U8,
        vec![Dim::Sym("N"), Dim::Sym("H"), Dim::Sym("W"), Dim::Sym("C")],
    );
    let channels = g.input("channels", ElemType::I64, vec![Dim::Fixed(3)]);
    let rgb = g.node(
        "Gather",
        &[&frames, &channels],
        vec![("axis", Attr::Int(3))],
    );

    // torchvision Resize(size) on a PIL image: the shorter side becomes `resize`, the
    // longer int(resize * long / short); integer division is the same for these sizes.
    let shape = g.node("Shape", &[&rgb], vec![]);
    let hw_at = g.init_i64("hw_at", &[2], vec![1, 2]);
    let hw = g.node("Gather", &[&shape, &hw_at], vec![("axis", Attr::Int(0))]);
    let short = g.node("ReduceMin", &[&hw], vec![("keepdims", Attr::Int(1))]);
    let resize = g.init_i64("resize", &[1], vec![spec.resize as i64]);
    let scaled = g.node("Mul", &[&hw, &resize], vec![]);
    let sizes = g.node("Div", &[&scaled, &short], vec![]);
    // Resized as uint8 NCHW: onnxruntime's antialiased uint8 resize is Pillow's
    // fixed-point resampler, and NCHW is the layout the model takes.
    let nchw = g.node(
        "Transpose",
        &[&rgb],
        vec![("perm", Attr::Ints(vec![0, 3, 1, 2]))],
    );
    let nchw_shape = g.node("Shape", &[&nchw], vec![]);
    let zero = g.init_i64("zero", &[1], vec![0]);
    let two = g.init_i64("two", &[1], vec![2]);
    let nc = g.node("Slice", &[&nchw_shape, &zero, &two], vec![]);
    let sizes4 = g.node("Concat", &[&nc, &sizes], vec![("axis", Attr::Int(0))]);
    let resized = g.node(
        "Resize",
        &[&nchw, "", "", &sizes4],
        vec![
            ("mode", Attr::Str("linear".into())),
            ("antialias", Attr::Int(1)),
            (
                "coordinate_transformation_mode",
                Attr::Str("half_pixel".into()),
            ),
            ("exclude_outside", Attr::Int(1)),
        ],
    );

    // CenterCrop: int(round((size - crop) / 2)), rounded half to even as Python does:
    // q = d / 2, r = d - 2q, offset = q + r * (q mod 2).
    let crop = g.init_i64("crop", &[2], vec![spec.height as i64, spec.width as i64]);
    let d = g.node("Sub", &[&sizes, &crop], vec![]);
    let q = g.node("Div", &[&d, &two], vec![]);
    let q2 = g.node("Mul", &[&q, &two], vec![]);
    let r = g.node("Sub", &[&d, &q2], vec![]);
    let odd_q = g.node("Mod", &[&q, &two], vec![]);
    let up = g.node("Mul", &[&r, &odd_q], vec![]);
    let starts = g.node("Add", &[&q, &up], vec![]);
    let ends = g.node("Add", &[&starts, &crop], vec![]);
    let hw_axes = g.init_i64("hw_axes", &[2], vec![2, 3]);
    let cropped = g.node("Slice", &[&resized, &starts, &ends, &hw_axes], vec![]);

    // (pixel / 255 - mean) / std, in this order, as `normalise_into` computes it.
    let x = g.node(
        "Cast",
        &[&cropped],
        vec![("to", Attr::Int(ElemType::F32 as i64))],
    );
    let scale = g.init_f32("scale", &[1], vec![255.0]);
    let mean = g.init_f32("mean", &[1, 3, 1, 1], spec.mean.to_vec());
    let std = g.init_f32("std", &[1, 3, 1, 1], spec.std.to_vec());
    let x = g.node("Div", &[&x, &scale], vec![]);
    let x = g.node("Sub", &[&x, &mean], vec![]);
    let x = g.node("Div", &[&x, &std], vec![]);
    g.output(
        &x,
        "image",
        ElemType::F32,
        vec![
            Dim::Sym("N"),
            Dim::Fixed(3),
            Dim::Fixed(spec.height as i64),
            Dim::Fixed(spec.width as i64),
        ],
    );
    g.to_bytes("cras_frames", "cras")
}
