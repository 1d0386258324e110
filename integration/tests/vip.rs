//! GlimpsePrune's Visual Importance Predictor against its equations, written
//! here again from the authors' modules (docs/glimpseprune.md): each image
//! alone, plain candle ops on 2D tensors, the rotary angles built per
//! channel; the training-free baseline map against its formula on the host;
//! Qwen2.5-VL's merge-unit mean.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Activation, VarBuilder};
use foveal::ScoreMode;
use foveal_candle::vip::{baseline_map, merge_unit_mean, Vip, VipConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Two rows: row 0 holds a 3 x 4 and a 2 x 2 image, row 1 a 3 x 4 image;
/// 17 positions (both rows padded).
fn grids() -> Vec<Vec<(usize, usize)>> {
    vec![vec![(3, 4), (2, 2)], vec![(3, 4)]]
}
const N: usize = 17;

fn randn(rng: &mut StdRng, shape: &[usize], std: f32, mean: f32) -> Result<Tensor> {
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            mean + std * (rng.random::<f32>() + rng.random::<f32>() + rng.random::<f32>() - 1.5)
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

fn config(cond: Option<usize>) -> VipConfig {
    VipConfig {
        in_features: 6,
        vision_hidden: 10,
        hidden: 16,
        cond,
        heads: 2,
        layers: 2,
        act: Activation::Silu,
    }
}

/// Random parameters under the authors' names (relative to `attn_fuser`).
fn parameters(cfg: &VipConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (e, qk) = (cfg.hidden, cfg.hidden + cfg.cond.unwrap_or(0));
    let mut p = HashMap::new();
    let mut lin = |p: &mut HashMap<String, Tensor>,
                   name: String,
                   out: usize,
                   inp: usize,
                   bias: bool|
     -> Result<()> {
        p.insert(
            format!("{name}.weight"),
            randn(&mut rng, &[out, inp], 1.5 / (inp as f32).sqrt(), 0.0)?,
        );
        if bias {
            p.insert(format!("{name}.bias"), randn(&mut rng, &[out], 0.3, 0.0)?);
        }
        Ok(())
    };
    lin(&mut p, "attn_in_proj".into(), e, cfg.in_features, true)?;
    for m in 0..cfg.layers {
        if let Some(f) = cfg.cond {
            lin(
                &mut p,
                format!("cond_in_projs.{m}"),
                f,
                cfg.vision_hidden,
                true,
            )?;
        }
        let l = format!("layers.{m}");
        lin(&mut p, format!("{l}.attn.q_proj"), qk, qk, false)?;
        lin(&mut p, format!("{l}.attn.k_proj"), qk, qk, false)?;
        lin(&mut p, format!("{l}.attn.v_proj"), e, e, false)?;
        lin(&mut p, format!("{l}.attn.o_proj"), e, e, false)?;
        lin(&mut p, format!("{l}.mlp.gate_proj"), 2 * e, e, true)?;
        lin(&mut p, format!("{l}.mlp.up_proj"), 2 * e, e, true)?;
        lin(&mut p, format!("{l}.mlp.down_proj"), e, 2 * e, true)?;
    }
    lin(
        &mut p,
        format!("attn_out_projs.{}", cfg.layers - 1),
        1,
        e,
        true,
    )?;
    let mut rng = StdRng::seed_from_u64(seed + 1);
    for m in 0..cfg.layers {
        for n in ["norm1", "norm2"] {
            p.insert(
                format!("layers.{m}.{n}.weight"),
                randn(&mut rng, &[e], 0.2, 1.0)?,
            );
        }
    }
    Ok(p)
}

/// The reference, from the equations: one image's logits `[n]`.
struct Reference<'a> {
    p: &'a HashMap<String, Tensor>,
    cfg: &'a VipConfig,
}

impl Reference<'_> {
    fn lin(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        let y = x.matmul(&self.p[&format!("{name}.weight")].t()?)?;
        match self.p.get(&format!("{name}.bias")) {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    fn rms(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(1)?;
        x.broadcast_div(&(ms + 1e-6)?.sqrt()?)?
            .broadcast_mul(&self.p[&format!("{name}.weight")])
    }

    /// cos, sin `[n, d]`: channel i rotates by angle i mod d/2; the first
    /// d/4 angles are the row's, the next d/4 the column's, each
    /// `pos * 10000^(-4j/d)`.
    fn angles(d: usize, h: usize, w: usize) -> Result<(Tensor, Tensor)> {
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for t in 0..h * w {
            let (r, c) = ((t / w) as f64, (t % w) as f64);
            for i in 0..d {
                let j = i % (d / 2);
                let (pos, j) = if j < d / 4 { (r, j) } else { (c, j - d / 4) };
                let a = pos * 10000f64.powf(-((4 * j) as f64) / d as f64);
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok((
            Tensor::from_vec(cos, (h * w, d), &Device::Cpu)?,
            Tensor::from_vec(sin, (h * w, d), &Device::Cpu)?,
        ))
    }

    fn rotate(x: &Tensor, (cos, sin): &(Tensor, Tensor)) -> Result<Tensor> {
        let d = x.dim(1)?;
        let half = Tensor::cat(
            &[&x.narrow(1, d / 2, d / 2)?.neg()?, &x.narrow(1, 0, d / 2)?],
            1,
        )?;
        (x * cos)? + (half * sin)?
    }

    fn image(&self, a: &Tensor, conds: &[Tensor], h: usize, w: usize) -> Result<Tensor> {
        let cfg = self.cfg;
        let (e, heads) = (cfg.hidden, cfg.heads);
        let dqk = (e + cfg.cond.unwrap_or(0)) / heads;
        let dv = e / heads;
        let rope = Self::angles(dqk, h, w)?;
        let mut x = self.lin(a, "attn_in_proj")?;
        for m in 0..cfg.layers {
            let l = format!("layers.{m}");
            let hn = self.rms(&x, &format!("{l}.norm1"))?;
            let u = match conds.get(m) {
                Some(c) => Tensor::cat(&[&hn, &self.lin(c, &format!("cond_in_projs.{m}"))?], 1)?,
                None => hn.clone(),
            };
            let q = self.lin(&u, &format!("{l}.attn.q_proj"))?;
            let k = self.lin(&u, &format!("{l}.attn.k_proj"))?;
            let v = self.lin(&hn, &format!("{l}.attn.v_proj"))?;
            let mut outs = Vec::new();
            for hd in 0..heads {
                let qh = Self::rotate(&q.narrow(1, hd * dqk, dqk)?, &rope)?;
                let kh = Self::rotate(&k.narrow(1, hd * dqk, dqk)?, &rope)?;
                let s = (qh.matmul(&kh.t()?)? / (dqk as f64).sqrt())?;
                let s = s.broadcast_sub(&s.max_keepdim(1)?)?.exp()?;
                let p = s.broadcast_div(&s.sum_keepdim(1)?)?;
                outs.push(p.matmul(&v.narrow(1, hd * dv, dv)?)?);
            }
            x = (&x + self.lin(&Tensor::cat(&outs, 1)?, &format!("{l}.attn.o_proj"))?)?;
            let hn = self.rms(&x, &format!("{l}.norm2"))?;
            let g = self.lin(&hn, &format!("{l}.mlp.gate_proj"))?;
            let silu = (&g / (g.neg()?.exp()? + 1.0)?)?;
            let up = self.lin(&hn, &format!("{l}.mlp.up_proj"))?;
            x = (&x + self.lin(&(silu * up)?, &format!("{l}.mlp.down_proj"))?)?;
        }
        self.lin(&x, &format!("attn_out_projs.{}", cfg.layers - 1))?
            .squeeze(1)
    }
}

fn check_predictor(cond: Option<usize>, seed: u64) -> Result<()> {
    let cfg = config(cond);
    let p = parameters(&cfg, seed)?;
    let vip = Vip::new(
        VarBuilder::from_tensors(p.clone(), DType::F32, &Device::Cpu),
        &cfg,
    )?;
    let mut rng = StdRng::seed_from_u64(seed + 7);
    let attention = randn(&mut rng, &[2, N, cfg.in_features], 3.0, -4.0)?;
    let features = match cond {
        Some(_) => (0..cfg.layers)
            .map(|_| randn(&mut rng, &[2, N, cfg.vision_hidden], 2.0, 0.0))
            .collect::<Result<Vec<_>>>()?,
        None => Vec::new(),
    };
    let got = vip.forward(&attention, &features, &grids())?;
    assert_eq!(got.dims(), [2, N]);
    let reference = Reference { p: &p, cfg: &cfg };
    for (b, images) in grids().iter().enumerate() {
        let mut offset = 0;
        for &(h, w) in images {
            let take = |t: &Tensor| t.get(b)?.narrow(0, offset, h * w);
            let conds = features.iter().map(take).collect::<Result<Vec<_>>>()?;
            let want = reference.image(&take(&attention)?, &conds, h, w)?;
            let got = got.get(b)?.narrow(0, offset, h * w)?;
            let scale = want.abs()?.max(0)?.to_scalar::<f32>()?.max(1.0);
            let diff = (&got - &want)?.abs()?.max(0)?.to_scalar::<f32>()?;
            assert!(
                diff <= 2e-5 * scale,
                "row {b}, image at {offset} ({h} x {w}): differs by {diff} (scale {scale})"
            );
            offset += h * w;
        }
        let pad = got.get(b)?.narrow(0, offset, N - offset)?;
        assert_eq!(
            pad.abs()?.sum_all()?.to_scalar::<f32>()?,
            0.0,
            "row {b}: padding is 0"
        );
    }
    Ok(())
}

#[test]
fn the_conditioned_predictor_equals_its_equations_per_image() -> Result<()> {
    check_predictor(Some(8), 1)?;
    check_predictor(Some(24), 2)
}

#[test]
fn the_unconditioned_predictor_equals_its_equations_per_image() -> Result<()> {
    check_predictor(None, 3)
}

/// An image's logits do not depend on the other images of its row.
#[test]
fn images_do_not_attend_to_each_other() -> Result<()> {
    let cfg = config(Some(8));
    let vip = Vip::new(
        VarBuilder::from_tensors(parameters(&cfg, 4)?, DType::F32, &Device::Cpu),
        &cfg,
    )?;
    let mut rng = StdRng::seed_from_u64(5);
    let attention = randn(&mut rng, &[2, N, cfg.in_features], 3.0, -4.0)?;
    let features: Vec<Tensor> = (0..2)
        .map(|_| randn(&mut rng, &[2, N, cfg.vision_hidden], 2.0, 0.0))
        .collect::<Result<_>>()?;
    let a = vip.forward(&attention, &features, &grids())?;
    // Change row 0's second image (positions 12..16) only.
    let bump = |t: &Tensor, w: usize| -> Result<Tensor> {
        let mut m = vec![0f32; 2 * N * w];
        for i in 12..16 {
            for j in 0..w {
                m[i * w + j] = 5.0;
            }
        }
        t + Tensor::from_vec(m, (2, N, w), &Device::Cpu)?
    };
    let attention2 = bump(&attention, cfg.in_features)?;
    let features2: Vec<Tensor> = features
        .iter()
        .map(|f| bump(f, cfg.vision_hidden))
        .collect::<Result<_>>()?;
    let b = vip.forward(&attention2, &features2, &grids())?;
    assert_eq!(
        a.get(0)?.narrow(0, 0, 12)?.to_vec1::<f32>()?,
        b.get(0)?.narrow(0, 0, 12)?.to_vec1::<f32>()?
    );
    assert_eq!(a.get(1)?.to_vec1::<f32>()?, b.get(1)?.to_vec1::<f32>()?);
    assert_ne!(
        a.get(0)?.narrow(0, 12, 4)?.to_vec1::<f32>()?,
        b.get(0)?.narrow(0, 12, 4)?.to_vec1::<f32>()?
    );
    Ok(())
}

#[test]
fn bad_inputs_are_refused() -> Result<()> {
    let cfg = config(Some(8));
    let vip = Vip::new(
        VarBuilder::from_tensors(parameters(&cfg, 4)?, DType::F32, &Device::Cpu),
        &cfg,
    )?;
    let a = Tensor::zeros((2, N, 6), DType::F32, &Device::Cpu)?;
    let f = Tensor::zeros((2, N, 10), DType::F32, &Device::Cpu)?;
    let err = vip
        .forward(&a, std::slice::from_ref(&f), &grids())
        .unwrap_err();
    assert!(err.to_string().contains("1 feature maps"), "{err}");
    let err = vip
        .forward(&a, &[f.clone(), f.clone()], &[vec![(4, 5)], vec![]])
        .unwrap_err();
    assert!(err.to_string().contains("20 tokens"), "{err}");
    let mut bad = cfg.clone();
    bad.cond = Some(10); // (16 + 10) / 2 = 13: not a multiple of 4
    assert!(bad.validate().is_err());
    Ok(())
}

#[test]
fn the_baseline_map_equals_its_formula() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(9);
    let attention = randn(&mut rng, &[2, N, 5], 2.0, -3.0)?;
    let a = attention.to_vec3::<f32>()?;
    for mode in [ScoreMode::Logits, ScoreMode::LogSoftmax] {
        let got = baseline_map(&attention, &grids(), mode)?.to_vec2::<f32>()?;
        for (b, images) in grids().iter().enumerate() {
            let mut offset = 0;
            for &(h, w) in images {
                let n = h * w;
                let mean: Vec<f64> = (offset..offset + n)
                    .map(|i| a[b][i].iter().map(|&x| f64::from(x)).sum::<f64>() / 5.0)
                    .collect();
                let p: Vec<f64> = match mode {
                    ScoreMode::Logits => {
                        let z: f64 = mean.iter().map(|m| m.exp()).sum();
                        mean.iter().map(|m| m.exp() / z).collect()
                    }
                    _ => mean.iter().map(|m| m.exp()).collect(),
                };
                let lo = p.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = p.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                for (i, &pi) in p.iter().enumerate() {
                    let want = (pi - lo) / (hi - lo + 1e-6);
                    let g = f64::from(got[b][offset + i]);
                    assert!(
                        (g - want).abs() < 1e-5,
                        "{mode:?} row {b} token {}: {g} vs {want}",
                        offset + i
                    );
                }
                offset += n;
            }
            assert!(got[b][offset..].iter().all(|&x| x == 0.0));
        }
    }
    let err = baseline_map(&attention, &grids(), ScoreMode::Softmax).unwrap_err();
    assert!(err.to_string().contains("not probabilities"), "{err}");
    Ok(())
}

#[test]
fn merge_units_are_averaged() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(10);
    let x = randn(&mut rng, &[2, 12, 3], 1.0, 0.0)?;
    let got = merge_unit_mean(&x, 4)?.to_vec3::<f32>()?;
    let v = x.to_vec3::<f32>()?;
    for b in 0..2 {
        for t in 0..3 {
            for c in 0..3 {
                let want = (0..4).map(|u| v[b][4 * t + u][c]).sum::<f32>() / 4.0;
                assert!((got[b][t][c] - want).abs() < 1e-6);
            }
        }
    }
    assert!(merge_unit_mean(&x, 5).is_err());
    Ok(())
}
