//! Fused CPU kernels, with their backward passes, for the element-wise stretches of the models
//! that dominate a LoRA step once the matmuls are fast.
//!
//! Written out in candle ops, attention's `softmax(scale * s + bias)` is six graph nodes over a
//! `[B, H, T, T]` tensor, SwiGLU five over `[B, T, I]` and RMSNorm five over `[B, T, D]`: each
//! allocates and zero-fills an output, and backward adds as many again (candle accumulates
//! every node's gradient into a zeroed buffer). `perf` put those element-wise passes and their
//! memsets at over half of a step. Here each is one forward pass and one backward pass.
//!
//! Only the CPU and `f32` / `f64` have kernels; every entry point falls back to the plain
//! composition (the reference the tests compare against) on other devices and dtypes, so the
//! CUDA build keeps working unchanged.

use candle_core::{DType, Tensor, D};
use rayon::prelude::*;

use super::op::{map_rows, zip_map, Kernel, Op};
use super::real::{fusable, lane_sum, vectorised, Real};

// ---------------------------------------------------------------------------------------------
// softmax(scale * s + bias) over the last dimension

/// `softmax(scale * scores + bias)` over the last dimension. `scores [B, H, T, Tk]`; `bias`
/// additive, `[B, 1, T, Tk]` or `[1, 1, T, Tk]` (shared by the heads), or none. The bias gets
/// no gradient (it is a mask).
pub fn scaled_softmax(
    scores: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let plain = || -> candle_core::Result<Tensor> {
        let s = (scores * scale)?;
        let s = match bias {
            Some(b) => s.broadcast_add(&b.to_dtype(s.dtype())?)?,
            None => s,
        };
        candle_nn::ops::softmax(&s, D::Minus1)
    };
    if !fusable(scores) || scores.rank() != 4 {
        return plain();
    }
    let (b, h, t, tk) = scores.dims4()?;
    let scores = scores.contiguous()?;
    let op = |bias_batches| {
        Op(Softmax {
            scale,
            heads: h,
            t,
            cols: tk,
            bias_batches,
        })
    };
    match bias {
        None => scores.apply_op1(op(0)),
        Some(bias) => {
            let (bb, one, bt, btk) = bias.dims4()?;
            if one != 1 || bt != t || btk != tk || !(bb == 1 || bb == b) {
                return plain();
            }
            let bias = bias.to_dtype(scores.dtype())?.contiguous()?;
            scores.apply_op2(&bias, op(bb))
        }
    }
}

struct Softmax {
    scale: f64,
    heads: usize,
    t: usize,
    cols: usize,
    /// 0: no bias; 1: one bias for every batch row; B: one per batch row.
    bias_batches: usize,
}

impl Softmax {
    fn softmax<T: Real>(&self, s: &[T], bias: Option<&[T]>) -> Vec<T> {
        let scale = T::from_f64(self.scale);
        let (heads, t, cols, bb) = (self.heads, self.t, self.cols, self.bias_batches);
        map_rows([s], cols, move |r, row, [src]| {
            let b_row = bias.map(|b| {
                let batch = if bb == 1 { 0 } else { r / (heads * t) };
                let q = r % t;
                &b[(batch * t + q) * cols..(batch * t + q + 1) * cols]
            });
            let mut max = T::NEG_INF;
            for (j, o) in row.iter_mut().enumerate() {
                let v = match b_row {
                    Some(b) => scale * src[j] + b[j],
                    None => scale * src[j],
                };
                *o = v;
                if v > max {
                    max = v;
                }
            }
            // Separate loops: the exps vectorise, the sum uses eight lanes.
            for o in row.iter_mut() {
                *o = (*o - max).exp();
            }
            let inv = T::ONE / lane_sum(row);
            for o in row.iter_mut() {
                *o = *o * inv;
            }
        })
    }
}

impl Kernel<1> for Softmax {
    const NAME: &'static str = "scaled-softmax";
    fn run<T: Real>(&self, [s]: [&[T]; 1]) -> Vec<T> {
        self.softmax(s, None)
    }
    fn backward(
        &self,
        _: [&Tensor; 1],
        p: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 1]> {
        Ok([Some(softmax_grad(p, g, self.scale)?)])
    }
}

impl Kernel<2> for Softmax {
    const NAME: &'static str = "scaled-masked-softmax";
    fn run<T: Real>(&self, [s, bias]: [&[T]; 2]) -> Vec<T> {
        self.softmax(s, Some(bias))
    }
    fn backward(
        &self,
        _: [&Tensor; 2],
        p: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 2]> {
        Ok([Some(softmax_grad(p, g, self.scale)?), None])
    }
}

/// The gradient of [`scaled_softmax`] with respect to its scores, given its output `p` and the
/// gradient `g` of that output: `scale * p * (g - sum(g * p))` per row of the last dimension.
/// No graph is recorded (the fused attention's backward calls it on detached tensors).
pub(crate) fn softmax_grad(p: &Tensor, g: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    p.contiguous()?.apply_op2_no_bwd(
        &g.contiguous()?,
        &Op(SoftmaxGrad {
            scale,
            cols: p.dim(D::Minus1)?,
        }),
    )
}

struct SoftmaxGrad {
    scale: f64,
    cols: usize,
}

impl Kernel<2> for SoftmaxGrad {
    const NAME: &'static str = "scaled-softmax-grad";
    fn run<T: Real>(&self, [p, g]: [&[T]; 2]) -> Vec<T> {
        let scale = T::from_f64(self.scale);
        map_rows([p, g], self.cols, move |_, o, [p, g]| {
            let dot = p.iter().zip(g).fold(T::ZERO, |a, (&p, &g)| a + p * g);
            for ((o, &p), &g) in o.iter_mut().zip(p).zip(g) {
                *o = scale * p * (g - dot);
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE, fused with the move between the projections' `[B, T, N * hd]` and attention's
// `[B, N, T, hd]`

/// HF's RoPE (`x * cos + rotate_half(x) * sin`, `rotate_half(x) = cat(-x2, x1)`) of a
/// projection output `x [B, T, N * hd]`, returned per head as `[B, N, T, hd]`
/// (`backward = false`): one pass instead of a transpose, a copy and seven element-wise ops.
/// With `backward = true`, its transpose: a gradient `[B, N, T, hd]` mapped back to
/// `[B, T, N * hd]` as `g * cos + rotate_half^T(g * sin)`, `rotate_half^T(y) = cat(y2, -y1)`.
/// `cos`, `sin` are `[T, hd]` (every row) or `[B, T, hd]` (one table per row) in `x`'s type.
pub(crate) fn rope_data<T: Real>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    (b, t, heads, hd): (usize, usize, usize, usize),
    backward: bool,
) -> Vec<T> {
    Rope {
        b,
        t,
        heads,
        hd,
        backward,
    }
    .run([x, cos, sin])
}

struct Rope {
    b: usize,
    t: usize,
    heads: usize,
    hd: usize,
    /// `false`: `[B, T, N*hd]` -> rotated `[B, N, T, hd]`; `true`: the transposed map back.
    backward: bool,
}

impl Kernel<3> for Rope {
    const NAME: &'static str = "rope";
    fn run<T: Real>(&self, [x, cos, sin]: [&[T]; 3]) -> Vec<T> {
        let (t, n, hd, half) = (self.t, self.heads, self.hd, self.hd / 2);
        // Tables `[T, hd]` serve every row; `[B, T, hd]` hold one table per row.
        let row_stride = if cos.len() == self.b * t * hd {
            t * hd
        } else {
            0
        };
        let mut out = vec![T::ZERO; x.len()];
        debug_assert_eq!(x.len(), self.b * t * n * hd);
        if !self.backward {
            // One task per (batch row, head): `t * hd` outputs read with stride `n * hd`.
            out.par_chunks_mut(t * hd).enumerate().for_each(|(bn, o)| {
                vectorised(
                    #[inline(always)]
                    || {
                        let (bi, h) = (bn / n, bn % n);
                        for (p, o) in o.chunks_mut(hd).enumerate() {
                            let src = &x[((bi * t + p) * n + h) * hd..][..hd];
                            let at = bi * row_stride + p * hd;
                            let (c, s) = (&cos[at..][..hd], &sin[at..][..hd]);
                            for i in 0..half {
                                o[i] = src[i] * c[i] - src[i + half] * s[i];
                                o[i + half] = src[i + half] * c[i + half] + src[i] * s[i + half];
                            }
                        }
                    },
                )
            });
        } else {
            // One task per (batch row, position): `n * hd` outputs gathered from the heads.
            out.par_chunks_mut(n * hd).enumerate().for_each(|(bp, o)| {
                vectorised(
                    #[inline(always)]
                    || {
                        let (bi, p) = (bp / t, bp % t);
                        let at = bi * row_stride + p * hd;
                        let (c, s) = (&cos[at..][..hd], &sin[at..][..hd]);
                        for (h, o) in o.chunks_mut(hd).enumerate() {
                            let g = &x[((bi * n + h) * t + p) * hd..][..hd];
                            for i in 0..half {
                                o[i] = g[i] * c[i] + g[i + half] * s[i + half];
                                o[i + half] = g[i + half] * c[i + half] - g[i] * s[i];
                            }
                        }
                    },
                )
            });
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm, inference only

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last dimension, for inputs that need
/// no gradient (CLIP's towers at inference: the composition is nine passes over `[B, T, D]`,
/// this is one). Statistics in `x`'s type, as the composition computes them in `f32` for an
/// `f32` model. `None` when there is no kernel for `x` (the caller runs the composition).
pub fn layer_norm_no_grad(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<Option<Tensor>> {
    if !fusable(x)
        || x.track_op()
        || weight.rank() != 1
        || weight.dims() != bias.dims()
        || x.dim(D::Minus1)? != weight.dim(0)?
    {
        return Ok(None);
    }
    let w = weight.to_dtype(x.dtype())?.contiguous()?;
    let b = bias.to_dtype(x.dtype())?.contiguous()?;
    Ok(Some(x.contiguous()?.apply_op3_no_bwd(
        &w,
        &b,
        &Op(LayerNorm { eps }),
    )?))
}

struct LayerNorm {
    eps: f64,
}

impl Kernel<3> for LayerNorm {
    const NAME: &'static str = "layer-norm";
    fn run<T: Real>(&self, [x, w, b]: [&[T]; 3]) -> Vec<T> {
        let cols = w.len();
        let eps = T::from_f64(self.eps);
        let inv_n = T::from_f64(1.0 / cols as f64);
        map_rows([x], cols, move |_, o, [x]| {
            let mean = lane_sum(x) * inv_n;
            for (o, &x) in o.iter_mut().zip(x) {
                *o = x - mean;
            }
            let mut sq = [T::ZERO; 8];
            for c in o.chunks(8) {
                for (a, &v) in sq.iter_mut().zip(c) {
                    *a = *a + v * v;
                }
            }
            let var = sq.iter().fold(T::ZERO, |a, &v| a + v) * inv_n;
            let r = T::ONE / (var + eps).sqrt();
            for ((o, &w), &b) in o.iter_mut().zip(w).zip(b) {
                *o = *o * r * w + b;
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU: silu(g) * u

/// `silu(gate) * up`, the LLaMA MLP's gating (SiLU as `x / (1 + exp(-x))`).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if !fusable(gate) || gate.dims() != up.dims() || gate.dtype() != up.dtype() {
        let silu = (gate * (gate.neg()?.exp()? + 1.0)?.recip()?)?;
        return silu * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, Op(SwiGlu))
}

/// `1 / (1 + exp(-x))`; `exp` overflowing to inf gives 0, the limit.
fn sigmoid<T: Real>(x: T) -> T {
    T::ONE / (T::ONE + (T::ZERO - x).exp())
}

/// `silu(g) * u`   (inputs: g, u)
struct SwiGlu;

impl Kernel<2> for SwiGlu {
    const NAME: &'static str = "swiglu";
    fn run<T: Real>(&self, [g, u]: [&[T]; 2]) -> Vec<T> {
        zip_map(g, u, u, |g, u, _| g * sigmoid(g) * u)
    }
    fn backward(
        &self,
        [g, u]: [&Tensor; 2],
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 2]> {
        let grad = grad.contiguous()?;
        let dg = g.apply_op3_no_bwd(u, &grad, &Op(SwiGluGradGate))?;
        let du = g.apply_op2_no_bwd(&grad, &Op(SwiGluGradUp))?;
        Ok([Some(dg), Some(du)])
    }
}

/// d/du: `grad * silu(g)`   (inputs: g, grad)
struct SwiGluGradUp;

impl Kernel<2> for SwiGluGradUp {
    const NAME: &'static str = "swiglu-grad-up";
    fn run<T: Real>(&self, [g, grad]: [&[T]; 2]) -> Vec<T> {
        zip_map(g, grad, grad, |g, grad, _| grad * g * sigmoid(g))
    }
}

/// d/dg: `grad * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))`   (inputs: g, u, grad)
struct SwiGluGradGate;

impl Kernel<3> for SwiGluGradGate {
    const NAME: &'static str = "swiglu-grad-gate";
    fn run<T: Real>(&self, [g, u, grad]: [&[T]; 3]) -> Vec<T> {
        zip_map(g, u, grad, |g, u, d| {
            let s = sigmoid(g);
            d * u * s * (T::ONE + g * (T::ONE - s))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// QuickGELU (inference)

/// `x * sigmoid(1.702 x)`, OpenAI CLIP's activation, in one pass. Forward only: callers use it
/// where no gradient is wanted (a frozen tower on constant pixels) and keep the differentiable
/// composition otherwise.
pub fn quick_gelu_no_grad(x: &Tensor) -> candle_core::Result<Tensor> {
    if !fusable(x) {
        return x * ((x * -1.702)?.exp()? + 1.0)?.recip()?;
    }
    x.contiguous()?.apply_op1_no_bwd(&Op(QuickGelu))
}

struct QuickGelu;

impl Kernel<1> for QuickGelu {
    const NAME: &'static str = "quick-gelu";
    fn run<T: Real>(&self, [x]: [&[T]; 1]) -> Vec<T> {
        let k = T::from_f64(1.702);
        zip_map(x, x, x, move |x, _, _| x * sigmoid(k * x))
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: w * x / sqrt(mean(x^2) + eps)

/// `weight * x / sqrt(mean(x^2) + eps)` over the last dimension. `weight` gets a gradient only
/// when it is itself on a path to a variable (the world pretraining trains it; LoRA does not).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if !fusable(x) || x.dtype() != weight.dtype() || weight.rank() != 1 {
        // As transformers: statistics in f32 (f64 for f64), cast back before the weight.
        let stat = if x.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let h = x.to_dtype(stat)?;
        let var = h.sqr()?.mean_keepdim(D::Minus1)?;
        let h = h.broadcast_div(&(var + eps)?.sqrt()?)?;
        return h.to_dtype(x.dtype())?.broadcast_mul(weight);
    }
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, Op(RmsNorm { eps }))
}

struct RmsNorm {
    eps: f64,
}

/// `1 / sqrt(mean(x^2) + eps)` of one row.
fn inv_rms<T: Real>(row: &[T], eps: T) -> T {
    let n = T::from_f64(row.len() as f64);
    let ss = row.iter().fold(T::ZERO, |a, &v| a + v * v);
    T::ONE / (ss / n + eps).sqrt()
}

impl Kernel<2> for RmsNorm {
    const NAME: &'static str = "rms-norm";
    fn run<T: Real>(&self, [x, w]: [&[T]; 2]) -> Vec<T> {
        let eps = T::from_f64(self.eps);
        map_rows([x], w.len(), move |_, o, [x]| {
            let r = inv_rms(x, eps);
            for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                *o = x * r * w;
            }
        })
    }
    fn backward(
        &self,
        [x, w]: [&Tensor; 2],
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 2]> {
        let grad = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &grad, &Op(RmsNormGradInput { eps: self.eps }))?;
        let dw = if w.track_op() {
            // sum over rows of grad * x_hat: rare (pretraining), so plain ops are fine. On
            // detached tensors: ops on `x` itself would record a graph in the gradient, which
            // the optimiser's state then keeps alive, with each step's whole graph (a leak of
            // one step's activations per step).
            let d = w.dim(0)?;
            let (x, grad) = (x.detach(), grad.detach());
            let x2 = x.reshape(((), d))?;
            let r = (x2.sqr()?.mean_keepdim(1)? + self.eps)?.sqrt()?.recip()?;
            let xh = x2.broadcast_mul(&r)?;
            Some((grad.reshape(((), d))? * xh)?.sum(0)?)
        } else {
            None
        };
        Ok([Some(dx), dw])
    }
}

/// `dx = r * (g w - x_hat * mean(g w x_hat))`, `x_hat = r x`   (inputs: x, w, grad)
struct RmsNormGradInput {
    eps: f64,
}

impl Kernel<3> for RmsNormGradInput {
    const NAME: &'static str = "rms-norm-grad";
    fn run<T: Real>(&self, [x, w, g]: [&[T]; 3]) -> Vec<T> {
        let cols = w.len();
        let eps = T::from_f64(self.eps);
        let n = T::from_f64(cols as f64);
        map_rows([x, g], cols, move |_, o, [x, g]| {
            let r = inv_rms(x, eps);
            let mut dot = T::ZERO;
            for ((&x, &w), &g) in x.iter().zip(w).zip(g) {
                dot = dot + g * w * x * r;
            }
            let m = dot / n;
            for (((o, &x), &w), &g) in o.iter_mut().zip(x).zip(w).zip(g) {
                *o = r * (g * w - x * r * m);
            }
        })
    }
}

#[cfg(test)]
mod tests;
