//! HF checkpoint folders of the world's tiny models, in the layouts transformers reads.
//!
//! Stage: world pretrain. Writes, for CLIP (`CLIPModel`): `config.json`, `model.safetensors`,
//! tokenizer files, `preprocessor_config.json`; for LLaVA (`LlavaForConditionalGeneration`):
//! `config.json`, `model.safetensors` in llava-hf's on-disk key layout
//! (`language_model.model.*`, `language_model.lm_head.weight`,
//! `vision_tower.vision_model.*`, `multi_modal_projector.*`), tokenizer files,
//! `preprocessor_config.json`, `processor_config.json`, `generation_config.json`.
//!
//! The configs are built here as JSON first and the in-memory model configs are parsed *from*
//! that JSON ([`clip_config`], [`llava_config`]), so the model that is trained and the
//! `config.json` that describes it cannot disagree.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use serde_json::{json, Value};

use super::tokenizer::{write_json, WorldTokenizer};
use super::{ModelSizes, PretrainError};
use crate::files;
use crate::model::clip::ClipConfig;
use crate::model::llava::{checkpoint_key, KeyLayout, LlavaConfig};

/// CLIP's normalisation constants (OpenAI's), as `CLIPImageProcessor` writes them.
const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

fn vision_json(s: &ModelSizes, image_size: usize) -> Value {
    json!({
        "model_type": "clip_vision_model",
        "hidden_size": s.vision_hidden,
        "intermediate_size": s.vision_hidden * 4,
        "num_hidden_layers": s.vision_layers,
        "num_attention_heads": s.vision_heads,
        "num_channels": 3,
        "image_size": image_size,
        "patch_size": s.patch_size,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": s.projection_dim
    })
}

/// `config.json` of the CLIP.
pub fn clip_json(s: &ModelSizes, image_size: usize, tok: &WorldTokenizer) -> Value {
    json!({
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "dtype": "float32",
        "projection_dim": s.projection_dim,
        "logit_scale_init_value": 2.6592,
        "initializer_factor": 1.0,
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": tok.vocab_size,
            "hidden_size": s.text_hidden,
            "intermediate_size": s.text_hidden * 4,
            "num_hidden_layers": s.text_layers,
            "num_attention_heads": s.text_heads,
            "max_position_embeddings": s.text_positions,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "bos_token_id": tok.bos,
            "eos_token_id": tok.eos,
            "pad_token_id": tok.pad,
            "projection_dim": s.projection_dim
        },
        "vision_config": vision_json(s, image_size)
    })
}

/// `config.json` of the LLaVA.
pub fn llava_json(s: &ModelSizes, image_size: usize, tok: &WorldTokenizer) -> Value {
    let grid = image_size / s.patch_size.max(1);
    json!({
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "dtype": "float32",
        "image_token_index": tok.image,
        "image_seq_length": grid * grid,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": true,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": false,
        "text_config": {
            "model_type": "llama",
            "vocab_size": tok.vocab_size,
            "hidden_size": s.llm_hidden,
            "intermediate_size": s.llm_intermediate,
            "num_hidden_layers": s.llm_layers,
            "num_attention_heads": s.llm_heads,
            "num_key_value_heads": s.llm_heads,
            "hidden_act": "silu",
            "max_position_embeddings": s.llm_positions,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "attention_bias": false,
            "mlp_bias": false,
            "tie_word_embeddings": false,
            "bos_token_id": tok.bos,
            "eos_token_id": tok.eos,
            "pad_token_id": tok.pad
        },
        "vision_config": vision_json(s, image_size)
    })
}

fn parse<T: serde::de::DeserializeOwned>(v: &Value, what: &str) -> Result<T, PretrainError> {
    serde_json::from_value(v.clone()).map_err(|e| PretrainError::Config(format!("{what}: {e}")))
}

pub fn clip_config(v: &Value) -> Result<ClipConfig, PretrainError> {
    parse(v, "CLIP config.json")
}

pub fn llava_config(v: &Value) -> Result<LlavaConfig, PretrainError> {
    parse(v, "LLaVA config.json")
}

/// `preprocessor_config.json`: CLIP's processor at the world's size. Images are already
/// `image_size` square, so resizing and cropping are identities, kept for images of other sizes.
fn preprocessor_json(image_size: usize) -> Value {
    json!({
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": true,
        "size": {"shortest_edge": image_size},
        "resample": 3,
        "do_center_crop": true,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "do_convert_rgb": true
    })
}

/// Everything of the CLIP folder except the weights (written before training, so the
/// tokenizer the trainer uses is the one on disk).
pub fn write_clip_files(
    dir: &Path,
    config: &Value,
    tok: &WorldTokenizer,
    image_size: usize,
    max_len: usize,
) -> Result<(), PretrainError> {
    super::make_dir(dir)?;
    write_json(&dir.join("config.json"), config)?;
    write_json(
        &dir.join("preprocessor_config.json"),
        &preprocessor_json(image_size),
    )?;
    tok.save(dir, max_len)
}

/// Everything of the LLaVA folder except the weights.
pub fn write_llava_files(
    dir: &Path,
    config: &Value,
    tok: &WorldTokenizer,
    s: &ModelSizes,
    image_size: usize,
) -> Result<(), PretrainError> {
    super::make_dir(dir)?;
    write_json(&dir.join("config.json"), config)?;
    write_json(
        &dir.join("preprocessor_config.json"),
        &preprocessor_json(image_size),
    )?;
    write_json(
        &dir.join("processor_config.json"),
        &json!({
            "processor_class": "LlavaProcessor",
            "patch_size": s.patch_size,
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,
            "image_token": super::tokenizer::IMAGE
        }),
    )?;
    write_json(
        &dir.join("generation_config.json"),
        &json!({
            "bos_token_id": tok.bos,
            "eos_token_id": tok.eos,
            "pad_token_id": tok.pad,
            "do_sample": false
        }),
    )?;
    tok.save(dir, s.llm_positions)
}

/// Writes `tensors` (name -> tensor) as `dir/model.safetensors`, atomically.
pub fn write_weights(dir: &Path, tensors: &HashMap<String, Tensor>) -> Result<(), PretrainError> {
    let path = dir.join("model.safetensors");
    files::write_atomic_with(&path, |tmp| {
        candle_core::safetensors::save(tensors, tmp).map_err(std::io::Error::other)
    })?;
    Ok(())
}

/// In-memory LLaVA names ([`crate::model::llava::Llava::load`]'s) to llava-hf's on-disk keys.
pub fn llava_disk_names(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let layout = KeyLayout {
        nested: false,
        vision_model: true,
    };
    tensors
        .into_iter()
        .map(|(k, v)| (checkpoint_key(&k, layout), v))
        .collect()
}
