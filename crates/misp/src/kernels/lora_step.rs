//! LoRA's training step on the CPU as one autograd node: `y = x W^T + s (drop(x) A^T) B^T`
//! over `(x, A, B)` with the frozen `W` beside it, its products on gemm directly and its
//! backward written out, plus the counter-based dropout masks both this node and the plain
//! composition draw.

use std::sync::Mutex;

use candle_core::Tensor;
use rayon::prelude::*;

use super::gemm::{self, Mat};
use super::real::{cpu_slice, Real};

/// `x W^T + s (drop(x) A^T) B^T` for `x [.., in]`, `W [out, in]` (frozen, detached here),
/// `A [r, in]`, `B [out, r]`, as one node whose backward gives `dx`, `dA`, `dB`. `dropout` is
/// the probability and the mask seed, if dropout is on. CPU, `f32` / `f64` only (callers check
/// [`super::fusable`]).
///
/// Why one node: written in candle ops this is about ten graph nodes (reshapes, dropout, two
/// matmuls, scaling, add), and candle's backward gives every node a zero-filled gradient
/// buffer plus an add; over seven projections per layer that bookkeeping cost more than the
/// matmuls.
pub(crate) fn lora_step(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
    dropout: Option<(f32, u64)>,
) -> candle_core::Result<Tensor> {
    let node = LoraStep {
        w: w.detach(),
        scaling,
        dropout,
        saved: Mutex::new(None),
    };
    // The node takes `[.., in]` as is (no reshape nodes, whose backward would cost a
    // zero-filled buffer and an add each).
    x.contiguous()?.apply_op3(a, b, node)
}

/// Inverted dropout as `nn.Dropout`: zero with probability `p`, scale survivors by
/// `1 / (1 - p)`; the mask drawn on the host from `seed`.
pub(crate) fn dropout(x: &Tensor, p: f32, seed: u64) -> candle_core::Result<Tensor> {
    x * dropout_mask(x, p, seed)?
}

/// The counter-based draw behind every dropout mask: element `i` of the mask of `seed` is kept
/// unless the top 24 bits of `splitmix64(splitmix64(seed) + i)`, as a fraction of 2^24, fall
/// below `p`. Being a function of `i` alone, a mask is filled in parallel and is the same
/// whatever the thread count (a sequential generator was a serial few percent of every step),
/// and the fused and the plain LoRA paths draw identical masks.
#[derive(Clone, Copy)]
struct MaskDraw {
    base: u64,
    cut: u64,
}

impl MaskDraw {
    fn new(p: f32, seed: u64) -> Self {
        Self {
            base: crate::files::splitmix64(seed),
            cut: (p as f64 * (1u64 << 24) as f64) as u64,
        }
    }

    #[inline]
    fn keep(self, i: usize) -> bool {
        (crate::files::splitmix64(self.base.wrapping_add(i as u64)) >> 40) >= self.cut
    }
}

/// Elements handed to one rayon task by the mask loops.
const MASK_CHUNK: usize = 1 << 14;

/// The mask [`dropout`] multiplies by: `0` or `1 / (1 - p)` per element, in `x`'s dtype.
fn dropout_mask(x: &Tensor, p: f32, seed: u64) -> candle_core::Result<Tensor> {
    let keep = 1.0 / (1.0 - p);
    let draw = MaskDraw::new(p, seed);
    let mut mask = vec![0f32; x.elem_count()];
    mask.par_chunks_mut(MASK_CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (i, m) in chunk.iter_mut().enumerate() {
                *m = if draw.keep(c * MASK_CHUNK + i) {
                    keep
                } else {
                    0.0
                };
            }
        });
    Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())
}

/// The training forward of one adapted projection as a single node over `(x [.., in],
/// A [r, in], B [out, r])` (the leading dimensions of `x` flattened to `n` rows), with the frozen weight `W [out, in]` held (detached) beside them.
struct LoraStep {
    w: Tensor,
    scaling: f64,
    /// Dropout probability and mask seed, if dropout is on.
    dropout: Option<(f32, u64)>,
    /// What the forward leaves its backward.
    saved: Mutex<Option<Saved>>,
}

/// `z = h A^T [n, r]`, all the node keeps: with dropout the backward draws the mask again from
/// its seed and drops `x` again (the graph keeps `x`, the node's input, anyway), where keeping
/// the dropped copy and the mask cost 5 bytes (f32) per input element and projection.
struct Saved {
    z: candle_core::CpuStorage,
}

/// `x` dropped out with the mask of `(p, seed)`, survivors scaled by `1 / (1 - p)`.
fn dropped<T: Real>(x: &[T], p: f32, seed: u64) -> Vec<T> {
    let draw = MaskDraw::new(p, seed);
    let scale = T::from_f64(1.0 / (1.0 - p as f64));
    let mut h = vec![T::ZERO; x.len()];
    h.par_chunks_mut(MASK_CHUNK)
        .zip(x.par_chunks(MASK_CHUNK))
        .enumerate()
        .for_each(|(c, (h, x))| {
            for (i, (h, &x)) in h.iter_mut().zip(x).enumerate() {
                if draw.keep(c * MASK_CHUNK + i) {
                    *h = x * scale;
                }
            }
        });
    h
}

/// `(rows, features)` of a `[.., features]` shape.
fn rows(shape: &candle_core::Shape) -> candle_core::Result<(usize, usize)> {
    match shape.dims().split_last() {
        Some((&f, lead)) => Ok((lead.iter().product(), f)),
        None => candle_core::bail!("lora-step: input is a scalar"),
    }
}

/// The contiguous data of a CPU tensor as `T`, or an error naming the op.
fn data_of<'a, T: Real>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<&'a [T]> {
    cpu_slice(s, l, "lora-step")
}

/// [`data_of`] of each of `N` storages.
fn slices<'a, T: Real, const N: usize>(
    inputs: [(&'a candle_core::CpuStorage, &candle_core::Layout); N],
) -> candle_core::Result<[&'a [T]; N]> {
    let mut out: [&[T]; N] = [&[]; N];
    for (o, (s, l)) in out.iter_mut().zip(inputs) {
        *o = data_of(s, l)?;
    }
    Ok(out)
}

impl LoraStep {
    fn forward<T: Real>(
        &self,
        [x, a, b]: [&[T]; 3],
        (n, inp, r, out): (usize, usize, usize, usize),
    ) -> candle_core::Result<Vec<T>> {
        let (ws, wl) = self.w.storage_and_layout();
        let candle_core::Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("lora-step: weight is not on the CPU")
        };
        let w = data_of::<T>(ws, wl)?;
        let dropped = self.dropout.map(|(p, seed)| dropped(x, p, seed));
        let h = dropped.as_deref().unwrap_or(x);
        let z = gemm::product(Mat::new(h, n, inp), Mat::new(a, r, inp).t(), T::ONE);
        drop(dropped);
        let mut y = gemm::product(Mat::new(x, n, inp), Mat::new(w, out, inp).t(), T::ONE);
        gemm::add_product(
            &mut y,
            Mat::new(&z, n, r),
            Mat::new(b, out, r).t(),
            T::from_f64(self.scaling),
        );
        *self.lock()? = Some(Saved { z: T::wrap(z) });
        Ok(y)
    }

    /// With `g = dL/dy [n, out]` and `dz = s g B`: `dB = s g^T z`, `dA = dz^T h`,
    /// `dx = g W + (dz A) * mask`.
    fn backward<T: Real>(
        &self,
        [x, a, b, g]: [&[T]; 4],
        (n, inp, r, out): (usize, usize, usize, usize),
        saved: &Saved,
    ) -> candle_core::Result<[Vec<T>; 3]> {
        let (ws, wl) = self.w.storage_and_layout();
        let candle_core::Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("lora-step: weight is not on the CPU")
        };
        let w = data_of::<T>(ws, wl)?;
        let s = T::from_f64(self.scaling);
        let z = T::slice(&saved.z).ok_or_else(|| candle_core::Error::Msg("lora-step: z".into()))?;
        let dropped = self.dropout.map(|(p, seed)| dropped(x, p, seed));
        let h = dropped.as_deref().unwrap_or(x);
        let g = Mat::new(g, n, out);
        let dz = gemm::product(g, Mat::new(b, out, r), s);
        let db = gemm::product(g.t(), Mat::new(z, n, r), s);
        let da = gemm::product(Mat::new(&dz, n, r).t(), Mat::new(h, n, inp), T::ONE);
        drop(dropped);
        let mut dx = gemm::product(g, Mat::new(w, out, inp), T::ONE);
        match self.dropout {
            None => gemm::add_product(&mut dx, Mat::new(&dz, n, r), Mat::new(a, r, inp), T::ONE),
            Some((p, seed)) => {
                let draw = MaskDraw::new(p, seed);
                let scale = T::from_f64(1.0 / (1.0 - p as f64));
                let dh = gemm::product(Mat::new(&dz, n, r), Mat::new(a, r, inp), scale);
                dx.par_chunks_mut(MASK_CHUNK)
                    .zip(dh.par_chunks(MASK_CHUNK))
                    .enumerate()
                    .for_each(|(c, (dx, dh))| {
                        for (i, (dx, &dh)) in dx.iter_mut().zip(dh).enumerate() {
                            if draw.keep(c * MASK_CHUNK + i) {
                                *dx = *dx + dh;
                            }
                        }
                    });
            }
        }
        Ok([dx, da, db])
    }

    fn lock(&self) -> candle_core::Result<std::sync::MutexGuard<'_, Option<Saved>>> {
        self.saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("lora-step: poisoned".into()))
    }
}

impl candle_core::CustomOp3 for LoraStep {
    fn name(&self) -> &'static str {
        "lora-step"
    }

    /// `x W^T + s z B^T`: one gemm into a fresh buffer, one accumulating into it.
    fn cpu_fwd(
        &self,
        x: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        a: &candle_core::CpuStorage,
        al: &candle_core::Layout,
        b: &candle_core::CpuStorage,
        bl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        let (n, inp) = rows(xl.shape())?;
        let (r, _) = al.shape().dims2()?;
        let (out, _) = bl.shape().dims2()?;
        let dims = (n, inp, r, out);
        let mut shape = xl.shape().dims().to_vec();
        *shape.last_mut().expect("rows() checked the rank") = out;
        let inputs = [(x, xl), (a, al), (b, bl)];
        let y = match x {
            CpuStorage::F32(_) => CpuStorage::F32(self.forward::<f32>(slices(inputs)?, dims)?),
            CpuStorage::F64(_) => CpuStorage::F64(self.forward::<f64>(slices(inputs)?, dims)?),
            _ => candle_core::bail!("lora-step: only f32 and f64 have a CPU node"),
        };
        Ok((y, shape.into()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use candle_core::{CpuStorage, Storage};
        let saved = self.lock()?;
        let Some(saved) = saved.as_ref() else {
            candle_core::bail!("lora-step: backward before forward")
        };
        let g = g.detach().contiguous()?;
        let (n, inp) = rows(x.shape())?;
        let (out, r) = b.dims2()?;
        let dims = (n, inp, r, out);
        let (xs, xl) = x.storage_and_layout();
        let (as_, al) = a.storage_and_layout();
        let (bs, bl) = b.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(as_), Storage::Cpu(bs), Storage::Cpu(gs)) =
            (&*xs, &*as_, &*bs, &*gs)
        else {
            candle_core::bail!("lora-step: tensors are not on the CPU")
        };
        let x_shape = x.shape();
        fn tensors<T: Real + candle_core::WithDType>(
            [dx, da, db]: [Vec<T>; 3],
            (_, inp, r, out): (usize, usize, usize, usize),
            x_shape: &candle_core::Shape,
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let cpu = &candle_core::Device::Cpu;
            Ok((
                Some(Tensor::from_vec(dx, x_shape.clone(), cpu)?),
                Some(Tensor::from_vec(da, (r, inp), cpu)?),
                Some(Tensor::from_vec(db, (out, r), cpu)?),
            ))
        }
        let inputs = [(xs, xl), (as_, al), (bs, bl), (gs, gl)];
        match xs {
            CpuStorage::F32(_) => tensors(
                self.backward::<f32>(slices(inputs)?, dims, saved)?,
                dims,
                x_shape,
            ),
            CpuStorage::F64(_) => tensors(
                self.backward::<f64>(slices(inputs)?, dims, saved)?,
                dims,
                x_shape,
            ),
            _ => candle_core::bail!("lora-step: no CPU node for {:?}", x.dtype()),
        }
    }
}
