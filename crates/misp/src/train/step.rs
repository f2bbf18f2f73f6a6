//! One micro-batch: the `K + 2` sequences of each record (`y_p` with `m_p`, `y_p` with each
//! negative, `y_n` with `m_p`) in one batched forward, the reference values beside them, and
//! the objective of Eq. 10 on top.
//!
//! Stage: train. Reads images through the [`PixelCache`]; writes nothing.

use candle_core::{DType, Tensor};

use super::data::{PixelCache, TrainItem};
use super::reference::{RefCache, RefEntry};
use super::TrainError;
use crate::model::vlm::{PreparedScore, Vlm};
use crate::objective::{
    misp_dpo_loss, NegativeSlots, ObjectiveConfig, ObjectiveOutput, SequenceLogps,
};

/// The sequences of a micro-batch and where each record's ones sit.
struct Layout {
    seqs: Vec<PreparedScore>,
    chosen: Vec<u32>,
    rejected: Vec<u32>,
    /// `[R * K]`, the chosen sequence's index in unused slots.
    negatives: Vec<u32>,
    mask: Vec<f32>,
    tokens: usize,
}

fn layout(
    vlm: &Vlm,
    items: &[&TrainItem],
    k: usize,
    pixels: &PixelCache,
) -> Result<Layout, TrainError> {
    let mut l = Layout {
        seqs: Vec::new(),
        chosen: Vec::new(),
        rejected: Vec::new(),
        negatives: Vec::new(),
        mask: Vec::new(),
        tokens: 0,
    };
    for item in items {
        let (pos, negs) = pixels
            .pixels(vlm, item)
            .map_err(|e| TrainError::Input(format!("record {}: {e}", item.id)))?;
        let mut push = |response: &[u32], px: &[f32]| -> u32 {
            l.tokens += item.prompt_ids.len() + response.len();
            l.seqs.push(PreparedScore {
                prompt_ids: item.prompt_ids.clone(),
                response_ids: response.to_vec(),
                pixels: px.to_vec(),
            });
            (l.seqs.len() - 1) as u32
        };
        let c = push(&item.chosen_ids, &pos);
        l.chosen.push(c);
        for slot in 0..k {
            match negs.get(slot) {
                Some(px) => {
                    let i = push(&item.chosen_ids, px);
                    l.negatives.push(i);
                    l.mask.push(1.0);
                }
                None => {
                    l.negatives.push(c);
                    l.mask.push(0.0);
                }
            }
        }
        let r = push(&item.rejected_ids, &pos);
        l.rejected.push(r);
    }
    Ok(l)
}

/// Summed log-probs of every sequence `[S]` (differentiable when LoRA is on and trainable).
fn forward(vlm: &Vlm, seqs: &[PreparedScore]) -> Result<Tensor, TrainError> {
    let refs: Vec<&PreparedScore> = seqs.iter().collect();
    let px: Vec<&[f32]> = seqs.iter().map(|s| s.pixels.as_slice()).collect();
    let pixels = vlm.pixel_tensor(&px)?;
    let (lp, _) = vlm.logprobs(&refs, &pixels)?;
    Ok(lp.to_dtype(DType::F32)?)
}

fn gather(lp: &Tensor, l: &Layout, r: usize, k: usize) -> Result<SequenceLogps, TrainError> {
    let dev = lp.device();
    let pick = |idx: &[u32]| -> Result<Tensor, TrainError> {
        let t = Tensor::from_vec(idx.to_vec(), idx.len(), dev)?;
        Ok(lp.index_select(&t, 0)?)
    };
    Ok(SequenceLogps {
        chosen: pick(&l.chosen)?,
        chosen_on_negatives: pick(&l.negatives)?.reshape((r, k))?,
        rejected: pick(&l.rejected)?,
    })
}

/// What one micro-batch produced.
pub struct MicroOutput {
    pub objective: ObjectiveOutput,
    /// Tokens through the policy forward.
    pub tokens: usize,
    /// Whether the reference pass ran (first sight of some record).
    pub computed_reference: bool,
}

/// Reference entries for `items`, computing (LoRA disabled, no dropout) the missing ones.
fn reference(
    vlm: &Vlm,
    items: &[&TrainItem],
    l: &Layout,
    cache: &mut RefCache,
) -> Result<bool, TrainError> {
    if items.iter().all(|it| cache.get(&it.id).is_some()) {
        return Ok(false);
    }
    let switch = vlm.model.language_model().lora_switch().clone();
    let training = switch.training();
    switch.set_enabled(false);
    switch.set_training(false);
    let lp = forward(vlm, &l.seqs).and_then(|lp| Ok(lp.to_dtype(DType::F64)?.to_vec1::<f64>()?));
    switch.set_enabled(true);
    switch.set_training(training);
    let lp = lp?;
    let k = l.negatives.len() / items.len().max(1);
    for (i, it) in items.iter().enumerate() {
        let negatives = (0..it.negatives.len().min(k))
            .map(|s| lp[l.negatives[i * k + s] as usize])
            .collect();
        cache.insert(
            it.id.clone(),
            RefEntry {
                chosen: lp[l.chosen[i] as usize],
                rejected: lp[l.rejected[i] as usize],
                negatives,
            },
        );
    }
    Ok(true)
}

/// The objective of one micro-batch (policy forward with gradients; reference from the cache).
pub fn micro_step(
    vlm: &Vlm,
    items: &[&TrainItem],
    k: usize,
    objective: &ObjectiveConfig,
    pixels: &PixelCache,
    cache: &mut RefCache,
) -> Result<MicroOutput, TrainError> {
    let r = items.len();
    let l = layout(vlm, items, k, pixels)?;
    let computed_reference = reference(vlm, items, &l, cache)?;
    let lp = forward(vlm, &l.seqs)?;
    let policy = gather(&lp, &l, r, k)?;
    let dev = lp.device();
    let mut ref_chosen = Vec::with_capacity(r);
    let mut ref_rejected = Vec::with_capacity(r);
    let mut ref_neg = Vec::with_capacity(r * k);
    let mut log_q = Vec::with_capacity(r * k);
    for it in items {
        let e = cache
            .get(&it.id)
            .ok_or_else(|| TrainError::Input(format!("record {}: no reference value", it.id)))?;
        ref_chosen.push(e.chosen as f32);
        ref_rejected.push(e.rejected as f32);
        for s in 0..k {
            ref_neg.push(e.negatives.get(s).copied().unwrap_or(e.chosen) as f32);
            // Uniform q (log q = 0) where the record has no proposal: the exact gradient.
            let q = it
                .log_q
                .as_ref()
                .and_then(|q| q.get(s).copied())
                .unwrap_or(0.0);
            log_q.push(q as f32);
        }
    }
    let reference = SequenceLogps {
        chosen: Tensor::from_vec(ref_chosen, r, dev)?,
        chosen_on_negatives: Tensor::from_vec(ref_neg, (r, k), dev)?,
        rejected: Tensor::from_vec(ref_rejected, r, dev)?,
    };
    let slots = NegativeSlots {
        mask: Tensor::from_vec(l.mask.clone(), (r, k), dev)?,
        log_q: Some(Tensor::from_vec(log_q, (r, k), dev)?),
    };
    let objective = misp_dpo_loss(objective, &policy, &reference, &slots)?;
    Ok(MicroOutput {
        objective,
        tokens: l.tokens,
        computed_reference,
    })
}
