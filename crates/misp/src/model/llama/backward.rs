//! Gradients of a training step without one graph over the whole model, for memory: the
//! caller gets the sequences' log-probs from a forward that keeps no graph, turns them into
//! the loss's coefficients, then asks for the gradient of `sum_s c_s * log p_s` in pieces.
//!
//! - [`Llama::forward_detached`] / [`Llama::forward_detached_with_rope`]: the decoder layers
//!   with each layer's graph dropped as soon as its output is taken, keeping (with activation
//!   checkpointing) each layer's input; the RoPE tables (LLaVA's `0..T` or Qwen2.5-VL's
//!   multimodal ones) are kept with it for the backward.
//! - [`Llama::head_backward`]: the gradient of `sum_b c_b * log p_b` with respect to the final
//!   hidden states, `chunk` scored rows at a time, each piece's graph (`[rows, vocab]` logits
//!   and log-softmax) freed before the next.
//! - [`Llama::backward_from`]: from that gradient down to the adapters: layer by layer from the
//!   top, each recomputed from its kept input with a graph (activation checkpointing: one
//!   layer's activations alive at a time), or, without kept inputs, one forward with a graph
//!   through every layer.
//!
//! All of it is candle's ordinary ops and autograd, on any device. Dropout masks are numbered
//! per layer ([`super::LoraSwitch::begin_layer`]), so a layer recomputed under the same seed
//! draws the masks of its first pass: the gradient is exactly that of the loss of the first
//! pass.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::{Context, Llama, Pass, RopeTables, Scored};

/// A forward of the decoder layers that kept no graph.
pub struct DetachedForward {
    /// The final hidden states `[B, T, D]` (before the final norm).
    pub hidden: Tensor,
    /// The layers' inputs, with activation checkpointing.
    inputs: Option<Vec<Tensor>>,
    /// The inputs of the first layer (for a backward without checkpointing).
    embeds: Tensor,
    ctx: Context,
}

impl DetachedForward {
    /// Bytes the kept layer inputs hold (the memory model's "kept activations").
    pub fn kept_bytes(&self) -> usize {
        self.inputs
            .iter()
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

impl Llama {
    /// The decoder layers on `inputs_embeds [B, T, D]` at positions `0..T` without keeping a
    /// graph; with `keep_inputs`, each layer's input is kept for [`Llama::backward_from`].
    pub fn forward_detached(
        &self,
        inputs_embeds: &Tensor,
        attention_mask: &Tensor,
        keep_inputs: bool,
    ) -> candle_core::Result<DetachedForward> {
        self.forward_detached_with_rope(inputs_embeds, attention_mask, None, keep_inputs)
    }

    /// [`Llama::forward_detached`] with the caller's RoPE tables (`[B, 1, T, head_dim]`,
    /// Qwen2.5-VL's multimodal positions; `None`: positions `0..T`). The tables stay with the
    /// result, so [`Llama::backward_from`] recomputes the layers at the same positions.
    pub fn forward_detached_with_rope(
        &self,
        inputs_embeds: &Tensor,
        attention_mask: &Tensor,
        rope: Option<&RopeTables>,
        keep_inputs: bool,
    ) -> candle_core::Result<DetachedForward> {
        let ctx = self.context(inputs_embeds, attention_mask, rope)?;
        let embeds = inputs_embeds.to_dtype(self.dtype())?.detach();
        let mut inputs = keep_inputs.then(Vec::new);
        // No graph through the adapters: the layers' intermediates go as soon as they are used.
        let grad = self.switch.grad();
        self.switch.set_grad(false);
        let done = self.run_layers(embeds.clone(), &ctx, Pass::Detached(inputs.as_mut()));
        self.switch.set_grad(grad);
        Ok(DetachedForward {
            hidden: done?,
            inputs,
            embeds,
            ctx,
        })
    }

    /// `d/dh sum_b coef[b] * log p_b` for `h [B, T, D]` and the labels `scored` names
    /// (`coef [B]` in the log-probs' dtype), `chunk` scored rows at a time (0: one piece).
    pub fn head_backward(
        &self,
        h: &Tensor,
        scored: &Scored,
        coef: &Tensor,
        chunk: usize,
    ) -> candle_core::Result<Tensor> {
        let hv = Var::from_tensor(&h.detach())?;
        let n = scored.len();
        let step = if chunk == 0 { n.max(1) } else { chunk };
        let mut grad = hv.as_tensor().zeros_like()?;
        for lo in (0..n).step_by(step) {
            let hi = (lo + step).min(n);
            let lp = self.scored_piece(hv.as_tensor(), scored, lo, hi)?;
            let coef = coef.to_dtype(lp.dtype())?;
            let loss = (lp * coef)?.sum_all()?;
            if let Some(g) = loss.backward()?.get(hv.as_tensor()) {
                grad = (grad + g)?;
            }
        }
        Ok(grad)
    }

    /// Gradients of `sum(grad_h * h)` for the final hidden states `h` of `fwd`, handed to
    /// `on_grads` once per piece (per layer with checkpointing, once without): the caller adds
    /// the adapters' gradients it holds.
    pub fn backward_from(
        &self,
        fwd: &DetachedForward,
        grad_h: &Tensor,
        mut on_grads: impl FnMut(&GradStore) -> candle_core::Result<()>,
    ) -> candle_core::Result<()> {
        let Some(inputs) = &fwd.inputs else {
            // No kept inputs: the whole stack again, with a graph, and one backward.
            let x = self.run_layers(fwd.embeds.clone(), &fwd.ctx, Pass::Graph)?;
            let grads = (x * grad_h)?.sum_all()?.backward()?;
            return on_grads(&grads);
        };
        let mut g = grad_h.clone();
        for (i, layer) in self.layers.iter().enumerate().rev() {
            let x = Var::from_tensor(&inputs[i])?;
            self.switch.begin_layer(i);
            let y = layer.forward(x.as_tensor(), &fwd.ctx, None)?;
            let grads = (y * &g)?.sum_all()?.backward()?;
            on_grads(&grads)?;
            g = match grads.get(x.as_tensor()) {
                Some(dx) => dx.detach(),
                // Nothing below depends on this layer's input (cannot happen in a decoder).
                None => return Ok(()),
            };
        }
        Ok(())
    }
}
