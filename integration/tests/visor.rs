//! VISOR in the model: with every layer a self-attention layer and no
//! cross-attention it is the dense model; a real schedule (the router's
//! configurations, a fixed one, VISOR-TR) equals the same model written
//! here in plain candle ops (no foveal op: the dense layout with masks, a
//! full recompute at every step); incremental decoding equals a full
//! prefill of the longer prompt; the router's choice is the argmax of its
//! logits and, over several questions, the costliest; rows that chose
//! different configurations decode as each row alone; decoding continues
//! at the dense layout's end; a row without text is refused; the weights
//! round-trip through safetensors; the schedule loads from JSON; the ops'
//! wrappers equal candle compositions.

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Result, Tensor, D};
use foveal_candle::images::synthetic_images;
use foveal_candle::ops::{self, AttendLens};
use foveal_candle::prompt::byte_tokens;
use foveal_candle::{
    attention_mask, KvCache, LayerKind, LlavaModel, Method, ModelConfig, Prompt, Route, Segment,
    Visor, VisorConfig, VisorInput, VisorRun,
};

mod common;
use common::visor::{STEPS, VISOR_SEED};
use common::{
    assert_row_alone_as_in_batch, assert_token_margins, mask_columns, max_abs_diff, DECISION_MARGIN,
};

const TOL: f32 = 1e-4;

struct Setup {
    cfg: ModelConfig,
    model: LlavaModel,
}

fn setup() -> Result<Setup> {
    let (cfg, model) = common::visor::model(&Device::Cpu)?;
    Ok(Setup { cfg, model })
}

fn visor(s: &Setup, cfg: &VisorConfig, seed: u64) -> Result<Visor> {
    Visor::seeded(&s.cfg, cfg, seed, &Device::Cpu, DType::F32)
}

/// `questions.len()` images (seed 5) of a `g x g` grid, each row with its
/// questions after a shared system prompt.
fn input(s: &Setup, system: &str, questions: &[&[&str]], g: usize) -> Result<VisorInput> {
    let (pixels, _) = synthetic_images(
        questions.len(),
        g * s.cfg.vision.image_size,
        5,
        &Device::Cpu,
    )?;
    Ok(VisorInput {
        pixels,
        grid: (g, g),
        system: byte_tokens(system),
        questions: questions
            .iter()
            .map(|qs| qs.iter().map(|q| byte_tokens(q)).collect())
            .collect(),
    })
}

/// Two rows, one question each, of different lengths; the seeded router
/// sends them to different configurations.
fn two_rows(s: &Setup) -> Result<VisorInput> {
    input(
        s,
        "You see an image.",
        &[&["Where is the red square?"], &["Count the shapes."]],
        1,
    )
}

// ---------------------------------------------------------------------
// The reference: VISOR in plain candle ops, one row at a time, every step
// a full recompute of the dense layout. Text-only layers are the decoder's
// layer with the visual keys masked for every query and the visual rows
// kept as they were; cross-attention is matmul / softmax / matmul with
// the KV heads repeated; the position convolution candle's conv1d.
// ---------------------------------------------------------------------

struct Reference<'a> {
    model: &'a LlavaModel,
    cfg: &'a VisorConfig,
    w: HashMap<String, Tensor>,
}

/// One row's reference run: the configuration, each routing token's
/// router logits, the logits of the last token, and per cross-attention
/// layer the last token's softmax over the visual tokens, mean over heads.
struct RowRun {
    configuration: usize,
    router_logits: Vec<Vec<f32>>,
    logits: Tensor,
    attention: Vec<(usize, Vec<f32>)>,
}

impl<'a> Reference<'a> {
    fn new(model: &'a LlavaModel, visor: &'a Visor) -> Self {
        Reference {
            model,
            cfg: visor.config(),
            w: visor.named_tensors().into_iter().collect(),
        }
    }

    fn w(&self, name: &str) -> &Tensor {
        self.w
            .get(name)
            .unwrap_or_else(|| panic!("no parameter {name}"))
    }

    fn linear(&self, x: &Tensor, name: &str, bias: bool) -> Result<Tensor> {
        let y = x.broadcast_matmul(&self.w(&format!("{name}.weight")).t()?)?;
        if bias {
            y.broadcast_add(self.w(&format!("{name}.bias")))
        } else {
            Ok(y)
        }
    }

    fn rms(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        let eps = self.model.config.text.rms_norm_eps;
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(ms + eps)?.sqrt()?)?
            .broadcast_mul(self.w(&format!("{name}.weight")))
    }

    /// The visual tokens `[N, Dm]` of image `pixels [1, 3, s, s]` (one
    /// tile): projected features plus the depthwise convolution.
    fn visual(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = self.model.encode_images(pixels)?.embeds; // [1, N, C]
        let c = x.dim(2)?;
        let conv = x
            .transpose(1, 2)?
            .contiguous()?
            .conv1d(self.w("visor.pos_conv.weight"), 3, 1, 1, c)?
            .broadcast_add(&self.w("visor.pos_conv.bias").reshape((1, c, 1))?)?
            .transpose(1, 2)?;
        (x + conv)?.squeeze(0)
    }

    /// Cross-attention of every position of `x [1, S, Dm]` over the rows
    /// `visual` of `x` at layer `l`, and its softmax `[Hq, S, N]`.
    fn cross(&self, l: usize, x: &Tensor, visual: &[usize]) -> Result<(Tensor, Tensor)> {
        let t = &self.model.config.text;
        let (hq, hkv, d) = (t.num_heads, t.num_kv_heads, t.head_dim);
        let p = format!("language_model.model.layers.{l}");
        let s = x.dim(1)?;
        let idx = Tensor::from_vec(
            visual.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            visual.len(),
            x.device(),
        )?;
        let vis = self.rms(
            &x.index_select(&idx, 1)?,
            &format!("{p}.cross_attn_kv_layernorm"),
        )?;
        let q = self.linear(
            &self.rms(x, &format!("{p}.cross_attn_layernorm"))?,
            &format!("{p}.cross_attn.q_proj"),
            true,
        )?;
        let q = q.reshape((s, hq, d))?.transpose(0, 1)?; // [Hq, S, D]
        let heads = |name: &str| -> Result<Tensor> {
            let y = self.linear(&vis, &format!("{p}.cross_attn.{name}"), true)?;
            // [Hkv, N, D], each KV head repeated for its query heads.
            let y = y.reshape((visual.len(), hkv, d))?.transpose(0, 1)?;
            Tensor::cat(
                &(0..hq)
                    .map(|h| y.get(h / (hq / hkv)))
                    .collect::<Result<Vec<_>>>()?,
                0,
            )?
            .reshape((hq, visual.len(), d))
        };
        let (k, v) = (heads("k_proj")?, heads("v_proj")?);
        let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? / (d as f64).sqrt())?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let o = probs.matmul(&v.contiguous()?)?;
        let o = o.transpose(0, 1)?.reshape((1, s, hq * d))?;
        Ok((
            self.linear(&o, &format!("{p}.cross_attn.o_proj"), false)?,
            probs,
        ))
    }

    fn router(&self, h: &Tensor) -> Result<Vec<f32>> {
        let x = self.rms(h, "visor.router.norm")?;
        let x = self.linear(&x, "visor.router.fc1", true)?.gelu_erf()?;
        self.linear(&x, "visor.router.fc2", true)?
            .flatten_all()?
            .to_vec1()
    }

    /// Row `row` of `input` with `answer` appended: the router (or the
    /// fixed configuration), every layer, the last token's logits.
    fn run(&self, input: &VisorInput, row: usize, answer: &[u32]) -> Result<RowRun> {
        let dec = &self.model.decoder;
        let dev = dec.device();
        let pixels = input.pixels.narrow(0, row, 1)?;
        let visual = self.visual(&pixels)?;
        let routed = self.cfg.route == Route::Router;
        let mut segs = vec![Segment::Text(input.system.clone()), Segment::Image(visual)];
        let mut route_pos = Vec::new();
        let mut n = input.system.len() + self.model.num_patches();
        for q in &input.questions[row] {
            segs.push(Segment::Text(q.clone()));
            n += q.len();
            if routed {
                segs.push(Segment::Embeds(
                    self.w("visor.routing_token").reshape((1, ()))?,
                ));
                route_pos.push(n);
                n += 1;
            }
        }
        segs.push(Segment::Text(answer.to_vec()));
        let prompt = Prompt::build(dec, &[segs])?;
        let s = prompt.seq();
        let vis = prompt.visual[0].clone();
        let causal = attention_mask(&[0], s, s, dev)?;
        let text_mask = mask_columns(causal.clone(), std::slice::from_ref(&vis))?;
        let is_text: Vec<f32> = (0..s)
            .map(|i| f32::from(u8::from(!vis.contains(&i))))
            .collect();
        let is_text = Tensor::from_vec(is_text, (1, s, 1), dev)?;
        let is_vis = (1.0 - &is_text)?;

        let layers = dec.num_layers();
        let kinds = |c: usize| -> Vec<LayerKind> {
            (0..layers)
                .map(|l| {
                    if self.cfg.configurations[c].contains(&l) {
                        LayerKind::SelfAttention
                    } else if self.cfg.cross_attention_layers.contains(&l) {
                        LayerKind::CrossAttention
                    } else {
                        LayerKind::Text
                    }
                })
                .collect()
        };
        let router_at = if routed {
            self.cfg.router_layer()
        } else {
            None
        };
        let mut configuration = match self.cfg.route {
            Route::Fixed(c) => c,
            Route::Router => 0, // layers up to the router's block agree
        };
        let mut router_logits = Vec::new();
        let mut attention = Vec::new();
        let last = (0..s)
            .rev()
            .find(|i| !vis.contains(i))
            .expect("a text token");
        let mut x = prompt.embeds.clone();
        for l in 0..layers {
            let mut cache = KvCache::new(layers);
            let kind = kinds(configuration)[l];
            x = match kind {
                LayerKind::SelfAttention => {
                    dec.forward_layers(&x, &prompt.positions, Some(&causal), l..l + 1, &mut cache)?
                }
                LayerKind::CrossAttention | LayerKind::Text => {
                    if kind == LayerKind::CrossAttention {
                        let (y, probs) = self.cross(l, &x, &vis)?;
                        let at_last = probs.narrow(1, last, 1)?.mean(0)?.flatten_all()?;
                        attention.push((l, at_last.to_vec1()?));
                        x = (&x + y.broadcast_mul(&is_text)?)?;
                    }
                    let y = dec.forward_layers(
                        &x,
                        &prompt.positions,
                        Some(&text_mask),
                        l..l + 1,
                        &mut cache,
                    )?;
                    (y.broadcast_mul(&is_text)? + x.broadcast_mul(&is_vis)?)?
                }
            };
            if router_at == Some(l) {
                let mut picks = Vec::new();
                for &p in &route_pos {
                    let logits = self.router(&x.i((0, p..p + 1))?)?;
                    picks.push(host_argmax(&logits));
                    router_logits.push(logits);
                }
                configuration = costliest(self.cfg, &picks);
            }
        }
        Ok(RowRun {
            configuration,
            router_logits,
            logits: dec.logits(&x.narrow(1, last, 1)?)?.flatten_all()?,
            attention,
        })
    }

    /// Checks every step of row `row` of `run` against a full recompute
    /// over the tokens generated before it.
    fn check(&self, input: &VisorInput, run: &VisorRun, row: usize, what: &str) -> Result<()> {
        let tokens = &run.generation.tokens[row];
        for step in 0..tokens.len() {
            let r = self.run(input, row, &tokens[..step])?;
            assert_eq!(r.configuration, run.configuration[row], "{what}: row {row}");
            let got = run.generation.logits[step].get(row)?;
            let d = max_abs_diff(&got, &r.logits)?;
            assert!(
                d < TOL,
                "{what}: row {row}, step {step}: logits differ by {d}"
            );
        }
        Ok(())
    }
}

/// The index of the largest value, ties to the lower index.
fn host_argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best })
}

/// The largest value minus the second largest.
fn margin(v: &[f32]) -> f64 {
    let top = host_argmax(v);
    let second = (0..v.len())
        .filter(|&i| i != top)
        .map(|i| v[i])
        .fold(f32::NEG_INFINITY, f32::max);
    f64::from(v[top]) - f64::from(second)
}

/// The configuration of most self-attention layers among `picks`, ties to
/// the lower index.
fn costliest(cfg: &VisorConfig, picks: &[usize]) -> usize {
    let mut best = picks[0];
    for &c in picks {
        let (n, m) = (cfg.configurations[c].len(), cfg.configurations[best].len());
        if n > m || (n == m && c < best) {
            best = c;
        }
    }
    best
}

// ---------------------------------------------------------------------

#[test]
fn every_layer_self_attention_and_no_cross_attention_is_the_dense_model() -> Result<()> {
    let s = setup()?;
    let layers = s.cfg.text.num_layers;
    let cfg = VisorConfig {
        cross_attention_layers: Vec::new(),
        configurations: vec![(0..layers).collect()],
        route: Route::Fixed(0),
        pack_ratio: None,
    };
    let v = visor(&s, &cfg, VISOR_SEED)?;
    for g in [1, 2] {
        let inp = input(
            &s,
            "You see an image.",
            &[&["Where is the red square?"], &["Count the shapes."]],
            g,
        )?;
        let run = v.generate(&s.model, &inp, STEPS)?;
        // The dense model over the same visual tokens (after the position
        // convolution, VISOR's input embeddings).
        let (visual, _) = v.visual_tokens(&s.model, &inp.pixels, inp.grid)?;
        let questions: Vec<Vec<u32>> = inp.questions.iter().map(|q| q[0].clone()).collect();
        let prompt = s
            .model
            .build_prompt_from_embeds(&visual, &inp.system, &questions)?;
        let dense = s.model.generate_dense(&prompt, STEPS)?;
        assert_eq!(run.generation.tokens, dense.tokens, "grid {g}");
        assert_eq!(run.generation.positions, dense.positions, "grid {g}");
        for (step, (a, b)) in run.generation.logits.iter().zip(&dense.logits).enumerate() {
            let d = max_abs_diff(a, b)?;
            assert!(d < TOL, "grid {g}, step {step}: logits differ by {d}");
        }
        let full = (prompt.seq() - prompt.starts[1]) * layers;
        assert_eq!(
            run.kv_entries[1], full,
            "every layer caches the dense layout"
        );
    }
    Ok(())
}

#[test]
fn the_routed_model_equals_the_model_in_plain_candle_ops() -> Result<()> {
    let s = setup()?;
    let v = visor(&s, &VisorConfig::for_model(&s.cfg), VISOR_SEED)?;
    let inp = two_rows(&s)?;
    let run = v.generate(&s.model, &inp, STEPS)?;
    assert_ne!(
        run.configuration[0], run.configuration[1],
        "the rows chose different configurations"
    );
    let reference = Reference::new(&s.model, &v);
    for row in 0..2 {
        reference.check(&inp, &run, row, "routed")?;
    }
    // The bookkeeping, by hand: per row its text (system, question, one
    // routing token) and 64 visual tokens; the chosen self-attention layers
    // cache both, the others the text, each cross-attention layer the
    // visual K/V; attention FLOPs 4 Hq D per query-key pair.
    let cfg = v.config();
    let t = &s.cfg.text;
    let pair = 4.0 * (t.num_heads * t.head_dim) as f64;
    for row in 0..2 {
        let text = inp.system.len() + inp.questions[row][0].len() + 1;
        assert_eq!(run.text[row], text);
        let sa = &cfg.configurations[run.configuration[row]];
        let ca = cfg.cross_attention_layers.len(); // disjoint from every configuration
        let n = text + 64;
        assert_eq!(
            run.kv_entries[row],
            sa.len() * n + (24 - sa.len()) * text + ca * 64
        );
        let f = run.flops[row];
        let causal = |n: usize| (n * (n + 1) / 2) as f64;
        assert_eq!(f.self_attention, sa.len() as f64 * pair * causal(n));
        assert_eq!(f.cross_attention, ca as f64 * pair * (text * 64) as f64);
        assert_eq!(f.text, (24 - sa.len()) as f64 * pair * causal(text));
        assert_eq!(
            f.dense,
            24.0 * pair * causal(n - 1),
            "the dense prompt has no routing token"
        );
    }
    Ok(())
}

/// What the pictures show: the last text token's attention over the
/// visual tokens in each cross-attention layer (from the op's lse and
/// q . k) equals the reference's softmax, sums to 1, and recording it
/// changes nothing the run decides.
#[test]
fn the_recorded_attention_equals_the_reference_softmax() -> Result<()> {
    let s = setup()?;
    let v = visor(&s, &VisorConfig::for_model(&s.cfg), VISOR_SEED)?;
    let inp = two_rows(&s)?;
    let plain = v.generate(&s.model, &inp, 2)?;
    let run = v.generate_recording(&s.model, &inp, 2)?;
    assert!(plain.attention.iter().all(Vec::is_empty));
    assert_eq!(run.generation.tokens, plain.generation.tokens);
    assert_eq!(run.grid, (8, 8));
    let reference = Reference::new(&s.model, &v);
    let ca = &v.config().cross_attention_layers;
    for row in 0..2 {
        let want = reference.run(&inp, row, &[])?.attention;
        let got = &run.attention[row];
        let layers: Vec<usize> = got.iter().map(|(l, _)| *l).collect();
        assert_eq!(&layers, ca, "row {row}: every cross-attention layer");
        assert_eq!(layers, want.iter().map(|(l, _)| *l).collect::<Vec<_>>());
        for ((l, g), (_, w)) in got.iter().zip(&want) {
            assert_eq!(g.len(), 64);
            let sum: f32 = g.iter().sum();
            assert!(
                (sum - 1.0).abs() < 1e-4,
                "row {row} layer {l}: sums to {sum}"
            );
            let d = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-5, "row {row} layer {l}: differs by {d}");
        }
    }
    Ok(())
}

#[test]
fn fixed_configurations_equal_the_model_in_plain_candle_ops() -> Result<()> {
    let s = setup()?;
    let base = VisorConfig::for_model(&s.cfg);
    // The costliest (7 self-attention layers), the cheapest, and a
    // cross-attention-only schedule (no self-attention layer).
    let mut ca_only = base.clone();
    ca_only.configurations = vec![Vec::new()];
    ca_only.route = Route::Fixed(0);
    for cfg in [base.fixed(base.costliest()), base.fixed(0), ca_only] {
        let v = visor(&s, &cfg, VISOR_SEED)?;
        let inp = two_rows(&s)?;
        let run = v.generate(&s.model, &inp, STEPS)?;
        let reference = Reference::new(&s.model, &v);
        for row in 0..2 {
            reference.check(&inp, &run, row, &format!("{:?}", cfg.route))?;
        }
    }
    Ok(())
}

#[test]
fn incremental_decoding_equals_a_full_prefill_of_the_longer_prompt() -> Result<()> {
    let s = setup()?;
    let base = VisorConfig::for_model(&s.cfg);
    for cfg in [base.clone(), base.fixed(base.costliest())] {
        let v = visor(&s, &cfg, VISOR_SEED)?;
        let inp = two_rows(&s)?;
        let run = v.generate(&s.model, &inp, STEPS)?;
        let answers: Vec<Vec<u32>> = run
            .generation
            .tokens
            .iter()
            .map(|t| t[..STEPS - 1].to_vec())
            .collect();
        let (full, configuration) = v.text_logits(&s.model, &inp, &answers)?;
        assert_eq!(configuration, run.configuration);
        for (row, logits) in full.iter().enumerate() {
            let first = run.text[row] - 1; // the prompt's last text token
            for step in 0..STEPS {
                let d = max_abs_diff(
                    &run.generation.logits[step].get(row)?,
                    &logits.get(first + step)?,
                )?;
                assert!(d < TOL, "{:?}: row {row}, step {step}: {d}", cfg.route);
            }
        }
    }
    Ok(())
}

#[test]
fn the_router_picks_the_argmax_and_the_costliest_of_several_questions() -> Result<()> {
    let s = setup()?;
    let v = visor(&s, &VisorConfig::for_model(&s.cfg), VISOR_SEED)?;
    let inp = input(
        &s,
        "You see an image.",
        // The seeded router: row 0 predicts [1, 4, 7], [1, 4, 7], then
        // [1, 4, 10, 16] (costlier, last); row 1 [1, 10, 16], then
        // [1, 4, 7] (as costly, lower index).
        &[
            &["Is it big?", "How many?", "Where?"],
            &["Any circles?", "What is left?"],
        ],
        1,
    )?;
    let run = v.generate(&s.model, &inp, STEPS)?;
    let reference = Reference::new(&s.model, &v);
    let cfg = v.config();
    let mut later_decides = 0;
    for row in 0..2 {
        let r = reference.run(&inp, row, &[])?;
        assert_eq!(run.router_logits[row].len(), inp.questions[row].len());
        for (got, want) in run.router_logits[row].iter().zip(&r.router_logits) {
            let d = got
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d < TOL, "row {row}: router logits differ by {d}");
        }
        let picks: Vec<usize> = r.router_logits.iter().map(|l| host_argmax(l)).collect();
        assert_eq!(
            run.predictions[row], picks,
            "row {row}: the argmax per question"
        );
        assert_eq!(run.configuration[row], costliest(cfg, &picks), "row {row}");
        later_decides += usize::from(picks[0] != run.configuration[row]);
        reference.check(&inp, &run, row, "several questions")?;
    }
    assert_eq!(
        later_decides, 2,
        "in each row a later question decides (a costlier one, a tie to a lower index): {:?}",
        run.predictions
    );
    // The rule itself, ties included: [1, 4, 7] (2) and [1, 4, 16] (3) cost
    // the same, the lower index wins; [1, 4, 7, 16] (6) costs more.
    assert_eq!(cfg.costliest_of(&[3, 2]), 2);
    assert_eq!(cfg.costliest_of(&[0, 6, 3]), 6);
    assert_eq!(cfg.costliest(), 12);
    Ok(())
}

#[test]
fn the_runs_the_gpu_test_repeats_decide_by_far_more_than_rounding() -> Result<()> {
    let s = setup()?;
    let inp = common::visor::input(&s.cfg, &Device::Cpu)?;
    for (name, v) in common::visor::visors(&s.cfg, &Device::Cpu)? {
        let run = v.generate(&s.model, &inp, STEPS)?;
        for (row, logits) in run.router_logits.iter().enumerate() {
            for l in logits {
                let m = margin(l);
                assert!(
                    m >= DECISION_MARGIN,
                    "{name}: row {row}: a router prediction wins by only {m:e}"
                );
            }
        }
        assert_token_margins(&run.generation.logits, name)?;
        if v.config().route == Route::Router {
            assert_ne!(run.configuration[0], run.configuration[1], "{name}");
            assert_eq!(run.router_logits[1].len(), 2, "{name}: two questions");
        }
        if v.config().pack_ratio.is_none() {
            let reference = Reference::new(&s.model, &v);
            for row in 0..2 {
                reference.check(&inp, &run, row, name)?;
            }
        }
    }
    Ok(())
}

#[test]
fn rows_that_chose_different_configurations_decode_as_each_row_alone() -> Result<()> {
    let s = setup()?;
    let v = visor(&s, &VisorConfig::for_model(&s.cfg), VISOR_SEED)?;
    let inp = two_rows(&s)?;
    let batch = v.generate(&s.model, &inp, STEPS)?;
    assert_ne!(batch.configuration[0], batch.configuration[1]);
    for row in 0..2 {
        let alone = VisorInput {
            pixels: inp.pixels.narrow(0, row, 1)?,
            questions: vec![inp.questions[row].clone()],
            ..inp.clone()
        };
        let run = v.generate(&s.model, &alone, STEPS)?;
        assert_eq!(run.configuration[0], batch.configuration[row]);
        // The batch row moved to row 0 of a one-row view.
        let batch_row = foveal_candle::Generation {
            tokens: vec![batch.generation.tokens[row].clone()],
            positions: vec![batch.generation.positions[row].clone()],
            logits: batch
                .generation
                .logits
                .iter()
                .map(|l| l.narrow(0, row, 1))
                .collect::<Result<_>>()?,
        };
        assert_row_alone_as_in_batch(&run.generation, &batch_row)?;
    }
    Ok(())
}

#[test]
fn decoding_continues_at_the_end_of_the_dense_layout() -> Result<()> {
    let s = setup()?;
    let base = VisorConfig::for_model(&s.cfg);
    let nv = s.model.num_patches() as u32;
    let system = "You see an image.";
    for cfg in [base.clone(), base.fixed(base.costliest()), base.fixed(0)] {
        let v = visor(&s, &cfg, VISOR_SEED)?;
        // Row 0: the image last (no question); row 1: text after it.
        let inp = input(&s, system, &[&[""], &["Count the shapes."]], 1)?;
        let run = v.generate(&s.model, &inp, STEPS)?;
        let routing = u32::from(cfg.route == Route::Router);
        let ends = [
            system.len() as u32 + nv + routing,
            system.len() as u32 + nv + "Count the shapes.".len() as u32 + routing,
        ];
        for (row, &end) in ends.iter().enumerate() {
            let want: Vec<u32> = (end..end + STEPS as u32).collect();
            assert_eq!(
                run.generation.positions[row], want,
                "{:?}: row {row}",
                cfg.route
            );
        }
        let reference = Reference::new(&s.model, &v);
        for row in 0..2 {
            reference.check(&inp, &run, row, "the image last")?;
        }
    }
    Ok(())
}

#[test]
fn a_row_without_text_is_refused_and_a_routed_one_decodes_as_alone() -> Result<()> {
    let s = setup()?;
    let base = VisorConfig::for_model(&s.cfg);
    // A fixed configuration and a row of only its image: nothing to predict from.
    let fixed = visor(&s, &base.fixed(0), VISOR_SEED)?;
    for questions in [&[&[""] as &[&str]] as &[&[&str]], &[&["Count."], &[""]]] {
        let inp = input(&s, "", questions, 1)?;
        let err = fixed
            .generate(&s.model, &inp, STEPS)
            .unwrap_err()
            .to_string();
        let row = questions.len() - 1;
        assert!(
            err.contains(&format!("row {row} has no text token")),
            "{err}"
        );
    }
    // With the router the row is its image and the routing token.
    let routed = visor(&s, &base, VISOR_SEED)?;
    let batch_in = input(&s, "", &[&[""], &["Count the shapes."]], 1)?;
    let batch = routed.generate(&s.model, &batch_in, STEPS)?;
    let alone_in = VisorInput {
        pixels: batch_in.pixels.narrow(0, 0, 1)?,
        questions: vec![batch_in.questions[0].clone()],
        ..batch_in.clone()
    };
    let alone = routed.generate(&s.model, &alone_in, STEPS)?;
    assert_eq!(
        alone.generation.positions[0][0],
        s.model.num_patches() as u32 + 1
    );
    assert_row_alone_as_in_batch(&alone.generation, &batch.generation)?;
    Ok(())
}

#[test]
fn visor_tr_packs_the_tokens_before_the_projector() -> Result<()> {
    let s = setup()?;
    // rho = 2 on the 8 x 8 grid: resized to 2 round(8 / sqrt 2) = 12, packed 6 x 6.
    let v = visor(&s, &VisorConfig::packed(&s.cfg, 2.0), VISOR_SEED)?;
    let inp = two_rows(&s)?;
    let run = v.generate(&s.model, &inp, STEPS)?;
    assert_eq!(run.visual, vec![64, 64]);
    assert_eq!(run.packed, Some(vec![36, 36]));
    // The packed tokens against candle: bilinear resize (align_corners =
    // false), space-to-depth, the packed projector, the convolution.
    let w: HashMap<String, Tensor> = v.named_tensors().into_iter().collect();
    let layer = s.cfg.feature_layer_index();
    let f = s
        .model
        .vision
        .forward_upto(&inp.pixels, layer)?
        .swap_remove(layer);
    let c = f.dim(2)?;
    let y = f
        .reshape((2, 8, 8, c))?
        .permute((0, 3, 1, 2))?
        .contiguous()?
        .upsample_bilinear2d(12, 12, false)?
        .permute((0, 2, 3, 1))?; // [2, 12, 12, C]
    let packed = y
        .reshape((2, 6, 2, 6, 2, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .reshape((2, 36, 4 * c))?;
    let lin = |x: &Tensor, n: &str| -> Result<Tensor> {
        x.broadcast_matmul(&w[&format!("{n}.weight")].t()?)?
            .broadcast_add(&w[&format!("{n}.bias")])
    };
    let h = lin(&packed, "multi_modal_projector.packed.linear_1")?.gelu_erf()?;
    let proj = lin(&h, "multi_modal_projector.packed.linear_2")?;
    let dm = proj.dim(2)?;
    let conv = proj
        .transpose(1, 2)?
        .contiguous()?
        .conv1d(&w["visor.pos_conv.weight"], 3, 1, 1, dm)?
        .broadcast_add(&w["visor.pos_conv.bias"].reshape((1, dm, 1))?)?
        .transpose(1, 2)?;
    let want = (&proj + conv)?;
    let (got, _) = v.visual_tokens(&s.model, &inp.pixels, (1, 1))?;
    let d = max_abs_diff(&got, &want)?;
    assert!(d < TOL, "packed visual tokens differ by {d}");
    Ok(())
}

#[test]
fn the_weights_round_trip_through_safetensors() -> Result<()> {
    let s = setup()?;
    let dir = std::env::temp_dir().join(format!("foveal-visor-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for cfg in [
        VisorConfig::for_model(&s.cfg),
        VisorConfig::packed(&s.cfg, 2.0),
    ] {
        let v = visor(&s, &cfg, VISOR_SEED)?;
        let names: Vec<String> = v.named_tensors().into_iter().map(|(n, _)| n).collect();
        for want in [
            "visor.pos_conv.weight",
            "visor.routing_token",
            "visor.router.fc2.weight",
            "language_model.model.layers.2.cross_attn.q_proj.weight",
            "language_model.model.layers.23.cross_attn_kv_layernorm.weight",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
        }
        assert_eq!(
            names
                .iter()
                .any(|n| n.starts_with("multi_modal_projector.packed.")),
            cfg.pack_ratio.is_some()
        );
        assert!(!names.iter().any(|n| n.contains("layers.1.cross_attn")));
        let path = dir.join("visor.safetensors");
        v.save_safetensors(&path)?;
        let back = Visor::load_safetensors(&path, &s.cfg, &cfg, &Device::Cpu, DType::F32)?;
        for ((n, a), (m, b)) in v.named_tensors().iter().zip(back.named_tensors().iter()) {
            assert_eq!(n, m);
            assert_eq!(max_abs_diff(a, b)?, 0.0, "{n}");
        }
        let inp = two_rows(&s)?;
        let (a, b) = (
            v.generate(&s.model, &inp, STEPS)?,
            back.generate(&s.model, &inp, STEPS)?,
        );
        assert_eq!(a.generation.tokens, b.generation.tokens);
        let other = visor(&s, &cfg, 4)?;
        let differs = v
            .named_tensors()
            .iter()
            .zip(other.named_tensors().iter())
            .any(|((_, a), (_, b))| max_abs_diff(a, b).is_ok_and(|d| d > 0.0));
        assert!(differs, "another seed gives other weights");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn the_paper_schedule_is_the_default_and_any_schedule_loads_from_json() -> Result<()> {
    let s = setup()?;
    let cfg = VisorConfig::for_model(&s.cfg);
    assert_eq!(
        cfg.cross_attention_layers,
        vec![2, 5, 8, 11, 14, 17, 20, 23]
    );
    assert_eq!(cfg.configurations.len(), 13);
    assert_eq!(cfg.configurations[12], vec![1, 4, 7, 10, 16, 19, 22]);
    assert_eq!(cfg.self_attention_layers(), vec![1, 4, 7, 10, 16, 19, 22]);
    assert_eq!(cfg.first_skippable(), Some(4));
    assert_eq!(cfg.router_layer(), Some(3));
    assert_eq!(cfg.route, Route::Router);
    assert_eq!(VisorConfig::from_json(&cfg.to_json())?, cfg);

    // A schedule of its own, from a model config's JSON.
    let json = r#"{"cross_attention_layers": [0, 9, 15],
        "self_attention_configurations": [[3, 12], [3], [3, 6, 20]],
        "token_pack_ratio": 4}"#;
    let own = VisorConfig::from_json(json)?;
    assert_eq!(own.route, Route::Router);
    assert_eq!(own.router_layer(), Some(5));
    assert_eq!(own.pack_ratio, Some(4.0));
    let v = visor(&s, &own, VISOR_SEED)?;
    let inp = two_rows(&s)?;
    let run = v.generate(&s.model, &inp, STEPS)?;
    assert_eq!(
        run.packed,
        Some(vec![16, 16]),
        "rho 4: 8 x 8 packed to 4 x 4"
    );
    // The reference encodes unpacked tokens (packing is checked against
    // candle in visor_tr_packs_the_tokens_before_the_projector): the same
    // schedule without packing against it.
    let unpacked = VisorConfig {
        pack_ratio: None,
        ..own.clone()
    };
    let v = visor(&s, &unpacked, VISOR_SEED)?;
    let run = v.generate(&s.model, &inp, STEPS)?;
    let reference = Reference::new(&s.model, &v);
    for row in 0..2 {
        reference.check(&inp, &run, row, "own schedule")?;
    }
    Ok(())
}

#[test]
fn bad_configurations_are_refused() -> Result<()> {
    let s = setup()?;
    let base = VisorConfig::for_model(&s.cfg);
    let with = |f: &dyn Fn(&mut VisorConfig)| {
        let mut c = base.clone();
        f(&mut c);
        c
    };
    let cases: Vec<(VisorConfig, &str)> = vec![
        (
            with(&|c| c.cross_attention_layers = vec![2, 24]),
            "ascending layers",
        ),
        (
            with(&|c| c.cross_attention_layers = vec![5, 2]),
            "ascending layers",
        ),
        (
            with(&|c| c.configurations[3] = vec![4, 1]),
            "configuration 3",
        ),
        (with(&|c| c.configurations.clear()), "no configuration"),
        (with(&|c| c.configurations[1] = vec![1, 4]), "listed twice"),
        (
            with(&|c| c.route = Route::Fixed(13)),
            "fixed configuration 13",
        ),
        (
            with(&|c| c.configurations = vec![vec![1, 4]]),
            "nothing to choose",
        ),
        (
            with(&|c| c.configurations = vec![vec![0, 4], vec![4]]),
            "no block before it",
        ),
        (with(&|c| c.pack_ratio = Some(1000.0)), "packing ratio"),
        (with(&|c| c.pack_ratio = Some(-1.0)), "packing ratio"),
    ];
    for (cfg, want) in cases {
        let err = visor(&s, &cfg, 3).unwrap_err().to_string();
        assert!(err.contains(want), "{cfg:?}: {err}");
    }
    assert!(VisorConfig::from_json(r#"{"cross_attention_layers": [1]}"#).is_err());
    assert!(VisorConfig::from_json(
        r#"{"cross_attention_layers": [1], "self_attention_configurations": [[-1]]}"#
    )
    .is_err());
    // The router needs a routing token, hence a question, in every row.
    let v = visor(&s, &base, VISOR_SEED)?;
    let inp = VisorInput {
        questions: vec![vec![byte_tokens("Count.")], Vec::new()],
        ..two_rows(&s)?
    };
    let err = v.generate(&s.model, &inp, STEPS).unwrap_err().to_string();
    assert!(err.contains("routing token"), "{err}");
    Ok(())
}

// ---------------------------------------------------------------------
// The wrappers of the VISOR ops against candle compositions.
// ---------------------------------------------------------------------

#[test]
fn cross_attention_equals_matmul_softmax_matmul_on_strided_views() -> Result<()> {
    let dev = Device::Cpu;
    let (b, nq, nk, hq, hkv, d) = (2, 5, 9, 4, 2, 16);
    let q = Tensor::randn(0f32, 1.0, (b, nq, hq, d), &dev)?;
    // Keys and values stored [B, Hkv, Nk, D]: the op reads them transposed.
    let k = Tensor::randn(0f32, 1.0, (b, hkv, nk, d), &dev)?.transpose(1, 2)?;
    let v = Tensor::randn(0f32, 1.0, (b, hkv, nk, d), &dev)?.transpose(1, 2)?;
    let (q_lens, kv_lens) = ([5, 3], [9, 4]);
    let lens = AttendLens::new(&q_lens, &kv_lens, &dev)?;
    let o = ops::cross_attention(&q, &k, &v, &lens, None)?;
    // The same call with its lse, and the probabilities from q . k and it.
    let (o_lse, lse) = ops::cross_attention_lse(&q, &k, &v, &lens, None)?;
    assert_eq!(max_abs_diff(&o_lse, &o)?, 0.0);
    let probs = ops::cross_attention_probs(&q, &k, &lse, lens.host(), None)?; // [B, Hq, Nq, Nk]
    for row in 0..b {
        let (n, m) = (q_lens[row], kv_lens[row]);
        let qr = q.get(row)?.narrow(0, 0, n)?.transpose(0, 1)?.contiguous()?; // [Hq, n, D]
        let rep = |t: &Tensor| -> Result<Tensor> {
            let t = t.get(row)?.narrow(0, 0, m)?.transpose(0, 1)?; // [Hkv, m, D]
            Tensor::cat(
                &(0..hq)
                    .map(|h| t.get(h / (hq / hkv))?.unsqueeze(0))
                    .collect::<Result<Vec<_>>>()?,
                0,
            )
        };
        let (kr, vr) = (rep(&k)?, rep(&v)?);
        let s = (qr.matmul(&kr.t()?.contiguous()?)? / (d as f64).sqrt())?;
        let softmax = candle_nn::ops::softmax_last_dim(&s)?;
        let want = softmax.matmul(&vr.contiguous()?)?;
        let got = o.get(row)?.narrow(0, 0, n)?.transpose(0, 1)?;
        let diff = max_abs_diff(&got, &want)?;
        assert!(diff < 1e-5, "row {row}: {diff}");
        let p = probs.get(row)?; // [Hq, Nq, Nk]
        let diff = max_abs_diff(&p.narrow(1, 0, n)?.narrow(2, 0, m)?, &softmax)?;
        assert!(diff < 1e-6, "row {row}: probabilities differ by {diff}");
        let total = p.sum_all()?.to_scalar::<f32>()?;
        assert!(
            (total - (hq * n) as f32).abs() < 1e-4,
            "row {row}: every valid query's probabilities sum to 1, 0 elsewhere ({total})"
        );
        let past = o.get(row)?.narrow(0, n, nq - n)?;
        assert_eq!(
            past.abs()?.sum_all()?.to_scalar::<f32>()?,
            0.0,
            "slots past q_len are 0"
        );
    }
    let bad = AttendLens::new(&[5, 3], &[10, 4], &dev)?;
    assert!(
        ops::cross_attention(&q, &k, &v, &bad, None).is_err(),
        "kv_len past Nk"
    );
    Ok(())
}

#[test]
fn pos_conv1d_equals_candle_conv1d_per_row() -> Result<()> {
    let dev = Device::Cpu;
    let (b, n, c) = (3, 10, 8);
    let x = Tensor::randn(0f32, 1.0, (b, n, c), &dev)?;
    let w = Tensor::randn(0f32, 1.0, (c, 1, 7), &dev)?;
    let bias = Tensor::randn(0f32, 1.0, c, &dev)?;
    let lens = [10, 2, 0]; // a row shorter than the kernel, an empty row
    let got = ops::pos_conv1d(&x, &lens, &w.reshape((c, 7))?, &bias)?;
    for (row, &len) in lens.iter().enumerate() {
        if len > 0 {
            let xr = x
                .get(row)?
                .narrow(0, 0, len)?
                .t()?
                .unsqueeze(0)?
                .contiguous()?; // [1, C, len]
            let conv = xr
                .conv1d(&w, 3, 1, 1, c)?
                .broadcast_add(&bias.reshape((1, c, 1))?)?;
            let want = (xr + conv)?.squeeze(0)?.t()?;
            let d = max_abs_diff(&got.get(row)?.narrow(0, 0, len)?, &want)?;
            assert!(d < 1e-5, "row {row}: {d}");
        }
        let past = got.get(row)?.narrow(0, len, n - len)?;
        assert_eq!(past.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
    }
    Ok(())
}

#[test]
fn token_pack_at_rho_4_is_space_to_depth_and_bilinear_otherwise() -> Result<()> {
    let dev = Device::Cpu;
    let (b, h, w, c) = (2, 6, 8, 3);
    // A strided view: stored [B, w, h, C], read as [B, h, w, C].
    let x = Tensor::randn(0f32, 1.0, (b, w, h, c), &dev)?.transpose(1, 2)?;
    let got = ops::token_pack(&x, 4.0)?;
    let want = x
        .reshape((b, h / 2, 2, w / 2, 2, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .reshape((b, h / 2, w / 2, 4 * c))?;
    assert_eq!(max_abs_diff(&got, &want)?, 0.0);
    // rho = 2: 6 -> 2 round(4.24) = 8, 8 -> 2 round(5.66) = 12.
    let got = ops::token_pack(&x, 2.0)?;
    let y = x
        .permute((0, 3, 1, 2))?
        .contiguous()?
        .upsample_bilinear2d(8, 12, false)?
        .permute((0, 2, 3, 1))?;
    let want = y
        .reshape((b, 4, 2, 6, 2, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .reshape((b, 4, 6, 4 * c))?;
    let d = max_abs_diff(&got, &want)?;
    assert!(d < 1e-5, "{d}");
    assert!(ops::token_pack(&x, 0.0).is_err());
    Ok(())
}
