//! `misp eval mmvp`: asks MMVP's questions with a LLaVA checkpoint (+ adapter), or re-scores
//! saved answers (`--answers`) without a model. The benchmark logic is `misp::eval::mmvp`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use misp::eval::mmvp::{self, MmvpMetrics};
use serde_json::json;

use crate::eval_cmd::{generator, write_config};
use crate::score_cmd::ModelArgs;

#[derive(Args)]
pub struct MmvpArgs {
    #[command(flatten)]
    model: Option<ModelArgs>,
    /// The official Questions.csv (Index, Question, Options, Correct Answer; an optional
    /// "Visual Pattern" / "Type" / "Category" column gives per-pattern metrics).
    #[arg(long, required_unless_present = "answers")]
    questions: Option<PathBuf>,
    /// Folder of the images, `{Index}.jpg` (MMVP's "MMVP Images").
    #[arg(long, required_unless_present = "answers")]
    images: Option<PathBuf>,
    /// Re-score this answers.jsonl of an earlier run instead of running a model.
    #[arg(long, conflicts_with_all = ["model", "questions", "images"])]
    answers: Option<PathBuf>,
    /// Folder for answers.jsonl, metrics.json, excluded.json and config.json.
    #[arg(long)]
    out: PathBuf,
    /// Appended to the official prompt (`Question Options`); empty by default, as the
    /// official evaluation asks.
    #[arg(long, default_value = "")]
    suffix: String,
    /// Stop after this many new tokens (or at EOS).
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
}

fn print_table(scores: &BTreeMap<String, MmvpMetrics>) {
    println!("| section | questions | accuracy | pairs | pair accuracy | unknown |");
    println!("|---|---:|---:|---:|---:|---:|");
    let overall = scores.get_key_value("overall");
    let rest = scores.iter().filter(|(k, _)| *k != "overall");
    for (name, m) in overall.into_iter().chain(rest) {
        println!(
            "| {name} | {} | {:.2} | {} | {:.2} | {} |",
            m.n,
            m.accuracy * 100.0,
            m.pairs,
            m.pair_accuracy * 100.0,
            m.unknown
        );
    }
}

pub fn run(args: MmvpArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.answers {
        let run = mmvp::MmvpRun {
            answers: mmvp::read_answers(path)?,
            excluded: Vec::new(),
        };
        misp::files::write_json_atomic(
            &args.out.join("config.json"),
            &json!({"command": "eval mmvp", "answers": path,
                    "misp_version": env!("CARGO_PKG_VERSION")}),
        )?;
        print_table(&mmvp::write_outputs(&args.out, &run)?);
        eprintln!("re-scored {}; wrote {}", path.display(), args.out.display());
        return Ok(());
    }
    let model = args.model.as_ref().context(
        "give --model (to answer the questions) or --answers (to re-score saved answers)",
    )?;
    let (Some(questions_path), Some(images)) = (&args.questions, &args.images) else {
        anyhow::bail!("--questions and --images are needed with --model");
    };
    model.runtime.apply()?;
    let questions = mmvp::read_questions(questions_path)?;
    write_config(
        &args.out,
        model,
        "eval mmvp",
        json!({
            "questions": questions_path,
            "images": images,
            "suffix": args.suffix,
            "max_new_tokens": args.max_new_tokens,
        }),
    )?;
    let vlm = model.load()?;
    let mut generate = generator(&vlm, args.max_new_tokens);
    let start = std::time::Instant::now();
    let images = misp::eval::Images::new(images, model.image_root.as_deref())?;
    let run = mmvp::run(
        &questions,
        &images,
        &args.suffix,
        model.batch_size,
        &mut generate,
    )?;
    let seconds = start.elapsed().as_secs_f64();
    let scores = mmvp::write_outputs(&args.out, &run)?;
    print_table(&scores);
    eprintln!(
        "{} questions answered in {seconds:.1} s, {} excluded (missing images); wrote {}",
        run.answers.len(),
        run.excluded.len(),
        args.out.display()
    );
    Ok(())
}
