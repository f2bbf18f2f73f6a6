//! Stage 2: MISP-DPO training of a LoRA adapter on a LLaVA or Qwen2.5-VL checkpoint (Eq. 6-10 of the paper,
//! docs/design.md §3), and every baseline of the paper as a config ([`config::TrainConfig`]).
//!
//! | module | does |
//! |---|---|
//! | [`config`] | `RUN.toml` + `--set` overrides, validated, paper defaults |
//! | [`data`] | records + negatives file + pool ids -> tokenised [`data::TrainItem`]s, pixels |
//! | [`reference`] | `pi_ref` computed once (LoRA off) and cached on disk under a content hash |
//! | [`step`] | one micro-batch: `K + 2` sequences per record, the objective, the gradient (batched or in pieces) |
//! | [`memory`] | the predicted memory of one step, from a model config |
//! | [`run`] | epochs, accumulation, AdamW, clipping, schedule, checkpoints, resume, metrics, report |

pub mod config;
pub mod data;
pub mod memory;
pub mod reference;
pub mod report;
pub mod run;
pub mod step;

pub use config::{ConfigError, TrainConfig};
pub use run::{train, TrainInputs};

use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::model::ModelError;

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: u64,
    pub records: usize,
    pub skipped: usize,
    pub refused_steps: usize,
    /// Wall seconds of each epoch this process ran (a resumed epoch counts from the resume).
    pub epoch_seconds: Vec<f64>,
    pub seconds: f64,
    /// The metrics rows written by this process.
    pub metrics: Vec<Map<String, Value>>,
    pub adapter: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Objective(#[from] crate::objective::ObjectiveError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("interrupted: checkpoint written at step {step}; continue with --resume")]
    Interrupted { step: u64 },
    #[error("the training step ran out of memory ({cause}); settings that reduce it: {hint} (README: \"GPUs, devices and memory\"; `misp bench memory` predicts the peak)")]
    OutOfMemory { cause: String, hint: String },
    #[error("every one of the {steps} steps was refused (non-finite loss, gradient or update; reasons in {}); no adapter written", metrics.display())]
    AllRefused { steps: u64, metrics: PathBuf },
}
