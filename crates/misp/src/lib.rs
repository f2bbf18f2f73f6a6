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
//! | world | [`world`] | seed + config -> ShapesWorld: images, scene graphs, SFT text, preference records, pool, POPE, CHAIR |
//! | world | [`pretrain`] | world -> tiny CLIP (contrastive) and LLaVA (SFT) in HF layouts + base-model POPE / CHAIR |
//! | eval | [`eval`] | answers / captions (from a caller's generator) -> POPE and CHAIR metrics + audit files |
//! | eval | [`report`] | metrics -> PNG charts (bar, line) with a built-in bitmap font |
//! | all | [`files`] | atomic writes, JSON Lines, stable per-record seeds |
//!
//! Later stages (train) arrive as modules of their own.

pub mod data;
pub mod demo;
pub mod embed;
pub mod embeddings;
pub mod eval;
pub mod files;
pub mod infer;
pub mod mine;
pub mod model;
pub mod objective;
pub mod optim;
pub mod pretrain;
pub mod progress;
pub mod report;
pub mod sae;
pub mod train;
pub mod world;
