//! Gaze Attention in the model: with every region routed it is the dense
//! model (same context tokens and prefill mask); with few regions, every
//! decode step equals dense attention with the unrouted regions masked per
//! head (routes recomputed here from the cached keys); the context-token
//! prefill mask; several images and video frames per row; decoding
//! continues where the dense layout ends; a row of only an image decodes as
//! in a batch; the context tokens round-trip through safetensors.

use std::collections::HashSet;

use candle_core::{DType, Device, Result, Tensor};
use foveal::RegionShape;
use foveal_candle::prompt::byte_tokens;
use foveal_candle::{
    attention_mask, AttentionCore, GazeAttention, GazeConfig, GazePrompt, GazeRun, GazeSegment,
    GazeUnit, LlavaModel, Method, MASK_MIN,
};

mod common;
use common::gaze::{
    config, image, image_batch, image_embeds, mixed_batch, model, BATCHES, ROUTED_K, SIDE, STEPS,
};
use common::{
    assert_decodes_from, assert_row_alone_as_in_batch, assert_steps_close, assert_token_margins,
    max_abs_diff, replay_steps, DECISION_MARGIN,
};

/// The regions of a row, computed here from its units: `items` lists how
/// many consecutive units form one image (1) or video (its frames).
fn regions_of(units: &[GazeUnit], items: &[usize], shape: RegionShape) -> Vec<Vec<usize>> {
    let mut regions = Vec::new();
    let mut at = 0;
    for &n in items {
        let frames = &units[at..at + n];
        at += n;
        for group in frames.chunks(shape.frames) {
            let (h, w) = (group[0].height, group[0].width);
            for y0 in (0..h).step_by(shape.height) {
                for x0 in (0..w).step_by(shape.width) {
                    let mut r = Vec::new();
                    for u in group {
                        for y in y0..(y0 + shape.height).min(h) {
                            for x in x0..(x0 + shape.width).min(w) {
                                r.push(u.start + y * w + x);
                            }
                        }
                    }
                    regions.push(r);
                }
            }
        }
    }
    assert_eq!(at, units.len());
    regions
}

/// The independent reference of a gaze decode step: per head, the region
/// descriptors are the mean cached keys of each region (f64), the routed
/// regions the `k` best by q . descriptor, and attention is dense softmax
/// attention with the other regions' tokens (and the left padding) masked.
/// It also records the smallest routing margin it saw ([`route_margin`]).
struct MaskedRouting {
    regions: Vec<Vec<Vec<usize>>>,
    starts: Vec<usize>,
    k: usize,
    min_margin: f64,
}

impl AttentionCore for MaskedRouting {
    fn attend(
        &mut self,
        _layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, hq, sq, d) = q.dims4()?;
        let (_, hkv, s, _) = k.dims4()?;
        assert_eq!(sq, 1, "decoding one token");
        let g = hq / hkv;
        let qv = q.flatten_all()?.to_vec1::<f32>()?;
        let kv = k.flatten_all()?.to_vec1::<f32>()?;
        let mut mask = vec![0f32; b * hq * s];
        for row in 0..b {
            for h in 0..hq {
                let key = |p: usize| &kv[((row * hkv + h / g) * s + p) * d..][..d];
                let qh = &qv[(row * hq + h) * d..][..d];
                let scores: Vec<f64> = self.regions[row]
                    .iter()
                    .map(|toks| {
                        (0..d)
                            .map(|i| {
                                let mean = toks.iter().map(|&p| f64::from(key(p)[i])).sum::<f64>()
                                    / toks.len() as f64;
                                mean * f64::from(qh[i])
                            })
                            .sum()
                    })
                    .collect();
                let mut order: Vec<usize> = (0..scores.len()).collect();
                order.sort_by(|&x, &y| scores[y].total_cmp(&scores[x]).then(x.cmp(&y)));
                self.min_margin = self.min_margin.min(route_margin(&scores, &order, self.k));
                let routed: HashSet<usize> = order.into_iter().take(self.k).collect();
                let m = &mut mask[(row * hq + h) * s..][..s];
                m[..self.starts[row]].iter_mut().for_each(|x| *x = MASK_MIN);
                for (r, toks) in self.regions[row].iter().enumerate() {
                    if !routed.contains(&r) {
                        toks.iter().for_each(|&p| m[p] = MASK_MIN);
                    }
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, hq, 1, s), q.device())?;
        let repeat = |t: &Tensor| -> Result<Tensor> {
            t.unsqueeze(2)?
                .expand((b, hkv, g, s, d))?
                .reshape((b, hq, s, d))
        };
        let (k, v) = (repeat(k)?, repeat(v)?);
        let scores = ((q.matmul(&k.t()?)? * (d as f64).powf(-0.5))? + mask)?;
        candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)
    }
}

/// How far a routing decision is from changing: the gap between the k-th
/// and the (k+1)-th best region score, relative to the scores' size (no gap
/// to close when every region is routed).
fn route_margin(scores: &[f64], order: &[usize], k: usize) -> f64 {
    if k >= order.len() {
        return f64::INFINITY;
    }
    let (kth, next) = (scores[order[k - 1]], scores[order[k]]);
    (kth - next) / (1.0 + kth.abs())
}

/// Gaze decoding with `k` at least every row's region count is decoding
/// with dense attention after the same prefill (context tokens and mask).
#[test]
fn routing_every_region_equals_dense_decoding() -> Result<()> {
    let (cfg, model) = model(&Device::Cpu)?;
    for (name, frames) in [("images", 1), ("mixed", 2)] {
        let probe = GazeAttention::seeded(&cfg, &config(1, frames), 3, &Device::Cpu, DType::F32)?;
        let prompt = match name {
            "images" => image_batch(&probe, &model)?,
            _ => mixed_batch(&probe, &model)?,
        };
        let k = prompt
            .layout()
            .map_err(candle_core::Error::wrap)?
            .max_regions();
        let gaze = GazeAttention::seeded(&cfg, &config(k, frames), 3, &Device::Cpu, DType::F32)?;
        let run = gaze.generate(&model, &prompt, STEPS)?;

        let dec = &model.decoder;
        let mut pre = gaze.prefill(&model, &prompt)?;
        let p = &prompt.prompt;
        let dense = dec.greedy(
            &pre.first_logits,
            &p.next_positions(),
            &p.starts,
            &mut pre.cache,
            STEPS,
        )?;
        assert_eq!(run.generation.tokens, dense.tokens, "{name}");
        for (step, (a, b)) in run.generation.logits.iter().zip(&dense.logits).enumerate() {
            let diff = max_abs_diff(a, b)?;
            assert!(diff < 1e-4, "{name}, step {step}: logits differ by {diff}");
        }
        assert_eq!(run.steps.len(), STEPS - 1);
        for (t, step) in run.steps.iter().enumerate() {
            for b in 0..p.batch() {
                assert_eq!(
                    step.attended(b),
                    step.dense(b) as f64,
                    "{name}: step {t} row {b} attends everything"
                );
            }
        }
    }
    Ok(())
}

/// With few regions per head, each decode step's logits are those of dense
/// attention in which, per layer and head, the regions this test routes
/// itself are visible and the others masked.
#[test]
fn routed_decoding_equals_dense_attention_with_unrouted_regions_masked() -> Result<()> {
    let (cfg, model) = model(&Device::Cpu)?;
    let k = ROUTED_K;
    for (name, frames, batch, items) in BATCHES {
        let gaze = GazeAttention::seeded(&cfg, &config(k, frames), 3, &Device::Cpu, DType::F32)?;
        let prompt = batch(&gaze, &model)?;
        let items: Vec<Vec<usize>> = items.iter().map(|it| it.to_vec()).collect();
        let run = gaze.generate(&model, &prompt, STEPS)?;
        let p = &prompt.prompt;
        for (b, it) in items.iter().enumerate() {
            let regions = regions_of(&prompt.units[b], it, gaze.config().region);
            assert!(
                regions.len() > k,
                "{name}: row {b} needs more regions than k"
            );
            let (attended, dense) = run.mean_attended(b);
            assert!(
                attended < dense,
                "{name}: row {b} attends {attended} of {dense}"
            );
        }

        let next = p.next_positions();
        let (want, margin) = routed_reference(&model, &gaze, &prompt, &items, &run, &next)?;
        // The GPU test (tests/gpu/gaze.rs) compares these routes and tokens
        // exactly across devices: sound only while every decision wins by far
        // more than the devices' rounding differences.
        assert!(
            margin >= DECISION_MARGIN,
            "{name}: a routing decision wins by only {margin:e}: the GPU test's exact comparison would be unsound"
        );
        assert_token_margins(&run.generation.logits, name)?;
        let d0 = max_abs_diff(&want[0], &run.generation.logits[0])?;
        assert!(d0 < 1e-5, "{name}: prefill logits differ by {d0}");
        assert_steps_close(&run.generation.logits, &want, 1e-4, name)?;
        let dec = &model.decoder;
        let dense = replay_steps(
            dec,
            &run.generation.tokens,
            &next,
            &mut gaze.prefill(&model, &prompt)?.cache,
            &[],
            |_, kv_len| attention_mask(&p.starts, 1, kv_len, &Device::Cpu),
        )?;
        let mut routing_mattered = false;
        for (d, w) in dense.iter().zip(&want[1..]) {
            routing_mattered |= max_abs_diff(d, w)? > 1e-3;
        }
        assert!(
            routing_mattered,
            "{name}: k = {k} never changed the logits: the test would prove nothing"
        );
    }
    Ok(())
}

/// The reference of a Gaze Attention run: the same prefill, then the
/// generated tokens fed back at `next[b]`, `next[b] + 1`, ... (the caller's
/// own account of where decoding continues), every layer's attention
/// routed by [`MaskedRouting`] (`items`: per row, the units of each image
/// or video). Returns every step's logits and the smallest routing margin
/// of every layer, head and step.
fn routed_reference(
    model: &LlavaModel,
    gaze: &GazeAttention,
    prompt: &GazePrompt,
    items: &[Vec<usize>],
    run: &GazeRun,
    next: &[u32],
) -> Result<(Vec<Tensor>, f64)> {
    let dec = &model.decoder;
    let p = &prompt.prompt;
    let mut core = MaskedRouting {
        regions: prompt
            .units
            .iter()
            .zip(items)
            .map(|(u, it)| regions_of(u, it, gaze.config().region))
            .collect(),
        starts: p.starts.clone(),
        k: gaze.config().k,
        min_margin: f64::INFINITY,
    };
    let mut pre = gaze.prefill(model, prompt)?;
    let mut out = vec![pre.first_logits];
    let tokens = &run.generation.tokens;
    for step in 1..tokens[0].len() {
        let ids: Vec<u32> = tokens.iter().map(|t| t[step - 1]).collect();
        let pos: Vec<u32> = next.iter().map(|&n| n + step as u32 - 1).collect();
        let span = [dec.span_all(&p.starts)];
        out.push(dec.decode_step_with(&ids, &pos, &span, &mut pre.cache, &mut core)?);
    }
    Ok((out, core.min_margin))
}

/// Decoding continues where the dense layout ends: with an image and a
/// 3-frame video last in their rows (their context tokens after them), and
/// with text after them, at k = 1, 2 and every region; every step's logits
/// equal the routed reference decoding there.
#[test]
fn decoding_continues_at_the_end_of_the_dense_layout() -> Result<()> {
    let (cfg, model) = model(&Device::Cpu)?;
    let e = image_embeds(&model, 4, 7)?;
    let system = byte_tokens("You see: ");
    let c = 4;
    for question in [vec![], byte_tokens("What moves?")] {
        let rows = vec![
            vec![GazeSegment::Text(system.clone()), image(e.get(0)?)],
            vec![
                GazeSegment::Text(system.clone()),
                GazeSegment::Video {
                    frames: e.narrow(0, 1, 3)?,
                    height: SIDE,
                    width: SIDE,
                },
            ],
        ];
        let rows: Vec<Vec<GazeSegment>> = rows
            .into_iter()
            .map(|mut r| {
                r.push(GazeSegment::Text(question.clone()));
                r
            })
            .collect();
        // Text, then per unit its 64 visual and c context tokens.
        let next: Vec<u32> = [1, 3]
            .iter()
            .map(|units| (system.len() + units * (SIDE * SIDE + c) + question.len()) as u32)
            .collect();
        for k in [1, 2, 18] {
            let gaze = GazeAttention::seeded(&cfg, &config(k, 2), 3, &Device::Cpu, DType::F32)?;
            let prompt = gaze.prompt(&model, &rows)?;
            let run = gaze.generate(&model, &prompt, STEPS)?;
            let what = format!("k {k}, question of {}", question.len());
            assert_decodes_from(&run.generation, &next, &what);
            let (want, _) =
                routed_reference(&model, &gaze, &prompt, &[vec![1], vec![3]], &run, &next)?;
            assert_steps_close(&run.generation.logits, &want, 1e-4, &what)?;
        }
    }
    Ok(())
}

/// Gaze Attention drops nothing from the cache and its context tokens are
/// always attended: a row that is only its image (and context tokens) at
/// k = 1 decodes the same alone and in a batch.
#[test]
fn a_row_that_is_only_its_image_decodes_alone_and_in_a_batch() -> Result<()> {
    let (cfg, model) = model(&Device::Cpu)?;
    let gaze = GazeAttention::seeded(&cfg, &config(1, 1), 3, &Device::Cpu, DType::F32)?;
    let e = image_embeds(&model, 2, 3)?;
    let alone = gaze.prompt(&model, &[vec![image(e.get(0)?)]])?;
    let batch = gaze.prompt(
        &model,
        &[
            vec![image(e.get(0)?)],
            vec![
                GazeSegment::Text(byte_tokens("Look: ")),
                image(e.get(1)?),
                GazeSegment::Text(byte_tokens("What is it?")),
            ],
        ],
    )?;
    let (a, b) = (
        gaze.generate(&model, &alone, STEPS)?,
        gaze.generate(&model, &batch, STEPS)?,
    );
    for step in &a.steps {
        assert!(step.layout.visible_len(0) >= 4, "its context tokens");
    }
    assert_row_alone_as_in_batch(&a.generation, &b.generation)
}

/// Row `[sys][image A][ctx][text][image B][ctx][question]` and the change
/// of its hidden states when one input embedding changes.
struct MaskProbe<'a> {
    model: &'a LlavaModel,
    prompt: GazePrompt,
}

impl<'a> MaskProbe<'a> {
    fn new(gaze: &GazeAttention, model: &'a LlavaModel) -> Result<Self> {
        let e = image_embeds(model, 2, 9)?;
        let rows = vec![vec![
            GazeSegment::Text(byte_tokens("Two images: ")),
            image(e.get(0)?),
            GazeSegment::Text(byte_tokens(" and ")),
            image(e.get(1)?),
            GazeSegment::Text(byte_tokens(" Same?")),
        ]];
        Ok(MaskProbe {
            model,
            prompt: gaze.prompt(model, &rows)?,
        })
    }

    /// Hidden states `[1, S, Dm]` after the first `layers` layers (the
    /// prefill with the context-token mask) of `embeds`.
    fn hidden(&self, embeds: &Tensor, layers: usize) -> Result<Tensor> {
        let dec = &self.model.decoder;
        let mut cache = dec.new_cache();
        let p = &self.prompt.prompt;
        dec.forward_layers(
            embeds,
            &p.positions,
            Some(&self.prompt.mask()?),
            0..layers,
            &mut cache,
        )
    }

    /// Per position, the largest change of the hidden state after `layers`
    /// layers when the input embedding at `pos` changes.
    fn change(&self, pos: usize, layers: usize) -> Result<Vec<f32>> {
        let embeds = &self.prompt.prompt.embeds;
        let (_, s, dm) = embeds.dims3()?;
        let mut delta = vec![0f32; s * dm];
        delta[pos * dm..(pos + 1) * dm]
            .iter_mut()
            .for_each(|x| *x = 0.5);
        let changed = (embeds + Tensor::from_vec(delta, (1, s, dm), &Device::Cpu)?)?;
        (self.hidden(&changed, layers)? - self.hidden(embeds, layers)?)?
            .abs()?
            .max(2)?
            .squeeze(0)?
            .to_vec1::<f32>()
    }
}

/// The mask itself shows after one layer (whose keys and values are the
/// inputs' own): a context token sees only its unit's visual tokens and its
/// unit's earlier context tokens. Through the whole model, visual tokens
/// (causal as usual) carry what precedes them, so there the guarantees are
/// causal ones: a later image leaves an earlier unit's context tokens alone,
/// and no change reaches an earlier position.
#[test]
fn context_tokens_see_only_their_own_unit() -> Result<()> {
    let (cfg, model) = model(&Device::Cpu)?;
    let gaze = GazeAttention::seeded(&cfg, &config(2, 1), 3, &Device::Cpu, DType::F32)?;
    let probe = MaskProbe::new(&gaze, &model)?;
    let units = &probe.prompt.units[0];
    assert_eq!(units.len(), 2);
    let (a, b) = (&units[0], &units[1]);
    let s = probe.prompt.prompt.seq();
    let all = cfg.text.num_layers;
    let unchanged = |d: &[f32], at: std::ops::Range<usize>, what: &str| {
        for p in at {
            assert!(d[p] <= 1e-6, "{what}: position {p} changed by {}", d[p]);
        }
    };
    let changed = |d: &[f32], at: std::ops::Range<usize>, what: &str| {
        for p in at {
            assert!(
                d[p] > 1e-4,
                "{what}: position {p} did not change ({})",
                d[p]
            );
        }
    };

    // One layer: a token of image A reaches A's context tokens and the text
    // after, but not B's context tokens (causally they could see A).
    let d = probe.change(a.start + 10, 1)?;
    changed(&d, a.context.clone(), "image A's token -> A's context");
    unchanged(&d, b.context.clone(), "image A's token -> B's context");
    changed(&d, b.context.end..s, "image A's token -> the question");
    // The system text reaches no context token.
    let d = probe.change(1, 1)?;
    unchanged(&d, a.context.clone(), "system token -> A's context");
    unchanged(&d, b.context.clone(), "system token -> B's context");
    changed(&d, b.context.end..s, "system token -> the question");
    // A context token sees its unit's earlier context tokens, not later ones.
    let d = probe.change(a.context.start + 1, 1)?;
    unchanged(
        &d,
        a.context.start..a.context.start + 1,
        "context 1 -> context 0",
    );
    changed(
        &d,
        a.context.start + 1..a.context.end,
        "context 1 -> later contexts of A",
    );
    unchanged(&d, b.context.clone(), "A's context -> B's context");

    // The whole model: a token of image B leaves A's context tokens
    // unchanged and changes B's.
    let d = probe.change(b.start + 20, all)?;
    unchanged(&d, a.context.clone(), "image B's token -> A's context");
    changed(&d, b.context.clone(), "image B's token -> B's context");
    // Causality: changing any token changes nothing before it.
    for pos in (0..s).step_by(11) {
        let d = probe.change(pos, all)?;
        unchanged(&d, 0..pos, &format!("token {pos} -> earlier positions"));
        changed(&d, pos..pos + 1, &format!("token {pos} -> itself"));
    }
    Ok(())
}

#[test]
fn images_and_video_frames_are_units_with_regions_and_routes() -> Result<()> {
    let (cfg, model) = model(&Device::Cpu)?;
    let k = 3;
    let gaze = GazeAttention::seeded(&cfg, &config(k, 2), 3, &Device::Cpu, DType::F32)?;
    let prompt = mixed_batch(&gaze, &model)?;
    let p = &prompt.prompt;
    let c = gaze.config().context_tokens;

    // Units: 2 images in row 0, 3 frames in row 1, each followed by c context tokens.
    assert_eq!(
        prompt.units.iter().map(Vec::len).collect::<Vec<_>>(),
        [2, 3]
    );
    for (b, units) in prompt.units.iter().enumerate() {
        let visual: Vec<usize> = units.iter().flat_map(GazeUnit::visual).collect();
        assert_eq!(
            visual, p.visual[b],
            "row {b}: units cover the visual tokens"
        );
        for u in units {
            assert_eq!(u.context, u.visual().end..u.visual().end + c);
        }
    }
    let frames = &prompt.units[1];
    assert_eq!(
        frames[1].start, frames[0].context.end,
        "frames follow each other's context tokens"
    );

    let run = gaze.generate(&model, &prompt, STEPS)?;
    // 9 regions per image; the video's 3 frames in groups of 2 and 1: 9 + 9.
    assert_eq!(run.regions, [18, 18]);
    assert_eq!(run.visual, [128, 192]);
    assert_eq!(run.context, [2 * c, 3 * c]);
    let layout = &run.steps[0].layout;
    let video_first = layout.region(1, 0);
    let expect: Vec<i32> = [frames[0].start, frames[1].start]
        .iter()
        .flat_map(|&f| (0..3).flat_map(move |y| (0..3).map(move |x| (f + y * SIDE + x) as i32)))
        .collect();
    assert_eq!(video_first, &expect[..], "a region spans two frames");
    assert_eq!(layout.region(1, 9).len(), 9, "the last group has one frame");
    assert_eq!(
        layout.region(1, 8).len(),
        2 * 2 * 2,
        "the corner region of two frames"
    );

    assert_eq!(run.steps.len(), STEPS - 1);
    for (t, step) in run.steps.iter().enumerate() {
        assert_eq!(step.routes.len(), cfg.text.num_layers);
        for b in 0..p.batch() {
            // The generated tokens so far are visible; padding is not.
            let valid = p.seq() - p.starts[b] + t + 1;
            assert_eq!(step.dense(b), valid, "step {t} row {b}");
            assert_eq!(step.layout.visible_len(b), valid - run.visual[b]);
            for routes in &step.routes {
                for h in 0..cfg.text.num_heads {
                    let ids = routes.get(b, 0, h);
                    assert_eq!(ids.len(), k);
                    assert!(
                        ids.windows(2).all(|w| w[0] < w[1])
                            && ids.iter().all(|&r| (r as usize) < run.regions[b])
                    );
                }
            }
            assert!(step.attended(b) < step.dense(b) as f64);
        }
    }
    // Routes differ between heads or layers somewhere: routing is per query.
    let all: HashSet<Vec<i32>> = run
        .steps
        .iter()
        .flat_map(|s| {
            s.routes
                .iter()
                .flat_map(|r| (0..cfg.text.num_heads).map(move |h| r.get(0, 0, h).to_vec()))
        })
        .collect();
    assert!(
        all.len() > 1,
        "every head and layer routed to the same regions"
    );
    assert_eq!(
        run.generation
            .tokens
            .iter()
            .map(Vec::len)
            .collect::<Vec<_>>(),
        [STEPS, STEPS]
    );
    Ok(())
}

#[test]
fn bad_input_is_refused() -> Result<()> {
    let (cfg, model) = model(&Device::Cpu)?;
    for bad in [
        config(0, 1),
        GazeConfig {
            context_tokens: 0,
            ..config(2, 1)
        },
        config(2, 0),
    ] {
        let err = GazeAttention::seeded(&cfg, &bad, 3, &Device::Cpu, DType::F32).unwrap_err();
        assert!(err.to_string().contains("GazeConfig"), "{err}");
    }
    let gaze = GazeAttention::seeded(&cfg, &config(2, 1), 3, &Device::Cpu, DType::F32)?;
    let e = image_embeds(&model, 1, 1)?.get(0)?;
    let rows = vec![vec![GazeSegment::Image {
        embeds: e,
        height: 8,
        width: 7,
    }]];
    let err = gaze.prompt(&model, &rows).unwrap_err();
    assert!(
        err.to_string()
            .contains("64 visual tokens for a 8 x 7 grid"),
        "{err}"
    );
    let text_only = gaze.prompt(&model, &[vec![GazeSegment::Text(byte_tokens("no image"))]])?;
    let err = gaze.generate(&model, &text_only, 2).unwrap_err();
    assert!(err.to_string().contains("no regions"), "{err}");
    Ok(())
}

#[test]
fn context_tokens_round_trip_through_safetensors() -> Result<()> {
    let (cfg, model) = model(&Device::Cpu)?;
    let gcfg = config(2, 1);
    let gaze = GazeAttention::seeded(&cfg, &gcfg, 9, &Device::Cpu, DType::F32)?;
    let path = std::env::temp_dir().join(format!("foveal-gaze-{}.safetensors", std::process::id()));
    gaze.save_safetensors(&path)?;
    let loaded = GazeAttention::load_safetensors(&path, &cfg, &gcfg, &Device::Cpu, DType::F32)?;
    std::fs::remove_file(&path).ok();
    assert_eq!(
        max_abs_diff(gaze.context_tokens(), loaded.context_tokens())?,
        0.0
    );
    assert_eq!(gaze.context_tokens().dims(), [4, cfg.text.hidden_size]);

    let a = gaze.generate(&model, &image_batch(&gaze, &model)?, 3)?;
    let b = loaded.generate(&model, &image_batch(&loaded, &model)?, 3)?;
    assert_eq!(a.generation.tokens, b.generation.tokens);
    for (x, y) in a.generation.logits.iter().zip(&b.generation.logits) {
        assert_eq!(max_abs_diff(x, y)?, 0.0);
    }
    let other = GazeAttention::seeded(&cfg, &gcfg, 10, &Device::Cpu, DType::F32)?;
    let c = other.generate(&model, &image_batch(&other, &model)?, 3)?;
    assert!(
        max_abs_diff(&a.generation.logits[0], &c.generation.logits[0])? > 1e-3,
        "other context tokens must change the logits (the round trip would otherwise prove nothing)"
    );
    Ok(())
}
