//! Each fused kernel against the plain candle composition it replaces (forward and autograd
//! gradients, f64) and against central finite differences.

use candle_core::{DType, Device, Tensor, Var, D};

use super::*;
use crate::kernels::exp_f32;
use crate::kernels::testing::{max_abs, rand};

/// Gradient of `sum(c * f(x))` with respect to `x` by autograd.
fn autograd(f: &dyn Fn(&Tensor) -> Tensor, x: &Tensor, c: &Tensor) -> Tensor {
    let v = Var::from_tensor(x).unwrap();
    let g = (f(v.as_tensor()) * c)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    g.get(v.as_tensor()).unwrap().clone()
}

/// The same gradient by central differences, every element.
fn numeric(f: &dyn Fn(&Tensor) -> Tensor, x: &Tensor, c: &Tensor) -> Tensor {
    let h = 1e-6;
    let base: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let loss = |v: &[f64]| -> f64 {
        let t = Tensor::from_slice(v, x.dims(), &Device::Cpu).unwrap();
        (f(&t) * c).unwrap().sum_all().unwrap().to_scalar().unwrap()
    };
    let g: Vec<f64> = (0..base.len())
        .map(|i| {
            let mut p = base.clone();
            p[i] += h;
            let up = loss(&p);
            p[i] -= 2.0 * h;
            (up - loss(&p)) / (2.0 * h)
        })
        .collect();
    Tensor::from_vec(g, x.dims(), &Device::Cpu).unwrap()
}

fn check(
    fused: &dyn Fn(&Tensor) -> Tensor,
    plain: &dyn Fn(&Tensor) -> Tensor,
    x: &Tensor,
    tol_fd: f64,
) {
    let c = rand(fused(x).dims(), 99);
    assert!(max_abs(&fused(x), &plain(x)) < 1e-12, "forward differs");
    let g = autograd(fused, x, &c);
    let g_plain = autograd(plain, x, &c);
    assert!(
        max_abs(&g, &g_plain) < 1e-10,
        "gradient differs from the composition"
    );
    let g_fd = numeric(fused, x, &c);
    let scale = g
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(scale > 1e-3, "gradient is zero");
    assert!(
        max_abs(&g, &g_fd) < tol_fd * scale,
        "gradient differs from finite differences"
    );
}

fn plain_softmax(s: &Tensor, bias: Option<&Tensor>, scale: f64) -> Tensor {
    let s = (s * scale).unwrap();
    let s = match bias {
        Some(b) => s.broadcast_add(b).unwrap(),
        None => s,
    };
    candle_nn::ops::softmax(&s, D::Minus1).unwrap()
}

#[test]
fn softmax_with_per_batch_shared_and_no_bias() {
    let s = rand(&[2, 3, 4, 5], 1);
    // A causal-style mask with one fully visible row and large negatives elsewhere.
    let mut m = vec![0f64; 2 * 4 * 5];
    for b in 0..2 {
        for q in 0..4 {
            for k in 0..5 {
                if k > q + b {
                    m[(b * 4 + q) * 5 + k] = -1e30;
                }
            }
        }
    }
    let per_batch = Tensor::from_vec(m.clone(), (2, 1, 4, 5), &Device::Cpu).unwrap();
    let shared = Tensor::from_vec(m[..20].to_vec(), (1, 1, 4, 5), &Device::Cpu).unwrap();
    for bias in [Some(&per_batch), Some(&shared), None] {
        check(
            &|x| scaled_softmax(x, bias, 0.7).unwrap(),
            &|x| plain_softmax(x, bias, 0.7),
            &s,
            1e-6,
        );
    }
    // f32 runs the same kernel.
    let s32 = s.to_dtype(DType::F32).unwrap();
    let b32 = per_batch.to_dtype(DType::F32).unwrap();
    let d = max_abs(
        &scaled_softmax(&s32, Some(&b32), 0.7)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap(),
        &plain_softmax(&s, Some(&per_batch), 0.7),
    );
    assert!(d < 1e-6, "{d}");
}

#[test]
fn swiglu_gradients_for_gate_and_up() {
    let g = (rand(&[3, 7], 2) * 4.0).unwrap();
    let u = rand(&[3, 7], 3);
    let plain = |g: &Tensor, u: &Tensor| {
        ((g * (g.neg().unwrap().exp().unwrap() + 1.0)
            .unwrap()
            .recip()
            .unwrap())
        .unwrap()
            * u)
            .unwrap()
    };
    check(&|x| swiglu(x, &u).unwrap(), &|x| plain(x, &u), &g, 1e-6);
    check(&|x| swiglu(&g, x).unwrap(), &|x| plain(&g, x), &u, 1e-6);
}

#[test]
fn rms_norm_gradients_for_input_and_trained_weight_none_for_frozen() {
    let x = rand(&[2, 3, 6], 4);
    let w = (rand(&[6], 5) + 1.5).unwrap();
    let plain = |x: &Tensor, w: &Tensor| {
        let var = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        x.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(w)
            .unwrap()
    };
    check(
        &|x| rms_norm(x, &w, 1e-5).unwrap(),
        &|x| plain(x, &w),
        &x,
        1e-6,
    );
    check(
        &|w| rms_norm(&x, w, 1e-5).unwrap(),
        &|w| plain(&x, w),
        &w,
        1e-6,
    );
    let xv = Var::from_tensor(&x).unwrap();
    let grads = rms_norm(xv.as_tensor(), &w, 1e-5)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(&w).is_none(), "a frozen weight got a gradient");
}

#[test]
fn other_dtypes_fall_back_to_the_composition() {
    let x = rand(&[2, 4], 6).to_dtype(DType::BF16).unwrap();
    let w = rand(&[4], 7).to_dtype(DType::BF16).unwrap();
    assert!(!fusable(&x));
    assert_eq!(rms_norm(&x, &w, 1e-5).unwrap().dtype(), DType::BF16);
    assert_eq!(swiglu(&x, &x).unwrap().dtype(), DType::BF16);
}

#[test]
fn fast_exp_is_within_two_ulp_of_libm() {
    let mut worst = 0f64;
    let mut x = -87.0f32;
    while x < 88.0 {
        let (fast, want) = (exp_f32(x), x.exp());
        let ulp = (want.to_bits() as i64 - fast.to_bits() as i64).abs();
        worst = worst.max(ulp as f64);
        x += 0.0137;
    }
    assert!(worst <= 2.0, "worst {worst} ulp");
    assert_eq!(exp_f32(-1e30), 0.0);
    assert_eq!(exp_f32(-100.0), 0.0);
    assert_eq!(exp_f32(0.0), 1.0);
    assert!(exp_f32(1e30).is_finite());
}

#[test]
fn quick_gelu_matches_the_composition() {
    let x = (rand(&[3, 50], 8) * 6.0).unwrap();
    let plain = (&x
        * ((&x * -1.702).unwrap().exp().unwrap() + 1.0)
            .unwrap()
            .recip()
            .unwrap())
    .unwrap();
    assert!(max_abs(&quick_gelu_no_grad(&x).unwrap(), &plain) < 1e-12);
    let x32 = x.to_dtype(DType::F32).unwrap();
    let fast = quick_gelu_no_grad(&x32)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    assert!(max_abs(&fast, &plain) < 1e-5);
}

#[test]
fn layer_norm_matches_the_composition_and_refuses_tracked_inputs() {
    let x = rand(&[2, 5, 37], 9).affine(3.0, 0.7).unwrap();
    let (w, b) = (rand(&[37], 10), rand(&[37], 11));
    let plain = {
        let mean = x.mean_keepdim(D::Minus1).unwrap();
        let c = x.broadcast_sub(&mean).unwrap();
        let var = c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        c.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&w)
            .unwrap()
            .broadcast_add(&b)
            .unwrap()
    };
    let fused = layer_norm_no_grad(&x, &w, &b, 1e-5).unwrap().unwrap();
    assert!(max_abs(&fused, &plain) < 1e-12);
    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let fast = layer_norm_no_grad(&f(&x), &f(&w), &f(&b), 1e-5)
        .unwrap()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    assert!(max_abs(&fast, &plain) < 1e-5);
    // A graph input gets no kernel (it has no backward): the caller composes instead.
    let v = Var::from_tensor(&x).unwrap();
    assert!(layer_norm_no_grad(v.as_tensor(), &w, &b, 1e-5)
        .unwrap()
        .is_none());
}

/// Gradients must come out of backward as plain values: a gradient that records a graph keeps
/// every activation of its step alive through the optimiser's state (pretraining leaked a
/// step's activations per step that way through the RMSNorm weight).
#[test]
fn gradients_of_the_fused_nodes_hold_no_graph() {
    let x = Var::from_tensor(&rand(&[2, 3, 8], 21)).unwrap();
    let w = Var::from_tensor(&rand(&[8], 22)).unwrap();
    let g = Var::from_tensor(&rand(&[2, 3, 8], 23)).unwrap();
    let y = (rms_norm(x.as_tensor(), w.as_tensor(), 1e-6).unwrap()
        + swiglu(g.as_tensor(), x.as_tensor()).unwrap())
    .unwrap();
    let s = scaled_softmax(&y.reshape((2, 1, 3, 8)).unwrap(), None, 0.5).unwrap();
    let grads = s.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v) in [("x", &x), ("w", &w), ("g", &g)] {
        let d = grads.get(v.as_tensor()).unwrap();
        assert!(!d.track_op(), "gradient of {name} records a graph");
    }
}
