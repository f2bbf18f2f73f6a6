//! CHAIR (Rohrbach et al., 2018): how many of the objects a caption mentions are not in the
//! image. Reads generated captions and per-image ground-truth objects (COCO
//! `instances_*.json`, or any object sets such as ShapesWorld scene graphs), writes
//! `captions.jsonl` (one audit row per caption: the objects it mentions and which are
//! hallucinated) and `metrics.json` (`{"chair": {"chair_s", "chair_i", "recall", ...}}`).
//!
//! Word-to-object mapping follows the reference `utils/chair.py` (LisaAnne/Hallucination):
//! lower-case, NLTK tokenisation, pattern singularisation, its two-word table, the
//! "toilet seat is not a chair" rule, then the synonym table (shipped as
//! `data/coco_synonyms.txt`, verbatim, including its double spaces, which make
//! `motor bike` and `cheesecake` unreachable exactly as in the reference). Recall is the
//! definition later CHAIR scripts added (Maxlinn's standalone CHAIR, used by OPERA and
//! RLAIF-V): ground-truth objects a caption mentions / ground-truth objects, pooled.
//! Ground truth comes from instance annotations only (the reference also adds objects named in
//! COCO's reference captions; `misp` evaluates on images that may have none).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::words::{singularize, word_tokenize};
use super::{generate_all, EvalError, GenerateFn, Images};
use crate::files::{read_lines, write_json_atomic, write_jsonl, FileError};

/// The COCO synonym table of the CHAIR reference: one object per line, its name first, then
/// synonyms, separated by `", "`.
pub const COCO_SYNONYMS: &str = include_str!("../../data/coco_synonyms.txt");

/// The default captioning prompt (the one CHAIR evaluations of LLaVA commonly use).
pub const DEFAULT_CHAIR_PROMPT: &str = "Please describe this image in detail.";

/// Two-word names the reference treats as one word, and what they become.
const DOUBLE_WORDS: &[&str] = &[
    "motor bike",
    "motor cycle",
    "air plane",
    "traffic light",
    "street light",
    "traffic signal",
    "stop light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "suit case",
    "sports ball",
    "baseball bat",
    "baseball glove",
    "tennis racket",
    "wine glass",
    "hot dog",
    "cell phone",
    "mobile phone",
    "teddy bear",
    "hair drier",
    "potted plant",
    "bow tie",
    "laptop computer",
    "stove top oven",
    "home plate",
    "train track",
];
/// "baby bird" is a bird, not a person.
const ANIMAL_WORDS: &[&str] = &[
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
    "animal", "cub",
];
/// "passenger jet" is a jet, not a person.
const VEHICLE_WORDS: &[&str] = &["jet", "train"];

/// Words -> objects: the synonym table plus the reference's two-word rules.
#[derive(Debug, Clone)]
pub struct Chair {
    /// Synonym -> object name (the first word of its line; a later line wins, as in the
    /// reference's dict).
    to_object: HashMap<String, String>,
    double_words: HashMap<String, String>,
}

/// The objects one caption mentions.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CaptionObjects {
    /// The caption's words after tokenising, singularising and merging two-word names.
    pub words: Vec<String>,
    /// `(word as written after merging, object)` for every object mention, in order.
    pub mentions: Vec<(String, String)>,
}

impl Chair {
    /// From a synonym table in the reference's format. Each line is stripped and split on
    /// `", "` exactly (so a double space leaves a leading space in an entry, as in Python).
    pub fn new(synonyms: &str) -> Result<Self, EvalError> {
        let mut to_object = HashMap::new();
        for (i, line) in synonyms.lines().enumerate() {
            let line = line.trim();
            let entries: Vec<&str> = line.split(", ").collect();
            if line.is_empty() {
                return Err(EvalError::Input(format!(
                    "synonym table line {}: empty",
                    i + 1
                )));
            }
            for e in &entries {
                to_object.insert(e.to_string(), entries[0].to_string());
            }
        }
        let mut double_words: HashMap<String, String> = DOUBLE_WORDS
            .iter()
            .map(|w| (w.to_string(), w.to_string()))
            .collect();
        for a in ANIMAL_WORDS {
            double_words.insert(format!("baby {a}"), a.to_string());
            double_words.insert(format!("adult {a}"), a.to_string());
        }
        for v in VEHICLE_WORDS {
            double_words.insert(format!("passenger {v}"), v.to_string());
        }
        double_words.insert("bow tie".into(), "tie".into());
        double_words.insert("toilet seat".into(), "toilet".into());
        double_words.insert("wine glas".into(), "wine glass".into());
        Ok(Chair {
            to_object,
            double_words,
        })
    }

    /// With the shipped COCO table.
    pub fn coco() -> Self {
        Chair::new(COCO_SYNONYMS).unwrap_or_else(|_| unreachable!("the shipped table parses"))
    }

    /// The object a (singular) word or two-word name stands for, if any.
    pub fn object_of(&self, word: &str) -> Option<&str> {
        self.to_object.get(word).map(String::as_str)
    }

    /// The reference's `caption_to_words`.
    pub fn caption_objects(&self, caption: &str) -> CaptionObjects {
        let tokens: Vec<String> = word_tokenize(&caption.to_lowercase())
            .iter()
            .map(|t| singularize(t))
            .collect();
        let mut words = Vec::with_capacity(tokens.len());
        let mut i = 0;
        while i < tokens.len() {
            if i + 1 < tokens.len() {
                let pair = format!("{} {}", tokens[i], tokens[i + 1]);
                if let Some(merged) = self.double_words.get(&pair) {
                    words.push(merged.clone());
                    i += 2;
                    continue;
                }
            }
            words.push(tokens[i].clone());
            i += 1;
        }
        let drop_seat = words.iter().any(|w| w == "toilet") && words.iter().any(|w| w == "seat");
        let mentions = words
            .iter()
            .filter(|w| !(drop_seat && *w == "seat"))
            .filter_map(|w| self.object_of(w).map(|o| (w.clone(), o.to_string())))
            .collect();
        CaptionObjects { words, mentions }
    }
}

/// Ground-truth objects per image, keyed by image file name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroundTruth {
    pub objects: BTreeMap<String, BTreeSet<String>>,
}

#[derive(Deserialize)]
struct CocoImage {
    id: i64,
    file_name: String,
}
#[derive(Deserialize)]
struct CocoAnnotation {
    image_id: i64,
    category_id: i64,
}
#[derive(Deserialize)]
struct CocoCategory {
    id: i64,
    name: String,
}
#[derive(Deserialize)]
struct CocoInstances {
    images: Vec<CocoImage>,
    annotations: Vec<CocoAnnotation>,
    categories: Vec<CocoCategory>,
}

impl GroundTruth {
    /// From a COCO instances file (`images`, `annotations`, `categories`). Every category must
    /// name an object of the synonym table and every annotation an image and category of the
    /// file; images without annotations have no objects.
    pub fn from_coco_instances(path: &Path, chair: &Chair) -> Result<Self, EvalError> {
        let text = std::fs::read_to_string(path).map_err(|e| FileError::new(path, e))?;
        let coco: CocoInstances = serde_json::from_str(&text).map_err(|e| {
            EvalError::record(
                path,
                e.line(),
                "(document)",
                format!("not a COCO instances file: {e}"),
            )
        })?;
        let mut categories = HashMap::new();
        for c in &coco.categories {
            let object = chair.object_of(&c.name).ok_or_else(|| {
                EvalError::record(
                    path,
                    0,
                    "categories.name",
                    format!("category {} {:?} is not in the synonym table", c.id, c.name),
                )
            })?;
            categories.insert(c.id, object.to_string());
        }
        let mut names = HashMap::new();
        let mut gt = GroundTruth::default();
        for im in &coco.images {
            names.insert(im.id, im.file_name.clone());
            gt.objects.entry(im.file_name.clone()).or_default();
        }
        for (k, a) in coco.annotations.iter().enumerate() {
            let name = names.get(&a.image_id).ok_or_else(|| {
                EvalError::record(
                    path,
                    0,
                    &format!("annotations[{k}].image_id"),
                    format!("image {} is not in `images`", a.image_id),
                )
            })?;
            let object = categories.get(&a.category_id).ok_or_else(|| {
                EvalError::record(
                    path,
                    0,
                    &format!("annotations[{k}].category_id"),
                    format!("category {} is not in `categories`", a.category_id),
                )
            })?;
            gt.objects
                .entry(name.clone())
                .or_default()
                .insert(object.clone());
        }
        Ok(gt)
    }

    /// From object names per image (e.g. ShapesWorld scene graphs); names are mapped through
    /// the synonym table when they are in it and kept as they are otherwise.
    pub fn from_objects<I, S>(chair: &Chair, images: I) -> Self
    where
        I: IntoIterator<Item = (String, Vec<S>)>,
        S: AsRef<str>,
    {
        let objects = images
            .into_iter()
            .map(|(image, objs)| {
                let set = objs
                    .iter()
                    .map(|o| {
                        chair
                            .object_of(o.as_ref())
                            .unwrap_or(o.as_ref())
                            .to_string()
                    })
                    .collect();
                (image, set)
            })
            .collect();
        GroundTruth { objects }
    }
}

/// A generated caption for one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Caption {
    pub image: String,
    pub caption: String,
}

/// One audit row of `captions.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChairRow {
    pub image: String,
    pub caption: String,
    /// `[word, object]` for every object mention.
    pub mentioned: Vec<(String, String)>,
    /// The mentions whose object is not in the image.
    pub hallucinated: Vec<(String, String)>,
    /// The image's ground-truth objects.
    pub ground_truth: Vec<String>,
    /// Hallucinated / mentioned for this caption (0 when it mentions nothing).
    pub chair_i: f64,
    /// Ground-truth objects mentioned / ground-truth objects (0 when the image has none).
    pub recall: f64,
}

/// Pooled CHAIR metrics, fractions in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ChairMetrics {
    /// Captions with a hallucinated object / captions.
    pub chair_s: f64,
    /// Hallucinated object mentions / object mentions.
    pub chair_i: f64,
    /// Ground-truth objects mentioned / ground-truth objects, summed over captions.
    pub recall: f64,
    pub n: usize,
    pub mentions: usize,
    pub hallucinated_mentions: usize,
    pub hallucinated_captions: usize,
}

/// Scores captions against ground truth. A caption whose image has no ground truth is an
/// error listing such images (an annotation file for other images must not shrink the
/// denominator silently).
pub fn score(
    chair: &Chair,
    gt: &GroundTruth,
    captions: &[Caption],
) -> Result<(ChairMetrics, Vec<ChairRow>), EvalError> {
    if captions.is_empty() {
        return Err(EvalError::Input("no captions to score".into()));
    }
    let unknown: Vec<&str> = captions
        .iter()
        .filter(|c| !gt.objects.contains_key(&c.image))
        .map(|c| c.image.as_str())
        .collect();
    if !unknown.is_empty() {
        let shown: Vec<&str> = unknown.iter().take(5).copied().collect();
        return Err(EvalError::Input(format!(
            "{} of {} captioned images have no entry in the annotations (is it the file for \
             these images?): {}{}",
            unknown.len(),
            captions.len(),
            shown.join(", "),
            if unknown.len() > 5 { ", ..." } else { "" }
        )));
    }
    let (mut mentions, mut hallucinated, mut bad_caps) = (0usize, 0usize, 0usize);
    let (mut gt_total, mut gt_found) = (0usize, 0usize);
    let mut rows = Vec::with_capacity(captions.len());
    for c in captions {
        let truth = &gt.objects[&c.image];
        let objs = chair.caption_objects(&c.caption);
        let bad: Vec<(String, String)> = objs
            .mentions
            .iter()
            .filter(|(_, o)| !truth.contains(o))
            .cloned()
            .collect();
        let found: HashSet<&str> = objs
            .mentions
            .iter()
            .filter(|(_, o)| truth.contains(o))
            .map(|(_, o)| o.as_str())
            .collect();
        mentions += objs.mentions.len();
        hallucinated += bad.len();
        bad_caps += usize::from(!bad.is_empty());
        gt_total += truth.len();
        gt_found += found.len();
        let frac = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        rows.push(ChairRow {
            image: c.image.clone(),
            caption: c.caption.clone(),
            chair_i: frac(bad.len(), objs.mentions.len()),
            recall: frac(found.len(), truth.len()),
            mentioned: objs.mentions,
            hallucinated: bad,
            ground_truth: truth.iter().cloned().collect(),
        });
    }
    let frac = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let metrics = ChairMetrics {
        chair_s: frac(bad_caps, captions.len()),
        chair_i: frac(hallucinated, mentions),
        recall: frac(gt_found, gt_total),
        n: captions.len(),
        mentions,
        hallucinated_mentions: hallucinated,
        hallucinated_captions: bad_caps,
    };
    Ok((metrics, rows))
}

/// Reads captions: JSON Lines with `image` (file name) and `caption` (or `answer`, as audit
/// files of other tools name it). Duplicate images are an error; empty captions are kept (they
/// mention nothing) and counted by [`write_outputs`].
pub fn read_captions(path: &Path) -> Result<Vec<Caption>, EvalError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (line, text) in read_lines(path)? {
        let row: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| EvalError::record(path, line, "(line)", format!("not JSON: {e}")))?;
        let image = row
            .get("image")
            .and_then(|v| v.as_str())
            .ok_or_else(|| EvalError::record(path, line, "image", "missing or not a string"))?;
        let caption = row
            .get("caption")
            .or_else(|| row.get("answer"))
            .and_then(|v| v.as_str())
            .ok_or_else(|| EvalError::record(path, line, "caption", "missing or not a string"))?;
        if !seen.insert(image.to_string()) {
            return Err(EvalError::record(
                path,
                line,
                "image",
                format!("{image:?} appears twice"),
            ));
        }
        out.push(Caption {
            image: image.into(),
            caption: caption.into(),
        });
    }
    Ok(out)
}

/// What `run_chair` produced: captions, and images left out (with the reason).
#[derive(Debug, Clone, Default)]
pub struct ChairRun {
    pub captions: Vec<Caption>,
    pub excluded: Vec<(String, String)>,
}

/// Captions every image in `gt` (sorted by name) with `prompt`, `batch` at a time. Images that
/// are missing under `images` are left out, returned in [`ChairRun::excluded`] and logged.
pub fn run_chair(
    gt: &GroundTruth,
    images: &Images,
    prompt: &str,
    batch: usize,
    generate: &mut GenerateFn<'_>,
) -> Result<ChairRun, EvalError> {
    let mut names = Vec::new();
    let mut items: Vec<(PathBuf, String)> = Vec::new();
    let mut excluded = Vec::new();
    for name in gt.objects.keys() {
        match images.resolve(name) {
            Ok(p) => {
                items.push((p, prompt.to_string()));
                names.push(name.clone());
            }
            Err(reason) => excluded.push((name.clone(), reason)),
        }
    }
    if !excluded.is_empty() {
        tracing::warn!(
            "{} of {} CHAIR images excluded (missing; listed in excluded.json)",
            excluded.len(),
            gt.objects.len()
        );
    }
    if items.is_empty() {
        return Err(EvalError::Input(format!(
            "none of the {} annotated images is under {}",
            gt.objects.len(),
            images.dir().display()
        )));
    }
    let texts = generate_all(&items, batch, "chair", generate)?;
    let captions = names
        .into_iter()
        .zip(texts)
        .map(|(image, caption)| Caption { image, caption })
        .collect();
    Ok(ChairRun { captions, excluded })
}

/// Scores a run and writes `captions.jsonl` (audit rows), `metrics.json` and `excluded.json`
/// into `out`, atomically. Empty captions are scored (they mention nothing) and counted.
pub fn write_outputs(
    out: &Path,
    chair: &Chair,
    gt: &GroundTruth,
    run: &ChairRun,
) -> Result<ChairMetrics, EvalError> {
    let (metrics, rows) = score(chair, gt, &run.captions)?;
    write_jsonl(&out.join("captions.jsonl"), &rows)?;
    write_json_atomic(
        &out.join("metrics.json"),
        &serde_json::json!({ "chair": metrics }),
    )?;
    let empty: Vec<&str> = run
        .captions
        .iter()
        .filter(|c| c.caption.trim().is_empty())
        .map(|c| c.image.as_str())
        .collect();
    let excluded: Vec<_> = run
        .excluded
        .iter()
        .map(|(image, reason)| serde_json::json!({"image": image, "reason": reason}))
        .collect();
    if !empty.is_empty() {
        tracing::warn!(
            "{} empty captions (scored as mentioning nothing; listed in excluded.json)",
            empty.len()
        );
    }
    write_json_atomic(
        &out.join("excluded.json"),
        &serde_json::json!({
            "missing_images": excluded.len(),
            "excluded": excluded,
            "empty_captions": empty.len(),
            "empty_captions_scored": empty,
        }),
    )?;
    Ok(metrics)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synonyms_and_two_word_names_map_to_objects() {
        let chair = Chair::coco();
        let objs =
            chair.caption_objects("Two men eat hot dogs at a dining table near teddy bears.");
        let names: Vec<&str> = objs.mentions.iter().map(|(_, o)| o.as_str()).collect();
        assert_eq!(names, ["person", "hot dog", "dining table", "teddy bear"]);
        // The reference table has "scooter,  motor bike": the double space hides it.
        let objs = chair.caption_objects("a motor bike and a motorbike");
        assert_eq!(
            objs.mentions,
            [("motorbike".to_string(), "motorcycle".to_string())]
        );
        // Toilet seat is a toilet, and "seat" next to a toilet is not a chair.
        let objs = chair.caption_objects("the seat of the toilet");
        assert_eq!(
            objs.mentions,
            [("toilet".to_string(), "toilet".to_string())]
        );
        let objs = chair.caption_objects("a baby elephant");
        assert_eq!(
            objs.mentions,
            [("elephant".to_string(), "elephant".to_string())]
        );
    }

    #[test]
    fn metrics_by_hand() {
        let chair = Chair::coco();
        let gt = GroundTruth::from_objects(
            &chair,
            vec![
                ("a.jpg".to_string(), vec!["dog", "person"]),
                ("b.jpg".to_string(), vec!["cat"]),
            ],
        );
        let caps = vec![
            Caption {
                image: "a.jpg".into(),
                caption: "A man with a dog and a frisbee.".into(),
            },
            Caption {
                image: "b.jpg".into(),
                caption: "A cat.".into(),
            },
        ];
        let (m, rows) = score(&chair, &gt, &caps).unwrap();
        assert_eq!(
            (m.mentions, m.hallucinated_mentions, m.hallucinated_captions),
            (4, 1, 1)
        );
        assert_eq!((m.chair_i, m.chair_s, m.recall), (0.25, 0.5, 1.0));
        assert_eq!(
            rows[0].hallucinated,
            [("frisbee".to_string(), "frisbee".to_string())]
        );
        let other = vec![Caption {
            image: "z.jpg".into(),
            caption: "x".into(),
        }];
        let err = score(&chair, &gt, &other).unwrap_err().to_string();
        assert!(err.contains("z.jpg"), "{err}");
    }
}
