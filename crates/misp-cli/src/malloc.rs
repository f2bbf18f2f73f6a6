//! glibc malloc settings for tensor work.
//!
//! candle allocates a fresh buffer for every op's output and frees it soon after. glibc serves
//! blocks above its mmap threshold (128 KiB at start, raised adaptively only up to 32 MiB) with
//! fresh `mmap`s and returns them to the kernel on free, so every large activation costs page
//! faults and kernel page clearing on first touch: 8-18 % of a training step and of CLIP
//! inference in `perf`. Serving them from the heap and never trimming it lets freed buffers be
//! reused as they are. The price is that the heap keeps its high-water mark until exit, which
//! the peak RSS already had to allow.
//!
//! glibc caps the mmap threshold at 32 MiB, and a 7B-width step's activations are larger (an
//! `[5 x 700, 11008]` f32 tensor is 147 MiB; a layer's attention scores 63 MiB per sequence):
//! those kept their own fresh mappings. Turning mmap off altogether serves them from the heap
//! too. On the 7B-width slice (2 steps, generic kernels, bf16) that cut minor page faults from
//! 12.8 M to 1.0 M and kernel time from 31.5 s to 4.6 s of 372 s CPU, with the same peak RSS
//! (3.71 vs 3.77 GB).

/// Keeps freed blocks, however large, in the heap for reuse (glibc only; a no-op elsewhere). With
/// `MISP_RETURN_FREED_MEMORY` set, does the opposite: blocks from 64 KiB up are mapped and
/// unmapped one by one (a fixed threshold, which also stops glibc from raising it), and the
/// heap is trimmed, so that the resident size follows the bytes alive. Slower; it is how the
/// memory model's predictions are checked against measured peaks (`misp bench memory`).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // From glibc's <malloc.h>.
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        const M_MMAP_MAX: i32 = -4;
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // glibc refuses a threshold above its maximum (32 MiB on 64-bit), so ask for exactly
        // that; blocks larger still are mmapped as before.
        const MMAP_THRESHOLD_MAX: i32 = 32 << 20;
        let returning = std::env::var_os("MISP_RETURN_FREED_MEMORY").is_some();
        let (mmap, trim) = if returning {
            (64 << 10, 128 << 10)
        } else {
            (MMAP_THRESHOLD_MAX, i32::MAX)
        };
        // SAFETY: mallopt only changes allocator parameters; called before any threads start.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, mmap);
            mallopt(M_TRIM_THRESHOLD, trim);
            if !returning {
                // No mappings at all: blocks above the 32 MiB cap come from the heap as well.
                mallopt(M_MMAP_MAX, 0);
            }
        }
    }
}
