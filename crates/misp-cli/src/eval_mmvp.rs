//! `misp eval mmvp`: asks MMVP's questions with a LLaVA checkpoint (+ adapter), or re-scores
//! saved answers (`--answers`) without a model. The benchmark logic is `misp::eval::mmvp`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use misp::eval::mmvp::{self, MmvpMetrics};
use misp::eval::Images;
use misp::model::vlm::Vlm;
use serde_json::{json, Value};

use crate::eval_cmd::generator;
use crate::eval_native::{self, NativeBench};
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

impl NativeBench for MmvpArgs {
    const COMMAND: &'static str = "eval mmvp";
    const NO_MODEL: &'static str =
        "give --model (to answer the questions) or --answers (to re-score saved answers)";
    const NO_INPUTS: &'static str = "--questions and --images are needed with --model";
    const ASKED: (&'static str, &'static str) = ("questions", "excluded (missing images)");
    type Questions = Vec<mmvp::MmvpQuestion>;
    type Run = mmvp::MmvpRun;
    type Scores = BTreeMap<String, MmvpMetrics>;

    fn model(&self) -> Option<&ModelArgs> {
        self.model.as_ref()
    }
    fn answers(&self) -> Option<&Path> {
        self.answers.as_deref()
    }
    fn out(&self) -> &Path {
        &self.out
    }
    fn images(&self) -> Option<&Path> {
        self.questions.as_ref().and(self.images.as_deref())
    }
    fn read_answers(&self, path: &Path) -> anyhow::Result<Self::Run> {
        Ok(mmvp::MmvpRun {
            answers: mmvp::read_answers(path)?,
            excluded: Vec::new(),
        })
    }
    fn read_questions(&self) -> anyhow::Result<(Self::Questions, Value)> {
        let path = self.questions.as_deref().context(Self::NO_INPUTS)?;
        let config = json!({
            "questions": path,
            "images": self.images,
            "suffix": self.suffix,
            "max_new_tokens": self.max_new_tokens,
        });
        Ok((mmvp::read_questions(path)?, config))
    }
    fn ask(
        &self,
        questions: &Self::Questions,
        vlm: &Vlm,
        images: &Images,
        batch: usize,
    ) -> anyhow::Result<Self::Run> {
        let mut generate = generator(vlm, self.max_new_tokens);
        Ok(mmvp::run(
            questions,
            images,
            &self.suffix,
            batch,
            &mut generate,
        )?)
    }
    fn write_outputs(&self, run: &Self::Run) -> anyhow::Result<Self::Scores> {
        Ok(mmvp::write_outputs(&self.out, run)?)
    }
    fn print_table(scores: &Self::Scores) {
        print_table(scores)
    }
    fn counts(run: &Self::Run) -> (usize, usize) {
        (run.answers.len(), run.excluded.len())
    }
}

pub fn run(args: MmvpArgs) -> anyhow::Result<()> {
    eval_native::run(&args)
}
