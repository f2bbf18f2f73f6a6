//! The negatives file: one JSON object per record, the hand-off from mining to training.
//!
//! `{"id": ..., "negatives": [{"image": <pool id | "crop" | "noise">, "strategy": ...,
//! "score": s, "recon": .., "l1": .., "q": .., "seed": ..}, ...]}` (docs/design.md §2). Fields
//! without a meaning for a strategy are `null` (a random negative has no SAE score; a
//! similarity or synthetic negative has no proposal probability). Synthetic negatives carry the
//! seed that regenerates their pixels.
//!
//! Writing appends one complete line per record and flushes it, so an interrupted run leaves
//! at most one partial trailing line; reopening cuts it off and reports the ids already done.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::files::{self, FileError};

/// One selected negative image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Negative {
    /// A pool id, or `"crop"` / `"noise"` for negatives synthesised from the positive.
    pub image: String,
    /// The strategy that chose it (`misp`, `random`, `similarity`, `crop`, `noise`).
    pub strategy: String,
    /// Eq. 12 score (SAE strategies only).
    pub score: Option<f64>,
    /// SAE reconstruction error `||x - x_hat||^2`.
    pub recon: Option<f64>,
    /// SAE activation mass `||z||_1`.
    pub l1: Option<f64>,
    /// Probability under which the negative was proposed, for the Eq. 8 weights.
    pub q: Option<f64>,
    /// Seed of a synthetic (crop / noise) negative's pixels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// All negatives of one record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordNegatives {
    pub id: String,
    pub negatives: Vec<Negative>,
}

#[derive(Debug, thiserror::Error)]
pub enum NegativesError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path}:{line}: {message}")]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: exists and is not a regular file; --out must name a file")]
    NotAFile { path: PathBuf },
}

/// Reads a whole negatives file; every malformed line is an error naming the line.
pub fn read(path: &Path) -> Result<Vec<RecordNegatives>, NegativesError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (line, text) in files::read_lines(path)? {
        let err = |message: String| NegativesError::Line {
            path: path.to_path_buf(),
            line,
            message,
        };
        let rec: RecordNegatives =
            serde_json::from_str(&text).map_err(|e| err(format!("not a negatives record: {e}")))?;
        if !seen.insert(rec.id.clone()) {
            return Err(err(format!("duplicate record id {:?}", rec.id)));
        }
        if let Some(bad) = rec
            .negatives
            .iter()
            .find_map(|n| n.q.filter(|q| !(q.is_finite() && *q > 0.0 && *q <= 1.0)))
        {
            return Err(err(format!(
                "record {:?}: q = {bad} is not a probability in (0, 1]",
                rec.id
            )));
        }
        out.push(rec);
    }
    Ok(out)
}

/// Appends records to a negatives file, one flushed line each.
pub struct Writer {
    path: PathBuf,
    file: File,
}

impl Writer {
    /// Opens `path` for appending, creating it if needed. A partial last line (an interrupted
    /// write) is cut off; the ids of the complete lines are returned so the caller skips them.
    pub fn open(path: &Path) -> Result<(Self, HashSet<String>), NegativesError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| FileError::new(dir, e))?;
        }
        let io = |e| FileError::new(path, e);
        // A device or a folder is not an output file: /dev/full, say, reads as endless zeros.
        if let Ok(meta) = std::fs::metadata(path) {
            if !meta.is_file() {
                return Err(NegativesError::NotAFile {
                    path: path.to_path_buf(),
                });
            }
        }
        let mut file = OpenOptions::new()
            .read(true)
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        // Read what the file held when opened, no more (a file that grows meanwhile must not
        // keep this read going).
        let len = file.metadata().map_err(io)?.len();
        let mut text = Vec::new();
        (&mut file).take(len).read_to_end(&mut text).map_err(io)?;
        let complete = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if complete < text.len() {
            file.set_len(complete as u64).map_err(io)?;
            file.seek(SeekFrom::End(0)).map_err(io)?;
        }
        let mut done = HashSet::new();
        for (i, line) in text[..complete].split(|b| *b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let rec: RecordNegatives = serde_json::from_slice(line).map_err(|e| NegativesError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                message: format!("existing output is not a negatives record ({e}); delete the file or choose another --out"),
            })?;
            done.insert(rec.id);
        }
        Ok((
            Self {
                path: path.to_path_buf(),
                file,
            },
            done,
        ))
    }

    /// Appends one record as a single write of a complete line, then flushes it to disk.
    pub fn append(&mut self, rec: &RecordNegatives) -> Result<(), NegativesError> {
        let mut line = serde_json::to_vec(rec)
            .map_err(|e| FileError::new(&self.path, std::io::Error::other(e)))?;
        line.push(b'\n');
        let io = |e| FileError::new(&self.path, e);
        self.file.write_all(&line).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, q: Option<f64>) -> RecordNegatives {
        RecordNegatives {
            id: id.into(),
            negatives: vec![Negative {
                image: "p1".into(),
                strategy: "misp".into(),
                score: Some(1.5),
                recon: Some(0.2),
                l1: Some(3.0),
                q,
                seed: None,
            }],
        }
    }

    #[test]
    fn reopening_repairs_a_partial_line_and_reports_done_ids() {
        let path = std::env::temp_dir().join(format!("misp-neg-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let (mut w, done) = Writer::open(&path).unwrap();
        assert!(done.is_empty());
        w.append(&rec("a", Some(0.25))).unwrap();
        w.append(&rec("b", None)).unwrap();
        drop(w);
        // Simulate a kill in the middle of a write.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"id\": \"c\", \"negat").unwrap();
        drop(f);
        let (mut w, done) = Writer::open(&path).unwrap();
        assert_eq!(done, HashSet::from(["a".to_string(), "b".to_string()]));
        w.append(&rec("c", Some(1.0))).unwrap();
        let all = read(&path).unwrap();
        assert_eq!(
            all,
            vec![rec("a", Some(0.25)), rec("b", None), rec("c", Some(1.0))]
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("\"q\":null"),
            "absent values are explicit nulls: {text}"
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn bad_q_and_duplicates_name_the_line() {
        let path = std::env::temp_dir().join(format!("misp-negbad-{}.jsonl", std::process::id()));
        let lines =
            [rec("a", Some(0.5)), rec("b", Some(0.0))].map(|r| serde_json::to_string(&r).unwrap());
        std::fs::write(&path, lines.join("\n")).unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(err.contains(":2:") && err.contains("q = 0"), "{err}");
        let lines =
            [rec("a", Some(0.5)), rec("a", Some(0.5))].map(|r| serde_json::to_string(&r).unwrap());
        std::fs::write(&path, lines.join("\n")).unwrap();
        assert!(read(&path).unwrap_err().to_string().contains("duplicate"));
        std::fs::remove_file(&path).unwrap();
    }
}
