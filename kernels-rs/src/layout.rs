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
    pub fn contiguous(shape: [usize; N]) -> Self {
        let mut strides = [0; N];
        let mut s = 1;
        for i in (0..N).rev() {
            strides[i] = s;
            s *= shape[i];
        }
        Layout { shape, strides }
    }

    /// A layout with explicit strides. The last dimension must be contiguous
    /// (stride 1) unless it has at most one element.
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

    pub fn shape(&self) -> [usize; N] {
        self.shape
    }

    pub fn strides(&self) -> [usize; N] {
        self.strides
    }

    pub fn dim(&self, i: usize) -> usize {
        self.shape[i]
    }

    pub fn stride(&self, i: usize) -> usize {
        self.strides[i]
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Elements the storage must hold from the base: one past the largest offset.
    pub fn span(&self) -> usize {
        self.checked_span().expect("validated at construction")
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

    /// Offset of a multi-index, in elements from the base.
    #[inline]
    pub fn offset(&self, idx: [usize; N]) -> usize {
        debug_assert!(idx.iter().zip(&self.shape).all(|(i, n)| i < n));
        idx.iter().zip(&self.strides).map(|(i, s)| i * s).sum()
    }

    /// True when no two multi-indices share an element, so the tensor may be
    /// written in parallel. Checked as: sorted by stride, each stride reaches
    /// past the whole extent of the smaller ones.
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
            extent += stride * (size - 1);
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
    pub fn bhsd(b: usize, s: usize, h: usize, d: usize) -> Self {
        Layout {
            shape: [b, s, h, d],
            strides: [h * s * d, d, s * d, 1],
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
    pub fn new(data: &'a [T], layout: Layout<N>) -> Result<Self> {
        ensure(layout.span() <= data.len(), || {
            Error::shape(
                "view",
                "data",
                format!(
                    "layout spans {} elements, storage has {}",
                    layout.span(),
                    data.len()
                ),
            )
        })?;
        Ok(View { data, layout })
    }

    /// A contiguous view of `shape` over `data`.
    pub fn contiguous(data: &'a [T], shape: [usize; N]) -> Result<Self> {
        Self::new(data, Layout::contiguous(shape))
    }

    pub fn layout(&self) -> &Layout<N> {
        &self.layout
    }

    pub fn shape(&self) -> [usize; N] {
        self.layout.shape
    }

    pub fn data(&self) -> &'a [T] {
        self.data
    }

    #[inline]
    pub fn at(&self, idx: [usize; N]) -> T {
        self.data[self.layout.offset(idx)]
    }

    /// The contiguous last-dimension row at the leading indices `idx[..N-1]`
    /// (the last entry of `idx` is ignored).
    #[inline]
    pub fn row(&self, idx: [usize; N]) -> &'a [T] {
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
    pub fn new(data: &'a mut [T], layout: Layout<N>) -> Result<Self> {
        ensure(layout.span() <= data.len(), || {
            Error::shape(
                "view",
                "data",
                format!(
                    "layout spans {} elements, storage has {}",
                    layout.span(),
                    data.len()
                ),
            )
        })?;
        ensure(layout.is_non_overlapping(), || {
            Error::shape(
                "view",
                "layout",
                format!("an output layout must not overlap itself: {layout:?}"),
            )
        })?;
        Ok(ViewMut { data, layout })
    }

    pub fn contiguous(data: &'a mut [T], shape: [usize; N]) -> Result<Self> {
        Self::new(data, Layout::contiguous(shape))
    }

    pub fn layout(&self) -> &Layout<N> {
        &self.layout
    }

    pub fn shape(&self) -> [usize; N] {
        self.layout.shape
    }

    #[inline]
    pub fn at(&self, idx: [usize; N]) -> T {
        self.data[self.layout.offset(idx)]
    }

    #[inline]
    pub fn set(&mut self, idx: [usize; N], v: T) {
        let o = self.layout.offset(idx);
        self.data[o] = v;
    }

    /// The writable last-dimension row at the leading indices of `idx`.
    #[inline]
    pub fn row_mut(&mut self, idx: [usize; N]) -> &mut [T] {
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
