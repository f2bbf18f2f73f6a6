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

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// Rows handed to one rayon task: enough work to amortise the task, small enough to share.
const MIN_ELEMS_PER_TASK: usize = 1 << 14;

/// Whether `x` runs on a fused kernel here (CPU, `f32` / `f64`).
pub fn fusable(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// A kernel over `N` contiguous inputs of one float type, written once for every [`Real`].
trait Kernel<const N: usize> {
    const NAME: &'static str;
    fn run<T: Real>(&self, inputs: [&[T]; N]) -> Vec<T>;
}

/// Runs `k` on the inputs' `f32` or `f64` data: the `cpu_fwd` of every op here. The output has
/// the first input's shape; a dtype mix or a strided input is an error naming the op.
fn dispatch<const N: usize, K: Kernel<N>>(
    k: &K,
    inputs: [(&CpuStorage, &Layout); N],
) -> candle_core::Result<(CpuStorage, Shape)> {
    fn slices<'a, T: Real, const N: usize>(
        name: &str,
        inputs: [(&'a CpuStorage, &Layout); N],
    ) -> candle_core::Result<[&'a [T]; N]> {
        let mut out: [&[T]; N] = [&[]; N];
        for (o, (s, l)) in out.iter_mut().zip(inputs) {
            let Some(v) = T::slice(s) else {
                candle_core::bail!("{name}: dtype mismatch between inputs")
            };
            let Some((a, b)) = l.contiguous_offsets() else {
                candle_core::bail!("{name}: input is not contiguous")
            };
            *o = &v[a..b];
        }
        Ok(out)
    }
    let shape = inputs[0].1.shape().clone();
    let out = match inputs[0].0 {
        CpuStorage::F32(_) => CpuStorage::F32(k.run(slices::<f32, N>(K::NAME, inputs)?)),
        CpuStorage::F64(_) => CpuStorage::F64(k.run(slices::<f64, N>(K::NAME, inputs)?)),
        _ => candle_core::bail!("{}: only f32 and f64 have a CPU kernel", K::NAME),
    };
    Ok((out, shape))
}

/// The contiguous data of a CPU storage as `T`, or an error naming `op`.
pub(crate) fn cpu_slice<'a, T: Real>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    match (T::slice(s), l.contiguous_offsets()) {
        (Some(v), Some((a, b))) => Ok(&v[a..b]),
        (None, _) => candle_core::bail!("{op}: dtype mismatch between inputs"),
        (_, None) => candle_core::bail!("{op}: input is not contiguous"),
    }
}

/// The float types the kernels run on.
pub(crate) trait Real:
    'static
    + Copy
    + Send
    + Sync
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + PartialOrd
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    /// `e^x`: [`exp_f32`] for `f32`, the library's for `f64` (the finite-difference tests).
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
    fn from_f64(v: f64) -> Self;
    /// The storage's data if it holds this type.
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    /// Data of this type as a storage.
    fn wrap(v: Vec<Self>) -> CpuStorage;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f32::NEG_INFINITY;
    fn exp(self) -> Self {
        exp_f32(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn wrap(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
}
impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f64::NEG_INFINITY;
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn from_f64(v: f64) -> Self {
        v
    }
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    fn wrap(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(v)
    }
}

/// `e^x` in `f32` to about 1 ulp, branch-free so loops over it vectorise (libm's `expf` is a
/// call per element: 6-7 % of a decoding step in `perf`). Range reduction `x = n ln2 + r` with
/// `ln2` split in two (Cody-Waite), Cephes' degree-6 polynomial for `e^r` on
/// `|r| <= ln2 / 2`, and `2^n` built in the exponent bits. Inputs below -87.3 give 0 (as
/// `expf` underflows), above 88.3 are clamped (finite, ~2.2e38).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to the nearest integer without a call, and leaves that integer
    // in the low mantissa bits: bits(t) = 0x4B40_0000 + n for |n| < 2^22.
    const ROUND: f32 = 12_582_912.0;
    const ROUND_BITS: u32 = 0x4B40_0000;
    let xc = x.clamp(-87.3, 88.3);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n from n's bits, in integer lanes (`n as i32` is a saturating cast, which does not
    // vectorise). n is in [-126, 127], so n + 127 is a normal exponent.
    let scale = f32::from_bits(t.to_bits().wrapping_sub(ROUND_BITS - 127) << 23);
    if x < -87.3 {
        0.0
    } else {
        e * scale
    }
}

/// Runs `f` compiled for the widest vector unit this CPU has (AVX-512, else AVX2 + FMA, else
/// the build's baseline, SSE2): the release binary is built for any x86-64, so without this the
/// element-wise loops here vectorise four lanes wide at most. `f` is inlined into a function
/// with those target features, which is where the loop vectoriser sees it. Rust never fuses
/// `a * b + c` into an FMA on its own, so every path gives the same bits.
#[inline(always)]
pub(crate) fn vectorised<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { with_avx512(f) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { with_avx2(f) };
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
unsafe fn with_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `sum(v)` with eight partial sums, so the loop vectorises without reassociation licence.
pub(crate) fn lane_sum<T: Real>(v: &[T]) -> T {
    let mut acc = [T::ZERO; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = *a + x;
        }
    }
    let tail = chunks.remainder().iter().fold(T::ZERO, |a, &x| a + x);
    acc.iter().fold(tail, |a, &x| a + x)
}

/// `softmax(scale * s + bias)` of one row, in place.
#[inline(always)]
pub(crate) fn softmax_row<T: Real>(row: &mut [T], bias: &[T], scale: T) {
    let mut max = T::NEG_INF;
    for (s, &b) in row.iter_mut().zip(bias) {
        *s = scale * *s + b;
        if *s > max {
            max = *s;
        }
    }
    for s in row.iter_mut() {
        *s = (*s - max).exp();
    }
    let inv = T::ONE / lane_sum(row);
    for s in row.iter_mut() {
        *s = *s * inv;
    }
}

/// `n` uninitialised values: a kernel's output, whose parallel chunks each pass through
/// [`zeroed`] on their own thread. `vec![0.0; n]` zero-fills the whole output on the calling
/// thread first, with the other threads idle (a 20 MB memset per MLP activation in CLIP).
pub(crate) fn uninit<T: Real>(n: usize) -> Vec<std::mem::MaybeUninit<T>> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: `MaybeUninit` needs no initialisation.
    unsafe { v.set_len(n) };
    v
}

/// A chunk of [`uninit`]'s output, zeroed (while it is in this thread's cache) and usable.
#[inline(always)]
pub(crate) fn zeroed<T: Real>(c: &mut [std::mem::MaybeUninit<T>]) -> &mut [T] {
    for x in c.iter_mut() {
        x.write(T::ZERO);
    }
    // SAFETY: every element was just written; `MaybeUninit<T>` has `T`'s layout.
    unsafe { &mut *(c as *mut [std::mem::MaybeUninit<T>] as *mut [T]) }
}

/// [`uninit`]'s output once every element has been written.
///
/// # Safety
/// Every element must have been initialised (each chunk passed through [`zeroed`]).
pub(crate) unsafe fn assume_init<T: Real>(v: Vec<std::mem::MaybeUninit<T>>) -> Vec<T> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: same allocation, length and capacity; `MaybeUninit<T>` has `T`'s layout, and the
    // caller vouches every element is initialised.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut T, v.len(), v.capacity()) }
}

fn rows_per_task(cols: usize) -> usize {
    (MIN_ELEMS_PER_TASK / cols.max(1)).max(1)
}

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
    match bias {
        None => scores.apply_op1(Softmax {
            scale,
            heads: h,
            t,
            cols: tk,
            bias_batches: 0,
        }),
        Some(bias) => {
            let (bb, one, bt, btk) = bias.dims4()?;
            if one != 1 || bt != t || btk != tk || !(bb == 1 || bb == b) {
                return plain();
            }
            let bias = bias.to_dtype(scores.dtype())?.contiguous()?;
            scores.apply_op2(
                &bias,
                Softmax {
                    scale,
                    heads: h,
                    t,
                    cols: tk,
                    bias_batches: bb,
                },
            )
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
        let mut out = uninit::<T>(s.len());
        let (heads, t, cols, bb) = (self.heads, self.t, self.cols, self.bias_batches);
        out.par_chunks_mut(cols * rows_per_task(cols))
            .enumerate()
            .for_each(|(task, chunk)| {
                let chunk = zeroed(chunk);
                vectorised(
                    #[inline(always)]
                    || {
                        let first = task * rows_per_task(cols);
                        for (i, row) in chunk.chunks_mut(cols).enumerate() {
                            let r = first + i;
                            let src = &s[r * cols..(r + 1) * cols];
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
                        }
                    },
                )
            });
        // SAFETY: every chunk of `out` went through `zeroed`.
        unsafe { assume_init(out) }
    }

    /// `ds = scale * p * (g - sum(g * p))` per row.
    fn grad(&self, p: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
        softmax_grad(p, g, self.scale)
    }
}

/// The gradient of [`scaled_softmax`] with respect to its scores, given its output `p` and the
/// gradient `g` of that output: `scale * p * (g - sum(g * p))` per row of the last dimension.
/// No graph is recorded (the fused attention's backward calls it on detached tensors).
pub(crate) fn softmax_grad(p: &Tensor, g: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    p.contiguous()?.apply_op2_no_bwd(
        &g.contiguous()?,
        &SoftmaxGrad {
            scale,
            cols: p.dim(D::Minus1)?,
        },
    )
}

impl Kernel<1> for Softmax {
    const NAME: &'static str = "softmax";
    fn run<T: Real>(&self, [s]: [&[T]; 1]) -> Vec<T> {
        self.softmax(s, None)
    }
}

impl Kernel<2> for Softmax {
    const NAME: &'static str = "softmax";
    fn run<T: Real>(&self, [s, bias]: [&[T]; 2]) -> Vec<T> {
        self.softmax(s, Some(bias))
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "scaled-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch(self, [(s, l)])
    }
    fn bwd(&self, _s: &Tensor, p: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.grad(p, g)?))
    }
}

impl CustomOp2 for Softmax {
    fn name(&self) -> &'static str {
        "scaled-masked-softmax"
    }
    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        sl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch(self, [(s, sl), (b, bl)])
    }
    fn bwd(
        &self,
        _s: &Tensor,
        _b: &Tensor,
        p: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.grad(p, g)?), None))
    }
}

struct SoftmaxGrad {
    scale: f64,
    cols: usize,
}

impl Kernel<2> for SoftmaxGrad {
    const NAME: &'static str = "softmax grad";
    fn run<T: Real>(&self, [p, g]: [&[T]; 2]) -> Vec<T> {
        let (scale, cols) = (T::from_f64(self.scale), self.cols);
        let mut out = uninit::<T>(p.len());
        out.par_chunks_mut(cols * rows_per_task(cols))
            .zip(p.par_chunks(cols * rows_per_task(cols)))
            .zip(g.par_chunks(cols * rows_per_task(cols)))
            .for_each(|((o, p), g)| {
                let o = zeroed(o);
                vectorised(
                    #[inline(always)]
                    || {
                        for ((o, p), g) in
                            o.chunks_mut(cols).zip(p.chunks(cols)).zip(g.chunks(cols))
                        {
                            let dot = p.iter().zip(g).fold(T::ZERO, |a, (&p, &g)| a + p * g);
                            for ((o, &p), &g) in o.iter_mut().zip(p).zip(g) {
                                *o = scale * p * (g - dot);
                            }
                        }
                    },
                )
            });
        // SAFETY: every chunk of `out` went through `zeroed`.
        unsafe { assume_init(out) }
    }
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "scaled-softmax-grad"
    }
    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        pl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch(self, [(p, pl), (g, gl)])
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
/// `cos`, `sin` are `[T, hd]` in `x`'s type.
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
                            let (c, s) = (&cos[p * hd..][..hd], &sin[p * hd..][..hd]);
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
                        let (c, s) = (&cos[p * hd..][..hd], &sin[p * hd..][..hd]);
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
        &LayerNorm { eps },
    )?))
}

struct LayerNorm {
    eps: f64,
}

impl Kernel<3> for LayerNorm {
    const NAME: &'static str = "layer norm";
    fn run<T: Real>(&self, [x, w, b]: [&[T]; 3]) -> Vec<T> {
        let cols = w.len();
        let eps = T::from_f64(self.eps);
        let inv_n = T::from_f64(1.0 / cols as f64);
        let mut out = uninit::<T>(x.len());
        let per = cols * rows_per_task(cols);
        out.par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .for_each(|(o, x)| {
                let o = zeroed(o);
                vectorised(
                    #[inline(always)]
                    || {
                        for (o, x) in o.chunks_mut(cols).zip(x.chunks(cols)) {
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
                        }
                    },
                )
            });
        // SAFETY: every chunk of `out` went through `zeroed`.
        unsafe { assume_init(out) }
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch(self, [(x, xl), (w, wl), (b, bl)])
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
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

struct SwiGlu;

/// `1 / (1 + exp(-x))`; `exp` overflowing to inf gives 0, the limit.
fn sigmoid<T: Real>(x: T) -> T {
    T::ONE / (T::ONE + (T::ZERO - x).exp())
}

/// `f` is `Copy` and copied into the loop, so what it captures is in registers: read through
/// the closure's reference, a captured scalar might alias the output and the loop would not
/// vectorise (callers pass `move` closures).
fn map2<T: Real>(a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync + Copy) -> Vec<T> {
    let mut out = uninit::<T>(a.len());
    out.par_chunks_mut(MIN_ELEMS_PER_TASK)
        .zip(a.par_chunks(MIN_ELEMS_PER_TASK))
        .zip(b.par_chunks(MIN_ELEMS_PER_TASK))
        .for_each(|((o, a), b)| {
            let o = zeroed(o);
            vectorised(
                #[inline(always)]
                || {
                    let local = f;
                    for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                        *o = local(a, b);
                    }
                },
            )
        });
    // SAFETY: every chunk of `out` went through `zeroed`.
    unsafe { assume_init(out) }
}

fn map3<T: Real>(a: &[T], b: &[T], c: &[T], f: impl Fn(T, T, T) -> T + Sync + Copy) -> Vec<T> {
    let mut out = uninit::<T>(a.len());
    out.par_chunks_mut(MIN_ELEMS_PER_TASK)
        .zip(a.par_chunks(MIN_ELEMS_PER_TASK))
        .zip(b.par_chunks(MIN_ELEMS_PER_TASK))
        .zip(c.par_chunks(MIN_ELEMS_PER_TASK))
        .for_each(|(((o, a), b), c)| {
            let o = zeroed(o);
            vectorised(
                #[inline(always)]
                || {
                    let local = f;
                    for (((o, &a), &b), &c) in o.iter_mut().zip(a).zip(b).zip(c) {
                        *o = local(a, b, c);
                    }
                },
            )
        });
    // SAFETY: every chunk of `out` went through `zeroed`.
    unsafe { assume_init(out) }
}

/// `silu(g) * u`   (inputs: g, u)
impl Kernel<2> for SwiGlu {
    const NAME: &'static str = "swiglu";
    fn run<T: Real>(&self, [g, u]: [&[T]; 2]) -> Vec<T> {
        map2(g, u, |g, u| g * sigmoid(g) * u)
    }
}

/// d/du: `grad * silu(g)`   (inputs: g, grad)
struct SwiGluGradUp;

impl Kernel<2> for SwiGluGradUp {
    const NAME: &'static str = "swiglu grad up";
    fn run<T: Real>(&self, [g, grad]: [&[T]; 2]) -> Vec<T> {
        map2(g, grad, |g, grad| grad * g * sigmoid(g))
    }
}

impl CustomOp2 for SwiGluGradUp {
    fn name(&self) -> &'static str {
        "swiglu-grad-up"
    }
    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        d: &CpuStorage,
        dl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch(self, [(g, gl), (d, dl)])
    }
}

/// d/dg: `grad * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))`   (inputs: g, u, grad)
struct SwiGluGradGate;

impl Kernel<3> for SwiGluGradGate {
    const NAME: &'static str = "swiglu grad gate";
    fn run<T: Real>(&self, [g, u, grad]: [&[T]; 3]) -> Vec<T> {
        map3(g, u, grad, |g, u, d| {
            let s = sigmoid(g);
            d * u * s * (T::ONE + g * (T::ONE - s))
        })
    }
}

impl CustomOp3 for SwiGluGradGate {
    fn name(&self) -> &'static str {
        "swiglu-grad-gate"
    }
    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
        d: &CpuStorage,
        dl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch(self, [(g, gl), (u, ul), (d, dl)])
    }
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }
    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch(self, [(g, gl), (u, ul)])
    }
    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dg = g.apply_op3_no_bwd(u, &grad, &SwiGluGradGate)?;
        let du = g.apply_op2_no_bwd(&grad, &SwiGluGradUp)?;
        Ok((Some(dg), Some(du)))
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
    x.contiguous()?.apply_op1_no_bwd(&QuickGelu)
}

struct QuickGelu;

impl Kernel<1> for QuickGelu {
    const NAME: &'static str = "quick gelu";
    fn run<T: Real>(&self, [x]: [&[T]; 1]) -> Vec<T> {
        let k = T::from_f64(1.702);
        map2(x, x, move |x, _| x * sigmoid(k * x))
    }
}

impl CustomOp1 for QuickGelu {
    fn name(&self) -> &'static str {
        "quick-gelu"
    }
    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch(self, [(x, l)])
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
        .apply_op2(&weight.contiguous()?, RmsNorm { eps })
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
    const NAME: &'static str = "rms norm";
    fn run<T: Real>(&self, [x, w]: [&[T]; 2]) -> Vec<T> {
        let cols = w.len();
        let eps = T::from_f64(self.eps);
        let mut out = uninit::<T>(x.len());
        let per = cols * rows_per_task(cols);
        out.par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .for_each(|(o, x)| {
                let o = zeroed(o);
                vectorised(
                    #[inline(always)]
                    || {
                        for (o, x) in o.chunks_mut(cols).zip(x.chunks(cols)) {
                            let r = inv_rms(x, eps);
                            for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                                *o = x * r * w;
                            }
                        }
                    },
                )
            });
        // SAFETY: every chunk of `out` went through `zeroed`.
        unsafe { assume_init(out) }
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch(self, [(x, xl), (w, wl)])
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &grad, &RmsNormGradInput { eps: self.eps })?;
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
        Ok((Some(dx), dw))
    }
}

/// `dx = r * (g w - x_hat * mean(g w x_hat))`, `x_hat = r x`   (inputs: x, w, grad)
struct RmsNormGradInput {
    eps: f64,
}

impl Kernel<3> for RmsNormGradInput {
    const NAME: &'static str = "rms norm grad";
    fn run<T: Real>(&self, [x, w, g]: [&[T]; 3]) -> Vec<T> {
        let cols = w.len();
        let eps = T::from_f64(self.eps);
        let n = T::from_f64(cols as f64);
        let mut out = uninit::<T>(x.len());
        let per = cols * rows_per_task(cols);
        out.par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .zip(g.par_chunks(per))
            .for_each(|((o, x), g)| {
                let o = zeroed(o);
                vectorised(
                    #[inline(always)]
                    || {
                        for ((o, x), g) in
                            o.chunks_mut(cols).zip(x.chunks(cols)).zip(g.chunks(cols))
                        {
                            let r = inv_rms(x, eps);
                            let mut dot = T::ZERO;
                            for ((&x, &w), &g) in x.iter().zip(w).zip(g) {
                                dot = dot + g * w * x * r;
                            }
                            let m = dot / n;
                            for (((o, &x), &w), &g) in o.iter_mut().zip(x).zip(w).zip(g) {
                                *o = r * (g * w - x * r * m);
                            }
                        }
                    },
                )
            });
        // SAFETY: every chunk of `out` went through `zeroed`.
        unsafe { assume_init(out) }
    }
}

impl CustomOp3 for RmsNormGradInput {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch(self, [(x, xl), (w, wl), (g, gl)])
    }
}

#[cfg(test)]
pub(crate) mod tests;
