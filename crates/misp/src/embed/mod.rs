//! Stage 0, embed: CLIP embeddings of an image pool and of preference records, written as the
//! stores of [`crate::embeddings`] (`misp embed pool`, `misp embed records`).
//!
//! The driver ([`embed_pool`], [`embed_records`]) reads datasets through [`crate::data`], turns image bytes into pixels with
//! [`crate::model::clip::image_processor`], runs [`crate::model::clip`], and writes resumable, shardable part files that it merges into the
//! store when all are done.

mod run;
pub mod safetensors_stream;

pub use run::{embed_pool, embed_records, EmbedConfig, EmbedError, EmbedReport, Embedder};
