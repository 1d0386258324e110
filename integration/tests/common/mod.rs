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

/// The first CUDA GPU, or `None` after saying `SKIP: no CUDA GPU (reason)`
/// (the GPU tests then pass without running, so CPU-only CI stays green).
/// Panics with the reason instead where `FOVEAL_REQUIRE_GPU=1` (the GPU
/// suite): there a missing driver or cuBLAS must fail, not skip.
#[cfg(feature = "cuda")]
pub fn gpu() -> Option<Device> {
    let why = match std::panic::catch_unwind(|| Device::new_cuda(0)) {
        Ok(Ok(d)) => return Some(d),
        Ok(Err(e)) => format!("Device::new_cuda(0) failed: {e}"),
        Err(p) => format!(
            "Device::new_cuda(0) panicked: {}",
            p.downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("no message")
        ),
    };
    if std::env::var("FOVEAL_REQUIRE_GPU").is_ok_and(|v| v.trim() == "1") {
        panic!("FOVEAL_REQUIRE_GPU=1 but no CUDA GPU: {why}");
    }
    eprintln!("SKIP: no CUDA GPU ({why})");
    None
}
