//! Greedy decoding with a KV cache, batched: what POPE and CHAIR evaluation run.
//!
//! Stage: eval. Matches transformers' `generate(do_sample=False)` on a left-padded batch:
//! prompts are left-padded (so every row's next token sits at the last column), positions count
//! each row's own tokens, a row that has produced EOS keeps receiving the pad token (and is
//! ignored), and decoding stops when every row has finished or after `max_new_tokens`.

use candle_core::{DType, Tensor, D};

use super::llama::{KvCache, Llama};
use super::llava::Llava;
pub use crate::checkpoint::ModelError;

/// Greedy continuation of each prompt (`prompts[i]` already templated and `<image>`-expanded,
/// `pixels [B, 3, S, S]` its image). Returns the new ids of every row, EOS included when it
/// was produced; nothing after it.
pub fn greedy(
    model: &Llava,
    prompts: &[Vec<u32>],
    pixels: &Tensor,
    eos: &[u32],
    pad: u32,
    max_new_tokens: usize,
) -> Result<Vec<Vec<u32>>, ModelError> {
    let b = prompts.len();
    let out = vec![Vec::new(); b];
    if b == 0 || max_new_tokens == 0 {
        return Ok(out);
    }
    let dev = pixels.device();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(b * width);
    let mut mask = Vec::with_capacity(b * width);
    for p in prompts {
        let padding = width - p.len();
        ids.extend(std::iter::repeat_n(pad, padding).chain(p.iter().copied()));
        mask.extend(std::iter::repeat_n(0u8, padding).chain(std::iter::repeat_n(1u8, p.len())));
    }
    let ids = Tensor::from_vec(ids, (b, width), dev)?;
    let mask = Tensor::from_vec(mask, (b, width), dev)?;
    let lm = model.language_model();
    let mut cache = lm.new_cache(b);
    let embeds = model.input_embeds(&ids, pixels)?;
    let logits = lm.forward_cached_last(&embeds, &mask, &mut cache)?;
    decode_from(lm, &mut cache, logits, eos, pad, max_new_tokens, out)
}

/// The decoding loop after the prompt's pass, shared by every model on misp's LLaMA decoder:
/// `logits` are the prompt pass's (each row's next token at the last column) and `cache` holds
/// the prompt. Each step appends every unfinished row's argmax to `out`, feeds the pad token to
/// finished rows, and stops when all rows have produced an `eos` id or after `max_new_tokens`.
pub(crate) fn decode_from(
    lm: &Llama,
    cache: &mut KvCache,
    mut logits: Tensor,
    eos: &[u32],
    pad: u32,
    max_new_tokens: usize,
    mut out: Vec<Vec<u32>>,
) -> Result<Vec<Vec<u32>>, ModelError> {
    let b = out.len();
    let dev = logits.device().clone();
    let mut done = vec![false; b];
    let ones = Tensor::ones((b, 1), DType::U8, &dev)?;
    for step in 0..max_new_tokens {
        let t = logits.dim(1)?;
        let next: Vec<u32> = logits
            .narrow(1, t - 1, 1)?
            .squeeze(1)?
            .argmax(D::Minus1)?
            .to_vec1()?;
        let mut fed = Vec::with_capacity(b);
        for (row, &tok) in next.iter().enumerate() {
            if done[row] {
                fed.push(pad);
                continue;
            }
            out[row].push(tok);
            if eos.contains(&tok) {
                done[row] = true;
            }
            fed.push(tok);
        }
        if done.iter().all(|&d| d) || step + 1 == max_new_tokens {
            break;
        }
        let fed = Tensor::from_vec(fed, (b, 1), &dev)?;
        logits = lm.forward_cached_last(&lm.embed_tokens(&fed)?, &ones, cache)?;
    }
    Ok(out)
}
