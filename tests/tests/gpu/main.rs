//! Every op's CUDA path against its CPU reference: one test binary (feature
//! `cuda`), one module per op, named after it. Each test gets a fresh stream
//! from [`foveal_tests::gpu::gpu`], which skips (saying why) where there is
//! no GPU, and fails instead where `FOVEAL_REQUIRE_GPU=1` (the GPU suite sets
//! it, so that a missing driver can never pass as a skip).
//!
//! One binary rather than one per op: every test executable embeds all the
//! kernels, so the GPU suite carries and loads them once.

#![cfg(feature = "cuda")]

mod compact_kv;
mod cross_attention;
mod gaze_decode;
mod gaze_route_decode;
mod glance_fusion;
mod glimpse_scores;
mod multiscale_gather;
mod pos_conv1d;
mod region_descriptors;
mod route_topk;
mod select_keep;
mod text_guided_select;
mod token_pack;
mod window_mean;
