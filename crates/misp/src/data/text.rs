//! What every record format shares once its fields are found: the text rules (chat lists to
//! plain text, the `<image>` placeholder, empty fields) and the last checks that turn raw
//! fields into a [`PreferenceRecord`] or a [`Skip`].

use serde_json::{Map, Value};

use super::paths::DatasetRoot;
use super::{ImageSource, PreferenceRecord, Skip};

/// The placeholder LLaVA-style data puts in prompt strings. The image travels in
/// [`PreferenceRecord::image`], and each consumer (CLIP text tower, the VLM's chat template)
/// places it its own way, so the stored prompt is the bare question.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// An image as found in a record, before confinement.
#[derive(Debug)]
pub enum RawImage {
    Bytes(Vec<u8>),
    Path(String),
    /// None given; the string says what was looked for, for the skip reason.
    Missing(&'static str),
    /// Given but unusable (invalid base64, wrong type).
    Invalid(String),
}

/// A record's fields as read, still unchecked.
#[derive(Debug)]
pub struct RawRecord {
    pub id: String,
    pub image: RawImage,
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

/// A format reader's output: each row's source (`FILE:LINE`, `FILE#ROW`) with its raw record
/// or the reason it was skipped, in file order.
pub type Rows = Vec<(String, Result<RawRecord, Skip>)>;

/// Removes the `<image>` placeholder and surrounding whitespace from a prompt.
pub fn clean_prompt(prompt: &str) -> String {
    prompt.replace(IMAGE_PLACEHOLDER, "").trim().to_owned()
}

/// Checks a raw record and resolves its image under `root`: the record, or the skip for
/// `source`. Empty texts are checked before the image so the reason is the cheapest true one.
pub fn finish(source: &str, raw: RawRecord, root: &DatasetRoot) -> Result<PreferenceRecord, Skip> {
    let skip = |reason: String| Skip::new(source, Some(raw.id.clone()), reason);
    let prompt = clean_prompt(&raw.prompt);
    for (name, text) in [
        ("prompt", prompt.as_str()),
        ("chosen", raw.chosen.as_str()),
        ("rejected", raw.rejected.as_str()),
    ] {
        if text.trim().is_empty() {
            return Err(skip(format!("empty {name}")));
        }
    }
    let image = match raw.image {
        RawImage::Bytes(b) => ImageSource::Bytes(b),
        RawImage::Path(p) => ImageSource::Path(root.resolve(&p).map_err(&skip)?),
        RawImage::Missing(what) => return Err(skip(format!("no image: no {what}"))),
        RawImage::Invalid(why) => return Err(skip(format!("invalid image: {why}"))),
    };
    Ok(PreferenceRecord {
        id: raw.id,
        image,
        prompt,
        chosen: raw.chosen,
        rejected: raw.rejected,
    })
}

/// The text of a prompt/response field: a plain string, or a chat list from which the text
/// parts of the messages with `role` are taken (joined by newlines when there are several).
/// `Ok(None)` when the field is absent or null.
pub fn field_text(
    obj: &Map<String, Value>,
    name: &str,
    role: &str,
) -> Result<Option<String>, String> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(messages)) => chat_text(messages, role)
            .map(Some)
            .map_err(|e| format!("field `{name}`: {e}")),
        Some(other) => Err(format!(
            "field `{name}` is {}, expected a string or a chat list",
            kind(other)
        )),
    }
}

/// Text parts of the `role` messages of a chat list (`[{"role", "content"}]`, `content` a
/// string or a list of `{"type": "text", "text"}` / `{"type": "image"}` parts).
pub fn chat_text(messages: &[Value], role: &str) -> Result<String, String> {
    let mut texts = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let m = m
            .as_object()
            .ok_or_else(|| format!("message {i} is {}, expected an object", kind(m)))?;
        if m.get("role").and_then(Value::as_str) != Some(role) {
            continue;
        }
        match m.get("content") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => texts.push(s.as_str()),
            Some(Value::Array(parts)) => {
                for part in parts {
                    match part.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            if let Some(t) = part.get("text").and_then(Value::as_str) {
                                texts.push(t);
                            }
                        }
                        // Dropping the clip would leave a prompt that speaks of it.
                        Some("video" | "video_url") => {
                            return Err(format!(
                                "message {i} has a video part: video inputs are not supported"
                            ))
                        }
                        _ => {}
                    }
                }
            }
            Some(other) => {
                return Err(format!(
                    "message {i} content is {}, expected a string or a list of parts",
                    kind(other)
                ))
            }
        }
    }
    Ok(texts.join("\n"))
}

/// A JSON value's kind, for messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// An explicit id: a non-empty string, or an integer written in decimal. `Ok(None)` when
/// absent or null, so the caller falls back to its positional id.
pub fn explicit_id(obj: &Map<String, Value>, name: &str) -> Result<Option<String>, String> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(Some(n.to_string())),
        Some(other) => Err(format!(
            "field `{name}` is {}, expected a non-empty string or an integer",
            kind(other)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chat_lists_give_the_role_text() {
        let prompt = json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        ]);
        let chosen = json!([{"role": "assistant", "content": "A cat."}]);
        let obj = json!({"prompt": prompt, "chosen": chosen, "n": 3});
        let obj = obj.as_object().unwrap();
        assert_eq!(
            field_text(obj, "prompt", "user").unwrap().unwrap(),
            "What is it?"
        );
        assert_eq!(
            field_text(obj, "chosen", "assistant").unwrap().unwrap(),
            "A cat."
        );
        assert_eq!(field_text(obj, "rejected", "assistant").unwrap(), None);
        assert!(field_text(obj, "n", "user")
            .unwrap_err()
            .contains("a number"));
    }

    #[test]
    fn prompts_lose_the_placeholder() {
        assert_eq!(clean_prompt("<image>\nWhat is it?"), "What is it?");
        assert_eq!(clean_prompt("  <image> "), "");
    }

    #[test]
    fn ids_are_strings_or_integers() {
        let obj = json!({"a": "x1", "b": 7, "c": 1.5, "d": ""});
        let obj = obj.as_object().unwrap();
        assert_eq!(explicit_id(obj, "a").unwrap().unwrap(), "x1");
        assert_eq!(explicit_id(obj, "b").unwrap().unwrap(), "7");
        assert_eq!(explicit_id(obj, "z").unwrap(), None);
        assert!(explicit_id(obj, "c").is_err());
        assert!(explicit_id(obj, "d").is_err());
    }
}
