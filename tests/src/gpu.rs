//! Helpers of the GPU tests (feature `cuda`): each op's CUDA path is run on
//! random cases and compared with its CPU reference on identical inputs.
//!
//! - [`gpu`]: a fresh stream on device 0, or `None` (printing one
//!   `SKIP: no CUDA GPU (reason)` line per test binary) where there is no
//!   driver or no device, so that every GPU test passes as a skip on a machine
//!   without a GPU (and in CI);
//! - [`upload`], [`download`], [`poisoned`]: host/device copies, and outputs
//!   pre-filled with a [`Poison`] value so that an element a kernel fails to
//!   write (or writes outside its view) makes the comparison fail;
//! - [`Strided`]: a host tensor in an explicit layout at an offset in its
//!   storage, viewed the same way by the CPU reference ([`View`]) and by the
//!   CUDA path ([`DevView`] over a `CudaView` of the uploaded storage);
//! - seeded generators of the cases: [`random_rows`], [`KvOrder`]; the
//!   number of cases: [`cases`], [`in_sweep`] (`FOVEAL_GPU_CASES`).
//!
//! These helpers are self-contained (they do not use the CPU-oracle helpers of
//! the crate root) so that the GPU tests do not move with the oracle tests.

use std::fmt::Debug;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, CudaViewMut, DeviceRepr};
use foveal::cuda::{DevView, DevViewMut};
use foveal::{Element, Layout, RowSpec, View, ViewMut};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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

/// A new stream on device 0, or `None` when this machine has no usable CUDA
/// device: the first call prints `SKIP: no CUDA GPU (reason)` to stderr.
/// Every GPU test starts with `let Some(stream) = gpu() else { return; };`.
pub fn gpu() -> Option<Arc<CudaStream>> {
    let ctx = CONTEXT.get_or_init(|| {
        let ctx = probe();
        if let Err(why) = &ctx {
            eprintln!("SKIP: no CUDA GPU ({why})");
        }
        ctx
    });
    let ctx = ctx.as_ref().ok()?;
    // A stream per test: tests run on parallel threads.
    Some(ctx.new_stream().expect("a CUDA device was found but a stream could not be created"))
}

// ---------------------------------------------------------------------------
// Copies and poison
// ---------------------------------------------------------------------------

/// A value no op writes by itself, for pre-filling outputs; compared by bits.
pub trait Poison: DeviceRepr + Copy + Debug + Send + Sync + 'static {
    const POISON: Self;
    /// The bit pattern, for exact comparison (a copy must be bit-identical, a
    /// zeroed slot +0, an untouched one still the poison).
    fn bits(self) -> u64;
}

impl Poison for f32 {
    const POISON: Self = f32::from_bits(0x7fc5_a5a5); // a NaN with a recognisable payload
    fn bits(self) -> u64 {
        self.to_bits().into()
    }
}
impl Poison for f16 {
    const POISON: Self = f16::from_bits(0x7e5a);
    fn bits(self) -> u64 {
        self.to_bits().into()
    }
}
impl Poison for bf16 {
    const POISON: Self = bf16::from_bits(0x7fa5);
    fn bits(self) -> u64 {
        self.to_bits().into()
    }
}
impl Poison for i32 {
    const POISON: Self = i32::MIN;
    fn bits(self) -> u64 {
        u64::from(self as u32)
    }
}

/// An activation / KV element type on both sides: bf16, f16 or f32.
pub trait GpuElem: Element + Poison {}
impl<T: Element + Poison> GpuElem for T {}

/// Copies `host` (non-empty) to a new device buffer.
pub fn upload<T: DeviceRepr>(stream: &Arc<CudaStream>, host: &[T]) -> CudaSlice<T> {
    assert!(!host.is_empty(), "upload: an empty buffer is not a valid device allocation");
    stream.clone_htod(host).expect("host-to-device copy")
}

/// Copies a device buffer to the host (synchronises with the stream).
pub fn download<T: DeviceRepr>(stream: &Arc<CudaStream>, dev: &CudaSlice<T>) -> Vec<T> {
    stream.clone_dtoh(dev).expect("device-to-host copy")
}

/// A device buffer of `n` poison values (at least one, so that it is a valid
/// allocation).
pub fn poisoned<T: Poison>(stream: &Arc<CudaStream>, n: usize) -> CudaSlice<T> {
    upload(stream, &vec![T::POISON; n.max(1)])
}

/// Asserts two buffers are bit-identical; reports the first difference.
pub fn assert_bits_eq<T: Poison>(got: &[T], want: &[T], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = (0..got.len()).find(|&i| got[i].bits() != want[i].bits()) {
        let n = (0..got.len()).filter(|&i| got[i].bits() != want[i].bits()).count();
        let (len, g, w) = (got.len(), got[i], want[i]);
        panic!("{what}: {n} of {len} elements differ; first at storage offset {i}: got {g:?}, want {w:?}");
    }
}

/// Asserts a buffer still holds only poison (an op that failed its checks
/// must not have written anything).
pub fn assert_untouched<T: Poison>(got: &[T], what: &str) {
    if let Some(i) = got.iter().position(|x| x.bits() != T::POISON.bits()) {
        panic!("{what}: storage offset {i} was written ({:?}) although the call failed", got[i]);
    }
}

// ---------------------------------------------------------------------------
// Strided host tensors, viewed alike by both backends
// ---------------------------------------------------------------------------

/// A host tensor in `layout`, starting `offset` elements into `data`; the
/// storage outside the view (the gaps of the layout, the leading offset and
/// any tail) holds whatever the constructor put there.
#[derive(Debug, Clone)]
pub struct Strided<T, const N: usize> {
    pub data: Vec<T>,
    pub layout: Layout<N>,
    pub offset: usize,
}

impl<T: Copy, const N: usize> Strided<T, N> {
    /// A tensor whose storage (`offset + span`, at least one element) is all
    /// `fill`.
    pub fn filled(layout: Layout<N>, offset: usize, fill: T) -> Self {
        Strided { data: vec![fill; (offset + layout.span()).max(1)], layout, offset }
    }

    /// A tensor whose logical elements are `f(index)` (in row-major index
    /// order) and whose other storage is `fill`.
    pub fn from_fn(layout: Layout<N>, offset: usize, fill: T, mut f: impl FnMut([usize; N]) -> T) -> Self {
        let mut t = Self::filled(layout, offset, fill);
        for_each_index(layout.shape(), |idx| {
            let o = t.offset_of(idx);
            t.data[o] = f(idx);
        });
        t
    }

    /// Storage offset of a logical index.
    pub fn offset_of(&self, idx: [usize; N]) -> usize {
        self.offset + self.layout.offset(idx)
    }

    pub fn get(&self, idx: [usize; N]) -> T {
        self.data[self.offset_of(idx)]
    }

    /// The CPU view.
    pub fn view(&self) -> View<'_, T, N> {
        View::new(&self.data[self.offset..], self.layout).expect("host view")
    }

    /// The CPU output view.
    pub fn view_mut(&mut self) -> ViewMut<'_, T, N> {
        ViewMut::new(&mut self.data[self.offset..], self.layout).expect("host output view")
    }
}

impl<T: DeviceRepr + Copy, const N: usize> Strided<T, N> {
    /// Uploads the whole storage (gaps and offset included).
    pub fn upload(&self, stream: &Arc<CudaStream>) -> CudaSlice<T> {
        upload(stream, &self.data)
    }

    /// The device view of this tensor in `dev` (its uploaded storage).
    pub fn dev_view<'a>(&self, dev: &'a CudaSlice<T>) -> DevView<'a, T, N> {
        DevView::new(dev.slice(self.offset..), self.layout).expect("device view")
    }

    /// The device output view of this tensor in `dev`.
    pub fn dev_view_mut<'a>(&self, dev: &'a mut CudaSlice<T>) -> DevViewMut<'a, T, N> {
        DevViewMut::new(dev.slice_mut(self.offset..), self.layout).expect("device output view")
    }
}

/// Calls `f` on every multi-index of `shape`, in row-major order.
pub fn for_each_index<const N: usize>(shape: [usize; N], mut f: impl FnMut([usize; N])) {
    let total: usize = shape.iter().product();
    for mut lin in 0..total {
        let mut idx = [0; N];
        for i in (0..N).rev() {
            idx[i] = lin % shape[i];
            lin /= shape[i];
        }
        f(idx);
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
// Random cases
// ---------------------------------------------------------------------------

/// A seeded generator: the same seed gives the same case.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// The number of random cases a GPU test runs: `default`, or the value of
/// `FOVEAL_GPU_CASES` where it is set (scripts/gpu-suite.sh lowers it for the
/// runs under compute-sanitizer).
pub fn cases(default: usize) -> usize {
    match std::env::var("FOVEAL_GPU_CASES") {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| panic!("FOVEAL_GPU_CASES={v:?} is not a number")),
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

/// A value uniform in `[-amp, amp)`, stored as `T`.
pub fn random_elem<T: Element>(rng: &mut StdRng, amp: f32) -> T {
    T::from_f32(rng.random_range(-amp..amp))
}

/// Memory order of a KV cache, always viewed as the logical `[B, S, H, D]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvOrder {
    /// Stored `[B, S, H, D]` (flash/vLLM): [`Layout::bshd`].
    Bshd,
    /// Stored `[B, H, S, D]` (candle/HF): [`Layout::bhsd`].
    Bhsd,
    /// Stored `[B, H, S_cap, D]` with `S_cap = S + spare`: the first `S`
    /// slots of a preallocated cache.
    BhsdSpare(usize),
}

impl KvOrder {
    /// One of the three, at random (spare capacity 1 to 7 slots).
    pub fn pick(rng: &mut StdRng) -> KvOrder {
        match rng.random_range(0..3) {
            0 => KvOrder::Bshd,
            1 => KvOrder::Bhsd,
            _ => KvOrder::BhsdSpare(rng.random_range(1..8)),
        }
    }

    pub fn layout(self, b: usize, s: usize, h: usize, d: usize) -> Layout<4> {
        match self {
            KvOrder::Bshd => Layout::bshd(b, s, h, d),
            KvOrder::Bhsd => Layout::bhsd(b, s, h, d),
            KvOrder::BhsdSpare(spare) => {
                let cap = s + spare;
                Layout::strided([b, s, h, d], [h * cap * d, d, cap * d, 1]).expect("KV layout")
            }
        }
    }
}

/// A random ragged batch of `batch` rows in a cache of capacity `seq`: rows
/// full, right-padded (`start = 0`), left-padded (`end = seq`) or anywhere;
/// 0 to 3 image spans with text between them, about one row in five with no
/// visual token, one in ten all visual. With `glimpse_text` the last valid
/// position (the glimpse token) is never visual.
pub fn random_rows(rng: &mut StdRng, batch: usize, seq: usize, glimpse_text: bool) -> Vec<RowSpec> {
    assert!(seq >= 1 && batch >= 1);
    (0..batch)
        .map(|_| {
            let len = if rng.random_bool(0.2) { seq } else { rng.random_range(1..=seq) };
            let start = match rng.random_range(0..3) {
                0 => 0,
                1 => seq - len,
                _ => rng.random_range(0..=seq - len),
            };
            let end = start + len;
            let limit = end - usize::from(glimpse_text);
            let mut visual = Vec::new();
            let kind = rng.random_range(0..10);
            if kind == 0 {
                visual.extend(start..limit);
            } else if kind >= 3 && limit > start {
                let spans = rng.random_range(1..=3);
                let mut cuts: Vec<usize> = (0..2 * spans).map(|_| rng.random_range(start..=limit)).collect();
                cuts.sort_unstable();
                for pair in cuts.chunks(2) {
                    visual.extend(pair[0]..pair[1]);
                }
                visual.dedup();
            }
            RowSpec { start, end, visual }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_rows_are_valid() {
        let mut r = rng(1);
        for seq in [1, 2, 7, 100] {
            for _ in 0..50 {
                let rows = random_rows(&mut r, 3, seq, true);
                foveal::RowLayout::new(seq, &rows).expect("valid rows");
                assert!(rows.iter().all(|row| row.visual.iter().all(|&p| p + 1 < row.end)));
            }
        }
    }

    #[test]
    fn strided_places_elements_by_layout() {
        let layout = KvOrder::BhsdSpare(2).layout(2, 3, 2, 4);
        let t = Strided::from_fn(layout, 5, -1i32, |[b, s, h, d]| (1000 * b + 100 * s + 10 * h + d) as i32);
        assert_eq!(t.data.len(), 5 + layout.span());
        assert_eq!(t.get([1, 2, 1, 3]), 1213);
        assert_eq!(t.view().at([1, 2, 1, 3]), 1213);
        assert_eq!(t.data.iter().filter(|&&x| x == -1).count(), t.data.len() - 2 * 3 * 2 * 4);
    }

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

    #[test]
    fn poison_is_nan_for_floats() {
        assert!(f32::POISON.is_nan() && f16::POISON.is_nan() && bf16::POISON.is_nan());
    }
}
