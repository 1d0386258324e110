//! Helpers the model tests share.
#![allow(dead_code)] // each test binary uses its own subset

use candle_core::{Device, Result, Tensor};

/// The largest absolute difference of two tensors of one shape (f32), on
/// whatever devices they live.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a.to_device(&Device::Cpu)? - b.to_device(&Device::Cpu)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()
}

/// The first CUDA GPU, or `None` after saying `SKIP: no CUDA GPU` (the GPU
/// tests then pass without running, so CPU-only CI stays green).
#[cfg(feature = "cuda")]
pub fn gpu() -> Option<Device> {
    match std::panic::catch_unwind(|| Device::new_cuda(0)) {
        Ok(Ok(d)) => Some(d),
        _ => {
            eprintln!("SKIP: no CUDA GPU");
            None
        }
    }
}
