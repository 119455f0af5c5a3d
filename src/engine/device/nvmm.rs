//! Jetson NVMM buffers to a CUDA pointer, the way DeepStream does it: the mapped
//! GstBuffer holds an `NvBufSurface`; `NvBufSurfaceMapEglImage` gives its EGLImage;
//! CUDA registers that image and maps it to a pitch-linear frame.
//!
//! Contract relied on (`nvbufsurface.h` of JetPack 5 and 6, `cudaEGL.h`):
//! - `gst_buffer_map(READ)` on a `memory:NVMM` buffer yields a pointer to the batch's
//!   `NvBufSurface`; element 0 of `surfaceList` is the frame. The struct layout below is
//!   the header's, field for field (`STRUCTURE_PADDING` 4, `NVBUF_MAX_PLANES` 4).
//! - The surface must be pitch-linear (`nvvidconv` outputs `NVBUF_LAYOUT_PITCH` unless
//!   `bl-output=true`): a block-linear one maps to a CUDA array, which is refused.
//! - The EGLImage and the CUDA registration live until [`EglMapped`] is dropped, which
//!   undoes them in reverse order; the GstBuffer stays mapped until then.
//!
//! `libnvbufsurface.so` is loaded at run time (JetPack's `nvidia-l4t-multimedia`), so
//! the binary starts on hosts without it.

use super::cuda::{self, CuGraphicsResource, EGL_FRAME_TYPE_PITCH, EglFrame};
use libloading::Library;
use std::ffi::{c_int, c_uint, c_void};
use std::sync::OnceLock;

const PADDING: usize = 4;
const MAX_PLANES: usize = 4;

#[repr(C)]
struct PlaneParams {
    num_planes: u32,
    width: [u32; MAX_PLANES],
    height: [u32; MAX_PLANES],
    pitch: [u32; MAX_PLANES],
    offset: [u32; MAX_PLANES],
    psize: [u32; MAX_PLANES],
    bytes_per_pix: [u32; MAX_PLANES],
    _reserved: [*mut c_void; PADDING * MAX_PLANES],
}

#[repr(C)]
struct MappedAddr {
    addr: [*mut c_void; MAX_PLANES],
    egl_image: *mut c_void,
    _reserved: [*mut c_void; PADDING],
}

#[repr(C)]
struct SurfaceParams {
    width: u32,
    height: u32,
    pitch: u32,
    color_format: c_uint,
    /// `NVBUF_LAYOUT_PITCH` = 0, `NVBUF_LAYOUT_BLOCK_LINEAR` = 1.
    layout: c_uint,
    buffer_desc: u64,
    data_size: u32,
    data_ptr: *mut c_void,
    plane_params: PlaneParams,
    mapped_addr: MappedAddr,
    paramex: *mut c_void,
    _reserved: [*mut c_void; PADDING - 1],
}

#[repr(C)]
pub struct Surface {
    gpu_id: u32,
    batch_size: u32,
    num_filled: u32,
    is_contiguous: bool,
    mem_type: c_uint,
    surface_list: *mut SurfaceParams,
    _reserved: [*mut c_void; PADDING],
}

type MapEgl = unsafe extern "C" fn(*mut Surface, c_int) -> c_int;

struct NvBufSurface {
    _lib: Library,
    map: MapEgl,
    unmap: MapEgl,
}

// SAFETY: function pointers only; the library is documented thread-safe per surface.
unsafe impl Send for NvBufSurface {}
unsafe impl Sync for NvBufSurface {}

fn library() -> Result<&'static NvBufSurface, String> {
    static LIB: OnceLock<Result<NvBufSurface, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        // SAFETY: NVIDIA's buffer library; the two symbols have the signatures above.
        unsafe {
            let lib = Library::new("libnvbufsurface.so.1.0.0")
                .or_else(|_| Library::new("libnvbufsurface.so"))
                .map_err(|e| format!("no libnvbufsurface (JetPack multimedia): {e}"))?;
            let map: MapEgl = *lib
                .get(b"NvBufSurfaceMapEglImage\0")
                .map_err(|e| e.to_string())?;
            let unmap: MapEgl = *lib
                .get(b"NvBufSurfaceUnMapEglImage\0")
                .map_err(|e| e.to_string())?;
            Ok(NvBufSurface {
                _lib: lib,
                map,
                unmap,
            })
        }
    })
    .as_ref()
    .map_err(|e| e.clone())
}

/// Whether NVMM frames can be mapped here (the library and the EGL interop load).
pub fn available() -> Result<(), String> {
    library()?;
    cuda::driver()?.egl().map(|_| ())
}

/// An NVMM surface registered with CUDA; undone on drop.
pub struct EglMapped {
    surface: *mut Surface,
    /// The context current at registration, current again to unregister.
    context: cuda::CuContext,
    resource: CuGraphicsResource,
    pub frame: EglFrame,
}

// SAFETY: the surface and resource are used by one thread at a time (the frame moves
// from capture to inference); the driver calls are thread-safe.
unsafe impl Send for EglMapped {}

impl EglMapped {
    /// Maps surface element 0 to CUDA; `context` must be current.
    ///
    /// # Safety
    /// `surface` must point to a live `NvBufSurface` (a mapped NVMM GstBuffer's data)
    /// that outlives the returned value.
    pub unsafe fn map(
        surface: *mut Surface,
        context: cuda::CuContext,
    ) -> Result<EglMapped, String> {
        let lib = library()?;
        let (register, mapped, unregister) = cuda::driver()?.egl()?;
        // SAFETY: per the function's contract; element 0 exists when batch_size >= 1.
        unsafe {
            if surface.is_null() || (*surface).batch_size < 1 || (*surface).surface_list.is_null() {
                return Err("the NVMM buffer holds no surface".into());
            }
            let params = &*(*surface).surface_list;
            if params.layout != 0 {
                return Err(
                    "the NVMM surface is block-linear; let nvvidconv output pitch-linear".into(),
                );
            }
            if (lib.map)(surface, 0) != 0 {
                return Err("NvBufSurfaceMapEglImage failed".into());
            }
            let image = (*(*surface).surface_list).mapped_addr.egl_image;
            let mut resource: CuGraphicsResource = std::ptr::null_mut();
            if register(&mut resource, image, 0) != 0 {
                (lib.unmap)(surface, 0);
                return Err("cuGraphicsEGLRegisterImage failed".into());
            }
            let mut frame: EglFrame = std::mem::zeroed();
            let rc = mapped(&mut frame, resource, 0, 0);
            if rc != 0 || frame.frame_type != EGL_FRAME_TYPE_PITCH {
                unregister(resource);
                (lib.unmap)(surface, 0);
                return Err(format!(
                    "the EGL frame is not a pitch-linear CUDA frame (rc {rc}, type {})",
                    frame.frame_type
                ));
            }
            Ok(EglMapped {
                surface,
                context,
                resource,
                frame,
            })
        }
    }
}

impl Drop for EglMapped {
    fn drop(&mut self) {
        if let (Ok(lib), Ok(d)) = (library(), cuda::driver())
            && let Ok((_, _, unregister)) = d.egl()
        {
            // SAFETY: undoes `map` on the same surface and resource, once.
            let _ = d.with_context(self.context, || {
                unsafe { unregister(self.resource) };
                Ok(())
            });
            unsafe { (lib.unmap)(self.surface, 0) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_surface_structs_have_the_headers_layout() {
        // Offsets worked out from nvbufsurface.h for LP64.
        assert_eq!(std::mem::size_of::<PlaneParams>(), 232);
        assert_eq!(std::mem::size_of::<MappedAddr>(), 72);
        assert_eq!(std::mem::offset_of!(SurfaceParams, data_ptr), 40);
        assert_eq!(std::mem::offset_of!(SurfaceParams, mapped_addr), 280);
        assert_eq!(std::mem::offset_of!(Surface, surface_list), 24);
    }
}
