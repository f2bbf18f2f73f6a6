//! RLHF-V parquet preference records, in the layout of HF `openbmb/RLHF-V-Dataset`: `image` a
//! struct `{bytes: binary, path: string}` (either may be null), `text` a JSON string
//! `{"question", "chosen", "rejected"}`, `idx` an integer; other columns (`ds_name`,
//! `origin_dataset`, ...) are not read at all (the reader projects the three it needs).
//!
//! Ids: `idx` in decimal; a file without an `idx` column, or a row whose `idx` is null, gets
//! `STEM#ROW` (0-based row in the file), which is also where the skip `source` points.
//!
//! Reading goes row group by row group with parquet's record API. A row group that cannot be
//! decoded skips all its rows (each counted) and reading goes on with the next one; parquet's
//! own file-level iterator would retry a failing row group forever, so it is not used.

use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use parquet::schema::types::Type;
use serde_json::Value;

use super::text::{kind, RawImage, RawRecord, Rows};
use super::trl::file_stem;
use super::{DataError, Skip};
use crate::files::FileError;

const FORMAT: &str = "an RLHF-V parquet file";

/// Rows of `path`, each with its `FILE#ROW` source: a raw record or its skip.
pub fn read(path: &Path) -> Result<Rows, DataError> {
    let file = File::open(path).map_err(|e| FileError::new(path, e))?;
    let not_rlhfv = |message: String| DataError::Format {
        path: path.to_path_buf(),
        format: FORMAT,
        message,
    };
    let reader = SerializedFileReader::new(file).map_err(|e| not_rlhfv(e.to_string()))?;
    let schema = reader.metadata().file_metadata().schema();
    let fields: Vec<Arc<Type>> = schema
        .get_fields()
        .iter()
        .filter(|f| matches!(f.name(), "image" | "text" | "idx"))
        .cloned()
        .collect();
    for required in ["image", "text"] {
        if !fields.iter().any(|f| f.name() == required) {
            return Err(not_rlhfv(format!("no `{required}` column")));
        }
    }
    let projection = Type::group_type_builder(schema.name())
        .with_fields(fields)
        .build()
        .map_err(|e| not_rlhfv(e.to_string()))?;

    let stem = file_stem(path);
    let mut rows = Vec::new();
    let mut first_row = 0usize;
    for g in 0..reader.num_row_groups() {
        let group_rows = usize::try_from(reader.metadata().row_group(g).num_rows()).unwrap_or(0);
        let read_group = || -> Result<Vec<Result<Row, String>>, String> {
            let group = reader.get_row_group(g).map_err(|e| e.to_string())?;
            let iter = parquet::record::reader::RowIter::from_row_group(
                Some(projection.clone()),
                group.as_ref(),
            )
            .map_err(|e| e.to_string())?;
            Ok(iter.map(|r| r.map_err(|e| e.to_string())).collect())
        };
        // The decoder is third-party code fed untrusted bytes: a panic inside it is turned into
        // skipped rows rather than taking the run down (docs/design.md §7: never a panic).
        let decoded = match catch_unwind(AssertUnwindSafe(read_group)) {
            Ok(r) => r,
            Err(_) => Err("the parquet decoder panicked".into()),
        };
        let decoded = match decoded {
            Ok(rows) => rows,
            Err(e) => vec![Err(e); group_rows],
        };
        let mut broken: Option<String> = None;
        for (i, row) in decoded.into_iter().enumerate() {
            let n = first_row + i;
            let source = format!("{}#{n}", path.display());
            // After one unreadable row the column readers are out of step; the rest of the
            // group is not trusted either.
            let row = match (&broken, row) {
                (Some(e), _) => Err(e.clone()),
                (None, Err(e)) => {
                    broken = Some(e.clone());
                    Err(e)
                }
                (None, Ok(row)) => Ok(row),
            };
            let result = match row {
                Err(e) => Err(Skip::new(
                    source.clone(),
                    None,
                    format!("unreadable row: {e}"),
                )),
                Ok(row) => record(&row, &format!("{stem}#{n}"))
                    .map_err(|(id, reason)| Skip::new(source.clone(), id, reason)),
            };
            rows.push((source, result));
        }
        first_row += group_rows;
    }
    Ok(rows)
}

fn column<'a>(row: &'a Row, name: &str) -> Option<&'a Field> {
    row.get_column_iter()
        .find(|(n, _)| n.as_str() == name)
        .map(|(_, f)| f)
}

/// A string-ish field: UTF-8 strings, or binary holding UTF-8 (writers differ in annotating).
fn as_text(f: &Field) -> Option<Result<String, String>> {
    match f {
        Field::Str(s) => Some(Ok(s.clone())),
        Field::Bytes(b) => Some(
            std::str::from_utf8(b.data())
                .map(str::to_owned)
                .map_err(|e| format!("invalid UTF-8: {e}")),
        ),
        _ => None,
    }
}

fn record(row: &Row, fallback_id: &str) -> Result<RawRecord, (Option<String>, String)> {
    let id = match column(row, "idx") {
        None | Some(Field::Null) => fallback_id.to_owned(),
        Some(Field::Byte(v)) => v.to_string(),
        Some(Field::Short(v)) => v.to_string(),
        Some(Field::Int(v)) => v.to_string(),
        Some(Field::Long(v)) => v.to_string(),
        Some(Field::UByte(v)) => v.to_string(),
        Some(Field::UShort(v)) => v.to_string(),
        Some(Field::UInt(v)) => v.to_string(),
        Some(Field::ULong(v)) => v.to_string(),
        Some(f) => match as_text(f) {
            Some(Ok(s)) if !s.is_empty() => s,
            _ => return Err((None, format!("field `idx` is not an integer: {f}"))),
        },
    };
    let fail = |reason: String| (Some(id.clone()), reason);

    let text = match column(row, "text").and_then(as_text) {
        Some(Ok(t)) => t,
        Some(Err(e)) => return Err(fail(format!("invalid text: {e}"))),
        None => return Err(fail("missing field `text`".into())),
    };
    let obj = match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(o)) => o,
        Ok(other) => {
            return Err(fail(format!(
                "invalid text JSON: `text` holds {}, expected an object",
                kind(&other)
            )))
        }
        Err(e) => return Err(fail(format!("invalid text JSON: {e}"))),
    };
    let part = |name: &str| match obj.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) => Err(fail(format!("missing field `text.{name}`"))),
        Some(other) => Err(fail(format!(
            "field `text.{name}` is {}, expected a string",
            kind(other)
        ))),
    };
    let (prompt, chosen, rejected) = (part("question")?, part("chosen")?, part("rejected")?);

    Ok(RawRecord {
        image: image(column(row, "image")),
        id,
        prompt,
        chosen,
        rejected,
    })
}

/// Bytes when present and non-empty, else the path, as `datasets` decodes an `Image` feature.
fn image(f: Option<&Field>) -> RawImage {
    let group = match f {
        None | Some(Field::Null) => return RawImage::Missing("`image` value"),
        Some(Field::Group(g)) => g,
        // Some exports flatten the struct to its bytes; take them as they are.
        Some(Field::Bytes(b)) if !b.data().is_empty() => return RawImage::Bytes(b.data().to_vec()),
        // Not the value itself in the message: it may be megabytes of image.
        Some(_) => return RawImage::Invalid("`image` is not a {bytes, path} struct".into()),
    };
    match column(group, "bytes") {
        Some(Field::Bytes(b)) if !b.data().is_empty() => return RawImage::Bytes(b.data().to_vec()),
        _ => {}
    }
    match column(group, "path").and_then(as_text) {
        Some(Ok(p)) if !p.is_empty() => RawImage::Path(p),
        Some(Err(e)) => RawImage::Invalid(format!("`image.path`: {e}")),
        _ => RawImage::Missing("bytes or path in `image`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::data_type::ByteArray;

    fn group(bytes: Option<&[u8]>, path: Option<&str>) -> Field {
        let field = |v: Option<Field>| v.unwrap_or(Field::Null);
        Field::Group(Row::new(vec![
            (
                "bytes".into(),
                field(bytes.map(|b| Field::Bytes(ByteArray::from(b)))),
            ),
            ("path".into(), field(path.map(|p| Field::Str(p.into())))),
        ]))
    }

    #[test]
    fn image_field_shapes() {
        let both = group(Some(b"jpg"), Some("a.jpg"));
        assert!(matches!(image(Some(&both)), RawImage::Bytes(b) if b == b"jpg"));
        let path = group(Some(b""), Some("a.jpg"));
        assert!(matches!(image(Some(&path)), RawImage::Path(p) if p == "a.jpg"));
        assert!(matches!(
            image(Some(&group(None, None))),
            RawImage::Missing(_)
        ));
        assert!(matches!(image(Some(&Field::Null)), RawImage::Missing(_)));
        assert!(matches!(image(None), RawImage::Missing(_)));
        let flat = Field::Bytes(ByteArray::from(&b"png"[..]));
        assert!(matches!(image(Some(&flat)), RawImage::Bytes(b) if b == b"png"));
        let RawImage::Invalid(why) = image(Some(&Field::Long(3))) else {
            panic!("a number is not an image")
        };
        assert!(
            !why.contains('3'),
            "the value stays out of the message: {why}"
        );
    }
}
