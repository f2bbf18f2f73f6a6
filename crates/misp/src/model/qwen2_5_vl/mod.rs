//! Qwen2.5-VL as transformers' `Qwen2_5_VLForConditionalGeneration`: the image processor
//! ([`image_processor`]), the vision tower ([`vision`]) and the Qwen2 language model with
//! multimodal RoPE (misp's [`crate::model::llama::Llama`] with q/k/v biases and per-row RoPE
//! tables).

pub mod image_processor;
pub mod processor;
pub mod vision;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use serde_json::Value;

use self::image_processor::ImagePatches;
use self::vision::{VisionConfig, VisionTower};
use super::generate::Prefill;
use super::llama::{Llama, LlamaConfig, RopeParameters, RopeTables};
use crate::checkpoint;
pub use crate::checkpoint::ModelError;

/// `rope_parameters` (transformers 5) or `rope_scaling` (transformers 4) of the text config.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TextRope {
    pub rope_theta: Option<f64>,
    pub rope_type: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub mrope_section: Option<Vec<usize>>,
}

/// The language model's config: `text_config` (transformers 5) or the top level (transformers
/// 4 and the hub's original `config.json`). Defaults as transformers' `Qwen2_5_VLTextConfig`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: Option<f64>,
    pub rope_parameters: Option<TextRope>,
    pub rope_scaling: Option<TextRope>,
    pub use_sliding_window: bool,
    pub tie_word_embeddings: Option<bool>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<Value>,
    pub pad_token_id: Option<u32>,
}

impl Default for TextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 152064,
            hidden_size: 8192,
            intermediate_size: 29568,
            num_hidden_layers: 80,
            num_attention_heads: 64,
            num_key_value_heads: Some(8),
            hidden_act: "silu".into(),
            max_position_embeddings: 32768,
            rms_norm_eps: 1e-5,
            rope_theta: None,
            rope_parameters: None,
            rope_scaling: None,
            use_sliding_window: false,
            tie_word_embeddings: None,
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
        }
    }
}

/// `config.json` of a `Qwen2_5_VLForConditionalGeneration`.
#[derive(Debug, Clone)]
pub struct Qwen2_5VlConfig {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
    pub tie_word_embeddings: bool,
    /// Frequencies of each head's first half driven by the temporal, height and width positions.
    pub mrope_section: [usize; 3],
}

impl Qwen2_5VlConfig {
    /// Reads `dir/config.json`; errors name the file and the field.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let (raw, path): (Value, _) = checkpoint::read_config(dir)?;
        Self::from_value(&raw).map_err(|message| ModelError::Config { path, message })
    }

    pub fn from_value(raw: &Value) -> Result<Self, String> {
        let model_type = raw.get("model_type").and_then(Value::as_str).unwrap_or("");
        if model_type != "qwen2_5_vl" {
            return Err(format!("model_type {model_type:?} is not \"qwen2_5_vl\""));
        }
        let text_value = raw.get("text_config").unwrap_or(raw);
        let text: TextConfig =
            serde_json::from_value(text_value.clone()).map_err(|e| format!("text_config: {e}"))?;
        let vision: VisionConfig = serde_json::from_value(
            raw.get("vision_config")
                .cloned()
                .unwrap_or(Value::Object(Default::default())),
        )
        .map_err(|e| format!("vision_config: {e}"))?;
        let id = |key: &str, default: u32| -> Result<u32, String> {
            match raw.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v
                    .as_u64()
                    .map(|v| v as u32)
                    .ok_or_else(|| format!("{key}: expected a token id, got {v}")),
            }
        };
        let rope = text.rope_parameters.as_ref().or(text.rope_scaling.as_ref());
        let section = rope
            .and_then(|r| r.mrope_section.clone())
            .unwrap_or_else(|| vec![16, 24, 24]);
        let mut bad = Vec::new();
        let head_dim = text.hidden_size / text.num_attention_heads.max(1);
        if section.len() != 3 || section.iter().sum::<usize>() != head_dim / 2 {
            bad.push(format!(
                "mrope_section {section:?} must be 3 numbers summing to head_dim / 2 = {}",
                head_dim / 2
            ));
        }
        if text.use_sliding_window {
            bad.push("use_sliding_window (only full attention)".into());
        }
        bad.extend(vision.problems());
        if !bad.is_empty() {
            return Err(format!("unsupported Qwen2.5-VL config: {}", bad.join("; ")));
        }
        let tie = raw
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .or(text.tie_word_embeddings)
            .unwrap_or(false);
        let cfg = Self {
            image_token_id: id("image_token_id", 151655)?,
            video_token_id: id("video_token_id", 151656)?,
            vision_start_token_id: id("vision_start_token_id", 151652)?,
            vision_end_token_id: id("vision_end_token_id", 151653)?,
            tie_word_embeddings: tie,
            mrope_section: [section[0], section[1], section[2]],
            text,
            vision,
        };
        cfg.llama().validate()?;
        Ok(cfg)
    }

    /// The language model as misp's LLaMA: Qwen2 is LLaMA with biases on q, k, v.
    pub fn llama(&self) -> LlamaConfig {
        let t = &self.text;
        let rope = t.rope_parameters.as_ref().or(t.rope_scaling.as_ref());
        let theta = rope
            .and_then(|r| r.rope_theta)
            .or(t.rope_theta)
            .unwrap_or(1_000_000.0);
        LlamaConfig {
            vocab_size: t.vocab_size,
            hidden_size: t.hidden_size,
            intermediate_size: t.intermediate_size,
            num_hidden_layers: t.num_hidden_layers,
            num_attention_heads: t.num_attention_heads,
            num_key_value_heads: t.num_key_value_heads,
            head_dim: None,
            hidden_act: t.hidden_act.clone(),
            max_position_embeddings: t.max_position_embeddings,
            rms_norm_eps: t.rms_norm_eps,
            rope_theta: Some(theta),
            rope_parameters: Some(RopeParameters {
                rope_theta: Some(theta),
                rope_type: Some("default".into()),
            }),
            rope_scaling: None,
            attention_bias: false,
            mlp_bias: false,
            tie_word_embeddings: self.tie_word_embeddings,
            bos_token_id: t.bos_token_id,
            eos_token_id: t.eos_token_id.clone(),
            pad_token_id: t.pad_token_id,
            qkv_bias: true,
        }
    }
}

/// transformers 5 reads `model.visual.*` / `model.language_model.*` (its modules' own names) as
/// well as the hub's `visual.*` / `model.*` it saves. The model asks for the hub's names; this
/// maps them to a nested checkpoint's.
fn nested_key(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("visual.") {
        format!("model.visual.{rest}")
    } else if let Some(rest) = name.strip_prefix("model.") {
        format!("model.language_model.{rest}")
    } else {
        name.to_string()
    }
}

/// Multimodal RoPE positions of one sequence: `[3][T]` (temporal, height, width) and the
/// `rope_delta` that decoding adds to the token count.
#[derive(Debug, Clone, PartialEq)]
pub struct MropePositions {
    pub axes: [Vec<i64>; 3],
    pub delta: i64,
}

/// A batch as the language model takes it ([`Qwen2_5Vl::lm_inputs`]).
#[derive(Debug, Clone)]
pub struct LmInputs {
    /// `[B, T, hidden]`: token embeddings with each image's embeddings over its image tokens.
    pub embeds: Tensor,
    /// Every row's multimodal RoPE tables, `[B, 1, T, head_dim]`.
    pub rope: RopeTables,
    /// `[B, T]` u8, 1 for a token and 0 for padding.
    pub mask: Tensor,
}

/// `Qwen2_5_VLForConditionalGeneration`: vision tower and Qwen2 language model.
#[derive(Debug, Clone)]
pub struct Qwen2_5Vl {
    visual: VisionTower,
    language_model: Llama,
    config: Qwen2_5VlConfig,
}

impl Qwen2_5Vl {
    /// Builds the model from `vb` with the hub's names (`visual.*`, `model.*`, `lm_head`).
    pub fn load(vb: VarBuilder, config: Qwen2_5VlConfig) -> candle_core::Result<Self> {
        let visual = VisionTower::load(vb.pp("visual"), config.vision.clone())?;
        let language_model = Llama::load(vb.clone(), config.llama())?;
        Ok(Self {
            visual,
            language_model,
            config,
        })
    }

    /// Loads `dir` (config.json + safetensors, single or sharded, in either key layout) with
    /// weights in `dtype`; every missing, mis-shaped or unexpected tensor is listed in one
    /// [`ModelError::Tensors`].
    pub fn load_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let config = Qwen2_5VlConfig::from_dir(dir)?;
        let detect = |has: &dyn Fn(&str) -> bool| -> Box<dyn Fn(&str) -> String + Send + Sync> {
            if has("model.language_model.embed_tokens.weight") {
                Box::new(nested_key)
            } else {
                Box::new(|k: &str| k.to_string())
            }
        };
        checkpoint::load_checked(dir, dtype, device, detect, |vb| Ok(Self::load(vb, config)?))
    }

    pub fn config(&self) -> &Qwen2_5VlConfig {
        &self.config
    }

    pub fn language_model(&self) -> &Llama {
        &self.language_model
    }

    pub fn language_model_mut(&mut self) -> &mut Llama {
        &mut self.language_model
    }

    pub fn vision_tower(&self) -> &VisionTower {
        &self.visual
    }

    /// One image's embeddings `[tokens, hidden]` from its processed patches.
    pub fn image_embeds(&self, image: &ImagePatches, dev: &Device) -> Result<Tensor, ModelError> {
        let dim = self.config.vision.patch_dim();
        if image.pixels.len() != image.patches() * dim {
            return Err(ModelError::Input {
                field: "pixel_values",
                message: format!(
                    "{} values for {} patches of {dim}",
                    image.pixels.len(),
                    image.patches()
                ),
            });
        }
        let x = Tensor::from_slice(&image.pixels, (image.patches(), dim), dev)?;
        Ok(self.visual.forward(&x, image.grid_h, image.grid_w)?)
    }

    /// transformers' `get_rope_index` for one row: text tokens count up on all three axes; a
    /// run of image tokens (the next image of `grids`, `(grid_h, grid_w)` in patches) takes
    /// `(start, start + row, start + col)` over its merged grid, and the text after it continues
    /// at `start + max(rows, cols)`. `mask[t] == false` (padding) is skipped and gets 0.
    pub fn mrope_positions(
        &self,
        ids: &[u32],
        mask: &[bool],
        grids: &[(usize, usize)],
    ) -> Result<MropePositions, ModelError> {
        let input = |message: String| ModelError::Input {
            field: "input_ids",
            message,
        };
        let m = self.config.vision.spatial_merge_size;
        let img = self.config.image_token_id;
        let mut axes = [
            vec![0i64; ids.len()],
            vec![0i64; ids.len()],
            vec![0i64; ids.len()],
        ];
        let real: Vec<usize> = (0..ids.len()).filter(|&t| mask[t]).collect();
        let mut next_grid = grids.iter();
        let mut pos = 0i64;
        let mut max = -1i64;
        let mut i = 0;
        while i < real.len() {
            let t = real[i];
            if ids[t] != img {
                for a in &mut axes {
                    a[t] = pos;
                }
                max = max.max(pos);
                pos += 1;
                i += 1;
                continue;
            }
            let run = real[i..].iter().take_while(|&&t| ids[t] == img).count();
            let &(gh, gw) = next_grid.next().ok_or_else(|| {
                input(format!(
                    "more image-token runs than the {} image(s)",
                    grids.len()
                ))
            })?;
            let (h, w) = (gh / m, gw / m);
            if run != h * w {
                return Err(input(format!(
                    "a run of {run} image tokens for an image of {h} x {w} merged patches"
                )));
            }
            for k in 0..run {
                let t = real[i + k];
                let (r, c) = ((k / w) as i64, (k % w) as i64);
                axes[0][t] = pos;
                axes[1][t] = pos + r;
                axes[2][t] = pos + c;
                max = max.max(pos + r.max(c));
            }
            pos += h.max(w) as i64;
            i += run;
        }
        if next_grid.next().is_some() {
            return Err(input(format!(
                "{} image(s) but fewer image-token runs",
                grids.len()
            )));
        }
        Ok(MropePositions {
            axes,
            delta: max + 1 - real.len() as i64,
        })
    }

    /// Multimodal RoPE tables `[B, 1, T, head_dim]` of every row's positions: frequency `j` of
    /// the first half turns by the temporal, height or width position as `mrope_section` cuts
    /// them; the second half repeats the first (`rotate_half` pairs).
    pub fn mrope_tables(
        &self,
        rows: &[MropePositions],
        dev: &Device,
    ) -> Result<RopeTables, ModelError> {
        let lc = self.language_model.config();
        let hd = lc.head_dim();
        let half = hd / 2;
        let theta = lc.rope_theta();
        let inv: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf(2.0 * i as f64 / hd as f64)) as f32)
            .collect();
        let [s0, s1, _] = self.config.mrope_section;
        let axis = |j: usize| usize::from(j >= s0) + usize::from(j >= s0 + s1);
        let t = rows.first().map_or(0, |r| r.axes[0].len());
        let b = rows.len();
        let (mut cos, mut sin) = (
            Vec::with_capacity(b * t * hd),
            Vec::with_capacity(b * t * hd),
        );
        let mut angles = vec![0f32; half];
        for r in rows {
            if r.axes[0].len() != t {
                return Err(ModelError::Input {
                    field: "input_ids",
                    message: "rows of different lengths".into(),
                });
            }
            for p in 0..t {
                for (j, a) in angles.iter_mut().enumerate() {
                    *a = r.axes[axis(j)][p] as f32 * inv[j];
                }
                for _ in 0..2 {
                    cos.extend(angles.iter().map(|a| a.cos()));
                    sin.extend(angles.iter().map(|a| a.sin()));
                }
            }
        }
        Ok(RopeTables {
            cos: Tensor::from_vec(cos, (b, 1, t, hd), dev)?,
            sin: Tensor::from_vec(sin, (b, 1, t, hd), dev)?,
        })
    }

    /// Token embeddings with each image's embeddings written over its image tokens, images in
    /// row order (transformers' `masked_scatter`). `images[b]`: the images of row `b`.
    pub fn input_embeds(
        &self,
        ids: &[Vec<u32>],
        images: &[Vec<&ImagePatches>],
        dev: &Device,
    ) -> Result<Tensor, ModelError> {
        let b = ids.len();
        let t = ids.first().map_or(0, Vec::len);
        let img = self.config.image_token_id;
        let mut feats = Vec::new();
        for row in images {
            for image in row {
                feats.push(self.image_embeds(image, dev)?);
            }
        }
        let n_feats: usize = feats
            .iter()
            .map(|f| f.dim(0))
            .sum::<candle_core::Result<usize>>()?;
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        if flat.len() != b * t {
            return Err(ModelError::Input {
                field: "input_ids",
                message: "rows of different lengths".into(),
            });
        }
        let found = flat.iter().filter(|&&i| i == img).count();
        if found != n_feats {
            return Err(ModelError::Input {
                field: "input_ids",
                message: format!(
                    "{found} image tokens ({img}) but the images give {n_feats} embeddings"
                ),
            });
        }
        let text_ids: Vec<u32> = flat.iter().map(|&i| if i == img { 0 } else { i }).collect();
        let text_ids = Tensor::from_vec(text_ids, (b, t), dev)?;
        let lm = &self.language_model;
        let d = lm.config().hidden_size;
        let text = lm.embed_tokens(&text_ids)?.reshape((b * t, d))?;
        if feats.is_empty() {
            return Ok(text.reshape((b, t, d))?);
        }
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
        let feats = Tensor::cat(&feats, 0)?.to_dtype(text.dtype())?;
        let all = Tensor::cat(&[&text, &feats], 0)?;
        let source = Tensor::from_vec(source, b * t, dev)?;
        Ok(all.index_select(&source, 0)?.reshape((b, t, d))?)
    }

    /// Logits `[B, T, V]` (f32; f64 for an f64 model) of right- or left-padded rows of equal
    /// length: `mask[b][t]` marks tokens, `images[b]` the images of row `b`.
    pub fn forward(
        &self,
        ids: &[Vec<u32>],
        mask: &[Vec<bool>],
        images: &[Vec<&ImagePatches>],
        dev: &Device,
    ) -> Result<Tensor, ModelError> {
        let x = self.lm_inputs(ids, mask, images, dev)?;
        Ok(self
            .language_model
            .forward_embeds_with_rope(&x.embeds, &x.mask, Some(&x.rope))?)
    }

    /// What the language model takes for a batch of rows of equal length (right- or
    /// left-padded; `mask[b][t]` marks tokens, `images[b]` the images of row `b`, of any sizes):
    /// the embeddings with the images written in, every row's multimodal RoPE tables and the
    /// mask as a tensor. The training path's forward without a graph is
    /// `language_model().forward_detached_with_rope(&x.embeds, &x.mask, Some(&x.rope), keep)`.
    pub fn lm_inputs(
        &self,
        ids: &[Vec<u32>],
        mask: &[Vec<bool>],
        images: &[Vec<&ImagePatches>],
        dev: &Device,
    ) -> Result<LmInputs, ModelError> {
        if mask.len() != ids.len() || images.len() != ids.len() {
            return Err(ModelError::Input {
                field: "input_ids",
                message: format!(
                    "{} rows, {} masks, {} image lists",
                    ids.len(),
                    mask.len(),
                    images.len()
                ),
            });
        }
        let embeds = self.input_embeds(ids, images, dev)?;
        let rows = ids
            .iter()
            .zip(mask)
            .zip(images)
            .map(|((r, m), imgs)| {
                let grids: Vec<_> = imgs.iter().map(|i| (i.grid_h, i.grid_w)).collect();
                self.mrope_positions(r, m, &grids)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let rope = self.mrope_tables(&rows, dev)?;
        let (b, t) = (ids.len(), ids.first().map_or(0, Vec::len));
        let m: Vec<u8> = mask.iter().flatten().map(|&x| u8::from(x)).collect();
        let mask = Tensor::from_vec(m, (b, t), dev)?;
        Ok(LmInputs { embeds, rope, mask })
    }

    /// Greedy continuation of left-padded prompts (each with its images): the new ids of every
    /// row, EOS included when produced, as transformers' `generate(do_sample=False)`: the
    /// prompt with multimodal positions, then each row's next position `rope_delta` past its
    /// token count.
    pub fn greedy(
        &self,
        prompts: &[Vec<u32>],
        images: &[Vec<&ImagePatches>],
        eos: &[u32],
        pad: u32,
        max_new_tokens: usize,
        dev: &Device,
    ) -> Result<Vec<Vec<u32>>, ModelError> {
        if prompts.is_empty() || max_new_tokens == 0 {
            return Ok(vec![Vec::new(); prompts.len()]);
        }
        let prefill = self.prefill(prompts, images, pad, dev)?;
        crate::model::generate::decode_all(&self.language_model, prefill, eos, max_new_tokens)
    }

    /// The prompt pass of [`Self::greedy`]: left-padded prompts with multimodal positions, the
    /// cache then set to continue each row `rope_delta` past its token count.
    pub fn prefill(
        &self,
        prompts: &[Vec<u32>],
        images: &[Vec<&ImagePatches>],
        pad: u32,
        dev: &Device,
    ) -> Result<Prefill, ModelError> {
        let b = prompts.len();
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(b);
        let mut mask = Vec::with_capacity(b);
        for p in prompts {
            let padding = width - p.len();
            ids.push(
                std::iter::repeat_n(pad, padding)
                    .chain(p.iter().copied())
                    .collect::<Vec<_>>(),
            );
            mask.push(
                std::iter::repeat_n(false, padding)
                    .chain(std::iter::repeat_n(true, p.len()))
                    .collect::<Vec<_>>(),
            );
        }
        let x = self.lm_inputs(&ids, &mask, images, dev)?;
        let deltas = ids
            .iter()
            .zip(&mask)
            .zip(images)
            .map(|((r, m), imgs)| {
                let grids: Vec<_> = imgs.iter().map(|i| (i.grid_h, i.grid_w)).collect();
                Ok(self.mrope_positions(r, m, &grids)?.delta)
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let lm = &self.language_model;
        let mut cache = lm.new_cache(b);
        let logits =
            lm.forward_cached_last_with_rope(&x.embeds, &x.mask, &mut cache, Some(&x.rope))?;
        cache.set_position_offsets(deltas)?;
        Prefill::new(cache, &logits)
    }
}
