//! mDPO JSON preference records: one JSON array of objects with `img_path`, `prompt`,
//! `chosen`, `rejected` (strings) and an optional `id`.
//!
//! Ids: `id` when present (a string, or an integer in decimal), otherwise `STEM#INDEX` with the
//! file stem and the 0-based array index, which is also where the skip `source` points.

use std::path::Path;

use serde_json::{Map, Value};

use super::text::{explicit_id, kind, RawImage, RawRecord, Rows};
use super::trl::file_stem;
use super::{DataError, Skip};
use crate::files::FileError;

/// Entries of `path`, each with its `FILE#INDEX` source: a raw record or its skip.
pub fn read(path: &Path) -> Result<Rows, DataError> {
    let file = std::fs::File::open(path).map_err(|e| FileError::new(path, e))?;
    let not_mdpo = |message: String| DataError::Format {
        path: path.to_path_buf(),
        format: "mDPO JSON",
        message,
    };
    let value: Value = serde_json::from_reader(std::io::BufReader::new(file))
        .map_err(|e| not_mdpo(format!("invalid JSON: {e}")))?;
    let Value::Array(entries) = value else {
        return Err(not_mdpo(format!(
            "the file holds {}, expected an array of records",
            kind(&value)
        )));
    };
    let stem = file_stem(path);
    Ok(entries
        .into_iter()
        .enumerate()
        .map(|(i, entry)| {
            let source = format!("{}#{i}", path.display());
            let row = match entry {
                Value::Object(obj) => record(&obj, &format!("{stem}#{i}"))
                    .map_err(|(id, reason)| Skip::new(source.clone(), id, reason)),
                other => Err(Skip::new(
                    source.clone(),
                    None,
                    format!("not a JSON object: the entry is {}", kind(&other)),
                )),
            };
            (source, row)
        })
        .collect())
}

fn record(
    obj: &Map<String, Value>,
    fallback_id: &str,
) -> Result<RawRecord, (Option<String>, String)> {
    let id = explicit_id(obj, "id")
        .map_err(|e| (None, e))?
        .unwrap_or_else(|| fallback_id.to_owned());
    let text = |name: &str| match obj.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) => Err((Some(id.clone()), format!("missing field `{name}`"))),
        Some(other) => Err((
            Some(id.clone()),
            format!("field `{name}` is {}, expected a string", kind(other)),
        )),
    };
    let image = match obj.get("img_path") {
        Some(Value::String(p)) => RawImage::Path(p.clone()),
        None | Some(Value::Null) => RawImage::Missing("`img_path` field"),
        Some(other) => RawImage::Invalid(format!("`img_path` is {}, expected a path", kind(other))),
    };
    Ok(RawRecord {
        image,
        prompt: text("prompt")?,
        chosen: text("chosen")?,
        rejected: text("rejected")?,
        id,
    })
}
