//! LLaMA's attention core as one autograd node on the CPU: from the projections' `q, k, v` to
//! the heads' merged output, with its backward written out.
//!
//! Why: in candle ops the stretch between the `q/k/v` projections and `o_proj` is about thirty
//! graph nodes per layer (head splits, transposes, RoPE's narrow / neg / cat / mul / add, copies,
//! two matmuls, the softmax, the merge). candle's backward gives every one of them a zero-filled
//! gradient buffer and an add, several over `[B, H, T, T]`; in `perf` that bookkeeping and the
//! strided copies cost about as much as the attention's own matmuls. Here the forward is RoPE
//! (one fused pass), then per key head and block of query rows: scores, softmax and the
//! product with the values, on gemm directly; [`Attention::bwd`] is the chain rule in the same
//! loop.
//!
//! The mask is causal (LLaMA's), so a block of query rows `r0..r1` has every key at or past
//! `r1` masked: its scores, probabilities and products stop at column `r1`, which skips about
//! half of the work. Those probabilities are exactly zero in the full softmax too (the bias is
//! `f32::MIN / 2`), so only a query row with *no* allowed key (a left-padded position) comes
//! out differently: uniform over the keys up to its block's end instead of over all of them.
//! Such rows are padding, which no real token attends to.
//!
//! GQA needs no repeated keys: query heads `kv * g .. kv * g + g` share key head `kv`, so a
//! task per `(batch row, key head)` runs its `g` query heads and owns that key head's gradients.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::gemm::{product_into, Mat, MatMut, Threads};
use super::real::{self, Real};

/// Query rows per block of the causal loop.
const BLOCK: usize = 64;

/// What one call attends with: RoPE tables `[T, hd]` (f32, as transformers computes them) and
/// the additive bias `[B, 1, T, T]` (0 = may attend), which must be causal.
pub(crate) struct AttentionInputs<'a> {
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub bias: &'a Tensor,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Whether [`attention`] has a kernel for these projections (CPU, `f32` / `f64`, `[B, T, _]`).
pub(crate) fn fusable(q: &Tensor) -> bool {
    real::fusable(q) && q.rank() == 3
}

/// `softmax(RoPE(q) RoPE(k)^T / sqrt(hd) + bias) v`, heads merged: `q [B, T, H * hd]`,
/// `k, v [B, T, kv * hd]` -> `[B, T, H * hd]`, one node over `(q, k, v)`.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    a: &AttentionInputs,
) -> candle_core::Result<Tensor> {
    match q.dtype() {
        DType::F32 => attention_as::<f32>(q, k, v, a),
        DType::F64 => attention_as::<f64>(q, k, v, a),
        dt => candle_core::bail!("attention: no CPU node for {dt:?}"),
    }
}

/// The sizes of one call.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    h: usize,
    kv: usize,
    hd: usize,
}

impl Dims {
    /// Query heads per key head.
    fn g(&self) -> usize {
        self.h / self.kv
    }
}

/// A copy of `x`'s values as `T`.
fn data<T: WithDType>(x: &Tensor) -> candle_core::Result<Vec<T>> {
    x.detach().to_dtype(T::DTYPE)?.flatten_all()?.to_vec1()
}

/// `f` of `x`'s contiguous CPU data as `T`, without a copy when `x` is contiguous.
pub(super) fn with_data<T: Real, R>(
    x: &Tensor,
    f: impl FnOnce(&[T]) -> R,
) -> candle_core::Result<R> {
    let x = x.contiguous()?;
    let (s, l) = x.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*s else {
        candle_core::bail!("attention: input is not on the CPU")
    };
    Ok(f(real::cpu_slice::<T>(s, l, "attention")?))
}

fn attention_as<T: Real + WithDType>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    a: &AttentionInputs,
) -> candle_core::Result<Tensor> {
    let (b, t, _) = q.dims3()?;
    let d = Dims {
        b,
        t,
        h: a.heads,
        kv: a.kv_heads,
        hd: a.head_dim,
    };
    if k.dims() != [b, t, d.kv * d.hd] || v.dims() != k.dims() || q.dim(2)? != d.h * d.hd {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} for {} heads / {} key heads of {}",
            q.dims(),
            k.dims(),
            v.dims(),
            d.h,
            d.kv,
            d.hd
        );
    }
    if a.bias.dims() != [b, 1, t, t] {
        candle_core::bail!(
            "attention: bias {:?}, expected [{b}, 1, {t}, {t}]",
            a.bias.dims()
        );
    }
    let (cos, sin) = (data::<T>(a.cos)?, data::<T>(a.sin)?);
    // Tables shared by every row (`[T, hd]`) or one per row (`[B, 1, T, hd]`, Qwen2.5-VL's
    // multimodal RoPE); `rope_data` tells them apart by length.
    let sizes = [t * d.hd, b * t * d.hd];
    if !sizes.contains(&cos.len()) || sin.len() != cos.len() {
        candle_core::bail!(
            "attention: RoPE tables {:?}, expected [{t}, {hd}] or [{b}, 1, {t}, {hd}]",
            a.cos.dims(),
            hd = d.hd
        );
    }
    let qr = with_data(q, |q| {
        super::rope_data(q, &cos, &sin, (b, t, d.h, d.hd), false)
    })?;
    let kr = with_data(k, |k| {
        super::rope_data(k, &cos, &sin, (b, t, d.kv, d.hd), false)
    })?;
    let vd = data::<T>(v)?;
    let scale = <T as Real>::from_f64(1.0 / (d.hd as f64).sqrt());
    let (probs, out) = forward(d, &qr, &kr, &vd, &data::<T>(a.bias)?, scale);
    let node = Attention {
        out: std::sync::Mutex::new(Some(out)),
        d,
        qr,
        kr,
        v: vd,
        probs,
        cos,
        sin,
        scale,
    };
    q.apply_op3(k, v, node)
}

/// `x` in the layout `[B, N, T, hd]` -> `[B, T, N * hd]`.
fn merge_heads<T: Real>(x: &[T], (b, n, t, hd): (usize, usize, usize, usize)) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len()];
    out.par_chunks_mut(n * hd).enumerate().for_each(|(bp, o)| {
        let (bi, p) = (bp / t, bp % t);
        for (h, o) in o.chunks_mut(hd).enumerate() {
            o.copy_from_slice(&x[((bi * n + h) * t + p) * hd..][..hd]);
        }
    });
    debug_assert_eq!(out.len(), b * t * n * hd);
    out
}

/// The rows `r0..r0 + rows` of a `[T, cols]` row-major matrix, first `cols` columns of each.
fn rows_of<T>(x: &[T], r0: usize, rows: usize, cols: usize, rs: usize) -> Mat<'_, T> {
    Mat {
        data: &x[r0 * rs..],
        rows,
        cols,
        rs,
        cs: 1,
    }
}

/// Probabilities `[B, H, T, T]` (zero past each block's causal end) and the merged output
/// `[B, T, H * hd]`, from rotated `qr [B, H, T, hd]`, `kr [B, kv, T, hd]` and the values as
/// projected, `v [B, T, kv * hd]`.
fn forward<T: Real>(
    d: Dims,
    qr: &[T],
    kr: &[T],
    v: &[T],
    bias: &[T],
    scale: T,
) -> (Vec<T>, Vec<T>) {
    let Dims { b, t, h, kv, hd } = d;
    let g = d.g();
    let mut probs = vec![T::ZERO; b * h * t * t];
    let mut o = vec![T::ZERO; b * h * t * hd];
    probs
        .par_chunks_mut(g * t * t)
        .zip(o.par_chunks_mut(g * t * hd))
        .enumerate()
        .for_each(|(bk, (p, o))| {
            let (bi, kh) = (bk / kv, bk % kv);
            let keys = &kr[bk * t * hd..][..t * hd];
            let values = &v[(bi * t * kv + kh) * hd..];
            let bias = &bias[bi * t * t..][..t * t];
            for j in 0..g {
                let qm = &qr[(bi * h + kh * g + j) * t * hd..][..t * hd];
                let p = &mut p[j * t * t..][..t * t];
                let o = &mut o[j * t * hd..][..t * hd];
                for r0 in (0..t).step_by(BLOCK) {
                    let (rows, end) = ((t - r0).min(BLOCK), (r0 + BLOCK).min(t));
                    product_into(
                        MatMut::new(&mut p[r0 * t..], rows, end, t),
                        rows_of(qm, r0, rows, hd, hd),
                        rows_of(keys, 0, end, hd, hd).t(),
                        T::ONE,
                        false,
                        Threads::One,
                    );
                    for r in r0..r0 + rows {
                        real::softmax_row(&mut p[r * t..][..end], &bias[r * t..][..end], scale);
                    }
                    product_into(
                        MatMut::new(&mut o[r0 * hd..], rows, hd, hd),
                        rows_of(p, r0, rows, end, t),
                        rows_of(values, 0, end, hd, kv * hd),
                        T::ONE,
                        false,
                        Threads::One,
                    );
                }
            }
        });
    let out = merge_heads(&o, (b, h, t, hd));
    (probs, out)
}

/// The saved forward of one [`attention`] call.
struct Attention<T> {
    /// The output, taken (and so freed from here) by the forward.
    out: std::sync::Mutex<Option<Vec<T>>>,
    d: Dims,
    /// Rotated queries `[B, H, T, hd]` and keys `[B, kv, T, hd]`; values `[B, T, kv * hd]`.
    qr: Vec<T>,
    kr: Vec<T>,
    v: Vec<T>,
    /// `[B, H, T, T]`.
    probs: Vec<T>,
    cos: Vec<T>,
    sin: Vec<T>,
    scale: T,
}

impl<T: Real + WithDType> Attention<T> {
    /// Gradients of `qr [B, H, T, hd]`, `kr` and `v` (both `[B, kv, T, hd]`) from the output's
    /// `go [B, T, H * hd]`. With `P` the probabilities and `G` a head's gradient, per block:
    /// `dV += P^T G`, `dP = G V^T`, `dS = scale P (dP - rowsum(dP P))`, `dQr = dS Kr`,
    /// `dKr += dS^T Qr`.
    fn backward(&self, go: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
        let Dims { b, t, h, kv, hd } = self.d;
        let g = self.d.g();
        let mut dq = vec![T::ZERO; b * h * t * hd];
        let mut dk = vec![T::ZERO; b * kv * t * hd];
        let mut dv = vec![T::ZERO; b * kv * t * hd];
        dq.par_chunks_mut(g * t * hd)
            .zip(dk.par_chunks_mut(t * hd))
            .zip(dv.par_chunks_mut(t * hd))
            .enumerate()
            .for_each(|(bk, ((dq, dk), dv))| {
                let (bi, kh) = (bk / kv, bk % kv);
                let keys = &self.kr[bk * t * hd..][..t * hd];
                let values = &self.v[(bi * t * kv + kh) * hd..];
                let mut ds = vec![T::ZERO; BLOCK.min(t) * t];
                for j in 0..g {
                    let hh = kh * g + j;
                    let qm = &self.qr[(bi * h + hh) * t * hd..][..t * hd];
                    let p = &self.probs[(bi * h + hh) * t * t..][..t * t];
                    let grad = &go[(bi * t * h + hh) * hd..];
                    let dq = &mut dq[j * t * hd..][..t * hd];
                    for r0 in (0..t).step_by(BLOCK) {
                        let (rows, end) = ((t - r0).min(BLOCK), (r0 + BLOCK).min(t));
                        let gb = rows_of(grad, r0, rows, hd, h * hd);
                        let pb = rows_of(p, r0, rows, end, t);
                        product_into(
                            MatMut::new(dv, end, hd, hd),
                            pb.t(),
                            gb,
                            T::ONE,
                            true,
                            Threads::One,
                        );
                        product_into(
                            MatMut::new(&mut ds, rows, end, end),
                            gb,
                            rows_of(values, 0, end, hd, kv * hd).t(),
                            T::ONE,
                            false,
                            Threads::One,
                        );
                        for r in 0..rows {
                            let pr = &p[(r0 + r) * t..][..end];
                            let dr = &mut ds[r * end..][..end];
                            let dot = pr
                                .iter()
                                .zip(dr.iter())
                                .fold(T::ZERO, |a, (&p, &d)| a + p * d);
                            for (d, &p) in dr.iter_mut().zip(pr) {
                                *d = self.scale * p * (*d - dot);
                            }
                        }
                        let dsb = Mat::new(&ds[..rows * end], rows, end);
                        product_into(
                            MatMut::new(&mut dq[r0 * hd..], rows, hd, hd),
                            dsb,
                            rows_of(keys, 0, end, hd, hd),
                            T::ONE,
                            false,
                            Threads::One,
                        );
                        product_into(
                            MatMut::new(dk, end, hd, hd),
                            dsb.t(),
                            rows_of(qm, r0, rows, hd, hd),
                            T::ONE,
                            true,
                            Threads::One,
                        );
                    }
                }
            });
        (dq, dk, dv)
    }
}

impl<T: Real + WithDType> CustomOp3 for Attention<T> {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        _q: &CpuStorage,
        _ql: &Layout,
        _k: &CpuStorage,
        _kl: &Layout,
        _v: &CpuStorage,
        _vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some(out) = self
            .out
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: poisoned".into()))?
            .take()
        else {
            candle_core::bail!("attention: forward ran twice")
        };
        let Dims { b, t, h, hd, .. } = self.d;
        Ok((T::wrap(out), (b, t, h * hd).into()))
    }

    fn bwd(
        &self,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Dims { b, t, h, kv, hd } = self.d;
        let (dqr, dkr, dvh) = with_data(grad, |g| self.backward(g))?;
        let cpu = &candle_core::Device::Cpu;
        let dq = super::rope_data(&dqr, &self.cos, &self.sin, (b, t, h, hd), true);
        let dk = super::rope_data(&dkr, &self.cos, &self.sin, (b, t, kv, hd), true);
        let dv = merge_heads(&dvh, (b, kv, t, hd));
        Ok((
            Some(Tensor::from_vec(dq, (b, t, h * hd), cpu)?),
            Some(Tensor::from_vec(dk, (b, t, kv * hd), cpu)?),
            Some(Tensor::from_vec(dv, (b, t, kv * hd), cpu)?),
        ))
    }
}

#[cfg(test)]
mod tests;
