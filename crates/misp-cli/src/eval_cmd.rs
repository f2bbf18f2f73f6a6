//! `misp eval`: Stage 3. The model-free sub-commands live here: `score-only` re-derives
//! metrics from saved answers or captions, `compare` puts several runs side by side. The
//! benchmark runs (`pope`, `chair`) call `misp::eval::{pope, chair}` with a model's generator.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use misp::eval::{chair, compare, pope};

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Recompute metrics from an existing answers file, without the model: POPE
    /// `answers.jsonl` (rows with `label` and `answer`) or CHAIR captions (rows with `image`
    /// and `caption`, needs --annotations).
    ScoreOnly(ScoreOnlyArgs),
    /// One table (compare.md, compare.json) and bar chart (compare.png) of several runs'
    /// metrics.json.
    Compare(CompareArgs),
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

pub fn run(cmd: EvalCommand) -> anyhow::Result<()> {
    match cmd {
        EvalCommand::ScoreOnly(args) => score_only(args),
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

fn score_only(args: ScoreOnlyArgs) -> anyhow::Result<()> {
    match detect(&args.answers)? {
        Kind::Pope => {
            let answers = pope::read_answers(&args.answers)?;
            let run = pope::PopeRun {
                answers,
                excluded: Vec::new(),
            };
            let scores = pope::write_outputs(&args.out, &run)?;
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
        Kind::Chair => {
            let annotations = args
                .annotations
                .as_ref()
                .context("CHAIR captions need --annotations (COCO instances JSON)")?;
            let table = match &args.synonyms {
                Some(p) => {
                    let text = std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    chair::Chair::new(&text).with_context(|| p.display().to_string())?
                }
                None => chair::Chair::coco(),
            };
            let gt = chair::GroundTruth::from_coco_instances(annotations, &table)?;
            let captions = chair::read_captions(&args.answers)?;
            let run = chair::ChairRun {
                captions,
                excluded: Vec::new(),
            };
            let m = chair::write_outputs(&args.out, &table, &gt, &run)?;
            println!("| n | CHAIR_s | CHAIR_i | recall |");
            println!("|---:|---:|---:|---:|");
            println!(
                "| {} | {:.4} | {:.4} | {:.4} |",
                m.n, m.chair_s, m.chair_i, m.recall
            );
        }
    }
    eprintln!("wrote {}", args.out.join("metrics.json").display());
    Ok(())
}
