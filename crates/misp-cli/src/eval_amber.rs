//! `misp eval amber`: asks AMBER's queries (descriptions and/or yes/no questions) with a LLaVA
//! checkpoint (+ adapter), or re-scores saved replies (`--answers`: misp's answers.jsonl or
//! AMBER's own `[{"id", "response"}]` file) without a model. The benchmark logic is
//! `misp::eval::amber`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use misp::eval::amber;
use serde_json::{json, Value};

use crate::eval_cmd::{generator, write_config};
use crate::score_cmd::ModelArgs;

#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    Generative,
    Discriminative,
    All,
}

impl KindArg {
    fn kind(self) -> amber::Kind {
        match self {
            KindArg::Generative => amber::Kind::Generative,
            KindArg::Discriminative => amber::Kind::Discriminative,
            KindArg::All => amber::Kind::All,
        }
    }
}

#[derive(Args)]
pub struct AmberArgs {
    #[command(flatten)]
    model: Option<ModelArgs>,
    /// AMBER's data/ folder: annotations.json, relation.json, safe_words.txt and
    /// query/query_{all,generative,discriminative}.json.
    #[arg(long)]
    annotations: PathBuf,
    /// Folder of AMBER's images (AMBER_1.jpg, ...).
    #[arg(long, required_unless_present = "answers")]
    images: Option<PathBuf>,
    /// Which queries to ask: descriptions, yes/no questions, or both.
    #[arg(long, value_enum, default_value = "all")]
    kind: KindArg,
    /// Re-score these saved replies (misp's answers.jsonl, or AMBER's inference file, a JSON
    /// array of {"id", "response"}) instead of running a model.
    #[arg(long, conflicts_with_all = ["model", "images"])]
    answers: Option<PathBuf>,
    /// Folder for answers.jsonl, metrics.json, excluded.json and config.json.
    #[arg(long)]
    out: PathBuf,
    /// New-token limit of a description (or EOS).
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// New-token limit of a yes/no answer (or EOS).
    #[arg(long, default_value_t = 16)]
    max_answer_tokens: usize,
}

fn print_table(metrics: &BTreeMap<String, Value>) {
    let o = |v: &Value, k: &str| v["official"][k].as_f64().unwrap_or(f64::NAN);
    if let Some(g) = metrics.get("generative") {
        println!("| generative | n | CHAIR | Cover | Hal | Cog |");
        println!("|---|---:|---:|---:|---:|---:|");
        println!(
            "| descriptions | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            g["n"],
            o(g, "CHAIR"),
            o(g, "Cover"),
            o(g, "Hal"),
            o(g, "Cog")
        );
    }
    let dims = [
        "discriminative",
        "existence",
        "attribute",
        "state",
        "number",
        "action",
        "relation",
    ];
    if dims.iter().any(|d| metrics.contains_key(*d)) {
        println!("| discriminative | n | Accuracy | Precision | Recall | F1 | unknown |");
        println!("|---|---:|---:|---:|---:|---:|---:|");
        for d in dims {
            if let Some(m) = metrics.get(d) {
                println!(
                    "| {d} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
                    m["n"],
                    o(m, "Accuracy"),
                    o(m, "Precision"),
                    o(m, "Recall"),
                    o(m, "F1"),
                    m["unknown"]
                );
            }
        }
    }
    println!(
        "(percent, as AMBER's inference.py prints them; metrics.json has the exact fractions)"
    );
}

pub fn run(args: AmberArgs) -> anyhow::Result<()> {
    let data = amber::Amber::load(&args.annotations)?;
    if let Some(path) = &args.answers {
        let run = amber::AmberRun {
            answers: amber::read_answers(path)?,
            excluded: Vec::new(),
        };
        misp::files::write_json_atomic(
            &args.out.join("config.json"),
            &json!({"command": "eval amber", "answers": path, "annotations": args.annotations,
                    "misp_version": env!("CARGO_PKG_VERSION")}),
        )?;
        print_table(&amber::write_outputs(&args.out, &data, &run)?);
        eprintln!("re-scored {}; wrote {}", path.display(), args.out.display());
        return Ok(());
    }
    let model = args
        .model
        .as_ref()
        .context("give --model (to answer the queries) or --answers (to re-score saved replies)")?;
    let images = args
        .images
        .as_ref()
        .context("--images is needed with --model")?;
    model.runtime.apply()?;
    let query_path = amber::query_path(&args.annotations, args.kind.kind());
    let queries = amber::read_queries(&query_path)?;
    write_config(
        &args.out,
        model,
        "eval amber",
        json!({
            "annotations": args.annotations,
            "queries": query_path,
            "images": images,
            "max_new_tokens": args.max_new_tokens,
            "max_answer_tokens": args.max_answer_tokens,
        }),
    )?;
    let vlm = model.load()?;
    let mut describe = generator(&vlm, args.max_new_tokens);
    let mut answer = generator(&vlm, args.max_answer_tokens);
    let start = std::time::Instant::now();
    let images = misp::eval::Images::new(images, model.image_root.as_deref())?;
    let run = amber::run(
        &data,
        &queries,
        &images,
        model.batch_size,
        &mut describe,
        &mut answer,
    )?;
    let seconds = start.elapsed().as_secs_f64();
    let metrics = amber::write_outputs(&args.out, &data, &run)?;
    print_table(&metrics);
    eprintln!(
        "{} queries answered in {seconds:.1} s, {} excluded (missing images or annotations); wrote {}",
        run.answers.len(),
        run.excluded.len(),
        args.out.display()
    );
    Ok(())
}
