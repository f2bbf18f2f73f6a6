//! CLIP tokenisation from a checkpoint's `tokenizer.json`, equal to transformers'
//! `CLIPTokenizer(texts, padding=True, truncation=True, max_length=77)`: BOS / EOS from the
//! file's post-processor, right padding to the longest prompt with the pad token, and
//! truncation that keeps BOS ... EOS around the first 75 tokens (the `tokenizers` library does
//! both exactly as the Python fast tokenizer, which wraps it).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::Value;
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use super::{ClipConfig, ModelError};

/// The pad token of OpenAI's CLIP, and transformers' `CLIPTokenizer` default.
const DEFAULT_PAD: &str = "<|endoftext|>";

/// Token ids of a batch of prompts, on the CPU.
#[derive(Debug, Clone)]
pub struct ClipTokens {
    /// `[B, T]` u32, `T` the longest prompt after truncation.
    pub ids: Tensor,
    /// `[B, T]` u32: 1 for tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// How many prompts were longer than the model's positions and were cut.
    pub truncated: usize,
}

/// A CLIP tokenizer loaded from a checkpoint folder.
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    path: PathBuf,
    /// `max_position_embeddings` of the text tower (77 for every released CLIP).
    pub max_len: usize,
    pub pad_id: u32,
}

impl ClipTokenizer {
    /// Reads `dir/tokenizer.json`; the pad token comes from the file's padding section, else
    /// `tokenizer_config.json` / `special_tokens_map.json`, else `<|endoftext|>`; the length
    /// limit from `config.json`'s text config when present, else 77.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let max_len = if dir.join("config.json").is_file() {
            ClipConfig::from_dir(dir)?
                .text_config
                .max_position_embeddings
        } else {
            77
        };
        let pad_token = match tokenizer.get_padding() {
            Some(p) => p.pad_token.clone(),
            None => configured_pad_token(dir)?.unwrap_or_else(|| DEFAULT_PAD.to_string()),
        };
        let pad_id = tokenizer
            .token_to_id(&pad_token)
            .ok_or_else(|| ModelError::Tokenizer {
                path: path.clone(),
                message: format!("pad token {pad_token:?} is not in the vocabulary"),
            })?;
        let tok_err = |e: tokenizers::Error| ModelError::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        };
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(tok_err)?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token,
        }));
        Ok(Self {
            tokenizer,
            path,
            max_len,
            pad_id,
        })
    }

    /// Tokenises a batch (special tokens added, padded, truncated).
    pub fn encode(&self, texts: &[&str]) -> Result<ClipTokens, ModelError> {
        let cpu = Device::Cpu;
        if texts.is_empty() {
            let empty = || Tensor::zeros((0, 0), candle_core::DType::U32, &cpu);
            return Ok(ClipTokens {
                ids: empty()?,
                attention_mask: empty()?,
                truncated: 0,
            });
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| ModelError::Tokenizer {
                path: self.path.clone(),
                message: e.to_string(),
            })?;
        let t = encodings.iter().map(|e| e.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(texts.len() * t);
        let mut mask = Vec::with_capacity(texts.len() * t);
        let mut truncated = 0;
        for e in &encodings {
            ids.extend_from_slice(e.get_ids());
            mask.extend_from_slice(e.get_attention_mask());
            // Truncation moves the cut tokens to `overflowing`: non-empty means cut.
            truncated += usize::from(!e.get_overflowing().is_empty());
        }
        Ok(ClipTokens {
            ids: Tensor::from_vec(ids, (texts.len(), t), &cpu)?,
            attention_mask: Tensor::from_vec(mask, (texts.len(), t), &cpu)?,
            truncated,
        })
    }
}

/// `pad_token` of `tokenizer_config.json`, else of `special_tokens_map.json`: a string or an
/// added-token object with `content`.
fn configured_pad_token(dir: &Path) -> Result<Option<String>, ModelError> {
    for name in ["tokenizer_config.json", "special_tokens_map.json"] {
        let path = dir.join(name);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(ModelError::Io { path, source }),
        };
        let v: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.clone(),
            source,
        })?;
        match v.get("pad_token") {
            Some(Value::String(s)) => return Ok(Some(s.clone())),
            Some(Value::Object(o)) => {
                if let Some(Value::String(s)) = o.get("content") {
                    return Ok(Some(s.clone()));
                }
            }
            _ => {}
        }
    }
    Ok(None)
}
