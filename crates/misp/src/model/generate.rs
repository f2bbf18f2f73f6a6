//! Greedy decoding with a KV cache, batched: what `misp generate`, POPE and CHAIR evaluation and
//! `misp serve` run.
//!
//! Stage: eval. Matches transformers' `generate(do_sample=False)` on a left-padded batch:
//! prompts are left-padded (so every row's next token sits at the last column), positions count
//! each row's own tokens, and a row stops at an EOS id or after its `max_new_tokens`.
//! transformers keeps feeding a finished row the pad token; here it leaves the batch instead
//! ([`RunningDecode`]), which changes nothing the other rows compute (no row attends to
//! another) and spares the forward its rows. The same state admits newly prefilled rows between
//! steps, which is how the server batches continuously.

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
    if prompts.is_empty() || max_new_tokens == 0 {
        return Ok(vec![Vec::new(); prompts.len()]);
    }
    let prefill = prefill(model, prompts, pixels, pad)?;
    decode_all(model.language_model(), prefill, eos, max_new_tokens)
}

/// The prompt pass of a batch: the cache holding every row's prompt and each row's first
/// generated token (the argmax of its last position's logits).
#[derive(Debug)]
pub struct Prefill {
    pub cache: KvCache,
    pub next: Vec<u32>,
}

impl Prefill {
    /// From a prompt pass's last-position `logits [B, 1, V]` and the cache it filled.
    pub fn new(cache: KvCache, logits: &Tensor) -> Result<Self, ModelError> {
        Ok(Self {
            next: argmax_last(logits)?,
            cache,
        })
    }
}

/// Each row's argmax at the last position of `logits [B, t, V]`.
fn argmax_last(logits: &Tensor) -> Result<Vec<u32>, ModelError> {
    let t = logits.dim(1)?;
    Ok(logits
        .narrow(1, t - 1, 1)?
        .squeeze(1)?
        .argmax(D::Minus1)?
        .to_vec1()?)
}

/// LLaVA's prompt pass: left-padded prompts with their images through the language model.
pub fn prefill(
    model: &Llava,
    prompts: &[Vec<u32>],
    pixels: &Tensor,
    pad: u32,
) -> Result<Prefill, ModelError> {
    let b = prompts.len();
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
    Prefill::new(cache, &logits)
}

/// Decodes a prefilled batch to the end, every row up to `max_new_tokens`: each row's new ids,
/// EOS included when produced.
pub fn decode_all(
    lm: &Llama,
    prefill: Prefill,
    eos: &[u32],
    max_new_tokens: usize,
) -> Result<Vec<Vec<u32>>, ModelError> {
    let b = prefill.next.len();
    let mut out = vec![Vec::new(); b];
    let mut running = RunningDecode::new();
    running.admit(prefill, (0..b).map(|i| (i, max_new_tokens)).collect())?;
    while !running.is_empty() {
        running.step(lm, eos, |row, ids| out[row] = ids)?;
    }
    Ok(out)
}

/// One row of a running decode.
#[derive(Debug)]
struct Row<T> {
    /// Whose row it is (the caller's index, a server request's reply channel).
    tag: T,
    tokens: Vec<u32>,
    max_new: usize,
    /// The token it takes next (the argmax of its latest logits).
    next: u32,
}

/// A greedy decode of rows that may come and go: [`Self::admit`] merges a prefilled batch into
/// the running one (between steps), [`Self::step`] gives every row its next token, hands back
/// the rows that finished and runs the others one position further.
#[derive(Debug)]
pub struct RunningDecode<T> {
    /// `None` while no row runs.
    cache: Option<KvCache>,
    rows: Vec<Row<T>>,
}

impl<T> Default for RunningDecode<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> RunningDecode<T> {
    pub fn new() -> Self {
        Self {
            cache: None,
            rows: Vec::new(),
        }
    }

    /// Rows running.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Adds a prefilled batch, row `i` as `rows[i] = (tag, max_new_tokens)`.
    pub fn admit(&mut self, prefill: Prefill, rows: Vec<(T, usize)>) -> Result<(), ModelError> {
        if rows.len() != prefill.next.len() || rows.len() != prefill.cache.rows() {
            return Err(ModelError::Input {
                field: "prefill",
                message: format!(
                    "{} rows admitted for a prefill of {} tokens and {} cache rows",
                    rows.len(),
                    prefill.next.len(),
                    prefill.cache.rows()
                ),
            });
        }
        match &mut self.cache {
            Some(cache) => cache.append_rows(prefill.cache)?,
            None => self.cache = Some(prefill.cache),
        }
        self.rows.extend(
            rows.into_iter()
                .zip(prefill.next)
                .map(|((tag, max_new), next)| Row {
                    tag,
                    tokens: Vec::new(),
                    max_new,
                    next,
                }),
        );
        Ok(())
    }

    /// One decoding step: every row takes its next token; rows that produced an `eos` id or
    /// reached their `max_new_tokens` leave the batch and go to `finished` with their ids (before
    /// the forward, so a server answers them while the others run); the rest run one position
    /// further, which makes their next tokens known.
    pub fn step(
        &mut self,
        lm: &Llama,
        eos: &[u32],
        mut finished: impl FnMut(T, Vec<u32>),
    ) -> Result<(), ModelError> {
        let mut keep = Vec::with_capacity(self.rows.len());
        for (i, row) in self.rows.iter_mut().enumerate() {
            if row.tokens.len() < row.max_new {
                row.tokens.push(row.next);
            }
            if !(eos.contains(&row.next) || row.tokens.len() >= row.max_new) {
                keep.push(i);
            }
        }
        if keep.len() < self.rows.len() {
            let rows = std::mem::take(&mut self.rows);
            let mut kept = keep.iter().copied().peekable();
            for (i, row) in rows.into_iter().enumerate() {
                if kept.peek() == Some(&i) {
                    kept.next();
                    self.rows.push(row);
                } else {
                    finished(row.tag, row.tokens);
                }
            }
            if self.rows.is_empty() {
                self.cache = None;
                return Ok(());
            }
            self.cache_mut()?.keep_rows(&keep)?;
        }
        let b = self.rows.len();
        let fed: Vec<u32> = self.rows.iter().map(|r| r.next).collect();
        let dev = lm.device();
        let fed = Tensor::from_vec(fed, (b, 1), dev)?;
        let ones = Tensor::ones((b, 1), DType::U8, dev)?;
        let embeds = lm.embed_tokens(&fed)?;
        let logits = lm.forward_cached_last(&embeds, &ones, self.cache_mut()?)?;
        for (row, next) in self.rows.iter_mut().zip(argmax_last(&logits)?) {
            row.next = next;
        }
        Ok(())
    }

    /// Ends the decode, handing back every running row's tag (a failed step's rows, to be
    /// answered with the error).
    pub fn abandon(&mut self) -> Vec<T> {
        self.cache = None;
        std::mem::take(&mut self.rows)
            .into_iter()
            .map(|r| r.tag)
            .collect()
    }

    fn cache_mut(&mut self) -> Result<&mut KvCache, ModelError> {
        self.cache.as_mut().ok_or_else(|| ModelError::Input {
            field: "decode",
            message: "rows run without a cache".into(),
        })
    }
}
