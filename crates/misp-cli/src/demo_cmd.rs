//! `misp demo`: every stage of MISP-DPO on ShapesWorld, on CPU, ending in `DIR/report.md`.
//!
//! The demo runs the very commands a user would type (this binary, as a child process), in
//! order, and prints each one: world -> embed pool and records -> SAE -> mine (misp, random,
//! similarity) -> train each variant for each seed from the shipped base -> POPE (3 splits) and
//! CHAIR on the test split for the base and every run -> report. Every step's output folder is
//! reused when it is complete, so an interrupted demo continues where it stopped. Reuse is only
//! sound for the same base models: `DIR/demo_models.json` records their hash, and a folder made
//! with other models is refused rather than silently mixed (or deleted).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use misp::demo::{self, DemoPlan, RunEval};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Output folder (world, embeddings, SAE, negatives, runs, evaluations, report).
    #[arg(long, default_value = "demo-out")]
    out: PathBuf,
    /// The small version (one seed, four variants, fewer records and questions): <= 60 s.
    #[arg(long)]
    quick: bool,
    /// Folder holding the shipped checkpoints `shapes-clip/` and `shapes-llava/`.
    #[arg(long, default_value = "models")]
    models: PathBuf,
    /// Seeds of every trained variant (default: 0-19, only 0 with --quick); a seed fixes the
    /// LoRA initialisation, record order and dropout of every variant, so runs pair by seed.
    #[arg(long, value_delimiter = ',')]
    seeds: Option<Vec<u64>>,
    /// Evaluate on the validation split instead of test (for tuning the demo's settings).
    #[arg(long)]
    validation: bool,
    /// Train only these variants (shipped config names, e.g. dpo,misp); default: every
    /// variant the paper's claims need.
    #[arg(long, value_delimiter = ',')]
    variants: Option<Vec<String>>,
    /// Training override for every run, after the demo's own (repeatable), e.g.
    /// `--set lr=1e-3`; what bench/demo_tune/tune.sh searches over on the validation split.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Also run one of the paper's sweeps of misp, every value for every seed, with a chart
    /// with intervals in the report: `beta` (0.1, 0.3, 0.5, 1.0) or `k` (1, 2, 3, 5).
    #[arg(long, value_name = "PARAM")]
    sweep: Option<String>,
    /// Draw the world with this seed: 0 is the shipped world (the models' pretraining draw,
    /// where the settings were tuned); another seed draws fresh scenes of the same distribution,
    /// which the shipped models still fit, to check a conclusion on scenes nobody tuned on. The
    /// report and results.json name it. A folder holds one world: use a new --out per seed.
    #[arg(long, default_value_t = demo::SHIPPED_WORLD_SEED)]
    world_seed: u64,
    /// Passed on to every step that runs a model (embed, train, eval).
    #[command(flatten)]
    runtime: crate::runtime::RuntimeArgs,
}

/// Runs `misp ARGS...`, echoing the command; fails naming it.
fn misp(args: &[String]) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the misp binary")?;
    eprintln!("\n$ misp {}", args.join(" "));
    let status = Command::new(exe)
        .args(args)
        .status()
        .with_context(|| format!("running misp {}", args.join(" ")))?;
    if !status.success() {
        bail!("`misp {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Refuses an output folder whose finished steps were made with other base models or other
/// settings (training overrides, evaluation split and sizes), or by a misp from before the stamp
/// recorded them; stamps a fresh one. Seeds and variants may differ: a re-run with more of
/// either adds runs beside the finished ones, which is how a demo grows.
fn check_stamp(
    out: &Path,
    clip: &Path,
    llava: &Path,
    settings: &serde_json::Value,
) -> anyhow::Result<()> {
    let mut h = misp::files::Fnv::default();
    for dir in [clip, llava] {
        misp::train::reference::hash_model(dir, &mut h)?;
    }
    let hash = format!("{:016x}", h.finish());
    let stamp = out.join("demo_models.json");
    let stale = |why: String| {
        anyhow::anyhow!(
            "{}: {why}; its embeddings, runs and evaluations would not match the models in use. Remove the folder or choose another --out",
            out.display()
        )
    };
    match std::fs::read_to_string(&stamp) {
        Ok(text) => {
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("reading {}", stamp.display()))?;
            let had = v.get("models_hash").and_then(|x| x.as_str()).unwrap_or("");
            if had != hash {
                return Err(stale(format!(
                    "this demo was made with other base models (hash {had}, now {hash})"
                )));
            }
            match v.get("settings") {
                None => Err(stale(
                    "this demo was made by an earlier misp, which did not record its training and evaluation settings".into(),
                )),
                Some(had) if had != settings => {
                    let fields = ["train", "split", "pope_per_split", "chair_images"];
                    let differ: Vec<String> = fields
                        .iter()
                        .filter(|f| had.get(**f) != settings.get(**f))
                        .map(|f| format!("{f} was {} and is now {}", had[*f], settings[*f]))
                        .collect();
                    Err(stale(format!(
                        "this demo was made with other settings ({})",
                        differ.join("; ")
                    )))
                }
                Some(_) => Ok(()),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if out.join("world").exists() {
                return Err(stale(
                    "this demo was made by an earlier misp, with models it did not record".into(),
                ));
            }
            misp::files::write_json_atomic(
                &stamp,
                &serde_json::json!({
                    "models_hash": hash, "clip": clip, "llava": llava, "settings": settings,
                }),
            )?;
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", stamp.display())),
    }
}

pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    let start = Instant::now();
    let clip = a.models.join("shapes-clip");
    let llava = a.models.join("shapes-llava");
    for dir in [&clip, &llava] {
        if !dir.join("config.json").is_file() {
            bail!(
                "{}: shipped ShapesWorld checkpoint missing. Rebuild it with `misp world generate --out world && misp world pretrain --world world --out {}` (see README, \"ShapesWorld models\"), or point --models at the folder holding shapes-clip/ and shapes-llava/",
                dir.display(),
                a.models.display()
            );
        }
    }
    let mut plan = DemoPlan::new(a.quick, a.seeds.clone(), a.validation)
        .with_sets(&a.sets)
        .with_world_seed(a.world_seed);
    if let Some(v) = &a.variants {
        plan = plan.with_variants(v).map_err(anyhow::Error::msg)?;
    }
    if let Some(name) = &a.sweep {
        plan.sweep = Some(demo::Sweep::parse(name).map_err(anyhow::Error::msg)?);
    }
    // Checked here, so that a device that cannot be had fails before any work.
    a.runtime.apply()?;
    let model_flags = a.runtime.to_flags();
    let out = &a.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let split = if a.validation { "val" } else { "test" };
    let settings = serde_json::json!({
        "train": plan.train,
        "split": split,
        "pope_per_split": plan.pope_per_split,
        "chair_images": plan.chair_images,
    });
    check_stamp(out, &clip, &llava, &settings)?;
    let mut timings: Vec<(String, f64)> = Vec::new();
    let mut timed =
        |name: &str, t: Instant| timings.push((name.to_string(), t.elapsed().as_secs_f64()));

    // 1. The world.
    let t = Instant::now();
    let world = out.join("world");
    demo::check_world_seed(&world, plan.world_seed)?;
    misp(&plan.world_args(&world))?;
    timed("world", t);

    // 2. CLIP embeddings of the pool and of the records.
    let t = Instant::now();
    let pool = out.join("embed/pool");
    let records = out.join("embed/records");
    misp(
        &[
            "embed".into(),
            "pool".into(),
            "--clip".into(),
            s(&clip),
            "--images".into(),
            s(&world.join("pool.txt")),
            "--out".into(),
            s(&pool),
            "--quiet".into(),
        ]
        .into_iter()
        .chain(model_flags.clone())
        .collect::<Vec<_>>(),
    )?;
    misp(
        &[
            "embed".into(),
            "records".into(),
            "--clip".into(),
            s(&clip),
            "--data".into(),
            s(&world.join("records.jsonl")),
            "--out".into(),
            s(&records),
            "--quiet".into(),
        ]
        .into_iter()
        .chain(model_flags.clone())
        .collect::<Vec<_>>(),
    )?;
    timed("embed", t);

    // 3. SAE and mining.
    let t = Instant::now();
    let sae = out.join("sae");
    if !sae.join("model.safetensors").is_file() {
        misp(&[
            "sae".into(),
            "train".into(),
            "--pool".into(),
            s(&pool),
            "--records".into(),
            s(&records),
            "--out".into(),
            s(&sae),
            "--epochs".into(),
            plan.sae_epochs.to_string(),
            "--candidates".into(),
            plan.candidates.clone(),
            "--quiet".into(),
        ])?;
    }
    let neg_dir = out.join("negatives");
    std::fs::create_dir_all(&neg_dir)?;
    for strategy in plan.strategies() {
        let file = neg_dir.join(format!("{strategy}.jsonl"));
        misp(&[
            "mine".into(),
            "--pool".into(),
            s(&pool),
            "--records".into(),
            s(&records),
            "--sae".into(),
            s(&sae),
            "--strategy".into(),
            strategy.into(),
            "--k".into(),
            plan.k.to_string(),
            "--candidates".into(),
            plan.candidates.clone(),
            "--out".into(),
            s(&file),
            "--quiet".into(),
        ])?;
    }
    // The k sweep needs more misp negatives than the variants' K: a file of its own (the first
    // k of a greedy list are the greedy choice of k).
    let sweep_k = plan.sweep.as_ref().and_then(|s| s.max_k());
    if let Some(k) = sweep_k {
        misp(&[
            "mine".into(),
            "--pool".into(),
            s(&pool),
            "--records".into(),
            s(&records),
            "--sae".into(),
            s(&sae),
            "--strategy".into(),
            "misp".into(),
            "--k".into(),
            k.to_string(),
            "--candidates".into(),
            plan.candidates.clone(),
            "--out".into(),
            s(&neg_dir.join(format!("misp-k{k}.jsonl"))),
            "--quiet".into(),
        ])?;
    }
    timed("sae + mine", t);

    // 4. Training runs.
    let t = Instant::now();
    let configs = out.join("configs");
    std::fs::create_dir_all(&configs)?;
    for (name, text) in demo::SHIPPED_CONFIGS {
        misp::files::write_atomic(&configs.join(format!("{name}.toml")), text.as_bytes())?;
    }
    // (run name, config, extra --set, negatives file) of every trained variant.
    let mut jobs: Vec<(String, String, Vec<String>, Option<PathBuf>)> = plan
        .variants
        .iter()
        .map(|v| {
            let negs = demo::negatives_for(v).map(|st| neg_dir.join(format!("{st}.jsonl")));
            (v.clone(), v.clone(), Vec::new(), negs)
        })
        .collect();
    if let Some(sweep) = &plan.sweep {
        for value in &sweep.values {
            let negs = match sweep_k {
                Some(k) => neg_dir.join(format!("misp-k{k}.jsonl")),
                None => neg_dir.join("misp.jsonl"),
            };
            jobs.push((
                sweep.variant(value),
                "misp".into(),
                vec![format!("{}={value}", sweep.key)],
                Some(negs),
            ));
        }
    }
    let mut runs: Vec<RunEval> = vec![RunEval::base()];
    for (variant, config, extra, negatives) in &jobs {
        for &seed in &plan.seeds {
            let run_dir = out.join("runs").join(format!("{variant}-s{seed}"));
            if !run_dir.join("adapter/adapter_model.safetensors").is_file() {
                let mut args = vec![
                    "train".into(),
                    "--config".into(),
                    s(&configs.join(format!("{config}.toml"))),
                    "--model".into(),
                    s(&llava),
                    "--data".into(),
                    s(&world.join("records.jsonl")),
                    "--out".into(),
                    s(&run_dir),
                    "--quiet".into(),
                ];
                if let Some(negatives) = negatives {
                    args.extend([
                        "--negatives".into(),
                        s(negatives),
                        "--pool".into(),
                        s(&pool),
                    ]);
                }
                if run_dir.join("checkpoints").is_dir() {
                    args.push("--resume".into());
                }
                for set in plan.train_sets(seed).into_iter().chain(extra.clone()) {
                    args.extend(["--set".into(), set]);
                }
                args.extend(model_flags.clone());
                misp(&args)?;
            }
            runs.push(RunEval::trained(variant, seed, &run_dir));
        }
    }
    timed("train", t);

    // 5. Evaluation: POPE (3 splits) and CHAIR for the base and every run.
    let t = Instant::now();
    let questions = demo::pope_subsets(&world, split, plan.pope_per_split, &out.join("eval-sets"))?;
    for run in &runs {
        let eval_dir = out.join("eval").join(&run.name);
        let pope_out = eval_dir.join("pope");
        if !pope_out.join("metrics.json").is_file() {
            let mut args = vec![
                "eval".into(),
                "pope".into(),
                "--model".into(),
                s(&llava),
                "--images".into(),
                s(&world),
                "--out".into(),
                s(&pope_out),
                "--batch-size".into(),
                "32".into(),
                "--max-new-tokens".into(),
                "3".into(),
                "--questions".into(),
            ];
            args.extend(questions.iter().map(|q| s(q)));
            if let Some(adapter) = &run.adapter {
                args.extend(["--adapter".into(), s(adapter)]);
            }
            args.extend(model_flags.clone());
            misp(&args)?;
        }
        let chair_out = eval_dir.join("chair");
        if !chair_out.join("metrics.json").is_file() {
            let annotations =
                demo::chair_subset(&world, split, plan.chair_images, &out.join("eval-sets"))?;
            let mut args = vec![
                "eval".into(),
                "chair".into(),
                "--model".into(),
                s(&llava),
                "--images".into(),
                s(&world),
                "--annotations".into(),
                s(&annotations),
                "--synonyms".into(),
                s(&world.join("chair/synonyms.txt")),
                "--out".into(),
                s(&chair_out),
                "--max-new-tokens".into(),
                "32".into(),
                "--batch-size".into(),
                "32".into(),
            ];
            let prompt = std::fs::read_to_string(world.join("captions_prompt.txt"))
                .unwrap_or_else(|_| "Describe the image.".into());
            args.extend(["--prompt".into(), prompt.trim().to_string()]);
            if let Some(adapter) = &run.adapter {
                args.extend(["--adapter".into(), s(adapter)]);
            }
            args.extend(model_flags.clone());
            misp(&args)?;
        }
    }
    timed("eval", t);

    // 6. Report.
    let report = demo::write_report(out, &plan, &runs, &world, &pool, &neg_dir, split, &timings)?;
    eprintln!(
        "\nmisp demo done in {:.1} s: {} (results.json, figures beside it)",
        start.elapsed().as_secs_f64(),
        report.display()
    );
    print!("{}", demo::results_table(out)?);
    Ok(())
}
