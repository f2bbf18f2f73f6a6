//! Mining end to end on small synthetic embeddings: SAE training, every strategy, resume,
//! sharding, sampling by seed, and bad inputs (missing, malformed and mismatched stores).

use std::path::{Path, PathBuf};

use misp::embeddings::{EmbeddingMeta, PoolEmbeddings, RecordEmbeddings, StoreDType};
use misp::mine::{self, candidates::CandidateSpec, negatives, MineConfig, SelectMode, Shard};
use misp::sae::{self, Sae, SaeConfig, SaeTrainConfig, TrainingSet};

const D: usize = 8;

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("misp-mine-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Deterministic pseudo-random unit vectors.
fn unit_rows(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut out = Vec::with_capacity(n * D);
    for _ in 0..n {
        let row: Vec<f32> = (0..D)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect();
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        out.extend(row.iter().map(|x| x / norm));
    }
    out
}

struct World {
    dir: PathBuf,
    pool: PoolEmbeddings,
    records: RecordEmbeddings,
    sae_dir: PathBuf,
    sae: Sae,
}

fn meta() -> EmbeddingMeta {
    EmbeddingMeta {
        clip_model: "synthetic".into(),
        dim: D,
        normalized: true,
    }
}

fn world(name: &str) -> World {
    let dir = tmp(name);
    let n_pool = 120;
    let n_rec = 17;
    let ids: Vec<String> = (0..n_pool).map(|i| format!("pool{i}")).collect();
    let paths: Vec<String> = ids.iter().map(|i| format!("{i}.png")).collect();
    PoolEmbeddings::write(
        &dir.join("pool"),
        &meta(),
        &ids,
        &paths,
        &unit_rows(n_pool, 1),
        StoreDType::F16,
    )
    .unwrap();
    let rids: Vec<String> = (0..n_rec).map(|i| format!("rec{i}")).collect();
    RecordEmbeddings::write(
        &dir.join("rec"),
        &meta(),
        &rids,
        &unit_rows(n_rec, 2),
        &unit_rows(n_rec, 3),
        StoreDType::F32,
    )
    .unwrap();
    let pool = PoolEmbeddings::load(&dir.join("pool")).unwrap();
    let records = RecordEmbeddings::load(&dir.join("rec")).unwrap();
    let cands = mine::candidate_sets(&pool, &records, CandidateSpec::Knn(16), 0, false).unwrap();
    let data = TrainingSet {
        pool: &pool.embeds,
        prompts: &records.prompts,
        positives: &records.positives,
        candidates: &cands,
        d: D,
    };
    let cfg = SaeTrainConfig {
        epochs: 2,
        batch_records: 4,
        lr: Some(1e-2),
        hidden: 6,
        ..Default::default()
    };
    let sae_dir = dir.join("sae");
    sae::train(
        &cfg,
        &data,
        SaeConfig::for_embeddings(D, "synthetic", true),
        &sae_dir,
        false,
    )
    .unwrap();
    let sae = Sae::load(&sae_dir).unwrap();
    World {
        dir,
        pool,
        records,
        sae_dir,
        sae,
    }
}

impl World {
    fn mine(&self, cfg: &MineConfig, out: &Path) -> Result<mine::MineReport, mine::MineError> {
        mine::mine(
            cfg,
            &self.pool,
            &self.records,
            Some((&self.sae, &self.sae_dir)),
            out,
            false,
        )
    }
}

/// The mining mechanics tests run on random embeddings, on which no SAE learns much: they
/// allow that (the refusal has its own test).
fn cfg(strategy: &str) -> MineConfig {
    MineConfig {
        strategy: strategy.into(),
        candidates: "knn:16".into(),
        allow_untrained_sae: true,
        ..Default::default()
    }
}

#[test]
fn misp_mining_writes_k_scored_negatives_per_record() {
    let w = world("misp");
    let out = w.dir.join("neg.jsonl");
    let report = w.mine(&cfg("misp"), &out).unwrap();
    assert_eq!(
        (report.records, report.written, report.already_done),
        (17, 17, 0)
    );
    let recs = negatives::read(&out).unwrap();
    assert_eq!(recs.len(), 17);
    for (r, rec) in recs.iter().enumerate() {
        assert_eq!(rec.id, format!("rec{r}"), "record order is kept");
        assert_eq!(rec.negatives.len(), 3);
        let mut images: Vec<&str> = rec.negatives.iter().map(|n| n.image.as_str()).collect();
        images.dedup();
        assert_eq!(images.len(), 3, "distinct picks");
        for n in &rec.negatives {
            assert!(n.image.starts_with("pool") && n.strategy == "misp");
            let (s, q) = (n.score.unwrap(), n.q.unwrap());
            assert!((0.0..=2.0).contains(&s) && q > 0.0 && q <= 1.0);
            assert!(n.recon.unwrap() >= 0.0 && n.l1.unwrap() > 0.0);
        }
        // The first greedy pick is the best-scored candidate.
        let best = rec
            .negatives
            .iter()
            .map(|n| n.score.unwrap())
            .fold(f64::MIN, f64::max);
        assert_eq!(rec.negatives[0].score.unwrap(), best);
    }
    assert!(w.dir.join("neg.config.json").exists() && w.dir.join("neg.report.json").exists());
}

#[test]
fn resume_and_shards_reproduce_the_uninterrupted_file() {
    let w = world("resume");
    let full = w.dir.join("full.jsonl");
    w.mine(&cfg("misp"), &full).unwrap();
    let text = std::fs::read_to_string(&full).unwrap();

    // Interrupted: keep 6 complete lines and half of the 7th, then re-run.
    let partial = w.dir.join("partial.jsonl");
    std::fs::copy(
        w.dir.join("full.config.json"),
        w.dir.join("partial.config.json"),
    )
    .unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let cut = format!("{}\n{}", lines[..6].join("\n"), &lines[6][..20]);
    std::fs::write(&partial, cut).unwrap();
    let report = w.mine(&cfg("misp"), &partial).unwrap();
    assert_eq!((report.already_done, report.written), (6, 11));
    assert_eq!(std::fs::read_to_string(&partial).unwrap(), text);

    // Three shards, concatenated in order.
    let mut joined = String::new();
    for i in 0..3 {
        let out = w.dir.join(format!("shard{i}.jsonl"));
        let c = MineConfig {
            shard: Shard { index: i, count: 3 },
            ..cfg("misp")
        };
        w.mine(&c, &out).unwrap();
        joined.push_str(&std::fs::read_to_string(&out).unwrap());
    }
    assert_eq!(joined, text);

    // Resuming with other settings is refused.
    let other = MineConfig {
        k: 2,
        ..cfg("misp")
    };
    let err = w.mine(&other, &full).unwrap_err().to_string();
    assert!(err.contains("other settings"), "{err}");
}

#[test]
fn sample_mode_is_seeded_and_q_gives_finite_is_weights() {
    let w = world("sample");
    let run = |seed, name: &str| {
        let out = w.dir.join(name);
        w.mine(
            &MineConfig {
                select: SelectMode::Sample,
                seed,
                ..cfg("misp")
            },
            &out,
        )
        .unwrap();
        negatives::read(&out).unwrap()
    };
    let (a, b, c) = (run(5, "a.jsonl"), run(5, "b.jsonl"), run(6, "c.jsonl"));
    assert_eq!(a, b);
    assert_ne!(a, c);
    // The trainer's IS weights w = softmax(a - log q) for arbitrary advantages stay finite.
    for rec in &a {
        for adv in [-1e4, 0.0, 1e4] {
            let logits: Vec<f64> = rec
                .negatives
                .iter()
                .map(|n| adv - n.q.unwrap().ln())
                .collect();
            let m = logits.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
            assert!(logits.iter().all(|l| ((l - m).exp() / z).is_finite()));
        }
    }
}

#[test]
fn every_strategy_fills_its_slots() {
    let w = world("strategies");
    for (strategy, want) in [
        ("random", vec!["random"; 3]),
        ("similarity", vec!["similarity"; 3]),
        ("crop", vec!["crop"; 3]),
        ("noise", vec!["noise"; 3]),
        ("noise+misp", vec!["noise", "misp", "misp"]),
        ("crop+noise+misp", vec!["crop", "noise", "misp"]),
    ] {
        let out = w.dir.join(format!("{}.jsonl", strategy.replace('+', "_")));
        w.mine(&cfg(strategy), &out).unwrap();
        for rec in negatives::read(&out).unwrap() {
            let got: Vec<&str> = rec.negatives.iter().map(|n| n.strategy.as_str()).collect();
            assert_eq!(got, want, "{strategy}");
            for n in &rec.negatives {
                match n.strategy.as_str() {
                    "crop" | "noise" => {
                        assert!(n.seed.is_some() && n.q.is_none() && n.image == n.strategy)
                    }
                    "random" => {
                        // Uniform over the eligible pool: q = 1 / (120 minus near-duplicates).
                        let inv = 1.0 / n.q.unwrap();
                        assert!(
                            inv <= 120.0 && (inv - inv.round()).abs() < 1e-9,
                            "q = {:?}",
                            n.q
                        );
                    }
                    _ => assert!(n.image.starts_with("pool")),
                }
            }
        }
    }
}

#[test]
fn mismatched_inputs_are_clear_errors() {
    let w = world("bad");
    let out = w.dir.join("x.jsonl");
    // K larger than the candidate set.
    let err = w
        .mine(
            &MineConfig {
                k: 20,
                ..cfg("misp")
            },
            &out,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("candidate set knn:16 has only 16"), "{err}");
    // An SAE for another d.
    let other = Sae::init(
        SaeConfig {
            hidden: 4,
            ..SaeConfig::for_embeddings(4, "synthetic", true)
        },
        0,
    )
    .unwrap();
    let err = mine::mine(
        &cfg("misp"),
        &w.pool,
        &w.records,
        Some((&other, Path::new("other_sae"))),
        &out,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("other_sae/config.json") && err.contains("d = 4"),
        "{err}"
    );
    // An SAE for another CLIP model.
    let other = Sae::init(
        SaeConfig {
            hidden: 4,
            ..SaeConfig::for_embeddings(D, "openai/clip-vit-base-patch32", true)
        },
        0,
    )
    .unwrap();
    let err = mine::mine(
        &cfg("misp"),
        &w.pool,
        &w.records,
        Some((&other, Path::new("s"))),
        &out,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("clip_model"), "{err}");
    // Misp without an SAE.
    let err = mine::mine(&cfg("misp"), &w.pool, &w.records, None, &out, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs a trained SAE"), "{err}");
}

#[test]
fn non_finite_records_are_skipped_and_counted() {
    let w = world("nan");
    let mut prompts = w.records.prompts.clone();
    prompts[3 * D] = f32::NAN;
    let dir = w.dir.join("rec_nan");
    RecordEmbeddings::write(
        &dir,
        &meta(),
        &w.records.ids,
        &prompts,
        &w.records.positives,
        StoreDType::F32,
    )
    .unwrap();
    let records = RecordEmbeddings::load(&dir).unwrap();
    let out = w.dir.join("nan.jsonl");
    let report = mine::mine(
        &cfg("misp"),
        &w.pool,
        &records,
        Some((&w.sae, &w.sae_dir)),
        &out,
        false,
    )
    .unwrap();
    assert_eq!(report.written, 16);
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(report.skipped[0].id, "rec3");
}

#[test]
fn an_sae_that_did_not_learn_is_refused_unless_allowed() {
    let w = world("untrained");
    let out = w.dir.join("neg.jsonl");
    // No training summary: made outside `misp sae train`.
    let fresh_dir = w.dir.join("fresh-sae");
    let fresh = Sae::init(SaeConfig::for_embeddings(D, "synthetic", true), 3).unwrap();
    fresh.save(&fresh_dir).unwrap();
    let fresh = Sae::load(&fresh_dir).unwrap();
    let strict = MineConfig {
        allow_untrained_sae: false,
        ..cfg("misp")
    };
    let run = |sae: &Sae, dir: &Path, c: &MineConfig| {
        mine::mine(c, &w.pool, &w.records, Some((sae, dir)), &out, false)
    };
    let e = run(&fresh, &fresh_dir, &strict).unwrap_err().to_string();
    assert!(
        e.contains("no training summary") && e.contains("--allow-untrained-sae"),
        "{e}"
    );
    // A summary whose FVU says it did not learn.
    let mut weak = Sae::load(&w.sae_dir).unwrap();
    let mut t = weak.training.clone().expect("trained by sae::train");
    t.fvu = 0.95;
    weak.training = Some(t);
    let e = run(&weak, &w.sae_dir, &strict).unwrap_err().to_string();
    assert!(e.contains("FVU 0.950 >= 0.9"), "{e}");
    assert!(!out.exists() || std::fs::read(&out).unwrap().is_empty());
    // Allowed on request; strategies without an SAE part never ask.
    run(&weak, &w.sae_dir, &cfg("misp")).unwrap();
    let random = MineConfig {
        allow_untrained_sae: false,
        ..cfg("random")
    };
    mine::mine(
        &random,
        &w.pool,
        &w.records,
        Some((&weak, &w.sae_dir)),
        &w.dir.join("r.jsonl"),
        false,
    )
    .unwrap();
}
