//! The embed driver behind `misp embed pool` and `misp embed records`.
//!
//! Items (pool images, or records with their image and prompt) are cut into chunks of
//! `chunk_size`. Each chunk is decoded in parallel, embedded in batches, and written as a part
//! file under `OUT/parts/` (atomically; the part's safetensors is its completion mark). A
//! re-run checks finished parts (rows, ids, finite values) and reuses them, rebuilding a bad
//! one; `--shard i/n` runs a contiguous range of chunks, and shards may share one `OUT` in any
//! order, sequential or concurrent. `OUT/manifest.json` records what the store is made from
//! (inputs, checkpoint, settings; not the shard), so a run with other inputs is refused. Two
//! runs of the same shard are refused while one holds its lock (`OUT/.shard-I-of-N.lock`).
//! When every part exists, whichever run finishes last merges them, under `OUT/.merge.lock`,
//! streaming, into the store of [`crate::embeddings`] and removes the parts: memory stays flat
//! in the number of images. Locks are advisory file locks, released when a process dies.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::safetensors_stream::{self, StreamDType, StreamTensor};
use crate::data::{self, ImageSource, Skip};
use crate::embeddings::{EmbeddingMeta, EMBEDDINGS_FILE, IDS_FILE, META_FILE};
use crate::files::{self, FileError, Shard};
use crate::model::clip::image_processor::ImageProcessor;
use crate::model::clip::{ClipModel, ClipTokenizer};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("{context}: {source}")]
    Input { context: String, source: BoxError },
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path}: {message}")]
    Inconsistent { path: PathBuf, message: String },
}

fn input(context: impl Into<String>) -> impl FnOnce(BoxError) -> EmbedError {
    let context = context.into();
    move |source| EmbedError::Input { context, source }
}

/// Settings of one embed run. All but the shard are part of the manifest that guards
/// resumption (shards of one store differ only in their shard).
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedConfig {
    /// Images per CLIP forward pass.
    pub batch_size: usize,
    /// Items per part file (the unit of resumption and sharding).
    pub chunk_size: usize,
    /// Precision of the written embeddings.
    pub f16: bool,
    pub shard: Shard,
}

/// What of an [`EmbedConfig`] shapes the store (everything but the shard).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StoreSettings {
    batch_size: usize,
    chunk_size: usize,
    f16: bool,
}

impl Default for EmbedConfig {
    fn default() -> Self {
        Self {
            batch_size: 32,
            chunk_size: 1024,
            f16: false,
            shard: Shard::default(),
        }
    }
}

/// What a run did; the CLI prints it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EmbedReport {
    pub items: usize,
    pub embedded: usize,
    pub parts_done_before: usize,
    pub parts_written: usize,
    pub parts_pending: usize,
    pub skipped: usize,
    pub truncated_prompts: usize,
    pub merged: bool,
    pub seconds: f64,
}

/// One thing to embed.
struct Item {
    id: String,
    /// Pool: the image path written to ids.jsonl.
    path: Option<String>,
    image: ImageSource,
    /// Records: the prompt.
    prompt: Option<String>,
}

/// Which store is being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Pool,
    Records,
}

/// `OUT/manifest.json`: what the parts (and the finished store) were made from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Manifest {
    kind: Kind,
    clip_model: String,
    items: usize,
    fingerprint: String,
    config: StoreSettings,
}

/// The CLIP checkpoint, its tokenizer and its image processor.
pub struct Embedder {
    model: ClipModel,
    tokenizer: Option<ClipTokenizer>,
    processor: ImageProcessor,
    /// Recorded as `clip_model` in `meta.json`: the checkpoint folder's name.
    pub name: String,
}

impl Embedder {
    /// The checkpoint in `dir` on `device` (the text tower's tokenizer too with `with_text`).
    pub fn load(dir: &Path, with_text: bool, device: &Device) -> Result<Self, EmbedError> {
        let ctx = || format!("CLIP checkpoint {}", dir.display());
        let model =
            ClipModel::load(dir, DType::F32, device).map_err(|e| input(ctx())(Box::new(e)))?;
        let tokenizer = if with_text {
            Some(ClipTokenizer::load(dir).map_err(|e| input(ctx())(Box::new(e)))?)
        } else {
            None
        };
        let processor = ImageProcessor::from_checkpoint(dir, model.image_size())
            .map_err(|e| input(ctx())(Box::new(e)))?;
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| dir.display().to_string());
        Ok(Self {
            model,
            tokenizer,
            processor,
            name,
        })
    }

    /// Embeddings of `n` preprocessed images given as one `[n, 3, S, S]` buffer.
    fn image_embeds(&self, pixels: Vec<f32>, n: usize) -> Result<Vec<f32>, BoxError> {
        let s = self.model.image_size();
        // Pixels are made on the host; the model moves them to its device once per batch.
        let t = Tensor::from_vec(pixels, (n, 3, s, s), &Device::Cpu)?;
        Ok(self
            .model
            .embed_images(&t)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    fn text_embeds(&self, texts: &[&str]) -> Result<(Vec<f32>, usize), BoxError> {
        let tok = self.tokenizer.as_ref().ok_or("no tokenizer loaded")?;
        let tokens = tok.encode(texts)?;
        let e = self
            .model
            .embed_texts(&tokens)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok((e, tokens.truncated))
    }
}

/// `misp embed pool`: every image of `images` (a folder, list file or COCO json).
pub fn embed_pool(
    embedder: &Embedder,
    images: &Path,
    image_root: Option<&Path>,
    out: &Path,
    cfg: &EmbedConfig,
    progress: bool,
) -> Result<EmbedReport, EmbedError> {
    let set = data::read_pool(images, image_root)
        .map_err(|e| input(format!("image pool {}", images.display()))(Box::new(e)))?;
    let items = set
        .images
        .into_iter()
        .map(|p| Item {
            id: p.id,
            path: Some(p.path.display().to_string()),
            image: ImageSource::Path(p.path),
            prompt: None,
        })
        .collect();
    run(embedder, Kind::Pool, items, set.skipped, out, cfg, progress)
}

/// `misp embed records`: the positive image and the prompt of every preference record.
pub fn embed_records(
    embedder: &Embedder,
    records: &Path,
    image_root: Option<&Path>,
    out: &Path,
    cfg: &EmbedConfig,
    progress: bool,
) -> Result<EmbedReport, EmbedError> {
    let set = data::read_records(records, None, image_root)
        .map_err(|e| input(format!("records {}", records.display()))(Box::new(e)))?;
    let items = set
        .records
        .into_iter()
        .map(|r| Item {
            id: r.id,
            path: None,
            image: r.image,
            prompt: Some(r.prompt),
        })
        .collect();
    run(
        embedder,
        Kind::Records,
        items,
        set.skipped,
        out,
        cfg,
        progress,
    )
}

fn parts_dir(out: &Path) -> PathBuf {
    out.join("parts")
}

fn part_path(out: &Path, chunk: usize, ext: &str) -> PathBuf {
    parts_dir(out).join(format!("part-{chunk:06}.{ext}"))
}

/// A stable fingerprint of the item list (ids, paths, byte lengths and a sample of bytes), so
/// a resumed run refuses parts made from other inputs.
fn fingerprint(items: &[Item]) -> String {
    let mut h = 0u64;
    for it in items {
        h = files::record_seed(h, &it.id, 0);
        match &it.image {
            ImageSource::Path(p) => h = files::record_seed(h, &p.display().to_string(), 1),
            ImageSource::Bytes(b) => {
                let head = &b[..b.len().min(64)];
                h = files::record_seed(h ^ b.len() as u64, &String::from_utf8_lossy(head), 2);
            }
        }
        if let Some(p) = &it.prompt {
            h = files::record_seed(h, p, 3);
        }
    }
    format!("{h:016x}")
}

fn run(
    embedder: &Embedder,
    kind: Kind,
    items: Vec<Item>,
    reader_skips: Vec<Skip>,
    out: &Path,
    cfg: &EmbedConfig,
    progress: bool,
) -> Result<EmbedReport, EmbedError> {
    let start = Instant::now();
    if cfg.batch_size == 0 || cfg.chunk_size == 0 {
        return Err(EmbedError::Inconsistent {
            path: out.into(),
            message: "batch and chunk sizes must be positive".into(),
        });
    }
    let manifest = Manifest {
        kind,
        clip_model: embedder.name.clone(),
        items: items.len(),
        fingerprint: fingerprint(&items),
        config: StoreSettings {
            batch_size: cfg.batch_size,
            chunk_size: cfg.chunk_size,
            f16: cfg.f16,
        },
    };
    let mut report = EmbedReport {
        items: items.len(),
        ..Default::default()
    };
    if out.join(META_FILE).exists() && check_manifest(out, &manifest, true)? {
        report.merged = true;
        report.seconds = start.elapsed().as_secs_f64();
        return Ok(report);
    }
    if items.is_empty() {
        // Say why, and keep the list: skipped.jsonl is what the user reads next.
        files::write_atomic(&out.join("skipped.jsonl"), &jsonl(&reader_skips))?;
        return Err(EmbedError::Inconsistent {
            path: out.into(),
            message: format!(
                "nothing to embed, every input was skipped (listed in skipped.jsonl): {}",
                data::describe_skips(&reader_skips, 3)
            ),
        });
    }
    check_manifest(out, &manifest, false)?;
    let _shard_lock = lock(
        &out.join(format!(".shard-{}-of-{}.lock", cfg.shard.index, cfg.shard.count)),
        false,
    )
    .map_err(|e| match e {
        LockError::Held(path) => EmbedError::Inconsistent {
            path,
            message: format!(
                "another misp embed (shard {}/{}) is writing {}; wait for it, or give each run its own --shard i/n",
                cfg.shard.index,
                cfg.shard.count,
                out.display()
            ),
        },
        LockError::Io(e) => EmbedError::File(e),
    })?;

    let chunks = items.len().div_ceil(cfg.chunk_size);
    let chunk = |c: usize| &items[c * cfg.chunk_size..((c + 1) * cfg.chunk_size).min(items.len())];
    let dim = embedder.model_dim();
    let range = cfg.shard.range(chunks);
    let bar = crate::progress::bar(
        progress,
        (range.len() * cfg.chunk_size).min(items.len()) as u64,
        "embedding",
        "images",
    );
    for c in range {
        if part_is_usable(out, c, kind, dim, chunk(c).len()) {
            report.parts_done_before += 1;
            bar.inc(chunk(c).len() as u64);
            continue;
        }
        let part = embed_chunk(embedder, kind, chunk(c), cfg.batch_size, &bar)?;
        report.embedded += part.ids.len();
        report.skipped += part.skipped.len();
        report.truncated_prompts += part.truncated;
        write_part(out, c, kind, &part, dim)?;
        report.parts_written += 1;
    }
    bar.finish_and_clear();
    report.skipped += reader_skips.len();

    // The merge: one run at a time; whoever takes the lock first and finds every part merges,
    // a run that finds the store already merged by another is done too.
    let _merge_lock = lock(&out.join(".merge.lock"), true).map_err(|e| match e {
        LockError::Held(path) => EmbedError::Inconsistent {
            path,
            message: "merge lock held".into(),
        },
        LockError::Io(e) => EmbedError::File(e),
    })?;
    if out.join(META_FILE).exists() && check_manifest(out, &manifest, true)? {
        report.merged = true;
        report.seconds = start.elapsed().as_secs_f64();
        return Ok(report);
    }
    report.parts_pending = (0..chunks)
        .filter(|c| !part_path(out, *c, "safetensors").exists())
        .count();
    if report.parts_pending == 0 {
        // Parts made by other runs are checked too; a bad one is made again here.
        for c in 0..chunks {
            if !part_is_usable(out, c, kind, dim, chunk(c).len()) {
                let part = embed_chunk(embedder, kind, chunk(c), cfg.batch_size, &bar)?;
                write_part(out, c, kind, &part, dim)?;
                report.parts_written += 1;
            }
        }
        // Count every skip of the store, including those of parts made by earlier runs.
        report.skipped = merge(out, kind, chunks, &reader_skips, embedder, cfg)?;
        report.merged = true;
    }
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

enum LockError {
    Held(PathBuf),
    Io(FileError),
}

/// An advisory exclusive lock on `path` (created if absent), held until the file is dropped:
/// waited for when `wait`, else refused at once if another process holds it.
fn lock(path: &Path, wait: bool) -> Result<std::fs::File, LockError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| LockError::Io(FileError::new(path, e)))?;
    if wait {
        file.lock()
            .map_err(|e| LockError::Io(FileError::new(path, e)))?;
    } else {
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(LockError::Held(path.into())),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(LockError::Io(FileError::new(path, e)))
            }
        }
    }
    Ok(file)
}

/// Whether part `c` exists and holds what a finished part holds: an ids line (a JSON object
/// with a string `id`, and `path` for a pool) per tensor row, at most `items` rows, tensors of
/// `dim` columns with finite values, and a readable skip list. A part that fails is logged and
/// made again (a killed writer cannot leave one: the safetensors is written last, atomically;
/// but files can be damaged or edited afterwards).
fn part_is_usable(out: &Path, c: usize, kind: Kind, dim: usize, items: usize) -> bool {
    if !part_path(out, c, "safetensors").exists() {
        return false;
    }
    match check_part(out, c, kind, dim, items) {
        Ok(()) => true,
        Err(why) => {
            tracing::warn!(
                "{}: {why}; embedding that chunk again",
                part_path(out, c, "safetensors").display()
            );
            false
        }
    }
}

fn check_part(out: &Path, c: usize, kind: Kind, dim: usize, items: usize) -> Result<(), String> {
    let ids_path = part_path(out, c, "ids.jsonl");
    let text = std::fs::read_to_string(&ids_path).map_err(|e| format!("ids.jsonl: {e}"))?;
    let mut rows = 0;
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("ids.jsonl line {}: {e}", i + 1))?;
        let has_path = v.get("path").is_some_and(|p| p.is_string());
        if !v.get("id").is_some_and(|x| x.is_string()) || (kind == Kind::Pool && !has_path) {
            return Err(format!("ids.jsonl line {}: not an id row", i + 1));
        }
        rows += 1;
    }
    if rows > items {
        return Err(format!("{rows} ids for a chunk of {items} items"));
    }
    let skipped = std::fs::read_to_string(part_path(out, c, "skipped.jsonl"))
        .map_err(|e| format!("skipped.jsonl: {e}"))?;
    if let Some(bad) = skipped
        .lines()
        .position(|l| serde_json::from_str::<Skip>(l).is_err())
    {
        return Err(format!("skipped.jsonl line {}: not a skip row", bad + 1));
    }
    let names: &[&str] = match kind {
        Kind::Pool => &["images"],
        Kind::Records => &["images", "prompts"],
    };
    for name in names {
        let v = read_part_tensor(out, c, name).map_err(|e| e.to_string())?;
        if v.len() != rows * dim {
            return Err(format!(
                "`{name}` has {} values, expected {rows} rows x {dim}",
                v.len()
            ));
        }
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(format!("`{name}` row {} is not finite", i / dim.max(1)));
        }
    }
    Ok(())
}

impl Embedder {
    fn model_dim(&self) -> usize {
        self.model.config.projection_dim
    }
}

/// Writes the manifest, or checks it against an existing one. With `finished`, returns whether
/// the finished store matches (`true`: nothing to do).
fn check_manifest(out: &Path, manifest: &Manifest, finished: bool) -> Result<bool, EmbedError> {
    let path = out.join("manifest.json");
    if path.exists() {
        let text = std::fs::read_to_string(&path).map_err(|e| FileError::new(&path, e))?;
        let before: Option<Manifest> = serde_json::from_str(&text).ok();
        if before.as_ref() != Some(manifest) {
            return Err(EmbedError::Inconsistent {
                path,
                message: format!(
                    "{} holds embeddings of other inputs, another checkpoint or other settings; delete it or choose another --out",
                    out.display()
                ),
            });
        }
        return Ok(true);
    }
    if finished {
        return Err(EmbedError::Inconsistent {
            path: out.join(META_FILE),
            message: "a finished store without manifest.json: delete it or choose another --out"
                .into(),
        });
    }
    files::write_json_atomic(&path, manifest)?;
    Ok(false)
}

/// The output of one chunk.
struct Part {
    ids: Vec<String>,
    paths: Vec<String>,
    /// Pool: image embeddings; records: positive-image embeddings.
    images: Vec<f32>,
    /// Records: prompt embeddings.
    prompts: Vec<f32>,
    skipped: Vec<Skip>,
    truncated: usize,
}

fn embed_chunk(
    embedder: &Embedder,
    kind: Kind,
    chunk: &[Item],
    batch_size: usize,
    bar: &indicatif::ProgressBar,
) -> Result<Part, EmbedError> {
    let mut part = Part {
        ids: vec![],
        paths: vec![],
        images: vec![],
        prompts: vec![],
        skipped: vec![],
        truncated: 0,
    };
    // One batch at a time: decoding in parallel within the batch keeps both cores busy while
    // holding only `batch_size` pixel tensors (a 1024-item chunk of 336 px images would be
    // 1.4 GB of pixels).
    for batch in chunk.chunks(batch_size) {
        let decoded: Vec<Result<Vec<f32>, String>> =
            batch.par_iter().map(|it| decode(embedder, it)).collect();
        let mut live: Vec<&Item> = Vec::with_capacity(batch.len());
        let mut pixels: Vec<f32> = Vec::new();
        for (it, d) in batch.iter().zip(decoded) {
            match d {
                Ok(px) => {
                    live.push(it);
                    pixels.extend(px);
                }
                Err(reason) => part.skipped.push(Skip {
                    source: it.path.clone().unwrap_or_else(|| it.id.clone()),
                    id: Some(it.id.clone()),
                    reason,
                }),
            }
        }
        bar.inc((batch.len() - live.len()) as u64);
        if live.is_empty() {
            continue;
        }
        let e = embedder
            .image_embeds(pixels, live.len())
            .map_err(input(format!("embedding images ({} ...)", live[0].id)))?;
        part.images.extend(e);
        if kind == Kind::Records {
            let texts: Vec<&str> = live
                .iter()
                .map(|it| it.prompt.as_deref().unwrap_or(""))
                .collect();
            let (t, truncated) = embedder
                .text_embeds(&texts)
                .map_err(input(format!("embedding prompts ({} ...)", live[0].id)))?;
            part.prompts.extend(t);
            part.truncated += truncated;
        }
        for it in &live {
            part.ids.push(it.id.clone());
            part.paths.push(it.path.clone().unwrap_or_default());
        }
        bar.inc(live.len() as u64);
    }
    Ok(part)
}

/// Reads and preprocesses one image; the error is the reason written to `skipped.jsonl`.
fn decode(embedder: &Embedder, it: &Item) -> Result<Vec<f32>, String> {
    let bytes = match &it.image {
        ImageSource::Bytes(b) => std::borrow::Cow::Borrowed(b.as_slice()),
        ImageSource::Path(p) => std::borrow::Cow::Owned(
            std::fs::read(p).map_err(|e| format!("unreadable image {}: {e}", p.display()))?,
        ),
    };
    let img = embedder
        .processor
        .decode(&bytes)
        .map_err(|e| e.to_string())?;
    Ok(embedder.processor.pixels(&img))
}

fn id_line(kind: Kind, id: &str, path: &str) -> String {
    match kind {
        Kind::Pool => serde_json::json!({"id": id, "path": path}).to_string(),
        Kind::Records => serde_json::json!({"id": id}).to_string(),
    }
}

fn jsonl<T: Serialize>(rows: impl IntoIterator<Item = T>) -> Vec<u8> {
    let mut text = Vec::new();
    for r in rows {
        text.extend(serde_json::to_vec(&r).unwrap_or_default());
        text.push(b'\n');
    }
    text
}

fn write_part(out: &Path, c: usize, kind: Kind, part: &Part, dim: usize) -> Result<(), EmbedError> {
    let ids: Vec<String> = part
        .ids
        .iter()
        .zip(&part.paths)
        .map(|(i, p)| id_line(kind, i, p))
        .collect();
    let mut ids_text = ids.join("\n");
    if !ids_text.is_empty() {
        ids_text.push('\n');
    }
    files::write_atomic(&part_path(out, c, "ids.jsonl"), ids_text.as_bytes())?;
    files::write_atomic(&part_path(out, c, "skipped.jsonl"), &jsonl(&part.skipped))?;
    // The safetensors last: its presence marks the part complete. Parts are f32; the merge
    // converts to the requested precision.
    let n = part.ids.len();
    let mut tensors = vec![StreamTensor {
        name: "images".into(),
        rows: n,
        cols: dim,
        blocks: Box::new(std::iter::once(Ok(part.images.clone()))),
    }];
    if kind == Kind::Records {
        tensors.push(StreamTensor {
            name: "prompts".into(),
            rows: n,
            cols: dim,
            blocks: Box::new(std::iter::once(Ok(part.prompts.clone()))),
        });
    }
    safetensors_stream::write(&part_path(out, c, "safetensors"), StreamDType::F32, tensors)?;
    Ok(())
}

/// Reads one tensor of a part file as f32 rows.
fn read_part_tensor(out: &Path, c: usize, name: &str) -> Result<Vec<f32>, FileError> {
    let path = part_path(out, c, "safetensors");
    let map = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| FileError::new(&path, std::io::Error::other(e)))?;
    let t = map
        .get(name)
        .ok_or_else(|| FileError::new(&path, std::io::Error::other(format!("missing `{name}`"))))?;
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| FileError::new(&path, std::io::Error::other(e)))
}

/// Streams the parts into the final store, removes them, and returns the number of skips.
fn merge(
    out: &Path,
    kind: Kind,
    chunks: usize,
    reader_skips: &[Skip],
    embedder: &Embedder,
    cfg: &EmbedConfig,
) -> Result<usize, EmbedError> {
    let dim = embedder.model_dim();
    let mut ids = Vec::new();
    let mut skipped: Vec<u8> = jsonl(reader_skips);
    let mut rows = 0;
    for c in 0..chunks {
        let p = part_path(out, c, "ids.jsonl");
        let text = std::fs::read(&p).map_err(|e| FileError::new(&p, e))?;
        rows += text.iter().filter(|b| **b == b'\n').count();
        ids.extend(text);
        let p = part_path(out, c, "skipped.jsonl");
        skipped.extend(std::fs::read(&p).map_err(|e| FileError::new(&p, e))?);
    }
    let dtype = if cfg.f16 {
        StreamDType::F16
    } else {
        StreamDType::F32
    };
    let stream =
        |name: &'static str| -> Box<dyn Iterator<Item = Result<Vec<f32>, FileError>> + '_> {
            Box::new((0..chunks).map(move |c| read_part_tensor(out, c, name)))
        };
    let tensors = match kind {
        Kind::Pool => vec![StreamTensor {
            name: "image_embeds".into(),
            rows,
            cols: dim,
            blocks: stream("images"),
        }],
        Kind::Records => vec![
            StreamTensor {
                name: "prompt_embeds".into(),
                rows,
                cols: dim,
                blocks: stream("prompts"),
            },
            StreamTensor {
                name: "positive_embeds".into(),
                rows,
                cols: dim,
                blocks: stream("images"),
            },
        ],
    };
    safetensors_stream::write(&out.join(EMBEDDINGS_FILE), dtype, tensors)?;
    files::write_atomic(&out.join(IDS_FILE), &ids)?;
    files::write_atomic(&out.join("skipped.jsonl"), &skipped)?;
    let meta = EmbeddingMeta {
        clip_model: embedder.name.clone(),
        dim,
        normalized: true,
    };
    files::write_json_atomic(&out.join(META_FILE), &meta)?;
    let parts = parts_dir(out);
    std::fs::remove_dir_all(&parts).map_err(|e| FileError::new(&parts, e))?;
    Ok(skipped.iter().filter(|b| **b == b'\n').count())
}
