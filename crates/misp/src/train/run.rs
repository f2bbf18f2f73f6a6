//! The training loop: epochs over a seeded order of records, micro-batches with gradient
//! accumulation up to the effective batch, global-norm clipping, AdamW with transformers'
//! cosine-with-warmup schedule, metrics per step, checkpoints, resume, and the final adapter
//! and report.
//!
//! Stage: train. Reads the base checkpoint, the records, the negatives file and the pool ids.
//! Writes `OUT/config.toml`, `OUT/inputs.json` (fingerprints of the inputs), `OUT/metrics.jsonl`, `OUT/skipped.jsonl`, `OUT/checkpoints/
//! step-N/`, `OUT/reference/`, `OUT/adapter/` (PEFT layout), `OUT/report.md` and PNG curves.
//!
//! Determinism is what makes `--resume` exact: the record order of epoch `e` is a function of
//! `(seed, e)`, dropout masks of `(seed, step, micro-batch)`, the adapter's initial values of
//! `seed`, and a checkpoint holds the adapter, AdamW's moments and the step. A resumed run thus
//! takes the same steps as an uninterrupted one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{json, Map, Value};

use super::config::TrainConfig;
use super::data::{self, PixelCache, TrainItem};
use super::reference::{hash_items, hash_model, RefCache};
use super::step::micro_step;
use super::{TrainError, TrainSummary};
use crate::data::read_records;
use crate::files::Fnv;
use crate::files::{splitmix64, write_atomic, write_json_atomic};
use crate::model::lora::init_rng;
use crate::model::vlm::{Vlm, VlmOptions};
use crate::objective::ObjectiveMetrics;
use crate::optim::{
    clip_grad_norm, cosine_with_warmup, grad_norm, AdamW, AdamWConfig, GradAccumulator,
};

/// Paths and switches of one run (what is not a hyper-parameter).
#[derive(Debug, Clone)]
pub struct TrainInputs {
    /// Where the model runs (the optimiser state lives there too).
    pub device: candle_core::Device,
    pub model: PathBuf,
    pub data: PathBuf,
    pub negatives: Option<PathBuf>,
    pub pool: Option<PathBuf>,
    pub out: PathBuf,
    /// Folder that image paths in the records are relative to and must stay in (default: the
    /// records file's folder); absolute paths are admitted when they lie under it.
    pub image_root: Option<PathBuf>,
    pub resume: bool,
    pub progress: bool,
    /// Stop (with a checkpoint, as Ctrl-C does) after this many optimiser steps: how tests
    /// simulate a killed run.
    pub stop_after: Option<u64>,
}

/// SIGINT sets this; the loop checkpoints and stops at the next step boundary. A second
/// Ctrl-C terminates at once.
fn interrupted() -> &'static Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        #[cfg(unix)]
        {
            let sig = signal_hook::consts::SIGINT;
            let _ = signal_hook::flag::register_conditional_shutdown(sig, 1, flag.clone());
            let _ = signal_hook::flag::register(sig, flag.clone());
        }
        flag
    })
}

/// The record order of `epoch`: a seeded shuffle.
fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(splitmix64(seed ^ splitmix64(epoch + 1)));
    order.shuffle(&mut rng);
    order
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Input(format!("{}: {e}", path.display()))
}

/// Fingerprints of the run's inputs (`OUT/inputs.json`): the base model (as the reference
/// cache hashes it), the records, the negatives file and the pool's ids. A file is hashed as
/// [`crate::files::hash_file`] does, a folder as its files.
fn input_fingerprints(inputs: &TrainInputs) -> Result<Map<String, Value>, TrainError> {
    let of = |path: &Path| -> Result<String, TrainError> {
        let mut h = Fnv::default();
        let mut files = vec![path.to_path_buf()];
        if path.is_dir() {
            files = std::fs::read_dir(path)
                .map_err(|e| io_err(path, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            files.sort();
        }
        for f in files {
            h.str(&f.file_name().unwrap_or_default().to_string_lossy());
            crate::files::hash_file(&f, &mut h).map_err(|e| io_err(&f, e))?;
        }
        Ok(format!("{:016x}", h.finish()))
    };
    let mut out = Map::new();
    let mut model = Fnv::default();
    hash_model(&inputs.model, &mut model)?;
    out.insert("model".into(), json!(format!("{:016x}", model.finish())));
    out.insert("data".into(), json!(of(&inputs.data)?));
    if let Some(n) = &inputs.negatives {
        out.insert("negatives".into(), json!(of(n)?));
    }
    if let Some(pool) = &inputs.pool {
        out.insert("pool".into(), json!(of(&pool.join("ids.jsonl"))?));
    }
    Ok(out)
}

/// Checks `OUT` against `--resume`: a fresh run refuses a folder holding another run; a resumed
/// run refuses other settings and other inputs (`OUT/inputs.json`), naming what differs.
fn prepare_out(cfg: &TrainConfig, inputs: &TrainInputs) -> Result<(), TrainError> {
    let out = &inputs.out;
    let config_path = out.join("config.toml");
    let inputs_path = out.join("inputs.json");
    let fingerprints = input_fingerprints(inputs)?;
    if inputs.resume {
        if let Ok(text) = std::fs::read_to_string(&inputs_path) {
            let old: Map<String, Value> =
                serde_json::from_str(&text).map_err(|e| io_err(&inputs_path, e))?;
            let names = ["model", "data", "negatives", "pool"];
            let changed: Vec<&str> = names
                .into_iter()
                .filter(|k| old.get(*k) != fingerprints.get(*k))
                .collect();
            if !changed.is_empty() {
                return Err(TrainError::Input(format!(
                    "{}: --resume with other inputs ({} differ from the run's); resume with the same files, or start another --out",
                    inputs_path.display(),
                    changed
                        .iter()
                        .map(|k| format!("--{k}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        if let Ok(text) = std::fs::read_to_string(&config_path) {
            let old: TrainConfig = toml::from_str(&text).map_err(|e| io_err(&config_path, e))?;
            if &old != cfg {
                let a = toml::Table::try_from(&old).unwrap_or_default();
                let b = toml::Table::try_from(cfg).unwrap_or_default();
                let diff: Vec<String> = b
                    .iter()
                    .filter(|(k, v)| a.get(*k) != Some(*v))
                    .map(|(k, v)| {
                        format!(
                            "{k} ({} -> {v})",
                            a.get(k).map(|x| x.to_string()).unwrap_or_default()
                        )
                    })
                    .collect();
                return Err(TrainError::Input(format!(
                    "{}: --resume with other settings: {}",
                    config_path.display(),
                    diff.join(", ")
                )));
            }
        }
    } else if out.join("checkpoints").is_dir() || out.join("adapter").is_dir() {
        return Err(TrainError::Input(format!(
            "{} already holds a training run: pass --resume to continue it, or choose another --out",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| io_err(out, e))?;
    write_atomic(&config_path, cfg.to_toml().as_bytes()).map_err(|e| io_err(&config_path, e))?;
    write_json_atomic(&inputs_path, &fingerprints).map_err(|e| io_err(&inputs_path, e))?;
    Ok(())
}

/// Latest complete checkpoint folder and its step.
fn latest_checkpoint(out: &Path) -> Option<(u64, PathBuf)> {
    let dir = out.join("checkpoints");
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step-")?.parse::<u64>().ok()?;
            e.path()
                .join("state.json")
                .is_file()
                .then(|| (step, e.path()))
        })
        .max_by_key(|(s, _)| *s)
}

/// Writes `OUT/checkpoints/step-N` atomically (a temporary folder renamed into place) and
/// keeps the newest `keep`.
#[allow(clippy::too_many_arguments)]
fn checkpoint(
    out: &Path,
    step: u64,
    vlm: &Vlm,
    opt: &AdamW,
    cfg: &TrainConfig,
    model_dir: &Path,
    refused: usize,
    cache: &mut RefCache,
) -> Result<(), TrainError> {
    cache.save()?;
    let root = out.join("checkpoints");
    let dir = root.join(format!("step-{step:06}"));
    let tmp = root.join(format!(".tmp-step-{step:06}"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    let vars: HashMap<String, Tensor> = opt
        .vars()
        .iter()
        .enumerate()
        .map(|(i, v)| (format!("lora.{i}"), v.as_tensor().clone()))
        .collect();
    let save = |name: &str, t: &HashMap<String, Tensor>| {
        crate::files::write_safetensors(&tmp.join(name), t).map_err(|e| io_err(&tmp, e))
    };
    save("lora.safetensors", &vars)?;
    save("optimizer.safetensors", &opt.state()?)?;
    vlm.save_adapter(&tmp, &cfg.lora(), &model_dir.to_string_lossy())?;
    write_json_atomic(
        &tmp.join("state.json"),
        &json!({"step": step, "refused_steps": refused}),
    )
    .map_err(|e| io_err(&tmp, e))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(|e| io_err(&dir, e))?;
    // Keep the newest `keep` checkpoints.
    let mut all: Vec<(u64, PathBuf)> = std::fs::read_dir(&root)
        .map_err(|e| io_err(&root, e))?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            Some((name.strip_prefix("step-")?.parse().ok()?, e.path()))
        })
        .collect();
    all.sort();
    let keep = cfg.keep_checkpoints.max(1);
    if all.len() > keep {
        for (_, p) in &all[..all.len() - keep] {
            let _ = std::fs::remove_dir_all(p);
        }
    }
    Ok(())
}

/// Restores adapter values, optimiser state and step from `dir`.
fn restore(dir: &Path, opt: &mut AdamW) -> Result<(u64, usize), TrainError> {
    let dev = opt
        .vars()
        .first()
        .map(|v| v.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let lora = candle_core::safetensors::load(dir.join("lora.safetensors"), &dev)?;
    for (i, v) in opt.vars().iter().enumerate() {
        let t = lora
            .get(&format!("lora.{i}"))
            .ok_or_else(|| io_err(dir, format!("lora.safetensors lacks lora.{i}")))?;
        if t.dims() != v.dims() {
            return Err(io_err(
                dir,
                format!(
                    "lora.{i} has shape {:?}, the model {:?}",
                    t.dims(),
                    v.dims()
                ),
            ));
        }
        v.set(&t.to_dtype(v.dtype())?)?;
    }
    let state = candle_core::safetensors::load(dir.join("optimizer.safetensors"), &dev)?;
    opt.load_state(&state)
        .map_err(|e| io_err(&dir.join("optimizer.safetensors"), e))?;
    let text = std::fs::read_to_string(dir.join("state.json")).map_err(|e| io_err(dir, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| io_err(dir, e))?;
    Ok((
        v["step"].as_u64().unwrap_or(0),
        v["refused_steps"].as_u64().unwrap_or(0) as usize,
    ))
}

/// Keeps the metrics rows of steps `<= step` (a resumed run rewrites what follows).
fn truncate_metrics(path: &Path, step: u64) -> Result<(), TrainError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(path, kept.as_bytes()).map_err(|e| io_err(path, e))
}

fn append_line(path: &Path, row: &Map<String, Value>) -> Result<(), TrainError> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    writeln!(f, "{}", Value::Object(row.clone())).map_err(|e| io_err(path, e))
}

/// Record-weighted mean of micro-batch metrics; optional ones over the micro-batches that have
/// them.
fn combine(parts: &[(usize, ObjectiveMetrics)]) -> Map<String, Value> {
    let total: usize = parts.iter().map(|(n, _)| n).sum();
    let mean = |f: &dyn Fn(&ObjectiveMetrics) -> f64| {
        parts.iter().map(|(n, m)| *n as f64 * f(m)).sum::<f64>() / total.max(1) as f64
    };
    let mean_opt = |f: &dyn Fn(&ObjectiveMetrics) -> Option<f64>| {
        let (s, n) = parts
            .iter()
            .fold((0.0, 0usize), |(s, c), (n, m)| match f(m) {
                Some(v) => (s + *n as f64 * v, c + n),
                None => (s, c),
            });
        (n > 0).then(|| s / n as f64)
    };
    let mut row = Map::new();
    let mut put = |k: &str, v: Option<f64>| {
        row.insert(k.into(), v.map_or(Value::Null, |v| json!(v)));
    };
    put("loss", Some(mean(&|m| m.loss)));
    put("loss/img", Some(mean(&|m| m.loss_img)));
    put("loss/text", Some(mean(&|m| m.loss_text)));
    put("loss/anchor", Some(mean(&|m| m.loss_anchor)));
    put("rewards/chosen", Some(mean(&|m| m.rewards_chosen)));
    put("rewards/rejected", Some(mean(&|m| m.rewards_rejected)));
    put("rewards/margins", Some(mean(&|m| m.rewards_margins)));
    put("rewards/accuracies", Some(mean(&|m| m.rewards_accuracies)));
    put(
        "rewards/img_negatives",
        mean_opt(&|m| m.rewards_img_negatives),
    );
    put(
        "rewards/img_accuracies",
        mean_opt(&|m| m.rewards_img_accuracies),
    );
    put("is/ess", mean_opt(&|m| m.is_ess));
    put("is/max_weight", mean_opt(&|m| m.is_max_weight));
    row
}

/// The records and everything derived from them that the loop reads.
struct Prepared {
    vlm: Vlm,
    items: Vec<TrainItem>,
    skipped: usize,
    without_negatives: usize,
    unreadable_negatives: usize,
    cache: RefCache,
}

/// Loads the base model with fresh adapters and the training set (writing `skipped.jsonl`,
/// also when nothing is usable), and opens the reference cache under the hash of everything a
/// reference value depends on.
fn prepare(cfg: &TrainConfig, inputs: &TrainInputs) -> Result<Prepared, TrainError> {
    let out = &inputs.out;
    let opts = VlmOptions {
        dtype: cfg.weights_dtype(),
        pad_to_square: cfg.pad_to_square,
        template: None,
        device: inputs.device.clone(),
    };
    let mut vlm = Vlm::load(&inputs.model, None, &opts)?;
    vlm.language_model_mut()
        .attach_lora(&cfg.lora(), &mut init_rng(cfg.seed))?;

    let records = read_records(&inputs.data, None, inputs.image_root.as_deref())
        .map_err(|e| TrainError::Input(e.to_string()))?;
    let skipped_path = out.join("skipped.jsonl");
    let write_skips = |skips: &[crate::data::Skip]| -> Result<(), TrainError> {
        let text: String = skips
            .iter()
            .map(|s| serde_json::to_string(s).unwrap_or_default() + "\n")
            .collect();
        write_atomic(&skipped_path, text.as_bytes()).map_err(|e| io_err(out, e))
    };
    write_skips(&records.skipped)?;
    let set = data::build(
        &vlm,
        records.records,
        records.skipped,
        inputs.negatives.as_deref(),
        inputs.pool.as_deref(),
        cfg,
    )?;
    write_skips(&set.skipped)?;
    if set.items.is_empty() {
        return Err(TrainError::Input(format!(
            "no usable records (listed in {}): {}",
            skipped_path.display(),
            crate::data::describe_skips(&set.skipped, 3)
        )));
    }

    let mut h = Fnv::default();
    hash_model(&inputs.model, &mut h)?;
    h.str(&cfg.dtype);
    h.str(&format!("{}", cfg.pad_to_square));
    // Reference values differ in their last bits between devices and kernels: a cache made on
    // one is not reused on another.
    h.str(&crate::device::name(&inputs.device));
    h.str(&format!("{:?}", crate::kernels::kernels()));
    h.str(&vlm.processor_key());
    hash_items(&set.items, &mut h);
    let cache = RefCache::open(&out.join("reference"), h.finish())?;
    Ok(Prepared {
        vlm,
        skipped: set.skipped.len(),
        without_negatives: set.without_negatives,
        unreadable_negatives: set.unreadable_negatives,
        items: set.items,
        cache,
    })
}

/// Optimiser steps per epoch, in all, and of warmup.
struct Schedule {
    steps_per_epoch: u64,
    total: u64,
    warmup: u64,
}

impl Schedule {
    fn new(records: usize, cfg: &TrainConfig) -> Self {
        let steps_per_epoch = records.div_ceil(cfg.batch_size) as u64;
        let mut total = steps_per_epoch * cfg.epochs as u64;
        if cfg.max_steps > 0 {
            total = total.min(cfg.max_steps as u64);
        }
        Self {
            steps_per_epoch,
            total,
            warmup: (cfg.warmup_ratio * total as f64).ceil() as u64,
        }
    }
}

/// What the forward and backward passes of one optimiser step's micro-batches produced.
struct Accumulated {
    grads: Vec<Option<Tensor>>,
    /// Records and metrics of each micro-batch whose loss was finite.
    parts: Vec<(usize, ObjectiveMetrics)>,
    tokens: usize,
    /// Records of micro-batches whose loss was not finite (left out of the gradient).
    non_finite: Vec<String>,
}

/// An allocation failure in a step (CUDA's CUDA_ERROR_OUT_OF_MEMORY, or the host's) as an
/// error that names the config keys which lower a step's peak and are not yet at their
/// lowest; any other error unchanged.
fn out_of_memory_hint(e: TrainError, cfg: &TrainConfig) -> TrainError {
    let text = e.to_string();
    let lower = text.to_lowercase();
    if !(lower.contains("out_of_memory")
        || lower.contains("out of memory")
        || lower.contains("cannot allocate memory"))
    {
        return e;
    }
    let mut keys = Vec::new();
    if !cfg.gradient_checkpointing {
        keys.push("gradient_checkpointing = true".to_string());
    }
    if cfg.sequence_group != 1 {
        keys.push("sequence_group = 1".to_string());
    }
    if cfg.micro_batch_size > 1 {
        keys.push(format!(
            "micro_batch_size = 1 (with batch_size = {} kept, the gradient is the same)",
            cfg.batch_size
        ));
    }
    if cfg.logprob_chunk == 0 || cfg.logprob_chunk > 16 {
        keys.push("logprob_chunk = 16".to_string());
    }
    if cfg.lora_dropout > 0.0 {
        keys.push("lora_dropout = 0".to_string());
    }
    if cfg.dtype == "f32" {
        keys.push("dtype = \"bf16\"".to_string());
    }
    let hint = if keys.is_empty() {
        "none left in the config: a smaller lora_r, fewer negatives (k) or shorter records"
            .to_string()
    } else {
        keys.join(", ")
    };
    TrainError::OutOfMemory { cause: text, hint }
}

/// Forward and backward over `batch` in micro-batches, gradients summed (each micro-batch's
/// loss is its records' share of the batch mean). Dropout masks are seeded by
/// `(seed, step, micro-batch)`, so a resumed run draws the same ones.
fn accumulate(
    vlm: &Vlm,
    cache: &mut RefCache,
    batch: &[&TrainItem],
    step: u64,
    cfg: &TrainConfig,
    pixels: &PixelCache,
    vars: &[candle_core::Var],
) -> Result<Accumulated, TrainError> {
    let k = if cfg.uses_images() { cfg.k } else { 0 };
    let objective = cfg.objective();
    let switch = vlm.language_model().lora_switch().clone();
    let mut acc = GradAccumulator::new(vars.len());
    let mut out = Accumulated {
        grads: Vec::new(),
        parts: Vec::new(),
        tokens: 0,
        non_finite: Vec::new(),
    };
    switch.set_training(true);
    let memory = cfg.memory();
    for (m, micro) in batch.chunks(cfg.micro_batch_size).enumerate() {
        switch.set_dropout_seed(splitmix64(cfg.seed ^ splitmix64(step * 4096 + m as u64)));
        // Each micro-batch's loss is its records' share of the batch mean.
        let scale = 1.0 / batch.len() as f64;
        let o = micro_step(
            vlm, micro, k, &objective, pixels, cache, &memory, scale, vars,
        )
        .map_err(|e| out_of_memory_hint(e, cfg))?;
        out.tokens += o.tokens;
        let Some(grads) = o.grads else {
            out.non_finite.extend(micro.iter().map(|r| r.id.clone()));
            continue;
        };
        acc.add_sums(grads)?;
        out.parts.push((micro.len(), o.objective.metrics()?));
    }
    switch.set_training(false);
    out.grads = acc.take();
    Ok(out)
}

/// Runs (or resumes) training; see the module doc for what is written.
pub fn train(cfg: &TrainConfig, inputs: &TrainInputs) -> Result<TrainSummary, TrainError> {
    // Set-up: the output folder (refusing a resume on other settings or inputs), the model,
    // the data, the reference cache, the schedule and the optimiser.
    let start = Instant::now();
    cfg.validate()?;
    prepare_out(cfg, inputs)?;
    let out = &inputs.out;
    let rss_before_load = crate::rss::current_mib();
    let mut p = prepare(cfg, inputs)?;
    let n = p.items.len();
    let sched = Schedule::new(n, cfg);
    let vars = p.vlm.language_model().trainable_vars();
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWConfig {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            ..AdamWConfig::default()
        },
    )?;

    // Resume: the adapter, the optimiser and the step counter of the latest checkpoint.
    let metrics_path = out.join("metrics.jsonl");
    let (mut step, mut refused) = (0u64, 0usize);
    if inputs.resume {
        if let Some((s, dir)) = latest_checkpoint(out) {
            (step, refused) = restore(&dir, &mut opt)?;
            debug_assert_eq!(s, step);
            tracing::info!("resuming from {} (step {step})", dir.display());
        }
        truncate_metrics(&metrics_path, step)?;
    } else {
        write_atomic(&metrics_path, b"").map_err(|e| io_err(&metrics_path, e))?;
    }

    let pixels = PixelCache::new(2 << 30);
    let flag = interrupted();
    let bar = crate::progress::bar(inputs.progress, sched.total, "training", "steps");
    bar.set_position(step);
    let mut rows = Vec::new();
    let mut epoch_seconds = Vec::new();
    let mut epoch_start = Instant::now();
    let mut order_epoch = u64::MAX;
    let mut order = Vec::new();
    while step < sched.total {
        // The batch: the next `batch_size` records of this epoch's seeded order.
        let epoch = step / sched.steps_per_epoch;
        if epoch != order_epoch {
            if order_epoch != u64::MAX {
                epoch_seconds.push(epoch_start.elapsed().as_secs_f64());
                epoch_start = Instant::now();
            }
            order = epoch_order(n, cfg.seed, epoch);
            order_epoch = epoch;
        }
        let b = (step % sched.steps_per_epoch) as usize;
        let batch: Vec<&TrainItem> = order[b * cfg.batch_size..((b + 1) * cfg.batch_size).min(n)]
            .iter()
            .map(|&i| &p.items[i])
            .collect();

        // Forward and backward per micro-batch, then clipping.
        let t0 = Instant::now();
        let peak_reset = crate::rss::reset_peak();
        let rss_at_start = crate::rss::current_mib();
        let mut acc = accumulate(&p.vlm, &mut p.cache, &batch, step, cfg, &pixels, &vars)?;
        let norm = if cfg.max_grad_norm > 0.0 {
            clip_grad_norm(&mut acc.grads, cfg.max_grad_norm)?
        } else {
            grad_norm(&acc.grads)?
        };

        // The update, or its refusal: a non-finite loss, gradient or update leaves the adapter
        // at its last good values.
        let lr = cfg.lr * cosine_with_warmup(step, sched.warmup, sched.total);
        let refusal = if !acc.non_finite.is_empty() {
            Some(format!("non-finite loss in records {:?}", acc.non_finite))
        } else if !norm.is_finite() {
            Some(format!("non-finite gradient (norm {norm})"))
        } else if !opt.step(&acc.grads, lr)? {
            Some("non-finite update (AdamW's new values)".to_string())
        } else {
            None
        };

        // Log the step.
        step += 1;
        let secs = t0.elapsed().as_secs_f64();
        let mut row = match &refusal {
            None => combine(&acc.parts),
            Some(reason) => {
                refused += 1;
                let ids: Vec<&str> = batch.iter().map(|r| r.id.as_str()).collect();
                tracing::warn!(
                    "step {step} refused: {reason}; records {ids:?}; the adapter keeps its last good values"
                );
                let mut row = Map::new();
                row.insert("refused".into(), json!(true));
                row.insert("refused_reason".into(), json!(reason));
                row
            }
        };
        row.insert("step".into(), json!(step));
        row.insert(
            "epoch".into(),
            json!(step as f64 / sched.steps_per_epoch as f64),
        );
        row.insert(
            "grad_norm".into(),
            if norm.is_finite() {
                json!(norm)
            } else {
                Value::Null
            },
        );
        row.insert("lr".into(), json!(lr));
        row.insert("step_seconds".into(), json!(secs));
        row.insert(
            "tokens_per_s".into(),
            json!(acc.tokens as f64 / secs.max(1e-9)),
        );
        row.insert("records".into(), json!(batch.len()));
        // The process's peak resident memory during this step (Linux), and what it held before
        // the model was loaded: the memory model's check (`misp bench memory`).
        if let (true, Some(peak)) = (peak_reset, crate::rss::peak_mib()) {
            row.insert("memory/step_peak_rss_mib".into(), json!(peak));
        }
        if let Some(at) = rss_at_start {
            row.insert("memory/rss_at_step_start_mib".into(), json!(at));
        }
        if let Some(base) = rss_before_load {
            row.insert("memory/rss_before_load_mib".into(), json!(base));
        }
        append_line(&metrics_path, &row)?;
        bar.set_message(format!(
            "loss {:.4} margin {:.3} {:.0} tok/s",
            row.get("loss").and_then(Value::as_f64).unwrap_or(f64::NAN),
            row.get("rewards/margins")
                .and_then(Value::as_f64)
                .unwrap_or(f64::NAN),
            acc.tokens as f64 / secs.max(1e-9)
        ));
        bar.inc(1);
        rows.push(row);

        // Checkpoint: periodically, at the end, and when interrupted (then stop).
        let stop_now = flag.load(Ordering::Relaxed) || inputs.stop_after == Some(step);
        let periodic = cfg.checkpoint_every > 0 && step % cfg.checkpoint_every as u64 == 0;
        if stop_now || periodic || step == sched.total {
            checkpoint(
                out,
                step,
                &p.vlm,
                &opt,
                cfg,
                &inputs.model,
                refused,
                &mut p.cache,
            )?;
        }
        if stop_now && step < sched.total {
            bar.abandon();
            return Err(TrainError::Interrupted { step });
        }
    }
    bar.finish_and_clear();
    epoch_seconds.push(epoch_start.elapsed().as_secs_f64());
    p.cache.save()?;

    // Finish: a run whose every step was refused trained nothing and fails; otherwise the
    // adapter and the report.
    if refused as u64 == step {
        return Err(TrainError::AllRefused {
            steps: step,
            metrics: metrics_path,
        });
    }
    let adapter = out.join("adapter");
    let lora = cfg.lora();
    p.vlm
        .save_adapter(&adapter, &lora, &inputs.model.to_string_lossy())?;
    let summary = TrainSummary {
        steps: step,
        records: n,
        skipped: p.skipped,
        refused_steps: refused,
        epoch_seconds,
        seconds: start.elapsed().as_secs_f64(),
        metrics: rows,
        adapter,
    };
    super::report::write(
        out,
        cfg,
        &summary,
        p.without_negatives,
        p.unreadable_negatives,
    )?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oom() -> TrainError {
        TrainError::Candle(candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        ))
    }

    #[test]
    fn an_out_of_memory_step_names_the_keys_that_reduce_memory() {
        let cfg = TrainConfig::default();
        let msg = out_of_memory_hint(oom(), &cfg).to_string();
        assert!(msg.contains("ran out of memory"), "{msg}");
        for key in [
            "gradient_checkpointing = true",
            "sequence_group = 1",
            "lora_dropout = 0",
        ] {
            assert!(msg.contains(key), "{key} missing from: {msg}");
        }
        // Keys already at their lowest are not suggested again.
        let cfg = TrainConfig {
            gradient_checkpointing: true,
            sequence_group: 1,
            micro_batch_size: 1,
            logprob_chunk: 16,
            lora_dropout: 0.0,
            dtype: "bf16".into(),
            ..TrainConfig::default()
        };
        let msg = out_of_memory_hint(oom(), &cfg).to_string();
        assert!(!msg.contains("gradient_checkpointing ="), "{msg}");
        assert!(msg.contains("none left in the config"), "{msg}");
    }

    #[test]
    fn other_errors_pass_unchanged() {
        let e = TrainError::Input("records.jsonl: line 3: no `chosen`".into());
        let msg = out_of_memory_hint(e, &TrainConfig::default()).to_string();
        assert_eq!(msg, "records.jsonl: line 3: no `chosen`");
    }
}
