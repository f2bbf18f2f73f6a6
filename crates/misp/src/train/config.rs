//! `RUN.toml`: every knob of a training run, flat, with the paper's settings where it gives them
//! and misp's own otherwise (docs/design.md §9.2). A variant of the paper is a file under `configs/`, never a code path.
//!
//! Unknown keys are errors that name them (a typo must not silently train the default), and
//! `--set key=value` overrides are parsed as TOML values and checked the same way.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::model::lora::LoraConfig;
use crate::objective::{Estimator, ObjectiveConfig};

/// Where a record's negative images come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NegativeSource {
    /// The negatives file of `misp mine` (`--negatives`).
    File,
    /// mDPO: one random resized crop of the positive, made here (no mining needed).
    Crop,
    /// CHiP: the positive under forward-diffusion noise, made here.
    Noise,
    /// No image term (text-only DPO).
    None,
}

/// What to do with a record that has no usable negative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MissingNegatives {
    /// Train it on the text (and anchor) terms; its image term is 0.
    Text,
    /// Leave it out of training (counted in the report).
    Skip,
}

/// The resolved settings of one run (written to `OUT/config.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// A name for reports (`misp`, `dpo`, ...).
    pub variant: String,
    /// DPO temperature.
    pub beta: f64,
    /// Weight of the image term (Eq. 6).
    pub image_weight: f64,
    /// `lambda` of Eq. 10: weight of the text term.
    pub lambda: f64,
    /// Weight of mDPO's anchor term.
    pub anchor_weight: f64,
    /// Eq. 8's importance-sampling gradient (with the negatives' `q`); off = exact gradient.
    pub importance_sampling: bool,
    /// Negatives used per record (the first `k` of the file's list).
    pub k: usize,
    pub negatives: NegativeSource,
    /// Strategies the negatives file must hold (empty: any); guards against training a
    /// variant on another variant's negatives.
    pub expect_strategies: Vec<String>,
    pub missing_negatives: MissingNegatives,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f32,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_ratio: f64,
    pub max_grad_norm: f64,
    pub epochs: usize,
    /// Records per optimiser step (effective batch).
    pub batch_size: usize,
    /// Records per forward (their K + 2 sequences go in one batch); gradients accumulate
    /// over `batch_size / micro_batch_size` forwards.
    pub micro_batch_size: usize,
    pub seed: u64,
    /// Optimiser steps between checkpoints (0: only at the end and on Ctrl-C).
    pub checkpoint_every: usize,
    /// Checkpoints kept (older ones are removed).
    pub keep_checkpoints: usize,
    /// Weights' dtype: `f32`, `bf16` (what a 7B run uses) or `f16`. LoRA and its optimiser
    /// state stay `f32`.
    pub dtype: String,
    pub pad_to_square: bool,
    /// Train on at most this many records (0: all), for quick runs.
    pub max_records: usize,
    /// Stop after this many optimiser steps (0: run all epochs).
    pub max_steps: usize,
    /// Memory (docs/design.md §4.7); none changes the gradient. Keep each decoder layer's
    /// input only and recompute the layer in the backward.
    pub gradient_checkpointing: bool,
    /// Sequences per backward piece (0: a micro-batch's sequences in one batched graph).
    pub sequence_group: usize,
    /// Scored response rows per piece of the head's gradient (0: all at once).
    pub logprob_chunk: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            variant: "misp".into(),
            beta: 0.5,
            image_weight: 1.0,
            lambda: 1.0,
            anchor_weight: 0.0,
            importance_sampling: true,
            k: 3,
            negatives: NegativeSource::File,
            expect_strategies: Vec::new(),
            missing_negatives: MissingNegatives::Text,
            lora_r: 64,
            lora_alpha: 128.0,
            lora_dropout: 0.05,
            lr: 1e-5,
            weight_decay: 0.05,
            warmup_ratio: 0.1,
            max_grad_norm: 1.0,
            epochs: 3,
            batch_size: 32,
            micro_batch_size: 4,
            seed: 0,
            checkpoint_every: 50,
            keep_checkpoints: 2,
            dtype: "f32".into(),
            pad_to_square: false,
            max_records: 0,
            max_steps: 0,
            gradient_checkpointing: false,
            sequence_group: 0,
            logprob_chunk: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("--set {arg}: {message}")]
    Set { arg: String, message: String },
    #[error("config field `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

impl TrainConfig {
    /// Reads `path` (if given) and applies `--set key=value` overrides in order.
    pub fn load(path: Option<&Path>, sets: &[String]) -> Result<Self, ConfigError> {
        let mut table = match path {
            None => toml::Table::new(),
            Some(p) => {
                let shown = p.display().to_string();
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError::File {
                    path: shown.clone(),
                    message: e.to_string(),
                })?;
                let table: toml::Table =
                    text.parse()
                        .map_err(|e: toml::de::Error| ConfigError::File {
                            path: shown.clone(),
                            message: e.to_string(),
                        })?;
                // Deserialise once alone so unknown keys are blamed on the file.
                Self::from_table(&table).map_err(|message| ConfigError::File {
                    path: shown,
                    message,
                })?;
                table
            }
        };
        for arg in sets {
            let bad = |message: String| ConfigError::Set {
                arg: arg.clone(),
                message,
            };
            let (key, value) = arg
                .split_once('=')
                .ok_or_else(|| bad("expected key=value".into()))?;
            let key = key.trim();
            // A value that is not valid TOML is taken as a bare string (`--set variant=mine`).
            let parsed: toml::Table = format!("v = {value}").parse().unwrap_or_else(|_| {
                let mut t = toml::Table::new();
                t.insert("v".into(), toml::Value::String(value.to_owned()));
                t
            });
            let mut value = parsed["v"].clone();
            // `--set lr=1` means 1.0 for a float field.
            if let (Some(toml::Value::Float(_)), toml::Value::Integer(i)) =
                (Self::default_table().get(key), &value)
            {
                value = toml::Value::Float(*i as f64);
            }
            table.insert(key.to_owned(), value);
            Self::from_table(&table).map_err(bad)?;
        }
        let cfg = Self::from_table(&table).map_err(|message| ConfigError::File {
            path: "config".into(),
            message,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn default_table() -> toml::Table {
        toml::Table::try_from(Self::default()).unwrap_or_default()
    }

    fn from_table(table: &toml::Table) -> Result<Self, String> {
        let mut merged = Self::default_table();
        for (k, v) in table {
            let v = match (merged.get(k), v) {
                (Some(toml::Value::Float(_)), toml::Value::Integer(i)) => {
                    toml::Value::Float(*i as f64)
                }
                _ => v.clone(),
            };
            merged.insert(k.clone(), v);
        }
        Self::deserialize(merged).map_err(|e| e.to_string())
    }

    /// Range checks, with the field named: every float finite and of the sign it can take,
    /// every count in range, and the combinations that cannot train refused.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &'static str, message: &str| {
            Err(ConfigError::Invalid {
                field,
                message: message.into(),
            })
        };
        // (field, value, lower bound, whether the bound itself is allowed)
        let floats: [(&'static str, f64, f64, bool); 8] = [
            ("beta", self.beta, 0.0, false),
            ("image_weight", self.image_weight, 0.0, true),
            ("lambda", self.lambda, 0.0, true),
            ("anchor_weight", self.anchor_weight, 0.0, true),
            ("lora_alpha", self.lora_alpha, 0.0, false),
            ("lr", self.lr, 0.0, false),
            ("weight_decay", self.weight_decay, 0.0, true),
            // 0 turns clipping off.
            ("max_grad_norm", self.max_grad_norm, 0.0, true),
        ];
        for (field, v, low, inclusive) in floats {
            if !v.is_finite() {
                return bad(field, &format!("must be a finite number, got {v}"));
            }
            if v < low || (!inclusive && v == low) {
                let op = if inclusive { ">=" } else { ">" };
                return bad(field, &format!("must be {op} {low}, got {v}"));
            }
        }
        if self.batch_size == 0 || self.micro_batch_size == 0 {
            return bad("batch_size", "batch_size and micro_batch_size must be >= 1");
        }
        if self.micro_batch_size > self.batch_size {
            return bad("micro_batch_size", "must not exceed batch_size");
        }
        if self.lora_r == 0 {
            return bad("lora_r", "must be >= 1");
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad("lora_dropout", "must be in [0, 1)");
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return bad("warmup_ratio", "must be in [0, 1]");
        }
        if self.epochs == 0 {
            return bad("epochs", "must be >= 1");
        }
        if self.keep_checkpoints == 0 {
            return bad(
                "keep_checkpoints",
                "must be >= 1 (the last checkpoint is what --resume reads)",
            );
        }
        if !matches!(self.dtype.as_str(), "f32" | "bf16" | "f16") {
            return bad("dtype", "must be f32, bf16 or f16");
        }
        if self.negatives != NegativeSource::None && self.image_weight > 0.0 && self.k == 0 {
            return bad("k", "must be >= 1 when the image term is on");
        }
        if matches!(self.negatives, NegativeSource::Crop | NegativeSource::Noise) && self.k != 1 {
            return bad(
                "k",
                "synthetic crop / noise negatives give one per record: set k = 1",
            );
        }
        if self.image_weight == 0.0 && self.lambda == 0.0 && self.anchor_weight == 0.0 {
            return bad(
                "lambda",
                "image_weight, lambda and anchor_weight are all 0: nothing to train",
            );
        }
        Ok(())
    }

    /// The base weights' dtype.
    pub fn weights_dtype(&self) -> candle_core::DType {
        match self.dtype.as_str() {
            "bf16" => candle_core::DType::BF16,
            "f16" => candle_core::DType::F16,
            _ => candle_core::DType::F32,
        }
    }

    /// Whether the run uses an image term at all.
    pub fn uses_images(&self) -> bool {
        self.negatives != NegativeSource::None && self.image_weight > 0.0
    }

    pub fn objective(&self) -> ObjectiveConfig {
        ObjectiveConfig {
            beta: self.beta,
            image_weight: if self.uses_images() {
                self.image_weight
            } else {
                0.0
            },
            lambda: self.lambda,
            anchor_weight: self.anchor_weight,
            estimator: if self.importance_sampling {
                Estimator::ImportanceSampling
            } else {
                Estimator::Exact
            },
        }
    }

    /// The memory settings of a micro-batch's gradient.
    pub fn memory(&self) -> crate::train::step::MemoryOptions {
        crate::train::step::MemoryOptions {
            gradient_checkpointing: self.gradient_checkpointing,
            sequence_group: self.sequence_group,
            logprob_chunk: self.logprob_chunk,
        }
    }

    pub fn lora(&self) -> LoraConfig {
        LoraConfig {
            r: self.lora_r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            ..LoraConfig::default()
        }
    }

    /// The TOML text of this config (`OUT/config.toml`).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("misp-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn defaults_are_the_papers_and_documented_own_choices() {
        let c = TrainConfig::load(None, &[]).unwrap();
        // The paper's (its training details): beta, lambda, K, lr, LoRA r / alpha, batch 32.
        assert_eq!((c.beta, c.lambda, c.k, c.lr), (0.5, 1.0, 3, 1e-5));
        assert_eq!((c.lora_r, c.lora_alpha, c.batch_size), (64, 128.0, 32));
        // misp's own (docs/design.md §9.2): epochs, decay, warmup, clipping.
        assert_eq!(c.epochs, 3);
        assert_eq!(
            (c.weight_decay, c.warmup_ratio, c.max_grad_norm),
            (0.05, 0.1, 1.0)
        );
    }

    #[test]
    fn file_then_sets_override_and_round_trip() {
        let p = write(
            "a.toml",
            "variant = \"dpo\"\nnegatives = \"none\"\nlr = 2e-5\n",
        );
        let c = TrainConfig::load(
            Some(&p),
            &["lr=1".into(), "k=5".into(), "variant=mine".into()],
        )
        .unwrap();
        assert_eq!((c.variant.as_str(), c.lr, c.k), ("mine", 1.0, 5));
        assert_eq!(c.negatives, NegativeSource::None);
        let again = write("b.toml", &c.to_toml());
        assert_eq!(TrainConfig::load(Some(&again), &[]).unwrap(), c);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let p = write("c.toml", "betta = 0.1\n");
        let e = TrainConfig::load(Some(&p), &[]).unwrap_err().to_string();
        assert!(e.contains("betta") && e.contains("c.toml"), "{e}");
        let e = TrainConfig::load(None, &["lrr=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("lrr"), "{e}");
        let e = TrainConfig::load(None, &["beta=-1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("beta"), "{e}");
        for set in [
            "lr=nan",
            "lr=inf",
            "lr=-1e-5",
            "lr=0",
            "lambda=-1",
            "lora_alpha=-2",
            "weight_decay=-0.1",
            "max_grad_norm=-1",
            "beta=nan",
            "image_weight=inf",
            "anchor_weight=-1",
        ] {
            let key = set.split('=').next().unwrap();
            let e = TrainConfig::load(None, &[set.into()])
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("`{key}`")), "{set}: {e}");
        }
        let e = TrainConfig::load(None, &["negatives=\"crop\"".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("k"), "{e}");
    }
}
