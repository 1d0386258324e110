//! FocusLLaVA's ops: window_mean, multiscale_gather, text_guided_select.

use foveal::multiscale_gather::{cpu::multiscale_gather, max_tokens, ScaleSet};
use foveal::text_guided_select::{cpu::text_guided_select, Lengths};
use foveal::window_mean::{cpu::window_mean, num_windows};
use foveal::Pool;
use proptest::prelude::*;

use crate::arb::{
    accepted, apply, arg, comparable, config, length, perturb, positive, scalar, size, work, Buf,
};

fn scale_set() -> impl Strategy<Value = ScaleSet> {
    prop_oneof![
        2 => Just(ScaleSet::three()),
        1 => Just(ScaleSet::seven()),
        2 => prop::collection::vec((1usize..=4, 1usize..=4), 1..4)
            .prop_map(|s| ScaleSet::new(&s).expect("kernels of 1 to 4")),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// window_mean: any map, window, pool and output shape.
    #[test]
    fn window_mean_any(
        (b, h, w, c) in (work(), size(), size(), size()),
        window in size(),
        max in any::<bool>(),
        p in perturb(),
        (ax, ao) in (arg(), arg()),
        seed in any::<u64>(),
    ) {
        let pool = if max { Pool::Max } else { Pool::Mean };
        let x = Buf::<f32, 4>::input(&ax.spec(apply([b, h, w, c], 0, p)), seed);
        let m = num_windows(h, w, window);
        let mut out = Buf::<f32, 3>::output(&ao.spec(apply([b, m, c], 1, p)));
        let ok = {
            let (Some(xv), Some(mut ov)) = (x.view(), out.view_mut()) else { return Ok(()) };
            accepted(window_mean(xv, window, pool, &mut ov))?
        };
        if ok && comparable(&[x.numel(), out.numel()]) {
            let xc = x.contiguous_copy();
            let mut oc = out.fresh_contiguous();
            window_mean(xc.view().unwrap(), window, pool, &mut oc.view_mut().unwrap()).unwrap();
            prop_assert_eq!(out.bits(), oc.bits());
        }
    }

    /// multiscale_gather: any map, logits, window, scales and outputs.
    #[test]
    fn multiscale_gather_any(
        (b, h, w, c) in (work(), size(), size(), size()),
        window in prop_oneof![3 => Just(4usize), 1 => size()],
        scales in scale_set(),
        by_prob in any::<bool>(),
        p in perturb(),
        (ax, az, at, ap, ac) in (arg(), arg(), arg(), arg(), arg()),
        seed in any::<u64>(),
    ) {
        let m = num_windows(h, w, window);
        let n = max_tokens(h, w, window, &scales);
        let x = Buf::<f32, 4>::input(&ax.spec(apply([b, h, w, c], 0, p)), seed);
        let z = Buf::<f32, 3>::input(&az.spec(apply([b, m, scales.len()], 1, p)), seed ^ 1);
        let mut tokens = Buf::<f32, 3>::output(&at.spec(apply([b, n, c], 2, p)));
        let mut pos = Buf::<i32, 2>::output(&ap.spec(apply([b, n], 3, p)));
        let mut count = Buf::<i32, 1>::output(&ac.spec(apply([b], 4, p)));
        let ok = {
            let (Some(xv), Some(zv), Some(mut tv), Some(mut pv), Some(mut cv)) =
                (x.view(), z.view(), tokens.view_mut(), pos.view_mut(), count.view_mut())
            else { return Ok(()) };
            accepted(multiscale_gather(xv, zv, window, &scales, by_prob, &mut tv, &mut pv, &mut cv))?
        };
        if ok && comparable(&[x.numel(), z.numel(), tokens.numel()]) {
            let (xc, zc) = (x.contiguous_copy(), z.contiguous_copy());
            let (mut tc, mut pc, mut cc) =
                (tokens.fresh_contiguous(), pos.fresh_contiguous(), count.fresh_contiguous());
            multiscale_gather(
                xc.view().unwrap(), zc.view().unwrap(), window, &scales, by_prob,
                &mut tc.view_mut().unwrap(), &mut pc.view_mut().unwrap(), &mut cc.view_mut().unwrap(),
            ).unwrap();
            prop_assert_eq!(tokens.bits(), tc.bits());
            prop_assert_eq!(pos.bits(), pc.bits());
            prop_assert_eq!(count.bits(), cc.bits());
            // Each row's count fits the capacity.
            for &k in &count.logical() {
                prop_assert!(k >= 0 && k as usize <= n);
            }
        }
    }

    /// text_guided_select: any queries, keys, lengths, gamma and outputs.
    #[test]
    fn text_guided_select_any(
        (b, t, n, d) in (work(), size(), size(), size()),
        (hkv, group) in (positive(), prop_oneof![4 => 1usize..=4, 1 => size()]),
        lens in prop::collection::vec((length(), length()), 4),
        miscount in prop::bool::weighted(0.1),
        gamma in prop_oneof![3 => 0.05f32..1.0, 1 => scalar()],
        with_scores in any::<bool>(),
        p in perturb(),
        (aq, ak, akeep, ac, asc) in (arg(), arg(), arg(), arg(), arg()),
        seed in any::<u64>(),
    ) {
        // Mostly GQA, one length pair per row, each inside its dimension.
        let hq = hkv.saturating_mul(group);
        let rows = if miscount { b.saturating_add(1).min(4) } else { b.min(4) };
        let lens: Vec<(usize, usize)> = lens[..rows]
            .iter()
            .map(|&(x, y)| if x > 5 || y > 5 { (x, y) } else { (x.min(t), y.min(n)) })
            .collect();
        let (tl, nl): (Vec<usize>, Vec<usize>) = lens.into_iter().unzip();
        let lengths = Lengths::new(&tl, &nl).expect("as many of each");
        let q = Buf::<f32, 4>::input(&aq.spec(apply([b, t, hq, d], 0, p)), seed);
        let k = Buf::<f32, 4>::input(&ak.spec(apply([b, n, hkv, d], 1, p)), seed ^ 1);
        let mut keep = Buf::<i32, 2>::output(&akeep.spec(apply([b, n], 2, p)));
        let mut count = Buf::<i32, 1>::output(&ac.spec(apply([b], 3, p)));
        let mut scores = Buf::<f32, 2>::output(&asc.spec(apply([b, n], 4, p)));
        let ok = {
            let (Some(qv), Some(kv), Some(mut keepv), Some(mut cv)) =
                (q.view(), k.view(), keep.view_mut(), count.view_mut())
            else { return Ok(()) };
            let mut sv = if with_scores {
                match scores.view_mut() { Some(v) => Some(v), None => return Ok(()) }
            } else { None };
            accepted(text_guided_select(qv, kv, &lengths, gamma, &mut keepv, &mut cv, sv.as_mut()))?
        };
        if ok && comparable(&[q.numel(), k.numel()]) {
            let (qc, kc) = (q.contiguous_copy(), k.contiguous_copy());
            let (mut keepc, mut cc, mut sc) =
                (keep.fresh_contiguous(), count.fresh_contiguous(), scores.fresh_contiguous());
            let Some(mut scv) = sc.view_mut() else { return Ok(()) };
            text_guided_select(
                qc.view().unwrap(), kc.view().unwrap(), &lengths, gamma,
                &mut keepc.view_mut().unwrap(), &mut cc.view_mut().unwrap(),
                if with_scores { Some(&mut scv) } else { None },
            ).unwrap();
            prop_assert_eq!(keep.bits(), keepc.bits());
            prop_assert_eq!(count.bits(), cc.bits());
            if with_scores {
                prop_assert_eq!(scores.bits(), sc.bits());
            }
            // Each row keeps at most its visual tokens.
            for (row, &c) in count.logical().iter().enumerate() {
                prop_assert!(c >= 0 && c as usize <= nl[row]);
            }
        }
    }
}
