//! The small LLaVA-style model: HF-named safetensors round trip, KV-cache
//! decoding against full recomputation, explicit (gapped) positions against
//! masking, layer ranges and the captured glimpse query read by foveal; where
//! decoding continues, and the gather after a reduction.

use candle_core::{DType, Device, IndexOp, Result, Tensor};
use foveal_candle::decoder::argmax;
use foveal_candle::images::{load_image, synthetic_images};
use foveal_candle::ops::plan_from_kept;
use foveal_candle::prompt::byte_tokens;
use foveal_candle::{
    attention_mask, Dense, ImageMethod, ImageQuestions, LlavaModel, ModelConfig, Prompt, Reduced,
    Segment,
};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn model(seed: u64) -> LlavaModel {
    LlavaModel::seeded(&ModelConfig::tiny(), seed, &Device::Cpu, DType::F32).unwrap()
}

/// Two rows of different lengths (the shorter is left-padded).
fn prompt(m: &LlavaModel, seed: u64) -> Prompt {
    let (pixels, _) = synthetic_images(2, 64, seed, &Device::Cpu).unwrap();
    let system = byte_tokens("sys: ");
    let questions = vec![byte_tokens("what is red?"), byte_tokens("where?")];
    m.build_prompt(&pixels, &system, &questions).unwrap()
}

fn temp_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("foveal-candle-{}-{name}", std::process::id()))
}

#[test]
fn prompt_layout() {
    let m = model(1);
    let p = prompt(&m, 3);
    let np = m.num_patches();
    let (sys, q0, q1) = (5, 12, 6);
    assert_eq!(p.seq(), sys + np + q0);
    assert_eq!(p.starts, vec![0, q0 - q1]);
    assert_eq!(p.embeds.dims(), [2, p.seq(), 256]);
    for b in 0..2 {
        let s = p.starts[b];
        assert_eq!(p.visual[b], (s + sys..s + sys + np).collect::<Vec<_>>());
        assert_eq!(p.position_ids[b][s], 0);
        assert_eq!(*p.position_ids[b].last().unwrap() as usize, p.seq() - 1 - s);
    }
    assert_eq!(p.positions.to_vec2::<u32>().unwrap(), p.position_ids);
    for dt in [DType::I64, DType::I32] {
        let pos = p.positions_as(dt).unwrap();
        assert_eq!(
            pos.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap(),
            p.position_ids
        );
        // The decoder takes position ids of any integer dtype.
        let mut c = m.decoder.new_cache();
        let h = m
            .decoder
            .forward_layers(&p.embeds, &pos, Some(&p.mask().unwrap()), 0..1, &mut c)
            .unwrap();
        let mut c2 = m.decoder.new_cache();
        let h2 = m
            .decoder
            .forward_layers(
                &p.embeds,
                &p.positions,
                Some(&p.mask().unwrap()),
                0..1,
                &mut c2,
            )
            .unwrap();
        assert_eq!(max_abs_diff(&h, &h2), 0.0);
    }
    let layout = p.row_layout().unwrap();
    assert_eq!(
        (layout.start(1), layout.end(1), layout.nv(1)),
        (q0 - q1, p.seq(), np)
    );
}

/// Each row's next decode position is the end of its dense layout: a
/// sampled image counts its whole span (not its last kept cell), a
/// transient segment (GlimpsePrune's glimpse) does not count, and tokens
/// appended continue from there.
#[test]
fn next_positions_are_the_end_of_the_dense_layout() -> Result<()> {
    let m = model(1);
    let e = Tensor::randn(0f32, 1.0, (3, 256), &Device::Cpu)?;
    let text = |n: usize| Segment::Text(vec![7; n]);
    let rows = vec![
        vec![
            text(3),
            Segment::SampledImage {
                embeds: e.narrow(0, 0, 2)?,
                offsets: vec![0, 5],
                span: 8,
            },
        ],
        vec![
            text(2),
            Segment::Image(e.clone()),
            Segment::Transient(e.narrow(0, 0, 1)?),
        ],
        vec![text(4)],
    ];
    let p = Prompt::build(&m.decoder, &rows)?;
    assert_eq!(p.position_ids[0][p.starts[0]..], [0, 1, 2, 3, 8]);
    assert_eq!(p.position_ids[1][p.starts[1]..], [0, 1, 2, 3, 4, 5]);
    assert_eq!(p.next_positions(), [11, 5, 4]);
    assert_eq!(
        p.visual[1],
        [p.starts[1] + 2, p.starts[1] + 3, p.starts[1] + 4]
    );
    let q = p.append_tokens(&m.decoder, &[vec![1, 2], vec![1, 2], vec![1, 2]])?;
    assert_eq!(q.position_ids[0][q.seq() - 2..], [11, 12]);
    assert_eq!(q.position_ids[1][q.seq() - 2..], [5, 6]);
    assert_eq!(q.next_positions(), [13, 7, 6]);
    let err =
        Prompt::build(&m.decoder, &[vec![Segment::Transient(e.clone()), text(1)]]).unwrap_err();
    assert!(err.to_string().contains("must end its row"), "{err}");
    Ok(())
}

/// The shared after-reduction gather refuses a row left with nothing,
/// naming it (every method refuses such settings earlier; this is the one
/// place that holds the rule for all of them).
#[test]
fn a_reduction_that_empties_a_row_is_refused() -> Result<()> {
    let m = model(1);
    let e = Tensor::randn(0f32, 1.0, (4, 256), &Device::Cpu)?;
    let rows = vec![
        vec![Segment::Image(e.clone())],
        vec![Segment::Text(vec![1, 2]), Segment::Image(e.clone())],
    ];
    let p = Prompt::build(&m.decoder, &rows)?;
    let layout = p.row_layout().map_err(candle_core::Error::wrap)?;
    let hidden = Tensor::randn(0f32, 1.0, (2, p.seq(), 8), &Device::Cpu)?;
    let mut plan = plan_from_kept(&layout, &[vec![], vec![1]], false, &Device::Cpu)?;
    let err = Reduced::gather(&p, &hidden, &mut plan, "test").unwrap_err();
    assert!(
        err.to_string().contains("test: row 0 has nothing left"),
        "{err}"
    );
    let mut plan = plan_from_kept(&layout, &[vec![2], vec![]], false, &Device::Cpu)?;
    let r = Reduced::gather(&p, &hidden, &mut plan, "test")?;
    assert_eq!(
        (r.lengths.clone(), r.starts.clone()),
        (vec![1, 2], vec![1, 0])
    );
    assert_eq!(r.positions.to_vec2::<u32>()?, [[0, 2], [0, 1]]);
    Ok(())
}

/// The dense baseline through the interface every method shares is the
/// dense generation, with its counts.
#[test]
fn the_dense_method_reports_the_dense_generation() -> Result<()> {
    let m = model(2);
    let (pixels, _) = synthetic_images(2, 64, 4, &Device::Cpu)?;
    let input = ImageQuestions {
        pixels: pixels.clone(),
        grid: (1, 1),
        system: byte_tokens("sys: "),
        questions: vec![byte_tokens("what is red?"), byte_tokens("where?")],
    };
    let report = Dense.run(&m, &input, 3)?;
    let p = m.build_prompt(&pixels, &input.system, &input.questions)?;
    assert_eq!(report.tokens, m.generate_dense(&p, 3)?.tokens);
    assert_eq!(
        (report.method, report.visual.clone()),
        ("dense", vec![64, 64])
    );
    assert_eq!(report.kept, report.visual);
    let layers = m.config.text.num_layers;
    assert_eq!(
        report.kv_entries,
        [(5 + 64 + 12) * layers, (5 + 64 + 6) * layers]
    );
    Ok(())
}

#[test]
fn seeded_init_is_deterministic_and_not_degenerate() {
    let (a, b, c) = (model(5), model(5), model(6));
    let (ta, tb, tc) = (a.named_tensors(), b.named_tensors(), c.named_tensors());
    assert_eq!(ta.len(), tb.len());
    for ((na, xa), (nb, xb)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        assert_eq!(max_abs_diff(xa, xb), 0.0, "{na}");
    }
    let q = |ts: &foveal_candle::Named| {
        ts.iter()
            .find(|(n, _)| n == "language_model.model.layers.0.self_attn.q_proj.weight")
            .unwrap()
            .1
            .clone()
    };
    assert!(max_abs_diff(&q(&ta), &q(&tc)) > 0.1);

    // Logits vary across positions and rows, and greedy tokens are not constant.
    let p = prompt(&a, 3);
    let logits = a.prefill_logits(&p).unwrap();
    let last = logits.i((.., p.seq() - 1, ..)).unwrap();
    let std = last
        .var_keepdim(1)
        .unwrap()
        .sqrt()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(
        std.iter().all(|&s| s > 0.3 && s.is_finite()),
        "logit std per row {std:?}"
    );
    let gen = a.generate_dense(&p, 6).unwrap();
    assert!(
        gen.tokens
            .iter()
            .any(|row| row.windows(2).any(|w| w[0] != w[1])),
        "{:?}",
        gen.tokens
    );
}

#[test]
fn hf_names() {
    let m = model(1);
    let names: Vec<String> = m.named_tensors().into_iter().map(|(n, _)| n).collect();
    for n in [
        "vision_tower.vision_model.embeddings.patch_embedding.weight",
        "vision_tower.vision_model.embeddings.class_embedding",
        "vision_tower.vision_model.embeddings.position_embedding.weight",
        "vision_tower.vision_model.pre_layrnorm.weight",
        "vision_tower.vision_model.encoder.layers.3.self_attn.out_proj.bias",
        "vision_tower.vision_model.encoder.layers.0.layer_norm2.bias",
        "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
        "multi_modal_projector.linear_1.weight",
        "multi_modal_projector.linear_2.bias",
        "language_model.model.embed_tokens.weight",
        "language_model.model.layers.5.self_attn.q_proj.bias",
        "language_model.model.layers.5.self_attn.k_proj.bias",
        "language_model.model.layers.5.self_attn.o_proj.weight",
        "language_model.model.layers.0.mlp.gate_proj.weight",
        "language_model.model.layers.0.input_layernorm.weight",
        "language_model.model.layers.0.post_attention_layernorm.weight",
        "language_model.model.norm.weight",
        "language_model.lm_head.weight",
    ] {
        assert!(names.iter().any(|x| x == n), "missing {n}");
    }
    assert!(!names.iter().any(|x| x.ends_with("o_proj.bias")));
    let t = m.named_tensors();
    let shape = |n: &str| t.iter().find(|(x, _)| x == n).unwrap().1.dims().to_vec();
    assert_eq!(
        shape("language_model.model.layers.0.self_attn.k_proj.weight"),
        [2 * 64, 256]
    );
    assert_eq!(
        shape("vision_tower.vision_model.embeddings.patch_embedding.weight"),
        [128, 3, 8, 8]
    );
    assert_eq!(
        shape("vision_tower.vision_model.embeddings.position_embedding.weight"),
        [65, 128]
    );
}

#[test]
fn safetensors_round_trip() {
    let m = model(11);
    let p = prompt(&m, 4);
    let before = m.prefill_logits(&p).unwrap();
    let path = temp_path("roundtrip.safetensors");
    m.save_safetensors(&path).unwrap();
    let loaded =
        LlavaModel::load_safetensors(&path, &ModelConfig::tiny(), &Device::Cpu, DType::F32)
            .unwrap();
    std::fs::remove_file(&path).unwrap();
    // The same prompt built by the loaded model (its own vision tower and projector).
    let p2 = prompt(&loaded, 4);
    assert_eq!(max_abs_diff(&p.embeds, &p2.embeds), 0.0);
    let after = loaded.prefill_logits(&p2).unwrap();
    assert!(max_abs_diff(&before, &after) <= 1e-6);
    // And a different model really differs.
    let other = model(12).prefill_logits(&p).unwrap();
    assert!(max_abs_diff(&before, &other) > 1e-2);
}

#[test]
fn cached_decode_equals_recompute() {
    let m = model(21);
    let p = prompt(&m, 5);
    let steps = 4;
    let gen = m.generate_dense(&p, steps).unwrap();
    assert_eq!(gen.logits.len(), steps);
    assert!(gen.tokens.iter().all(|r| r.len() == steps));
    for t in 0..steps {
        let generated: Vec<Vec<u32>> = gen.tokens.iter().map(|r| r[..t].to_vec()).collect();
        let full = p.append_tokens(&m.decoder, &generated).unwrap();
        let logits = m.prefill_logits(&full).unwrap();
        let last = logits.i((.., full.seq() - 1, ..)).unwrap();
        let d = max_abs_diff(&last, &gen.logits[t]);
        assert!(
            d <= 1e-4,
            "step {t}: cached decode differs from recompute by {d}"
        );
        assert_eq!(
            argmax(&last).unwrap(),
            gen.tokens.iter().map(|r| r[t]).collect::<Vec<_>>()
        );
    }
}

/// Keeps the slots `keep[b]` (equal counts) of `[B, S, ...]` per row.
fn gather(x: &Tensor, keep: &[Vec<u32>]) -> Tensor {
    let rows: Vec<Tensor> = keep
        .iter()
        .enumerate()
        .map(|(b, k)| {
            x.get(b)
                .unwrap()
                .index_select(&Tensor::new(k.as_slice(), x.device()).unwrap(), 0)
                .unwrap()
        })
        .collect();
    Tensor::stack(&rows, 0).unwrap()
}

/// Sets the additive mask's key columns `cols[b]` to -inf (every query).
fn mask_out(mask: &Tensor, cols: &[usize]) -> Tensor {
    let (b, _, q, k) = mask.dims4().unwrap();
    let mut m = mask.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (bi, &c) in cols.iter().enumerate() {
        for i in 0..q {
            m[(bi * q + i) * k + c] = f32::NEG_INFINITY;
        }
    }
    Tensor::from_vec(m, (b, 1, q, k), mask.device()).unwrap()
}

/// A prefill with a token dropped (the others keep their original positions)
/// equals the dense prefill with that token's key masked out, at every kept
/// token, in the caches and in a decode step after it: what pruning relies on.
#[test]
fn gapped_positions_equal_masking() {
    let m = model(31);
    let dec = &m.decoder;
    let p = prompt(&m, 6);
    let (s, l) = (p.seq(), dec.num_layers());
    // Drop a different visual token in each row.
    let drop = [p.visual[0][10], p.visual[1][37]];
    let keep: Vec<Vec<u32>> = drop
        .iter()
        .map(|&d| (0..s as u32).filter(|&j| j as usize != d).collect())
        .collect();

    let mut dense_cache = dec.new_cache();
    let dense_mask = mask_out(&p.mask().unwrap(), &drop);
    let dense = dec
        .forward_layers(
            &p.embeds,
            &p.positions,
            Some(&dense_mask),
            0..l,
            &mut dense_cache,
        )
        .unwrap();

    let mut pruned_cache = dec.new_cache();
    let pruned_mask = attention_mask(&p.starts, s - 1, s - 1, &Device::Cpu).unwrap();
    let (emb, pos) = (gather(&p.embeds, &keep), gather(&p.positions, &keep));
    let pruned = dec
        .forward_layers(&emb, &pos, Some(&pruned_mask), 0..l, &mut pruned_cache)
        .unwrap();

    // Compare valid slots only (padding slots see only masked keys).
    let valid: Vec<Vec<u32>> = (0..2)
        .map(|b| (p.starts[b] as u32..s as u32 - 1).collect())
        .collect();
    let trim = |x: &Tensor| {
        let n = valid[0].len().min(valid[1].len());
        let v: Vec<Vec<u32>> = valid.iter().map(|v| v[v.len() - n..].to_vec()).collect();
        gather(x, &v)
    };
    let d = max_abs_diff(
        &trim(&dec.logits(&gather(&dense, &keep)).unwrap()),
        &trim(&dec.logits(&pruned).unwrap()),
    );
    assert!(d <= 1e-4, "logits differ by {d}");
    for layer in 0..l {
        let (kd, vd) = dense_cache.layer(layer).unwrap();
        let (kp, vp) = pruned_cache.layer(layer).unwrap();
        assert_eq!(kp.dims(), [2, 2, s - 1, 64]);
        for (a, b) in [(kd, kp), (vd, vp)] {
            let a = gather(&a.transpose(1, 2).unwrap(), &keep);
            let d = max_abs_diff(&trim(&a), &trim(&b.transpose(1, 2).unwrap()));
            assert!(d <= 1e-4, "layer {layer} cache differs by {d}");
        }
    }

    // One decode step on each cache, same token, same position.
    let tok = Tensor::new(&[[7u32], [9u32]], &Device::Cpu).unwrap();
    let pos = Tensor::new(
        p.next_positions()
            .iter()
            .map(|&x| vec![x])
            .collect::<Vec<_>>(),
        &Device::Cpu,
    )
    .unwrap();
    let dense_step = mask_out(
        &attention_mask(&p.starts, 1, s + 1, &Device::Cpu).unwrap(),
        &drop,
    );
    let pruned_step = attention_mask(&p.starts, 1, s, &Device::Cpu).unwrap();
    let e = dec.embed(&tok).unwrap();
    let a = dec
        .forward_layers(&e, &pos, Some(&dense_step), 0..l, &mut dense_cache)
        .unwrap();
    let b = dec
        .forward_layers(&e, &pos, Some(&pruned_step), 0..l, &mut pruned_cache)
        .unwrap();
    let d = max_abs_diff(&dec.logits(&a).unwrap(), &dec.logits(&b).unwrap());
    assert!(d <= 1e-4, "decode step after pruning differs by {d}");
}

/// Running the layers in two ranges equals one range; the captured query is
/// the last position's, after RoPE, in the layout foveal's glimpse_scores reads.
#[test]
fn layer_ranges_and_glimpse_query() {
    let m = model(41);
    let dec = &m.decoder;
    let p = prompt(&m, 7);
    let (l, k_layer, s) = (dec.num_layers(), 2, p.seq());
    let mask = p.mask().unwrap();
    let mut full_cache = dec.new_cache();
    let full = dec
        .forward_layers(&p.embeds, &p.positions, Some(&mask), 0..l, &mut full_cache)
        .unwrap();

    let mut cache = dec.new_cache();
    let (h, cap) = dec
        .forward_layers_capture(
            &p.embeds,
            &p.positions,
            Some(&mask),
            0..k_layer + 1,
            &mut cache,
        )
        .unwrap();
    assert!(cache.layer(k_layer).is_some() && cache.layer(k_layer + 1).is_none());
    let out = dec
        .forward_layers(&h, &p.positions, Some(&mask), k_layer + 1..l, &mut cache)
        .unwrap();
    assert!(max_abs_diff(&full, &out) <= 1e-5);

    // foveal's softmax scores of the glimpse (last) token over the visual keys,
    // against a direct computation from the captured query and layer K's keys.
    let (q, (k, _)) = (&cap.last_query, cache.layer(k_layer).unwrap());
    assert_eq!(q.dims(), [2, 4, 64]);
    let (b, hq, hkv, d) = (2, 4, 2, 64);
    let rows = p.row_layout().unwrap();
    let nv = rows.nv_max();
    let qv = q.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let kv = k.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut scores = vec![0f32; b * nv * hq];
    foveal::glimpse_scores::cpu::glimpse_scores(
        foveal::View::contiguous(&qv, [b, hq, d]).unwrap(),
        foveal::View::new(&kv, foveal::Layout::bhsd(b, s, hkv, d)).unwrap(),
        &rows,
        None,
        foveal::ScoreMode::Softmax,
        &mut foveal::ViewMut::contiguous(&mut scores, [b, nv, hq]).unwrap(),
    )
    .unwrap();
    for bi in 0..b {
        for h in 0..hq {
            let kh = h / (hq / hkv);
            let dot = |j: usize| -> f64 {
                (0..d)
                    .map(|e| {
                        qv[(bi * hq + h) * d + e] as f64
                            * kv[((bi * hkv + kh) * s + j) * d + e] as f64
                    })
                    .sum::<f64>()
                    / (d as f64).sqrt()
            };
            let logits: Vec<f64> = (p.starts[bi]..s).map(dot).collect();
            let mx = logits.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = logits.iter().map(|x| (x - mx).exp()).sum();
            for (i, &v) in p.visual[bi].iter().enumerate() {
                let want = (logits[v - p.starts[bi]] - mx).exp() / z;
                let got = scores[(bi * nv + i) * hq + h] as f64;
                assert!(
                    (want - got).abs() <= 1e-5,
                    "row {bi} head {h} visual {i}: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn images() {
    let (a, scenes) = synthetic_images(3, 64, 9, &Device::Cpu).unwrap();
    let (b, _) = synthetic_images(3, 64, 9, &Device::Cpu).unwrap();
    assert_eq!(a.dims(), [3, 3, 64, 64]);
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    for s in &scenes {
        let mask = s.patch_mask(8);
        assert_eq!(mask.len(), 64);
        assert!(mask.iter().any(|&x| x) && !mask.iter().all(|&x| x));
    }
    // Through a PNG file and back: the same pixels within 8-bit quantisation.
    let rgb: Vec<u8> = {
        let px = scenes[0].render();
        (0..64 * 64 * 3)
            .map(|j| (px[(j % 3) * 4096 + j / 3] * 255.0).round() as u8)
            .collect()
    };
    let path = temp_path("scene.png");
    image::RgbImage::from_raw(64, 64, rgb)
        .unwrap()
        .save(&path)
        .unwrap();
    let loaded = load_image(&path, 64, &Device::Cpu).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(max_abs_diff(&loaded, &a.i(0..1).unwrap()) < 0.02);
}

/// bf16 weights run (attention softmax in f32) and stay close to f32.
#[test]
fn bf16_runs() -> Result<()> {
    let m32 = model(51);
    let m16 = LlavaModel::seeded(&ModelConfig::tiny(), 51, &Device::Cpu, DType::BF16)?;
    let p32 = prompt(&m32, 8);
    let p16 = prompt(&m16, 8);
    let (a, b) = (m32.prefill_logits(&p32)?, m16.prefill_logits(&p16)?);
    let s = p32.seq();
    let (a, b) = (a.i((.., s - 1, ..))?, b.i((.., s - 1, ..))?);
    let rel = max_abs_diff(&a, &b) / a.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(rel < 0.15, "bf16 vs f32 relative difference {rel}");
    Ok(())
}
