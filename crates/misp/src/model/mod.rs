//! Models in their Hugging Face layouts, written on candle: the CLIP towers (stage 0's
//! embedder and LLaVA's vision tower) and, later, LLaVA itself.
//!
//! Each module mirrors its checkpoint's key tree, so a missing tensor names its own path.

pub mod adapter;
mod attention;
pub mod clip;
mod encoder_attention;

pub use clip::ModelError;
pub mod fused;
mod gemm;
pub mod generate;
pub mod linear;
pub mod llama;
pub mod llava;
pub mod lora;
pub mod processor;
pub mod vlm;

/// Reads `dir/config.json` (an HF model config) into `T`; returns it with the file's path for
/// later error messages. Errors name the file.
pub(crate) fn read_config<T: serde::de::DeserializeOwned>(
    dir: &std::path::Path,
) -> Result<(T, std::path::PathBuf), ModelError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    let cfg = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.clone(),
        source,
    })?;
    Ok((cfg, path))
}
