//! `misp bench mine`: the mining stage's speed and memory figures (factorised vs dense SAE
//! scoring, scoring vs plain GEMMs, one SAE epoch), from one run, as a table.
//!
//! 1. d = 512, H = 128, 10,000 candidates for one prompt: factorised vs dense (the reference
//!    that builds every d^2 vector) time, and their agreement (Eq. 12 scores, greedy picks).
//! 2. d = 768, one prompt against 100,000 candidates: factorised time vs the two plain
//!    `N x d x H` GEMMs it cannot avoid, and the peak memory above pool + SAE.
//! 3. One SAE training epoch over 5,700 records x 256 candidates at d = 768.
//!
//! Inputs are synthetic unit vectors and a freshly initialised SAE: timing does not depend on
//! the weights, and agreement is checked on the same weights for both paths.

use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor};
use clap::Args;
use misp::mine::select;
use misp::sae::{self, dense_reference, Sae, SaeConfig, SaeTrainConfig, TrainingSet};
use rand::{Rng, SeedableRng};

#[derive(Args)]
pub struct BenchMineArgs {
    /// Candidates of the factorised-vs-dense comparison (d = 512).
    #[arg(long, default_value_t = 10_000)]
    dense_candidates: usize,
    /// Candidates of the large scoring run (d = 768).
    #[arg(long, default_value_t = 100_000)]
    large_candidates: usize,
    /// Records of the SAE epoch (x 256 candidates, d = 768); 0 skips the epoch.
    #[arg(long, default_value_t = 5_700)]
    epoch_records: usize,
    /// Repetitions of the fast measurements (the minimum is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn unit_rows(rng: &mut impl Rng, n: usize, d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * d);
    for _ in 0..n {
        let row: Vec<f32> = (0..d).map(|_| rng.random::<f32>() - 0.5).collect();
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        out.extend(row.iter().map(|x| x / norm));
    }
    out
}

/// Seconds of the fastest of `repeat` runs of `f`, and its last result.
fn time_min<T>(
    repeat: usize,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<(f64, T)> {
    let mut best = f64::INFINITY;
    let mut last = None;
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        let out = f()?;
        best = best.min(t.elapsed().as_secs_f64());
        last = Some(out);
    }
    Ok((best, last.expect("at least one run")))
}

/// `(VmRSS, VmHWM)` in MiB from /proc (Linux); `None` elsewhere.
fn memory_mib() -> Option<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Resets the peak-RSS counter so the next `VmHWM` covers only what follows (Linux >= 4.0).
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn rel_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / x.abs().max(y.abs()).max(1e-30))
        .fold(0.0, f64::max)
}

pub fn run(a: BenchMineArgs) -> anyhow::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
    let mut rows: Vec<[String; 3]> = Vec::new();

    // 1. Factorised vs dense at d = 512.
    let (d, n) = (512, a.dense_candidates);
    let sae = Sae::init(SaeConfig::for_embeddings(d, "bench", true), a.seed)?;
    let (pos, prompt, cands) = (
        unit_rows(&mut rng, 1, d),
        unit_rows(&mut rng, 1, d),
        unit_rows(&mut rng, n, d),
    );
    let (t_fact, fact) = time_min(a.repeat, || {
        Ok(sae.encode_candidates(&pos, &prompt, &cands)?)
    })?;
    eprintln!("dense reference over {n} candidates at d = {d} (builds every d^2 vector; slow)...");
    let (t_dense, dense) = time_min(1, || {
        Ok(dense_reference::encode_candidates(
            &sae,
            &pos,
            &prompt,
            &cands,
            dense_reference::DENSE_CHUNK_ROWS,
        )?)
    })?;
    let s_fact = select::eq12_scores(&fact.recon, &fact.l1);
    let s_dense = select::eq12_scores(&dense.recon, &dense.l1);
    let picks = |s: &[f64], z: &[f32]| -> Vec<usize> {
        select::greedy(s, z, sae.config.hidden, 3, 0.5, 1.0)
            .iter()
            .map(|p| p.index)
            .collect()
    };
    let (p_fact, p_dense) = (picks(&s_fact, &fact.z), picks(&s_dense, &dense.z));
    rows.push([
        format!("d={d}, N={n}: factorised codes + recon"),
        format!("{:.4} s", t_fact),
        String::new(),
    ]);
    rows.push([
        format!("d={d}, N={n}: dense reference"),
        format!("{:.2} s", t_dense),
        String::new(),
    ]);
    rows.push([
        "speed-up factorised / dense".into(),
        format!("{:.0}x", t_dense / t_fact),
        "target >= 100x".into(),
    ]);
    rows.push([
        "max relative difference (scores | recon | l1)".into(),
        format!(
            "{:.1e} | {:.1e} | {:.1e}",
            rel_diff(&s_fact, &s_dense),
            rel_diff(&fact.recon, &dense.recon),
            rel_diff(&fact.l1, &dense.l1)
        ),
        "target <= 1e-4".into(),
    ]);
    rows.push([
        "greedy picks (K=3) identical".into(),
        format!("{} ({p_fact:?} vs {p_dense:?})", p_fact == p_dense),
        String::new(),
    ]);
    drop((sae, cands, fact, dense));

    // 2. One prompt against a large pool at d = 768.
    let (d, n) = (768, a.large_candidates);
    let sae = Sae::init(SaeConfig::for_embeddings(d, "bench", true), a.seed)?;
    let (pos, prompt, pool) = (
        unit_rows(&mut rng, 1, d),
        unit_rows(&mut rng, 1, d),
        unit_rows(&mut rng, n, d),
    );
    let h = sae.config.hidden;
    let before = memory_mib();
    let peak_ok = reset_peak();
    let (t_fact, codes) = time_min(
        a.repeat,
        || Ok(sae.encode_candidates(&pos, &prompt, &pool)?),
    )?;
    let after = memory_mib();
    // The two GEMMs every path needs: the pool against the per-prompt A (H x d) and C (H x d).
    let pool_t = Tensor::from_slice(&pool, (n, d), &Device::Cpu)?;
    let a_mat = Tensor::from_slice(&unit_rows(&mut rng, h, d), (h, d), &Device::Cpu)?;
    let c_mat = Tensor::from_slice(&unit_rows(&mut rng, h, d), (h, d), &Device::Cpu)?;
    let (t_gemm, _) = time_min(a.repeat, || {
        let x = pool_t.matmul(&a_mat.t()?)?;
        let y = pool_t.matmul(&c_mat.t()?)?;
        Ok((
            x.sum_all()?.to_scalar::<f32>()?,
            y.sum_all()?.to_scalar::<f32>()?,
        ))
    })?;
    rows.push([
        format!("d={d}, N={n}: factorised scoring"),
        format!("{:.3} s", t_fact),
        format!("{} codes", codes.recon.len()),
    ]);
    rows.push([
        format!("d={d}, N={n}: two plain N x d x H GEMMs"),
        format!("{:.3} s", t_gemm),
        String::new(),
    ]);
    rows.push([
        "scoring / GEMMs".into(),
        format!("{:.2}x", t_fact / t_gemm),
        "target <= 3x".into(),
    ]);
    let pool_mib = (pool.len() * 4) as f64 / 1048576.0;
    let sae_mib = (2 * h * d * d * 4) as f64 / 1048576.0;
    match (before, after, peak_ok) {
        (Some((rss, _)), Some((_, hwm)), true) => rows.push([
            "peak memory above pool + SAE during scoring".into(),
            format!(
                "{:.0} MiB (peak {hwm:.0}, before {rss:.0}; pool {pool_mib:.0}, SAE {sae_mib:.0})",
                hwm - rss
            ),
            "target <= 256 MiB".into(),
        ]),
        _ => rows.push([
            "peak memory".into(),
            "not measurable here (/proc)".into(),
            String::new(),
        ]),
    }
    drop((sae, pool, pool_t, codes));

    // 3. One SAE epoch.
    if a.epoch_records > 0 {
        let (d, m, r) = (768, 256, a.epoch_records);
        let n_pool = 20_000;
        let pool = unit_rows(&mut rng, n_pool, d);
        let prompts = unit_rows(&mut rng, r, d);
        let positives = unit_rows(&mut rng, r, d);
        let candidates: Vec<Vec<u32>> = (0..r)
            .map(|_| {
                rand::seq::index::sample(&mut rng, n_pool, m)
                    .into_iter()
                    .map(|i| i as u32)
                    .collect()
            })
            .collect();
        let data = TrainingSet {
            pool: &pool,
            prompts: &prompts,
            positives: &positives,
            candidates: &candidates,
            d,
        };
        let cfg = SaeTrainConfig {
            seed: a.seed,
            ..Default::default()
        };
        eprintln!(
            "one SAE epoch: {r} records x {m} candidates, d = {d}, H = {}, batch {} records...",
            cfg.hidden, cfg.batch_records
        );
        let t = Instant::now();
        let metrics = sae::bench_epoch(
            &cfg,
            &data,
            SaeConfig::for_embeddings(d, "bench", true),
            true,
        )
        .context("SAE epoch")?;
        rows.push([
            format!("SAE epoch, {r} records x {m} candidates, d={d}"),
            format!("{:.1} s", t.elapsed().as_secs_f64()),
            format!(
                "target <= 300 s; loss {:.4}, FVU {:.3}",
                metrics.loss, metrics.fvu
            ),
        ]);
    }

    println!("| measurement | value | note |\n|---|---|---|");
    for [m, v, note] in rows {
        println!("| {m} | {v} | {note} |");
    }
    println!(
        "\n({} threads; build: {})",
        rayon_threads(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
