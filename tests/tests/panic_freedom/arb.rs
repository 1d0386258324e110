//! Arbitrary arguments for the panic tests: sizes (small, or at the edges of
//! `usize` and of the kernels' 32-bit indices), strides (contiguous, padded,
//! zero, permuted, huge), storage that fits its layout or is one element
//! short, index tables with out-of-range, repeated and unsorted entries.
//!
//! A tensor's storage never holds more than [`MAX_STORAGE`] elements: a
//! layout that needs more is refused by its view, and a huge dimension
//! reaches an op only through a zero stride (a broadcast input) or beside an
//! empty dimension (an empty output).

use foveal::{Layout, View, ViewMut};
use half::{bf16, f16};
use proptest::prelude::*;

/// The most elements a test tensor's storage holds.
pub const MAX_STORAGE: usize = 4096;

/// The most logical elements of an input for which an accepted call is
/// repeated on contiguous copies and compared.
pub const MAX_COMPARED: usize = 1 << 14;

/// Sizes at the edges: of `usize` (products overflow), of the 32-bit
/// indices the kernels take, of the 65,535 blocks of a grid dimension.
pub const EDGES: [usize; 9] = [
    usize::MAX,
    usize::MAX - 1,
    usize::MAX / 2 + 1,
    1 << 32,
    i32::MAX as usize + 1,
    i32::MAX as usize,
    65_536,
    65_535,
    1 << 20,
];

/// A size: mostly small, sometimes medium, sometimes at an edge.
pub fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        12 => 0usize..=4,
        2 => 5usize..=24,
        2 => prop::sample::select(&EDGES[..]),
    ]
}

/// A size that is at least 1 (mostly small) or at an edge.
pub fn positive() -> impl Strategy<Value = usize> {
    prop_oneof![
        12 => 1usize..=4,
        2 => 5usize..=24,
        2 => prop::sample::select(&EDGES[..]),
    ]
}

/// A size the CPU references loop over without writing an output element
/// per iteration (heads read only from an input, valid lengths): small, or
/// past the 32-bit limits (so refused). Sizes in between are legitimate work
/// in proportion, not a fault.
pub fn work() -> impl Strategy<Value = usize> {
    prop_oneof![
        12 => 0usize..=4,
        1 => prop::sample::select(&[i32::MAX as usize + 1, 1 << 32, usize::MAX][..]),
    ]
}

/// A length against a dimension: mostly inside it, sometimes just past it,
/// sometimes huge.
pub fn length() -> impl Strategy<Value = usize> {
    prop_oneof![
        12 => 0usize..=5,
        1 => prop::sample::select(&EDGES[..]),
    ]
}

/// An f32 scalar argument: ordinary, zero, negative, tiny, huge, infinite, NaN.
pub fn scalar() -> impl Strategy<Value = f32> {
    prop_oneof![
        6 => -2.0f32..2.0,
        1 => prop::sample::select(&[
            0.0,
            -0.0,
            1.0,
            f32::MIN_POSITIVE,
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ][..]),
    ]
}

/// How a tensor's strides are laid out.
#[derive(Debug, Clone)]
pub enum Strides {
    /// Row-major.
    Contiguous,
    /// Row-major with extra elements after each dimension's extent.
    Padded(Vec<usize>),
    /// Row-major, with the dimensions of the bit mask broadcast (stride 0).
    Zero(u8),
    /// Leading dimensions stored in another order (the last one innermost).
    Permuted(u64),
    /// Row-major, except one dimension's stride is an edge value.
    Huge(usize, usize),
    /// Any strides at all, the last one included.
    Any(Vec<usize>),
}

/// A stride layout, mostly well-formed.
pub fn strides() -> impl Strategy<Value = Strides> {
    prop_oneof![
        6 => Just(Strides::Contiguous),
        2 => prop::collection::vec(0usize..3, 8).prop_map(Strides::Padded),
        2 => any::<u8>().prop_map(Strides::Zero),
        2 => any::<u64>().prop_map(Strides::Permuted),
        1 => (0usize..8, prop::sample::select(&EDGES[..])).prop_map(|(d, s)| Strides::Huge(d, s)),
        1 => prop::collection::vec(prop_oneof![0usize..6, prop::sample::select(&EDGES[..])], 8)
            .prop_map(Strides::Any),
    ]
}

impl Strides {
    /// The strides of `shape` in this layout (saturating, never panicking).
    pub fn of<const N: usize>(&self, shape: [usize; N]) -> [usize; N] {
        let mut st = [0usize; N];
        match self {
            Strides::Any(v) => {
                for i in 0..N {
                    st[i] = v[i % v.len()];
                }
                return st;
            }
            Strides::Permuted(seed) => {
                // Leading dimensions in a seeded order, innermost last.
                let mut order: Vec<usize> = (0..N.saturating_sub(1)).collect();
                let mut s = *seed;
                for i in (1..order.len()).rev() {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    order.swap(i, (s >> 33) as usize % (i + 1));
                }
                let mut acc = 1usize;
                if N > 0 {
                    st[N - 1] = 1;
                    acc = shape[N - 1];
                }
                for &d in order.iter().rev() {
                    st[d] = acc;
                    acc = acc.saturating_mul(shape[d]);
                }
                return st;
            }
            _ => {}
        }
        let mut acc = 1usize;
        for i in (0..N).rev() {
            st[i] = acc;
            let pad = match self {
                Strides::Padded(p) => p[i % p.len()],
                _ => 0,
            };
            acc = acc.saturating_mul(shape[i]).saturating_add(pad);
        }
        match self {
            Strides::Zero(mask) => {
                for (i, s) in st.iter_mut().enumerate() {
                    if mask & (1 << i) != 0 && (i + 1 < N || shape[i] <= 1) {
                        *s = 0;
                    }
                }
            }
            Strides::Huge(d, v) if N > 0 => st[d % N] = *v,
            _ => {}
        }
        st
    }
}

/// An element type of the tests: a deterministic value per storage slot, a
/// sentinel for outputs, and bits for exact comparison (NaN included).
pub trait Elem: Copy + std::fmt::Debug + PartialEq + 'static {
    fn value(slot: usize, seed: u64) -> Self;
    fn sentinel() -> Self;
    fn bits(self) -> u64;
}

fn mix(slot: usize, seed: u64) -> u64 {
    let mut x = (slot as u64 ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    x.wrapping_mul(0xBF58_476D_1CE4_E5B9) ^ (x >> 32)
}

impl Elem for f32 {
    fn value(slot: usize, seed: u64) -> Self {
        ((mix(slot, seed) % 4001) as f32 - 2000.0) / 1000.0
    }
    fn sentinel() -> Self {
        -7.25
    }
    fn bits(self) -> u64 {
        self.to_bits() as u64
    }
}

impl Elem for bf16 {
    fn value(slot: usize, seed: u64) -> Self {
        bf16::from_f32(f32::value(slot, seed))
    }
    fn sentinel() -> Self {
        bf16::from_f32(-7.25)
    }
    fn bits(self) -> u64 {
        self.to_bits() as u64
    }
}

impl Elem for f16 {
    fn value(slot: usize, seed: u64) -> Self {
        f16::from_f32(f32::value(slot, seed))
    }
    fn sentinel() -> Self {
        f16::from_f32(-7.25)
    }
    fn bits(self) -> u64 {
        self.to_bits() as u64
    }
}

impl Elem for i32 {
    fn value(slot: usize, seed: u64) -> Self {
        (mix(slot, seed) % 1000) as i32 - 500
    }
    fn sentinel() -> Self {
        -77
    }
    fn bits(self) -> u64 {
        self as u32 as u64
    }
}

/// A tensor argument as drawn: its shape, strides, and whether its storage
/// is one element short of the layout.
#[derive(Debug, Clone)]
pub struct Spec<const N: usize> {
    pub shape: [usize; N],
    pub strides: Strides,
    pub short: bool,
}

impl<const N: usize> Spec<N> {
    /// A contiguous tensor of `shape` with enough storage.
    pub fn contiguous(shape: [usize; N]) -> Self {
        Spec {
            shape,
            strides: Strides::Contiguous,
            short: false,
        }
    }

    /// The storage length: one past the largest offset (at most
    /// [`MAX_STORAGE`]), less one when `short`.
    fn storage(&self) -> usize {
        let span = match Layout::strided(self.shape, self.strides.of(self.shape)) {
            Ok(l) => l.span(),
            Err(_) => Layout::contiguous(self.shape).span(),
        };
        let n = span.min(MAX_STORAGE);
        if self.short {
            n.saturating_sub(1)
        } else {
            n
        }
    }
}

/// Owned storage for a [`Spec`], filled with seeded values (inputs) or the
/// sentinel (outputs).
#[derive(Debug, Clone)]
pub struct Buf<T, const N: usize> {
    pub spec: Spec<N>,
    pub data: Vec<T>,
}

impl<T: Elem, const N: usize> Buf<T, N> {
    /// An input: every storage element a seeded value.
    pub fn input(spec: &Spec<N>, seed: u64) -> Self {
        let n = spec.storage();
        Buf {
            spec: spec.clone(),
            data: (0..n).map(|i| T::value(i, seed)).collect(),
        }
    }

    /// An output: every storage element the sentinel.
    pub fn output(spec: &Spec<N>) -> Self {
        Buf {
            spec: spec.clone(),
            data: vec![T::sentinel(); spec.storage()],
        }
    }

    /// The layout, or `None` when foveal refuses it (never a panic).
    pub fn layout(&self) -> Option<Layout<N>> {
        Layout::strided(self.spec.shape, self.spec.strides.of(self.spec.shape)).ok()
    }

    /// The read-only view, or `None` when foveal refuses it.
    pub fn view(&self) -> Option<View<'_, T, N>> {
        View::new(&self.data, self.layout()?).ok()
    }

    /// The writable view, or `None` when foveal refuses it.
    pub fn view_mut(&mut self) -> Option<ViewMut<'_, T, N>> {
        let layout = self.layout()?;
        ViewMut::new(&mut self.data, layout).ok()
    }

    /// Logical elements, when there are few enough to compare.
    pub fn numel(&self) -> usize {
        self.spec
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .unwrap_or(usize::MAX)
    }

    /// The logical elements in row-major order (the view must exist and the
    /// tensor be small: callers check [`comparable`]).
    pub fn logical(&self) -> Vec<T> {
        let v = self.view().expect("a view that was made before");
        indices(self.spec.shape).map(|i| v.at(i)).collect()
    }

    /// A contiguous copy of the logical elements (the same argument in
    /// another memory layout).
    pub fn contiguous_copy(&self) -> Buf<T, N> {
        Buf {
            spec: Spec::contiguous(self.spec.shape),
            data: self.logical(),
        }
    }

    /// A contiguous output of the same shape, every element the sentinel.
    pub fn fresh_contiguous(&self) -> Buf<T, N> {
        Buf::output(&Spec::contiguous(self.spec.shape))
    }

    /// The logical elements' bits, for exact comparison.
    pub fn bits(&self) -> Vec<u64> {
        self.logical().into_iter().map(Elem::bits).collect()
    }
}

/// True when every tensor is small enough to compare element by element.
pub fn comparable(numels: &[usize]) -> bool {
    numels.iter().all(|&n| n <= MAX_COMPARED)
}

/// Every multi-index of `shape`, row-major (the shape must be small).
pub fn indices<const N: usize>(shape: [usize; N]) -> impl Iterator<Item = [usize; N]> {
    // An empty shape has no index, whatever its other dimensions.
    let total: usize = if shape.contains(&0) {
        0
    } else {
        shape.iter().product()
    };
    (0..total).map(move |mut lin| {
        let mut idx = [0; N];
        for i in (0..N).rev() {
            idx[i] = lin % shape[i];
            lin /= shape[i];
        }
        idx
    })
}

/// Replaces one entry of one of several shapes, so that the shapes an op
/// receives disagree now and then: `(which shape, which dimension, value)`.
pub fn perturb() -> impl Strategy<Value = Option<(usize, usize, usize)>> {
    prop_oneof![
        4 => Just(None),
        1 => (0usize..8, 0usize..8, size()).prop_map(Some),
    ]
}

/// Applies [`perturb`]'s change to shape number `me` (a no-op for the others).
pub fn apply<const N: usize>(
    mut shape: [usize; N],
    me: usize,
    p: Option<(usize, usize, usize)>,
) -> [usize; N] {
    if let Some((which, dim, value)) = p {
        if which == me && N > 0 {
            shape[dim % N] = value;
        }
    }
    shape
}

/// An index table entry: mostly small, sometimes past any bound.
pub fn index() -> impl Strategy<Value = usize> {
    prop_oneof![
        10 => 0usize..12,
        1 => prop::sample::select(&EDGES[..]),
    ]
}

/// A list of indices: ascending, or anything (unsorted, repeated, huge).
pub fn index_list(max_len: usize) -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        3 => prop::collection::btree_set(0usize..24, 0..=max_len)
            .prop_map(|s| s.into_iter().collect::<Vec<_>>()),
        1 => prop::collection::vec(index(), 0..=max_len),
    ]
}

/// An argument refused on the host: a shape, index, value or limit error
/// (never a CUDA error, which the CPU paths cannot give).
pub fn refused(e: &foveal::Error) -> bool {
    !matches!(e, foveal::Error::Cuda { .. })
}

/// The proptest configuration of every panic test: 64 cases for two cores
/// (`PROPTEST_CASES` overrides), no persisted failures (the failing cases
/// found are regular tests in the modules).
pub fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(64),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A tensor argument's memory, drawn apart from its shape (which the test
/// derives from the op's sizes): strides, and whether the storage is one
/// element short.
#[derive(Debug, Clone)]
pub struct Arg {
    pub strides: Strides,
    pub short: bool,
}

/// An [`Arg`]: mostly well-formed strides, now and then short storage.
pub fn arg() -> impl Strategy<Value = Arg> {
    (strides(), prop::bool::weighted(0.05)).prop_map(|(strides, short)| Arg { strides, short })
}

impl Arg {
    /// The tensor of `shape` in this memory layout.
    pub fn spec<const N: usize>(&self, shape: [usize; N]) -> Spec<N> {
        Spec {
            shape,
            strides: self.strides.clone(),
            short: self.short,
        }
    }
}

/// Whether a call was accepted: `Ok(false)` when refused on the host, a
/// failed case for a CUDA error (which a CPU path cannot give).
/// With `PANIC_TEST_STATS` set, each outcome is printed (`--nocapture`) to
/// see how many calls get past the checks.
pub fn accepted(r: foveal::Result<()>) -> Result<bool, TestCaseError> {
    if std::env::var_os("PANIC_TEST_STATS").is_some() {
        eprintln!(
            "outcome: {}",
            r.as_ref()
                .map_or_else(|e| format!("refused: {e}"), |_| "accepted".into())
        );
    }
    match r {
        Ok(()) => Ok(true),
        Err(e) if refused(&e) => Ok(false),
        Err(e) => Err(TestCaseError::fail(format!("not a host refusal: {e:?}"))),
    }
}
