//! Text side of Qwen2.5-VL's processor: the checkpoint's chat template rendered for one image
//! and a prompt, `<|image_pad|>` expanded to the image's token count, the scored response, and
//! the special ids, all read from the checkpoint.
//!
//! Stage: score / train / eval. Reads `tokenizer.json`, `tokenizer_config.json` (EOS and pad
//! tokens), `generation_config.json` (the ids that stop generation) and the chat template
//! (`chat_template.jinja` as transformers 5 saves it, `chat_template.json` as the hub ships it,
//! or `tokenizer_config.json`'s `chat_template`). Writes nothing.
//!
//! misp has no Jinja engine: it renders the Qwen2-VL / Qwen2.5-VL template (the one
//! [`QWEN_VL_TEMPLATE`] holds, shipped by every Qwen2.5-VL Instruct checkpoint) for the one
//! conversation misp builds, a user turn holding an image then the prompt text, and refuses a
//! checkpoint whose template is another. The rendering is checked against transformers'
//! `apply_chat_template` by the conformance fixture.
//!
//! The scoring convention (docs/design.md, "Qwen2.5-VL"): the prompt is the rendered template
//! with the generation prompt (`<|im_start|>assistant\n`), encoded as the processor encodes it;
//! the scored response is TRL's DPO completion of a conversational sample: the assistant turn
//! the template renders after that prompt, `{response}<|im_end|>\n`, encoded without special
//! tokens (the response's tokens, `<|im_end|>` and the newline).

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::Tokenizer;

use super::Qwen2_5VlConfig;
pub use crate::checkpoint::ModelError;

/// The chat template of Qwen/Qwen2.5-VL-7B-Instruct (and Qwen2-VL), character for character.
pub const QWEN_VL_TEMPLATE: &str = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

const IMAGE_PAD: &str = "<|image_pad|>";
/// What [`QWEN_VL_TEMPLATE`] writes after an assistant turn's text.
const TURN_END: &str = "<|im_end|>\n";

/// Tokenizer, template and special ids of a Qwen2.5-VL checkpoint.
#[derive(Debug, Clone)]
pub struct QwenProcessor {
    tokenizer: Tokenizer,
    image_token: u32,
    /// The tokenizer's EOS (`<|im_end|>` in the Instruct checkpoints).
    eos: u32,
    /// Ids that end generation (`generation_config.json`, else EOS).
    stop: Vec<u32>,
    pad: u32,
}

impl QwenProcessor {
    /// Loads the text side of `dir` for the model `config` describes; errors name the file.
    pub fn from_dir(dir: &Path, config: &Qwen2_5VlConfig) -> Result<Self, ModelError> {
        let path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let tok_err = |message: String| ModelError::Tokenizer {
            path: path.clone(),
            message,
        };
        check_template(dir)?;
        match tokenizer.token_to_id(IMAGE_PAD) {
            Some(id) if id == config.image_token_id => {}
            got => {
                return Err(tok_err(format!(
                    "`{IMAGE_PAD}` is {got:?} but config.json's image_token_id is {}",
                    config.image_token_id
                )))
            }
        }
        // A scored response ends with the turn's `<|im_end|>`: it must be one token.
        if tokenizer.token_to_id("<|im_end|>").is_none() {
            return Err(tok_err("`<|im_end|>` is not a token".into()));
        }
        let tc_path = dir.join("tokenizer_config.json");
        let tc = read_json(&tc_path)?.unwrap_or(Value::Null);
        let token = |key: &str| -> Option<String> {
            match &tc[key] {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
                _ => None,
            }
        };
        let id_of = |key: &str, name: String| -> Result<u32, ModelError> {
            tokenizer
                .token_to_id(&name)
                .ok_or_else(|| ModelError::Config {
                    path: tc_path.clone(),
                    message: format!("{key} `{name}` is not in tokenizer.json"),
                })
        };
        let config_eos = config.text.eos_token_id.as_ref().and_then(first_id);
        let eos = match token("eos_token") {
            Some(name) => id_of("eos_token", name)?,
            None => config_eos.ok_or_else(|| ModelError::Config {
                path: tc_path.clone(),
                message: "no eos_token here and no eos_token_id in config.json".into(),
            })?,
        };
        let pad = match token("pad_token") {
            Some(name) => id_of("pad_token", name)?,
            None => config.text.pad_token_id.unwrap_or(eos),
        };
        let gen_path = dir.join("generation_config.json");
        let mut stop = match read_json(&gen_path)? {
            Some(g) => ids(&g["eos_token_id"]),
            None => Vec::new(),
        };
        if stop.is_empty() {
            stop.push(eos);
        }
        Ok(Self {
            tokenizer,
            image_token: config.image_token_id,
            eos,
            stop,
            pad,
        })
    }

    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// Ids that end generation.
    pub fn stop(&self) -> &[u32] {
        &self.stop
    }

    pub fn pad(&self) -> u32 {
        self.pad
    }

    pub fn image_token(&self) -> u32 {
        self.image_token
    }

    /// `apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
    /// "text": prompt}]}], add_generation_prompt=True)` with the Qwen2.5-VL template.
    pub fn render(prompt: &str) -> String {
        format!(
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\
             <|vision_start|>{IMAGE_PAD}<|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n"
        )
    }

    /// The prompt's ids with `<|image_pad|>` repeated `image_tokens` times (the image's
    /// `grid_h * grid_w / merge^2`), as the processor expands it before tokenising.
    pub fn prompt_ids(&self, prompt: &str, image_tokens: usize) -> Result<Vec<u32>, String> {
        if prompt.contains(IMAGE_PAD) || prompt.contains("<|vision_start|>") {
            return Err(format!(
                "the prompt text contains `{IMAGE_PAD}` or `<|vision_start|>`; the template adds the image"
            ));
        }
        let text = Self::render(prompt).replace(IMAGE_PAD, &IMAGE_PAD.repeat(image_tokens));
        self.encode(&text, true)
    }

    /// The scored ids of a response, as TRL's DPO scores a conversational sample: the template's
    /// assistant turn after the prompt (`{response}<|im_end|>\n`) encoded without special tokens,
    /// so the response's tokens, `<|im_end|>` and the newline (docs/design.md, "Qwen2.5-VL").
    pub fn response_ids(&self, response: &str) -> Result<Vec<u32>, String> {
        if response.is_empty() {
            return Err("the response is empty".into());
        }
        self.encode(&format!("{response}{TURN_END}"), false)
    }

    /// Text of generated ids, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.tokenizer.decode(ids, true).map_err(|e| e.to_string())
    }

    fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, String> {
        self.tokenizer
            .encode(text, special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| format!("tokenizer: {e}"))
    }
}

/// The first id of an `eos_token_id` (a number or a list).
fn first_id(v: &Value) -> Option<u32> {
    ids(v).first().copied()
}

fn ids(v: &Value) -> Vec<u32> {
    match v {
        Value::Number(n) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, ModelError> {
    match std::fs::read_to_string(path) {
        Ok(t) => serde_json::from_str(&t)
            .map(Some)
            .map_err(|source| ModelError::Json {
                path: path.to_path_buf(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ModelError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The checkpoint's chat template, wherever it keeps it: `(file, template)`.
fn find_template(dir: &Path) -> Result<Option<(PathBuf, String)>, ModelError> {
    let jinja = dir.join("chat_template.jinja");
    match std::fs::read_to_string(&jinja) {
        Ok(t) => return Ok(Some((jinja, t))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ModelError::Io {
                path: jinja,
                source,
            })
        }
    }
    for file in ["chat_template.json", "tokenizer_config.json"] {
        let path = dir.join(file);
        if let Some(v) = read_json(&path)? {
            if let Some(t) = v["chat_template"].as_str() {
                return Ok(Some((path, t.to_string())));
            }
        }
    }
    Ok(None)
}

/// Refuses a template other than Qwen2.5-VL's (misp would render the wrong prompt). A
/// checkpoint without one gets Qwen2.5-VL's, as its processor falls back to no template at
/// all only for plain tokenisation.
fn check_template(dir: &Path) -> Result<(), ModelError> {
    match find_template(dir)? {
        Some((path, t)) if t.trim_end() != QWEN_VL_TEMPLATE => Err(ModelError::Config {
            path,
            message: "the chat template is not Qwen2.5-VL's; misp renders only that one \
                      (a user turn with one image and a prompt)"
                .into(),
        }),
        _ => Ok(()),
    }
}
