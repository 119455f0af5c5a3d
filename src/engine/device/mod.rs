//! Device frames (feature `gpu`): camera frames that stay in GPU memory from the
//! GStreamer pipeline to the engine. Written against the APIs' documented contracts and
//! compile-checked; it has not run (no GPU here: docs/gpu.md, "where it has run").
//!
//! Two sources, chosen by the capture template's `# memory` line:
//! - `cuda` (x86 with an NVIDIA GPU): GStreamer's nvcodec elements hand over
//!   `video/x-raw(memory:CUDAMemory)`. Mapping the buffer with `GST_MAP_READ |
//!   GST_MAP_CUDA` (GST_MAP_CUDA = GST_MAP_FLAG_LAST << 1 = 1 << 17, the nvcodec
//!   plugin's value since 1.18) gives a `CUdeviceptr` in `GstMapInfo::data`, valid while
//!   mapped. The memory is pitched: the row stride comes from the buffer's GstVideoMeta
//!   (the capture asks the pool for one), else from size / height. It belongs to
//!   GStreamer's own CUDA context, which the pointer names (unified addressing).
//! - `nvmm` (Jetson): `video/x-raw(memory:NVMM)`, an NvBufSurface mapped through EGL
//!   ([`nvmm`]).
//!
//! Into the engine: each frame is copied device to device (one `cuMemcpy3DPeer`, pitch
//! removed, across contexts) into one batch tensor that onnxruntime allocated on its
//! CUDA device, which the frames stage then reads through an IoBinding. No host copy is
//! made before inference. After it, [`DeviceFrame::to_host`] makes the one host copy
//! the stages after inference use (the operator view, evidence, the latest-frame
//! gallery): frames dropped under load are never copied, and the decoder's buffer goes
//! back to its pool as soon as the batch has run (docs/decisions.md, "Device frames").

pub mod cuda;
mod nvmm;

use crate::engine::{Memory, PixelLayout};
use cuda::{Copy2d, CuContext, CuDevicePtr};
use gstreamer as gst;
use gstreamer::prelude::*;

/// `GST_MAP_CUDA` (gstcudamemory.h): `GST_MAP_FLAG_LAST << 1`.
const GST_MAP_CUDA: u32 = gst::ffi::GST_MAP_FLAG_LAST << 1;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device frames unavailable: {0}")]
    Unavailable(String),
    #[error("device frame: {0}")]
    Frame(String),
    #[error("CUDA: {0}")]
    Cuda(String),
}

/// Whether frames in `memory` can be taken here: the driver (and for NVMM the buffer
/// library with EGL interop) loads. Says why not, for the camera's one log line.
pub fn available(memory: Memory) -> Result<(), DeviceError> {
    let d = cuda::driver().map_err(DeviceError::Unavailable)?;
    match memory {
        Memory::Host => Ok(()),
        Memory::Cuda => d
            .primary_context(0)
            .map(|_| ())
            .map_err(DeviceError::Unavailable),
        Memory::Nvmm => nvmm::available().map_err(DeviceError::Unavailable),
    }
}

/// A GstBuffer mapped with the given flags, unmapped on drop.
struct Mapped {
    buffer: gst::Buffer,
    info: Box<gst::ffi::GstMapInfo>,
}

// SAFETY: the mapping is used and released by one thread at a time.
unsafe impl Send for Mapped {}

impl Mapped {
    fn new(buffer: &gst::Buffer, flags: u32) -> Result<Mapped, DeviceError> {
        let buffer = buffer.clone();
        // SAFETY: a zeroed GstMapInfo is what gst_buffer_map fills in; the buffer is a
        // live reference held for as long as the mapping.
        unsafe {
            let mut info: Box<gst::ffi::GstMapInfo> = Box::new(std::mem::zeroed());
            if gst::ffi::gst_buffer_map(buffer.as_mut_ptr(), &mut *info, flags) == 0 {
                return Err(DeviceError::Frame("the buffer does not map".into()));
            }
            Ok(Mapped { buffer, info })
        }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`, once.
        unsafe { gst::ffi::gst_buffer_unmap(self.buffer.as_mut_ptr(), &mut *self.info) };
    }
}

/// What keeps a frame's device memory valid.
enum Hold {
    Cuda { _map: Mapped },
    // Field order: the EGL mapping is undone before the buffer is unmapped.
    Nvmm { _egl: nvmm::EglMapped, _map: Mapped },
}

/// One camera frame in device memory.
pub struct DeviceFrame {
    pub width: usize,
    pub height: usize,
    pub layout: PixelLayout,
    ptr: CuDevicePtr,
    /// Bytes from one row to the next.
    pitch: usize,
    context: CuContext,
    _hold: Hold,
}

// SAFETY: the raw context handle is only passed to thread-safe driver calls.
unsafe impl Send for DeviceFrame {}

impl DeviceFrame {
    /// The frame of a sample whose caps carry `memory:CUDAMemory` or `memory:NVMM`.
    pub fn from_sample(sample: &gst::Sample, memory: Memory) -> Result<DeviceFrame, DeviceError> {
        let bad = |why: String| DeviceError::Frame(why);
        let caps = sample
            .caps()
            .ok_or_else(|| bad("sample without caps".into()))?;
        let s = caps.structure(0).ok_or_else(|| bad("empty caps".into()))?;
        let format = s.get::<&str>("format").unwrap_or("?");
        let layout = PixelLayout::from_gst_format(format)
            .filter(|l| l.channels() == 4)
            .ok_or_else(|| bad(format!("format {format}; end the pipeline in RGBA or BGRx")))?;
        let dim = |k: &str| {
            s.get::<i32>(k)
                .ok()
                .filter(|v| *v > 0)
                .map(|v| v as usize)
                .ok_or_else(|| bad(format!("caps without {k}")))
        };
        let (width, height) = (dim("width")?, dim("height")?);
        crate::preprocess::check_size(width as u32, height as u32)
            .map_err(|e| bad(e.to_string()))?;
        let buffer = sample
            .buffer_owned()
            .ok_or_else(|| bad("sample without data".into()))?;
        let d = cuda::driver().map_err(DeviceError::Unavailable)?;
        let row = width * 4;
        let (ptr, pitch, context, hold) = match memory {
            Memory::Host => return Err(bad("a host-memory template has no device frames".into())),
            Memory::Cuda => {
                let map = Mapped::new(&buffer, gst::ffi::GST_MAP_READ | GST_MAP_CUDA)?;
                let ptr = map.info.data as CuDevicePtr;
                let size = map.info.size;
                let pitch = video_meta_stride(&buffer)
                    .or_else(|| (size % height == 0).then_some(size / height))
                    .filter(|p| *p >= row && p * (height - 1) + row <= size)
                    .ok_or_else(|| {
                        bad(format!(
                            "{size} bytes do not hold {width}x{height} {format}"
                        ))
                    })?;
                let context = d.owner(ptr).map_err(DeviceError::Cuda)?;
                (ptr, pitch, context, Hold::Cuda { _map: map })
            }
            Memory::Nvmm => {
                let map = Mapped::new(&buffer, gst::ffi::GST_MAP_READ)?;
                let context = d.primary_context(0).map_err(DeviceError::Cuda)?;
                let surface = map.info.data.cast::<nvmm::Surface>();
                // SAFETY: an NVMM buffer maps to its NvBufSurface, which lives as long as
                // `map` (kept beside the EGL mapping in `Hold`).
                let egl = d
                    .with_context(context, || unsafe {
                        nvmm::EglMapped::map(surface, context)
                    })
                    .map_err(bad)?;
                let (ptr, pitch) = (egl.frame.planes[0] as CuDevicePtr, egl.frame.pitch as usize);
                if pitch < row || egl.frame.width as usize != width {
                    return Err(bad(format!(
                        "the surface is {}x{} with pitch {pitch}, the caps say {width}x{height}",
                        egl.frame.width, egl.frame.height
                    )));
                }
                let hold = Hold::Nvmm {
                    _egl: egl,
                    _map: map,
                };
                (ptr, pitch, context, hold)
            }
        };
        Ok(DeviceFrame {
            width,
            height,
            layout,
            ptr,
            pitch,
            context,
            _hold: hold,
        })
    }

    fn copy(&self) -> Copy2d {
        Copy2d {
            src: (self.ptr, self.context, self.pitch),
            width_bytes: self.width * self.layout.channels(),
            height: self.height,
        }
    }

    /// Bytes of the frame with its rows packed ([H,W,C]).
    pub fn packed_len(&self) -> usize {
        self.width * self.height * self.layout.channels()
    }

    /// Copies the frame, rows packed, to device memory at `dst` in context `ctx`. The
    /// copy may still run when this returns: [`synchronize`] before reading `dst`.
    pub fn copy_to_device(&self, dst: CuDevicePtr, ctx: CuContext) -> Result<(), DeviceError> {
        let d = cuda::driver().map_err(DeviceError::Unavailable)?;
        d.with_context(ctx, || d.copy(&self.copy().to_device(dst, ctx)))
            .map_err(DeviceError::Cuda)
    }

    /// The one host copy, as RGB8, for the stages after inference.
    pub fn to_host(&self) -> Result<image::RgbImage, DeviceError> {
        let d = cuda::driver().map_err(DeviceError::Unavailable)?;
        let mut packed = vec![0u8; self.packed_len()];
        let params = self
            .copy()
            .to_host(&mut packed)
            .map_err(DeviceError::Cuda)?;
        // Device to pageable host memory returns when the copy is done.
        d.with_context(self.context, || d.copy(&params))
            .map_err(DeviceError::Cuda)?;
        let [r, g, b] = self.layout.rgb_indices().map(|i| i as usize);
        let rgb = packed
            .chunks_exact(4)
            .flat_map(|px| [px[r], px[g], px[b]])
            .collect();
        image::RgbImage::from_raw(self.width as u32, self.height as u32, rgb)
            .ok_or_else(|| DeviceError::Frame("frame size mismatch".into()))
    }
}

/// Waits for the copies issued into `ctx`.
pub fn synchronize(ctx: CuContext) -> Result<(), DeviceError> {
    let d = cuda::driver().map_err(DeviceError::Unavailable)?;
    d.with_context(ctx, || d.synchronize())
        .map_err(DeviceError::Cuda)
}

/// The primary context of CUDA device `ordinal` (onnxruntime's).
pub fn primary_context(ordinal: u32) -> Result<CuContext, DeviceError> {
    cuda::driver()
        .map_err(DeviceError::Unavailable)?
        .primary_context(ordinal)
        .map_err(DeviceError::Cuda)
}

/// The first plane's stride from the buffer's GstVideoMeta, if it has one.
fn video_meta_stride(buffer: &gst::BufferRef) -> Option<usize> {
    buffer
        .meta::<gstreamer_video::VideoMeta>()
        .and_then(|m| m.stride().first().copied())
        .filter(|s| *s > 0)
        .map(|s| s as usize)
}

/// Makes the pad's allocation queries say the consumer reads GstVideoMeta, so that a
/// pitched CUDA pool attaches its true stride to every buffer.
pub fn ask_for_video_meta(sink_pad: &gst::Pad) {
    sink_pad.add_probe(gst::PadProbeType::QUERY_DOWNSTREAM, |_, info| {
        if let Some(gst::PadProbeData::Query(q)) = info.data.as_mut()
            && let gst::QueryViewMut::Allocation(a) = q.view_mut()
            && a.find_allocation_meta::<gstreamer_video::VideoMeta>()
                .is_none()
        {
            a.add_allocation_meta::<gstreamer_video::VideoMeta>(None);
        }
        gst::PadProbeReturn::Ok
    });
}
