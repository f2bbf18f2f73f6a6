//! Qwen2.5-VL as transformers' `Qwen2_5_VLForConditionalGeneration`: the image processor
//! ([`image_processor`]), the vision tower ([`vision`]) and the Qwen2 language model with
//! multimodal RoPE (misp's [`crate::model::llama::Llama`] with q/k/v biases and per-row RoPE
//! tables).

pub mod image_processor;
