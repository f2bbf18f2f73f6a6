//! bf16 x bf16 products with f32 accumulation on the CPU's bf16 dot-product instruction
//! (`vdpbf16ps`, AVX-512 BF16), for the frozen base weights of a bf16 model.
//!
//! Why: candle 0.11.1's CPU matmul has no bf16 kernel; it widens both operands to f32 (the
//! whole weight, serially, on every call), multiplies on the `gemm` crate and narrows the
//! product back. On a CPU with AVX-512 BF16 one `vdpbf16ps` does 32 bf16 multiply-adds where an
//! f32 FMA does 16, so a 7B-width bf16 step ran at torch's (oneDNN's) bf16 speed only once the
//! products used it (bench/README.md, "bf16 products").
//!
//! The kernel is the usual packed, blocked gemm (BLIS's loop nest) shaped for `vdpbf16ps`,
//! which multiplies *pairs* along the inner dimension: lane `j` of the f32 accumulator gains
//! `a[k] b[k, j] + a[k + 1] b[k + 1, j]`. So
//! - the right operand is packed into panels of [`NR`] = 32 columns (two vector registers),
//!   each inner pair of rows interleaved: `(b[2p, j], b[2p + 1, j])` for the 32 `j` of the
//!   panel, 128 bytes per pair (padded with zeros at an odd inner dimension or a short last
//!   panel). It is packed once per call: a frozen weight is read in both orientations
//!   (`x W^T` forward, `g W` backward), and a cached copy of each would cost a second copy of
//!   every weight, where a transient one costs less than candle's f32 copy it replaces;
//! - the left operand is packed per block of [`KC`] pairs into tiles of [`MR`] rows, each pair
//!   one `u32` that the kernel broadcasts to every lane;
//! - a tile of `MR x 32` outputs lives in 2 `MR` registers across a block of pairs; blocks
//!   accumulate in an f32 scratch of the task's rows, narrowed to bf16 once at the end.
//!
//! Work is split across rayon's threads by blocks of rows (each task packs its own rows), or
//! by groups of column panels when there are too few rows to go around (decoding).
//!
//! Dispatch: [`enabled`] is true on a CPU with AVX-512 BF16 unless `MISP_BF16_GEMM=off`,
//! [`set_enabled`] or [`with_enabled`] turns it off; callers then take candle's path, which is
//! also the path of every other CPU.

use half::bf16;
use rayon::prelude::*;

use super::gemm::Mat;

/// Rows of a register tile (2 x 12 = 24 of the 32 vector registers hold accumulators).
const MR: usize = 12;
/// Columns of a register tile and of a packed panel: two registers of 16 f32 lanes.
const NR: usize = 32;
/// Inner pairs per block: a panel's block (`KC x 128` bytes, 16 KiB) stays in L1 while every
/// row tile of the task passes over it.
const KC: usize = 128;
/// Rows per task at most (a packed block of them, `MC x KC x 4` bytes, stays in L2).
const MC: usize = 240;
/// Multiply-adds below which a product stays on the calling thread (as in [`super::gemm`]).
const PARALLEL_FROM: usize = 1 << 21;
/// Bytes of the right operand packed at a time (a chunk of panels, kept in L2 / L3).
const B_CHUNK_BYTES: usize = 8 << 20;

/// 0: not decided yet, 1: on, 2: off.
static STATE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

thread_local! {
    static THREAD: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Whether the CPU has the instructions this kernel needs.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The choice from `MISP_BF16_GEMM`'s value and the CPU: on unless the variable says off
/// (`0`, `off`, `false`) or the CPU lacks the instructions.
fn decide(var: Option<&str>, supported: bool) -> bool {
    let off = var.is_some_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "0" | "off" | "false"
        )
    });
    supported && !off
}

/// Whether bf16 products run on this kernel here: this thread's [`with_enabled`] override,
/// else the process's choice ([`set_enabled`], else `MISP_BF16_GEMM` and the CPU, read once).
pub fn enabled() -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    if let Some(on) = THREAD.with(|t| t.get()) {
        return on && supported();
    }
    match STATE.load(Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let var = std::env::var("MISP_BF16_GEMM").ok();
            let on = decide(var.as_deref(), supported());
            STATE.store(if on { 1 } else { 2 }, Relaxed);
            on
        }
    }
}

/// Turns the kernel on (where [`supported`]) or off for the whole process; off, bf16 products
/// take candle's widening matmul (the bench compares the two this way).
pub fn set_enabled(on: bool) {
    let on = on && supported();
    STATE.store(if on { 1 } else { 2 }, std::sync::atomic::Ordering::Relaxed);
}

/// Runs `f` with the kernel on (where [`supported`]) or off on this thread only (a model's
/// products run on the calling thread, so this covers its forward and backward).
pub fn with_enabled<R>(on: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<bool>);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREAD.with(|t| t.set(self.0));
        }
    }
    let _restore = Restore(THREAD.with(|t| t.replace(Some(on))));
    f()
}

/// `a b` for bf16 views (`a` is `m x k`, `b` is `k x n`, any strides), accumulated in f32,
/// rounded to bf16 (nearest even), row-major `m x n`. Callers check [`enabled`] first.
pub(crate) fn product(a: Mat<bf16>, b: Mat<bf16>) -> Vec<bf16> {
    assert!(supported(), "bf16 gemm: the CPU has no AVX-512 BF16");
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "bf16 gemm: inner dimensions {k} and {}", b.rows);
    assert!(
        a.in_bounds() && b.in_bounds(),
        "bf16 gemm: strides outside the data"
    );
    let mut out = vec![bf16::ZERO; m * n];
    if m == 0 || n == 0 || k == 0 {
        return out;
    }
    let parallel = m * k * n >= PARALLEL_FROM && rayon::current_num_threads() > 1;
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    let pairs = k.div_ceil(2);
    let tiles = m.div_ceil(MR);
    // The left operand packed once, block of pairs by block: block `kb / KC` at
    // `tiles * MR * kb`, laid out as `pack_a` writes it.
    let mut apack = vec![0u32; tiles * MR * pairs];
    let pack_block = |(i, dst): (usize, &mut [u32])| {
        let kb = i * KC;
        pack_a(a, kb, (pairs - kb).min(KC), dst);
    };
    if parallel {
        apack
            .par_chunks_mut(tiles * MR * KC)
            .enumerate()
            .for_each(pack_block);
    } else {
        apack
            .chunks_mut(tiles * MR * KC)
            .enumerate()
            .for_each(pack_block);
    }
    // Blocks of row tiles in a multiple of the thread count, of equal size (a 3510-row
    // product on two threads: 16 blocks of 220 rather than 15 of 240, which left one thread
    // idle for a block's time).
    let row_blocks = tiles
        .div_ceil(MC / MR)
        .max(1)
        .next_multiple_of(threads)
        .min(tiles);
    let per_block = tiles.div_ceil(row_blocks);
    let row_blocks = tiles.div_ceil(per_block);
    // The right operand in chunks of panels packed just before use, small enough to stay in
    // cache while every row block passes over them: packing the whole of a 7B weight first
    // wrote it out to memory and read it back, 14 % of a training step.
    let panels = n.div_ceil(NR);
    let per_chunk = (B_CHUNK_BYTES / (pairs * NR * 4)).clamp(1, panels);
    let dst = Dst(out.as_mut_ptr());
    for q0 in (0..panels).step_by(per_chunk) {
        let q1 = (q0 + per_chunk).min(panels);
        let (c0, c1) = (q0 * NR, (q1 * NR).min(n));
        let chunk = Mat {
            data: &b.data[c0 * b.cs..],
            cols: c1 - c0,
            ..b
        };
        let packed = pack_b(chunk, parallel);
        // Too few row blocks to occupy every thread twice over (few rows, as in decoding):
        // split the chunk's panels as well.
        let groups = if row_blocks >= 2 * threads {
            1
        } else {
            (2 * threads).div_ceil(row_blocks).min(q1 - q0)
        };
        let per_group = (q1 - q0).div_ceil(groups);
        let groups = (q1 - q0).div_ceil(per_group);
        let task = |t: usize| {
            let (rb, g) = (t / groups, t % groups);
            let (t0, t1) = (rb * per_block, ((rb + 1) * per_block).min(tiles));
            let (r0, r1) = (t0 * MR, (t1 * MR).min(m));
            let (g0, g1) = (g * per_group * NR, ((g + 1) * per_group * NR).min(c1 - c0));
            let panels = &packed[g * per_group * pairs * NR..];
            let acc = block_product(&apack, tiles, (t0, t1), r1 - r0, panels, pairs, g1 - g0);
            for (i, row) in acc.chunks_exact(g1 - g0).enumerate() {
                // SAFETY: row `r0 + i`, columns `c0 + g0..c0 + g1` of the `m x n` output belong
                // to this task alone (tasks are disjoint blocks of rows and panels).
                unsafe {
                    let out_row =
                        std::slice::from_raw_parts_mut(dst.add((r0 + i) * n + c0 + g0), g1 - g0);
                    narrow(row, out_row);
                }
            }
        };
        if parallel {
            (0..row_blocks * groups).into_par_iter().for_each(task);
        } else {
            (0..row_blocks * groups).for_each(task);
        }
    }
    out
}

/// The right operand `k x n` as panels of [`NR`] columns, pairs of rows packed into one `u32`
/// each (the even row in the low half, as `vdpbf16ps` pairs them), zero padded: panel `q`,
/// pair `p`, column `j` of the panel at `q * pairs * NR + p * NR + j`.
fn pack_b(b: Mat<bf16>, parallel: bool) -> Vec<u32> {
    let (k, n) = (b.rows, b.cols);
    let pairs = k.div_ceil(2);
    let panel_len = pairs * NR;
    let mut packed = vec![0u32; n.div_ceil(NR) * panel_len];
    let bits = |v: bf16| u32::from(v.to_bits());
    let fill = |(q, dst): (usize, &mut [u32])| {
        let cols = (n - q * NR).min(NR);
        if b.cs == 1 {
            // Rows contiguous (`g W`): two rows at a time, zipped into pairs (a loop the
            // compiler vectorises).
            for p in 0..pairs {
                let even = &b.data[2 * p * b.rs + q * NR..][..cols];
                let out = &mut dst[p * NR..][..cols];
                if 2 * p + 1 < k {
                    let odd = &b.data[(2 * p + 1) * b.rs + q * NR..][..cols];
                    for ((d, &e), &o) in out.iter_mut().zip(even).zip(odd) {
                        *d = bits(e) | (bits(o) << 16);
                    }
                } else {
                    for (d, &e) in out.iter_mut().zip(even) {
                        *d = bits(e);
                    }
                }
            }
        } else if b.rs == 1 {
            // Columns contiguous (`x W^T`: a column is a weight row), so a pair is two adjacent
            // values. Blocks of pairs keep the panel's destination rows in L1 while each of
            // the panel's weight rows is read a cache line at a time.
            const PB: usize = 32;
            let full = k / 2;
            for p0 in (0..full).step_by(PB) {
                let p1 = (p0 + PB).min(full);
                for j in 0..cols {
                    let col = &b.data[(q * NR + j) * b.cs + 2 * p0..][..2 * (p1 - p0)];
                    for (i, pair) in col.chunks_exact(2).enumerate() {
                        dst[(p0 + i) * NR + j] = bits(pair[0]) | (bits(pair[1]) << 16);
                    }
                }
            }
            if k % 2 == 1 {
                // The last, half-empty pair (its upper half stays zero).
                for j in 0..cols {
                    dst[full * NR + j] = bits(b.data[(q * NR + j) * b.cs + k - 1]);
                }
            }
        } else {
            // Any other strides: element by element.
            for j in 0..cols {
                let col = (q * NR + j) * b.cs;
                for r in 0..k {
                    dst[(r / 2) * NR + j] |= bits(b.data[col + r * b.rs]) << (16 * (r % 2));
                }
            }
        }
    };
    if parallel {
        packed.par_chunks_mut(panel_len).enumerate().for_each(fill);
    } else {
        packed.chunks_mut(panel_len).enumerate().for_each(fill);
    }
    packed
}

/// Row tiles `t0..t1` of the packed left operand (`rows` rows; `tiles` tiles in all) times
/// every panel of the packed right operand chunk: a row-major `rows x width` f32 block.
fn block_product(
    apack: &[u32],
    tiles: usize,
    (t0, t1): (usize, usize),
    rows: usize,
    packed: &[u32],
    pairs: usize,
    width: usize,
) -> Vec<f32> {
    let mut acc = vec![0f32; rows * width];
    let panel_len = pairs * NR;
    let mut kb = 0;
    while kb < pairs {
        let kp = (pairs - kb).min(KC);
        let ablock = &apack[tiles * MR * kb..][..tiles * MR * kp];
        for q in 0..width.div_ceil(NR) {
            let cols = (width - q * NR).min(NR);
            let b = &packed[q * panel_len + kb * NR..][..kp * NR];
            for t in t0..t1 {
                let r = (rows - (t - t0) * MR).min(MR);
                let c = &mut acc[(t - t0) * MR * width + q * NR..];
                // SAFETY: `supported()` was checked by `product`; the tile's `r` rows of
                // `cols` columns, `width` apart, lie in `acc` from this offset; `ablock` holds
                // `kp` pairs of `MR` values for tile `t`, `b` holds `kp` pairs of the panel.
                unsafe {
                    tile(
                        r,
                        &ablock[t * MR * kp..][..MR * kp],
                        b,
                        kp,
                        c,
                        width,
                        cols,
                        kb == 0,
                    )
                }
            }
        }
        kb += kp;
    }
    acc
}

/// Pairs `kb..kb + kp` of the rows of `a` into tiles of [`MR`] rows: tile `t`, pair `p`, row
/// `i` at `t * MR * kp + p * MR + i`, each pair one `u32` (the even element in the low half,
/// as `vdpbf16ps` pairs them); an odd inner dimension's last pair and rows past the end are
/// zero.
fn pack_a(a: Mat<bf16>, kb: usize, kp: usize, dst: &mut [u32]) {
    let k = a.cols;
    for t in 0..a.rows.div_ceil(MR) {
        let tile = &mut dst[t * MR * kp..][..MR * kp];
        for i in 0..MR {
            let r = t * MR + i;
            if r >= a.rows {
                for p in 0..kp {
                    tile[p * MR + i] = 0;
                }
                continue;
            }
            let row = &a.data[r * a.rs..];
            for p in 0..kp {
                let c = 2 * (kb + p);
                let lo = row[c * a.cs].to_bits() as u32;
                let hi = if c + 1 < k {
                    row[(c + 1) * a.cs].to_bits() as u32
                } else {
                    0
                };
                tile[p * MR + i] = lo | (hi << 16);
            }
        }
    }
}

/// An f32 row rounded to bf16 (nearest even, as `half` and torch round finite values).
fn narrow(src: &[f32], dst: &mut [bf16]) {
    debug_assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `product` checked `supported()`; both slices have the same length.
    unsafe {
        x86::narrow(src, dst)
    }
    #[cfg(not(target_arch = "x86_64"))]
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = bf16::from_f32(s);
    }
}

/// The output pointer the tasks of [`product`] share, each writing its own elements.
#[derive(Clone, Copy)]
struct Dst(*mut bf16);
// SAFETY: only used by `product`, whose tasks write disjoint elements.
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

impl Dst {
    /// The pointer `offset` elements on (a method, so closures capture the `Send` wrapper).
    ///
    /// # Safety
    /// As `pointer::add`.
    unsafe fn add(self, offset: usize) -> *mut bf16 {
        unsafe { self.0.add(offset) }
    }
}

/// One register tile: rows `0..r` (`r <= MR`) by columns `0..cols` (`cols <= NR`) of `c`
/// (`ldc` apart) get `a_tile b_panel` over `kp` pairs, written (`first`) or added.
///
/// # Safety
/// The CPU must have AVX-512 F, BW, VL and BF16; `a` holds `kp * MR` values, `b` `kp * 2 NR`,
/// and `c` reaches row `r - 1`, column `cols - 1`.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    r: usize,
    a: &[u32],
    b: &[u32],
    kp: usize,
    c: &mut [f32],
    ldc: usize,
    cols: usize,
    first: bool,
) {
    debug_assert!((1..=MR).contains(&r) && (1..=NR).contains(&cols));
    debug_assert!(a.len() >= kp * MR && b.len() >= kp * NR);
    debug_assert!(c.len() >= (r - 1) * ldc + cols);
    #[cfg(target_arch = "x86_64")]
    unsafe {
        let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
        match r {
            1 => x86::tile::<1>(a, b, kp, c, ldc, cols, first),
            2 => x86::tile::<2>(a, b, kp, c, ldc, cols, first),
            3 => x86::tile::<3>(a, b, kp, c, ldc, cols, first),
            4 => x86::tile::<4>(a, b, kp, c, ldc, cols, first),
            5 => x86::tile::<5>(a, b, kp, c, ldc, cols, first),
            6 => x86::tile::<6>(a, b, kp, c, ldc, cols, first),
            7 => x86::tile::<7>(a, b, kp, c, ldc, cols, first),
            8 => x86::tile::<8>(a, b, kp, c, ldc, cols, first),
            9 => x86::tile::<9>(a, b, kp, c, ldc, cols, first),
            10 => x86::tile::<10>(a, b, kp, c, ldc, cols, first),
            11 => x86::tile::<11>(a, b, kp, c, ldc, cols, first),
            _ => x86::tile::<12>(a, b, kp, c, ldc, cols, first),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (r, a, b, kp, c, ldc, cols, first);
        unreachable!("bf16 gemm: not an x86-64 CPU");
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::bf16;
    use std::arch::x86_64::*;

    /// `src` rounded to bf16 into `dst`, 16 at a time.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW, VL and BF16; the slices have the same length.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn narrow(src: &[f32], dst: &mut [bf16]) {
        let n = src.len().min(dst.len());
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        let mut i = 0;
        unsafe {
            while i < n {
                let mask: __mmask16 = if n - i >= 16 {
                    0xffff
                } else {
                    (1u16 << (n - i)) - 1
                };
                let v = _mm512_maskz_loadu_ps(mask, s.add(i));
                let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
                _mm256_mask_storeu_epi16(d.add(i) as *mut i16, mask, h);
                i += 16;
            }
        }
    }

    /// `R x 32` outputs in `2 R` registers over `kp` pairs; see [`super::tile`].
    ///
    /// # Safety
    /// As [`super::tile`], with raw pointers.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn tile<const R: usize>(
        a: *const u32,
        b: *const u32,
        kp: usize,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        first: bool,
    ) {
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            for p in 0..kp {
                let bp = b.add(p * super::NR) as *const __m512i;
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(1)));
                let ap = a.add(p * super::MR);
                for (i, acc) in acc.iter_mut().enumerate() {
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(i) as i32));
                    acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
                }
            }
            let m0: __mmask16 = if cols >= 16 {
                0xffff
            } else {
                (1u16 << cols) - 1
            };
            let m1: __mmask16 = if cols >= 32 {
                0xffff
            } else if cols > 16 {
                (1u16 << (cols - 16)) - 1
            } else {
                0
            };
            for (i, acc) in acc.iter().enumerate() {
                let row = c.add(i * ldc);
                let (mut v0, mut v1) = (acc[0], acc[1]);
                if !first {
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.add(16)));
                }
                _mm512_mask_storeu_ps(row, m0, v0);
                _mm512_mask_storeu_ps(row.add(16), m1, v1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in [-1, 1), exactly representable in bf16.
    fn data(n: usize, seed: u64) -> Vec<bf16> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                bf16::from_f64((s >> 11) as f64 / (1u64 << 52) as f64 - 1.0)
            })
            .collect()
    }

    /// Checks `product(a, b)` element by element against the f64 product of the same bf16
    /// values: within half a bf16 step of the exact value (the final rounding) plus what f32
    /// accumulation over `k` terms can lose (`k` unit roundoffs of the sum of |terms|).
    fn check(a: Mat<bf16>, b: Mat<bf16>, what: &str) {
        let got = product(a, b);
        let (m, k, n) = (a.rows, a.cols, b.cols);
        assert_eq!(got.len(), m * n);
        for i in 0..m {
            for j in 0..n {
                let (mut exact, mut mass) = (0f64, 0f64);
                for p in 0..k {
                    let t =
                        a.data[i * a.rs + p * a.cs].to_f64() * b.data[p * b.rs + j * b.cs].to_f64();
                    exact += t;
                    mass += t.abs();
                }
                let tol = exact.abs() * 2f64.powi(-8) + k as f64 * 2f64.powi(-24) * mass + 1e-30;
                let g = got[i * n + j].to_f64();
                assert!(
                    (g - exact).abs() <= tol,
                    "{what} {m}x{k}x{n} at ({i}, {j}): {g} against {exact} (tolerance {tol:.2e})"
                );
            }
        }
    }

    #[test]
    fn products_match_an_f64_reference_on_odd_shapes() {
        if !supported() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        // Odd inner dimensions (a half-empty last pair), more than one block of pairs
        // (k > 2 KC), more rows than a task (m > MC), partial tiles and panels, one element.
        let shapes = [
            (1, 1, 1),
            (3, 5, 7),
            (13, 1, 33),
            (29, 301, 65),
            (253, 519, 97),
            // A right operand of several chunks (`B_CHUNK_BYTES`), with many rows and with
            // too few rows to occupy the threads (panels split across tasks).
            (29, 4101, 300),
            (3, 4101, 300),
        ];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for (m, k, n) in shapes {
            let x = data(m * k, 1);
            let w = data(n * k, 2);
            let g = data(m * n, 3);
            pool.install(|| {
                // x W^T, the weight `[n, k]` read by columns (a linear layer's forward) ...
                check(Mat::new(&x, m, k), Mat::new(&w, n, k).t(), "x W^T");
                // ... and g W with W `[n, k]` read by rows (its input's gradient).
                check(Mat::new(&g, m, n), Mat::new(&w, n, k), "g W");
            });
            // A transposed left operand (strided rows) on the calling thread alone.
            let xt = data(k * m, 4);
            check(Mat::new(&xt, k, m).t(), Mat::new(&w, n, k).t(), "x^T W^T");
            // A right operand with no unit stride (every other element of a wider buffer).
            let wide = data(2 * n * k, 8);
            let strided = Mat {
                data: &wide,
                rows: k,
                cols: n,
                rs: 2,
                cs: 2 * k,
            };
            check(Mat::new(&x, m, k), strided, "x W^T, strided");
        }
    }

    #[test]
    fn the_kernel_is_chosen_by_the_cpu_and_the_variable() {
        assert!(decide(None, true));
        assert!(decide(Some("1"), true));
        assert!(!decide(Some("off"), true));
        assert!(!decide(Some(" OFF "), true));
        assert!(!decide(Some("0"), true));
        assert!(!decide(Some("false"), true));
        assert!(
            !decide(None, false),
            "no kernel on a CPU without AVX-512 BF16"
        );
        with_enabled(false, || assert!(!enabled()));
        with_enabled(true, || {
            assert_eq!(enabled(), supported());
            with_enabled(false, || assert!(!enabled()));
            assert_eq!(enabled(), supported(), "restored after the inner override");
        });
    }

    #[test]
    fn a_frozen_linear_layer_takes_the_kernel_or_candles_matmul() {
        use candle_core::{DType, Device, Tensor, Var};
        let (m, k, n) = (37, 45, 70);
        let to = |v: Vec<bf16>, s: (usize, usize)| Tensor::from_vec(v, s, &Device::Cpu).unwrap();
        let x = to(data(m * k, 5), (m, k));
        let w = to(data(n * k, 6), (n, k));
        let g = to(data(m * n, 7), (m, n));
        let candle_fwd = x.matmul(&w.t().unwrap()).unwrap();
        let candle_bwd = g.matmul(&w).unwrap();
        let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<bf16>().unwrap();
        // Forced off: candle's own matmul, bit for bit, forward and backward.
        with_enabled(false, || {
            assert_eq!(
                bits(&super::super::linear(&x, &w).unwrap()),
                bits(&candle_fwd)
            );
            assert_eq!(
                bits(&super::super::input_grad(&g, &w).unwrap()),
                bits(&candle_bwd)
            );
        });
        if !supported() {
            eprintln!("skipped the kernel's half: this CPU has no AVX-512 BF16");
            return;
        }
        // On: the kernel's result (f32 accumulation like candle's, so near it), and the
        // gradient of a graph through the layer is the kernel's `g W`.
        with_enabled(true, || {
            let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let mine = super::super::linear(&x, &w).unwrap();
            let d = (f32s(&mine) - f32s(&candle_fwd)).unwrap().abs().unwrap();
            assert!(d.max_all().unwrap().to_scalar::<f32>().unwrap() < 0.1);
            let xs: Vec<bf16> = bits(&x);
            let ws: Vec<bf16> = bits(&w);
            assert_eq!(
                bits(&mine),
                product(Mat::new(&xs, m, k), Mat::new(&ws, n, k).t())
            );
            let v = Var::from_tensor(&x).unwrap();
            let y = super::super::linear(v.as_tensor(), &w).unwrap();
            let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let gs: Vec<bf16> = bits(&g);
            assert_eq!(
                bits(grads.get(v.as_tensor()).unwrap()),
                product(Mat::new(&gs, m, n), Mat::new(&ws, n, k))
            );
        });
    }
}
