//! `cras setup --gpu` for real: onnxruntime's GPU build and NVIDIA's CUDA 13, cuBLAS
//! and cuDNN 9 libraries come from PyPI (about 1.5 GB of wheels), each checked against
//! its pinned sha256, into `$CRAS_HOME/gpu`. On this machine (no GPU) the GPU build runs
//! the model on its CPU provider with the CPU build's results; a daemon asking for
//! `cuda` loads that library, lists the provider, and says why it serves on the CPU. A
//! wheel that is not the pinned one is refused.

mod common;

use common::daemon::*;
use common::*;
use std::path::Path;
use std::process::Command;

fn cras_in(home: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(cras_bin())
        .args(args)
        .env("CRAS_HOME", home)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn scores(stdout: &str) -> Vec<f64> {
    stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["score"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn the_gpu_libraries_install_pinned_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let (code, _, err) = cras_in(&home, &["setup", "--gpu"]);
    assert_eq!(code, 0, "{err}");
    let gpu = home.join("gpu");
    let listed = std::fs::read_to_string(gpu.join("installed.txt")).unwrap();
    let names: Vec<&str> = listed.lines().collect();
    assert_eq!(names.len(), 24, "{listed}");
    for name in [
        "libonnxruntime.so.1.31.1",
        "libonnxruntime_providers_cuda.so",
        "libonnxruntime_providers_tensorrt.so",
        "libcudart.so.13",
        "libcublas.so.13",
        "libcublasLt.so.13",
        "libcudnn.so.9",
        "onnxruntime-LICENSE",
    ] {
        assert!(names.contains(&name), "{name} not in {listed}");
    }
    for name in &names {
        let len = std::fs::metadata(gpu.join(name)).unwrap().len();
        assert!(len > 0, "{name} is empty");
    }
    // Again: nothing to do.
    let (code, _, err) = cras_in(&home, &["setup", "--gpu"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("already installed"), "{err}");

    // The GPU build on its CPU provider answers as the CPU build does.
    let model = lite0_bundle(dir.path(), "model");
    let images = fixtures().join("lite0-d384/images/alpha/test/good");
    let imgs: Vec<String> = ["000.png", "001.png"]
        .iter()
        .map(|f| images.join(f).display().to_string())
        .collect();
    let run = |lib: &Path| {
        let mut args = vec!["infer", "--model", model.to_str().unwrap(), "--ort-lib"];
        args.push(lib.to_str().unwrap());
        args.extend(imgs.iter().map(String::as_str));
        let (code, out, err) = cras_in(&home, &args);
        assert_eq!(code, 0, "{err}");
        scores(&out)
    };
    let on_gpu_build = run(&gpu.join("libonnxruntime.so.1.31.1"));
    let on_cpu_build = run(&home.join("lib/libonnxruntime.so.1.32.0"));
    assert_eq!(on_gpu_build.len(), 2);
    for (a, b) in on_gpu_build.iter().zip(&on_cpu_build) {
        assert!((a - b).abs() < 1e-5, "{on_gpu_build:?} vs {on_cpu_build:?}");
    }

    // A daemon asking for CUDA takes the GPU build and says why it serves on the CPU.
    let rig = folder_rig(dir.path(), 4, true, "");
    let text = std::fs::read_to_string(&rig.config).unwrap();
    std::fs::write(
        &rig.config,
        text.replacen("model:\n", "model:\n  provider: cuda\n", 1),
    )
    .unwrap();
    let home_s = home.display().to_string();
    let d = Daemon::start(
        &rig.config,
        &dir.path().join("cras.log"),
        &[("CRAS_HOME", home_s.as_str())],
    );
    wait_for(120.0, "frames judged", || {
        frames_processed(rig.http, "cam1") >= 2.0
    });
    let log = d.log_text();
    assert!(log.contains("gpu/libonnxruntime.so.1.31.1"), "{log}");
    let (_, metrics) = http_get(rig.http, "/metrics").unwrap();
    assert_eq!(metric(&metrics, "cras_engine_fallback"), Some(1.0));
    let (_, healthz) = http_get(rig.http, "/healthz").unwrap();
    assert!(healthz.contains("engine on cpu (not cuda)"), "{healthz}");
    // The library lists the CUDA provider; what is missing is this build's feature
    // (without it), or the driver (with it).
    let reason_named = if cfg!(feature = "gpu") {
        log.contains("cuda unavailable")
    } else {
        log.contains("built without the `gpu` feature")
    };
    assert!(reason_named, "{log}");
    assert!(!log.contains("has no CUDAExecutionProvider"), "{log}");
}

#[test]
fn a_wheel_that_is_not_the_pinned_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let wheels = dir.path().join("wheels");
    std::fs::create_dir_all(&wheels).unwrap();
    std::fs::write(
        wheels.join("onnxruntime_gpu-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl"),
        b"PK\x03\x04 not the release",
    )
    .unwrap();
    // The CPU library from the machine's own setup, so nothing else is downloaded.
    let cpu = cras::engine::onnxruntime::installed_library();
    std::fs::create_dir_all(home.join("lib")).unwrap();
    std::fs::copy(&cpu, home.join("lib").join(cpu.file_name().unwrap())).unwrap();
    let (code, _, err) = cras_in(
        &home,
        &["setup", "--gpu", "--gpu-wheels", wheels.to_str().unwrap()],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("expected e26c475fe361b2015f45b4b824bd13f0bb20204e59b62814e6f0acd5f3d491a6"),
        "{err}"
    );
    assert!(!home.join("gpu/installed.txt").exists());
    assert!(!home.join("gpu/libonnxruntime.so.1.31.1").exists());
}
