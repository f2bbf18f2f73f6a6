//! `misp eval amber`: asks AMBER's queries (descriptions and/or yes/no questions) with a LLaVA
//! checkpoint (+ adapter), or re-scores saved replies (`--answers`: misp's answers.jsonl or
//! AMBER's own `[{"id", "response"}]` file) without a model. The benchmark logic is
//! `misp::eval::amber`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use misp::eval::amber;
use misp::eval::Images;
use misp::model::vlm::Vlm;
use serde_json::{json, Value};

use crate::eval_cmd::generator;
use crate::eval_native::{self, NativeBench};
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

/// AMBER's subcommand with its annotations loaded (in both modes: scoring needs them).
struct AmberBench {
    args: AmberArgs,
    data: amber::Amber,
}

impl NativeBench for AmberBench {
    const COMMAND: &'static str = "eval amber";
    const NO_MODEL: &'static str =
        "give --model (to answer the queries) or --answers (to re-score saved replies)";
    const NO_INPUTS: &'static str = "--images is needed with --model";
    const ASKED: (&'static str, &'static str) =
        ("queries", "excluded (missing images or annotations)");
    type Questions = Vec<amber::Query>;
    type Run = amber::AmberRun;
    type Scores = BTreeMap<String, Value>;

    fn model(&self) -> Option<&ModelArgs> {
        self.args.model.as_ref()
    }
    fn answers(&self) -> Option<&Path> {
        self.args.answers.as_deref()
    }
    fn out(&self) -> &Path {
        &self.args.out
    }
    fn images(&self) -> Option<&Path> {
        self.args.images.as_deref()
    }
    fn rescore_config(&self) -> Value {
        json!({"annotations": self.args.annotations})
    }
    fn read_answers(&self, path: &Path) -> anyhow::Result<Self::Run> {
        Ok(amber::AmberRun {
            answers: amber::read_answers(path)?,
            excluded: Vec::new(),
        })
    }
    fn read_questions(&self) -> anyhow::Result<(Self::Questions, Value)> {
        let a = &self.args;
        let query_path = amber::query_path(&a.annotations, a.kind.kind());
        let queries = amber::read_queries(&query_path)?;
        let config = json!({
            "annotations": a.annotations,
            "queries": query_path,
            "images": a.images,
            "max_new_tokens": a.max_new_tokens,
            "max_answer_tokens": a.max_answer_tokens,
        });
        Ok((queries, config))
    }
    fn ask(
        &self,
        queries: &Self::Questions,
        vlm: &Vlm,
        images: &Images,
        batch: usize,
    ) -> anyhow::Result<Self::Run> {
        let mut describe = generator(vlm, self.args.max_new_tokens);
        let mut answer = generator(vlm, self.args.max_answer_tokens);
        Ok(amber::run(
            &self.data,
            queries,
            images,
            batch,
            &mut describe,
            &mut answer,
        )?)
    }
    fn write_outputs(&self, run: &Self::Run) -> anyhow::Result<Self::Scores> {
        Ok(amber::write_outputs(&self.args.out, &self.data, run)?)
    }
    fn print_table(scores: &Self::Scores) {
        print_table(scores)
    }
    fn counts(run: &Self::Run) -> (usize, usize) {
        (run.answers.len(), run.excluded.len())
    }
}

pub fn run(args: AmberArgs) -> anyhow::Result<()> {
    let data = amber::Amber::load(&args.annotations)?;
    eval_native::run(&AmberBench { args, data })
}
