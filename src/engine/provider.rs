//! Where onnxruntime runs the graph: its CPU, CUDA or TensorRT execution provider.
//!
//! The provider options are computed by one pure function ([`ep_options`]) from the
//! configuration, so what a GPU session is asked for is unit-tested on any machine. The
//! provider types of `ort` exist only in builds with the `gpu` feature (they add no
//! link dependency: the library is loaded at run time); without it, or with onnxruntime's
//! CPU library, a GPU provider is *unavailable*, and the policy decides: `require`
//! refuses to start with the reason, `prefer` serves on the CPU and says so.

use std::path::PathBuf;

/// An onnxruntime execution provider cras can ask for.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    #[default]
    Cpu,
    /// onnxruntime's CUDA kernels (NVIDIA GPU, cuDNN).
    Cuda,
    /// A TensorRT engine built from the graph (NVIDIA GPU; minutes to build the first
    /// time, then loaded from the engine cache).
    Tensorrt,
}

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Provider::Cpu => "cpu",
            Provider::Cuda => "cuda",
            Provider::Tensorrt => "tensorrt",
        }
    }

    /// onnxruntime's name for it, as `GetAvailableProviders` lists it.
    pub fn ep_name(self) -> &'static str {
        match self {
            Provider::Cpu => "CPUExecutionProvider",
            Provider::Cuda => "CUDAExecutionProvider",
            Provider::Tensorrt => "TensorrtExecutionProvider",
        }
    }

    pub fn is_gpu(self) -> bool {
        self != Provider::Cpu
    }
}

/// What happens when the provider asked for cannot run the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Refuse to load: no silent fallback (registration errors are errors, and the
    /// session may not move nodes to the CPU).
    Require,
    /// Serve on the CPU, log why once, and report it in /metrics and `health`: a slow
    /// inspection that says so beats none (docs/decisions.md, "Provider policy").
    #[default]
    Prefer,
}

/// GPU settings from the configuration (`model.gpu`).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuOptions {
    /// CUDA device ordinal.
    #[serde(default)]
    pub device: u32,
    #[serde(default)]
    pub policy: Policy,
    /// TensorRT in half precision; refused unless it passes the same parity check as
    /// fp32 (`cras engine prepare`).
    #[serde(default)]
    pub fp16: bool,
    /// TensorRT builder workspace, MiB (Jetson shares it with the CPU: keep it modest).
    #[serde(default = "default_workspace_mib")]
    pub workspace_mib: u64,
    /// TensorRT builder optimisation level, 0-5 (3 is TensorRT's default; higher builds
    /// longer for sometimes faster engines).
    #[serde(default = "default_builder_level")]
    pub builder_level: u8,
}

fn default_workspace_mib() -> u64 {
    1024
}
fn default_builder_level() -> u8 {
    3
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            device: 0,
            policy: Policy::default(),
            fp16: false,
            workspace_mib: default_workspace_mib(),
            builder_level: default_builder_level(),
        }
    }
}

/// The graph input a TensorRT engine is built for: batches of 1 to `max_batch` images
/// of `height` x `width` (one optimisation profile, so a smaller batch does not rebuild).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputShapes {
    pub height: usize,
    pub width: usize,
    pub max_batch: usize,
}

/// Where a TensorRT engine and its timing cache live ([`super::cache`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachePaths {
    /// This model's engines (one directory per cache key).
    pub engines: PathBuf,
    /// Kernel timings, shared by every model on this GPU: later builds go faster.
    pub timing: PathBuf,
}

/// What the session asks of the provider: the execution provider's options, in the
/// order onnxruntime gets them. Empty for the CPU.
pub fn ep_options(
    provider: Provider,
    gpu: &GpuOptions,
    shapes: InputShapes,
    cache: Option<&CachePaths>,
) -> Vec<(&'static str, String)> {
    let flag = |on: bool| if on { "1" } else { "0" }.to_string();
    let mut o = Vec::new();
    match provider {
        Provider::Cpu => {}
        Provider::Cuda => {
            o.push(("device_id", gpu.device.to_string()));
            // Grow the arena by what is asked, not by powers of two: on Jetson the GPU
            // shares the board's memory with everything else.
            o.push(("arena_extend_strategy", "kSameAsRequested".into()));
        }
        Provider::Tensorrt => {
            let shape = |n: usize| format!("image:{n}x3x{}x{}", shapes.height, shapes.width);
            o.push(("device_id", gpu.device.to_string()));
            o.push(("trt_fp16_enable", flag(gpu.fp16)));
            o.push((
                "trt_max_workspace_size",
                (gpu.workspace_mib.saturating_mul(1 << 20)).to_string(),
            ));
            o.push((
                "trt_builder_optimization_level",
                gpu.builder_level.to_string(),
            ));
            // Without a known input size TensorRT takes the shapes it sees.
            if shapes.height > 0 && shapes.width > 0 {
                o.push(("trt_profile_min_shapes", shape(1)));
                o.push(("trt_profile_opt_shapes", shape(shapes.max_batch)));
                o.push(("trt_profile_max_shapes", shape(shapes.max_batch)));
            }
            match cache {
                Some(c) => {
                    o.push(("trt_engine_cache_enable", "1".into()));
                    o.push(("trt_engine_cache_path", c.engines.display().to_string()));
                    o.push(("trt_timing_cache_enable", "1".into()));
                    o.push(("trt_timing_cache_path", c.timing.display().to_string()));
                }
                None => o.push(("trt_engine_cache_enable", "0".into())),
            }
        }
    }
    o
}

/// Why a GPU provider cannot serve, in words that name what is missing.
pub fn unavailable_reason(provider: Provider, library: &str, listed: bool) -> Option<String> {
    if !provider.is_gpu() {
        return None;
    }
    if !listed {
        return Some(format!(
            "the onnxruntime library {library} has no {} (it is a CPU build): run `cras setup --gpu` \
             for the GPU build with its CUDA/TensorRT wheels, or point model.ort_lib at one \
             (Jetson: onnxruntime-gpu for your JetPack, docs/gpu.md)",
            provider.ep_name()
        ));
    }
    if !cfg!(feature = "gpu") {
        return Some(format!(
            "this cras is built without the `gpu` feature, so it cannot ask onnxruntime for {} \
             (cargo build --release --features gpu)",
            provider.ep_name()
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPES: InputShapes = InputShapes {
        height: 288,
        width: 256,
        max_batch: 8,
    };

    fn get<'a>(o: &'a [(&str, String)], key: &str) -> Option<&'a str> {
        o.iter().find(|(k, _)| *k == key).map(|(_, v)| v.as_str())
    }

    #[test]
    fn the_cpu_gets_no_options() {
        assert!(ep_options(Provider::Cpu, &GpuOptions::default(), SHAPES, None).is_empty());
    }

    #[test]
    fn cuda_names_its_device_and_grows_its_arena_by_what_is_asked() {
        let gpu = GpuOptions {
            device: 1,
            ..GpuOptions::default()
        };
        let o = ep_options(Provider::Cuda, &gpu, SHAPES, None);
        assert_eq!(get(&o, "device_id"), Some("1"));
        assert_eq!(get(&o, "arena_extend_strategy"), Some("kSameAsRequested"));
        assert!(o.iter().all(|(k, _)| !k.starts_with("trt_")));
    }

    #[test]
    fn tensorrt_options_follow_the_configuration() {
        let gpu = GpuOptions {
            device: 0,
            policy: Policy::Require,
            fp16: true,
            workspace_mib: 512,
            builder_level: 5,
        };
        let cache = CachePaths {
            engines: PathBuf::from("/var/lib/cras/engine-cache/ab12"),
            timing: PathBuf::from("/var/lib/cras/engine-cache/timing"),
        };
        let o = ep_options(Provider::Tensorrt, &gpu, SHAPES, Some(&cache));
        assert_eq!(get(&o, "trt_fp16_enable"), Some("1"));
        assert_eq!(get(&o, "trt_max_workspace_size"), Some("536870912"));
        assert_eq!(get(&o, "trt_builder_optimization_level"), Some("5"));
        assert_eq!(get(&o, "trt_engine_cache_enable"), Some("1"));
        assert_eq!(
            get(&o, "trt_engine_cache_path"),
            Some("/var/lib/cras/engine-cache/ab12")
        );
        assert_eq!(get(&o, "trt_timing_cache_enable"), Some("1"));
        assert_eq!(
            get(&o, "trt_timing_cache_path"),
            Some("/var/lib/cras/engine-cache/timing")
        );
        // One profile from 1 to max_batch images: smaller batches reuse the engine.
        assert_eq!(get(&o, "trt_profile_min_shapes"), Some("image:1x3x288x256"));
        assert_eq!(get(&o, "trt_profile_opt_shapes"), Some("image:8x3x288x256"));
        assert_eq!(get(&o, "trt_profile_max_shapes"), Some("image:8x3x288x256"));
        // Every key once.
        let mut keys: Vec<_> = o.iter().map(|(k, _)| *k).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), o.len());
    }

    #[test]
    fn tensorrt_without_a_cache_caches_nothing_and_defaults_to_fp32() {
        let o = ep_options(Provider::Tensorrt, &GpuOptions::default(), SHAPES, None);
        assert_eq!(get(&o, "trt_fp16_enable"), Some("0"));
        assert_eq!(get(&o, "trt_engine_cache_enable"), Some("0"));
        assert_eq!(get(&o, "trt_engine_cache_path"), None);
        assert_eq!(get(&o, "trt_timing_cache_path"), None);
        assert_eq!(get(&o, "trt_max_workspace_size"), Some("1073741824"));
        assert_eq!(get(&o, "trt_builder_optimization_level"), Some("3"));
    }

    #[test]
    fn a_cpu_library_is_named_with_the_way_to_the_gpu_one() {
        let why = unavailable_reason(Provider::Tensorrt, "/x/libonnxruntime.so.1.32.0", false)
            .unwrap_or_default();
        assert!(why.contains("/x/libonnxruntime.so.1.32.0"), "{why}");
        assert!(why.contains("TensorrtExecutionProvider"), "{why}");
        assert!(why.contains("cras setup --gpu"), "{why}");
        assert_eq!(unavailable_reason(Provider::Cpu, "x", false), None);
    }

    #[test]
    fn a_listed_provider_needs_the_gpu_feature() {
        let why = unavailable_reason(Provider::Cuda, "lib", true);
        if cfg!(feature = "gpu") {
            assert_eq!(why, None);
        } else {
            assert!(why.unwrap_or_default().contains("--features gpu"));
        }
    }
}
