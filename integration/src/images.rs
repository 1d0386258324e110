//! Images as tensors `[B, 3, H, W]` (f32, CLIP-normalised): a seeded
//! generator of simple synthetic scenes (a gradient background and a few
//! flat-coloured rectangles and discs), and loading from a PNG or JPEG file.
//!
//! The generator also says which patches its shapes cover
//! ([`Scene::patch_mask`]), the regions a visual-token reduction should keep.

use std::path::Path;

use candle_core::{Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// CLIP's per-channel normalisation (as the LLaVA image processor).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// A flat-coloured shape, in pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Shape2D {
    /// Axis-aligned rectangle: x0..x1, y0..y1.
    Rect {
        x0: f32,
        y0: f32,
        x1: f32,
        y1: f32,
        rgb: [f32; 3],
    },
    Disc {
        cx: f32,
        cy: f32,
        r: f32,
        rgb: [f32; 3],
    },
}

impl Shape2D {
    /// Whether the pixel centre `(x + 0.5, y + 0.5)` lies inside.
    pub fn contains(&self, x: usize, y: usize) -> bool {
        let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
        match *self {
            Shape2D::Rect { x0, y0, x1, y1, .. } => px >= x0 && px < x1 && py >= y0 && py < y1,
            Shape2D::Disc { cx, cy, r, .. } => (px - cx).powi(2) + (py - cy).powi(2) < r * r,
        }
    }

    pub fn rgb(&self) -> [f32; 3] {
        match *self {
            Shape2D::Rect { rgb, .. } | Shape2D::Disc { rgb, .. } => rgb,
        }
    }
}

/// One synthetic image: a linear gradient between two colours, shapes on top
/// (later ones over earlier ones).
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    pub size: usize,
    /// Gradient colours at the start and end, and its direction (unit vector).
    pub background: ([f32; 3], [f32; 3], [f32; 2]),
    pub shapes: Vec<Shape2D>,
}

impl Scene {
    /// A random scene of `size x size` pixels with 1 to 3 shapes.
    pub fn random(rng: &mut StdRng, size: usize) -> Scene {
        let s = size as f32;
        let colour = |rng: &mut StdRng| {
            [
                rng.random::<f32>(),
                rng.random::<f32>(),
                rng.random::<f32>(),
            ]
        };
        let angle = rng.random::<f32>() * std::f32::consts::TAU;
        let background = (
            colour(rng).map(|c| 0.2 + 0.3 * c),
            colour(rng).map(|c| 0.2 + 0.3 * c),
            [angle.cos(), angle.sin()],
        );
        let n = rng.random_range(1..=3);
        let shapes = (0..n)
            .map(|_| {
                let rgb = colour(rng);
                if rng.random_bool(0.5) {
                    let (w, h) = (
                        s * rng.random_range(0.15..0.45),
                        s * rng.random_range(0.15..0.45),
                    );
                    let (x0, y0) = (rng.random::<f32>() * (s - w), rng.random::<f32>() * (s - h));
                    Shape2D::Rect {
                        x0,
                        y0,
                        x1: x0 + w,
                        y1: y0 + h,
                        rgb,
                    }
                } else {
                    let r = s * rng.random_range(0.08..0.22);
                    let (cx, cy) = (
                        r + rng.random::<f32>() * (s - 2.0 * r),
                        r + rng.random::<f32>() * (s - 2.0 * r),
                    );
                    Shape2D::Disc { cx, cy, r, rgb }
                }
            })
            .collect();
        Scene {
            size,
            background,
            shapes,
        }
    }

    /// RGB in [0, 1], channel-major `[3, size, size]`.
    pub fn render(&self) -> Vec<f32> {
        let n = self.size;
        let (c0, c1, [dx, dy]) = self.background;
        let mut out = vec![0f32; 3 * n * n];
        for y in 0..n {
            for x in 0..n {
                // Gradient parameter in [0, 1] along (dx, dy) across the image.
                let u = ((x as f32 / n as f32 - 0.5) * dx + (y as f32 / n as f32 - 0.5) * dy)
                    / std::f32::consts::SQRT_2
                    + 0.5;
                let mut rgb = [0f32; 3];
                for c in 0..3 {
                    rgb[c] = c0[c] + (c1[c] - c0[c]) * u.clamp(0.0, 1.0);
                }
                if let Some(s) = self.shapes.iter().rev().find(|s| s.contains(x, y)) {
                    rgb = s.rgb();
                }
                for (c, v) in rgb.iter().enumerate() {
                    out[(c * n + y) * n + x] = *v;
                }
            }
        }
        out
    }

    /// Per patch (row-major, `(size / patch)^2`), whether a shape covers any
    /// of its pixels.
    pub fn patch_mask(&self, patch: usize) -> Vec<bool> {
        let side = self.size / patch;
        let mut m = vec![false; side * side];
        for y in 0..side * patch {
            for x in 0..side * patch {
                if self.shapes.iter().any(|s| s.contains(x, y)) {
                    m[(y / patch) * side + x / patch] = true;
                }
            }
        }
        m
    }
}

/// `count` seeded scenes and their pixels `[count, 3, size, size]` (f32, CLIP-normalised).
pub fn synthetic_images(
    count: usize,
    size: usize,
    seed: u64,
    device: &Device,
) -> Result<(Tensor, Vec<Scene>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let scenes: Vec<Scene> = (0..count).map(|_| Scene::random(&mut rng, size)).collect();
    let mut data = Vec::with_capacity(count * 3 * size * size);
    for s in &scenes {
        data.extend(normalise(s.render(), size * size));
    }
    Ok((
        Tensor::from_vec(data, (count, 3, size, size), device)?,
        scenes,
    ))
}

/// An image file (PNG or JPEG) resized to `size x size`: `[1, 3, size, size]`
/// (f32, CLIP-normalised).
pub fn load_image(path: impl AsRef<Path>, size: usize, device: &Device) -> Result<Tensor> {
    let path = path.as_ref();
    let img = image::open(path)
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
    let img = img
        .resize_exact(
            size as u32,
            size as u32,
            image::imageops::FilterType::Triangle,
        )
        .to_rgb8();
    let mut chw = vec![0f32; 3 * size * size];
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            chw[(c * size + y as usize) * size + x as usize] = p[c] as f32 / 255.0;
        }
    }
    Tensor::from_vec(normalise(chw, size * size), (1, 3, size, size), device)
}

fn normalise(mut chw: Vec<f32>, plane: usize) -> Vec<f32> {
    for (c, ch) in chw.chunks_mut(plane).enumerate() {
        ch.iter_mut()
            .for_each(|v| *v = (*v - CLIP_MEAN[c]) / CLIP_STD[c]);
    }
    chw
}
