//! `misp embed`: Stage 0. CLIP embeddings of an image pool and of preference records, in the
//! store format `misp sae train` and `misp mine` read.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use misp::embed::{embed_pool, embed_records, EmbedConfig, EmbedReport, Embedder};
use misp::files::Shard;

#[derive(Subcommand)]
pub enum EmbedCommand {
    /// Embed every image of a pool: a folder (recursive), a list file, or a COCO instances json.
    Pool(PoolArgs),
    /// Embed the prompt and the positive image of every preference record
    /// (RLHF-V parquet, TRL-style JSONL, mDPO JSON).
    Records(RecordsArgs),
}

#[derive(Args)]
pub struct Common {
    /// CLIP checkpoint folder in HF layout (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    clip: PathBuf,
    /// Output folder (embeddings.safetensors, ids.jsonl, meta.json, skipped.jsonl).
    #[arg(long)]
    out: PathBuf,
    /// Folder that image paths in the dataset are relative to (and must stay inside);
    /// defaults to the dataset file's folder.
    #[arg(long)]
    image_root: Option<PathBuf>,
    /// Images per CLIP forward pass.
    #[arg(long, default_value_t = EmbedConfig::default().batch_size)]
    batch_size: usize,
    /// Items per part file: the unit of resumption and sharding.
    #[arg(long, default_value_t = EmbedConfig::default().chunk_size)]
    chunk_size: usize,
    /// Precision of the written embeddings.
    #[arg(long, default_value = "f32", value_parser = ["f16", "f32"])]
    dtype: String,
    /// Handle only the i-th of n contiguous ranges of parts (0-based); shards may share --out.
    #[arg(long, default_value = "0/1")]
    shard: Shard,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    runtime: crate::runtime::RuntimeArgs,
}

#[derive(Args)]
pub struct PoolArgs {
    /// Image folder, list file (.txt) or COCO instances_*.json.
    #[arg(long)]
    images: PathBuf,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
pub struct RecordsArgs {
    /// Records file: .parquet (RLHF-V), .jsonl (TRL style) or .json (mDPO).
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    common: Common,
}

impl Common {
    fn config(&self) -> EmbedConfig {
        EmbedConfig {
            batch_size: self.batch_size,
            chunk_size: self.chunk_size,
            f16: self.dtype == "f16",
            shard: self.shard,
        }
    }
}

fn summary(out: &std::path::Path, r: &EmbedReport) {
    let state = if r.merged {
        "store complete".to_string()
    } else {
        format!("{} parts still pending (other shards)", r.parts_pending)
    };
    eprintln!(
        "{}: {} embedded, {} skipped (listed in skipped.jsonl), {} prompts truncated to 77 tokens, {} parts reused; {state} in {:.1} s",
        out.display(),
        r.embedded,
        r.skipped,
        r.truncated_prompts,
        r.parts_done_before,
        r.seconds
    );
}

pub fn run(cmd: EmbedCommand) -> anyhow::Result<()> {
    // Records need the text tower's tokenizer for their prompts; a pool does not.
    let (c, with_text) = match &cmd {
        EmbedCommand::Pool(a) => (&a.common, false),
        EmbedCommand::Records(a) => (&a.common, true),
    };
    let device = c.runtime.apply()?;
    let embedder = Embedder::load(&c.clip, with_text, &device)?;
    let (root, cfg) = (c.image_root.as_deref(), c.config());
    let report = match &cmd {
        EmbedCommand::Pool(a) => embed_pool(&embedder, &a.images, root, &c.out, &cfg, !c.quiet)?,
        EmbedCommand::Records(a) => {
            embed_records(&embedder, &a.data, root, &c.out, &cfg, !c.quiet)?
        }
    };
    summary(&c.out, &report);
    Ok(())
}
