//! Glance2Gaze's op: glance_fusion.

use foveal::glance_fusion::{cpu::glance_fusion, Lengths};
use proptest::prelude::*;

use crate::arb::{accepted, apply, arg, comparable, config, length, perturb, size, work, Buf};
use crate::visor::row_lengths;

proptest! {
    #![proptest_config(config())]

    /// glance_fusion: any layers' tokens, instruction, lengths and outputs.
    #[test]
    fn glance_fusion_any(
        (s, b, n, m, dt) in (work(), work(), size(), size(), size()),
        pairs in prop::collection::vec((length(), length()), 4),
        miscount in prop::bool::weighted(0.1),
        with_weights in any::<bool>(),
        p in perturb(),
        (avq, ae, ao, aw) in (arg(), arg(), arg(), arg()),
        seed in any::<u64>(),
    ) {
        let (nl, ml) = row_lengths(b, &pairs, miscount, n, m);
        let lengths = Lengths::new(&nl, &ml).expect("as many of each");
        let vq = Buf::<f32, 4>::input(&avq.spec(apply([s, b, n, dt], 0, p)), seed);
        let e = Buf::<f32, 4>::input(&ae.spec(apply([s, b, m, dt], 1, p)), seed ^ 1);
        let mut out = Buf::<f32, 3>::output(&ao.spec(apply([b, n, dt], 2, p)));
        let mut weights = Buf::<f32, 3>::output(&aw.spec(apply([b, n, s], 3, p)));
        let ok = {
            let (Some(vv), Some(ev), Some(mut ov)) = (vq.view(), e.view(), out.view_mut()) else { return Ok(()) };
            let mut wv = if with_weights {
                match weights.view_mut() { Some(w) => Some(w), None => return Ok(()) }
            } else { None };
            accepted(glance_fusion(vv, ev, &lengths, &mut ov, wv.as_mut()))?
        };
        if ok && comparable(&[vq.numel(), e.numel(), out.numel(), weights.numel()]) {
            let (vc, ec) = (vq.contiguous_copy(), e.contiguous_copy());
            let (mut oc, mut wc) = (out.fresh_contiguous(), weights.fresh_contiguous());
            let mut wcv = wc.view_mut().unwrap();
            glance_fusion(vc.view().unwrap(), ec.view().unwrap(), &lengths, &mut oc.view_mut().unwrap(), if with_weights { Some(&mut wcv) } else { None }).unwrap();
            prop_assert_eq!(out.bits(), oc.bits());
            if with_weights {
                prop_assert_eq!(weights.bits(), wc.bits());
            }
        }
    }
}

/// Found: glance_fusion sized its scratch by layers x width before looking at
/// the output: an empty batch of i32::MAX layers of width i32::MAX asked
/// for 2^62 floats.
#[test]
fn found_glance_fusion_scratch_of_empty_batch() {
    let dt = i32::MAX as usize;
    let none: Vec<f32> = vec![];
    let vq = foveal::View::contiguous(&none, [dt, 0, 1, dt]).unwrap();
    let mut out: Vec<f32> = vec![];
    let mut o = foveal::ViewMut::contiguous(&mut out, [0, 1, dt]).unwrap();
    let lengths = Lengths::full(0, 1, 1);
    let r = glance_fusion(vq, vq, &lengths, &mut o, None);
    assert!(r.is_ok() || r.is_err_and(|e| !matches!(e, foveal::Error::Cuda { .. })));
}
