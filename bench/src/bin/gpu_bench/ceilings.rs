//! The ceilings, measured in the same run as the ops: the device-to-device
//! copy bandwidth (a `memcpy_dtod` of 1 GiB, 256 MiB in quick mode; bytes
//! read + written), the ceiling of every GB/s figure, and the bf16
//! matrix-product rate (an 8192^3 GEMM, random N(0, 1) inputs, through
//! candle's cuBLAS matmul on candle's stream; 2 n^3 FLOPs), the ceiling of
//! every TFLOP/s figure. Both are sections of their own, run before every
//! other; the PyTorch script measures the same two (`--list-cases`).

use candle_core::{DType, Device, Tensor};
use cudarc::driver::CudaSlice;
use foveal_bench::fmt_bytes;
use half::bf16;
use serde_json::json;

use crate::env::Env;
use crate::table::Row;
use crate::torch::TorchCase;
use crate::{bit_equal, Bench, Case, Check, Mode, Res, Section};

pub const COPY: &str = "copy";
pub const MATMUL: &str = "matmul";

/// Both ceilings, copy first.
pub const SECTIONS: [Section; 2] = [
    Section {
        name: COPY,
        cases: copy_cases,
    },
    Section {
        name: MATMUL,
        cases: matmul_cases,
    },
];

struct Copy {
    bytes: usize,
}

fn copy_cases(mode: Mode) -> Vec<Box<dyn Case>> {
    let bytes = match mode {
        Mode::Quick => 256 << 20,
        Mode::Full => 1 << 30,
    };
    vec![Box::new(Copy { bytes })]
}

impl Case for Copy {
    fn label(&self) -> String {
        format!("memcpy_dtod {}", fmt_bytes(self.bytes as u64))
    }

    fn torch(&self) -> Option<TorchCase> {
        Some(TorchCase::new("copy", json!({ "bytes": self.bytes })))
    }

    fn prepare<'a>(&'a self, env: &mut Env) -> Res<Box<dyn Bench + 'a>> {
        let n = self.bytes / 2;
        Ok(Box::new(CopyBench {
            src: env.pool.filled(&env.stream, n)?,
            dst: env.stream.alloc_zeros::<bf16>(n)?,
        }))
    }
}

/// One source and one destination: at this size L2 holds a sliver of either.
struct CopyBench {
    src: CudaSlice<bf16>,
    dst: CudaSlice<bf16>,
}

impl Bench for CopyBench {
    fn sets(&self) -> usize {
        1
    }

    fn check(&mut self, env: &mut Env) -> Res<Check> {
        env.poison(&mut self.dst, bf16::NAN)?;
        env.stream.memcpy_dtod(&self.src, &mut self.dst)?;
        let (got, want) = (
            env.stream.clone_dtoh(&self.dst)?,
            env.stream.clone_dtoh(&self.src)?,
        );
        Ok(Check::when(
            bit_equal(&got, &want, bf16::to_bits),
            "exact",
            "the copy differs from its source",
        ))
    }

    fn time(&mut self, env: &mut Env) -> Res<Vec<Row>> {
        let (src, dst) = (&self.src, &mut self.dst);
        let stats = env.gpu(1, |stream, _| Ok(stream.memcpy_dtod(src, dst)?))?;
        Ok(vec![Row::new(stats, 4 * src.len() as u64)])
    }
}

struct Matmul {
    n: usize,
}

fn matmul_cases(_: Mode) -> Vec<Box<dyn Case>> {
    vec![Box::new(Matmul { n: 8192 })]
}

impl Case for Matmul {
    fn label(&self) -> String {
        format!("bf16 {0}x{0}x{0} (candle, cuBLAS)", self.n)
    }

    fn torch(&self) -> Option<TorchCase> {
        Some(TorchCase::new(
            "matmul",
            json!({ "m": self.n, "n": self.n, "k": self.n }),
        ))
    }

    fn prepare<'a>(&'a self, env: &mut Env) -> Res<Box<dyn Bench + 'a>> {
        let device = Device::Cuda(env.candle()?);
        let random = || -> Res<Tensor> {
            Ok(Tensor::randn(0f32, 1f32, (self.n, self.n), &device)?.to_dtype(DType::BF16)?)
        };
        Ok(Box::new(MatmulBench {
            n: self.n,
            a: random()?,
            b: random()?,
        }))
    }
}

/// One pair of inputs: the product is compute-bound, L2 does not matter.
struct MatmulBench {
    n: usize,
    a: Tensor,
    b: Tensor,
}

/// Entries of the product compared with the host's dot products.
const SAMPLES: usize = 32;

impl Bench for MatmulBench {
    fn sets(&self) -> usize {
        1
    }

    /// Sampled entries of the product against f64 dot products of the same
    /// bf16 inputs (a fresh output: candle allocates it).
    fn check(&mut self, _: &mut Env) -> Res<Check> {
        let n = self.n;
        let c = self
            .a
            .matmul(&self.b)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let a = self.a.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let b = self.b.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut worst = 0f64;
        for s in 0..SAMPLES {
            let (i, j) = ((s * 7919) % n, (s * 104_729 + 17) % n);
            let want: f64 = (0..n).map(|k| a[i][k] as f64 * b[k][j] as f64).sum();
            // A sum of n unit-variance products is about sqrt(n): errors on that scale.
            let err = (c[i][j] as f64 - want).abs() / (n as f64).sqrt();
            worst = if err.is_nan() {
                f64::INFINITY
            } else {
                worst.max(err)
            };
        }
        // bf16 output: a rounding of 2^-8 of values up to a few sqrt(n).
        Ok(Check::when(
            worst <= 2e-2,
            format!("{SAMPLES} entries, err {worst:.0e} of sqrt(k)"),
            format!("{SAMPLES} sampled entries: err {worst:.1e} of sqrt(k)"),
        ))
    }

    fn time(&mut self, env: &mut Env) -> Res<Vec<Row>> {
        let stream = env.candle()?.cuda_stream();
        let mut timer = env.timer.on(&stream)?;
        let stats = timer.gpu(1, |_| {
            self.a.matmul(&self.b)?;
            Ok(())
        })?;
        Ok(vec![
            Row::new(stats, 0).with_flops(2 * (self.n as u64).pow(3))
        ])
    }
}
