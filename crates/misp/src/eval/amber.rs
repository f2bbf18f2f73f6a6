//! AMBER (Wang et al., 2023): an LLM-free hallucination benchmark with a generative part
//! (describe the image; CHAIR, Cover, Hal, Cog against annotated objects) and a discriminative
//! part (yes/no questions on existence, attributes (state, number, action) and relations;
//! Accuracy, Precision, Recall, F1 with "no" as the positive class).
//!
//! Reads AMBER's `data/` folder as released (github.com/junyangwang0410/AMBER): `annotations.json`
//! (per id: `type`, `truth`, and `hallu` for generative items), `relation.json` (each object
//! word and its associated words), `safe_words.txt` and `query/query_{all,generative,
//! discriminative}.json` (`id`, `image`, `query`). The counting transcribes the official
//! `inference.py` statement for statement, quirks included (the coverage lists, the way an
//! associated word credits its annotated object). Two steps differ (docs/design.md, AMBER):
//!
//! - nouns: the official script POS-tags replies with NLTK and lemmatises the nouns with WordNet;
//!   misp tokenises as NLTK does ([`super::words::word_tokenize`]), keeps a token that is an
//!   AMBER object word as written, else its singular ([`super::words::singularize`]) when that
//!   is one, and drops the modal `can` and the adjective `hot` (object words that are almost
//!   never nouns in a description). Only AMBER's object words matter, so a tagger's other
//!   decisions do not.
//! - similarity: the official script also counts a noun as an annotated (or hallucinated-list)
//!   object when spaCy's `en_core_web_lg` vectors give it a similarity above 0.8; misp matches
//!   exact words and AMBER's association lists only, so a near-synonym outside them counts as a
//!   hallucination here.
//!
//! Discriminative replies go through [`super::extract::yes_no`] first (the official script
//! compares the raw reply with exactly "Yes" / "No"); an unknown reply is wrong and is not an
//! answer "no".

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::extract::{yes_no, YesNo};
use super::words::{singularize, word_tokenize};
use super::{generate_all, EvalError, GenerateFn, Images};
use crate::files::{read_lines, write_json_atomic, write_jsonl, FileError};

/// Which queries to ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Generative,
    Discriminative,
    All,
}

impl Kind {
    /// The query file of this kind under `data/query/`.
    pub fn query_file(self) -> &'static str {
        match self {
            Kind::Generative => "query_generative.json",
            Kind::Discriminative => "query_discriminative.json",
            Kind::All => "query_all.json",
        }
    }
}

/// Object words AMBER never counts as nouns here: they are almost always another part of
/// speech in a description (see the module comment).
const NOT_NOUNS: [&str; 2] = ["can", "hot"];

/// One annotation of `annotations.json`.
#[derive(Debug, Clone, PartialEq)]
pub enum Truth {
    /// Objects present (`truth`) and plausible but absent (`hallu`).
    Generative {
        truth: Vec<String>,
        hallu: Vec<String>,
    },
    /// `kind` is the official type (`discriminative-hallucination`, `-attribute-state`,
    /// `-attribute-number`, `-attribute-action`, `-relation`); `yes` the answer.
    Discriminative { kind: String, yes: bool },
}

/// AMBER's word lists and ground truth.
#[derive(Debug, Clone)]
pub struct Amber {
    /// `relation.json`: object -> associated words.
    association: HashMap<String, Vec<String>>,
    /// Every object and associated word (the official `hallucination_words`).
    vocabulary: HashSet<String>,
    safe_words: HashSet<String>,
    truth: HashMap<u64, Truth>,
}

fn read_json(path: &Path) -> Result<serde_json::Value, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|e| FileError::new(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| EvalError::record(path, e.line(), "(document)", format!("not JSON: {e}")))
}

fn strings(
    path: &Path,
    field: &str,
    v: Option<&serde_json::Value>,
) -> Result<Vec<String>, EvalError> {
    v.and_then(|v| v.as_array())
        .and_then(|a| a.iter().map(|w| w.as_str().map(str::to_string)).collect())
        .ok_or_else(|| EvalError::record(path, 0, field, "missing or not a list of strings"))
}

impl Amber {
    /// Reads `annotations.json`, `relation.json` and `safe_words.txt` from AMBER's `data/`.
    pub fn load(data: &Path) -> Result<Self, EvalError> {
        let rel_path = data.join("relation.json");
        let rel = read_json(&rel_path)?;
        let rel = rel.as_object().ok_or_else(|| {
            EvalError::record(&rel_path, 0, "(document)", "not an object of word lists")
        })?;
        let mut association = HashMap::new();
        let mut vocabulary = HashSet::new();
        for (word, assoc) in rel {
            let list = strings(&rel_path, word, Some(assoc))?;
            vocabulary.insert(word.clone());
            vocabulary.extend(list.iter().cloned());
            association.insert(word.clone(), list);
        }
        let safe_path = data.join("safe_words.txt");
        let safe_words = std::fs::read_to_string(&safe_path)
            .map_err(|e| FileError::new(&safe_path, e))?
            .lines()
            .map(str::to_string)
            .collect();
        let ann_path = data.join("annotations.json");
        let ann = read_json(&ann_path)?;
        let rows = ann.as_array().ok_or_else(|| {
            EvalError::record(
                &ann_path,
                0,
                "(document)",
                "not a JSON array of annotations",
            )
        })?;
        let mut truth = HashMap::new();
        for (i, row) in rows.iter().enumerate() {
            let at = |f: &str| format!("[{i}].{f}");
            let id = row.get("id").and_then(|v| v.as_u64()).ok_or_else(|| {
                EvalError::record(&ann_path, 0, &at("id"), "missing or not a positive integer")
            })?;
            let kind = row.get("type").and_then(|v| v.as_str()).ok_or_else(|| {
                EvalError::record(
                    &ann_path,
                    0,
                    &at("type"),
                    "missing (an AMBER annotation has id, type, truth; is this another benchmark's file?)",
                )
            })?;
            let t = if kind == "generative" {
                let truth_words = strings(&ann_path, &at("truth"), row.get("truth"))?;
                let hallu = strings(&ann_path, &at("hallu"), row.get("hallu"))?;
                for w in truth_words.iter().chain(&hallu) {
                    if !association.contains_key(w) {
                        return Err(EvalError::record(
                            &ann_path,
                            0,
                            &at("truth"),
                            format!("{w:?} is not an object of relation.json"),
                        ));
                    }
                }
                Truth::Generative {
                    truth: truth_words,
                    hallu,
                }
            } else if kind.starts_with("discriminative-") {
                let yes = match row.get("truth").and_then(|v| v.as_str()) {
                    Some("yes") => true,
                    Some("no") => false,
                    _ => {
                        return Err(EvalError::record(
                            &ann_path,
                            0,
                            &at("truth"),
                            "neither \"yes\" nor \"no\"",
                        ))
                    }
                };
                Truth::Discriminative {
                    kind: kind.to_string(),
                    yes,
                }
            } else {
                return Err(EvalError::record(
                    &ann_path,
                    0,
                    &at("type"),
                    format!("{kind:?} is neither generative nor discriminative-*"),
                ));
            };
            if truth.insert(id, t).is_some() {
                return Err(EvalError::record(
                    &ann_path,
                    0,
                    &at("id"),
                    format!("{id} appears twice"),
                ));
            }
        }
        Ok(Self {
            association,
            vocabulary,
            safe_words,
            truth,
        })
    }

    /// The annotation of `id`.
    pub fn truth(&self, id: u64) -> Option<&Truth> {
        self.truth.get(&id)
    }

    /// The AMBER object words a description mentions, in order, repeats kept (the official
    /// `after_process_nouns`, with misp's noun step: see the module comment).
    pub fn nouns(&self, text: &str) -> Vec<String> {
        word_tokenize(text)
            .into_iter()
            .filter(|t| !NOT_NOUNS.contains(&t.as_str()))
            .filter_map(|t| {
                if self.vocabulary.contains(&t) {
                    return Some(t);
                }
                // WordNet's lemmatiser leaves words it does not know (capitalised ones among
                // them) unchanged; singularise lower-case tokens only.
                if t.chars().any(|c| c.is_uppercase()) {
                    return None;
                }
                let s = singularize(&t);
                self.vocabulary.contains(&s).then_some(s)
            })
            .collect()
    }
}

/// One generative reply's counts, the official per-item tallies.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct GenerativeCounts {
    /// Object words that are not annotated as present (CHAIR's numerator).
    pub hallucinated: Vec<String>,
    /// Object words counted (safe words excluded are still counted, as the official does).
    pub mentioned: usize,
    /// Annotated objects covered / annotated.
    pub covered: usize,
    pub truth: usize,
    /// `hallu` objects mentioned / listed.
    pub hallu_mentioned: usize,
    pub hallu: usize,
}

/// The official coverage update: `list` holds, for the association part, the index of the
/// object each associated word belongs to, then one slot per object; a hit on position `j`
/// marks the object's slot.
fn mark(list: &mut [usize], j: usize, objects: usize) {
    let base = list.len() - objects;
    if j < base {
        let slot = list[j] + base;
        list[slot] = 1;
    } else {
        list[j] = 1;
    }
}

/// The official generative tallies of one reply against `truth` / `hallu`.
pub fn generative_counts(
    amber: &Amber,
    nouns: &[String],
    truth: &[String],
    hallu: &[String],
) -> GenerativeCounts {
    let assoc = |w: &String| amber.association.get(w).cloned().unwrap_or_default();
    let build = |objects: &[String]| {
        let mut words = Vec::new();
        let mut list = Vec::new();
        for (idx, w) in objects.iter().enumerate() {
            let a = assoc(w);
            list.extend(std::iter::repeat_n(idx, a.len()));
            words.extend(a);
        }
        words.extend(objects.iter().cloned());
        list.extend(std::iter::repeat_n(0, objects.len()));
        (words, list)
    };
    let (safe_words, mut safe_list) = build(truth);
    let (ha_words, mut ha_list) = build(hallu);
    let mut hallucinated = Vec::new();
    for noun in nouns {
        if amber.safe_words.contains(noun) {
            continue;
        }
        if let Some(j) = safe_words.iter().position(|w| w == noun) {
            mark(&mut safe_list, j, truth.len());
            continue;
        }
        if let Some(j) = ha_words.iter().position(|w| w == noun) {
            mark(&mut ha_list, j, hallu.len());
        }
        hallucinated.push(noun.clone());
    }
    let tail = |l: &[usize], n: usize| l[l.len() - n..].iter().sum::<usize>();
    GenerativeCounts {
        hallucinated,
        mentioned: nouns.len(),
        covered: tail(&safe_list, truth.len()),
        truth: truth.len(),
        hallu_mentioned: tail(&ha_list, hallu.len()),
        hallu: hallu.len(),
    }
}

/// One line of `answers.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AmberAnswer {
    pub id: u64,
    /// The raw reply.
    pub answer: String,
    /// Discriminative: the extracted yes / no / unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pred: Option<YesNo>,
    /// Generative: the AMBER object words found, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nouns: Option<Vec<String>>,
    /// Generative: the ones counted as hallucinated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hallucinated: Option<Vec<String>>,
}

/// Generative metrics, fractions in [0, 1] (`official` holds what `inference.py` prints).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerativeMetrics {
    pub chair: f64,
    pub cover: f64,
    pub hal: f64,
    pub cog: f64,
    pub n: usize,
    pub mentioned: usize,
    pub hallucinated: usize,
    pub covered: usize,
    pub truth: usize,
    pub hallu_mentioned: usize,
    pub hallu: usize,
    pub replies_with_hallucination: usize,
    pub official: BTreeMap<String, f64>,
}

/// Yes/no metrics of one dimension, "no" the positive class as in AMBER.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiscriminativeMetrics {
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub n: usize,
    pub correct: usize,
    /// Questions whose answer is "no".
    pub truth_no: usize,
    /// Of those, answered "no".
    pub truth_no_answered_no: usize,
    /// Replies extracted as "no".
    pub answered_no: usize,
    pub unknown: usize,
    pub official: BTreeMap<String, f64>,
}

/// Python's `round(x, 1)` for the official prints: both round the exact binary value to one
/// decimal, ties to even, as Rust's `{:.1}` formatting does.
fn round1(x: f64) -> f64 {
    format!("{x:.1}").parse().unwrap_or(x)
}

/// The official counters start their denominators at 0.001 (`data/metrics.txt`); `start` is
/// that start (0.003 for attribute, which sums the state, number and action counters).
fn official_ratio_from(score: usize, num: usize, start: f64) -> f64 {
    score as f64 / (num as f64 + start)
}

fn official_ratio(score: usize, num: usize) -> f64 {
    official_ratio_from(score, num, 0.001)
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Discriminative metrics of `(yes truth, pred)` pairs. For the official prints: `f1_eps` is
/// the F1's denominator term (0.0001, or 0.001 for existence), `start` the counters' start
/// (0.001, or 0.003 for attribute's three summed counters).
pub fn discriminative_metrics(
    items: &[(bool, YesNo)],
    f1_eps: f64,
    start: f64,
) -> DiscriminativeMetrics {
    let n = items.len();
    let correct = items
        .iter()
        .filter(|(t, p)| p.as_bool() == Some(*t))
        .count();
    let truth_no = items.iter().filter(|(t, _)| !t).count();
    let truth_no_answered_no = items.iter().filter(|(t, p)| !t && *p == YesNo::No).count();
    let answered_no = items.iter().filter(|(_, p)| *p == YesNo::No).count();
    let unknown = items.iter().filter(|(_, p)| *p == YesNo::Unknown).count();
    let precision = ratio(truth_no_answered_no, answered_no);
    let recall = ratio(truth_no_answered_no, truth_no);
    let f1 = if precision + recall == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    };
    let acc_o = round1(official_ratio_from(correct, n, start) * 100.0);
    let p_o = round1(official_ratio_from(truth_no_answered_no, answered_no, start) * 100.0);
    let r_o = round1(official_ratio_from(truth_no_answered_no, truth_no, start) * 100.0);
    let f1_o = round1(
        2.0 * (p_o / 100.0) * (r_o / 100.0) / ((p_o / 100.0) + (r_o / 100.0) + f1_eps) * 100.0,
    );
    let official = BTreeMap::from([
        ("Accuracy".to_string(), acc_o),
        ("Precision".to_string(), p_o),
        ("Recall".to_string(), r_o),
        ("F1".to_string(), f1_o),
    ]);
    DiscriminativeMetrics {
        accuracy: ratio(correct, n),
        precision,
        recall,
        f1,
        n,
        correct,
        truth_no,
        truth_no_answered_no,
        answered_no,
        unknown,
        official,
    }
}

/// Scores answers (the `pred` / `nouns` of a stored answer are not trusted: every reply is
/// re-extracted). Answers whose id has no annotation are an error.
pub fn score(
    amber: &Amber,
    answers: &[AmberAnswer],
) -> Result<(BTreeMap<String, serde_json::Value>, Vec<AmberAnswer>), EvalError> {
    if answers.is_empty() {
        return Err(EvalError::Input("no answers to score".into()));
    }
    let mut rescored = Vec::with_capacity(answers.len());
    let mut gen: Vec<GenerativeCounts> = Vec::new();
    let mut disc: BTreeMap<&str, Vec<(bool, YesNo)>> = BTreeMap::new();
    for a in answers {
        let truth = amber.truth(a.id).ok_or_else(|| {
            EvalError::Input(format!(
                "answer for id {}: no such id in annotations.json",
                a.id
            ))
        })?;
        match truth {
            Truth::Generative { truth, hallu } => {
                let nouns = amber.nouns(&a.answer);
                let c = generative_counts(amber, &nouns, truth, hallu);
                rescored.push(AmberAnswer {
                    id: a.id,
                    answer: a.answer.clone(),
                    pred: None,
                    nouns: Some(nouns),
                    hallucinated: Some(c.hallucinated.clone()),
                });
                gen.push(c);
            }
            Truth::Discriminative { kind, yes } => {
                let pred = yes_no(&a.answer);
                let dim = match kind.as_str() {
                    "discriminative-hallucination" => "existence",
                    "discriminative-attribute-state" => "state",
                    "discriminative-attribute-number" => "number",
                    "discriminative-attribute-action" => "action",
                    _ => "relation",
                };
                disc.entry(dim).or_default().push((*yes, pred));
                rescored.push(AmberAnswer {
                    id: a.id,
                    answer: a.answer.clone(),
                    pred: Some(pred),
                    nouns: None,
                    hallucinated: None,
                });
            }
        }
    }
    let mut out = BTreeMap::new();
    if !gen.is_empty() {
        let sum = |f: fn(&GenerativeCounts) -> usize| gen.iter().map(f).sum::<usize>();
        let (hallucinated, mentioned) = (sum(|c| c.hallucinated.len()), sum(|c| c.mentioned));
        let (covered, truth) = (sum(|c| c.covered), sum(|c| c.truth));
        let (hallu_mentioned, hallu) = (sum(|c| c.hallu_mentioned), sum(|c| c.hallu));
        let with_h = gen.iter().filter(|c| !c.hallucinated.is_empty()).count();
        let n = gen.len();
        let official = BTreeMap::from([
            (
                "CHAIR".to_string(),
                round1(official_ratio(hallucinated, mentioned) * 100.0),
            ),
            (
                "Cover".to_string(),
                round1(official_ratio(covered, truth) * 100.0),
            ),
            (
                "Hal".to_string(),
                round1(100.0 - official_ratio(n - with_h, n) * 100.0),
            ),
            (
                "Cog".to_string(),
                round1(official_ratio(hallu_mentioned, hallu) * 100.0),
            ),
        ]);
        let m = GenerativeMetrics {
            chair: ratio(hallucinated, mentioned),
            cover: ratio(covered, truth),
            hal: ratio(with_h, n),
            cog: ratio(hallu_mentioned, hallu),
            n,
            mentioned,
            hallucinated,
            covered,
            truth,
            hallu_mentioned,
            hallu,
            replies_with_hallucination: with_h,
            official,
        };
        out.insert(
            "generative".to_string(),
            serde_json::to_value(m).unwrap_or_default(),
        );
    }
    if !disc.is_empty() {
        let pool = |dims: &[&str]| -> Vec<(bool, YesNo)> {
            dims.iter()
                .flat_map(|d| disc.get(d).cloned().unwrap_or_default())
                .collect()
        };
        // (section, dimensions pooled, the official F1 epsilon, the counters' start)
        let groups: [(&str, Vec<&str>, f64, f64); 7] = [
            (
                "discriminative",
                vec!["existence", "state", "number", "action", "relation"],
                0.0001,
                0.001,
            ),
            ("existence", vec!["existence"], 0.001, 0.001),
            (
                "attribute",
                vec!["state", "number", "action"],
                0.0001,
                0.003,
            ),
            ("state", vec!["state"], 0.0001, 0.001),
            ("number", vec!["number"], 0.0001, 0.001),
            ("action", vec!["action"], 0.0001, 0.001),
            ("relation", vec!["relation"], 0.0001, 0.001),
        ];
        for (name, dims, eps, start) in groups {
            let items = pool(&dims);
            if !items.is_empty() {
                let m = discriminative_metrics(&items, eps, start);
                out.insert(
                    name.to_string(),
                    serde_json::to_value(m).unwrap_or_default(),
                );
            }
        }
    }
    Ok((out, rescored))
}

/// One query of `query_*.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Query {
    pub id: u64,
    pub image: String,
    pub query: String,
}

/// Reads a query file (a JSON array of `{id, image, query}`).
pub fn read_queries(path: &Path) -> Result<Vec<Query>, EvalError> {
    let doc = read_json(path)?;
    let rows = doc
        .as_array()
        .ok_or_else(|| EvalError::record(path, 0, "(document)", "not a JSON array of queries"))?;
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let q: Query = serde_json::from_value(row.clone()).map_err(|e| {
            EvalError::record(
                path,
                0,
                &format!("[{i}]"),
                format!(
                    "{e} (an AMBER query has id, image, query; is this another benchmark's file?)"
                ),
            )
        })?;
        if !seen.insert(q.id) {
            return Err(EvalError::record(
                path,
                0,
                &format!("[{i}].id"),
                format!("{} appears twice", q.id),
            ));
        }
        out.push(q);
    }
    Ok(out)
}

/// Reads saved replies: misp's `answers.jsonl` (`{"id", "answer"}` per line) or the official
/// inference file (a JSON array of `{"id", "response"}`).
pub fn read_answers(path: &Path) -> Result<Vec<AmberAnswer>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|e| FileError::new(path, e))?;
    let rows: Vec<(usize, serde_json::Value)> = if text.trim_start().starts_with('[') {
        let doc: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            EvalError::record(path, e.line(), "(document)", format!("not JSON: {e}"))
        })?;
        doc.as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|v| (0, v))
            .collect()
    } else {
        read_lines(path)?
            .into_iter()
            .map(|(line, l)| {
                serde_json::from_str(&l)
                    .map(|v| (line, v))
                    .map_err(|e| EvalError::record(path, line, "(line)", format!("not JSON: {e}")))
            })
            .collect::<Result<_, _>>()?
    };
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(rows.len());
    for (line, row) in rows {
        let id = row.get("id").and_then(|v| v.as_u64()).ok_or_else(|| {
            EvalError::record(path, line, "id", "missing or not a positive integer")
        })?;
        let answer = match row.get("answer").or_else(|| row.get("response")) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Null) => String::new(),
            _ => {
                return Err(EvalError::record(path, line, "answer", "missing or not a string (misp writes `answer`, AMBER's inference files `response`)"))
            }
        };
        if !seen.insert(id) {
            return Err(EvalError::record(
                path,
                line,
                "id",
                format!("{id} appears twice"),
            ));
        }
        out.push(AmberAnswer {
            id,
            answer,
            pred: None,
            nouns: None,
            hallucinated: None,
        });
    }
    Ok(out)
}

/// A query left out, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AmberExcluded {
    pub id: u64,
    pub image: String,
    pub reason: String,
}

/// What [`run`] produced.
#[derive(Debug, Clone, Default)]
pub struct AmberRun {
    pub answers: Vec<AmberAnswer>,
    pub excluded: Vec<AmberExcluded>,
}

/// Asks every query whose image exists and whose id is annotated: descriptions through
/// `describe`, yes/no questions through `answer` (separate generators, so each can have its
/// own length limit).
pub fn run(
    amber: &Amber,
    queries: &[Query],
    images: &Images,
    batch: usize,
    describe: &mut GenerateFn<'_>,
    answer: &mut GenerateFn<'_>,
) -> Result<AmberRun, EvalError> {
    let mut excluded = Vec::new();
    let (mut gen_q, mut gen_items, mut disc_q, mut disc_items) = (vec![], vec![], vec![], vec![]);
    for q in queries {
        let path = match (amber.truth(q.id), images.resolve(&q.image)) {
            (None, _) => Err(format!("id {} has no annotation in annotations.json", q.id)),
            (_, Err(reason)) => Err(reason),
            (Some(t), Ok(p)) => Ok((t, p)),
        };
        match path {
            Ok((Truth::Generative { .. }, p)) => {
                gen_items.push((p, q.query.clone()));
                gen_q.push(q.id);
            }
            Ok((Truth::Discriminative { .. }, p)) => {
                disc_items.push((p, q.query.clone()));
                disc_q.push(q.id);
            }
            Err(reason) => excluded.push(AmberExcluded {
                id: q.id,
                image: q.image.clone(),
                reason,
            }),
        }
    }
    if !excluded.is_empty() {
        tracing::warn!(
            "{} of {} AMBER queries excluded (missing images or annotations; listed in excluded.json)",
            excluded.len(),
            queries.len()
        );
    }
    if gen_items.is_empty() && disc_items.is_empty() {
        return Err(EvalError::Input(format!(
            "none of the {} queries has its image under {}",
            queries.len(),
            images.dir().display()
        )));
    }
    let mut replies: HashMap<u64, String> = HashMap::new();
    if !gen_items.is_empty() {
        let texts = generate_all(&gen_items, batch, "amber (describe)", describe)?;
        replies.extend(gen_q.into_iter().zip(texts));
    }
    if !disc_items.is_empty() {
        let texts = generate_all(&disc_items, batch, "amber (yes/no)", answer)?;
        replies.extend(disc_q.into_iter().zip(texts));
    }
    let answers = queries
        .iter()
        .filter_map(|q| {
            replies.remove(&q.id).map(|answer| AmberAnswer {
                id: q.id,
                answer,
                pred: None,
                nouns: None,
                hallucinated: None,
            })
        })
        .collect();
    Ok(AmberRun { answers, excluded })
}

/// Writes `answers.jsonl` (with the extracted answer or the object words of every reply),
/// `metrics.json` and `excluded.json` into `out`, atomically; returns the metrics.
pub fn write_outputs(
    out: &Path,
    amber: &Amber,
    run: &AmberRun,
) -> Result<BTreeMap<String, serde_json::Value>, EvalError> {
    let (metrics, rescored) = score(amber, &run.answers)?;
    write_jsonl(&out.join("answers.jsonl"), &rescored)?;
    write_json_atomic(&out.join("metrics.json"), &metrics)?;
    let unknown: Vec<u64> = rescored
        .iter()
        .filter(|a| a.pred == Some(YesNo::Unknown))
        .map(|a| a.id)
        .collect();
    let excluded = serde_json::json!({
        "missing_images": run.excluded.len(),
        "excluded": run.excluded,
        "unknown_answers": unknown.len(),
        "unknown_answers_scored_wrong": unknown,
    });
    write_json_atomic(&out.join("excluded.json"), &excluded)?;
    Ok(metrics)
}

/// Where AMBER's files are under its `data/` folder, for messages and configs.
pub fn query_path(data: &Path, kind: Kind) -> PathBuf {
    data.join("query").join(kind.query_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amber() -> Amber {
        let association: HashMap<String, Vec<String>> = [
            ("dog", vec![]),
            ("person", vec!["man", "woman"]),
            ("man", vec!["person"]),
            ("woman", vec!["person"]),
            ("grass", vec!["ground"]),
            ("ground", vec![]),
            ("cat", vec![]),
            ("glass", vec![]),
            ("can", vec![]),
            ("sign", vec![]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
        .collect();
        let vocabulary = association
            .iter()
            .flat_map(|(k, v)| std::iter::once(k.clone()).chain(v.iter().cloned()))
            .collect();
        Amber {
            association,
            vocabulary,
            safe_words: ["sign".to_string()].into_iter().collect(),
            truth: HashMap::new(),
        }
    }

    #[test]
    fn nouns_are_amber_words_in_singular() {
        let a = amber();
        assert_eq!(
            a.nouns("Two dogs and a man can sit on the grass near glass. Dogs!"),
            ["dog", "man", "grass", "glass"]
        );
    }

    #[test]
    fn associated_words_cover_their_object_and_unannotated_ones_hallucinate() {
        let a = amber();
        let s = |v: &[&str]| v.iter().map(|w| w.to_string()).collect::<Vec<_>>();
        let nouns = s(&["man", "ground", "cat", "sign", "dog", "cat"]);
        let c = generative_counts(&a, &nouns, &s(&["person", "grass"]), &s(&["cat", "dog"]));
        // man -> person, ground -> grass: both covered; sign is a safe word; cat and dog are
        // hallucinations that the `hallu` list anticipated.
        assert_eq!(c.hallucinated, s(&["cat", "dog", "cat"]));
        assert_eq!(
            (c.covered, c.truth, c.hallu_mentioned, c.hallu),
            (2, 2, 2, 2)
        );
        assert_eq!(c.mentioned, 6);
    }

    #[test]
    fn official_rounding_is_half_to_even_on_the_double() {
        assert_eq!(round1(12.25), 12.2);
        assert_eq!(round1(12.35), 12.3); // 12.35 is 12.3499... as a double
        assert_eq!(round1(0.05), 0.1); // 0.05 is 0.05000...03
        assert_eq!(round1(66.66666), 66.7);
    }
}
