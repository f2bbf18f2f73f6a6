//! The skeleton every fused element-wise kernel shares, written once: a [`Kernel`] is a pure
//! function of `N` contiguous slices of one float type (plus, if it is differentiable, its
//! backward in tensors); [`Op`] turns any kernel into candle's `CustomOp1/2/3` (dtype dispatch,
//! contiguity checks, the name errors carry); [`map_rows`] and [`zip_map`] are the two parallel
//! loops the kernels' bodies run in.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::real::{assume_init, uninit, vectorised, zeroed, Real};

/// Elements handed to one rayon task: enough work to amortise the task, small enough to share.
const MIN_ELEMS_PER_TASK: usize = 1 << 14;

/// Rows of `cols` elements handed to one rayon task.
fn rows_per_task(cols: usize) -> usize {
    (MIN_ELEMS_PER_TASK / cols.max(1)).max(1)
}

/// A kernel over `N` contiguous inputs of one float type, written once for every [`Real`].
/// The output has the first input's shape.
pub(crate) trait Kernel<const N: usize> {
    const NAME: &'static str;
    fn run<T: Real>(&self, inputs: [&[T]; N]) -> Vec<T>;
    /// The inputs' gradients from the inputs, the output and the output's gradient. Kernels
    /// that are only applied without backward (`apply_op*_no_bwd`) keep this default.
    fn backward(
        &self,
        _inputs: [&Tensor; N],
        _out: &Tensor,
        _grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; N]> {
        candle_core::bail!("{}: no backward", Self::NAME)
    }
}

/// Any [`Kernel`] as a candle custom op (`tensor.apply_op2(Op(k), ..)`).
pub(crate) struct Op<K>(pub K);

/// Runs `k` on the inputs' `f32` or `f64` data: the `cpu_fwd` of every [`Op`]. A dtype mix or
/// a strided input is an error naming the kernel.
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
            *o = super::real::cpu_slice(s, l, name)?;
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

impl<K: Kernel<1>> CustomOp1 for Op<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch(&self.0, [(s, l)])
    }
    fn bwd(&self, a: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let [da] = self.0.backward([a], y, g)?;
        Ok(da)
    }
}

impl<K: Kernel<2>> CustomOp2 for Op<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }
    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch(&self.0, [(a, al), (b, bl)])
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let [da, db] = self.0.backward([a, b], y, g)?;
        Ok((da, db))
    }
}

impl<K: Kernel<3>> CustomOp3 for Op<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }
    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
        c: &CpuStorage,
        cl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch(&self.0, [(a, al), (b, bl), (c, cl)])
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [da, db, dc] = self.0.backward([a, b, c], y, g)?;
        Ok((da, db, dc))
    }
}

/// A row-wise kernel's loop: `f(r, out_row, [input rows])` for every row `r` of `cols`
/// elements, rows shared out to rayon tasks, each task's output chunk zeroed on its own thread
/// and its loop compiled for the widest vector unit ([`vectorised`]). Every input has the
/// output's length. `f` is `Copy` and copied into the loop, so what it captures is in
/// registers (read through a reference, a captured scalar might alias the output and the loop
/// would not vectorise).
pub(crate) fn map_rows<T: Real, const N: usize>(
    inputs: [&[T]; N],
    cols: usize,
    f: impl Fn(usize, &mut [T], [&[T]; N]) + Sync + Copy,
) -> Vec<T> {
    let per_task = rows_per_task(cols);
    let mut out = uninit::<T>(inputs.first().map_or(0, |x| x.len()));
    out.par_chunks_mut(cols * per_task)
        .enumerate()
        .for_each(|(task, chunk)| {
            let chunk = zeroed(chunk);
            vectorised(
                #[inline(always)]
                || {
                    let local = f;
                    let first = task * per_task;
                    for (i, row) in chunk.chunks_mut(cols).enumerate() {
                        let r = first + i;
                        local(r, row, inputs.map(|x| &x[r * cols..(r + 1) * cols]));
                    }
                },
            )
        });
    // SAFETY: every chunk of `out` went through `zeroed`.
    unsafe { assume_init(out) }
}

/// The element-wise loop: `out[i] = f(a[i], b[i], c[i])`, in parallel chunks, vectorised as
/// [`map_rows`]. Two-input kernels pass one input twice.
pub(crate) fn zip_map<T: Real>(
    a: &[T],
    b: &[T],
    c: &[T],
    f: impl Fn(T, T, T) -> T + Sync + Copy,
) -> Vec<T> {
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
