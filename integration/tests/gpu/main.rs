//! Each method's whole model on the GPU against the CPU (feature `cuda`): one
//! test binary, one module per method, so that the GPU suite carries candle's
//! CUDA kernels once. Every test skips (saying so) where there is no GPU, and
//! fails instead where `FOVEAL_REQUIRE_GPU=1` (set by scripts/gpu-suite.sh).
#![cfg(feature = "cuda")]

#[path = "../common/mod.rs"]
mod common;

mod focus;
mod gaze;
mod glance2gaze;
mod glimpse;
mod visor;
