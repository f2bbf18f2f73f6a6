//! LoRA's training step as one node built from candle's ordinary ops, for every device and
//! dtype: `y = x W^T + s (drop(x) A^T) B^T` over `(x, A, B)` with the frozen `W` beside them,
//! keeping for its backward only `z = drop(x) A^T` (`[n, r]`).
//!
//! Why: written as a plain composition, candle's graph keeps per adapted projection the input
//! cast to the adapter's f32, the dropout mask (f32) and the dropped copy (f32): 12 bytes per
//! input element next to a bf16 input's 2, and after the adapter the f32 product `[n, out]`,
//! its scaled copy, its cast back and the frozen product. At LLaVA-1.5-7B's width that was most
//! of a decoder layer's graph, and candle's backward added a gradient for every mask. This node
//! computes its forward with the same ops outside any graph (so its values are the
//! composition's) and its backward with ops too, so it runs wherever candle runs
//! (the CUDA build included); the backward regenerates the mask from its counter-based seed and
//! the dropped input from `x`, which the graph keeps anyway (it feeds the sibling projections).
//! [`super::lora_step`] is the CPU `f32` / `f64` kernel of the same function, on gemm directly.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor};

use super::linear::{input_grad, linear};
use super::lora_step::dropout;

/// `x W^T + s (drop(x) A^T) B^T` for `x [.., in]`, `W [out, in]` (frozen), `A [r, in]`,
/// `B [out, r]`, in `x`'s dtype, with the adapter's products in the adapter's dtype (PEFT's
/// casting). `dropout` is the probability and the mask seed, if dropout is on. A graph node
/// over `(x, A, B)` when any of them is tracked; the plain value otherwise.
pub(crate) fn lora_branch(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
    dropout: Option<(f32, u64)>,
) -> candle_core::Result<Tensor> {
    let z = down(&x.detach(), &a.detach(), dropout)?;
    let delta = linear(&z, &b.detach())?;
    let y = (linear(&x.detach(), w)? + (delta * scaling)?.to_dtype(x.dtype())?)?;
    if !(x.track_op() || a.track_op() || b.track_op()) {
        return Ok(y);
    }
    let node = LoraBranch {
        w: w.detach(),
        z,
        scaling,
        dropout,
        value: Mutex::new(Some(y)),
    };
    x.apply_op3(a, b, node)
}

/// `drop(x) A^T` in `A`'s dtype, with no graph: the adapter's input path.
fn down(x: &Tensor, a: &Tensor, p: Option<(f32, u64)>) -> candle_core::Result<Tensor> {
    linear(&dropped(x, a.dtype(), p)?, a)
}

/// `x` cast to the adapter's dtype, and dropped out when `p` says so: the mask of `(p, seed)`
/// is a function of the seed and the element index alone, so forward and backward agree.
fn dropped(
    x: &Tensor,
    dtype: candle_core::DType,
    p: Option<(f32, u64)>,
) -> candle_core::Result<Tensor> {
    let h = x.to_dtype(dtype)?;
    match p {
        Some((p, seed)) => dropout(&h, p, seed),
        None => Ok(h),
    }
}

struct LoraBranch {
    w: Tensor,
    /// `drop(x) A^T`, `[.., r]`: the one tensor the node keeps for its backward.
    z: Tensor,
    scaling: f64,
    dropout: Option<(f32, u64)>,
    /// The forward's value, computed before the node was applied; taken (and so freed) by the
    /// device forward, which returns a copy of it.
    value: Mutex<Option<Tensor>>,
}

impl LoraBranch {
    fn take_value(&self) -> candle_core::Result<Tensor> {
        self.value
            .lock()
            .map_err(|_| candle_core::Error::Msg("lora-branch: poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("lora-branch: forward ran twice".into()))
    }
}

/// The whole storage behind `layout`, checked to be exactly the tensor (a fresh result).
fn whole(layout: &Layout) -> candle_core::Result<()> {
    if layout.is_contiguous() && layout.start_offset() == 0 {
        Ok(())
    } else {
        candle_core::bail!("lora-branch: the forward's value is not a fresh contiguous tensor")
    }
}

impl CustomOp3 for LoraBranch {
    fn name(&self) -> &'static str {
        "lora-branch"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let value = self.take_value()?;
        let (s, l) = value.storage_and_layout();
        let Storage::Cpu(s) = &*s else {
            candle_core::bail!("lora-branch: the value is not on the CPU")
        };
        whole(l)?;
        Ok((s.try_clone(l)?, value.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let value = self.take_value()?;
        let (s, l) = value.storage_and_layout();
        let Storage::Cuda(s) = &*s else {
            candle_core::bail!("lora-branch: the value is not on the GPU")
        };
        whole(l)?;
        Ok((s.try_clone(l)?, value.shape().clone()))
    }

    /// With `g = dL/dy [n, out]` and `dz = s g B`: `dB = s g^T z`, `dA = dz^T drop(x)`,
    /// `dx = g W + drop'(dz A)` (the mask applied again), each as candle ops.
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (a, b) = (a.detach(), b.detach());
        let (out, r) = b.dims2()?;
        let inp = a.dim(1)?;
        let n = x.elem_count() / inp.max(1);
        let g = g.detach().reshape((n, out))?;
        let gf = g.to_dtype(a.dtype())?;
        let z = self.z.reshape((n, r))?;
        let db = (gf.t()?.matmul(&z)? * self.scaling)?;
        let dz = (gf.matmul(&b)? * self.scaling)?;
        let da = {
            let h = dropped(&x.detach().reshape((n, inp))?, a.dtype(), self.dropout)?;
            dz.t()?.matmul(&h)?
        };
        let mut dh = dz.matmul(&a)?;
        if let Some((p, seed)) = self.dropout {
            dh = dropout(&dh, p, seed)?;
        }
        // The frozen weight's share on the bf16 kernel where it runs (candle's matmul would
        // widen this, the largest product of the backward, to f32).
        let dx = (input_grad(&g, &self.w)? + dh.to_dtype(x.dtype())?)?.reshape(x.shape())?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{max_diff, rand};
    use candle_core::{DType, Var};

    /// The plain composition the node replaces (the reference).
    fn composed(
        x: &Tensor,
        w: &Tensor,
        a: &Tensor,
        b: &Tensor,
        s: f64,
        p: Option<(f32, u64)>,
    ) -> Tensor {
        let h = dropped(x, a.dtype(), p).unwrap();
        let delta = h.broadcast_matmul(&a.t().unwrap()).unwrap();
        let delta = delta.broadcast_matmul(&b.t().unwrap()).unwrap();
        let base = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        (base + (delta * s).unwrap().to_dtype(x.dtype()).unwrap()).unwrap()
    }

    /// Gradients of `sum(c * f(x, A, B))` for `x`, `A`, `B`.
    fn grads(
        f: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
    ) -> (Tensor, [Tensor; 3]) {
        let (xv, av, bv) = (
            Var::from_tensor(x).unwrap(),
            Var::from_tensor(a).unwrap(),
            Var::from_tensor(b).unwrap(),
        );
        let y = f(xv.as_tensor(), av.as_tensor(), bv.as_tensor());
        let g = (y.to_dtype(c.dtype()).unwrap() * c)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let get = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
        (y.clone(), [get(&xv), get(&av), get(&bv)])
    }

    #[test]
    fn node_equals_the_composition_forward_and_gradients_in_f64() {
        // Rows 2 x 3, in 5, out 4, rank 3; a dropout of 0.5 so that masks matter.
        for p in [None, Some((0.5f32, 11u64))] {
            let (x, w, a, b) = (
                rand(&[2, 3, 5], 1),
                rand(&[4, 5], 2),
                rand(&[3, 5], 3),
                rand(&[4, 3], 4),
            );
            let c = rand(&[2, 3, 4], 5);
            let (y0, g0) = grads(|x, a, b| composed(x, &w, a, b, 2.0, p), &x, &a, &b, &c);
            let (y1, g1) = grads(
                |x, a, b| lora_branch(x, &w, a, b, 2.0, p).unwrap(),
                &x,
                &a,
                &b,
                &c,
            );
            assert!(max_diff(&y0, &y1) < 1e-12, "forward, dropout {p:?}");
            for (i, (g0, g1)) in g0.iter().zip(&g1).enumerate() {
                assert_eq!(g0.dims(), g1.dims());
                let scale = g0
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(scale > 1e-3, "input {i}: a zero gradient cannot tell");
                assert!(max_diff(g0, g1) < 1e-12, "input {i}, dropout {p:?}");
            }
        }
    }

    #[test]
    fn bf16_input_with_f32_adapter_matches_the_composition() {
        let w = rand(&[6, 8], 2).to_dtype(DType::BF16).unwrap();
        let x = rand(&[4, 8], 1).to_dtype(DType::BF16).unwrap();
        let a = rand(&[2, 8], 3).to_dtype(DType::F32).unwrap();
        let b = rand(&[6, 2], 4).to_dtype(DType::F32).unwrap();
        let c = rand(&[4, 6], 5).to_dtype(DType::F32).unwrap();
        let p = Some((0.25f32, 3u64));
        let (y0, g0) = grads(|x, a, b| composed(x, &w, a, b, 1.5, p), &x, &a, &b, &c);
        let (y1, g1) = grads(
            |x, a, b| lora_branch(x, &w, a, b, 1.5, p).unwrap(),
            &x,
            &a,
            &b,
            &c,
        );
        assert_eq!(y1.dtype(), DType::BF16);
        // At most one bf16 step (2^-7 relative to the largest value) apart.
        let top = |t: &Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        assert!(max_diff(&y0, &y1) <= top(&y0) / 128.0);
        assert_eq!(g1[0].dtype(), DType::BF16);
        assert_eq!((g1[1].dtype(), g1[2].dtype()), (DType::F32, DType::F32));
        // The adapter's gradients are f32 sums of the same terms; x's gradient is one bf16
        // rounding of the same sum.
        assert!(max_diff(&g0[1], &g1[1]) < 1e-5);
        assert!(max_diff(&g0[2], &g1[2]) < 1e-5);
        assert!(max_diff(&g0[0], &g1[0]) <= top(&g0[0]) / 128.0);
    }

    #[test]
    fn untracked_inputs_give_the_plain_value_without_a_node() {
        let (x, w, a, b) = (
            rand(&[3, 5], 1),
            rand(&[4, 5], 2),
            rand(&[2, 5], 3),
            rand(&[4, 2], 4),
        );
        let y = lora_branch(&x, &w, &a, &b, 1.0, Some((0.5, 9))).unwrap();
        assert!(!y.track_op());
        assert!(max_diff(&y, &composed(&x, &w, &a, &b, 1.0, Some((0.5, 9)))) < 1e-12);
    }
}
