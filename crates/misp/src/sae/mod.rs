//! The sparse autoencoder of paper Eq. 11 on rank-one difference vectors, never materialised.
//!
//! Stages: sae (`misp sae train` calls [`train`]) and mine (`misp mine` loads a [`Sae`] and calls
//! [`Sae::encode_candidates`] for the reconstruction error and `||z||_1` of Eq. 12).
//! Reads CLIP embeddings handed over as `f32` slices (no file formats of the embed stage here);
//! writes an SAE checkpoint folder (`model.safetensors` + `config.json`) and, when training,
//! `metrics.jsonl` and the resume state `train_state.safetensors` + `train_state.json`.
//!
//! Notation (docs/design.md §2): `d` the CLIP dimension, `H` the hidden size, `t` the prompt
//! embedding, `p` the positive image, `v_i` a candidate image. The SAE input of candidate `i` is
//! `x_i = vec(u_i t^T)` (row-major: index `a*d + c` holds `u[a] * t[c]`) with
//! `u_i = s * (p - v_i)` and `s` the input scale of [`SaeConfig::input_scale`]. It has `d^2`
//! entries (590k at `d = 768`) but rank one, so nothing here ever builds it except
//! [`dense_reference`], the oracle of the tests and of `misp bench mine`.
//!
//! Parameters are kept as `d x d` matrices: the encoder row `j` reshaped is `E_j`, the decoder
//! column `j` reshaped is `D_j`, the decoder bias reshaped is `B`. Then
//! `(W_e x)_j = u^T E_j t`, and with `G = W_d^T W_d`, `g = W_d^T b_d`, `P_ij = u_i^T D_j t`:
//!
//! ```text
//! z_i = sigmoid(U A^T + b_e)_i                     A = [E_j t]_j   (H x d, once per prompt)
//! ||x_i - x_hat_i||^2 = ||u_i||^2 ||t||^2 - 2 z_i . P_i - 2 u_i^T B t
//!                       + z_i^T G z_i + 2 z_i . g + ||b_d||^2,   P = U C^T, C = [D_j t]_j
//! ```
//!
//! so one prompt against `N` candidates costs one `N x d x (2H + 1)` GEMM plus `N x H x H`.
//! The scalar terms are summed in `f64` (the expansion cancels when the reconstruction is good).
//!
//! Everything runs on the CPU device; the tensors are `f32`, or `f64` for reference checks
//! ([`Sae::to_dtype`]).

mod data;
pub mod dense_reference;
mod factor;
mod io;
mod train;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

pub use data::TrainingSet;
pub use factor::{firing_threshold, BatchLoss, Gradients};
pub use train::{
    bench_epoch, train, EpochMetrics, SaeTrainConfig, TrainingSummary, HISTOGRAM_EDGES, LR_TIMES_D,
};

use factor::{DecoderGram, Params};

/// Rows of candidates processed per GEMM by [`Sae::encode_candidates`]: 4096 rows of a `d = 768`
/// pool are 12 MiB of `u` and 4 MiB of projections, far inside the 256 MiB scoring budget.
pub const DEFAULT_CHUNK_ROWS: usize = 4096;

/// Errors of the SAE stage. File errors name the file, and tensor errors the tensor; input
/// errors name the field and row so the caller can point at the record.
#[derive(Debug, thiserror::Error)]
pub enum SaeError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: cannot read or write safetensors: {source}", path.display())]
    Safetensors {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("{}: tensor `{name}` is missing", path.display())]
    MissingTensor { path: PathBuf, name: String },
    #[error("{}: tensor `{name}` has shape {got:?}, expected {expected:?}", path.display())]
    TensorShape {
        path: PathBuf,
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{}: tensor `{name}` holds NaN or infinite values", path.display())]
    NonFiniteTensor { path: PathBuf, name: String },
    #[error("{}: format version {got} is not supported (this build reads version {supported})", path.display())]
    Format {
        path: PathBuf,
        got: u32,
        supported: u32,
    },
    #[error("invalid SAE config: `{field}` {problem}")]
    Config {
        field: &'static str,
        problem: String,
    },
    #[error("{}: `{field}` {problem}", path.display())]
    BadConfigFile {
        path: PathBuf,
        field: &'static str,
        problem: String,
    },
    #[error("input `{field}` has {got} values, expected {expected}")]
    InputLength {
        field: &'static str,
        got: usize,
        expected: String,
    },
    #[error("input `{field}` row {row} holds a NaN or infinite value")]
    NonFiniteInput { field: &'static str, row: usize },
    #[error(
        "training data: record {record} names candidate row {index}, but the pool has {pool} rows"
    )]
    CandidateIndex {
        record: usize,
        index: u32,
        pool: usize,
    },
    #[error("training data: {0}")]
    Data(String),
    #[error("training diverged: non-finite {what} at epoch {epoch}, step {step}; the checkpoint of the previous epoch is left as it was")]
    Diverged {
        what: &'static str,
        epoch: usize,
        step: usize,
    },
    #[error("{}: cannot resume: {reason}", path.display())]
    ResumeMismatch { path: PathBuf, reason: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, SaeError>;

/// The SAE's hyper-parameters and provenance; `config.json` of a checkpoint folder (which also
/// carries a `format` version).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaeConfig {
    /// CLIP embedding dimension `d` (the SAE input has `d^2` entries).
    pub d: usize,
    /// Number of latents `H` (docs/design.md §2: 128).
    pub hidden: usize,
    /// Weight `gamma` of the sparsity term of Eq. 11 (1).
    pub gamma: f64,
    /// Target mean activation `rho` of every latent (0.05; the paper gives none).
    pub rho: f64,
    /// `s` in `u = s * (p - v)`, fixed at training start so that the mean `||x||^2` over the
    /// training pairs is 1 (see [`train`]).
    pub input_scale: f64,
    /// Whether the CLIP embeddings were L2-normalised; the miner must feed the same kind.
    pub normalized: bool,
    /// The CLIP model whose embeddings the SAE was trained on; the miner refuses others.
    pub clip_model: String,
}

impl SaeConfig {
    /// The docs/design.md defaults (`H = 128`, `gamma = 1`, `rho = 0.05`, scale 1) for embeddings of
    /// dimension `d` from `clip_model`.
    pub fn for_embeddings(d: usize, clip_model: impl Into<String>, normalized: bool) -> Self {
        Self {
            d,
            hidden: 128,
            gamma: 1.0,
            rho: 0.05,
            input_scale: 1.0,
            normalized,
            clip_model: clip_model.into(),
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |field, problem: &str| {
            Err(SaeError::Config {
                field,
                problem: problem.to_string(),
            })
        };
        if self.d == 0 {
            return bad("d", "must be positive");
        }
        if self.hidden == 0 {
            return bad("hidden", "must be positive");
        }
        if !(self.rho > 0.0 && self.rho < 1.0) {
            return bad("rho", &format!("is {}, must lie in (0, 1)", self.rho));
        }
        if !(self.gamma.is_finite() && self.gamma >= 0.0) {
            return bad(
                "gamma",
                &format!("is {}, must be finite and >= 0", self.gamma),
            );
        }
        if !(self.input_scale.is_finite() && self.input_scale > 0.0) {
            return bad(
                "input_scale",
                &format!("is {}, must be finite and > 0", self.input_scale),
            );
        }
        Ok(())
    }
}

/// A sparse autoencoder with sigmoid latents (Eq. 11), held in factorised form.
pub struct Sae {
    pub config: SaeConfig,
    /// How `misp sae train` left it (held-out FVU, epoch, stopping reason); `None` for an SAE
    /// made otherwise.
    pub training: Option<TrainingSummary>,
    params: Params,
    /// `G`, `g` and `||b_d||^2`, fixed for a given decoder: computed once at construction.
    gram: DecoderGram,
}

impl std::fmt::Debug for Sae {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sae")
            .field("config", &self.config)
            .field("dtype", &self.dtype())
            .finish_non_exhaustive()
    }
}

/// Per-candidate outputs of the factorised encoder and decoder for one record.
#[derive(Debug, Clone, PartialEq)]
pub struct CandidateCodes {
    /// `||x_i - x_hat_i||^2`, the reconstruction error of Eq. 12's first term.
    pub recon: Vec<f64>,
    /// `||z_i||_1 = sum_j z_ij` (sigmoid codes are positive), Eq. 12's second term.
    pub l1: Vec<f64>,
    /// The codes `z`, `N x H` row-major.
    pub z: Vec<f32>,
    /// `H`, the row length of `z`.
    pub hidden: usize,
}

impl Sae {
    /// A fresh `f32` SAE, seeded (`StdRng::seed_from_u64(seed)`): encoder entries drawn
    /// `U(-1/d, 1/d)` (PyTorch's `nn.Linear` default, `1/sqrt(fan_in)` with `fan_in = d^2`),
    /// then decoder entries from the same law in the internal `[H, d, d]` order, `b_d = 0`, and
    /// `b_e = logit(rho)` so that every latent starts at the target activation: the KL term
    /// starts near 0 and the first steps fit the reconstruction instead of pushing all `H`
    /// latents down from 0.5. With unit-mean `||x||^2` (the input scale), the initial encoder
    /// pre-activations are `O(1/d)` and the initial `||x_hat||^2 ~ rho^2 H / 3`.
    pub fn init(config: SaeConfig, seed: u64) -> Result<Sae> {
        config.validate()?;
        let (d, h) = (config.d, config.hidden);
        let mut rng = StdRng::seed_from_u64(seed);
        let bound = 1.0 / d as f32;
        let mut draw =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-bound..bound)).collect() };
        let encoder = Tensor::from_vec(draw(h * d * d), (h, d, d), &Device::Cpu)?;
        let decoder = Tensor::from_vec(draw(h * d * d), (h, d, d), &Device::Cpu)?;
        let logit_rho = (config.rho / (1.0 - config.rho)).ln() as f32;
        let params = Params {
            encoder,
            encoder_bias: Tensor::full(logit_rho, h, &Device::Cpu)?,
            decoder,
            decoder_bias: Tensor::zeros((d, d), DType::F32, &Device::Cpu)?,
        };
        Sae::from_params(config, params)
    }

    /// Builds the SAE around checked parameters and computes the decoder's Gram quantities.
    fn from_params(config: SaeConfig, params: Params) -> Result<Sae> {
        let gram = DecoderGram::new(&params)?;
        Ok(Sae {
            config,
            training: None,
            params,
            gram,
        })
    }

    /// The tensors' dtype: `F32`, or `F64` after [`Sae::to_dtype`].
    pub fn dtype(&self) -> DType {
        self.params.encoder.dtype()
    }

    /// A copy in another float dtype (`F64` for reference checks). Scoring and gradients then
    /// run in that dtype; inputs stay `f32` slices.
    pub fn to_dtype(&self, dtype: DType) -> Result<Sae> {
        if !matches!(dtype, DType::F32 | DType::F64) {
            return Err(SaeError::Config {
                field: "dtype",
                problem: format!("{dtype:?} is not supported; use F32 or F64"),
            });
        }
        Sae::from_params(self.config.clone(), self.params.to_dtype(dtype)?)
    }

    /// Reads a checkpoint folder written by [`Sae::save`] (or by PyTorch in the same layout).
    /// Checks the format version, the config and every tensor's shape, and names the file and
    /// tensor on error. Tensors of any float dtype on disk are loaded as `f32`.
    pub fn load(dir: &Path) -> Result<Sae> {
        let (config, params, training) = io::load(dir)?;
        let mut sae = Sae::from_params(config, params)?;
        sae.training = training;
        Ok(sae)
    }

    /// Writes `model.safetensors` (`torch.nn.Linear` layout: `encoder.weight [H, d*d]`,
    /// `encoder.bias [H]`, `decoder.weight [d*d, H]`, `decoder.bias [d*d]`) and `config.json`
    /// into `dir` (created if missing). Each file is written to a temporary name and renamed,
    /// so a reader never sees a half-written file.
    pub fn save(&self, dir: &Path) -> Result<()> {
        io::save(dir, &self.config, &self.params, self.training.as_ref())
    }

    /// Factorised codes of the candidates of one record: positive image `p` `[d]`, prompt `t`
    /// `[d]`, candidate image embeddings `[N, d]` row-major. Processes [`DEFAULT_CHUNK_ROWS`]
    /// rows at a time, so memory beyond the inputs is the output plus a few MiB.
    pub fn encode_candidates(
        &self,
        positive: &[f32],
        prompt: &[f32],
        candidates: &[f32],
    ) -> Result<CandidateCodes> {
        self.encode_candidates_chunked(positive, prompt, candidates, DEFAULT_CHUNK_ROWS)
    }

    /// [`Sae::encode_candidates`] with an explicit number of rows per chunk (at least 1).
    /// The result does not depend on the chunking.
    pub fn encode_candidates_chunked(
        &self,
        positive: &[f32],
        prompt: &[f32],
        candidates: &[f32],
        chunk_rows: usize,
    ) -> Result<CandidateCodes> {
        let d = self.config.d;
        check_record_inputs(d, positive, prompt, candidates)?;
        factor::encode_candidates(self, positive, prompt, candidates, chunk_rows.max(1))
    }

    /// The loss of Eq. 11 on the (record, candidate) pairs of `records` (one batch: the KL term
    /// uses this batch's mean activations) and its gradient with respect to every parameter,
    /// by the factorised formulas (derived in the module docs of `sae/factor.rs`), never
    /// building a `d^2` vector.
    pub fn loss_and_grads(
        &self,
        data: &TrainingSet<'_>,
        records: &[usize],
    ) -> Result<(BatchLoss, Gradients)> {
        data.validate()?;
        let batch = factor::Batch::build(data, records, self.config.input_scale, self.dtype())?;
        let (stats, grads) = factor::loss_and_grads(
            &self.params,
            &self.gram,
            self.config.gamma,
            self.config.rho,
            &batch,
        )?;
        Ok((stats.loss(), grads))
    }

    /// Encoder weights as `[H, d, d]` (`E_j` = row `j`): for inspection and tests.
    pub fn encoder(&self) -> &Tensor {
        &self.params.encoder
    }

    /// Decoder weights as `[H, d, d]` (`D_j` = column `j` of `decoder.weight`, reshaped).
    pub fn decoder(&self) -> &Tensor {
        &self.params.decoder
    }

    /// Encoder bias `[H]`.
    pub fn encoder_bias(&self) -> &Tensor {
        &self.params.encoder_bias
    }

    /// Decoder bias as `[d, d]` (`B`).
    pub fn decoder_bias(&self) -> &Tensor {
        &self.params.decoder_bias
    }
}

/// Checks the lengths and finiteness of one record's scoring inputs.
fn check_record_inputs(
    d: usize,
    positive: &[f32],
    prompt: &[f32],
    candidates: &[f32],
) -> Result<()> {
    for (field, v) in [("positive", positive), ("prompt", prompt)] {
        if v.len() != d {
            return Err(SaeError::InputLength {
                field,
                got: v.len(),
                expected: format!("{d} (d)"),
            });
        }
        if v.iter().any(|x| !x.is_finite()) {
            return Err(SaeError::NonFiniteInput { field, row: 0 });
        }
    }
    if !candidates.len().is_multiple_of(d) {
        return Err(SaeError::InputLength {
            field: "candidates",
            got: candidates.len(),
            expected: format!("a multiple of {d} (N x d)"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
