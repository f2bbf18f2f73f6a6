//! An encoder's multi-head attention at inference (CLIP's towers): from the projections'
//! `q, k, v` to the heads' merged output in one pass, no gradient.
//!
//! Why: in candle ops this is three head-split copies, two batched matmuls of `B x H` tiny
//! products (50 x 64 x 50 for ViT-B/32) that gemm runs one after another on one thread, the
//! softmax and a merge copy. In `perf` of `misp embed` the copies and the serial products left
//! one of two cores idle for a fifth of the run. Here one task per batch row runs its heads
//! on gemm directly, reading `q, k, v` where the projections wrote them and writing each
//! head's output into its columns of the merged result.
//!
//! Queries and keys may differ in number: the last layer of a tower whose caller wants only
//! the class token attends with that one query over every key (see `clip.rs`).

use candle_core::{DType, Tensor, WithDType};
use rayon::prelude::*;

use super::attention::with_data;
use super::gemm::{product_into, Mat, MatMut, Threads};
use super::real::{self, Real};

/// `softmax(q k^T / sqrt(hd) + mask) v` per head, merged: `q [B, Tq, H * hd]`,
/// `k, v [B, Tk, H * hd]`, `mask` additive `[B or 1, 1, Tq, Tk]`, -> `[B, Tq, H * hd]`.
/// `None` where there is no kernel (not on the CPU, not `f32` / `f64`, or an input on a path
/// to a variable): the caller runs the composition.
pub(crate) fn attention_no_grad(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    if !real::fusable(q) || [q, k, v].iter().any(|x| x.track_op() || x.rank() != 3) {
        return Ok(None);
    }
    match q.dtype() {
        DType::F32 => attention_as::<f32>(q, k, v, heads, mask).map(Some),
        DType::F64 => attention_as::<f64>(q, k, v, heads, mask).map(Some),
        _ => Ok(None),
    }
}

fn attention_as<T: Real + WithDType>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let (b, tq, d) = q.dims3()?;
    let tk = k.dim(1)?;
    if k.dims() != [b, tk, d] || v.dims() != k.dims() || heads == 0 || d % heads != 0 {
        candle_core::bail!(
            "encoder attention: q {:?}, k {:?}, v {:?} for {heads} heads",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    // The mask as `T`, one `[Tq, Tk]` block per batch row (or one for all); none: zeros.
    let (mask, mask_rows) = match mask {
        Some(m) => {
            let mb = m.dim(0)?;
            if m.dims() != [mb, 1, tq, tk] || (mb != 1 && mb != b) {
                candle_core::bail!(
                    "encoder attention: mask {:?}, expected [{b} or 1, 1, {tq}, {tk}]",
                    m.dims()
                );
            }
            let m = m.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1::<T>()?;
            (m, mb)
        }
        None => (vec![T::ZERO; tq * tk], 1),
    };
    let hd = d / heads;
    let scale = <T as Real>::from_f64(1.0 / (hd as f64).sqrt());
    let mut out = real::uninit::<T>(b * tq * d);
    with_data(q, |q| {
        with_data(k, |k| {
            with_data(v, |v| {
                out.par_chunks_mut(tq * d)
                    .enumerate()
                    .for_each(|(bi, out)| {
                        let out = real::zeroed(out);
                        let mask =
                            &mask[if mask_rows == 1 { 0 } else { bi } * tq * tk..][..tq * tk];
                        let (q, k, v) = (
                            &q[bi * tq * d..][..tq * d],
                            &k[bi * tk * d..][..tk * d],
                            &v[bi * tk * d..][..tk * d],
                        );
                        batch_row(out, q, k, v, mask, (tq, tk, heads, hd), scale);
                    })
            })
        })
    })???;
    // SAFETY: every chunk of `out` went through `zeroed`.
    let out = unsafe { real::assume_init(out) };
    Tensor::from_vec(out, (b, tq, d), q.device())
}

/// One batch row's heads: `out [Tq, D]` from `q [Tq, D]`, `k, v [Tk, D]`, `mask [Tq, Tk]`.
fn batch_row<T: Real>(
    out: &mut [T],
    q: &[T],
    k: &[T],
    v: &[T],
    mask: &[T],
    (tq, tk, heads, hd): (usize, usize, usize, usize),
    scale: T,
) {
    let d = heads * hd;
    let mut scores = vec![T::ZERO; tq * tk];
    for h in 0..heads {
        product_into(
            MatMut::new(&mut scores, tq, tk, tk),
            head(q, h, tq, hd, d),
            head(k, h, tk, hd, d).t(),
            T::ONE,
            false,
            Threads::One,
        );
        real::vectorised(
            #[inline(always)]
            || {
                for (row, bias) in scores.chunks_mut(tk).zip(mask.chunks(tk)) {
                    real::softmax_row(row, bias, scale);
                }
            },
        );
        product_into(
            MatMut::new(&mut out[h * hd..], tq, hd, d),
            Mat::new(&scores, tq, tk),
            head(v, h, tk, hd, d),
            T::ONE,
            false,
            Threads::One,
        );
    }
}

/// Head `h` of a `[rows, d]` matrix: its columns `h * hd .. (h + 1) * hd`.
fn head<T>(x: &[T], h: usize, rows: usize, hd: usize, d: usize) -> Mat<'_, T> {
    Mat {
        data: &x[h * hd..],
        rows,
        cols: hd,
        rs: d,
        cs: 1,
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, D};

    use super::*;
    use crate::kernels::testing::max_abs;

    /// The composition CLIP ran before: split heads, `softmax(q k^T * scale + mask) v`, merge.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>) -> Tensor {
        let (b, tq, d) = q.dims3().unwrap();
        let hd = d / heads;
        let split = |x: &Tensor| {
            let t = x.dim(1).unwrap();
            x.reshape((b, t, heads, hd))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let s =
            (split(q).matmul(&split(k).t().unwrap()).unwrap() * (hd as f64).powf(-0.5)).unwrap();
        let s = match mask {
            Some(m) => s.broadcast_add(m).unwrap(),
            None => s,
        };
        let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
        p.matmul(&split(v))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, tq, d))
            .unwrap()
    }

    fn randn(shape: &[usize]) -> Tensor {
        Tensor::randn(0f64, 1.0, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn matches_the_composition_with_and_without_a_mask() {
        let (b, t, heads, hd) = (3, 7, 4, 5);
        let d = heads * hd;
        let (q, k, v) = (randn(&[b, t, d]), randn(&[b, t, d]), randn(&[b, t, d]));
        let fast = attention_no_grad(&q, &k, &v, heads, None).unwrap().unwrap();
        let diff = max_abs(&fast, &composed(&q, &k, &v, heads, None));
        assert!(diff < 1e-12, "no mask: {diff}");

        // CLIP text's mask: causal plus right padding, one per batch row.
        let mut m = vec![0f64; b * t * t];
        for bi in 0..b {
            let len = t - bi;
            for i in 0..t {
                for j in 0..t {
                    if j > i || j >= len {
                        m[(bi * t + i) * t + j] = f64::MIN / 2.0;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(m, (b, 1, t, t), &Device::Cpu).unwrap();
        let fast = attention_no_grad(&q, &k, &v, heads, Some(&mask))
            .unwrap()
            .unwrap();
        let diff = max_abs(&fast, &composed(&q, &k, &v, heads, Some(&mask)));
        assert!(diff < 1e-12, "masked: {diff}");
    }

    #[test]
    fn fewer_queries_than_keys_match_those_rows_of_the_full_attention() {
        let (b, t, heads, hd) = (2, 9, 3, 4);
        let d = heads * hd;
        let (q, k, v) = (randn(&[b, t, d]), randn(&[b, t, d]), randn(&[b, t, d]));
        let full = attention_no_grad(&q, &k, &v, heads, None).unwrap().unwrap();
        let first = attention_no_grad(&q.narrow(1, 0, 1).unwrap(), &k, &v, heads, None)
            .unwrap()
            .unwrap();
        assert_eq!(first.dims(), [b, 1, d]);
        let diff = max_abs(&first, &full.narrow(1, 0, 1).unwrap());
        assert!(diff < 1e-12, "{diff}");
    }

    #[test]
    fn an_input_on_a_path_to_a_variable_is_left_to_the_composition() {
        let q = candle_core::Var::from_tensor(&randn(&[1, 3, 4])).unwrap();
        let k = randn(&[1, 3, 4]);
        let got = attention_no_grad(q.as_tensor(), &k, &k, 2, None).unwrap();
        assert!(got.is_none());
    }

    #[test]
    fn mis_shaped_inputs_are_errors() {
        let (q, k) = (randn(&[1, 3, 4]), randn(&[1, 3, 6]));
        assert!(attention_no_grad(&q, &k, &k, 2, None).is_err());
        let bad_mask = randn(&[1, 1, 2, 3]);
        assert!(attention_no_grad(&q, &q, &q, 2, Some(&bad_mask)).is_err());
    }
}
