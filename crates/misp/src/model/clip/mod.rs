//! CLIP as transformers' `CLIPModel`: the vision tower (`CLIPVisionModel`), the text tower
//! (`CLIPTextModel`) and their projections, on candle.
//!
//! Stages: embed (image and prompt embeddings for the miner) and, later, train / eval (LLaVA's
//! frozen vision tower, through [`ClipModel::vision_hidden_states`]). Reads an HF checkpoint
//! folder: `config.json`, `model.safetensors` (or the shards of
//! `model.safetensors.index.json`) with the keys transformers saves for `CLIPModel`
//! (`text_model.*`, `vision_model.*`, `visual_projection.weight`, `text_projection.weight`,
//! `logit_scale`), and `tokenizer.json` for [`ClipTokenizer`]. Writes nothing.
//!
//! Every struct below is one module of the checkpoint and loads from its own key prefix, so a
//! key names the code that reads it. Loading checks all tensors before failing: a checkpoint
//! with missing or mis-shaped tensors is one error that lists all of them.
//!
//! Only differentiable ops are used (docs/design.md §4), because LLaVA's gradients flow through
//! graphs that contain this tower's output: layer norm is written out and softmax is
//! [`crate::kernels::scaled_softmax`] (a fused CPU kernel with its own backward). Layer norm and softmax run in `f32` whatever the weights' dtype,
//! as PyTorch does for half-precision inputs.

pub mod image_processor;
mod tokenizer;

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, VarBuilder};

use crate::checkpoint;
use crate::kernels::Linear;
use crate::kernels::{self, encoder_attention};
use serde::Deserialize;

pub use crate::checkpoint::{ModelError, TensorProblem};
pub use tokenizer::{ClipTokenizer, ClipTokens};

/// MLP activation, `hidden_act` in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`: OpenAI's CLIP.
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// The exact (erf) GELU.
    #[serde(rename = "gelu")]
    Gelu,
    /// The tanh approximation of GELU.
    #[serde(rename = "gelu_pytorch_tanh", alias = "gelu_new", alias = "gelu_fast")]
    GeluTanh,
}

impl Activation {
    fn forward(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            // Written with exp / recip rather than a fused sigmoid so the op is plainly
            // differentiable; exp overflowing to inf gives recip 0, not NaN.
            Self::QuickGelu if !x.track_op() => kernels::quick_gelu_no_grad(x),
            Self::QuickGelu => x * ((x * -1.702)?.exp()? + 1.0)?.recip()?,
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
        }
    }
}

/// `text_config` of `config.json`, with transformers' `CLIPTextConfig` defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub bos_token_id: u32,
    /// 2 selects transformers' legacy pooling at `input_ids.argmax(-1)`; any other value pools
    /// at the first position holding this id.
    pub eos_token_id: u32,
    pub pad_token_id: u32,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            bos_token_id: 49406,
            eos_token_id: 49407,
            pad_token_id: 1,
        }
    }
}

/// `vision_config` of `config.json`, with transformers' `CLIPVisionConfig` defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipVisionConfig {
    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// `config.json` of a `CLIPModel` checkpoint (transformers' `CLIPConfig`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipConfig {
    pub text_config: ClipTextConfig,
    pub vision_config: ClipVisionConfig,
    /// Output dimension of both projections (the top-level value; the towers' own
    /// `projection_dim` fields are unused by `CLIPModel`).
    pub projection_dim: usize,
    pub logit_scale_init_value: f64,
}

impl Default for ClipConfig {
    fn default() -> Self {
        Self {
            text_config: ClipTextConfig::default(),
            vision_config: ClipVisionConfig::default(),
            projection_dim: 512,
            logit_scale_init_value: 2.6592,
        }
    }
}

impl ClipConfig {
    /// Reads and checks `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let (cfg, path): (Self, _) = checkpoint::read_config(dir)?;
        let bad = |message: String| ModelError::Config {
            path: path.clone(),
            message,
        };
        let (t, v) = (&cfg.text_config, &cfg.vision_config);
        if t.num_attention_heads == 0 || t.hidden_size % t.num_attention_heads != 0 {
            return Err(bad(format!(
                "text_config: hidden_size {} is not a multiple of num_attention_heads {}",
                t.hidden_size, t.num_attention_heads
            )));
        }
        if v.num_attention_heads == 0 || v.hidden_size % v.num_attention_heads != 0 {
            return Err(bad(format!(
                "vision_config: hidden_size {} is not a multiple of num_attention_heads {}",
                v.hidden_size, v.num_attention_heads
            )));
        }
        if v.patch_size == 0 || v.image_size < v.patch_size {
            return Err(bad(format!(
                "vision_config: image_size {} and patch_size {} give no patches",
                v.image_size, v.patch_size
            )));
        }
        Ok(cfg)
    }
}

/// Layer norm written out (docs/design.md §4: candle's fused layer norm drops gradients), in `f32`.
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn load(vb: VarBuilder, dim: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // f32 only: other dtypes keep the composition's f32 statistics.
        if x.dtype() == DType::F32 {
            if let Some(y) = kernels::layer_norm_no_grad(x, &self.weight, &self.bias, self.eps)? {
                return Ok(y);
            }
        }
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .broadcast_mul(&self.weight.to_dtype(DType::F32)?)?
            .broadcast_add(&self.bias.to_dtype(DType::F32)?)?
            .to_dtype(dtype)
    }
}

/// `self_attn`: multi-head attention with biased q, k, v and output projections.
#[derive(Debug, Clone)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
    scale: f64,
}

impl ClipAttention {
    fn load(vb: VarBuilder, dim: usize, heads: usize) -> candle_core::Result<Self> {
        let head_dim = dim / heads;
        Ok(Self {
            q_proj: Linear::load(vb.pp("q_proj"), dim, dim)?,
            k_proj: Linear::load(vb.pp("k_proj"), dim, dim)?,
            v_proj: Linear::load(vb.pp("v_proj"), dim, dim)?,
            out_proj: Linear::load(vb.pp("out_proj"), dim, dim)?,
            heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// `mask`: `[B, 1, T, T]` additive `f32` mask, or none (the vision tower).
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        self.forward_queries(x, x, mask)
    }

    /// Attention of the rows `xq [B, Tq, D]` over `xkv [B, Tk, D]` (the same tensor, or its
    /// first rows: see [`ClipEncoderLayer::forward_first`]); `mask` `[B, 1, Tq, Tk]`.
    fn forward_queries(
        &self,
        xq: &Tensor,
        xkv: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (q, k, v) = (
            self.q_proj.forward(xq)?,
            self.k_proj.forward(xkv)?,
            self.v_proj.forward(xkv)?,
        );
        if let Some(out) = encoder_attention::attention_no_grad(&q, &k, &v, self.heads, mask)? {
            return self.out_proj.forward(&out);
        }
        let (b, tq, d) = q.dims3()?;
        let split = |y: Tensor| -> candle_core::Result<Tensor> {
            let t = y.dim(1)?;
            y.reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(q)?, split(k)?, split(v)?);
        let scores = kernels::matmul(&q, &k.t()?)?.to_dtype(DType::F32)?;
        let probs = kernels::scaled_softmax(&scores, mask, self.scale)?.to_dtype(q.dtype())?;
        let out = kernels::matmul(&probs, &v)?
            .transpose(1, 2)?
            .reshape((b, tq, d))?;
        self.out_proj.forward(&out)
    }
}

/// `mlp`: `fc2(act(fc1(x)))`.
#[derive(Debug, Clone)]
struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl ClipMlp {
    fn load(
        vb: VarBuilder,
        dim: usize,
        inner: usize,
        act: Activation,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            fc1: Linear::load(vb.pp("fc1"), dim, inner)?,
            fc2: Linear::load(vb.pp("fc2"), inner, dim)?,
            act,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(x)?)?)
    }
}

/// `encoder.layers.{i}`: pre-norm attention and MLP blocks with residuals.
#[derive(Debug, Clone)]
struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    mlp: ClipMlp,
    layer_norm2: LayerNorm,
}

/// The shape of one tower's encoder.
struct EncoderShape {
    dim: usize,
    inner: usize,
    heads: usize,
    layers: usize,
    act: Activation,
    eps: f64,
}

impl ClipEncoderLayer {
    fn load(vb: VarBuilder, s: &EncoderShape) -> candle_core::Result<Self> {
        Ok(Self {
            self_attn: ClipAttention::load(vb.pp("self_attn"), s.dim, s.heads)?,
            layer_norm1: LayerNorm::load(vb.pp("layer_norm1"), s.dim, s.eps)?,
            mlp: ClipMlp::load(vb.pp("mlp"), s.dim, s.inner, s.act)?,
            layer_norm2: LayerNorm::load(vb.pp("layer_norm2"), s.dim, s.eps)?,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let h = (x + self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask)?)?;
        &h + self.mlp.forward(&self.layer_norm2.forward(&h)?)?
    }

    /// The layer's output at the first position only (`[B, 1, D]`), unmasked: the class token
    /// after a vision tower's last layer, all its pooled output needs. Keys and values still
    /// come from every position; the query, output projection and MLP run on one row instead
    /// of `1 + grid^2` (50 for ViT-B/32: a twelfth of the tower's products saved).
    fn forward_first(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let normed = self.layer_norm1.forward(x)?;
        let first = x.narrow(1, 0, 1)?;
        let attn = self
            .self_attn
            .forward_queries(&normed.narrow(1, 0, 1)?, &normed, None)?;
        let h = (first + attn)?;
        &h + self.mlp.forward(&self.layer_norm2.forward(&h)?)?
    }
}

/// `encoder`: the stack of layers.
#[derive(Debug, Clone)]
struct ClipEncoder {
    layers: Vec<ClipEncoderLayer>,
}

impl ClipEncoder {
    fn load(vb: VarBuilder, s: &EncoderShape) -> candle_core::Result<Self> {
        let vb = vb.pp("layers");
        let layers = (0..s.layers)
            .map(|i| ClipEncoderLayer::load(vb.pp(i), s))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { layers })
    }

    /// Runs the first `n` layers.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>, n: usize) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for layer in &self.layers[..n.min(self.layers.len())] {
            h = layer.forward(&h, mask)?;
        }
        Ok(h)
    }
}

/// `vision_model.embeddings`: the patch convolution (kernel = stride = patch, no bias), the
/// class token and learned positions.
#[derive(Debug, Clone)]
struct ClipVisionEmbeddings {
    /// `patch_embedding.weight` reshaped to `[hidden, C * p * p]`: a convolution whose stride
    /// equals its kernel is a matmul over non-overlapping patches, exactly and faster.
    patch_embedding: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    channels: usize,
    patch: usize,
    grid: usize,
}

impl ClipVisionEmbeddings {
    fn load(vb: VarBuilder, c: &ClipVisionConfig) -> candle_core::Result<Self> {
        let (d, p, ch) = (c.hidden_size, c.patch_size, c.num_channels);
        let positions = c.grid() * c.grid() + 1;
        Ok(Self {
            patch_embedding: vb
                .pp("patch_embedding")
                .get((d, ch, p, p), "weight")?
                .reshape((d, ch * p * p))?,
            class_embedding: vb.get(d, "class_embedding")?,
            position_embedding: vb.pp("position_embedding").get((positions, d), "weight")?,
            channels: ch,
            patch: p,
            grid: c.grid(),
        })
    }

    /// `[B, C, S, S]` pixels to `[B, 1 + grid^2, hidden]`.
    fn forward(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let b = pixels.dim(0)?;
        let (g, p, ch) = (self.grid, self.patch, self.channels);
        let d = self.class_embedding.dim(0)?;
        // As the convolution, trailing pixels that fill no whole patch are ignored.
        let x = pixels.narrow(2, 0, g * p)?.narrow(3, 0, g * p)?;
        let patches = x
            .reshape((b, ch, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * g * g, ch * p * p))?
            .matmul(&self.patch_embedding.t()?)?
            .reshape((b, g * g, d))?;
        let cls = self
            .class_embedding
            .reshape((1, 1, d))?
            .broadcast_as((b, 1, d))?;
        Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embedding.unsqueeze(0)?)
    }
}

/// `vision_model`: transformers' `CLIPVisionTransformer`.
#[derive(Debug, Clone)]
struct ClipVisionTransformer {
    embeddings: ClipVisionEmbeddings,
    /// Spelled as in the checkpoint.
    pre_layrnorm: LayerNorm,
    encoder: ClipEncoder,
    post_layernorm: LayerNorm,
}

impl ClipVisionTransformer {
    fn load(vb: VarBuilder, c: &ClipVisionConfig) -> candle_core::Result<Self> {
        let shape = EncoderShape {
            dim: c.hidden_size,
            inner: c.intermediate_size,
            heads: c.num_attention_heads,
            layers: c.num_hidden_layers,
            act: c.hidden_act,
            eps: c.layer_norm_eps,
        };
        Ok(Self {
            embeddings: ClipVisionEmbeddings::load(vb.pp("embeddings"), c)?,
            pre_layrnorm: LayerNorm::load(vb.pp("pre_layrnorm"), c.hidden_size, c.layer_norm_eps)?,
            encoder: ClipEncoder::load(vb.pp("encoder"), &shape)?,
            post_layernorm: LayerNorm::load(
                vb.pp("post_layernorm"),
                c.hidden_size,
                c.layer_norm_eps,
            )?,
        })
    }

    /// transformers' `hidden_states[n]`: `n = 0` is the embedding output after `pre_layrnorm`,
    /// `n = i` the output of layer `i`.
    fn hidden_states(&self, pixels: &Tensor, n: usize) -> candle_core::Result<Tensor> {
        let h = self
            .pre_layrnorm
            .forward(&self.embeddings.forward(pixels)?)?;
        self.encoder.forward(&h, None, n)
    }

    /// The pooled output: `post_layernorm` of the class token after the last layer, which
    /// runs for the class token's row alone.
    fn pooled(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let Some((last, _)) = self.encoder.layers.split_last() else {
            let h = self.hidden_states(pixels, 0)?;
            return self.post_layernorm.forward(&h.narrow(1, 0, 1)?.squeeze(1)?);
        };
        let h = self.hidden_states(pixels, self.encoder.layers.len() - 1)?;
        let cls = last.forward_first(&h)?;
        self.post_layernorm.forward(&cls.squeeze(1)?)
    }
}

/// The vision tower alone (transformers' `CLIPVisionTransformer`, keys `embeddings.*`,
/// `pre_layrnorm.*`, `encoder.*`, `post_layernorm.*` under `vb`), as LLaVA holds it.
#[derive(Debug, Clone)]
pub struct ClipVisionTower {
    model: ClipVisionTransformer,
    config: ClipVisionConfig,
}

impl ClipVisionTower {
    pub fn load(vb: VarBuilder, config: ClipVisionConfig) -> candle_core::Result<Self> {
        Ok(Self {
            model: ClipVisionTransformer::load(vb, &config)?,
            config,
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// transformers' `hidden_states[n]` (`[B, 1 + grid^2, hidden]`, CLS first) of `[B, C, S, S]`
    /// pixels in the weights' dtype; `n <= num_hidden_layers`.
    pub fn hidden_states(&self, pixels: &Tensor, n: usize) -> candle_core::Result<Tensor> {
        if n > self.config.num_hidden_layers {
            candle_core::bail!(
                "hidden_states[{n}] is past the tower's {} layers",
                self.config.num_hidden_layers
            );
        }
        self.model.hidden_states(pixels, n)
    }
}

/// `text_model`: transformers' `CLIPTextTransformer`.
#[derive(Debug, Clone)]
struct ClipTextTransformer {
    embeddings: ClipTextEmbeddings,
    encoder: ClipEncoder,
    final_layer_norm: LayerNorm,
    eos_token_id: u32,
}

/// `text_model.embeddings`: token and learned position embeddings.
#[derive(Debug, Clone)]
struct ClipTextEmbeddings {
    token_embedding: Embedding,
    position_embedding: Tensor,
}

impl ClipTextTransformer {
    fn load(vb: VarBuilder, c: &ClipTextConfig) -> candle_core::Result<Self> {
        let shape = EncoderShape {
            dim: c.hidden_size,
            inner: c.intermediate_size,
            heads: c.num_attention_heads,
            layers: c.num_hidden_layers,
            act: c.hidden_act,
            eps: c.layer_norm_eps,
        };
        let e = vb.pp("embeddings");
        Ok(Self {
            embeddings: ClipTextEmbeddings {
                token_embedding: candle_nn::embedding(
                    c.vocab_size,
                    c.hidden_size,
                    e.pp("token_embedding"),
                )?,
                position_embedding: e
                    .pp("position_embedding")
                    .get((c.max_position_embeddings, c.hidden_size), "weight")?,
            },
            encoder: ClipEncoder::load(vb.pp("encoder"), &shape)?,
            final_layer_norm: LayerNorm::load(
                vb.pp("final_layer_norm"),
                c.hidden_size,
                c.layer_norm_eps,
            )?,
            eos_token_id: c.eos_token_id,
        })
    }

    /// `ids`, `attention_mask`: `[B, T]` u32 on the model's device. Returns `[B, hidden]`.
    fn pooled(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        pool_at: &[usize],
    ) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let tokens = self.embeddings.token_embedding.forward(ids)?;
        let pos = self
            .embeddings
            .position_embedding
            .narrow(0, 0, t)?
            .unsqueeze(0)?;
        let h = tokens.broadcast_add(&pos)?;
        let mask = text_mask(attention_mask)?.to_device(h.device())?;
        let h = self
            .encoder
            .forward(&h, Some(&mask), self.encoder.layers.len())?;
        let h = self.final_layer_norm.forward(&h)?;
        let d = h.dim(2)?;
        let flat: Vec<u32> = pool_at
            .iter()
            .enumerate()
            .map(|(i, &p)| (i * t + p) as u32)
            .collect();
        let index = Tensor::from_vec(flat, b, h.device())?;
        h.reshape((b * t, d))?.index_select(&index, 0)
    }
}

/// The additive `[B, 1, T, T]` `f32` mask of the text tower: causal, and padded keys masked.
/// One fill value, never a sum of two, so nothing overflows to `-inf`.
fn text_mask(attention_mask: &Tensor) -> candle_core::Result<Tensor> {
    let (b, t) = attention_mask.dims2()?;
    let keep = attention_mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    let mut m = vec![0f32; b * t * t];
    for (bi, row) in keep.iter().enumerate() {
        for i in 0..t {
            for (j, &k) in row.iter().enumerate() {
                if j > i || k == 0 {
                    m[(bi * t + i) * t + j] = f32::MIN;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, t, t), attention_mask.device())
}

/// The text pooling position of each row, as transformers: with `eos_token_id == 2` (configs
/// saved before transformers PR #24773) `input_ids.argmax(-1)`, otherwise the first position
/// holding `eos_token_id` (0 when there is none, as torch's `argmax` of all zeros).
pub fn text_pool_positions(ids: &[Vec<u32>], eos_token_id: u32) -> Vec<usize> {
    ids.iter()
        .map(|row| {
            if eos_token_id == 2 {
                // torch.argmax returns the first maximal index.
                let mut best = 0;
                for (i, &v) in row.iter().enumerate() {
                    if v > row[best] {
                        best = i;
                    }
                }
                best
            } else {
                row.iter().position(|&v| v == eos_token_id).unwrap_or(0)
            }
        })
        .collect()
}

/// CLIP (`CLIPModel`): both towers and both projections.
#[derive(Debug, Clone)]
pub struct ClipModel {
    pub config: ClipConfig,
    text_model: ClipTextTransformer,
    vision_model: ClipVisionTransformer,
    visual_projection: Linear,
    text_projection: Linear,
    /// The learned log temperature; unused by the embeddings but part of the checkpoint.
    pub logit_scale: Tensor,
    dtype: DType,
    device: Device,
}

impl ClipModel {
    /// Loads `dir` (module docs for the files) with weights in `dtype` on `device`. Every
    /// missing, mis-shaped or unexpected tensor is reported in one [`ModelError::Tensors`].
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let config = ClipConfig::from_dir(dir)?;
        checkpoint::load_checked(dir, dtype, device, checkpoint::same_keys, |vb| {
            Self::new(vb, config)
        })
    }

    /// Builds the model from any `VarBuilder` laid out as transformers' `CLIPModel`.
    pub fn new(vb: VarBuilder, config: ClipConfig) -> Result<Self, ModelError> {
        let (t, v) = (&config.text_config, &config.vision_config);
        let p = config.projection_dim;
        Ok(Self {
            text_model: ClipTextTransformer::load(vb.pp("text_model"), t)?,
            vision_model: ClipVisionTransformer::load(vb.pp("vision_model"), v)?,
            visual_projection: Linear::load_no_bias(vb.pp("visual_projection"), v.hidden_size, p)?,
            text_projection: Linear::load_no_bias(vb.pp("text_projection"), t.hidden_size, p)?,
            logit_scale: vb.get((), "logit_scale")?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            config,
        })
    }

    /// The square input size in pixels (`vision_config.image_size`).
    pub fn image_size(&self) -> usize {
        self.config.vision_config.image_size
    }

    /// The embedding dimension (`projection_dim`).
    pub fn dim(&self) -> usize {
        self.config.projection_dim
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn check_pixels(&self, pixels: &Tensor) -> Result<Tensor, ModelError> {
        let v = &self.config.vision_config;
        let dims = pixels.dims();
        let ok = dims.len() == 4
            && dims[1] == v.num_channels
            && dims[2] == v.image_size
            && dims[3] == v.image_size;
        if !ok {
            return Err(ModelError::Input {
                field: "pixels",
                message: format!(
                    "shape {dims:?}, expected [B, {}, {}, {}]",
                    v.num_channels, v.image_size, v.image_size
                ),
            });
        }
        Ok(pixels.to_device(&self.device)?.to_dtype(self.dtype)?)
    }

    /// Image embeddings: `[B, 3, S, S]` pixels (from [`crate::model::clip::image_processor`]) to
    /// `[B, projection_dim]` `f32`, L2-normalised.
    pub fn embed_images(&self, pixels: &Tensor) -> Result<Tensor, ModelError> {
        let x = self.check_pixels(pixels)?;
        let pooled = self.vision_model.pooled(&x)?;
        Ok(l2_normalise(&self.visual_projection.forward(&pooled)?)?)
    }

    /// transformers' vision `hidden_states[upto_layer]` (`[B, 1 + grid^2, hidden]`, CLS first),
    /// running only the layers needed: 0 is the embeddings after `pre_layrnorm`; LLaVA takes
    /// `num_hidden_layers - 1`, i.e. `hidden_states[-2]`.
    pub fn vision_hidden_states(
        &self,
        pixels: &Tensor,
        upto_layer: usize,
    ) -> Result<Tensor, ModelError> {
        let layers = self.config.vision_config.num_hidden_layers;
        if upto_layer > layers {
            return Err(ModelError::Input {
                field: "upto_layer",
                message: format!("{upto_layer} is past the tower's {layers} layers"),
            });
        }
        let x = self.check_pixels(pixels)?;
        Ok(self.vision_model.hidden_states(&x, upto_layer)?)
    }

    /// Text embeddings of tokenised prompts: `[B, projection_dim]` `f32`, L2-normalised, pooled
    /// as transformers ([`text_pool_positions`]).
    pub fn embed_texts(&self, tokens: &ClipTokens) -> Result<Tensor, ModelError> {
        let (b, t) = tokens.ids.dims2()?;
        let max = self.config.text_config.max_position_embeddings;
        if t > max {
            return Err(ModelError::Input {
                field: "ids",
                message: format!("{t} tokens, the model has {max} positions"),
            });
        }
        if b == 0 {
            return Ok(Tensor::zeros((0, self.dim()), DType::F32, &self.device)?);
        }
        let ids_host = tokens.ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let vocab = self.config.text_config.vocab_size as u32;
        if let Some(bad) = ids_host.iter().flatten().find(|&&i| i >= vocab) {
            return Err(ModelError::Input {
                field: "ids",
                message: format!("token id {bad} is outside the vocabulary of {vocab}"),
            });
        }
        let pool_at = text_pool_positions(&ids_host, self.text_model.eos_token_id);
        let ids = tokens.ids.to_dtype(DType::U32)?.to_device(&self.device)?;
        let mask = tokens.attention_mask.to_device(&self.device)?;
        let pooled = self.text_model.pooled(&ids, &mask, &pool_at)?;
        Ok(l2_normalise(&self.text_projection.forward(&pooled)?)?)
    }
}

/// Rows divided by their L2 norm, in `f32` (the norm floored at 1e-12, as torch's
/// `F.normalize`).
fn l2_normalise(x: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
    x.broadcast_div(&norm)
}

#[cfg(test)]
mod tests;
