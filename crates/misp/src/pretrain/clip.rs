//! Contrastive training of the world's CLIP on (image, description) pairs.
//!
//! Stage: world pretrain. Reads nothing itself: the caller passes preprocessed pixels and the
//! descriptions of `sft.jsonl`. The objective is CLIP's: a batch of `B` pairs gives the `B x B`
//! matrix of cosine similarities times `exp(logit_scale)` (the learned temperature), and the
//! loss is the mean of the two cross-entropies that pick each image's caption among the batch's
//! captions and each caption's image among the batch's images (symmetric InfoNCE). The vision
//! tower can also be supervised per grid cell at the same time ([`super::dense`]).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};

use super::dense::{dense_loss, DenseTask};
use super::init::Params;
use super::{PixelTable, PretrainError, TrainConfig};
use crate::model::clip::{ClipConfig, ClipModel, ClipTokenizer};
use crate::optim::{clip_grad_norm, cosine_with_warmup, AdamW, AdamWConfig};

/// One training pair: an image (index into the pixel table) and a text about it.
#[derive(Debug, Clone)]
pub struct Pair {
    pub image: usize,
    pub text: String,
}

/// The (image, description) pairs of `sft.jsonl`'s rows: what the CLIP is trained on.
pub fn description_pairs(rows: &[super::SftRow], pixels: &PixelTable) -> Vec<Pair> {
    rows.iter()
        .filter(|r| r.kind == "description")
        .map(|r| Pair {
            image: pixels.index[&r.image],
            text: r.response.clone(),
        })
        .collect()
}

/// A model built over the current values of `params` (it holds the `Var`s' tensors, so a
/// backward pass through it reaches them).
pub fn clip_model(
    params: &Params,
    config: &ClipConfig,
    device: &Device,
) -> Result<ClipModel, PretrainError> {
    let map: HashMap<String, Tensor> = params
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    Ok(ClipModel::new(
        VarBuilder::from_tensors(map, DType::F32, device),
        config.clone(),
    )?)
}

/// Symmetric InfoNCE of one batch: `(loss, image->text accuracy)`.
pub fn clip_loss(
    model: &ClipModel,
    tokenizer: &ClipTokenizer,
    pixels: &Tensor,
    texts: &[&str],
) -> Result<(Tensor, f64), PretrainError> {
    let img = model.embed_images(pixels)?;
    let txt = model.embed_texts(&tokenizer.encode(texts)?)?;
    let logits = img
        .matmul(&txt.t()?)?
        .broadcast_mul(&model.logit_scale.exp()?)?;
    let b = texts.len();
    let labels = Tensor::arange(0u32, b as u32, pixels.device())?;
    let l_i = candle_nn::loss::cross_entropy(&logits, &labels)?;
    let l_t = candle_nn::loss::cross_entropy(&logits.t()?.contiguous()?, &labels)?;
    let loss = ((l_i + l_t)? * 0.5)?;
    let hits: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
    let acc = hits
        .iter()
        .enumerate()
        .filter(|(i, &h)| *i as u32 == h)
        .count() as f64
        / b as f64;
    Ok((loss, acc))
}

/// The pair indices of every step's batch. Drawn up front, in the order training would draw
/// them, so a run that reuses a trained CLIP can consume the same random numbers without
/// training (and its LLaVA then starts from the very same generator state).
pub fn batch_plan(pairs: &[Pair], cfg: &TrainConfig, rng: &mut StdRng) -> Vec<Vec<usize>> {
    // Group pairs by image so a batch draws distinct images, then one of each image's texts.
    let mut by_image: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, p) in pairs.iter().enumerate() {
        by_image.entry(p.image).or_default().push(i);
    }
    let mut images: Vec<usize> = by_image.keys().copied().collect();
    images.sort_unstable();
    if images.is_empty() {
        return Vec::new();
    }
    let batch = cfg.batch.min(images.len()).max(1);
    let mut order: Vec<usize> = Vec::new();
    let mut plan = Vec::with_capacity(cfg.steps);
    for _ in 0..cfg.steps {
        if order.len() < batch {
            let mut epoch = images.clone();
            epoch.shuffle(rng);
            order.extend(epoch);
        }
        let chosen: Vec<usize> = order.drain(..batch).collect();
        plan.push(
            chosen
                .iter()
                .map(|img| {
                    let options = &by_image[img];
                    *options.choose(rng).unwrap_or(&options[0])
                })
                .collect(),
        );
    }
    plan
}

/// What one training step did.
#[derive(Debug, Clone, Copy)]
pub struct StepLog {
    pub step: usize,
    /// The contrastive loss.
    pub loss: f64,
    /// In-batch image -> text accuracy.
    pub accuracy: f64,
    /// The dense loss and the patch shape accuracy, when a [`DenseTask`] is trained.
    pub dense: Option<(f64, f64)>,
    pub lr: f64,
}

/// Trains `params` in place for `cfg.steps` steps of `cfg.batch` pairs, with `dense`'s heads and
/// per-cell loss (weighted) added to the contrastive one when given. A batch never holds the
/// same image twice (its captions would be false negatives of each other by construction).
/// `log` is called after every step.
#[allow(clippy::too_many_arguments)]
pub fn train_clip(
    params: &Params,
    config: &ClipConfig,
    tokenizer: &ClipTokenizer,
    pixels: &PixelTable,
    pairs: &[Pair],
    dense: Option<&DenseTask>,
    cfg: &TrainConfig,
    rng: &mut StdRng,
    log: &mut dyn FnMut(StepLog),
) -> Result<(), PretrainError> {
    if pairs.len() < 2 {
        return Err(PretrainError::Config(format!(
            "CLIP training needs at least 2 (image, description) pairs, found {}",
            pairs.len()
        )));
    }
    // Batches go where the parameters are.
    let device = params
        .first()
        .map_or(Device::Cpu, |(_, v)| v.device().clone());
    let vars: Vec<_> = params
        .iter()
        .chain(dense.map(|d| d.heads.iter()).into_iter().flatten())
        .map(|(_, v)| v.clone())
        .collect();
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWConfig {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            ..AdamWConfig::default()
        },
    )?;
    let plan = batch_plan(pairs, cfg, rng);
    for (step, picked) in plan.iter().enumerate() {
        let picked: Vec<&Pair> = picked.iter().map(|&i| &pairs[i]).collect();
        let images: Vec<usize> = picked.iter().map(|p| p.image).collect();
        let px = pixels.batch(&images, &device)?;
        let texts: Vec<&str> = picked.iter().map(|p| p.text.as_str()).collect();
        let model = clip_model(params, config, &device)?;
        let (loss, acc) = clip_loss(&model, tokenizer, &px, &texts)?;
        let (total, dense_log) = match dense {
            Some(task) => {
                let (d, shape_acc, _) = dense_loss(&model, task, &px, &images)?;
                let dl = d.to_scalar::<f32>()? as f64;
                ((&loss + (d * task.weight)?)?, Some((dl, shape_acc)))
            }
            None => (loss.clone(), None),
        };
        let grads = total.backward()?;
        let mut g: Vec<Option<Tensor>> = vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).cloned())
            .collect();
        clip_grad_norm(&mut g, cfg.max_grad_norm)?;
        let lr = cfg.lr * cosine_with_warmup(step as u64, cfg.warmup as u64, cfg.steps as u64);
        if !opt.step(&g, lr)? {
            let why = format!("step {step}: non-finite update (loss or gradients diverged)");
            return Err(candle_core::Error::Msg(why).into());
        }
        log(StepLog {
            step,
            loss: loss.to_scalar::<f32>()? as f64,
            accuracy: acc,
            dense: dense_log,
            lr,
        });
    }
    Ok(())
}
