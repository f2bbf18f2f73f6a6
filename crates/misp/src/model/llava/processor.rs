//! Text side of LLaVA's processor: the chat template, `<image>` expansion, and the token ids
//! that scoring and generation feed the model — the same ids transformers' `LlavaProcessor`
//! and TRL produce for the same text.
//!
//! Stage: score / train / eval. Reads the checkpoint's `tokenizer.json` (with `tokenizers`, so
//! pre-tokenisation, merges and added tokens are the checkpoint's own). Writes nothing.
//!
//! The convention (docs/design.md §4, TRL's DPO): the prompt text `USER: <image>\n{prompt}
//! ASSISTANT:` is encoded *with* the tokenizer's special tokens (the post-processor adds BOS);
//! the response is encoded *without* them and EOS is appended. The single `<image>` token is then
//! expanded to one token per image feature, which is what the HF processor does by repeating the
//! placeholder text before tokenising (the added token splits the text either way, so the
//! neighbouring ids are identical).

use std::path::Path;

use tokenizers::Tokenizer;

use super::LlavaConfig;
pub use crate::checkpoint::ModelError;

/// llava-hf's prompt template; `{prompt}` is replaced by the user's prompt.
pub const DEFAULT_TEMPLATE: &str = "USER: <image>\n{prompt} ASSISTANT:";

/// The placeholder the template (and only the template) must contain exactly once.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// Why a prompt or response could not be encoded; names what is wrong with the text.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("the prompt text contains {0} `<image>` placeholders, expected exactly 1 (the template adds it; remove it from the prompt)")]
    ImageCount(usize),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{what} is {len} tokens, longer than the model's context of {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("the response is empty")]
    EmptyResponse,
}

/// Tokenizer + template + the model's special ids.
#[derive(Debug, Clone)]
pub struct LlavaProcessor {
    tokenizer: Tokenizer,
    template: String,
    image_token: u32,
    image_tokens: usize,
    eos: Vec<u32>,
    pad: u32,
    max_len: usize,
}

impl LlavaProcessor {
    /// Loads `dir/tokenizer.json` for the model `config` describes. Errors (naming the file) when
    /// the tokenizer is missing or unreadable, or lacks `<image>` at `image_token_index`.
    pub fn from_dir(dir: &Path, config: &LlavaConfig) -> Result<Self, ModelError> {
        let path = dir.join("tokenizer.json");
        let bad = |message: String| ModelError::Config {
            path: path.clone(),
            message,
        };
        if !path.is_file() {
            return Err(bad(
                "missing: a LLaVA checkpoint needs its tokenizer.json".into()
            ));
        }
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| bad(e.to_string()))?;
        let image_token = config.image_token_index;
        match tokenizer.token_to_id(IMAGE_PLACEHOLDER) {
            Some(id) if id == image_token => {}
            Some(id) => {
                return Err(bad(format!(
                    "`<image>` has id {id} but config.json says image_token_index {image_token}"
                )))
            }
            None => return Err(bad("the tokenizer lacks the `<image>` token".into())),
        }
        let text = &config.text_config;
        let eos = eos_ids(text.eos_token_id.as_ref())
            .or_else(|| tokenizer.token_to_id("</s>").map(|i| vec![i]))
            .ok_or_else(|| bad("no eos_token_id in config.json and no `</s>` token".into()))?;
        let pad = text.pad_token_id.unwrap_or(0);
        Ok(Self {
            tokenizer,
            template: DEFAULT_TEMPLATE.to_owned(),
            image_token,
            image_tokens: config.image_tokens(),
            eos,
            pad,
            max_len: text.max_position_embeddings,
        })
    }

    /// Replaces the template (must contain `{prompt}` and one `<image>`).
    pub fn with_template(mut self, template: &str) -> Result<Self, String> {
        if !template.contains("{prompt}") {
            return Err(format!("template {template:?} lacks `{{prompt}}`"));
        }
        let n = template.matches(IMAGE_PLACEHOLDER).count();
        if n != 1 {
            return Err(format!(
                "template {template:?} has {n} `<image>` placeholders, expected 1"
            ));
        }
        self.template = template.to_owned();
        Ok(self)
    }

    pub fn template(&self) -> &str {
        &self.template
    }

    /// The ids that end a response (the first is appended to scored responses).
    pub fn eos(&self) -> &[u32] {
        &self.eos
    }

    /// Padding id (`text_config.pad_token_id`, else 0); padded positions are masked anyway.
    pub fn pad(&self) -> u32 {
        self.pad
    }

    /// The model's context length (`max_position_embeddings`).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Ids of the templated prompt: BOS, text, and the image tokens expanded in place.
    pub fn prompt_ids(&self, prompt: &str) -> Result<Vec<u32>, EncodeError> {
        let text = self.template.replace("{prompt}", prompt);
        let n = text.matches(IMAGE_PLACEHOLDER).count();
        if n != 1 {
            return Err(EncodeError::ImageCount(n));
        }
        let ids = self.encode(&text, true)?;
        let mut out = Vec::with_capacity(ids.len() + self.image_tokens);
        for id in ids {
            if id == self.image_token {
                out.extend(std::iter::repeat_n(id, self.image_tokens));
            } else {
                out.push(id);
            }
        }
        if out.len() > self.max_len {
            return Err(EncodeError::TooLong {
                what: "the prompt",
                len: out.len(),
                max: self.max_len,
            });
        }
        Ok(out)
    }

    /// Ids of a response as scored: its text without special tokens, then EOS.
    pub fn response_ids(&self, response: &str) -> Result<Vec<u32>, EncodeError> {
        if response.trim().is_empty() {
            return Err(EncodeError::EmptyResponse);
        }
        let mut ids = self.encode(response, false)?;
        ids.push(self.eos[0]);
        Ok(ids)
    }

    /// Prompt and response ids of one scored sequence, checked against the context length.
    pub fn scored_ids(
        &self,
        prompt: &str,
        response: &str,
    ) -> Result<(Vec<u32>, Vec<u32>), EncodeError> {
        let p = self.prompt_ids(prompt)?;
        let r = self.response_ids(response)?;
        if p.len() + r.len() > self.max_len {
            return Err(EncodeError::TooLong {
                what: "prompt + response",
                len: p.len() + r.len(),
                max: self.max_len,
            });
        }
        Ok((p, r))
    }

    /// Text of generated ids, special tokens (EOS, padding) skipped, as `decode(...,
    /// skip_special_tokens=True)`.
    pub fn decode(&self, ids: &[u32]) -> Result<String, EncodeError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| EncodeError::Tokenizer(e.to_string()))
    }

    fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, EncodeError> {
        let enc = self
            .tokenizer
            .encode(text, special)
            .map_err(|e| EncodeError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }
}

/// `eos_token_id` as configs write it: one id or a list.
fn eos_ids(v: Option<&serde_json::Value>) -> Option<Vec<u32>> {
    let ids: Vec<u32> = match v? {
        serde_json::Value::Number(n) => vec![n.as_u64()? as u32],
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|i| i as u32))
            .collect(),
        _ => return None,
    };
    (!ids.is_empty()).then_some(ids)
}
