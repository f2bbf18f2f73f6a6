//! WildVision-Bench (Lu et al., 2024): real-world image questions, the model's answer judged
//! pairwise against a baseline model's shipped answer, arena-hard style (the protocol of
//! WildVision-AI/WildVision-Bench: `config/judge_config.yaml`, `get_judgement.py`,
//! `show_results.py`).
//!
//! - Per question two games: game 1 with the baseline as assistant A, game 2 with the model as
//!   A, to cancel the judge's position bias (the shipped config runs game 1 only:
//!   `--single-game`). Each game is the official system prompt and one user message (the
//!   official template's text, then the image as a `data:` URL), temperature 0, 4096 tokens.
//! - The verdict is parsed as `get_score` does: every `[[label]]` with a label of `A B < > =`;
//!   one distinct label is the verdict, several distinct ones none; when there is none at all
//!   the judge is asked once more to finish with a label (the official follow-up turn) and the
//!   two replies are read together.
//! - Score: the win rate against the baseline predicted by the Elo ratings of
//!   `compute_mle_elo` (battles from both games, a strong verdict weighing 3, a tie half a
//!   win). With every battle between the model and the baseline, that logistic fit has a
//!   closed form: the weighted share of the model's wins, ties counted half ([`elo_score`]).
//! - Reward, win rate and win-or-tie rate per question, and the vote counts, as
//!   `get_reward_from_judgement` computes them, except that a game without one of the five
//!   labels is left out (and counted in `excluded.json`) where the official code counts it a
//!   tie (docs/design.md §5); the Elo score leaves such games out in the official code too.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::judge::{all_or_error, image_data_url, ChatRequest, Judge};
use super::{generate_all, EvalError, GenerateFn, Images};
use crate::files::{read_lines, write_json_atomic, write_jsonl};

/// The judge's system prompt (`config/judge_config.yaml`, `system_prompt`).
pub const SYSTEM_PROMPT: &str = "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the user prompt displayed below. You will be given assistant A's answer and assistant B's answer. Your job is to evaluate which assistant's answer is better.\n\nBegin your evaluation by generating your own answer to the prompt. You must provide your answers before judging any answers.\n\nWhen evaluating the assistants' answers, compare both assistants' answers with your answer. You must identify and correct any mistakes or inaccurate information.\n\nThen consider if the assistant's answers are helpful, relevant, and concise. Helpful means the answer correctly responds to the prompt or follows the instructions. Note when user prompt has any ambiguity or more than one interpretation, it is more helpful and appropriate to ask for clarifications or more information from the user than providing an answer based on assumptions. Relevant means all parts of the response closely connect or are appropriate to what is being asked. Concise means the response is clear and not verbose or excessive.\n\nThen consider the creativity and novelty of the assistant's answers when needed. Finally, identify any missing important information in the assistants' answers that would be beneficial to include when responding to the user prompt.\n\nAfter providing your explanation, you must output only one of the following choices as your final verdict with a label:\n\n1. Assistant A is significantly better: [[A>>B]]\n2. Assistant A is slightly better: [[A>B]]\n3. Tie, relatively the same: [[A=B]]\n4. Assistant B is slightly better: [[B>A]]\n5. Assistant B is significantly better: [[B>>A]]\n\nExample output: \"My final verdict is tie: [[A=B]]\".";

/// The follow-up turn when a reply holds no label (`get_judgement.py`).
pub const CONTINUE_PROMPT: &str =
    "continue your judgement and finish by outputting a final verdict label";

/// Judge settings of the shipped config.
pub const JUDGE_TEMPERATURE: f64 = 0.0;
pub const JUDGE_MAX_TOKENS: usize = 4096;
/// Battles a strong verdict (`>>`) counts for (`show_results.py --weight`).
pub const STRONG_WEIGHT: usize = 3;

/// The user prompt of one game (`prompt_template` of the shipped config).
pub fn user_prompt(question: &str, answer_a: &str, answer_b: &str) -> String {
    format!(
        "<|User Prompt|>\n{question}\n\n<|The Start of Assistant A's Answer|>\n{answer_a}\n<|The End of Assistant A's Answer|>\n\n<|The Start of Assistant B's Answer|>\n{answer_b}\n<|The End of Assistant B's Answer|>"
    )
}

/// Every `[[label]]` in `text` whose label is a non-empty run of `A B < > =` (the official
/// pattern `\[\[([AB<>=]+)\]\]`, matches taken left to right without overlap).
pub fn labels(text: &str) -> Vec<&str> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i + 1 < b.len() {
        if b[i] == b'[' && b[i + 1] == b'[' {
            let start = i + 2;
            let mut j = start;
            while j < b.len() && matches!(b[j], b'A' | b'B' | b'<' | b'>' | b'=') {
                j += 1;
            }
            if j > start && b.get(j) == Some(&b']') && b.get(j + 1) == Some(&b']') {
                out.push(&text[start..j]);
                i = j + 2;
                continue;
            }
        }
        i += 1;
    }
    out
}

/// `get_score`: `(verdict, ask again)`: one distinct label is the verdict; none asks the judge
/// to continue; several distinct labels are no verdict and no retry.
pub fn parse_verdict(judgement: &str) -> (Option<String>, bool) {
    let found = labels(judgement);
    let distinct: HashSet<&str> = found.iter().copied().collect();
    match distinct.len() {
        0 => (None, true),
        1 => (Some(found[0].to_string()), false),
        _ => (None, false),
    }
}

/// One WildVision question.
#[derive(Debug, Clone, PartialEq)]
pub struct WvQuestion {
    pub question_id: String,
    pub instruction: String,
    /// Image file name under the images folder.
    pub image: String,
}

fn str_field(
    path: &Path,
    line: usize,
    row: &Value,
    name: &str,
    what: &str,
) -> Result<String, EvalError> {
    match row.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) if name == "question_id" => Ok(n.to_string()),
        _ => Err(EvalError::record(
            path,
            line,
            name,
            format!(
                "missing or not a string (a {what} row has {})",
                match what {
                    "WildVision question" => "question_id, instruction, image",
                    _ => "question_id, output",
                }
            ),
        )),
    }
}

fn json_rows(path: &Path) -> Result<Vec<(usize, Value)>, EvalError> {
    read_lines(path)?
        .into_iter()
        .map(|(line, text)| {
            let row: Value = serde_json::from_str(&text)
                .map_err(|e| EvalError::record(path, line, "(line)", format!("not JSON: {e}")))?;
            Ok((line, row))
        })
        .collect()
}

/// Reads the questions (JSON Lines `{question_id, instruction, image}`, e.g. the bench's
/// `question_id` and `instruction` with each image saved under the images folder).
pub fn read_questions(path: &Path) -> Result<Vec<WvQuestion>, EvalError> {
    let what = "WildVision question";
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (line, row) in json_rows(path)? {
        let q = WvQuestion {
            question_id: str_field(path, line, &row, "question_id", what)?,
            instruction: str_field(path, line, &row, "instruction", what)?,
            image: str_field(path, line, &row, "image", what)?,
        };
        if !seen.insert(q.question_id.clone()) {
            return Err(EvalError::record(
                path,
                line,
                "question_id",
                format!("{} appears twice", q.question_id),
            ));
        }
        out.push(q);
    }
    if out.is_empty() {
        return Err(EvalError::Input(format!(
            "{}: no questions",
            path.display()
        )));
    }
    Ok(out)
}

/// Reads the baseline's answers (the bench's `model_answers/<baseline>.jsonl`: `question_id`,
/// `output`, `model`): answers by question id, and the baseline's name.
pub fn read_reference(path: &Path) -> Result<(HashMap<String, String>, String), EvalError> {
    let what = "reference answer";
    let mut out = HashMap::new();
    let mut model = String::new();
    for (line, row) in json_rows(path)? {
        let id = str_field(path, line, &row, "question_id", what)?;
        let output = str_field(path, line, &row, "output", what)?;
        if model.is_empty() {
            if let Some(m) = row.get("model").and_then(Value::as_str) {
                model = m.to_string();
            }
        }
        if out.insert(id.clone(), output).is_some() {
            return Err(EvalError::record(
                path,
                line,
                "question_id",
                format!("{id} appears twice"),
            ));
        }
    }
    if model.is_empty() {
        model = "baseline".into();
    }
    Ok((out, model))
}

/// One judged game: game 1 has the baseline as A, game 2 the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Game {
    /// The judge's replies joined as the official code joins them (`"\n" + reply`, twice when
    /// it was asked to continue).
    pub judgement: String,
    /// The parsed label; `None` when there is none or several.
    pub verdict: Option<String>,
}

/// One line of `answers.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WvAnswer {
    pub question_id: String,
    pub image: String,
    pub instruction: String,
    /// The model's raw answer.
    pub model_answer: String,
    pub baseline_answer: String,
    pub games: Vec<Game>,
}

/// A question left out, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Excluded {
    pub question_id: String,
    pub image: String,
    pub reason: String,
}

/// Questions that can be asked: image present and a baseline answer to compare with.
pub fn askable(
    questions: &[WvQuestion],
    reference: &HashMap<String, String>,
    images: &Images,
) -> (Vec<(WvQuestion, PathBuf)>, Vec<Excluded>) {
    let mut ok = Vec::new();
    let mut excluded = Vec::new();
    for q in questions {
        let reason = match (
            images.resolve(&q.image),
            reference.contains_key(&q.question_id),
        ) {
            (Ok(p), true) => {
                ok.push((q.clone(), p));
                continue;
            }
            (Err(r), _) => r,
            (Ok(_), false) => "no baseline answer with this question_id".to_string(),
        };
        excluded.push(Excluded {
            question_id: q.question_id.clone(),
            image: q.image.clone(),
            reason,
        });
    }
    (ok, excluded)
}

/// The model's answers to `asked` (prompt = the instruction), by question id.
pub fn answer(
    asked: &[(WvQuestion, PathBuf)],
    batch: usize,
    generate: &mut GenerateFn<'_>,
) -> Result<HashMap<String, String>, EvalError> {
    let items: Vec<(PathBuf, String)> = asked
        .iter()
        .map(|(q, p)| (p.clone(), q.instruction.clone()))
        .collect();
    let texts = generate_all(&items, batch, "wildvision", generate)?;
    Ok(asked
        .iter()
        .map(|(q, _)| q.question_id.clone())
        .zip(texts)
        .collect())
}

/// Saved model answers: misp's `answers.jsonl` or the bench's answer format (both JSON Lines
/// with `question_id` and `model_answer` or `output`).
pub fn read_answers(path: &Path) -> Result<HashMap<String, String>, EvalError> {
    let mut out = HashMap::new();
    for (line, row) in json_rows(path)? {
        let id = str_field(path, line, &row, "question_id", "answer")?;
        let text = row
            .get("model_answer")
            .or_else(|| row.get("output"))
            .and_then(Value::as_str)
            .ok_or_else(|| {
                EvalError::record(
                    path,
                    line,
                    "model_answer",
                    "missing or not a string (or `output`)",
                )
            })?;
        out.insert(id, text.to_string());
    }
    Ok(out)
}

fn game_messages(q: &WvQuestion, image_url: &str, a: &str, b: &str) -> Vec<Value> {
    vec![
        json!({"role": "system", "content": SYSTEM_PROMPT}),
        json!({"role": "user", "content": [
            {"type": "text", "text": user_prompt(&q.instruction, a, b)},
            {"type": "image_url", "image_url": {"url": image_url}},
        ]}),
    ]
}

fn request(messages: &[Value]) -> ChatRequest {
    ChatRequest {
        messages: Value::Array(messages.to_vec()),
        temperature: JUDGE_TEMPERATURE,
        max_tokens: Some(JUDGE_MAX_TOKENS),
    }
}

/// Judges every asked question in `games` games (2: both orders; 1: the shipped config's
/// baseline-first game only), with the official follow-up turn where a reply has no label.
pub fn judge_answers(
    asked: &[(WvQuestion, PathBuf)],
    answers: &HashMap<String, String>,
    reference: &HashMap<String, String>,
    games: usize,
    judge: &Judge,
) -> Result<(Vec<WvAnswer>, Vec<Excluded>), EvalError> {
    let mut rows = Vec::new();
    let mut excluded = Vec::new();
    let mut convs: Vec<Vec<Value>> = Vec::new();
    for (q, image) in asked {
        let Some(model_answer) = answers.get(&q.question_id) else {
            excluded.push(Excluded {
                question_id: q.question_id.clone(),
                image: q.image.clone(),
                reason: "no model answer with this question_id".into(),
            });
            continue;
        };
        let baseline = &reference[&q.question_id];
        let url = image_data_url(image)?;
        for g in 0..games {
            let (a, b) = if g == 0 {
                (baseline.as_str(), model_answer.as_str())
            } else {
                (model_answer.as_str(), baseline.as_str())
            };
            convs.push(game_messages(q, &url, a, b));
        }
        rows.push(WvAnswer {
            question_id: q.question_id.clone(),
            image: q.image.clone(),
            instruction: q.instruction.clone(),
            model_answer: model_answer.clone(),
            baseline_answer: baseline.clone(),
            games: Vec::new(),
        });
    }
    let cache = judge.config().cache_dir.clone();
    let first: Vec<ChatRequest> = convs.iter().map(|c| request(c)).collect();
    let replies = all_or_error(judge.complete_all(&first, "wildvision judge"), &cache)?;
    let mut judgements: Vec<String> = replies.iter().map(|r| format!("\n{r}")).collect();
    // The follow-up turn for games whose first reply holds no label.
    let again: Vec<usize> = (0..judgements.len())
        .filter(|&i| parse_verdict(&judgements[i]).1)
        .collect();
    let follow: Vec<ChatRequest> = again
        .iter()
        .map(|&i| {
            let mut c = convs[i].clone();
            c.push(json!({"role": "assistant", "content": replies[i]}));
            c.push(json!({"role": "user", "content": CONTINUE_PROMPT}));
            request(&c)
        })
        .collect();
    if !follow.is_empty() {
        let more = all_or_error(
            judge.complete_all(&follow, "wildvision judge (continue)"),
            &cache,
        )?;
        for (i, r) in again.into_iter().zip(more) {
            judgements[i].push('\n');
            judgements[i].push_str(&r);
        }
    }
    let mut it = judgements.into_iter();
    for row in &mut rows {
        for _ in 0..games {
            let judgement = it.next().unwrap_or_default();
            let verdict = parse_verdict(&judgement).0;
            row.games.push(Game { judgement, verdict });
        }
    }
    Ok((rows, excluded))
}

/// What a game's verdict means for the model: `(vote, reward, model battle wins, baseline
/// battle wins, ties)` with battles weighted; `None` for no valid verdict.
fn outcome(
    verdict: Option<&str>,
    model_is_a: bool,
) -> Option<(&'static str, i64, usize, usize, usize)> {
    let v = verdict?;
    // Turn the label into "model vs baseline".
    let (model_better, strong) = match (v, model_is_a) {
        ("A=B", _) => return Some(("tie", 0, 0, 0, 1)),
        ("A>B", false) | ("B>A", true) => (false, false),
        ("A>>B", false) | ("B>>A", true) => (false, true),
        ("B>A", false) | ("A>B", true) => (true, false),
        ("B>>A", false) | ("A>>B", true) => (true, true),
        _ => return None,
    };
    let w = if strong { STRONG_WEIGHT } else { 1 };
    Some(match (model_better, strong) {
        (true, true) => ("much_better", 100, w, 0, 0),
        (true, false) => ("better", 50, w, 0, 0),
        (false, true) => ("much_worse", -100, 0, w, 0),
        (false, false) => ("worse", -50, 0, w, 0),
    })
}

/// The Elo-derived win rate against the baseline from weighted battle counts. `compute_mle_elo`
/// duplicates the battles and sets the target to 1 for baseline wins and for the first copy
/// of each tie, then fits a logistic regression; with one pair of players its maximum is the
/// mean target, `p = (baseline wins + ties / 2) / battles`, and `predict_win_rate` gives the
/// model `1 - p`.
pub fn elo_score(model_wins: usize, baseline_wins: usize, ties: usize) -> Option<f64> {
    let n = model_wins + baseline_wins + ties;
    (n > 0).then(|| (model_wins as f64 + ties as f64 / 2.0) / n as f64)
}

/// The metrics document `{"wildvision": {...}}` and the number of games without a verdict.
pub fn score(rows: &[WvAnswer]) -> Result<(Value, usize), EvalError> {
    let (mut mw, mut bw, mut ties) = (0usize, 0usize, 0usize);
    let mut votes: BTreeMap<&str, usize> = ["much_better", "better", "tie", "worse", "much_worse"]
        .into_iter()
        .map(|k| (k, 0))
        .collect();
    let mut rewards = Vec::new();
    let mut unparsed = 0;
    for row in rows {
        let mut reward = 0i64;
        let mut valid = 0;
        for (g, game) in row.games.iter().enumerate() {
            match outcome(game.verdict.as_deref(), g == 1) {
                Some((vote, r, m, b, t)) => {
                    *votes.entry(vote).or_default() += 1;
                    reward += r;
                    mw += m;
                    bw += b;
                    ties += t;
                    valid += 1;
                }
                None => unparsed += 1,
            }
        }
        if valid > 0 {
            rewards.push(reward);
        }
    }
    let score = elo_score(mw, bw, ties).ok_or_else(|| {
        EvalError::Input(format!(
            "none of the {} judged games has a verdict (listed in excluded.json)",
            rows.iter().map(|r| r.games.len()).sum::<usize>()
        ))
    })?;
    let n = rewards.len() as f64;
    let metrics = json!({"wildvision": {
        "score": score,
        "win_rate": rewards.iter().filter(|&&r| r > 0).count() as f64 / n,
        "win_or_tie_rate": rewards.iter().filter(|&&r| r >= 0).count() as f64 / n,
        "reward": rewards.iter().sum::<i64>() as f64 / n,
        "n": rewards.len(),
        "games_without_verdict": unparsed,
        "votes": votes,
    }});
    Ok((metrics, unparsed))
}

/// Writes `answers.jsonl`, `metrics.json` and `excluded.json` into `out`; returns the metrics.
pub fn write_outputs(
    out: &Path,
    rows: &[WvAnswer],
    excluded: &[Excluded],
) -> Result<Value, EvalError> {
    let (metrics, unparsed) = score(rows)?;
    write_jsonl(&out.join("answers.jsonl"), rows)?;
    write_json_atomic(&out.join("metrics.json"), &metrics)?;
    let no_verdict: Vec<Value> = rows
        .iter()
        .flat_map(|r| {
            r.games.iter().enumerate().filter(|(g, game)| outcome(game.verdict.as_deref(), *g == 1).is_none()).map(|(g, game)| {
                json!({"question_id": r.question_id, "game": g + 1, "verdict": game.verdict, "judgement": game.judgement})
            })
        })
        .collect();
    if unparsed > 0 {
        tracing::warn!("{unparsed} judged games without a valid verdict: left out of the metrics (listed in excluded.json)");
    }
    write_json_atomic(
        &out.join("excluded.json"),
        &json!({
            "excluded_questions": excluded.len(),
            "excluded": excluded,
            "games_without_verdict": unparsed,
            "games": no_verdict,
        }),
    )?;
    Ok(metrics)
}

#[cfg(test)]
mod tests {
    use super::super::judge::{fake, JudgeConfig};
    use super::*;
    use std::time::Duration;

    const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/wildvision");

    fn load(name: &str) -> Value {
        serde_json::from_str(&std::fs::read_to_string(format!("{FIXTURE}/{name}")).unwrap())
            .unwrap()
    }

    #[test]
    fn labels_parse_as_the_official_pattern() {
        assert_eq!(labels("x [[A>>B]] y [[B=A]]"), ["A>>B", "B=A"]);
        assert_eq!(labels("[[[B>>A]]]"), ["B>>A"]);
        assert_eq!(labels("[[]] [[A> B]] [[a>b]] [[A>B]"), Vec::<&str>::new());
        assert_eq!(
            parse_verdict("[[A>B]] [[A>B]]"),
            (Some("A>B".into()), false)
        );
        assert_eq!(parse_verdict("[[A>B]] [[B>A]]"), (None, false));
        assert_eq!(parse_verdict("none"), (None, true));
    }

    #[test]
    fn elo_score_by_hand() {
        // 3 model wins, 1 baseline win, 2 ties: (3 + 1) / 6.
        assert!((elo_score(3, 1, 2).unwrap() - 4.0 / 6.0).abs() < 1e-15);
        assert_eq!(elo_score(0, 0, 0), None);
    }

    #[test]
    fn questions_without_their_image_or_baseline_are_excluded_and_counted() {
        let dir = std::env::temp_dir().join(format!("misp-wv-missing-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("images")).unwrap();
        // img1.png is missing.
        for i in [0, 2] {
            std::fs::write(dir.join(format!("images/img{i}.png")), b"not read here").unwrap();
        }
        let questions = read_questions(Path::new(&format!("{FIXTURE}/questions.jsonl"))).unwrap();
        let (mut reference, _) =
            read_reference(Path::new(&format!("{FIXTURE}/reference.jsonl"))).unwrap();
        let no_baseline = questions
            .iter()
            .find(|q| q.image != "img1.png")
            .unwrap()
            .question_id
            .clone();
        reference.remove(&no_baseline);
        let (asked, excluded) =
            askable(&questions, &reference, &Images::in_dir(&dir.join("images")));
        let without_image = questions.iter().filter(|q| q.image == "img1.png").count();
        assert!(without_image > 0);
        assert_eq!(excluded.len(), without_image + 1, "{excluded:?}");
        assert_eq!(asked.len() + excluded.len(), questions.len());
        for e in &excluded {
            if e.question_id == no_baseline {
                assert!(e.reason.contains("no baseline answer"), "{e:?}");
            } else {
                assert_eq!(e.image, "img1.png");
                assert!(e.reason.contains("not found"), "{e:?}");
            }
        }
        assert!(asked
            .iter()
            .all(|(q, _)| q.image != "img1.png" && q.question_id != no_baseline));
        // One judged question beside them, so that there are metrics to write.
        let (q, _) = &asked[0];
        let game = |v: &str| Game {
            judgement: format!("\n[[{v}]]"),
            verdict: Some(v.into()),
        };
        let judged = WvAnswer {
            question_id: q.question_id.clone(),
            image: q.image.clone(),
            instruction: q.instruction.clone(),
            model_answer: "a".into(),
            baseline_answer: "b".into(),
            games: vec![game("A>B"), game("B>A")],
        };
        write_outputs(&dir.join("out"), &[judged], &excluded).unwrap();
        let written: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("out/excluded.json")).unwrap())
                .unwrap();
        assert_eq!(written["excluded_questions"], excluded.len());
        assert_eq!(
            written["excluded"].as_array().unwrap().len(),
            excluded.len()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_judged_run_against_a_scripted_judge_matches_the_official_code() {
        let dir = std::env::temp_dir().join(format!("misp-wv-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("images")).unwrap();
        for i in 0..3 {
            std::fs::write(dir.join(format!("images/img{i}.png")), format!("png{i}")).unwrap();
        }
        let questions = read_questions(Path::new(&format!("{FIXTURE}/questions.jsonl"))).unwrap();
        let (reference, baseline) =
            read_reference(Path::new(&format!("{FIXTURE}/reference.jsonl"))).unwrap();
        assert_eq!(baseline, "claude-3-sonnet-20240229");
        let images = Images::in_dir(&dir.join("images"));
        let (asked, excluded) = askable(&questions, &reference, &images);
        assert!(excluded.is_empty());
        let script = load("judgements.json");
        let answers: HashMap<String, String> = script
            .as_array()
            .unwrap()
            .iter()
            .map(|j| {
                (
                    j["question_id"].as_str().unwrap().to_string(),
                    j["model_answer"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        // The fake judge finds the question and game from the prompt and answers with the
        // scripted reply (the second one on the follow-up turn).
        let fake = fake::start(
            (0..40).map(|_| (200, None)).collect(),
            (500, "no more".into()),
            |body| {
                let v: Value = serde_json::from_str(body).unwrap();
                let text = v["messages"][1]["content"][0]["text"].as_str().unwrap();
                let q: usize = (0..8)
                    .find(|i| text.contains(&format!("Instruction {i}:")))
                    .unwrap();
                let game = if text.contains("Assistant A's Answer|>\nBaseline") {
                    0
                } else {
                    1
                };
                let turn = (v["messages"].as_array().unwrap().len() - 2) / 2;
                let script: Value = serde_json::from_str(
                    &std::fs::read_to_string(format!("{FIXTURE}/judgements.json")).unwrap(),
                )
                .unwrap();
                script[q]["replies"][game][turn]
                    .as_str()
                    .unwrap()
                    .to_string()
            },
        );
        let judge = Judge::new(JudgeConfig {
            url: fake.url.clone(),
            model: "judge".into(),
            api_key: None,
            cache_dir: dir.join("cache"),
            retries: 0,
            backoff: Duration::from_millis(1),
            timeout: Duration::from_secs(10),
            concurrency: 3,
        })
        .unwrap();
        let (rows, excluded) = judge_answers(&asked, &answers, &reference, 2, &judge).unwrap();
        assert!(excluded.is_empty());
        let want = load("expected.json");
        // Prompts: byte-equal to the official template, system prompt included.
        let bodies = fake.bodies.lock().unwrap().clone();
        let mut seen_prompts = HashSet::new();
        for b in &bodies {
            let v: Value = serde_json::from_str(b).unwrap();
            assert_eq!(v["messages"][0]["content"], want["system_prompt"]);
            assert_eq!(v["max_tokens"], 4096);
            assert!(v["messages"][1]["content"][1]["image_url"]["url"]
                .as_str()
                .unwrap()
                .starts_with("data:image/png;base64,"));
            if v["messages"].as_array().unwrap().len() == 4 {
                assert_eq!(v["messages"][3]["content"], want["continue_prompt"]);
            }
            seen_prompts.insert(
                v["messages"][1]["content"][0]["text"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        for game_prompts in want["user_prompts"].as_array().unwrap() {
            for p in game_prompts.as_array().unwrap() {
                assert!(
                    seen_prompts.contains(p.as_str().unwrap()),
                    "prompt not sent: {p}"
                );
            }
        }
        // Judgements and verdicts as the official loop builds them.
        for (row, games) in rows.iter().zip(want["games"].as_array().unwrap()) {
            for (game, w) in row.games.iter().zip(games.as_array().unwrap()) {
                assert_eq!(game.judgement, w["judgement"].as_str().unwrap());
                assert_eq!(game.verdict.as_deref(), w["score"].as_str());
            }
        }
        let m = write_outputs(&dir.join("out"), &rows, &excluded).unwrap();
        let m = &m["wildvision"];
        let close = |a: &Value, b: &Value| {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            assert!((a - b).abs() < 1e-9, "{a} vs {b}");
        };
        close(&m["score"], &want["official"]["score"]);
        let mine = &want["misp"];
        close(&m["reward"], &mine["reward"]);
        close(&m["win_rate"], &mine["win_rate"]);
        close(&m["win_or_tie_rate"], &mine["win_or_tie_rate"]);
        assert_eq!(m["n"], mine["questions"]);
        for (k, w) in mine["vote_type_counts"].as_object().unwrap() {
            assert_eq!(m["votes"][k.replace(' ', "_")], *w, "{k}");
        }
        assert_eq!(m["games_without_verdict"], 3);
        // A re-run is answered from the cache.
        let sent = bodies.len();
        let (again, _) = judge_answers(&asked, &answers, &reference, 2, &judge).unwrap();
        assert_eq!(again, rows);
        assert_eq!(fake.bodies.lock().unwrap().len(), sent);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn another_benchmarks_file_is_refused_naming_the_fields() {
        let dir = std::env::temp_dir().join(format!("misp-wv-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("q.jsonl");
        std::fs::write(&p, "{\"question_id\": 1, \"image\": \"a.jpg\", \"text\": \"Is there a dog?\", \"label\": \"yes\"}\n").unwrap();
        let e = read_questions(&p).unwrap_err().to_string();
        assert!(
            e.contains("q.jsonl:1: field `instruction`")
                && e.contains("question_id, instruction, image"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
