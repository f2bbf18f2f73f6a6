//! `misp score` and `misp generate`: a LLaVA checkpoint (+ PEFT adapter) over a JSONL file.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};
use misp::files::{write_atomic, write_json_atomic};
use misp::infer;
use misp::model::vlm::{Vlm, VlmOptions};
use serde_json::json;

#[derive(Clone, Copy, ValueEnum, Debug)]
pub enum Dtype {
    F32,
    Bf16,
}

impl Dtype {
    fn candle(self) -> candle_core::DType {
        match self {
            Dtype::F32 => candle_core::DType::F32,
            Dtype::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// What both commands share: the model and how it sees images and prompts.
#[derive(Args, Debug)]
pub struct ModelArgs {
    /// LLaVA checkpoint folder in HF layout (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Input JSONL; image paths are relative to the current directory unless absolute.
    #[arg(long)]
    data: PathBuf,
    /// Output JSONL (written atomically; `OUT.config.json` records the settings).
    #[arg(long)]
    out: PathBuf,
    /// Weights' dtype (LoRA and log-probs stay f32).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Dtype,
    /// Pad images to a square with the mean colour before resizing (original LLaVA-1.5).
    #[arg(long)]
    pad_to_square: bool,
    /// Prompt template; must hold `<image>` once and `{prompt}`.
    #[arg(long, default_value = misp::model::processor::DEFAULT_TEMPLATE)]
    template: String,
    /// Sequences per forward.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args, Debug)]
pub struct ScoreArgs {
    #[command(flatten)]
    model: ModelArgs,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Stop after this many new tokens (or at EOS).
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
}

fn load(a: &ModelArgs) -> anyhow::Result<Vlm> {
    let opts = VlmOptions {
        dtype: a.dtype.candle(),
        pad_to_square: a.pad_to_square,
        template: Some(a.template.clone()),
        ..VlmOptions::default()
    };
    Vlm::load(&a.model, a.adapter.as_deref(), &opts)
        .with_context(|| format!("loading {}", a.model.display()))
}

fn config(a: &ModelArgs, command: &str, extra: serde_json::Value) -> serde_json::Value {
    json!({
        "command": command,
        "model": a.model,
        "adapter": a.adapter,
        "data": a.data,
        "dtype": format!("{:?}", a.dtype).to_lowercase(),
        "pad_to_square": a.pad_to_square,
        "template": a.template,
        "batch_size": a.batch_size,
        "extra": extra,
    })
}

fn write_rows<T: serde::Serialize>(out: &Path, rows: &[T]) -> anyhow::Result<()> {
    let mut text = String::new();
    for r in rows {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    write_atomic(out, text.as_bytes())?;
    Ok(())
}

fn config_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".config.json");
    out.with_file_name(name)
}

pub fn score(args: ScoreArgs) -> anyhow::Result<()> {
    let a = &args.model;
    let rows = infer::read_rows(&a.data, true)?;
    let vlm = load(a)?;
    let out = infer::score(&vlm, &rows, a.batch_size, !a.quiet)?;
    write_rows(&a.out, &out)?;
    write_json_atomic(&config_path(&a.out), &config(a, "score", json!({})))?;
    eprintln!("scored {} rows -> {}", out.len(), a.out.display());
    Ok(())
}

pub fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let a = &args.model;
    let rows = infer::read_rows(&a.data, false)?;
    let vlm = load(a)?;
    let out = infer::generate(&vlm, &rows, a.batch_size, args.max_new_tokens, !a.quiet)?;
    write_rows(&a.out, &out)?;
    let extra = json!({"max_new_tokens": args.max_new_tokens});
    write_json_atomic(&config_path(&a.out), &config(a, "generate", extra))?;
    eprintln!("generated {} answers -> {}", out.len(), a.out.display());
    Ok(())
}
