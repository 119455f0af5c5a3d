//! `cras setup --gpu`: onnxruntime's GPU build and the NVIDIA libraries its CUDA
//! provider loads, from their PyPI wheels, each pinned by sha256, into one folder
//! (`$CRAS_HOME/gpu`). The engine takes the library from there when a GPU provider is
//! configured, and loads the NVIDIA libraries beside it first (the provider libraries
//! carry no search path of their own).
//!
//! TensorRT is not among them: PyPI holds only source packages of `tensorrt-cu13-libs`
//! that fetch the real wheel from NVIDIA's index at install time, so nothing here can
//! be pinned. docs/gpu.md says where to get libnvinfer.so.10.

use super::{Result, SetupError, extract, pip_download, tempdir_in, verify};
use crate::engine::onnxruntime::data_dir;
use crate::path_error::PathError;
use std::path::{Path, PathBuf};

/// onnxruntime-gpu release `cras setup --gpu` installs (the newest; built for CUDA 13).
pub const GPU_VERSION: &str = "1.31.1";

/// One pinned wheel: pip's requirement, the platform tags it is published under, its
/// sha256 (from PyPI), and the members to install (file names ending so).
pub struct PinnedWheel {
    pub requirement: &'static str,
    pub platforms: &'static [&'static str],
    pub sha256: &'static str,
    pub members: &'static [&'static str],
}

const OLD_TAGS: &[&str] = &[
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_12_x86_64",
    "manylinux2010_x86_64",
    "manylinux_2_5_x86_64",
    "manylinux1_x86_64",
];

/// x86_64. The NVIDIA versions are the newest matching onnxruntime-gpu's own extras
/// (`[cuda]`: cuda-runtime, nvrtc ~=13.0, cufft ~=12.0, curand ~=10.0; `[cudnn]`:
/// cudnn-cu13 ~=9.0), plus cuBLAS, which its CUDA provider links but no extra names.
pub const GPU_WHEELS: [PinnedWheel; 8] = [
    PinnedWheel {
        requirement: "onnxruntime-gpu==1.31.1",
        platforms: &["manylinux_2_28_x86_64"],
        sha256: "e26c475fe361b2015f45b4b824bd13f0bb20204e59b62814e6f0acd5f3d491a6",
        members: &[
            "capi/libonnxruntime.so.1.31.1",
            "capi/libonnxruntime_providers_shared.so",
            "capi/libonnxruntime_providers_cuda.so",
            "capi/libonnxruntime_providers_tensorrt.so",
            "onnxruntime/LICENSE",
            "onnxruntime/ThirdPartyNotices.txt",
        ],
    },
    PinnedWheel {
        requirement: "nvidia-cuda-runtime==13.5.37",
        platforms: OLD_TAGS,
        sha256: "df2b79a8852f10d1fef8c848489c49eebb5754051bf870202a862831412b179d",
        members: &["lib/libcudart.so.13"],
    },
    PinnedWheel {
        requirement: "nvidia-cuda-nvrtc==13.5.37",
        platforms: OLD_TAGS,
        sha256: "86b4d68058807988b7d9af5b44917a0601e9c337f35ccd657bfb3c759ff8d8bc",
        members: &["lib/libnvrtc.so.13", "lib/libnvrtc-builtins.so.13.5"],
    },
    PinnedWheel {
        requirement: "nvidia-nvjitlink==13.5.37",
        platforms: OLD_TAGS,
        sha256: "280d7cb9649704145f074b8dbde500de04ce02d0872e066e20a83c17bcaa93eb",
        members: &["lib/libnvJitLink.so.13"],
    },
    PinnedWheel {
        requirement: "nvidia-cublas==13.10.0.20",
        platforms: OLD_TAGS,
        sha256: "dcc6d63884c53d07e267ce7e6feac17b2538cebaafec5db865736c3e28e4dc84",
        members: &["lib/libcublas.so.13", "lib/libcublasLt.so.13"],
    },
    PinnedWheel {
        requirement: "nvidia-cufft==12.5.0.14",
        platforms: OLD_TAGS,
        sha256: "b8be26837a5abad2b5b74f3e92dd29f622a42934b355be0961a48712cbba23ad",
        members: &["lib/libcufft.so.12"],
    },
    PinnedWheel {
        requirement: "nvidia-curand==10.4.5.25",
        platforms: OLD_TAGS,
        sha256: "22bb226a857e5888fe6b54ae465fc4371296bcff13a35f79e19691bcf454f529",
        members: &["lib/libcurand.so.10"],
    },
    PinnedWheel {
        requirement: "nvidia-cudnn-cu13==9.28.1.4",
        platforms: OLD_TAGS,
        sha256: "a54f205b1db1f2895d99f398754db1369816f0569dd459731f925635cf7b65ec",
        members: &[
            "lib/libcudnn.so.9",
            "lib/libcudnn_adv.so.9",
            "lib/libcudnn_cnn.so.9",
            "lib/libcudnn_engines_precompiled.so.9",
            "lib/libcudnn_engines_runtime_compiled.so.9",
            "lib/libcudnn_engines_tensor_ir.so.9",
            "lib/libcudnn_ext.so.9",
            "lib/libcudnn_graph.so.9",
            "lib/libcudnn_heuristic.so.9",
            "lib/libcudnn_ops.so.9",
        ],
    },
];

/// Where `cras setup --gpu` installs.
pub fn gpu_dir() -> PathBuf {
    data_dir().join("gpu")
}

/// The GPU build of libonnxruntime, once installed.
pub fn gpu_library() -> PathBuf {
    gpu_dir().join(format!("libonnxruntime.so.{GPU_VERSION}"))
}

/// Written last: the folder holds every file of every pinned wheel.
const COMPLETE: &str = "installed.txt";

/// Installs the GPU libraries for `arch` into `dir` (default [`gpu_dir`]), taking the
/// wheels from `wheels` (a folder) when given, else downloading them with pip.
pub fn install_gpu(wheels: Option<&Path>, arch: &str, dir: Option<&Path>) -> Result<PathBuf> {
    if arch != "x86_64" {
        return Err(SetupError::NoGpuWheels(arch.to_string()));
    }
    let dir = dir.map(Path::to_path_buf).unwrap_or_else(gpu_dir);
    let lib = dir.join(format!("libonnxruntime.so.{GPU_VERSION}"));
    if dir.join(COMPLETE).is_file() && lib.is_file() {
        eprintln!(
            "onnxruntime-gpu {GPU_VERSION} already installed in {}",
            dir.display()
        );
        return Ok(lib);
    }
    std::fs::create_dir_all(&dir).map_err(PathError::on("create", &dir))?;
    let tmp = tempdir_in(&dir)?;
    let mut installed = Vec::new();
    for (i, w) in GPU_WHEELS.iter().enumerate() {
        eprintln!("[{}/{}] {}", i + 1, GPU_WHEELS.len(), w.requirement);
        let wheel = match wheels.and_then(|d| find_wheel(d, w.requirement)) {
            Some(found) => found,
            None => {
                let mut extra = vec!["--python-version", "3.11", "--implementation", "cp"];
                for p in w.platforms {
                    extra.extend(["--platform", p]);
                }
                pip_download(w.requirement, &extra, &tmp)?
            }
        };
        verify(&wheel, w.sha256)?;
        for m in w.members {
            let name = Path::new(m).file_name().unwrap_or_default();
            let name = match name.to_str() {
                Some("LICENSE") => "onnxruntime-LICENSE".into(),
                Some("ThirdPartyNotices.txt") => "onnxruntime-ThirdPartyNotices.txt".into(),
                _ => name.to_string_lossy().into_owned(),
            };
            extract(&wheel, m, &dir.join(&name))?;
            installed.push(name);
        }
        // A downloaded wheel is not kept: the libraries are what is needed.
        if wheel.starts_with(&tmp) {
            let _ = std::fs::remove_file(&wheel);
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let list = dir.join(COMPLETE);
    std::fs::write(&list, installed.join("\n") + "\n").map_err(PathError::on("write", &list))?;
    eprintln!(
        "installed onnxruntime-gpu {GPU_VERSION} with CUDA 13, cuBLAS, cuDNN 9 in {}\n\
         TensorRT (libnvinfer.so.10, libnvonnxparser.so.10) is not on PyPI as a wheel: \
         see docs/gpu.md",
        dir.display()
    );
    Ok(lib)
}

/// The wheel of `requirement` in `dir`, by its file-name prefix.
fn find_wheel(dir: &Path, requirement: &str) -> Option<PathBuf> {
    let (name, version) = requirement.split_once("==")?;
    let prefix = format!("{}-{version}-", name.replace('-', "_"));
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with(&prefix) && f.ends_with(".whl"))
        })
}
