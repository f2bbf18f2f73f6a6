//! The flow the natively scored benchmark subcommands share (`misp eval hallusionbench`, `mmvp`,
//! `amber`): re-score saved answers without a model (`--answers`), or read the questions (a bad
//! file fails before the model loads), record the config, load the model, ask, then score,
//! write and print. Each benchmark says only what differs, in [`NativeBench`].

use std::path::Path;

use anyhow::Context;
use misp::eval::Images;
use misp::model::vlm::Vlm;
use serde_json::{json, Value};

use crate::eval_cmd::write_config;
use crate::score_cmd::ModelArgs;

/// One benchmark as its subcommand drives it.
pub(crate) trait NativeBench {
    /// The subcommand, as config.json records it ("eval mmvp").
    const COMMAND: &'static str;
    /// The error when neither `--model` nor `--answers` is given.
    const NO_MODEL: &'static str;
    /// The error when `--model` is given without what asking needs.
    const NO_INPUTS: &'static str;
    /// What was asked and why some was not, for the closing line: ("questions", "missing
    /// images").
    const ASKED: (&'static str, &'static str);
    type Questions;
    type Run;
    type Scores;

    fn model(&self) -> Option<&ModelArgs>;
    /// `--answers`.
    fn answers(&self) -> Option<&Path>;
    fn out(&self) -> &Path;
    /// The images folder, when every input a model run needs is given.
    fn images(&self) -> Option<&Path>;
    /// Entries of config.json beyond the command, the answers file and the version, when
    /// re-scoring.
    fn rescore_config(&self) -> Value {
        json!({})
    }
    /// Saved answers as a run (nothing excluded).
    fn read_answers(&self, path: &Path) -> anyhow::Result<Self::Run>;
    /// The questions to ask and the config.json entries of a model run.
    fn read_questions(&self) -> anyhow::Result<(Self::Questions, Value)>;
    fn ask(
        &self,
        questions: &Self::Questions,
        vlm: &Vlm,
        images: &Images,
        batch: usize,
    ) -> anyhow::Result<Self::Run>;
    fn write_outputs(&self, run: &Self::Run) -> anyhow::Result<Self::Scores>;
    fn print_table(scores: &Self::Scores);
    /// (answered, excluded) of a run.
    fn counts(run: &Self::Run) -> (usize, usize);
}

/// Runs a benchmark subcommand: re-scores `--answers`, or asks the model.
pub(crate) fn run<B: NativeBench>(bench: &B) -> anyhow::Result<()> {
    let out = bench.out();
    if let Some(path) = bench.answers() {
        let run = bench.read_answers(path)?;
        let mut config = json!({"command": B::COMMAND, "answers": path,
                                "misp_version": env!("CARGO_PKG_VERSION")});
        if let (Some(c), Some(e)) = (config.as_object_mut(), bench.rescore_config().as_object()) {
            c.extend(e.clone());
        }
        misp::files::write_json_atomic(&out.join("config.json"), &config)?;
        B::print_table(&bench.write_outputs(&run)?);
        eprintln!("re-scored {}; wrote {}", path.display(), out.display());
        return Ok(());
    }
    let model = bench.model().context(B::NO_MODEL)?;
    let images = bench.images().context(B::NO_INPUTS)?;
    model.runtime.apply()?;
    let (questions, config) = bench.read_questions()?;
    write_config(out, model, B::COMMAND, config)?;
    let vlm = model.load()?;
    let start = std::time::Instant::now();
    let images = Images::new(images, model.image_root.as_deref())?;
    let run = bench.ask(&questions, &vlm, &images, model.batch_size)?;
    let seconds = start.elapsed().as_secs_f64();
    B::print_table(&bench.write_outputs(&run)?);
    let (answered, excluded) = B::counts(&run);
    let (asked, why) = B::ASKED;
    eprintln!(
        "{answered} {asked} answered in {seconds:.1} s, {excluded} {why}; wrote {}",
        out.display()
    );
    Ok(())
}
