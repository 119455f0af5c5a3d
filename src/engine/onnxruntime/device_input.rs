//! Device frames into the frames stage without a host copy (feature `gpu`): the batch
//! tensor is allocated by onnxruntime on its CUDA device, each frame is copied into it
//! device to device ([`crate::engine::device`]), and an IoBinding hands it to the
//! frames stage, whose output (the network input) stays on the device for the model.
//!
//! Contract relied on (onnxruntime C API through `ort` 2.0.0-rc.15):
//! - `Allocator::new(session, MemoryInfo(Cuda, device, Device, Default))` allocates in
//!   the CUDA provider's device memory, in the device's primary context (the provider
//!   uses the runtime API, which works in the primary context).
//! - `Tensor::new(&allocator, shape).data_ptr_mut()` is that memory's device pointer.
//! - An IoBinding with an input already on the session's device passes it without a
//!   copy; `bind_output_to_device` leaves the output on the device, and the model
//!   session takes such a value as input as it is. The IoBinding is made once per stage
//!   and re-bound per batch (ort issue #596).

use crate::engine::device::{self, DeviceFrame, cuda::CuContext};
use crate::engine::{EngineError, NamedTensor};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::IoBinding;
use ort::session::Session;
use ort::value::Tensor;

fn run_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Run(e.to_string())
}

/// What stays from batch to batch: the allocator, the binding, the last batch tensor.
pub(super) struct DeviceInput {
    /// Where the frames stage's output stays (onnxruntime's CUDA device).
    on_device: MemoryInfo<'static>,
    context: CuContext,
    allocator: Allocator,
    binding: IoBinding,
    batch: Option<([usize; 4], Tensor<u8>)>,
}

// SAFETY: the raw context handle is only passed to thread-safe driver calls; the ort
// handles are used by the one inference thread that owns the engine.
unsafe impl Send for DeviceInput {}

impl DeviceInput {
    pub(super) fn new(stage: &Session, ordinal: u32) -> Result<DeviceInput, EngineError> {
        let context = device::primary_context(ordinal).map_err(run_err)?;
        let allocator = Allocator::new(stage, memory_info(ordinal)?).map_err(run_err)?;
        let binding = stage.create_binding().map_err(run_err)?;
        Ok(DeviceInput {
            on_device: memory_info(ordinal)?,
            context,
            allocator,
            binding,
            batch: None,
        })
    }

    /// Runs the frames stage on `frames` (one size and layout) and the model on its
    /// output.
    pub(super) fn run(
        &mut self,
        stage: &mut Session,
        model: &mut Session,
        frames: &[&DeviceFrame],
    ) -> Result<Vec<NamedTensor>, EngineError> {
        let Some(first) = frames.first() else {
            return Ok(Vec::new());
        };
        let shape = [
            frames.len(),
            first.height,
            first.width,
            first.layout.channels(),
        ];
        if frames
            .iter()
            .any(|f| (f.width, f.height, f.layout) != (first.width, first.height, first.layout))
        {
            return Err(run_err(
                "device frames of one batch differ in size or layout",
            ));
        }
        if self.batch.as_ref().map(|(s, _)| *s) != Some(shape) {
            let t = Tensor::<u8>::new(&self.allocator, shape.map(|d| d as i64).to_vec())
                .map_err(run_err)?;
            self.batch = Some((shape, t));
        }
        let Some((_, tensor)) = self.batch.as_mut() else {
            return Err(run_err("no batch tensor"));
        };
        let base = tensor.data_ptr_mut() as u64;
        for (i, f) in frames.iter().enumerate() {
            f.copy_to_device(base + (i * f.packed_len()) as u64, self.context)
                .map_err(run_err)?;
        }
        device::synchronize(self.context).map_err(run_err)?;
        let channels =
            Tensor::from_array(([3usize], first.layout.rgb_indices().to_vec())).map_err(run_err)?;
        self.binding
            .bind_input("frames", &*tensor)
            .map_err(run_err)?;
        self.binding
            .bind_input("channels", &channels)
            .map_err(run_err)?;
        self.binding
            .bind_output_to_device("image", &self.on_device)
            .map_err(run_err)?;
        let mut prepared = stage.run_binding(&self.binding).map_err(run_err)?;
        let image = prepared
            .remove("image")
            .ok_or_else(|| EngineError::Output("image (frames stage)".into()))?;
        drop(prepared);
        let outputs = model.run(ort::inputs!["image" => image]).map_err(run_err)?;
        super::collect(outputs)
    }
}

fn memory_info(ordinal: u32) -> Result<MemoryInfo<'static>, EngineError> {
    MemoryInfo::new(
        AllocationDevice::CUDA,
        ordinal as i32,
        AllocatorType::Device,
        MemoryType::Default,
    )
    .map_err(run_err)
}
