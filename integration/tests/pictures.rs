//! Pictures of what a method kept or attended: the drawn pixels follow the
//! kept set (kept patches as the image is, dropped ones dimmed), outlines
//! land on the boxes' edges, and the methods' reports carry maps that agree
//! with what they report kept / routed.

use candle_core::{DType, Device};
use foveal::RegionShape;
use foveal_candle::images::synthetic_images;
use foveal_candle::pictures::{self, DIM, OUTLINE};
use foveal_candle::prompt::byte_tokens;
use foveal_candle::{
    GazeAttention, GazeConfig, GlimpseConfig, GlimpsePrune, ImageMethod, ImageQuestions,
    LlavaModel, Method, ModelConfig, Panel, TokenMaps,
};
use image::{Rgb, RgbImage};

fn dimmed(p: Rgb<u8>) -> Rgb<u8> {
    Rgb(p.0.map(|c| (c as f32 * DIM).round() as u8))
}

/// The centre pixel of grid cell `(y, x)` in panel `i` of a picture of
/// `panel_w` pixels per panel, cells of `cell` pixels.
fn centre(img: &RgbImage, i: u32, panel_w: u32, cell: u32, (y, x): (u32, u32)) -> Rgb<u8> {
    *img.get_pixel(i * (panel_w + 4) + x * cell + cell / 2, y * cell + cell / 2)
}

#[test]
fn kept_patches_are_drawn_as_they_are_and_dropped_ones_dimmed() {
    // A 64 x 64 image in a 4 x 4 grid: each cell its own bright colour.
    let image = RgbImage::from_fn(64, 64, |x, y| {
        Rgb([40 + (x / 16 * 60) as u8, 40 + (y / 16 * 60) as u8, 200])
    });
    let kept = [0, 5, 6, 15];
    let maps = TokenMaps {
        grid: (4, 4),
        panels: vec![
            Panel::kept("kept", 16, &kept),
            Panel {
                boxes: vec![[1, 1, 3, 3]],
                ..Panel::scaled("all", &[1.0; 16])
            },
        ],
    };
    let out = pictures::render(&image, &maps).unwrap();
    // Scaled 4x to 256 pixels a panel, two panels and a 4-pixel gap.
    assert_eq!(out.dimensions(), (2 * 256 + 4, 256));
    for cell in 0..16u32 {
        let (y, x) = (cell / 4, cell % 4);
        let original = *image.get_pixel(x * 16 + 8, y * 16 + 8);
        let drawn = centre(&out, 0, 256, 64, (y, x));
        if kept.contains(&(cell as usize)) {
            assert_eq!(drawn, original, "kept cell {cell}");
        } else {
            assert_eq!(drawn, dimmed(original), "dropped cell {cell}");
            assert_ne!(drawn, original);
        }
        // Panel 1 keeps everything: the image as it is, away from the box.
        if ![5, 6, 9, 10].contains(&cell) {
            assert_eq!(centre(&out, 1, 256, 64, (y, x)), original);
        }
    }
    // The box [1, 1, 3, 3) outlined from pixel 64 to 191 in panel 1.
    let x0 = 256 + 4;
    for t in [64, 100, 191] {
        assert_eq!(*out.get_pixel(x0 + t, 64), OUTLINE);
        assert_eq!(*out.get_pixel(x0 + t, 191), OUTLINE);
        assert_eq!(*out.get_pixel(x0 + 64, t), OUTLINE);
        assert_eq!(*out.get_pixel(x0 + 191, t), OUTLINE);
    }
    assert_ne!(*out.get_pixel(x0 + 128, 128), OUTLINE);
    // A panel of the wrong size is refused.
    let bad = TokenMaps {
        grid: (4, 4),
        panels: vec![Panel::kept("kept", 15, &kept)],
    };
    assert!(pictures::render(&image, &bad).is_err());
}

fn input(model: &LlavaModel) -> ImageQuestions {
    let s = model.config.vision.image_size;
    ImageQuestions {
        pixels: synthetic_images(2, s, 2, &Device::Cpu).unwrap().0,
        grid: (1, 1),
        system: byte_tokens("A chat."),
        questions: vec![byte_tokens("Where?"), byte_tokens("How many shapes?")],
    }
}

#[test]
fn glimpse_prune_pictures_show_its_kept_tokens() {
    let cfg = ModelConfig::tiny();
    let model = LlavaModel::seeded(&cfg, 1, &Device::Cpu, DType::F32).unwrap();
    let mut gcfg = GlimpseConfig::for_model(&cfg);
    gcfg.rule.max_ratio = Some(0.25);
    let glimpse = GlimpsePrune::seeded(&cfg, &gcfg, 2, &Device::Cpu, DType::F32).unwrap();
    let input = input(&model);
    let report = glimpse.run(&model, &input, 2).unwrap();
    let side = cfg.vision.patches_per_side();
    for b in 0..2 {
        let maps = &report.maps[b];
        assert_eq!(maps.grid, (side, side));
        let weight = &maps.panels[0].weight;
        let kept: Vec<usize> = (0..weight.len()).filter(|&i| weight[i] == 1.0).collect();
        assert_eq!(kept.len(), report.kept[b]);
        assert!(kept.len() < side * side, "something is dropped");
        assert!(weight.iter().all(|&w| w == 0.0 || w == 1.0));
        // Every kept patch drawn as the image is, every dropped one dimmed.
        let image = pictures::image_of(&input.pixels, b).unwrap();
        let out = pictures::render(&image, maps).unwrap();
        let cell = out.height() / side as u32;
        let scale = out.height() / image.height();
        for i in 0..side * side {
            let (y, x) = ((i / side) as u32, (i % side) as u32);
            let drawn = centre(&out, 0, out.height(), cell, (y, x));
            let c = (x * cell + cell / 2) / scale;
            let original = *image.get_pixel(c, (y * cell + cell / 2) / scale);
            let want = if kept.contains(&i) {
                original
            } else {
                dimmed(original)
            };
            assert_eq!(drawn, want, "row {b} patch {i}");
        }
    }
}

#[test]
fn gaze_attention_maps_count_its_routes() {
    let cfg = ModelConfig::tiny();
    let model = LlavaModel::seeded(&cfg, 1, &Device::Cpu, DType::F32).unwrap();
    let k = 3;
    let gcfg = GazeConfig {
        context_tokens: 2,
        region: RegionShape {
            frames: 1,
            height: 2,
            width: 4,
        },
        k,
    };
    let gaze = GazeAttention::seeded(&cfg, &gcfg, 3, &Device::Cpu, DType::F32).unwrap();
    let input = input(&model);
    let (map, _) =
        foveal_candle::vision_sampler::encode_grid(&model, &input.pixels, (1, 1)).unwrap();
    let prompt = gaze
        .map_prompt(&model, &map, &input.system, &input.questions)
        .unwrap();
    let run = gaze.generate(&model, &prompt, 3).unwrap();
    let side = cfg.vision.patches_per_side();
    for b in 0..2 {
        // Every read routes k regions: the fractions of the distinct
        // regions sum to k.
        let mut seen = std::collections::BTreeMap::new();
        for (r, f) in run.visual_regions[b].iter().zip(&run.routed[b]) {
            seen.insert(r.expect("every visual token is in a region"), *f);
        }
        assert_eq!(seen.len(), (side / 2) * (side / 4));
        let total: f32 = seen.values().sum();
        assert!((total - k as f32).abs() < 1e-4, "row {b}: {total}");
        // One box per region, 2 x 4 cells each.
        let maps = run.token_maps(b, (side, side));
        assert_eq!(maps.panels[0].boxes.len(), seen.len());
        assert!(maps.panels[0]
            .boxes
            .iter()
            .all(|&[y0, x0, y1, x1]| (y1 - y0, x1 - x0) == (2, 4)));
    }
}
