//! `misp world`: the synthetic ShapesWorld (docs/design.md §6). `generate` writes a world folder
//! (layout in the `misp::world` module doc) or reuses the matching one already there.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use misp::world::{self, WorldConfig};

#[derive(Subcommand)]
pub enum WorldCommand {
    /// Write scenes, images, SFT text, preference records, an image pool, POPE and CHAIR files.
    Generate(GenerateArgs),
    /// Train the world's tiny CLIP (contrastive) and LLaVA (SFT) and save them in HF layouts.
    Pretrain(crate::pretrain_cmd::PretrainArgs),
}

#[derive(Args)]
pub struct GenerateArgs {
    /// World folder to write (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Seed of every random choice; the same seed and options give byte-identical files.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The small preset used by `misp demo --quick` (fewer scenes, same world).
    #[arg(long)]
    quick: bool,
    /// Regenerate over a world of another version, seed or config, or into a folder that is
    /// not a world (only the world's own paths are removed).
    #[arg(long)]
    force: bool,
    /// Training scenes (SFT captions and QA; preference records are drawn from them).
    #[arg(long)]
    train_scenes: Option<usize>,
    /// Validation scenes (POPE, CHAIR and records for tuning).
    #[arg(long)]
    val_scenes: Option<usize>,
    /// Test scenes (the reported POPE and CHAIR numbers).
    #[arg(long)]
    test_scenes: Option<usize>,
    /// Images of the negative pool.
    #[arg(long)]
    pool_images: Option<usize>,
    /// Train preference records.
    #[arg(long)]
    records: Option<usize>,
    /// Validation preference records.
    #[arg(long)]
    val_records: Option<usize>,
    /// Image side in pixels.
    #[arg(long)]
    image_size: Option<u32>,
}

impl GenerateArgs {
    fn config(&self) -> WorldConfig {
        let base = if self.quick {
            WorldConfig::quick()
        } else {
            WorldConfig::default()
        };
        WorldConfig {
            seed: self.seed,
            train_scenes: self.train_scenes.unwrap_or(base.train_scenes),
            val_scenes: self.val_scenes.unwrap_or(base.val_scenes),
            test_scenes: self.test_scenes.unwrap_or(base.test_scenes),
            pool_images: self.pool_images.unwrap_or(base.pool_images),
            records: self.records.unwrap_or(base.records),
            val_records: self.val_records.unwrap_or(base.val_records),
            image_size: self.image_size.unwrap_or(base.image_size),
            ..base
        }
    }
}

pub fn run(cmd: WorldCommand) -> anyhow::Result<()> {
    match cmd {
        WorldCommand::Generate(args) => generate(&args),
        WorldCommand::Pretrain(args) => crate::pretrain_cmd::run(&args),
    }
}

fn generate(args: &GenerateArgs) -> anyhow::Result<()> {
    let cfg = args.config();
    let start = Instant::now();
    let done = world::generate(&cfg, &args.out, args.force)
        .with_context(|| format!("generating ShapesWorld into {}", args.out.display()))?;
    let secs = start.elapsed().as_secs_f64();
    let m = &done.manifest;
    let what = if done.reused {
        "reused (same version, seed and config; content hash checked)"
    } else if done.regenerated {
        "regenerated (the world there was incomplete or damaged)"
    } else {
        "generated"
    };
    eprintln!(
        "ShapesWorld v{} seed {} in {}: {what}",
        m.version,
        m.seed,
        args.out.display()
    );
    if let Some(c) = &m.counts {
        let mut rows: Vec<(String, String)> = Vec::new();
        for (split, n) in &c.scenes {
            rows.push((format!("images/{split}"), n.to_string()));
        }
        rows.push(("sft.jsonl rows".into(), c.sft_rows.to_string()));
        rows.push(("records.jsonl".into(), c.records.to_string()));
        rows.push(("records_val.jsonl".into(), c.val_records.to_string()));
        for (name, n) in &c.pope_questions {
            rows.push((format!("pope/{name}.jsonl"), n.to_string()));
        }
        for (split, n) in &c.chair_objects {
            rows.push((
                format!("chair/instances_{split}.json objects"),
                n.to_string(),
            ));
        }
        rows.push((
            "hidden objects".into(),
            format!("{} of {}", c.hidden_objects, c.objects),
        ));
        rows.push((
            "P(partner | anchor), train".into(),
            format!("{:.3}", c.train_partner_rate),
        ));
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        println!("| {:width$} | {:>10} |", "what", "count");
        println!("|{}|{}|", "-".repeat(width + 2), "-".repeat(12));
        for (k, v) in rows {
            println!("| {k:width$} | {v:>10} |");
        }
    }
    println!("content hash {}, {secs:.2} s", m.content_hash);
    Ok(())
}
