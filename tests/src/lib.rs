//! Shared helpers of the cross-crate tests: the CPU tests (the references
//! against f64 oracles) and the GPU tests (the CUDA paths against the
//! references) draw their cases with the same generators and poison their
//! outputs with the same values.
//!
//! - seeded generators (rand 0.9 [`StdRng`]) of ragged row layouts
//!   ([`random_rows`]), of strided memory orders ([`random_strides`],
//!   [`KvOrder`]), of elements ([`random_elem`]) and of strided tensors
//!   ([`Tensor`]); of Gaze Attention layouts ([`gaze_cases`]); glance_fusion's
//!   cases and f64 oracle ([`glance_fusion`]);
//! - the tolerance of each element type ([`Tol`]);
//! - [`Poison`]: fill an output with a NaN (or a sentinel for integers)
//!   first, so that an element the op forgot to write fails the comparison;
//! - [`Bits`]: exact, bitwise comparison of gathered elements;
//! - `gpu` (feature `cuda`): what only the GPU tests need (the device, host
//!   and device copies, device views of a [`Tensor`], the number of cases).
//!
//! Tensors here compute their own offsets (`base + sum idx[i] * strides[i]`)
//! rather than going through foveal's views, so the oracles read the inputs
//! independently of the code under test.

pub mod cross_attention;
pub mod gaze_cases;
pub mod gaze_decode;
pub mod gaze_route_decode;
pub mod glance_fusion;
#[cfg(feature = "cuda")]
pub mod gpu;

use foveal::{DType, Element, KeepRule, Layout, RowSpec, ScoreMode, View, ViewMut};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// A seeded generator: the same seed gives the same case.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

// ---------------------------------------------------------------------------
// Tolerances
// ---------------------------------------------------------------------------

/// A comparison tolerance: `|got - want| <= abs + rel * max(|want|, magnitude)`,
/// where `magnitude` is the size of the terms that were summed (so that
/// cancellation does not make a relative bound meaningless).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tol {
    pub rel: f64,
    pub abs: f64,
}

impl Tol {
    /// f32 storage, or f32 accumulation of exactly converted inputs.
    pub const F32: Tol = Tol {
        rel: 1e-5,
        abs: 1e-6,
    };
    /// f16 storage of the result.
    pub const F16: Tol = Tol {
        rel: 1e-3,
        abs: 1e-4,
    };
    /// bf16 storage of the result.
    pub const BF16: Tol = Tol {
        rel: 1e-2,
        abs: 1e-3,
    };

    /// The tolerance set by an element type.
    pub fn of(dtype: DType) -> Tol {
        match dtype {
            DType::F32 => Tol::F32,
            DType::F16 => Tol::F16,
            DType::BF16 => Tol::BF16,
        }
    }

    /// The tolerance of element type `T`.
    pub fn for_elem<T: Element>() -> Tol {
        Tol::of(T::DTYPE)
    }

    /// The bound on `|got - want|` for a value of size `want` computed from
    /// terms of size `magnitude`.
    pub fn bound(&self, want: f64, magnitude: f64) -> f64 {
        self.abs + self.rel * want.abs().max(magnitude.abs())
    }

    /// Whether `got` is within the tolerance of `want`. A NaN or an infinity on
    /// either side is never close (unless both are the same infinity).
    pub fn allows(&self, got: f64, want: f64, magnitude: f64) -> bool {
        if got.is_infinite() || want.is_infinite() {
            return got == want;
        }
        (got - want).abs() <= self.bound(want, magnitude)
    }
}

/// Asserts `got[i]` is within `tol` of `want[i]` for every `i`
/// (`magnitude[i]` as in [`Tol::allows`]); reports the first failure with its
/// index and the worst error seen.
pub fn assert_close(got: &[f64], want: &[f64], magnitude: &[f64], tol: Tol, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert_eq!(want.len(), magnitude.len(), "{what}: length of magnitude");
    for i in 0..got.len() {
        assert!(
            tol.allows(got[i], want[i], magnitude[i]),
            "{what}: element {i}: got {}, want {} (|diff| {:e}, bound {:e})",
            got[i],
            want[i],
            (got[i] - want[i]).abs(),
            tol.bound(want[i], magnitude[i])
        );
    }
}

// ---------------------------------------------------------------------------
// Poison and bitwise comparison
// ---------------------------------------------------------------------------

/// A value an op never produces by itself: a NaN with a recognisable payload
/// for the stored float types, a sentinel for integers. Outputs are filled
/// with it before a call so that an element the op did not write cannot pass
/// a comparison; compared by [`Bits`], an element left untouched is told
/// apart from a NaN the op wrote. (The GPU helpers add `DeviceRepr` as a
/// bound where the value goes to the device.)
pub trait Poison: Copy {
    const POISON: Self;
}

impl Poison for f32 {
    const POISON: Self = f32::from_bits(0x7fc5_a5a5);
}
impl Poison for f64 {
    const POISON: Self = f64::NAN;
}
impl Poison for f16 {
    const POISON: Self = f16::from_bits(0x7e5a);
}
impl Poison for bf16 {
    const POISON: Self = bf16::from_bits(0x7fa5);
}
impl Poison for i32 {
    const POISON: Self = i32::MIN;
}
impl Poison for u32 {
    const POISON: Self = 0xdead_beef;
}

/// Fills `buf` with the poison value (a NaN for floats).
pub fn poison<T: Poison>(buf: &mut [T]) {
    buf.fill(T::POISON);
}

/// The bit pattern of an element, for exact comparison (a copy must be
/// bit-identical, a zeroed slot must be +0).
pub trait Bits: Copy {
    fn bits(self) -> u64;
}

impl Bits for f32 {
    fn bits(self) -> u64 {
        self.to_bits() as u64
    }
}
impl Bits for f16 {
    fn bits(self) -> u64 {
        self.to_bits() as u64
    }
}
impl Bits for bf16 {
    fn bits(self) -> u64 {
        self.to_bits() as u64
    }
}
impl Bits for i32 {
    fn bits(self) -> u64 {
        self as u32 as u64
    }
}

/// A test element: stored type of an activation tensor.
pub trait TestElem: Element + Poison + Bits {}
impl<T: Element + Poison + Bits> TestElem for T {}

/// Asserts `res` is op `op`'s refusal of argument `arg` of the given kind:
/// "shape" ([`foveal::Error::Shape`]), "index" or "value".
pub fn assert_arg_error<T: std::fmt::Debug>(
    res: Result<T, foveal::Error>,
    op: &str,
    kind: &str,
    arg: &str,
) {
    use foveal::Error;
    let got = match &res {
        Err(Error::Shape { op: o, arg: a, .. }) => Some((*o, "shape", *a)),
        Err(Error::Index { op: o, arg: a, .. }) => Some((*o, "index", *a)),
        Err(Error::Value { op: o, arg: a, .. }) => Some((*o, "value", *a)),
        _ => None,
    };
    assert_eq!(
        got,
        Some((op, kind, arg)),
        "want {op}'s {kind} error on `{arg}`, got {res:?}"
    );
}

/// Whether a computed element equals the expected one: the same bits, or
/// both NaN with neither the poison (CUDA arithmetic returns the canonical
/// NaN where the CPU keeps the input's payload; a NaN payload carries no
/// meaning, but an unwritten poison element must still show).
pub fn same_value<T: TestElem>(got: T, want: T) -> bool {
    let poison = T::POISON.bits();
    got.bits() == want.bits()
        || (got.to_f32().is_nan()
            && want.to_f32().is_nan()
            && got.bits() != poison
            && want.bits() != poison)
}

/// Replaces each logical element of `t`, with probability `p`, by +inf,
/// -inf or NaN (a third each): the special values an op must carry through
/// as its CPU reference does.
pub fn sprinkle_specials<T: Element, const N: usize>(
    rng: &mut StdRng,
    t: &mut Tensor<T, N>,
    p: f64,
) {
    for idx in indices(t.shape) {
        if rng.random_bool(p) {
            let v = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN][rng.random_range(0..3)];
            let o = t.offset(idx);
            t.data[o] = T::from_f32(v);
        }
    }
}

/// Converts an element to f64 exactly (every bf16, f16 and f32 is an f64).
pub fn to_f64<T: Element>(x: T) -> f64 {
    x.to_f32() as f64
}

// ---------------------------------------------------------------------------
// Strided tensors
// ---------------------------------------------------------------------------

/// Strides of an `N`-dimensional tensor in a random memory order: the last
/// dimension innermost and contiguous, the others permuted at random, each with
/// a random gap (0 to 3 elements) after the extent of the dimensions inside it.
pub fn random_strides<const N: usize>(rng: &mut StdRng, shape: [usize; N]) -> [usize; N] {
    let mut order: Vec<usize> = (0..N.saturating_sub(1)).collect();
    order.shuffle(rng);
    let mut strides = [0usize; N];
    let mut cur = 1usize;
    // innermost first: the last dim, then `order` reversed outward.
    let inner_to_outer = std::iter::once(N - 1).chain(order.into_iter().rev());
    for dim in inner_to_outer {
        strides[dim] = cur;
        let gap = if rng.random_bool(0.5) {
            rng.random_range(1..=3)
        } else {
            0
        };
        cur = cur * shape[dim].max(1) + gap;
    }
    strides
}

/// Like [`random_strides`], but every stride but the last a multiple of
/// `align` elements (gaps of 0 to 3 times `align`): with a last dimension that
/// is a multiple of `align` too, the view of a 16-byte-aligned base keeps each
/// row 16-byte aligned when `align` is the elements of 16 bytes, as the
/// kernels' 16-byte paths require.
pub fn aligned_strides<const N: usize>(
    rng: &mut StdRng,
    shape: [usize; N],
    align: usize,
) -> [usize; N] {
    assert!(N >= 1 && align >= 1);
    let mut order: Vec<usize> = (0..N - 1).collect();
    order.shuffle(rng);
    let mut strides = [0usize; N];
    strides[N - 1] = 1;
    let mut cur = shape[N - 1].max(1).next_multiple_of(align);
    for dim in order.into_iter().rev() {
        strides[dim] = cur;
        let gap = if rng.random_bool(0.5) {
            rng.random_range(1..=3) * align
        } else {
            0
        };
        cur = cur * shape[dim].max(1) + gap;
    }
    strides
}

/// Row-major contiguous strides. A zero-sized dimension counts as one, so an
/// empty tensor gets non-zero strides: foveal's `Layout::contiguous` gives it
/// zero strides, which `ViewMut::new` then refuses as overlapping (see
/// `empty_output_view_is_accepted` in tests/glimpse_scores.rs).
pub fn contiguous_strides<const N: usize>(shape: [usize; N]) -> [usize; N] {
    let mut strides = [0; N];
    let mut s = 1;
    for i in (0..N).rev() {
        strides[i] = s;
        s *= shape[i].max(1);
    }
    strides
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
    /// A random permutation of the leading dims, with gaps
    /// ([`random_strides`]); its strides need not be multiples of `D`.
    Padded,
}

impl KvOrder {
    /// `Bshd`, `Bhsd` or `Padded`, alike: any memory order (the CPU tests).
    pub fn pick(rng: &mut StdRng) -> KvOrder {
        [KvOrder::Bshd, KvOrder::Bhsd, KvOrder::Padded][rng.random_range(0..3)]
    }

    /// `Bshd`, `Bhsd` or `BhsdSpare` (1 to 7 spare slots), alike: the orders
    /// of real caches, every stride a multiple of `D`, as the CUDA kernels'
    /// vector loads want them (the GPU tests).
    pub fn pick_aligned(rng: &mut StdRng) -> KvOrder {
        match rng.random_range(0..3) {
            0 => KvOrder::Bshd,
            1 => KvOrder::Bhsd,
            _ => KvOrder::BhsdSpare(rng.random_range(1..8)),
        }
    }

    /// Strides of the logical `[B, S, H, D]` view of `shape`; `rng` draws
    /// those of `Padded` (and nothing for the other orders).
    pub fn strides(self, rng: &mut StdRng, shape: [usize; 4]) -> [usize; 4] {
        let [b, s, h, d] = shape;
        match self {
            KvOrder::Bshd => Layout::bshd(b, s, h, d).strides(),
            KvOrder::Bhsd => Layout::bhsd(b, s, h, d).strides(),
            KvOrder::BhsdSpare(spare) => {
                let cap = s + spare;
                [h * cap * d, d, cap * d, 1]
            }
            KvOrder::Padded => random_strides(rng, shape),
        }
    }

    /// The foveal layout of [`KvOrder::strides`].
    pub fn layout(self, rng: &mut StdRng, shape: [usize; 4]) -> Layout<4> {
        Layout::strided(shape, self.strides(rng, shape)).expect("KV layout")
    }
}

/// An owned strided tensor: storage, logical shape, strides in elements, and
/// the storage offset of element `[0, .., 0]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor<T, const N: usize> {
    pub data: Vec<T>,
    pub shape: [usize; N],
    pub strides: [usize; N],
    /// Storage elements before the tensor: 0, but where a test starts a
    /// tensor past the beginning of its buffer ([`Tensor::offset_by`]).
    pub base: usize,
}

impl<T: Copy, const N: usize> Tensor<T, N> {
    /// Storage needed for `shape` with `strides`: one past the largest offset.
    pub fn span(shape: [usize; N], strides: [usize; N]) -> usize {
        if shape.contains(&0) {
            return 0;
        }
        1 + (0..N).map(|i| (shape[i] - 1) * strides[i]).sum::<usize>()
    }

    /// A tensor whose every storage element (gaps included) is `fill`. The
    /// storage holds at least one element, so that an empty tensor is still
    /// a valid device allocation.
    pub fn filled(shape: [usize; N], strides: [usize; N], fill: T) -> Self {
        Tensor {
            data: vec![fill; Self::span(shape, strides).max(1)],
            shape,
            strides,
            base: 0,
        }
    }

    /// A tensor of `shape` with `strides` whose logical elements are
    /// `f(index)` (called in row-major index order) and whose gaps are `gap`.
    pub fn from_fn(
        shape: [usize; N],
        strides: [usize; N],
        gap: T,
        mut f: impl FnMut([usize; N]) -> T,
    ) -> Self {
        let mut t = Self::filled(shape, strides, gap);
        for idx in indices(shape) {
            let o = t.offset(idx);
            t.data[o] = f(idx);
        }
        t
    }

    /// The same tensor `n` elements further into its storage, the elements
    /// put before it `fill`.
    pub fn offset_by(mut self, n: usize, fill: T) -> Self {
        self.data.splice(0..0, std::iter::repeat_n(fill, n));
        self.base += n;
        self
    }

    /// Storage offset of a multi-index, computed here (not by foveal).
    pub fn offset(&self, idx: [usize; N]) -> usize {
        self.base
            + (0..N)
                .map(|i| {
                    assert!(
                        idx[i] < self.shape[i],
                        "index {idx:?} outside {:?}",
                        self.shape
                    );
                    idx[i] * self.strides[i]
                })
                .sum::<usize>()
    }

    pub fn get(&self, idx: [usize; N]) -> T {
        self.data[self.offset(idx)]
    }

    /// The foveal layout of this tensor (from its base).
    pub fn layout(&self) -> Layout<N> {
        Layout::strided(self.shape, self.strides).expect("test tensor layout")
    }

    pub fn view(&self) -> View<'_, T, N> {
        View::new(&self.data[self.base..], self.layout()).expect("test tensor view")
    }

    pub fn view_mut(&mut self) -> ViewMut<'_, T, N> {
        let layout = self.layout();
        ViewMut::new(&mut self.data[self.base..], layout).expect("test tensor view")
    }

    /// Storage offsets no logical index reaches (the gaps, the elements
    /// before the base and any tail), ascending.
    pub fn gap_offsets(&self) -> Vec<usize> {
        let mut used = vec![false; self.data.len()];
        for idx in indices(self.shape) {
            used[self.offset(idx)] = true;
        }
        (0..self.data.len()).filter(|&o| !used[o]).collect()
    }
}

/// Every multi-index of `shape`, in row-major order.
pub fn indices<const N: usize>(shape: [usize; N]) -> impl Iterator<Item = [usize; N]> {
    let total: usize = shape.iter().product();
    (0..total).map(move |mut lin| {
        let mut idx = [0; N];
        for i in (0..N).rev() {
            idx[i] = lin % shape[i];
            lin /= shape[i];
        }
        idx
    })
}

/// A random element in `[lo, hi)` stored as `T` (rounded to `T`).
pub fn random_elem<T: Element>(rng: &mut StdRng, lo: f32, hi: f32) -> T {
    T::from_f32(rng.random_range(lo..hi))
}

/// `n` random elements in `[lo, hi)`.
pub fn random_elems<T: Element>(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<T> {
    (0..n).map(|_| random_elem(rng, lo, hi)).collect()
}

/// A tensor of `shape` with `strides`, logical elements uniform in `[lo, hi)`,
/// gaps poisoned (so a read of a gap shows up as NaN).
pub fn random_tensor<T: Element + Poison, const N: usize>(
    rng: &mut StdRng,
    shape: [usize; N],
    strides: [usize; N],
    lo: f32,
    hi: f32,
) -> Tensor<T, N> {
    Tensor::from_fn(shape, strides, T::POISON, |_| random_elem(rng, lo, hi))
}

// ---------------------------------------------------------------------------
// Row layouts
// ---------------------------------------------------------------------------

/// Options of [`random_rows`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowOpts {
    /// Keep the last valid position (the glimpse token) out of the visual
    /// tokens, as glimpse_scores requires.
    pub glimpse_text: bool,
    /// Most image spans per row.
    pub max_spans: usize,
    /// Make about one row in ten all visual (every valid position, the
    /// glimpse token excepted with `glimpse_text`), of the rows that would
    /// otherwise hold spans.
    pub all_visual: bool,
}

impl Default for RowOpts {
    fn default() -> Self {
        RowOpts {
            glimpse_text: true,
            max_spans: 3,
            all_visual: false,
        }
    }
}

impl RowOpts {
    /// The default options with `all_visual` set (the GPU tests' mix).
    pub fn with_all_visual(glimpse_text: bool) -> Self {
        RowOpts {
            glimpse_text,
            all_visual: true,
            ..RowOpts::default()
        }
    }
}

/// A random ragged batch of `batch` rows in a cache of capacity `seq >= 1`:
/// each row has its own length; some are full, some left-padded (`end =
/// seq`), some right-padded (`start = 0`), some anywhere; a row holds 1 to
/// `max_spans` image spans with text between them, except that about one row
/// in five has no visual token at all and, with `all_visual`, one in ten is
/// all visual.
pub fn random_rows(rng: &mut StdRng, batch: usize, seq: usize, opts: RowOpts) -> Vec<RowSpec> {
    assert!(seq >= 1 && batch >= 1);
    (0..batch)
        .map(|_| {
            let len = if rng.random_bool(0.2) {
                seq
            } else {
                rng.random_range(1..=seq)
            };
            let start = match rng.random_range(0..3) {
                0 => 0,
                1 => seq - len,
                _ => rng.random_range(0..=seq - len),
            };
            let end = start + len;
            let limit = end - usize::from(opts.glimpse_text);
            let room = limit > start && opts.max_spans > 0;
            let mut visual = Vec::new();
            let spans = if opts.all_visual {
                match rng.random_range(0..10) {
                    0 => {
                        visual.extend(start..limit);
                        false
                    }
                    kind => kind >= 3 && room,
                }
            } else {
                room && !rng.random_bool(0.2)
            };
            if spans {
                let spans = rng.random_range(1..=opts.max_spans);
                let mut cuts: Vec<usize> = (0..2 * spans)
                    .map(|_| rng.random_range(start..=limit))
                    .collect();
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

/// Logits with exact ties, and -0.0 beside +0.0.
pub const TIES: [f32; 9] = [-2.0, -1.0, -0.5, -0.0, 0.0, 0.5, 1.0, 2.0, 3.0];

/// Random importance logits `[B, nv_max]` (storage padded with NaN past each
/// row's count): half of the cases drawn from [`TIES`], the others uniform
/// in `[-8, 8)`; with probability `nan` an entry is NaN.
pub fn random_logits(rng: &mut StdRng, nv: &[usize], nv_max: usize, nan: f64) -> Vec<f32> {
    let ties = rng.random_bool(0.5);
    let mut out = vec![f32::NAN; nv.len() * nv_max];
    for (b, &n) in nv.iter().enumerate() {
        for i in 0..n {
            out[b * nv_max + i] = if rng.random_bool(nan) {
                f32::NAN
            } else if ties {
                TIES[rng.random_range(0..TIES.len())]
            } else {
                rng.random_range(-8.0f32..8.0)
            };
        }
    }
    out
}

/// The random-case comparison of an op against its oracle for each element
/// type: `matches_oracle_{f32,f16,bf16}`, each running `$check::<T>` on
/// `$cases` cases drawn from `$strategy` (the calling test file depends on
/// proptest).
#[macro_export]
macro_rules! oracle_proptests {
    ($cases:expr, $strategy:expr, $check:ident) => {
        proptest::proptest! {
            #![proptest_config(proptest::prelude::ProptestConfig { cases: $cases, ..proptest::prelude::ProptestConfig::default() })]

            #[test]
            fn matches_oracle_f32(c in $strategy) { $check::<f32>(c); }

            #[test]
            fn matches_oracle_f16(c in $strategy) { $check::<half::f16>(c); }

            #[test]
            fn matches_oracle_bf16(c in $strategy) { $check::<half::bf16>(c); }
        }
    };
}

/// A random rule, from keep-everything to keep-nothing-but-min_keep: of `n`
/// equally likely draws, one keeps every token, one only `min_keep` of them
/// (threshold 1), the others draw a threshold, a ratio and `min_keep`.
pub fn random_rule(r: &mut StdRng, n: u32) -> KeepRule {
    match r.random_range(0..n) {
        0 => KeepRule::keep_all(),
        1 => KeepRule {
            threshold: 1.0,
            max_ratio: None,
            min_keep: 0,
        },
        _ => KeepRule {
            threshold: r.random_range(0.0f32..=1.0),
            max_ratio: if r.random_bool(0.5) {
                Some(r.random_range(0.0f64..=1.0))
            } else {
                None
            },
            min_keep: r.random_range(0..=3),
        },
    }
}

/// Every glimpse_scores mode.
pub const SCORE_MODES: [ScoreMode; 3] =
    [ScoreMode::Logits, ScoreMode::LogSoftmax, ScoreMode::Softmax];

/// Ratios `r` and counts `nv` (1 to 65,536, 65,536 itself included) whose
/// f64 product `r * nv` lies within 1e-3 of an integer, below it, on it or
/// above it: the boundary of select_keep's cap `floor(r * nv)`. The SPEC's
/// examples come first (0.111 x 9,009 = 999.999, 0.333 x 3,003, 0.7 x 10);
/// then, alternately, three-decimal ratios as a caller writes them (`j /
/// 1000` with `nv` chosen so that `j * nv` is 1 below, on or 1 above a
/// multiple of 1,000) and ratios `(k + delta) / nv` with `|delta| <= 1e-3`.
pub fn ratio_boundary_cases(seed: u64, n: usize) -> Vec<(f64, usize)> {
    let mut r = rng(seed);
    let mut out = vec![(0.111, 9009), (0.333, 3003), (0.7, 10)];
    while out.len() < n {
        if out.len() % 2 == 0 {
            // j odd and not a multiple of 5: invertible mod 1000
            let j = loop {
                let j: i64 = r.random_range(1..1000);
                if j % 2 != 0 && j % 5 != 0 {
                    break j;
                }
            };
            let inv = (1..1000)
                .find(|&x| j * x % 1000 == 1)
                .expect("j is invertible");
            let s = [1000 - inv, 0, inv][r.random_range(0..3)]; // j * s = -1, 0, +1 mod 1000
            let nv = (1000 * r.random_range(0..=64) + s).clamp(1, 65_536) as usize;
            out.push((j as f64 / 1000.0, nv));
        } else {
            let nv = if r.random_bool(0.1) {
                65_536
            } else {
                (2f64.powf(r.random_range(0.0..16.0)) as usize).max(1)
            };
            let k = r.random_range(0..=nv) as f64;
            let delta = [-1e-3, -1e-7, -1e-12, 0.0, 1e-12, 1e-7, 1e-3][r.random_range(0..7)]
                * r.random_range(0.5..=1.0);
            out.push((((k + delta) / nv as f64).clamp(0.0, 1.0), nv));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_rows_are_valid_and_varied() {
        let mut r = rng(7);
        let (mut left, mut empty_vis, mut multi_span) = (0, 0, 0);
        for _ in 0..200 {
            let rows = random_rows(&mut r, 4, 50, RowOpts::default());
            foveal::RowLayout::new(50, &rows).expect("random rows must be valid");
            for row in &rows {
                assert!(
                    row.visual.iter().all(|&p| p + 1 < row.end),
                    "glimpse token is visual"
                );
                left += usize::from(row.start > 0);
                empty_vis += usize::from(row.visual.is_empty());
                multi_span += usize::from(row.visual.windows(2).any(|w| w[1] > w[0] + 1));
            }
        }
        assert!(
            left > 50 && empty_vis > 50 && multi_span > 50,
            "{left} {empty_vis} {multi_span}"
        );
    }

    #[test]
    fn random_rows_with_all_visual_rows_are_valid() {
        let mut r = rng(1);
        // every position but the glimpse token visual, in a row of two or more
        let full =
            |row: &RowSpec| row.end - row.start > 1 && row.visual.len() + 1 == row.end - row.start;
        let mut all_visual = 0;
        for seq in [1, 2, 7, 100] {
            for _ in 0..50 {
                let rows = random_rows(&mut r, 3, seq, RowOpts::with_all_visual(true));
                foveal::RowLayout::new(seq, &rows).expect("valid rows");
                assert!(rows
                    .iter()
                    .all(|row| row.visual.iter().all(|&p| p + 1 < row.end)));
                all_visual += rows.iter().filter(|row| full(row)).count();
            }
        }
        assert!(all_visual > 20, "{all_visual}");
    }

    #[test]
    fn tensor_places_elements_past_its_base() {
        let shape = [2, 3, 2, 4];
        let strides = KvOrder::BhsdSpare(2).strides(&mut rng(0), shape);
        let t = Tensor::from_fn(shape, strides, -1i32, |[b, s, h, d]| {
            (1000 * b + 100 * s + 10 * h + d) as i32
        })
        .offset_by(5, -1);
        assert_eq!(t.data.len(), 5 + Tensor::<i32, 4>::span(shape, strides));
        assert_eq!(t.get([1, 2, 1, 3]), 1213);
        assert_eq!(t.view().at([1, 2, 1, 3]), 1213);
        assert_eq!(
            t.data.iter().filter(|&&x| x == -1).count(),
            t.data.len() - 2 * 3 * 2 * 4
        );
        assert_eq!(t.gap_offsets().len(), t.data.len() - 2 * 3 * 2 * 4);
    }

    #[test]
    fn random_strides_do_not_overlap() {
        let mut r = rng(3);
        for _ in 0..100 {
            let shape = [
                r.random_range(1..4),
                r.random_range(1..6),
                r.random_range(1..4),
                r.random_range(1..9),
            ];
            let t: Tensor<f32, 4> = Tensor::filled(shape, random_strides(&mut r, shape), 0.0);
            assert_eq!(t.strides[3], 1);
            let mut seen = std::collections::HashSet::new();
            for idx in indices(shape) {
                assert!(seen.insert(t.offset(idx)), "offset reused by {idx:?}");
            }
            assert!(t.layout().is_non_overlapping());
        }
    }

    #[test]
    fn tolerance_follows_the_element_type() {
        assert!(Tol::for_elem::<f32>().rel < Tol::for_elem::<f16>().rel);
        assert!(Tol::for_elem::<f16>().rel < Tol::for_elem::<bf16>().rel);
        assert!(Tol::F32.allows(1.0 + 5e-6, 1.0, 0.0));
        assert!(!Tol::F32.allows(1.0 + 5e-5, 1.0, 0.0));
        assert!(!Tol::F32.allows(f64::NAN, 1.0, 0.0));
        let mut buf = [1.0f32; 4];
        poison(&mut buf);
        assert!(buf.iter().all(|x| x.is_nan()));
    }

    #[test]
    fn poison_is_nan_for_floats() {
        assert!(f32::POISON.is_nan() && f16::POISON.is_nan() && bf16::POISON.is_nan());
    }
}
