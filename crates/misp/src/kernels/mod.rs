//! CPU kernels under the models: the layer of misp that candle-nn is to candle-transformers.
//! Nothing here knows a model or a checkpoint; the models in [`crate::model`] call these
//! functions and nothing in here calls back up.
//!
//! Why they exist: candle 0.11.1's own fused softmax / norm / RoPE ops drop gradients, and its
//! autograd over the plain composition gives every graph node a zero-filled gradient buffer,
//! which on two cores cost more than the matmuls of a LoRA step. Each kernel here is one node
//! with its backward written out, running on the `gemm` crate directly. Every entry point runs
//! the plain candle composition instead where it has no kernel (another device, another dtype),
//! and the tests compare each kernel with that composition, so the composition is the
//! reference and the CUDA build keeps working.
//!
//! The interface:
//! - element-wise and row-wise ops with backward: [`rms_norm`], [`swiglu`],
//!   [`scaled_softmax`]; inference-only: [`layer_norm_no_grad`], [`quick_gelu_no_grad`];
//! - [`linear`] / [`Linear`]: `nn.Linear` whose frozen weight gets no gradient; [`matmul`]:
//!   a batched matmul whose bf16 CPU products take the bf16 kernel (attention's on the
//!   generic path);
//! - LLaMA's causal attention core from `q, k, v` to merged heads ([`attention`]), CLIP's
//!   bidirectional attention at inference ([`encoder_attention`]);
//! - LoRA's training step and its dropout masks ([`lora_step`] on the CPU, [`lora_branch`]
//!   from candle ops for every device and dtype);
//! - [`fusable`]: whether a tensor runs on a kernel here (CPU, `f32` / `f64`, [`Kernels::Fused`]
//!   in force); [`set_kernels`] / [`with_kernels`] choose the generic composition instead.
//!
//! Inside: [`real`] (float types, vectorised `exp`, run-time AVX-512 / AVX2 dispatch),
//! [`op`] (the custom-op skeleton and the parallel loops, written once), [`gemm`] (products on
//! the `gemm` crate without zero-filled buffers), [`bf16_gemm`] (bf16 products on the CPU's
//! AVX-512 BF16 dot-product instruction, with run-time dispatch; the frozen weights of a bf16
//! model run on it).

pub(crate) mod attention;
pub mod bf16_gemm;
mod bf16_matmul;
mod elementwise;
pub(crate) mod encoder_attention;
pub(crate) mod gemm;
mod linear;
pub(crate) mod lora_branch;
pub(crate) mod lora_step;
mod op;
pub(crate) mod real;
#[cfg(test)]
pub(crate) mod testing;

pub use bf16_matmul::matmul;
pub(crate) use elementwise::rope_data;
pub use elementwise::{layer_norm_no_grad, quick_gelu_no_grad, rms_norm, scaled_softmax, swiglu};
pub use linear::{input_grad, linear, Linear};
pub(crate) use real::vectorised;
pub use real::{exp_f32, fusable, kernels, set_kernels, with_kernels, Kernels, ThreadKernels};
