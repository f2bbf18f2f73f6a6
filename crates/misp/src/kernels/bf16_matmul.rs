//! A batched matmul whose bf16 CPU products run on [`super::bf16_gemm`], with gradients for
//! both operands: attention's `q k^T` and `P V` on the generic path (the graph a GPU runs),
//! which candle's CPU matmul would widen to f32 on every call (docs/design.md §4.9).
//!
//! Anywhere else (another device or dtype, the kernel off) it is candle's `matmul`, so the
//! graph is the same on every device and only the CPU's bf16 products change.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use half::bf16;

use super::bf16_gemm;
use super::gemm::Mat;

/// `a [.., m, k] @ b [.., k, n]` with equal batch dimensions, differentiable in both.
pub fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if a.dtype() == DType::BF16
        && b.dtype() == DType::BF16
        && a.device().is_cpu()
        && a.rank() >= 2
        && a.rank() == b.rank()
        && bf16_gemm::enabled()
    {
        return a.apply_op2(b, Bf16Matmul);
    }
    a.matmul(b)
}

/// The op of [`matmul`] on bf16 CPU tensors.
struct Bf16Matmul;

/// The batch, rows, inner and columns of `a @ b`, or an error naming the shapes.
fn dims(al: &Layout, bl: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
    let (ad, bd) = (al.dims(), bl.dims());
    let r = ad.len();
    if r < 2 || bd.len() != r || ad[..r - 2] != bd[..r - 2] || ad[r - 1] != bd[r - 2] {
        candle_core::bail!("bf16 matmul: shapes {ad:?} and {bd:?} do not multiply");
    }
    Ok((
        ad[..r - 2].iter().product(),
        ad[r - 2],
        ad[r - 1],
        bd[r - 1],
    ))
}

/// The strided view of batch element `i` of a bf16 storage: any strides, no copy.
fn view<'a>(data: &'a [bf16], l: &Layout, i: usize) -> Mat<'a, bf16> {
    let (d, s) = (l.dims(), l.stride());
    let r = d.len();
    // Offset of batch element `i`, its index unravelled over the batch dimensions.
    let (mut rest, mut off) = (i, l.start_offset());
    for j in (0..r - 2).rev() {
        off += (rest % d[j]) * s[j];
        rest /= d[j];
    }
    Mat {
        data: &data[off..],
        rows: d[r - 2],
        cols: d[r - 1],
        rs: s[r - 2],
        cs: s[r - 1],
    }
}

impl CustomOp2 for Bf16Matmul {
    fn name(&self) -> &'static str {
        "bf16-matmul"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (batch, m, _, n) = dims(al, bl)?;
        let (CpuStorage::BF16(av), CpuStorage::BF16(bv)) = (a, b) else {
            candle_core::bail!("bf16 matmul: expected bf16 data");
        };
        let mut out = Vec::with_capacity(batch * m * n);
        for i in 0..batch {
            out.extend(bf16_gemm::product(view(av, al, i), view(bv, bl, i)));
        }
        let mut shape = al.dims().to_vec();
        let r = shape.len();
        shape[r - 1] = n;
        Ok((CpuStorage::BF16(out), Shape::from(shape)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let r = a.rank();
        // d a = g b^T, d b = a^T g, as transposed views (the kernel takes any strides).
        let ga = matmul(grad, &b.transpose(r - 2, r - 1)?)?;
        let gb = matmul(&a.transpose(r - 2, r - 1)?, grad)?;
        Ok((Some(ga), Some(gb)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::max_diff;
    use super::*;
    use candle_core::Var;

    /// bf16 values exactly representable, in [-1, 1).
    fn rand(shape: &[usize], seed: u64) -> Tensor {
        super::super::testing::rand(shape, seed)
            .to_dtype(DType::BF16)
            .unwrap()
    }

    #[test]
    fn forward_and_gradients_match_candles_matmul_on_strided_batches() {
        if !bf16_gemm::supported() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        // Attention's shapes in miniature: [B, H, T, hd] against a transposed view of keys
        // (strided), then probabilities against values.
        let q = Var::from_tensor(&rand(&[2, 3, 7, 5], 1)).unwrap();
        let k = Var::from_tensor(&rand(&[2, 3, 7, 5], 2)).unwrap();
        let v = Var::from_tensor(&rand(&[2, 3, 7, 5], 3)).unwrap();
        let g = rand(&[2, 3, 7, 5], 4);
        let run = |on: bool| {
            bf16_gemm::with_enabled(on, || {
                let s = matmul(q.as_tensor(), &k.as_tensor().t().unwrap()).unwrap();
                let o = matmul(&s, v.as_tensor()).unwrap();
                let loss = (o.to_dtype(DType::F32).unwrap() * g.to_dtype(DType::F32).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let grads = loss.backward().unwrap();
                let got = |x: &Var| grads.get(x.as_tensor()).unwrap().clone();
                (o, got(&q), got(&k), got(&v))
            })
        };
        let mine = run(true);
        let candle = run(false);
        // Both accumulate in f32 and round once to bf16 per product; the chain of two
        // products can differ by a few bf16 steps of values of size ~5.
        for (what, x, y) in [
            ("output", &mine.0, &candle.0),
            ("d q", &mine.1, &candle.1),
            ("d k", &mine.2, &candle.2),
            ("d v", &mine.3, &candle.3),
        ] {
            assert_eq!(x.dims(), y.dims(), "{what}");
            let d = max_diff(x, y);
            assert!(d < 0.1, "{what}: max difference {d}");
        }
        // The kernel really ran: batch element (1, 2) is the kernel's own product, bit for bit.
        let s = bf16_gemm::with_enabled(true, || {
            matmul(q.as_tensor(), &k.as_tensor().t().unwrap()).unwrap()
        });
        let bits = |t: Tensor| t.flatten_all().unwrap().to_vec1::<bf16>().unwrap();
        let (q12, k12) = (
            bits(q.as_tensor().get(1).unwrap().get(2).unwrap()),
            bits(k.as_tensor().get(1).unwrap().get(2).unwrap()),
        );
        let expect = bf16_gemm::product(Mat::new(&q12, 7, 5), Mat::new(&k12, 7, 5).t());
        assert_eq!(bits(s.get(1).unwrap().get(2).unwrap()), expect);
    }

    #[test]
    fn other_dtypes_and_mismatched_shapes_take_candles_path_or_fail_clearly() {
        let a = super::super::testing::rand(&[2, 3, 4], 5);
        let b = super::super::testing::rand(&[2, 4, 6], 6);
        let mine = matmul(&a, &b).unwrap();
        assert_eq!(max_diff(&mine, &a.matmul(&b).unwrap()), 0.0);
        if bf16_gemm::supported() {
            let a = a.to_dtype(DType::BF16).unwrap();
            let c = rand(&[2, 5, 6], 7);
            let e = bf16_gemm::with_enabled(true, || matmul(&a, &c)).unwrap_err();
            assert!(e.to_string().contains("do not multiply"), "{e}");
        }
    }
}
