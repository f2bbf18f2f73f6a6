//! A LLaVA checkpoint ready to use: model (+ PEFT adapter), tokenizer and image processor, with
//! the batched scoring and generation that `misp score`, `misp generate`, the trainer and the
//! evaluators share.
//!
//! Stage: score / train / eval. Reads an HF LLaVA folder (`config.json`, safetensors,
//! `tokenizer.json`, `preprocessor_config.json` when present) and optionally a PEFT adapter
//! folder; reads images. Writes nothing.
//!
//! Work is split in two steps so callers can decide what a bad item means: `prepare_*` turns
//! one item (image path + text) into ids and pixels or an [`ItemError`] that names what is
//! wrong; the batched `*_prepared` calls then run the model on items that are known good.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::adapter::load_peft_adapter;
use super::clip::image_processor::{ImageDecodeError, ImageProcessor};
use super::generate::greedy;
use super::llava::processor::{EncodeError, LlavaProcessor};
use super::llava::Llava;
use super::lora::LoraConfig;
pub use crate::checkpoint::ModelError;

/// How to load a checkpoint.
#[derive(Debug, Clone)]
pub struct VlmOptions {
    /// Weights' dtype (`F32` or `BF16`; LoRA stays f32).
    pub dtype: DType,
    /// Original LLaVA-1.5's pad-to-square with the mean colour before resizing.
    pub pad_to_square: bool,
    /// A template other than llava-hf's `USER: <image>\n{prompt} ASSISTANT:`.
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
    #[error(transparent)]
    Text(#[from] EncodeError),
}

/// One scored sequence, ready to batch.
#[derive(Debug, Clone)]
pub struct PreparedScore {
    pub prompt_ids: Vec<u32>,
    pub response_ids: Vec<u32>,
    /// `[3, S, S]` channel-first.
    pub pixels: Vec<f32>,
}

/// One prompt to answer, ready to batch.
#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    pub prompt_ids: Vec<u32>,
    pub pixels: Vec<f32>,
}

/// Right-padded scoring batch: `ids [B, T]` (u32), `mask [B, T]` (u8), `labels [B, T]` (f32,
/// 1 on response tokens and EOS).
#[derive(Debug, Clone)]
pub struct ScoreBatch {
    pub ids: Tensor,
    pub mask: Tensor,
    pub labels: Tensor,
}

/// Model + processor + image preprocessing of one checkpoint.
#[derive(Debug, Clone)]
pub struct Vlm {
    pub model: Llava,
    pub processor: LlavaProcessor,
    pub images: ImageProcessor,
    /// The adapter's config when one was loaded.
    pub adapter: Option<LoraConfig>,
    device: Device,
}

impl Vlm {
    /// Loads `model_dir` and, when given, the PEFT adapter in `adapter`.
    pub fn load(
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
            model,
            processor,
            images,
            adapter,
            device: opts.device.clone(),
        })
    }

    /// Assembles a `Vlm` from parts built in memory (a model being trained, say).
    pub fn from_parts(
        model: Llava,
        processor: LlavaProcessor,
        images: ImageProcessor,
        device: Device,
    ) -> Self {
        Self {
            model,
            processor,
            images,
            adapter: None,
            device,
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Decoded and preprocessed pixels of one image file.
    pub fn load_pixels(&self, path: &Path) -> Result<Vec<f32>, ItemError> {
        let img = self
            .images
            .decode_file(path)
            .map_err(|source| ItemError::Image {
                path: path.to_owned(),
                source,
            })?;
        Ok(self.images.pixels(&img))
    }

    /// Ids and pixels of `response` scored after `prompt` about `image`.
    pub fn prepare_score(
        &self,
        image: &Path,
        prompt: &str,
        response: &str,
    ) -> Result<PreparedScore, ItemError> {
        let (prompt_ids, response_ids) = self.processor.scored_ids(prompt, response)?;
        Ok(PreparedScore {
            prompt_ids,
            response_ids,
            pixels: self.load_pixels(image)?,
        })
    }

    /// Ids and pixels of `prompt` about `image`, to answer.
    pub fn prepare_prompt(&self, image: &Path, prompt: &str) -> Result<PreparedPrompt, ItemError> {
        Ok(PreparedPrompt {
            prompt_ids: self.processor.prompt_ids(prompt)?,
            pixels: self.load_pixels(image)?,
        })
    }

    /// `[B, 3, S, S]` from per-item pixel vectors.
    pub fn pixel_tensor(&self, pixels: &[&[f32]]) -> Result<Tensor, ModelError> {
        let s = self.model.config().vision_config.image_size;
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
        let b = seqs.len();
        let width = seqs
            .iter()
            .map(|(p, r)| p.len() + r.len())
            .max()
            .unwrap_or(0);
        let pad = self.processor.pad();
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
        let dev = &self.device;
        Ok(ScoreBatch {
            ids: Tensor::from_vec(ids, (b, width), dev)?,
            mask: Tensor::from_vec(mask, (b, width), dev)?,
            labels: Tensor::from_vec(labels, (b, width), dev)?,
        })
    }

    /// Summed response log-probs `[B]` and token counts `[B]` of a batch, differentiable with
    /// respect to the adapter (the trainer's forward).
    pub fn logprobs(
        &self,
        items: &[&PreparedScore],
        pixels: &Tensor,
    ) -> Result<(Tensor, Tensor), ModelError> {
        let seqs: Vec<(&[u32], &[u32])> = items
            .iter()
            .map(|i| (i.prompt_ids.as_slice(), i.response_ids.as_slice()))
            .collect();
        let batch = self.score_batch(&seqs)?;
        self.model
            .sequence_logprobs(&batch.ids, &batch.mask, pixels, &batch.labels)
    }

    /// `(log-prob, tokens)` of each prepared item, in one batched forward.
    pub fn score_prepared(&self, items: &[PreparedScore]) -> Result<Vec<(f64, usize)>, ModelError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let pixels: Vec<&[f32]> = items.iter().map(|i| i.pixels.as_slice()).collect();
        let pixels = self.pixel_tensor(&pixels)?;
        let refs: Vec<&PreparedScore> = items.iter().collect();
        let (lp, n) = self.logprobs(&refs, &pixels)?;
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
                self.processor.decode(ids).map_err(|e| ModelError::Input {
                    field: "generated ids",
                    message: e.to_string(),
                })
            })
            .collect()
    }

    /// Greedy new token ids of prepared prompts (EOS included when produced).
    pub fn generate_ids(
        &self,
        items: &[PreparedPrompt],
        max_new_tokens: usize,
    ) -> Result<Vec<Vec<u32>>, ModelError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let pixels: Vec<&[f32]> = items.iter().map(|i| i.pixels.as_slice()).collect();
        let pixels = self.pixel_tensor(&pixels)?;
        let prompts: Vec<Vec<u32>> = items.iter().map(|i| i.prompt_ids.clone()).collect();
        greedy(
            &self.model,
            &prompts,
            &pixels,
            self.processor.eos(),
            self.processor.pad(),
            max_new_tokens,
        )
    }
}
