//! The CUDA driver calls device frames need, declared by hand from `cuda.h` and loaded
//! from `libcuda.so.1` at run time (docs/decisions.md, "Device frames"). Nothing here
//! runs before [`driver`] has loaded the library, so a host without the NVIDIA driver
//! gets an error, never a crash.
//!
//! Contract relied on (CUDA driver API, unchanged since CUDA 4 unless noted):
//! - `CUdeviceptr` is a 64-bit integer; with unified addressing (every 64-bit Linux
//!   process) a pointer names its context: `cuPointerGetAttribute(CONTEXT)` returns it.
//! - `cuMemcpy3DPeer` copies between contexts (and to the host), honouring the source
//!   pitch; it orders itself after prior work in the source context's NULL stream. A
//!   device-to-device copy may return before it is done: [`Driver::synchronize`] waits.
//! - The EGL interop calls (`cuGraphicsEGLRegisterImage`, CUDA 7+) exist on Jetson's
//!   libcuda; they are optional here and only NVMM frames need them.

use libloading::Library;
use std::ffi::{c_int, c_uint, c_void};
use std::sync::OnceLock;

pub type CuResult = c_int;
/// A `CUcontext` handle (opaque; only passed back to the driver).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CuContext(*mut c_void);

impl CuContext {
    pub const NULL: CuContext = CuContext(std::ptr::null_mut());
}
pub type CuDevicePtr = u64;
pub type CuGraphicsResource = *mut c_void;

/// `CUmemorytype` values.
pub const MEMORY_HOST: c_uint = 1;
pub const MEMORY_DEVICE: c_uint = 2;
/// `CU_POINTER_ATTRIBUTE_CONTEXT`.
const POINTER_ATTRIBUTE_CONTEXT: c_int = 1;

/// `CUDA_MEMCPY3D_PEER`, field for field.
#[repr(C)]
pub struct Memcpy3dPeer {
    pub src_x_in_bytes: usize,
    pub src_y: usize,
    pub src_z: usize,
    pub src_lod: usize,
    pub src_memory_type: c_uint,
    pub src_host: *const c_void,
    pub src_device: CuDevicePtr,
    pub src_array: *mut c_void,
    pub src_context: *mut c_void,
    pub src_pitch: usize,
    pub src_height: usize,
    pub dst_x_in_bytes: usize,
    pub dst_y: usize,
    pub dst_z: usize,
    pub dst_lod: usize,
    pub dst_memory_type: c_uint,
    pub dst_host: *mut c_void,
    pub dst_device: CuDevicePtr,
    pub dst_array: *mut c_void,
    pub dst_context: *mut c_void,
    pub dst_pitch: usize,
    pub dst_height: usize,
    pub width_in_bytes: usize,
    pub height: usize,
    pub depth: usize,
}

/// `CUeglFrame`: three plane pointers (pitch-linear frames) then the geometry.
#[repr(C)]
pub struct EglFrame {
    pub planes: [*mut c_void; 3],
    pub width: c_uint,
    pub height: c_uint,
    pub depth: c_uint,
    pub pitch: c_uint,
    pub plane_count: c_uint,
    pub num_channels: c_uint,
    /// `CU_EGL_FRAME_TYPE_ARRAY` = 0, `CU_EGL_FRAME_TYPE_PITCH` = 1.
    pub frame_type: c_uint,
    pub color_format: c_uint,
    pub cu_format: c_uint,
}

pub const EGL_FRAME_TYPE_PITCH: c_uint = 1;

type Init = unsafe extern "C" fn(c_uint) -> CuResult;
type DeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> CuResult;
type PrimaryCtxRetain = unsafe extern "C" fn(*mut *mut c_void, c_int) -> CuResult;
type CtxPush = unsafe extern "C" fn(*mut c_void) -> CuResult;
type CtxPop = unsafe extern "C" fn(*mut *mut c_void) -> CuResult;
type CtxSynchronize = unsafe extern "C" fn() -> CuResult;
type PointerGetAttribute = unsafe extern "C" fn(*mut c_void, c_int, CuDevicePtr) -> CuResult;
type Memcpy3DPeer = unsafe extern "C" fn(*const Memcpy3dPeer) -> CuResult;
type EglRegister = unsafe extern "C" fn(*mut CuGraphicsResource, *mut c_void, c_uint) -> CuResult;
type EglMappedFrame =
    unsafe extern "C" fn(*mut EglFrame, CuGraphicsResource, c_uint, c_uint) -> CuResult;
type Unregister = unsafe extern "C" fn(CuGraphicsResource) -> CuResult;

/// The loaded driver. The library stays loaded for the life of the process.
pub struct Driver {
    _lib: Library,
    init: Init,
    device_get: DeviceGet,
    primary_retain: PrimaryCtxRetain,
    push: CtxPush,
    pop: CtxPop,
    sync: CtxSynchronize,
    pointer_attribute: PointerGetAttribute,
    memcpy_peer: Memcpy3DPeer,
    egl: Option<(EglRegister, EglMappedFrame, Unregister)>,
    /// Primary contexts retained so far, by device ordinal.
    primaries: std::sync::Mutex<Vec<(u32, CuContext)>>,
}

// SAFETY: the driver API is thread-safe; the struct holds function pointers and
// context handles that are only passed back to it.
unsafe impl Send for Driver {}
unsafe impl Sync for Driver {}

/// The driver, loaded and initialised once; an error says why device frames are off.
pub fn driver() -> Result<&'static Driver, String> {
    static DRIVER: OnceLock<Result<Driver, String>> = OnceLock::new();
    DRIVER
        .get_or_init(Driver::load)
        .as_ref()
        .map_err(|e| e.clone())
}

fn check(what: &str, rc: CuResult) -> Result<(), String> {
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("{what} failed with CUDA error {rc}"))
    }
}

impl Driver {
    fn load() -> Result<Driver, String> {
        // SAFETY: libcuda.so.1 is the NVIDIA driver library; each symbol is declared
        // with its cuda.h signature (the `_v2` names are the ABI the unsuffixed macros
        // resolve to since CUDA 4).
        unsafe {
            let lib = Library::new("libcuda.so.1")
                .map_err(|e| format!("no NVIDIA driver (libcuda.so.1: {e})"))?;
            macro_rules! sym {
                ($name:literal) => {
                    *lib.get(concat!($name, "\0").as_bytes())
                        .map_err(|e| format!("libcuda.so.1 lacks {}: {e}", $name))?
                };
            }
            let egl = (|| -> Result<_, String> {
                Ok((
                    sym!("cuGraphicsEGLRegisterImage"),
                    sym!("cuGraphicsResourceGetMappedEglFrame"),
                    sym!("cuGraphicsUnregisterResource"),
                ))
            })()
            .ok();
            let d = Driver {
                init: sym!("cuInit"),
                device_get: sym!("cuDeviceGet"),
                primary_retain: sym!("cuDevicePrimaryCtxRetain"),
                push: sym!("cuCtxPushCurrent_v2"),
                pop: sym!("cuCtxPopCurrent_v2"),
                sync: sym!("cuCtxSynchronize"),
                pointer_attribute: sym!("cuPointerGetAttribute"),
                memcpy_peer: sym!("cuMemcpy3DPeer"),
                egl,
                primaries: std::sync::Mutex::new(Vec::new()),
                _lib: lib,
            };
            check("cuInit", (d.init)(0))?;
            Ok(d)
        }
    }

    /// The primary context of device `ordinal`: the one onnxruntime's CUDA provider
    /// (through the runtime API) works in. Retained once per process (the first call;
    /// later ones, one per NVMM frame, find it here), never released.
    pub fn primary_context(&self, ordinal: u32) -> Result<CuContext, String> {
        let mut known = self
            .primaries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, ctx)) = known.iter().find(|(o, _)| *o == ordinal) {
            return Ok(*ctx);
        }
        let mut dev: c_int = 0;
        let mut ctx: *mut c_void = std::ptr::null_mut();
        // SAFETY: out-pointers to locals of the declared types.
        unsafe {
            check("cuDeviceGet", (self.device_get)(&mut dev, ordinal as c_int))?;
            check(
                "cuDevicePrimaryCtxRetain",
                (self.primary_retain)(&mut ctx, dev),
            )?;
        }
        known.push((ordinal, CuContext(ctx)));
        Ok(CuContext(ctx))
    }

    /// Runs `f` with `ctx` current on this thread, and pops it afterwards.
    pub fn with_context<T>(
        &self,
        ctx: CuContext,
        f: impl FnOnce() -> Result<T, String>,
    ) -> Result<T, String> {
        // SAFETY: `ctx` is a live context (primary, retained; or GStreamer's, kept alive
        // by the mapped buffer that named it).
        unsafe { check("cuCtxPushCurrent", (self.push)(ctx.0))? };
        let out = f();
        let mut popped: *mut c_void = std::ptr::null_mut();
        // SAFETY: pops the context pushed above.
        let rc = unsafe { (self.pop)(&mut popped) };
        let out = out?;
        check("cuCtxPopCurrent", rc)?;
        Ok(out)
    }

    /// The context that owns device memory at `ptr`.
    pub fn owner(&self, ptr: CuDevicePtr) -> Result<CuContext, String> {
        let mut ctx: *mut c_void = std::ptr::null_mut();
        // SAFETY: CONTEXT writes one CUcontext to the out-pointer.
        unsafe {
            check(
                "cuPointerGetAttribute(CONTEXT)",
                (self.pointer_attribute)(
                    (&mut ctx as *mut *mut c_void).cast(),
                    POINTER_ATTRIBUTE_CONTEXT,
                    ptr,
                ),
            )?;
        }
        Ok(CuContext(ctx))
    }

    /// One pitched 2-D copy (`depth` 1); see the module's contract.
    pub fn copy(&self, params: &Memcpy3dPeer) -> Result<(), String> {
        // SAFETY: the caller built `params` from live allocations of at least the sizes
        // it names (checked where the frame was mapped).
        unsafe { check("cuMemcpy3DPeer", (self.memcpy_peer)(params)) }
    }

    /// Waits for the copies issued in the current context.
    pub fn synchronize(&self) -> Result<(), String> {
        // SAFETY: no arguments; needs a current context (callers use `with_context`).
        unsafe { check("cuCtxSynchronize", (self.sync)()) }
    }

    /// The EGL interop calls, if this driver has them (Jetson).
    pub fn egl(&self) -> Result<(EglRegister, EglMappedFrame, Unregister), String> {
        self.egl
            .ok_or_else(|| "libcuda.so.1 has no EGL interop (not a Jetson driver)".into())
    }
}

/// A pitched 2-D copy of `height` rows of `width_bytes` from `src` to `dst`.
pub struct Copy2d {
    pub src: (CuDevicePtr, CuContext, usize),
    pub width_bytes: usize,
    pub height: usize,
}

impl Copy2d {
    /// To device memory at `dst` in `ctx`, rows packed.
    pub fn to_device(&self, dst: CuDevicePtr, ctx: CuContext) -> Memcpy3dPeer {
        let mut p = self.base();
        p.dst_memory_type = MEMORY_DEVICE;
        p.dst_device = dst;
        p.dst_context = ctx.0;
        p
    }

    /// To host memory `dst` (at least `width_bytes * height` bytes), rows packed.
    pub fn to_host(&self, dst: &mut [u8]) -> Result<Memcpy3dPeer, String> {
        if dst.len() < self.width_bytes * self.height {
            return Err("host buffer too small for the frame".into());
        }
        let mut p = self.base();
        p.dst_memory_type = MEMORY_HOST;
        p.dst_host = dst.as_mut_ptr().cast();
        Ok(p)
    }

    fn base(&self) -> Memcpy3dPeer {
        let (src, ctx, pitch) = self.src;
        Memcpy3dPeer {
            src_x_in_bytes: 0,
            src_y: 0,
            src_z: 0,
            src_lod: 0,
            src_memory_type: MEMORY_DEVICE,
            src_host: std::ptr::null(),
            src_device: src,
            src_array: std::ptr::null_mut(),
            src_context: ctx.0,
            src_pitch: pitch,
            src_height: self.height,
            dst_x_in_bytes: 0,
            dst_y: 0,
            dst_z: 0,
            dst_lod: 0,
            dst_memory_type: MEMORY_DEVICE,
            dst_host: std::ptr::null_mut(),
            dst_device: 0,
            dst_array: std::ptr::null_mut(),
            dst_context: std::ptr::null_mut(),
            dst_pitch: self.width_bytes,
            dst_height: self.height,
            width_in_bytes: self.width_bytes,
            height: self.height,
            depth: 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copy_descriptor_has_cuda_h_layout() {
        // 25 fields, 8 bytes each on 64-bit (the two enums are padded): 200 bytes.
        assert_eq!(std::mem::size_of::<Memcpy3dPeer>(), 200);
        assert_eq!(std::mem::offset_of!(Memcpy3dPeer, src_context), 64);
        assert_eq!(std::mem::offset_of!(Memcpy3dPeer, width_in_bytes), 176);
        // CUeglFrame: 3 pointers, 9 unsigned ints (+4 padding).
        assert_eq!(std::mem::size_of::<EglFrame>(), 64);
    }

    #[test]
    fn copies_pack_rows_and_keep_the_source_pitch() {
        let c = Copy2d {
            src: (0x1000, CuContext::NULL, 2048),
            width_bytes: 1920 * 4 / 4,
            height: 3,
        };
        let p = c.to_device(0x9000, CuContext::NULL);
        assert_eq!(
            (p.src_pitch, p.dst_pitch, p.width_in_bytes),
            (2048, 1920, 1920)
        );
        assert_eq!((p.height, p.depth, p.dst_device), (3, 1, 0x9000));
        let mut small = vec![0u8; 10];
        assert!(c.to_host(&mut small).is_err());
        let mut host = vec![0u8; 1920 * 3];
        let h = c.to_host(&mut host).unwrap();
        assert_eq!(h.dst_memory_type, MEMORY_HOST);
    }
}
