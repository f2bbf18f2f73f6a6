//! `misp train`: Stage 2, LoRA on a LLaVA or Qwen2.5-VL checkpoint with the MISP-DPO objective.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use misp::train::{train, TrainConfig, TrainInputs};

#[derive(Args, Debug)]
#[command(
    after_help = "Variants ship as configs in configs/ (misp, misp-exact, misp-sample, random, \
    similarity, dpo, mdpo, text+noise, noise+misp, crop+noise+misp). Keys not given take \
    the paper's settings where it gives them (beta 0.5, lambda 1, K 3, lr 1e-5, LoRA r 64 / alpha \
    128, batch 32) and misp's own otherwise (LoRA dropout 0.05, micro-batch 4, cosine schedule \
    with warmup 0.1, AdamW weight decay 0.05, clipping 1.0, 3 epochs; docs/design.md §9)."
)]
pub struct TrainArgs {
    /// Run config (TOML); see configs/.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Checkpoint folder in HF layout: LLaVA or Qwen2.5-VL (config.json's `model_type`).
    #[arg(long)]
    model: PathBuf,
    /// Preference records: RLHF-V .parquet, TRL .jsonl or mDPO .json (file or folder).
    #[arg(long)]
    data: PathBuf,
    /// Negatives file from `misp mine` (variants whose negatives come from a file).
    #[arg(long)]
    negatives: Option<PathBuf>,
    /// Pool folder (its ids.jsonl maps negative ids to image paths).
    #[arg(long)]
    pool: Option<PathBuf>,
    /// Folder that image paths in the records are relative to and must stay inside (default:
    /// the records file's folder); absolute paths are admitted when they lie under it, so
    /// `--image-root /` admits every absolute path.
    #[arg(long)]
    image_root: Option<PathBuf>,
    /// Output folder: adapter/, config.toml, metrics.jsonl, checkpoints/, report.md, curves.
    #[arg(long)]
    out: PathBuf,
    /// Override a config key, e.g. --set lr=2e-5 --set epochs=1 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Continue the run in --out from its last checkpoint (same settings required).
    #[arg(long)]
    resume: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    runtime: crate::runtime::RuntimeArgs,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let cfg = TrainConfig::load(args.config.as_deref(), &args.sets)?;
    let device = args.runtime.apply()?;
    let inputs = TrainInputs {
        device,
        model: args.model,
        data: args.data,
        negatives: args.negatives,
        pool: args.pool,
        image_root: args.image_root,
        out: args.out.clone(),
        resume: args.resume,
        progress: !args.quiet,
        stop_after: None,
    };
    let s =
        train(&cfg, &inputs).with_context(|| format!("training into {}", args.out.display()))?;
    let last = s.metrics.last();
    let get = |k: &str| {
        last.and_then(|r| r.get(k))
            .and_then(|v| v.as_f64())
            .map_or("-".to_string(), |v| format!("{v:.4}"))
    };
    println!("| variant | records | steps | refused | loss | margin | text acc | img acc | s |");
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} |",
        cfg.variant,
        s.records,
        s.steps,
        s.refused_steps,
        get("loss"),
        get("rewards/margins"),
        get("rewards/accuracies"),
        get("rewards/img_accuracies"),
        s.seconds
    );
    println!("adapter: {}", s.adapter.display());
    Ok(())
}
