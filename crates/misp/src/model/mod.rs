//! The models, each in its Hugging Face layout and written on candle: CLIP (stage 0's embedder
//! and LLaVA's vision tower) with its tokenizer and image processor, LLaMA, LLaVA-1.5 with its
//! processor, LoRA and PEFT adapters, greedy generation, and [`vlm::Vlm`], the one handle the
//! commands score and generate with.
//!
//! Each model file mirrors its checkpoint's key tree, so a missing tensor names its own path.
//! Below the models sit [`crate::kernels`] (CPU kernels) and [`crate::checkpoint`]
//! (config.json, safetensors, the shared error type); nothing here is imported by them.

pub mod adapter;
pub mod clip;
pub mod generate;
pub mod llama;
pub mod llava;
pub mod lora;
pub mod qwen2_5_vl;
pub mod resample;
pub mod vlm;

pub use crate::checkpoint::ModelError;
