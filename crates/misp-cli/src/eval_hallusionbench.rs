//! `misp eval hallusionbench`: asks HallusionBench's questions that have a figure with a LLaVA
//! checkpoint (+ adapter), or re-scores saved answers (`--answers`) without a model. The
//! benchmark logic is `misp::eval::hallusionbench`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use misp::eval::hallusionbench::{self as hb, HbMetrics};
use misp::eval::Images;
use misp::model::vlm::Vlm;
use serde_json::{json, Value};

use crate::eval_cmd::generator;
use crate::eval_native::{self, NativeBench};
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

fn print_table(scores: &BTreeMap<String, HbMetrics>) {
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

impl NativeBench for HallusionBenchArgs {
    const COMMAND: &'static str = "eval hallusionbench";
    const NO_MODEL: &'static str =
        "give --model (to answer the questions) or --answers (to re-score saved answers)";
    const NO_INPUTS: &'static str = "--questions and --images are needed with --model";
    const ASKED: (&'static str, &'static str) =
        ("questions", "not asked (no figure or missing image)");
    type Questions = Vec<hb::HbQuestion>;
    type Run = hb::HbRun;
    type Scores = BTreeMap<String, HbMetrics>;

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
        Ok(hb::HbRun {
            answers: hb::read_answers(path)?,
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
        Ok((hb::read_questions(path)?, config))
    }
    fn ask(
        &self,
        questions: &Self::Questions,
        vlm: &Vlm,
        images: &Images,
        batch: usize,
    ) -> anyhow::Result<Self::Run> {
        let mut generate = generator(vlm, self.max_new_tokens);
        Ok(hb::run(
            questions,
            images,
            &self.suffix,
            batch,
            &mut generate,
        )?)
    }
    fn write_outputs(&self, run: &Self::Run) -> anyhow::Result<Self::Scores> {
        Ok(hb::write_outputs(&self.out, run)?)
    }
    fn print_table(scores: &Self::Scores) {
        print_table(scores)
    }
    fn counts(run: &Self::Run) -> (usize, usize) {
        (run.answers.len(), run.excluded.len())
    }
}

pub fn run(args: HallusionBenchArgs) -> anyhow::Result<()> {
    eval_native::run(&args)
}
