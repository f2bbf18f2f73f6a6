//! Looks inside the misp sampler on a finished demo folder: how the SAE's codes of a record's
//! candidates spread, what the terms of Eq. 12 and Algorithm 1 weigh, and how diverse and how
//! valid the picks of several selection rules are, all on the same candidate sets.
//!
//! `cargo run --release -p misp --example probe_sampler -- DEMO_DIR [CANDIDATES...]`
//! (candidate specs as `misp mine --candidates`, default `knn:64`). Read-only on the folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use misp::embeddings::{PoolEmbeddings, RecordEmbeddings};
use misp::mine::candidates::{CandidateSpec, PoolIndex};
use misp::mine::select;
use misp::sae::Sae;
use misp::world::scene::Scene;
use misp::world::text::Claim;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;

/// A latent "fires" above this (the SAE metrics' firing threshold).
const FIRING: f32 = 0.1;
const K: usize = 3;

fn cos(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    if na > 0.0 && nb > 0.0 {
        dot / (na * nb)
    } else {
        0.0
    }
}

fn mean_pairwise(rows: &[&[f32]]) -> f64 {
    let (mut s, mut n) = (0.0, 0);
    for i in 0..rows.len() {
        for j in i + 1..rows.len() {
            s += 1.0 - cos(rows[i], rows[j]);
            n += 1;
        }
    }
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn std(v: &[f64]) -> f64 {
    let m = mean(v);
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len().max(1) as f64).sqrt()
}

#[derive(Default)]
struct Tally {
    clip_div: Vec<f64>,
    code_div: Vec<f64>,
    valid: usize,
    total: usize,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = PathBuf::from(
        args.first()
            .expect("usage: probe_sampler DEMO_DIR [SPEC...]"),
    );
    let specs: Vec<CandidateSpec> = if args.len() > 1 {
        args[1..]
            .iter()
            .map(|s| s.parse().expect("candidate spec"))
            .collect()
    } else {
        vec!["knn:64".parse().unwrap()]
    };
    let pool = PoolEmbeddings::load(&dir.join("embed/pool")).expect("pool embeddings");
    let recs = RecordEmbeddings::load(&dir.join("embed/records")).expect("record embeddings");
    let sae = Sae::load(&dir.join("sae")).expect("sae");
    let (scenes, claims) = world(&dir.join("world"));
    let index = PoolIndex::new(&pool).expect("index");
    println!(
        "pool {} images, {} records, SAE H = {}",
        pool.len(),
        recs.len(),
        sae.config.hidden
    );
    for spec in specs {
        probe(&pool, &recs, &sae, &index, spec, &scenes, &claims);
    }
}

fn world(w: &Path) -> (HashMap<String, Scene>, HashMap<String, Vec<Claim>>) {
    let scenes = std::fs::read_to_string(w.join("scenes.jsonl"))
        .expect("scenes.jsonl")
        .lines()
        .filter_map(|l| serde_json::from_str::<Scene>(l).ok())
        .map(|s| (s.image.clone(), s))
        .collect();
    let claims = std::fs::read_to_string(w.join("records.jsonl"))
        .expect("records.jsonl")
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            let c: Vec<Claim> = serde_json::from_value(v["claims"].clone()).ok()?;
            Some((v["id"].as_str()?.to_string(), c))
        })
        .collect();
    (scenes, claims)
}

#[allow(clippy::too_many_arguments)]
fn probe(
    pool: &PoolEmbeddings,
    recs: &RecordEmbeddings,
    sae: &Sae,
    index: &PoolIndex,
    spec: CandidateSpec,
    scenes: &HashMap<String, Scene>,
    claims: &HashMap<String, Vec<Claim>>,
) {
    let d = pool.meta.dim;
    // Selection rules compared on the same candidate sets.
    let rules: Vec<(&str, f64)> = vec![
        ("Algorithm 1, lambda 0 (top-K by s)", 0.0),
        ("Algorithm 1, lambda 0.5 (the default)", 0.5),
        ("Algorithm 1, lambda 2", 2.0),
        ("Algorithm 1, lambda 10", 10.0),
    ];
    let mut tallies: Vec<Tally> = (0..rules.len() + 1).map(|_| Tally::default()).collect();
    let (mut l0, mut zmin, mut zmax) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cand_code_div, mut cand_clip_div, mut ncand) = (Vec::new(), Vec::new(), Vec::new());
    let (mut recon_term_sd, mut l1_term_sd, mut l1_rel_spread) =
        (Vec::new(), Vec::new(), Vec::new());
    let (mut score_range, mut div_gain) = (Vec::new(), Vec::new());
    let (mut score_vs_clip, mut cand_valid) = (Vec::new(), Vec::new());
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let n_rec = recs.len();
    for i in 0..n_rec {
        let id = &recs.ids[i];
        let pos = recs.positive(i);
        let cosv = &index.cosines(pos).expect("cosines")[0];
        let rows = index.candidates(spec, cosv, &mut rng);
        if rows.len() < K {
            continue;
        }
        ncand.push(rows.len() as f64);
        let mut cand = Vec::with_capacity(rows.len() * d);
        for &r in &rows {
            cand.extend_from_slice(pool.row(r as usize));
        }
        let codes = sae
            .encode_candidates(pos, recs.prompt(i), &cand)
            .expect("encode");
        let h = codes.hidden;
        let zs: Vec<&[f32]> = codes.z.chunks(h).collect();
        for z in &zs {
            l0.push(z.iter().filter(|v| **v > FIRING).count() as f64);
            zmin.push(z.iter().cloned().fold(f32::INFINITY, f32::min) as f64);
            zmax.push(z.iter().cloned().fold(0.0, f32::max) as f64);
        }
        cand_code_div.push(mean_pairwise(&zs));
        let clips: Vec<&[f32]> = rows.iter().map(|&r| pool.row(r as usize)).collect();
        cand_clip_div.push(mean_pairwise(&clips));
        let max_r = codes.recon.iter().cloned().fold(0.0, f64::max);
        let max_l = codes.l1.iter().cloned().fold(0.0, f64::max);
        let rt: Vec<f64> = codes.recon.iter().map(|r| r / max_r).collect();
        let lt: Vec<f64> = codes.l1.iter().map(|l| l / max_l).collect();
        recon_term_sd.push(std(&rt));
        l1_term_sd.push(std(&lt));
        let lmin = codes.l1.iter().cloned().fold(f64::INFINITY, f64::min);
        l1_rel_spread.push((max_l - lmin) / max_l);
        let scores = select::eq12_scores(&codes.recon, &codes.l1);
        let smax = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let smin = scores.iter().cloned().fold(f64::INFINITY, f64::min);
        score_range.push(smax - smin);
        // Rank correlation proxy: Pearson of score with CLIP cosine to the positive.
        let cs: Vec<f64> = rows.iter().map(|&r| f64::from(cosv[r as usize])).collect();
        score_vs_clip.push(pearson(&scores, &cs));
        let record_claims = claims.get(id);
        let is_valid = |row: u32| -> Option<bool> {
            let scene = scenes.get(&pool.ids[row as usize])?;
            Some(record_claims?.iter().any(|c| !c.holds(scene)))
        };
        let cv: Vec<f64> = rows
            .iter()
            .filter_map(|&r| is_valid(r))
            .map(|b| if b { 1.0 } else { 0.0 })
            .collect();
        cand_valid.push(mean(&cv));
        let record = |t: &mut Tally, picks: &[usize]| {
            let c: Vec<&[f32]> = picks.iter().map(|&p| clips[p]).collect();
            let z: Vec<&[f32]> = picks.iter().map(|&p| zs[p]).collect();
            t.clip_div.push(mean_pairwise(&c));
            t.code_div.push(mean_pairwise(&z));
            for &p in picks {
                if let Some(v) = is_valid(rows[p]) {
                    t.total += 1;
                    t.valid += usize::from(v);
                }
            }
        };
        for (ri, (_, lambda)) in rules.iter().enumerate() {
            let picks: Vec<usize> = select::greedy(&scores, &codes.z, h, K, *lambda, 1.0)
                .iter()
                .map(|p| p.index)
                .collect();
            if *lambda == 0.5 {
                // What the diversity term added at picks 2..K: lambda * min distance.
                let g = select::greedy(&scores, &codes.z, h, K, 0.0, 1.0);
                let changed = g.iter().zip(&picks).filter(|(a, b)| a.index != **b).count();
                div_gain.push(changed as f64);
            }
            record(&mut tallies[ri], &picks);
        }
        // Uniform K among the same candidates, and uniform K among the whole eligible pool.
        let mut idx: Vec<usize> = (0..rows.len()).collect();
        idx.shuffle(&mut rng);
        record(&mut tallies[rules.len()], &idx[..K]);
    }
    // Random from the whole pool, for scale.
    let mut whole = Tally::default();
    for i in 0..n_rec {
        let pos = recs.positive(i);
        let cosv = &index.cosines(pos).expect("cosines")[0];
        let rows = index.random(cosv, K, &mut rng);
        let c: Vec<&[f32]> = rows.iter().map(|&r| pool.row(r as usize)).collect();
        whole.clip_div.push(mean_pairwise(&c));
        for &r in &rows {
            if let (Some(scene), Some(cl)) =
                (scenes.get(&pool.ids[r as usize]), claims.get(&recs.ids[i]))
            {
                whole.total += 1;
                whole.valid += usize::from(cl.iter().any(|c| !c.holds(scene)));
            }
        }
    }
    println!(
        "\n== candidates {spec}: {:.0} per record on average",
        mean(&ncand)
    );
    println!(
        "codes: latents firing (z > {FIRING}) per candidate {:.2} (sd {:.2}); z min {:.4}, z max {:.3}",
        mean(&l0),
        std(&l0),
        mean(&zmin),
        mean(&zmax)
    );
    println!(
        "spread among a record's candidates: code 1-cos {:.3}, CLIP 1-cos {:.3}",
        mean(&cand_code_div),
        mean(&cand_clip_div)
    );
    println!(
        "Eq. 12 terms within a record: sd of recon/max {:.3}, sd of l1/max {:.4} ((max-min)/max of l1 {:.4}); score range {:.3}",
        mean(&recon_term_sd),
        mean(&l1_term_sd),
        mean(&l1_rel_spread),
        mean(&score_range)
    );
    println!(
        "Pearson(score, CLIP cos to positive) within a record: {:.3}; validity of all candidates {:.1}%",
        mean(&score_vs_clip.iter().cloned().filter(|x| x.is_finite()).collect::<Vec<_>>()),
        100.0 * mean(&cand_valid)
    );
    println!(
        "lambda = 0.5 changed {:.2} of {K} picks vs lambda = 0",
        mean(&div_gain)
    );
    println!("| rule | CLIP diversity | code diversity | validity |");
    let names: Vec<String> = rules
        .iter()
        .map(|(n, _)| n.to_string())
        .chain(["uniform K of the candidates".to_string()])
        .collect();
    for (n, t) in names.iter().zip(&tallies) {
        println!(
            "| {n} | {:.3} | {:.3} | {:.1}% |",
            mean(&t.clip_div),
            mean(&t.code_div),
            100.0 * t.valid as f64 / t.total.max(1) as f64
        );
    }
    println!(
        "| uniform K of the whole pool | {:.3} | - | {:.1}% |",
        mean(&whole.clip_div),
        100.0 * whole.valid as f64 / whole.total.max(1) as f64
    );
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let (ma, mb) = (mean(a), mean(b));
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}
