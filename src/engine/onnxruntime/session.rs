//! onnxruntime sessions and where they run: the CPU, or a GPU provider with the CPU as
//! the fallback the policy allows ([`super::super::provider`]).

use super::super::provider::{InputShapes, Policy, Provider, ep_options, unavailable_reason};
use super::super::{EngineError, EngineOptions, Optimization};
use super::ENVIRONMENT;
use ort::ep::{ExecutionProvider, ExecutionProviderDispatch};
use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};

pub(super) fn load_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Load(e.to_string())
}

/// How a session is built: threads, and the execution providers before the CPU.
struct SessionPlan {
    optimization: GraphOptimizationLevel,
    threads: usize,
    /// Let the intra-op threads busy-wait for the next run (the model session on the
    /// CPU; the small frames stage measured 2.2x slower with it).
    spin: bool,
    providers: Vec<ExecutionProviderDispatch>,
    /// No node may fall back to the CPU (`model.gpu.policy: require`).
    no_cpu_fallback: bool,
}

fn session(model: &[u8], plan: &SessionPlan) -> Result<Session, EngineError> {
    let env = ENVIRONMENT
        .get()
        .ok_or_else(|| EngineError::Load("onnxruntime environment not initialised".into()))?;
    let mut builder = Session::builder(env)
        .map_err(load_err)?
        .with_optimization_level(plan.optimization)
        .map_err(load_err)?
        .with_intra_threads(plan.threads)
        .map_err(load_err)?
        .with_intra_op_spinning(plan.spin)
        .map_err(load_err)?;
    if !plan.providers.is_empty() {
        builder = builder
            .with_execution_providers(&plan.providers)
            .map_err(load_err)?;
    }
    if plan.no_cpu_fallback {
        builder = builder
            .with_config_entry("session.disable_cpu_ep_fallback", "1")
            .map_err(load_err)?;
    }
    builder.commit_from_memory(model).map_err(load_err)
}

fn level(o: Optimization) -> GraphOptimizationLevel {
    match o {
        Optimization::All => GraphOptimizationLevel::All,
        Optimization::Basic => GraphOptimizationLevel::Level1,
        Optimization::Disabled => GraphOptimizationLevel::Disable,
    }
}

/// Whether the loaded library was built with `provider` (`GetAvailableProviders`),
/// asked through a stand-in that only carries the provider's name, so that it works in
/// builds without the `gpu` feature too.
fn listed(provider: Provider) -> bool {
    struct Probe<const P: u8>;
    impl<const P: u8> ExecutionProvider for Probe<P> {
        const NAME: &'static str = match P {
            1 => "CUDAExecutionProvider",
            2 => "TensorrtExecutionProvider",
            _ => "CPUExecutionProvider",
        };
        fn register(&self, _: &mut SessionBuilder) -> ort::Result<()> {
            Err(ort::Error::new("a probe only names a provider"))
        }
    }
    let found = match provider {
        Provider::Cpu => Probe::<0>::is_available(),
        Provider::Cuda => Probe::<1>::is_available(),
        Provider::Tensorrt => Probe::<2>::is_available(),
    };
    found.unwrap_or(false)
}

/// Why the loaded library cannot run `provider`, if it cannot (the library is not
/// loaded yet, or is a CPU build, or this binary lacks the `gpu` feature).
pub fn unavailable(provider: Provider) -> Option<String> {
    let library = super::loaded_library()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    unavailable_reason(provider, &library, listed(provider))
}

/// The execution providers that put a session on `provider`, first to last; every one
/// reports a failed registration instead of logging it.
#[cfg(feature = "gpu")]
fn dispatch(
    provider: Provider,
    options: &[(&'static str, String)],
    cuda: &[(&'static str, String)],
) -> Vec<ExecutionProviderDispatch> {
    use ort::ep::ArbitrarilyConfigurableExecutionProvider;
    let cuda_ep = || {
        cuda.iter()
            .fold(ort::ep::CUDA::default(), |ep, (k, v)| {
                ep.with_arbitrary_config(k, v)
            })
            .build()
            .error_on_failure()
    };
    match provider {
        Provider::Cpu => Vec::new(),
        Provider::Cuda => vec![cuda_ep()],
        // Nodes TensorRT does not take run on CUDA rather than on the CPU.
        Provider::Tensorrt => vec![
            options
                .iter()
                .fold(ort::ep::TensorRT::default(), |ep, (k, v)| {
                    ep.with_arbitrary_config(k, v)
                })
                .build()
                .error_on_failure(),
            cuda_ep(),
        ],
    }
}

/// Without the `gpu` feature no GPU provider is ever asked for:
/// [`unavailable_reason`] stops it first.
#[cfg(not(feature = "gpu"))]
fn dispatch(
    _: Provider,
    _: &[(&'static str, String)],
    _: &[(&'static str, String)],
) -> Vec<ExecutionProviderDispatch> {
    Vec::new()
}

/// A session of `model` and where it runs.
pub(super) struct Placed {
    pub session: Session,
    pub serving: Provider,
    /// Why it is not on the provider asked for (policy `prefer` only).
    pub fallback: Option<String>,
}

/// Builds a session of `model` on `wanted`, or on the CPU where the policy allows it.
pub(super) fn placed_session(
    model: &[u8],
    wanted: Provider,
    opts: &EngineOptions,
    threads: usize,
    spin: bool,
) -> Result<Placed, EngineError> {
    let cpu = |fallback: Option<String>| {
        let plan = SessionPlan {
            optimization: level(opts.optimization),
            threads,
            spin,
            providers: Vec::new(),
            no_cpu_fallback: false,
        };
        session(model, &plan).map(|session| Placed {
            session,
            serving: Provider::Cpu,
            fallback,
        })
    };
    if !wanted.is_gpu() {
        return cpu(None);
    }
    let require = opts.gpu.policy == Policy::Require;
    let failed = |reason: String| {
        if require {
            Err(EngineError::Provider {
                provider: wanted.name(),
                reason,
            })
        } else {
            let why = format!("{} unavailable: {reason}", wanted.name());
            tracing::warn!("{why}; serving on the CPU (model.gpu.policy: prefer)");
            cpu(Some(why))
        }
    };
    if let Some(reason) = unavailable(wanted) {
        return failed(reason);
    }
    let shapes = InputShapes {
        height: opts.input_hw.0,
        width: opts.input_hw.1,
        max_batch: opts.batch.max(1),
    };
    let plan = SessionPlan {
        optimization: level(opts.optimization),
        threads,
        spin: false,
        providers: dispatch(
            wanted,
            &ep_options(wanted, &opts.gpu, shapes, opts.cache.as_ref()),
            &ep_options(Provider::Cuda, &opts.gpu, shapes, None),
        ),
        no_cpu_fallback: require,
    };
    match session(model, &plan) {
        Ok(session) => Ok(Placed {
            session,
            serving: wanted,
            fallback: None,
        }),
        Err(e) => failed(format!(
            "{e} (CUDA needs the driver's libcuda.so.1 and libcudart, libcublas and libcudnn \
             of the library's CUDA major version, which `cras setup --gpu` installs; \
             TensorRT also needs libnvinfer.so.10 and libnvonnxparser.so.10, see docs/gpu.md)"
        )),
    }
}
