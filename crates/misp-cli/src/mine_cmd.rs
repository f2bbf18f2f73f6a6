//! `misp mine`: Stage 1b. Negatives for every record (or a shard of them), resumable.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use misp::embeddings::{PoolEmbeddings, RecordEmbeddings};
use misp::mine::{self, candidates::CandidateSpec, MineConfig, SelectMode, Shard};
use misp::sae::Sae;

#[derive(Clone, Copy, ValueEnum)]
enum Select {
    /// Algorithm 1: deterministic, diversity-promoting.
    Greedy,
    /// Its stochastic analogue (each pick records its draw probability).
    Sample,
}

#[derive(Args)]
pub struct MineArgs {
    /// Pool folder (embeddings.safetensors with image_embeds, ids.jsonl, meta.json).
    #[arg(long)]
    pool: PathBuf,
    /// Records folder (prompt_embeds and positive_embeds).
    #[arg(long)]
    records: PathBuf,
    /// SAE folder from `misp sae train` (needed by strategies with a misp part).
    #[arg(long)]
    sae: Option<PathBuf>,
    /// Negatives file to write (JSONL, one record per line; resumed if it exists).
    #[arg(long)]
    out: PathBuf,
    /// misp, random, similarity, crop, noise, noise+misp or crop+noise+misp.
    #[arg(long, default_value = "misp")]
    strategy: String,
    /// Negatives per record.
    #[arg(long, default_value_t = 3)]
    k: usize,
    /// How misp picks among scored candidates.
    #[arg(long, value_enum, default_value = "greedy")]
    select: Select,
    /// Weight lambda of Algorithm 1's diversity term.
    #[arg(long, default_value_t = 0.5)]
    diversity: f64,
    /// Temperature of the proposal q = softmax(score / tau).
    #[arg(long, default_value_t = 1.0)]
    tau: f64,
    /// Seed of every random choice (per record, so shards and resumes agree).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Candidate set per record: knn:M, random:M or all.
    #[arg(long, default_value = "knn:256")]
    candidates: CandidateSpec,
    /// Handle only the i-th of n contiguous record ranges (0-based), e.g. 0/4.
    #[arg(long, default_value = "0/1")]
    shard: Shard,
    /// Mine with an SAE whose saved FVU is 0.9 or more (it did not learn), or that has no
    /// training summary (made outside `misp sae train`).
    #[arg(long)]
    allow_untrained_sae: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: MineArgs) -> anyhow::Result<()> {
    let pool = PoolEmbeddings::load(&a.pool).context("reading the pool")?;
    let records = RecordEmbeddings::load(&a.records).context("reading the records")?;
    let sae = match &a.sae {
        Some(dir) => Some(Sae::load(dir).context("reading the SAE")?),
        None => None,
    };
    let cfg = MineConfig {
        strategy: a.strategy.clone(),
        k: a.k,
        select: match a.select {
            Select::Greedy => SelectMode::Greedy,
            Select::Sample => SelectMode::Sample,
        },
        diversity: a.diversity,
        tau: a.tau,
        seed: a.seed,
        candidates: a.candidates.to_string(),
        shard: a.shard,
        allow_untrained_sae: a.allow_untrained_sae,
    };
    let sae_ref = sae.as_ref().zip(a.sae.as_deref());
    let report = mine::mine(&cfg, &pool, &records, sae_ref, &a.out, !a.quiet)?;
    eprintln!(
        "{}: {} records written, {} already there, {} skipped, {} with fewer than {} negatives (details in {})",
        a.out.display(),
        report.written,
        report.already_done,
        report.skipped.len(),
        report.short.len(),
        a.k,
        mine::sidecar(&a.out, "report.json").display()
    );
    Ok(())
}
