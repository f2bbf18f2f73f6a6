//! `misp bench memory`: the predicted peak memory of one training step for a LLaVA or a
//! Qwen2.5-VL config (weights, LoRA and AdamW state, kept activations, the backward's
//! transients), from the formulas of `misp::train::memory`, as a table.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use misp::model::llava::LlavaConfig;
use misp::model::qwen2_5_vl::image_processor::QwenImageProcessor;
use misp::model::qwen2_5_vl::Qwen2_5VlConfig;
use misp::train::memory::{predict_for, ModelDims, StepShape, WeightDtype};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Dtype {
    F32,
    Bf16,
    F16,
}

#[derive(Args)]
pub struct BenchMemoryArgs {
    /// A LLaVA or Qwen2.5-VL config.json (a checkpoint's, or one without weights such as
    /// fixtures/model_configs/llava-1.5-7b.config.json or qwen2.5-vl-7b.config.json); the
    /// backbone comes from its `model_type`. For Qwen2.5-VL the image processor is read from the
    /// same folder (processor_config.json or preprocessor_config.json), transformers' defaults
    /// when neither is there.
    #[arg(long)]
    model_config: PathBuf,
    /// Tokens per sequence, image tokens included [default: the image's tokens + 124 of text:
    /// 700 for LLaVA-1.5, 515 for Qwen2.5-VL at 640x480].
    #[arg(long)]
    tokens: Option<usize>,
    /// Qwen2.5-VL: every image's size, WIDTHxHEIGHT, resized by the processor's smart_resize
    /// into the image tokens (LLaVA's images are always its tower's square).
    #[arg(long, default_value = "640x480", value_parser = parse_size)]
    image: (usize, usize),
    /// Sequences per micro-batch (K + 2 per record: 5 at the paper's K = 3).
    #[arg(long, default_value_t = 5)]
    sequences: usize,
    /// Scored tokens per sequence (the response and its EOS).
    #[arg(long, default_value_t = 64)]
    response_tokens: usize,
    /// Base weights' dtype.
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: Dtype,
    #[arg(long, default_value_t = 64)]
    lora_rank: usize,
    /// No LoRA dropout (its masks take memory in the graph).
    #[arg(long)]
    no_lora_dropout: bool,
    /// Activation checkpointing per decoder layer.
    #[arg(long)]
    checkpointing: bool,
    /// Sequences per backward piece (0: all).
    #[arg(long, default_value_t = 0)]
    sequence_group: usize,
    /// Scored rows per piece of the head's gradient (0: all).
    #[arg(long, default_value_t = 0)]
    logprob_chunk: usize,
    /// Print the prediction as JSON too.
    #[arg(long)]
    json: bool,
}

/// Text tokens of a sequence beside its image: LLaVA-1.5's 700 tokens less its 576 image tokens
/// (the template, a prompt and a response of about 60 tokens each).
const TEXT_TOKENS: usize = 124;

fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("{s:?}: expected WIDTHxHEIGHT, e.g. 640x480"))?;
    let side = |v: &str| v.trim().parse::<usize>().ok().filter(|&n| n > 0);
    match (side(w), side(h)) {
        (Some(w), Some(h)) => Ok((w, h)),
        _ => Err(format!(
            "{s:?}: expected two positive pixel counts, e.g. 640x480"
        )),
    }
}

/// The model's sizes from the config's `model_type`.
fn model_dims(path: &Path, (width, height): (usize, usize)) -> anyhow::Result<ModelDims> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let raw: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    match raw.get("model_type").and_then(|v| v.as_str()) {
        Some("qwen2_5_vl") => {
            let cfg = Qwen2_5VlConfig::from_value(&raw)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let dir = path.parent().unwrap_or(Path::new("."));
            let images = QwenImageProcessor::from_dir(dir)?;
            ModelDims::qwen2_5_vl(&cfg, &images, width, height)
                .map_err(|e| anyhow::anyhow!("--image {width}x{height}: {e}"))
        }
        Some("llava") | None => {
            let cfg = LlavaConfig::from_file(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Ok(ModelDims::llava(&cfg))
        }
        Some(other) => bail!(
            "{}: model_type {other:?}: misp bench memory knows \"llava\" and \"qwen2_5_vl\"",
            path.display()
        ),
    }
}

fn gib(b: f64) -> String {
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

pub fn run(a: BenchMemoryArgs) -> anyhow::Result<()> {
    let m = model_dims(&a.model_config, a.image)?;
    let tokens = a.tokens.unwrap_or(m.image_tokens() + TEXT_TOKENS);
    if tokens < m.image_tokens() + a.response_tokens {
        bail!(
            "--tokens {tokens} cannot hold the image's {} tokens and {} response tokens",
            m.image_tokens(),
            a.response_tokens
        );
    }
    let shape = StepShape {
        sequences: a.sequences,
        tokens,
        response_tokens: a.response_tokens,
        images: a.sequences,
        lora_rank: a.lora_rank,
        lora_targets: 7,
        lora_dropout: !a.no_lora_dropout,
        weights: match a.dtype {
            Dtype::F32 => WeightDtype::F32,
            Dtype::Bf16 => WeightDtype::Bf16,
            Dtype::F16 => WeightDtype::F16,
        },
        sequence_group: a.sequence_group,
        gradient_checkpointing: a.checkpointing,
        logprob_chunk: a.logprob_chunk,
    };
    let p = predict_for(&m, &shape);
    let image = if m.model_type == "qwen2_5_vl" {
        format!("{}x{} image", a.image.0, a.image.1)
    } else {
        "square image".into()
    };
    println!(
        "misp bench memory: {} ({}, {} layers, hidden {}), {} sequences x {} tokens ({} of a {image}, {} scored), {:?} weights, LoRA r {}, checkpointing {}, sequence group {}, logprob chunk {}; generic path",
        a.model_config.display(),
        m.model_type,
        m.layers(),
        m.hidden_size(),
        a.sequences,
        tokens,
        m.image_tokens(),
        a.response_tokens,
        a.dtype,
        a.lora_rank,
        a.checkpointing,
        a.sequence_group,
        a.logprob_chunk
    );
    println!("\n| part | bytes | formula |\n|---|---|---|");
    for i in &p.persistent {
        println!("| {} | {} | {} |", i.name, gib(i.bytes), i.formula);
    }
    println!("| **persistent** | **{}** | |", gib(p.persistent_bytes()));
    for phase in &p.phases {
        println!("| *{}* | {} | |", phase.name, gib(phase.bytes()));
        for i in &phase.items {
            println!("| &nbsp; {} | {} | {} |", i.name, gib(i.bytes), i.formula);
        }
    }
    println!(
        "| **predicted peak** ({}) | **{}** | persistent + the largest phase |",
        p.peak_phase().name,
        gib(p.peak_bytes())
    );
    if a.json {
        let mut v = serde_json::to_value(&p)?;
        v["peak_bytes"] = serde_json::json!(p.peak_bytes());
        v["peak_phase"] = serde_json::json!(p.peak_phase().name);
        println!("{v}");
    }
    Ok(())
}
