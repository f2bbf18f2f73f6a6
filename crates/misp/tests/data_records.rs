//! Preference record readers on generated inputs: an RLHF-V parquet written here with the
//! `openbmb/RLHF-V-Dataset` schema, TRL-style JSONL with plain strings, chat lists and bad
//! lines, mDPO JSON, and a folder of shards. Checks records, stable ids, skip reasons and
//! sources, and that image paths stay inside the dataset root.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use misp::data::{read_records, DataError, ImageSource, RecordFormat, RecordSet, Skip};
use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use serde_json::json;

/// A fresh folder per test, with `root/imgs/a.jpg` and `outside.jpg` next to `root`.
fn setup(name: &str) -> (PathBuf, PathBuf) {
    let base = std::env::temp_dir().join(format!("misp-data-rec-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&base);
    let root = base.join("root");
    fs::create_dir_all(root.join("imgs")).unwrap();
    fs::write(root.join("imgs/a.jpg"), b"jpeg a").unwrap();
    fs::write(base.join("outside.jpg"), b"secret").unwrap();
    (base, root)
}

fn skip_for<'a>(set: &'a RecordSet, source: &str) -> &'a Skip {
    set.skipped
        .iter()
        .find(|s| s.source == source)
        .unwrap_or_else(|| panic!("no skip at {source}: {:#?}", set.skipped))
}

fn ids(set: &RecordSet) -> Vec<&str> {
    set.records.iter().map(|r| r.id.as_str()).collect()
}

// ---------------------------------------------------------------------------------------------
// RLHF-V parquet

const RLHFV_SCHEMA: &str = "
message schema {
  optional group image {
    optional binary bytes;
    optional binary path (STRING);
  }
  optional binary text (STRING);
  optional int64 idx;
  optional binary ds_name (STRING);
}";

/// One RLHF-V row: image bytes, image path, text, idx (`None` = null).
type Row<'a> = (
    Option<&'a [u8]>,
    Option<&'a str>,
    Option<&'a str>,
    Option<i64>,
);

/// Writes `groups` (each a row group) in the RLHF-V schema; `image: null` when both bytes and
/// path are `None` and `null_image` holds the row.
fn write_rlhfv(path: &Path, groups: &[Vec<Row<'_>>], null_images: &[usize]) {
    let schema = Arc::new(parse_message_type(RLHFV_SCHEMA).unwrap());
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let mut writer =
        SerializedFileWriter::new(fs::File::create(path).unwrap(), schema, props).unwrap();
    let mut row_no = 0;
    for rows in groups {
        let mut rg = writer.next_row_group().unwrap();
        // Leaves in schema order: image.bytes, image.path (def levels 0 = image null,
        // 1 = field null, 2 = present), text, idx, ds_name (0 = null, 1 = present).
        let image_level = |present: bool, r: usize| -> i16 {
            if null_images.contains(&r) {
                0
            } else if present {
                2
            } else {
                1
            }
        };
        let mut bytes_vals = Vec::new();
        let mut bytes_defs = Vec::new();
        let mut path_vals = Vec::new();
        let mut path_defs = Vec::new();
        let mut text_vals = Vec::new();
        let mut text_defs = Vec::new();
        let mut idx_vals = Vec::new();
        let mut idx_defs = Vec::new();
        let mut ds_vals = Vec::new();
        for (i, (bytes, img_path, text, idx)) in rows.iter().enumerate() {
            let r = row_no + i;
            bytes_defs.push(image_level(bytes.is_some(), r));
            if let Some(b) = bytes {
                bytes_vals.push(ByteArray::from(*b));
            }
            path_defs.push(image_level(img_path.is_some(), r));
            if let Some(p) = img_path {
                path_vals.push(ByteArray::from(*p));
            }
            text_defs.push(i16::from(text.is_some()));
            if let Some(t) = text {
                text_vals.push(ByteArray::from(*t));
            }
            idx_defs.push(i16::from(idx.is_some()));
            if let Some(v) = idx {
                idx_vals.push(*v);
            }
            ds_vals.push(ByteArray::from("VQAv2"));
        }
        let ds_defs = vec![1i16; rows.len()];
        for (vals, defs) in [
            (&bytes_vals, &bytes_defs),
            (&path_vals, &path_defs),
            (&text_vals, &text_defs),
        ] {
            let mut col = rg.next_column().unwrap().unwrap();
            col.typed::<ByteArrayType>()
                .write_batch(vals, Some(defs), None)
                .unwrap();
            col.close().unwrap();
        }
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<Int64Type>()
            .write_batch(&idx_vals, Some(&idx_defs), None)
            .unwrap();
        col.close().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>()
            .write_batch(&ds_vals, Some(&ds_defs), None)
            .unwrap();
        col.close().unwrap();
        rg.close().unwrap();
        row_no += rows.len();
    }
    writer.close().unwrap();
}

fn text(q: &str, c: &str, r: &str) -> String {
    json!({"question": q, "chosen": c, "rejected": r}).to_string()
}

#[test]
fn rlhfv_parquet_records_and_skips() {
    let (base, root) = setup("rlhfv");
    let ok = text(
        "<image>\nWhat is in the image?",
        "A cat on a mat.",
        "A dog.",
    );
    let empty_chosen = text("Q?", "  ", "A dog.");
    let no_question = json!({"chosen": "c", "rejected": "r"}).to_string();
    let file = root.join("RLHF-V-Dataset.parquet");
    let groups = vec![
        vec![
            (
                Some(&b"\xff\xd8jpeg0"[..]),
                None,
                Some(ok.as_str()),
                Some(10),
            ), // 0 bytes
            (None, None, Some(ok.as_str()), Some(11)), // 1 null image
            (None, Some("imgs/a.jpg"), Some(ok.as_str()), Some(12)), // 2 path only
            (Some(&b"x"[..]), None, Some("{not json"), Some(13)), // 3 bad text
            (Some(&b"x"[..]), None, Some(empty_chosen.as_str()), Some(14)), // 4 empty chosen
        ],
        vec![
            (None, Some("../outside.jpg"), Some(ok.as_str()), Some(15)), // 5 escapes
            (Some(&b"y"[..]), None, Some(ok.as_str()), Some(10)),        // 6 duplicate idx
            (Some(&b"z"[..]), None, Some(ok.as_str()), None),            // 7 null idx
            (Some(&b"w"[..]), None, Some(no_question.as_str()), Some(18)), // 8 no question
            (Some(&b""[..]), None, Some(ok.as_str()), Some(19)),         // 9 empty bytes, no path
        ],
    ];
    write_rlhfv(&file, &groups, &[1]);

    let set = read_records(&file, None, None).unwrap();
    assert_eq!(ids(&set), ["10", "12", "RLHF-V-Dataset#7"]);
    let r0 = &set.records[0];
    assert_eq!(r0.image, ImageSource::Bytes(b"\xff\xd8jpeg0".to_vec()));
    assert_eq!(
        r0.prompt, "What is in the image?",
        "the <image> placeholder is dropped"
    );
    assert_eq!(
        (r0.chosen.as_str(), r0.rejected.as_str()),
        ("A cat on a mat.", "A dog.")
    );
    let ImageSource::Path(p) = &set.records[1].image else {
        panic!("row 2 has only a path: {:?}", set.records[1].image)
    };
    assert!(p.is_absolute() && p.ends_with("root/imgs/a.jpg"), "{p:?}");
    assert_eq!(fs::read(p).unwrap(), b"jpeg a");

    let at = |row: usize| format!("{}#{row}", file.display());
    let s = skip_for(&set, &at(1));
    assert_eq!(s.id.as_deref(), Some("11"));
    assert!(s.reason.starts_with("no image"), "{s:?}");
    assert!(skip_for(&set, &at(3))
        .reason
        .starts_with("invalid text JSON"));
    assert_eq!(skip_for(&set, &at(4)).reason, "empty chosen");
    let s = skip_for(&set, &at(5));
    assert!(
        s.reason.starts_with("image path escapes the dataset root"),
        "{s:?}"
    );
    let s = skip_for(&set, &at(6));
    assert_eq!(
        (s.id.as_deref(), s.reason.as_str()),
        (Some("10"), "duplicate id")
    );
    assert_eq!(
        skip_for(&set, &at(8)).reason,
        "missing field `text.question`"
    );
    assert!(skip_for(&set, &at(9)).reason.starts_with("no image"));
    assert_eq!(
        set.records.len() + set.skipped.len(),
        10,
        "every row accounted for"
    );

    // Stable: a second read gives the same records and skips.
    let again = read_records(&file, Some(RecordFormat::RlhfvParquet), None).unwrap();
    assert_eq!(again.records, set.records);
    assert_eq!(again.skipped, set.skipped);

    // With an image root, paths resolve there instead of next to the parquet file.
    let other = base.join("other");
    fs::create_dir_all(other.join("imgs")).unwrap();
    fs::write(other.join("imgs/a.jpg"), b"other a").unwrap();
    let set = read_records(&file, None, Some(&other)).unwrap();
    let ImageSource::Path(p) = &set.records[1].image else {
        panic!()
    };
    assert_eq!(fs::read(p).unwrap(), b"other a");
    fs::remove_dir_all(base).unwrap();
}

#[test]
fn rlhfv_unreadable_row_group_is_skipped_row_by_row() {
    let (base, root) = setup("rlhfv-corrupt");
    let ok = text("Q?", "yes", "no");
    let file = root.join("d.parquet");
    let long = "x".repeat(4000);
    let long_text = text(&long, "yes", "no");
    let groups = vec![
        vec![(Some(&b"a"[..]), None, Some(ok.as_str()), Some(1))],
        vec![
            (Some(&b"b"[..]), None, Some(long_text.as_str()), Some(2)),
            (Some(&b"c"[..]), None, Some(long_text.as_str()), Some(3)),
        ],
    ];
    write_rlhfv(&file, &groups, &[]);
    // Overwrite the middle of the second row group's `text` column chunk with garbage.
    let (start, len) = {
        let reader = SerializedFileReader::new(fs::File::open(&file).unwrap()).unwrap();
        let col = reader.metadata().row_group(1).column(2).clone();
        col.byte_range()
    };
    let mut bytes = fs::read(&file).unwrap();
    for b in &mut bytes[(start + len / 4) as usize..(start + 3 * len / 4) as usize] {
        *b = 0xAB;
    }
    fs::write(&file, bytes).unwrap();

    let set = read_records(&file, None, None).unwrap();
    assert_eq!(ids(&set), ["1"]);
    assert_eq!(set.skipped.len(), 2, "{:#?}", set.skipped);
    for (s, row) in set.skipped.iter().zip([1, 2]) {
        assert_eq!(s.source, format!("{}#{row}", file.display()));
        assert!(s.reason.starts_with("unreadable row"), "{s:?}");
    }
    fs::remove_dir_all(base).unwrap();
}

#[test]
fn rlhfv_files_that_are_not_rlhfv_are_errors() {
    let (base, root) = setup("rlhfv-bad");
    let junk = root.join("junk.parquet");
    fs::write(&junk, b"not parquet at all").unwrap();
    let err = read_records(&junk, None, None).unwrap_err();
    assert!(matches!(err, DataError::Format { .. }), "{err}");
    assert!(err.to_string().contains("junk.parquet"), "{err}");

    let other = root.join("other.parquet");
    let schema = Arc::new(parse_message_type("message schema { required int64 x; }").unwrap());
    let mut w = SerializedFileWriter::new(
        fs::File::create(&other).unwrap(),
        schema,
        Default::default(),
    )
    .unwrap();
    let mut rg = w.next_row_group().unwrap();
    let mut col = rg.next_column().unwrap().unwrap();
    col.typed::<Int64Type>()
        .write_batch(&[1], None, None)
        .unwrap();
    col.close().unwrap();
    rg.close().unwrap();
    w.close().unwrap();
    let err = read_records(&other, None, None).unwrap_err().to_string();
    assert!(
        err.contains("other.parquet") && err.contains("no `image` column"),
        "{err}"
    );

    let missing = root.join("missing.parquet");
    let err = read_records(&missing, None, None).unwrap_err();
    assert!(matches!(err, DataError::File(_)) && err.to_string().contains("missing.parquet"));
    fs::remove_dir_all(base).unwrap();
}

// ---------------------------------------------------------------------------------------------
// TRL-style JSONL

fn b64(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn trl_jsonl_records_and_skips() {
    let (base, root) = setup("trl");
    let outside = base.join("outside.jpg");
    let chat = json!({
        "images": [{"bytes": b64(b"\x89PNG data"), "path": null}],
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A red ball."}]}],
        "rejected": [{"role": "assistant", "content": "A blue cube."}],
    });
    let lines = [
        json!({"id": "a", "images": ["imgs/a.jpg"], "prompt": "<image>\nWhat?", "chosen": "Yes", "rejected": "No"}).to_string(),
        chat.to_string(),
        "{bad json".to_string(),
        String::new(),
        json!({"image": "imgs/a.jpg", "prompt": "Q", "chosen": "", "rejected": "n"}).to_string(),
        json!({"prompt": "Q", "chosen": "c", "rejected": "r"}).to_string(),
        json!({"id": "a", "image": "imgs/a.jpg", "prompt": "Q", "chosen": "c", "rejected": "r"}).to_string(),
        json!({"image": "../outside.jpg", "prompt": "Q", "chosen": "c", "rejected": "r"}).to_string(),
        json!({"image": outside.to_str().unwrap(), "prompt": "Q", "chosen": "c", "rejected": "r"}).to_string(),
        json!({"image": "imgs/missing.jpg", "prompt": "Q", "chosen": "c", "rejected": "r"}).to_string(),
        "[1, 2]".to_string(),
        json!({"id": 42, "image": {"bytes": null, "path": "imgs/a.jpg"}, "prompt": "Q", "chosen": "c", "rejected": "r"}).to_string() + "\r",
        json!({"image": "imgs/a.jpg", "prompt": "<image>", "chosen": "c", "rejected": "r"}).to_string(),
    ];
    let file = root.join("trl.jsonl");
    // With a byte-order mark, which must not cost line 1.
    fs::write(&file, "\u{feff}".to_string() + &lines.join("\n") + "\n").unwrap();

    let set = read_records(&file, None, None).unwrap();
    assert_eq!(ids(&set), ["a", "trl:2", "42"]);
    let a = &set.records[0];
    assert_eq!(
        (a.prompt.as_str(), a.chosen.as_str(), a.rejected.as_str()),
        ("What?", "Yes", "No")
    );
    assert!(matches!(&a.image, ImageSource::Path(p) if p.ends_with("imgs/a.jpg")));
    let c = &set.records[1];
    assert_eq!(c.image, ImageSource::Bytes(b"\x89PNG data".to_vec()));
    assert_eq!(
        (c.prompt.as_str(), c.chosen.as_str(), c.rejected.as_str()),
        ("Describe it.", "A red ball.", "A blue cube.")
    );
    assert!(matches!(&set.records[2].image, ImageSource::Path(p) if p.ends_with("imgs/a.jpg")));

    let at = |line: usize| format!("{}:{line}", file.display());
    let s = skip_for(&set, &at(3));
    assert!(
        s.reason.starts_with("invalid JSON") && s.id.is_none(),
        "{s:?}"
    );
    let s = skip_for(&set, &at(5));
    assert_eq!(
        (s.id.as_deref(), s.reason.as_str()),
        (Some("trl:5"), "empty chosen")
    );
    assert!(skip_for(&set, &at(6)).reason.starts_with("no image"));
    assert_eq!(skip_for(&set, &at(7)).reason, "duplicate id");
    for line in [8, 9] {
        let s = skip_for(&set, &at(line));
        assert!(
            s.reason.starts_with("image path escapes the dataset root"),
            "{s:?}"
        );
    }
    assert!(skip_for(&set, &at(10))
        .reason
        .starts_with("image not found"));
    assert!(skip_for(&set, &at(11))
        .reason
        .starts_with("not a JSON object"));
    assert_eq!(skip_for(&set, &at(13)).reason, "empty prompt");
    assert_eq!(set.skipped.len(), 9, "{:#?}", set.skipped);

    let again = read_records(&file, None, None).unwrap();
    assert_eq!((again.records, again.skipped), (set.records, set.skipped));
    fs::remove_dir_all(base).unwrap();
}

#[test]
fn trl_files_that_are_not_jsonl_are_errors() {
    let (base, root) = setup("trl-bad");
    let csv = root.join("data.jsonl");
    fs::write(&csv, "prompt,chosen,rejected\nq,c,r\n").unwrap();
    let err = read_records(&csv, None, None).unwrap_err();
    assert!(
        matches!(err, DataError::Format { .. }) && err.to_string().contains("data.jsonl"),
        "{err}"
    );

    let unknown = root.join("data.csv");
    fs::write(&unknown, "x").unwrap();
    let err = read_records(&unknown, None, None).unwrap_err();
    assert!(matches!(err, DataError::UnknownFormat { .. }), "{err}");
    // The same file read with an explicit format.
    let line = json!({"image": "imgs/a.jpg", "prompt": "Q", "chosen": "c", "rejected": "r"});
    fs::write(&unknown, line.to_string()).unwrap();
    let set = read_records(&unknown, Some(RecordFormat::TrlJsonl), None).unwrap();
    assert_eq!(ids(&set), ["data:1"]);

    // An image root that does not exist is an error naming it.
    let err = read_records(
        &unknown,
        Some(RecordFormat::TrlJsonl),
        Some(&root.join("nope")),
    );
    assert!(err.unwrap_err().to_string().contains("nope"));
    fs::remove_dir_all(base).unwrap();
}

// ---------------------------------------------------------------------------------------------
// mDPO JSON

#[test]
fn mdpo_json_records_and_skips() {
    let (base, root) = setup("mdpo");
    #[cfg(unix)]
    std::os::unix::fs::symlink(base.join("outside.jpg"), root.join("imgs/link.jpg")).unwrap();
    let data = json!([
        {"id": "m0", "img_path": "imgs/a.jpg", "prompt": "<image>\nCount the cats.", "chosen": "Two.", "rejected": "Three."},
        {"img_path": "./imgs/a.jpg", "prompt": "Q", "chosen": "c", "rejected": "r"},
        {"prompt": "Q", "chosen": "c", "rejected": "r"},
        {"img_path": "imgs/a.jpg", "prompt": "Q", "chosen": "c", "rejected": ""},
        "not an object",
        {"id": "m0", "img_path": "imgs/a.jpg", "prompt": "Q", "chosen": "c", "rejected": "r"},
        {"img_path": "imgs/link.jpg", "prompt": "Q", "chosen": "c", "rejected": "r"},
        {"img_path": "imgs/a.jpg", "prompt": "Q", "chosen": 3, "rejected": "r"},
    ]);
    let file = root.join("mdpo.json");
    fs::write(&file, serde_json::to_string_pretty(&data).unwrap()).unwrap();

    let set = read_records(&file, None, None).unwrap();
    assert_eq!(ids(&set), ["m0", "mdpo#1"]);
    assert_eq!(set.records[0].prompt, "Count the cats.");
    assert_eq!(set.records[0].image, set.records[1].image, "./ folds away");

    let at = |i: usize| format!("{}#{i}", file.display());
    assert!(skip_for(&set, &at(2)).reason.starts_with("no image"));
    assert_eq!(skip_for(&set, &at(3)).reason, "empty rejected");
    assert!(skip_for(&set, &at(4))
        .reason
        .starts_with("not a JSON object"));
    assert_eq!(skip_for(&set, &at(5)).reason, "duplicate id");
    #[cfg(unix)]
    {
        let s = skip_for(&set, &at(6));
        assert!(
            s.reason
                .contains("escapes the dataset root (through a symlink)"),
            "{s:?}"
        );
    }
    assert!(skip_for(&set, &at(7))
        .reason
        .contains("`chosen` is a number"));

    let not_array = root.join("obj.json");
    fs::write(&not_array, "{\"a\": 1}").unwrap();
    let err = read_records(&not_array, None, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("obj.json") && err.contains("not mDPO JSON"),
        "{err}"
    );
    fs::remove_dir_all(base).unwrap();
}

// ---------------------------------------------------------------------------------------------
// A folder of shards

#[test]
fn folder_of_shards_reads_in_name_order_with_unique_ids() {
    let (base, root) = setup("shards");
    let rec = |id: &str| {
        json!({"id": id, "image": "imgs/a.jpg", "prompt": "Q", "chosen": "c", "rejected": "r"})
            .to_string()
    };
    fs::write(root.join("b.jsonl"), rec("x") + "\n" + &rec("y")).unwrap();
    fs::write(root.join("a.jsonl"), rec("z") + "\n" + &rec("x")).unwrap();
    fs::write(root.join("notes.md"), "ignored").unwrap();
    let set = read_records(&root, None, None).unwrap();
    assert_eq!(ids(&set), ["z", "x", "y"]);
    let s = &set.skipped[0];
    assert_eq!(
        (s.source.as_str(), s.reason.as_str()),
        (
            format!("{}:1", root.join("b.jsonl").display()).as_str(),
            "duplicate id"
        )
    );

    fs::write(root.join("c.json"), "[]").unwrap();
    let err = read_records(&root, None, None).unwrap_err().to_string();
    assert!(err.contains("mixes"), "{err}");
    let set = read_records(&root, Some(RecordFormat::MdpoJson), None).unwrap();
    assert!(set.records.is_empty() && set.skipped.is_empty());
    fs::remove_dir_all(base).unwrap();
}
