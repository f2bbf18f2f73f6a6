//! A vision-language checkpoint ready to use: model (+ PEFT adapter), tokenizer and image
//! processor, with the batched scoring and generation that `misp score`, `misp generate`, the
//! trainer, the server and the evaluators share.
//!
//! Stage: score / train / eval. Reads an HF checkpoint folder (`config.json`, safetensors,
//! `tokenizer.json`, the image processor's config when present) and optionally a PEFT adapter
//! folder; reads images. Writes nothing.
//!
//! The backbone is chosen from `config.json`'s `model_type` ([`Backbone`]): `llava`
//! (LLaVA-1.5: fixed-size `[3, S, S]` pixels, a fixed number of image tokens) or `qwen2_5_vl`
//! (Qwen2.5-VL: patches at the image's own resolution, so the number of image tokens, and
//! with it the prompt's ids, depends on each image). Everything above this module works on
//! [`PreparedScore`] / [`PreparedPrompt`], which carry each item's own image payload, and so
//! never needs to know which backbone it holds.
//!
//! Work is split in two steps so callers can decide what a bad item means: `prepare_*` turns
//! one item (image path + text) into ids and pixels or an [`ItemError`] that names what is
//! wrong; the batched `*_prepared` calls then run the model on items that are known good.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::adapter::{load_peft_adapter, load_peft_adapter_into, save_peft_adapter_of, PeftBase};
use super::clip::image_processor::{ImageDecodeError, ImageProcessor};
use super::generate::{decode_all, prefill, Prefill};
use super::llama::{Llama, RopeTables, Scored};
use super::llava::processor::{EncodeError, LlavaProcessor, DEFAULT_TEMPLATE};
use super::llava::Llava;
use super::lora::LoraConfig;
use super::qwen2_5_vl::image_processor::{ImagePatches, QwenImageProcessor};
use super::qwen2_5_vl::processor::QwenProcessor;
use super::qwen2_5_vl::{LmInputs, Qwen2_5Vl};
pub use crate::checkpoint::ModelError;

/// The `model_type`s [`Vlm::load`] takes.
pub const MODEL_TYPES: [&str; 2] = ["llava", "qwen2_5_vl"];

/// How to load a checkpoint.
#[derive(Debug, Clone)]
pub struct VlmOptions {
    /// Weights' dtype (`F32` or `BF16`; LoRA stays f32).
    pub dtype: DType,
    /// Original LLaVA-1.5's pad-to-square with the mean colour before resizing (LLaVA only).
    pub pad_to_square: bool,
    /// A template other than llava-hf's `USER: <image>\n{prompt} ASSISTANT:` (LLaVA only:
    /// Qwen2.5-VL renders its checkpoint's own chat template).
    pub template: Option<String>,
    pub device: Device,
}

impl Default for VlmOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            pad_to_square: false,
            template: None,
            device: Device::Cpu,
        }
    }
}

/// Why one item cannot be scored or answered.
#[derive(Debug, thiserror::Error)]
pub enum ItemError {
    #[error("image {}: {source}", path.display())]
    Image {
        path: PathBuf,
        source: ImageDecodeError,
    },
    /// A decoded image the processor cannot take (Qwen2.5-VL: an aspect ratio above 200).
    #[error("image {}: {message}", path.display())]
    Pixels { path: PathBuf, message: String },
    #[error(transparent)]
    Text(#[from] EncodeError),
    /// Qwen2.5-VL's prompt or response cannot be encoded.
    #[error("{0}")]
    Encode(String),
}

/// One scored sequence, ready to batch.
#[derive(Debug, Clone)]
pub struct PreparedScore {
    pub prompt_ids: Vec<u32>,
    pub response_ids: Vec<u32>,
    /// The image: see [`PreparedImage`].
    pub pixels: Vec<f32>,
    /// `None` for LLaVA's `[3, S, S]`; `(grid_h, grid_w)` of Qwen2.5-VL's patches.
    pub grid: Option<(usize, usize)>,
}

/// One prompt to answer, ready to batch.
#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    pub prompt_ids: Vec<u32>,
    pub pixels: Vec<f32>,
    /// As [`PreparedScore::grid`].
    pub grid: Option<(usize, usize)>,
}

/// One preprocessed image: LLaVA's `[3, S, S]` channel-first pixels (`grid: None`), or
/// Qwen2.5-VL's flattened patches `[grid_h * grid_w, patch_dim]` with their grid.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedImage {
    pub pixels: Vec<f32>,
    pub grid: Option<(usize, usize)>,
}

/// Right-padded scoring batch: `ids [B, T]` (u32), `mask [B, T]` (u8), `labels [B, T]` (f32,
/// 1 on response tokens and EOS).
#[derive(Debug, Clone)]
pub struct ScoreBatch {
    pub ids: Tensor,
    pub mask: Tensor,
    pub labels: Tensor,
}

/// The model, text processor and image processor of one architecture.
// A process holds one or two of these: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Backbone {
    Llava {
        model: Llava,
        processor: LlavaProcessor,
        images: ImageProcessor,
    },
    Qwen2_5Vl {
        model: Qwen2_5Vl,
        processor: QwenProcessor,
        images: QwenImageProcessor,
    },
}

/// What [`Vlm::decoder_inputs`] gives: a batch ready for the language model's layers.
#[derive(Debug)]
pub struct DecoderInputs {
    pub batch: ScoreBatch,
    /// `[B, T, hidden]`.
    pub embeds: Tensor,
    /// Every row's RoPE tables, or `None` for positions `0..T`.
    pub rope: Option<RopeTables>,
}

/// Image features computed so far, by the pixels they came from ([`Vlm::decoder_inputs_reusing`]).
/// Lookups compare pixels exactly; a micro-step holds a few images, so a list serves.
#[derive(Debug, Default)]
pub struct ImageFeatures<'a> {
    done: Vec<(&'a [f32], Tensor)>,
}

impl<'a> ImageFeatures<'a> {
    fn get(&self, pixels: &[f32]) -> Option<&Tensor> {
        self.done.iter().find(|(p, _)| *p == pixels).map(|(_, f)| f)
    }
}

/// Model + processor + image preprocessing of one checkpoint.
#[derive(Debug, Clone)]
pub struct Vlm {
    pub backbone: Backbone,
    /// The adapter's config when one was loaded.
    pub adapter: Option<LoraConfig>,
    device: Device,
}

/// `config.json`'s `model_type` (absent: `llava`, as the LLaVA loader has always read it).
pub fn model_type(dir: &Path) -> Result<String, ModelError> {
    let (raw, path): (serde_json::Value, _) = crate::checkpoint::read_config(dir)?;
    match raw.get("model_type") {
        None | Some(serde_json::Value::Null) => Ok("llava".into()),
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(ModelError::Config {
            path,
            message: format!("model_type: expected a string, got {other}"),
        }),
    }
}

impl Vlm {
    /// Loads `model_dir` (the backbone its `config.json`'s `model_type` names) and, when
    /// given, the PEFT adapter in `adapter`.
    pub fn load(
        model_dir: &Path,
        adapter: Option<&Path>,
        opts: &VlmOptions,
    ) -> Result<Self, ModelError> {
        let kind = model_type(model_dir)?;
        match kind.as_str() {
            "llava" => Self::load_llava(model_dir, adapter, opts),
            "qwen2_5_vl" => Self::load_qwen(model_dir, adapter, opts),
            other => Err(ModelError::Config {
                path: model_dir.join("config.json"),
                message: format!(
                    "model_type {other:?} is not one misp runs (known: {})",
                    MODEL_TYPES.map(|t| format!("{t:?}")).join(", ")
                ),
            }),
        }
    }

    fn load_llava(
        model_dir: &Path,
        adapter: Option<&Path>,
        opts: &VlmOptions,
    ) -> Result<Self, ModelError> {
        let mut model = Llava::load_dir(model_dir, opts.dtype, &opts.device)?;
        let mut processor = LlavaProcessor::from_dir(model_dir, model.config())?;
        if let Some(t) = &opts.template {
            processor = processor
                .with_template(t)
                .map_err(|message| ModelError::Input {
                    field: "template",
                    message,
                })?;
        }
        let size = model.config().vision_config.image_size;
        let mut images =
            ImageProcessor::from_checkpoint(model_dir, size).map_err(|e| ModelError::Config {
                path: model_dir.join("preprocessor_config.json"),
                message: e.to_string(),
            })?;
        images.pad_to_square = opts.pad_to_square;
        let adapter = match adapter {
            Some(dir) => Some(load_peft_adapter(dir, &mut model)?),
            None => None,
        };
        Ok(Self {
            backbone: Backbone::Llava {
                model,
                processor,
                images,
            },
            adapter,
            device: opts.device.clone(),
        })
    }

    fn load_qwen(
        model_dir: &Path,
        adapter: Option<&Path>,
        opts: &VlmOptions,
    ) -> Result<Self, ModelError> {
        // LLaVA's options would silently do nothing here; say so instead.
        if opts.pad_to_square {
            return Err(ModelError::Config {
                path: model_dir.join("config.json"),
                message: "pad_to_square is LLaVA-1.5's; a Qwen2.5-VL checkpoint keeps each \
                          image's aspect ratio"
                    .into(),
            });
        }
        if let Some(t) = opts.template.as_deref().filter(|t| *t != DEFAULT_TEMPLATE) {
            return Err(ModelError::Config {
                path: model_dir.join("config.json"),
                message: format!(
                    "template {t:?}: a Qwen2.5-VL checkpoint's prompt is its own chat \
                     template; the template option is LLaVA's"
                ),
            });
        }
        let mut model = Qwen2_5Vl::load_dir(model_dir, opts.dtype, &opts.device)?;
        let processor = QwenProcessor::from_dir(model_dir, model.config())?;
        let images = QwenImageProcessor::from_dir(model_dir).map_err(|e| ModelError::Config {
            path: model_dir.to_path_buf(),
            message: e.to_string(),
        })?;
        let merge = model.config().vision.spatial_merge_size;
        if images.merge_size != merge || images.patch_dim() != model.config().vision.patch_dim() {
            return Err(ModelError::Config {
                path: model_dir.join("processor_config.json"),
                message: format!(
                    "the image processor's merge_size {} / patch size {} do not fit the vision \
                     tower's ({merge} / {} values per patch)",
                    images.merge_size,
                    images.patch_dim(),
                    model.config().vision.patch_dim()
                ),
            });
        }
        let adapter = match adapter {
            Some(dir) => Some(load_peft_adapter_into(dir, model.language_model_mut())?),
            None => None,
        };
        Ok(Self {
            backbone: Backbone::Qwen2_5Vl {
                model,
                processor,
                images,
            },
            adapter,
            device: opts.device.clone(),
        })
    }

    /// Assembles a LLaVA `Vlm` from parts built in memory (a model being trained, say).
    pub fn from_parts(
        model: Llava,
        processor: LlavaProcessor,
        images: ImageProcessor,
        device: Device,
    ) -> Self {
        Self {
            backbone: Backbone::Llava {
                model,
                processor,
                images,
            },
            adapter: None,
            device,
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `config.json`'s `model_type` of the backbone.
    pub fn model_type(&self) -> &'static str {
        match &self.backbone {
            Backbone::Llava { .. } => "llava",
            Backbone::Qwen2_5Vl { .. } => "qwen2_5_vl",
        }
    }

    /// The LLaVA model, when the backbone is LLaVA (what LLaVA-only tools, such as the pieces
    /// path of training, reach for).
    pub fn llava(&self) -> Option<&Llava> {
        match &self.backbone {
            Backbone::Llava { model, .. } => Some(model),
            _ => None,
        }
    }

    /// The LLaVA text processor, when the backbone is LLaVA.
    pub fn llava_processor(&self) -> Option<&LlavaProcessor> {
        match &self.backbone {
            Backbone::Llava { processor, .. } => Some(processor),
            _ => None,
        }
    }

    /// The decoder the adapters live on.
    pub fn language_model(&self) -> &Llama {
        match &self.backbone {
            Backbone::Llava { model, .. } => model.language_model(),
            Backbone::Qwen2_5Vl { model, .. } => model.language_model(),
        }
    }

    pub fn language_model_mut(&mut self) -> &mut Llama {
        match &mut self.backbone {
            Backbone::Llava { model, .. } => model.language_model_mut(),
            Backbone::Qwen2_5Vl { model, .. } => model.language_model_mut(),
        }
    }

    /// Writes the attached adapters in PEFT's layout for this backbone's transformers class.
    pub fn save_adapter(
        &self,
        dir: &Path,
        cfg: &LoraConfig,
        base_model_name_or_path: &str,
    ) -> Result<(), ModelError> {
        let base = match &self.backbone {
            Backbone::Llava { .. } => PeftBase::LLAVA,
            Backbone::Qwen2_5Vl { .. } => PeftBase::QWEN2_5_VL,
        };
        save_peft_adapter_of(
            dir,
            self.language_model(),
            cfg,
            base_model_name_or_path,
            base,
        )
    }

    /// Everything about the processor a log-prob depends on beyond the weights, for cache
    /// keys: LLaVA's template (as it always was); Qwen2.5-VL's pixel bounds, patch geometry,
    /// resampling and normalisation (its template is fixed and checked at load).
    pub fn processor_key(&self) -> String {
        match &self.backbone {
            Backbone::Llava { processor, .. } => processor.template().to_string(),
            Backbone::Qwen2_5Vl { images: p, .. } => format!(
                "qwen2_5_vl min_pixels={} max_pixels={} patch={} temporal={} merge={} \
                 resize={} resample={:?} rescale={}:{} normalize={}:{:?}:{:?}",
                p.min_pixels,
                p.max_pixels,
                p.patch_size,
                p.temporal_patch_size,
                p.merge_size,
                p.do_resize,
                p.resample,
                p.do_rescale,
                p.rescale_factor,
                p.do_normalize,
                p.image_mean,
                p.image_std
            ),
        }
    }

    /// Ids that end a generation.
    pub fn stop_ids(&self) -> &[u32] {
        match &self.backbone {
            Backbone::Llava { processor, .. } => processor.eos(),
            Backbone::Qwen2_5Vl { processor, .. } => processor.stop(),
        }
    }

    /// The padding id.
    pub fn pad_id(&self) -> u32 {
        match &self.backbone {
            Backbone::Llava { processor, .. } => processor.pad(),
            Backbone::Qwen2_5Vl { processor, .. } => processor.pad(),
        }
    }

    /// Text of generated ids, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ItemError> {
        match &self.backbone {
            Backbone::Llava { processor, .. } => Ok(processor.decode(ids)?),
            Backbone::Qwen2_5Vl { processor, .. } => {
                processor.decode(ids).map_err(ItemError::Encode)
            }
        }
    }

    /// Reads and decodes an image file (no preprocessing).
    pub fn decode_file(&self, path: &Path) -> Result<RgbImage, ImageDecodeError> {
        match &self.backbone {
            Backbone::Llava { images, .. } => images.decode_file(path),
            Backbone::Qwen2_5Vl { images, .. } => images.decode_file(path),
        }
    }

    /// Decodes an image's encoded bytes (no preprocessing).
    pub fn decode_bytes(&self, bytes: &[u8]) -> Result<RgbImage, ImageDecodeError> {
        match &self.backbone {
            Backbone::Llava { images, .. } => images.decode(bytes),
            Backbone::Qwen2_5Vl { images, .. } => images.decoder.decode(bytes),
        }
    }

    /// The preprocessed image (`what` names it in an error).
    pub fn image(&self, img: &RgbImage, what: &Path) -> Result<PreparedImage, ItemError> {
        match &self.backbone {
            Backbone::Llava { images, .. } => Ok(PreparedImage {
                pixels: images.pixels(img),
                grid: None,
            }),
            Backbone::Qwen2_5Vl { images, .. } => {
                let p = images.patches(img).map_err(|message| ItemError::Pixels {
                    path: what.to_owned(),
                    message,
                })?;
                Ok(PreparedImage {
                    pixels: p.pixels,
                    grid: Some((p.grid_h, p.grid_w)),
                })
            }
        }
    }

    /// An all-zero image (normalised values), for a request without one: LLaVA's `[3, S, S]`,
    /// Qwen2.5-VL's smallest grid (one merge unit, one image token).
    pub fn blank_image(&self) -> PreparedImage {
        match &self.backbone {
            Backbone::Llava { model, .. } => {
                let s = model.config().vision_config.image_size;
                PreparedImage {
                    pixels: vec![0.0; 3 * s * s],
                    grid: None,
                }
            }
            Backbone::Qwen2_5Vl { images, .. } => {
                let m = images.merge_size;
                PreparedImage {
                    pixels: vec![0.0; m * m * images.patch_dim()],
                    grid: Some((m, m)),
                }
            }
        }
    }

    /// Decoded and preprocessed pixels of one image file.
    pub fn load_image(&self, path: &Path) -> Result<PreparedImage, ItemError> {
        let img = self.decode_file(path).map_err(|source| ItemError::Image {
            path: path.to_owned(),
            source,
        })?;
        self.image(&img, path)
    }

    /// Decoded and preprocessed pixels of one image file (the payload of
    /// [`Self::load_image`] without its grid).
    pub fn load_pixels(&self, path: &Path) -> Result<Vec<f32>, ItemError> {
        Ok(self.load_image(path)?.pixels)
    }

    /// The prompt's template ids and the response's scored ids (EOS appended). For Qwen2.5-VL
    /// the prompt holds one `<|image_pad|>`, which [`Self::expand_prompt`] widens to an
    /// image's token count; LLaVA's prompt is already expanded (its count is fixed).
    pub fn scored_ids(
        &self,
        prompt: &str,
        response: &str,
    ) -> Result<(Vec<u32>, Vec<u32>), ItemError> {
        match &self.backbone {
            Backbone::Llava { processor, .. } => Ok(processor.scored_ids(prompt, response)?),
            Backbone::Qwen2_5Vl { processor, .. } => Ok((
                processor.prompt_ids(prompt, 1).map_err(ItemError::Encode)?,
                processor
                    .response_ids(response)
                    .map_err(ItemError::Encode)?,
            )),
        }
    }

    /// The prompt's template ids alone (see [`Self::scored_ids`]).
    pub fn prompt_template_ids(&self, prompt: &str) -> Result<Vec<u32>, ItemError> {
        match &self.backbone {
            Backbone::Llava { processor, .. } => Ok(processor.prompt_ids(prompt)?),
            Backbone::Qwen2_5Vl { processor, .. } => {
                processor.prompt_ids(prompt, 1).map_err(ItemError::Encode)
            }
        }
    }

    /// Template ids with each image token widened to `image`'s token count (Qwen2.5-VL: the
    /// processor's expansion; `<|image_pad|>` is a special token, so expanding the ids equals
    /// expanding the text). LLaVA's ids come back as they are.
    pub fn expand_prompt(&self, ids: &[u32], image: &PreparedImage) -> Vec<u32> {
        match (&self.backbone, image.grid) {
            (
                Backbone::Qwen2_5Vl {
                    processor, images, ..
                },
                Some((h, w)),
            ) => {
                let n = h * w / (images.merge_size * images.merge_size);
                let img = processor.image_token();
                let mut out = Vec::with_capacity(ids.len() + n);
                for &t in ids {
                    if t == img {
                        out.extend(std::iter::repeat_n(img, n));
                    } else {
                        out.push(t);
                    }
                }
                out
            }
            _ => ids.to_vec(),
        }
    }

    /// Ids and pixels of `response` scored after `prompt` about `image`.
    pub fn prepare_score(
        &self,
        image: &Path,
        prompt: &str,
        response: &str,
    ) -> Result<PreparedScore, ItemError> {
        let (prompt_ids, response_ids) = self.scored_ids(prompt, response)?;
        let img = self.load_image(image)?;
        Ok(PreparedScore {
            prompt_ids: self.expand_prompt(&prompt_ids, &img),
            response_ids,
            pixels: img.pixels,
            grid: img.grid,
        })
    }

    /// Ids and pixels of `prompt` about `image`, to answer.
    pub fn prepare_prompt(&self, image: &Path, prompt: &str) -> Result<PreparedPrompt, ItemError> {
        let ids = self.prompt_template_ids(prompt)?;
        let img = self.load_image(image)?;
        Ok(self.prompt_with_image(&ids, img))
    }

    /// A prompt's template ids with its preprocessed image.
    pub fn prompt_with_image(&self, ids: &[u32], img: PreparedImage) -> PreparedPrompt {
        PreparedPrompt {
            prompt_ids: self.expand_prompt(ids, &img),
            pixels: img.pixels,
            grid: img.grid,
        }
    }

    /// `[B, 3, S, S]` from per-item pixel vectors (LLaVA).
    pub fn pixel_tensor(&self, pixels: &[&[f32]]) -> Result<Tensor, ModelError> {
        let Some(model) = self.llava() else {
            return Err(ModelError::Input {
                field: "pixels",
                message: "a pixel tensor of fixed-size images is LLaVA's; Qwen2.5-VL takes \
                          each image's patches"
                    .into(),
            });
        };
        let s = model.config().vision_config.image_size;
        let flat: Vec<f32> = pixels.iter().flat_map(|p| p.iter().copied()).collect();
        if flat.len() != pixels.len() * 3 * s * s {
            return Err(ModelError::Input {
                field: "pixels",
                message: format!(
                    "{} values for {} images of {s} px",
                    flat.len(),
                    pixels.len()
                ),
            });
        }
        Ok(Tensor::from_vec(
            flat,
            (pixels.len(), 3, s, s),
            &self.device,
        )?)
    }

    /// The right-padded batch of `(prompt ids, response ids)` sequences.
    pub fn score_batch(&self, seqs: &[(&[u32], &[u32])]) -> Result<ScoreBatch, ModelError> {
        score_batch(seqs, self.pad_id(), &self.device)
    }

    /// Summed response log-probs `[B]` and token counts `[B]` of prepared items, differentiable
    /// with respect to the adapter (the trainer's forward). Each item's own image is used, or,
    /// for LLaVA, `pixels [B, 3, S, S]` when the caller already holds the batch's images as one
    /// tensor (pretraining keeps one pixel table for all examples, its items carry none).
    pub fn logprobs(
        &self,
        items: &[&PreparedScore],
        pixels: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor), ModelError> {
        match &self.backbone {
            Backbone::Llava { model, .. } => {
                let seqs: Vec<(&[u32], &[u32])> = items
                    .iter()
                    .map(|i| (i.prompt_ids.as_slice(), i.response_ids.as_slice()))
                    .collect();
                let batch = self.score_batch(&seqs)?;
                let own;
                let pixels = match pixels {
                    Some(p) => p,
                    None => {
                        let px: Vec<&[f32]> = items.iter().map(|i| i.pixels.as_slice()).collect();
                        own = self.pixel_tensor(&px)?;
                        &own
                    }
                };
                model.sequence_logprobs(&batch.ids, &batch.mask, pixels, &batch.labels)
            }
            Backbone::Qwen2_5Vl { model, .. } => {
                if pixels.is_some() {
                    return Err(ModelError::Input {
                        field: "pixels",
                        message: "a pixel tensor of fixed-size images is LLaVA's; Qwen2.5-VL \
                                  items carry their own patches"
                            .into(),
                    });
                }
                qwen_item_logprobs(model, items, self.pad_id(), &self.device)
            }
        }
    }

    /// A right-padded batch of prepared items as the language model takes it: the batch
    /// (ids, mask, labels), the input embeddings with each item's image written in, and the
    /// rows' RoPE tables where the backbone has its own positions (Qwen2.5-VL's multimodal
    /// RoPE; `None`: positions `0..T`). The trainer's memory-saving path starts here.
    pub fn decoder_inputs(&self, items: &[&PreparedScore]) -> Result<DecoderInputs, ModelError> {
        self.decoder_inputs_reusing(items, &mut ImageFeatures::default())
    }

    /// [`Self::decoder_inputs`], taking LLaVA's image features from `seen` where an earlier
    /// call (or an earlier row) already ran the tower on the same pixels, and adding those it
    /// computes: a DPO record's chosen and rejected sequences share their image, so a step
    /// run group by group runs the tower once per distinct image. (Qwen2.5-VL's rows run their
    /// tower as before.)
    pub fn decoder_inputs_reusing<'a>(
        &self,
        items: &[&'a PreparedScore],
        seen: &mut ImageFeatures<'a>,
    ) -> Result<DecoderInputs, ModelError> {
        let seqs: Vec<(&[u32], &[u32])> = items
            .iter()
            .map(|i| (i.prompt_ids.as_slice(), i.response_ids.as_slice()))
            .collect();
        let batch = self.score_batch(&seqs)?;
        match &self.backbone {
            Backbone::Llava { model, .. } => {
                let mut feats = Vec::with_capacity(items.len());
                for item in items {
                    let px = item.pixels.as_slice();
                    let f = match seen.get(px) {
                        Some(f) => f.clone(),
                        None => {
                            let f = model.image_features(&self.pixel_tensor(&[px])?)?;
                            seen.done.push((px, f.clone()));
                            f
                        }
                    };
                    feats.push(f);
                }
                let embeds = model.embeds_with_features(&batch.ids, &Tensor::cat(&feats, 0)?)?;
                Ok(DecoderInputs {
                    batch,
                    embeds,
                    rope: None,
                })
            }
            Backbone::Qwen2_5Vl { model, .. } => {
                let x = qwen_lm_inputs(model, items, &batch, self.pad_id(), &self.device)?;
                Ok(DecoderInputs {
                    batch,
                    embeds: x.embeds,
                    rope: Some(x.rope),
                })
            }
        }
    }

    /// `(log-prob, tokens)` of each prepared item, in one batched forward.
    pub fn score_prepared(&self, items: &[PreparedScore]) -> Result<Vec<(f64, usize)>, ModelError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let refs: Vec<&PreparedScore> = items.iter().collect();
        let (lp, n) = self.logprobs(&refs, None)?;
        let lp: Vec<f64> = lp.to_dtype(DType::F64)?.to_vec1()?;
        let n: Vec<f64> = n.to_dtype(DType::F64)?.to_vec1()?;
        Ok(lp
            .into_iter()
            .zip(n)
            .map(|(l, n)| (l, n as usize))
            .collect())
    }

    /// Greedy answers (decoded, special tokens skipped) to prepared prompts, in one batch.
    pub fn generate_prepared(
        &self,
        items: &[PreparedPrompt],
        max_new_tokens: usize,
    ) -> Result<Vec<String>, ModelError> {
        let ids = self.generate_ids(items, max_new_tokens)?;
        ids.iter()
            .map(|ids| {
                self.decode(ids).map_err(|e| ModelError::Input {
                    field: "generated ids",
                    message: e.to_string(),
                })
            })
            .collect()
    }

    /// Greedy new token ids of prepared prompts (a stop id included when produced).
    pub fn generate_ids(
        &self,
        items: &[PreparedPrompt],
        max_new_tokens: usize,
    ) -> Result<Vec<Vec<u32>>, ModelError> {
        if items.is_empty() || max_new_tokens == 0 {
            return Ok(vec![Vec::new(); items.len()]);
        }
        let prefill = self.prefill(items)?;
        decode_all(
            self.language_model(),
            prefill,
            self.stop_ids(),
            max_new_tokens,
        )
    }

    /// The prompt pass of prepared prompts, batched (left-padded): the cache and each row's
    /// first new token, ready for [`RunningDecode::admit`](super::generate::RunningDecode).
    pub fn prefill(&self, items: &[PreparedPrompt]) -> Result<Prefill, ModelError> {
        let prompts: Vec<Vec<u32>> = items.iter().map(|i| i.prompt_ids.clone()).collect();
        match &self.backbone {
            Backbone::Llava { processor, .. } => {
                let pixels: Vec<&[f32]> = items.iter().map(|i| i.pixels.as_slice()).collect();
                let pixels = self.pixel_tensor(&pixels)?;
                let model = self.llava().expect("LLaVA backbone");
                prefill(model, &prompts, &pixels, processor.pad())
            }
            Backbone::Qwen2_5Vl {
                model, processor, ..
            } => {
                let patches = items
                    .iter()
                    .map(|i| patches_of(&i.pixels, i.grid))
                    .collect::<Result<Vec<_>, _>>()?;
                let images: Vec<Vec<&ImagePatches>> = patches.iter().map(|p| vec![p]).collect();
                model.prefill(&prompts, &images, processor.pad(), &self.device)
            }
        }
    }
}

/// The patches of a Qwen2.5-VL item (an item without a grid was prepared for LLaVA).
fn patches_of(pixels: &[f32], grid: Option<(usize, usize)>) -> Result<ImagePatches, ModelError> {
    let (grid_h, grid_w) = grid.ok_or_else(|| ModelError::Input {
        field: "pixels",
        message: "an item without a patch grid (prepared for LLaVA) given to Qwen2.5-VL".into(),
    })?;
    Ok(ImagePatches {
        pixels: pixels.to_vec(),
        grid_h,
        grid_w,
    })
}

/// The language model's inputs for a right-padded Qwen2.5-VL batch of prepared items (each
/// with its own image): embeddings with the images written in, every row's multimodal RoPE
/// tables, the mask.
fn qwen_lm_inputs(
    model: &Qwen2_5Vl,
    items: &[&PreparedScore],
    batch: &ScoreBatch,
    pad: u32,
    dev: &Device,
) -> Result<LmInputs, ModelError> {
    let width = batch.ids.dim(1)?;
    let rows: Vec<Vec<u32>> = items
        .iter()
        .map(|i| {
            let n = i.prompt_ids.len() + i.response_ids.len();
            i.prompt_ids
                .iter()
                .chain(&i.response_ids)
                .copied()
                .chain(std::iter::repeat_n(pad, width - n))
                .collect()
        })
        .collect();
    let mask: Vec<Vec<bool>> = items
        .iter()
        .map(|i| {
            let n = i.prompt_ids.len() + i.response_ids.len();
            (0..width).map(|t| t < n).collect()
        })
        .collect();
    let patches = items
        .iter()
        .map(|i| patches_of(&i.pixels, i.grid))
        .collect::<Result<Vec<_>, _>>()?;
    let images: Vec<Vec<&ImagePatches>> = patches.iter().map(|p| vec![p]).collect();
    model.lm_inputs(&rows, &mask, &images, dev)
}

/// The right-padded batch of `(prompt ids, response ids)` sequences, padded with `pad`.
pub fn score_batch(
    seqs: &[(&[u32], &[u32])],
    pad: u32,
    dev: &Device,
) -> Result<ScoreBatch, ModelError> {
    let b = seqs.len();
    let width = seqs
        .iter()
        .map(|(p, r)| p.len() + r.len())
        .max()
        .unwrap_or(0);
    let (mut ids, mut mask, mut labels) = (
        Vec::with_capacity(b * width),
        Vec::with_capacity(b * width),
        Vec::with_capacity(b * width),
    );
    for (p, r) in seqs {
        let n = p.len() + r.len();
        ids.extend(p.iter().chain(r.iter()).copied());
        ids.extend(std::iter::repeat_n(pad, width - n));
        mask.extend(std::iter::repeat_n(1u8, n));
        mask.extend(std::iter::repeat_n(0u8, width - n));
        labels.extend(std::iter::repeat_n(0f32, p.len()));
        labels.extend(std::iter::repeat_n(1f32, r.len()));
        labels.extend(std::iter::repeat_n(0f32, width - n));
    }
    Ok(ScoreBatch {
        ids: Tensor::from_vec(ids, (b, width), dev)?,
        mask: Tensor::from_vec(mask, (b, width), dev)?,
        labels: Tensor::from_vec(labels, (b, width), dev)?,
    })
}

/// Summed response log-probs `[B]` and token counts `[B]` of prepared Qwen2.5-VL items (each
/// with its own image's patches), right-padded with `pad`: differentiable with respect to the
/// adapter.
pub fn qwen_item_logprobs(
    model: &Qwen2_5Vl,
    items: &[&PreparedScore],
    pad: u32,
    dev: &Device,
) -> Result<(Tensor, Tensor), ModelError> {
    let seqs: Vec<(&[u32], &[u32])> = items
        .iter()
        .map(|i| (i.prompt_ids.as_slice(), i.response_ids.as_slice()))
        .collect();
    let batch = score_batch(&seqs, pad, dev)?;
    let x = qwen_lm_inputs(model, items, &batch, pad, dev)?;
    let h = model
        .language_model()
        .hidden_states_with_rope(&x.embeds, &x.mask, Some(&x.rope))?;
    let lm = model.language_model();
    let scored = Scored::new(&batch.ids, &batch.labels)?;
    let sums = lm.scored_logprobs(&h, &scored, 0)?;
    let counts: Vec<f32> = scored.counts.iter().map(|&c| c as f32).collect();
    let counts =
        Tensor::from_vec(counts, scored.counts.len(), sums.device())?.to_dtype(sums.dtype())?;
    Ok((sums, counts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures")
            .join(rel)
    }

    fn qwen() -> Vlm {
        Vlm::load(&fixture("qwen2_5_vl/tiny"), None, &VlmOptions::default()).unwrap()
    }

    /// The one log-prob forward: with the items' own images or with a pixel tensor the caller
    /// holds, the same numbers; the tensor is really what is used; Qwen2.5-VL refuses one.
    #[test]
    fn logprobs_take_the_items_images_or_the_callers_pixel_tensor_alike() {
        let vlm = Vlm::load(&fixture("llava_chat/tiny"), None, &VlmOptions::default()).unwrap();
        let items: Vec<PreparedScore> = [
            ("hopper.jpg", "Who is it?", "A woman."),
            ("camera_gray.png", "What is this?", "A camera man."),
        ]
        .iter()
        .map(|(img, p, r)| {
            vlm.prepare_score(&fixture(&format!("clip/images/{img}")), p, r)
                .unwrap()
        })
        .collect();
        let refs: Vec<&PreparedScore> = items.iter().collect();
        let values = |t: Tensor| t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
        let (own, n_own) = vlm.logprobs(&refs, None).unwrap();
        let px: Vec<&[f32]> = items.iter().map(|i| i.pixels.as_slice()).collect();
        let (given, n_given) = vlm
            .logprobs(&refs, Some(&vlm.pixel_tensor(&px).unwrap()))
            .unwrap();
        let own = values(own);
        assert_eq!(own, values(given));
        assert_eq!(values(n_own), values(n_given));
        assert!(own.iter().all(|v| v.is_finite() && *v < 0.0), "{own:?}");
        let swapped = [px[1], px[0]];
        let (other, _) = vlm
            .logprobs(&refs, Some(&vlm.pixel_tensor(&swapped).unwrap()))
            .unwrap();
        assert_ne!(own, values(other), "the given pixels are the ones scored");

        let q = qwen();
        let item = q
            .prepare_score(&fixture("clip/images/hopper.jpg"), "Who?", "A woman.")
            .unwrap();
        let pixels = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let err = q.logprobs(&[&item], Some(&pixels)).unwrap_err().to_string();
        assert!(err.contains("LLaVA's"), "{err}");
        assert!(q.logprobs(&[&item], None).is_ok());
    }

    /// The reference cache's key moves with every processor setting a log-prob depends on.
    #[test]
    fn the_processor_key_changes_with_the_pixel_bounds() {
        let mut vlm = qwen();
        assert_eq!(vlm.model_type(), "qwen2_5_vl");
        let k0 = vlm.processor_key();
        assert_eq!(k0, qwen().processor_key());
        let Backbone::Qwen2_5Vl { images, .. } = &mut vlm.backbone else {
            panic!("not Qwen2.5-VL");
        };
        images.max_pixels += 784;
        let k1 = vlm.processor_key();
        assert_ne!(k0, k1);
        let Backbone::Qwen2_5Vl { images, .. } = &mut vlm.backbone else {
            unreachable!()
        };
        images.min_pixels += 784;
        assert_ne!(k1, vlm.processor_key());
    }

    /// A prompt's one `<|image_pad|>` widens to the image's merged token count, and a prompt
    /// prepared from a file equals the template widened by hand.
    #[test]
    fn image_tokens_follow_each_image_grid() {
        let vlm = qwen();
        let ids = vlm.prompt_template_ids("Is there a cat?").unwrap();
        let Backbone::Qwen2_5Vl { processor, .. } = &vlm.backbone else {
            panic!("not Qwen2.5-VL");
        };
        let img = processor.image_token();
        assert_eq!(ids.iter().filter(|&&t| t == img).count(), 1);
        let small = vlm
            .load_image(&fixture("clip/images/astronaut_small.png"))
            .unwrap();
        let large = vlm
            .load_image(&fixture("clip/images/camera_gray.png"))
            .unwrap();
        for (im, tokens) in [(&small, 6), (&large, 9)] {
            let (h, w) = im.grid.unwrap();
            assert_eq!(h * w / 4, tokens, "{:?}", im.grid);
            let wide = vlm.expand_prompt(&ids, im);
            assert_eq!(wide.iter().filter(|&&t| t == img).count(), tokens);
            assert_eq!(wide.len(), ids.len() + tokens - 1);
        }
        let p = vlm
            .prepare_prompt(&fixture("clip/images/camera_gray.png"), "Is there a cat?")
            .unwrap();
        assert_eq!(p.prompt_ids, vlm.expand_prompt(&ids, &large));
        assert_eq!(p.grid, large.grid);
    }

    /// An architecture misp does not run is named with the ones it does.
    #[test]
    fn an_unknown_model_type_names_the_known_ones() {
        let dir = std::env::temp_dir().join(format!("misp-vlm-type-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), r#"{"model_type": "idefics3"}"#).unwrap();
        let err = Vlm::load(&dir, None, &VlmOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("config.json")
                && err.contains("\"idefics3\"")
                && err.contains("\"llava\", \"qwen2_5_vl\""),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
