//! Stage 0, embed: CLIP embeddings of an image pool and of preference records, written as the
//! stores of [`crate::embeddings`] (`misp embed pool`, `misp embed records`).
//!
//! [`preprocess`] turns image bytes into CLIP pixel tensors as `CLIPImageProcessor` does;
//! the driver ([`embed_pool`], [`embed_records`]) reads datasets through [`crate::data`], runs
//! [`crate::model::clip`], and writes resumable, shardable part files that it merges into the
//! store when all are done.

pub mod preprocess;
mod run;
pub mod safetensors_stream;

pub use run::{embed_pool, embed_records, EmbedConfig, EmbedError, EmbedReport, Embedder};
