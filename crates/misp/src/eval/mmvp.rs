//! MMVP (Tong et al., 2024): 300 two-option questions on 150 pairs of images that CLIP sees as
//! alike. Reads the official `Questions.csv` (`Index, Question, Options, Correct Answer`; image
//! `{Index}.jpg`), asks `Question + " " + Options` as the official `evaluate_mllm.py` does,
//! extracts the chosen option ([`super::extract::option`]: a letter, or the one option's text)
//! and scores question accuracy and pair accuracy: a pair (rows `2k-1` and `2k`, as the official
//! grader pairs consecutive rows) counts only when both of its questions are right. A pair with
//! a question that was not asked (missing image) is left out of pair accuracy and counted.
//!
//! The official grader asks GPT-4 whether a reply matches; misp matches deterministically, and
//! a reply naming no option or both is "unknown", counted wrong and listed.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::extract::option;
use super::{ask_all, EvalError, GenerateFn, Images};
use crate::files::{read_lines, write_json_atomic, write_jsonl, FileError};

/// Column names that may carry a visual pattern (the official file has none; annotated copies
/// add one).
const PATTERN_COLUMNS: [&str; 4] = ["visual pattern", "pattern", "type", "category"];

/// One MMVP question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmvpQuestion {
    /// The `Index` column (1-based); the image is `{index}.jpg`.
    pub index: u64,
    pub question: String,
    /// The options as written, `(a) Open (b) Closed`.
    pub options: String,
    /// The correct option's letter, lower-case.
    pub correct: char,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
}

impl MmvpQuestion {
    /// The image file name, relative to the images folder.
    pub fn image(&self) -> String {
        format!("{}.jpg", self.index)
    }

    /// The pair the question belongs to: rows 1 and 2 are pair 1, rows 3 and 4 pair 2, ...
    pub fn pair(&self) -> u64 {
        self.index.div_ceil(2)
    }

    /// The official prompt: question, a space, the options.
    pub fn prompt(&self) -> String {
        format!("{} {}", self.question, self.options)
    }
}

/// `(letter, text)` of each `(x) text` option in `options`.
pub fn parse_options(options: &str) -> Vec<(char, String)> {
    let chars: Vec<char> = options.chars().collect();
    let mut starts = Vec::new();
    for i in 0..chars.len().saturating_sub(2) {
        if chars[i] == '(' && chars[i + 1].is_ascii_alphabetic() && chars[i + 2] == ')' {
            starts.push(i);
        }
    }
    starts
        .iter()
        .enumerate()
        .map(|(k, &s)| {
            let end = starts.get(k + 1).copied().unwrap_or(chars.len());
            let text: String = chars[s + 3..end].iter().collect();
            (chars[s + 1].to_ascii_lowercase(), text.trim().to_string())
        })
        .collect()
}

/// One line of `answers.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmvpAnswer {
    #[serde(flatten)]
    pub question: MmvpQuestion,
    /// The raw generated text.
    pub answer: String,
    /// The extracted option letter, `None` when the reply names none or several.
    pub pred: Option<char>,
    pub correct_answer: bool,
}

impl MmvpAnswer {
    pub fn new(question: MmvpQuestion, answer: String) -> Self {
        let pred = option(&answer, &parse_options(&question.options));
        let correct_answer = pred == Some(question.correct);
        Self {
            question,
            answer,
            pred,
            correct_answer,
        }
    }
}

/// Accuracies of one group, fractions in [0, 1].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmvpMetrics {
    /// Question accuracy.
    pub accuracy: f64,
    /// Pairs with both questions right over complete pairs.
    pub pair_accuracy: f64,
    pub n: usize,
    pub correct: usize,
    /// Replies naming no option or several (counted wrong).
    pub unknown: usize,
    pub pairs: usize,
    pub pairs_correct: usize,
    /// Pairs with only one question answered (the other not asked): not in pair accuracy.
    pub incomplete_pairs: usize,
}

/// The metrics of `answers`.
pub fn metrics(answers: &[&MmvpAnswer]) -> MmvpMetrics {
    let n = answers.len();
    let correct = answers.iter().filter(|a| a.correct_answer).count();
    let unknown = answers.iter().filter(|a| a.pred.is_none()).count();
    let mut pairs: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
    for a in answers {
        let e = pairs.entry(a.question.pair()).or_default();
        *e = (e.0 + usize::from(a.correct_answer), e.1 + 1);
    }
    let complete: Vec<&(usize, usize)> = pairs.values().filter(|(_, t)| *t == 2).collect();
    let pairs_correct = complete.iter().filter(|(c, _)| *c == 2).count();
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    MmvpMetrics {
        accuracy: ratio(correct, n),
        pair_accuracy: ratio(pairs_correct, complete.len()),
        n,
        correct,
        unknown,
        pairs: complete.len(),
        pairs_correct,
        incomplete_pairs: pairs.len() - complete.len(),
    }
}

/// Metrics overall and per visual pattern (when the file gives one).
pub fn score(answers: &[MmvpAnswer]) -> Result<BTreeMap<String, MmvpMetrics>, EvalError> {
    if answers.is_empty() {
        return Err(EvalError::Input("no answers to score".into()));
    }
    let mut out = BTreeMap::new();
    let all: Vec<&MmvpAnswer> = answers.iter().collect();
    out.insert("overall".to_string(), metrics(&all));
    let mut groups: BTreeMap<String, Vec<&MmvpAnswer>> = BTreeMap::new();
    for a in answers {
        if let Some(p) = &a.question.pattern {
            groups.entry(p.clone()).or_default().push(a);
        }
    }
    for (name, members) in groups {
        out.insert(name, metrics(&members));
    }
    Ok(out)
}

/// Splits CSV text (RFC 4180: `"`-quoted fields may hold commas, doubled quotes and line
/// breaks) into records of fields, each with its 1-based starting line.
fn csv_records(text: &str) -> Result<Vec<(usize, Vec<String>)>, usize> {
    let mut records = Vec::new();
    let mut fields = Vec::new();
    let mut field = String::new();
    let (mut line, mut start_line) = (1usize, 1usize);
    let mut quoted = false;
    let mut chars = text.trim_start_matches('\u{feff}').chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        any = true;
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => {
                if c == '\n' {
                    line += 1;
                }
                field.push(c);
            }
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => fields.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                fields.push(std::mem::take(&mut field));
                records.push((start_line, std::mem::take(&mut fields)));
                line += 1;
                start_line = line;
                any = false;
            }
            (false, c) => field.push(c),
        }
    }
    if quoted {
        return Err(start_line);
    }
    if any {
        fields.push(field);
        records.push((start_line, fields));
    }
    records.retain(|(_, f)| !(f.len() == 1 && f[0].trim().is_empty()));
    Ok(records)
}

/// Reads `Questions.csv`. A file without the MMVP columns, a row whose options do not parse
/// or whose correct answer is not one of them, or a repeated index is an error naming file,
/// line and field.
pub fn read_questions(path: &Path) -> Result<Vec<MmvpQuestion>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|e| FileError::new(path, e))?;
    let records = csv_records(&text)
        .map_err(|line| EvalError::record(path, line, "(row)", "a quoted field is not closed"))?;
    let Some(((_, header), rows)) = records.split_first() else {
        return Err(EvalError::Input(format!("{}: empty file", path.display())));
    };
    let norm: Vec<String> = header.iter().map(|h| h.trim().to_lowercase()).collect();
    let col = |name: &str| norm.iter().position(|h| h == name);
    let needed = ["index", "question", "options", "correct answer"];
    let missing: Vec<&str> = needed
        .iter()
        .copied()
        .filter(|n| col(n).is_none())
        .collect();
    if !missing.is_empty() {
        return Err(EvalError::record(
            path,
            1,
            "(header)",
            format!(
                "no column {} (MMVP's Questions.csv has Index, Question, Options, Correct Answer; \
                 is this another benchmark's file?)",
                missing.join(", ")
            ),
        ));
    }
    let [index_c, question_c, options_c, answer_c] = needed.map(|n| col(n).unwrap_or(0));
    let pattern_c = PATTERN_COLUMNS.iter().find_map(|n| col(n));
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(rows.len());
    for (line, row) in rows {
        let get = |c: usize, name: &str| {
            row.get(c)
                .map(|s| s.trim().to_string())
                .ok_or_else(|| EvalError::record(path, *line, name, "missing (short row)"))
        };
        let index: u64 = get(index_c, "Index")?
            .parse()
            .map_err(|_| EvalError::record(path, *line, "Index", "not a positive integer"))?;
        if index == 0 {
            return Err(EvalError::record(
                path,
                *line,
                "Index",
                "0 (indices start at 1)",
            ));
        }
        let options = get(options_c, "Options")?;
        let parsed = parse_options(&options);
        if parsed.len() < 2 {
            return Err(EvalError::record(
                path,
                *line,
                "Options",
                format!("{options:?} does not hold two `(x) text` options"),
            ));
        }
        let answer = get(answer_c, "Correct Answer")?;
        let letter = parse_options(&answer)
            .first()
            .map(|(l, _)| *l)
            .or_else(|| {
                let a = answer.trim_matches(|c: char| !c.is_ascii_alphabetic());
                (a.len() == 1).then(|| a.chars().next().unwrap_or('?').to_ascii_lowercase())
            })
            .filter(|l| parsed.iter().any(|(p, _)| p == l))
            .ok_or_else(|| {
                EvalError::record(
                    path,
                    *line,
                    "Correct Answer",
                    format!("{answer:?} is none of the options' letters"),
                )
            })?;
        if !seen.insert(index) {
            return Err(EvalError::record(
                path,
                *line,
                "Index",
                format!("{index} appears twice"),
            ));
        }
        out.push(MmvpQuestion {
            index,
            question: get(question_c, "Question")?,
            options,
            correct: letter,
            pattern: pattern_c
                .and_then(|c| row.get(c))
                .map(|p| p.trim().to_string())
                .filter(|p| !p.is_empty()),
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

/// Reads `answers.jsonl` (rows of [`MmvpAnswer`]), re-extracting every reply.
pub fn read_answers(path: &Path) -> Result<Vec<MmvpAnswer>, EvalError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (line, text) in read_lines(path)? {
        let row: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| EvalError::record(path, line, "(line)", format!("not JSON: {e}")))?;
        let str_field = |f: &str| {
            row.get(f)
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .ok_or_else(|| EvalError::record(path, line, f, "missing or not a string"))
        };
        let index = row
            .get("index")
            .and_then(|v| v.as_u64())
            .filter(|i| *i > 0)
            .ok_or_else(|| {
                EvalError::record(path, line, "index", "missing or not a positive integer")
            })?;
        let correct = str_field("correct")?;
        let mut letters = correct.chars();
        let (Some(letter), None) = (letters.next(), letters.next()) else {
            return Err(EvalError::record(path, line, "correct", "not one letter"));
        };
        let options = str_field("options")?;
        if !parse_options(&options).iter().any(|(l, _)| *l == letter) {
            return Err(EvalError::record(
                path,
                line,
                "correct",
                format!("{letter:?} is none of the options' letters"),
            ));
        }
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
        if !seen.insert(index) {
            return Err(EvalError::record(
                path,
                line,
                "index",
                format!("{index} appears twice"),
            ));
        }
        let question = MmvpQuestion {
            index,
            question: str_field("question")?,
            options,
            correct: letter,
            pattern: row
                .get("pattern")
                .and_then(|v| v.as_str())
                .map(str::to_string),
        };
        out.push(MmvpAnswer::new(question, answer));
    }
    Ok(out)
}

/// A question left out, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmvpExcluded {
    pub index: u64,
    pub image: String,
    pub reason: String,
}

/// What [`run`] produced.
#[derive(Debug, Clone, Default)]
pub struct MmvpRun {
    pub answers: Vec<MmvpAnswer>,
    pub excluded: Vec<MmvpExcluded>,
}

/// Asks every question whose image exists (prompt = official prompt + `suffix`).
pub fn run(
    questions: &[MmvpQuestion],
    images: &Images,
    suffix: &str,
    batch: usize,
    generate: &mut GenerateFn<'_>,
) -> Result<MmvpRun, EvalError> {
    let (asked, left_out) = ask_all(
        questions,
        images,
        "mmvp",
        "missing images",
        batch,
        generate,
        |q| {
            Ok((
                images.resolve(&q.image())?,
                format!("{}{suffix}", q.prompt()),
            ))
        },
    )?;
    let excluded = left_out
        .into_iter()
        .map(|(q, reason)| MmvpExcluded {
            index: q.index,
            image: q.image(),
            reason,
        })
        .collect();
    let answers = asked
        .into_iter()
        .map(|(q, a)| MmvpAnswer::new(q.clone(), a))
        .collect();
    Ok(MmvpRun { answers, excluded })
}

/// Writes `answers.jsonl`, `metrics.json` and `excluded.json` into `out`, atomically.
pub fn write_outputs(
    out: &Path,
    run: &MmvpRun,
) -> Result<BTreeMap<String, MmvpMetrics>, EvalError> {
    let scores = score(&run.answers)?;
    write_jsonl(&out.join("answers.jsonl"), &run.answers)?;
    write_json_atomic(&out.join("metrics.json"), &scores)?;
    let unknown: Vec<u64> = run
        .answers
        .iter()
        .filter(|a| a.pred.is_none())
        .map(|a| a.question.index)
        .collect();
    let excluded = serde_json::json!({
        "missing_images": run.excluded.len(),
        "excluded": run.excluded,
        "incomplete_pairs": scores.get("overall").map_or(0, |m| m.incomplete_pairs),
        "unknown_answers": unknown.len(),
        "unknown_answers_scored_wrong": unknown,
    });
    write_json_atomic(&out.join("excluded.json"), &excluded)?;
    Ok(scores)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_from_the_official_format() {
        assert_eq!(
            parse_options("(a) Open (b) Closed"),
            vec![('a', "Open".to_string()), ('b', "Closed".to_string())]
        );
        assert_eq!(
            parse_options("(a) Yes (b) No (it is (c)losed)").len(),
            3,
            "every `(x)` starts an option"
        );
        assert!(parse_options("Open or closed").is_empty());
    }

    #[test]
    fn csv_handles_quotes_commas_and_line_breaks() {
        let text = "Index,Question,Options,Correct Answer\n1,\"Is it open, or closed?\",(a) Open (b) Closed,(a)\r\n2,\"Say \"\"hi\"\"\nthen\",(a) x (b) y,(b)\n\n";
        let r = csv_records(text).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[1].1[1], "Is it open, or closed?");
        assert_eq!(r[2].0, 3);
        assert_eq!(r[2].1[1], "Say \"hi\"\nthen");
        assert_eq!(csv_records("a,\"b\n"), Err(1));
    }

    #[test]
    fn a_pair_needs_both_questions_right() {
        let q = |index: u64, correct: char| MmvpQuestion {
            index,
            question: "Is the door open?".into(),
            options: "(a) Open (b) Closed".into(),
            correct,
            pattern: None,
        };
        let answers = vec![
            MmvpAnswer::new(q(1, 'a'), "(a)".into()),
            MmvpAnswer::new(q(2, 'b'), "(b) Closed".into()),
            MmvpAnswer::new(q(3, 'a'), "(a)".into()),
            MmvpAnswer::new(q(4, 'b'), "(a)".into()),
            MmvpAnswer::new(q(5, 'a'), "I don't know".into()),
        ];
        let m = &score(&answers).unwrap()["overall"];
        assert_eq!((m.n, m.correct, m.unknown), (5, 3, 1));
        assert_eq!((m.pairs, m.pairs_correct, m.incomplete_pairs), (2, 1, 1));
        assert!((m.pair_accuracy - 0.5).abs() < 1e-15);
    }
}
