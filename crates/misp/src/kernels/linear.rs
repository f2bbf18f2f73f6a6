//! `x @ W^T` over the last dimension, as `nn.Linear` without bias, costing backward only what
//! the trainable parts need.
//!
//! Why not `x.broadcast_matmul(&w.t())`: candle 0.11.1's autograd computes the gradient of
//! *both* matmul operands whenever the product is on a path to a `Var`. For a frozen base
//! weight under LoRA that is a full extra gemm per projection per step, and with a `[B, T, D]`
//! input broadcast against `[D, O]` it is a `[B, D, O]` buffer summed back over `B` — work
//! torch skips because the weight has `requires_grad = False`. Here a weight that is not a
//! `Var` goes through [`FrozenMatmul`], whose backward returns `dX` only; a weight that is a
//! `Var` (the world pretraining trains the whole LLaMA) takes the ordinary matmul. Either way
//! the input is flattened to 2-D first so one gemm covers the whole batch.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::bf16_gemm;
use super::gemm::{self, Mat};
use super::real::Real;

/// `x [.., in] @ w^T -> [.., out]` for `w [out, in]`.
pub fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let Some((&inp, lead)) = dims.split_last() else {
        candle_core::bail!("linear: input is a scalar");
    };
    let (out, w_in) = w.dims2()?;
    if w_in != inp {
        candle_core::bail!("linear: input has {inp} features, weight expects {w_in}");
    }
    let n: usize = lead.iter().product();
    let x2 = x.reshape((n, inp))?;
    let y = if w.is_variable() {
        x2.matmul(&w.t()?)?
    } else {
        x2.apply_op2(w, FrozenMatmul)?
    };
    let mut shape = lead.to_vec();
    shape.push(out);
    y.reshape(shape)
}

/// `nn.Linear`, in its checkpoint layout (`weight [out, in]`, `bias [out]`), over
/// [`linear`]; candle-nn's `Linear` would run a `[B, T, in]` input as `B` separate gemms, each
/// repacking the weight.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn load(vb: candle_nn::VarBuilder, inp: usize, out: usize) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get((out, inp), "weight")?,
            bias: Some(vb.get(out, "bias")?),
        })
    }

    /// A layer saved without bias (CLIP's `visual_projection`, `text_projection`).
    pub fn load_no_bias(
        vb: candle_nn::VarBuilder,
        inp: usize,
        out: usize,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get((out, inp), "weight")?,
            bias: None,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(b) = &self.bias {
            if let Some(y) = biased_no_grad(x, &self.weight, b)? {
                return Ok(y);
            }
        }
        let y = linear(x, &self.weight)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// `x W^T + b` for inputs and weights outside any graph (CLIP at inference), as one gemm that
/// accumulates onto rows pre-filled with the bias: no separate add pass, no zero-filled
/// product. `None` where there is no such kernel (other devices and dtypes, tracked tensors).
fn biased_no_grad(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !super::real::fusable(x)
        || x.track_op()
        || w.track_op()
        || b.track_op()
        || w.dtype() != x.dtype()
        || b.dtype() != x.dtype()
    {
        return Ok(None);
    }
    fn run<T: Real + candle_core::WithDType>(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&inp, lead)) = dims.split_last() else {
            candle_core::bail!("linear: input is a scalar");
        };
        let (out, w_in) = w.dims2()?;
        if w_in != inp || b.dims() != [out] {
            candle_core::bail!(
                "linear: input [.., {inp}], weight {:?}, bias {:?}",
                w.dims(),
                b.dims()
            );
        }
        let n: usize = lead.iter().product();
        let x = x.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (bs, bl) = b.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(ws), Storage::Cpu(bs)) = (&*xs, &*ws, &*bs) else {
            candle_core::bail!("linear: tensors are not on the CPU");
        };
        let data = |s, l| super::real::cpu_slice::<T>(s, l, "linear");
        let (xv, wv, bv) = (data(xs, xl)?, data(ws, wl)?, data(bs, bl)?);
        // The bias in every row, filled in parallel (a serial fill kept the other threads
        // idle: ~2 % of `misp embed`).
        let mut y = super::real::uninit::<T>(n * out);
        y.par_chunks_mut(out.max(1) * (1usize << 12).div_ceil(out.max(1)))
            .for_each(|rows| {
                for (d, &b) in rows.iter_mut().zip(bv.iter().cycle()) {
                    d.write(b);
                }
            });
        // SAFETY: every element was written: each chunk is whole rows, each row the bias.
        let mut y = unsafe { super::real::assume_init(y) };
        gemm::add_product(
            &mut y,
            Mat::new(xv, n, inp),
            Mat::new(wv, out, inp).t(),
            T::ONE,
        );
        let mut shape = lead.to_vec();
        shape.push(out);
        Tensor::from_vec(y, shape, x.device())
    }
    Ok(Some(match x.dtype() {
        candle_core::DType::F32 => run::<f32>(x, w, b)?,
        _ => run::<f64>(x, w, b)?,
    }))
}

/// `x [n, in] @ w^T` with no gradient for `w` (see the module docs).
struct FrozenMatmul;

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (n, k) = xl.shape().dims2()?;
        let (m, _) = wl.shape().dims2()?;
        fn direct<T: Real>(
            x: &CpuStorage,
            xl: &Layout,
            w: &CpuStorage,
            wl: &Layout,
            (n, k, m): (usize, usize, usize),
        ) -> candle_core::Result<CpuStorage> {
            let x = super::real::cpu_slice::<T>(x, xl, "frozen-matmul")?;
            let w = super::real::cpu_slice::<T>(w, wl, "frozen-matmul")?;
            Ok(T::wrap(gemm::product(
                Mat::new(x, n, k),
                Mat::new(w, m, k).t(),
                T::ONE,
            )))
        }
        // f32 / f64 straight on gemm (no zero-filled output), bf16 on the bf16 kernel where
        // the CPU has one; others through candle.
        let contiguous = xl.is_contiguous() && wl.is_contiguous();
        let y = match (x, w) {
            (CpuStorage::BF16(_), CpuStorage::BF16(_)) if contiguous && bf16_gemm::enabled() => {
                let x = super::real::cpu_slice_bf16(x, xl, "frozen-matmul")?;
                let w = super::real::cpu_slice_bf16(w, wl, "frozen-matmul")?;
                CpuStorage::BF16(bf16_gemm::product(Mat::new(x, n, k), Mat::new(w, m, k).t()))
            }
            (CpuStorage::F32(_), CpuStorage::F32(_)) if contiguous => {
                direct::<f32>(x, xl, w, wl, (n, k, m))?
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) if contiguous => {
                direct::<f64>(x, xl, w, wl, (n, k, m))?
            }
            _ => x.matmul(w, (1, n, m, k), xl, &wl.transpose(0, 1)?)?,
        };
        Ok((y, Shape::from((n, m))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (n, k) = xl.shape().dims2()?;
        let (m, _) = wl.shape().dims2()?;
        let y = x.matmul(w, (1, n, m, k), xl, &wl.transpose(0, 1)?)?;
        Ok((y, Shape::from((n, m))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(input_grad(grad, w)?), None))
    }
}

/// `g [n, out] @ w [out, in]`: the input's gradient of [`linear`] with a frozen `w`, on the
/// bf16 kernel for bf16 CPU tensors where it is [`bf16_gemm::enabled`], else candle's matmul.
pub fn input_grad(g: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if g.dtype() == DType::BF16
        && w.dtype() == DType::BF16
        && g.device().is_cpu()
        && g.rank() == 2
        && bf16_gemm::enabled()
    {
        return g
            .contiguous()?
            .apply_op2_no_bwd(&w.contiguous()?, &InputGrad);
    }
    g.matmul(w)
}

/// `g @ w` on the bf16 kernel (what [`input_grad`] runs; never part of a graph).
struct InputGrad;

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "frozen-matmul-input-grad"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, o) = gl.shape().dims2()?;
        let (wo, i) = wl.shape().dims2()?;
        if wo != o {
            candle_core::bail!("frozen-matmul input grad: gradient [{n}, {o}], weight [{wo}, {i}]");
        }
        let g = super::real::cpu_slice_bf16(g, gl, "frozen-matmul input grad")?;
        let w = super::real::cpu_slice_bf16(w, wl, "frozen-matmul input grad")?;
        let y = bf16_gemm::product(Mat::new(g, n, o), Mat::new(w, o, i));
        Ok((CpuStorage::BF16(y), Shape::from((n, i))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed;
        let v: Vec<f64> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn frozen_weight_matches_matmul_forward_and_input_gradient() {
        let w = rand(&[5, 3], 1);
        let x = Var::from_tensor(&rand(&[2, 4, 3], 2)).unwrap();
        let c = rand(&[2, 4, 5], 3);
        let mine = linear(x.as_tensor(), &w).unwrap();
        let plain = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
        let diff = (&mine - &plain).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f64>().unwrap() < 1e-12);
        let g1 = (mine * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (plain * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let (g1, g2) = (g1.get(&x).unwrap(), g2.get(&x).unwrap());
        let d = (g1 - g2).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f64>().unwrap() < 1e-12);
        assert!(
            g1.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                > 1e-3
        );
    }

    #[test]
    fn frozen_weight_gets_no_gradient_while_a_var_weight_does() {
        let x = Var::from_tensor(&rand(&[4, 3], 4)).unwrap();
        let frozen = rand(&[2, 3], 5);
        let grads = linear(x.as_tensor(), &frozen)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(&frozen).is_none());
        let w = Var::from_tensor(&frozen).unwrap();
        let grads = linear(x.as_tensor(), w.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        // d/dW sum(x W^T) = column sums of x, for each output row.
        let want = x
            .as_tensor()
            .sum(0)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .repeat((2, 1))
            .unwrap();
        let d = (grads.get(w.as_tensor()).unwrap() - want)
            .unwrap()
            .abs()
            .unwrap();
        assert!(d.max_all().unwrap().to_scalar::<f64>().unwrap() < 1e-12);
    }

    #[test]
    fn biased_layer_outside_a_graph_matches_matmul_plus_bias() {
        let x = rand(&[2, 3, 5], 1);
        let w = rand(&[4, 5], 2);
        let b = rand(&[4], 3);
        let layer = Linear {
            weight: w.clone(),
            bias: Some(b.clone()),
        };
        let plain = x
            .broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        for x in [x.clone(), x.to_dtype(DType::F32).unwrap()] {
            let layer = Linear {
                weight: layer.weight.to_dtype(x.dtype()).unwrap(),
                bias: Some(b.to_dtype(x.dtype()).unwrap()),
            };
            let y = layer.forward(&x).unwrap();
            assert_eq!(y.dims(), [2, 3, 4]);
            let d = (y.to_dtype(DType::F64).unwrap() - &plain)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(d < 1e-6, "{:?}: {d}", x.dtype());
        }
        // In a graph the plain path runs and the input still gets its gradient.
        let v = Var::from_tensor(&x).unwrap();
        let g = layer
            .forward(v.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(v.as_tensor()).is_some());
    }

    #[test]
    fn bf16_and_shape_errors() {
        let w = rand(&[5, 3], 6).to_dtype(DType::BF16).unwrap();
        let x = rand(&[7, 3], 7).to_dtype(DType::BF16).unwrap();
        assert_eq!(linear(&x, &w).unwrap().dims(), &[7, 5]);
        let bad = rand(&[7, 4], 8);
        let e = linear(&bad, &w.to_dtype(DType::F64).unwrap()).unwrap_err();
        assert!(e.to_string().contains("4 features"), "{e}");
    }
}
