//! How much the base model hallucinates: POPE (all three splits) and CHAIR on a world split.
//!
//! Stage: world pretrain (the world's target: a base model that hallucinates, POPE-adversarial
//! F1 at least 5 points under POPE-random F1, or CHAIR_s >= 10%). Reads the world's `pope/*_{split}.jsonl`,
//! `chair/instances_{split}.json`, `chair/synonyms.txt`, `captions_prompt.txt` and images;
//! writes nothing. Generation is greedy, as the evaluation stage's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::PretrainError;
use crate::eval::chair::{self, Chair, ChairMetrics, GroundTruth};
use crate::eval::pope::{self, PopeMetrics};
use crate::eval::Images;
use crate::model::vlm::Vlm;

/// LLaVA-1.5's POPE prompt suffix.
pub const POPE_SUFFIX: &str = "\nAnswer the question using a single word or phrase.";

/// The base model's hallucination numbers on one split.
#[derive(Debug, Clone, Serialize)]
pub struct BaseEval {
    pub split: String,
    /// `random`, `popular`, `adversarial` -> metrics.
    pub pope: BTreeMap<String, PopeMetrics>,
    /// POPE-random F1 minus POPE-adversarial F1, in points (the first hallucination criterion).
    pub f1_gap_points: f64,
    /// `chair_s` is the share of captions naming an absent object (the second criterion).
    pub chair: ChairMetrics,
    /// A few captions, to read.
    pub sample_captions: Vec<(String, String)>,
    /// Whether either criterion holds.
    pub hallucinates: bool,
}

fn generator<'a>(
    vlm: &'a Vlm,
    max_new_tokens: usize,
) -> impl FnMut(&[(PathBuf, String)]) -> Result<Vec<String>, String> + 'a {
    move |items: &[(PathBuf, String)]| {
        let prepared = items
            .iter()
            .map(|(img, prompt)| vlm.prepare_prompt(img, prompt))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        vlm.generate_prepared(&prepared, max_new_tokens)
            .map_err(|e| e.to_string())
    }
}

/// POPE on `world/pope/{random,popular,adversarial}_{split}.jsonl` and CHAIR on
/// `world/chair/instances_{split}.json`.
pub fn evaluate(
    vlm: &Vlm,
    world: &Path,
    split: &str,
    batch: usize,
) -> Result<BaseEval, PretrainError> {
    let mut pope_metrics = BTreeMap::new();
    for kind in ["random", "popular", "adversarial"] {
        let path = world.join("pope").join(format!("{kind}_{split}.jsonl"));
        let questions = pope::read_questions(&path, Some(kind))?;
        let mut gen = generator(vlm, 6);
        let run = pope::run_pope(
            &questions,
            &Images::in_dir(world),
            POPE_SUFFIX,
            batch,
            &mut gen,
        )?;
        let m = pope::metrics(
            run.answers
                .iter()
                .map(|a| (a.label == "yes", a.pred == "yes")),
        );
        pope_metrics.insert(kind.to_string(), m);
    }
    let synonyms_path = world.join("chair").join("synonyms.txt");
    let synonyms = std::fs::read_to_string(&synonyms_path)
        .map_err(|e| crate::files::FileError::new(&synonyms_path, e))?;
    let table = Chair::new(&synonyms)?;
    let gt = GroundTruth::from_coco_instances(
        &world.join("chair").join(format!("instances_{split}.json")),
        &table,
    )?;
    let prompt_path = world.join("captions_prompt.txt");
    let prompt = std::fs::read_to_string(&prompt_path)
        .map_err(|e| crate::files::FileError::new(&prompt_path, e))?;
    let mut gen = generator(vlm, 64);
    let run = chair::run_chair(&gt, &Images::in_dir(world), prompt.trim(), batch, &mut gen)?;
    let (chair_metrics, _) = chair::score(&table, &gt, &run.captions)?;
    let f1 = |k: &str| pope_metrics.get(k).map_or(0.0, |m: &PopeMetrics| m.f1);
    let gap = 100.0 * (f1("random") - f1("adversarial"));
    Ok(BaseEval {
        split: split.to_string(),
        f1_gap_points: gap,
        hallucinates: gap >= 5.0 || chair_metrics.chair_s >= 0.10,
        pope: pope_metrics,
        chair: chair_metrics,
        sample_captions: run
            .captions
            .iter()
            .take(6)
            .map(|c| (c.image.clone(), c.caption.clone()))
            .collect(),
    })
}
