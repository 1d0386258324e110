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
use std::ops::{Bound, Range, RangeBounds};
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr};
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

/// Poison elements on each side of every buffer the tests put on the device
/// (256 elements: 16-byte alignment is kept for every element type).
pub const GUARD: usize = 256;

/// A device buffer with [`GUARD`] poison elements before and after its
/// contents. Kernels see only the contents (`as_view`, `slice`, ...);
/// [`download`] fails the test when a guard element was written, so a write
/// past either end of an output is caught, not left in a neighbour's memory.
/// The methods mirror cudarc's `CudaSlice`, with indices relative to the
/// contents.
pub struct DevBuf<T> {
    buf: CudaSlice<T>,
    len: usize,
}

impl<T: DeviceRepr> DevBuf<T> {
    /// Elements in the contents.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the contents are empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The contents.
    pub fn as_view(&self) -> CudaView<'_, T> {
        self.buf.slice(GUARD..GUARD + self.len)
    }

    /// The contents, writable.
    pub fn as_view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.buf.slice_mut(GUARD..GUARD + self.len)
    }

    /// A range of the contents.
    pub fn slice(&self, range: impl RangeBounds<usize>) -> CudaView<'_, T> {
        let r = self.range(range);
        self.buf.slice(r)
    }

    /// A range of the contents, writable.
    pub fn slice_mut(&mut self, range: impl RangeBounds<usize>) -> CudaViewMut<'_, T> {
        let r = self.range(range);
        self.buf.slice_mut(r)
    }

    fn range(&self, range: impl RangeBounds<usize>) -> Range<usize> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e + 1,
            Bound::Excluded(&e) => e,
            Bound::Unbounded => self.len,
        };
        assert!(
            start <= end && end <= self.len,
            "DevBuf: range {start}..{end} outside its {} elements",
            self.len
        );
        GUARD + start..GUARD + end
    }
}

/// Copies `host` to a new device buffer between poison guards.
pub fn upload<T: Poison + DeviceRepr>(stream: &Arc<CudaStream>, host: &[T]) -> DevBuf<T> {
    let mut all = Vec::with_capacity(host.len() + 2 * GUARD);
    all.extend(std::iter::repeat_n(T::POISON, GUARD));
    all.extend_from_slice(host);
    all.extend(std::iter::repeat_n(T::POISON, GUARD));
    DevBuf {
        buf: stream.clone_htod(&all).expect("host-to-device copy"),
        len: host.len(),
    }
}

/// Copies a device buffer's contents to the host (synchronises with the
/// stream), after checking that its guards still hold poison: a kernel that
/// wrote before or after its view fails here.
pub fn download<T: Poison + Bits + Debug + DeviceRepr>(
    stream: &Arc<CudaStream>,
    dev: &DevBuf<T>,
) -> Vec<T> {
    let mut all = stream.clone_dtoh(&dev.buf).expect("device-to-host copy");
    let after = all.split_off(GUARD + dev.len);
    for (side, guard) in [("before", &all[..GUARD]), ("after", &after[..])] {
        if let Some(i) = guard.iter().position(|x| x.bits() != T::POISON.bits()) {
            let at = if side == "before" { GUARD - i } else { i + 1 };
            panic!(
                "a kernel wrote {at} element(s) {side} a device buffer of {} ({:?})",
                dev.len, guard[i]
            );
        }
    }
    all.split_off(GUARD)
}

/// A device buffer of `n` poison values, between poison guards.
pub fn poisoned<T: Poison + DeviceRepr>(stream: &Arc<CudaStream>, n: usize) -> DevBuf<T> {
    upload(stream, &vec![T::POISON; n])
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

/// Asserts two buffers hold the same values: bit-identical, except that two
/// NaNs other than the poison are equal ([`crate::same_value`]); reports the
/// first difference.
pub fn assert_same_values<T: TestElem + Debug>(got: &[T], want: &[T], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let differ = |i: &usize| !crate::same_value(got[*i], want[*i]);
    if let Some(i) = (0..got.len()).find(differ) {
        let n = (0..got.len()).filter(differ).count();
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

impl<T: Poison + DeviceRepr, const N: usize> Tensor<T, N> {
    /// Uploads the whole storage (gaps and the elements before the base
    /// included), between poison guards.
    pub fn upload(&self, stream: &Arc<CudaStream>) -> DevBuf<T> {
        upload(stream, &self.data)
    }

    /// The device view of this tensor in `dev` (its uploaded storage).
    pub fn dev_view<'a>(&self, dev: &'a DevBuf<T>) -> DevView<'a, T, N> {
        DevView::new(dev.slice(self.base..), self.layout()).expect("device view")
    }

    /// The device output view of this tensor in `dev`.
    pub fn dev_view_mut<'a>(&self, dev: &'a mut DevBuf<T>) -> DevViewMut<'a, T, N> {
        DevViewMut::new(dev.slice_mut(self.base..), self.layout()).expect("device output view")
    }
}

/// Splits `buf` into consecutive mutable views of the given lengths and
/// passes them to `f`. (cudarc 0.19 splits a `CudaViewMut` only through a
/// `&mut` borrow of it, so N disjoint views of one buffer need one stack frame
/// per split.)
pub fn with_split_mut<T: DeviceRepr, R>(
    buf: &mut DevBuf<T>,
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

    /// A write just past either end of a buffer's contents fails its
    /// download (on a GPU; skips without one).
    #[test]
    fn guards_catch_writes_past_either_end() {
        let Some(stream) = gpu() else { return };
        for (at, side) in [(GUARD - 1, "before"), (GUARD + 5, "after")] {
            let mut dev = upload(&stream, &[1.0f32; 5]);
            stream
                .memcpy_htod(&[2.0f32], &mut dev.buf.slice_mut(at..at + 1))
                .expect("write into a guard");
            let caught = panic::catch_unwind(AssertUnwindSafe(|| download(&stream, &dev)));
            let msg = caught.expect_err("the guard write went unnoticed");
            let msg = msg.downcast_ref::<String>().expect("a formatted panic");
            assert!(msg.contains(&format!("1 element(s) {side}")), "{msg}");
        }
        let dev = upload(&stream, &[1.0f32; 5]);
        assert_eq!(download(&stream, &dev), vec![1.0f32; 5]);
    }

    #[test]
    fn sweeps_keep_their_first_item() {
        assert!(in_sweep(0, 10) && in_sweep(0, 1));
        if std::env::var_os("FOVEAL_GPU_CASES").is_none() {
            assert!((0..10).all(|i| in_sweep(i, 10)));
        }
    }
}
