//! `misp score` and `misp generate`: a LLaVA or Qwen2.5-VL checkpoint (+ PEFT adapter) over a
//! JSONL file.

use std::path::{Path, PathBuf};
use std::time::Instant;

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
    F16,
}

impl Dtype {
    fn candle(self) -> candle_core::DType {
        match self {
            Dtype::F32 => candle_core::DType::F32,
            Dtype::Bf16 => candle_core::DType::BF16,
            Dtype::F16 => candle_core::DType::F16,
        }
    }
}

/// The model and how it sees images and prompts: shared by `score`, `generate` and the model
/// runs of `misp eval` (which have their own inputs and outputs, hence the split from
/// [`IoArgs`]).
///
/// The group clap derives for this struct is named in `--model` explicitly: clap's derive
/// leaves the group of a struct with a flattened field (`runtime`) empty, so a flattened
/// `Option<ModelArgs>` would never be `Some` (clap-rs/clap#4697 upstream); with `--model` in it, the
/// option is present exactly when `--model` is given.
#[derive(Args, Debug)]
#[group(arg = "model")]
pub(crate) struct ModelArgs {
    /// Checkpoint folder in HF layout (config.json, safetensors, tokenizer.json): LLaVA or
    /// Qwen2.5-VL, as config.json's `model_type` says.
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub(crate) adapter: Option<PathBuf>,
    /// Weights' dtype (LoRA and log-probs stay f32).
    #[arg(long, value_enum, default_value = "f32")]
    pub(crate) dtype: Dtype,
    /// Pad images to a square with the mean colour before resizing (original LLaVA-1.5; LLaVA
    /// only).
    #[arg(long)]
    pub(crate) pad_to_square: bool,
    /// Prompt template; must hold `<image>` once and `{prompt}` (LLaVA only: Qwen2.5-VL uses
    /// its checkpoint's chat template).
    #[arg(long, default_value = misp::model::llava::processor::DEFAULT_TEMPLATE)]
    pub(crate) template: String,
    /// Sequences per forward.
    #[arg(long, default_value_t = 8)]
    pub(crate) batch_size: usize,
    /// Folder that image paths in the input must stay inside; absolute paths are admitted when
    /// they lie under it (`--image-root /` admits all). Without it, `score` / `generate` take
    /// paths relative to the current directory or absolute, and `eval` relative names under
    /// `--images` only.
    #[arg(long)]
    pub(crate) image_root: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) runtime: crate::runtime::RuntimeArgs,
}

impl ModelArgs {
    /// The checkpoint (+ adapter) with these options, on `--device`.
    pub(crate) fn load(&self) -> anyhow::Result<Vlm> {
        let device = self.runtime.apply()?;
        let opts = VlmOptions {
            dtype: self.dtype.candle(),
            pad_to_square: self.pad_to_square,
            template: Some(self.template.clone()),
            device,
        };
        Vlm::load(&self.model, self.adapter.as_deref(), &opts).with_context(|| {
            match &self.adapter {
                // The adapter's own errors name its files; this says which pair was being loaded.
                Some(a) => format!(
                    "loading {} with the adapter {}",
                    self.model.display(),
                    a.display()
                ),
                None => format!("loading {}", self.model.display()),
            }
        })
    }

    /// The resolved settings, for a run's config file. Written before the model loads, so the
    /// backbone comes from `config.json` here (unreadable: left to the load's own error); a
    /// Qwen2.5-VL folder prompts with its checkpoint's chat template, not `--template`.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        let model_type = misp::model::vlm::model_type(&self.model).ok();
        let template = match model_type.as_deref() {
            Some("qwen2_5_vl") => json!("the checkpoint's chat template"),
            _ => json!(self.template),
        };
        json!({
            "model": self.model,
            "model_type": model_type,
            "adapter": self.adapter,
            "dtype": format!("{:?}", self.dtype).to_lowercase(),
            "pad_to_square": self.pad_to_square,
            "template": template,
            "batch_size": self.batch_size,
            "image_root": self.image_root,
            "device": self.runtime.device,
            "kernels": self.runtime.kernels.map(|k| format!("{k:?}").to_lowercase()),
        })
    }
}

/// Input and output of `score` and `generate`.
#[derive(Args, Debug)]
pub struct IoArgs {
    /// Input JSONL; image paths are relative to the current directory unless absolute (or
    /// under --image-root).
    #[arg(long)]
    data: PathBuf,
    /// Output JSONL (written atomically; `OUT.config.json` records the settings, and for
    /// `generate` its timings, model loading apart).
    #[arg(long)]
    out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args, Debug)]
pub struct ScoreArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    io: IoArgs,
    /// Exit 0 even when some rows score NaN or infinite (written as null); by default such rows
    /// are named and the command fails.
    #[arg(long)]
    keep_going: bool,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    io: IoArgs,
    /// Stop after this many new tokens (or at EOS).
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
}

fn config(
    a: &ModelArgs,
    io: &IoArgs,
    command: &str,
    extra: serde_json::Value,
) -> serde_json::Value {
    let mut c = a.to_json();
    c["command"] = json!(command);
    c["data"] = json!(io.data);
    c["extra"] = extra;
    c
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

fn image_root(a: &ModelArgs) -> anyhow::Result<Option<misp::data::paths::DatasetRoot>> {
    a.image_root
        .as_deref()
        .map(misp::data::paths::DatasetRoot::new)
        .transpose()
        .context("--image-root")
}

pub fn score(args: ScoreArgs) -> anyhow::Result<()> {
    let (a, io) = (&args.model, &args.io);
    a.runtime.apply()?; // a device that cannot be had fails before anything is read
    let rows = infer::read_rows(&io.data, true, image_root(a)?.as_ref())?;
    let vlm = a.load()?;
    let out = infer::score(&vlm, &rows, a.batch_size, !io.quiet)?;
    // Written in full either way: a NaN row is evidence, not something to drop.
    write_rows(&io.out, &out)?;
    let extra = json!({"keep_going": args.keep_going});
    write_json_atomic(&config_path(&io.out), &config(a, io, "score", extra))?;
    let bad: Vec<&str> = out
        .iter()
        .filter(|r| !r.logp.is_finite())
        .map(|r| r.id.as_str())
        .collect();
    if !bad.is_empty() {
        let shown = bad.iter().take(10).copied().collect::<Vec<_>>().join(", ");
        let message = format!(
            "{} of {} rows have a non-finite log-prob (written as null): ids {shown}{}; the model's weights or these inputs give NaN/inf",
            bad.len(),
            out.len(),
            if bad.len() > 10 { ", ..." } else { "" }
        );
        if !args.keep_going {
            anyhow::bail!("{message} (pass --keep-going to accept)");
        }
        eprintln!("warning: {message}");
    }
    eprintln!("scored {} rows -> {}", out.len(), io.out.display());
    Ok(())
}

pub fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let (a, io) = (&args.model, &args.io);
    a.runtime.apply()?; // a device that cannot be had fails before anything is read
    let rows = infer::read_rows(&io.data, false, image_root(a)?.as_ref())?;
    let loading = Instant::now();
    let vlm = a.load()?;
    let load_s = loading.elapsed().as_secs_f64();
    // Timed in-process, model loading excluded, so that a benchmark (bench/serve) can compare
    // the answering alone: image decoding and preprocessing, prompts, the batched forwards,
    // detokenizing.
    let (answering, cpu_before) = (Instant::now(), process_cpu_s());
    let out = infer::generate(&vlm, &rows, a.batch_size, args.max_new_tokens, !io.quiet)?;
    let generate_s = answering.elapsed().as_secs_f64();
    let cpu_s = process_cpu_s()
        .zip(cpu_before)
        .map(|(after, before)| after - before);
    write_rows(&io.out, &out)?;
    let extra = json!({"max_new_tokens": args.max_new_tokens});
    let mut c = config(a, io, "generate", extra);
    c["timings"] = json!({
        "rows": out.len(),
        "load_s": load_s,
        "generate_s": generate_s,
        "rows_per_s": out.len() as f64 / generate_s.max(1e-9),
        "cpu_s": cpu_s,
    });
    write_json_atomic(&config_path(&io.out), &c)?;
    eprintln!("generated {} answers -> {}", out.len(), io.out.display());
    Ok(())
}

/// CPU seconds this process has used so far, all threads, user + system (Linux: utime + stime
/// of `/proc/self/stat`, in its 100 Hz ticks); `None` elsewhere. On a shared machine the CPU
/// time of a run moves less with the load than its wall time does.
fn process_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let field = |i: usize| rest.split_whitespace().nth(i)?.parse::<f64>().ok();
    // utime and stime are fields 14 and 15 of the line; `rest` starts at field 3.
    Some((field(11)? + field(12)?) / 100.0)
}
