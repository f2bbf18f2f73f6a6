//! Training the SAE on the difference vectors of every record's candidate set (Eq. 11).
//!
//! Stage: sae (`misp sae train`). Reads a [`TrainingSet`] (embeddings the CLI has loaded),
//! writes into `out_dir`: the SAE (`model.safetensors` + `config.json`, after every epoch),
//! `metrics.jsonl` (one [`EpochMetrics`] object per epoch) and the resume state
//! (`train_state.safetensors`: parameters, Adam moments, epoch and step counters;
//! `train_state.json`: the run's configs and data shape, checked on resume).
//!
//! The loop: hold out a seeded share of the records, fix the input scale from the training
//! records, initialise (or resume), then per epoch shuffle the training records with a seed
//! derived from `(seed, epoch)`, and per batch of records compute the Eq. 11 loss and its
//! factorised gradient ([`super::factor`]), stop on NaN/Inf, take an Adam step; after the epoch
//! measure the FVU on the held-out records, log, checkpoint. The SAE written to
//! `model.safetensors` is the one with the lowest held-out FVU so far (its FVU, epoch and the
//! stopping reason in `config.json`'s `training`); training stops after `patience` epochs
//! without a relative held-out improvement of `min_delta`, or at `epochs`. Because the split
//! and the shuffle depend only on the seed and epoch, and the checkpoint holds every bit of
//! state, a resumed run ends with the same weights as an uninterrupted one.

use std::cell::RefCell;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::data::TrainingSet;
use super::factor::{self, Batch, DecoderGram, Params};
use super::io::{self, TensorFile};
use super::{Result, Sae, SaeConfig, SaeError};

/// Upper edges of the firing-frequency histogram's bins after the first: bin 0 counts latents
/// that never fired in the epoch, bin `k` (1..=5) those with frequency below
/// `HISTOGRAM_EDGES[k-1]` (and at least the previous edge), bin 6 those at `1e-1` or above.
pub const HISTOGRAM_EDGES: [f64; 5] = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1];

const METRICS_FILE: &str = "metrics.jsonl";
const STATE_TENSORS: &str = "train_state.safetensors";
const STATE_JSON: &str = "train_state.json";
const STATE_FORMAT: u32 = 2;

/// The default Adam step is the encoder's initial weight scale `1/d` times this. Adam moves
/// every weight by about `lr` per step whatever the gradient's size, so a rate fixed in
/// parameter units suits one `d` only: `1e-4` left a `d = 64` SAE at its initialisation after
/// 30 steps. Chosen on the ShapesWorld embeddings (`d = 64`: `lr 1e-2` reaches FVU 0.07 in 30
/// epochs, `3e-2` overshoots first), `docs/design.md` §2.3.
pub const LR_TIMES_D: f64 = 0.64;

/// Purpose tag of the seeded draw that holds records out.
const HOLDOUT_SEED: u64 = 0x5ae_401d;

/// Optimisation settings of `misp sae train`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SaeTrainConfig {
    /// Most epochs; training stops earlier on a held-out plateau (`patience`). A resumed run
    /// continues up to this number.
    pub epochs: usize,
    /// Records per Adam step (each brings its whole candidate set, 256 pairs by default).
    /// Per-step cost has a part that does not shrink with the batch (`G = D D^T`, `S D`, Adam
    /// over `2 H d^2` weights); at `d = 64` that part is small and 16 records per step learn
    /// fastest per epoch, at `d = 768` larger batches amortise it.
    pub batch_records: usize,
    /// Adam learning rate; `None`: [`LR_TIMES_D`]` / d` ([`SaeTrainConfig::lr_for`]).
    pub lr: Option<f64>,
    pub seed: u64,
    /// `H`.
    pub hidden: usize,
    /// `gamma` and `rho` of Eq. 11.
    pub gamma: f64,
    pub rho: f64,
    /// Adam's `beta1`, `beta2`, `eps` (PyTorch's defaults).
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Steps over which Adam's rate rises linearly to `lr`.
    pub warmup_steps: usize,
    /// Share of the records held out to measure the FVU on (at least one record when there are
    /// two or more); 0 trains on all and never stops early.
    pub holdout: f64,
    /// Epochs without a relative held-out improvement of `min_delta` before training stops
    /// (0: never stops early).
    pub patience: usize,
    pub min_delta: f64,
}

impl Default for SaeTrainConfig {
    fn default() -> Self {
        Self {
            epochs: 100,
            batch_records: 16,
            lr: None,
            seed: 0,
            hidden: 128,
            gamma: 1.0,
            rho: 0.05,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            warmup_steps: 30,
            holdout: 0.1,
            patience: 3,
            min_delta: 0.01,
        }
    }
}

impl SaeTrainConfig {
    /// Equal in everything that shapes the trajectory (all but `epochs`), or the first field
    /// that differs.
    fn differs_from(&self, other: &Self) -> Option<&'static str> {
        let pairs: [(&'static str, bool); 13] = [
            ("warmup_steps", self.warmup_steps == other.warmup_steps),
            ("batch_records", self.batch_records == other.batch_records),
            ("lr", self.lr == other.lr),
            ("holdout", self.holdout == other.holdout),
            ("patience", self.patience == other.patience),
            ("min_delta", self.min_delta == other.min_delta),
            ("seed", self.seed == other.seed),
            ("hidden", self.hidden == other.hidden),
            ("gamma", self.gamma == other.gamma),
            ("rho", self.rho == other.rho),
            ("beta1", self.beta1 == other.beta1),
            ("beta2", self.beta2 == other.beta2),
            ("eps", self.eps == other.eps),
        ];
        pairs.iter().find(|(_, same)| !same).map(|(name, _)| *name)
    }

    /// The Adam learning rate for embeddings of dimension `d`.
    pub fn lr_for(&self, d: usize) -> f64 {
        self.lr.unwrap_or(LR_TIMES_D / d.max(1) as f64)
    }
}

/// One line of `metrics.jsonl`: what a modern SAE library logs, over one epoch's batches
/// (measured with the weights of the moment, as the epoch went).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based.
    pub epoch: usize,
    /// Mean over pairs of the batch loss of Eq. 11 (each batch weighted by its pairs).
    pub loss: f64,
    /// Mean over pairs of `||x - x_hat||^2`.
    pub recon: f64,
    /// Fraction of variance unexplained: `sum recon / sum ||x - mean x||^2`, the mean over all
    /// training pairs (centred, as SAE libraries report it).
    pub fvu: f64,
    /// The same on the held-out records, with the weights at the epoch's end (`None` when
    /// nothing is held out).
    #[serde(default)]
    pub heldout_fvu: Option<f64>,
    #[serde(default)]
    pub heldout_pairs: usize,
    /// The `z` above which a latent counts as firing ([`super::firing_threshold`]: `2 rho`).
    #[serde(default)]
    pub firing_threshold: f64,
    /// Mean number of latents firing per pair.
    pub mean_l0: f64,
    /// Mean of `z` over pairs and latents (the average `rho_hat`).
    pub mean_activation: f64,
    /// Mean over batches (pair-weighted) of `sum_j KL(rho || rho_hat_j)`, without `gamma`.
    pub kl: f64,
    /// Share of latents that never fired in the epoch.
    pub dead_fraction: f64,
    /// Latents per firing-frequency bin (see [`HISTOGRAM_EDGES`]; 7 bins).
    pub activation_histogram: Vec<u64>,
    /// The bin edges, repeated so that each line explains itself.
    pub histogram_edges: Vec<f64>,
    pub steps: usize,
    pub pairs: usize,
    pub seconds: f64,
}

/// `train_state.json`: what a resumed run must agree with, and the stopping rule's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StateFile {
    format: u32,
    train: SaeTrainConfig,
    sae: SaeConfig,
    records: usize,
    pairs: usize,
    /// Informational; the authoritative counter is in `train_state.safetensors`.
    epochs_done: usize,
    stop: StopState,
}

/// The held-out stopping rule's memory: the best FVU and its epoch (whose weights are
/// `model.safetensors`), epochs since the last improvement by `min_delta`, and whether it
/// stopped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct StopState {
    best_fvu: Option<f64>,
    best_epoch: usize,
    stale_epochs: usize,
    stopped: bool,
}

/// What the training of an SAE folder came to: written into its `config.json` as `training`
/// and read by `misp mine` (which refuses an SAE that did not learn).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSummary {
    /// The FVU of the saved weights: on the held-out records, or on the training records when
    /// nothing was held out (`fvu_split`).
    pub fvu: f64,
    /// `heldout` or `train`.
    pub fvu_split: String,
    /// The epoch whose weights were saved.
    pub epoch: usize,
    pub epochs_run: usize,
    /// `plateau` (the stopping rule), `max_epochs`, or `running` (a run in progress or
    /// killed).
    pub stopped: String,
    pub heldout_records: usize,
    pub heldout_pairs: usize,
}

/// Sums over some records' pairs, from which the input scale and the FVU denominator follow.
struct PairSums {
    pairs: usize,
    /// `sum_i ||p_r - v_i||^2 ||t_r||^2` (unscaled `||x||^2`).
    sum_sq: f64,
    /// `sum_i (p_r - v_i) t_r^T`, `[d, d]` (unscaled: `N mean x / s`).
    sum_x: Tensor,
    /// `||sum_x||^2`.
    mean_sq: f64,
}

impl PairSums {
    /// Exact (`f64`) sums over the pairs of `records`. The mean `x` is
    /// `(s/N) sum_r w_r t_r^T` with `w_r = sum_{i in r} (p_r - v_i)`.
    fn of(data: &TrainingSet<'_>, records: &[usize]) -> Result<Self> {
        let d = data.d;
        let mut sum_sq = 0.0;
        let mut w = vec![0.0f64; records.len() * d];
        let mut t = Vec::with_capacity(records.len() * d);
        let mut pairs = 0;
        for (k, &r) in records.iter().enumerate() {
            let p = &data.positives[r * d..(r + 1) * d];
            let tr = &data.prompts[r * d..(r + 1) * d];
            t.extend(tr.iter().map(|&x| f64::from(x)));
            let tn: f64 = tr.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
            let w_r = &mut w[k * d..(k + 1) * d];
            for &i in &data.candidates[r] {
                let v = &data.pool[i as usize * d..(i as usize + 1) * d];
                let mut un = 0.0;
                for ((&pa, &va), wa) in p.iter().zip(v).zip(w_r.iter_mut()) {
                    let ua = f64::from(pa) - f64::from(va);
                    un += ua * ua;
                    *wa += ua;
                }
                sum_sq += un * tn;
                pairs += 1;
            }
        }
        let w = Tensor::from_vec(w, (records.len(), d), &Device::Cpu)?;
        let t = Tensor::from_vec(t, (records.len(), d), &Device::Cpu)?;
        let sum_x = w.t()?.matmul(&t)?;
        let mean_sq = sum_x.sqr()?.sum_all()?.to_scalar::<f64>()?;
        Ok(Self {
            pairs,
            sum_sq,
            sum_x,
            mean_sq,
        })
    }

    /// `s = 1 / sqrt(mean_i ||p_r - v_i||^2 ||t_r||^2)`, so that `mean ||x||^2 = 1` and the
    /// reconstruction term of Eq. 11 is `O(1)` against the KL term whatever the embeddings'
    /// norm.
    fn input_scale(&self) -> Result<f64> {
        let mean = self.sum_sq / self.pairs.max(1) as f64;
        if !(mean > 0.0 && mean.is_finite()) {
            return Err(SaeError::Data(format!(
                "mean ||p - v||^2 ||t||^2 over the training pairs is {mean}: every candidate equals its positive or every prompt is zero"
            )));
        }
        Ok(1.0 / mean.sqrt())
    }

    /// `sum_i ||x_i - mean x||^2 = sum ||x||^2 - N ||mean||^2` at scale `s`: the FVU denominator.
    fn variance(&self, s: f64) -> f64 {
        s * s * (self.sum_sq - self.mean_sq / self.pairs.max(1) as f64)
    }

    /// `mean x` at scale `s`, `[d, d]` in `f32`: the decoder bias's starting value.
    fn mean(&self, s: f64) -> Result<Tensor> {
        Ok((&self.sum_x * (s / self.pairs.max(1) as f64))?.to_dtype(DType::F32)?)
    }
}

/// Fixed facts about the training data.
struct DataStats {
    input_scale: f64,
    /// The mean training `x`, `[d, d]`: the decoder bias starts there.
    mean_x: Tensor,
    /// The FVU denominator over the training pairs.
    total_variance: f64,
    /// Records trained on and held out (records without candidates in neither).
    train: Vec<usize>,
    heldout: Vec<usize>,
    heldout_pairs: usize,
    /// The FVU denominator over the held-out pairs, at the training scale.
    heldout_variance: f64,
}

/// Splits the records with candidates into training and held-out ones: a seeded order of the
/// record indices, the first `ceil(holdout * R)` held out (at least one, and at least one left
/// to train on, when `holdout > 0` and there are two records or more).
pub(super) fn split(data: &TrainingSet<'_>, cfg: &SaeTrainConfig) -> (Vec<usize>, Vec<usize>) {
    let mut usable: Vec<usize> = (0..data.records())
        .filter(|&r| !data.candidates[r].is_empty())
        .collect();
    let n = usable.len();
    let held = if cfg.holdout > 0.0 && n >= 2 {
        ((cfg.holdout * n as f64).ceil() as usize).clamp(1, n - 1)
    } else {
        0
    };
    usable.sort_by_key(|&r| crate::files::record_seed(cfg.seed, &r.to_string(), HOLDOUT_SEED));
    let heldout: Vec<usize> = usable.drain(..held).collect();
    usable.sort_unstable();
    let mut heldout = heldout;
    heldout.sort_unstable();
    (usable, heldout)
}

/// The split, the input scale (from the training records) and both FVU denominators.
fn data_stats(data: &TrainingSet<'_>, cfg: &SaeTrainConfig) -> Result<DataStats> {
    let (train, heldout) = split(data, cfg);
    let sums = PairSums::of(data, &train)?;
    let input_scale = sums.input_scale()?;
    let held = PairSums::of(data, &heldout)?;
    Ok(DataStats {
        input_scale,
        mean_x: sums.mean(input_scale)?,
        total_variance: sums.variance(input_scale),
        heldout_pairs: held.pairs,
        heldout_variance: held.variance(input_scale),
        train,
        heldout,
    })
}

/// The FVU of `params` on the held-out pairs, in batches of `batch_records` records.
fn heldout_fvu(
    data: &TrainingSet<'_>,
    params: &Params,
    sae_config: &SaeConfig,
    stats: &DataStats,
    batch_records: usize,
) -> Result<Option<f64>> {
    if stats.heldout.is_empty() || stats.heldout_variance <= 0.0 {
        return Ok(None);
    }
    let gram = DecoderGram::new(params)?;
    let mut recon = 0.0;
    for records in stats.heldout.chunks(batch_records.max(1)) {
        let batch = Batch::build(data, records, sae_config.input_scale, DType::F32)?;
        recon += factor::reconstruction(params, &gram, &batch)?;
    }
    Ok(Some(recon / stats.heldout_variance))
}

/// Adam (Kingma & Ba, PyTorch's form with bias correction), `f32` moments, updating the
/// parameter tensors in place.
struct Adam {
    lr: f64,
    warmup: u64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    step: u64,
    /// First and second moments of encoder, encoder bias, decoder, decoder bias.
    m: [Vec<f32>; 4],
    v: [Vec<f32>; 4],
}

const PARAM_NAMES: [&str; 4] = ["encoder", "encoder_bias", "decoder", "decoder_bias"];

fn param_tensors(p: &Params) -> [&Tensor; 4] {
    [&p.encoder, &p.encoder_bias, &p.decoder, &p.decoder_bias]
}

fn grad_tensors(g: &factor::Gradients) -> [&Tensor; 4] {
    [&g.encoder, &g.encoder_bias, &g.decoder, &g.decoder_bias]
}

impl Adam {
    fn new(cfg: &SaeTrainConfig, params: &Params) -> Self {
        let zeros = |t: &Tensor| vec![0.0f32; t.elem_count()];
        let p = param_tensors(params);
        let (_, d) = params.dims();
        Self {
            lr: cfg.lr_for(d),
            warmup: cfg.warmup_steps as u64,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            step: 0,
            m: p.map(zeros),
            v: p.map(zeros),
        }
    }

    /// One step. Returns `false` (and leaves the parameters partly updated, to be discarded)
    /// when a gradient holds NaN or Inf.
    fn step(&mut self, params: &Params, grads: &factor::Gradients) -> Result<bool> {
        self.step += 1;
        let t = self.step as f64;
        let bc1 = 1.0 - self.beta1.powf(t);
        let bc2 = 1.0 - self.beta2.powf(t);
        let coefs = AdamCoefs {
            beta1: self.beta1 as f32,
            beta2: self.beta2 as f32,
            // Linear warmup: Adam's first steps move every weight by about `lr` in its
            // gradient's sign, and all `H` decoder columns the same way; ramping `lr` up over
            // `warmup_steps` keeps the first epoch from overshooting (ShapesWorld: held-out FVU
            // after epoch 1 0.39 with 30 warmup steps, 1.30 without).
            step_size: (self.lr * (self.step as f64 / self.warmup.max(1) as f64).min(1.0) / bc1)
                as f32,
            inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
            eps: self.eps as f32,
        };
        let mut finite = true;
        for (((p, g), m), v) in param_tensors(params)
            .into_iter()
            .zip(grad_tensors(grads))
            .zip(self.m.iter_mut())
            .zip(self.v.iter_mut())
        {
            let g = g.to_dtype(DType::F32)?.contiguous()?;
            let op_finite = factor::with_cpu_slice(&g, |grad: &[f32]| {
                let op = AdamUpdate {
                    grad,
                    m: RefCell::new(m),
                    v: RefCell::new(v),
                    coefs,
                    finite: RefCell::new(true),
                };
                p.inplace_op1(&op).map(|()| op.finite.into_inner())
            })??;
            finite &= op_finite;
        }
        Ok(finite)
    }

    fn to_tensors(&self, params: &Params) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (((name, p), m), v) in PARAM_NAMES
            .iter()
            .zip(param_tensors(params))
            .zip(&self.m)
            .zip(&self.v)
        {
            out.push((
                format!("adam.exp_avg.{name}"),
                Tensor::from_slice(m, p.shape(), &Device::Cpu)?,
            ));
            out.push((
                format!("adam.exp_avg_sq.{name}"),
                Tensor::from_slice(v, p.shape(), &Device::Cpu)?,
            ));
        }
        Ok(out)
    }
}

#[derive(Debug, Clone, Copy)]
struct AdamCoefs {
    beta1: f32,
    beta2: f32,
    step_size: f32,
    inv_sqrt_bc2: f32,
    eps: f32,
}

/// The Adam update of one parameter, applied in place to its tensor's storage.
struct AdamUpdate<'a> {
    grad: &'a [f32],
    m: RefCell<&'a mut Vec<f32>>,
    v: RefCell<&'a mut Vec<f32>>,
    coefs: AdamCoefs,
    finite: RefCell<bool>,
}

impl InplaceOp1 for AdamUpdate<'_> {
    fn name(&self) -> &'static str {
        "sae-adam"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(p) = storage else {
            candle_core::bail!("SAE training keeps its parameters in f32")
        };
        let (lo, hi) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("parameter is not contiguous".into()))?;
        let p = &mut p[lo..hi];
        let mut m = self.m.borrow_mut();
        let mut v = self.v.borrow_mut();
        if p.len() != self.grad.len() || p.len() != m.len() || p.len() != v.len() {
            candle_core::bail!("adam: parameter, gradient and moments differ in length");
        }
        let finite = adam_kernel(p, self.grad, m.as_mut_slice(), v.as_mut_slice(), self.coefs);
        *self.finite.borrow_mut() = finite;
        Ok(())
    }
}

/// The element-wise update, split over the available cores for large tensors (the result is
/// the same for any split). Returns whether every gradient entry was finite.
fn adam_kernel(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: AdamCoefs) -> bool {
    fn run(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: AdamCoefs) -> bool {
        let mut finite = true;
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            finite &= g.is_finite();
            *m = c.beta1 * *m + (1.0 - c.beta1) * g;
            *v = c.beta2 * *v + (1.0 - c.beta2) * g * g;
            let denom = v.sqrt() * c.inv_sqrt_bc2 + c.eps;
            *p -= c.step_size * *m / denom;
        }
        finite
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads == 1 || p.len() < 1 << 16 {
        return run(p, g, m, v, c);
    }
    let chunk = p.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = p
            .chunks_mut(chunk)
            .zip(g.chunks(chunk))
            .zip(m.chunks_mut(chunk))
            .zip(v.chunks_mut(chunk))
            .map(|(((p, g), m), v)| s.spawn(move || run(p, g, m, v, c)))
            .collect();
        handles.into_iter().all(|h| h.join().unwrap_or(false))
    })
}

/// Everything that evolves during training.
struct TrainState {
    params: Params,
    adam: Adam,
    epochs_done: usize,
    stop: StopState,
}

/// The seed of epoch `epoch`'s shuffle: a fixed function of the run seed, so a resumed run
/// shuffles exactly as an uninterrupted one.
fn epoch_seed(seed: u64, epoch: usize) -> u64 {
    seed ^ (epoch as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Trains the SAE of Eq. 11 on `data` and returns it; see the module docs for the files
/// written to `out_dir`. `base` supplies `d`, `clip_model` and `normalized`; `hidden`, `gamma`
/// and `rho` come from `cfg`, and the input scale from the data. If `out_dir` holds the state
/// of an earlier run with the same configs and data shape, training resumes after its last
/// completed epoch.
pub fn train(
    cfg: &SaeTrainConfig,
    data: &TrainingSet<'_>,
    base: SaeConfig,
    out_dir: &Path,
    progress: bool,
) -> Result<Sae> {
    let (sae_config, stats) = prepare(cfg, data, base)?;
    std::fs::create_dir_all(out_dir).map_err(|source| SaeError::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let mut state = match resume(cfg, data, &sae_config, out_dir)? {
        Some(state) => {
            tracing::info!(
                epochs_done = state.epochs_done,
                "resuming SAE training from {}",
                out_dir.display()
            );
            state
        }
        None => {
            let params = initial_params(&sae_config, cfg, &stats)?;
            TrainState {
                adam: Adam::new(cfg, &params),
                params,
                epochs_done: 0,
                stop: StopState::default(),
            }
        }
    };
    let metrics_path = out_dir.join(METRICS_FILE);
    keep_metrics_before(&metrics_path, state.epochs_done + 1)?;
    if state.epochs_done == 0 && cfg.epochs == 0 {
        io::save(out_dir, &sae_config, &state.params, None)?;
    }
    let summary = |state: &TrainState, fvu: f64, split: &str| TrainingSummary {
        fvu,
        fvu_split: split.into(),
        epoch: state.stop.best_epoch,
        epochs_run: state.epochs_done,
        stopped: if state.stop.stopped {
            "plateau"
        } else if state.epochs_done >= cfg.epochs {
            "max_epochs"
        } else {
            "running"
        }
        .into(),
        heldout_records: stats.heldout.len(),
        heldout_pairs: stats.heldout_pairs,
    };

    while state.epochs_done < cfg.epochs && !state.stop.stopped {
        // One pass over the training records, then the held-out FVU of the weights it left.
        let epoch = state.epochs_done + 1;
        let mut metrics = run_epoch(cfg, data, &sae_config, &stats, &mut state, epoch, progress)?;
        metrics.heldout_fvu =
            heldout_fvu(data, &state.params, &sae_config, &stats, cfg.batch_records)?;
        metrics.heldout_pairs = stats.heldout_pairs;
        tracing::info!(
            epoch,
            loss = metrics.loss,
            fvu = metrics.fvu,
            heldout_fvu = metrics.heldout_fvu,
            mean_l0 = metrics.mean_l0,
            dead_fraction = metrics.dead_fraction,
            seconds = metrics.seconds,
            "SAE epoch done"
        );

        // The stopping rule: the best weights are kept; `patience` epochs without a relative
        // improvement of `min_delta` stop the run.
        let (fvu, split) = match metrics.heldout_fvu {
            Some(f) => (f, "heldout"),
            None => (metrics.fvu, "train"),
        };
        let best = state.stop.best_fvu;
        let is_best = best.is_none_or(|b| fvu < b) || metrics.heldout_fvu.is_none();
        if best.is_none_or(|b| fvu < b * (1.0 - cfg.min_delta)) {
            state.stop.stale_epochs = 0;
        } else {
            state.stop.stale_epochs += 1;
        }
        if is_best {
            state.stop.best_fvu = Some(fvu);
            state.stop.best_epoch = epoch;
        }
        state.stop.stopped = metrics.heldout_fvu.is_some()
            && cfg.patience > 0
            && state.stop.stale_epochs >= cfg.patience;
        state.epochs_done = epoch;

        // Metrics first, state last: a crash in between re-runs the epoch, and the resume
        // drops this line before writing it again. The model file is written when the epoch
        // is the best so far, and its summary whenever the state changes.
        append_metrics(&metrics_path, &metrics)?;
        let best_fvu = state.stop.best_fvu.unwrap_or(fvu);
        let training = summary(&state, best_fvu, split);
        if is_best {
            io::save(out_dir, &sae_config, &state.params, Some(&training))?;
        } else {
            io::save_summary(out_dir, &sae_config, &training)?;
        }
        save_state(cfg, data, &sae_config, &state, out_dir)?;
    }
    Sae::load(out_dir)
}

/// Runs one epoch of training in memory, writing nothing: the timing helper of
/// `misp bench mine` (5,700 records x 256 candidates at `d = 768` on synthetic embeddings).
/// Starts from [`Sae::init`] with `cfg.seed`.
pub fn bench_epoch(
    cfg: &SaeTrainConfig,
    data: &TrainingSet<'_>,
    base: SaeConfig,
    progress: bool,
) -> Result<EpochMetrics> {
    let (sae_config, stats) = prepare(cfg, data, base)?;
    let params = initial_params(&sae_config, cfg, &stats)?;
    let mut state = TrainState {
        adam: Adam::new(cfg, &params),
        params,
        epochs_done: 0,
        stop: StopState::default(),
    };
    run_epoch(cfg, data, &sae_config, &stats, &mut state, 1, progress)
}

/// [`Sae::init`]'s weights with the decoder bias at the mean training `x` (as SAE libraries start
/// it at the data's mean or median). From `b_d = 0`, the first Adam steps, which move every
/// weight by about `lr` in the sign of its gradient, push all `H` decoder columns the same way
/// (each one's gradient is dominated by `-rho * mean x`): on the ShapesWorld data the first
/// epoch's FVU rose to 3.3, at `d = 768` to 5.5. From the mean, that shared component is gone.
fn initial_params(
    sae_config: &SaeConfig,
    cfg: &SaeTrainConfig,
    stats: &DataStats,
) -> Result<Params> {
    let mut params = Sae::init(sae_config.clone(), cfg.seed)?.params;
    params.decoder_bias = stats.mean_x.clone();
    Ok(params)
}

/// Validates the inputs and fixes the SAE config (with its input scale).
fn prepare(
    cfg: &SaeTrainConfig,
    data: &TrainingSet<'_>,
    base: SaeConfig,
) -> Result<(SaeConfig, DataStats)> {
    if base.d != data.d {
        return Err(SaeError::Config {
            field: "d",
            problem: format!(
                "is {} in the SAE config but {} in the training data",
                base.d, data.d
            ),
        });
    }
    if cfg.batch_records == 0 {
        return Err(SaeError::Config {
            field: "batch_records",
            problem: "must be positive".into(),
        });
    }
    let lr = cfg.lr_for(data.d);
    if !(lr.is_finite() && lr > 0.0) {
        return Err(SaeError::Config {
            field: "lr",
            problem: format!("is {lr}, must be finite and > 0"),
        });
    }
    if !(0.0..1.0).contains(&cfg.holdout) {
        return Err(SaeError::Config {
            field: "holdout",
            problem: format!("is {}, must lie in [0, 1)", cfg.holdout),
        });
    }
    if !(cfg.min_delta.is_finite() && cfg.min_delta >= 0.0) {
        return Err(SaeError::Config {
            field: "min_delta",
            problem: format!("is {}, must be finite and >= 0", cfg.min_delta),
        });
    }
    data.validate()?;
    let stats = data_stats(data, cfg)?;
    let sae_config = SaeConfig {
        hidden: cfg.hidden,
        gamma: cfg.gamma,
        rho: cfg.rho,
        input_scale: stats.input_scale,
        ..base
    };
    sae_config.validate()?;
    Ok((sae_config, stats))
}

/// One pass over the shuffled records; updates `state.params` and the Adam state.
fn run_epoch(
    cfg: &SaeTrainConfig,
    data: &TrainingSet<'_>,
    sae_config: &SaeConfig,
    stats: &DataStats,
    state: &mut TrainState,
    epoch: usize,
    progress: bool,
) -> Result<EpochMetrics> {
    let start = Instant::now();
    let h = sae_config.hidden;
    let mut order = stats.train.clone();
    order.shuffle(&mut StdRng::seed_from_u64(epoch_seed(cfg.seed, epoch)));
    let batches: Vec<&[usize]> = order.chunks(cfg.batch_records).collect();

    let bar = if progress {
        let style = ProgressStyle::with_template(
            "sae epoch {prefix} [{bar:30}] {pos}/{len} steps {per_sec} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let bar = ProgressBar::new(batches.len() as u64).with_style(style);
        bar.set_prefix(format!("{epoch}/{}", cfg.epochs));
        bar
    } else {
        ProgressBar::hidden()
    };

    let (mut pairs, mut loss_sum, mut kl_sum, mut recon_sum, mut z_total) = (0, 0.0, 0.0, 0.0, 0.0);
    let mut fired = vec![0u64; h];
    for (step, records) in batches.iter().enumerate() {
        let batch = Batch::build(data, records, sae_config.input_scale, DType::F32)?;
        let gram = DecoderGram::new(&state.params)?;
        let (b, grads) = factor::loss_and_grads(
            &state.params,
            &gram,
            sae_config.gamma,
            sae_config.rho,
            &batch,
        )?;
        if !b.loss.is_finite() {
            return Err(SaeError::Diverged {
                what: "loss",
                epoch,
                step: step + 1,
            });
        }
        if !state.adam.step(&state.params, &grads)? {
            return Err(SaeError::Diverged {
                what: "gradient",
                epoch,
                step: step + 1,
            });
        }
        pairs += b.pairs;
        loss_sum += b.loss * b.pairs as f64;
        kl_sum += b.kl * b.pairs as f64;
        recon_sum += b.recon_sum;
        z_total += b.z_sum.iter().sum::<f64>();
        fired.iter_mut().zip(&b.fired).for_each(|(f, n)| *f += n);
        bar.set_message(format!("loss {:.4}", b.loss));
        bar.inc(1);
    }
    bar.finish_and_clear();

    let pf = pairs as f64;
    let mut histogram = vec![0u64; HISTOGRAM_EDGES.len() + 2];
    for &f in &fired {
        let freq = f as f64 / pf;
        let bin = if f == 0 {
            0
        } else {
            1 + HISTOGRAM_EDGES.iter().filter(|&&e| freq >= e).count()
        };
        histogram[bin] += 1;
    }
    Ok(EpochMetrics {
        epoch,
        loss: loss_sum / pf,
        recon: recon_sum / pf,
        fvu: recon_sum / stats.total_variance,
        heldout_fvu: None,
        heldout_pairs: 0,
        firing_threshold: super::firing_threshold(sae_config.rho),
        mean_l0: fired.iter().sum::<u64>() as f64 / pf,
        mean_activation: z_total / (pf * h as f64),
        kl: kl_sum / pf,
        dead_fraction: fired.iter().filter(|&&f| f == 0).count() as f64 / h as f64,
        activation_histogram: histogram,
        histogram_edges: HISTOGRAM_EDGES.to_vec(),
        steps: batches.len(),
        pairs,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Writes `train_state.safetensors` (the commit point: parameters, moments, counters) and
/// then `train_state.json`.
fn save_state(
    cfg: &SaeTrainConfig,
    data: &TrainingSet<'_>,
    sae_config: &SaeConfig,
    state: &TrainState,
    out_dir: &Path,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = PARAM_NAMES
        .iter()
        .zip(param_tensors(&state.params))
        .map(|(name, t)| (format!("param.{name}"), t.clone()))
        .collect();
    tensors.extend(state.adam.to_tensors(&state.params)?);
    tensors.push((
        "epochs_done".into(),
        Tensor::new(&[state.epochs_done as i64], &Device::Cpu)?,
    ));
    tensors.push((
        "adam.step".into(),
        Tensor::new(&[state.adam.step as i64], &Device::Cpu)?,
    ));
    let map = tensors
        .iter()
        .map(|(k, t)| (k.as_str(), t.clone()))
        .collect();
    io::write_safetensors(&out_dir.join(STATE_TENSORS), &map)?;
    io::write_json(
        &out_dir.join(STATE_JSON),
        &StateFile {
            format: STATE_FORMAT,
            train: cfg.clone(),
            sae: sae_config.clone(),
            records: data.records(),
            pairs: data.pairs(),
            epochs_done: state.epochs_done,
            stop: state.stop.clone(),
        },
    )
}

/// The state of an earlier run in `out_dir`, if there is one, after checking that it belongs
/// to this run (same configs but `epochs`, same data shape and input scale).
fn resume(
    cfg: &SaeTrainConfig,
    data: &TrainingSet<'_>,
    sae_config: &SaeConfig,
    out_dir: &Path,
) -> Result<Option<TrainState>> {
    let json_path = out_dir.join(STATE_JSON);
    let tensors_path = out_dir.join(STATE_TENSORS);
    if !json_path.exists() || !tensors_path.exists() {
        return Ok(None);
    }
    let file: StateFile = io::read_json(&json_path)?;
    let mismatch = |reason: String| SaeError::ResumeMismatch {
        path: json_path.clone(),
        reason,
    };
    if file.format != STATE_FORMAT {
        return Err(SaeError::Format {
            path: json_path.clone(),
            got: file.format,
            supported: STATE_FORMAT,
        });
    }
    if let Some(field) = cfg.differs_from(&file.train) {
        return Err(mismatch(format!(
            "training setting `{field}` differs from the saved run's; use a fresh output folder"
        )));
    }
    if file.records != data.records() || file.pairs != data.pairs() {
        return Err(mismatch(format!(
            "the saved run trained on {} records / {} pairs, this data has {} / {}",
            file.records,
            file.pairs,
            data.records(),
            data.pairs()
        )));
    }
    if &file.sae != sae_config {
        return Err(mismatch(format!(
            "the saved SAE config {:?} differs from this run's {:?} (other embeddings?)",
            file.sae, sae_config
        )));
    }

    let (h, d) = (sae_config.hidden, sae_config.d);
    let shapes: [Vec<usize>; 4] = [vec![h, d, d], vec![h], vec![h, d, d], vec![d, d]];
    let mut st = TensorFile::open(&tensors_path)?;
    let mut take = |name: String, shape: &[usize]| st.take(&name, shape);
    let mut loaded = Vec::new();
    for (name, shape) in PARAM_NAMES.iter().zip(&shapes) {
        loaded.push(take(format!("param.{name}"), shape)?);
    }
    let params = Params {
        encoder: loaded[0].clone(),
        encoder_bias: loaded[1].clone(),
        decoder: loaded[2].clone(),
        decoder_bias: loaded[3].clone(),
    };
    let mut adam = Adam::new(cfg, &params);
    for (i, (name, shape)) in PARAM_NAMES.iter().zip(&shapes).enumerate() {
        adam.m[i] = take(format!("adam.exp_avg.{name}"), shape)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        adam.v[i] = take(format!("adam.exp_avg_sq.{name}"), shape)?
            .flatten_all()?
            .to_vec1::<f32>()?;
    }
    let counter = |st: &mut TensorFile, name: &str| -> Result<usize> {
        let v = st.take_as(name, &[1], DType::I64)?.to_vec1::<i64>()?;
        usize::try_from(v[0]).map_err(|_| SaeError::ResumeMismatch {
            path: tensors_path.clone(),
            reason: format!("counter `{name}` is negative"),
        })
    };
    let epochs_done = counter(&mut st, "epochs_done")?;
    adam.step = counter(&mut st, "adam.step")? as u64;
    Ok(Some(TrainState {
        params,
        adam,
        epochs_done,
        stop: file.stop,
    }))
}

/// Rewrites `metrics.jsonl` keeping only the lines of epochs before `first_epoch` (those of a
/// crashed epoch are written again when it re-runs). Unparsable lines are dropped.
fn keep_metrics_before(path: &Path, first_epoch: usize) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(SaeError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let mut kept = String::new();
    for line in text.lines() {
        if let Ok(m) = serde_json::from_str::<EpochMetrics>(line) {
            if m.epoch < first_epoch {
                kept.push_str(line);
                kept.push('\n');
            }
        }
    }
    io::write_bytes(path, kept.as_bytes())
}

/// Appends one JSON line and flushes it to disk.
fn append_metrics(path: &Path, metrics: &EpochMetrics) -> Result<()> {
    let io_err = |source| SaeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut line = serde_json::to_string(metrics).map_err(|source| SaeError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    line.push('\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err)?;
    f.write_all(line.as_bytes()).map_err(io_err)?;
    f.sync_all().map_err(io_err)
}
