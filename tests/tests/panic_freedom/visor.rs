//! VISOR's ops: cross_attention, pos_conv1d, token_pack.

use foveal::cross_attention::cpu::cross_attention;
use foveal::pos_conv1d::cpu::pos_conv1d;
use foveal::token_pack::{cpu::token_pack, resized_grid};
use foveal::SeqLens;
use proptest::prelude::*;

use crate::arb::{
    accepted, apply, arg, comparable, config, length, perturb, positive, scalar, size, work, Buf,
};

/// One length pair per row of a batch of up to 4 (now and then one too
/// many), mostly inside the dimensions.
pub fn row_lengths(
    b: usize,
    pairs: &[(usize, usize)],
    miscount: bool,
    x: usize,
    y: usize,
) -> (Vec<usize>, Vec<usize>) {
    let rows = if miscount {
        b.saturating_add(1).min(4)
    } else {
        b.min(4)
    };
    pairs[..rows]
        .iter()
        .map(|&(p, q)| {
            if p > 5 || q > 5 {
                (p, q)
            } else {
                (p.min(x), q.min(y))
            }
        })
        .unzip()
}

proptest! {
    #![proptest_config(config())]

    /// cross_attention: any queries, keys, values, lengths, scale and outputs.
    #[test]
    fn cross_attention_any(
        (b, nq, nk, d) in (work(), size(), size(), size()),
        (hkv, group) in (positive(), prop_oneof![4 => 1usize..=4, 1 => size()]),
        pairs in prop::collection::vec((length(), length()), 4),
        miscount in prop::bool::weighted(0.1),
        scale in prop_oneof![2 => Just(None), 1 => scalar().prop_map(Some)],
        with_lse in any::<bool>(),
        p in perturb(),
        (aq, ak, av, ao, al) in (arg(), arg(), arg(), arg(), arg()),
        seed in any::<u64>(),
    ) {
        let hq = hkv.saturating_mul(group);
        let (ql, kl) = row_lengths(b, &pairs, miscount, nq, nk);
        let lens = SeqLens::new(&ql, &kl).expect("as many of each");
        let q = Buf::<f32, 4>::input(&aq.spec(apply([b, nq, hq, d], 0, p)), seed);
        let k = Buf::<f32, 4>::input(&ak.spec(apply([b, nk, hkv, d], 1, p)), seed ^ 1);
        let v = Buf::<f32, 4>::input(&av.spec(apply([b, nk, hkv, d], 2, p)), seed ^ 2);
        let mut o = Buf::<f32, 4>::output(&ao.spec(apply([b, nq, hq, d], 3, p)));
        let mut lse = Buf::<f32, 3>::output(&al.spec(apply([b, hq, nq], 4, p)));
        let ok = {
            let (Some(qv), Some(kv), Some(vv), Some(mut ov)) = (q.view(), k.view(), v.view(), o.view_mut()) else { return Ok(()) };
            let mut lv = if with_lse {
                match lse.view_mut() { Some(l) => Some(l), None => return Ok(()) }
            } else { None };
            accepted(cross_attention(qv, kv, vv, &lens, scale, &mut ov, lv.as_mut()))?
        };
        if ok && comparable(&[q.numel(), k.numel(), o.numel()]) {
            let (qc, kc, vc) = (q.contiguous_copy(), k.contiguous_copy(), v.contiguous_copy());
            let (mut oc, mut lc) = (o.fresh_contiguous(), lse.fresh_contiguous());
            let mut lcv = lc.view_mut().unwrap();
            cross_attention(
                qc.view().unwrap(), kc.view().unwrap(), vc.view().unwrap(), &lens, scale,
                &mut oc.view_mut().unwrap(), if with_lse { Some(&mut lcv) } else { None },
            ).unwrap();
            prop_assert_eq!(o.bits(), oc.bits());
            if with_lse {
                prop_assert_eq!(lse.bits(), lc.bits());
            }
        }
    }

    /// pos_conv1d: any tokens, lengths, weights and output.
    #[test]
    fn pos_conv1d_any(
        (b, n, c) in (work(), size(), size()),
        taps in prop_oneof![4 => Just(7usize), 1 => size()],
        lens in prop::collection::vec(length(), 0..5),
        p in perturb(),
        (ax, aw, ab, ao) in (arg(), arg(), arg(), arg()),
        seed in any::<u64>(),
    ) {
        let lens: Vec<usize> = lens.into_iter().map(|l| if l > 5 { l } else { l.min(n) }).collect();
        let x = Buf::<f32, 3>::input(&ax.spec(apply([b, n, c], 0, p)), seed);
        let w = Buf::<f32, 2>::input(&aw.spec(apply([c, taps], 1, p)), seed ^ 1);
        let bias = Buf::<f32, 1>::input(&ab.spec(apply([c], 2, p)), seed ^ 2);
        let mut out = Buf::<f32, 3>::output(&ao.spec(apply([b, n, c], 3, p)));
        let ok = {
            let (Some(xv), Some(wv), Some(bv), Some(mut ov)) = (x.view(), w.view(), bias.view(), out.view_mut()) else { return Ok(()) };
            accepted(pos_conv1d(xv, &lens, wv, bv, &mut ov))?
        };
        if ok && comparable(&[x.numel(), out.numel()]) {
            let (xc, wc, bc, mut oc) = (x.contiguous_copy(), w.contiguous_copy(), bias.contiguous_copy(), out.fresh_contiguous());
            pos_conv1d(xc.view().unwrap(), &lens, wc.view().unwrap(), bc.view().unwrap(), &mut oc.view_mut().unwrap()).unwrap();
            prop_assert_eq!(out.bits(), oc.bits());
        }
    }

    /// token_pack: any grid, ratio and output.
    #[test]
    fn token_pack_any(
        (b, h, w, c) in (work(), size(), size(), size()),
        rho in prop_oneof![4 => 0.2f64..8.0, 1 => prop::sample::select(&[0.0, -1.0, f64::NAN, f64::INFINITY, 1e-300, 1e300][..])],
        p in perturb(),
        (ax, ao) in (arg(), arg()),
        seed in any::<u64>(),
    ) {
        let [oh, ow] = resized_grid(h, w, rho).unwrap_or([2, 2]);
        let x = Buf::<f32, 4>::input(&ax.spec(apply([b, h, w, c], 0, p)), seed);
        let mut out = Buf::<f32, 4>::output(&ao.spec(apply([b, oh / 2, ow / 2, c.saturating_mul(4)], 1, p)));
        let ok = {
            let (Some(xv), Some(mut ov)) = (x.view(), out.view_mut()) else { return Ok(()) };
            accepted(token_pack(xv, rho, &mut ov))?
        };
        if ok && comparable(&[x.numel(), out.numel()]) {
            let (xc, mut oc) = (x.contiguous_copy(), out.fresh_contiguous());
            token_pack(xc.view().unwrap(), rho, &mut oc.view_mut().unwrap()).unwrap();
            prop_assert_eq!(out.bits(), oc.bits());
        }
    }
}

/// Found: cross_attention sized its scratch by the head dimension before
/// looking at the output: an empty batch with a huge (unused) head dimension
/// asked for `usize::MAX` floats. An empty output now returns at once.
#[test]
fn found_cross_attention_scratch_of_empty_batch() {
    let d = usize::MAX;
    let none: Vec<f32> = vec![];
    let q = foveal::View::contiguous(&none, [0, 1, 1, d]).unwrap();
    let mut out: Vec<f32> = vec![];
    let mut o = foveal::ViewMut::contiguous(&mut out, [0, 1, 1, d]).unwrap();
    let lens = SeqLens::full(0, 1, 1);
    let r = cross_attention(q, q, q, &lens, None, &mut o, None);
    assert!(r.is_ok() || r.is_err_and(|e| !matches!(e, foveal::Error::Cuda { .. })));
}

/// Found: pos_conv1d walked every token of an output with no channel, so a
/// huge token count never returned.
#[test]
fn found_pos_conv1d_empty_rows_of_huge_output() {
    let none: Vec<f32> = vec![];
    let x = foveal::View::contiguous(&none, [1, usize::MAX, 0]).unwrap();
    let w = foveal::View::contiguous(&none, [0, 7]).unwrap();
    let b = foveal::View::contiguous(&none, [0]).unwrap();
    let mut out: Vec<f32> = vec![];
    let mut o = foveal::ViewMut::contiguous(&mut out, [1, usize::MAX, 0]).unwrap();
    let r = pos_conv1d(x, &[0], w, b, &mut o);
    assert!(r.is_ok() || r.is_err_and(|e| !matches!(e, foveal::Error::Cuda { .. })));
}
