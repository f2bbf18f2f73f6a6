//! `misp`: MISP-DPO, multi-negative multimodal Direct Preference Optimization with
//! importance sampling over negatives mined by a CLIP + sparse-autoencoder sampler.
//!
//! This library holds the method and the models; the `misp` binary (crate `misp-cli`) only
//! parses arguments and calls in here. Modules follow the pipeline of DESIGN.md §1:
//!
//! | stage | module | reads -> writes |
//! |---|---|---|
//! | embed | [`data`] | RLHF-V parquet, TRL JSONL, mDPO JSON, image folders / COCO -> records |
//! | embed | [`embed`], [`model`] | images + prompts -> CLIP embeddings |
//! | embed / sae / mine | [`embeddings`] | pool and record stores (safetensors + ids.jsonl + meta.json) |
//! | mine | [`mine`] | embeddings + SAE -> negatives JSONL (Eq. 12, Algorithm 1) |
//! | sae, mine | [`sae`] | CLIP embeddings -> SAE checkpoint; per-candidate reconstruction error and L1 (Eq. 11-12) |
//! | train | [`objective`] | sequence log-probs -> loss, gradient, metrics (Eq. 6-10) |
//! | all | [`files`] | atomic writes, JSON Lines, stable per-record seeds |
//!
//! Later stages (train, eval, world) arrive as modules of their own.

pub mod data;
pub mod embed;
pub mod embeddings;
pub mod files;
pub mod mine;
pub mod model;
pub mod objective;
pub mod sae;
