//! Dataset readers shared by the stages: preference records (RLHF-V parquet, TRL-style JSONL,
//! mDPO JSON) and image pools (a folder, a list file, COCO instances), into one internal
//! record type with a stable id. Bad rows are skipped with a reason, never fatal.
//!
//! Stage: embed (`misp embed records` / `misp embed pool`) and train (`misp train` reads the
//! same records). Reads the dataset files named on the command line; writes nothing itself —
//! callers write [`Skip`]s to `skipped.jsonl` (it derives `Serialize` for that).
//!
//! What is an error and what is a skip:
//! - [`DataError`]: the source as a whole is unusable — missing or unreadable, not the format
//!   at all (a parquet file without the RLHF-V columns, a `.jsonl` file in which no line is a
//!   JSON object, a `.json` file that is not an array, a COCO file without `images`), or a
//!   required option missing (the COCO image root). The message names the file.
//! - [`Skip`]: one row is unusable (invalid JSON line, unreadable parquet row, no image, empty
//!   prompt or response, an image path that leaves the dataset root or does not exist, a
//!   duplicate id). It is returned with where it was and why, never dropped silently.
//!
//! Ids are stable: the same input gives the same ids on every run, in the same order (see
//! [`read_records`] and [`read_pool`] for how each format names its rows). Within one call, a
//! repeated id keeps its first occurrence; later ones are skipped with the reason
//! `duplicate id`.
//!
//! Image paths found in a dataset are untrusted (docs/design.md §7): they are resolved under the
//! dataset root and checked with [`paths::DatasetRoot`], so an [`ImageSource::Path`] handed to a
//! decoder always names an existing file inside that root. Image bytes are passed on as they
//! are; decoding (and reporting undecodable images) is the embed and train stages' job.

mod base64;
mod mdpo;
pub mod paths;
mod pool;
mod records;
mod rlhfv;
mod text;
mod trl;

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use crate::files::FileError;

pub use pool::{read_pool, PoolImage, PoolSet, IMAGE_EXTENSIONS};
pub use records::{read_records, RecordFormat, RecordSet};

/// One preference record, whatever file it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceRecord {
    /// Stable id, unique within the source it was read from.
    pub id: String,
    /// The positive image `m_p`.
    pub image: ImageSource,
    /// The user's question, without the `<image>` placeholder (the image travels in `image`).
    pub prompt: String,
    /// The preferred response `y_p`, as written in the source.
    pub chosen: String,
    /// The dispreferred response `y_n`, as written in the source.
    pub rejected: String,
}

/// Where a record's image comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// Encoded image bytes (JPEG, PNG, ...) carried in the dataset file itself, as they were.
    Bytes(Vec<u8>),
    /// An existing file, already confined to the dataset root. Absolute when the root was
    /// resolved against the working directory (always, for paths found in datasets).
    Path(PathBuf),
}

// Derived Debug would print every byte of an embedded image; the length is what helps.
impl fmt::Debug for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bytes(b) => write!(f, "Bytes(<{} bytes>)", b.len()),
            Self::Path(p) => f.debug_tuple("Path").field(p).finish(),
        }
    }
}

/// A skipped input, for `skipped.jsonl`.
///
/// `source` is where it was: `FILE:LINE` (1-based) for line-oriented files (JSONL, list
/// files), `FILE#ROW` (0-based) for parquet rows and JSON array entries (mDPO records, COCO
/// `images[]`), the file itself for a folder entry. `reason` starts with a fixed phrase
/// (`invalid JSON`, `no image`, `empty chosen`, `image path escapes the dataset root`,
/// `duplicate id`, ...) optionally followed by `: detail`, so reports can count by the part
/// before the colon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Skip {
    pub source: String,
    pub id: Option<String>,
    pub reason: String,
}

impl Skip {
    pub fn new(source: impl Into<String>, id: Option<String>, reason: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            id,
            reason: reason.into(),
        }
    }
}

/// What the skips were, for an error that says why nothing was usable: the count per reason
/// (the part of a reason before its first `:`), then the first `first` skips in full with where
/// they were and their id, e.g. `4 skipped: 4 x image path escapes the dataset root; first:
/// data.jsonl:1 (id r0): image path escapes the dataset root: /abs/a.jpg (...)`.
pub fn describe_skips(skipped: &[Skip], first: usize) -> String {
    if skipped.is_empty() {
        return "nothing was skipped".into();
    }
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for s in skipped {
        let key = s.reason.split(':').next().unwrap_or("").trim();
        match counts.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => counts.push((key, 1)),
        }
    }
    counts.sort_by_key(|c| std::cmp::Reverse(c.1));
    let by_reason = counts
        .iter()
        .map(|(k, n)| format!("{n} x {k}"))
        .collect::<Vec<_>>()
        .join(", ");
    let examples = skipped
        .iter()
        .take(first)
        .map(|s| match &s.id {
            Some(id) => format!("{} (id {id}): {}", s.source, s.reason),
            None => format!("{}: {}", s.source, s.reason),
        })
        .collect::<Vec<_>>()
        .join("; ");
    format!("{} skipped: {by_reason}; first: {examples}", skipped.len())
}

/// A source that cannot be read at all; each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Missing or unreadable file or folder.
    #[error(transparent)]
    File(#[from] FileError),
    /// The file is not the format it was read as.
    #[error("{path}: not {format}: {message}")]
    Format {
        path: PathBuf,
        format: &'static str,
        message: String,
    },
    /// The format could not be told from the name and none was given.
    #[error("{path}: cannot tell the format from the name; {expected}")]
    UnknownFormat {
        path: PathBuf,
        expected: &'static str,
    },
    /// A required option is missing or unusable (the COCO image root, say).
    #[error("{path}: {message}")]
    Option { path: PathBuf, message: String },
}

/// Keeps the first of every id and turns later repeats into skips, preserving order.
/// `items` are `(source, record)` pairs; `id_of` reads a record's id.
pub(crate) fn dedup_ids<T>(
    items: Vec<(String, T)>,
    id_of: impl Fn(&T) -> &str,
    skipped: &mut Vec<Skip>,
) -> Vec<T> {
    let mut seen = std::collections::HashSet::new();
    let mut kept = Vec::with_capacity(items.len());
    for (source, item) in items {
        if seen.insert(id_of(&item).to_owned()) {
            kept.push(item);
        } else {
            skipped.push(Skip::new(
                source,
                Some(id_of(&item).to_owned()),
                "duplicate id",
            ));
        }
    }
    kept
}
