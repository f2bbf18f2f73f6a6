//! Supervised fine-tuning of the world's LLaVA on `sft.jsonl`.
//!
//! Stage: world pretrain. The vision tower is the trained CLIP's. It is frozen by default (plain
//! tensors, not `Var`s, so no gradient is even computed for it), as LLaVA-1.5's is, or with
//! [`super::PretrainConfig::tune_tower`] fine-tuned with the rest (see there why it is off);
//! the projector and the whole LLaMA are always trained from random initialisation. The loss is
//! the mean negative log-likelihood of the response tokens (and the EOS after them) of a batch, with prompts scored exactly as the
//! scorer and the DPO trainer will later see them ([`crate::model::vlm`]).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::init::Params;
use super::{PixelTable, PretrainError, TrainConfig};
use crate::model::llava::{Llava, LlavaConfig};
use crate::model::vlm::{PreparedScore, Vlm};
use crate::optim::{clip_grad_norm, cosine_with_warmup, AdamW, AdamWConfig};

/// One SFT example: ids of prompt and response (pixels live in the table).
#[derive(Debug, Clone)]
pub struct Example {
    pub image: usize,
    pub ids: PreparedScore,
}

/// A LLaVA over the frozen tower tensors and the current values of the trainable `params`.
pub fn llava_model(
    tower: &HashMap<String, Tensor>,
    params: &Params,
    config: &LlavaConfig,
    device: &Device,
) -> Result<Llava, PretrainError> {
    let mut map = tower.clone();
    for (n, v) in params {
        map.insert(n.clone(), v.as_tensor().clone());
    }
    Ok(Llava::load(
        VarBuilder::from_tensors(map, DType::F32, device),
        config.clone(),
    )?)
}

/// Mean response-token NLL of `batch` under `vlm`.
pub fn sft_loss(
    vlm: &Vlm,
    batch: &[&Example],
    pixels: &PixelTable,
) -> Result<Tensor, PretrainError> {
    let idx: Vec<usize> = batch.iter().map(|e| e.image).collect();
    let px = pixels.batch(&idx, vlm.device())?;
    let items: Vec<&PreparedScore> = batch.iter().map(|e| &e.ids).collect();
    let (lp, n) = vlm.logprobs(&items, Some(&px))?;
    Ok((lp.sum_all()?.neg()? / n.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64)?)
}

/// Trains `params` in place; `vlm` must be built over them ([`llava_model`]). Shuffled epochs
/// over `examples`; `log(step, loss, lr)` after every step.
pub fn train_sft(
    vlm: &Vlm,
    params: &Params,
    examples: &[Example],
    pixels: &PixelTable,
    cfg: &TrainConfig,
    rng: &mut StdRng,
    log: &mut dyn FnMut(usize, f64, f64),
) -> Result<(), PretrainError> {
    if examples.is_empty() {
        return Err(PretrainError::Config(
            "SFT needs at least one example".into(),
        ));
    }
    let vars: Vec<_> = params.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWConfig {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            ..AdamWConfig::default()
        },
    )?;
    let batch = cfg.batch.clamp(1, examples.len());
    let mut order: Vec<usize> = Vec::new();
    for step in 0..cfg.steps {
        if order.len() < batch {
            let mut epoch: Vec<usize> = (0..examples.len()).collect();
            epoch.shuffle(rng);
            order.extend(epoch);
        }
        let chosen: Vec<&Example> = order.drain(..batch).map(|i| &examples[i]).collect();
        let loss = sft_loss(vlm, &chosen, pixels)?;
        let grads = loss.backward()?;
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
        log(step, loss.to_scalar::<f32>()? as f64, lr);
    }
    Ok(())
}
