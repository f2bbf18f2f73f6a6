//! `misp eval`: Stage 3. `pope` and `chair` run a LLaVA or Qwen2.5-VL checkpoint (+ adapter)
//! over the benchmark and write per-item answers, metrics and the resolved config into one folder;
//! `score-only` re-derives the metrics from saved answers or captions without the model, and
//! `compare` puts several runs side by side. The benchmark logic is `misp::eval::{pope,
//! chair}`; this module only hands it the model as a batched generator.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use misp::eval::{chair, compare, pope};
use misp::files::write_json_atomic;
use misp::model::vlm::Vlm;
use serde_json::json;

use crate::score_cmd::ModelArgs;

#[derive(Subcommand)]
pub enum EvalCommand {
    /// POPE yes/no object probes: answers.jsonl, metrics.json (per split and overall),
    /// excluded.json (missing images) and config.json in --out.
    Pope(PopeArgs),
    /// CHAIR captioning: captions.jsonl, metrics.json (CHAIR_s, CHAIR_i, recall),
    /// excluded.json and config.json in --out.
    Chair(ChairArgs),
    /// Recompute metrics from an existing answers file, without the model: POPE
    /// `answers.jsonl` (rows with `label` and `answer`) or CHAIR captions (rows with `image`
    /// and `caption`, needs --annotations).
    ScoreOnly(ScoreOnlyArgs),
    /// HallusionBench yes/no questions on figures: answers.jsonl, metrics.json (aAcc, fAcc,
    /// qAcc overall, per category and subcategory), excluded.json and config.json in --out.
    /// With --answers, re-scores saved answers without a model.
    #[command(mut_arg("model", model_optional))]
    Hallusionbench(crate::eval_hallusionbench::HallusionBenchArgs),
    /// MMVP two-option questions on image pairs: answers.jsonl, metrics.json (question and
    /// pair accuracy, per visual pattern when the file has one), excluded.json and config.json
    /// in --out. With --answers, re-scores saved answers without a model.
    #[command(mut_arg("model", model_optional))]
    Mmvp(crate::eval_mmvp::MmvpArgs),
    /// AMBER: descriptions (CHAIR, Cover, Hal, Cog) and yes/no questions (accuracy,
    /// precision, recall, F1 per dimension): answers.jsonl, metrics.json, excluded.json and
    /// config.json in --out. With --answers, re-scores saved replies without a model.
    #[command(mut_arg("model", model_optional))]
    Amber(crate::eval_amber::AmberArgs),
    /// One table (compare.md, compare.json) and bar chart (compare.png) of several runs'
    /// metrics.json.
    Compare(CompareArgs),
    /// MMHal-Bench with an LLM judge (0-6 ratings): answers.jsonl, metrics.json (average
    /// score, hallucination rate, per question type), excluded.json and config.json in --out.
    #[command(mut_arg("model", model_optional))]
    Mmhal(crate::eval_judged_cmd::MmhalArgs),
    /// WildVision-Bench: pairwise LLM judgements against a baseline's answers (both orders):
    /// answers.jsonl, metrics.json (score, win rate, reward), excluded.json and config.json.
    #[command(mut_arg("model", model_optional))]
    Wildvision(crate::eval_judged_cmd::WildvisionArgs),
}

#[derive(Args)]
pub struct PopeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// POPE question files (JSON Lines `{question_id, image, text, label}`); the split of each
    /// comes from its name (random, popular, adversarial) unless --split is given.
    #[arg(long, required = true, num_args = 1..)]
    questions: Vec<PathBuf>,
    /// Folder the questions' `image` paths are relative to.
    #[arg(long)]
    images: PathBuf,
    /// Folder for answers.jsonl, metrics.json, excluded.json and config.json.
    #[arg(long)]
    out: PathBuf,
    /// Split name for every question file (when the names do not tell).
    #[arg(long)]
    split: Option<String>,
    /// Appended to every question (LLaVA's single-word instruction by default).
    #[arg(long, default_value = pope::LLAVA_POPE_SUFFIX)]
    suffix: String,
    /// Stop after this many new tokens (or at EOS); a yes/no answer needs few.
    #[arg(long, default_value_t = 8)]
    max_new_tokens: usize,
}

#[derive(Args)]
pub struct ChairArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Folder the annotations' `file_name`s are relative to.
    #[arg(long)]
    images: PathBuf,
    /// COCO instances JSON (images, annotations, categories): which images to caption and
    /// their ground-truth objects.
    #[arg(long)]
    annotations: PathBuf,
    /// Folder for captions.jsonl, metrics.json, excluded.json and config.json.
    #[arg(long)]
    out: PathBuf,
    /// Synonym table replacing the shipped COCO one (one object per line, its name first,
    /// `, `-separated).
    #[arg(long)]
    synonyms: Option<PathBuf>,
    /// The captioning instruction.
    #[arg(long, default_value = chair::DEFAULT_CHAIR_PROMPT)]
    prompt: String,
    /// Stop after this many new tokens (or at EOS).
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
}

#[derive(Args)]
pub struct ScoreOnlyArgs {
    /// POPE answers.jsonl or CHAIR captions JSONL.
    #[arg(long)]
    answers: PathBuf,
    /// Folder for metrics.json, the re-scored audit file and excluded.json (may be the run's
    /// own folder: files are replaced atomically).
    #[arg(long)]
    out: PathBuf,
    /// CHAIR only: COCO instances JSON (images, annotations, categories) with the
    /// ground-truth objects of the captioned images.
    #[arg(long)]
    annotations: Option<PathBuf>,
    /// CHAIR only: synonym table replacing the shipped COCO one (one object per line, its
    /// name first, `, `-separated).
    #[arg(long)]
    synonyms: Option<PathBuf>,
}

#[derive(Args)]
pub struct CompareArgs {
    /// Run folders, each with a metrics.json from `misp eval` (POPE or CHAIR).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Folder for compare.md, compare.json and compare.png.
    #[arg(long)]
    out: PathBuf,
}

/// `--model` is optional where `--answers` can stand in for it (the usage line says so).
fn model_optional(arg: clap::Arg) -> clap::Arg {
    arg.required(false)
}

pub fn run(cmd: EvalCommand) -> anyhow::Result<()> {
    match cmd {
        EvalCommand::Pope(args) => run_pope(args),
        EvalCommand::Chair(args) => run_chair(args),
        EvalCommand::ScoreOnly(args) => score_only(args),
        EvalCommand::Hallusionbench(args) => crate::eval_hallusionbench::run(args),
        EvalCommand::Mmvp(args) => crate::eval_mmvp::run(args),
        EvalCommand::Amber(args) => crate::eval_amber::run(args),
        EvalCommand::Mmhal(args) => crate::eval_judged_cmd::run_mmhal(args),
        EvalCommand::Wildvision(args) => crate::eval_judged_cmd::run_wildvision(args),
        EvalCommand::Compare(args) => {
            let runs = compare::compare(&args.runs, &args.out)?;
            print!("{}", compare::markdown_table(&runs));
            eprintln!("wrote {}", args.out.join("compare.{md,json,png}").display());
            Ok(())
        }
    }
}

/// Which benchmark an answers file belongs to, from its first row.
enum Kind {
    Pope,
    Chair,
}

fn detect(path: &Path) -> anyhow::Result<Kind> {
    let lines = misp::files::read_lines(path)?;
    let (line, text) = lines
        .first()
        .with_context(|| format!("{}: no answers in the file", path.display()))?;
    let row: serde_json::Value = serde_json::from_str(text)
        .with_context(|| format!("{}:{line}: not JSON", path.display()))?;
    if row.get("label").is_some() {
        Ok(Kind::Pope)
    } else if row.get("caption").is_some() {
        Ok(Kind::Chair)
    } else {
        anyhow::bail!(
            "{}:{line}: neither a POPE answer (no `label`) nor a CHAIR caption (no `caption`)",
            path.display()
        )
    }
}

/// The model as the batched generator `misp::eval` runs: each `(image, prompt)` is prepared
/// (an undecodable image or an unencodable prompt fails the run, naming the item), then the
/// batch is answered greedily in one call.
pub(crate) fn generator(
    vlm: &Vlm,
    max_new_tokens: usize,
) -> impl FnMut(&[(PathBuf, String)]) -> Result<Vec<String>, String> + '_ {
    move |batch| {
        let items = batch
            .iter()
            .map(|(image, prompt)| {
                vlm.prepare_prompt(image, prompt)
                    .map_err(|e| format!("{} with prompt {prompt:?}: {e}", image.display()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        vlm.generate_prepared(&items, max_new_tokens)
            .map_err(|e| e.to_string())
    }
}

/// The synonym table: `path` when given, else the shipped COCO one.
fn chair_table(path: Option<&Path>) -> anyhow::Result<chair::Chair> {
    match path {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            Ok(chair::Chair::new(&text).with_context(|| p.display().to_string())?)
        }
        None => Ok(chair::Chair::coco()),
    }
}

fn print_pope(scores: &pope::PopeScores) {
    println!("| split | n | accuracy | precision | recall | f1 | yes ratio |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let rows = scores.splits.iter().map(|(s, m)| (s.as_str(), m));
    for (split, m) in rows.chain([("overall", &scores.overall)]) {
        println!(
            "| {split} | {} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} |",
            m.n, m.accuracy, m.precision, m.recall, m.f1, m.yes_ratio
        );
    }
}

fn print_chair(m: &chair::ChairMetrics) {
    println!("| n | CHAIR_s | CHAIR_i | recall |");
    println!("|---:|---:|---:|---:|");
    println!(
        "| {} | {:.4} | {:.4} | {:.4} |",
        m.n, m.chair_s, m.chair_i, m.recall
    );
}

/// The run's settings, written before the model runs so that a failed or interrupted run
/// still says what it was asked to do.
pub(crate) fn write_config(
    out: &Path,
    model: &ModelArgs,
    command: &str,
    extra: serde_json::Value,
) -> anyhow::Result<()> {
    let mut config = model.to_json();
    config["command"] = json!(command);
    config["misp_version"] = json!(env!("CARGO_PKG_VERSION"));
    if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    write_json_atomic(&out.join("config.json"), &config)?;
    Ok(())
}

fn run_pope(args: PopeArgs) -> anyhow::Result<()> {
    args.model.runtime.apply()?; // a device that cannot be had fails before anything is read
                                 // Questions first: a bad file should fail before the model loads.
    let questions = pope::read_question_files(&args.questions, args.split.as_deref())?;
    write_config(
        &args.out,
        &args.model,
        "eval pope",
        json!({
            "questions": args.questions,
            "images": args.images,
            "split": args.split,
            "suffix": args.suffix,
            "max_new_tokens": args.max_new_tokens,
        }),
    )?;
    let vlm = args.model.load()?;
    let mut generate = generator(&vlm, args.max_new_tokens);
    let start = std::time::Instant::now();
    let images = misp::eval::Images::new(&args.images, args.model.image_root.as_deref())?;
    let run = pope::run_pope(
        &questions,
        &images,
        &args.suffix,
        args.model.batch_size,
        &mut generate,
    )?;
    let seconds = start.elapsed().as_secs_f64();
    let scores = pope::write_outputs(&args.out, &run)?;
    print_pope(&scores);
    eprintln!(
        "{} questions answered in {seconds:.3} s ({:.2} questions/s), {} excluded (missing images); wrote {}",
        run.answers.len(),
        run.answers.len() as f64 / seconds.max(1e-9),
        run.excluded.len(),
        args.out.display()
    );
    Ok(())
}

fn run_chair(args: ChairArgs) -> anyhow::Result<()> {
    args.model.runtime.apply()?;
    let table = chair_table(args.synonyms.as_deref())?;
    let gt = chair::GroundTruth::from_coco_instances(&args.annotations, &table)?;
    write_config(
        &args.out,
        &args.model,
        "eval chair",
        json!({
            "images": args.images,
            "annotations": args.annotations,
            "synonyms": args.synonyms,
            "prompt": args.prompt,
            "max_new_tokens": args.max_new_tokens,
        }),
    )?;
    let vlm = args.model.load()?;
    let mut generate = generator(&vlm, args.max_new_tokens);
    let start = std::time::Instant::now();
    let images = misp::eval::Images::new(&args.images, args.model.image_root.as_deref())?;
    let run = chair::run_chair(
        &gt,
        &images,
        &args.prompt,
        args.model.batch_size,
        &mut generate,
    )?;
    let seconds = start.elapsed().as_secs_f64();
    let m = chair::write_outputs(&args.out, &table, &gt, &run)?;
    print_chair(&m);
    eprintln!(
        "{} images captioned in {seconds:.1} s, {} excluded (missing images); wrote {}",
        run.captions.len(),
        run.excluded.len(),
        args.out.display()
    );
    Ok(())
}

fn score_only(args: ScoreOnlyArgs) -> anyhow::Result<()> {
    match detect(&args.answers)? {
        Kind::Pope => {
            let answers = pope::read_answers(&args.answers)?;
            let run = pope::PopeRun {
                answers,
                excluded: Vec::new(),
            };
            print_pope(&pope::write_outputs(&args.out, &run)?);
        }
        Kind::Chair => {
            let annotations = args
                .annotations
                .as_ref()
                .context("CHAIR captions need --annotations (COCO instances JSON)")?;
            let table = chair_table(args.synonyms.as_deref())?;
            let gt = chair::GroundTruth::from_coco_instances(annotations, &table)?;
            let captions = chair::read_captions(&args.answers)?;
            let run = chair::ChairRun {
                captions,
                excluded: Vec::new(),
            };
            print_chair(&chair::write_outputs(&args.out, &table, &gt, &run)?);
        }
    }
    eprintln!("wrote {}", args.out.join("metrics.json").display());
    Ok(())
}
