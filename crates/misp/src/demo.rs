//! What `misp demo` needs beyond the stage commands it runs: its plan (variants, seeds, sizes),
//! the evaluation subsets, and the report — results over seeds, charts, training curves, the
//! paper's Figure 2 for ShapesWorld (t-SNE of misp-selected vs random negatives) and the share
//! of selected negatives that really contradict the chosen answer ("negative validity",
//! WORLD-NOTES 3), which only a world with scene graphs can measure.
//!
//! Reads the demo folder's outputs; writes `report.md`, `results.json` and PNGs in it.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{json, Value};

use crate::embeddings::PoolEmbeddings;
use crate::files::{read_lines, write_atomic, write_json_atomic, FileError};
use crate::report::plot::{bar_panels, interval_chart, line_chart, scatter_chart, Panel};
use crate::report::stats;
use crate::report::tsne::{tsne, TsneConfig};
use crate::world::scene::{Scene, Shape};
use crate::world::text::Claim;
use hallucination_kinds::{count_kinds, scene_shapes};

/// The shipped variant configs, compiled in so the demo does not depend on the working
/// directory.
pub const SHIPPED_CONFIGS: [(&str, &str); 10] = [
    ("misp", include_str!("../../../configs/misp.toml")),
    (
        "misp-exact",
        include_str!("../../../configs/misp-exact.toml"),
    ),
    (
        "misp-sample",
        include_str!("../../../configs/misp-sample.toml"),
    ),
    ("random", include_str!("../../../configs/random.toml")),
    (
        "similarity",
        include_str!("../../../configs/similarity.toml"),
    ),
    ("dpo", include_str!("../../../configs/dpo.toml")),
    ("mdpo", include_str!("../../../configs/mdpo.toml")),
    (
        "text+noise",
        include_str!("../../../configs/text+noise.toml"),
    ),
    (
        "noise+misp",
        include_str!("../../../configs/noise+misp.toml"),
    ),
    (
        "crop+noise+misp",
        include_str!("../../../configs/crop+noise+misp.toml"),
    ),
];

/// The world seed the shipped models were pretrained on (`misp world generate`'s default).
pub const SHIPPED_WORLD_SEED: u64 = 0;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path}: {message}")]
    Input { path: String, message: String },
}

fn bad(path: &Path, message: impl Into<String>) -> DemoError {
    DemoError::Input {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Sizes and settings of one demo.
#[derive(Debug, Clone)]
pub struct DemoPlan {
    pub quick: bool,
    pub variants: Vec<String>,
    pub seeds: Vec<u64>,
    pub k: usize,
    pub candidates: String,
    /// Most SAE epochs (it stops earlier on a held-out plateau).
    pub sae_epochs: usize,
    /// POPE questions per split (half yes, half no).
    pub pope_per_split: usize,
    /// Images captioned for CHAIR.
    pub chair_images: usize,
    /// `--set` overrides of every training run (chosen on the validation split).
    pub train: Vec<String>,
    /// A sweep of misp to run besides the variants (`--sweep`).
    pub sweep: Option<Sweep>,
    /// Seed of the world drawn (`--world-seed`): 0 is the shipped world the models were
    /// trained on; any other seed draws fresh scenes from the same distribution (the prior is
    /// fixed in code, not drawn), so a conclusion can be checked on scenes nobody tuned on.
    pub world_seed: u64,
}

impl DemoPlan {
    pub fn new(quick: bool, seeds: Option<Vec<u64>>, _validation: bool) -> Self {
        // Every variant a claim of the paper needs (see CLAIMS); --quick keeps four.
        let variants: Vec<String> = if quick {
            vec!["dpo", "mdpo", "random", "misp"]
        } else {
            vec![
                "dpo",
                "mdpo",
                "text+noise",
                "random",
                "similarity",
                "misp",
                "misp-exact",
            ]
        }
        .into_iter()
        .map(String::from)
        .collect();
        // Chosen on the validation split (bench/demo_tune): see TUNING. --quick is a smoke
        // run of every stage, not a result: 96 records (6 steps) instead of 240 (15); training
        // was two thirds of its time (32.6 of 48 s at load ~7).
        let train = [
            "epochs=1",
            if quick {
                "max_records=96"
            } else {
                "max_records=240"
            },
            "lora_r=16",
            "lora_alpha=32",
            "lora_dropout=0.0",
            "lr=1e-3",
            "image_weight=2",
            "batch_size=16",
            "micro_batch_size=8",
            "warmup_ratio=0.1",
            "checkpoint_every=0",
        ]
        .map(String::from)
        .to_vec();
        Self {
            quick,
            variants,
            // Twenty seeds: 15 left the paired intervals of misp - random / dpo / mDPO at
            // +-0.6 to +-1.07 points (5 seeds: +-0.8 to +-2.9), and a seed's 7 runs with their
            // evaluations take about 30 s on two cores (the demo's budget is 15 minutes).
            seeds: seeds.unwrap_or_else(|| if quick { vec![0] } else { (0..20).collect() }),
            k: 3,
            candidates: "knn:64".into(),
            // --quick: the held-out FVU is under 0.35 by epoch 3 and the plateau stop
            // rarely waits past 20; 8 epochs keep the sampler trained at a third of the cost.
            sae_epochs: if quick { 8 } else { 100 },
            // Every test scene's caption (300; the validation split has 150) and 600 of the
            // test split's 1352 questions per POPE file: with 150 captions the base's test
            // CHAIR_s (32.7) and the validation one (30.0) differed as much as training moved
            // either, so the per-seed values were mostly which images were drawn.
            pope_per_split: if quick { 100 } else { 600 },
            chair_images: if quick { 40 } else { 300 },
            train,
            sweep: None,
            world_seed: SHIPPED_WORLD_SEED,
        }
    }

    /// Draws the world with `seed` instead of the shipped one.
    pub fn with_world_seed(mut self, seed: u64) -> Self {
        self.world_seed = seed;
        self
    }

    /// Arguments of the `misp world generate` this plan runs into `world`.
    pub fn world_args(&self, world: &Path) -> Vec<String> {
        let mut args: Vec<String> = ["world", "generate", "--out"].map(String::from).to_vec();
        args.push(world.to_string_lossy().into_owned());
        args.extend(["--seed".to_string(), self.world_seed.to_string()]);
        if self.quick {
            args.push("--quick".into());
        }
        args
    }

    /// Mining strategies the variants need.
    pub fn strategies(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        for v in &self.variants {
            if let Some(s) = negatives_for(v) {
                if !out.contains(&s) {
                    out.push(s);
                }
            }
        }
        // The figure compares misp with random even when a variant is left out.
        for s in ["misp", "random"] {
            if !out.contains(&s) {
                out.push(s);
            }
        }
        out
    }

    /// `--set` overrides of the run with `seed`.
    pub fn train_sets(&self, seed: u64) -> Vec<String> {
        let mut sets = self.train.clone();
        sets.push(format!("seed={seed}"));
        sets
    }

    /// Trains only `variants` (shipped config names) instead of the plan's own.
    pub fn with_variants(mut self, variants: &[String]) -> Result<Self, String> {
        for v in variants {
            if !SHIPPED_CONFIGS.iter().any(|(name, _)| name == v) {
                let known: Vec<&str> = SHIPPED_CONFIGS.iter().map(|(n, _)| *n).collect();
                return Err(format!(
                    "--variants: unknown variant `{v}` (known: {})",
                    known.join(", ")
                ));
            }
        }
        if variants.is_empty() {
            return Err("--variants: give at least one".into());
        }
        self.variants = variants.to_vec();
        Ok(self)
    }

    /// Adds `--set KEY=VALUE` overrides after the demo's own (they win).
    pub fn with_sets(mut self, sets: &[String]) -> Self {
        self.train.extend(sets.iter().cloned());
        self
    }
}

/// One of the paper's sweeps of misp (`misp demo --sweep NAME`): a training key and its values.
#[derive(Debug, Clone, PartialEq)]
pub struct Sweep {
    /// The `--set` key swept (`beta`, `k`).
    pub key: &'static str,
    pub values: Vec<&'static str>,
    /// The figure the paper draws it in, for the report.
    pub source: &'static str,
}

/// The sweeps `--sweep` knows.
pub const SWEEPS: [(&str, &[&str], &str); 2] = [
    (
        "beta",
        &["0.1", "0.3", "0.5", "1.0"],
        "the paper's Figure 4 (beta)",
    ),
    (
        "k",
        &["1", "2", "3", "5"],
        "the paper's number-of-negatives study (K)",
    ),
];

impl Sweep {
    /// The sweep called `name`, or an error listing the known ones.
    pub fn parse(name: &str) -> Result<Self, String> {
        SWEEPS
            .iter()
            .find(|(key, _, _)| *key == name)
            .map(|(key, values, source)| Sweep {
                key,
                values: values.to_vec(),
                source,
            })
            .ok_or_else(|| {
                let known: Vec<&str> = SWEEPS.iter().map(|(k, _, _)| *k).collect();
                format!(
                    "--sweep: unknown parameter `{name}` (known: {})",
                    known.join(", ")
                )
            })
    }

    /// The variant name of one point: `misp@beta=0.3`.
    pub fn variant(&self, value: &str) -> String {
        format!("misp@{}={value}", self.key)
    }

    /// Most negatives a point needs (the misp file is mined with at least this many).
    pub fn max_k(&self) -> Option<usize> {
        (self.key == "k").then(|| {
            self.values
                .iter()
                .filter_map(|v| v.parse().ok())
                .max()
                .unwrap_or(0)
        })
    }
}

/// Mean and 95% t interval over seeds of one sweep point's metric (points, x100); not paired.
pub fn point_interval(variants: &Value, variant: &str, m: &Metric) -> Option<stats::Interval> {
    let vals: Vec<f64> = seed_values(variants, variant, m)
        .into_iter()
        .map(|(_, v)| 100.0 * v)
        .collect();
    match vals.as_slice() {
        [] => None,
        [one] => Some(stats::Interval {
            n: 1,
            mean: *one,
            lo: *one,
            hi: *one,
        }),
        _ => stats::t_interval(&vals, stats::LEVEL),
    }
}

/// The report's section of a sweep: a table and a chart per headline metric (`out/sweep-KEY-*.png`).
fn sweep_section(out: &Path, variants: &Value, sweep: &Sweep, md: &mut String) {
    let _ = writeln!(
        md,
        "## Sweep of {} ({})\n\nmisp trained with `{}` set to each value, the other settings as above; mean over seeds with a 95% t interval over seeds (not paired; points).\n",
        sweep.key, sweep.source, sweep.key
    );
    let headline = &METRICS[..2];
    let _ = writeln!(
        md,
        "| {} | {} | seeds |\n|---|---|---|---|",
        sweep.key,
        headline
            .iter()
            .map(|m| m.label)
            .collect::<Vec<_>>()
            .join(" | ")
    );
    for value in &sweep.values {
        let v = sweep.variant(value);
        let cells: Vec<String> = headline
            .iter()
            .map(|m| match point_interval(variants, &v, m) {
                Some(iv) if iv.n > 1 => {
                    format!("{:.1} [{:.1}, {:.1}]", iv.mean, iv.lo, iv.hi)
                }
                Some(iv) => format!("{:.1}", iv.mean),
                None => "-".into(),
            })
            .collect();
        let n = seed_values(variants, &v, &METRICS[0]).len();
        let _ = writeln!(md, "| {value} | {} | {n} |", cells.join(" | "));
    }
    for m in headline {
        let mut pts = Vec::new();
        let mut ivs = Vec::new();
        for value in &sweep.values {
            let (Ok(x), Some(iv)) = (
                value.parse::<f64>(),
                point_interval(variants, &sweep.variant(value), m),
            ) else {
                continue;
            };
            pts.push((x, iv.mean));
            ivs.push((iv.lo, iv.hi));
        }
        let file = format!("sweep-{}-{}.png", sweep.key, m.key);
        if !pts.is_empty()
            && interval_chart(
                &out.join(&file),
                &format!("misp: {} vs {} (95% CI over seeds)", m.label, sweep.key),
                &[("misp".to_string(), pts)],
                &[ivs],
                sweep.key,
                &format!("{} (points)", m.label),
            )
            .is_ok()
        {
            let _ = writeln!(md, "\n![{} vs {}]({file})", m.label, sweep.key);
        }
    }
    let _ = writeln!(md);
}

/// How the demo's training settings were chosen: the committed table of the search on the
/// validation split (bench/demo_tune/tune.sh writes it).
pub const TUNING: &str = include_str!("../../../bench/demo_tune/results.md");

/// The negatives file a variant trains on (`None`: it needs none).
pub fn negatives_for(variant: &str) -> Option<&'static str> {
    match variant {
        "misp" | "misp-exact" | "misp-sample" => Some("misp"),
        "random" => Some("random"),
        "similarity" => Some("similarity"),
        _ => None,
    }
}

/// One model to evaluate: the base or a trained run.
#[derive(Debug, Clone)]
pub struct RunEval {
    /// `base` or `VARIANT-sSEED`.
    pub name: String,
    pub variant: String,
    pub seed: Option<u64>,
    pub adapter: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
}

impl RunEval {
    pub fn base() -> Self {
        Self {
            name: "base".into(),
            variant: "base".into(),
            seed: None,
            adapter: None,
            run_dir: None,
        }
    }

    pub fn trained(variant: &str, seed: u64, run_dir: &Path) -> Self {
        Self {
            name: format!("{variant}-s{seed}"),
            variant: variant.into(),
            seed: Some(seed),
            adapter: Some(run_dir.join("adapter")),
            run_dir: Some(run_dir.to_path_buf()),
        }
    }
}

const POPE_SPLITS: [&str; 3] = ["random", "popular", "adversarial"];

/// Balanced, seeded subsets (`n` questions: half yes, half no) of the world's POPE files for
/// `split`, written to `out`; returns their paths (named so the split is read from the name).
pub fn pope_subsets(
    world: &Path,
    split: &str,
    n: usize,
    out: &Path,
) -> Result<Vec<PathBuf>, DemoError> {
    std::fs::create_dir_all(out).map_err(|e| FileError::new(out, e))?;
    let mut paths = Vec::new();
    for kind in POPE_SPLITS {
        let src = world.join("pope").join(format!("{kind}_{split}.jsonl"));
        let mut yes = Vec::new();
        let mut no = Vec::new();
        for (line, text) in read_lines(&src)? {
            let v: Value =
                serde_json::from_str(&text).map_err(|e| bad(&src, format!("line {line}: {e}")))?;
            match v["label"].as_str() {
                Some("yes") => yes.push(text),
                Some("no") => no.push(text),
                _ => return Err(bad(&src, format!("line {line}: label is not yes/no"))),
            }
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        yes.shuffle(&mut rng);
        no.shuffle(&mut rng);
        let half = n / 2;
        let mut picked: Vec<&String> = yes.iter().take(half).chain(no.iter().take(half)).collect();
        // Back in file order, so the subset reads like the original.
        picked.sort_by_key(|t| {
            serde_json::from_str::<Value>(t)
                .ok()
                .and_then(|v| v["question_id"].as_u64())
                .unwrap_or(0)
        });
        let text: String = picked.iter().map(|t| format!("{t}\n")).collect();
        let path = out.join(format!("{kind}_{split}.jsonl"));
        write_atomic(&path, text.as_bytes())?;
        paths.push(path);
    }
    Ok(paths)
}

/// The world's CHAIR annotations for `split`, cut to the first `n` images.
pub fn chair_subset(world: &Path, split: &str, n: usize, out: &Path) -> Result<PathBuf, DemoError> {
    let src = world.join("chair").join(format!("instances_{split}.json"));
    let text = std::fs::read_to_string(&src).map_err(|e| FileError::new(&src, e))?;
    let mut v: Value = serde_json::from_str(&text).map_err(|e| bad(&src, e.to_string()))?;
    let images: Vec<Value> = v["images"]
        .as_array()
        .ok_or_else(|| bad(&src, "no `images` array"))?
        .iter()
        .take(n)
        .cloned()
        .collect();
    let ids: std::collections::HashSet<u64> =
        images.iter().filter_map(|i| i["id"].as_u64()).collect();
    let anns: Vec<Value> = v["annotations"]
        .as_array()
        .ok_or_else(|| bad(&src, "no `annotations` array"))?
        .iter()
        .filter(|a| a["image_id"].as_u64().is_some_and(|i| ids.contains(&i)))
        .cloned()
        .collect();
    v["images"] = Value::Array(images);
    v["annotations"] = Value::Array(anns);
    std::fs::create_dir_all(out).map_err(|e| FileError::new(out, e))?;
    let path = out.join(format!("instances_{split}_{n}.json"));
    write_json_atomic(&path, &v)?;
    Ok(path)
}

/// The seed of the world in `world` (from its `manifest.json`), `None` when there is none yet.
pub fn world_seed_of(world: &Path) -> Option<u64> {
    read_json(&world.join("manifest.json"))?["seed"].as_u64()
}

/// Refuses a demo folder whose world was drawn with another seed than `seed`: its runs and
/// evaluations belong to that world, and regenerating it underneath them would mix the two.
pub fn check_world_seed(world: &Path, seed: u64) -> Result<(), DemoError> {
    match world_seed_of(world) {
        Some(had) if had != seed => Err(bad(
            world,
            format!(
                "this demo folder holds the world of seed {had}, and --world-seed asks for {seed}; \
                 choose another --out (its runs and evaluations belong to seed {had})"
            ),
        )),
        _ => Ok(()),
    }
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// `benchmark -> metric -> value` of one evaluated model.
fn run_metrics(
    eval_dir: &Path,
    scenes: Option<&HashMap<String, Vec<Shape>>>,
) -> BTreeMap<String, BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    if let Some(p) = read_json(&eval_dir.join("pope/metrics.json")) {
        for split in POPE_SPLITS {
            if let Some(m) = p.get(split) {
                let mut row = BTreeMap::new();
                for key in ["accuracy", "precision", "recall", "f1", "yes_ratio"] {
                    if let Some(x) = m[key].as_f64() {
                        row.insert(key.to_string(), x);
                    }
                }
                out.insert(format!("pope/{split}"), row);
            }
        }
    }
    if let Some(c) = read_json(&eval_dir.join("chair/metrics.json")) {
        let mut row = BTreeMap::new();
        for key in ["chair_s", "chair_i", "recall"] {
            if let Some(x) = c["chair"][key].as_f64() {
                row.insert(key.to_string(), x);
            }
        }
        // CHAIR_s by kind of hallucination, from the captions and the scene graphs.
        let captions = std::fs::read_to_string(eval_dir.join("chair/captions.jsonl"));
        if let (Some(scenes), Ok(captions)) = (scenes, captions) {
            if let Some((cooc, misnamed)) = count_kinds(&captions, scenes).shares() {
                row.insert("chair_s_cooccurrence".into(), cooc);
                row.insert("chair_s_misnamed".into(), misnamed);
            }
        }
        out.insert("chair".into(), row);
    }
    out
}

/// Non-empty lines of a text file; `None` when it cannot be read.
fn line_count(path: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(text.lines().filter(|l| !l.trim().is_empty()).count())
}

/// The report's section on what training changes: each variant's CHAIR_s and its two kinds
/// (`hallucination_kinds`) as a multiple of the base model's, and how far the best variant is
/// from the demo's target of 0.75x the base's CHAIR_s.
pub fn kinds_section(results: &Value, variants: &[String]) -> String {
    let mut md = String::new();
    let keys = [
        ("chair_s", "CHAIR_s"),
        ("chair_s_cooccurrence", "co-occurrence"),
        ("chair_s_misnamed", "misnamed"),
    ];
    let Some(base) = keys
        .iter()
        .map(|(k, _)| get(results, "base", "chair", k))
        .collect::<Option<Vec<f64>>>()
    else {
        return md;
    };
    let _ = writeln!(
        md,
        "## What training changes: CHAIR_s by kind of hallucination\n"
    );
    let _ = writeln!(
        md,
        "A caption's hallucinated object is a **co-occurrence** hallucination when it forms one of the world's prior pairs (square-triangle, circle-cross, star-diamond) with a shape in the scene: the language prior's error this world provokes. Any other is **misnamed**: a shape read wrong, which the frozen vision tower decides and a LoRA on the language model can hardly change. Each column: the share of captions with at least one hallucination of the kind (a caption may have both), mean over seeds, and its multiple of the base model's.\n"
    );
    let _ = writeln!(
        md,
        "| variant | CHAIR_s | co-occurrence | misnamed |\n|---|---|---|---|"
    );
    let mut best: Option<(String, f64, f64)> = None;
    for v in variants {
        let cells: Vec<String> = keys
            .iter()
            .zip(&base)
            .map(|((k, _), b)| match get(results, v, "chair", k) {
                Some(x) if *b > 0.0 => format!("{:.1} ({:.2}x)", 100.0 * x, x / b),
                Some(x) => format!("{:.1}", 100.0 * x),
                None => "-".into(),
            })
            .collect();
        let _ = writeln!(md, "| {v} | {} |", cells.join(" | "));
        if v != "base" {
            if let (Some(all), Some(cooc)) = (
                get(results, v, "chair", "chair_s"),
                get(results, v, "chair", "chair_s_cooccurrence"),
            ) {
                if best.as_ref().is_none_or(|b| all < b.1) {
                    best = Some((v.clone(), all, cooc));
                }
            }
        }
    }
    if let Some((v, all, cooc)) = best {
        let ratio = |x: f64, b: f64| if b > 0.0 { x / b } else { f64::NAN };
        let (r_all, r_cooc) = (ratio(all, base[0]), ratio(cooc, base[1]));
        let _ = writeln!(
            md,
            "\nThe lowest CHAIR_s is {v}'s, **{r_all:.2}x** the base's ({}; the demo's target is <= 0.75x). Its co-occurrence hallucinations are at {r_cooc:.2}x the base's, its misnamed ones at {:.2}x: of the base's captions, {:.0}% hallucinate by co-occurrence and {:.0}% misname a shape.\n",
            if r_all <= 0.75 { "met" } else { "NOT met" },
            get(results, &v, "chair", "chair_s_misnamed").map_or(f64::NAN, |m| ratio(m, base[2])),
            100.0 * base[1],
            100.0 * base[2],
        );
    }
    md
}

/// `variant -> benchmark -> metric -> {mean, std, runs: [{seed, value}]}` over the runs (the
/// base, evaluated once, has one run with seed `null`).
fn aggregate(out: &Path, world: &Path, runs: &[RunEval]) -> Value {
    let scenes = scene_shapes(world);
    let mut per_run = Vec::new();
    for run in runs {
        per_run.push((
            run.variant.clone(),
            run.seed,
            run_metrics(&out.join("eval").join(&run.name), scenes.as_ref()),
        ));
    }
    aggregate_metrics(&per_run)
}

/// One evaluated run: its variant, its seed and `benchmark -> metric -> value`.
type RunMetrics = (String, Option<u64>, BTreeMap<String, BTreeMap<String, f64>>);

/// [`aggregate`] on metrics already read; variants in the order they first appear.
fn aggregate_metrics(per_run: &[RunMetrics]) -> Value {
    type Seeds = Vec<(Option<u64>, f64)>;
    let mut acc: BTreeMap<String, BTreeMap<String, BTreeMap<String, Seeds>>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for (variant, seed, metrics) in per_run {
        if !order.contains(variant) {
            order.push(variant.clone());
        }
        for (bench, ms) in metrics {
            for (m, v) in ms {
                acc.entry(variant.clone())
                    .or_default()
                    .entry(bench.clone())
                    .or_default()
                    .entry(m.clone())
                    .or_default()
                    .push((*seed, *v));
            }
        }
    }
    let mut result = serde_json::Map::new();
    for variant in order {
        let mut benches = serde_json::Map::new();
        for (bench, metrics) in acc.remove(&variant).unwrap_or_default() {
            let mut ms = serde_json::Map::new();
            for (m, seeds) in metrics {
                let values: Vec<f64> = seeds.iter().map(|(_, v)| *v).collect();
                let (mean, std) = stats::mean_std(&values);
                let runs: Vec<Value> = seeds
                    .iter()
                    .map(|(seed, value)| json!({"seed": seed, "value": value}))
                    .collect();
                ms.insert(m, json!({"mean": mean, "std": std, "runs": runs}));
            }
            benches.insert(bench, Value::Object(ms));
        }
        result.insert(variant, Value::Object(benches));
    }
    Value::Object(result)
}

fn get(variants: &Value, variant: &str, bench: &str, metric: &str) -> Option<f64> {
    variants[variant][bench][metric]["mean"].as_f64()
}

/// A metric the claims are judged on.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub bench: &'static str,
    pub key: &'static str,
    pub label: &'static str,
    pub higher_is_better: bool,
}

/// The metrics of every comparison, headline first.
pub const METRICS: [Metric; 7] = [
    Metric {
        bench: "pope/adversarial",
        key: "f1",
        label: "POPE adv F1",
        higher_is_better: true,
    },
    Metric {
        bench: "chair",
        key: "chair_s",
        label: "CHAIR_s",
        higher_is_better: false,
    },
    Metric {
        bench: "pope/popular",
        key: "f1",
        label: "POPE pop F1",
        higher_is_better: true,
    },
    Metric {
        bench: "pope/random",
        key: "f1",
        label: "POPE rand F1",
        higher_is_better: true,
    },
    Metric {
        bench: "pope/adversarial",
        key: "accuracy",
        label: "POPE adv acc",
        higher_is_better: true,
    },
    Metric {
        bench: "chair",
        key: "chair_i",
        label: "CHAIR_i",
        higher_is_better: false,
    },
    // CHAIR_s counting only co-occurrence hallucinations (`hallucination_kinds`): the kind
    // the image term is meant to remove.
    Metric {
        bench: "chair",
        key: "chair_s_cooccurrence",
        label: "CHAIR_s co-occurrence",
        higher_is_better: false,
    },
];

/// A claim of the paper, as a comparison of two variants.
#[derive(Debug, Clone, Copy)]
pub struct PaperClaim {
    pub a: &'static str,
    pub b: &'static str,
    /// The claim in words.
    pub text: &'static str,
    /// The paper claims the two are the same (IS ~ exact), not that `a` is better.
    pub same: bool,
}

/// The paper's claims the demo tests.
pub const CLAIMS: [PaperClaim; 6] = [
    PaperClaim {
        a: "misp",
        b: "random",
        text: "SAE-selected diverse negatives beat random ones (misp > random)",
        same: false,
    },
    PaperClaim {
        a: "misp",
        b: "similarity",
        text: "SAE-selected diverse negatives beat the most CLIP-similar ones (misp > similarity)",
        same: false,
    },
    PaperClaim {
        a: "misp",
        b: "mdpo",
        text: "K = 3 negatives beat one (misp > mDPO)",
        same: false,
    },
    PaperClaim {
        a: "misp",
        b: "text+noise",
        text: "K = 3 negatives beat one (misp > text+noise, the CHiP-like baseline)",
        same: false,
    },
    PaperClaim {
        a: "misp",
        b: "dpo",
        text: "image + text preference beats text only (misp > dpo)",
        same: false,
    },
    PaperClaim {
        a: "misp",
        b: "misp-exact",
        text: "the importance-sampled gradient does as well as the exact one (misp ~ misp-exact)",
        same: true,
    },
];

/// `(seed, value)` of every trained run of `variant` on one metric.
fn seed_values(variants: &Value, variant: &str, m: &Metric) -> Vec<(u64, f64)> {
    variants[variant][m.bench][m.key]["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| Some((r["seed"].as_u64()?, r["value"].as_f64()?)))
        .collect()
}

/// Per-seed differences `a - b` (in points, x100) over the seeds both variants ran, in seed
/// order: the pairs of a paired comparison.
pub fn paired_differences(variants: &Value, a: &str, b: &str, m: &Metric) -> Vec<(u64, f64)> {
    let bs: BTreeMap<u64, f64> = seed_values(variants, b, m).into_iter().collect();
    let mut out: Vec<(u64, f64)> = seed_values(variants, a, m)
        .into_iter()
        .filter_map(|(seed, va)| Some((seed, 100.0 * (va - bs.get(&seed)?))))
        .collect();
    out.sort_by_key(|(seed, _)| *seed);
    out
}

/// One claim on one metric: the paired differences, their interval and the verdict.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub claim: PaperClaim,
    pub metric: Metric,
    pub differences: Vec<(u64, f64)>,
    pub interval: Option<stats::Interval>,
    pub verdict: stats::Verdict,
}

impl Comparison {
    pub fn new(variants: &Value, claim: PaperClaim, metric: Metric) -> Self {
        let differences = paired_differences(variants, claim.a, claim.b, &metric);
        let d: Vec<f64> = differences.iter().map(|(_, d)| *d).collect();
        let interval = stats::t_interval(&d, stats::LEVEL);
        let verdict = stats::verdict(interval.as_ref(), metric.higher_is_better);
        Self {
            claim,
            metric,
            differences,
            interval,
            verdict,
        }
    }

    /// `"+1.2 [-0.3, +2.7]"` (points), or the one difference with no interval.
    pub fn interval_text(&self) -> String {
        match (&self.interval, self.differences.as_slice()) {
            (Some(iv), _) => format!("{:+.2} [{:+.2}, {:+.2}]", iv.mean, iv.lo, iv.hi),
            (None, [(_, d)]) => format!("{d:+.2} (one seed, no interval)"),
            _ => "-".into(),
        }
    }

    /// The verdict in words, e.g. `misp beats random`.
    pub fn verdict_text(&self) -> String {
        let (a, b) = (self.claim.a, self.claim.b);
        match self.verdict {
            stats::Verdict::Better => format!("{a} beats {b}"),
            stats::Verdict::Worse => format!("{a} is worse than {b}"),
            stats::Verdict::NoDifference => "no difference measurable".into(),
            stats::Verdict::TooFewSeeds => "fewer than two paired seeds: no verdict".into(),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "claim": self.claim.text,
            "a": self.claim.a,
            "b": self.claim.b,
            "benchmark": self.metric.bench,
            "metric": self.metric.key,
            "higher_is_better": self.metric.higher_is_better,
            "differences_points": self.differences.iter().map(|(s, d)| json!({"seed": s, "a_minus_b": d})).collect::<Vec<_>>(),
            "mean": self.interval.map(|i| i.mean),
            "lo": self.interval.map(|i| i.lo),
            "hi": self.interval.map(|i| i.hi),
            "verdict": self.verdict_text(),
        })
    }
}

/// Every claim whose two variants were both run, on every metric.
pub fn comparisons(variants: &Value) -> Vec<Comparison> {
    let ran = |v: &str| variants.get(v).is_some();
    CLAIMS
        .iter()
        .filter(|c| ran(c.a) && ran(c.b))
        .flat_map(|c| METRICS.iter().map(|m| Comparison::new(variants, *c, *m)))
        .collect()
}

/// The sentence a claim gets from its comparisons: what the intervals allow, metric by metric.
pub fn claim_sentence(claim: &PaperClaim, cs: &[&Comparison]) -> String {
    let list = |v: stats::Verdict| -> Vec<&str> {
        cs.iter()
            .filter(|c| c.verdict == v)
            .map(|c| c.metric.label)
            .collect()
    };
    let (better, worse, none) = (
        list(stats::Verdict::Better),
        list(stats::Verdict::Worse),
        list(stats::Verdict::NoDifference),
    );
    if better.is_empty() && worse.is_empty() && none.is_empty() {
        return format!("{}: fewer than two paired seeds, no verdict.", claim.text);
    }
    let mut parts = Vec::new();
    if !better.is_empty() {
        parts.push(format!(
            "{} beats {} on {}",
            claim.a,
            claim.b,
            better.join(", ")
        ));
    }
    if !worse.is_empty() {
        parts.push(format!(
            "{} is worse than {} on {}",
            claim.a,
            claim.b,
            worse.join(", ")
        ));
    }
    if !none.is_empty() {
        parts.push(format!("no difference measurable on {}", none.join(", ")));
    }
    let held = if claim.same {
        if better.is_empty() && worse.is_empty() {
            "consistent with the claim (no measurable difference; the intervals bound how large one could be)"
        } else {
            "the claim does not hold here: the two differ"
        }
    } else if !better.is_empty() && worse.is_empty() {
        "the claim holds here"
    } else if !worse.is_empty() && better.is_empty() {
        "the opposite of the claim holds here"
    } else if better.is_empty() {
        "the claim is not shown here"
    } else {
        "mixed: the claim holds on some metrics and fails on others"
    };
    format!("**{}**: {}; {held}.", claim.text, parts.join("; "))
}

/// Mean over groups of the mean pairwise cosine distance `1 - cos(u, v)` within a group (groups
/// of fewer than two rows are left out): how spread out one record's K negatives are.
pub fn mean_pairwise_distance(groups: &[Vec<&[f32]>]) -> Option<f64> {
    let cos = |u: &[f32], v: &[f32]| {
        let dot: f64 = u
            .iter()
            .zip(v)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum();
        let nu: f64 = u.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>().sqrt();
        let nv: f64 = v.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>().sqrt();
        dot / (nu * nv)
    };
    let per_group: Vec<f64> = groups
        .iter()
        .filter(|g| g.len() >= 2)
        .map(|g| {
            let mut sum = 0.0;
            let mut n = 0usize;
            for i in 0..g.len() {
                for j in i + 1..g.len() {
                    sum += 1.0 - cos(g[i], g[j]);
                    n += 1;
                }
            }
            sum / n as f64
        })
        .filter(|d| d.is_finite())
        .collect();
    (!per_group.is_empty()).then(|| per_group.iter().sum::<f64>() / per_group.len() as f64)
}

/// [`mean_pairwise_distance`] of a negatives file's records, in the pool's CLIP space.
fn negative_diversity(pool: &PoolEmbeddings, neg_file: &Path) -> Option<f64> {
    let index: HashMap<&str, usize> = pool
        .ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    let negs = crate::mine::negatives::read(neg_file).ok()?;
    let groups: Vec<Vec<&[f32]>> = negs
        .iter()
        .map(|r| {
            r.negatives
                .iter()
                .filter_map(|n| index.get(n.image.as_str()).map(|&i| pool.row(i)))
                .collect()
        })
        .collect();
    mean_pairwise_distance(&groups)
}

/// The world's scene graphs by image path relative to the world (`images/test/00042.png`, as
/// negatives files and CHAIR's captions name images); lines that do not parse are left out.
pub fn scenes_by_image(world: &Path) -> Option<HashMap<String, Scene>> {
    Some(
        std::fs::read_to_string(world.join("scenes.jsonl"))
            .ok()?
            .lines()
            .filter_map(|l| serde_json::from_str::<Scene>(l).ok())
            .map(|s| (s.image.clone(), s))
            .collect(),
    )
}

/// Negative validity: the share of a strategy's selected negatives on which the chosen answer
/// is in fact wrong (a claim of it fails on the negative's scene graph).
fn negative_validity(world: &Path, neg_file: &Path) -> Option<(f64, usize)> {
    let scenes = scenes_by_image(world)?;
    let claims: HashMap<String, Vec<Claim>> = std::fs::read_to_string(world.join("records.jsonl"))
        .ok()?
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            let c: Vec<Claim> = serde_json::from_value(v["claims"].clone()).ok()?;
            Some((v["id"].as_str()?.to_string(), c))
        })
        .collect();
    let negs = crate::mine::negatives::read(neg_file).ok()?;
    let (mut valid, mut total) = (0usize, 0usize);
    for rec in negs {
        let Some(cs) = claims.get(&rec.id) else {
            continue;
        };
        for n in rec.negatives {
            let Some(scene) = scenes.get(&n.image) else {
                continue;
            };
            total += 1;
            if cs.iter().any(|c| !c.holds(scene)) {
                valid += 1;
            }
        }
    }
    (total > 0).then(|| (valid as f64 / total as f64, total))
}

/// Figure 2 for ShapesWorld: t-SNE of the CLIP embeddings of misp-selected and random
/// negatives (first records of each file).
fn tsne_figure(pool_dir: &Path, neg_dir: &Path, path: &Path) -> Option<()> {
    let pool = PoolEmbeddings::load(pool_dir).ok()?;
    let index: HashMap<&str, usize> = pool
        .ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    let mut points = Vec::new();
    let mut labels = Vec::new();
    for strategy in ["misp", "random"] {
        let negs = crate::mine::negatives::read(&neg_dir.join(format!("{strategy}.jsonl"))).ok()?;
        for rec in negs.iter().take(100) {
            for n in &rec.negatives {
                if let Some(&i) = index.get(n.image.as_str()) {
                    points.push(pool.row(i).to_vec());
                    labels.push(strategy);
                }
            }
        }
    }
    if points.len() < 10 {
        return None;
    }
    let y = tsne(&points, &TsneConfig::default());
    let series: Vec<(String, Vec<(f64, f64)>)> = ["misp", "random"]
        .iter()
        .map(|s| {
            let pts = y
                .iter()
                .zip(&labels)
                .filter(|(_, l)| *l == s)
                .map(|(p, _)| *p)
                .collect();
            (format!("{s} negatives"), pts)
        })
        .collect();
    scatter_chart(
        path,
        "t-SNE of selected negatives (CLIP space)",
        &series,
        "t-SNE 1",
        "t-SNE 2",
    )
    .ok()
}

/// Writes `report.md`, `results.json` and the figures; returns the report's path.
#[allow(clippy::too_many_arguments)]
pub fn write_report(
    out: &Path,
    plan: &DemoPlan,
    runs: &[RunEval],
    world: &Path,
    pool_dir: &Path,
    neg_dir: &Path,
    split: &str,
    timings: &[(String, f64)],
) -> Result<PathBuf, DemoError> {
    let results = aggregate(out, world, runs);
    let comps = comparisons(&results);
    let world_seed = world_seed_of(world);
    // Why the variants might not differ: how diverse and how valid each strategy's negatives
    // are, and whether the image term still learns when training stops.
    let pool = PoolEmbeddings::load(pool_dir).ok();
    let negative_stats: Vec<_> = plan
        .strategies()
        .into_iter()
        .map(|strategy| {
            let file = neg_dir.join(format!("{strategy}.jsonl"));
            let diversity = pool.as_ref().and_then(|p| negative_diversity(p, &file));
            (strategy, negative_validity(world, &file), diversity)
        })
        .collect();
    let trends = diagnostics::image_loss_trends(
        runs.iter()
            .filter_map(|r| Some((r.variant.as_str(), r.seed?, r.run_dir.as_deref()?))),
    );
    write_json_atomic(
        &out.join("results.json"),
        &json!({
            "world_seed": world_seed,
            "split": split,
            "seeds": plan.seeds,
            "interval": stats::METHOD,
            "differences": "a - b in points (x100), per seed; a comparison pairs the runs of a and b with the same seed",
            "variants": results,
            "comparisons": comps.iter().map(Comparison::to_json).collect::<Vec<_>>(),
            "negatives": negative_stats.iter().map(|(strategy, validity, diversity)| {
                (strategy.to_string(), json!({
                    "validity": validity.map(|v| v.0),
                    "negatives": validity.map(|v| v.1),
                    "mean_pairwise_cosine_distance": diversity,
                }))
            }).collect::<serde_json::Map<_, _>>(),
            "image_loss_trend": trends.iter().map(|t| (t.variant.clone(), t.to_json()))
                .collect::<serde_json::Map<_, _>>(),
        }),
    )?;
    let variants: Vec<String> = results
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();

    // One panel per metric, one bar per variant with its 95% interval over seeds, each panel on
    // an axis fitted to its values (a 0-1 axis would flatten the differences the claims are
    // about).
    let panels: Vec<Panel> = METRICS
        .iter()
        .map(|m| Panel {
            title: format!(
                "{}{}",
                m.label,
                if m.higher_is_better {
                    " (higher is better)"
                } else {
                    " (lower is better)"
                }
            ),
            y_label: "points".into(),
            bars: variants
                .iter()
                .map(|v| match point_interval(&results, v, m) {
                    Some(iv) => (v.clone(), iv.mean, (iv.n > 1).then_some((iv.lo, iv.hi))),
                    // The base model has no seed: its one value, without an interval.
                    None => {
                        let mean = get(&results, v, m.bench, m.key).map_or(f64::NAN, |x| 100.0 * x);
                        (v.clone(), mean, None)
                    }
                })
                .collect(),
        })
        .collect();
    let mut figures = Vec::new();
    if bar_panels(
        &out.join("results.png"),
        (1200, 760),
        "ShapesWorld: mean over seeds, whiskers = 95% t interval over seeds",
        &panels,
    )
    .is_ok()
    {
        figures.push(("Results", "results.png"));
    }
    // Training curves: loss of the first seed of each variant.
    let mut curves = Vec::new();
    for run in runs
        .iter()
        .filter(|r| r.seed == plan.seeds.first().copied())
    {
        let Some(dir) = &run.run_dir else { continue };
        let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap_or_default();
        let pts: Vec<(f64, f64)> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| Some((v["step"].as_f64()?, v["loss"].as_f64()?)))
            .collect();
        if !pts.is_empty() {
            curves.push((run.variant.clone(), pts));
        }
    }
    if !curves.is_empty()
        && line_chart(
            &out.join("training_loss.png"),
            "training loss",
            &curves,
            "step",
            "loss",
        )
        .is_ok()
    {
        figures.push(("Training loss", "training_loss.png"));
    }
    if tsne_figure(pool_dir, neg_dir, &out.join("tsne_negatives.png")).is_some() {
        figures.push((
            "Figure 2: misp vs random negatives (t-SNE)",
            "tsne_negatives.png",
        ));
    }

    let mut md = String::new();
    let _ = writeln!(md, "# misp demo on ShapesWorld\n");
    let _ = writeln!(
        md,
        "{} run on the world of seed **{}**{}; training seeds {:?}; evaluated on the **{split}** split ({} POPE questions per split, {} CHAIR images). Numbers are mean ± std over seeds (std 0 with one seed).\n",
        if plan.quick { "Quick" } else { "Full" },
        world_seed.map_or("?".into(), |s| s.to_string()),
        match world_seed {
            Some(SHIPPED_WORLD_SEED) => " (the shipped world, whose train split the models were pretrained on and whose validation split chose the settings)",
            Some(_) => " (a fresh draw of the same distribution: scenes nobody tuned on)",
            None => " (its manifest is unreadable)",
        },
        plan.seeds,
        line_count(&out.join("eval-sets").join(format!("adversarial_{split}.jsonl")))
            .unwrap_or(plan.pope_per_split),
        line_count(&out.join("eval/base/chair/captions.jsonl")).unwrap_or(plan.chair_images)
    );
    let _ = writeln!(md, "| variant | POPE rand F1 | POPE pop F1 | POPE adv F1 | POPE adv acc | CHAIR_s | CHAIR_i | CHAIR recall |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    let cell = |v: &str, b: &str, m: &str| match (
        results[v][b][m]["mean"].as_f64(),
        results[v][b][m]["std"].as_f64(),
    ) {
        (Some(mean), Some(std)) => format!("{:.1} ± {:.1}", 100.0 * mean, 100.0 * std),
        _ => "-".into(),
    };
    for v in &variants {
        let _ = writeln!(
            md,
            "| {v} | {} | {} | {} | {} | {} | {} | {} |",
            cell(v, "pope/random", "f1"),
            cell(v, "pope/popular", "f1"),
            cell(v, "pope/adversarial", "f1"),
            cell(v, "pope/adversarial", "accuracy"),
            cell(v, "chair", "chair_s"),
            cell(v, "chair", "chair_i"),
            cell(v, "chair", "recall"),
        );
    }
    let _ = writeln!(md, "\n## Does the base model hallucinate?\n");
    let gap = get(&results, "base", "pope/random", "f1")
        .zip(get(&results, "base", "pope/adversarial", "f1"))
        .map(|(r, a)| 100.0 * (r - a));
    let chair_s = get(&results, "base", "chair", "chair_s").map(|x| 100.0 * x);
    let _ = writeln!(
        md,
        "POPE-random F1 minus POPE-adversarial F1: {} points (target >= 5); CHAIR_s: {}% (target >= 10%). {}\n",
        gap.map_or("-".into(), |g| format!("{g:.1}")),
        chair_s.map_or("-".into(), |c| format!("{c:.1}")),
        if gap.is_some_and(|g| g >= 5.0) || chair_s.is_some_and(|c| c >= 10.0) {
            "The base model hallucinates measurably."
        } else {
            "The base model does NOT reach the hallucination bar here."
        }
    );
    if let Some(acc) = get(&results, "base", "pope/random", "accuracy") {
        if acc < 0.7 {
            let _ = writeln!(
                md,
                "Caveat: the base model's POPE-random accuracy is {:.1}%, close to chance: it hallucinates mostly because it barely sees, not (only) through the co-occurrence prior this world is built to expose. Read the variant comparisons with that in mind.\n",
                100.0 * acc
            );
        }
    }
    md.push_str(&kinds_section(&results, &variants));
    let _ = writeln!(md, "## The sampler\n");
    let _ = writeln!(md, "{}\n", sae_sentence(&out.join("sae")));
    let _ = writeln!(md, "## The paper's claims\n");
    let _ = writeln!(
        md,
        "Each comparison pairs the runs of two variants that share a seed (a seed fixes the LoRA initialisation, the record order and the dropout masks of every variant), takes the per-seed difference a - b in points, and gives its mean with a 95% interval ({}). A verdict says \"beats\" only when the interval excludes 0 on the better side; otherwise \"no difference measurable\". For CHAIR lower is better, so a negative difference is a gain.\n",
        stats::METHOD
    );
    let mut judged = 0;
    for claim in &CLAIMS {
        let cs: Vec<&Comparison> = comps
            .iter()
            .filter(|c| c.claim.a == claim.a && c.claim.b == claim.b)
            .collect();
        if cs.is_empty() {
            continue;
        }
        judged += 1;
        let _ = writeln!(md, "{}\n", claim_sentence(claim, &cs));
        let _ = writeln!(
            md,
            "| metric | {a} | {b} | {a} - {b} (points), 95% CI | pairs | verdict |\n|---|---|---|---|---|---|",
            a = claim.a,
            b = claim.b
        );
        for c in cs {
            let m = c.metric;
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} |",
                m.label,
                cell(claim.a, m.bench, m.key),
                cell(claim.b, m.bench, m.key),
                c.interval_text(),
                c.differences.len(),
                c.verdict_text()
            );
        }
        let _ = writeln!(md);
    }
    if judged == 0 {
        let _ = writeln!(
            md,
            "None of the claims' variant pairs were both run; nothing to compare.\n"
        );
    }
    let _ = writeln!(md, "## Can this world tell the variants apart?\n");
    let _ = writeln!(
        md,
        "MISP's case rests on its negatives being more diverse than random ones and still contradicting the chosen answer, and on the image term still teaching. **Validity**: the share of a strategy's selected negatives on which the chosen answer is in fact wrong (a claim of it fails on the negative's scene graph). **Diversity**: the mean pairwise cosine distance (1 - cos) among one record's negatives in the CLIP space the sampler uses, averaged over records.\n"
    );
    let _ = writeln!(md, "### Negative validity and diversity\n");
    let _ = writeln!(
        md,
        "| strategy | validity | negatives | diversity |\n|---|---|---|---|"
    );
    for (strategy, validity, diversity) in &negative_stats {
        if let Some((v, n)) = validity {
            let d = diversity.map_or("-".into(), |d| format!("{d:.3}"));
            let _ = writeln!(md, "| {strategy} | {:.1}% | {n} | {d} |", 100.0 * v);
        }
    }
    let stat = |s: &str| negative_stats.iter().find(|x| x.0 == s);
    if let (Some((_, Some((vm, _)), Some(dm))), Some((_, Some((vr, _)), Some(dr)))) =
        (stat("misp"), stat("random"))
    {
        let _ = writeln!(
            md,
            "\nmisp's negatives are {} than random ones ({dm:.3} vs {dr:.3}) and contradict the chosen answer {} ({:.1}% vs {:.1}%).",
            if dm > dr { "more diverse" } else if dm < dr { "less diverse" } else { "as diverse" },
            if vm > vr { "more often" } else if vm < vr { "less often" } else { "as often" },
            100.0 * vm,
            100.0 * vr
        );
    }
    if !trends.is_empty() {
        let _ = writeln!(
            md,
            "\nThe image term's loss (`loss/img`) at the end of training: the least-squares slope over each run's last third of steps, mean over seeds with a 95% t interval; \"still falling\" only when the interval is below 0.\n"
        );
        let _ = writeln!(
            md,
            "| variant | loss/img first -> last (mean over seeds) | slope per step, 95% CI | trend |\n|---|---|---|---|"
        );
        for t in &trends {
            let n = t.seeds.len() as f64;
            let first = t.seeds.iter().map(|s| s.2).sum::<f64>() / n;
            let last = t.seeds.iter().map(|s| s.3).sum::<f64>() / n;
            let slope = match t.interval.as_ref() {
                Some(iv) => format!("{:+.4} [{:+.4}, {:+.4}]", iv.mean, iv.lo, iv.hi),
                None => format!("{:+.4}", t.seeds.iter().map(|s| s.1).sum::<f64>() / n),
            };
            let _ = writeln!(
                md,
                "| {} | {first:.3} -> {last:.3} | {slope} | {} |",
                t.variant,
                t.words()
            );
        }
    }
    let _ = writeln!(md, "\n## Figures\n");
    for (title, file) in &figures {
        let _ = writeln!(md, "### {title}\n\n![{title}]({file})\n");
    }
    if let Some(sweep) = &plan.sweep {
        sweep_section(out, &results, sweep, &mut md);
    }
    let _ = writeln!(md, "## How the training settings were chosen\n");
    let _ = writeln!(md, "{}\n", TUNING.trim());
    let _ = writeln!(md, "## Time per stage\n\n| stage | seconds |\n|---|---|");
    for (name, secs) in timings {
        let _ = writeln!(md, "| {name} | {secs:.1} |");
    }
    let _ = writeln!(
        md,
        "\nTraining settings of every run (`--set`): `{}`; per-run details in `runs/*/report.md`, every answer in `eval/*/pope/answers.jsonl` and `eval/*/chair/captions.jsonl`.",
        plan.train.join(" ")
    );
    let path = out.join("report.md");
    write_atomic(&path, md.as_bytes())?;
    Ok(path)
}

/// What the demo's SAE learned, from its folder: the held-out FVU of the saved weights, when
/// training stopped, and how its latents fire.
fn sae_sentence(sae_dir: &Path) -> String {
    let Some(cfg) = read_json(&sae_dir.join("config.json")) else {
        return "The SAE folder has no readable config.json.".into();
    };
    let t = &cfg["training"];
    let last = std::fs::read_to_string(sae_dir.join("metrics.jsonl"))
        .ok()
        .and_then(|text| text.lines().last().map(str::to_owned))
        .and_then(|l| serde_json::from_str::<Value>(&l).ok())
        .unwrap_or(Value::Null);
    match (t["fvu"].as_f64(), t["epoch"].as_u64()) {
        (Some(fvu), Some(epoch)) => format!(
            "The SAE (H = {}, rho = {}) reconstructs its {} held-out pairs ({} records) with FVU **{fvu:.3}** (the weights of epoch {epoch}; {} epochs run, stop: {}). In its last epoch a pair fired {:.1} latents on average (firing: z > {}), {:.0}% of latents never fired. `misp mine` refuses an SAE whose FVU is 0.9 or more.",
            cfg["hidden"],
            cfg["rho"],
            t["heldout_pairs"],
            t["heldout_records"],
            t["epochs_run"],
            t["stopped"].as_str().unwrap_or("?"),
            last["mean_l0"].as_f64().unwrap_or(f64::NAN),
            last["firing_threshold"],
            100.0 * last["dead_fraction"].as_f64().unwrap_or(f64::NAN),
        ),
        _ => "The SAE has no training summary in its config.json.".into(),
    }
}

/// The results table of `out/results.json` as markdown, for the terminal.
pub fn results_table(out: &Path) -> Result<String, DemoError> {
    let path = out.join("results.json");
    let all = read_json(&path).ok_or_else(|| bad(&path, "missing or unreadable"))?;
    let v = &all["variants"];
    let mut s = String::from("| variant | POPE rand F1 | POPE pop F1 | POPE adv F1 | CHAIR_s | CHAIR_i |\n|---|---|---|---|---|---|\n");
    for (variant, _) in v.as_object().into_iter().flatten() {
        let c = |b: &str, m: &str| {
            get(v, variant, b, m).map_or("-".into(), |x| format!("{:.1}", 100.0 * x))
        };
        let _ = writeln!(
            s,
            "| {variant} | {} | {} | {} | {} | {} |",
            c("pope/random", "f1"),
            c("pope/popular", "f1"),
            c("pope/adversarial", "f1"),
            c("chair", "chair_s"),
            c("chair", "chair_i")
        );
    }
    Ok(s)
}

pub mod diagnostics;
pub mod hallucination_kinds;

#[cfg(test)]
mod tests;
