//! The memory of one training step, predicted from a LLaVA or a Qwen2.5-VL config: what
//! `misp bench memory` prints, and what says whether a run fits a device before it is started.
//!
//! Every figure is a count of bytes of tensors that are alive at the same time, with the
//! formula beside what it counts. They follow the generic path (`--kernels generic`, what a GPU
//! runs): candle's autograd keeps every op's inputs until the backward is done, so a graph's
//! memory is the sum of the intermediate tensors of its forward, which are listed op by op for
//! one decoder layer below ([`layer_graph`]). misp's fused CPU kernels keep less.
//!
//! A step's peak is the persistent part (weights, adapters with their gradient sum and AdamW's
//! moments) plus the largest of its phases:
//! - `reference`: the reference pass of a record's first epoch (LoRA off, no graph), one group
//!   of sequences at a time;
//! - `policy`: the policy's gradient. Batched (the default): one graph over every sequence of
//!   the micro-batch, then its backward. In pieces (`sequence_group`,
//!   `gradient_checkpointing`, `logprob_chunk`; docs/design.md §4.7): the layers' inputs kept for
//!   every sequence, and one group's graph at a time: one layer's with checkpointing, every
//!   layer's without.
//!
//! The vision tower is frozen and runs without a graph (its weights and pixels are constants, so
//! candle records none of its ops): a step keeps nothing of it but each image's embeddings,
//! written into the decoder's input rows. Its cost is a transient phase of its own, one image
//! at a time for Qwen2.5-VL (one block's attention over the image's patches at its busiest).
//!
//! Qwen2.5-VL's language model is misp's LLaMA with biases on q, k, v and grouped key/value
//! heads: the generic path adds to a LLaMA layer's graph the three bias sums, and the keys and
//! values repeated to every query head (`repeat_kv`, a copy); its image tokens per image come
//! from the image processor's `smart_resize` of the image's size.
//!
//! The formulas were checked against the peak RSS `misp train` measures per step on the CPU
//! (`memory/step_peak_rss_mib` in its metrics); `bench/memory/check.py` runs that check.

use candle_core::DType;
use serde::Serialize;

use crate::model::llava::LlavaConfig;
use crate::model::qwen2_5_vl::image_processor::QwenImageProcessor;
use crate::model::qwen2_5_vl::Qwen2_5VlConfig;

/// The shape of one step: what the formulas need beyond the model config.
#[derive(Debug, Clone, Serialize)]
pub struct StepShape {
    /// Sequences of a micro-batch: `K + 2` per record times records per micro-batch.
    pub sequences: usize,
    /// Tokens of each sequence (image tokens included).
    pub tokens: usize,
    /// Scored tokens of each sequence (the response and its EOS).
    pub response_tokens: usize,
    /// Images the micro-batch reads (one per sequence: the positive is read for the chosen
    /// and the rejected sequence, and once per negative).
    pub images: usize,
    pub lora_rank: usize,
    /// LoRA targets, as `(in, out)` per layer: the seven projections by default.
    pub lora_targets: usize,
    pub lora_dropout: bool,
    pub weights: WeightDtype,
    /// `sequence_group` (0: all in one group).
    pub sequence_group: usize,
    pub gradient_checkpointing: bool,
    /// `logprob_chunk` (0: every scored row at once).
    pub logprob_chunk: usize,
}

/// The base weights' dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    F32,
    Bf16,
    F16,
}

impl WeightDtype {
    pub fn bytes(self) -> f64 {
        match self {
            Self::F32 => 4.0,
            Self::Bf16 | Self::F16 => 2.0,
        }
    }

    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }
}

impl StepShape {
    fn in_pieces(&self) -> bool {
        self.gradient_checkpointing || self.sequence_group > 0 || self.logprob_chunk > 0
    }

    fn group(&self) -> usize {
        if self.sequence_group == 0 {
            self.sequences
        } else {
            self.sequence_group.min(self.sequences)
        }
    }
}

/// One counted piece: a name, its bytes, and the formula that gives them.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    pub name: String,
    pub bytes: f64,
    pub formula: String,
}

fn item(name: &str, bytes: f64, formula: impl Into<String>) -> Item {
    Item {
        name: name.into(),
        bytes,
        formula: formula.into(),
    }
}

/// A phase of the step and what is alive at its peak, beyond the persistent part.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: String,
    pub items: Vec<Item>,
}

impl Phase {
    pub fn bytes(&self) -> f64 {
        self.items.iter().map(|i| i.bytes).sum()
    }
}

/// The prediction: persistent items, each phase, and the peak.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub shape: StepShape,
    pub persistent: Vec<Item>,
    pub phases: Vec<Phase>,
}

impl Prediction {
    pub fn persistent_bytes(&self) -> f64 {
        self.persistent.iter().map(|i| i.bytes).sum()
    }

    /// The phase with the most transient memory.
    pub fn peak_phase(&self) -> &Phase {
        self.phases
            .iter()
            .max_by(|a, b| a.bytes().total_cmp(&b.bytes()))
            .expect("a prediction has phases")
    }

    pub fn peak_bytes(&self) -> f64 {
        self.persistent_bytes() + self.peak_phase().bytes()
    }
}

/// The vision tower's sizes, per image.
#[derive(Debug, Clone, Serialize)]
pub enum Tower {
    /// CLIP ViT (LLaVA): `positions` = patches + CLS of a `side` x `side` image.
    Clip { positions: f64, side: f64 },
    /// Qwen2.5-VL's windowed ViT: `patches` of the resized image (`grid_h x grid_w`), each of
    /// `patch_dim` values; one language-model token per `merge^2` patches.
    Qwen {
        patches: f64,
        patch_dim: f64,
        image_tokens: f64,
    },
}

/// Sizes of the model that the formulas read, from either backbone's config.
#[derive(Debug, Clone, Serialize)]
pub struct ModelDims {
    /// `model_type` of the config.
    pub model_type: String,
    /// Text: layers, hidden, intermediate, heads, KV heads, head dim, vocabulary.
    l: f64,
    d: f64,
    i: f64,
    h: f64,
    kv: f64,
    hd: f64,
    v: f64,
    /// Vision: layers, hidden, intermediate, heads.
    lv: f64,
    dv: f64,
    iv: f64,
    hv: f64,
    tower: Tower,
    /// Biases on q, k, v (Qwen2).
    qkv_bias: bool,
    /// Parameters of the whole checkpoint.
    parameters: f64,
}

/// Shorthand for the formulas.
type Dims = ModelDims;

impl ModelDims {
    /// LLaVA-1.5: 576 image tokens of a 336 px CLIP tower.
    pub fn llava(cfg: &LlavaConfig) -> Self {
        let (t, v) = (&cfg.text_config, &cfg.vision_config);
        let g = v.grid() as f64;
        let mut m = ModelDims {
            model_type: "llava".into(),
            l: t.num_hidden_layers as f64,
            d: t.hidden_size as f64,
            i: t.intermediate_size as f64,
            h: t.num_attention_heads as f64,
            kv: t.kv_heads() as f64,
            hd: t.head_dim() as f64,
            v: t.vocab_size as f64,
            lv: v.num_hidden_layers as f64,
            dv: v.hidden_size as f64,
            iv: v.intermediate_size as f64,
            hv: v.num_attention_heads as f64,
            tower: Tower::Clip {
                positions: g * g + 1.0,
                side: v.image_size as f64,
            },
            qkv_bias: false,
            parameters: 0.0,
        };
        m.parameters = llava_parameters(&m, cfg);
        m
    }

    /// Qwen2.5-VL with every image `width x height` pixels, resized by `images`
    /// (`smart_resize`). Errors as the processor's (an aspect ratio above 200).
    pub fn qwen2_5_vl(
        cfg: &Qwen2_5VlConfig,
        images: &QwenImageProcessor,
        width: usize,
        height: usize,
    ) -> Result<Self, String> {
        let (t, v) = (&cfg.text, &cfg.vision);
        let (rh, rw) = images.resized_size(height, width)?;
        let patches = (rh / v.patch_size) * (rw / v.patch_size);
        let merge = v.spatial_merge_size * v.spatial_merge_size;
        let llama = cfg.llama();
        let mut m = ModelDims {
            model_type: "qwen2_5_vl".into(),
            l: t.num_hidden_layers as f64,
            d: t.hidden_size as f64,
            i: t.intermediate_size as f64,
            h: t.num_attention_heads as f64,
            kv: llama.kv_heads() as f64,
            hd: llama.head_dim() as f64,
            v: t.vocab_size as f64,
            lv: v.depth as f64,
            dv: v.hidden_size as f64,
            iv: v.intermediate_size as f64,
            hv: v.num_heads as f64,
            tower: Tower::Qwen {
                patches: patches as f64,
                patch_dim: v.patch_dim() as f64,
                image_tokens: (patches / merge) as f64,
            },
            qkv_bias: true,
            parameters: 0.0,
        };
        m.parameters = qwen_parameters(&m, cfg);
        Ok(m)
    }

    /// Decoder layers.
    pub fn layers(&self) -> usize {
        self.l as usize
    }

    pub fn hidden_size(&self) -> usize {
        self.d as usize
    }

    /// Language-model tokens one image takes.
    pub fn image_tokens(&self) -> usize {
        match self.tower {
            Tower::Clip { positions, .. } => positions as usize - 1,
            Tower::Qwen { image_tokens, .. } => image_tokens as usize,
        }
    }

    /// Parameters of the whole checkpoint (vision tower, projector or merger, language model).
    pub fn parameters(&self) -> f64 {
        self.parameters
    }

    /// `(in, out)` of the seven LoRA targets of a decoder layer.
    fn targets(&self) -> [(f64, f64); 7] {
        let (d, i, q, kv) = (self.d, self.i, self.h * self.hd, self.kv * self.hd);
        [(d, q), (d, kv), (d, kv), (q, d), (d, i), (d, i), (i, d)]
    }

    /// Values of one image's pixels as the processor gives them (f32).
    fn pixel_values(&self) -> f64 {
        match self.tower {
            Tower::Clip { side, .. } => 3.0 * side * side,
            Tower::Qwen {
                patches, patch_dim, ..
            } => patches * patch_dim,
        }
    }
}

const F32: f64 = 4.0;

/// Parameters of a LLaVA checkpoint (vision tower, projector, language model), as misp loads
/// them (every vision layer, though LLaVA reads the one before the last).
fn llava_parameters(m: &Dims, cfg: &LlavaConfig) -> f64 {
    let t = &cfg.text_config;
    let c = cfg.vision_config.num_channels as f64;
    let p = cfg.vision_config.patch_size as f64;
    let positions = match m.tower {
        Tower::Clip { positions, .. } => positions,
        Tower::Qwen { .. } => unreachable!("a LLaVA config has a CLIP tower"),
    };
    let vision = c * p * p * m.dv // patch embedding (no bias)
        + m.dv // class embedding
        + positions * m.dv // position embedding
        + 2.0 * m.dv // pre_layrnorm
        + m.lv
            * (4.0 * m.dv // two layer norms
                + 4.0 * (m.dv * m.dv + m.dv) // q, k, v, o with bias
                + m.dv * m.iv + m.iv // fc1
                + m.iv * m.dv + m.dv) // fc2
        + 2.0 * m.dv; // post_layernorm
    let projector = m.dv * m.d + m.d + m.d * m.d + m.d;
    let attn_bias = if t.attention_bias {
        m.h * m.hd + 2.0 * m.kv * m.hd + m.d
    } else {
        0.0
    };
    let mlp_bias = if t.mlp_bias { 2.0 * m.i + m.d } else { 0.0 };
    let head = if t.tie_word_embeddings {
        0.0
    } else {
        m.v * m.d
    };
    vision + projector + text_parameters(m, attn_bias + mlp_bias, head)
}

/// The language model's parameters: embeddings, layers (two RMSNorm weights, the seven
/// projections, `bias` more per layer), the final norm and the untied `head`.
fn text_parameters(m: &Dims, bias: f64, head: f64) -> f64 {
    let layer = 2.0 * m.d + m.targets().iter().map(|(a, b)| a * b).sum::<f64>() + bias;
    m.v * m.d + m.l * layer + m.d + head
}

/// Parameters of a Qwen2.5-VL checkpoint: the windowed ViT (patch embedding without bias,
/// blocks with RMSNorm and a biased SwiGLU MLP), the merger, and Qwen2 (biases on q, k, v).
fn qwen_parameters(m: &Dims, cfg: &Qwen2_5VlConfig) -> f64 {
    let v = &cfg.vision;
    let patch_dim = v.patch_dim() as f64;
    let merged = (v.spatial_merge_size * v.spatial_merge_size) as f64 * m.dv;
    let out = v.out_hidden_size as f64;
    let block = 2.0 * m.dv // norm1, norm2
        + m.dv * 3.0 * m.dv + 3.0 * m.dv // qkv with bias
        + m.dv * m.dv + m.dv // proj
        + 2.0 * (m.dv * m.iv + m.iv) // gate, up
        + m.iv * m.dv + m.dv; // down
    let vision = patch_dim * m.dv + m.lv * block
        + m.dv // merger's ln_q
        + merged * merged + merged // mlp.0
        + merged * out + out; // mlp.2
    let qkv_bias = m.h * m.hd + 2.0 * m.kv * m.hd;
    let head = if cfg.tie_word_embeddings {
        0.0
    } else {
        m.v * m.d
    };
    vision + text_parameters(m, qkv_bias, head)
}

/// Parameters of the whole checkpoint (vision tower, projector, language model).
pub fn parameters(cfg: &LlavaConfig) -> f64 {
    ModelDims::llava(cfg).parameters()
}

/// LoRA parameters of `rank` on the language model's seven projections.
pub fn lora_parameters(cfg: &LlavaConfig, rank: usize) -> f64 {
    adapter_parameters(&ModelDims::llava(cfg), rank)
}

/// LoRA parameters of `rank` on the seven projections of `m`'s layers.
pub fn adapter_parameters(m: &ModelDims, rank: usize) -> f64 {
    m.l * m
        .targets()
        .iter()
        .map(|(a, b)| rank as f64 * (a + b))
        .sum::<f64>()
}

/// The bytes one decoder layer's forward leaves in the graph for `n` tokens on the generic path,
/// op by op (module docs). `w`: bytes of the weights' dtype.
fn layer_graph(m: &Dims, s: &StepShape, n: f64, g: f64, t: f64) -> f64 {
    let w = s.weights.bytes();
    // RMSNorm (statistics in f32): x as f32, its square, the normalised f32 rows, their cast
    // back and the product with the weight. Two per layer.
    let rms = 3.0 * n * m.d * F32 + 2.0 * n * m.d * w;
    // A LoRA projection is one node (`kernels::lora_branch`): it keeps `x A^T` (f32) and its
    // output; the input is the previous op's, the dropout mask is drawn again in backward.
    let r = s.lora_rank as f64;
    let lora: f64 = m
        .targets()
        .iter()
        .map(|(_, out)| n * r * F32 + n * out * w)
        .sum();
    // RoPE of q and k written out: x cos, the negated half, the rotated copy, its product with
    // sin, the sum (4.5 head-sized tensors each); v made contiguous.
    let rope = 4.5 * n * (m.h + m.kv) * m.hd * w + n * m.kv * m.hd * w;
    // Scores `[G, H, T, T]`, their f32 copy, scaled, masked, the softmax's shifted scores,
    // exponentials and quotient, and the probabilities cast back: 2 w + 6 f per score.
    let scores = g * m.h * t * t * (2.0 * w + 6.0 * F32);
    // Probabilities times values, and the heads merged into rows.
    let context = 2.0 * n * m.h * m.hd * w;
    // Two residual sums, and SwiGLU written out: -g, exp, +1, 1/., g * that, times up.
    let residual = 2.0 * n * m.d * w;
    let swiglu = 6.0 * n * m.i * w;
    2.0 * rms + lora + rope + scores + context + residual + swiglu + qwen2_extra(m, n, w)
}

/// What Qwen2's attention adds to a LLaMA layer's graph: the q, k, v bias sums (each a new
/// tensor of the projection's size) and, with fewer key/value heads than query heads, the keys
/// and values copied to every query head (`repeat_kv`: `[B, H, T, hd]` each). The same sizes
/// stay in a layer's backward as the bias sums' broadcast gradients ([`layer_backward`]).
fn qwen2_extra(m: &Dims, n: f64, w: f64) -> f64 {
    let bias = if m.qkv_bias {
        n * (m.h + 2.0 * m.kv) * m.hd * w
    } else {
        0.0
    };
    let repeat = if m.kv < m.h {
        2.0 * n * m.h * m.hd * w
    } else {
        0.0
    };
    bias + repeat
}

/// Score-sized f32 gradients alive at once in a layer's backward, at the composed softmax
/// (its shifted scores', exponentials' and quotient's gradients, the max's comparison and the
/// broadcasts between them). Measured on the 7B-width slice (`bench/memory/check.py`,
/// 2026-12-03): 379 MiB at `G = 1, H = 32, T = 702`, i.e. 6.3 tensors of `G H T^2` f32.
const SCORE_GRADIENTS_IN_FLIGHT: f64 = 6.3;

/// What a layer's backward holds beyond its graph at its busiest:
/// - gradients candle computes for the constants the graph multiplies or adds (the store keeps
///   them to the end, as they are not graph nodes): the attention bias broadcast to
///   `[G, H, T, T]` (f32), the RoPE tables broadcast to q and k (cos and sin), the norms'
///   weights broadcast to the rows, the incoming gradient; and the adapters' own gradients;
/// - gradients in flight: the softmax's ([`SCORE_GRADIENTS_IN_FLIGHT`]). A LoRA node's backward
///   (its input dropped again, `[n, in]` f32) runs one projection at a time, after the
///   softmax's gradients are gone, so it does not add to this peak.
fn layer_backward(m: &Dims, s: &StepShape, n: f64, g: f64, t: f64) -> f64 {
    let w = s.weights.bytes();
    let constants = g * m.h * t * t * F32 // attention bias
        + 2.0 * n * (m.h + m.kv) * m.hd * w // cos and sin at q and k
        + 3.0 * n * m.d * w // two norm weights, the incoming gradient
        + if m.qkv_bias { n * (m.h + 2.0 * m.kv) * m.hd * w } else { 0.0 }; // q, k, v biases
    let adapters = s.lora_rank as f64 * m.targets().iter().map(|(i, o)| i + o).sum::<f64>() * F32;
    constants + adapters + SCORE_GRADIENTS_IN_FLIGHT * g * m.h * t * t * F32
}

/// A forward without a graph at its busiest: the attention's scores at the end of the composed
/// softmax (the product and the probabilities in the weights' dtype; the f32 copy, scaled,
/// masked, shifted, exponentials and quotient, alive until the softmax returns) or the MLP
/// (gate, up and two SwiGLU steps), with the layer's input and output rows.
fn no_graph_forward(m: &Dims, s: &StepShape, n: f64, g: f64, t: f64) -> f64 {
    let w = s.weights.bytes();
    let attention = g * m.h * t * t * (2.0 * w + 6.0 * F32);
    let mlp = 4.0 * n * m.i * w;
    attention.max(mlp) + 3.0 * n * m.d * w.max(F32)
}

/// The vision tower on `images` images without a graph.
/// - CLIP (LLaVA, every image of the batch in one forward): one layer's attention (as the
///   decoder's) or MLP rows, whichever is larger, and its rows.
/// - Qwen2.5-VL (one image at a time): a full-attention block's scores over the image's `N`
///   patches (the product's scaled f32 copy, the softmax's f32 output and its cast back:
///   `heads N^2 (8 + w)`; windowed blocks' are smaller) or the MLP's gate, up and SwiGLU rows,
///   with the block's rows (input, norm, `qkv`, the f32 q, k, v and their rotations: `16 N D`
///   f32 at most), and the merged embeddings of the images already done.
fn tower(m: &Dims, images: f64, w: f64) -> f64 {
    match m.tower {
        Tower::Clip { positions: p, .. } => {
            let n = images * p;
            let attention = images * m.hv * p * p * (2.0 * w + 6.0 * F32);
            (attention).max(2.0 * n * m.iv * w) + 3.0 * n * m.dv * w.max(F32)
        }
        Tower::Qwen {
            patches: n,
            image_tokens,
            ..
        } => {
            let attention = m.hv * n * n * (2.0 * F32 + w);
            let mlp = 3.0 * n * m.iv * w;
            attention.max(mlp) + 16.0 * n * m.dv * F32 + images * image_tokens * m.d * w
        }
    }
}

/// The head on `rows` scored rows: the bf16 logits, their f32 copy and log-softmax's steps
/// (four `[rows, V]` f32), with a graph; half of that without.
fn head(m: &Dims, s: &StepShape, rows: f64, graph: bool) -> f64 {
    let per = rows * m.v * (s.weights.bytes() + 4.0 * F32);
    if graph {
        per
    } else {
        per / 2.0
    }
}

/// The prediction for `cfg` and `shape`.
pub fn predict(cfg: &LlavaConfig, shape: &StepShape) -> Prediction {
    predict_for(&ModelDims::llava(cfg), shape)
}

/// The prediction for the model `m` and `shape`.
pub fn predict_for(m: &ModelDims, shape: &StepShape) -> Prediction {
    let m = m.clone();
    let s = shape;
    let w = s.weights.bytes();
    let (seqs, t) = (s.sequences as f64, s.tokens as f64);
    let group = s.group() as f64;
    let lora = adapter_parameters(&m, s.lora_rank);

    let persistent = vec![
        item(
            "weights",
            m.parameters * w,
            format!("{:.0} parameters x {w} bytes", m.parameters),
        ),
        item(
            "LoRA: values, gradient sum, AdamW m and v",
            4.0 * lora * F32,
            format!("4 x {lora:.0} parameters x 4 bytes (f32)"),
        ),
        item(
            "pixels of the micro-batch's images",
            s.images as f64 * m.pixel_values() * F32,
            match m.tower {
                Tower::Clip { .. } => "images x 3 x side^2 x 4",
                Tower::Qwen { .. } => "images x patches x patch_dim x 4",
            },
        ),
    ];

    // The reference pass: LoRA off, no graph, group by group.
    let n_ref = group * t;
    let reference = Phase {
        name: "reference".into(),
        items: vec![
            item(
                "decoder layer, no graph",
                no_graph_forward(&m, s, n_ref, group, t),
                "max(attention G H T^2 (2 w + 24), MLP 4 G T I w) + 3 G T D x 4",
            ),
            item(
                "head on the scored rows, no graph",
                head(&m, s, group * s.response_tokens as f64, false),
                "G x response tokens x V x (w + 4) / 2",
            ),
        ],
    };

    // The vision tower runs before the decoder, on the images of one group (the batched
    // policy: all of them) and is done when the decoder starts.
    let tower_images = if s.in_pieces() {
        group
    } else {
        s.images as f64
    };
    let vision = Phase {
        name: "vision tower".into(),
        items: vec![item(
            "one tower layer, no graph",
            tower(&m, tower_images, w),
            match m.tower {
                Tower::Clip { .. } => "images x heads x P^2 x (2 w + 24), or the MLP rows",
                Tower::Qwen { .. } => {
                    "one image: heads x N^2 x (8 + w) or 3 N I w, + 16 N D x 4, + images' embeddings"
                }
            },
        )],
    };
    let mut phases = vec![vision, reference];
    if s.in_pieces() {
        // Every sequence's layer inputs (with checkpointing) or its first layer's input and
        // final hidden states (without) stay until every group's backward has run.
        let per_seq = if s.gradient_checkpointing {
            (m.l + 1.0) * t * m.d * w
        } else {
            2.0 * t * m.d * w
        };
        let kept = item(
            "kept per sequence, all sequences",
            seqs * per_seq,
            if s.gradient_checkpointing {
                "S x (L + 1) x T x D x w (each layer's input and the last output)"
            } else {
                "S x 2 x T x D x w (embeddings and final hidden states)"
            },
        );
        let n = group * t;
        let chunk = if s.logprob_chunk == 0 {
            group * s.response_tokens as f64
        } else {
            (s.logprob_chunk as f64).min(group * s.response_tokens as f64)
        };
        let (graph, grads) = if s.gradient_checkpointing {
            (layer_graph(&m, s, n, group, t), 0.0)
        } else {
            (m.l * layer_graph(&m, s, n, group, t), lora * F32)
        };
        let layers = if s.gradient_checkpointing { 1.0 } else { m.l };
        let in_flight = SCORE_GRADIENTS_IN_FLIGHT * group * m.h * t * t * F32;
        phases.push(Phase {
            name: "policy forward (no graph)".into(),
            items: vec![
                kept.clone(),
                item(
                    "decoder layer, no graph",
                    no_graph_forward(&m, s, n, group, t)
                        + m.targets()
                            .iter()
                            .map(|(i, _)| n * i * F32)
                            .fold(0.0, f64::max),
                    "as the reference pass, plus one adapter's f32 input",
                ),
            ],
        });
        phases.push(Phase {
            name: "policy backward, in pieces".into(),
            items: vec![
                kept,
                item(
                    "gradient at the final hidden states",
                    2.0 * n * m.d * w,
                    "2 x G x T x D x w (the gradient and its running sum)",
                ),
                item(
                    if s.gradient_checkpointing {
                        "one decoder layer's graph, recomputed"
                    } else {
                        "every decoder layer's graph"
                    },
                    graph,
                    "layer_graph(G T tokens): norms, LoRA projections, RoPE, scores, SwiGLU",
                ),
                item(
                    "that backward: constants' gradients, adapters', in flight",
                    // Without checkpointing the store holds every layer's constants' gradients
                    // until the whole backward is done.
                    layers * (layer_backward(&m, s, n, group, t) - in_flight) + in_flight + grads,
                    "layers x (bias G H T^2 x 4, RoPE 2 G T (H + KV) hd w) + 6.3 G H T^2 x 4",
                ),
            ],
        });
        // The head's pieces run before the layers' backward, with the kept inputs alive.
        phases.push(Phase {
            name: "head backward, in pieces".into(),
            items: vec![
                item(
                    "kept per sequence, all sequences",
                    seqs * per_seq,
                    "as above",
                ),
                item(
                    "head graph of one chunk, and its gradients",
                    2.0 * head(&m, s, chunk, true),
                    "2 x chunk rows x V x (w + 16)",
                ),
            ],
        });
    } else {
        let n = seqs * t;
        phases.push(Phase {
            name: "policy, one batched graph".into(),
            items: vec![
                item(
                    "every decoder layer's graph",
                    m.l * layer_graph(&m, s, n, seqs, t),
                    "L x layer_graph(S T tokens)",
                ),
                item(
                    "head graph on the scored rows",
                    head(&m, s, seqs * s.response_tokens as f64, true),
                    "S x response tokens x V x (w + 16)",
                ),
                item(
                    "backward: constants' gradients in every layer, in flight",
                    m.l * (layer_backward(&m, s, n, seqs, t)
                        - SCORE_GRADIENTS_IN_FLIGHT * seqs * m.h * t * t * F32)
                        + SCORE_GRADIENTS_IN_FLIGHT * seqs * m.h * t * t * F32,
                    "L x (bias, RoPE, adapters) + 6.3 S H T^2 x 4",
                ),
            ],
        });
    }
    Prediction {
        shape: shape.clone(),
        persistent,
        phases,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seven_b() -> LlavaConfig {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/model_configs/llava-1.5-7b.config.json");
        LlavaConfig::from_file(&path).unwrap()
    }

    #[test]
    fn llava_7b_has_its_published_parameter_count() {
        // transformers 5.24's LlavaForConditionalGeneration on this config (meta device)
        // holds 7,063,427,072 parameters (fixtures/model_configs/README.md).
        let p = parameters(&seven_b());
        assert_eq!(p, 7_063_427_072.0, "{p}");
        // LoRA r 64 on the seven projections of 32 layers: 32 x 64 x (4 (4096 + 4096)
        // + 2 (4096 + 11008) + (11008 + 4096)).
        assert_eq!(lora_parameters(&seven_b(), 64), 159_907_840.0);
    }

    fn qwen_7b(width: usize, height: usize) -> ModelDims {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/model_configs/qwen2.5-vl-7b.config.json");
        let raw: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cfg = Qwen2_5VlConfig::from_value(&raw).unwrap();
        ModelDims::qwen2_5_vl(&cfg, &QwenImageProcessor::default(), width, height).unwrap()
    }

    fn shape(tokens: usize, images: usize, group: usize) -> StepShape {
        StepShape {
            sequences: 5,
            tokens,
            response_tokens: 64,
            images,
            lora_rank: 64,
            lora_targets: 7,
            lora_dropout: true,
            weights: WeightDtype::Bf16,
            sequence_group: group,
            gradient_checkpointing: group > 0,
            logprob_chunk: 0,
        }
    }

    #[test]
    fn qwen_7b_counts_match_transformers_and_hand_counts() {
        let m = qwen_7b(640, 480);
        // transformers 5.24's Qwen2_5_VLForConditionalGeneration on this config (meta device):
        // 8,292,166,656 parameters, 676,550,144 of them in the vision tower and merger.
        assert_eq!(m.parameters(), 8_292_166_656.0);
        // LoRA r 64 on 28 layers: 64 x (q 3584+3584, k and v 3584+512 each, o 3584+3584,
        // gate and up 3584+18944 each, down 18944+3584) = 64 x 90112 per layer.
        assert_eq!(adapter_parameters(&m, 64), 28.0 * 64.0 * 90_112.0);
        // Qwen2VLImageProcessorPil (defaults) gives a 640 x 480 photo image_grid_thw
        // [1, 34, 46]: 1564 patches, 391 tokens after the 2 x 2 merge.
        assert_eq!(m.image_tokens(), 391);
        assert!(matches!(m.tower, Tower::Qwen { patches, .. } if patches == 1564.0));
        // A 10 x 10 image is scaled up to 56 x 56: 4 patches a side, 4 tokens.
        assert_eq!(qwen_7b(10, 10).image_tokens(), 4);
        assert!(ModelDims::qwen2_5_vl(
            &Qwen2_5VlConfig::from_value(&serde_json::json!({"model_type": "qwen2_5_vl"})).unwrap(),
            &QwenImageProcessor::default(),
            1,
            201
        )
        .is_err());
    }

    #[test]
    fn qwen_tower_and_layer_extras_match_hand_counts() {
        let m = qwen_7b(640, 480);
        // One image through the frozen tower, bf16: a full-attention block's scores
        // 16 heads x 1564^2 x (8 + 2) = 391,375,360 bytes, its rows 16 x 1564 x 1280 x 4 =
        // 128,122,880, and the image's merged embeddings 391 x 3584 x 2 = 2,802,688.
        assert_eq!(
            tower(&m, 1.0, 2.0),
            391_375_360.0 + 128_122_880.0 + 2_802_688.0
        );
        let p = predict_for(&m, &shape(515, 5, 1));
        let vision = p.phases.iter().find(|p| p.name == "vision tower").unwrap();
        assert_eq!(vision.bytes(), 522_300_928.0);
        // q, k, v bias sums on 515 tokens: 515 x (28 + 2 x 4) x 128 x 2 = 4,746,240 bytes;
        // keys and values repeated to 28 heads: 2 x 515 x 28 x 128 x 2 = 7,383,040.
        assert_eq!(qwen2_extra(&m, 515.0, 2.0), 4_746_240.0 + 7_383_040.0);
        // LLaVA (no biases, as many KV heads as heads) adds nothing.
        assert_eq!(qwen2_extra(&ModelDims::llava(&seven_b()), 515.0, 2.0), 0.0);
        // Persistent: bf16 weights, four f32 copies of the adapter, the images' f32 patches
        // (5 x 1564 x 1176 x 4 = 36,785,280 bytes).
        let persistent = 8_292_166_656.0 * 2.0 + 4.0 * 161_480_704.0 * 4.0 + 36_785_280.0;
        assert_eq!(p.persistent_bytes(), persistent);
    }

    #[test]
    fn qwen_7b_step_fits_one_80_gb_device_only_in_pieces() {
        let m = qwen_7b(640, 480);
        let batched = predict_for(&m, &shape(515, 5, 0)).peak_bytes();
        let pieces = predict_for(&m, &shape(515, 5, 1)).peak_bytes();
        let gib = (1u64 << 30) as f64;
        assert!(pieces < batched / 2.0, "{pieces} vs {batched}");
        assert!(
            pieces > 18.0 * gib && pieces < 40.0 * gib,
            "{}",
            pieces / gib
        );
    }
}
