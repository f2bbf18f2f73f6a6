//! Matrix products straight on the `gemm` crate (the kernel under candle's CPU matmul), for
//! the fused nodes' forward and backward passes.
//!
//! Why not `Tensor::matmul`: candle 0.11.1 zero-fills every product's buffer before gemm
//! overwrites it, and a sum of two products (`x W^T + s z B^T`, `g W + dz A`) costs a third
//! buffer and an add. With LoRA's rank and attention's head size at 64 many products have a
//! short inner dimension, so the fills and adds were a tenth of a LoRA step in `perf`. gemm's
//! `dst = alpha dst + beta lhs rhs` writes a fresh product without the fill ([`product`]) and
//! accumulates one in place ([`add_product`]).

use super::fused::Real;

/// A strided matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major `rows x cols` matrix.
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose, as a view.
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Whether every element the strides reach lies in `data` (what keeps the calls sound).
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// A mutable strided matrix view (the destination of a product).
pub(crate) struct MatMut<'a, T> {
    pub data: &'a mut [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
}

impl<'a, T> MatMut<'a, T> {
    /// Rows `rows` x `cols` of `data`, `rs` apart (columns adjacent).
    pub fn new(data: &'a mut [T], rows: usize, cols: usize, rs: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs,
        }
    }
}

/// Whether a product runs on candle's thread count (`Threads::All`) or on the calling thread
/// alone (`Threads::One`: the caller already splits the work across threads).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Threads {
    All,
    One,
}

/// Multiply-adds below which a product stays on the calling thread: waking the pool costs
/// more than it saves on a decoding step's `[B, D] x [D, D]` (POPE at 2 threads ran slower
/// than at 1 with every product split).
const PARALLEL_FROM: usize = 1 << 21;

fn parallelism(t: Threads, (m, k, n): (usize, usize, usize)) -> gemm::Parallelism {
    match (t, candle_core::utils::get_num_threads()) {
        (Threads::One, _) | (_, 0 | 1) => gemm::Parallelism::None,
        _ if m * k * n < PARALLEL_FROM => gemm::Parallelism::None,
        (Threads::All, n) => gemm::Parallelism::Rayon(n),
    }
}

/// `scale * a b`, row-major, in a buffer gemm fills without a prior zeroing.
pub(crate) fn product<T: Real>(a: Mat<T>, b: Mat<T>, scale: T) -> Vec<T> {
    let (m, n) = (a.rows, b.cols);
    if a.cols == 0 {
        return vec![T::ZERO; m * n];
    }
    let mut out: Vec<T> = Vec::with_capacity(m * n);
    // SAFETY: `run` checks the shapes and bounds; with `read_dst = false` gemm writes every one
    // of the `m * n` elements (k > 0) without reading them, so the length is set after.
    unsafe {
        run(out.as_mut_ptr(), m * n, n, false, a, b, scale, Threads::All);
        out.set_len(m * n);
    }
    out
}

/// `dst += scale * a b`, `dst` row-major `a.rows x b.cols`.
pub(crate) fn add_product<T: Real>(dst: &mut [T], a: Mat<T>, b: Mat<T>, scale: T) {
    let n = b.cols;
    product_into(
        MatMut::new(dst, a.rows, n, n),
        a,
        b,
        scale,
        true,
        Threads::All,
    )
}

/// `dst = scale * a b` (or `dst += ..` with `accumulate`) into a strided view.
pub(crate) fn product_into<T: Real>(
    dst: MatMut<T>,
    a: Mat<T>,
    b: Mat<T>,
    scale: T,
    accumulate: bool,
    threads: Threads,
) {
    assert_eq!(
        (dst.rows, dst.cols),
        (a.rows, b.cols),
        "gemm: destination {} x {} for a {} x {} product",
        dst.rows,
        dst.cols,
        a.rows,
        b.cols
    );
    if a.cols == 0 {
        if !accumulate {
            for r in 0..dst.rows {
                dst.data[r * dst.rs..][..dst.cols].fill(T::ZERO);
            }
        }
        return;
    }
    let len = if dst.rows == 0 {
        0
    } else {
        (dst.rows - 1) * dst.rs + dst.cols
    };
    assert!(
        len <= dst.data.len(),
        "gemm: destination view outside its data"
    );
    // SAFETY: the view lies within `dst.data`, which is initialised.
    unsafe {
        run(
            dst.data.as_mut_ptr(),
            len,
            dst.rs,
            accumulate,
            a,
            b,
            scale,
            threads,
        )
    }
}

/// # Safety
/// `dst` must be valid for writes (and reads, with `read_dst`) of the `a.rows x b.cols`
/// elements `dst_rs` apart that `dst_len` covers.
#[allow(clippy::too_many_arguments)]
unsafe fn run<T: Real>(
    dst: *mut T,
    dst_len: usize,
    dst_rs: usize,
    read_dst: bool,
    a: Mat<T>,
    b: Mat<T>,
    scale: T,
    threads: Threads,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm: inner dimensions {k} and {}", b.rows);
    assert!(
        m == 0 || n == 0 || ((m - 1) * dst_rs + n <= dst_len && n <= dst_rs),
        "gemm: output buffer of {dst_len} for {m} x {n} rows {dst_rs} apart"
    );
    assert!(
        a.in_bounds() && b.in_bounds(),
        "gemm: strides outside the data"
    );
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        read_dst,
        a.data.as_ptr(),
        a.cs as isize,
        a.rs as isize,
        b.data.as_ptr(),
        b.cs as isize,
        b.rs as isize,
        T::ONE,
        scale,
        false,
        false,
        false,
        parallelism(threads, (m, k, n)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: Mat<f64>, b: Mat<f64>) -> Vec<f64> {
        let mut out = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                for p in 0..a.cols {
                    out[i * b.cols + j] +=
                        a.data[i * a.rs + p * a.cs] * b.data[p * b.rs + j * b.cs];
                }
            }
        }
        out
    }

    fn data(n: usize, seed: u64) -> Vec<f64> {
        (0..n)
            .map(|i| ((i as u64 * 2654435761 + seed) % 1000) as f64 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn products_of_views_match_the_naive_loop() {
        let (x, w) = (data(7 * 5, 1), data(3 * 5, 2));
        let (x, w) = (Mat::new(&x, 7, 5), Mat::new(&w, 3, 5));
        // x w^T: a transposed right operand, as a linear layer's weight.
        let got = product(x, w.t(), 2.0);
        let want: Vec<f64> = naive(x, w.t()).iter().map(|v| 2.0 * v).collect();
        assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-12));
        // x^T (x w^T): a transposed left operand, as a weight gradient.
        let y = product(x, w.t(), 1.0);
        let got = product(x.t(), Mat::new(&y, 7, 3), 1.0);
        let want = naive(x.t(), Mat::new(&y, 7, 3));
        assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-12));
    }

    #[test]
    fn add_product_accumulates_in_place() {
        let (a, b) = (data(4 * 6, 3), data(6 * 2, 4));
        let (a, b) = (Mat::new(&a, 4, 6), Mat::new(&b, 6, 2));
        let mut dst = data(4 * 2, 5);
        let before = dst.clone();
        add_product(&mut dst, a, b, -0.5);
        let ab = naive(a, b);
        for ((d, b0), p) in dst.iter().zip(&before).zip(&ab) {
            assert!((d - (b0 - 0.5 * p)).abs() < 1e-12);
        }
    }

    #[test]
    fn an_empty_inner_dimension_gives_zeros() {
        let e: Vec<f64> = Vec::new();
        assert_eq!(
            product(Mat::new(&e, 3, 0), Mat::new(&e, 0, 2), 1.0),
            vec![0.0; 6]
        );
    }

    #[test]
    #[should_panic(expected = "inner dimensions")]
    fn mismatched_shapes_are_refused() {
        let a = data(6, 1);
        product(Mat::new(&a, 2, 3), Mat::new(&a, 2, 3), 1.0);
    }
}
