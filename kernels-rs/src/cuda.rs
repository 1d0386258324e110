//! Shared pieces of the CUDA paths: device views over cudarc memory, the
//! workspace, device copies of the validated index structures, and the one
//! place where kernels are launched through the FFI.
//!
//! Every op takes the caller's cudarc stream, enqueues its kernels and
//! returns: no host synchronisation. Sizes only the GPU knows (kept counts)
//! stay on the GPU; the `to_host` methods are the caller's explicit readback.

use std::sync::Arc;

pub use cudarc;
use cudarc::driver::{
    sys, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DriverError,
    SyncOnDrop,
};

use crate::compact_kv::KeepPositions;
use crate::error::{ensure, Error, Result};
use crate::layout::Layout;
use crate::rows::RowLayout;
use crate::select_keep::KeepSet;
use crate::shared_memory::SharedMemory;

pub(crate) fn driver_err(op: &'static str) -> impl Fn(DriverError) -> Error {
    move |e| Error::Cuda {
        op,
        msg: e.to_string(),
    }
}

/// A read-only strided tensor in device memory.
#[derive(Debug)]
pub struct DevView<'a, T, const N: usize> {
    data: CudaView<'a, T>,
    layout: Layout<N>,
}

impl<'a, T, const N: usize> DevView<'a, T, N> {
    /// A view of `layout` over `data`: [`Error::Shape`] when the layout
    /// spans more elements than `data` holds.
    pub fn new(data: CudaView<'a, T>, layout: Layout<N>) -> Result<Self> {
        layout.check_fits(data.len(), "device buffer")?;
        Ok(DevView { data, layout })
    }

    /// A view of a whole device buffer.
    pub fn of(data: &'a CudaSlice<T>, layout: Layout<N>) -> Result<Self> {
        Self::new(data.as_view(), layout)
    }

    /// Its layout (shape and strides in elements).
    pub fn layout(&self) -> &Layout<N> {
        &self.layout
    }

    /// Its shape.
    pub fn shape(&self) -> [usize; N] {
        self.layout.shape()
    }

    /// The base pointer, with the guard that orders this read after earlier
    /// writes on other streams (drop it after the launch is enqueued).
    pub(crate) fn ptr<'s>(&'s self, stream: &'s CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'s>) {
        self.data.device_ptr(stream)
    }
}

/// A writable strided tensor in device memory; its layout must not overlap itself.
#[derive(Debug)]
pub struct DevViewMut<'a, T, const N: usize> {
    data: CudaViewMut<'a, T>,
    layout: Layout<N>,
}

impl<'a, T, const N: usize> DevViewMut<'a, T, N> {
    /// A writable view of `layout` over `data`: [`Error::Shape`] when the
    /// layout spans more elements than `data` holds or overlaps itself.
    pub fn new(data: CudaViewMut<'a, T>, layout: Layout<N>) -> Result<Self> {
        layout.check_fits(data.len(), "device buffer")?;
        ensure(layout.is_non_overlapping(), || {
            Error::shape(
                "view",
                "layout",
                format!("an output layout must not overlap itself: {layout:?}"),
            )
        })?;
        Ok(DevViewMut { data, layout })
    }

    /// A writable view of a whole device buffer.
    pub fn of(data: &'a mut CudaSlice<T>, layout: Layout<N>) -> Result<Self> {
        Self::new(data.as_view_mut(), layout)
    }

    /// Its layout (shape and strides in elements).
    pub fn layout(&self) -> &Layout<N> {
        &self.layout
    }

    /// Its shape.
    pub fn shape(&self) -> [usize; N] {
        self.layout.shape()
    }

    /// The base pointer, with the guard that orders this write after earlier
    /// reads and writes on other streams.
    pub(crate) fn ptr_mut<'s>(
        &'s mut self,
        stream: &'s CudaStream,
    ) -> (sys::CUdeviceptr, SyncOnDrop<'s>) {
        self.data.device_ptr_mut(stream)
    }
}

/// Scratch device memory an op may need, owned by the caller so that a whole
/// step can be captured in a CUDA graph: size it once (`reserve`) before
/// capturing, and no op will allocate during the capture.
///
/// Calls on two streams that share a workspace are ordered by cudarc's
/// event tracking (each call waits for the previous user of the memory).
/// With event tracking disabled, give each stream its own workspace: two
/// unordered calls would overwrite each other's scratch (gaze_route_decode's
/// per-unit flags among them: a call could then wait on another's routers).
#[derive(Debug, Default)]
pub struct Workspace {
    buf: Option<CudaSlice<u8>>,
}

/// Alignment of each region carved from a workspace.
const REGION_ALIGN: usize = 256;

impl Workspace {
    /// An empty workspace (it grows on first use, or with [`reserve`](Self::reserve)).
    pub fn new() -> Self {
        Workspace { buf: None }
    }

    /// Its size in bytes.
    pub fn bytes(&self) -> usize {
        self.buf.as_ref().map_or(0, CudaSlice::len)
    }

    /// Grows the workspace to at least `bytes` (stream-ordered allocation).
    pub fn reserve(&mut self, stream: &Arc<CudaStream>, bytes: usize) -> Result<()> {
        if self.bytes() < bytes {
            self.buf = Some(
                stream
                    .alloc_zeros::<u8>(bytes)
                    .map_err(driver_err("workspace"))?,
            );
        }
        Ok(())
    }

    /// Total bytes of the regions `sizes`, each aligned.
    pub(crate) fn size_of(sizes: &[usize]) -> usize {
        sizes
            .iter()
            .map(|s| s.div_ceil(REGION_ALIGN) * REGION_ALIGN)
            .sum::<usize>()
            .max(REGION_ALIGN)
    }

    /// Carves `sizes.len()` aligned regions; returns their device addresses
    /// and the guard of the whole buffer (keep it until the launch is enqueued).
    pub(crate) fn regions<'s, const R: usize>(
        &'s mut self,
        stream: &'s Arc<CudaStream>,
        sizes: [usize; R],
    ) -> Result<([sys::CUdeviceptr; R], SyncOnDrop<'s>)> {
        self.reserve(stream, Self::size_of(&sizes))?;
        let buf = self.buf.as_mut().expect("reserved above");
        let (base, guard) = buf.device_ptr_mut(stream);
        let mut out = [0; R];
        let mut offset = 0;
        for (o, s) in out.iter_mut().zip(sizes) {
            *o = base + offset as u64;
            offset += s.div_ceil(REGION_ALIGN) * REGION_ALIGN;
        }
        Ok((out, guard))
    }
}

/// The kernels put the batch on a grid dimension of at most 65,535 blocks.
pub(crate) fn check_grid_batch(op: &'static str, batch: usize) -> Result<()> {
    ensure(batch <= 65_535, || Error::Unsupported {
        op,
        msg: format!("a batch of {batch} rows exceeds the 65,535 the kernels' grids take"),
    })
}

/// Uploads an index array; an empty one becomes one -1 (the kernels never
/// read it, and a zero-length allocation is not a valid buffer).
pub(crate) fn upload(
    stream: &Arc<CudaStream>,
    op: &'static str,
    v: &[i32],
) -> Result<CudaSlice<i32>> {
    let data: &[i32] = if v.is_empty() { &[-1] } else { v };
    stream.clone_htod(data).map_err(driver_err(op))
}

pub(crate) fn download(
    stream: &Arc<CudaStream>,
    op: &'static str,
    v: &CudaSlice<i32>,
    n: usize,
) -> Result<Vec<i32>> {
    let mut host = stream.clone_dtoh(v).map_err(driver_err(op))?;
    host.truncate(n);
    Ok(host)
}

/// Per-row lengths uploaded to the device (once per batch, before the ops),
/// with the host copy the ops validate against.
#[derive(Debug)]
pub struct DeviceLens {
    host: Vec<usize>,
    pub(crate) dev: CudaSlice<i32>,
}

impl DeviceLens {
    /// Uploads `lens` (each at most `i32::MAX`; at most 65,535 rows).
    pub fn new(stream: &Arc<CudaStream>, lens: &[usize]) -> Result<Self> {
        const OP: &str = "DeviceLens::new";
        check_grid_batch(OP, lens.len())?;
        let packed = lens
            .iter()
            .map(|&n| {
                i32::try_from(n)
                    .map_err(|_| Error::index(OP, "lens", format!("{n} exceeds 32-bit lengths")))
            })
            .collect::<Result<Vec<i32>>>()?;
        Ok(DeviceLens {
            host: lens.to_vec(),
            dev: upload(stream, OP, &packed)?,
        })
    }

    /// The host lengths it was made from.
    pub fn host(&self) -> &[usize] {
        &self.host
    }
}

/// A [`RowLayout`] uploaded to the device (once per batch, before the ops).
#[derive(Debug)]
pub struct DeviceRowLayout {
    host: RowLayout,
    pub(crate) start: CudaSlice<i32>,
    pub(crate) end: CudaSlice<i32>,
    pub(crate) nv: CudaSlice<i32>,
    pub(crate) vis_pos: CudaSlice<i32>,
}

impl DeviceRowLayout {
    /// Uploads `rows` (at most 65,535 rows; [`Error::Unsupported`] past them).
    pub fn new(stream: &Arc<CudaStream>, rows: &RowLayout) -> Result<Self> {
        const OP: &str = "DeviceRowLayout::new";
        check_grid_batch(OP, rows.batch())?;
        let (start, end, nv, vis) = rows.packed();
        Ok(DeviceRowLayout {
            host: rows.clone(),
            start: upload(stream, OP, start)?,
            end: upload(stream, OP, end)?,
            nv: upload(stream, OP, nv)?,
            vis_pos: upload(stream, OP, vis)?,
        })
    }

    /// The host layout it was made from (sizes and bounds for validation).
    pub fn host(&self) -> &RowLayout {
        &self.host
    }
}

/// select_keep's output on the device: kept indices `[B, nv_max]` ascending
/// (padded with -1) and counts `[B]`.
#[derive(Debug)]
pub struct DeviceKeepSet {
    pub(crate) layout_id: u64,
    pub(crate) nv_max: usize,
    pub(crate) batch: usize,
    pub(crate) idx: CudaSlice<i32>,
    pub(crate) count: CudaSlice<i32>,
}

impl DeviceKeepSet {
    /// An empty keep set sized for `rows`, to be filled by select_keep.
    pub fn new(stream: &Arc<CudaStream>, rows: &DeviceRowLayout) -> Result<Self> {
        const OP: &str = "DeviceKeepSet::new";
        let (b, nv_max) = (rows.host.batch(), rows.host.nv_max());
        Ok(DeviceKeepSet {
            layout_id: 0,
            nv_max,
            batch: b,
            idx: upload(stream, OP, &vec![-1; b * nv_max])?,
            count: upload(stream, OP, &vec![0; b])?,
        })
    }

    /// Uploads a host keep set (from select_keep or `KeepSet::from_rows`).
    pub fn from_host(stream: &Arc<CudaStream>, keep: &KeepSet) -> Result<Self> {
        const OP: &str = "DeviceKeepSet::from_host";
        let (idx, count) = keep.packed();
        Ok(DeviceKeepSet {
            layout_id: keep.layout_id,
            nv_max: keep.nv_max,
            batch: keep.batch(),
            idx: upload(stream, OP, idx)?,
            count: upload(stream, OP, count)?,
        })
    }

    /// Test support: fills every index and count with `i32::MIN`, so that a
    /// test sees any element select_keep fails to write (the -1 padding and
    /// the counts included). The set is unfilled again: every consumer
    /// refuses it until select_keep fills it.
    #[doc(hidden)]
    pub fn poison_for_tests(&mut self, stream: &Arc<CudaStream>) -> Result<()> {
        const OP: &str = "DeviceKeepSet::poison_for_tests";
        self.layout_id = 0;
        self.idx = upload(stream, OP, &vec![i32::MIN; self.batch * self.nv_max])?;
        self.count = upload(stream, OP, &vec![i32::MIN; self.batch])?;
        Ok(())
    }

    /// Copies the set to the host (synchronises with the stream).
    pub fn to_host(&self, stream: &Arc<CudaStream>) -> Result<KeepSet> {
        const OP: &str = "DeviceKeepSet::to_host";
        Ok(KeepSet {
            layout_id: self.layout_id,
            nv_max: self.nv_max,
            idx: download(stream, OP, &self.idx, self.batch * self.nv_max)?,
            count: download(stream, OP, &self.count, self.batch)?,
        })
    }

    pub(crate) fn check_from(&self, op: &'static str, rows: &DeviceRowLayout) -> Result<()> {
        ensure(self.layout_id == rows.host.id(), || {
            Error::value(
                op,
                "keep",
                "this keep set was not computed by select_keep from the same row layout",
            )
        })
    }
}

/// [`KeepPositions`] on the device. Its `max_len`, the bound destination
/// capacities are checked against, is the width until
/// [`fetch_max_len`](Self::fetch_max_len) reads the lengths back.
#[derive(Debug)]
pub struct DeviceKeepPositions {
    pub(crate) src_seq: usize,
    pub(crate) width: usize,
    pub(crate) max_len: usize,
    pub(crate) batch: usize,
    pub(crate) positions: CudaSlice<i32>,
    pub(crate) lengths: CudaSlice<i32>,
}

impl DeviceKeepPositions {
    /// Uploads validated host positions.
    pub fn from_host(stream: &Arc<CudaStream>, keep: &KeepPositions) -> Result<Self> {
        const OP: &str = "DeviceKeepPositions::from_host";
        check_grid_batch(OP, keep.batch())?;
        let (positions, lengths) = keep.packed();
        Ok(DeviceKeepPositions {
            src_seq: keep.src_seq(),
            width: keep.width(),
            max_len: keep.max_len(),
            batch: keep.batch(),
            positions: upload(stream, OP, positions)?,
            lengths: upload(stream, OP, lengths)?,
        })
    }

    /// An empty list sized for compacting `rows` (see `keep_positions`).
    pub fn for_rows(
        stream: &Arc<CudaStream>,
        rows: &DeviceRowLayout,
        drop_last: bool,
    ) -> Result<Self> {
        Self::from_host(stream, &KeepPositions::for_rows(&rows.host, drop_last))
    }

    /// The padded width of the positions: no row can be longer.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The bound on every row's compacted length.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Reads the lengths back (synchronising with the stream: the caller's
    /// explicit choice) and tightens `max_len` to the longest, so that the
    /// destination caches can be sized to the new maximum length.
    pub fn fetch_max_len(&mut self, stream: &Arc<CudaStream>) -> Result<usize> {
        let lengths = download(
            stream,
            "DeviceKeepPositions::fetch_max_len",
            &self.lengths,
            self.batch,
        )?;
        self.max_len = lengths
            .iter()
            .map(|&n| n.max(0) as usize)
            .max()
            .unwrap_or(0);
        Ok(self.max_len)
    }

    /// Copies the positions to the host (synchronises with the stream).
    pub fn to_host(&self, stream: &Arc<CudaStream>) -> Result<KeepPositions> {
        const OP: &str = "DeviceKeepPositions::to_host";
        let lengths = download(stream, OP, &self.lengths, self.batch)?;
        Ok(KeepPositions {
            src_seq: self.src_seq,
            width: self.width,
            max_len: lengths
                .iter()
                .map(|&n| n.max(0) as usize)
                .max()
                .unwrap_or(0),
            positions: download(stream, OP, &self.positions, self.batch * self.width)?,
            lengths,
        })
    }
}

/// The number of multiprocessors of the stream's device.
pub(crate) fn sm_count(stream: &CudaStream, op: &'static str) -> Result<usize> {
    let n = stream
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(driver_err(op))?;
    Ok(n.max(1) as usize)
}

/// The stream as the C launchers take it, with the stream's context made
/// current for the CUDA runtime, which the launchers use.
pub(crate) fn ffi_stream(
    stream: &CudaStream,
    op: &'static str,
) -> Result<foveal_sys::foveal_stream_t> {
    stream.context().bind_to_thread().map_err(driver_err(op))?;
    Ok(stream.cu_stream() as foveal_sys::foveal_stream_t)
}

/// Turns a launcher's status into a Result.
pub(crate) fn check_status(op: &'static str, status: i32) -> Result<()> {
    if status == 0 {
        return Ok(());
    }
    // SAFETY: foveal_status_string returns a static NUL-terminated string for any code.
    let msg = unsafe { std::ffi::CStr::from_ptr(foveal_sys::foveal_status_string(status)) };
    let msg = msg.to_string_lossy().into_owned();
    if status == foveal_sys::FOVEAL_ERR_UNSUPPORTED
        || status == foveal_sys::FOVEAL_ERR_SHARED_MEMORY
    {
        Err(Error::Unsupported { op, msg })
    } else {
        Err(Error::Cuda {
            op,
            msg: format!("{msg} (code {status})"),
        })
    }
}

/// Checks that a device address is aligned to `bytes`.
pub(crate) fn check_aligned(
    op: &'static str,
    arg: &'static str,
    ptr: sys::CUdeviceptr,
    bytes: u64,
) -> Result<()> {
    ensure(ptr % bytes == 0, || Error::Unsupported {
        op,
        msg: format!("`{arg}` must start on a {bytes}-byte boundary (address {ptr:#x})"),
    })
}

/// Checks that a head dim suits the kernels' 16-byte vector loads: a
/// multiple of `multiple` elements (the vector's, or more where a kernel also
/// reads 4 floats at a time) and at most `max`.
pub(crate) fn check_head_dim(
    op: &'static str,
    head_dim: usize,
    multiple: usize,
    max: usize,
) -> Result<()> {
    ensure(head_dim % multiple == 0 && head_dim <= max, || {
        Error::Unsupported {
            op,
            msg: format!("head dim {head_dim} must be a multiple of {multiple} and at most {max}"),
        }
    })
}

/// Checks that a view's rows can be read with 16-byte loads: every stride
/// but the last (contiguous) dim's is a multiple of `unit` elements (16
/// bytes), for the dims of more than one element (a stride a dim of one
/// never steps over may be anything). The base's alignment is checked with
/// the pointer ([`check_aligned`]).
pub(crate) fn check_row_strides<T, const N: usize>(
    op: &'static str,
    arg: &'static str,
    view: &DevView<'_, T, N>,
    unit: usize,
) -> Result<()> {
    let (shape, strides) = (view.shape(), view.layout().strides());
    let misaligned = (0..N - 1).any(|i| shape[i] > 1 && strides[i] % unit != 0);
    ensure(!misaligned, || Error::Unsupported {
        op,
        msg: format!("the strides of `{arg}` must be multiples of {unit} elements (16 bytes)"),
    })
}

/// The shared memory a launch needs, as a launcher's query reports it
/// (`query` fills the FFI struct and returns its status): the static part
/// of the compiled kernel, the dynamic part and the current device's opt-in
/// limit. Make the stream's context current first ([`ffi_stream`]).
pub(crate) fn shared_memory(
    op: &'static str,
    query: impl FnOnce(&mut foveal_sys::foveal_shared_memory) -> i32,
) -> Result<SharedMemory> {
    let mut out = foveal_sys::foveal_shared_memory::default();
    check_status(op, query(&mut out))?;
    Ok(SharedMemory {
        static_bytes: out.static_bytes,
        dynamic_bytes: out.dynamic_bytes,
        limit: out.limit_bytes,
    })
}
