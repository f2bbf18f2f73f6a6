//! `misp bench memory`: the predicted peak memory of one training step for a LLaVA config
//! (weights, LoRA and AdamW state, kept activations, the backward's transients), from the
//! formulas of `misp::train::memory`, as a table.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use misp::model::llava::LlavaConfig;
use misp::train::memory::{predict, StepShape, WeightDtype};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Dtype {
    F32,
    Bf16,
    F16,
}

#[derive(Args)]
pub struct BenchMemoryArgs {
    /// A LLaVA config.json (a checkpoint's, or one without weights such as
    /// fixtures/model_configs/llava-1.5-7b.config.json).
    #[arg(long)]
    model_config: PathBuf,
    /// Tokens per sequence, image tokens included.
    #[arg(long, default_value_t = 700)]
    tokens: usize,
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

fn gib(b: f64) -> String {
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

pub fn run(a: BenchMemoryArgs) -> anyhow::Result<()> {
    let cfg = LlavaConfig::from_file(&a.model_config)
        .with_context(|| format!("reading {}", a.model_config.display()))?;
    let shape = StepShape {
        sequences: a.sequences,
        tokens: a.tokens,
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
    let p = predict(&cfg, &shape);
    println!(
        "misp bench memory: {} ({} layers, hidden {}), {} sequences x {} tokens ({} scored), {:?} weights, LoRA r {}, checkpointing {}, sequence group {}, logprob chunk {}; generic path",
        a.model_config.display(),
        cfg.text_config.num_hidden_layers,
        cfg.text_config.hidden_size,
        a.sequences,
        a.tokens,
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
