//! The demo report's arithmetic: what `results.json` keeps, how runs are paired, the intervals
//! and verdicts of the paper's claims, and negative validity on a hand-made world.

use std::collections::BTreeMap;

use serde_json::Value;

use super::*;

/// A run's metrics with POPE-adversarial F1 `f1` and CHAIR_s `chair_s`.
fn run(variant: &str, seed: Option<u64>, f1: f64, chair_s: f64) -> RunMetrics {
    let mut m = BTreeMap::new();
    m.insert(
        "pope/adversarial".to_string(),
        BTreeMap::from([("f1".to_string(), f1)]),
    );
    m.insert(
        "chair".to_string(),
        BTreeMap::from([("chair_s".to_string(), chair_s)]),
    );
    (variant.to_string(), seed, m)
}

/// misp and random over three seeds, listed out of seed order to check pairing by seed.
fn three_seeds() -> Value {
    aggregate_metrics(&[
        run("base", None, 0.78, 0.35),
        run("misp", Some(0), 0.80, 0.30),
        run("misp", Some(1), 0.82, 0.28),
        run("misp", Some(2), 0.81, 0.29),
        run("random", Some(2), 0.80, 0.33),
        run("random", Some(0), 0.79, 0.33),
        run("random", Some(1), 0.80, 0.31),
    ])
}

const F1: Metric = METRICS[0];
const CHAIR_S: Metric = METRICS[1];

#[test]
fn results_keep_every_seed_and_its_value() {
    let v = three_seeds();
    let runs = v["random"]["pope/adversarial"]["f1"]["runs"]
        .as_array()
        .unwrap();
    let pairs: Vec<(u64, f64)> = runs
        .iter()
        .map(|r| (r["seed"].as_u64().unwrap(), r["value"].as_f64().unwrap()))
        .collect();
    assert_eq!(pairs, vec![(2, 0.80), (0, 0.79), (1, 0.80)]);
    // mean 0.79667, sample std of (0.80, 0.79, 0.80) = 0.0057735
    let m = &v["random"]["pope/adversarial"]["f1"];
    assert!((m["mean"].as_f64().unwrap() - 0.796_666_666_7).abs() < 1e-9);
    assert!((m["std"].as_f64().unwrap() - 0.005_773_502_7).abs() < 1e-9);
    assert!(v["base"]["chair"]["chair_s"]["runs"][0]["seed"].is_null());
}

#[test]
fn differences_pair_runs_by_seed_not_by_position() {
    let v = three_seeds();
    let d = paired_differences(&v, "misp", "random", &F1);
    let seeds: Vec<u64> = d.iter().map(|(s, _)| *s).collect();
    assert_eq!(seeds, vec![0, 1, 2]);
    for ((_, got), want) in d.iter().zip([1.0, 2.0, 1.0]) {
        assert!((got - want).abs() < 1e-9, "{d:?}");
    }
    // A seed only one variant ran is not a pair.
    let mut extra = three_seeds();
    extra["misp"]["pope/adversarial"]["f1"]["runs"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"seed": 9, "value": 0.9}));
    assert_eq!(paired_differences(&extra, "misp", "random", &F1).len(), 3);
}

#[test]
fn intervals_and_verdicts_of_a_claim_by_hand() {
    let v = three_seeds();
    let claim = CLAIMS[0];
    assert_eq!((claim.a, claim.b), ("misp", "random"));
    // F1 differences 1, 2, 1 points: mean 4/3, sd sqrt(1/3), se 1/3, t_{0.975,2} = 4.3026527:
    // [-0.10088, 2.76755], covering 0.
    let f1 = Comparison::new(&v, claim, F1);
    let iv = f1.interval.unwrap();
    assert!((iv.mean - 4.0 / 3.0).abs() < 1e-9);
    assert!(
        (iv.lo - (4.0 / 3.0 - 4.302_652_73 / 3.0)).abs() < 1e-6,
        "{iv:?}"
    );
    assert!(
        (iv.hi - (4.0 / 3.0 + 4.302_652_73 / 3.0)).abs() < 1e-6,
        "{iv:?}"
    );
    assert_eq!(f1.verdict, stats::Verdict::NoDifference);
    assert_eq!(f1.verdict_text(), "no difference measurable");
    // CHAIR_s differences -3, -3, -4 points: [-4.768, -1.899], lower is better: misp beats.
    let cs = Comparison::new(&v, claim, CHAIR_S);
    let iv = cs.interval.unwrap();
    assert!((iv.mean + 10.0 / 3.0).abs() < 1e-9);
    assert!(
        (iv.hi - (-10.0 / 3.0 + 4.302_652_73 / 3.0)).abs() < 1e-6,
        "{iv:?}"
    );
    assert_eq!(cs.verdict, stats::Verdict::Better);
    assert_eq!(cs.verdict_text(), "misp beats random");
    assert_eq!(cs.interval_text(), "-3.33 [-4.77, -1.90]");
    // The sentence follows the intervals: a gain on one metric, nothing shown on the other.
    let s = claim_sentence(&claim, &[&f1, &cs]);
    assert!(s.contains("misp beats random on CHAIR_s"), "{s}");
    assert!(s.contains("no difference measurable on POPE adv F1"), "{s}");
    assert!(s.contains("the claim holds here"), "{s}");
}

#[test]
fn one_seed_gives_no_verdict_and_unrun_claims_are_left_out() {
    let v = aggregate_metrics(&[
        run("misp", Some(0), 0.80, 0.30),
        run("random", Some(0), 0.70, 0.40),
    ]);
    let comps = comparisons(&v);
    // Only misp vs random was run; every metric of it is compared.
    assert!(comps.iter().all(|c| c.claim.b == "random"));
    let f1 = comps
        .iter()
        .find(|c| c.metric.label == "POPE adv F1")
        .unwrap();
    assert_eq!(f1.verdict, stats::Verdict::TooFewSeeds);
    assert!(
        f1.interval_text().contains("one seed"),
        "{}",
        f1.interval_text()
    );
    let s = claim_sentence(&CLAIMS[0], &[f1]);
    assert!(s.contains("no verdict"), "{s}");
}

#[test]
fn the_same_claim_holds_only_while_no_difference_is_measured() {
    let claim = CLAIMS[5];
    assert!(claim.same);
    let v = aggregate_metrics(&[
        run("misp", Some(0), 0.80, 0.30),
        run("misp", Some(1), 0.81, 0.30),
        run("misp", Some(2), 0.80, 0.31),
        run("misp-exact", Some(0), 0.81, 0.30),
        run("misp-exact", Some(1), 0.80, 0.31),
        run("misp-exact", Some(2), 0.80, 0.30),
    ]);
    let cs: Vec<Comparison> = METRICS[..2]
        .iter()
        .map(|m| Comparison::new(&v, claim, *m))
        .collect();
    let s = claim_sentence(&claim, &cs.iter().collect::<Vec<_>>());
    assert!(s.contains("consistent with the claim"), "{s}");
    // Exact consistently better on CHAIR_s: the claim fails.
    let v = aggregate_metrics(&[
        run("misp", Some(0), 0.80, 0.30),
        run("misp", Some(1), 0.81, 0.31),
        run("misp", Some(2), 0.80, 0.32),
        run("misp-exact", Some(0), 0.80, 0.25),
        run("misp-exact", Some(1), 0.81, 0.27),
        run("misp-exact", Some(2), 0.80, 0.26),
    ]);
    let c = Comparison::new(&v, claim, CHAIR_S);
    assert_eq!(c.verdict, stats::Verdict::Worse);
    assert!(claim_sentence(&claim, &[&c]).contains("the claim does not hold"));
}

/// A world of three pool scenes and two records, written by hand.
fn tiny_world(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("misp-demo-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let obj = |shape: &str, colour: &str, cell: u8| {
        format!(
            r#"{{"shape":"{shape}","colour":"{colour}","size":"large","cell":{cell},"visibility":"clear"}}"#
        )
    };
    let scene = |i: usize, objects: &[String]| {
        format!(
            r#"{{"id":"pool-{i:05}","split":"pool","image":"images/pool/{i:05}.png","objects":[{}]}}"#,
            objects.join(",")
        )
    };
    let scenes = [
        // 0: a red ring only.
        scene(0, &[obj("ring", "red", 0)]),
        // 1: a ring and a cross.
        scene(1, &[obj("ring", "blue", 1), obj("cross", "green", 4)]),
        // 2: a cross only.
        scene(2, &[obj("cross", "red", 3)]),
    ];
    std::fs::write(dir.join("scenes.jsonl"), scenes.join("\n") + "\n").unwrap();
    let records = [
        // "there is a ring": wrong on scene 2 only.
        r#"{"id":"rec-a","image":"x","prompt":"p","chosen":"c","rejected":"r","kind":"exists_yes","scene":"s","claims":[{"claim":"exists","shape":"ring","present":true}]}"#,
        // "there is no cross": wrong on scenes 1 and 2.
        r#"{"id":"rec-b","image":"x","prompt":"p","chosen":"c","rejected":"r","kind":"exists_no","scene":"s","claims":[{"claim":"exists","shape":"cross","present":false}]}"#,
    ];
    std::fs::write(dir.join("records.jsonl"), records.join("\n") + "\n").unwrap();
    let neg = |img: usize| format!(r#"{{"image":"images/pool/{img:05}.png","strategy":"random"}}"#);
    let negs = [
        format!(
            r#"{{"id":"rec-a","negatives":[{},{},{}]}}"#,
            neg(0),
            neg(1),
            neg(2)
        ),
        format!(
            r#"{{"id":"rec-b","negatives":[{},{},{}]}}"#,
            neg(0),
            neg(1),
            neg(2)
        ),
        // A record the world does not have is not counted.
        format!(r#"{{"id":"rec-zzz","negatives":[{}]}}"#, neg(2)),
    ];
    std::fs::write(dir.join("negatives.jsonl"), negs.join("\n") + "\n").unwrap();
    dir
}

#[test]
fn negative_validity_counts_negatives_that_contradict_the_chosen_answer() {
    let dir = tiny_world("validity");
    // rec-a: scene 2 contradicts (1 of 3); rec-b: scenes 1 and 2 (2 of 3): 3 of 6.
    let (share, n) = negative_validity(&dir, &dir.join("negatives.jsonl")).unwrap();
    assert_eq!(n, 6);
    assert!((share - 0.5).abs() < 1e-12, "{share}");
    // No readable negatives: no row rather than a made-up share.
    assert!(negative_validity(&dir, &dir.join("missing.jsonl")).is_none());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sweeps_are_the_papers_and_an_unknown_one_lists_the_known() {
    let beta = Sweep::parse("beta").unwrap();
    assert_eq!(beta.values, vec!["0.1", "0.3", "0.5", "1.0"]);
    assert_eq!(beta.variant("0.3"), "misp@beta=0.3");
    assert_eq!(beta.max_k(), None);
    let k = Sweep::parse("k").unwrap();
    assert_eq!(k.values, vec!["1", "2", "3", "5"]);
    assert_eq!(k.max_k(), Some(5));
    let err = Sweep::parse("lr").unwrap_err();
    assert!(err.contains("unknown parameter `lr`"), "{err}");
    assert!(err.contains("known: beta, k"), "{err}");
}

#[test]
fn a_sweep_point_gets_the_mean_and_t_interval_of_its_seeds() {
    let v = aggregate_metrics(&[
        run("misp@beta=0.1", Some(0), 0.80, 0.30),
        run("misp@beta=0.1", Some(1), 0.82, 0.28),
        run("misp@beta=0.1", Some(2), 0.81, 0.29),
        run("misp@beta=1.0", Some(0), 0.70, 0.40),
    ]);
    // 80, 82, 81 points: mean 81, sd 1, se 1/sqrt(3), t_{0.975,2} = 4.3026527.
    let iv = point_interval(&v, "misp@beta=0.1", &F1).unwrap();
    let half = 4.302_652_73 / 3.0_f64.sqrt();
    assert!((iv.mean - 81.0).abs() < 1e-9);
    assert!((iv.lo - (81.0 - half)).abs() < 1e-6 && (iv.hi - (81.0 + half)).abs() < 1e-6);
    // One seed: the value, no width.
    let one = point_interval(&v, "misp@beta=1.0", &F1).unwrap();
    assert_eq!((one.n, one.lo, one.hi), (1, 70.0, 70.0));
    assert!(point_interval(&v, "misp@beta=0.5", &F1).is_none());
}

#[test]
fn variants_must_be_shipped_configs() {
    let plan = DemoPlan::new(true, None, false);
    let err = plan
        .clone()
        .with_variants(&["misp".into(), "chip".into()])
        .unwrap_err();
    assert!(err.contains("unknown variant `chip`"), "{err}");
    assert!(err.contains("text+noise"), "{err}");
    let plan = plan.with_variants(&["dpo".into()]).unwrap();
    assert_eq!(plan.variants, vec!["dpo".to_string()]);
    // --set overrides come after the demo's own, so they win.
    let plan = plan.with_sets(&["lr=3e-3".into()]);
    let sets = plan.train_sets(4);
    let lr: Vec<&String> = sets.iter().filter(|s| s.starts_with("lr=")).collect();
    assert_eq!(lr.last().map(|s| s.as_str()), Some("lr=3e-3"));
    assert_eq!(sets.last().map(|s| s.as_str()), Some("seed=4"));
}

#[test]
fn diversity_is_the_mean_pairwise_cosine_distance_by_hand() {
    let (e1, e2, e3) = ([1.0f32, 0.0], [0.0f32, 2.0], [-3.0f32, 0.0]);
    // Group 1: e1, e2 orthogonal: distance 1. Group 2: e1, e2, e3: pairs 1 (e1,e2), 2 (e1,e3),
    // 1 (e2,e3): mean 4/3. A group of one has no pair. Mean over groups: (1 + 4/3) / 2 = 7/6.
    let groups: Vec<Vec<&[f32]>> = vec![vec![&e1, &e2], vec![&e1, &e2, &e3], vec![&e3]];
    let d = mean_pairwise_distance(&groups).unwrap();
    assert!((d - 7.0 / 6.0).abs() < 1e-12, "{d}");
    assert!(mean_pairwise_distance(&[vec![&e1[..]]]).is_none());
}

/// A small world of `seed`, as `misp demo --world-seed` would draw it (same config otherwise).
fn drawn_world(name: &str, seed: u64) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("misp-demo-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = crate::world::WorldConfig {
        seed,
        image_size: 32,
        train_scenes: 400,
        val_scenes: 10,
        test_scenes: 20,
        pool_images: 10,
        records: 20,
        val_records: 5,
        ..crate::world::WorldConfig::default()
    };
    crate::world::generate(&cfg, &dir, false).unwrap();
    dir
}

#[test]
fn a_world_seed_draws_other_scenes_of_the_same_distribution_and_a_folder_keeps_its_seed() {
    let plan = DemoPlan::new(true, None, false);
    assert_eq!(plan.world_seed, SHIPPED_WORLD_SEED);
    let args = plan.with_world_seed(7).world_args(Path::new("d/world"));
    assert_eq!(
        args,
        ["world", "generate", "--out", "d/world", "--seed", "7", "--quick"]
    );

    let (a, a2, b) = (
        drawn_world("wseed-a", 7),
        drawn_world("wseed-a2", 7),
        drawn_world("wseed-b", 8),
    );
    let scenes = |d: &Path| std::fs::read_to_string(d.join("scenes.jsonl")).unwrap();
    assert_eq!(scenes(&a), scenes(&a2), "one seed, one world");
    let (sa, sb) = (scenes(&a), scenes(&b));
    let differ = sa.lines().zip(sb.lines()).filter(|(x, y)| x != y).count();
    assert!(
        differ > 400,
        "seed 8 repeats seed 7's scenes ({differ} differ)"
    );
    // The same distribution: the co-occurrence the models learned is drawn at the configured
    // 0.9 in both (pooled over ~400 train scenes the share's standard error is ~0.02).
    let rate = |d: &Path| {
        let m = read_json(&d.join("manifest.json")).unwrap();
        m["counts"]["train_partner_rate"].as_f64().unwrap()
    };
    for d in [&a, &b] {
        assert!((rate(d) - 0.9).abs() < 0.08, "{}", rate(d));
    }

    // A folder holds one world: its own seed passes, another is refused naming both.
    assert_eq!(world_seed_of(&a), Some(7));
    check_world_seed(&a, 7).unwrap();
    let err = check_world_seed(&a, 8).unwrap_err().to_string();
    assert!(
        err.contains("seed 7") && err.contains("asks for 8"),
        "{err}"
    );
    // No world yet: any seed may be drawn.
    check_world_seed(&a.join("nothing-here"), 8).unwrap();
    for d in [a, a2, b] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// A CHAIR-only run with its CHAIR_s and the two kinds.
fn kinds_run(variant: &str, seed: Option<u64>, all: f64, cooc: f64, misnamed: f64) -> RunMetrics {
    let m = BTreeMap::from([(
        "chair".to_string(),
        BTreeMap::from([
            ("chair_s".to_string(), all),
            ("chair_s_cooccurrence".to_string(), cooc),
            ("chair_s_misnamed".to_string(), misnamed),
        ]),
    )]);
    (variant.to_string(), seed, m)
}

#[test]
fn the_kinds_section_gives_multiples_of_the_base_and_the_target_verdict() {
    let v = aggregate_metrics(&[
        kinds_run("base", None, 0.40, 0.20, 0.25),
        kinds_run("dpo", Some(0), 0.36, 0.18, 0.24),
        kinds_run("dpo", Some(1), 0.34, 0.18, 0.22),
        kinds_run("misp", Some(0), 0.33, 0.10, 0.24),
        kinds_run("misp", Some(1), 0.31, 0.08, 0.24),
    ]);
    let names: Vec<String> = ["base", "dpo", "misp"].map(String::from).to_vec();
    let md = kinds_section(&v, &names);
    // misp: CHAIR_s 32.0 = 0.80x of 40, co-occurrence 9.0 = 0.45x of 20, misnamed 24.0 = 0.96x.
    assert!(
        md.contains("| misp | 32.0 (0.80x) | 9.0 (0.45x) | 24.0 (0.96x) |"),
        "{md}"
    );
    assert!(
        md.contains("| base | 40.0 (1.00x) | 20.0 (1.00x) | 25.0 (1.00x) |"),
        "{md}"
    );
    assert!(
        md.contains("The lowest CHAIR_s is misp's, **0.80x**"),
        "{md}"
    );
    assert!(md.contains("NOT met"), "{md}");
    assert!(
        md.contains("20% hallucinate by co-occurrence and 25% misname"),
        "{md}"
    );
    // Under 0.75x the sentence says met.
    let v = aggregate_metrics(&[
        kinds_run("base", None, 0.40, 0.20, 0.25),
        kinds_run("misp", Some(0), 0.28, 0.05, 0.24),
    ]);
    let md = kinds_section(&v, &["base".to_string(), "misp".to_string()]);
    assert!(md.contains("**0.70x** the base's (met;"), "{md}");
    // A results file without the kinds (an older demo) gets no section.
    assert!(kinds_section(&three_seeds(), &names).is_empty());
}
