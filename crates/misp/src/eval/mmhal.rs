//! MMHal-Bench (Sun et al., 2023): 96 open questions in 8 types, answered by the model and rated
//! 0-6 by an LLM judge that sees the image's contents (as text), the question, the standard
//! human answer and the model's answer (the benchmark's `eval_gpt4.py` protocol).
//!
//! - The judge prompt is the official template, byte for byte ([`MMHAL_JUDGE_TEMPLATE`]),
//!   filled as Python's `str.format` fills it; one user message, temperature 0.
//! - A rating is parsed as the official script does: the reply, lower-cased, must contain
//!   `rating: s` for exactly one `s` in 0..=6. Where it finds none or several, the official
//!   script scores 0; misp records the reply and excludes the question from the averages with a
//!   count in `excluded.json` (docs/design.md §5), so a judge that rambles cannot pass as a
//!   hallucinating model.
//! - Average score, hallucination rate (share of rated answers below 3), overall and per
//!   `question_type` (the official script groups by position, `i % 8`, which is the same on
//!   the benchmark's file).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::judge::{all_or_error, ChatRequest, Judge};
use super::{generate_all, EvalError, GenerateFn, Images};
use crate::files::{read_lines, write_json_atomic, write_jsonl, FileError};

/// MMHal-Bench's judge prompt (`eval_gpt4.py`), four `{}` slots: image contents, question,
/// standard answer, model answer.
pub const MMHAL_JUDGE_TEMPLATE: &str = include_str!("prompts/mmhal_judge.txt");

/// The fields a record of `response_template.json` must have.
const FIELDS: &str = "question_type, image_src, image_content, question, gt_answer";

/// One MMHal-Bench question (a record of `response_template.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct MmhalQuestion {
    /// 0-based position in the file.
    pub index: usize,
    pub question_type: String,
    pub question_topic: String,
    /// Image file name under the images folder: the last segment of `image_path` when the
    /// record has one, else of `image_src`.
    pub image: String,
    pub image_content: Vec<String>,
    pub question: String,
    pub gt_answer: String,
    /// `model_answer` when the file carries one (a filled response file).
    pub model_answer: Option<String>,
}

/// One line of `answers.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmhalAnswer {
    pub index: usize,
    pub question_type: String,
    pub image: String,
    pub question: String,
    /// The model's raw answer.
    pub model_answer: String,
    /// The judge's raw reply.
    pub judge_reply: String,
    /// The rating parsed from the reply; `None` when it holds no rating or several.
    pub rating: Option<u8>,
}

/// A question left out, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Excluded {
    pub index: usize,
    pub image: String,
    pub reason: String,
}

/// Score and hallucination rate of a set of rated answers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MmhalMetrics {
    pub average_score: f64,
    pub hallucination_rate: f64,
    /// Rated answers.
    pub n: usize,
}

fn last_segment(s: &str) -> &str {
    s.rsplit('/').next().unwrap_or(s)
}

fn field<'a>(path: &Path, i: usize, row: &'a Value, name: &str) -> Result<&'a str, EvalError> {
    row.get(name).and_then(Value::as_str).ok_or_else(|| {
        EvalError::record(
            path,
            0,
            &format!("[{i}].{name}"),
            format!("missing or not a string (an MMHal-Bench record has {FIELDS})"),
        )
    })
}

/// Reads MMHal-Bench's `response_template.json` (a JSON array of records; `model_answer`
/// optional). A file of another benchmark fails naming the fields expected.
pub fn read_questions(path: &Path) -> Result<Vec<MmhalQuestion>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|e| FileError::new(path, e))?;
    let doc: Value = serde_json::from_str(&text)
        .map_err(|e| EvalError::record(path, e.line(), "(document)", format!("not JSON: {e}")))?;
    let rows = doc.as_array().ok_or_else(|| {
        EvalError::record(
            path,
            0,
            "(document)",
            format!("not a JSON array of MMHal-Bench records ({FIELDS})"),
        )
    })?;
    let mut out = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let image = match row.get("image_path").and_then(Value::as_str) {
            Some(p) => last_segment(p).to_string(),
            None => last_segment(field(path, i, row, "image_src")?).to_string(),
        };
        let image_content = row
            .get("image_content")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|v| v.as_str().map(str::to_string)).collect())
            .ok_or_else(|| {
                EvalError::record(
                    path,
                    0,
                    &format!("[{i}].image_content"),
                    format!(
                        "missing or not a list of strings (an MMHal-Bench record has {FIELDS})"
                    ),
                )
            })?;
        out.push(MmhalQuestion {
            index: i,
            question_type: field(path, i, row, "question_type")?.to_string(),
            question_topic: row
                .get("question_topic")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            image,
            image_content,
            question: field(path, i, row, "question")?.to_string(),
            gt_answer: field(path, i, row, "gt_answer")?.to_string(),
            model_answer: row
                .get("model_answer")
                .and_then(Value::as_str)
                .map(str::to_string),
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

/// Fills `template`'s `{}` slots in order, as Python's `str.format` with positional
/// arguments does (the MMHal template has no other braces).
pub fn fill(template: &str, args: &[&str]) -> String {
    let mut out =
        String::with_capacity(template.len() + args.iter().map(|a| a.len()).sum::<usize>());
    let mut parts = template.split("{}");
    out.push_str(parts.next().unwrap_or(""));
    for (i, part) in parts.enumerate() {
        out.push_str(args.get(i).copied().unwrap_or(""));
        out.push_str(part);
    }
    out
}

/// The judge prompt of one question and answer.
pub fn judge_prompt(q: &MmhalQuestion, model_answer: &str) -> String {
    let contents = q.image_content.join(", ");
    fill(
        MMHAL_JUDGE_TEMPLATE,
        &[&contents, &q.question, &q.gt_answer, model_answer],
    )
}

/// The official parse: the rating `s` in 0..=6 whose `rating: s` the lower-cased reply holds,
/// when exactly one does.
pub fn parse_rating(reply: &str) -> Option<u8> {
    let lower = reply.to_lowercase();
    let found: Vec<u8> = (0..=6u8)
        .filter(|s| lower.contains(&format!("rating: {s}")))
        .collect();
    (found.len() == 1).then(|| found[0])
}

/// Metrics of rated answers (`None` when there are none).
pub fn metrics(ratings: &[u8]) -> Option<MmhalMetrics> {
    if ratings.is_empty() {
        return None;
    }
    let n = ratings.len();
    let sum: f64 = ratings.iter().map(|&r| f64::from(r)).sum();
    let hallucinated = ratings.iter().filter(|&&r| r < 3).count();
    Some(MmhalMetrics {
        average_score: sum / n as f64,
        hallucination_rate: hallucinated as f64 / n as f64,
        n,
    })
}

/// Model answers by question index.
pub type Answers = Vec<(usize, String)>;

/// The model's answers: questions whose image is missing are excluded (with the reason), the
/// rest go through `generate` with the question as the prompt.
pub fn answer(
    questions: &[MmhalQuestion],
    images: &Images,
    batch: usize,
    generate: &mut GenerateFn<'_>,
) -> Result<(Answers, Vec<Excluded>), EvalError> {
    let mut items = Vec::new();
    let mut asked = Vec::new();
    let mut excluded = Vec::new();
    for q in questions {
        match images.resolve(&q.image) {
            Ok(p) => {
                items.push((p, q.question.clone()));
                asked.push(q.index);
            }
            Err(reason) => excluded.push(Excluded {
                index: q.index,
                image: q.image.clone(),
                reason,
            }),
        }
    }
    if items.is_empty() {
        return Err(EvalError::Input(format!(
            "none of the {} questions has its image under {}",
            questions.len(),
            images.dir().display()
        )));
    }
    let texts = generate_all(&items, batch, "mmhal", generate)?;
    Ok((asked.into_iter().zip(texts).collect(), excluded))
}

/// Reads saved model answers: misp's `answers.jsonl` (rows with `index` and `model_answer`) or
/// a filled MMHal-Bench response file (a JSON array with `model_answer`, in question order).
pub fn read_answers(path: &Path) -> Result<Vec<(usize, String)>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|e| FileError::new(path, e))?;
    if text.trim_start().starts_with('[') {
        return read_questions(path)?
            .into_iter()
            .map(|q| match q.model_answer {
                Some(a) => Ok((q.index, a)),
                None => Err(EvalError::record(
                    path,
                    0,
                    &format!("[{}].model_answer", q.index),
                    "missing or not a string",
                )),
            })
            .collect();
    }
    let mut out = Vec::new();
    for (line, text) in read_lines(path)? {
        let row: Value = serde_json::from_str(&text)
            .map_err(|e| EvalError::record(path, line, "(line)", format!("not JSON: {e}")))?;
        let index = row
            .get("index")
            .and_then(Value::as_u64)
            .ok_or_else(|| EvalError::record(path, line, "index", "missing or not an integer"))?;
        let answer = row
            .get("model_answer")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                EvalError::record(path, line, "model_answer", "missing or not a string")
            })?;
        out.push((index as usize, answer.to_string()));
    }
    Ok(out)
}

/// What a judged run produced.
#[derive(Debug, Clone, Default)]
pub struct MmhalRun {
    pub answers: Vec<MmhalAnswer>,
    pub excluded: Vec<Excluded>,
}

/// Judges `answers` (question index, model answer): one request per answer through `judge`
/// (cached, retried, concurrent). Fails, after every other request is answered and cached,
/// when a request fails for good.
pub fn judge_answers(
    questions: &[MmhalQuestion],
    answers: &[(usize, String)],
    judge: &Judge,
) -> Result<Vec<MmhalAnswer>, EvalError> {
    let by_index: BTreeMap<usize, &MmhalQuestion> =
        questions.iter().map(|q| (q.index, q)).collect();
    let mut asked = Vec::with_capacity(answers.len());
    for (i, a) in answers {
        let q = by_index.get(i).ok_or_else(|| {
            EvalError::Input(format!(
                "answer to question {i}, but the questions file has {} questions",
                questions.len()
            ))
        })?;
        asked.push((*q, a));
    }
    let requests: Vec<ChatRequest> = asked
        .iter()
        .map(|(q, a)| ChatRequest::user_text(&judge_prompt(q, a)))
        .collect();
    let replies = all_or_error(
        judge.complete_all(&requests, "mmhal judge"),
        &judge.config().cache_dir,
    )?;
    Ok(asked
        .into_iter()
        .zip(replies)
        .map(|((q, a), reply)| MmhalAnswer {
            index: q.index,
            question_type: q.question_type.clone(),
            image: q.image.clone(),
            question: q.question.clone(),
            model_answer: a.clone(),
            rating: parse_rating(&reply),
            judge_reply: reply,
        })
        .collect())
}

/// The metrics document: `{"mmhal": overall, "<question_type>": ..., "unrated": n}` (types in
/// the order they first appear).
pub fn score(answers: &[MmhalAnswer]) -> Result<Value, EvalError> {
    let rated: Vec<u8> = answers.iter().filter_map(|a| a.rating).collect();
    let overall = metrics(&rated).ok_or_else(|| {
        EvalError::Input(format!(
            "none of the {} judge replies holds a rating (listed in excluded.json)",
            answers.len()
        ))
    })?;
    let mut doc = serde_json::Map::new();
    let mut overall_json = serde_json::to_value(overall).unwrap_or_default();
    overall_json["unrated"] = json!(answers.len() - rated.len());
    doc.insert("mmhal".into(), overall_json);
    let mut types: Vec<&str> = Vec::new();
    for a in answers {
        if !types.contains(&a.question_type.as_str()) {
            types.push(&a.question_type);
        }
    }
    for t in types {
        let r: Vec<u8> = answers
            .iter()
            .filter(|a| a.question_type == t)
            .filter_map(|a| a.rating)
            .collect();
        if let Some(m) = metrics(&r) {
            doc.insert(
                format!("mmhal {t}"),
                serde_json::to_value(m).unwrap_or_default(),
            );
        }
    }
    Ok(Value::Object(doc))
}

/// Writes `answers.jsonl`, `metrics.json` and `excluded.json` (missing images and unrated
/// replies) into `out`; returns the metrics.
pub fn write_outputs(out: &Path, run: &MmhalRun) -> Result<Value, EvalError> {
    // The judged answers and the exclusions first: a run whose replies hold no rating at all
    // still keeps what the judge said, for a look at why.
    write_jsonl(&out.join("answers.jsonl"), &run.answers)?;
    let unrated: Vec<Value> = run
        .answers
        .iter()
        .filter(|a| a.rating.is_none())
        .map(|a| json!({"index": a.index, "reason": "the judge reply holds no rating, or several", "judge_reply": a.judge_reply}))
        .collect();
    if !unrated.is_empty() {
        tracing::warn!(
            "{} judge replies without a single rating: excluded from the averages (listed in excluded.json)",
            unrated.len()
        );
    }
    write_json_atomic(
        &out.join("excluded.json"),
        &json!({
            "missing_images": run.excluded.len(),
            "excluded": run.excluded,
            "unrated": unrated.len(),
            "unrated_replies": unrated,
        }),
    )?;
    let metrics = score(&run.answers)?;
    write_json_atomic(&out.join("metrics.json"), &metrics)?;
    Ok(metrics)
}

#[cfg(test)]
mod tests {
    use super::super::judge::{fake, JudgeConfig};
    use super::*;
    use std::path::PathBuf;
    use std::time::Duration;

    const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/mmhal");

    fn expected() -> Value {
        let text = std::fs::read_to_string(format!("{FIXTURE}/expected.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn replies() -> Vec<String> {
        let text = std::fs::read_to_string(format!("{FIXTURE}/judge_replies.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn prompts_are_byte_equal_to_the_official_template_filled() {
        let questions = read_questions(Path::new(&format!("{FIXTURE}/response.json"))).unwrap();
        let want = expected();
        assert_eq!(questions.len(), 16);
        for q in &questions {
            let prompt = judge_prompt(q, q.model_answer.as_deref().unwrap());
            assert_eq!(
                prompt,
                want["prompts"][q.index].as_str().unwrap(),
                "record {}",
                q.index
            );
        }
        assert_eq!(questions[3].image, "img03.jpg");
    }

    #[test]
    fn ratings_parse_as_the_official_script() {
        let want = expected();
        for (i, reply) in replies().iter().enumerate() {
            let r = parse_rating(reply).map(|r| json!(r)).unwrap_or(Value::Null);
            assert_eq!(r, want["ratings"][i], "reply {i}: {reply:?}");
        }
    }

    fn close(a: &Value, b: &Value) {
        let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
        assert!((a - b).abs() < 1e-9, "{a} vs {b}");
    }

    #[test]
    fn a_judged_run_against_a_scripted_judge_scores_as_the_fixture() {
        let dir = std::env::temp_dir().join(format!("misp-mmhal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let questions = read_questions(Path::new(&format!("{FIXTURE}/response.json"))).unwrap();
        // The fake judge answers each prompt with the reply scripted for its record (found by
        // the record's question text in the prompt), after one 502 on the first request.
        let fake = fake::start(
            std::iter::once((502, Some("bad gateway".into())))
                .chain((0..16).map(|_| (200, None)))
                .collect(),
            (500, "no more".into()),
            |body| {
                let v: Value = serde_json::from_str(body).unwrap();
                let prompt = v["messages"][0]["content"].as_str().unwrap();
                let i: usize = (0..16)
                    .find(|i| prompt.contains(&format!("\nQuestion {i} about")))
                    .unwrap();
                let text =
                    std::fs::read_to_string(format!("{FIXTURE}/judge_replies.json")).unwrap();
                let replies: Vec<String> = serde_json::from_str(&text).unwrap();
                replies[i].clone()
            },
        );
        let judge = Judge::new(JudgeConfig {
            url: fake.url.clone(),
            model: "judge".into(),
            api_key: None,
            cache_dir: dir.join("cache"),
            retries: 3,
            backoff: Duration::from_millis(1),
            timeout: Duration::from_secs(10),
            concurrency: 4,
        })
        .unwrap();
        let answers: Vec<(usize, String)> = questions
            .iter()
            .map(|q| (q.index, q.model_answer.clone().unwrap()))
            .collect();
        let judged = judge_answers(&questions, &answers, &judge).unwrap();
        assert_eq!(judge.stats().requested, 16);
        let run = MmhalRun {
            answers: judged,
            excluded: vec![],
        };
        let m = write_outputs(&dir.join("out"), &run).unwrap();
        let want = expected()["misp"].clone();
        close(
            &m["mmhal"]["average_score"],
            &want["overall"]["average_score"],
        );
        close(
            &m["mmhal"]["hallucination_rate"],
            &want["overall"]["hallucination_rate"],
        );
        assert_eq!(m["mmhal"]["n"], want["overall"]["n"]);
        assert_eq!(m["mmhal"]["unrated"], want["unrated"]);
        for (t, w) in want["types"].as_object().unwrap() {
            close(
                &m[format!("mmhal {t}")]["average_score"],
                &w["average_score"],
            );
            close(
                &m[format!("mmhal {t}")]["hallucination_rate"],
                &w["hallucination_rate"],
            );
        }
        let excluded: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("out/excluded.json")).unwrap())
                .unwrap();
        assert_eq!(excluded["unrated"], 5);
        assert_eq!(excluded["unrated_replies"][0]["index"], 3);
        // Re-scoring the saved answers through the cache sends nothing.
        let saved = read_answers(&dir.join("out/answers.jsonl")).unwrap();
        assert_eq!(saved, answers);
        let sent = fake.bodies.lock().unwrap().len();
        let again = judge_answers(&questions, &saved, &judge).unwrap();
        assert_eq!(fake.bodies.lock().unwrap().len(), sent);
        assert_eq!(again, run.answers);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn questions_whose_image_is_missing_are_not_asked_and_are_counted() {
        let dir = std::env::temp_dir().join(format!("misp-mmhal-missing-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("images")).unwrap();
        let questions = read_questions(Path::new(&format!("{FIXTURE}/response.json"))).unwrap();
        // Only the even questions' images exist.
        for q in questions.iter().filter(|q| q.index % 2 == 0) {
            std::fs::write(dir.join("images").join(&q.image), b"not read here").unwrap();
        }
        let mut asked = Vec::new();
        let mut generate = |items: &[(PathBuf, String)]| -> Result<Vec<String>, String> {
            asked.extend(items.iter().map(|(_, q)| q.clone()));
            Ok(items.iter().map(|_| "an answer".to_string()).collect())
        };
        let images = Images::in_dir(&dir.join("images"));
        let (answers, excluded) = answer(&questions, &images, 4, &mut generate).unwrap();
        let even: Vec<&MmhalQuestion> = questions.iter().filter(|q| q.index % 2 == 0).collect();
        assert_eq!(
            asked,
            even.iter().map(|q| q.question.clone()).collect::<Vec<_>>()
        );
        assert_eq!(
            answers.iter().map(|a| a.0).collect::<Vec<_>>(),
            even.iter().map(|q| q.index).collect::<Vec<_>>()
        );
        assert_eq!(excluded.len(), questions.len() - even.len());
        assert!(excluded.iter().all(|e| e.index % 2 == 1), "{excluded:?}");
        assert!(excluded[0].reason.contains("not found"), "{excluded:?}");
        // The count and the list land in excluded.json, next to the judged answers.
        let judged: Vec<MmhalAnswer> = even
            .iter()
            .map(|q| MmhalAnswer {
                index: q.index,
                question_type: q.question_type.clone(),
                image: q.image.clone(),
                question: q.question.clone(),
                model_answer: "an answer".into(),
                judge_reply: "Rating: 4".into(),
                rating: Some(4),
            })
            .collect();
        let run = MmhalRun {
            answers: judged,
            excluded: excluded.clone(),
        };
        let m = write_outputs(&dir.join("out"), &run).unwrap();
        assert_eq!(m["mmhal"]["n"], even.len());
        let written: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("out/excluded.json")).unwrap())
                .unwrap();
        assert_eq!(written["missing_images"], excluded.len());
        assert_eq!(written["excluded"][0]["image"], excluded[0].image.as_str());
        // No image at all: a clear error rather than an empty run.
        let none = Images::in_dir(&dir.join("nowhere"));
        let e = answer(&questions, &none, 4, &mut |_: &[(PathBuf, String)]| {
            Ok(vec![])
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("none of the 16 questions has its image"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn another_benchmarks_file_is_refused_naming_the_fields() {
        let dir = std::env::temp_dir().join(format!("misp-mmhal-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("q.json");
        std::fs::write(
            &p,
            r#"[{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?"}]"#,
        )
        .unwrap();
        let e = read_questions(&p).unwrap_err().to_string();
        assert!(
            e.contains("q.json") && e.contains("[0].image_src") && e.contains("gt_answer"),
            "{e}"
        );
        std::fs::write(&p, "{\"question_id\": 1}\n").unwrap();
        let e = read_questions(&p).unwrap_err().to_string();
        assert!(e.contains("not a JSON array of MMHal-Bench records"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fill_is_positional() {
        assert_eq!(fill("a{}b{}c", &["1", "{}"]), "a1b{}c");
    }
}
