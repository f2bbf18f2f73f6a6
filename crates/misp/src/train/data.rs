//! The training set: preference records joined with their negatives, tokenised once, images
//! checked once, and the pixels of every sequence a record contributes.
//!
//! Stage: train. Reads the records (any format `data::read_records` takes), the negatives
//! file of `misp mine`, and the pool's `ids.jsonl` (negative ids -> image paths). Writes
//! nothing; what it skipped comes back in [`TrainSet::skipped`] for the run's report.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use super::config::{MissingNegatives, NegativeSource, TrainConfig};
use super::TrainError;
use crate::data::{ImageSource, PreferenceRecord, Skip};
use crate::files::{read_lines, record_seed};
use crate::mine::negatives::{self, RecordNegatives};
use crate::mine::synthetic::{crop_box, diffuse};
use crate::model::vlm::{PreparedImage, Vlm};

/// Purposes of [`record_seed`] draws made here (distinct from the miner's).
const SEED_CROP: u64 = 0x7c;
const SEED_NOISE: u64 = 0x7d;

/// One negative image of a record.
#[derive(Debug, Clone, PartialEq)]
pub enum NegativeImage {
    /// A pool image.
    Pool { id: String, path: PathBuf },
    /// A random resized crop of the positive (mDPO).
    Crop { seed: u64 },
    /// The positive under forward-diffusion noise (CHiP).
    Noise { seed: u64 },
}

impl NegativeImage {
    /// A stable description for the reference-cache key.
    pub fn key(&self) -> String {
        match self {
            Self::Pool { id, .. } => format!("pool:{id}"),
            Self::Crop { seed } => format!("crop:{seed}"),
            Self::Noise { seed } => format!("noise:{seed}"),
        }
    }
}

/// A record ready to train on.
#[derive(Debug, Clone)]
pub struct TrainItem {
    pub id: String,
    pub image: ImageSource,
    pub prompt_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
    /// At most `k` negatives, in the file's order.
    pub negatives: Vec<NegativeImage>,
    /// `ln q` of each negative when every one has a proposal probability; `None` means the
    /// record's negatives had no proposal behind them (similarity, synthetic), and the
    /// importance weights fall back to uniform `q`, i.e. the exact gradient.
    pub log_q: Option<Vec<f64>>,
}

/// The training set and what was left out, with reasons.
#[derive(Debug, Default)]
pub struct TrainSet {
    pub items: Vec<TrainItem>,
    pub skipped: Vec<Skip>,
    /// Records trained without any negative (text term only).
    pub without_negatives: usize,
    /// Negatives dropped because their image could not be read.
    pub unreadable_negatives: usize,
}

/// Joins `records` with their negatives for `cfg`, tokenising with `vlm`'s processor. An empty
/// `records` is an error that says why (the reader's skips); a set left empty by the joining
/// is returned as is, for the caller to write its skips before refusing it.
pub fn build(
    vlm: &Vlm,
    records: Vec<PreferenceRecord>,
    mut skipped: Vec<Skip>,
    negatives_file: Option<&Path>,
    pool: Option<&Path>,
    cfg: &TrainConfig,
) -> Result<TrainSet, TrainError> {
    // Said before anything else: with every record skipped, a negatives file would only be
    // blamed for matching none of them.
    if records.is_empty() {
        return Err(TrainError::Input(format!(
            "no usable records in the training data (listed in skipped.jsonl): {}",
            crate::data::describe_skips(&skipped, 3)
        )));
    }
    let negatives = match (cfg.uses_images(), cfg.negatives, negatives_file) {
        (true, NegativeSource::File, None) => {
            return Err(TrainError::Input(format!(
                "variant `{}` takes its negatives from a file: pass --negatives (from `misp mine`)",
                cfg.variant
            )))
        }
        (true, NegativeSource::File, Some(path)) => Some(read_negatives(path, &records, cfg)?),
        _ => None,
    };
    let pool_paths = match (&negatives, pool) {
        (Some(n), _) if n.values().all(|r| r.negatives.is_empty()) => HashMap::new(),
        (Some(_), None) => {
            return Err(TrainError::Input(
                "negatives from a file need --pool (the pool folder whose ids.jsonl maps negative ids to images)".into(),
            ))
        }
        (Some(_), Some(pool)) => read_pool_paths(pool)?,
        (None, _) => HashMap::new(),
    };
    let mut set = TrainSet::default();
    for rec in records {
        let source = format!("record {}", rec.id);
        let skip = |reason: String| Skip::new(source.clone(), Some(rec.id.clone()), reason);
        let encoded = vlm
            .scored_ids(&rec.prompt, &rec.chosen)
            .and_then(|(p, c)| Ok((p, c, vlm.scored_ids(&rec.prompt, &rec.rejected)?.1)));
        let (prompt_ids, chosen_ids, rejected_ids) = match encoded {
            Ok(x) => x,
            Err(e) => {
                skipped.push(skip(format!("cannot encode: {e}")));
                continue;
            }
        };
        let (negs, log_q) = if !cfg.uses_images() {
            (Vec::new(), None)
        } else {
            match cfg.negatives {
                NegativeSource::Crop => (
                    vec![NegativeImage::Crop {
                        seed: record_seed(cfg.seed, &rec.id, SEED_CROP),
                    }],
                    None,
                ),
                NegativeSource::Noise => (
                    vec![NegativeImage::Noise {
                        seed: record_seed(cfg.seed, &rec.id, SEED_NOISE),
                    }],
                    None,
                ),
                _ => {
                    let file = negatives.as_ref().and_then(|n| n.get(&rec.id));
                    resolve(file, &pool_paths, cfg.k, &rec.id)?
                }
            }
        };
        if cfg.uses_images() && negs.is_empty() {
            if cfg.missing_negatives == MissingNegatives::Skip {
                skipped.push(skip("no negatives".into()));
                continue;
            }
            set.without_negatives += 1;
        }
        set.items.push(TrainItem {
            id: rec.id,
            image: rec.image,
            prompt_ids,
            chosen_ids,
            rejected_ids,
            negatives: negs,
            log_q,
        });
    }
    // Images are checked once, in parallel: an unreadable positive drops the record, an
    // unreadable negative drops that negative (and its q, so the weights stay consistent).
    let checks: Vec<(bool, Vec<bool>)> = set
        .items
        .par_iter()
        .map(|item| {
            let pos = decode(vlm, &item.image).is_ok();
            let negs = item
                .negatives
                .iter()
                .map(|n| match n {
                    NegativeImage::Pool { path, .. } => vlm.decode_file(path).is_ok(),
                    _ => true,
                })
                .collect();
            (pos, negs)
        })
        .collect();
    let mut kept = Vec::with_capacity(set.items.len());
    for (mut item, (pos, negs)) in set.items.into_iter().zip(checks) {
        if !pos {
            let reason = match decode(vlm, &item.image) {
                Err(e) => format!("unreadable image: {e}"),
                Ok(_) => "unreadable image".into(),
            };
            skipped.push(Skip::new(
                format!("record {}", item.id),
                Some(item.id.clone()),
                reason,
            ));
            continue;
        }
        if negs.iter().any(|ok| !ok) {
            set.unreadable_negatives += negs.iter().filter(|ok| !**ok).count();
            let mut it = negs.iter();
            item.negatives.retain(|_| *it.next().unwrap_or(&true));
            if let Some(q) = &mut item.log_q {
                let mut it = negs.iter();
                q.retain(|_| *it.next().unwrap_or(&true));
            }
            if item.negatives.is_empty() {
                if cfg.missing_negatives == MissingNegatives::Skip {
                    skipped.push(Skip::new(
                        format!("record {}", item.id),
                        Some(item.id.clone()),
                        "no readable negatives",
                    ));
                    continue;
                }
                set.without_negatives += 1;
            }
        }
        kept.push(item);
    }
    set.items = kept;
    if cfg.max_records > 0 {
        set.items.truncate(cfg.max_records);
    }
    set.skipped = skipped;
    Ok(set)
}

/// Reads the negatives file and checks it belongs to these records and this variant.
fn read_negatives(
    path: &Path,
    records: &[PreferenceRecord],
    cfg: &TrainConfig,
) -> Result<HashMap<String, RecordNegatives>, TrainError> {
    let rows = negatives::read(path).map_err(|e| TrainError::Input(e.to_string()))?;
    let ids: HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
    let matching = rows.iter().filter(|r| ids.contains(r.id.as_str())).count();
    if matching == 0 && !rows.is_empty() {
        return Err(TrainError::Input(format!(
            "{}: none of its {} records is in the training data (a negatives file for other records?)",
            path.display(),
            rows.len()
        )));
    }
    if !cfg.expect_strategies.is_empty() {
        for r in &rows {
            for n in &r.negatives {
                if !cfg.expect_strategies.contains(&n.strategy) {
                    return Err(TrainError::Input(format!(
                        "{}: record {} has a `{}` negative, but variant `{}` expects {:?} (mined with another --strategy?)",
                        path.display(),
                        r.id,
                        n.strategy,
                        cfg.variant,
                        cfg.expect_strategies
                    )));
                }
            }
        }
    }
    Ok(rows.into_iter().map(|r| (r.id.clone(), r)).collect())
}

/// `POOL/ids.jsonl`: id -> image path (relative paths as written by `misp embed pool`, taken
/// relative to the current directory).
fn read_pool_paths(pool: &Path) -> Result<HashMap<String, PathBuf>, TrainError> {
    let path = pool.join("ids.jsonl");
    let mut out = HashMap::new();
    for (line, text) in read_lines(&path).map_err(|e| TrainError::Input(e.to_string()))? {
        if text.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| TrainError::Input(format!("{}:{line}: not JSON: {e}", path.display())))?;
        let (Some(id), Some(p)) = (v["id"].as_str(), v["path"].as_str()) else {
            return Err(TrainError::Input(format!(
                "{}:{line}: needs string fields `id` and `path`",
                path.display()
            )));
        };
        out.insert(id.to_owned(), PathBuf::from(p));
    }
    Ok(out)
}

/// The first `k` negatives of a record as images, with `ln q` when all have one.
fn resolve(
    file: Option<&RecordNegatives>,
    pool: &HashMap<String, PathBuf>,
    k: usize,
    record: &str,
) -> Result<(Vec<NegativeImage>, Option<Vec<f64>>), TrainError> {
    let Some(file) = file else {
        return Ok((Vec::new(), None));
    };
    let mut negs = Vec::new();
    let mut qs = Vec::new();
    for n in file.negatives.iter().take(k) {
        let img = match (n.strategy.as_str(), n.seed) {
            ("crop", Some(seed)) => NegativeImage::Crop { seed },
            ("noise", Some(seed)) => NegativeImage::Noise { seed },
            _ => {
                let path = pool.get(&n.image).ok_or_else(|| {
                    TrainError::Input(format!(
                        "record {record}: negative image `{}` is not in the pool's ids.jsonl (another pool?)",
                        n.image
                    ))
                })?;
                NegativeImage::Pool {
                    id: n.image.clone(),
                    path: path.clone(),
                }
            }
        };
        negs.push(img);
        qs.push(n.q.filter(|q| *q > 0.0 && q.is_finite()).map(f64::ln));
    }
    let log_q = qs
        .iter()
        .all(Option::is_some)
        .then(|| qs.into_iter().flatten().collect());
    Ok((negs, log_q))
}

fn decode(vlm: &Vlm, src: &ImageSource) -> Result<image::RgbImage, String> {
    match src {
        ImageSource::Path(p) => vlm
            .decode_file(p)
            .map_err(|e| format!("{}: {e}", p.display())),
        ImageSource::Bytes(b) => vlm.decode_bytes(b).map_err(|e| e.to_string()),
    }
}

/// A record's positive image and its negatives' images, in slot order.
pub type RecordPixels = (Arc<PreparedImage>, Vec<Arc<PreparedImage>>);

/// Preprocessed pixels of a record's positive and negatives, memoised: a record's images are
/// decoded once per run when they fit the memory budget.
pub struct PixelCache {
    budget_values: usize,
    used: Mutex<usize>,
    cache: Mutex<HashMap<String, Arc<PreparedImage>>>,
}

impl PixelCache {
    /// Keeps at most `budget_bytes` of pixels.
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            budget_values: budget_bytes / 4,
            used: Mutex::new(0),
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn get_or(
        &self,
        key: String,
        make: impl FnOnce() -> Result<PreparedImage, String>,
    ) -> Result<Arc<PreparedImage>, String> {
        if let Some(v) = self.cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
            return Ok(v);
        }
        let v = Arc::new(make()?);
        if let (Ok(mut used), Ok(mut cache)) = (self.used.lock(), self.cache.lock()) {
            if *used + v.pixels.len() <= self.budget_values {
                *used += v.pixels.len();
                cache.insert(key, v.clone());
            }
        }
        Ok(v)
    }

    /// `(positive, negatives)` pixels of `item`.
    pub fn pixels(&self, vlm: &Vlm, item: &TrainItem) -> Result<RecordPixels, String> {
        let what = |src: &ImageSource| match src {
            ImageSource::Path(p) => p.clone(),
            ImageSource::Bytes(_) => PathBuf::from(format!("record {}'s image", item.id)),
        };
        let prepare =
            |img: &image::RgbImage, path: &Path| vlm.image(img, path).map_err(|e| e.to_string());
        let pos = self.get_or(format!("{}#pos", item.id), || {
            prepare(&decode(vlm, &item.image)?, &what(&item.image))
        })?;
        let mut negs = Vec::with_capacity(item.negatives.len());
        for n in &item.negatives {
            let key = format!("{}#{}", item.id, n.key());
            let px = self.get_or(key, || match n {
                NegativeImage::Pool { path, .. } => {
                    let img = vlm
                        .decode_file(path)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    prepare(&img, path)
                }
                NegativeImage::Crop { seed } => {
                    let img = decode(vlm, &item.image)?;
                    let (w, h) = (img.width() as usize, img.height() as usize);
                    let (x, y, cw, ch) = crop_box(*seed, w, h);
                    let crop =
                        image::imageops::crop_imm(&img, x as u32, y as u32, cw as u32, ch as u32)
                            .to_image();
                    prepare(&crop, &what(&item.image))
                }
                // On the normalised values (Qwen2.5-VL: its patches, so the frame's two
                // temporal copies draw their own noise).
                NegativeImage::Noise { seed } => {
                    let mut px = (*pos).clone();
                    diffuse(&mut px.pixels, *seed);
                    Ok(px)
                }
            })?;
            negs.push(px);
        }
        Ok((pos, negs))
    }
}
