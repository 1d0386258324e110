//! multiscale_gather: the CUDA path against the CPU reference (feature
//! `cuda`; every test skips where there is no GPU). Counts and positions
//! must be equal, tokens equal without the probability scaling (the same
//! maxima) and within f32 rounding of it with it (expf against the host's
//! exp). Outputs are poisoned first; their gaps must stay poisoned.

use foveal::cuda::{DevViewMut, Workspace};
use foveal::multiscale_gather::{cpu, cuda, max_tokens};
use foveal::window_mean::num_windows;
use foveal::{Error, Layout, ScaleSet, ViewMut};
use foveal_tests::gpu::{cases, download, gpu, poisoned, GpuElem};
use foveal_tests::{random_strides, random_tensor, rng, to_f64, Tensor, Tol, TIES};
use half::{bf16, f16};
use rand::Rng;

fn check<T: GpuElem>(seed: u64) {
    let Some(stream) = gpu() else { return };
    let mut ws = Workspace::new();
    let mut r = rng(seed);
    for n in 0..cases(40) {
        let window: usize = [1, 2, 4, 4, 4, 8][r.random_range(0..6)];
        let set = match (window, r.random_range(0..3)) {
            (4, 0) => ScaleSet::three(),
            (4, 1) => ScaleSet::seven(),
            _ => {
                let divs: Vec<usize> = (1..=window)
                    .filter(|&d| window.checked_rem(d) == Some(0))
                    .collect();
                let k = r.random_range(1..=6);
                let s: Vec<(usize, usize)> = (0..k)
                    .map(|_| {
                        (
                            divs[r.random_range(0..divs.len())],
                            divs[r.random_range(0..divs.len())],
                        )
                    })
                    .collect();
                ScaleSet::new(&s).unwrap()
            }
        };
        let shape = [
            r.random_range(1..4),
            r.random_range(1..50),
            r.random_range(1..50),
            r.random_range(1..200),
        ];
        let prob = r.random_bool(0.5);
        let ties = r.random_bool(0.5);
        let xs = random_strides(&mut r, shape);
        let x: Tensor<T, 4> = random_tensor(&mut r, shape, xs, -4.0, 4.0);
        let zshape = [shape[0], num_windows(shape[1], shape[2], window), set.len()];
        let zs = random_strides(&mut r, zshape);
        let z = Tensor::from_fn(zshape, zs, f32::NAN, |_| {
            if !prob && r.random_bool(0.1) {
                f32::NAN
            } else if ties {
                TIES[r.random_range(0..TIES.len())]
            } else {
                r.random_range(-3.0f32..3.0)
            }
        });
        let n_out = max_tokens(shape[1], shape[2], window, &set);
        let ts = random_strides(&mut r, [shape[0], n_out, shape[3]]);
        let mut want_t: Tensor<T, 3> = Tensor::filled([shape[0], n_out, shape[3]], ts, T::POISON);
        let mut want_p: Tensor<i32, 2> =
            Tensor::filled([shape[0], n_out], [n_out + 3, 1], i32::MIN);
        let mut want_c = vec![i32::MIN; shape[0]];
        let got_t = want_t.clone();
        let got_p = want_p.clone();
        cpu::multiscale_gather(
            x.view(),
            z.view(),
            window,
            &set,
            prob,
            &mut want_t.view_mut(),
            &mut want_p.view_mut(),
            &mut ViewMut::contiguous(&mut want_c, [shape[0]]).unwrap(),
        )
        .expect("CPU");
        let (dx, dz) = (x.upload(&stream), z.upload(&stream));
        let (mut dt, mut dp) = (got_t.upload(&stream), got_p.upload(&stream));
        let mut dc = poisoned::<i32>(&stream, shape[0]);
        let mut cview = DevViewMut::new(dc.as_view_mut(), Layout::contiguous([shape[0]])).unwrap();
        cuda::multiscale_gather(
            &stream,
            &x.dev_view(&dx),
            &z.dev_view(&dz),
            window,
            &set,
            prob,
            &mut got_t.dev_view_mut(&mut dt),
            &mut got_p.dev_view_mut(&mut dp),
            &mut cview,
            &mut ws,
        )
        .expect("CUDA");
        let what = format!("case {n}: {shape:?}, w {window}, {set:?}, prob {prob}");
        assert_eq!(
            download(&stream, &dc)[..shape[0]],
            want_c[..],
            "{what}: counts"
        );
        assert_eq!(download(&stream, &dp), want_p.data, "{what}: positions");
        let tol = Tol {
            rel: if prob { Tol::for_elem::<T>().rel } else { 0.0 },
            abs: 0.0,
        };
        for (o, (g, w)) in download(&stream, &dt).iter().zip(&want_t.data).enumerate() {
            let ok = g.bits() == w.bits() || tol.allows(to_f64(*g), to_f64(*w), 0.0);
            assert!(ok, "{what}: token storage offset {o}: GPU {g:?}, CPU {w:?}");
        }
    }
}

#[test]
fn matches_cpu_f32() {
    check::<f32>(21);
}

#[test]
fn matches_cpu_f16() {
    check::<f16>(22);
}

#[test]
fn matches_cpu_bf16() {
    check::<bf16>(23);
}

#[test]
fn refuses_scales_not_dividing_the_window() {
    let Some(stream) = gpu() else { return };
    let x: Tensor<f32, 4> = Tensor::filled([1, 4, 4, 2], [32, 8, 2, 1], 0.0);
    let z: Tensor<f32, 3> = Tensor::filled([1, 1, 1], [1, 1, 1], 0.0);
    let t: Tensor<f32, 3> = Tensor::filled([1, 16, 2], [32, 2, 1], f32::NAN);
    let p: Tensor<i32, 2> = Tensor::filled([1, 16], [16, 1], -7);
    let (dx, dz, mut dt, mut dp) = (
        x.upload(&stream),
        z.upload(&stream),
        t.upload(&stream),
        p.upload(&stream),
    );
    let mut dc = poisoned::<i32>(&stream, 1);
    let mut cview = DevViewMut::new(dc.as_view_mut(), Layout::contiguous([1])).unwrap();
    let set = ScaleSet::new(&[(3, 3)]).unwrap();
    let e = cuda::multiscale_gather(
        &stream,
        &x.dev_view(&dx),
        &z.dev_view(&dz),
        4,
        &set,
        false,
        &mut t.dev_view_mut(&mut dt),
        &mut p.dev_view_mut(&mut dp),
        &mut cview,
        &mut Workspace::new(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Value { arg: "scales", .. }));
    assert!(
        download(&stream, &dp).iter().all(|&v| v == -7),
        "written on error"
    );
}
