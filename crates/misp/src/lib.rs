//! `misp`: MISP-DPO, multi-negative multimodal Direct Preference Optimization with
//! importance sampling over negatives mined by a CLIP + sparse-autoencoder sampler.
//!
//! This library holds the method and the models; the `misp` binary (crate `misp-cli`) only
//! parses arguments and calls in here. Modules follow the pipeline of docs/design.md §1:
//!
//! | stage | module | reads -> writes |
//! |---|---|---|
//! | embed | [`data`] | RLHF-V parquet, TRL JSONL, mDPO JSON, image folders / COCO -> records |
//! | embed | [`embed`] | images + prompts -> CLIP embedding stores, resumable and shardable |
//! | embed / sae / mine | [`embeddings`] | pool and record stores (safetensors + ids.jsonl + meta.json) |
//! | sae, mine | [`sae`] | CLIP embeddings -> SAE checkpoint; per-candidate reconstruction error and L1 (Eq. 11-12) |
//! | mine | [`mine`] | embeddings + SAE -> negatives JSONL (Eq. 12, Algorithm 1) |
//! | train | [`objective`] | sequence log-probs -> loss, gradient, metrics (Eq. 6-10) |
//! | train | [`train`], [`optim`] | model + records + negatives -> LoRA adapter (PEFT layout), metrics, checkpoints |
//! | score / eval | [`infer`] | JSONL rows -> log-probs or generations through [`model::vlm::Vlm`] |
//! | eval | [`eval`] | answers / captions (from a caller's generator) -> POPE and CHAIR metrics + audit files |
//! | serve | [`serve`] | a checkpoint (+ adapter) -> an OpenAI-compatible chat API over HTTP, batched |
//! | world | [`world`] | seed + config -> ShapesWorld: images, scene graphs, SFT text, preference records, pool, POPE, CHAIR |
//! | world | [`pretrain`] | world -> tiny CLIP (contrastive) and LLaVA (SFT) in HF layouts + base-model POPE / CHAIR |
//! | demo | [`demo`], [`report`] | every stage on ShapesWorld -> report, results, PNG charts |
//!
//! Under the stages: [`model`] (CLIP, LLaMA, LLaVA, LoRA, PEFT adapters, each in its HF
//! layout), [`checkpoint`] (config.json, safetensors, the models' error type) and [`kernels`]
//! (CPU kernels with written-out backward passes), in that order of dependency: a model uses
//! checkpoints and kernels, never the reverse. [`files`] (atomic writes, JSON Lines, stable
//! per-record seeds) and [`progress`] serve every stage.

pub mod checkpoint;
pub mod data;
pub mod demo;
pub mod device;
pub mod embed;
pub mod embeddings;
pub mod eval;
pub mod files;
pub mod infer;
pub mod kernels;
pub mod mine;
pub mod model;
pub mod objective;
pub mod optim;
pub mod pretrain;
pub mod progress;
pub mod report;
pub mod rss;
pub mod sae;
pub mod serve;
pub mod train;
pub mod world;
