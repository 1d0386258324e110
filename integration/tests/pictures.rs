//! Pictures of what a method kept or attended: the drawn pixels follow the
//! kept set (kept patches as the image is, dropped ones dimmed), outlines
//! land on the boxes' edges, and the methods' reports carry maps that agree
//! with what they report kept / routed; VISOR's and Glance2Gaze's panels
//! are the attention their runs record (which tests/visor.rs and
//! tests/glance2gaze.rs check against plain-candle softmaxes), each
//! patch drawn as bright as its weight.

use candle_core::{DType, Device};
use foveal::RegionShape;
use foveal_candle::images::synthetic_images;
use foveal_candle::pictures::{self, DIM, OUTLINE};
use foveal_candle::prompt::byte_tokens;
use foveal_candle::{
    GazeAttention, GazeConfig, Glance2Gaze, Glance2GazeConfig, Glance2GazeInput, GlimpseConfig,
    GlimpsePrune, ImageMethod, ImageQuestions, LlavaModel, Method, ModelConfig, Panel, TokenMaps,
    Visor, VisorConfig, VisorInput,
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

/// Every panel of `maps` drawn over `image` by [`pictures::render`]: each
/// cell's centre pixel is the image's times `DIM + (1 - DIM) * weight`.
fn assert_pixels_follow_weights(image: &RgbImage, maps: &TokenMaps, what: &str) {
    let out = pictures::render(image, maps).unwrap();
    let (rows, cols) = maps.grid;
    let panel_w = (out.width() + 4) / maps.panels.len() as u32 - 4;
    let (cw, ch) = (panel_w / cols as u32, out.height() / rows as u32);
    let scale = out.height() / image.height();
    for (i, panel) in maps.panels.iter().enumerate() {
        for cell in 0..rows * cols {
            let (y, x) = ((cell / cols) as u32, (cell % cols) as u32);
            let (px, py) = (x * cw + cw / 2, y * ch + ch / 2);
            let original = *image.get_pixel(px / scale, py / scale);
            let f = DIM + (1.0 - DIM) * panel.weight[cell];
            let want = Rgb(original.0.map(|c| (c as f32 * f).round() as u8));
            let drawn = *out.get_pixel(i as u32 * (panel_w + 4) + px, py);
            assert_eq!(drawn, want, "{what}: panel {:?}, cell {cell}", panel.title);
        }
    }
}

/// A panel scaled to its largest value: the largest cell 1, the others in
/// proportion.
fn assert_scaled_from(panel: &Panel, values: &[f32], what: &str) {
    let max = values.iter().copied().fold(0f32, f32::max);
    assert!(max > 0.0, "{what}");
    for (w, v) in panel.weight.iter().zip(values) {
        assert!((w - v / max).abs() < 1e-6, "{what}: {w} vs {v} / {max}");
    }
}

#[test]
fn visor_pictures_show_each_cross_attention_layers_attention() {
    let cfg = ModelConfig::visor();
    let model = LlavaModel::seeded(&cfg, 1, &Device::Cpu, DType::F32).unwrap();
    let vcfg = VisorConfig::for_model(&cfg);
    let visor = Visor::seeded(&cfg, &vcfg, 4, &Device::Cpu, DType::F32).unwrap();
    let input = input(&model);
    let report = visor.run(&model, &input, 2).unwrap();
    // The run the report came from, recorded again (the same weights and input).
    let run = visor
        .generate_recording(
            &model,
            &VisorInput {
                pixels: input.pixels.clone(),
                grid: input.grid,
                system: input.system.clone(),
                questions: input.questions.iter().map(|q| vec![q.clone()]).collect(),
            },
            2,
        )
        .unwrap();
    let side = cfg.vision.patches_per_side();
    for b in 0..2 {
        let maps = &report.maps[b];
        assert_eq!(maps.grid, (side, side));
        assert_eq!(maps.panels.len(), vcfg.cross_attention_layers.len());
        for ((l, attention), panel) in run.attention[b].iter().zip(&maps.panels) {
            assert_eq!(panel.title, format!("CA layer {l}"));
            let sum: f32 = attention.iter().sum();
            assert!((sum - 1.0).abs() < 1e-4, "row {b} layer {l}: {sum}");
            assert_scaled_from(panel, attention, &format!("row {b} layer {l}"));
        }
        let image = pictures::image_of(&input.pixels, b).unwrap();
        assert_pixels_follow_weights(&image, maps, &format!("VISOR row {b}"));
    }
}

#[test]
fn glance2gaze_pictures_show_the_compressions_attention_and_the_fusion_weights() {
    let cfg = ModelConfig::tiny();
    let model = LlavaModel::seeded(&cfg, 1, &Device::Cpu, DType::F32).unwrap();
    let gcfg = Glance2GazeConfig::for_model(&cfg, "LLaVA-1.5-7B 33%").unwrap();
    let g2g = Glance2Gaze::seeded(&cfg, &gcfg, 5, &Device::Cpu, DType::F32).unwrap();
    let input = input(&model);
    let report = g2g.run(&model, &input, 2).unwrap();
    let g_input = Glance2GazeInput::from_images(&input, cfg.vision.image_size).unwrap();
    let run = g2g.generate_recording(&model, &g_input, 2).unwrap();
    let side = cfg.vision.patches_per_side();
    let deepest = gcfg.glance_layers.last().unwrap();
    for b in 0..2 {
        let maps = &report.maps[b];
        assert_eq!(maps.grid, (side, side));
        let titles: Vec<&str> = maps.panels.iter().map(|p| p.title.as_str()).collect();
        assert_eq!(
            titles,
            [
                "compression attention".to_string(),
                format!("ViT layer {deepest} weight")
            ]
        );
        let sum: f32 = run.attention[b].iter().sum();
        assert!((sum - 1.0).abs() < 1e-4, "row {b}: {sum}");
        assert_scaled_from(&maps.panels[0], &run.attention[b], &format!("row {b}"));
        // The fusion's weights as they are (in [0, 1]), not rescaled.
        assert_eq!(
            &maps.panels[1].weight,
            run.glance_weights[b].last().unwrap()
        );
        let image = pictures::image_of(&input.pixels, b).unwrap();
        assert_pixels_follow_weights(&image, maps, &format!("Glance2Gaze row {b}"));
    }
}
