//! What the engine cache key needs to know about the GPU stack: the device's name and
//! compute capability (CUDA driver API) and the TensorRT version (libnvinfer), asked at
//! run time so the binary still starts where neither library exists.
//!
//! Five C entry points whose signatures have not changed since CUDA 2 and TensorRT 5
//! are declared here by hand instead of through cudarc, whose CUDA-version features
//! collide with candle's `cuda` feature (docs/decisions.md, "GPU facts without cudarc").

/// The GPU an engine is built for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuIdentity {
    pub name: String,
    /// "8.7" (Orin), "9.0" (H100/H200).
    pub compute_capability: String,
}

/// Reads the name and compute capability of CUDA device `ordinal`.
#[cfg(feature = "gpu")]
pub fn gpu_identity(ordinal: u32) -> Result<GpuIdentity, String> {
    use libloading::{Library, Symbol};
    use std::ffi::{c_char, c_int};
    type CuInit = unsafe extern "C" fn(u32) -> c_int;
    type CuDeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
    type CuDeviceGetName = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
    type CuDeviceGetAttribute = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int;
    // CUdevice_attribute values from cuda.h (stable since CUDA 3).
    const CC_MAJOR: c_int = 75;
    const CC_MINOR: c_int = 76;
    let call = |what: &str, rc: c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(format!("{what} failed with CUDA error {rc}"))
        }
    };
    // SAFETY: libcuda.so.1 is the NVIDIA driver library; the symbols below are declared
    // with the signatures of cuda.h, and every buffer passed is as large as declared.
    unsafe {
        let lib = Library::new("libcuda.so.1").map_err(|e| {
            format!("no NVIDIA driver (libcuda.so.1: {e}); install the driver or JetPack")
        })?;
        let init: Symbol<CuInit> = lib.get(b"cuInit\0").map_err(|e| e.to_string())?;
        let get: Symbol<CuDeviceGet> = lib.get(b"cuDeviceGet\0").map_err(|e| e.to_string())?;
        let name_of: Symbol<CuDeviceGetName> =
            lib.get(b"cuDeviceGetName\0").map_err(|e| e.to_string())?;
        let attr: Symbol<CuDeviceGetAttribute> = lib
            .get(b"cuDeviceGetAttribute\0")
            .map_err(|e| e.to_string())?;
        call("cuInit", init(0))?;
        let mut dev: c_int = 0;
        call(
            &format!("cuDeviceGet({ordinal})"),
            get(&mut dev, ordinal as c_int),
        )?;
        let mut buf = [0 as c_char; 256];
        call("cuDeviceGetName", name_of(buf.as_mut_ptr(), 255, dev))?;
        let name = std::ffi::CStr::from_ptr(buf.as_ptr())
            .to_string_lossy()
            .into_owned();
        let (mut major, mut minor): (c_int, c_int) = (0, 0);
        call("cuDeviceGetAttribute", attr(&mut major, CC_MAJOR, dev))?;
        call("cuDeviceGetAttribute", attr(&mut minor, CC_MINOR, dev))?;
        Ok(GpuIdentity {
            name,
            compute_capability: format!("{major}.{minor}"),
        })
    }
}

/// The TensorRT version of the libnvinfer the TensorRT provider will load.
#[cfg(feature = "gpu")]
pub fn tensorrt_version() -> Result<String, String> {
    type Version = unsafe extern "C" fn() -> i32;
    // SAFETY: `getInferLibVersion` takes nothing and returns an int (NvInferRuntime.h).
    unsafe {
        let lib = libloading::Library::new("libnvinfer.so.10").map_err(|e| {
            format!("no TensorRT 10 (libnvinfer.so.10: {e}); see docs/gpu.md for where to get it")
        })?;
        let f: libloading::Symbol<Version> = lib
            .get(b"getInferLibVersion\0")
            .map_err(|e| e.to_string())?;
        Ok(format_tensorrt_version(f()))
    }
}

/// Loads every NVIDIA library in the folder of `library` (a GPU build of onnxruntime),
/// globally, in an order that satisfies their dependencies on each other: onnxruntime's
/// CUDA and TensorRT provider libraries name them without a search path. What cannot
/// load (no driver, a missing dependency) is logged; the provider's registration then
/// says what failed.
#[cfg(feature = "gpu")]
pub fn preload_beside(library: &std::path::Path) {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    static LOADED: std::sync::OnceLock<Vec<Library>> = std::sync::OnceLock::new();
    let Some(dir) = library.parent() else {
        return;
    };
    let mut pending: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                    name.contains(".so")
                        && !name.starts_with("libonnxruntime")
                        && !name.ends_with(".part")
                })
                .collect()
        })
        .unwrap_or_default();
    pending.sort();
    let mut loaded = Vec::new();
    // Load what can be loaded until a round loads nothing more.
    loop {
        let before = pending.len();
        let mut errors = Vec::new();
        pending.retain(|p| {
            // SAFETY: NVIDIA's libraries from the pinned wheels; their initialisers only
            // set up their own state.
            match unsafe { Library::open(Some(p), RTLD_NOW | RTLD_GLOBAL) } {
                Ok(lib) => {
                    loaded.push(lib);
                    false
                }
                Err(e) => {
                    errors.push(e.to_string());
                    true
                }
            }
        });
        if pending.is_empty() || pending.len() == before {
            for e in errors {
                tracing::debug!("not preloaded: {e}");
            }
            break;
        }
    }
    let _ = LOADED.set(loaded);
}

#[cfg(not(feature = "gpu"))]
pub fn preload_beside(_: &std::path::Path) {}

#[cfg(not(feature = "gpu"))]
pub fn gpu_identity(_: u32) -> Result<GpuIdentity, String> {
    Err("this cras is built without the `gpu` feature".into())
}

#[cfg(not(feature = "gpu"))]
pub fn tensorrt_version() -> Result<String, String> {
    Err("this cras is built without the `gpu` feature".into())
}

/// TensorRT 10 encodes its version as major * 10000 + minor * 100 + patch.
pub fn format_tensorrt_version(v: i32) -> String {
    format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensorrt_versions_read_as_written() {
        assert_eq!(format_tensorrt_version(100300), "10.3.0");
        assert_eq!(format_tensorrt_version(101601), "10.16.1");
    }

    #[test]
    fn without_a_gpu_the_reason_is_given() {
        // No NVIDIA driver on the machines this runs on in CI; where there is one, the
        // identity must name a device.
        match gpu_identity(0) {
            Ok(id) => assert!(!id.name.is_empty() && id.compute_capability.contains('.')),
            Err(why) => assert!(why.contains("libcuda") || why.contains("gpu"), "{why}"),
        }
    }
}
