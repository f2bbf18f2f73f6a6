//! LLaMA as transformers' `LlamaForCausalLM` (`LlamaModel` + `lm_head`), with LoRA on its
//! projections, on candle.
//!
//! Stages: train / eval (LLaVA's language model). Reads an HF checkpoint folder: `config.json`
//! and `model.safetensors` (or the shards of `model.safetensors.index.json`) with the keys
//! transformers saves (`model.embed_tokens`, `model.layers.N.*`, `model.norm`, `lm_head`).
//! Writes nothing.
//!
//! Every struct below is one module of the checkpoint and loads from its own key prefix.
//! Loading checks all tensors before failing: one error lists every missing or mis-shaped one.
//!
//! Gradients flow through this model into LoRA, so every op has a backward (docs/design.md §4: candle's
//! fused `ops::rms_norm` and `rotary_emb::rope*` drop gradients on 0.11.1). RMSNorm, attention's
//! scaled masked softmax and SwiGLU run on this crate's fused CPU kernels with their own backward
//! ([`crate::kernels`]; the plain composition elsewhere), RoPE is written out, and frozen
//! projections skip their weight gradient ([`crate::kernels::linear`]). As in transformers, RMSNorm statistics, RoPE tables, softmax and the
//! returned logits are f32 whatever the weights' dtype.
//!
//! Positions are `0..T` for every row in [`Llama::forward`], as `LlamaForCausalLM.forward` uses
//! without explicit `position_ids`: scoring batches are right-padded, so padding never shifts a
//! sequence. [`Llama::forward_cached`] (generation, left-padded prompts) counts positions per
//! row from the attention mask, as transformers' `generate` does. The `*_with_rope` variants take
//! a caller's per-row tables instead (Qwen2.5-VL's multimodal RoPE): each cache-free forward
//! (scoring, training, the detached pieces of [`backward`]) is one path, [`Llama::run_layers`],
//! whichever tables it is given.

use std::path::Path;

mod backward;
pub use backward::DetachedForward;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarBuilder;
use rand::Rng;
use serde::Deserialize;

use super::lora::{LoraConfig, LoraLinear, LoraSwitch};
use crate::checkpoint;
pub use crate::checkpoint::ModelError;
pub use crate::checkpoint::TensorProblem;
use crate::kernels;
use crate::kernels::attention::{self, AttentionInputs};
use crate::kernels::linear;

/// `rope_parameters` of transformers 5 configs (`rope_theta` moved in here).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RopeParameters {
    pub rope_theta: Option<f64>,
    pub rope_type: Option<String>,
}

/// `config.json` of a `LlamaForCausalLM` (transformers' `LlamaConfig` defaults).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// `None`: as many as attention heads (no GQA).
    pub num_key_value_heads: Option<usize>,
    /// `None`: `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    /// transformers 4 layout; transformers 5 writes `rope_parameters.rope_theta`.
    pub rope_theta: Option<f64>,
    pub rope_parameters: Option<RopeParameters>,
    /// Only `null` (plain RoPE) is supported.
    pub rope_scaling: Option<serde_json::Value>,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<serde_json::Value>,
    pub pad_token_id: Option<u32>,
    /// Biases on q, k and v only (Qwen2's attention; not a `config.json` key of LLaMA, set by
    /// the Qwen2.5-VL loader).
    #[serde(skip)]
    pub qkv_bias: bool,
}

impl Default for LlamaConfig {
    fn default() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            head_dim: None,
            hidden_act: "silu".into(),
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-6,
            rope_theta: None,
            rope_parameters: None,
            rope_scaling: None,
            attention_bias: false,
            mlp_bias: false,
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_id: Some(serde_json::json!(2)),
            pad_token_id: None,
            qkv_bias: false,
        }
    }
}

impl LlamaConfig {
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let (cfg, path): (Self, _) = checkpoint::read_config(dir)?;
        cfg.validate()
            .map_err(|message| ModelError::Config { path, message })?;
        Ok(cfg)
    }

    /// What this implementation does not cover, as one message.
    pub fn validate(&self) -> Result<(), String> {
        let mut bad = Vec::new();
        if self.hidden_act != "silu" {
            bad.push(format!("hidden_act {:?} (only \"silu\")", self.hidden_act));
        }
        if self.attention_bias || self.mlp_bias {
            bad.push("attention_bias / mlp_bias (LLaMA has no biases)".into());
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            bad.push("rope_scaling (only plain RoPE)".into());
        }
        if let Some(t) = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_type.as_ref())
        {
            if t != "default" {
                bad.push(format!("rope_type {t:?} (only \"default\")"));
            }
        }
        let heads = self.num_attention_heads;
        let kv = self.kv_heads();
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
            bad.push(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
            ));
        } else if !self.head_dim().is_multiple_of(2) {
            bad.push(format!("head_dim {} is odd", self.head_dim()));
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(format!("unsupported LLaMA config: {}", bad.join("; ")))
        }
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// `rope_parameters.rope_theta`, else `rope_theta`, else 10000.
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }
}

/// `LlamaRMSNorm`: `weight * (x / sqrt(mean(x^2) + eps))`, the statistics in f32 and the
/// result cast back to `x`'s dtype before the weight, as transformers does.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(vb: VarBuilder, dim: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // One fused pass on the CPU; elsewhere the composition below, which it equals.
        kernels::rms_norm(x, &self.weight, self.eps)
    }
}

/// `cos` and `sin` of HF's default RoPE at `positions` (`[N]` f32): `[N, head_dim]`, each
/// frequency twice (`cat(freqs, freqs)`), computed in f32 as transformers does.
fn rope_at(
    positions: &Tensor,
    head_dim: usize,
    theta: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = (0..head_dim / 2)
        .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
        .collect();
    let inv = Tensor::from_vec(inv, (1, head_dim / 2), positions.device())?;
    let n = positions.dim(0)?;
    let freqs = positions.reshape((n, 1))?.broadcast_mul(&inv)?;
    let emb = Tensor::cat(&[&freqs, &freqs], 1)?;
    Ok((emb.cos()?, emb.sin()?))
}

/// RoPE tables for positions `0..t`, shared by every row: `[t, head_dim]`.
fn rope_tables(
    t: usize,
    head_dim: usize,
    theta: f64,
    dev: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let pos = Tensor::arange(0u32, t as u32, dev)?.to_dtype(DType::F32)?;
    rope_at(&pos, head_dim, theta)
}

/// `x * cos + rotate_half(x) * sin` with `rotate_half(x) = cat(-x2, x1)`; `x [B, H, T, hd]`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?
}

/// RoPE tables a caller computed for each row and position (Qwen2.5-VL's multimodal RoPE, whose
/// angles differ per row): `cos, sin [B, 1, T, head_dim]`, f32.
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RopeTables {
    /// `(cos, sin)` if both are `[b, 1, t, head_dim]`; else an error naming the shapes.
    fn checked(&self, b: usize, t: usize, hd: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let want = [b, 1, t, hd];
        if self.cos.dims() != want || self.sin.dims() != want {
            candle_core::bail!(
                "RoPE tables {:?} / {:?} for a [{b}, {t}] batch of head_dim {hd}",
                self.cos.dims(),
                self.sin.dims()
            );
        }
        Ok((self.cos.clone(), self.sin.clone()))
    }
}

/// How [`Llama::run_layers`] runs: with a graph through every layer, or dropping each layer's
/// graph as soon as its output is taken (keeping each layer's input when given a list).
enum Pass<'a> {
    Graph,
    Detached(Option<&'a mut Vec<Tensor>>),
}

/// What every layer of one forward shares: RoPE tables and the additive attention bias.
struct Context {
    /// `[T, hd]` shared by every row, or `[B, 1, T, hd]` per row.
    cos: Tensor,
    sin: Tensor,
    /// `[B, 1, T, T]`, 0 where a query may attend, a large negative number elsewhere.
    bias: Tensor,
}

#[derive(Debug, Clone)]
struct LlamaAttention {
    q_proj: LoraLinear,
    k_proj: LoraLinear,
    v_proj: LoraLinear,
    o_proj: LoraLinear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

fn proj(vb: VarBuilder, inp: usize, out: usize) -> candle_core::Result<LoraLinear> {
    Ok(LoraLinear::new(vb.get((out, inp), "weight")?))
}

/// [`proj`] with a bias when `bias` (Qwen2's q, k, v).
fn proj_bias(
    vb: VarBuilder,
    inp: usize,
    out: usize,
    bias: bool,
) -> candle_core::Result<LoraLinear> {
    if !bias {
        return proj(vb, inp, out);
    }
    Ok(LoraLinear::with_bias(
        vb.get((out, inp), "weight")?,
        vb.get(out, "bias")?,
    ))
}

impl LlamaAttention {
    fn load(vb: VarBuilder, c: &LlamaConfig) -> candle_core::Result<Self> {
        let (d, hd) = (c.hidden_size, c.head_dim());
        let (h, kv) = (c.num_attention_heads, c.kv_heads());
        Ok(Self {
            q_proj: proj_bias(vb.pp("q_proj"), d, h * hd, c.qkv_bias)?,
            k_proj: proj_bias(vb.pp("k_proj"), d, kv * hd, c.qkv_bias)?,
            v_proj: proj_bias(vb.pp("v_proj"), d, kv * hd, c.qkv_bias)?,
            o_proj: proj(vb.pp("o_proj"), h * hd, d)?,
            heads: h,
            kv_heads: kv,
            head_dim: hd,
        })
    }

    /// `cache`: this layer's keys and values of earlier positions (post-RoPE, before the GQA
    /// repeat), extended in place with this call's; `None` for a forward without a cache.
    fn forward(
        &self,
        x: &Tensor,
        ctx: &Context,
        cache: Option<&mut Option<LayerKv>>,
    ) -> candle_core::Result<Tensor> {
        let q = self.q_proj.forward(x)?;
        let k = self.k_proj.forward(x)?;
        let v = self.v_proj.forward(x)?;
        let out = match cache {
            // Without a cache (training, scoring, a prompt's first pass) the whole core is one
            // fused node on the CPU.
            None if attention::fusable(&q) => {
                let inputs = AttentionInputs {
                    cos: &ctx.cos,
                    sin: &ctx.sin,
                    bias: &ctx.bias,
                    heads: self.heads,
                    kv_heads: self.kv_heads,
                    head_dim: self.head_dim,
                };
                attention::attention(&q, &k, &v, &inputs)?
            }
            cache => self.composed(&q, &k, &v, ctx, cache)?,
        };
        self.o_proj.forward(&out)
    }

    /// The attention core in candle ops, from the projections `q [B, T, H * hd]`,
    /// `k, v [B, T, kv * hd]` to the merged heads `[B, T, H * hd]`: the path of the KV cache,
    /// of other devices and dtypes, and the reference the fused node is tested against.
    fn composed(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &Context,
        cache: Option<&mut Option<LayerKv>>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = q.dims3()?;
        let (h, kv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let split = |y: &Tensor, n: usize| y.reshape((b, t, n, hd))?.transpose(1, 2);
        let (q, k, v) = (split(q, h)?, split(k, kv)?, split(v, kv)?);
        // Tables are f32, as transformers computes them, cast to the activations' dtype.
        let cos = ctx.cos.to_dtype(q.dtype())?;
        let sin = ctx.sin.to_dtype(q.dtype())?;
        let q = apply_rope(&q, &cos, &sin)?;
        let k = apply_rope(&k, &cos, &sin)?;
        let (k, v) = match cache {
            // `[B, T, kv, hd]` transposed: gemm needs one stride across the (B, kv) batch.
            None => (k.contiguous()?, v.contiguous()?),
            Some(slot) => LayerKv::append(slot, &k, &v)?,
        };
        let tk = k.dim(2)?;
        // GQA: each key/value head serves `h / kv` consecutive query heads (`repeat_kv`).
        let repeat = |y: Tensor| -> candle_core::Result<Tensor> {
            if kv == h {
                return Ok(y);
            }
            y.unsqueeze(2)?
                .broadcast_as((b, kv, h / kv, tk, hd))?
                .contiguous()?
                .reshape((b, h, tk, hd))
        };
        // gemm takes any row / column strides, so the transposed keys and the cache's views
        // need no copies.
        let k = repeat(k)?;
        let v = repeat(v)?;
        let scores = kernels::matmul(&q, &k.t()?)?;
        let sdt = float_dtype(q.dtype());
        let probs = kernels::scaled_softmax(
            &scores.to_dtype(sdt)?,
            Some(&ctx.bias.to_dtype(sdt)?),
            1.0 / (hd as f64).sqrt(),
        )?
        .to_dtype(q.dtype())?;
        kernels::matmul(&probs, &v)?
            .transpose(1, 2)?
            .reshape((b, t, h * hd))
    }
}

#[derive(Debug, Clone)]
struct LlamaMlp {
    gate_proj: LoraLinear,
    up_proj: LoraLinear,
    down_proj: LoraLinear,
}

impl LlamaMlp {
    fn load(vb: VarBuilder, c: &LlamaConfig) -> candle_core::Result<Self> {
        let (d, i) = (c.hidden_size, c.intermediate_size);
        Ok(Self {
            gate_proj: proj(vb.pp("gate_proj"), d, i)?,
            up_proj: proj(vb.pp("up_proj"), d, i)?,
            down_proj: proj(vb.pp("down_proj"), i, d)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let g = self.gate_proj.forward(x)?;
        let u = self.up_proj.forward(x)?;
        self.down_proj.forward(&kernels::swiglu(&g, &u)?)
    }
}

#[derive(Debug, Clone)]
struct LlamaDecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: LlamaAttention,
    post_attention_layernorm: RmsNorm,
    mlp: LlamaMlp,
}

impl LlamaDecoderLayer {
    fn load(vb: VarBuilder, c: &LlamaConfig) -> candle_core::Result<Self> {
        let (d, eps) = (c.hidden_size, c.rms_norm_eps);
        Ok(Self {
            input_layernorm: RmsNorm::load(vb.pp("input_layernorm"), d, eps)?,
            self_attn: LlamaAttention::load(vb.pp("self_attn"), c)?,
            post_attention_layernorm: RmsNorm::load(vb.pp("post_attention_layernorm"), d, eps)?,
            mlp: LlamaMlp::load(vb.pp("mlp"), c)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        ctx: &Context,
        cache: Option<&mut Option<LayerKv>>,
    ) -> candle_core::Result<Tensor> {
        let x = (x + self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, ctx, cache)?)?;
        &x + self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?
    }

    fn projections_mut(&mut self) -> [(&'static str, &mut LoraLinear); 7] {
        [
            ("q_proj", &mut self.self_attn.q_proj),
            ("k_proj", &mut self.self_attn.k_proj),
            ("v_proj", &mut self.self_attn.v_proj),
            ("o_proj", &mut self.self_attn.o_proj),
            ("gate_proj", &mut self.mlp.gate_proj),
            ("up_proj", &mut self.mlp.up_proj),
            ("down_proj", &mut self.mlp.down_proj),
        ]
    }

    fn projections(&self) -> [&LoraLinear; 7] {
        [
            &self.self_attn.q_proj,
            &self.self_attn.k_proj,
            &self.self_attn.v_proj,
            &self.self_attn.o_proj,
            &self.mlp.gate_proj,
            &self.mlp.up_proj,
            &self.mlp.down_proj,
        ]
    }
}

/// `LlamaForCausalLM`: `model.embed_tokens`, `model.layers`, `model.norm`, `lm_head`.
#[derive(Debug, Clone)]
pub struct Llama {
    embed_tokens: Tensor,
    layers: Vec<LlamaDecoderLayer>,
    norm: RmsNorm,
    lm_head: Tensor,
    config: LlamaConfig,
    switch: LoraSwitch,
}

/// A large negative bias that neither overflows when added to a score nor makes a fully masked
/// row NaN (such a row becomes uniform, as with transformers' `finfo.min`).
const MASKED: f64 = f32::MIN as f64 * 0.5;

impl Llama {
    /// Builds the model from `vb` rooted at the checkpoint's top level (`model.*`, `lm_head`).
    pub fn load(vb: VarBuilder, config: LlamaConfig) -> candle_core::Result<Self> {
        if let Err(m) = config.validate() {
            candle_core::bail!("{m}");
        }
        let c = &config;
        let m = vb.pp("model");
        let embed_tokens = m
            .pp("embed_tokens")
            .get((c.vocab_size, c.hidden_size), "weight")?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| LlamaDecoderLayer::load(m.pp("layers").pp(i), c))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let norm = RmsNorm::load(m.pp("norm"), c.hidden_size, c.rms_norm_eps)?;
        let lm_head = if c.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            vb.pp("lm_head")
                .get((c.vocab_size, c.hidden_size), "weight")?
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            config,
            switch: LoraSwitch::default(),
        })
    }

    /// Loads `dir` (config.json + safetensors) with weights in `dtype`; every missing,
    /// mis-shaped or unexpected tensor is listed in one [`ModelError::Tensors`].
    pub fn load_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let config = LlamaConfig::from_dir(dir)?;
        checkpoint::load_checked(dir, dtype, device, checkpoint::same_keys, |vb| {
            Ok(Self::load(vb, config)?)
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The weights' dtype.
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// The weights' device.
    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// `ids [B, T]` (u32) -> `[B, T, D]` in the weights' dtype.
    pub fn embed_tokens(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        self.embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.config.hidden_size))
    }

    /// `inputs_embeds [B, T, D]` and `attention_mask [B, T]` (1 = token, 0 = padding, any
    /// numeric dtype) -> logits `[B, T, V]` in f32 (f64 for an f64 model), at positions `0..T`.
    pub fn forward_embeds(
        &self,
        inputs_embeds: &Tensor,
        attention_mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.forward_embeds_with_rope(inputs_embeds, attention_mask, None)
    }

    /// [`Self::forward_embeds`] with the caller's RoPE tables (`None`: positions `0..T`).
    pub fn forward_embeds_with_rope(
        &self,
        inputs_embeds: &Tensor,
        attention_mask: &Tensor,
        rope: Option<&RopeTables>,
    ) -> candle_core::Result<Tensor> {
        self.head(&self.hidden_states_with_rope(inputs_embeds, attention_mask, rope)?)
    }

    /// The decoder layers alone: `inputs_embeds [B, T, D]` -> hidden states `[B, T, D]` before
    /// the final norm, at positions `0..T`.
    pub fn hidden_states(
        &self,
        inputs_embeds: &Tensor,
        attention_mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.hidden_states_with_rope(inputs_embeds, attention_mask, None)
    }

    /// [`Self::hidden_states`] with the caller's RoPE tables (`None`: positions `0..T`).
    pub fn hidden_states_with_rope(
        &self,
        inputs_embeds: &Tensor,
        attention_mask: &Tensor,
        rope: Option<&RopeTables>,
    ) -> candle_core::Result<Tensor> {
        let ctx = self.context(inputs_embeds, attention_mask, rope)?;
        let x = inputs_embeds.to_dtype(self.dtype())?;
        self.run_layers(x, &ctx, Pass::Graph)
    }

    /// Every decoder layer on `x`, each announced to the LoRA switch (its dropout masks are
    /// numbered by layer): the one loop of the cache-free forwards, with a graph or without.
    fn run_layers(
        &self,
        mut x: Tensor,
        ctx: &Context,
        mut pass: Pass<'_>,
    ) -> candle_core::Result<Tensor> {
        for (i, layer) in self.layers.iter().enumerate() {
            self.switch.begin_layer(i);
            x = match &mut pass {
                Pass::Graph => layer.forward(&x, ctx, None)?,
                Pass::Detached(kept) => {
                    if let Some(kept) = kept.as_mut() {
                        kept.push(x.clone());
                    }
                    layer.forward(&x, ctx, None)?.detach()
                }
            };
        }
        Ok(x)
    }

    /// RoPE tables and the attention bias of a cache-free forward: the caller's tables
    /// (`[B, 1, T, head_dim]`) when given, else positions `0..T` shared by every row.
    fn context(
        &self,
        inputs_embeds: &Tensor,
        attention_mask: &Tensor,
        rope: Option<&RopeTables>,
    ) -> candle_core::Result<Context> {
        let (b, t, _) = inputs_embeds.dims3()?;
        let hd = self.config.head_dim();
        let (cos, sin) = match rope {
            None => rope_tables(t, hd, self.config.rope_theta(), inputs_embeds.device())?,
            Some(r) => r.checked(b, t, hd)?,
        };
        let bias = attention_bias(attention_mask, b, t, 0)?;
        Ok(Context { cos, sin, bias })
    }

    /// Summed log-probs `[B]` of the labels `scored` names, from hidden states `h [B, T, D]`:
    /// the final norm, `lm_head` and log-softmax run on the rows that predict a label only (a
    /// LLaVA prompt is mostly image tokens: its scored rows are a few percent of `T`), in
    /// pieces of `chunk` rows (0: one piece). f32 (f64 for an f64 model).
    pub fn scored_logprobs(
        &self,
        h: &Tensor,
        scored: &Scored,
        chunk: usize,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = h.dims3()?;
        if scored.batch != b || scored.width != t {
            candle_core::bail!(
                "scored positions of a [{}, {}] batch, hidden states {:?}",
                scored.batch,
                scored.width,
                h.dims()
            );
        }
        let n = scored.rows.len();
        let step = if chunk == 0 { n.max(1) } else { chunk };
        let mut sums = Tensor::zeros(b, float_dtype(self.dtype()), h.device())?;
        for lo in (0..n).step_by(step) {
            sums = (sums + self.scored_piece(h, scored, lo, hi_of(lo, step, n))?)?;
        }
        Ok(sums)
    }

    /// The per-sequence sums `[B]` of scored rows `lo..hi` alone.
    fn scored_piece(
        &self,
        h: &Tensor,
        scored: &Scored,
        lo: usize,
        hi: usize,
    ) -> candle_core::Result<Tensor> {
        let (b, t, d) = h.dims3()?;
        let part = scored.piece(lo, hi, h.device())?;
        let x = h.reshape((b * t, d))?.index_select(&part.rows, 0)?;
        let logits = self.head(&x.unsqueeze(0)?)?.squeeze(0)?;
        let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?
            .gather(&part.labels.unsqueeze(1)?, 1)?
            .squeeze(1)?;
        // Per-sequence sums as a product with the rows' one-hot owners (differentiable, and
        // small: `[B, rows]`).
        part.owners
            .to_dtype(lp.dtype())?
            .matmul(&lp.unsqueeze(1)?)?
            .squeeze(1)
    }

    /// Final norm and `lm_head`: hidden states -> f32 (f64) logits.
    fn head(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.norm.forward(x)?;
        linear(&x, &self.lm_head)?.to_dtype(float_dtype(self.dtype()))
    }

    /// An empty KV cache for `batch` rows, for [`Self::forward_cached`].
    pub fn new_cache(&self, batch: usize) -> KvCache {
        KvCache {
            layers: (0..self.layers.len()).map(|_| None).collect(),
            mask: None,
            seen: vec![0; batch],
            offsets: vec![0; batch],
        }
    }

    /// One step of incremental decoding: `inputs_embeds [B, t, D]` are the next `t` positions
    /// of every row, `attention_mask [B, t]` marks which of them are tokens (left padding of a
    /// prompt is 0). Keys and values are kept in `cache`; logits `[B, t, V]` are returned.
    ///
    /// Positions follow transformers' `generate`: each row counts only its own tokens
    /// (`cumsum(mask) - 1`), so a left-padded prompt is encoded exactly as an unpadded one.
    pub fn forward_cached(
        &self,
        inputs_embeds: &Tensor,
        attention_mask: &Tensor,
        cache: &mut KvCache,
    ) -> candle_core::Result<Tensor> {
        let x = self.decode_step(inputs_embeds, attention_mask, cache, None)?;
        self.head(&x)
    }

    /// [`Self::forward_cached`] returning only the last position's logits, `[B, 1, V]`: all that
    /// greedy decoding reads (transformers' `logits_to_keep = 1`). A prompt's first pass then
    /// skips the vocabulary projection of every earlier position.
    pub fn forward_cached_last(
        &self,
        inputs_embeds: &Tensor,
        attention_mask: &Tensor,
        cache: &mut KvCache,
    ) -> candle_core::Result<Tensor> {
        self.forward_cached_last_with_rope(inputs_embeds, attention_mask, cache, None)
    }

    /// [`Self::forward_cached_last`] with the caller's RoPE tables for these `t` positions
    /// (`[B, 1, t, head_dim]`; a multimodal prompt's first pass); `None`: counted positions.
    pub fn forward_cached_last_with_rope(
        &self,
        inputs_embeds: &Tensor,
        attention_mask: &Tensor,
        cache: &mut KvCache,
        rope: Option<&RopeTables>,
    ) -> candle_core::Result<Tensor> {
        let x = self.decode_step(inputs_embeds, attention_mask, cache, rope)?;
        let t = x.dim(1)?;
        self.head(&x.narrow(1, t - 1, 1)?.contiguous()?)
    }

    /// The decoder layers of one cached step: hidden states `[B, t, D]` before the final norm.
    fn decode_step(
        &self,
        inputs_embeds: &Tensor,
        attention_mask: &Tensor,
        cache: &mut KvCache,
        rope: Option<&RopeTables>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = inputs_embeds.dims3()?;
        let dev = inputs_embeds.device();
        if cache.seen.len() != b || attention_mask.dims() != [b, t] {
            candle_core::bail!(
                "cache for {} rows, inputs [{b}, {t}], mask {:?}",
                cache.seen.len(),
                attention_mask.dims()
            );
        }
        let new_mask: Vec<Vec<f32>> = attention_mask.to_dtype(DType::F32)?.to_vec2()?;
        let mut positions = Vec::with_capacity(b * t);
        for ((row, seen), off) in new_mask
            .iter()
            .zip(cache.seen.iter_mut())
            .zip(&cache.offsets)
        {
            for &m in row {
                if m != 0.0 {
                    *seen += 1;
                }
                positions.push((seen.saturating_sub(1) as i64 + off) as f32);
            }
        }
        let hd = self.config.head_dim();
        let (cos, sin) = match rope {
            Some(r) => r.checked(b, t, hd)?,
            None => {
                let positions = Tensor::from_vec(positions, b * t, dev)?;
                let (cos, sin) = rope_at(&positions, hd, self.config.rope_theta())?;
                (cos.reshape((b, 1, t, hd))?, sin.reshape((b, 1, t, hd))?)
            }
        };
        let step_mask = attention_mask.to_dtype(DType::F32)?;
        let mask = match cache.mask.take() {
            None => step_mask,
            Some(prev) => Tensor::cat(&[&prev, &step_mask], 1)?,
        };
        let offset = mask.dim(1)? - t;
        let bias = attention_bias(&mask, b, t, offset)?;
        cache.mask = Some(mask);
        let ctx = Context { cos, sin, bias };
        let mut x = inputs_embeds.to_dtype(self.dtype())?;
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, &ctx, Some(slot))?;
        }
        Ok(x)
    }

    /// [`Self::forward_embeds`] of [`Self::embed_tokens`].
    pub fn forward(&self, ids: &Tensor, attention_mask: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_embeds(&self.embed_tokens(ids)?, attention_mask)
    }

    /// Attaches fresh adapters (A Kaiming-uniform from `rng`, B zero) to the projections
    /// `cfg.target_modules` names, layer by layer in checkpoint order.
    pub fn attach_lora<R: Rng>(
        &mut self,
        cfg: &LoraConfig,
        rng: &mut R,
    ) -> candle_core::Result<()> {
        let switch = self.switch.clone();
        for layer in &mut self.layers {
            for (name, p) in layer.projections_mut() {
                if cfg.targets(name) {
                    p.attach(cfg, &switch, rng)?;
                }
            }
        }
        Ok(())
    }

    /// The switch shared by all adapters: enabled (policy) / disabled (reference), training.
    pub fn lora_switch(&self) -> &LoraSwitch {
        &self.switch
    }

    /// Every adapter variable, `A` then `B` per projection, layers in order.
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.layers
            .iter()
            .flat_map(|l| l.projections())
            .flat_map(|p| p.trainable_vars())
            .collect()
    }

    /// Each adapted projection with its checkpoint path (`model.layers.N.self_attn.q_proj`).
    pub fn lora_layers(&self) -> Vec<(String, &LoraLinear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            for (n, p) in PROJECTION_PATHS.iter().zip(l.projections()) {
                if p.lora().is_some() {
                    out.push((format!("model.layers.{i}.{n}"), p));
                }
            }
        }
        out
    }

    /// The projection at checkpoint path `model.layers.N.self_attn.q_proj` (any of the seven
    /// LoRA targets), for attaching loaded adapters; `None` for any other path.
    pub fn projection_mut(&mut self, path: &str) -> Option<&mut LoraLinear> {
        let rest = path.strip_prefix("model.layers.")?;
        let (index, name) = rest.split_once('.')?;
        let layer = self.layers.get_mut(index.parse::<usize>().ok()?)?;
        let slot = PROJECTION_PATHS.iter().position(|p| *p == name)?;
        layer
            .projections_mut()
            .into_iter()
            .nth(slot)
            .map(|(_, p)| p)
    }
}

/// The seven LoRA targets' paths inside a decoder layer, in [`LlamaDecoderLayer::projections`]
/// order.
const PROJECTION_PATHS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// f64 stays f64 (finite-difference checks); everything else computes in f32.
fn float_dtype(d: DType) -> DType {
    if d == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

fn hi_of(lo: usize, step: usize, n: usize) -> usize {
    (lo + step).min(n)
}

/// Which label tokens of a right-padded batch count, and which hidden-state rows predict them:
/// label `t` of row `b` (where `label_mask[b, t]` is 1, `t >= 1`) is predicted by the hidden
/// state at `(b, t - 1)`.
#[derive(Debug, Clone)]
pub struct Scored {
    batch: usize,
    width: usize,
    /// `b * T + t - 1` of each counted label, row-major.
    rows: Vec<u32>,
    labels: Vec<u32>,
    owners: Vec<usize>,
    /// Counted labels per sequence.
    pub counts: Vec<usize>,
}

/// `rows lo..hi` of a [`Scored`] as tensors.
struct ScoredPiece {
    rows: Tensor,
    labels: Tensor,
    /// `[B, hi - lo]`: 1 where the row belongs to the sequence.
    owners: Tensor,
}

impl Scored {
    /// From `ids [B, T]` (u32) and `label_mask [B, T]` (any numeric dtype), read to the host
    /// once per batch.
    pub fn new(ids: &Tensor, label_mask: &Tensor) -> candle_core::Result<Self> {
        let (batch, width) = ids.dims2()?;
        if label_mask.dims() != [batch, width] {
            candle_core::bail!(
                "label mask {:?} for ids {:?}",
                label_mask.dims(),
                ids.dims()
            );
        }
        let ids: Vec<Vec<u32>> = ids.to_dtype(DType::U32)?.to_vec2()?;
        let mask: Vec<Vec<f32>> = label_mask.to_dtype(DType::F32)?.to_vec2()?;
        let mut out = Self {
            batch,
            width,
            rows: Vec::new(),
            labels: Vec::new(),
            owners: Vec::new(),
            counts: vec![0; batch],
        };
        for (b, (ids, mask)) in ids.iter().zip(&mask).enumerate() {
            for t in 1..width {
                if mask[t] != 0.0 {
                    out.rows.push((b * width + t - 1) as u32);
                    out.labels.push(ids[t]);
                    out.owners.push(b);
                    out.counts[b] += 1;
                }
            }
        }
        Ok(out)
    }

    /// Counted labels in all.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    fn piece(&self, lo: usize, hi: usize, dev: &Device) -> candle_core::Result<ScoredPiece> {
        let n = hi - lo;
        let mut owners = vec![0f32; self.batch * n];
        for (k, &b) in self.owners[lo..hi].iter().enumerate() {
            owners[b * n + k] = 1.0;
        }
        Ok(ScoredPiece {
            rows: Tensor::from_slice(&self.rows[lo..hi], n, dev)?,
            labels: Tensor::from_slice(&self.labels[lo..hi], n, dev)?,
            owners: Tensor::from_vec(owners, (self.batch, n), dev)?,
        })
    }
}

/// `[B, 1, T, offset + T]` f32 for `T` queries at key positions `offset..offset + T`: 0 where
/// key `j <= offset + i` and key `j` is not padding (`mask [B, offset + T]`), [`MASKED`]
/// elsewhere.
fn attention_bias(mask: &Tensor, b: usize, t: usize, offset: usize) -> candle_core::Result<Tensor> {
    let dev = mask.device();
    let tk = offset + t;
    if mask.dims() != [b, tk] {
        candle_core::bail!(
            "attention_mask has shape {:?}, expected [{b}, {tk}]",
            mask.dims()
        );
    }
    let q = Tensor::arange(offset as u32, tk as u32, dev)?;
    let k = Tensor::arange(0u32, tk as u32, dev)?;
    let causal = q
        .reshape((t, 1))?
        .broadcast_ge(&k.reshape((1, tk))?)?
        .to_dtype(DType::F32)?;
    let keys = mask.to_dtype(DType::F32)?.ne(0f32)?.to_dtype(DType::F32)?;
    let allowed = causal
        .reshape((1, 1, t, tk))?
        .broadcast_mul(&keys.reshape((b, 1, 1, tk))?)?;
    (allowed - 1.0)? * (-MASKED)
}

/// Keys and values of the positions decoded so far, per layer, with the attention mask over
/// them and each row's token count (its next position). Not `Clone`: its buffers are written in
/// place, so two copies would share (and corrupt) them.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    mask: Option<Tensor>,
    seen: Vec<usize>,
    /// Added to each row's position count (Qwen2.5-VL's `rope_deltas`: text after an image
    /// continues from the image's largest position, not from its token count).
    offsets: Vec<i64>,
}

impl KvCache {
    /// Sets each row's position offset for the steps that follow.
    pub fn set_position_offsets(&mut self, offsets: Vec<i64>) -> candle_core::Result<()> {
        if offsets.len() != self.seen.len() {
            candle_core::bail!(
                "{} position offsets for a cache of {} rows",
                offsets.len(),
                self.seen.len()
            );
        }
        self.offsets = offsets;
        Ok(())
    }

    /// Leading padding columns [`Self::keep_rows`] leaves in place (below a quarter of the width).
    const TRIM: usize = 16;

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.seen.len()
    }

    /// Positions held per row, left padding included.
    fn width(&self) -> candle_core::Result<usize> {
        self.mask.as_ref().map_or(Ok(0), |m| m.dim(1))
    }

    /// Appends `other`'s rows after this cache's (continuous batching admits newly prefilled
    /// prompts into a running decode). The two may hold different position counts: the
    /// shorter one is left-padded with masked positions, which no query attends to; each
    /// row's positions come from its own count and offset, not from its column, and its keys
    /// are stored after RoPE, so moving them right changes nothing a row computes.
    pub fn append_rows(&mut self, other: KvCache) -> candle_core::Result<()> {
        if other.rows() == 0 {
            return Ok(());
        }
        if self.rows() == 0 {
            *self = other;
            return Ok(());
        }
        if self.layers.len() != other.layers.len() {
            candle_core::bail!(
                "merging caches of {} and {} layers",
                self.layers.len(),
                other.layers.len()
            );
        }
        let (wa, wb) = (self.width()?, other.width()?);
        let (Some(ma), Some(mb)) = (&self.mask, &other.mask) else {
            candle_core::bail!("merging a cache that holds no positions yet");
        };
        let w = wa.max(wb);
        self.mask = Some(Tensor::cat(
            &[
                &ma.pad_with_zeros(1, w - wa, 0)?,
                &mb.pad_with_zeros(1, w - wb, 0)?,
            ],
            0,
        )?);
        for (a, b) in self.layers.iter_mut().zip(other.layers) {
            let (Some(la), Some(lb)) = (a.as_ref(), b) else {
                candle_core::bail!("merging a cache that holds no positions yet");
            };
            let (fa, fb) = (la.filled()?, lb.filled()?);
            let k = Tensor::cat(
                &[
                    &fa.0.pad_with_zeros(2, w - wa, 0)?,
                    &fb.0.pad_with_zeros(2, w - wb, 0)?,
                ],
                0,
            )?;
            let v = Tensor::cat(
                &[
                    &fa.1.pad_with_zeros(2, w - wa, 0)?,
                    &fb.1.pad_with_zeros(2, w - wb, 0)?,
                ],
                0,
            )?;
            *a = Some(LayerKv::with_room(&k, &v)?);
        }
        self.seen.extend(other.seen);
        self.offsets.extend(other.offsets);
        Ok(())
    }

    /// Keeps only `rows` (indices into this cache, in the order given): a decode drops the
    /// rows that have finished. Leading positions that are padding in every kept row go too,
    /// so the width follows the longest row still running, not every row ever admitted.
    pub fn keep_rows(&mut self, rows: &[usize]) -> candle_core::Result<()> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.rows()) {
            candle_core::bail!("keeping row {bad} of a cache of {} rows", self.rows());
        }
        self.seen = rows.iter().map(|&r| self.seen[r]).collect();
        self.offsets = rows.iter().map(|&r| self.offsets[r]).collect();
        let Some(mask) = self.mask.take() else {
            return Ok(());
        };
        if rows.is_empty() {
            self.layers.iter_mut().for_each(|l| *l = None);
            return Ok(());
        }
        let idx = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows.len(),
            mask.device(),
        )?;
        let mask = mask.index_select(&idx, 0)?;
        let w = mask.dim(1)?;
        let used: Vec<f32> = mask.sum(0)?.to_vec1()?;
        let lead = used.iter().position(|&u| u != 0.0).unwrap_or(w);
        // Dropping columns rebuilds the buffers (a few copies per layer); a decode drops rows at
        // most steps, so a few columns of padding stay until they are worth a rebuild.
        if lead < Self::TRIM && 4 * lead < w {
            self.mask = Some(mask);
            for l in self.layers.iter_mut().flatten() {
                l.k = l.k.index_select(&idx, 0)?;
                l.v = l.v.index_select(&idx, 0)?;
            }
            return Ok(());
        }
        self.mask = Some(mask.narrow(1, lead, w - lead)?);
        for slot in self.layers.iter_mut() {
            let Some(l) = slot.as_ref() else { continue };
            let (k, v) = l.filled()?;
            let keep = |y: Tensor| -> candle_core::Result<Tensor> {
                y.narrow(2, lead, l.len - lead)?
                    .contiguous()?
                    .index_select(&idx, 0)
            };
            *slot = Some(LayerKv::with_room(&keep(k)?, &keep(v)?)?);
        }
        Ok(())
    }
}

/// One layer's cached keys and values: `[B, kv, capacity, hd]` buffers filled along dim 2 up to
/// `len`. Appending writes in place and hands out views, so a decoding step copies only its own
/// new positions; `Tensor::cat` would copy the whole cache every step (quadratic in the length).
#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerKv {
    /// Free positions a rebuilt buffer starts with, so the next steps append in place.
    const ROOM: usize = 32;

    /// A buffer holding `k, v [B, kv, len, hd]` with [`Self::ROOM`] free positions after them.
    fn with_room(k: &Tensor, v: &Tensor) -> candle_core::Result<Self> {
        Ok(Self {
            len: k.dim(2)?,
            k: k.pad_with_zeros(2, 0, Self::ROOM)?,
            v: v.pad_with_zeros(2, 0, Self::ROOM)?,
        })
    }

    /// The positions written so far: views of `[B, kv, len, hd]`.
    fn filled(&self) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            self.k.narrow(2, 0, self.len)?,
            self.v.narrow(2, 0, self.len)?,
        ))
    }

    /// Appends `k, v [B, kv, t, hd]` to `slot` (growing it by doubling when full) and returns
    /// every position so far.
    fn append(
        slot: &mut Option<LayerKv>,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (b, heads, t, hd) = k.dims4()?;
        let (len, cap) = match slot {
            Some(c) => (c.len, c.k.dim(2)?),
            None => (0, 0),
        };
        if len + t > cap {
            let cap = (len + t).max(2 * cap).max(len + t + 32);
            let nk = Tensor::zeros((b, heads, cap, hd), k.dtype(), k.device())?;
            let nv = Tensor::zeros((b, heads, cap, hd), v.dtype(), v.device())?;
            if let Some(c) = slot.as_ref() {
                nk.slice_set(&c.k.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                nv.slice_set(&c.v.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            }
            *slot = Some(LayerKv { k: nk, v: nv, len });
        }
        let c = slot.as_mut().expect("allocated above");
        c.k.slice_set(&k.contiguous()?, 2, c.len)?;
        c.v.slice_set(&v.contiguous()?, 2, c.len)?;
        c.len += t;
        Ok((c.k.narrow(2, 0, c.len)?, c.v.narrow(2, 0, c.len)?))
    }
}

/// Per-token log-probs of a causal LM: `logits [B, T, V]`, `labels [B, T]` (u32) ->
/// `[B, T-1]` with entry `t` = `log p(labels[t+1] | ..=t)` (logits at `t` predict `t+1`).
pub fn token_logprobs(logits: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
    let (_, t, _) = logits.dims3()?;
    if t < 2 {
        candle_core::bail!("need at least 2 positions to score, got {t}");
    }
    let logits = logits.narrow(1, 0, t - 1)?;
    let lp =
        candle_nn::ops::log_softmax(&logits.to_dtype(float_dtype(logits.dtype()))?, D::Minus1)?;
    let next = labels.narrow(1, 1, t - 1)?.contiguous()?.unsqueeze(2)?;
    lp.gather(&next, 2)?.squeeze(2)
}

/// Sequence log-probs: `label_mask [B, T]` marks the label tokens that count (a response and
/// its EOS; the first position can never count). Returns `(sum of log p [B], count [B])` in
/// f32 (f64 for f64 logits).
pub fn sequence_logprobs(
    logits: &Tensor,
    labels: &Tensor,
    label_mask: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let lp = token_logprobs(logits, labels)?;
    let t = label_mask.dim(1)?;
    let m = label_mask.narrow(1, 1, t - 1)?.to_dtype(lp.dtype())?;
    Ok(((lp * &m)?.sum(1)?, m.sum(1)?))
}
