//! Strided tensor layouts and the CPU views built on them.
//!
//! A tensor argument is a base (a slice), a shape and strides in elements, with
//! the last dimension contiguous (SPEC "Conventions"). Logical dimension order
//! is fixed per argument; memory order is free. A KV cache is always the
//! logical view `[B, S, H, D]`: the flash/vLLM layout `[B, S, H, D]` and the
//! candle/HF layout `[B, H, S, D]` are the same view with other strides
//! ([`Layout::bshd`], [`Layout::bhsd`]), so both are read without a copy.

use crate::error::{ensure, Error, Result};

/// Shape and strides (in elements) of an `N`-dimensional strided tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout<const N: usize> {
    shape: [usize; N],
    strides: [usize; N],
}

impl<const N: usize> Layout<N> {
    /// Row-major contiguous layout of `shape`.
    ///
    /// Never panics: when the element count of a trailing part of `shape`
    /// overflows `usize`, the strides saturate at `usize::MAX`, the layout's
    /// [`span`](Self::span) is `usize::MAX`, and every view over it is
    /// refused ([`Error::Shape`]).
    pub fn contiguous(shape: [usize; N]) -> Self {
        let mut strides = [0; N];
        let mut s = 1usize;
        for i in (0..N).rev() {
            strides[i] = s;
            s = s.saturating_mul(shape[i]);
        }
        Layout { shape, strides }
    }

    /// A layout with explicit strides (in elements). The last dimension must
    /// be contiguous (stride 1) unless it has at most one element.
    ///
    /// # Errors
    /// [`Error::Shape`] when the last dimension is not contiguous, or when
    /// the largest offset overflows `usize`.
    pub fn strided(shape: [usize; N], strides: [usize; N]) -> Result<Self> {
        let layout = Layout { shape, strides };
        ensure(N == 0 || shape[N - 1] <= 1 || strides[N - 1] == 1, || {
            Error::shape(
                "layout",
                "strides",
                format!("the last dimension must be contiguous, got strides {strides:?}"),
            )
        })?;
        layout.checked_span().ok_or_else(|| {
            Error::shape(
                "layout",
                "shape",
                format!("shape {shape:?} with strides {strides:?} overflows usize"),
            )
        })?;
        Ok(layout)
    }

    /// The shape, in the argument's logical dimension order.
    pub fn shape(&self) -> [usize; N] {
        self.shape
    }

    /// The strides, in elements.
    pub fn strides(&self) -> [usize; N] {
        self.strides
    }

    /// The size of dimension `i`. Panics when `i >= N`.
    pub fn dim(&self, i: usize) -> usize {
        self.shape[i]
    }

    /// The stride of dimension `i`, in elements. Panics when `i >= N`.
    pub fn stride(&self, i: usize) -> usize {
        self.strides[i]
    }

    /// The number of elements, saturating at `usize::MAX` (0 when any
    /// dimension is 0).
    pub fn numel(&self) -> usize {
        if self.shape.contains(&0) {
            return 0;
        }
        self.shape.iter().fold(1usize, |n, &d| n.saturating_mul(d))
    }

    /// Elements the storage must hold from the base: one past the largest
    /// offset (0 for an empty tensor), or `usize::MAX` when that overflows
    /// `usize` (no storage holds it, so no view over it is made).
    pub fn span(&self) -> usize {
        self.checked_span().unwrap_or(usize::MAX)
    }

    /// [`Error::Shape`] unless the layout fits a storage of `len` elements.
    pub(crate) fn check_fits(&self, len: usize, storage: &str) -> Result<()> {
        match self.checked_span() {
            Some(span) if span <= len => Ok(()),
            Some(span) => Err(Error::shape(
                "view",
                "data",
                format!("layout spans {span} elements, {storage} has {len}"),
            )),
            None => Err(Error::shape(
                "view",
                "layout",
                format!(
                    "shape {:?} with strides {:?} overflows usize",
                    self.shape, self.strides
                ),
            )),
        }
    }

    fn checked_span(&self) -> Option<usize> {
        if self.shape.contains(&0) {
            return Some(0);
        }
        let mut last = 0usize;
        for i in 0..N {
            last = last.checked_add((self.shape[i] - 1).checked_mul(self.strides[i])?)?;
        }
        last.checked_add(1)
    }

    /// Offset of a multi-index, in elements from the base. `idx` must lie
    /// inside the shape (checked in debug builds only).
    #[inline]
    pub fn offset(&self, idx: [usize; N]) -> usize {
        debug_assert!(idx.iter().zip(&self.shape).all(|(i, n)| i < n));
        idx.iter().zip(&self.strides).map(|(i, s)| i * s).sum()
    }

    /// True when no two multi-indices share an element, so the tensor may be
    /// written in parallel. Checked as: sorted by stride, each stride reaches
    /// past the whole extent of the smaller ones (a sufficient condition;
    /// false when an extent overflows `usize`).
    pub fn is_non_overlapping(&self) -> bool {
        if self.numel() == 0 {
            return true;
        }
        let mut dims: Vec<(usize, usize)> = (0..N)
            .filter(|&i| self.shape[i] > 1)
            .map(|i| (self.strides[i], self.shape[i]))
            .collect();
        dims.sort_unstable();
        let mut extent = 1usize;
        for (stride, size) in dims {
            if stride < extent {
                return false;
            }
            match stride
                .checked_mul(size - 1)
                .and_then(|e| e.checked_add(extent))
            {
                Some(e) => extent = e,
                None => return false,
            }
        }
        true
    }
}

impl Layout<4> {
    /// KV cache stored `[B, S, H, D]` (flash/vLLM style), viewed as `[B, S, H, D]`.
    pub fn bshd(b: usize, s: usize, h: usize, d: usize) -> Self {
        Layout::contiguous([b, s, h, d])
    }

    /// KV cache stored `[B, H, S, D]` (candle/HF style), viewed as `[B, S, H, D]`.
    /// Like [`contiguous`](Layout::contiguous), strides saturate instead of
    /// overflowing.
    pub fn bhsd(b: usize, s: usize, h: usize, d: usize) -> Self {
        let sd = s.saturating_mul(d);
        Layout {
            shape: [b, s, h, d],
            strides: [h.saturating_mul(sd), d, sd, 1],
        }
    }
}

impl Layout<3> {
    /// `[B, S, W]` seen as `[B, S, 1, W]`, for the row gathers.
    pub(crate) fn with_unit_heads(&self) -> Layout<4> {
        let [b, s, w] = self.shape;
        let [sb, ss, sw] = self.strides;
        Layout {
            shape: [b, s, 1, w],
            strides: [sb, ss, w.max(1), sw],
        }
    }
}

/// A read-only strided tensor on the host.
#[derive(Debug, Clone, Copy)]
pub struct View<'a, T, const N: usize> {
    data: &'a [T],
    layout: Layout<N>,
}

impl<'a, T: Copy, const N: usize> View<'a, T, N> {
    /// A view of `layout` over `data`.
    ///
    /// # Errors
    /// [`Error::Shape`] when the layout spans more elements than `data` holds.
    pub fn new(data: &'a [T], layout: Layout<N>) -> Result<Self> {
        layout.check_fits(data.len(), "storage")?;
        Ok(View { data, layout })
    }

    /// A contiguous view of `shape` over `data` ([`Error::Shape`] when
    /// `data` is too short).
    pub fn contiguous(data: &'a [T], shape: [usize; N]) -> Result<Self> {
        Self::new(data, Layout::contiguous(shape))
    }

    /// Its layout (shape and strides in elements).
    pub fn layout(&self) -> &Layout<N> {
        &self.layout
    }

    /// Its shape.
    pub fn shape(&self) -> [usize; N] {
        self.layout.shape
    }

    /// The storage the layout indexes, from the base.
    pub fn data(&self) -> &'a [T] {
        self.data
    }

    /// The element at `idx`, which must lie inside the shape (panics, like
    /// slice indexing, when it does not).
    #[inline]
    pub fn at(&self, idx: [usize; N]) -> T {
        self.data[self.layout.offset(idx)]
    }

    /// The contiguous last-dimension row at the leading indices `idx[..N-1]`
    /// (the last entry of `idx` is ignored). Panics like [`at`](Self::at);
    /// empty when the last dimension is (an empty tensor holds no storage).
    #[inline]
    pub fn row(&self, idx: [usize; N]) -> &'a [T] {
        if self.layout.shape[N - 1] == 0 {
            return &[];
        }
        let mut i = idx;
        i[N - 1] = 0;
        let o = self.layout.offset(i);
        &self.data[o..o + self.layout.shape[N - 1]]
    }
}

/// A writable strided tensor on the host. Its layout must not overlap itself.
#[derive(Debug)]
pub struct ViewMut<'a, T, const N: usize> {
    data: &'a mut [T],
    layout: Layout<N>,
}

impl<'a, T: Copy, const N: usize> ViewMut<'a, T, N> {
    /// A writable view of `layout` over `data`.
    ///
    /// # Errors
    /// [`Error::Shape`] when the layout spans more elements than `data` holds
    /// or overlaps itself (two indices sharing an element).
    pub fn new(data: &'a mut [T], layout: Layout<N>) -> Result<Self> {
        layout.check_fits(data.len(), "storage")?;
        ensure(layout.is_non_overlapping(), || {
            Error::shape(
                "view",
                "layout",
                format!("an output layout must not overlap itself: {layout:?}"),
            )
        })?;
        Ok(ViewMut { data, layout })
    }

    /// A contiguous writable view of `shape` over `data` ([`Error::Shape`]
    /// when `data` is too short).
    pub fn contiguous(data: &'a mut [T], shape: [usize; N]) -> Result<Self> {
        Self::new(data, Layout::contiguous(shape))
    }

    /// Its layout (shape and strides in elements).
    pub fn layout(&self) -> &Layout<N> {
        &self.layout
    }

    /// Its shape.
    pub fn shape(&self) -> [usize; N] {
        self.layout.shape
    }

    /// The element at `idx`, which must lie inside the shape (panics, like
    /// slice indexing, when it does not).
    #[inline]
    pub fn at(&self, idx: [usize; N]) -> T {
        self.data[self.layout.offset(idx)]
    }

    /// Writes the element at `idx`, which must lie inside the shape (panics,
    /// like slice indexing, when it does not).
    #[inline]
    pub fn set(&mut self, idx: [usize; N], v: T) {
        let o = self.layout.offset(idx);
        self.data[o] = v;
    }

    /// The writable last-dimension row at the leading indices of `idx`.
    /// Panics like [`at`](Self::at); empty when the last dimension is.
    #[inline]
    pub fn row_mut(&mut self, idx: [usize; N]) -> &mut [T] {
        if self.layout.shape[N - 1] == 0 {
            return &mut [];
        }
        let mut i = idx;
        i[N - 1] = 0;
        let o = self.layout.offset(i);
        let n = self.layout.shape[N - 1];
        &mut self.data[o..o + n]
    }
}

impl<T: Copy> ViewMut<'_, T, 3> {
    /// `[B, S, W]` seen as `[B, S, 1, W]`, for the row gathers.
    pub(crate) fn as_unit_heads(&mut self) -> ViewMut<'_, T, 4> {
        ViewMut {
            data: &mut *self.data,
            layout: self.layout.with_unit_heads(),
        }
    }
}
