//! The mining driver behind `misp mine`: records in, one negatives line per record out.
//!
//! Per record: candidate set -> (SAE codes -> Eq. 12 -> Algorithm 1) or the baseline parts ->
//! one [`RecordNegatives`] line. Every random choice is seeded from `(seed, record id)`, so the
//! output does not depend on batching, sharding or resumption: shard files concatenated in
//! order equal the unsharded file, and a resumed run equals an uninterrupted one.

use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::candidates::{CandidateSpec, PoolIndex};
use super::negatives::{self, Negative, RecordNegatives};
use super::select;
use super::strategy::{Part, Strategy};
use crate::embeddings::{self, PoolEmbeddings, RecordEmbeddings};
use crate::files::{self, record_seed, Shard};
use crate::sae::Sae;

/// Records whose cosines are computed in one GEMM.
const COSINE_BATCH: usize = 64;

/// An SAE whose saved FVU is at or above this has not learned: its codes barely depend on the
/// input, and Eq. 12 would rank candidates by their distance from the mean pair rather than by
/// a sparse code. `misp mine` refuses it unless told otherwise.
pub const MAX_SAE_FVU: f64 = 0.9;

#[derive(Debug, thiserror::Error)]
pub enum MineError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Store(Box<embeddings::StoreError>),
    #[error(transparent)]
    Negatives(#[from] negatives::NegativesError),
    #[error(transparent)]
    File(#[from] files::FileError),
    #[error(transparent)]
    Sae(Box<crate::sae::SaeError>),
    #[error("record {id:?}: {source}")]
    Tensor {
        id: String,
        source: candle_core::Error,
    },
    #[error("{path}: {message}")]
    Inconsistent { path: PathBuf, message: String },
}

// Boxed: both are large, and MineError travels through every `?` of the hot loop.
impl From<embeddings::StoreError> for MineError {
    fn from(e: embeddings::StoreError) -> Self {
        MineError::Store(Box::new(e))
    }
}

impl From<crate::sae::SaeError> for MineError {
    fn from(e: crate::sae::SaeError) -> Self {
        MineError::Sae(Box::new(e))
    }
}

/// How picks are made among scored candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SelectMode {
    /// Algorithm 1, deterministic; each pick carries `q_i = softmax(s / tau)_i`.
    #[default]
    Greedy,
    /// The stochastic analogue; each pick carries the probability it was drawn with.
    Sample,
}

/// Everything that decides the output of `misp mine`; written, resolved, next to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MineConfig {
    pub strategy: String,
    pub k: usize,
    pub select: SelectMode,
    /// `lambda` of Algorithm 1's diversity term.
    pub diversity: f64,
    /// Temperature of the proposal `q = softmax(s / tau)`.
    pub tau: f64,
    pub seed: u64,
    pub candidates: String,
    pub shard: Shard,
    /// Mine with an SAE whose FVU is at least [`MAX_SAE_FVU`], or that has no training summary.
    #[serde(default)]
    pub allow_untrained_sae: bool,
}

impl Default for MineConfig {
    fn default() -> Self {
        Self {
            strategy: "misp".into(),
            k: 3,
            select: SelectMode::Greedy,
            diversity: 0.5,
            tau: 1.0,
            seed: 0,
            candidates: CandidateSpec::default().to_string(),
            shard: Shard::default(),
            allow_untrained_sae: false,
        }
    }
}

/// What a run did, written as `<out>.report.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MineReport {
    /// Records in this shard.
    pub records: usize,
    /// Lines written by this run.
    pub written: usize,
    /// Records found already written (a resumed run).
    pub already_done: usize,
    /// Records skipped, with the reason (non-finite embeddings).
    pub skipped: Vec<Skipped>,
    /// Records that got fewer than K negatives (too few eligible pool images).
    pub short: Vec<Short>,
    /// Pool rows with non-finite embeddings, never used as negatives.
    pub pool_invalid_rows: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    pub id: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Short {
    pub id: String,
    pub negatives: usize,
}

/// The resolved-config file written beside the negatives file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ResolvedRun {
    misp_version: String,
    pool: PathBuf,
    records: PathBuf,
    sae: Option<PathBuf>,
    clip_model: String,
    config: MineConfig,
    /// Fingerprints of the input files ([`files::fingerprint_files`]): `pool`, `records`,
    /// `sae`. A re-run into the same output must find the same ones (files written by a misp
    /// that did not record them have none, and are not compared).
    #[serde(default)]
    inputs: std::collections::BTreeMap<String, String>,
}

/// What of each input decides the negatives: a store's ids, meta and embeddings; an SAE's
/// config and weights.
fn input_fingerprints(
    pool: &Path,
    records: &Path,
    sae: Option<&Path>,
) -> Result<std::collections::BTreeMap<String, String>, MineError> {
    let store = [
        embeddings::IDS_FILE,
        embeddings::META_FILE,
        embeddings::EMBEDDINGS_FILE,
    ];
    let mut out = std::collections::BTreeMap::new();
    out.insert("pool".into(), files::fingerprint_files(pool, &store)?);
    out.insert("records".into(), files::fingerprint_files(records, &store)?);
    if let Some(dir) = sae {
        let names = ["config.json", "model.safetensors"];
        out.insert("sae".into(), files::fingerprint_files(dir, &names)?);
    }
    Ok(out)
}

/// `<out>` with `suffix` replacing its extension: `neg.jsonl` -> `neg.config.json`.
pub fn sidecar(out: &Path, suffix: &str) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.with_file_name(format!("{stem}.{suffix}"))
}

/// What `check` resolved from the config: the slots per part and the candidate set.
struct Plan {
    alloc: Vec<(Part, usize)>,
    spec: CandidateSpec,
}

/// Validates the inputs against each other and the config; returns the parsed pieces.
fn check(
    cfg: &MineConfig,
    pool: &PoolEmbeddings,
    records: &RecordEmbeddings,
    sae: Option<&Sae>,
    sae_dir: Option<&Path>,
) -> Result<Plan, MineError> {
    embeddings::check_compatible(pool, records)?;
    let strategy: Strategy = cfg.strategy.parse().map_err(MineError::Config)?;
    let spec: CandidateSpec = cfg.candidates.parse().map_err(MineError::Config)?;
    if cfg.k == 0 {
        return Err(MineError::Config("--k must be at least 1".into()));
    }
    if !(cfg.tau.is_finite() && cfg.tau > 0.0 && cfg.diversity.is_finite()) {
        return Err(MineError::Config(format!(
            "--tau must be > 0 and --diversity finite (got {} and {})",
            cfg.tau, cfg.diversity
        )));
    }
    let alloc = strategy.allocation(cfg.k).map_err(MineError::Config)?;
    let misp_slots = alloc
        .iter()
        .find(|(p, _)| *p == Part::Misp)
        .map_or(0, |(_, n)| *n);
    if let (true, Some(m)) = (misp_slots > 0, spec.size()) {
        if m < misp_slots {
            return Err(MineError::Config(format!(
                "K = {} asks for {misp_slots} SAE-selected negatives but the candidate set {spec} has only {m}",
                cfg.k
            )));
        }
    }
    if strategy.needs_sae() {
        let sae = sae.ok_or_else(|| {
            MineError::Config(format!(
                "strategy {strategy} needs a trained SAE (--sae DIR)"
            ))
        })?;
        let path = sae_dir.map_or_else(|| PathBuf::from("SAE"), |d| d.join("config.json"));
        if !cfg.allow_untrained_sae {
            let refuse = |why: String| {
                MineError::Inconsistent {
                path: path.clone(),
                message: format!(
                    "{why}; train it until it learns (`misp sae train`, whose defaults stop on a held-out plateau) or pass --allow-untrained-sae"
                ),
            }
            };
            match &sae.training {
                None => {
                    return Err(refuse(
                        "the SAE has no training summary (not trained by `misp sae train`), so whether it learned is unknown".into(),
                    ))
                }
                Some(t) if t.fvu.is_nan() || t.fvu >= MAX_SAE_FVU => {
                    return Err(refuse(format!(
                        "the SAE reconstructs its {} pairs with FVU {:.3} >= {MAX_SAE_FVU}: it did not learn, and Eq. 12 would rank candidates by their distance from the mean",
                        t.fvu_split, t.fvu
                    )))
                }
                Some(_) => {}
            }
        }
        let meta = &pool.meta;
        let mismatch = |field: &str, sae_v: String, emb_v: String| MineError::Inconsistent {
            path: path.clone(),
            message: format!(
                "the SAE was trained with {field} = {sae_v}, but the embeddings ({}) have {emb_v}",
                pool.dir.join(embeddings::META_FILE).display()
            ),
        };
        if sae.config.d != meta.dim {
            return Err(mismatch(
                "d",
                sae.config.d.to_string(),
                meta.dim.to_string(),
            ));
        }
        if sae.config.clip_model != meta.clip_model {
            return Err(mismatch(
                "clip_model",
                format!("{:?}", sae.config.clip_model),
                format!("{:?}", meta.clip_model),
            ));
        }
        if sae.config.normalized != meta.normalized {
            return Err(mismatch(
                "normalized",
                sae.config.normalized.to_string(),
                meta.normalized.to_string(),
            ));
        }
    }
    Ok(Plan { alloc, spec })
}

/// Mines negatives for the records of `cfg.shard`, appending to `out` (resuming if it holds
/// records already) and writing `<out>.config.json` and `<out>.report.json` beside it.
pub fn mine(
    cfg: &MineConfig,
    pool: &PoolEmbeddings,
    records: &RecordEmbeddings,
    sae: Option<(&Sae, &Path)>,
    out: &Path,
    progress: bool,
) -> Result<MineReport, MineError> {
    let (sae, sae_dir) = (sae.map(|s| s.0), sae.map(|s| s.1));
    let Plan { alloc, spec } = check(cfg, pool, records, sae, sae_dir)?;

    let resolved = ResolvedRun {
        misp_version: env!("CARGO_PKG_VERSION").into(),
        pool: pool.dir.clone(),
        records: records.dir.clone(),
        sae: sae_dir.map(Path::to_path_buf),
        clip_model: pool.meta.clip_model.clone(),
        config: cfg.clone(),
        inputs: input_fingerprints(&pool.dir, &records.dir, sae_dir)?,
    };
    // Opening the output first refuses one that is not a regular file before anything else
    // is written beside it.
    let (mut writer, done) = negatives::Writer::open(out)?;
    let config_path = sidecar(out, "config.json");
    if !done.is_empty() && config_path.exists() {
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| files::FileError::new(&config_path, e))?;
        let before: Option<ResolvedRun> = serde_json::from_str(&text).ok();
        let refuse = |what: String| {
            MineError::Inconsistent {
            path: config_path.clone(),
            message: format!(
                "{} holds {} records mined {what}; resuming would mix them. Delete it or choose another --out",
                out.display(),
                done.len()
            ),
        }
        };
        let Some(before) = before else {
            return Err(refuse("by an unknown run".into()));
        };
        if before.config != resolved.config {
            return Err(refuse("with other settings".into()));
        }
        let changed: Vec<&str> = resolved
            .inputs
            .iter()
            .filter(|(k, v)| before.inputs.get(*k).is_some_and(|b| b != *v))
            .map(|(k, _)| k.as_str())
            .collect();
        if !changed.is_empty() {
            return Err(refuse(format!(
                "from other inputs (changed: {})",
                changed.join(", ")
            )));
        }
    }
    files::write_json_atomic(&config_path, &resolved)?;

    let index = PoolIndex::new(pool).map_err(|source| MineError::Tensor {
        id: "<pool>".into(),
        source,
    })?;
    let invalid = embeddings::invalid_row_set(&records.invalid_rows);
    let range = cfg.shard.range(records.len());
    let mut report = MineReport {
        records: range.len(),
        pool_invalid_rows: pool.invalid_rows.len(),
        ..Default::default()
    };
    let bar = crate::progress::bar(progress, range.len() as u64, "mining", "records");

    let todo: Vec<usize> = range
        .filter(|&i| {
            let skip = done.contains(&records.ids[i]);
            report.already_done += usize::from(skip);
            if skip {
                bar.inc(1);
            }
            !skip
        })
        .collect();
    let d = pool.meta.dim;
    for batch in todo.chunks(COSINE_BATCH) {
        let live: Vec<usize> = batch
            .iter()
            .cloned()
            .filter(|i| !invalid.contains(i))
            .collect();
        let queries: Vec<f32> = live
            .iter()
            .flat_map(|&i| records.positive(i).iter().cloned())
            .collect();
        let cosines = if live.is_empty() {
            Vec::new()
        } else {
            index
                .cosines(&queries)
                .map_err(|source| MineError::Tensor {
                    id: records.ids[live[0]].clone(),
                    source,
                })?
        };
        let mut cos_of = live
            .iter()
            .cloned()
            .zip(cosines)
            .collect::<std::collections::HashMap<_, _>>();
        for &i in batch {
            let id = &records.ids[i];
            bar.inc(1);
            let Some(cos) = cos_of.remove(&i) else {
                report.skipped.push(Skipped {
                    id: id.clone(),
                    reason: "unusable prompt or positive embedding (non-finite, or not unit-norm in a normalised store)".into(),
                });
                continue;
            };
            let ctx = RecordCtx {
                cfg,
                index: &index,
                records,
                sae,
                spec,
                d,
                i,
                cos: &cos,
            };
            let negatives = ctx.negatives(&alloc)?;
            if negatives.len() < cfg.k {
                report.short.push(Short {
                    id: id.clone(),
                    negatives: negatives.len(),
                });
            }
            writer.append(&RecordNegatives {
                id: id.clone(),
                negatives,
            })?;
            report.written += 1;
        }
    }
    bar.finish_and_clear();
    files::write_json_atomic(&sidecar(out, "report.json"), &report)?;
    Ok(report)
}

/// One record's inputs while its negatives are chosen.
struct RecordCtx<'a> {
    cfg: &'a MineConfig,
    index: &'a PoolIndex<'a>,
    records: &'a RecordEmbeddings,
    sae: Option<&'a Sae>,
    spec: CandidateSpec,
    d: usize,
    i: usize,
    cos: &'a [f32],
}

impl RecordCtx<'_> {
    fn id(&self) -> &str {
        &self.records.ids[self.i]
    }

    fn negatives(&self, alloc: &[(Part, usize)]) -> Result<Vec<Negative>, MineError> {
        let mut rng = StdRng::seed_from_u64(record_seed(self.cfg.seed, self.id(), 0));
        let mut out = Vec::with_capacity(self.cfg.k);
        for &(part, n) in alloc {
            match part {
                Part::Crop | Part::Noise => {
                    for _ in 0..n {
                        let slot = out.len() as u64;
                        out.push(synthetic(
                            part,
                            record_seed(self.cfg.seed, self.id(), 1 + slot),
                        ));
                    }
                }
                Part::Random => {
                    let eligible = self.index.eligible_count(self.cos);
                    for row in self.index.random(self.cos, n, &mut rng) {
                        out.push(self.pool_negative(row, part, Some(1.0 / eligible as f64)));
                    }
                }
                Part::Similarity => {
                    for row in self.index.nearest(self.cos, n) {
                        out.push(self.pool_negative(row, part, None));
                    }
                }
                Part::Misp => out.extend(self.misp(n, &mut rng)?),
            }
        }
        Ok(out)
    }

    /// SAE-scored negatives: candidates -> codes -> Eq. 12 -> greedy or sampled picks.
    fn misp(&self, n: usize, rng: &mut StdRng) -> Result<Vec<Negative>, MineError> {
        let sae = self.sae.expect("checked: misp needs an SAE");
        let rows = self.index.candidates(self.spec, self.cos, rng);
        let mut cand = Vec::with_capacity(rows.len() * self.d);
        for &r in &rows {
            cand.extend_from_slice(self.index.pool.row(r as usize));
        }
        let codes = sae.encode_candidates(
            self.records.positive(self.i),
            self.records.prompt(self.i),
            &cand,
        )?;
        let scores = select::eq12_scores(&codes.recon, &codes.l1);
        let (k, lambda, tau) = (n, self.cfg.diversity, self.cfg.tau);
        let picks = match self.cfg.select {
            SelectMode::Greedy => select::greedy(&scores, &codes.z, codes.hidden, k, lambda, tau),
            SelectMode::Sample => {
                select::sample(&scores, &codes.z, codes.hidden, k, lambda, tau, rng)
            }
        };
        Ok(picks
            .into_iter()
            .map(|p| Negative {
                score: Some(scores[p.index]),
                recon: Some(codes.recon[p.index]),
                l1: Some(codes.l1[p.index]),
                ..self.pool_negative(rows[p.index], Part::Misp, Some(p.q))
            })
            .collect())
    }

    fn pool_negative(&self, row: u32, part: Part, q: Option<f64>) -> Negative {
        Negative {
            image: self.index.pool.ids[row as usize].clone(),
            strategy: part.name().into(),
            score: None,
            recon: None,
            l1: None,
            q,
            seed: None,
        }
    }
}

fn synthetic(part: Part, seed: u64) -> Negative {
    Negative {
        image: part.name().into(),
        strategy: part.name().into(),
        score: None,
        recon: None,
        l1: None,
        q: None,
        seed: Some(seed),
    }
}

/// The candidate set of every record (empty for records with non-finite embeddings), for SAE
/// training. Seeded per record like mining.
pub fn candidate_sets(
    pool: &PoolEmbeddings,
    records: &RecordEmbeddings,
    spec: CandidateSpec,
    seed: u64,
    progress: bool,
) -> Result<Vec<Vec<u32>>, MineError> {
    embeddings::check_compatible(pool, records)?;
    let index = PoolIndex::new(pool).map_err(|source| MineError::Tensor {
        id: "<pool>".into(),
        source,
    })?;
    let invalid = embeddings::invalid_row_set(&records.invalid_rows);
    let bar = crate::progress::bar(progress, records.len() as u64, "candidates", "records");
    let mut out = vec![Vec::new(); records.len()];
    let all: Vec<usize> = (0..records.len())
        .filter(|i| !invalid.contains(i))
        .collect();
    for batch in all.chunks(COSINE_BATCH) {
        let queries: Vec<f32> = batch
            .iter()
            .flat_map(|&i| records.positive(i).iter().cloned())
            .collect();
        let cosines = index
            .cosines(&queries)
            .map_err(|source| MineError::Tensor {
                id: records.ids[batch[0]].clone(),
                source,
            })?;
        for (&i, cos) in batch.iter().zip(&cosines) {
            let mut rng = StdRng::seed_from_u64(record_seed(seed, &records.ids[i], 0));
            out[i] = index.candidates(spec, cos, &mut rng);
        }
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();
    Ok(out)
}
