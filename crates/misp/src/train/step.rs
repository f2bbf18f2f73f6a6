//! One micro-batch: the `K + 2` sequences of each record (`y_p` with `m_p`, `y_p` with each
//! negative, `y_n` with `m_p`), the reference values beside them, the objective of Eq. 10 on
//! top, and the gradient of the micro-batch's share of the batch loss.
//!
//! Two ways to the same gradient ([`MemoryOptions`], docs/design.md §4.7):
//! - one batched forward of every sequence with a graph, then one backward (the default);
//! - in pieces, when memory is short: a forward without a graph gives every sequence's
//!   log-prob `pi_s`; the objective's gradient with respect to them is the coefficient
//!   `c_s = dL/dpi_s`; then each group of `sequence_group` sequences runs a backward of
//!   `sum_s c_s pi_s`, whose gradient with respect to the adapters is exactly `dL/dtheta`
//!   (the chain rule through the `pi_s`). Within a group the final hidden states are cut
//!   from the layers: the head's gradient comes `logprob_chunk` scored rows at a time, then
//!   the layers' with activation checkpointing (one layer recomputed at a time) or through
//!   one graph.
//!
//! Stage: train. Reads images through the [`PixelCache`]; writes nothing.

use candle_core::{DType, Tensor, Var};

use super::data::{PixelCache, TrainItem};
use super::reference::{RefCache, RefEntry};
use super::TrainError;
use crate::model::llava::Scored;
use crate::model::vlm::{ImageFeatures, PreparedImage, PreparedScore, Vlm};
use crate::objective::{
    misp_dpo_loss, NegativeSlots, ObjectiveConfig, ObjectiveOutput, SequenceLogps,
};
use crate::optim::GradAccumulator;

/// How a micro-batch's gradient is computed (config keys of the same names). All settings
/// give the same gradient; they trade memory for time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MemoryOptions {
    /// Keep each decoder layer's input only and recompute the layer in the backward.
    pub gradient_checkpointing: bool,
    /// Sequences per backward piece (0: every sequence of the micro-batch in one batched
    /// graph, unless another option asks for pieces, then all in one piece).
    pub sequence_group: usize,
    /// Scored rows per piece of the head's gradient (0: all at once).
    pub logprob_chunk: usize,
}

impl MemoryOptions {
    pub(crate) fn in_pieces(&self) -> bool {
        self.gradient_checkpointing || self.sequence_group > 0 || self.logprob_chunk > 0
    }
}

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
        // Each sequence's prompt holds its own image's tokens (Qwen2.5-VL: as many as the
        // image's grid gives, so a negative's prompt can be longer or shorter than the
        // positive's).
        let mut push = |response: &[u32], img: &PreparedImage| -> u32 {
            let prompt_ids = vlm.expand_prompt(&item.prompt_ids, img);
            l.tokens += prompt_ids.len() + response.len();
            l.seqs.push(PreparedScore {
                prompt_ids,
                response_ids: response.to_vec(),
                pixels: img.pixels.clone(),
                grid: img.grid,
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
    let (lp, _) = vlm.logprobs(&refs, None)?;
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
    /// `scale * sum(per_record loss)`: this micro-batch's share of the batch loss.
    pub loss: f64,
    /// Gradients of `loss` for each of the caller's variables (`None` entries: untouched);
    /// `None` when the loss is not finite (no backward was run).
    pub grads: Option<Vec<Option<Tensor>>>,
    /// Tokens through the policy forward.
    pub tokens: usize,
    /// Whether the reference pass ran (first sight of some record).
    pub computed_reference: bool,
}

/// Reference entries for `items`, computing (LoRA disabled, no dropout) the missing ones, in
/// groups of `group` sequences (0: all in one forward).
fn reference(
    vlm: &Vlm,
    items: &[&TrainItem],
    l: &Layout,
    cache: &mut RefCache,
    group: usize,
) -> Result<bool, TrainError> {
    if items.iter().all(|it| cache.get(&it.id).is_some()) {
        return Ok(false);
    }
    let switch = vlm.language_model().lora_switch().clone();
    let training = switch.training();
    switch.set_enabled(false);
    switch.set_training(false);
    let group = if group == 0 {
        l.seqs.len().max(1)
    } else {
        group
    };
    let lp = l
        .seqs
        .chunks(group)
        .map(|seqs| Ok(forward(vlm, seqs)?.to_dtype(DType::F64)?.to_vec1::<f64>()?))
        .collect::<Result<Vec<_>, TrainError>>()
        .map(|parts| parts.concat());
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

/// The reference values and slots of the objective for `items` (reference from the cache).
fn reference_side(
    items: &[&TrainItem],
    l: &Layout,
    k: usize,
    cache: &RefCache,
    dev: &candle_core::Device,
) -> Result<(SequenceLogps, NegativeSlots), TrainError> {
    let r = items.len();
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
    Ok((reference, slots))
}

/// The objective of one micro-batch and the gradient of `scale` times its summed per-record
/// loss with respect to `vars` (policy forward with gradients; reference from the cache).
#[allow(clippy::too_many_arguments)]
pub fn micro_step(
    vlm: &Vlm,
    items: &[&TrainItem],
    k: usize,
    objective: &ObjectiveConfig,
    pixels: &PixelCache,
    cache: &mut RefCache,
    memory: &MemoryOptions,
    scale: f64,
    vars: &[Var],
) -> Result<MicroOutput, TrainError> {
    let r = items.len();
    let l = layout(vlm, items, k, pixels)?;
    trace_memory("before the reference pass");
    let computed_reference = reference(vlm, items, &l, cache, memory.sequence_group)?;
    trace_memory("after the reference pass");
    if memory.in_pieces() {
        return in_pieces(vlm, items, &l, k, objective, cache, memory, scale, vars).map(|o| {
            MicroOutput {
                computed_reference,
                ..o
            }
        });
    }
    let lp = forward(vlm, &l.seqs)?;
    let policy = gather(&lp, &l, r, k)?;
    let (reference, slots) = reference_side(items, &l, k, cache, lp.device())?;
    let objective = misp_dpo_loss(objective, &policy, &reference, &slots)?;
    let loss = (objective.per_record.sum_all()? * scale)?;
    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let grads = if value.is_finite() {
        let mut acc = GradAccumulator::new(vars.len());
        acc.add(vars, &loss.backward()?)?;
        Some(acc.take())
    } else {
        None
    };
    Ok(MicroOutput {
        objective,
        loss: value,
        grads,
        tokens: l.tokens,
        computed_reference,
    })
}

/// With `MISP_TRACE_MEMORY` set, prints the resident memory now and at its peak (calibration
/// of the memory model, `misp bench memory`).
fn trace_memory(at: &str) {
    if std::env::var_os("MISP_TRACE_MEMORY").is_some() {
        eprintln!(
            "memory {at}: rss {:.0} MiB, peak {:.0} MiB",
            crate::rss::current_mib().unwrap_or(f64::NAN),
            crate::rss::peak_mib().unwrap_or(f64::NAN)
        );
    }
}

/// One group of sequences after its forward without a graph.
struct Piece {
    /// Indices into the micro-batch's sequences.
    seqs: Vec<usize>,
    forward: crate::model::llama::DetachedForward,
    scored: Scored,
}

/// [`micro_step`] in pieces (module docs): forward without a graph, coefficients, then a
/// backward per group of sequences.
#[allow(clippy::too_many_arguments)]
fn in_pieces(
    vlm: &Vlm,
    items: &[&TrainItem],
    l: &Layout,
    k: usize,
    objective: &ObjectiveConfig,
    cache: &RefCache,
    memory: &MemoryOptions,
    scale: f64,
    vars: &[Var],
) -> Result<MicroOutput, TrainError> {
    let r = items.len();
    let lm = vlm.language_model();
    let switch = lm.lora_switch().clone();
    let micro_seed = switch.dropout_seed();
    let n = l.seqs.len();
    let group = if memory.sequence_group == 0 {
        n
    } else {
        memory.sequence_group
    };
    // 1. Every sequence's log-prob, without a graph, group by group (each group's dropout
    //    masks seeded by the group, so that its backward pass draws the same ones).
    let mut pieces = Vec::new();
    let mut lps = Vec::with_capacity(n);
    // The tower runs once per distinct image of the micro-step (chosen and rejected share).
    let mut images = ImageFeatures::default();
    for (g, first) in (0..n).step_by(group).enumerate() {
        let seqs: Vec<usize> = (first..(first + group).min(n)).collect();
        switch.set_dropout_seed(crate::files::splitmix64(micro_seed ^ g as u64));
        let items_g: Vec<&PreparedScore> = seqs.iter().map(|&i| &l.seqs[i]).collect();
        // LLaVA's positions are 0..T; Qwen2.5-VL's rows bring their multimodal RoPE tables,
        // which the forward keeps for the recomputing backward.
        let x = vlm.decoder_inputs_reusing(&items_g, &mut images)?;
        let batch = x.batch;
        let forward = lm.forward_detached_with_rope(
            &x.embeds,
            &batch.mask,
            x.rope.as_ref(),
            memory.gradient_checkpointing,
        )?;
        let scored = Scored::new(&batch.ids, &batch.labels)?;
        let lp = lm.scored_logprobs(&forward.hidden, &scored, memory.logprob_chunk)?;
        lps.push(lp);
        pieces.push(Piece {
            seqs,
            forward,
            scored,
        });
    }
    let lp = Tensor::cat(&lps, 0)?.to_dtype(DType::F32)?;
    trace_memory("after the forward without a graph");

    // 2. The objective on those log-probs, and its gradient with respect to them.
    let lp_var = Var::from_tensor(&lp)?;
    let policy = gather(lp_var.as_tensor(), l, r, k)?;
    let (reference, slots) = reference_side(items, l, k, cache, lp.device())?;
    let out = misp_dpo_loss(objective, &policy, &reference, &slots)?;
    let loss = (out.per_record.sum_all()? * scale)?;
    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if !value.is_finite() {
        return Ok(MicroOutput {
            objective: out,
            loss: value,
            grads: None,
            tokens: l.tokens,
            computed_reference: false,
        });
    }
    let coef = loss
        .backward()?
        .get(lp_var.as_tensor())
        .cloned()
        .unwrap_or(lp.zeros_like()?);

    // 3. Per group, the backward of sum_s c_s pi_s.
    let mut acc = GradAccumulator::new(vars.len());
    for (g, piece) in pieces.iter().enumerate() {
        switch.set_dropout_seed(crate::files::splitmix64(micro_seed ^ g as u64));
        let idx: Vec<u32> = piece.seqs.iter().map(|&i| i as u32).collect();
        let idx = Tensor::from_vec(idx, piece.seqs.len(), coef.device())?;
        let c = coef.index_select(&idx, 0)?;
        let grad_h = lm.head_backward(
            &piece.forward.hidden,
            &piece.scored,
            &c,
            memory.logprob_chunk,
        )?;
        trace_memory("after a head backward");
        lm.backward_from(&piece.forward, &grad_h, |grads| {
            trace_memory("in a layer backward");
            acc.add(vars, grads)
        })?;
    }
    switch.set_dropout_seed(micro_seed);
    Ok(MicroOutput {
        objective: out,
        loss: value,
        grads: Some(acc.take()),
        tokens: l.tokens,
        computed_reference: false,
    })
}
