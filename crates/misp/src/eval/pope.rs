//! POPE (Li et al., 2023): yes/no object-existence probes in three splits (random, popular,
//! adversarial). Reads question files, runs them through a caller-given generator, parses
//! answers exactly as the official `evaluate.py` does and writes `answers.jsonl` (every raw
//! answer), `metrics.json` (per split and overall) and `excluded.json` (what was left out).
//!
//! Conventions fixed here (docs/design.md §5): "yes" is the positive class; `overall` pools every
//! answer (what the official script reports when run on all splits' answers at once); a
//! metric whose denominator is zero (no predicted yes, say) is 0 rather than the script's
//! ZeroDivisionError.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{ask_all, EvalError, GenerateFn, Images};
use crate::files::{read_lines, write_json_atomic, write_jsonl};

/// The suffix LLaVA's own POPE evaluation appends to every question (its `model_vqa_loader`
/// prompt for single-word answers); the default of `misp eval pope`.
pub const LLAVA_POPE_SUFFIX: &str = "\nAnswer the question using a single word or phrase.";

/// The split names POPE ships, in report order.
pub const SPLITS: [&str; 3] = ["random", "popular", "adversarial"];

/// A question id as written in the file: POPE uses integers, other generators strings. Kept
/// as written so audit files round-trip.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum QuestionId {
    Int(i64),
    Str(String),
}

impl fmt::Display for QuestionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuestionId::Int(i) => write!(f, "{i}"),
            QuestionId::Str(s) => write!(f, "{s}"),
        }
    }
}

/// One probe: "Is there a {object} in the image?" with its yes/no label.
#[derive(Debug, Clone, PartialEq)]
pub struct PopeQuestion {
    pub question_id: QuestionId,
    /// Image file name, relative to the images folder.
    pub image: String,
    pub text: String,
    /// `true` = "yes" (the object is in the image).
    pub label: bool,
    pub split: String,
}

/// One line of `answers.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PopeAnswer {
    pub question_id: QuestionId,
    pub split: String,
    /// "yes" or "no".
    pub label: String,
    /// The raw generated text.
    pub answer: String,
    /// "yes" or "no", from [`parse_answer`].
    pub pred: String,
}

/// Metrics of one split (or all of them), fractions in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PopeMetrics {
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub yes_ratio: f64,
    pub n: usize,
    pub tp: usize,
    pub fp: usize,
    pub tn: usize,
    #[serde(rename = "fn")]
    pub fn_: usize,
}

/// A question left out of the metrics, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Excluded {
    pub question_id: QuestionId,
    pub split: String,
    pub image: String,
    pub reason: String,
}

/// What `run_pope` produced.
#[derive(Debug, Clone, Default)]
pub struct PopeRun {
    pub answers: Vec<PopeAnswer>,
    pub excluded: Vec<Excluded>,
}

/// The split a question file belongs to, from its name (`coco_pope_adversarial.json`).
pub fn split_from_file_name(path: &Path) -> Option<&'static str> {
    let name = path.file_name()?.to_string_lossy().to_lowercase();
    SPLITS.into_iter().find(|s| name.contains(s))
}

fn parse_label(
    path: &Path,
    line: usize,
    value: Option<&serde_json::Value>,
) -> Result<bool, EvalError> {
    match value.and_then(|v| v.as_str()) {
        Some("yes") => Ok(true),
        Some("no") => Ok(false),
        Some(other) => Err(EvalError::record(
            path,
            line,
            "label",
            format!("{other:?} is neither \"yes\" nor \"no\""),
        )),
        None => Err(EvalError::record(
            path,
            line,
            "label",
            "missing or not a string",
        )),
    }
}

fn parse_id(path: &Path, line: usize, row: &serde_json::Value) -> Result<QuestionId, EvalError> {
    match row.get("question_id") {
        Some(serde_json::Value::Number(n)) if n.as_i64().is_some() => {
            Ok(QuestionId::Int(n.as_i64().unwrap_or_default()))
        }
        Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(QuestionId::Str(s.clone())),
        _ => Err(EvalError::record(
            path,
            line,
            "question_id",
            "missing, or not an integer or a non-empty string",
        )),
    }
}

fn string_field(
    path: &Path,
    line: usize,
    row: &serde_json::Value,
    field: &str,
) -> Result<String, EvalError> {
    row.get(field)
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| EvalError::record(path, line, field, "missing or not a string"))
}

fn json_row(path: &Path, line: usize, text: &str) -> Result<serde_json::Value, EvalError> {
    let row: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| EvalError::record(path, line, "(line)", format!("not JSON: {e}")))?;
    if !row.is_object() {
        return Err(EvalError::record(path, line, "(line)", "not a JSON object"));
    }
    Ok(row)
}

/// Reads one POPE question file (JSON Lines `{"question_id", "image", "text", "label"}`).
/// `split` names the split; `None` takes it from the file name. A label other than yes/no,
/// a missing field or a repeated question id is an error naming file, line and field.
pub fn read_questions(path: &Path, split: Option<&str>) -> Result<Vec<PopeQuestion>, EvalError> {
    let split = match split {
        Some(s) => s.to_string(),
        None => split_from_file_name(path)
            .ok_or_else(|| {
                EvalError::Input(format!(
                    "{}: cannot tell the split from the file name (expected it to contain \
                     random, popular or adversarial); name it with --split",
                    path.display()
                ))
            })?
            .to_string(),
    };
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (line, text) in read_lines(path)? {
        let row = json_row(path, line, &text)?;
        let question_id = parse_id(path, line, &row)?;
        if !seen.insert(question_id.clone()) {
            return Err(EvalError::record(
                path,
                line,
                "question_id",
                format!("{question_id} appears twice"),
            ));
        }
        out.push(PopeQuestion {
            question_id,
            image: string_field(path, line, &row, "image")?,
            text: string_field(path, line, &row, "text")?,
            label: parse_label(path, line, row.get("label"))?,
            split: split.clone(),
        });
    }
    if out.is_empty() {
        return Err(EvalError::Input(format!(
            "{}: no questions",
            path.display()
        )));
    }
    Ok(out)
}

/// The official POPE parse: keep the text before the first `.`, drop commas, split on single
/// spaces; the answer is "no" when any word is exactly `No`, `not` or `no`, else "yes". So an
/// empty answer counts as "yes", as in the official script ([`PopeScores::empty_answers`]
/// counts them).
pub fn parse_answer(text: &str) -> bool {
    let first = text.split('.').next().unwrap_or("");
    let first = first.replace(',', "");
    !first
        .split(' ')
        .any(|w| w == "No" || w == "not" || w == "no")
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

/// The metrics of `(label, pred)` pairs (`true` = yes), as the official script computes them.
pub fn metrics(pairs: impl IntoIterator<Item = (bool, bool)>) -> PopeMetrics {
    let (mut tp, mut fp, mut tn, mut fn_) = (0usize, 0usize, 0usize, 0usize);
    for (label, pred) in pairs {
        match (pred, label) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, false) => tn += 1,
            (false, true) => fn_ += 1,
        }
    }
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let n = tp + fp + tn + fn_;
    let precision = ratio(tp, tp + fp);
    let recall = ratio(tp, tp + fn_);
    let f1 = if precision + recall == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    };
    PopeMetrics {
        accuracy: ratio(tp + tn, n),
        precision,
        recall,
        f1,
        yes_ratio: ratio(tp + fp, n),
        n,
        tp,
        fp,
        tn,
        fn_,
    }
}

/// Metrics per split and pooled, plus the audit counts that go with them.
#[derive(Debug, Clone, PartialEq)]
pub struct PopeScores {
    pub splits: BTreeMap<String, PopeMetrics>,
    pub overall: PopeMetrics,
    /// Question ids (with split) whose answer was empty or blank: scored "yes" as the official
    /// script does, listed so a broken generator does not pass unnoticed.
    pub empty_answers: Vec<(String, QuestionId)>,
}

impl PopeScores {
    /// `metrics.json`: `{"<split>": {...}, "overall": {...}}`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for (split, m) in &self.splits {
            map.insert(split.clone(), serde_json::to_value(m).unwrap_or_default());
        }
        map.insert(
            "overall".into(),
            serde_json::to_value(self.overall).unwrap_or_default(),
        );
        serde_json::Value::Object(map)
    }
}

/// Scores answers, re-parsing every raw answer (the stored `pred` is not trusted).
pub fn score(answers: &[PopeAnswer]) -> Result<PopeScores, EvalError> {
    if answers.is_empty() {
        return Err(EvalError::Input("no answers to score".into()));
    }
    let mut per: BTreeMap<String, Vec<(bool, bool)>> = BTreeMap::new();
    let mut all = Vec::with_capacity(answers.len());
    let mut empty_answers = Vec::new();
    for a in answers {
        let label = match a.label.as_str() {
            "yes" => true,
            "no" => false,
            other => {
                return Err(EvalError::Input(format!(
                    "question {} ({}): label {other:?} is neither \"yes\" nor \"no\"",
                    a.question_id, a.split
                )))
            }
        };
        if a.answer.trim().is_empty() {
            empty_answers.push((a.split.clone(), a.question_id.clone()));
        }
        let pair = (label, parse_answer(&a.answer));
        per.entry(a.split.clone()).or_default().push(pair);
        all.push(pair);
    }
    Ok(PopeScores {
        splits: per.into_iter().map(|(s, p)| (s, metrics(p))).collect(),
        overall: metrics(all),
        empty_answers,
    })
}

/// Reads `answers.jsonl`, checking every field and that no `(split, question_id)` repeats.
pub fn read_answers(path: &Path) -> Result<Vec<PopeAnswer>, EvalError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (line, text) in read_lines(path)? {
        let row = json_row(path, line, &text)?;
        let question_id = parse_id(path, line, &row)?;
        let split = string_field(path, line, &row, "split")?;
        let label = yes_no(parse_label(path, line, row.get("label"))?);
        let answer = match row.get("answer") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Null) => String::new(),
            _ => {
                return Err(EvalError::record(
                    path,
                    line,
                    "answer",
                    "missing or not a string",
                ))
            }
        };
        if !seen.insert((split.clone(), question_id.clone())) {
            return Err(EvalError::record(
                path,
                line,
                "question_id",
                format!("{question_id} appears twice in split {split:?}"),
            ));
        }
        let pred = yes_no(parse_answer(&answer));
        out.push(PopeAnswer {
            question_id,
            split,
            label,
            answer,
            pred,
        });
    }
    Ok(out)
}

/// Runs every question through `generate` (prompt = question text + `suffix`), `batch` at a
/// time. Questions whose image is missing (or whose path leaves `images`) are not asked:
/// they are returned in [`PopeRun::excluded`] with the reason, and logged.
pub fn run_pope(
    questions: &[PopeQuestion],
    images: &Images,
    suffix: &str,
    batch: usize,
    generate: &mut GenerateFn<'_>,
) -> Result<PopeRun, EvalError> {
    let (asked, left_out) = ask_all(
        questions,
        images,
        "pope",
        "missing images",
        batch,
        generate,
        |q| Ok((images.resolve(&q.image)?, format!("{}{suffix}", q.text))),
    )?;
    let excluded = left_out
        .into_iter()
        .map(|(q, reason)| Excluded {
            question_id: q.question_id.clone(),
            split: q.split.clone(),
            image: q.image.clone(),
            reason,
        })
        .collect();
    let answers = asked
        .into_iter()
        .map(|(q, answer)| PopeAnswer {
            question_id: q.question_id.clone(),
            split: q.split.clone(),
            label: yes_no(q.label),
            pred: yes_no(parse_answer(&answer)),
            answer,
        })
        .collect();
    Ok(PopeRun { answers, excluded })
}

/// Writes `answers.jsonl`, `metrics.json` and `excluded.json` (missing images and empty
/// answers) into `out`, atomically; returns the scores.
pub fn write_outputs(out: &Path, run: &PopeRun) -> Result<PopeScores, EvalError> {
    let scores = score(&run.answers)?;
    write_jsonl(&out.join("answers.jsonl"), &run.answers)?;
    write_json_atomic(&out.join("metrics.json"), &scores.to_json())?;
    let empty: Vec<_> = scores
        .empty_answers
        .iter()
        .map(|(split, id)| serde_json::json!({"question_id": id, "split": split}))
        .collect();
    let excluded = serde_json::json!({
        "missing_images": run.excluded.len(),
        "excluded": run.excluded,
        "empty_answers": empty.len(),
        "empty_answers_scored_as_yes": empty,
    });
    write_json_atomic(&out.join("excluded.json"), &excluded)?;
    if !scores.empty_answers.is_empty() {
        tracing::warn!(
            "{} empty answers scored as \"yes\" (as the official POPE script does); listed in excluded.json",
            scores.empty_answers.len()
        );
    }
    Ok(scores)
}

/// Reads `metrics.json` of a POPE run back (for `compare`).
pub fn read_metrics(path: &Path) -> Result<BTreeMap<String, PopeMetrics>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|e| crate::files::FileError::new(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| EvalError::record(path, e.line(), "(document)", e.to_string()))
}

/// Convenience for callers with several files: reads each, checking ids across them per split.
pub fn read_question_files(
    files: &[PathBuf],
    split: Option<&str>,
) -> Result<Vec<PopeQuestion>, EvalError> {
    let mut all: Vec<PopeQuestion> = Vec::new();
    let mut seen = HashSet::new();
    for f in files {
        for q in read_questions(f, split)? {
            if !seen.insert((q.split.clone(), q.question_id.clone())) {
                return Err(EvalError::Input(format!(
                    "{}: question {} of split {:?} also appears in an earlier file",
                    f.display(),
                    q.question_id,
                    q.split
                )));
            }
            all.push(q);
        }
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_follows_the_official_script() {
        assert!(!parse_answer("No, there is not."));
        assert!(!parse_answer("no"));
        assert!(parse_answer("Yes"));
        assert!(parse_answer("NO")); // only `No`, `not`, `no` count
        assert!(!parse_answer("There is not a dog"));
        assert!(parse_answer("Yes. There is no dog.")); // only the first sentence counts
        assert!(parse_answer("nope"));
        assert!(parse_answer(""));
        assert!(!parse_answer("no,"));
        assert!(parse_answer("No\nthere")); // split on single spaces only
    }

    #[test]
    fn metrics_by_hand() {
        // 2 TP, 1 FP, 1 TN, 1 FN.
        let m = metrics([
            (true, true),
            (true, true),
            (false, true),
            (false, false),
            (true, false),
        ]);
        assert_eq!((m.tp, m.fp, m.tn, m.fn_, m.n), (2, 1, 1, 1, 5));
        assert!((m.precision - 2.0 / 3.0).abs() < 1e-15);
        assert!((m.recall - 2.0 / 3.0).abs() < 1e-15);
        assert!((m.accuracy - 0.6).abs() < 1e-15);
        assert!((m.yes_ratio - 0.6).abs() < 1e-15);
        let none = metrics([(true, false), (false, false)]);
        assert_eq!((none.precision, none.f1), (0.0, 0.0));
    }

    #[test]
    fn missing_images_are_excluded_counted_and_listed() {
        let dir = std::env::temp_dir().join(format!("misp-pope-run-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("images")).unwrap();
        std::fs::write(dir.join("images/a.jpg"), b"x").unwrap();
        let q = |id: i64, image: &str, label: bool| PopeQuestion {
            question_id: QuestionId::Int(id),
            image: image.into(),
            text: format!("Is there a thing {id}?"),
            label,
            split: "random".into(),
        };
        let questions = [
            q(1, "a.jpg", true),
            q(2, "gone.jpg", false),
            q(3, "a.jpg", false),
            q(4, "../a.jpg", true),
        ];
        let mut prompts = Vec::new();
        let mut gen = |b: &[(PathBuf, String)]| {
            prompts.extend(b.iter().map(|(_, p)| p.clone()));
            Ok(b.iter().map(|_| "Yes, there is.".to_string()).collect())
        };
        let run = run_pope(
            &questions,
            &Images::in_dir(&dir.join("images")),
            LLAVA_POPE_SUFFIX,
            8,
            &mut gen,
        )
        .unwrap();
        assert_eq!(
            prompts[0],
            format!("Is there a thing 1?{LLAVA_POPE_SUFFIX}")
        );
        assert_eq!(run.answers.len(), 2);
        let ids: Vec<String> = run
            .excluded
            .iter()
            .map(|e| e.question_id.to_string())
            .collect();
        assert_eq!(ids, ["2", "4"]);
        let scores = write_outputs(&dir.join("out"), &run).unwrap();
        assert_eq!(scores.overall.n, 2);
        assert_eq!((scores.overall.tp, scores.overall.fp), (1, 1));
        let back = read_answers(&dir.join("out/answers.jsonl")).unwrap();
        assert_eq!(back, run.answers);
        let excluded: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("out/excluded.json")).unwrap())
                .unwrap();
        assert_eq!(excluded["missing_images"], 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_question_files_name_file_line_and_field() {
        let dir = std::env::temp_dir().join(format!("misp-pope-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("coco_pope_popular.json");
        let good =
            r#"{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "yes"}"#;
        std::fs::write(
            &path,
            format!(
                "{good}\n{}\n",
                good.replace("\"yes\"", "\"maybe\"").replace(": 1", ": 2")
            ),
        )
        .unwrap();
        let err = read_questions(&path, None).unwrap_err().to_string();
        assert!(
            err.contains("coco_pope_popular.json:2: field `label`") && err.contains("maybe"),
            "{err}"
        );
        std::fs::write(&path, format!("{good}\n{good}\n")).unwrap();
        let err = read_questions(&path, None).unwrap_err().to_string();
        assert!(
            err.contains(":2: field `question_id`: 1 appears twice"),
            "{err}"
        );
        std::fs::write(&path, format!("{good}\n")).unwrap();
        assert_eq!(read_questions(&path, None).unwrap()[0].split, "popular");
        let unnamed = dir.join("q.jsonl");
        std::fs::write(&unnamed, format!("{good}\n")).unwrap();
        assert!(read_questions(&unnamed, None)
            .unwrap_err()
            .to_string()
            .contains("--split"));
        assert_eq!(
            read_questions(&unnamed, Some("mine")).unwrap()[0].split,
            "mine"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn split_names_come_from_file_names() {
        assert_eq!(
            split_from_file_name(Path::new("x/coco_pope_adversarial.json")),
            Some("adversarial")
        );
        assert_eq!(
            split_from_file_name(Path::new("Random.jsonl")),
            Some("random")
        );
        assert_eq!(split_from_file_name(Path::new("q.jsonl")), None);
    }
}
