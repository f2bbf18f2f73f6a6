//! The scalar and memory basics every CPU kernel here is written with: the float types
//! ([`Real`]), a vectorisable `exp`, run-time dispatch to the widest vector unit, and outputs
//! allocated uninitialised and zeroed per parallel chunk.

use candle_core::{CpuStorage, DType, Layout, Tensor};

/// Which implementation the models' element-wise, attention and LoRA stretches run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// misp's CPU kernels where they apply (CPU, `f32` / `f64`), the composition elsewhere.
    Fused,
    /// candle's ordinary ops, composed so that gradients flow, on every device: what runs on a
    /// GPU. Selectable on the CPU so that the GPU's op graph is checked by the CPU's tests.
    Generic,
}

static PROCESS_KERNELS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

thread_local! {
    static THREAD_KERNELS: std::cell::Cell<Option<Kernels>> = const { std::cell::Cell::new(None) };
}

/// Sets the kernels of the whole process (the command line's `--kernels`).
pub fn set_kernels(k: Kernels) {
    PROCESS_KERNELS.store(k == Kernels::Generic, std::sync::atomic::Ordering::Relaxed);
}

/// The kernels in force on this thread: its [`with_kernels`] override, else the process's.
pub fn kernels() -> Kernels {
    THREAD_KERNELS.with(|t| t.get()).unwrap_or(
        if PROCESS_KERNELS.load(std::sync::atomic::Ordering::Relaxed) {
            Kernels::Generic
        } else {
            Kernels::Fused
        },
    )
}

/// Runs `f` with `k` in force on this thread (the tests run both paths side by side). Models
/// decide per call, on the calling thread, so the choice covers forward and backward.
pub fn with_kernels<R>(k: Kernels, f: impl FnOnce() -> R) -> R {
    let _guard = ThreadKernels::set(k);
    f()
}

/// Puts kernels in force on this thread until dropped, then restores what was before.
pub struct ThreadKernels(Option<Kernels>);

impl ThreadKernels {
    pub fn set(k: Kernels) -> Self {
        Self(THREAD_KERNELS.with(|t| t.replace(Some(k))))
    }
}

impl Drop for ThreadKernels {
    fn drop(&mut self) {
        THREAD_KERNELS.with(|t| t.set(self.0));
    }
}

/// Whether `x` runs on a fused kernel here (fused kernels in force, CPU, `f32` / `f64`).
pub fn fusable(x: &Tensor) -> bool {
    kernels() == Kernels::Fused
        && x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
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

/// The contiguous data of a bf16 CPU storage, or an error naming `op`.
pub(crate) fn cpu_slice_bf16<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a [half::bf16]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::BF16(v), Some((a, b))) => Ok(&v[a..b]),
        (CpuStorage::BF16(_), None) => candle_core::bail!("{op}: input is not contiguous"),
        _ => candle_core::bail!("{op}: expected bf16 data"),
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
