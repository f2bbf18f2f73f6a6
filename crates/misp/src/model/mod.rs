//! Models in their Hugging Face layouts, written on candle: the CLIP towers (stage 0's
//! embedder and LLaVA's vision tower) and, later, LLaVA itself.
//!
//! Each module mirrors its checkpoint's key tree, so a missing tensor names its own path.

pub mod clip;

pub use clip::ModelError;
pub mod llama;
pub mod lora;
