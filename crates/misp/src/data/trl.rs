//! TRL-style JSONL preference records: one JSON object per line with `prompt`, `chosen`,
//! `rejected` (plain strings or chat lists) and an image in `images` (a list; the first entry
//! is the record's image) or `image`.
//!
//! An image entry is a path string, or an object `{"bytes": BASE64 or null, "path": ...}` (the
//! shape an HF `Image` feature takes once written out as JSON): bytes win when present, as in
//! `datasets`. When neither field is there, an image part of the prompt's user message that
//! names its file (`{"type": "image", "image": PATH}` or `"path"`) is used. Remote URLs are not
//! fetched. When `prompt` is absent and `chosen` is a chat list (TRL's implicit-prompt form),
//! the prompt is the user text of `chosen`.
//!
//! Ids: `id` when present (a string, or an integer in decimal), otherwise `STEM:LINE` with the
//! file stem and the 1-based line number, which is also where the skip `source` points.

use std::path::Path;

use serde_json::{Map, Value};

use super::base64;
use super::text::{explicit_id, field_text, kind, RawImage, RawRecord, Rows};
use super::{DataError, Skip};
use crate::files::FileError;

/// Rows of `path`, each with its `FILE:LINE` source: a raw record or the reason it was skipped.
pub fn read(path: &Path) -> Result<Rows, DataError> {
    let bytes = std::fs::read(path).map_err(|e| FileError::new(path, e))?;
    // Editors on Windows start UTF-8 files with a byte-order mark; it is not part of line 1.
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
    let stem = file_stem(path);
    let mut rows = Vec::new();
    let mut objects = 0usize;
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line_no = i + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let source = format!("{}:{line_no}", path.display());
        let skip = |reason: String| Skip::new(source.clone(), None, reason);
        let row = match std::str::from_utf8(line) {
            Err(e) => Err(skip(format!("invalid UTF-8: {e}"))),
            Ok(text) => match serde_json::from_str::<Value>(text) {
                Err(e) => Err(skip(format!("invalid JSON: {e}"))),
                Ok(Value::Object(obj)) => {
                    objects += 1;
                    record(&obj, &format!("{stem}:{line_no}"))
                        .map_err(|(id, reason)| Skip::new(source.clone(), id, reason))
                }
                Ok(other) => Err(skip(format!(
                    "not a JSON object: the line is {}",
                    kind(&other)
                ))),
            },
        };
        rows.push((source, row));
    }
    // Lines exist but none is an object: this is some other file, not a dataset with bad rows.
    if objects == 0 && !rows.is_empty() {
        let first = rows
            .iter()
            .find_map(|(_, r)| r.as_ref().err())
            .map(|s| s.reason.clone())
            .unwrap_or_default();
        return Err(DataError::Format {
            path: path.to_path_buf(),
            format: "TRL-style JSONL",
            message: format!("no line is a JSON object (first line: {first})"),
        });
    }
    Ok(rows)
}

/// The file stem used in positional ids.
pub fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// One object to a raw record, or the (id if known, reason) of its skip.
fn record(
    obj: &Map<String, Value>,
    fallback_id: &str,
) -> Result<RawRecord, (Option<String>, String)> {
    let id = explicit_id(obj, "id")
        .map_err(|e| (None, e))?
        .unwrap_or_else(|| fallback_id.to_owned());
    let fail = |reason: String| (Some(id.clone()), reason);
    let missing = |name: &str| fail(format!("missing field `{name}`"));
    // TRL's video datasets name their clips in `videos` (or `video`); misp trains on still
    // images, and a record whose video were dropped would be scored on its text alone.
    for name in ["videos", "video"] {
        match obj.get(name) {
            None | Some(Value::Null) => {}
            Some(Value::Array(list)) if list.is_empty() => {}
            Some(_) => {
                return Err(fail(format!(
                "`{name}`: video inputs are not supported (misp reads one still image per record)"
            )))
            }
        }
    }
    let prompt = match field_text(obj, "prompt", "user").map_err(fail)? {
        Some(p) => p,
        // Implicit prompt: the conversation in `chosen` starts with the user's turn.
        None => match obj.get("chosen") {
            Some(Value::Array(_)) => field_text(obj, "chosen", "user")
                .map_err(fail)?
                .unwrap_or_default(),
            _ => return Err(missing("prompt")),
        },
    };
    let chosen = field_text(obj, "chosen", "assistant")
        .map_err(fail)?
        .ok_or_else(|| missing("chosen"))?;
    let rejected = field_text(obj, "rejected", "assistant")
        .map_err(fail)?
        .ok_or_else(|| missing("rejected"))?;
    Ok(RawRecord {
        image: image(obj),
        id,
        prompt,
        chosen,
        rejected,
    })
}

/// The record's image, in the order of precedence the module doc gives.
fn image(obj: &Map<String, Value>) -> RawImage {
    match obj.get("images") {
        Some(Value::Array(list)) => match list.first() {
            Some(first) => return entry(first, "images[0]"),
            None => return RawImage::Missing("entry in `images`"),
        },
        None | Some(Value::Null) => {}
        Some(other) => {
            return RawImage::Invalid(format!("`images` is {}, expected a list", kind(other)))
        }
    }
    match obj.get("image") {
        None | Some(Value::Null) => {}
        Some(v) => return entry(v, "image"),
    }
    prompt_image_part(obj).unwrap_or(RawImage::Missing("`images` or `image` field"))
}

/// One image entry: a path string or `{"bytes", "path"}`.
fn entry(v: &Value, name: &str) -> RawImage {
    match v {
        Value::String(p) => RawImage::Path(p.clone()),
        Value::Object(o) => {
            match o.get("bytes") {
                Some(Value::String(b)) if !b.is_empty() => {
                    return match base64::decode(b) {
                        Ok(bytes) => RawImage::Bytes(bytes),
                        Err(e) => RawImage::Invalid(format!("`{name}.bytes`: {e}")),
                    }
                }
                None | Some(Value::Null) | Some(Value::String(_)) => {}
                Some(other) => {
                    return RawImage::Invalid(format!(
                        "`{name}.bytes` is {}, expected a base64 string",
                        kind(other)
                    ))
                }
            }
            match o.get("path") {
                Some(Value::String(p)) if !p.is_empty() => RawImage::Path(p.clone()),
                _ => RawImage::Missing("bytes or path in the image entry"),
            }
        }
        Value::Null => RawImage::Missing("image in the image entry"),
        other => RawImage::Invalid(format!(
            "`{name}` is {}, expected a path or {{\"bytes\", \"path\"}}",
            kind(other)
        )),
    }
}

/// `{"type": "image", "image" | "path": PATH}` in the prompt's messages, if any.
fn prompt_image_part(obj: &Map<String, Value>) -> Option<RawImage> {
    let messages = obj.get("prompt")?.as_array()?;
    messages
        .iter()
        .filter_map(|m| m.get("content")?.as_array())
        .flatten()
        .filter(|p| p.get("type").and_then(Value::as_str) == Some("image"))
        .find_map(|p| {
            let path = p.get("image").or_else(|| p.get("path"))?.as_str()?;
            Some(RawImage::Path(path.to_owned()))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn image_precedence() {
        let o = obj(json!({"images": [{"bytes": "Zm9v", "path": "a.jpg"}], "image": "b.jpg"}));
        assert!(matches!(image(&o), RawImage::Bytes(b) if b == b"foo"));
        let o = obj(json!({"images": [{"bytes": null, "path": "a.jpg"}, "c.jpg"]}));
        assert!(matches!(image(&o), RawImage::Path(p) if p == "a.jpg"));
        let o = obj(json!({"image": "b.jpg"}));
        assert!(matches!(image(&o), RawImage::Path(p) if p == "b.jpg"));
        let o = obj(
            json!({"prompt": [{"role": "user", "content": [{"type": "image", "image": "p.png"}]}]}),
        );
        assert!(matches!(image(&o), RawImage::Path(p) if p == "p.png"));
        assert!(matches!(
            image(&obj(json!({"images": []}))),
            RawImage::Missing(_)
        ));
        assert!(matches!(image(&obj(json!({}))), RawImage::Missing(_)));
        let bad = obj(json!({"images": [{"bytes": "!!"}]}));
        assert!(matches!(image(&bad), RawImage::Invalid(_)));
    }

    #[test]
    fn videos_are_refused_by_name() {
        let base = json!({"prompt": "Q?", "chosen": "Yes.", "rejected": "No.", "image": "a.jpg"});
        let with = |k: &str, v: Value| {
            let mut o = obj(base.clone());
            o.insert(k.into(), v);
            o
        };
        for (field, v) in [
            ("videos", json!(["clip.mp4"])),
            ("video", json!("clip.mp4")),
        ] {
            let (id, reason) = record(&with(field, v), "f:3").unwrap_err();
            assert_eq!(id.as_deref(), Some("f:3"));
            assert!(
                reason.contains(&format!("`{field}`")) && reason.contains("not supported"),
                "{reason}"
            );
        }
        // An empty `videos` list (a mixed dataset's image rows) is no video.
        assert!(record(&with("videos", json!([])), "f:4").is_ok());
        let part = json!({"role": "user", "content": [{"type": "video", "video": "c.mp4"}]});
        let chat = json!({"prompt": [part], "chosen": "Yes.", "rejected": "No.", "image": "a.jpg"});
        let (_, reason) = record(&obj(chat), "f:5").unwrap_err();
        assert!(
            reason.contains("video inputs are not supported"),
            "{reason}"
        );
    }

    #[test]
    fn implicit_prompt_comes_from_chosen() {
        let o = obj(json!({
            "image": "a.jpg",
            "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Yes."}],
            "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "No."}],
        }));
        let r = record(&o, "f:1").unwrap();
        assert_eq!(
            (r.prompt.as_str(), r.chosen.as_str(), r.rejected.as_str()),
            ("Q?", "Yes.", "No.")
        );
        assert_eq!(r.id, "f:1");
    }
}
