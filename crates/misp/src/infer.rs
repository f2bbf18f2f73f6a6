//! `misp score` and `misp generate` over JSONL files: read rows, run a [`Vlm`] in batches, and
//! return one output row per input row, in order.
//!
//! Stage: score / eval. Reads `{"id", "image", "prompt", "response"}` (score) or `{"id",
//! "image", "prompt"}` (generate) rows; image paths are relative to the current directory
//! unless absolute, or, with an image root, relative to it and confined to it. A malformed row, an unreadable
//! image or a prompt the template cannot take is an error naming the file, line and id: these
//! files are small, hand-made inputs, and a silently missing score is worse than a stop.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::data::paths::DatasetRoot;
use crate::files::{read_lines, FileError};
use crate::model::vlm::{ItemError, Vlm};
use crate::model::ModelError;

/// One input row.
#[derive(Debug, Clone)]
pub struct InferRow {
    /// `FILE:LINE`, for messages.
    pub source: String,
    pub id: String,
    pub image: PathBuf,
    pub prompt: String,
    /// Present for scoring.
    pub response: Option<String>,
}

/// `{"id", "logp", "tokens"}`.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreRow {
    pub id: String,
    pub logp: f64,
    pub tokens: usize,
}

/// `{"id", "text"}`.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateRow {
    pub id: String,
    pub text: String,
}

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{source_}: {message}")]
    Row { source_: String, message: String },
    #[error("{source_} (id {id}): {error}")]
    Item {
        source_: String,
        id: String,
        error: ItemError,
    },
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Reads the rows of `path`; `response` says whether each row must carry a `response`. With
/// `root`, every image path must resolve inside it (relative ones under it, absolute ones
/// lying under it); a row whose path does not is an error naming it.
pub fn read_rows(
    path: &Path,
    response: bool,
    root: Option<&DatasetRoot>,
) -> Result<Vec<InferRow>, InferError> {
    let mut rows = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (line, text) in read_lines(path)? {
        if text.trim().is_empty() {
            continue;
        }
        let source_ = format!("{}:{line}", path.display());
        let bad = |message: String| InferError::Row {
            source_: source_.clone(),
            message,
        };
        let v: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let field = |name: &str| -> Result<String, InferError> {
            match v.get(name) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(Value::Number(n)) if name == "id" => Ok(n.to_string()),
                Some(other) => Err(bad(format!("field `{name}` is not a string: {other}"))),
                None => Err(bad(format!("missing field `{name}`"))),
            }
        };
        let id = field("id")?;
        if !seen.insert(id.clone()) {
            return Err(bad(format!("duplicate id {id:?}")));
        }
        let raw = field("image")?;
        let image = match root {
            Some(root) => root
                .resolve(&raw)
                .map_err(|e| bad(format!("id {id}: {e}")))?,
            None => PathBuf::from(raw),
        };
        rows.push(InferRow {
            id,
            image,
            prompt: field("prompt")?,
            response: if response {
                Some(field("response")?)
            } else {
                None
            },
            source: source_.clone(),
        });
    }
    Ok(rows)
}

fn item_error(row: &InferRow, error: ItemError) -> InferError {
    InferError::Item {
        source_: row.source.clone(),
        id: row.id.clone(),
        error,
    }
}

/// Scores every row's response, `batch` sequences per forward.
pub fn score(
    vlm: &Vlm,
    rows: &[InferRow],
    batch: usize,
    progress: bool,
) -> Result<Vec<ScoreRow>, InferError> {
    // Text first: a bad prompt anywhere stops the run before any model time is spent.
    for row in rows {
        let response = row.response.as_deref().unwrap_or_default();
        vlm.scored_ids(&row.prompt, response)
            .map_err(|e| item_error(row, e))?;
    }
    let bar = crate::progress::bar(progress, rows.len() as u64, "scoring", "rows");
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(batch.max(1)) {
        let items = chunk
            .iter()
            .map(|row| {
                let response = row.response.as_deref().unwrap_or_default();
                vlm.prepare_score(&row.image, &row.prompt, response)
                    .map_err(|e| item_error(row, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (row, (logp, tokens)) in chunk.iter().zip(vlm.score_prepared(&items)?) {
            out.push(ScoreRow {
                id: row.id.clone(),
                logp,
                tokens,
            });
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// Greedy answers to every row's prompt, `batch` prompts per decoding batch.
pub fn generate(
    vlm: &Vlm,
    rows: &[InferRow],
    batch: usize,
    max_new_tokens: usize,
    progress: bool,
) -> Result<Vec<GenerateRow>, InferError> {
    for row in rows {
        vlm.prompt_template_ids(&row.prompt)
            .map_err(|e| item_error(row, e))?;
    }
    let bar = crate::progress::bar(progress, rows.len() as u64, "generating", "rows");
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(batch.max(1)) {
        let items = chunk
            .iter()
            .map(|row| {
                vlm.prepare_prompt(&row.image, &row.prompt)
                    .map_err(|e| item_error(row, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (row, text) in chunk
            .iter()
            .zip(vlm.generate_prepared(&items, max_new_tokens)?)
        {
            out.push(GenerateRow {
                id: row.id.clone(),
                text,
            });
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(out)
}
