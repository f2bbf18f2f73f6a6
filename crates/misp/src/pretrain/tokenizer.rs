//! The world's tokenizers: word-level vocabularies built from ShapesWorld's own text, written as
//! `tokenizer.json` (+ `tokenizer_config.json`, `special_tokens_map.json`) that both the
//! `tokenizers` crate and transformers' `PreTokenizerFast` read to the same ids.
//!
//! Stage: world pretrain. Reads nothing itself (the caller passes the texts); writes the three
//! tokenizer files of a checkpoint folder.
//!
//! Why word level: the world speaks a few dozen plain English words, so a BPE would only add
//! merges to learn and to keep in sync. The pipeline is lowercase -> split into `\w+|[^\w\s]+`
//! (tokenizers' `Whitespace`) -> look each word up, so every step is a stock component that
//! transformers reconstructs from the JSON without custom code.
//!
//! Two id layouts, because the two models read special ids differently:
//! - LLaVA (LLaMA-style): `<unk>` = 0, `<s>` = 1, `</s>` = 2, the words, then `<image>` and
//!   `<pad>`. The post-processor prepends `<s>`, as LLaMA's does; the processor appends `</s>`
//!   to responses itself.
//! - CLIP: `<unk>` = 0, the words, then `<|startoftext|>` and `<|endoftext|>` last, as in
//!   OpenAI's vocabulary. CLIP pools the text at the first `eos_token_id`, except that an eos id
//!   of 2 selects transformers' legacy argmax pooling; keeping the eos id high avoids that trap.
//!   `<|endoftext|>` also pads, as in CLIP.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::{json, Value};
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, Tokenizer};

use super::PretrainError;
use crate::files;

pub const UNK: &str = "<unk>";
pub const BOS: &str = "<s>";
pub const EOS: &str = "</s>";
pub const IMAGE: &str = "<image>";
pub const PAD: &str = "<pad>";
pub const CLIP_BOS: &str = "<|startoftext|>";
pub const CLIP_EOS: &str = "<|endoftext|>";

/// The words of `texts` as the tokenizers will split them (lowercased), most frequent first,
/// ties alphabetical, so the vocabulary is a pure function of the text.
pub fn world_words<'a>(
    texts: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<String>, PretrainError> {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for text in texts {
        for w in split_words(text)? {
            *counts.entry(w).or_default() += 1;
        }
    }
    let specials = [UNK, BOS, EOS, IMAGE, PAD, CLIP_BOS, CLIP_EOS];
    let mut words: Vec<(String, usize)> = counts
        .into_iter()
        .filter(|(w, _)| !specials.contains(&w.as_str()))
        .collect();
    words.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Ok(words.into_iter().map(|(w, _)| w).collect())
}

/// Lowercase, then tokenizers' `Whitespace` split: the same words the saved tokenizer sees.
fn split_words(text: &str) -> Result<Vec<String>, PretrainError> {
    let mut pts = PreTokenizedString::from(text.to_lowercase().as_str());
    Whitespace
        .pre_tokenize(&mut pts)
        .map_err(|e| PretrainError::Tokenizer(e.to_string()))?;
    Ok(pts
        .get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(s, _, _)| s.to_string())
        .collect())
}

/// Which model a tokenizer is for (module docs: the two id layouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    Llava,
    Clip,
}

/// A world tokenizer: the `tokenizer.json` value and the special ids the configs need.
#[derive(Debug, Clone)]
pub struct WorldTokenizer {
    pub json: Value,
    pub flavour: Flavour,
    pub vocab_size: usize,
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
    /// `<image>` (LLaVA only).
    pub image: Option<u32>,
}

impl WorldTokenizer {
    /// Lays out the vocabulary of `flavour` over `words` (from [`world_words`]).
    pub fn build(words: &[String], flavour: Flavour) -> Self {
        let mut vocab: Vec<String> = Vec::with_capacity(words.len() + 5);
        let (head, tail): (&[&str], &[&str]) = match flavour {
            Flavour::Llava => (&[UNK, BOS, EOS], &[IMAGE, PAD]),
            Flavour::Clip => (&[UNK], &[CLIP_BOS, CLIP_EOS]),
        };
        vocab.extend(head.iter().map(|s| s.to_string()));
        vocab.extend(words.iter().cloned());
        vocab.extend(tail.iter().map(|s| s.to_string()));
        let id = |t: &str| vocab.iter().position(|v| v == t).map(|i| i as u32);
        let special: Vec<&str> = head.iter().chain(tail.iter()).copied().collect();
        let added: Vec<Value> = special
            .iter()
            .map(|t| {
                json!({"id": id(t), "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let (bos_t, eos_t, pad_t) = match flavour {
            Flavour::Llava => (BOS, EOS, PAD),
            Flavour::Clip => (CLIP_BOS, CLIP_EOS, CLIP_EOS),
        };
        let (bos, eos, pad) = (
            id(bos_t).unwrap_or(0),
            id(eos_t).unwrap_or(0),
            id(pad_t).unwrap_or(0),
        );
        let special_entry = |t: &str, i: u32| json!({"id": t, "ids": [i], "tokens": [t]});
        let seq = |s: &str| json!({"Sequence": {"id": s, "type_id": 0}});
        let tok = |t: &str| json!({"SpecialToken": {"id": t, "type_id": 0}});
        let post = match flavour {
            Flavour::Llava => json!({
                "type": "TemplateProcessing",
                "single": [tok(BOS), seq("A")],
                "pair": [tok(BOS), seq("A"), tok(BOS), seq("B")],
                "special_tokens": {BOS: special_entry(BOS, bos)}
            }),
            Flavour::Clip => json!({
                "type": "TemplateProcessing",
                "single": [tok(CLIP_BOS), seq("A"), tok(CLIP_EOS)],
                "pair": [tok(CLIP_BOS), seq("A"), tok(CLIP_EOS), tok(CLIP_BOS), seq("B"), tok(CLIP_EOS)],
                "special_tokens": {
                    CLIP_BOS: special_entry(CLIP_BOS, bos),
                    CLIP_EOS: special_entry(CLIP_EOS, eos)
                }
            }),
        };
        let model_vocab: BTreeMap<&str, usize> = vocab
            .iter()
            .enumerate()
            .map(|(i, w)| (w.as_str(), i))
            .collect();
        let json = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "Lowercase"},
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": post,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": model_vocab, "unk_token": UNK}
        });
        Self {
            json,
            flavour,
            vocab_size: vocab.len(),
            bos,
            eos,
            pad,
            image: id(IMAGE),
        }
    }

    /// The `tokenizers` object of this JSON (what the model code will load from disk).
    pub fn tokenizer(&self) -> Result<Tokenizer, PretrainError> {
        let bytes =
            serde_json::to_vec(&self.json).map_err(|e| PretrainError::Tokenizer(e.to_string()))?;
        Tokenizer::from_bytes(bytes).map_err(|e| PretrainError::Tokenizer(e.to_string()))
    }

    /// Writes `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` into
    /// `dir`. The config names `PreTrainedTokenizerFast` so transformers takes the JSON as is
    /// (a `LlamaTokenizerFast` would rebuild parts of the pipeline from its own defaults).
    pub fn save(&self, dir: &Path, model_max_length: usize) -> Result<(), PretrainError> {
        let (bos, eos, pad) = match self.flavour {
            Flavour::Llava => (BOS, EOS, PAD),
            Flavour::Clip => (CLIP_BOS, CLIP_EOS, CLIP_EOS),
        };
        let mut config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": bos,
            "eos_token": eos,
            "unk_token": UNK,
            "pad_token": pad,
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": false,
            "padding_side": "right"
        });
        let mut map =
            json!({"bos_token": bos, "eos_token": eos, "unk_token": UNK, "pad_token": pad});
        if self.flavour == Flavour::Llava {
            config["image_token"] = json!(IMAGE);
            config["extra_special_tokens"] = json!({"image_token": IMAGE});
            map["image_token"] = json!(IMAGE);
        }
        write_json(&dir.join("tokenizer.json"), &self.json)?;
        write_json(&dir.join("tokenizer_config.json"), &config)?;
        write_json(&dir.join("special_tokens_map.json"), &map)
    }
}

pub(crate) fn write_json(path: &Path, value: &Value) -> Result<(), PretrainError> {
    let mut text =
        serde_json::to_string_pretty(value).map_err(|e| PretrainError::Tokenizer(e.to_string()))?;
    text.push('\n');
    files::write_atomic(path, text.as_bytes())?;
    Ok(())
}
