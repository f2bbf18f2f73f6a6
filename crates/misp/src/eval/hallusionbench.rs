//! HallusionBench (Guan et al., 2024): yes/no questions on figures (`VD`, visual dependent) and
//! on figures that supplement knowledge (`VS`, visual supplement, some asked with no figure at
//! all). Reads the official `HallusionBench.json`, asks the questions that have a figure through
//! a caller-given generator, extracts yes/no as VLMEvalKit's exact-matching mode does
//! ([`super::extract::yes_no`]) and aggregates as the official `utils.py` of
//! tianyi-lab/HallusionBench does:
//!
//! - aAcc: share of questions answered right (`get_eval_all`);
//! - fAcc: share of figures whose questions are all right (`get_eval_fig`; a VS question with no
//!   figure, `figure_id` 0, belongs to no figure);
//! - qAcc: share of questions right in every variant, i.e. with and without / on every version
//!   of its figure (`get_eval_pair_all`, "per question pair");
//!
//! overall, per category and per `category/subcategory`. A reply with neither or both of yes / no
//! is "unknown", counted wrong and listed (the official GPT judge's "unclear" is the closest
//! thing; its `assign_correctness` credits "unclear" on no-figure VS questions, exact matching
//! does not). Questions without a figure are not asked (the model answers about an image) and
//! are listed in `excluded.json`; answers to them from elsewhere (`--answers`) are scored.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::extract::{yes_no, YesNo};
use super::{ask_all, EvalError, GenerateFn, Images};
use crate::files::{read_lines, write_json_atomic, write_jsonl};

/// Appended to every question by default: VLMEvalKit's instruction for yes/no benchmarks.
pub const DEFAULT_SUFFIX: &str = " Please answer yes or no.";

/// One question of `HallusionBench.json`, the fields the scoring reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HbQuestion {
    pub category: String,
    pub subcategory: String,
    pub set_id: String,
    pub figure_id: String,
    pub question_id: String,
    /// "0" no figure, "1" original figure, "2" edited figure.
    pub visual_input: String,
    pub question: String,
    /// "1" = yes, "0" = no, as the file writes it.
    pub gt_answer: String,
    /// Image path relative to the images folder; `None` for questions without a figure.
    pub filename: Option<String>,
}

impl HbQuestion {
    fn label(&self) -> bool {
        self.gt_answer == "1"
    }

    /// The official key of one question: category, subcategory, set, figure, question.
    fn key(&self) -> String {
        format!(
            "{}_{}_{}_{}_{}",
            self.category, self.subcategory, self.set_id, self.figure_id, self.question_id
        )
    }

    /// The figure it is asked on (`get_eval_fig`), `None` for a VS question with no figure.
    fn figure_key(&self) -> Option<String> {
        (!(self.category == "VS" && self.figure_id == "0")).then(|| {
            format!(
                "{}_{}_{}_{}",
                self.category, self.subcategory, self.set_id, self.figure_id
            )
        })
    }

    /// The question across its figure variants (`get_eval_pair_all`).
    fn question_key(&self) -> String {
        format!(
            "{}_{}_{}_{}",
            self.category, self.subcategory, self.set_id, self.question_id
        )
    }
}

/// One line of `answers.jsonl`: the question, the raw reply and what was extracted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HbAnswer {
    #[serde(flatten)]
    pub question: HbQuestion,
    /// The raw generated text.
    pub answer: String,
    /// "yes", "no" or "unknown", from [`yes_no`].
    pub pred: YesNo,
    pub correct: bool,
}

impl HbAnswer {
    pub fn new(question: HbQuestion, answer: String) -> Self {
        let pred = yes_no(&answer);
        let correct = pred.as_bool() == Some(question.label());
        Self {
            question,
            answer,
            pred,
            correct,
        }
    }
}

/// Accuracies of one group of answers, fractions in [0, 1].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HbMetrics {
    #[serde(rename = "aAcc")]
    pub a_acc: f64,
    /// Absent when the group has no figure (only no-figure VS questions).
    #[serde(rename = "fAcc", skip_serializing_if = "Option::is_none", default)]
    pub f_acc: Option<f64>,
    #[serde(rename = "qAcc")]
    pub q_acc: f64,
    pub n: usize,
    pub correct: usize,
    /// Replies with neither or both of yes / no (counted wrong).
    pub unknown: usize,
    pub figures: usize,
    pub figures_correct: usize,
    pub question_groups: usize,
    pub question_groups_correct: usize,
}

/// Share of groups whose members are all right, and the counts.
fn all_right(groups: BTreeMap<String, (usize, usize)>) -> (usize, usize) {
    let total = groups.len();
    let right = groups.values().filter(|(c, t)| c == t).count();
    (right, total)
}

/// The metrics of `answers` (any non-empty subset).
pub fn metrics(answers: &[&HbAnswer]) -> HbMetrics {
    let n = answers.len();
    let correct = answers.iter().filter(|a| a.correct).count();
    let unknown = answers.iter().filter(|a| a.pred == YesNo::Unknown).count();
    let mut figures: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut questions: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for a in answers {
        let c = usize::from(a.correct);
        if let Some(f) = a.question.figure_key() {
            let e = figures.entry(f).or_default();
            *e = (e.0 + c, e.1 + 1);
        }
        let e = questions.entry(a.question.question_key()).or_default();
        *e = (e.0 + c, e.1 + 1);
    }
    let (figures_correct, n_figures) = all_right(figures);
    let (groups_correct, n_groups) = all_right(questions);
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    HbMetrics {
        a_acc: ratio(correct, n),
        f_acc: (n_figures > 0).then(|| ratio(figures_correct, n_figures)),
        q_acc: ratio(groups_correct, n_groups),
        n,
        correct,
        unknown,
        figures: n_figures,
        figures_correct,
        question_groups: n_groups,
        question_groups_correct: groups_correct,
    }
}

/// Metrics overall, per category (`VD`, `VS`) and per `category/subcategory`.
pub fn score(answers: &[HbAnswer]) -> Result<BTreeMap<String, HbMetrics>, EvalError> {
    if answers.is_empty() {
        return Err(EvalError::Input("no answers to score".into()));
    }
    let mut out = BTreeMap::new();
    let all: Vec<&HbAnswer> = answers.iter().collect();
    out.insert("overall".to_string(), metrics(&all));
    let mut groups: BTreeMap<String, Vec<&HbAnswer>> = BTreeMap::new();
    for a in answers {
        let q = &a.question;
        groups.entry(q.category.clone()).or_default().push(a);
        groups
            .entry(format!("{}/{}", q.category, q.subcategory))
            .or_default()
            .push(a);
    }
    for (name, members) in groups {
        out.insert(name, metrics(&members));
    }
    Ok(out)
}

/// A field that the file writes as a string or an integer, as a string.
fn id_field(
    path: &Path,
    index: usize,
    row: &serde_json::Value,
    field: &str,
) -> Result<String, EvalError> {
    match row.get(field) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(serde_json::Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        _ => Err(EvalError::record(
            path,
            0,
            &format!("[{index}].{field}"),
            "missing, or not a string or an integer",
        )),
    }
}

/// The fields every HallusionBench question has; a file lacking them is another benchmark's.
const FIELDS: [&str; 7] = [
    "category",
    "subcategory",
    "set_id",
    "figure_id",
    "question_id",
    "question",
    "gt_answer",
];

/// One question from a JSON object (`index` for messages).
fn question_from(
    path: &Path,
    index: usize,
    row: &serde_json::Value,
) -> Result<HbQuestion, EvalError> {
    if !row.is_object() {
        return Err(EvalError::record(
            path,
            0,
            &format!("[{index}]"),
            "not a JSON object",
        ));
    }
    let missing: Vec<&str> = FIELDS
        .iter()
        .copied()
        .filter(|f| row.get(f).is_none())
        .collect();
    if !missing.is_empty() {
        return Err(EvalError::record(
            path,
            0,
            &format!("[{index}]"),
            format!(
                "missing {} (a HallusionBench question has {}; is this another benchmark's file?)",
                missing.join(", "),
                FIELDS.join(", ")
            ),
        ));
    }
    let field = |f: &str| id_field(path, index, row, f);
    let category = field("category")?;
    if category != "VD" && category != "VS" {
        return Err(EvalError::record(
            path,
            0,
            &format!("[{index}].category"),
            format!("{category:?} is neither \"VD\" nor \"VS\""),
        ));
    }
    let gt_answer = field("gt_answer")?;
    if gt_answer != "0" && gt_answer != "1" {
        return Err(EvalError::record(
            path,
            0,
            &format!("[{index}].gt_answer"),
            format!("{gt_answer:?} is neither \"0\" (no) nor \"1\" (yes)"),
        ));
    }
    let filename = match row.get("filename") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) if s.is_empty() => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(_) => {
            return Err(EvalError::record(
                path,
                0,
                &format!("[{index}].filename"),
                "not a string or null",
            ))
        }
    };
    let visual_input = match row.get("visual_input") {
        None => if filename.is_some() { "1" } else { "0" }.to_string(),
        Some(_) => field("visual_input")?,
    };
    Ok(HbQuestion {
        category,
        subcategory: field("subcategory")?,
        set_id: field("set_id")?,
        figure_id: field("figure_id")?,
        question_id: field("question_id")?,
        visual_input,
        question: field("question")?,
        gt_answer,
        filename,
    })
}

/// Reads `HallusionBench.json` (a JSON array of questions). A question missing a field, with
/// a `gt_answer` other than "0"/"1" or a key seen before is an error naming file, item and
/// field.
pub fn read_questions(path: &Path) -> Result<Vec<HbQuestion>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|e| crate::files::FileError::new(path, e))?;
    let doc: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| EvalError::record(path, e.line(), "(document)", format!("not JSON: {e}")))?;
    let rows = doc.as_array().ok_or_else(|| {
        EvalError::record(
            path,
            0,
            "(document)",
            "not a JSON array of questions (HallusionBench.json is one)",
        )
    })?;
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let q = question_from(path, i, row)?;
        if !seen.insert(q.key()) {
            return Err(EvalError::record(
                path,
                0,
                &format!("[{i}]"),
                format!("question {} appears twice", q.key()),
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

/// Reads `answers.jsonl` (rows of [`HbAnswer`]: the question's fields and `answer`),
/// re-extracting every reply (a stored `pred` is not trusted).
pub fn read_answers(path: &Path) -> Result<Vec<HbAnswer>, EvalError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (line, text) in read_lines(path)? {
        let row: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| EvalError::record(path, line, "(line)", format!("not JSON: {e}")))?;
        let q = question_from(path, line, &row).map_err(|e| match e {
            EvalError::Record { field, message, .. } => EvalError::Record {
                path: path.to_path_buf(),
                line,
                field: field
                    .split_once('.')
                    .map_or(field.clone(), |(_, f)| f.to_string()),
                message,
            },
            other => other,
        })?;
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
        if !seen.insert(q.key()) {
            return Err(EvalError::record(
                path,
                line,
                "question_id",
                format!("question {} appears twice", q.key()),
            ));
        }
        out.push(HbAnswer::new(q, answer));
    }
    Ok(out)
}

/// A question left out of the metrics, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HbExcluded {
    pub key: String,
    pub filename: Option<String>,
    pub reason: String,
}

/// What [`run`] produced.
#[derive(Debug, Clone, Default)]
pub struct HbRun {
    pub answers: Vec<HbAnswer>,
    pub excluded: Vec<HbExcluded>,
}

/// Asks every question that has a figure (prompt = question + `suffix`), `batch` at a time.
/// Questions without a figure, or whose image is missing, are not asked: they are returned in
/// [`HbRun::excluded`] with the reason.
pub fn run(
    questions: &[HbQuestion],
    images: &Images,
    suffix: &str,
    batch: usize,
    generate: &mut GenerateFn<'_>,
) -> Result<HbRun, EvalError> {
    let (asked, left_out) = ask_all(
        questions,
        images,
        "hallusionbench",
        "no figure or missing image",
        batch,
        generate,
        |q| match &q.filename {
            None => Err(
                "no figure: misp answers about an image, text-only questions are not asked"
                    .to_string(),
            ),
            Some(f) => Ok((images.resolve(f)?, format!("{}{suffix}", q.question))),
        },
    )?;
    let excluded = left_out
        .into_iter()
        .map(|(q, reason)| HbExcluded {
            key: q.key(),
            filename: q.filename.clone(),
            reason,
        })
        .collect();
    let answers = asked
        .into_iter()
        .map(|(q, a)| HbAnswer::new(q.clone(), a))
        .collect();
    Ok(HbRun { answers, excluded })
}

/// Writes `answers.jsonl`, `metrics.json` and `excluded.json` (questions not asked, and the
/// unknown replies) into `out`, atomically; returns the metrics.
pub fn write_outputs(out: &Path, run: &HbRun) -> Result<BTreeMap<String, HbMetrics>, EvalError> {
    let scores = score(&run.answers)?;
    write_jsonl(&out.join("answers.jsonl"), &run.answers)?;
    write_json_atomic(&out.join("metrics.json"), &scores)?;
    let unknown: Vec<String> = run
        .answers
        .iter()
        .filter(|a| a.pred == YesNo::Unknown)
        .map(|a| a.question.key())
        .collect();
    let no_figure = run.excluded.iter().filter(|e| e.filename.is_none()).count();
    let excluded = serde_json::json!({
        "not_asked": run.excluded.len(),
        "no_figure": no_figure,
        "missing_images": run.excluded.len() - no_figure,
        "excluded": run.excluded,
        "unknown_answers": unknown.len(),
        "unknown_answers_scored_wrong": unknown,
    });
    write_json_atomic(&out.join("excluded.json"), &excluded)?;
    Ok(scores)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(cat: &str, sub: &str, set: &str, fig: &str, qid: &str, gt: &str) -> HbQuestion {
        HbQuestion {
            category: cat.into(),
            subcategory: sub.into(),
            set_id: set.into(),
            figure_id: fig.into(),
            question_id: qid.into(),
            visual_input: if cat == "VS" && fig == "0" { "0" } else { "1" }.into(),
            question: format!("q {set} {fig} {qid}?"),
            gt_answer: gt.into(),
            filename: (!(cat == "VS" && fig == "0")).then(|| format!("{set}_{fig}.png")),
        }
    }

    #[test]
    fn figures_and_question_groups_need_every_member_right() {
        let answers = vec![
            // Figure VD_a_0_0: both right; figure VD_a_0_1: one wrong.
            HbAnswer::new(q("VD", "a", "0", "0", "0", "1"), "Yes".into()),
            HbAnswer::new(q("VD", "a", "0", "0", "1", "0"), "No".into()),
            HbAnswer::new(q("VD", "a", "0", "1", "0", "0"), "No".into()),
            HbAnswer::new(q("VD", "a", "0", "1", "1", "1"), "Maybe".into()),
            // VS: the no-figure question joins no figure but joins its question group.
            HbAnswer::new(q("VS", "b", "0", "0", "0", "1"), "yes".into()),
            HbAnswer::new(q("VS", "b", "0", "1", "0", "1"), "yes".into()),
        ];
        let m = score(&answers).unwrap();
        let all = &m["overall"];
        assert_eq!((all.n, all.correct, all.unknown), (6, 5, 1));
        assert_eq!((all.figures, all.figures_correct), (3, 2));
        // Groups: VD_a_0_0 (right, right), VD_a_0_1 (right, unknown), VS_b_0_0 (right, right).
        assert_eq!((all.question_groups, all.question_groups_correct), (3, 2));
        assert!((all.a_acc - 5.0 / 6.0).abs() < 1e-15);
        assert_eq!(m["VS/b"].figures, 1);
        let only_text = [HbAnswer::new(
            q("VS", "b", "0", "0", "0", "1"),
            "yes".into(),
        )];
        let refs: Vec<&HbAnswer> = only_text.iter().collect();
        assert_eq!(metrics(&refs).f_acc, None);
    }

    #[test]
    fn files_of_another_benchmark_are_named_as_such() {
        let dir = std::env::temp_dir().join(format!("misp-hb-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("q.json");
        std::fs::write(
            &path,
            r#"[{"question_id": 1, "image": "a.jpg", "text": "?", "label": "yes"}]"#,
        )
        .unwrap();
        let err = read_questions(&path).unwrap_err().to_string();
        assert!(
            err.contains("q.json:0: field `[0]`") && err.contains("missing category"),
            "{err}"
        );
        std::fs::write(&path, r#"{"a": 1}"#).unwrap();
        assert!(read_questions(&path)
            .unwrap_err()
            .to_string()
            .contains("JSON array"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
