//! `misp sae train`: Stage 1a. Reads a pool and a records store, builds each record's
//! candidate set, trains the SAE of Eq. 11 and writes it (PyTorch `nn.Linear` layout) with its
//! per-epoch metrics and the resolved run config.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use misp::embeddings::{PoolEmbeddings, RecordEmbeddings};
use misp::mine::candidates::CandidateSpec;
use misp::sae::{self, SaeConfig, SaeTrainConfig, TrainingSet};

#[derive(Subcommand)]
pub enum SaeCommand {
    /// Train the sparse autoencoder on the difference vectors of every record's candidate set.
    Train(TrainArgs),
}

#[derive(Args)]
pub struct TrainArgs {
    /// Pool folder (embeddings.safetensors with image_embeds, ids.jsonl, meta.json).
    #[arg(long)]
    pool: PathBuf,
    /// Records folder (prompt_embeds and positive_embeds).
    #[arg(long)]
    records: PathBuf,
    /// Output folder: model.safetensors, config.json, metrics.jsonl, train_state.*, run.json.
    #[arg(long)]
    out: PathBuf,
    /// Candidate set per record: knn:M, random:M or all.
    #[arg(long, default_value = "knn:256")]
    candidates: CandidateSpec,
    /// Most epochs (a re-run resumes after the last finished one); training stops earlier when
    /// the held-out FVU stops improving (--patience).
    #[arg(long, default_value_t = SaeTrainConfig::default().epochs)]
    epochs: usize,
    /// Records per Adam step (each brings its whole candidate set).
    #[arg(long, default_value_t = SaeTrainConfig::default().batch_records)]
    batch_records: usize,
    /// Adam learning rate [default: 0.64 / d, the initial weight scale 1/d times 0.64].
    #[arg(long)]
    lr: Option<f64>,
    /// Share of the records held out to measure the FVU on and to stop by (0: none, no
    /// early stop).
    #[arg(long, default_value_t = SaeTrainConfig::default().holdout)]
    holdout: f64,
    /// Epochs without a relative held-out FVU improvement of --min-delta before stopping (0:
    /// never stop early).
    #[arg(long, default_value_t = SaeTrainConfig::default().patience)]
    patience: usize,
    #[arg(long, default_value_t = SaeTrainConfig::default().min_delta)]
    min_delta: f64,
    /// Adam steps over which the rate rises linearly to --lr.
    #[arg(long, default_value_t = SaeTrainConfig::default().warmup_steps)]
    warmup_steps: usize,
    /// Number of latents H.
    #[arg(long, default_value_t = SaeTrainConfig::default().hidden)]
    hidden: usize,
    /// Weight gamma of the KL sparsity term of Eq. 11.
    #[arg(long, default_value_t = SaeTrainConfig::default().gamma)]
    gamma: f64,
    /// Target mean activation rho of each latent.
    #[arg(long, default_value_t = SaeTrainConfig::default().rho)]
    rho: f64,
    /// Seed of initialisation, shuffling and random candidate sets.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn run(cmd: SaeCommand) -> anyhow::Result<()> {
    let SaeCommand::Train(a) = cmd;
    let pool = PoolEmbeddings::load(&a.pool).context("reading the pool")?;
    let records = RecordEmbeddings::load(&a.records).context("reading the records")?;
    let candidates = misp::mine::candidate_sets(&pool, &records, a.candidates, a.seed, !a.quiet)?;
    let cfg = SaeTrainConfig {
        epochs: a.epochs,
        batch_records: a.batch_records,
        lr: a.lr,
        seed: a.seed,
        hidden: a.hidden,
        gamma: a.gamma,
        rho: a.rho,
        holdout: a.holdout,
        patience: a.patience,
        min_delta: a.min_delta,
        warmup_steps: a.warmup_steps,
        ..Default::default()
    };
    let resolved = serde_json::json!({
        "misp_version": env!("CARGO_PKG_VERSION"),
        "pool": a.pool, "records": a.records, "candidates": a.candidates.to_string(),
        "train": cfg,
        "lr": cfg.lr_for(pool.meta.dim),
        "skipped_records": records.invalid_rows.iter().map(|r| &r.id).collect::<Vec<_>>(),
        "pool_invalid_rows": pool.invalid_rows.len(),
    });
    misp::files::write_json_atomic(&a.out.join("run.json"), &resolved)?;
    let data = TrainingSet {
        pool: &pool.embeds,
        prompts: &records.prompts,
        positives: &records.positives,
        candidates: &candidates,
        d: pool.meta.dim,
    };
    let base = SaeConfig::for_embeddings(
        pool.meta.dim,
        pool.meta.clip_model.clone(),
        pool.meta.normalized,
    );
    let sae = sae::train(&cfg, &data, base, &a.out, !a.quiet)?;
    let how = sae.training.as_ref().map_or(String::new(), |t| {
        format!(
            "; {} FVU {:.3} at epoch {} of {} ({}, {} held-out records)",
            t.fvu_split, t.fvu, t.epoch, t.epochs_run, t.stopped, t.heldout_records
        )
    });
    eprintln!(
        "trained SAE (d = {}, H = {}, input scale {:.4e}) on {} records x {} candidates{how}: {}",
        sae.config.d,
        sae.config.hidden,
        sae.config.input_scale,
        data.records() - records.invalid_rows.len(),
        a.candidates,
        a.out.display()
    );
    Ok(())
}
