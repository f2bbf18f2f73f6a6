//! The fused attention node against attention written in plain candle ops (forward and
//! autograd gradients, f64), against central finite differences, and RoPE's two kernels
//! against the composition and each other (one must be the other's transpose).

use candle_core::{DType, Device, Tensor, Var, D};

use super::*;
use crate::kernels::testing::{max_abs, rand};

/// A layer's shapes and masks: `b` rows of `t` positions, the second row right-padded by two
/// (as training batches are; no query row is wholly masked, so f32 and f64 agree).
struct Case {
    b: usize,
    t: usize,
    heads: usize,
    kv: usize,
    hd: usize,
    cos: Tensor,
    sin: Tensor,
    bias: Tensor,
}

impl Case {
    fn new(heads: usize, kv: usize) -> Self {
        Self::with_len(heads, kv, 6)
    }

    fn with_len(heads: usize, kv: usize, t: usize) -> Self {
        let (b, hd) = (2, 4);
        // HF's tables: frequencies theta^(-2i/hd), each twice.
        let mut cos = Vec::new();
        let mut sin = Vec::new();
        for p in 0..t {
            for i in 0..hd {
                let f = 10000f64.powf(-2.0 * (i % (hd / 2)) as f64 / hd as f64);
                cos.push((p as f64 * f).cos() as f32);
                sin.push((p as f64 * f).sin() as f32);
            }
        }
        let mut bias = Vec::new();
        for row in 0..b {
            for i in 0..t {
                for j in 0..t {
                    let padded = row == 1 && j >= t - 2;
                    bias.push(if j <= i && !padded { 0.0 } else { -1e9 });
                }
            }
        }
        let dev = &Device::Cpu;
        Self {
            b,
            t,
            heads,
            kv,
            hd,
            cos: Tensor::from_vec(cos, (t, hd), dev).unwrap(),
            sin: Tensor::from_vec(sin, (t, hd), dev).unwrap(),
            bias: Tensor::from_vec(bias, (b, 1, t, t), dev).unwrap(),
        }
    }

    fn inputs(&self) -> AttentionInputs<'_> {
        AttentionInputs {
            cos: &self.cos,
            sin: &self.sin,
            bias: &self.bias,
            heads: self.heads,
            kv_heads: self.kv,
            head_dim: self.hd,
        }
    }

    /// `x [B, T, N * hd]` -> `[B, N, T, hd]` with RoPE, in candle ops.
    fn rope_plain(&self, x: &Tensor, n: usize) -> Tensor {
        let x = x
            .reshape((self.b, self.t, n, self.hd))
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let half = self.hd / 2;
        let x1 = x.narrow(D::Minus1, 0, half).unwrap();
        let x2 = x.narrow(D::Minus1, half, half).unwrap();
        let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
        let cos = self.cos.to_dtype(DType::F64).unwrap();
        let sin = self.sin.to_dtype(DType::F64).unwrap();
        (x.broadcast_mul(&cos).unwrap() + rot.broadcast_mul(&sin).unwrap()).unwrap()
    }

    /// The whole core in candle ops, GQA by repeating the key and value heads.
    fn plain(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let (b, t, h, kv, hd) = (self.b, self.t, self.heads, self.kv, self.hd);
        let repeat = |y: Tensor| {
            y.unsqueeze(2)
                .unwrap()
                .broadcast_as((b, kv, h / kv, t, hd))
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((b, h, t, hd))
                .unwrap()
        };
        let q = self.rope_plain(q, h);
        let k = repeat(self.rope_plain(k, kv));
        let v = repeat(
            v.reshape((b, t, kv, hd))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap(),
        );
        let s = (q.matmul(&k.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
        let s = s
            .broadcast_add(&self.bias.to_dtype(DType::F64).unwrap())
            .unwrap();
        let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
        p.matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, h * hd))
            .unwrap()
    }

    fn qkv(&self) -> (Tensor, Tensor, Tensor) {
        let (b, t) = (self.b, self.t);
        (
            rand(&[b, t, self.heads * self.hd], 1),
            rand(&[b, t, self.kv * self.hd], 2),
            rand(&[b, t, self.kv * self.hd], 3),
        )
    }
}

/// `sum(c * f(q, k, v))` and its gradients with respect to `q, k, v` by autograd.
fn grads(
    f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    c: &Tensor,
) -> Vec<Tensor> {
    let vars: Vec<Var> = [q, k, v]
        .iter()
        .map(|x| Var::from_tensor(x).unwrap())
        .collect();
    let out = f(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
    );
    let g = (out * c).unwrap().sum_all().unwrap().backward().unwrap();
    vars.iter()
        .map(|v| g.get(v.as_tensor()).unwrap().clone())
        .collect()
}

fn fused_vs_plain(heads: usize, kv: usize, t: usize) {
    let case = Case::with_len(heads, kv, t);
    let (q, k, v) = case.qkv();
    let fused = |q: &Tensor, k: &Tensor, v: &Tensor| attention(q, k, v, &case.inputs()).unwrap();
    let plain = |q: &Tensor, k: &Tensor, v: &Tensor| case.plain(q, k, v);
    let d = max_abs(&fused(&q, &k, &v), &plain(&q, &k, &v));
    assert!(d < 1e-12, "forward differs by {d}");
    let c = rand(q.dims(), 7);
    let gf = grads(&fused, (&q, &k, &v), &c);
    let gp = grads(&plain, (&q, &k, &v), &c);
    for (name, (a, b)) in ["q", "k", "v"].iter().zip(gf.iter().zip(&gp)) {
        let d = max_abs(a, b);
        assert!(d < 1e-10, "d{name} differs from the composition by {d}");
        assert!(
            max_abs(a, &a.zeros_like().unwrap()) > 1e-3,
            "d{name} is zero"
        );
    }
}

#[test]
fn fused_attention_matches_the_composition_with_multi_head_attention() {
    fused_vs_plain(2, 2, 6);
}

#[test]
fn fused_attention_matches_the_composition_with_grouped_query_attention() {
    fused_vs_plain(4, 2, 6);
}

/// Sequences longer than two blocks of query rows: the causal loop's skipped keys must be
/// exactly the masked ones, in the forward and in every gradient.
#[test]
fn fused_attention_matches_the_composition_over_several_causal_blocks() {
    fused_vs_plain(4, 2, 2 * BLOCK + 5);
    fused_vs_plain(2, 2, BLOCK);
}

#[test]
fn fused_attention_gradients_match_finite_differences() {
    let case = Case::new(4, 2);
    let (q, k, v) = case.qkv();
    let c = rand(q.dims(), 11);
    let loss = |q: &Tensor, k: &Tensor, v: &Tensor| -> f64 {
        (attention(q, k, v, &case.inputs()).unwrap() * &c)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let g = grads(
        &|q, k, v| attention(q, k, v, &case.inputs()).unwrap(),
        (&q, &k, &v),
        &c,
    );
    let h = 1e-6;
    for (which, grad) in g.iter().enumerate() {
        let analytic: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
        let mut xs = [q.clone(), k.clone(), v.clone()];
        let base: Vec<f64> = xs[which].flatten_all().unwrap().to_vec1().unwrap();
        let dims = xs[which].dims().to_vec();
        for (i, &a) in analytic.iter().enumerate() {
            let mut at = |delta: f64| {
                let mut p = base.clone();
                p[i] += delta;
                xs[which] = Tensor::from_vec(p, dims.as_slice(), &Device::Cpu).unwrap();
                loss(&xs[0], &xs[1], &xs[2])
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            assert!(
                (numeric - a).abs() < 1e-6 * (1.0 + a.abs()),
                "input {which} element {i}: autograd {a}, finite differences {numeric}"
            );
        }
    }
}

#[test]
fn rope_kernels_match_the_composition_and_are_each_others_transpose() {
    let case = Case::new(4, 2);
    let dims = (case.b, case.t, 4, case.hd);
    let vec = |x: &Tensor| -> Vec<f64> {
        x.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (cos, sin) = (vec(&case.cos), vec(&case.sin));
    let x = rand(&[case.b, case.t, 4 * case.hd], 5);
    let rotated = crate::kernels::rope_data(&vec(&x), &cos, &sin, dims, false);
    let rotated = Tensor::from_vec(rotated, (case.b, 4, case.t, case.hd), &Device::Cpu).unwrap();
    assert!(max_abs(&rotated, &case.rope_plain(&x, 4)) < 1e-12);
    // <R x, g> = <x, R^T g> for any g.
    let g = rand(rotated.dims(), 6);
    let back = crate::kernels::rope_data(&vec(&g), &cos, &sin, dims, true);
    let back = Tensor::from_vec(back, x.dims(), &Device::Cpu).unwrap();
    let lhs: f64 = (&rotated * &g)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    let rhs: f64 = (&x * &back)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(
        (lhs - rhs).abs() < 1e-12,
        "<Rx, g> = {lhs}, <x, R^T g> = {rhs}"
    );
}

#[test]
fn fused_attention_in_f32_is_close_to_f64() {
    let case = Case::new(4, 2);
    let (q, k, v) = case.qkv();
    let f64_out = attention(&q, &k, &v, &case.inputs()).unwrap();
    let f = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
    let f32_out = attention(&f(&q), &f(&k), &f(&v), &case.inputs())
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    assert!(max_abs(&f64_out, &f32_out) < 1e-5);
}
