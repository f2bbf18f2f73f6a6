//! Preference records from any supported file, or from a folder of shards, into
//! [`PreferenceRecord`]s with stable ids.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::paths::DatasetRoot;
use super::text::{self, RawRecord};
use super::{dedup_ids, mdpo, rlhfv, trl, DataError, PreferenceRecord, Skip};
use crate::files::FileError;

/// The record file formats, told from the extension unless given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecordFormat {
    /// `.parquet`: HF `openbmb/RLHF-V-Dataset` layout.
    RlhfvParquet,
    /// `.jsonl`: TRL-style, one record per line.
    TrlJsonl,
    /// `.json`: mDPO, one array of records.
    MdpoJson,
}

impl RecordFormat {
    pub const ALL: [RecordFormat; 3] = [Self::RlhfvParquet, Self::TrlJsonl, Self::MdpoJson];

    /// The format a file name implies (case-insensitive extension), if any.
    pub fn from_path(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        Self::ALL.into_iter().find(|f| f.extension() == ext)
    }

    /// The extension this format's files carry.
    pub fn extension(self) -> &'static str {
        match self {
            Self::RlhfvParquet => "parquet",
            Self::TrlJsonl => "jsonl",
            Self::MdpoJson => "json",
        }
    }

    /// The name used on the command line (`--format`).
    pub fn name(self) -> &'static str {
        match self {
            Self::RlhfvParquet => "rlhfv-parquet",
            Self::TrlJsonl => "trl-jsonl",
            Self::MdpoJson => "mdpo-json",
        }
    }
}

impl fmt::Display for RecordFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for RecordFormat {
    type Err = String;

    /// Accepts the full names (`rlhfv-parquet`, `trl-jsonl`, `mdpo-json`) and the short ones
    /// (`rlhfv`, `trl`, `mdpo`).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "rlhfv-parquet" | "rlhfv" | "rlhf-v" => Ok(Self::RlhfvParquet),
            "trl-jsonl" | "trl" => Ok(Self::TrlJsonl),
            "mdpo-json" | "mdpo" => Ok(Self::MdpoJson),
            _ => Err(format!(
                "unknown record format {s:?}; expected rlhfv-parquet, trl-jsonl or mdpo-json"
            )),
        }
    }
}

/// What [`read_records`] found: usable records in source order, and everything skipped.
#[derive(Debug, Clone, Default)]
pub struct RecordSet {
    pub records: Vec<PreferenceRecord>,
    pub skipped: Vec<Skip>,
}

const EXPECTED: &str =
    "expected .parquet (RLHF-V), .jsonl (TRL) or .json (mDPO), or give the format";

/// Reads preference records from `src`: a file, or a folder whose files (not recursive, sorted
/// by name) are shards of one dataset in one format.
///
/// `format` overrides detection from the extension; with a folder it also picks which files
/// are read (those with the format's extension). Image paths in the records are resolved
/// under `image_root`, or else under the folder holding the file (the folder itself for a
/// folder source), and must stay inside it.
///
/// Ids are stable (see each format: `idx`/`id` when the data has them, `STEM:LINE` or
/// `STEM#INDEX` otherwise) and unique in the result: a repeated id (in one file or across
/// shards) keeps its first usable record and skips the later ones as `duplicate id`.
pub fn read_records(
    src: &Path,
    format: Option<RecordFormat>,
    image_root: Option<&Path>,
) -> Result<RecordSet, DataError> {
    let meta = std::fs::metadata(src).map_err(|e| FileError::new(src, e))?;
    let (files, default_root) = if meta.is_dir() {
        (shards(src, format)?, src.to_path_buf())
    } else {
        let format = format
            .or_else(|| RecordFormat::from_path(src))
            .ok_or_else(|| DataError::UnknownFormat {
                path: src.to_path_buf(),
                expected: EXPECTED,
            })?;
        let parent = src
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        (vec![(src.to_path_buf(), format)], parent.to_path_buf())
    };
    let root = DatasetRoot::new(image_root.unwrap_or(&default_root))?;

    let mut skipped = Vec::new();
    let mut found = Vec::new();
    for (file, format) in files {
        let rows = match format {
            RecordFormat::RlhfvParquet => rlhfv::read(&file)?,
            RecordFormat::TrlJsonl => trl::read(&file)?,
            RecordFormat::MdpoJson => mdpo::read(&file)?,
        };
        for (source, row) in rows {
            match row.and_then(|raw: RawRecord| text::finish(&source, raw, &root)) {
                Ok(record) => found.push((source, record)),
                Err(skip) => skipped.push(skip),
            }
        }
    }
    let records = dedup_ids(found, |r: &PreferenceRecord| &r.id, &mut skipped);
    Ok(RecordSet { records, skipped })
}

/// The record files of a folder, sorted by name, all in one format.
fn shards(
    dir: &Path,
    format: Option<RecordFormat>,
) -> Result<Vec<(PathBuf, RecordFormat)>, DataError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| FileError::new(dir, e))? {
        let path = entry.map_err(|e| FileError::new(dir, e))?.path();
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden || !path.is_file() {
            continue;
        }
        let Some(found) = RecordFormat::from_path(&path) else {
            continue;
        };
        if format.is_none_or(|f| f == found) {
            files.push((path, found));
        }
    }
    files.sort();
    let formats: std::collections::BTreeSet<_> = files.iter().map(|(_, f)| f.name()).collect();
    if formats.len() > 1 {
        return Err(DataError::Format {
            path: dir.to_path_buf(),
            format: "a folder of record files in one format",
            message: format!(
                "it mixes {}; give the format to pick one",
                formats.into_iter().collect::<Vec<_>>().join(", ")
            ),
        });
    }
    if files.is_empty() {
        return Err(DataError::Format {
            path: dir.to_path_buf(),
            format: "a folder of record files",
            message: match format {
                Some(f) => format!("no .{} files in it", f.extension()),
                None => "no .parquet, .jsonl or .json files in it".into(),
            },
        });
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_from_names_and_strings() {
        assert_eq!(
            RecordFormat::from_path(Path::new("a/train.PARQUET")),
            Some(RecordFormat::RlhfvParquet)
        );
        assert_eq!(
            RecordFormat::from_path(Path::new("x.jsonl")),
            Some(RecordFormat::TrlJsonl)
        );
        assert_eq!(
            RecordFormat::from_path(Path::new("x.json")),
            Some(RecordFormat::MdpoJson)
        );
        assert_eq!(RecordFormat::from_path(Path::new("x.csv")), None);
        for f in RecordFormat::ALL {
            assert_eq!(f.name().parse::<RecordFormat>().unwrap(), f);
        }
        assert_eq!(
            "trl".parse::<RecordFormat>().unwrap(),
            RecordFormat::TrlJsonl
        );
        assert!("csv".parse::<RecordFormat>().is_err());
    }
}
