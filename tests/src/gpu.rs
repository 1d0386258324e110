//! Helpers only the GPU tests need (feature `cuda`): each op's CUDA path is
//! run on random cases and compared with its CPU reference on identical
//! inputs, drawn with the generators of the crate root.
//!
//! - [`gpu`]: a fresh stream on device 0, or `None` (printing one
//!   `SKIP: no CUDA GPU (reason)` line per test binary) where there is no
//!   driver or no device, so that every GPU test passes as a skip on a machine
//!   without a GPU (and in CI);
//! - [`upload`], [`download`], [`poisoned`]: host/device copies, and outputs
//!   pre-filled with a [`Poison`] value so that an element a kernel fails to
//!   write (or writes outside its view) makes the comparison fail;
//!   [`assert_bits_eq`], [`assert_untouched`]: the bitwise comparisons;
//! - [`Tensor::upload`], [`Tensor::dev_view`], [`Tensor::dev_view_mut`]: a
//!   host tensor viewed the same way by the CPU reference ([`Tensor::view`])
//!   and by the CUDA path ([`DevView`] over its uploaded storage);
//!   [`with_split_mut`]: disjoint device views of one buffer;
//! - the number of cases: [`cases`], [`in_sweep`] (`FOVEAL_GPU_CASES`).

use std::fmt::Debug;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, CudaViewMut, DeviceRepr};
use foveal::cuda::{DevView, DevViewMut};

use crate::{Bits, Poison, Tensor, TestElem};

// ---------------------------------------------------------------------------
// The device
// ---------------------------------------------------------------------------

static CONTEXT: OnceLock<Result<Arc<CudaContext>, String>> = OnceLock::new();

/// Opens device 0, or says why not. Never panics: cudarc loads the driver
/// library at run time and panics where it is missing, so the library is
/// looked for first and the rest runs under `catch_unwind`.
fn probe() -> Result<Arc<CudaContext>, String> {
    // SAFETY: only tries to load the driver library (libloading); no CUDA call.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("the CUDA driver library (libcuda) was not found".into());
    }
    let opened = panic::catch_unwind(AssertUnwindSafe(|| -> Result<Arc<CudaContext>, String> {
        let n = CudaContext::device_count().map_err(|e| format!("cuDeviceGetCount failed: {e}"))?;
        if n < 1 {
            return Err("the driver reports 0 devices".into());
        }
        CudaContext::new(0).map_err(|e| format!("CudaContext::new(0) failed: {e}"))
    }));
    opened.unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic without a message".into());
        Err(format!("cudarc panicked: {msg}"))
    })
}

/// Whether the GPU is required (`FOVEAL_REQUIRE_GPU=1`, set by
/// scripts/gpu-suite.sh on the GPU machine): then a failed probe fails the
/// test with its reason instead of skipping it.
pub fn gpu_required() -> bool {
    std::env::var("FOVEAL_REQUIRE_GPU").is_ok_and(|v| v.trim() == "1")
}

/// A new stream on device 0, or `None` when this machine has no usable CUDA
/// device: the first call prints `SKIP: no CUDA GPU (reason)` to stderr.
/// Every GPU test starts with `let Some(stream) = gpu() else { return; };`.
///
/// Panics, with the probe's reason, where there is no usable device and
/// [`gpu_required`] holds: on the GPU machine a missing driver library, a
/// failed `cuInit` or no device must fail the suite, never pass as a skip.
pub fn gpu() -> Option<Arc<CudaStream>> {
    let ctx = CONTEXT.get_or_init(|| {
        let ctx = probe();
        if let Err(why) = &ctx {
            if !gpu_required() {
                eprintln!("SKIP: no CUDA GPU ({why})");
            }
        }
        ctx
    });
    let ctx = match ctx {
        Ok(ctx) => ctx,
        Err(why) if gpu_required() => panic!("FOVEAL_REQUIRE_GPU=1 but no CUDA GPU: {why}"),
        Err(_) => return None,
    };
    // A stream per test: tests run on parallel threads.
    Some(
        ctx.new_stream()
            .expect("a CUDA device was found but a stream could not be created"),
    )
}

// ---------------------------------------------------------------------------
// Copies and poison
// ---------------------------------------------------------------------------

/// An activation / KV element type on both sides (bf16, f16 or f32): a
/// [`TestElem`] that goes to the device.
pub trait GpuElem: TestElem + DeviceRepr {}
impl<T: TestElem + DeviceRepr> GpuElem for T {}

/// Copies `host` (non-empty) to a new device buffer.
pub fn upload<T: DeviceRepr>(stream: &Arc<CudaStream>, host: &[T]) -> CudaSlice<T> {
    assert!(
        !host.is_empty(),
        "upload: an empty buffer is not a valid device allocation"
    );
    stream.clone_htod(host).expect("host-to-device copy")
}

/// Copies a device buffer to the host (synchronises with the stream).
pub fn download<T: DeviceRepr>(stream: &Arc<CudaStream>, dev: &CudaSlice<T>) -> Vec<T> {
    stream.clone_dtoh(dev).expect("device-to-host copy")
}

/// A device buffer of `n` poison values (at least one, so that it is a valid
/// allocation).
pub fn poisoned<T: Poison + DeviceRepr>(stream: &Arc<CudaStream>, n: usize) -> CudaSlice<T> {
    upload(stream, &vec![T::POISON; n.max(1)])
}

/// Asserts two buffers are bit-identical; reports the first difference.
pub fn assert_bits_eq<T: Bits + Debug>(got: &[T], want: &[T], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = (0..got.len()).find(|&i| got[i].bits() != want[i].bits()) {
        let n = (0..got.len())
            .filter(|&i| got[i].bits() != want[i].bits())
            .count();
        let (len, g, w) = (got.len(), got[i], want[i]);
        panic!("{what}: {n} of {len} elements differ; first at storage offset {i}: got {g:?}, want {w:?}");
    }
}

/// Asserts a buffer still holds only poison (an op that failed its checks
/// must not have written anything).
pub fn assert_untouched<T: Poison + Bits + Debug>(got: &[T], what: &str) {
    if let Some(i) = got.iter().position(|x| x.bits() != T::POISON.bits()) {
        panic!(
            "{what}: storage offset {i} was written ({:?}) although the call failed",
            got[i]
        );
    }
}

// ---------------------------------------------------------------------------
// Host tensors on the device, viewed alike by both backends
// ---------------------------------------------------------------------------

impl<T: DeviceRepr + Copy, const N: usize> Tensor<T, N> {
    /// Uploads the whole storage (gaps and the elements before the base
    /// included).
    pub fn upload(&self, stream: &Arc<CudaStream>) -> CudaSlice<T> {
        upload(stream, &self.data)
    }

    /// The device view of this tensor in `dev` (its uploaded storage).
    pub fn dev_view<'a>(&self, dev: &'a CudaSlice<T>) -> DevView<'a, T, N> {
        DevView::new(dev.slice(self.base..), self.layout()).expect("device view")
    }

    /// The device output view of this tensor in `dev`.
    pub fn dev_view_mut<'a>(&self, dev: &'a mut CudaSlice<T>) -> DevViewMut<'a, T, N> {
        DevViewMut::new(dev.slice_mut(self.base..), self.layout()).expect("device output view")
    }
}

/// Splits `buf` into consecutive mutable views of the given lengths and
/// passes them to `f`. (cudarc 0.19 splits a `CudaViewMut` only through a
/// `&mut` borrow of it, so N disjoint views of one buffer need one stack frame
/// per split.)
pub fn with_split_mut<T, R>(
    buf: &mut CudaSlice<T>,
    lens: &[usize],
    f: impl for<'v> FnOnce(Vec<CudaViewMut<'v, T>>) -> R,
) -> R {
    fn go<'a, T, R>(
        mut rest: CudaViewMut<'a, T>,
        lens: &[usize],
        done: Vec<CudaViewMut<'a, T>>,
        f: impl for<'v> FnOnce(Vec<CudaViewMut<'v, T>>) -> R,
    ) -> R {
        match lens.split_first() {
            None => f(done),
            Some((&n, more)) => {
                let (head, tail) = rest.split_at_mut(n);
                let mut done: Vec<CudaViewMut<'_, T>> = done;
                done.push(head);
                go(tail, more, done, f)
            }
        }
    }
    go(buf.as_view_mut(), lens, Vec::with_capacity(lens.len()), f)
}

// ---------------------------------------------------------------------------
// Number of cases
// ---------------------------------------------------------------------------

/// The number of random cases a GPU test runs: `default`, or the value of
/// `FOVEAL_GPU_CASES` where it is set (scripts/gpu-suite.sh lowers it for the
/// runs under compute-sanitizer).
pub fn cases(default: usize) -> usize {
    match std::env::var("FOVEAL_GPU_CASES") {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("FOVEAL_GPU_CASES={v:?} is not a number")),
        Err(_) => default,
    }
}

/// Whether item `i` of a fixed sweep of `total` items runs: all of them, or
/// about [`cases`]`(total)` of them spread evenly over the sweep.
pub fn in_sweep(i: usize, total: usize) -> bool {
    let n = cases(total).clamp(1, total.max(1));
    // (not `is_multiple_of`: the workspace supports Rust 1.85)
    i.checked_rem(total.div_ceil(n)) == Some(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Passes on a machine with or without a GPU; without one it prints the
    /// SKIP line and must not panic.
    #[test]
    fn gpu_probe_never_panics() {
        let _ = gpu();
    }

    #[test]
    fn sweeps_keep_their_first_item() {
        assert!(in_sweep(0, 10) && in_sweep(0, 1));
        if std::env::var_os("FOVEAL_GPU_CASES").is_none() {
            assert!((0..10).all(|i| in_sweep(i, 10)));
        }
    }
}
