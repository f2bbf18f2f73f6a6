//! `misp world pretrain`: trains the world's tiny CLIP and LLaVA (library: `misp::pretrain`)
//! and prints what was written, how long it took and how much the base model hallucinates.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use misp::pretrain::{self, PretrainConfig};

#[derive(Args)]
pub struct PretrainArgs {
    /// World folder written by `misp world generate`.
    #[arg(long)]
    world: PathBuf,
    /// Output folder; the models go to OUT/shapes-clip and OUT/shapes-llava.
    #[arg(long, default_value = "models/")]
    out: PathBuf,
    /// Few steps (the `misp demo --quick` preset).
    #[arg(long)]
    quick: bool,
    /// Seed of initialisation and batching.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// CLIP training steps (overrides the preset).
    #[arg(long)]
    clip_steps: Option<usize>,
    /// LLaVA SFT steps (overrides the preset).
    #[arg(long)]
    sft_steps: Option<usize>,
    /// A `pretrain_config.json` (as written next to a run's outputs) to start from instead of
    /// the defaults; missing fields take their defaults, the flags above still override.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Reuse the trained CLIP in this folder (e.g. models/shapes-clip) and train only the LLaVA.
    #[arg(long)]
    clip_from: Option<PathBuf>,
    /// Skip the POPE / CHAIR evaluation of the base model on val.
    #[arg(long)]
    no_eval: bool,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    runtime: crate::runtime::RuntimeArgs,
}

impl PretrainArgs {
    fn config(&self) -> anyhow::Result<PretrainConfig> {
        let mut cfg = if let Some(path) = &self.config {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        } else if self.quick {
            PretrainConfig::quick()
        } else {
            PretrainConfig::default()
        };
        if self.config.is_none() || self.seed != 0 {
            cfg.seed = self.seed;
        }
        if let Some(s) = self.clip_steps {
            cfg.clip.steps = s;
        }
        if let Some(s) = self.sft_steps {
            cfg.sft.steps = s;
        }
        cfg.skip_eval |= self.no_eval;
        if self.clip_from.is_some() {
            cfg.clip_from = self.clip_from.clone();
        }
        Ok(cfg)
    }
}

pub fn run(args: &PretrainArgs) -> anyhow::Result<()> {
    let cfg = args.config()?;
    let start = Instant::now();
    let device = args.runtime.apply()?;
    let report =
        pretrain::run(&args.world, &args.out, &cfg, &device, !args.quiet).with_context(|| {
            format!(
                "pretraining from world {} into {}",
                args.world.display(),
                args.out.display()
            )
        })?;
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "CLIP  {} ({} params, {:.2} MB, {:.0} s, final loss {:.3})",
        report.clip_dir.display(),
        report.clip_params,
        mb(report.clip_bytes),
        report.clip_seconds,
        report.final_clip_loss
    );
    if let Some(acc) = report.dense_shape_accuracy {
        println!(
            "      tower reads the shape of {:.0} % of {} objects (dense heads)",
            100.0 * acc,
            cfg.eval_split
        );
    }
    println!(
        "LLaVA {} ({} params, {} trained, {:.2} MB, {:.0} s, final loss {:.3})",
        report.llava_dir.display(),
        report.llava_params,
        report.llava_trained_params,
        mb(report.llava_bytes),
        report.sft_seconds,
        report.final_sft_loss
    );
    if let Some(e) = &report.eval {
        println!("base model on {} ({:.0} s):", e.split, report.eval_seconds);
        for (split, m) in &e.pope {
            println!(
                "  POPE {split:<12} acc {:.3}  F1 {:.3}  yes-ratio {:.3}  (n {})",
                m.accuracy, m.f1, m.yes_ratio, m.n
            );
        }
        println!(
            "  F1 random - adversarial: {:.1} points; CHAIR_s {:.3}, CHAIR_i {:.3} ({} captions)",
            e.f1_gap_points, e.chair.chair_s, e.chair.chair_i, e.chair.n
        );
        println!(
            "  hallucination target (gap >= 5 points or CHAIR_s >= 0.10): {}",
            if e.hallucinates { "met" } else { "NOT met" }
        );
    }
    println!("total {:.0} s", start.elapsed().as_secs_f64());
    Ok(())
}
