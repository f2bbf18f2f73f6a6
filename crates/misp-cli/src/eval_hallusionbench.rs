//! `misp eval hallusionbench`: asks HallusionBench's questions that have a figure with a LLaVA
//! checkpoint (+ adapter), or re-scores saved answers (`--answers`) without a model. The
//! benchmark logic is `misp::eval::hallusionbench`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use misp::eval::hallusionbench::{self as hb, HbMetrics};
use serde_json::json;

use crate::eval_cmd::{generator, write_config};
use crate::score_cmd::ModelArgs;

#[derive(Args)]
pub struct HallusionBenchArgs {
    #[command(flatten)]
    model: Option<ModelArgs>,
    /// The official HallusionBench.json (category, subcategory, set_id, figure_id,
    /// question_id, question, gt_answer, filename).
    #[arg(long, required_unless_present = "answers")]
    questions: Option<PathBuf>,
    /// Folder the questions' `filename`s are relative to (the one holding hallusion_bench/).
    #[arg(long, required_unless_present = "answers")]
    images: Option<PathBuf>,
    /// Re-score this answers.jsonl of an earlier run (rows: the question's fields and
    /// `answer`) instead of running a model.
    #[arg(long, conflicts_with_all = ["model", "questions", "images"])]
    answers: Option<PathBuf>,
    /// Folder for answers.jsonl, metrics.json, excluded.json and config.json.
    #[arg(long)]
    out: PathBuf,
    /// Appended to every question (VLMEvalKit's yes/no instruction by default).
    #[arg(long, default_value = hb::DEFAULT_SUFFIX)]
    suffix: String,
    /// Stop after this many new tokens (or at EOS).
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
}

fn print_table(scores: &std::collections::BTreeMap<String, HbMetrics>) {
    println!("| section | n | aAcc | fAcc | qAcc | unknown |");
    println!("|---|---:|---:|---:|---:|---:|");
    let overall = scores.get_key_value("overall");
    let rest = scores.iter().filter(|(k, _)| *k != "overall");
    for (name, m) in overall.into_iter().chain(rest) {
        let f = m
            .f_acc
            .map_or("-".to_string(), |f| format!("{:.2}", f * 100.0));
        println!(
            "| {name} | {} | {:.2} | {f} | {:.2} | {} |",
            m.n,
            m.a_acc * 100.0,
            m.q_acc * 100.0,
            m.unknown
        );
    }
}

pub fn run(args: HallusionBenchArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.answers {
        let answers = hb::read_answers(path)?;
        let run = hb::HbRun {
            answers,
            excluded: Vec::new(),
        };
        misp::files::write_json_atomic(
            &args.out.join("config.json"),
            &json!({"command": "eval hallusionbench", "answers": path,
                    "misp_version": env!("CARGO_PKG_VERSION")}),
        )?;
        print_table(&hb::write_outputs(&args.out, &run)?);
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
    // Questions first: a bad file fails before the model loads.
    let questions = hb::read_questions(questions_path)?;
    write_config(
        &args.out,
        model,
        "eval hallusionbench",
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
    let run = hb::run(
        &questions,
        &images,
        &args.suffix,
        model.batch_size,
        &mut generate,
    )?;
    let seconds = start.elapsed().as_secs_f64();
    let scores = hb::write_outputs(&args.out, &run)?;
    print_table(&scores);
    eprintln!(
        "{} questions answered in {seconds:.1} s, {} not asked (no figure or missing image); wrote {}",
        run.answers.len(),
        run.excluded.len(),
        args.out.display()
    );
    Ok(())
}
