//! glibc malloc settings for tensor work.
//!
//! candle allocates a fresh buffer for every op's output and frees it soon after. glibc serves
//! blocks above its mmap threshold (128 KiB at start, raised adaptively only up to 32 MiB) with
//! fresh `mmap`s and returns them to the kernel on free, so every large activation costs page
//! faults and kernel page clearing on first touch: 8-18 % of a training step and of CLIP
//! inference in `perf`. Serving them from the heap and never trimming it lets freed buffers be
//! reused as they are. The price is that the heap keeps its high-water mark until exit, which
//! the peak RSS already had to allow.

/// Keeps large freed blocks in the heap for reuse (glibc only; a no-op elsewhere).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // From glibc's <malloc.h>.
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // glibc refuses a threshold above its maximum (32 MiB on 64-bit), so ask for exactly
        // that; blocks larger still are mmapped as before.
        const MMAP_THRESHOLD_MAX: i32 = 32 << 20;
        // SAFETY: mallopt only changes allocator parameters; called before any threads start.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX);
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}
