//! ShapesWorld (docs/design.md §6): the synthetic world that makes the whole pipeline runnable and
//! measurable on two CPU cores. `misp world generate` writes it; every later stage of the demo
//! (SFT of the tiny models, embed, mine, train, eval) reads it.
//!
//! Scenes of 1-4 coloured shapes on a 3x3 grid are drawn from a skewed co-occurrence prior in
//! which partners are often hard to see while the text still names them ([`scene`]), rendered
//! to small PNGs ([`render`]) and described in plain English ([`text`]). From them come the
//! supervised rows, preference records ([`records`]), POPE question files ([`pope`]) and CHAIR
//! annotations ([`chair`]).
//!
//! # Folder layout
//!
//! Every path inside a file is relative to the world folder `DIR`.
//!
//! | path | what |
//! |---|---|
//! | `manifest.json` | [`Manifest`]: format, version, seed, config, counts, content hash, `complete` |
//! | `images/{train,val,test,pool}/NNNNN.png` | the scenes, `image_size` square RGB |
//! | `scenes.jsonl` | every scene graph: `{id, split, image, objects: [{shape, colour, size, cell, visibility}]}` |
//! | `sft.jsonl` | train captions + QA: `{id, image, prompt, response, kind}` |
//! | `records.jsonl` | train preference records: `{id, image, prompt, chosen, rejected, kind, scene, claims}` |
//! | `records_val.jsonl` | the same on val scenes, for tuning |
//! | `pool.txt` | pool image paths, one a line (`misp embed pool --images DIR/pool.txt`) |
//! | `pope/{random,popular,adversarial}_{val,test}.jsonl` | POPE questions `{question_id, image, text, label}` |
//! | `chair/instances_{val,test}.json` | COCO-style instances for CHAIR |
//! | `chair/synonyms.txt` | CHAIR synonym table |
//! | `captions_prompt.txt` | the captioning prompt CHAIR evaluation uses |
//!
//! # Reuse and regeneration
//!
//! `manifest.json` is written twice: first with `complete: false` (this folder is a world being
//! written), last — atomically, after every other file — with `complete: true` and the hash of
//! every file's content. Generating into a folder whose manifest is complete, of this version,
//! seed and config, and whose files still hash to it, reuses it. A complete world of another
//! version, seed or config is an error naming the field, unless forced. An incomplete or
//! damaged world is regenerated. A non-empty folder without a manifest is refused unless
//! forced (it is somebody else's folder). Regenerating removes only the paths in the table.
//!
//! Output is byte-identical for a seed and config: every scene, text and record draws from its
//! own random stream ([`rng`]), so rayon's scheduling does not matter.

pub mod chair;
pub mod pope;
pub mod records;
pub mod render;
mod rng;
pub mod scene;
pub mod text;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::files::{self, record_seed, FileError};
pub use records::RecordMix;
use rng::Rng;
use scene::{Cooccurrence, Prior, Scene, Split};

/// Name in `manifest.json`'s `format`.
pub const FORMAT: &str = "misp-shapesworld";
/// Bumped whenever the same seed and config would give different files.
pub const VERSION: u32 = 1;

/// Everything that shapes a world. Missing fields take their defaults (serde), so a manifest
/// stays readable when a field is added with a default that keeps old output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorldConfig {
    pub seed: u64,
    /// Side of the square images, in pixels. 48 by default: with the shipped models' 16 px
    /// patches each grid cell is exactly one patch (one image token per object); at 64 px cells
    /// straddle patches and a tower this small never learned shapes (`bench/world_grounding/`).
    pub image_size: u32,
    /// Scenes for supervised fine-tuning (and preference records).
    pub train_scenes: usize,
    /// Scenes for tuning: POPE, CHAIR and `records_val.jsonl`.
    pub val_scenes: usize,
    /// Scenes for the reported POPE and CHAIR numbers.
    pub test_scenes: usize,
    /// Scenes of the negative-image pool (COCO's role).
    pub pool_images: usize,
    /// Preference records on train scenes (cycling through them).
    pub records: usize,
    /// Preference records on val scenes.
    pub val_records: usize,
    /// Questions per train scene in `sft.jsonl`, besides its caption.
    pub qa_per_scene: usize,
    /// POPE "yes" (and as many "no") questions per image, at most.
    pub pope_per_image: usize,
    pub min_objects: usize,
    pub max_objects: usize,
    /// P(partner | anchor) in train and pool scenes.
    pub cooccurrence: f64,
    /// P(partner | anchor) in val and test scenes: lower, so that POPE's adversarial questions
    /// meet scenes where the expected partner is really absent.
    pub eval_cooccurrence: f64,
    /// P(a partner brought by its anchor is faint, tiny or occluded). WORLD-NOTES 1: this
    /// visual ambiguity, not label noise, is what makes a model hallucinate.
    pub partner_hidden: f64,
    /// P(any other object is hidden), so that hidden does not simply mean "partner".
    pub other_hidden: f64,
    /// Opacity of faint objects.
    pub faint_alpha: f64,
    /// Background pixel noise amplitude (0-255 scale).
    pub noise: f64,
    pub mix: RecordMix,
}

impl Default for WorldConfig {
    fn default() -> Self {
        WorldConfig {
            seed: 0,
            image_size: 48,
            train_scenes: 2000,
            val_scenes: 150,
            test_scenes: 300,
            pool_images: 1000,
            records: 600,
            val_records: 100,
            qa_per_scene: 3,
            pope_per_image: 3,
            min_objects: 1,
            max_objects: 4,
            cooccurrence: 0.9,
            eval_cooccurrence: 0.5,
            partner_hidden: 0.7,
            other_hidden: 0.05,
            faint_alpha: 0.15,
            noise: 10.0,
            mix: RecordMix::default(),
        }
    }
}

impl WorldConfig {
    /// The `--quick` preset: the same world, fewer scenes, for `misp demo --quick`.
    pub fn quick() -> Self {
        WorldConfig {
            train_scenes: 800,
            val_scenes: 60,
            test_scenes: 150,
            pool_images: 400,
            records: 240,
            val_records: 40,
            ..WorldConfig::default()
        }
    }

    /// Rejects configurations that cannot produce a sensible world.
    pub fn validate(&self) -> Result<(), WorldError> {
        let bad = |message: String| Err(WorldError::Config(message));
        if !(16..=1024).contains(&self.image_size) {
            return bad(format!(
                "image_size {} is not in 16..=1024",
                self.image_size
            ));
        }
        if self.min_objects == 0 || self.min_objects > self.max_objects || self.max_objects > 9 {
            return bad(format!(
                "objects per scene {}..={}: need 1 <= min_objects <= max_objects <= 9 (a 3x3 grid)",
                self.min_objects, self.max_objects
            ));
        }
        for (name, p) in [
            ("cooccurrence", self.cooccurrence),
            ("eval_cooccurrence", self.eval_cooccurrence),
            ("partner_hidden", self.partner_hidden),
            ("other_hidden", self.other_hidden),
            ("faint_alpha", self.faint_alpha),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(format!("{name} = {p} is not a probability in [0, 1]"));
            }
        }
        if !(0.0..=255.0).contains(&self.noise) {
            return bad(format!("noise = {} is not in [0, 255]", self.noise));
        }
        let m = &self.mix;
        let shares = [m.description, m.exists_yes, m.exists_no, m.attribute];
        if shares.iter().any(|s| !(s.is_finite() && *s >= 0.0)) || shares.iter().sum::<f64>() <= 0.0
        {
            return bad("mix: shares must be non-negative and not all zero".into());
        }
        if self.records > 0 && self.train_scenes == 0 {
            return bad("records need train scenes (train_scenes is 0)".into());
        }
        if self.val_records > 0 && self.val_scenes == 0 {
            return bad("val_records need val scenes (val_scenes is 0)".into());
        }
        Ok(())
    }

    fn scenes(&self, split: Split) -> usize {
        match split {
            Split::Train => self.train_scenes,
            Split::Val => self.val_scenes,
            Split::Test => self.test_scenes,
            Split::Pool => self.pool_images,
        }
    }
}

/// What a generated world holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// Scenes per split (`train`, `val`, `test`, `pool`).
    pub scenes: BTreeMap<String, usize>,
    pub sft_rows: usize,
    pub records: usize,
    pub val_records: usize,
    /// Questions per POPE file (`adversarial_test`, ...).
    pub pope_questions: BTreeMap<String, usize>,
    /// Objects annotated per CHAIR split.
    pub chair_objects: BTreeMap<String, usize>,
    /// Objects drawn faint, tiny or occluded, over all splits.
    pub hidden_objects: usize,
    pub objects: usize,
    /// Observed P(partner | anchor) over the train scenes, pooled over the pairs.
    pub train_partner_rate: f64,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub seed: u64,
    pub config: WorldConfig,
    pub counts: Option<Counts>,
    /// FNV-1a over every file's relative path and content, sorted by path, in hex.
    pub content_hash: String,
    /// Written `true` last; `false` while the world is being written.
    pub complete: bool,
}

/// What [`generate`] did.
#[derive(Debug, Clone)]
pub struct Generated {
    pub manifest: Manifest,
    /// A complete, matching world was already there and was kept.
    pub reused: bool,
    /// An incomplete or damaged world was there and was written again.
    pub regenerated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("invalid world config: {0}")]
    Config(String),
    /// A complete world of another version, seed or config is in the folder.
    #[error(
        "{path}: this folder holds another world ({field} is {found}, this run asks for \
         {wanted}); pass --force to regenerate it, or choose another --out"
    )]
    Mismatch {
        path: PathBuf,
        field: String,
        found: String,
        wanted: String,
    },
    #[error("{path}: not empty and not a ShapesWorld (no manifest.json); pass --force to write into it, or choose another --out")]
    NotAWorld { path: PathBuf },
    #[error("{path}: unreadable manifest: {message}; pass --force to regenerate")]
    BadManifest { path: PathBuf, message: String },
    #[error("{path}: cannot encode image: {message}")]
    Image { path: PathBuf, message: String },
}

/// The paths a world consists of (relative to its folder); regeneration removes only these.
const OUTPUTS: [&str; 10] = [
    "images",
    "pope",
    "chair",
    "scenes.jsonl",
    "sft.jsonl",
    "records.jsonl",
    "records_val.jsonl",
    "pool.txt",
    "captions_prompt.txt",
    "manifest.json",
];

const PURPOSE_SCENE: u64 = 1;
const PURPOSE_RENDER: u64 = 2;
const PURPOSE_SFT: u64 = 3;
const PURPOSE_RECORD: u64 = 4;

/// Writes the world of `cfg` into `out`, or reuses the one there (see the module doc for
/// when). `force` regenerates over a world of another version, seed or config, or into a
/// folder that is not a world.
pub fn generate(cfg: &WorldConfig, out: &Path, force: bool) -> Result<Generated, WorldError> {
    cfg.validate()?;
    let manifest_path = out.join("manifest.json");
    let mut regenerated = false;
    match read_manifest(&manifest_path) {
        Ok(Some(old)) => {
            if old.complete && !force {
                if let Some((field, found, wanted)) = mismatch(&old, cfg) {
                    return Err(WorldError::Mismatch {
                        path: manifest_path,
                        field,
                        found,
                        wanted,
                    });
                }
                if content_hash(out)? == old.content_hash {
                    return Ok(Generated {
                        manifest: old,
                        reused: true,
                        regenerated: false,
                    });
                }
            }
            regenerated = !old.complete || mismatch(&old, cfg).is_none();
            remove_outputs(out)?;
        }
        Ok(None) => {
            let non_empty = fs::read_dir(out)
                .map(|mut d| d.next().is_some())
                .unwrap_or(false);
            if non_empty && !force {
                return Err(WorldError::NotAWorld {
                    path: out.to_path_buf(),
                });
            }
            remove_outputs(out)?;
        }
        Err(e) if force => {
            tracing::warn!("{e}; regenerating");
            remove_outputs(out)?;
        }
        Err(e) => return Err(e),
    }

    let mut manifest = Manifest {
        format: FORMAT.to_owned(),
        version: VERSION,
        seed: cfg.seed,
        config: cfg.clone(),
        counts: None,
        content_hash: String::new(),
        complete: false,
    };
    files::write_json_atomic(&manifest_path, &manifest)?;
    let counts = write_world(cfg, out)?;
    manifest.counts = Some(counts);
    manifest.content_hash = content_hash(out)?;
    manifest.complete = true;
    files::write_json_atomic(&manifest_path, &manifest)?;
    Ok(Generated {
        manifest,
        reused: false,
        regenerated,
    })
}

/// `Ok(None)` when there is no manifest.
fn read_manifest(path: &Path) -> Result<Option<Manifest>, WorldError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(FileError::new(path, e).into()),
    };
    let bad = |message: String| WorldError::BadManifest {
        path: path.to_path_buf(),
        message,
    };
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
        return Err(bad(format!("`format` is not {FORMAT:?}")));
    }
    // A world of another version may not parse as this version's config; say which version.
    let version = value.get("version").and_then(|v| v.as_u64());
    if version != Some(u64::from(VERSION)) {
        return Err(WorldError::Mismatch {
            path: path.to_path_buf(),
            field: "version".into(),
            found: version.map_or("missing".into(), |v| v.to_string()),
            wanted: VERSION.to_string(),
        });
    }
    serde_json::from_value(value)
        .map(Some)
        .map_err(|e| bad(e.to_string()))
}

/// The first field (`seed`, `config.train_scenes`, ...) in which `old` differs from `cfg`.
fn mismatch(old: &Manifest, cfg: &WorldConfig) -> Option<(String, String, String)> {
    if old.seed != cfg.seed {
        return Some(("seed".into(), old.seed.to_string(), cfg.seed.to_string()));
    }
    let a = serde_json::to_value(&old.config).ok()?;
    let b = serde_json::to_value(cfg).ok()?;
    first_difference("config", &a, &b)
}

fn first_difference(
    at: &str,
    a: &serde_json::Value,
    b: &serde_json::Value,
) -> Option<(String, String, String)> {
    match (a, b) {
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| {
                let null = serde_json::Value::Null;
                first_difference(
                    &format!("{at}.{k}"),
                    x.get(k).unwrap_or(&null),
                    y.get(k).unwrap_or(&null),
                )
            })
        }
        _ if a != b => Some((at.to_owned(), a.to_string(), b.to_string())),
        _ => None,
    }
}

fn remove_outputs(out: &Path) -> Result<(), WorldError> {
    for name in OUTPUTS {
        let path = out.join(name);
        let result = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match result {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(FileError::new(&path, e).into())
            }
            _ => {}
        }
    }
    Ok(())
}

/// FNV-1a 64 over `(relative path, 0, length, bytes)` of every file of the world except the
/// manifest and hidden temporaries, in path order.
pub fn content_hash(out: &Path) -> Result<String, WorldError> {
    let mut paths = Vec::new();
    let mut stack = vec![out.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(FileError::new(&dir, e).into()),
        };
        for entry in entries {
            let entry = entry.map_err(|e| FileError::new(&dir, e))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || (dir == out && !OUTPUTS.contains(&name.as_str())) {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if name != "manifest.json" || dir != out {
                let rel = path
                    .strip_prefix(out)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .replace('\\', "/");
                paths.push((rel, path));
            }
        }
    }
    paths.sort();
    let hashes: Vec<u64> = paths
        .par_iter()
        .map(|(rel, path)| {
            let bytes = fs::read(path).map_err(|e| FileError::new(path, e))?;
            let mut h = fnv(0xcbf2_9ce4_8422_2325, rel.as_bytes());
            h = fnv(h, &[0]);
            h = fnv(h, &(bytes.len() as u64).to_le_bytes());
            Ok(fnv(h, &bytes))
        })
        .collect::<Result<_, WorldError>>()?;
    let total = hashes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, x| fnv(h, &x.to_le_bytes()));
    Ok(format!("{total:016x}"))
}

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Every scene of `split`, drawn from its own stream.
pub fn sample_split(cfg: &WorldConfig, split: Split) -> Vec<Scene> {
    (0..cfg.scenes(split))
        .into_par_iter()
        .map(|i| {
            let id = format!("{}-{i:05}", split.name());
            let mut rng = Rng::new(record_seed(cfg.seed, &id, PURPOSE_SCENE));
            Scene::new(split, i, scene::sample_objects(cfg, split, &mut rng))
        })
        .collect()
}

fn jsonl<T: Serialize>(rows: &[T]) -> Vec<u8> {
    let mut out = Vec::new();
    for row in rows {
        // Serialising these plain structs cannot fail.
        if let Ok(line) = serde_json::to_vec(row) {
            out.extend_from_slice(&line);
            out.push(b'\n');
        }
    }
    out
}

fn write(out: &Path, rel: &str, bytes: &[u8]) -> Result<(), WorldError> {
    Ok(files::write_atomic(&out.join(rel), bytes)?)
}

fn write_world(cfg: &WorldConfig, out: &Path) -> Result<Counts, WorldError> {
    let splits: Vec<(Split, Vec<Scene>)> = Split::ALL
        .into_iter()
        .map(|s| (s, sample_split(cfg, s)))
        .collect();
    let of = |split: Split| {
        splits
            .iter()
            .find(|(s, _)| *s == split)
            .map(|(_, v)| v.as_slice())
            .unwrap_or(&[])
    };

    // Images: the bulk of the work, one task per image.
    for split in Split::ALL {
        let dir = out.join("images").join(split.name());
        fs::create_dir_all(&dir).map_err(|e| FileError::new(&dir, e))?;
    }
    splits
        .iter()
        .flat_map(|(_, scenes)| scenes)
        .collect::<Vec<_>>()
        .par_iter()
        .try_for_each(|scene| -> Result<(), WorldError> {
            let mut rng = Rng::new(record_seed(cfg.seed, &scene.id, PURPOSE_RENDER));
            let img = render::render(scene, cfg, &mut rng);
            let path = out.join(&scene.image);
            let bytes = render::png(&img).map_err(|e| WorldError::Image {
                path: path.clone(),
                message: e.to_string(),
            })?;
            fs::write(&path, bytes).map_err(|e| FileError::new(&path, e))?;
            Ok(())
        })?;

    let all: Vec<&Scene> = splits.iter().flat_map(|(_, s)| s).collect();
    write(out, "scenes.jsonl", &jsonl(&all))?;

    let train = of(Split::Train);
    let sft: Vec<records::SftRow> = train
        .par_iter()
        .enumerate()
        .flat_map_iter(|(i, scene)| {
            let mut rng = Rng::new(record_seed(cfg.seed, &scene.id, PURPOSE_SFT));
            records::sft_rows(scene, i, cfg.qa_per_scene, &mut rng)
        })
        .collect();
    write(out, "sft.jsonl", &jsonl(&sft))?;

    let make_records = |scenes: &[Scene], n: usize, prefix: &str| -> Vec<records::RecordRow> {
        (0..n)
            .into_par_iter()
            .filter_map(|i| {
                let scene = scenes.get(i % scenes.len().max(1))?;
                let id = format!("{prefix}-{i:05}");
                let mut rng = Rng::new(record_seed(cfg.seed, &id, PURPOSE_RECORD));
                records::record(id, scene, &cfg.mix, &mut rng)
            })
            .collect()
    };
    let recs = make_records(train, cfg.records, "rec");
    write(out, "records.jsonl", &jsonl(&recs))?;
    let val_recs = make_records(of(Split::Val), cfg.val_records, "val-rec");
    write(out, "records_val.jsonl", &jsonl(&val_recs))?;

    let pool: String = of(Split::Pool)
        .iter()
        .map(|s| format!("{}\n", s.image))
        .collect();
    write(out, "pool.txt", pool.as_bytes())?;
    write(
        out,
        "captions_prompt.txt",
        format!("{}\n", text::DESCRIBE).as_bytes(),
    )?;

    let stats = Cooccurrence::of(train);
    let mut pope_questions = BTreeMap::new();
    let mut chair_objects = BTreeMap::new();
    for split in [Split::Val, Split::Test] {
        let scenes = of(split);
        for negatives in pope::Negatives::ALL {
            let rows = pope::questions(scenes, &stats, negatives, cfg.pope_per_image, cfg.seed);
            let name = format!("{}_{}", negatives.name(), split.name());
            write(out, &format!("pope/{name}.jsonl"), &jsonl(&rows))?;
            pope_questions.insert(name, rows.len());
        }
        let instances = chair::instances(scenes);
        chair_objects.insert(split.name().to_owned(), instances.annotations.len());
        files::write_json_atomic(
            &out.join(format!("chair/instances_{}.json", split.name())),
            &instances,
        )?;
    }
    write(out, "chair/synonyms.txt", chair::synonyms().as_bytes())?;

    let (with_anchor, with_both) = Prior::PAIRS.iter().fold((0, 0), |(n, m), (a, p)| {
        (
            n + stats.frequency[a.index()],
            m + stats.pairs[a.index()][p.index()],
        )
    });
    Ok(Counts {
        scenes: splits
            .iter()
            .map(|(s, v)| (s.name().to_owned(), v.len()))
            .collect(),
        sft_rows: sft.len(),
        records: recs.len(),
        val_records: val_recs.len(),
        pope_questions,
        chair_objects,
        hidden_objects: all
            .iter()
            .flat_map(|s| &s.objects)
            .filter(|o| o.visibility.is_hidden())
            .count(),
        objects: all.iter().map(|s| s.objects.len()).sum(),
        train_partner_rate: if with_anchor == 0 {
            0.0
        } else {
            with_both as f64 / with_anchor as f64
        },
    })
}
