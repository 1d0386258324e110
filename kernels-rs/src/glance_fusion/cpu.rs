//! CPU reference of glance_fusion: plain loops, f32 accumulation in index
//! order (the instruction mean over m, each dot product over dt, the
//! weighted sum over s).

use super::{check, layer_softmax, Lengths};
use crate::dtype::Element;
use crate::error::Result;
use crate::layout::{View, ViewMut};

/// Fuses the layers of `vq [S, B, N, dt]` under the instruction `e [S, B, M,
/// dt]` into `out [B, N, dt]`, and the weights into `weights [B, N, S]` when
/// given (see the module docs).
pub fn glance_fusion<T: Element>(
    vq: View<'_, T, 4>,
    e: View<'_, T, 4>,
    lengths: &Lengths,
    out: &mut ViewMut<'_, T, 3>,
    mut weights: Option<&mut ViewMut<'_, f32, 3>>,
) -> Result<()> {
    let d = check(
        vq.shape(),
        e.shape(),
        lengths,
        out.shape(),
        weights.as_ref().map(|w| w.shape()),
    )?;
    if out.layout().numel() == 0 {
        // Nothing to write (weights are empty too), and no scratch for sizes
        // that only empty tensors have.
        return Ok(());
    }
    let mut mean = vec![0f32; d.layers * d.dim];
    let mut g = vec![0f32; d.layers];
    let mut w = vec![0f32; d.layers];
    let mut acc = vec![0f32; d.dim];
    for b in 0..d.batch {
        let (n_len, m_len) = (lengths.n_len()[b], lengths.m_len()[b]);
        // The mean instruction vector of each layer.
        for (s, mean_s) in mean.chunks_exact_mut(d.dim).enumerate() {
            mean_s.fill(0.0);
            for m in 0..m_len {
                for (a, x) in mean_s.iter_mut().zip(e.row([s, b, m, 0])) {
                    *a += x.to_f32();
                }
            }
            for a in mean_s.iter_mut() {
                *a /= m_len as f32;
            }
        }
        for n in 0..d.tokens {
            if n >= n_len {
                out.row_mut([b, n, 0]).fill(T::from_f32(0.0));
                if let Some(wv) = weights.as_deref_mut() {
                    wv.row_mut([b, n, 0]).fill(0.0);
                }
                continue;
            }
            for (s, gs) in g.iter_mut().enumerate() {
                let dot: f32 = vq
                    .row([s, b, n, 0])
                    .iter()
                    .zip(&mean[s * d.dim..(s + 1) * d.dim])
                    .fold(0.0, |acc, (v, m)| acc + v.to_f32() * m);
                *gs = dot * d.scale;
            }
            layer_softmax(&g, &mut w);
            // The sums start at -0, the identity of IEEE addition: with one
            // layer (w = 1) out equals vq bit for bit, -0 included.
            acc.fill(-0.0);
            for (s, &ws) in w.iter().enumerate() {
                for (a, v) in acc.iter_mut().zip(vq.row([s, b, n, 0])) {
                    *a += ws * v.to_f32();
                }
            }
            for (o, &a) in out.row_mut([b, n, 0]).iter_mut().zip(&acc) {
                *o = T::from_f32(a);
            }
            if let Some(wv) = weights.as_deref_mut() {
                wv.row_mut([b, n, 0]).copy_from_slice(&w);
            }
        }
    }
    Ok(())
}
