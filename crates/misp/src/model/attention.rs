//! LLaMA's attention core as one autograd node on the CPU: from the projections' `q, k, v` to
//! the heads' merged output, with its backward written out.
//!
//! Why: in candle ops the stretch between the `q/k/v` projections and `o_proj` is about thirty
//! graph nodes per layer (head splits, transposes, RoPE's narrow / neg / cat / mul / add, copies,
//! two matmuls, the softmax, the merge). candle's backward gives every one of them a zero-filled
//! gradient buffer and an add, several over `[B, H, T, T]`; in `perf` that bookkeeping and the
//! strided copies cost about as much as the attention's own matmuls. Here the forward runs on
//! detached tensors with the fused RoPE and softmax kernels, and [`Attention::bwd`] is the chain
//! rule: four matmuls, the softmax gradient and RoPE's transpose.
//!
//! GQA needs no repeated keys: query heads `kv * g .. kv * g + g` share key head `kv`, so the
//! queries are viewed as `[B, kv, g * T, hd]` and every product runs per key head (the key and
//! value gradients come out summed over their `g` query heads, as the repeat's backward would).

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::fused;

/// What one call attends with: RoPE tables `[T, hd]` (f32, as transformers computes them) and
/// the additive bias `[B, 1, T, T]` (0 = may attend).
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
    fused::fusable(q) && q.rank() == 3
}

/// `softmax(RoPE(q) RoPE(k)^T / sqrt(hd) + bias) v`, heads merged: `q [B, T, H * hd]`,
/// `k, v [B, T, kv * hd]` -> `[B, T, H * hd]`, one node over `(q, k, v)`.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    a: &AttentionInputs,
) -> candle_core::Result<Tensor> {
    let (b, t, _) = q.dims3()?;
    let (h, kv, hd) = (a.heads, a.kv_heads, a.head_dim);
    let g = h / kv;
    let scale = 1.0 / (hd as f64).sqrt();
    let qr = fused::rope_to_heads(&q.detach(), a.cos, a.sin, h)?;
    let kr = fused::rope_to_heads(&k.detach(), a.cos, a.sin, kv)?;
    let vt = v
        .detach()
        .reshape((b, t, kv, hd))?
        .transpose(1, 2)?
        .contiguous()?;
    let qg = qr.reshape((b, kv, g * t, hd))?;
    let scores = qg.matmul(&kr.t()?)?.reshape((b, h, t, t))?;
    let bias = a.bias.to_dtype(q.dtype())?;
    let probs = fused::scaled_softmax(&scores, Some(&bias), scale)?;
    let out = probs
        .reshape((b, kv, g * t, t))?
        .matmul(&vt)?
        .reshape((b, h, t, hd))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, t, h * hd))?;
    let node = Attention {
        out: std::sync::Mutex::new(Some(out)),
        qg,
        kr,
        vt,
        probs,
        cos: a.cos.clone(),
        sin: a.sin.clone(),
        heads: h,
        scale,
    };
    q.apply_op3(k, v, node)
}

/// The saved forward of one [`attention`] call (all detached).
struct Attention {
    /// The output, taken (and so freed from here) by the forward.
    out: std::sync::Mutex<Option<Tensor>>,
    /// Rotated queries `[B, kv, g * T, hd]`, rotated keys and values `[B, kv, T, hd]`.
    qg: Tensor,
    kr: Tensor,
    vt: Tensor,
    /// `[B, H, T, T]`.
    probs: Tensor,
    cos: Tensor,
    sin: Tensor,
    heads: usize,
    scale: f64,
}

impl CustomOp3 for Attention {
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
        let (s, l) = out.storage_and_layout();
        let candle_core::Storage::Cpu(s) = &*s else {
            candle_core::bail!("attention: output is not on the CPU")
        };
        let Some((a, z)) = l.contiguous_offsets() else {
            candle_core::bail!("attention: output is not contiguous")
        };
        let data = match s {
            CpuStorage::F32(v) => CpuStorage::F32(v[a..z].to_vec()),
            CpuStorage::F64(v) => CpuStorage::F64(v[a..z].to_vec()),
            _ => candle_core::bail!("attention: no CPU node for {:?}", out.dtype()),
        };
        Ok((data, out.shape().clone()))
    }

    /// With `G` the output's gradient per head and `P` the probabilities: `dV = P^T G`,
    /// `dP = G V^T`, `dS = softmax'(dP)` (scale included), `dQr = dS Kr`, `dKr = dS^T Qr`, then
    /// RoPE's transpose takes `dQr, dKr` back to the projections' layout.
    fn bwd(
        &self,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, kv, gt, hd) = self.qg.dims4()?;
        let (h, t) = (self.heads, gt * kv / self.heads);
        let go = grad
            .detach()
            .reshape((b, t, h, hd))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, kv, gt, hd))?;
        let pg = self.probs.reshape((b, kv, gt, t))?;
        let dv = pg.t()?.matmul(&go)?;
        let dp = go.matmul(&self.vt.t()?)?.reshape((b, h, t, t))?;
        let ds = fused::softmax_grad(&self.probs, &dp, self.scale)?.reshape((b, kv, gt, t))?;
        let dq = ds.matmul(&self.kr)?.reshape((b, h, t, hd))?;
        let dk = ds.t()?.matmul(&self.qg)?;
        let dq = fused::rope_from_heads(&dq, &self.cos, &self.sin)?;
        let dk = fused::rope_from_heads(&dk, &self.cos, &self.sin)?;
        let dv = dv.transpose(1, 2)?.contiguous()?.reshape((b, t, kv * hd))?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests;
