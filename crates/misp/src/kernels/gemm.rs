//! Matrix products straight on the `gemm` crate (the kernel under candle's CPU matmul), for
//! the fused nodes' forward and backward passes.
//!
//! Why not `Tensor::matmul`: candle 0.11.1 zero-fills every product's buffer before gemm
//! overwrites it, and a sum of two products (`x W^T + s z B^T`, `g W + dz A`) costs a third
//! buffer and an add. With LoRA's rank and attention's head size at 64 many products have a
//! short inner dimension, so the fills and adds were a tenth of a LoRA step in `perf`. gemm's
//! `dst = alpha dst + beta lhs rhs` writes a fresh product without the fill ([`product`]) and
//! accumulates one in place ([`add_product`]).

use super::real::Real;

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
    pub(crate) fn in_bounds(&self) -> bool {
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
    match parallelism(threads, (m, k, n)) {
        gemm::Parallelism::Rayon(threads) => split(dst, dst_rs, read_dst, a, b, scale, threads),
        _ => call(dst, dst_rs, read_dst, a, b, scale, gemm::Parallelism::None),
    }
}

/// A destination pointer the blocks of [`split`] share: each writes its own rows or columns.
#[derive(Clone, Copy)]
struct Dst<T>(*mut T);
// SAFETY: only used by `split`, whose blocks write disjoint elements.
unsafe impl<T> Send for Dst<T> {}
unsafe impl<T> Sync for Dst<T> {}

impl<T> Dst<T> {
    /// The pointer `offset` elements on (a method, so closures capture the `Send` wrapper).
    ///
    /// # Safety
    /// As `pointer::add`.
    unsafe fn add(self, offset: usize) -> *mut T {
        unsafe { self.0.add(offset) }
    }
}

/// A product split into one block of rows (or of columns, when there are fewer rows than
/// columns) per thread, each a single-threaded gemm. gemm's own threading packs the whole left
/// operand on the calling thread first whenever it has at most `2 * mc` rows, which is every
/// product here: in `perf` of `misp embed`, a serial 3 % with the other core idle. A block of
/// rows packs its own rows, on its own thread, and a weight read in column-major order (`W^T`)
/// needs no packing at all.
///
/// # Safety
/// As [`run`].
#[allow(clippy::too_many_arguments)]
unsafe fn split<T: Real>(
    dst: *mut T,
    dst_rs: usize,
    read_dst: bool,
    a: Mat<T>,
    b: Mat<T>,
    scale: T,
    threads: usize,
) {
    use rayon::prelude::*;
    // Blocks are whole multiples of 16 rows / columns (a vector register of f32 under AVX-512).
    const ALIGN: usize = 16;
    let by_rows = a.rows >= b.cols;
    let len = if by_rows { a.rows } else { b.cols };
    let step = len.div_ceil(threads).next_multiple_of(ALIGN);
    let dst = Dst(dst);
    (0..len.div_ceil(step)).into_par_iter().for_each(|i| {
        let (start, end) = (i * step, ((i + 1) * step).min(len));
        // SAFETY: block `i` is rows (or columns) `start..end` of the product, a part of what
        // `run`'s caller vouched for; no two blocks share an element of `dst`.
        unsafe {
            if by_rows {
                let a = Mat {
                    data: &a.data[start * a.rs..],
                    rows: end - start,
                    ..a
                };
                let p = dst.add(start * dst_rs);
                call(p, dst_rs, read_dst, a, b, scale, gemm::Parallelism::None);
            } else {
                let b = Mat {
                    data: &b.data[start * b.cs..],
                    cols: end - start,
                    ..b
                };
                let p = dst.add(start);
                call(p, dst_rs, read_dst, a, b, scale, gemm::Parallelism::None);
            }
        }
    });
}

/// gemm on row-major views: `dst = scale * a b`, or `dst += ..` with `read_dst`.
///
/// # Safety
/// As [`run`] (whose checks have passed for this block).
unsafe fn call<T: Real>(
    dst: *mut T,
    dst_rs: usize,
    read_dst: bool,
    a: Mat<T>,
    b: Mat<T>,
    scale: T,
    parallelism: gemm::Parallelism,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
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
        parallelism,
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
    fn products_split_across_threads_match_the_naive_loop() {
        // Above the single-thread size: split by rows (more rows than columns) and by columns,
        // block sizes not multiples of the alignment, into a strided destination, accumulating.
        for (m, k, n) in [(301, 90, 83), (21, 300, 371)] {
            assert!(m * k * n >= PARALLEL_FROM);
            let (x, w) = (data(m * k, 6), data(n * k, 7));
            let (x, w) = (Mat::new(&x, m, k), Mat::new(&w, n, k));
            let want = naive(x, w.t());
            let rs = n + 5;
            let mut dst = data(m * rs, 8);
            let before = dst.clone();
            let threads = rayon::ThreadPoolBuilder::new()
                .num_threads(3)
                .build()
                .unwrap();
            threads.install(|| {
                let view = MatMut::new(&mut dst, m, n, rs);
                unsafe { split(view.data.as_mut_ptr(), rs, true, x, w.t(), 2.0, 3) }
            });
            for i in 0..m {
                for j in 0..rs {
                    let (got, old) = (dst[i * rs + j], before[i * rs + j]);
                    let expect = if j < n {
                        old + 2.0 * want[i * n + j]
                    } else {
                        old
                    };
                    assert!((got - expect).abs() < 1e-9, "{m}x{k}x{n} at ({i}, {j})");
                }
            }
            assert_eq!(product(x, w.t(), 1.0).len(), m * n);
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
