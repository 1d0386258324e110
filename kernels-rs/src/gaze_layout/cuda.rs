//! [`GazeLayout`] and [`Routes`] on the device.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};

use super::{GazeLayout, Routes};
use crate::cuda::{check_grid_batch, download, upload};
use crate::error::{ensure, Error, Result};

/// A [`GazeLayout`] uploaded to the device (once per layout; decoding
/// refreshes the visible ranges with [`refresh_visible`](Self::refresh_visible)).
#[derive(Debug)]
pub struct DeviceGazeLayout {
    host: GazeLayout,
    pub(crate) region_count: CudaSlice<i32>,
    pub(crate) region_len: CudaSlice<i32>,
    pub(crate) region_pos: CudaSlice<i32>,
    pub(crate) visible_count: CudaSlice<i32>,
    pub(crate) visible: CudaSlice<i32>,
}

impl DeviceGazeLayout {
    /// Uploads `layout` (at most 65,535 rows; `Error::Unsupported` past them).
    pub fn new(stream: &Arc<CudaStream>, layout: &GazeLayout) -> Result<Self> {
        const OP: &str = "DeviceGazeLayout::new";
        check_grid_batch(OP, layout.batch())?;
        let (count, len, pos) = layout.packed_regions();
        let (vcount, visible) = layout.packed_visible();
        Ok(DeviceGazeLayout {
            host: layout.clone(),
            region_count: upload(stream, OP, count)?,
            region_len: upload(stream, OP, len)?,
            region_pos: upload(stream, OP, pos)?,
            visible_count: upload(stream, OP, vcount)?,
            visible: upload(stream, OP, visible)?,
        })
    }

    /// Takes `layout`'s visible ranges, after [`GazeLayout::extend_visible`]
    /// on the layout this was made from (same identity).
    pub fn refresh_visible(&mut self, stream: &Arc<CudaStream>, layout: &GazeLayout) -> Result<()> {
        const OP: &str = "DeviceGazeLayout::refresh_visible";
        ensure(layout.id() == self.host.id(), || {
            Error::value(
                OP,
                "layout",
                "not the layout this device copy was made from",
            )
        })?;
        let (vcount, visible) = layout.packed_visible();
        self.visible_count = upload(stream, OP, vcount)?;
        self.visible = upload(stream, OP, visible)?;
        self.host = layout.clone();
        Ok(())
    }

    /// The host layout it was made from (sizes and bounds for validation).
    pub fn host(&self) -> &GazeLayout {
        &self.host
    }
}

/// [`Routes`] on the device: `[B, Nq, Hq, k]` region ids, strictly ascending
/// per list, padded with -1.
#[derive(Debug)]
pub struct DeviceRoutes {
    pub(crate) layout_id: u64,
    pub(crate) shape: [usize; 4],
    pub(crate) ids: CudaSlice<i32>,
}

impl DeviceRoutes {
    /// Routes `[B, queries, heads, k]` for `layout`, all -1, to be filled by
    /// route_topk.
    pub fn new(
        stream: &Arc<CudaStream>,
        layout: &DeviceGazeLayout,
        queries: usize,
        heads: usize,
        k: usize,
    ) -> Result<Self> {
        Self::from_host(stream, &Routes::new(&layout.host, queries, heads, k))
    }

    /// Uploads host routes (from route_topk or [`Routes::from_ids`]).
    pub fn from_host(stream: &Arc<CudaStream>, routes: &Routes) -> Result<Self> {
        const OP: &str = "DeviceRoutes::from_host";
        Ok(DeviceRoutes {
            layout_id: routes.layout_id,
            shape: routes.shape,
            ids: upload(stream, OP, &routes.ids)?,
        })
    }

    /// Test support: fills every id with `i32::MIN`, so that a test sees any
    /// element route_topk fails to write (the -1 padding included). The
    /// routes are unfilled again: every consumer refuses them until
    /// route_topk (or gaze_route_decode) fills them.
    #[doc(hidden)]
    pub fn poison_for_tests(&mut self, stream: &Arc<CudaStream>) -> Result<()> {
        self.layout_id = 0;
        let n = self.shape.iter().product::<usize>();
        self.ids = upload(stream, "DeviceRoutes::poison_for_tests", &vec![i32::MIN; n])?;
        Ok(())
    }

    /// Copies the routes to the host (synchronises with the stream).
    pub fn to_host(&self, stream: &Arc<CudaStream>) -> Result<Routes> {
        const OP: &str = "DeviceRoutes::to_host";
        let n = self.shape.iter().product();
        Ok(Routes {
            layout_id: self.layout_id,
            shape: self.shape,
            ids: download(stream, OP, &self.ids, n)?,
        })
    }

    /// `[B, Nq, Hq, k]`.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }

    pub(crate) fn check_from(&self, op: &'static str, layout: &DeviceGazeLayout) -> Result<()> {
        ensure(self.layout_id == layout.host.id(), || {
            Error::value(op, "routes", "these routes were not computed by route_topk (or checked by Routes::from_ids) for the same layout")
        })
    }
}
