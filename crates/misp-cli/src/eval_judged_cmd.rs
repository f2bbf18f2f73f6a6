//! `misp eval mmhal` and `misp eval wildvision`: the judged benchmarks. The model answers (or
//! saved answers are read with `--answers`), then an LLM judge over the OpenAI chat API rates
//! them; the protocols are `misp::eval::{mmhal, wildvision}`, the client `misp::eval::judge`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use misp::eval::judge::{Judge, JudgeConfig, API_KEY_VARS};
use misp::eval::{mmhal, Images};
use misp::files::write_json_atomic;
use serde_json::json;

use crate::score_cmd::ModelArgs;

/// Where the judge is and how to talk to it.
#[derive(Args, Debug)]
pub struct JudgeArgs {
    /// OpenAI-compatible endpoint: a base URL (`https://api.openai.com/v1`) or the full
    /// `.../chat/completions` URL. The API key comes from MISP_JUDGE_API_KEY, else
    /// OPENAI_API_KEY (none: no Authorization header, for local servers).
    #[arg(long)]
    judge_url: String,
    /// The judge model's name as the endpoint knows it (e.g. gpt-4o).
    #[arg(long)]
    judge_model: String,
    /// Judge requests in flight at once.
    #[arg(long, default_value_t = 4)]
    judge_concurrency: usize,
    /// Retries of a request after a transport error, HTTP 408, 429 or 5xx (backoff 2 s,
    /// doubling, at most 60 s); then the run stops with the error, keeping what was judged.
    #[arg(long, default_value_t = 5)]
    judge_retries: usize,
    /// Seconds one judge request may take.
    #[arg(long, default_value_t = 300)]
    judge_timeout: u64,
    /// Folder of cached judge replies, keyed by a hash of model + request (default:
    /// OUT/judge_cache). A re-run sends only what is not cached.
    #[arg(long)]
    judge_cache: Option<PathBuf>,
}

impl JudgeArgs {
    fn judge(&self, out: &Path) -> anyhow::Result<Judge> {
        let config = JudgeConfig {
            url: self.judge_url.clone(),
            model: self.judge_model.clone(),
            api_key: JudgeConfig::api_key_from_env(),
            cache_dir: self
                .judge_cache
                .clone()
                .unwrap_or_else(|| out.join("judge_cache")),
            retries: self.judge_retries,
            backoff: Duration::from_secs(2),
            timeout: Duration::from_secs(self.judge_timeout),
            concurrency: self.judge_concurrency.max(1),
        };
        Ok(Judge::new(config)?)
    }

    fn to_json(&self, out: &Path) -> serde_json::Value {
        json!({
            "judge_url": self.judge_url,
            "judge_model": self.judge_model,
            "judge_concurrency": self.judge_concurrency,
            "judge_retries": self.judge_retries,
            "judge_timeout": self.judge_timeout,
            "judge_cache": self.judge_cache.clone().unwrap_or_else(|| out.join("judge_cache")),
            "judge_api_key_from": API_KEY_VARS.iter().find(|v| std::env::var(v).is_ok_and(|k| !k.trim().is_empty())),
        })
    }
}

#[derive(Args)]
pub struct MmhalArgs {
    #[command(flatten)]
    model: Option<ModelArgs>,
    /// MMHal-Bench's response_template.json (a JSON array of records with question_type,
    /// image_src, image_content, question, gt_answer).
    #[arg(long)]
    questions: PathBuf,
    /// Folder of the benchmark's images (file names from image_src).
    #[arg(long)]
    images: Option<PathBuf>,
    /// Judge saved answers instead of running a model: misp's answers.jsonl or a filled
    /// MMHal-Bench response file (model_answer set).
    #[arg(long, conflicts_with = "model")]
    answers: Option<PathBuf>,
    /// Folder for answers.jsonl, metrics.json, excluded.json and config.json.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    judge: JudgeArgs,
    /// Stop after this many new tokens (or at EOS).
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
}

/// A judged run's config.json: the model's settings when there is a model, the command, the
/// version and `extra`.
pub(crate) fn config_with(
    model: Option<&ModelArgs>,
    command: &str,
    extra: serde_json::Value,
) -> serde_json::Value {
    let mut config = model.map(ModelArgs::to_json).unwrap_or_else(|| json!({}));
    config["command"] = json!(command);
    config["misp_version"] = json!(env!("CARGO_PKG_VERSION"));
    if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    config
}

pub fn run_mmhal(args: MmhalArgs) -> anyhow::Result<()> {
    let questions = mmhal::read_questions(&args.questions)?;
    let judge = args.judge.judge(&args.out)?;
    let mut extra = args.judge.to_json(&args.out);
    extra["questions"] = json!(args.questions);
    extra["images"] = json!(args.images);
    extra["answers"] = json!(args.answers);
    extra["max_new_tokens"] = json!(args.max_new_tokens);
    write_json_atomic(
        &args.out.join("config.json"),
        &config_with(args.model.as_ref(), "eval mmhal", extra),
    )?;
    let (answers, excluded) = match (&args.answers, &args.model) {
        (Some(path), _) => (mmhal::read_answers(path)?, Vec::new()),
        (None, Some(model)) => {
            let images_dir = args
                .images
                .as_ref()
                .context("--images DIR is needed to run the model (or give --answers)")?;
            model.runtime.apply()?;
            let images = Images::new(images_dir, model.image_root.as_deref())?;
            let vlm = model.load()?;
            let mut generate = crate::eval_cmd::generator(&vlm, args.max_new_tokens);
            mmhal::answer(&questions, &images, model.batch_size, &mut generate)?
        }
        (None, None) => {
            anyhow::bail!("give --model DIR to answer the questions, or --answers FILE")
        }
    };
    let judged = mmhal::judge_answers(&questions, &answers, &judge)?;
    let stats = judge.stats();
    let run = mmhal::MmhalRun {
        answers: judged,
        excluded,
    };
    let metrics = mmhal::write_outputs(&args.out, &run)?;
    println!("| group | n | average score (0-6) | hallucination rate |");
    println!("|---|---:|---:|---:|");
    if let Some(map) = metrics.as_object() {
        for (name, m) in map {
            println!(
                "| {name} | {} | {:.2} | {:.4} |",
                m["n"],
                m["average_score"].as_f64().unwrap_or(f64::NAN),
                m["hallucination_rate"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    eprintln!(
        "{} answers judged ({} from the cache, {} requests, {} retried), {} unrated, {} excluded (missing images); wrote {}",
        run.answers.len(),
        stats.cached,
        stats.requested,
        stats.retried,
        metrics["mmhal"]["unrated"],
        run.excluded.len(),
        args.out.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct WildvisionArgs {
    #[command(flatten)]
    model: Option<ModelArgs>,
    /// Questions, JSON Lines `{question_id, instruction, image}` (the bench's question ids and
    /// instructions, each image saved under --images).
    #[arg(long)]
    questions: PathBuf,
    /// The baseline model's answers, JSON Lines `{question_id, output, model}` (the bench's
    /// model_answers/claude-3-sonnet-20240229.jsonl).
    #[arg(long)]
    reference_answers: PathBuf,
    /// Folder the questions' images are in (sent to the judge, and to the model).
    #[arg(long)]
    images: PathBuf,
    /// Judge saved answers instead of running a model: misp's answers.jsonl or the bench's
    /// answer format (`question_id` with `model_answer` or `output`).
    #[arg(long, conflicts_with = "model")]
    answers: Option<PathBuf>,
    /// Folder for answers.jsonl, metrics.json, excluded.json and config.json.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    judge: JudgeArgs,
    /// Judge the baseline-first order only (the shipped judge config, `pairwise: False`)
    /// instead of both orders.
    #[arg(long)]
    single_game: bool,
    /// Stop after this many new tokens (or at EOS).
    #[arg(long, default_value_t = 1024)]
    max_new_tokens: usize,
}

pub fn run_wildvision(args: WildvisionArgs) -> anyhow::Result<()> {
    use misp::eval::wildvision as wv;
    let questions = wv::read_questions(&args.questions)?;
    let (reference, baseline) = wv::read_reference(&args.reference_answers)?;
    let judge = args.judge.judge(&args.out)?;
    let games = if args.single_game { 1 } else { 2 };
    let mut extra = args.judge.to_json(&args.out);
    extra["questions"] = json!(args.questions);
    extra["reference_answers"] = json!(args.reference_answers);
    extra["baseline"] = json!(baseline);
    extra["images"] = json!(args.images);
    extra["answers"] = json!(args.answers);
    extra["games"] = json!(games);
    extra["max_new_tokens"] = json!(args.max_new_tokens);
    write_json_atomic(
        &args.out.join("config.json"),
        &config_with(args.model.as_ref(), "eval wildvision", extra),
    )?;
    let image_root = args.model.as_ref().and_then(|m| m.image_root.as_deref());
    let images = Images::new(&args.images, image_root)?;
    let (asked, mut excluded) = wv::askable(&questions, &reference, &images);
    anyhow::ensure!(
        !asked.is_empty(),
        "none of the {} questions has both its image under {} and a baseline answer",
        questions.len(),
        args.images.display()
    );
    let answers = match (&args.answers, &args.model) {
        (Some(path), _) => wv::read_answers(path)?,
        (None, Some(model)) => {
            model.runtime.apply()?;
            let vlm = model.load()?;
            let mut generate = crate::eval_cmd::generator(&vlm, args.max_new_tokens);
            wv::answer(&asked, model.batch_size, &mut generate)?
        }
        (None, None) => {
            anyhow::bail!("give --model DIR to answer the questions, or --answers FILE")
        }
    };
    let (rows, more) = wv::judge_answers(&asked, &answers, &reference, games, &judge)?;
    excluded.extend(more);
    let stats = judge.stats();
    let metrics = wv::write_outputs(&args.out, &rows, &excluded)?;
    let m = &metrics["wildvision"];
    let pct = |k: &str| m[k].as_f64().unwrap_or(f64::NAN) * 100.0;
    println!("| vs {baseline} | n | score (%) | win rate (%) | win or tie (%) | reward |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!(
        "| wildvision | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
        m["n"],
        pct("score"),
        pct("win_rate"),
        pct("win_or_tie_rate"),
        m["reward"].as_f64().unwrap_or(f64::NAN)
    );
    eprintln!(
        "{} questions judged in {games} game(s) each ({} replies from the cache, {} requests, {} retried), {} games without a verdict, {} questions excluded; wrote {}",
        rows.len(),
        stats.cached,
        stats.requested,
        stats.retried,
        m["games_without_verdict"],
        excluded.len(),
        args.out.display()
    );
    Ok(())
}
