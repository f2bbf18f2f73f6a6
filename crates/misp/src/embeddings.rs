//! Embedding stores: the folders `misp embed` writes and `misp sae` / `misp mine` read.
//!
//! Pool folder: `embeddings.safetensors` with `image_embeds [N, d]` (f16 or f32), `ids.jsonl`
//! (`{"id", "path"}` per row, in row order) and `meta.json` (`{"clip_model", "dim",
//! "normalized"}`). Records folder: the same with `prompt_embeds [R, d]` and
//! `positive_embeds [R, d]`, and `ids.jsonl` rows `{"id"}`.
//!
//! Loading validates everything a later stage would trip on and says where: shapes against
//! `meta.json`, row counts against `ids.jsonl`, duplicate or missing ids (an error naming the
//! line), and unusable rows: non-finite ones, and ones that are not unit-norm in a store that
//! says it is normalised (kept, but listed in `invalid_rows` so callers skip and count them
//! rather than letting a NaN or a zero vector poison a whole batch).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::files::{self, FileError};

pub const EMBEDDINGS_FILE: &str = "embeddings.safetensors";
pub const IDS_FILE: &str = "ids.jsonl";
pub const META_FILE: &str = "meta.json";

/// Errors of reading or writing an embedding store; each names the file and, where there is
/// one, the line or tensor.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}:{line}: {message}")]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

fn invalid(path: &Path, message: impl Into<String>) -> StoreError {
    StoreError::Invalid {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// `meta.json` of a store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingMeta {
    /// The CLIP checkpoint the embeddings came from (an HF id or a folder name).
    pub clip_model: String,
    /// Embedding dimension `d`.
    pub dim: usize,
    /// Whether every row is L2-normalised.
    pub normalized: bool,
}

/// Precision of the stored tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreDType {
    F16,
    #[default]
    F32,
}

/// A row whose embedding contains NaN or Inf.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidRow {
    pub row: usize,
    pub id: String,
    pub tensor: &'static str,
    /// `non-finite`, or `not unit-norm` in a store whose `meta.json` says normalised.
    pub reason: &'static str,
}

/// The image pool: candidate negatives, in row order.
#[derive(Debug, Clone)]
pub struct PoolEmbeddings {
    pub dir: PathBuf,
    pub meta: EmbeddingMeta,
    pub ids: Vec<String>,
    pub paths: Vec<String>,
    /// `[N, d]` row-major, f32.
    pub embeds: Vec<f32>,
    pub invalid_rows: Vec<InvalidRow>,
}

/// Preference records: one prompt and one positive image embedding per record.
#[derive(Debug, Clone)]
pub struct RecordEmbeddings {
    pub dir: PathBuf,
    pub meta: EmbeddingMeta,
    pub ids: Vec<String>,
    /// `[R, d]` row-major, f32.
    pub prompts: Vec<f32>,
    /// `[R, d]` row-major, f32.
    pub positives: Vec<f32>,
    pub invalid_rows: Vec<InvalidRow>,
}

#[derive(Deserialize)]
struct IdRow {
    id: Option<String>,
    #[serde(default)]
    path: Option<String>,
}

fn read_meta(dir: &Path) -> Result<EmbeddingMeta, StoreError> {
    let path = dir.join(META_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| FileError::new(&path, e))?;
    serde_json::from_str(&text).map_err(|e| invalid(&path, format!("not a valid meta.json: {e}")))
}

/// Reads `ids.jsonl`: ids (unique, non-empty) and optional paths, with line-numbered errors.
fn read_ids(dir: &Path, need_path: bool) -> Result<(Vec<String>, Vec<String>), StoreError> {
    let path = dir.join(IDS_FILE);
    let mut ids = Vec::new();
    let mut paths = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (line, text) in files::read_lines(&path)? {
        let err = |message: String| StoreError::Line {
            path: path.clone(),
            line,
            message,
        };
        let row: IdRow = serde_json::from_str(&text)
            .map_err(|e| err(format!("not a JSON object with an \"id\": {e}")))?;
        let id = row
            .id
            .filter(|s| !s.is_empty())
            .ok_or_else(|| err("missing or empty field \"id\"".into()))?;
        if let Some(first) = seen.insert(id.clone(), line) {
            return Err(err(format!("duplicate id {id:?} (first on line {first})")));
        }
        if need_path && row.path.is_none() {
            return Err(err("missing field \"path\"".into()));
        }
        ids.push(id);
        paths.push(row.path.unwrap_or_default());
    }
    Ok((ids, paths))
}

/// Loads one `[rows, dim]` tensor of the store as f32, checking its shape.
fn take_matrix(
    tensors: &mut HashMap<String, Tensor>,
    file: &Path,
    name: &str,
    rows: usize,
    dim: usize,
) -> Result<Vec<f32>, StoreError> {
    let t = tensors
        .remove(name)
        .ok_or_else(|| invalid(file, format!("missing tensor `{name}`")))?;
    if t.dims() != [rows, dim] {
        return Err(invalid(
            file,
            format!("tensor `{name}` has shape {:?}, expected [{rows}, {dim}] (rows of ids.jsonl, dim of meta.json)", t.dims()),
        ));
    }
    if !matches!(
        t.dtype(),
        DType::F16 | DType::F32 | DType::BF16 | DType::F64
    ) {
        return Err(invalid(
            file,
            format!(
                "tensor `{name}` has dtype {:?}; expected f16 or f32",
                t.dtype()
            ),
        ));
    }
    let flat = t
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>());
    flat.map_err(|e| invalid(file, format!("tensor `{name}`: {e}")))
}

fn load_tensors(dir: &Path) -> Result<(PathBuf, HashMap<String, Tensor>), StoreError> {
    let file = dir.join(EMBEDDINGS_FILE);
    if !file.exists() {
        return Err(
            FileError::new(&file, std::io::Error::from(std::io::ErrorKind::NotFound)).into(),
        );
    }
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu)
        .map_err(|e| invalid(&file, format!("not a readable safetensors file: {e}")))?;
    Ok((file, tensors))
}

/// How far a normalised row's squared norm may be from 1: f16 storage rounds each value to
/// ~1e-3 relative, far inside this; a zero or unnormalised row is far outside.
const UNIT_NORM_TOLERANCE: f64 = 1e-2;

/// Rows no later stage should use: non-finite ones, and, where `normalized` promises unit
/// rows, those that are not (a zero row has no direction; cosines against it are meaningless).
fn unusable_rows(
    data: &[f32],
    dim: usize,
    ids: &[String],
    tensor: &'static str,
    normalized: bool,
) -> Vec<InvalidRow> {
    data.chunks(dim.max(1))
        .enumerate()
        .filter_map(|(row, v)| {
            let reason = if v.iter().any(|x| !x.is_finite()) {
                "non-finite"
            } else if normalized
                && (v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() - 1.0).abs()
                    > UNIT_NORM_TOLERANCE
            {
                "not unit-norm"
            } else {
                return None;
            };
            Some(InvalidRow {
                row,
                id: ids[row].clone(),
                tensor,
                reason,
            })
        })
        .collect()
}

impl PoolEmbeddings {
    /// Reads and validates a pool folder.
    pub fn load(dir: &Path) -> Result<Self, StoreError> {
        let meta = read_meta(dir)?;
        let (ids, paths) = read_ids(dir, false)?;
        let (file, mut tensors) = load_tensors(dir)?;
        let embeds = take_matrix(&mut tensors, &file, "image_embeds", ids.len(), meta.dim)?;
        if ids.is_empty() {
            return Err(invalid(&dir.join(IDS_FILE), "the image pool is empty"));
        }
        let invalid_rows = unusable_rows(&embeds, meta.dim, &ids, "image_embeds", meta.normalized);
        Ok(Self {
            dir: dir.to_path_buf(),
            meta,
            ids,
            paths,
            embeds,
            invalid_rows,
        })
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Row `i` of the embeddings.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.embeds[i * self.meta.dim..(i + 1) * self.meta.dim]
    }

    /// Writes a pool folder (used by `misp embed`, tests and synthetic benchmarks).
    pub fn write(
        dir: &Path,
        meta: &EmbeddingMeta,
        ids: &[String],
        paths: &[String],
        embeds: &[f32],
        dtype: StoreDType,
    ) -> Result<(), StoreError> {
        let lines: Vec<String> = ids
            .iter()
            .zip(paths)
            .map(|(id, path)| serde_json::json!({"id": id, "path": path}).to_string())
            .collect();
        write_store(
            dir,
            meta,
            &lines,
            &[("image_embeds", embeds)],
            ids.len(),
            dtype,
        )
    }
}

impl RecordEmbeddings {
    /// Reads and validates a records folder.
    pub fn load(dir: &Path) -> Result<Self, StoreError> {
        let meta = read_meta(dir)?;
        let (ids, _) = read_ids(dir, false)?;
        let (file, mut tensors) = load_tensors(dir)?;
        let prompts = take_matrix(&mut tensors, &file, "prompt_embeds", ids.len(), meta.dim)?;
        let positives = take_matrix(&mut tensors, &file, "positive_embeds", ids.len(), meta.dim)?;
        let norm = meta.normalized;
        let mut invalid_rows = unusable_rows(&prompts, meta.dim, &ids, "prompt_embeds", norm);
        invalid_rows.extend(unusable_rows(
            &positives,
            meta.dim,
            &ids,
            "positive_embeds",
            norm,
        ));
        invalid_rows.sort_by_key(|r| r.row);
        invalid_rows.dedup_by_key(|r| r.row);
        Ok(Self {
            dir: dir.to_path_buf(),
            meta,
            ids,
            prompts,
            positives,
            invalid_rows,
        })
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn prompt(&self, i: usize) -> &[f32] {
        &self.prompts[i * self.meta.dim..(i + 1) * self.meta.dim]
    }

    pub fn positive(&self, i: usize) -> &[f32] {
        &self.positives[i * self.meta.dim..(i + 1) * self.meta.dim]
    }

    /// Writes a records folder.
    pub fn write(
        dir: &Path,
        meta: &EmbeddingMeta,
        ids: &[String],
        prompts: &[f32],
        positives: &[f32],
        dtype: StoreDType,
    ) -> Result<(), StoreError> {
        let lines: Vec<String> = ids
            .iter()
            .map(|id| serde_json::json!({"id": id}).to_string())
            .collect();
        let tensors = [("prompt_embeds", prompts), ("positive_embeds", positives)];
        write_store(dir, meta, &lines, &tensors, ids.len(), dtype)
    }
}

/// Checks that a pool and a records folder can be used together.
pub fn check_compatible(
    pool: &PoolEmbeddings,
    records: &RecordEmbeddings,
) -> Result<(), StoreError> {
    let (p, r) = (&pool.meta, &records.meta);
    if p.dim != r.dim {
        return Err(invalid(
            &records.dir.join(META_FILE),
            format!(
                "dim {} differs from the pool's dim {} ({})",
                r.dim,
                p.dim,
                pool.dir.join(META_FILE).display()
            ),
        ));
    }
    if p.clip_model != r.clip_model {
        return Err(invalid(
            &records.dir.join(META_FILE),
            format!(
                "clip_model {:?} differs from the pool's {:?} ({}): embeddings of different models are not comparable",
                r.clip_model,
                p.clip_model,
                pool.dir.join(META_FILE).display()
            ),
        ));
    }
    Ok(())
}

fn write_store(
    dir: &Path,
    meta: &EmbeddingMeta,
    id_lines: &[String],
    tensors: &[(&str, &[f32])],
    rows: usize,
    dtype: StoreDType,
) -> Result<(), StoreError> {
    let file = dir.join(EMBEDDINGS_FILE);
    let mut map = HashMap::new();
    for (name, data) in tensors {
        if data.len() != rows * meta.dim {
            return Err(invalid(
                &file,
                format!(
                    "`{name}` has {} values, expected {rows} x {}",
                    data.len(),
                    meta.dim
                ),
            ));
        }
        let t = Tensor::from_slice(data, (rows, meta.dim), &Device::Cpu)
            .and_then(|t| {
                t.to_dtype(if dtype == StoreDType::F16 {
                    DType::F16
                } else {
                    DType::F32
                })
            })
            .map_err(|e| invalid(&file, e.to_string()))?;
        map.insert(name.to_string(), t);
    }
    files::write_atomic_with(&file, |tmp| {
        candle_core::safetensors::save(&map, tmp).map_err(std::io::Error::other)
    })?;
    let mut ids_text = id_lines.join("\n");
    ids_text.push('\n');
    files::write_atomic(&dir.join(IDS_FILE), ids_text.as_bytes())?;
    // meta.json last: its presence marks a complete store.
    files::write_json_atomic(&dir.join(META_FILE), meta)?;
    Ok(())
}

/// The ids of `invalid_rows`, for quick membership tests.
pub fn invalid_row_set(rows: &[InvalidRow]) -> HashSet<usize> {
    rows.iter().map(|r| r.row).collect()
}

#[cfg(test)]
mod tests;
