//! The memory of one training step, predicted from a LLaVA config: what `misp bench memory`
//! prints, and what says whether a run fits a device before it is started.
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
//! The formulas were checked against the peak RSS `misp train` measures per step on the CPU
//! (`memory/step_peak_rss_mib` in its metrics); `bench/memory_check.py` runs that check.

use candle_core::DType;
use serde::Serialize;

use crate::model::llava::LlavaConfig;

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

/// Sizes of the model that the formulas read.
struct Dims {
    /// Text: layers, hidden, intermediate, heads, KV heads, head dim, vocabulary.
    l: f64,
    d: f64,
    i: f64,
    h: f64,
    kv: f64,
    hd: f64,
    v: f64,
    /// Vision: layers, hidden, intermediate, heads, positions per image (patches + CLS).
    lv: f64,
    dv: f64,
    iv: f64,
    hv: f64,
    pv: f64,
    /// Pixels per image side.
    side: f64,
}

impl Dims {
    fn of(cfg: &LlavaConfig) -> Self {
        let (t, v) = (&cfg.text_config, &cfg.vision_config);
        let g = v.grid() as f64;
        Dims {
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
            pv: g * g + 1.0,
            side: v.image_size as f64,
        }
    }

    /// `(in, out)` of the seven LoRA targets of a decoder layer.
    fn targets(&self) -> [(f64, f64); 7] {
        let (d, i, q, kv) = (self.d, self.i, self.h * self.hd, self.kv * self.hd);
        [(d, q), (d, kv), (d, kv), (q, d), (d, i), (d, i), (i, d)]
    }
}

const F32: f64 = 4.0;

/// Parameters of the whole checkpoint (vision tower, projector, language model), as misp
/// loads them (every vision layer, though LLaVA reads the one before the last).
pub fn parameters(cfg: &LlavaConfig) -> f64 {
    let m = Dims::of(cfg);
    let t = &cfg.text_config;
    let c = cfg.vision_config.num_channels as f64;
    let p = cfg.vision_config.patch_size as f64;
    let vision = c * p * p * m.dv // patch embedding (no bias)
        + m.dv // class embedding
        + m.pv * m.dv // position embedding
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
    let layer = 2.0 * m.d // two RMSNorm weights
        + m.targets().iter().map(|(a, b)| a * b).sum::<f64>()
        + attn_bias
        + mlp_bias;
    let head = if t.tie_word_embeddings {
        0.0
    } else {
        m.v * m.d
    };
    let text = m.v * m.d + m.l * layer + m.d + head;
    vision + projector + text
}

/// LoRA parameters of `rank` on the language model's seven projections.
pub fn lora_parameters(cfg: &LlavaConfig, rank: usize) -> f64 {
    let m = Dims::of(cfg);
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
    2.0 * rms + lora + rope + scores + context + residual + swiglu
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
        + 3.0 * n * m.d * w; // two norm weights, the incoming gradient
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

/// The vision tower on `images` images without a graph: one layer's attention (as the
/// decoder's) or MLP rows, whichever is larger, and its rows.
fn tower(m: &Dims, images: f64, w: f64) -> f64 {
    let n = images * m.pv;
    let attention = images * m.hv * m.pv * m.pv * (2.0 * w + 6.0 * F32);
    (attention).max(2.0 * n * m.iv * w) + 3.0 * n * m.dv * w.max(F32)
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
    let m = Dims::of(cfg);
    let s = shape;
    let w = s.weights.bytes();
    let (seqs, t) = (s.sequences as f64, s.tokens as f64);
    let group = s.group() as f64;
    let lora = lora_parameters(cfg, s.lora_rank);

    let persistent = vec![
        item(
            "weights",
            parameters(cfg) * w,
            format!("{:.0} parameters x {w} bytes", parameters(cfg)),
        ),
        item(
            "LoRA: values, gradient sum, AdamW m and v",
            4.0 * lora * F32,
            format!("4 x {lora:.0} parameters x 4 bytes (f32)"),
        ),
        item(
            "pixels of the micro-batch's images",
            s.images as f64 * 3.0 * m.side * m.side * F32,
            "images x 3 x side^2 x 4",
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
            "images x heads x P^2 x (2 w + 24), or the MLP rows",
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
}
