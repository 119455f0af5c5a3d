//! The pure-Rust engine (Cargo feature `tract`): no system library, for targets where
//! onnxruntime is not available. tract needs concrete shapes, so the batch size is fixed
//! when the graph is loaded (`EngineOptions::batch`); other batch sizes are an error.

use super::{Engine, EngineError, EngineOptions, NamedTensor, Values};
use std::sync::Arc;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;
use tract_onnx::tract_hir::internal::DimLike;

pub struct TractEngine {
    plan: Arc<TypedRunnableModel>,
    input_shape: [usize; 4],
    output_names: Vec<String>,
}

fn load_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Load(format!("tract: {e}"))
}

impl TractEngine {
    pub fn load(model: &[u8], opts: &EngineOptions) -> Result<TractEngine, EngineError> {
        let mut model = tract_onnx::onnx()
            .model_for_read(&mut &model[..])
            .map_err(load_err)?;
        let dims: Vec<Option<usize>> = model
            .input_fact(0)
            .map_err(load_err)?
            .shape
            .dims()
            .map(|d| d.concretize().and_then(|d| d.to_usize().ok()))
            .collect();
        let [_, c, h, w] = dims[..] else {
            return Err(EngineError::Load(format!(
                "tract: expected a 4-D image input, found rank {}",
                dims.len()
            )));
        };
        let (Some(c), Some(h), Some(w)) = (c, h, w) else {
            return Err(EngineError::Load(
                "tract: the image input needs fixed channels, height and width".into(),
            ));
        };
        let input_shape = [opts.batch.max(1), c, h, w];
        let output_names = model
            .output_outlets()
            .map_err(load_err)?
            .iter()
            .enumerate()
            .map(|(i, o)| {
                model
                    .outlet_label(*o)
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("output_{i}"))
            })
            .collect();
        model
            .set_input_fact(0, f32::fact(input_shape).into())
            .map_err(load_err)?;
        let plan = model
            .into_optimized()
            .map_err(load_err)?
            .into_runnable()
            .map_err(load_err)?;
        Ok(TractEngine {
            plan,
            input_shape,
            output_names,
        })
    }
}

impl Engine for TractEngine {
    fn name(&self) -> &'static str {
        "tract"
    }

    fn fixed_batch(&self) -> Option<usize> {
        Some(self.input_shape[0])
    }

    fn run(&mut self, image: &[f32], shape: [usize; 4]) -> Result<Vec<NamedTensor>, EngineError> {
        if shape != self.input_shape {
            return Err(EngineError::Run(format!(
                "tract runs a fixed input shape {:?} (set at load with the batch size), got {shape:?}",
                self.input_shape
            )));
        }
        let run_err = |e: TractError| EngineError::Run(format!("tract: {e}"));
        let input = Tensor::from_shape(&shape, image).map_err(run_err)?;
        let outputs = self.plan.run(tvec![input.into_tvalue()]).map_err(run_err)?;
        let mut result = Vec::new();
        for (name, value) in self.output_names.iter().zip(outputs) {
            let t = value.into_tensor();
            let shape = t.shape().to_vec();
            let values = if let Ok(v) = t.to_plain_array_view::<f32>() {
                Values::F32(v.iter().copied().collect())
            } else if let Ok(v) = t.to_plain_array_view::<i64>() {
                Values::I64(v.iter().copied().collect())
            } else {
                return Err(EngineError::Output(name.clone()));
            };
            result.push(NamedTensor {
                name: name.clone(),
                shape,
                values,
            });
        }
        Ok(result)
    }
}
