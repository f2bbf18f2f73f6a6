//! `misp world pretrain`: the world's own tiny models (docs/design.md §6). A CLIP trained
//! contrastively on the world's (image, description) pairs, its vision tower also supervised per
//! grid cell ([`dense`]), then a LLaVA — that CLIP's vision tower (frozen by default, or
//! fine-tuned: [`PretrainConfig::tune_tower`]) + projector + small LLaMA — trained by supervised
//! fine-tuning on `sft.jsonl`. Both are saved in HF layouts that transformers loads.
//!
//! Stage: world -> models. Reads a world folder (`manifest.json`, `sft.jsonl`, `scenes.jsonl`, the records,
//! POPE and caption-prompt text for the vocabulary, images; POPE and CHAIR val files for the
//! report). Writes `OUT/shapes-clip/`, `OUT/shapes-llava/` ([`save`]), and next to them
//! `OUT/pretrain_config.json` (the resolved config), `OUT/pretrain_metrics.jsonl` (losses) and
//! `OUT/pretrain_report.json` (sizes, times, the base model's POPE / CHAIR on val).
//!
//! The loops live in [`clip`] and [`sft`]; this module reads the world, wires the stages and
//! writes the record of what was done.

pub mod clip;
pub mod dense;
pub mod eval;
pub mod init;
pub mod save;
pub mod sft;
pub mod tokenizer;

#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::eval::EvalError;
use crate::files::{self, FileError};
use crate::model::clip::image_processor::ImageProcessor;
use crate::model::clip::ClipTokenizer;
use crate::model::llava::processor::LlavaProcessor;
use crate::model::vlm::{PreparedScore, Vlm, VlmOptions};
use crate::model::ModelError;
use tokenizer::{Flavour, WorldTokenizer};

/// Everything that can stop a pretraining run, naming the file, line and field where one is
/// to blame.
#[derive(Debug, thiserror::Error)]
pub enum PretrainError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{}:{line}: field `{field}`: {message}", path.display())]
    Record {
        path: PathBuf,
        line: usize,
        field: &'static str,
        message: String,
    },
    #[error("{}: {message}", path.display())]
    Input { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("config: {0}")]
    Config(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Sizes of the two models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSizes {
    pub patch_size: usize,
    pub vision_hidden: usize,
    pub vision_layers: usize,
    pub vision_heads: usize,
    pub text_hidden: usize,
    pub text_layers: usize,
    pub text_heads: usize,
    /// CLIP text positions (the longest description is about 50 tokens).
    pub text_positions: usize,
    pub projection_dim: usize,
    pub llm_hidden: usize,
    pub llm_intermediate: usize,
    pub llm_layers: usize,
    pub llm_heads: usize,
    pub llm_positions: usize,
}

impl Default for ModelSizes {
    fn default() -> Self {
        Self {
            patch_size: 16,
            vision_hidden: 64,
            vision_layers: 2,
            vision_heads: 4,
            text_hidden: 64,
            text_layers: 2,
            text_heads: 4,
            text_positions: 64,
            projection_dim: 64,
            llm_hidden: 128,
            llm_intermediate: 344,
            llm_layers: 2,
            llm_heads: 4,
            llm_positions: 256,
        }
    }
}

/// One optimisation run (AdamW, cosine schedule with linear warm-up, global-norm clipping).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub warmup: usize,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
}

/// The whole run. Missing fields take their defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainConfig {
    pub seed: u64,
    pub sizes: ModelSizes,
    pub clip: TrainConfig,
    pub sft: TrainConfig,
    /// Share of SFT questions asked with LLaVA-1.5's short-answer suffix (the POPE prompt's),
    /// so evaluation prompts are not out of distribution; the answer stays the full sentence.
    pub suffix_share: f64,
    /// World split the report evaluates (val: tuning never looks at test).
    pub eval_split: String,
    pub eval_batch: usize,
    /// Skip the report's POPE / CHAIR evaluation (tests).
    pub skip_eval: bool,
    /// Weight of the dense per-cell loss ([`dense`]) added to the CLIP's contrastive loss; 0
    /// turns it off. Without it the tower never encodes shape and the LLaVA names shapes from
    /// the text prior alone (measured 2026-11-27 before dense training: shape words of val descriptions 0.28 with the
    /// scene's own image vs 0.31 with another's).
    pub dense_weight: f64,
    /// Fine-tune the vision tower (initialised from the trained CLIP) during SFT instead of
    /// freezing it, as LLaVA-1.5 does. Off by default: measured in torch (2026-11-27, `bench/world_grounding/`),
    /// a tower tuned through the language loss from the first step loses the shape its dense
    /// training gave it (readout 0.39 tuned vs 0.78 frozen). It was on while the tower had no
    /// dense training: then tuning was what let the LLaVA see colour and position at all.
    pub tune_tower: bool,
    /// Reuse the CLIP weights of this folder instead of training them (to tune the SFT alone).
    /// The random stream is consumed as training would, so with the same seed and CLIP config
    /// the LLaVA is the one the full run would train.
    pub clip_from: Option<PathBuf>,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            sizes: ModelSizes::default(),
            clip: TrainConfig {
                // 800: with transformers' initialisation the loss is still falling at 300
                // (1.82, 41 % in-batch accuracy); at 800 it is 0.27 (3 min on 2 cores).
                steps: 800,
                batch: 64,
                lr: 2e-3,
                warmup: 40,
                weight_decay: 0.1,
                max_grad_norm: 1.0,
            },
            sft: TrainConfig {
                steps: 2000,
                batch: 32,
                lr: 1e-3,
                warmup: 50,
                weight_decay: 0.0,
                max_grad_norm: 1.0,
            },
            suffix_share: 0.5,
            eval_split: "val".into(),
            eval_batch: 64,
            skip_eval: false,
            clip_from: None,
            dense_weight: 10.0,
            tune_tower: false,
        }
    }
}

impl PretrainConfig {
    /// The `--quick` preset: same models, a fraction of the steps.
    pub fn quick() -> Self {
        let d = Self::default();
        Self {
            clip: TrainConfig {
                steps: 60,
                ..d.clip.clone()
            },
            sft: TrainConfig {
                steps: 100,
                ..d.sft.clone()
            },
            ..d
        }
    }
}

/// Preprocessed pixels of every image a run uses, decoded once (`[3, S, S]` each).
#[derive(Debug, Clone)]
pub struct PixelTable {
    pub size: usize,
    pub pixels: Vec<Vec<f32>>,
    pub index: HashMap<String, usize>,
}

impl PixelTable {
    /// Decodes `names` (relative to `root`) in parallel; a bad image is an error naming it.
    pub fn load(
        root: &Path,
        names: &[String],
        proc: &ImageProcessor,
        size: usize,
    ) -> Result<Self, PretrainError> {
        let pixels = names
            .par_iter()
            .map(|n| {
                let path = root.join(n);
                let img = proc.decode_file(&path).map_err(|e| PretrainError::Input {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
                let px = proc.pixels(&img);
                if px.len() != 3 * size * size {
                    return Err(PretrainError::Input {
                        path,
                        message: format!(
                            "preprocessed to {} values, expected 3 x {size} x {size}",
                            px.len()
                        ),
                    });
                }
                Ok(px)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let index = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        Ok(Self {
            size,
            pixels,
            index,
        })
    }

    /// `[B, 3, S, S]` of the images at `idx`.
    pub fn batch(&self, idx: &[usize], device: &Device) -> candle_core::Result<Tensor> {
        let s = self.size;
        let mut flat = Vec::with_capacity(idx.len() * 3 * s * s);
        for &i in idx {
            flat.extend_from_slice(&self.pixels[i]);
        }
        Tensor::from_vec(flat, (idx.len(), 3, s, s), device)
    }
}

/// One row of `sft.jsonl`.
#[derive(Debug, Clone, Deserialize)]
pub struct SftRow {
    pub id: String,
    pub image: String,
    pub prompt: String,
    pub response: String,
    pub kind: String,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct PretrainReport {
    pub clip_dir: PathBuf,
    pub llava_dir: PathBuf,
    pub clip_params: usize,
    pub llava_params: usize,
    pub llava_trained_params: usize,
    pub clip_bytes: u64,
    pub llava_bytes: u64,
    pub vocab_size: usize,
    pub clip_seconds: f64,
    pub sft_seconds: f64,
    pub eval_seconds: f64,
    pub final_clip_loss: f64,
    /// Shape accuracy of the dense heads on the eval split's visible objects (cells the tower
    /// never trained on); `None` without dense training.
    pub dense_shape_accuracy: Option<f64>,
    pub final_sft_loss: f64,
    pub eval: Option<eval::BaseEval>,
}

pub(crate) fn make_dir(dir: &Path) -> Result<(), PretrainError> {
    std::fs::create_dir_all(dir).map_err(|e| FileError::new(dir, e))?;
    Ok(())
}

/// Reads `sft.jsonl`, each error naming file, line and field.
pub fn read_sft(path: &Path) -> Result<Vec<SftRow>, PretrainError> {
    let mut rows = Vec::new();
    for (line, text) in files::read_lines(path)? {
        let row: SftRow = serde_json::from_str(&text).map_err(|e| PretrainError::Record {
            path: path.to_owned(),
            line,
            field: "row",
            message: e.to_string(),
        })?;
        if row.response.trim().is_empty() {
            return Err(PretrainError::Record {
                path: path.to_owned(),
                line,
                field: "response",
                message: "empty".into(),
            });
        }
        rows.push(row);
    }
    if rows.is_empty() {
        return Err(PretrainError::Input {
            path: path.to_owned(),
            message: "no rows".into(),
        });
    }
    Ok(rows)
}

/// The world's image size, from `manifest.json`'s `config.image_size`.
fn world_image_size(world: &Path) -> Result<usize, PretrainError> {
    let path = world.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|e| FileError::new(&path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| PretrainError::Input {
        path: path.clone(),
        message: e.to_string(),
    })?;
    v.pointer("/config/image_size")
        .and_then(Value::as_u64)
        .map(|s| s as usize)
        .ok_or(PretrainError::Record {
            path,
            line: 1,
            field: "config.image_size",
            message: "missing or not a number".into(),
        })
}

/// Every scene of the world's `scenes.jsonl`, in file order.
fn read_scenes(world: &Path) -> Result<Vec<crate::world::scene::Scene>, PretrainError> {
    let path = world.join("scenes.jsonl");
    files::read_lines(&path)?
        .into_iter()
        .map(|(line, text)| {
            serde_json::from_str(&text).map_err(|e| PretrainError::Record {
                path: path.clone(),
                line,
                field: "scene",
                message: e.to_string(),
            })
        })
        .collect()
}

/// The dense targets of every image in `pixels` (an image without a scene is an error naming
/// both).
fn scene_targets(
    world: &Path,
    scenes: &[crate::world::scene::Scene],
    pixels: &PixelTable,
    grid: usize,
) -> Result<Vec<dense::CellTargets>, PretrainError> {
    let by_image: HashMap<&str, &crate::world::scene::Scene> =
        scenes.iter().map(|s| (s.image.as_str(), s)).collect();
    let mut names: Vec<(&String, &usize)> = pixels.index.iter().collect();
    names.sort_by_key(|(_, &i)| i);
    names
        .into_iter()
        .map(|(name, _)| {
            by_image
                .get(name.as_str())
                .map(|s| dense::cell_targets(s, grid))
                .ok_or_else(|| PretrainError::Input {
                    path: world.join("scenes.jsonl"),
                    message: format!("no scene for image `{name}` (used by sft.jsonl)"),
                })
        })
        .collect()
}

/// Every text of the world the models may meet: SFT rows, preference records, POPE questions,
/// the captioning prompt, the template and the POPE suffix.
fn world_texts(world: &Path, sft: &[SftRow]) -> Result<Vec<String>, PretrainError> {
    let mut texts: Vec<String> = Vec::new();
    for r in sft {
        texts.push(r.prompt.clone());
        texts.push(r.response.clone());
    }
    let mut jsonl: Vec<PathBuf> =
        vec![world.join("records.jsonl"), world.join("records_val.jsonl")];
    if let Ok(dir) = std::fs::read_dir(world.join("pope")) {
        let mut pope: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        pope.sort();
        jsonl.extend(pope);
    }
    for path in jsonl.iter().filter(|p| p.is_file()) {
        for (_, line) in files::read_lines(path)? {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                for key in ["prompt", "chosen", "rejected", "text"] {
                    if let Some(s) = v.get(key).and_then(Value::as_str) {
                        texts.push(s.to_string());
                    }
                }
            }
        }
    }
    if let Ok(p) = std::fs::read_to_string(world.join("captions_prompt.txt")) {
        texts.push(p);
    }
    texts.push(crate::model::llava::processor::DEFAULT_TEMPLATE.replace("<image>", " "));
    texts.push(eval::POPE_SUFFIX.to_string());
    Ok(texts)
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn count(params: &init::Params) -> usize {
    params.iter().map(|(_, v)| v.as_tensor().elem_count()).sum()
}

/// Trains both models from the world in `world` into `out` (module docs for the files).
pub fn run(
    world: &Path,
    out: &Path,
    cfg: &PretrainConfig,
    device: &Device,
    progress: bool,
) -> Result<PretrainReport, PretrainError> {
    let device = device.clone();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let image_size = world_image_size(world)?;
    if cfg.sizes.patch_size == 0 || image_size % cfg.sizes.patch_size != 0 {
        return Err(PretrainError::Config(format!(
            "sizes.patch_size {} does not divide the world's image_size {image_size}",
            cfg.sizes.patch_size
        )));
    }
    let sft_path = world.join("sft.jsonl");
    let rows = read_sft(&sft_path)?;

    // Tokenizers and every non-weight file, first: the trainers read the tokenizers from disk.
    let texts = world_texts(world, &rows)?;
    let words = tokenizer::world_words(texts.iter().map(String::as_str))?;
    let clip_tok = WorldTokenizer::build(&words, Flavour::Clip);
    let llava_tok = WorldTokenizer::build(&words, Flavour::Llava);
    let (clip_dir, llava_dir) = (out.join("shapes-clip"), out.join("shapes-llava"));
    let clip_json = save::clip_json(&cfg.sizes, image_size, &clip_tok);
    let llava_json = save::llava_json(&cfg.sizes, image_size, &llava_tok);
    let clip_cfg = save::clip_config(&clip_json)?;
    let llava_cfg = save::llava_config(&llava_json)?;
    save::write_clip_files(
        &clip_dir,
        &clip_json,
        &clip_tok,
        image_size,
        cfg.sizes.text_positions,
    )?;
    save::write_llava_files(&llava_dir, &llava_json, &llava_tok, &cfg.sizes, image_size)?;
    make_dir(out)?;
    files::write_json_atomic(&out.join("pretrain_config.json"), cfg)?;
    let mut metrics: Vec<Value> = Vec::new();

    let images = ImageProcessor::from_checkpoint(&clip_dir, image_size).map_err(|e| {
        PretrainError::Input {
            path: clip_dir.join("preprocessor_config.json"),
            message: e.to_string(),
        }
    })?;
    let names: Vec<String> = rows
        .iter()
        .map(|r| r.image.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let pixels = PixelTable::load(world, &names, &images, image_size)?;

    // CLIP.
    let t0 = Instant::now();
    let clip_tokenizer = ClipTokenizer::load(&clip_dir)?;
    let pairs = clip::description_pairs(&rows, &pixels);
    let clip_params = init::clip_params(&clip_cfg, &mut rng, &device)?;
    let mut final_clip_loss = f64::NAN;
    let mut dense_shape_accuracy = None;
    if let Some(from) = &cfg.clip_from {
        let path = from.join("model.safetensors");
        let trained =
            candle_core::safetensors::load(&path, &device).map_err(|e| PretrainError::Input {
                path: path.clone(),
                message: e.to_string(),
            })?;
        clip::batch_plan(&pairs, &cfg.clip, &mut rng);
        for (name, var) in &clip_params {
            let t = trained.get(name).ok_or_else(|| PretrainError::Input {
                path: path.clone(),
                message: format!("no tensor `{name}`"),
            })?;
            var.set(t).map_err(|e| PretrainError::Input {
                path: path.clone(),
                message: format!("tensor `{name}`: {e}"),
            })?;
        }
    } else {
        let scenes = if cfg.dense_weight > 0.0 {
            read_scenes(world)?
        } else {
            Vec::new()
        };
        let dense = if cfg.dense_weight > 0.0 {
            // The heads draw from their own stream so the main one (and with it the LLaVA's
            // initialisation) is the same with or without them.
            let mut head_rng = StdRng::seed_from_u64(cfg.seed ^ 0xde75e);
            let v = &clip_cfg.vision_config;
            Some(dense::DenseTask {
                heads: dense::dense_head_params(v.hidden_size, &mut head_rng, &device)?,
                targets: scene_targets(world, &scenes, &pixels, image_size / cfg.sizes.patch_size)?,
                weight: cfg.dense_weight,
                // The LLaVA reads hidden_states[-2] (`vision_feature_layer` in save.rs).
                layer: v.num_hidden_layers.saturating_sub(1),
            })
        } else {
            None
        };
        let bar = crate::progress::bar(progress, cfg.clip.steps as u64, "clip", "steps");
        clip::train_clip(
            &clip_params,
            &clip_cfg,
            &clip_tokenizer,
            &pixels,
            &pairs,
            dense.as_ref(),
            &cfg.clip,
            &mut rng,
            &mut |s| {
                bar.inc(1);
                let mut line = json!({"stage": "clip", "step": s.step, "loss": s.loss, "accuracy": s.accuracy, "lr": s.lr});
                match s.dense {
                    Some((d, shape)) => {
                        bar.set_message(format!(
                            "loss {:.3} acc {:.2} dense {d:.3} shape {shape:.2}",
                            s.loss, s.accuracy
                        ));
                        line["dense_loss"] = json!(d);
                        line["dense_shape_accuracy"] = json!(shape);
                    }
                    None => bar.set_message(format!("loss {:.3} acc {:.2}", s.loss, s.accuracy)),
                }
                final_clip_loss = s.loss;
                if s.step % 10 == 0 || s.step + 1 == cfg.clip.steps {
                    metrics.push(line);
                }
            },
        )?;
        bar.finish();
        if let Some(task) = &dense {
            // How well the tower LLaVA will read sees shapes on images it never trained on.
            let grid = image_size / cfg.sizes.patch_size;
            let held: Vec<_> = scenes
                .iter()
                .filter(|s| s.split.name() == cfg.eval_split)
                .collect();
            let names: Vec<String> = held.iter().map(|s| s.image.clone()).collect();
            let held_pixels = PixelTable::load(world, &names, &images, image_size)?;
            let targets = held.iter().map(|s| dense::cell_targets(s, grid)).collect();
            let model = clip::clip_model(&clip_params, &clip_cfg, &device)?;
            dense_shape_accuracy = Some(dense::heldout_shape_accuracy(
                &model,
                task,
                &held_pixels,
                targets,
            )?);
        }
    }
    let clip_tensors: HashMap<String, Tensor> = clip_params
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect();
    save::write_weights(&clip_dir, &clip_tensors)?;
    let clip_seconds = t0.elapsed().as_secs_f64();

    // LLaVA: the CLIP's vision tower (frozen unless tune_tower) under LLaVA's names.
    let t1 = Instant::now();
    let tower: HashMap<String, Tensor> = clip_tensors
        .iter()
        .filter_map(|(n, t)| {
            n.strip_prefix("vision_model.")
                .map(|rest| (format!("vision_tower.{rest}"), t.clone()))
        })
        .collect();
    let mut llava_params = init::llava_trainable_params(&llava_cfg, &mut rng, &device)?;
    if cfg.tune_tower {
        // Vars over copies: the CLIP's own tensors (saved above) stay as trained.
        let mut names: Vec<&String> = tower.keys().collect();
        names.sort();
        for n in names {
            llava_params.push((n.clone(), candle_core::Var::from_tensor(&tower[n].copy()?)?));
        }
    }
    let processor = LlavaProcessor::from_dir(&llava_dir, &llava_cfg)?;
    let mut examples = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        let suffix = r.kind != "description"
            && (files::record_seed(cfg.seed, &r.id, 1) as f64 / u64::MAX as f64) < cfg.suffix_share;
        let prompt = if suffix {
            format!("{}{}", r.prompt, eval::POPE_SUFFIX)
        } else {
            r.prompt.clone()
        };
        let (prompt_ids, response_ids) =
            processor
                .scored_ids(&prompt, &r.response)
                .map_err(|e| PretrainError::Record {
                    path: sft_path.clone(),
                    line: i + 1,
                    field: "prompt/response",
                    message: e.to_string(),
                })?;
        examples.push(sft::Example {
            image: pixels.index[&r.image],
            ids: PreparedScore {
                prompt_ids,
                response_ids,
                pixels: Vec::new(),
                grid: None,
            },
        });
    }
    let model = sft::llava_model(&tower, &llava_params, &llava_cfg, &device)?;
    let vlm = Vlm::from_parts(model, processor, images.clone(), device.clone());
    let bar = crate::progress::bar(progress, cfg.sft.steps as u64, "sft", "steps");
    let mut final_sft_loss = f64::NAN;
    sft::train_sft(
        &vlm,
        &llava_params,
        &examples,
        &pixels,
        &cfg.sft,
        &mut rng,
        &mut |step, loss, lr| {
            bar.inc(1);
            bar.set_message(format!("loss {loss:.3}"));
            final_sft_loss = loss;
            if step % 10 == 0 || step + 1 == cfg.sft.steps {
                metrics.push(json!({"stage": "sft", "step": step, "loss": loss, "lr": lr}));
            }
        },
    )?;
    bar.finish();
    let mut llava_tensors = tower.clone();
    for (n, v) in &llava_params {
        llava_tensors.insert(n.clone(), v.as_tensor().detach());
    }
    let llava_total: usize = llava_tensors.values().map(Tensor::elem_count).sum();
    save::write_weights(&llava_dir, &save::llava_disk_names(llava_tensors))?;
    let sft_seconds = t1.elapsed().as_secs_f64();
    let mut lines = String::new();
    for m in &metrics {
        lines.push_str(&m.to_string());
        lines.push('\n');
    }
    files::write_atomic(&out.join("pretrain_metrics.jsonl"), lines.as_bytes())?;

    // The base model's hallucination, from the saved folder (which also proves it loads).
    let t2 = Instant::now();
    let eval = if cfg.skip_eval {
        None
    } else {
        let saved = Vlm::load(&llava_dir, None, &VlmOptions::default())?;
        Some(eval::evaluate(
            &saved,
            world,
            &cfg.eval_split,
            cfg.eval_batch,
        )?)
    };
    let report = PretrainReport {
        clip_params: count(&clip_params),
        llava_params: llava_total,
        llava_trained_params: count(&llava_params),
        clip_bytes: file_size(&clip_dir.join("model.safetensors")),
        llava_bytes: file_size(&llava_dir.join("model.safetensors")),
        clip_dir,
        llava_dir,
        vocab_size: llava_tok.vocab_size,
        clip_seconds,
        sft_seconds,
        eval_seconds: t2.elapsed().as_secs_f64(),
        final_clip_loss,
        dense_shape_accuracy,
        final_sft_loss,
        eval,
    };
    files::write_json_atomic(&out.join("pretrain_report.json"), &report)?;
    Ok(report)
}
