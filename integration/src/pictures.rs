//! Pictures of what a method kept or attended: a row's image drawn once
//! per [`Panel`](crate::method::Panel) of its [`TokenMaps`], side by side, each visual token's
//! patch at the image's brightness times `DIM + (1 - DIM) * weight` (kept
//! or most-attended patches as they are, dropped ones dimmed) and the
//! panel's rectangles outlined. docs/architecture.md, "Pictures", says
//! what each method's panels show.

use std::path::Path;

use candle_core::{DType, Result, Tensor};
use image::{Rgb, RgbImage};

use crate::images::{CLIP_MEAN, CLIP_STD};
use crate::method::TokenMaps;

/// The brightness of a patch of weight 0.
pub const DIM: f32 = 0.25;
/// The outline colour.
pub const OUTLINE: Rgb<u8> = Rgb([255, 200, 0]);
/// Pixels between panels (black).
const GAP: u32 = 4;
/// Panels are drawn at least this many pixels wide (the image scaled up by
/// a whole factor, nearest neighbour).
const MIN_SIDE: u32 = 256;

/// Image `b` of CLIP-normalised pixels `[B, 3, H, W]` as 8-bit RGB.
pub fn image_of(pixels: &Tensor, b: usize) -> Result<RgbImage> {
    let img = pixels.get(b)?.to_dtype(DType::F32)?;
    let (c, h, w) = img.dims3()?;
    if c != 3 {
        candle_core::bail!("pictures: {c} channels, expected 3");
    }
    let data = img.flatten_all()?.to_vec1::<f32>()?;
    Ok(RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let at = |ch: usize| {
            let v = data[(ch * h + y as usize) * w + x as usize] * CLIP_STD[ch] + CLIP_MEAN[ch];
            (v.clamp(0.0, 1.0) * 255.0).round() as u8
        };
        Rgb([at(0), at(1), at(2)])
    }))
}

/// `image` drawn once per panel of `maps`, left to right.
pub fn render(image: &RgbImage, maps: &TokenMaps) -> Result<RgbImage> {
    let (rows, cols) = maps.grid;
    let (w, h) = image.dimensions();
    if rows == 0 || cols == 0 || maps.panels.is_empty() {
        candle_core::bail!("pictures: an empty grid {rows} x {cols} or no panel");
    }
    if let Some(p) = maps.panels.iter().find(|p| p.weight.len() != rows * cols) {
        candle_core::bail!(
            "pictures: panel {:?} has {} weights for a {rows} x {cols} grid",
            p.title,
            p.weight.len()
        );
    }
    let scale = MIN_SIDE.div_ceil(w.max(h)).max(1);
    let (pw, ph) = (w * scale, h * scale);
    let n = maps.panels.len() as u32;
    let mut out = RgbImage::new(n * pw + (n - 1) * GAP, ph);
    // The grid cell of a panel pixel.
    let cell = |px: u32, py: u32| {
        (
            (py as usize * rows / ph as usize).min(rows - 1),
            (px as usize * cols / pw as usize).min(cols - 1),
        )
    };
    for (i, panel) in maps.panels.iter().enumerate() {
        let x0 = i as u32 * (pw + GAP);
        for py in 0..ph {
            for px in 0..pw {
                let (cy, cx) = cell(px, py);
                let f = DIM + (1.0 - DIM) * panel.weight[cy * cols + cx].clamp(0.0, 1.0);
                let p = image.get_pixel(px / scale, py / scale);
                out.put_pixel(x0 + px, py, Rgb(p.0.map(|c| (c as f32 * f).round() as u8)));
            }
        }
        for &[y0, xa, y1, xb] in &panel.boxes {
            if y0 >= y1 || xa >= xb || y1 > rows || xb > cols {
                continue;
            }
            // The box's pixel edges: a cell's first pixel row/column.
            let edge_y = |c: usize| ((c * ph as usize).div_ceil(rows) as u32).min(ph - 1);
            let edge_x = |c: usize| ((c * pw as usize).div_ceil(cols) as u32).min(pw - 1);
            let (top, bottom) = (edge_y(y0), edge_y(y1).saturating_sub(u32::from(y1 < rows)));
            let (left, right) = (edge_x(xa), edge_x(xb).saturating_sub(u32::from(xb < cols)));
            for x in left..=right {
                out.put_pixel(x0 + x, top, OUTLINE);
                out.put_pixel(x0 + x, bottom, OUTLINE);
            }
            for y in top..=bottom {
                out.put_pixel(x0 + left, y, OUTLINE);
                out.put_pixel(x0 + right, y, OUTLINE);
            }
        }
    }
    Ok(out)
}

/// [`render`] of image `b` of `pixels` written to `path` as PNG.
pub fn write(pixels: &Tensor, b: usize, maps: &TokenMaps, path: &Path) -> Result<()> {
    render(&image_of(pixels, b)?, maps)?
        .save(path)
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))
}
