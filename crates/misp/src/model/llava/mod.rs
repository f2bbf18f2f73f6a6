//! LLaVA as transformers' `LlavaForConditionalGeneration` (docs/design.md §4): the CLIP vision
//! tower's `hidden_states[vision_feature_layer]` (CLS dropped for the "default" strategy),
//! projected by `linear_1 -> GELU -> linear_2` (with biases) into the LLaMA's embedding space,
//! and written over the `<image>` positions of the token embeddings.
//!
//! Reads an HF checkpoint folder: `config.json` (`text_config`, `vision_config`,
//! `image_token_index`, ...) and safetensors in either key layout; [`checkpoint_key`] is the one
//! place that knows the layouts. The caller expands each `<image>` to one token per image
//! feature, as transformers' processor does.

use std::path::Path;

pub mod processor;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::Linear;
use serde::Deserialize;

use crate::checkpoint;
pub use crate::checkpoint::ModelError;
use crate::model::clip::{ClipVisionConfig, ClipVisionTower};
pub use crate::model::llama::{sequence_logprobs, token_logprobs, Scored};
use crate::model::llama::{Llama, LlamaConfig};

/// `config.json` of a `LlavaForConditionalGeneration`.
#[derive(Debug, Clone, Deserialize)]
pub struct LlavaConfig {
    pub text_config: LlamaConfig,
    pub vision_config: ClipVisionConfig,
    #[serde(alias = "image_token_id")]
    pub image_token_index: u32,
    #[serde(default = "default_feature_layer")]
    pub vision_feature_layer: i64,
    #[serde(default = "default_strategy")]
    pub vision_feature_select_strategy: String,
    #[serde(default = "default_act")]
    pub projector_hidden_act: String,
    #[serde(default = "default_true")]
    pub multimodal_projector_bias: bool,
}

fn default_feature_layer() -> i64 {
    -2
}
fn default_strategy() -> String {
    "default".into()
}
fn default_act() -> String {
    "gelu".into()
}
fn default_true() -> bool {
    true
}

impl LlavaConfig {
    /// Reads and checks `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        Self::from_file(&dir.join("config.json"))
    }

    /// A LLaVA `config.json` under any name (a model config without weights).
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        // Another architecture would fail below on some field of its own ("unknown variant
        // `silu`" for Qwen2.5-VL); name it instead.
        let (raw, path): (serde_json::Value, _) = checkpoint::read_config_file(path)?;
        match raw.get("model_type").and_then(serde_json::Value::as_str) {
            Some("llava") | None => {}
            Some(other) => {
                return Err(ModelError::Config {
                    path,
                    message: format!(
                        "model_type {other:?} is not LLaVA's (\"llava\"); this reads LLaVA configs only (the model commands choose \"llava\" or \"qwen2_5_vl\" from model_type)"
                    ),
                })
            }
        }
        let cfg: Self = serde_json::from_value(raw).map_err(|source| ModelError::Json {
            path: path.clone(),
            source,
        })?;
        if let Err(message) = cfg.validate() {
            return Err(ModelError::Config { path, message });
        }
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        self.text_config
            .validate()
            .map_err(|m| format!("text_config: {m}"))?;
        let v = &self.vision_config;
        if v.num_attention_heads == 0 || !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err(format!(
                "vision_config: hidden_size {} is not a multiple of num_attention_heads {}",
                v.hidden_size, v.num_attention_heads
            ));
        }
        if v.patch_size == 0 || v.image_size < v.patch_size {
            return Err(format!(
                "vision_config: image_size {} and patch_size {} give no patches",
                v.image_size, v.patch_size
            ));
        }
        self.feature_layer()?;
        if !matches!(
            self.vision_feature_select_strategy.as_str(),
            "default" | "full"
        ) {
            return Err(format!(
                "vision_feature_select_strategy {:?} (only \"default\" and \"full\")",
                self.vision_feature_select_strategy
            ));
        }
        if self.projector_hidden_act != "gelu" {
            return Err(format!(
                "projector_hidden_act {:?} (only \"gelu\")",
                self.projector_hidden_act
            ));
        }
        if !self.multimodal_projector_bias {
            return Err("multimodal_projector_bias false is not supported".into());
        }
        Ok(())
    }

    /// `vision_feature_layer` as an index into `hidden_states` (`0..=num_hidden_layers`).
    pub fn feature_layer(&self) -> Result<usize, String> {
        let n = self.vision_config.num_hidden_layers as i64 + 1;
        let l = self.vision_feature_layer;
        let i = if l < 0 { n + l } else { l };
        if !(0..n).contains(&i) {
            return Err(format!(
                "vision_feature_layer {l} is outside the tower's {n} hidden states"
            ));
        }
        Ok(i as usize)
    }

    /// Image features per image: `grid^2` (+ 1 with the "full" strategy).
    pub fn image_tokens(&self) -> usize {
        let g = self.vision_config.grid();
        g * g + usize::from(self.vision_feature_select_strategy == "full")
    }
}

/// The key layout of a LLaVA checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyLayout {
    /// transformers 5's `model.language_model.*`, `lm_head`, `model.vision_tower.*`,
    /// `model.multi_modal_projector.*`; otherwise `language_model.model.*`,
    /// `language_model.lm_head`, `vision_tower.*`, `multi_modal_projector.*`.
    pub nested: bool,
    /// The tower's keys carry `CLIPVisionModel`'s `vision_model.` (`vision_tower.vision_model.*`).
    pub vision_model: bool,
}

impl KeyLayout {
    /// Detects the layout from the checkpoint's names.
    fn detect(has: impl Fn(&str) -> bool) -> Self {
        let nested = has("model.language_model.embed_tokens.weight");
        let probe = Self {
            nested,
            vision_model: true,
        };
        let vision_model = has(&checkpoint_key(
            "vision_tower.embeddings.class_embedding",
            probe,
        ));
        Self {
            nested,
            vision_model,
        }
    }
}

/// The one renaming at the loader's edge: a key as the model asks for it (the legacy layout
/// without `vision_model.`: `language_model.model.*`, `language_model.lm_head.*`,
/// `vision_tower.*`, `multi_modal_projector.*`) to its name in a checkpoint of `layout`.
pub fn checkpoint_key(name: &str, layout: KeyLayout) -> String {
    let name = match name.strip_prefix("vision_tower.") {
        Some(rest) if layout.vision_model => format!("vision_tower.vision_model.{rest}"),
        _ => name.to_string(),
    };
    if !layout.nested {
        return name;
    }
    if let Some(rest) = name.strip_prefix("language_model.model.") {
        format!("model.language_model.{rest}")
    } else if let Some(rest) = name.strip_prefix("language_model.lm_head.") {
        format!("lm_head.{rest}")
    } else {
        format!("model.{name}")
    }
}

/// `multi_modal_projector`: `linear_1 -> GELU (erf) -> linear_2`, both with bias.
#[derive(Debug, Clone)]
struct Projector {
    linear_1: Linear,
    linear_2: Linear,
}

impl Projector {
    fn load(vb: VarBuilder, vision: usize, text: usize) -> candle_core::Result<Self> {
        Ok(Self {
            linear_1: Linear::load(vb.pp("linear_1"), vision, text)?,
            linear_2: Linear::load(vb.pp("linear_2"), text, text)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.linear_2
            .forward(&self.linear_1.forward(x)?.gelu_erf()?)
    }
}

/// `LlavaForConditionalGeneration`: CLIP vision tower, projector, LLaMA.
#[derive(Debug, Clone)]
pub struct Llava {
    vision_tower: ClipVisionTower,
    projector: Projector,
    language_model: Llama,
    config: LlavaConfig,
    feature_layer: usize,
}

impl Llava {
    /// Builds the model from `vb` whose names are the legacy layout ([`checkpoint_key`]).
    pub fn load(vb: VarBuilder, config: LlavaConfig) -> candle_core::Result<Self> {
        let feature_layer = config.feature_layer().map_err(candle_core::Error::msg)?;
        let vision_tower =
            ClipVisionTower::load(vb.pp("vision_tower"), config.vision_config.clone())?;
        let projector = Projector::load(
            vb.pp("multi_modal_projector"),
            config.vision_config.hidden_size,
            config.text_config.hidden_size,
        )?;
        let language_model = Llama::load(vb.pp("language_model"), config.text_config.clone())?;
        Ok(Self {
            vision_tower,
            projector,
            language_model,
            config,
            feature_layer,
        })
    }

    /// Loads `dir` (config.json + safetensors in either key layout) with weights in `dtype`;
    /// every missing, mis-shaped or unexpected tensor (named as in the checkpoint) is listed in
    /// one [`ModelError::Tensors`].
    pub fn load_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let config = LlavaConfig::from_dir(dir)?;
        let detect = |has: &dyn Fn(&str) -> bool| -> Box<dyn Fn(&str) -> String + Send + Sync> {
            let layout = KeyLayout::detect(has);
            Box::new(move |k: &str| checkpoint_key(k, layout))
        };
        checkpoint::load_checked(dir, dtype, device, detect, |vb| Ok(Self::load(vb, config)?))
    }

    pub fn config(&self) -> &LlavaConfig {
        &self.config
    }

    pub fn language_model(&self) -> &Llama {
        &self.language_model
    }

    pub fn language_model_mut(&mut self) -> &mut Llama {
        &mut self.language_model
    }

    pub fn vision_tower(&self) -> &ClipVisionTower {
        &self.vision_tower
    }

    /// Projected image features: `[M, 3, S, S]` pixels -> `[M, image_tokens, text hidden]`.
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor, ModelError> {
        let v = &self.config.vision_config;
        let dims = pixels.dims();
        if dims.len() != 4
            || dims[1] != v.num_channels
            || dims[2] != v.image_size
            || dims[3] != v.image_size
        {
            return Err(ModelError::Input {
                field: "pixels",
                message: format!(
                    "shape {dims:?}, expected [B, {}, {}, {}]",
                    v.num_channels, v.image_size, v.image_size
                ),
            });
        }
        let x = pixels.to_dtype(self.language_model.dtype())?;
        let h = self.vision_tower.hidden_states(&x, self.feature_layer)?;
        let h = if self.config.vision_feature_select_strategy == "default" {
            let n = h.dim(1)?;
            h.narrow(1, 1, n - 1)?
        } else {
            h
        };
        Ok(self.projector.forward(&h)?)
    }

    /// Input embeddings: token embeddings with the image features written, in order, over the
    /// positions of `image_token_index` (row-major over the batch, as transformers'
    /// `masked_scatter`). Errors unless there are exactly `images * image_tokens` of them.
    pub fn input_embeds(&self, input_ids: &Tensor, pixels: &Tensor) -> Result<Tensor, ModelError> {
        self.embeds_with_features(input_ids, &self.image_features(pixels)?)
    }

    /// [`Self::input_embeds`] from image features already computed (`[M, image_tokens,
    /// hidden]`, [`Self::image_features`]), so that an image shared by several sequences runs
    /// the tower once.
    pub fn embeds_with_features(
        &self,
        input_ids: &Tensor,
        feats: &Tensor,
    ) -> Result<Tensor, ModelError> {
        let (b, t) = input_ids.dims2()?;
        let ids = input_ids.to_dtype(DType::U32)?;
        let flat: Vec<u32> = ids.flatten_all()?.to_vec1()?;
        let img = self.config.image_token_index;
        let (m, n, d) = feats.dims3()?;
        let found = flat.iter().filter(|&&i| i == img).count();
        if found != m * n {
            return Err(ModelError::Input {
                field: "input_ids",
                message: format!(
                    "{found} image tokens ({img}) but {m} image(s) give {} features ({n} each)",
                    m * n
                ),
            });
        }
        // The image token may lie outside the vocabulary: embed a 0 there, then overwrite.
        let text_ids: Vec<u32> = flat.iter().map(|&i| if i == img { 0 } else { i }).collect();
        let text_ids = Tensor::from_vec(text_ids, (b, t), input_ids.device())?;
        let text = self
            .language_model
            .embed_tokens(&text_ids)?
            .reshape((b * t, d))?;
        let mut k = 0u32;
        let source: Vec<u32> = flat
            .iter()
            .enumerate()
            .map(|(pos, &i)| {
                if i == img {
                    k += 1;
                    (b * t) as u32 + k - 1
                } else {
                    pos as u32
                }
            })
            .collect();
        let source = Tensor::from_vec(source, b * t, input_ids.device())?;
        let all = Tensor::cat(
            &[&text, &feats.reshape((m * n, d))?.to_dtype(text.dtype())?],
            0,
        )?;
        Ok(all.index_select(&source, 0)?.reshape((b, t, d))?)
    }

    /// `input_ids [B, T]`, `attention_mask [B, T]`, `pixels [M, 3, S, S]` -> logits
    /// `[B, T, V]` (f32 for f32/f16/bf16 weights, f64 for f64).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        pixels: &Tensor,
    ) -> Result<Tensor, ModelError> {
        let embeds = self.input_embeds(input_ids, pixels)?;
        Ok(self
            .language_model
            .forward_embeds(&embeds, attention_mask)?)
    }

    /// [`sequence_logprobs`] of [`Self::forward`]: `(sum of log p [B], count [B])` over the
    /// labels `label_mask` marks.
    pub fn sequence_logprobs(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        pixels: &Tensor,
        label_mask: &Tensor,
    ) -> Result<(Tensor, Tensor), ModelError> {
        let embeds = self.input_embeds(input_ids, pixels)?;
        let h = self.language_model.hidden_states(&embeds, attention_mask)?;
        let scored = Scored::new(input_ids, label_mask)?;
        let sums = self.language_model.scored_logprobs(&h, &scored, 0)?;
        let counts: Vec<f32> = scored.counts.iter().map(|&c| c as f32).collect();
        let counts =
            Tensor::from_vec(counts, scored.counts.len(), sums.device())?.to_dtype(sums.dtype())?;
        Ok((sums, counts))
    }
}
